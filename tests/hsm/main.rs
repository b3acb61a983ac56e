//! PKCS#11 signing against SoftHSM2: the signer on its own (certificate, RS256 and PS256
//! signatures checked with the certificate's public key, refusals), and a tenant whose key
//! is on the token getting tokens from the emulator's Entra through gRPC.
//!
//! Runs without libtest's harness: SoftHSM reads where its tokens live from the environment
//! (`SOFTHSM2_CONF`), and the environment may only be changed while the process has a single
//! thread, which is before any test starts. The tests then run one after another.

#[path = "../broker/helpers.rs"]
mod helpers;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, CertificateType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use futures::FutureExt;
use helpers::*;
use rsa::RsaPublicKey;
use rsa::pkcs8::DecodePublicKey;
use sha2::{Digest, Sha256};
use tokenbroker::config::{PinSource, SigningAlgorithm};
use tokenbroker::emulator::EmulatorConfig;
use tokenbroker::emulator::config::CertificateConfig;
use tokenbroker::proto::TokenSource;
use tokenbroker::signer::pkcs11::{Pkcs11Signer, TokenConfig, token_url};
use tokenbroker::signer::{Signer, SignerError};
use tonic::Code;

const TOKEN: &str = "tokenbroker-test";
const KEY: &str = "contoso-hsm";
const EXPIRED_KEY: &str = "contoso-hsm-old";
const ROTATING: &str = "contoso-rotating";
/// A key whose certificate object holds no DER certificate.
const GARBLED: &str = "contoso-garbled";
/// A key with two certificate objects of its CKA_ID.
const TWICE: &str = "contoso-twice";
/// Two keys under one label, one of them without a CKA_ID.
const NO_ID: &str = "contoso-no-id";
/// An EC key and its certificate: RS256 and PS256 need an RSA key.
const EC: &str = "contoso-ec";
/// Two keys under one label, the newer one's certificate not on the token yet (generated
/// on the token, its certificate still being issued).
const PENDING: &str = "contoso-pending";
/// A key whose certificate object (its CKA_ID) holds another key's certificate.
const MISMATCH: &str = "contoso-mismatch";
/// An RSA key whose CKA_SIGN is false.
const NO_SIGN: &str = "contoso-no-sign";
/// Two keys under different labels that share a CKA_ID, each certificate beside its key.
const SHARED_ID: [&str; 2] = ["contoso-shared-a", "contoso-shared-b"];
const PIN: &str = "4711-user";
const PIN_ENV: &str = "TOKENBROKER_TEST_HSM_PIN";
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The SoftHSM token made for this run, and what was put on it.
struct Hsm {
    dir: tempfile::TempDir,
    module: PathBuf,
    /// The certificate and its private key, as the emulator imports them.
    pem: PathBuf,
    der: Vec<u8>,
    /// Another key, whose certificate's validity ended a year ago.
    expired_pem: PathBuf,
    /// Two keys under one label, as during a rotation: the older certificate and the newer.
    rotating: [(PathBuf, Vec<u8>); 2],
}

/// An RSA key and its self-signed certificate, written out for the token and the emulator.
struct Pair {
    label: &'static str,
    id: u8,
    key_pem: PathBuf,
    /// Certificate and key, as the emulator imports them.
    pem: PathBuf,
    der: Vec<u8>,
}

impl Pair {
    fn new(
        dir: &std::path::Path,
        label: &'static str,
        id: u8,
        years: Option<(i32, i32)>,
    ) -> Result<Pair, String> {
        let alg = match label {
            EC => &rcgen::PKCS_ECDSA_P256_SHA256,
            _ => &rcgen::PKCS_RSA_SHA256,
        };
        let key = rcgen::KeyPair::generate_for(alg).map_err(|e| e.to_string())?;
        let mut params =
            rcgen::CertificateParams::new(vec![label.to_owned()]).map_err(|e| e.to_string())?;
        if let Some((from, to)) = years {
            params.not_before = rcgen::date_time_ymd(from, 1, 1);
            params.not_after = rcgen::date_time_ymd(to, 1, 1);
        }
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        let key_pem = dir.join(format!("{label}-{id:02x}.key.pem"));
        std::fs::write(&key_pem, key.serialize_pem()).map_err(|e| e.to_string())?;
        let pem = dir.join(format!("{label}-{id:02x}.pem"));
        std::fs::write(dir.join(format!("{label}-{id:02x}.der")), cert.der())
            .map_err(|e| e.to_string())?;
        std::fs::write(&pem, format!("{}{}", cert.pem(), key.serialize_pem()))
            .map_err(|e| e.to_string())?;
        Ok(Pair {
            label,
            id,
            key_pem,
            pem,
            der: cert.der().to_vec(),
        })
    }
}

impl Hsm {
    fn pin_file(&self) -> PathBuf {
        self.dir.path().join("pin")
    }

    fn config(&self, pin: PinSource) -> TokenConfig {
        TokenConfig {
            module: self.module.clone(),
            label: TOKEN.into(),
            pin,
        }
    }

    fn url(&self) -> url::Url {
        token_url(&self.module, TOKEN).unwrap()
    }
}

fn softhsm_module() -> Option<PathBuf> {
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
        "/usr/local/lib/softhsm/libsofthsm2.so",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// A fresh token in a directory of its own, with an RSA key and its certificate on it.
/// Called while the process has one thread (it sets `SOFTHSM2_CONF`).
fn set_up() -> Result<Hsm, String> {
    let module = softhsm_module().ok_or(
        "SoftHSM2 is not installed (libsofthsm2.so not found): scripts/test.sh installs it, or `apt-get install softhsm2`",
    )?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).map_err(|e| e.to_string())?;
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    // SAFETY: no other thread exists yet (main calls this first, before any runtime).
    unsafe {
        std::env::set_var("SOFTHSM2_CONF", &conf);
        std::env::set_var(PIN_ENV, PIN);
    }
    std::fs::write(dir.path().join("pin"), format!("{PIN}\n")).map_err(|e| e.to_string())?;

    let pairs = [
        Pair::new(dir.path(), KEY, 0xa1, None)?,
        Pair::new(dir.path(), EXPIRED_KEY, 0xa2, Some((2024, 2025)))?,
        Pair::new(dir.path(), ROTATING, 0xa3, Some((2024, 2030)))?,
        Pair::new(dir.path(), ROTATING, 0xa4, Some((2026, 2031)))?,
        Pair::new(dir.path(), GARBLED, 0xb1, None)?,
        Pair::new(dir.path(), TWICE, 0xb2, None)?,
        Pair::new(dir.path(), NO_ID, 0xb3, None)?,
        Pair::new(dir.path(), NO_ID, 0xb4, None)?,
        Pair::new(dir.path(), EC, 0xb5, None)?,
        Pair::new(dir.path(), NO_SIGN, 0xb6, None)?,
        Pair::new(dir.path(), PENDING, 0xc1, None)?,
        Pair::new(dir.path(), PENDING, 0xc2, None)?,
        Pair::new(dir.path(), MISMATCH, 0xd1, None)?,
        Pair::new(dir.path(), SHARED_ID[0], 0xe1, None)?,
        Pair::new(dir.path(), SHARED_ID[1], 0xe1, None)?,
    ];

    let util = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("softhsm2-util")
            .args(args)
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .map_err(|e| format!("softhsm2-util: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "softhsm2-util {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    util(&[
        "--init-token",
        "--free",
        "--label",
        TOKEN,
        "--so-pin",
        "so-8642",
        "--pin",
        PIN,
    ])?;
    for p in &pairs {
        let key_path = p.key_pem.to_string_lossy().into_owned();
        let id = format!("{:02x}", p.id);
        let mut args = vec![
            "--import", &key_path, "--token", TOKEN, "--label", p.label, "--id", &id, "--pin", PIN,
        ];
        // softhsm2-util refuses a CKA_ID already on the token unless told it is meant.
        if p.label == SHARED_ID[1] {
            args.push("--force");
        }
        util(&args)?;
    }

    spare_token(dir.path(), &pairs[0].key_pem)?;

    // Each certificate beside its key (same CKA_ID), as an operator stores it.
    let ctx = Pkcs11::new(&module).map_err(|e| e.to_string())?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| e.to_string())?;
    let slot = token_slot(&ctx).ok_or("the new token has no slot")?;
    let session = ctx.open_rw_session(slot).map_err(|e| e.to_string())?;
    session
        .login(UserType::User, Some(&AuthPin::from(PIN)))
        .map_err(|e| e.to_string())?;
    for p in &pairs {
        let (_, parsed) = x509_parser::parse_x509_certificate(&p.der).map_err(|e| e.to_string())?;
        let value = match p.label {
            GARBLED => b"not a certificate".to_vec(),
            MISMATCH => pairs[0].der.clone(),
            _ => p.der.clone(),
        };
        let copies = match (p.label, p.id) {
            (TWICE, _) => 2,
            (PENDING, 0xc2) => 0,
            _ => 1,
        };
        for _ in 0..copies {
            session
                .create_object(&[
                    Attribute::Class(ObjectClass::CERTIFICATE),
                    Attribute::CertificateType(CertificateType::X_509),
                    Attribute::Token(true),
                    Attribute::Label(p.label.as_bytes().to_vec()),
                    Attribute::Id(vec![p.id]),
                    Attribute::Subject(parsed.subject().as_raw().to_vec()),
                    Attribute::Value(value.clone()),
                ])
                .map_err(|e| e.to_string())?;
        }
    }
    // One of the two keys labelled NO_ID loses its CKA_ID.
    for key in session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(vec![0xb4]),
        ])
        .map_err(|e| e.to_string())?
    {
        session
            .update_attributes(key, &[Attribute::Id(vec![])])
            .map_err(|e| e.to_string())?;
    }
    for key in session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(vec![0xb6]),
        ])
        .map_err(|e| e.to_string())?
    {
        session
            .update_attributes(key, &[Attribute::Sign(false)])
            .map_err(|e| e.to_string())?;
    }
    drop(session);
    let spare = ctx
        .get_slots_with_token()
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == SPARE)
        })
        .ok_or("the spare token has no slot")?;
    let session = ctx.open_rw_session(spare).map_err(|e| e.to_string())?;
    session
        .login(UserType::User, Some(&AuthPin::from(PIN)))
        .map_err(|e| e.to_string())?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(&pairs[0].der).map_err(|e| e.to_string())?;
    session
        .create_object(&[
            Attribute::Class(ObjectClass::CERTIFICATE),
            Attribute::CertificateType(CertificateType::X_509),
            Attribute::Token(true),
            Attribute::Label(KEY.as_bytes().to_vec()),
            Attribute::Id(vec![pairs[0].id]),
            Attribute::Subject(parsed.subject().as_raw().to_vec()),
            Attribute::Value(pairs[0].der.clone()),
        ])
        .map_err(|e| e.to_string())?;
    drop(session);
    let [pair, expired, old, new, ..] = pairs;
    let (pem, der, expired_pem) = (pair.pem, pair.der, expired.pem);
    let rotating = [(old.pem, old.der), (new.pem, new.der)];
    Ok(Hsm {
        dir,
        module,
        pem,
        der,
        expired_pem,
        rotating,
    })
}

/// The slot holding the test token.
fn token_slot(ctx: &Pkcs11) -> Option<cryptoki::slot::Slot> {
    ctx.get_slots_with_token().ok()?.into_iter().find(|s| {
        ctx.get_token_info(*s)
            .is_ok_and(|i| i.label().trim_end() == TOKEN)
    })
}

fn public_key(der: &[u8]) -> RsaPublicKey {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    RsaPublicKey::from_public_key_der(cert.public_key().raw).unwrap()
}

async fn signs_with_the_token_key_and_reads_its_certificate(hsm: &Hsm) {
    let signer =
        Pkcs11Signer::new(&[hsm.config(PinSource::File(hsm.pin_file()))], TIMEOUT).unwrap();
    let info = signer.certificate(&hsm.url(), KEY).await.unwrap();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    assert_eq!(info.x5t_s256, b64.encode(Sha256::digest(&hsm.der)));
    assert_eq!(
        info.x5t,
        b64.encode(<sha1::Sha1 as Digest>::digest(&hsm.der))
    );
    assert!(info.not_after.is_some());
    assert_eq!(info.key.name, KEY);

    let public = public_key(&hsm.der);
    let digest: [u8; 32] = Sha256::digest(b"header.claims").into();
    let rs = signer
        .sign(&info.key, SigningAlgorithm::RS256, digest)
        .await
        .unwrap();
    public
        .verify(rsa::Pkcs1v15Sign::new::<Sha256>(), &digest, &rs)
        .expect("an RS256 signature the certificate verifies");
    let ps = signer
        .sign(&info.key, SigningAlgorithm::PS256, digest)
        .await
        .unwrap();
    public
        .verify(rsa::Pss::new::<Sha256>(), &digest, &ps)
        .expect("a PS256 signature the certificate verifies");

    // The login ends under the signer's idle sessions (as when the token is reset, or any
    // client of it in this process logs out): the next sign logs in again.
    let ctx = Pkcs11::new(&hsm.module).unwrap();
    let slot = token_slot(&ctx).unwrap();
    ctx.open_ro_session(slot).unwrap().logout().unwrap();
    let again = signer
        .sign(&info.key, SigningAlgorithm::RS256, digest)
        .await
        .expect("a new login after the old one ended");
    assert_eq!(again, rs);

    // Concurrent signs each get a session of their own.
    let signs = (0..16).map(|_| signer.sign(&info.key, SigningAlgorithm::RS256, digest));
    for sig in futures::future::join_all(signs).await {
        assert_eq!(sig.unwrap(), rs, "PKCS#1 v1.5 signatures are deterministic");
    }
}

async fn the_pin_can_come_from_the_environment(hsm: &Hsm) {
    let signer = Pkcs11Signer::new(&[hsm.config(PinSource::Env(PIN_ENV.into()))], TIMEOUT).unwrap();
    signer.certificate(&hsm.url(), KEY).await.unwrap();
}

/// Runs first: a login holds for every session of the process while one is open, so a PIN
/// is only ever checked by a process that is not logged in yet.
async fn a_wrong_or_unreadable_pin_is_refused_with_the_fix(hsm: &Hsm) {
    let wrong = hsm.dir.path().join("wrong-pin");
    std::fs::write(&wrong, "0000\n").unwrap();
    let stack = Stack::start_with(estate(hsm), |toml| {
        on_the_token(hsm, KEY, "RS256")(toml).replace(
            &hsm.pin_file().display().to_string(),
            &wrong.display().to_string(),
        )
    })
    .await;
    let e = stack.get("contoso", GRAPH).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("CKR_PinIncorrect"), "{}", e.message());
    assert!(
        e.message().contains("pin_file or pin_env"),
        "{}",
        e.message()
    );
    assert!(!e.message().contains("0000"), "{}", e.message());
    stack.stop().await;

    // The same wrong PIN is not offered again (an HSM locks its user after a few); a
    // corrected PIN file is read and tried at the next login.
    let signer = Pkcs11Signer::new(&[hsm.config(PinSource::File(wrong.clone()))], TIMEOUT).unwrap();
    let first = signer.certificate(&hsm.url(), KEY).await.unwrap_err();
    assert!(first.to_string().contains("CKR_PinIncorrect"), "{first}");
    assert!(!first.to_string().contains("not offered again"), "{first}");
    let again = signer.certificate(&hsm.url(), KEY).await.unwrap_err();
    assert!(
        matches!(&again, SignerError::Forbidden { code, .. } if code == "CKR_PinIncorrect"),
        "{again:?}"
    );
    assert!(again.to_string().contains("not offered again"), "{again}");
    std::fs::write(&wrong, format!("{PIN}\n")).unwrap();
    signer.certificate(&hsm.url(), KEY).await.unwrap();
    drop(signer);

    let missing = hsm.dir.path().join("no-such-pin");
    let e = Pkcs11Signer::new(&[hsm.config(PinSource::File(missing.clone()))], TIMEOUT)
        .unwrap()
        .certificate(&hsm.url(), KEY)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SignerError::Forbidden { code, .. } if code == "PinUnreadable"),
        "{e:?}"
    );
    assert!(
        e.to_string().contains(&missing.display().to_string()),
        "{e}"
    );
    // An empty PIN file (a secret mounted before it was filled) is not offered: the token
    // would count it as a wrong PIN towards locking its user.
    let empty = hsm.dir.path().join("empty-pin");
    std::fs::write(&empty, "\n").unwrap();
    let e = Pkcs11Signer::new(&[hsm.config(PinSource::File(empty.clone()))], TIMEOUT)
        .unwrap()
        .certificate(&hsm.url(), KEY)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SignerError::Forbidden { code, .. } if code == "PinEmpty"),
        "{e:?}"
    );
    assert!(e.to_string().contains(&empty.display().to_string()), "{e}");
    // A PIN is short: a PIN file far larger (a mistaken path, a device) is refused as a
    // configuration error naming the file, neither read whole nor echoed.
    let huge = hsm.dir.path().join("huge-pin");
    std::fs::write(&huge, "7".repeat(1 << 20)).unwrap();
    let e = Pkcs11Signer::new(&[hsm.config(PinSource::File(huge.clone()))], TIMEOUT)
        .unwrap()
        .certificate(&hsm.url(), KEY)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SignerError::Configuration { code, .. } if code == "PinFileTooLarge"),
        "{e:?}"
    );
    assert!(e.to_string().contains(&huge.display().to_string()), "{e}");
    assert!(!e.to_string().contains("7777"), "{e}");
    // Nor is a FIFO, whose reader would wait for a writer. (Something opens it to write
    // once, so that a reader does not wait for ever.)
    let fifo = hsm.dir.path().join("fifo-pin");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let writer = fifo.clone();
    std::thread::spawn(move || std::fs::OpenOptions::new().write(true).open(writer));
    let e = Pkcs11Signer::new(&[hsm.config(PinSource::File(fifo.clone()))], TIMEOUT)
        .unwrap()
        .certificate(&hsm.url(), KEY)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SignerError::Configuration { code, .. } if code == "PinFileNotRegular"),
        "{e:?}"
    );
    assert!(e.to_string().contains(&fifo.display().to_string()), "{e}");
    let e = Pkcs11Signer::new(
        &[hsm.config(PinSource::Env("TOKENBROKER_TEST_UNSET".into()))],
        TIMEOUT,
    )
    .unwrap()
    .certificate(&hsm.url(), KEY)
    .await
    .unwrap_err();
    assert!(
        matches!(&e, SignerError::Forbidden { code, .. } if code == "PinUnset"),
        "{e:?}"
    );
}

async fn a_missing_key_token_or_module_is_named(hsm: &Hsm) {
    let signer =
        Pkcs11Signer::new(&[hsm.config(PinSource::File(hsm.pin_file()))], TIMEOUT).unwrap();
    let e = signer
        .certificate(&hsm.url(), "no-such-key")
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SignerError::NotFound { code, .. } if code == "KeyNotFound"),
        "{e:?}"
    );
    assert!(e.to_string().contains("no-such-key"), "{e}");

    let absent = TokenConfig {
        label: "absent-token".into(),
        ..hsm.config(PinSource::File(hsm.pin_file()))
    };
    let signer = Pkcs11Signer::new(&[absent], TIMEOUT).unwrap();
    let url = token_url(&hsm.module, "absent-token").unwrap();
    let e = signer.certificate(&url, KEY).await.unwrap_err();
    assert!(
        matches!(&e, SignerError::NotFound { code, .. } if code == "TokenNotPresent"),
        "{e:?}"
    );

    let e = Pkcs11Signer::new(
        &[TokenConfig {
            module: hsm.dir.path().join("no-such-module.so"),
            ..hsm.config(PinSource::File(hsm.pin_file()))
        }],
        TIMEOUT,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("cannot load the PKCS#11 module"),
        "{e}"
    );
}

/// Objects on the token that cannot be paired up are the operator's to fix, like a key that
/// cannot sign: FAILED_PRECONDITION with what to fix, not INTERNAL.
async fn objects_that_cannot_be_paired_up_are_a_failed_precondition(hsm: &Hsm) {
    let signer =
        Pkcs11Signer::new(&[hsm.config(PinSource::File(hsm.pin_file()))], TIMEOUT).unwrap();
    for (label, want) in [
        (GARBLED, "CertificateUnreadable"),
        (TWICE, "CertificateAmbiguous"),
        (NO_ID, "KeyIdMissing"),
        (EC, "KeyNotRsa"),
        (MISMATCH, "CertificateKeyMismatch"),
    ] {
        let e = signer.certificate(&hsm.url(), label).await.unwrap_err();
        assert!(
            matches!(&e, SignerError::Configuration { code, .. } if code == want),
            "{label}: {e:?}"
        );
        assert!(e.to_string().contains(label), "{e}");
    }
    // A key whose certificate is not on the token yet is passed over while another key
    // under its label has one: the rotation's new key is made before its certificate.
    let info = signer.certificate(&hsm.url(), PENDING).await.unwrap();
    let sig = signer
        .sign(&info.key, SigningAlgorithm::RS256, [7; 32])
        .await
        .unwrap();
    let der = std::fs::read(hsm.dir.path().join(format!("{PENDING}-c1.der"))).unwrap();
    assert_eq!(info.version, version(&der));
    public_key(&der)
        .verify(rsa::Pkcs1v15Sign::new::<Sha256>(), &[7; 32], &sig)
        .expect("signed by the key whose certificate is on the token");

    // A key that may not sign is found, and refused for what it is.
    let info = signer.certificate(&hsm.url(), NO_SIGN).await.unwrap();
    let e = signer
        .sign(&info.key, SigningAlgorithm::RS256, [7; 32])
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SignerError::Configuration { code, .. } if code == "CKR_KeyFunctionNotPermitted"),
        "{e:?}"
    );
    assert!(e.to_string().contains(NO_SIGN), "{e}");
    assert!(e.to_string().contains("CKA_SIGN"), "{e}");
    assert!(!e.to_string().contains("not found"), "{e}");

    // Keys under different labels that share a CKA_ID are told apart by label: each gets
    // the certificate with its CKA_ID and its label, and signs with its own key.
    for label in SHARED_ID {
        let info = signer.certificate(&hsm.url(), label).await.unwrap();
        let der = std::fs::read(hsm.dir.path().join(format!("{label}-e1.der"))).unwrap();
        assert_eq!(info.version, version(&der), "{label}");
        let sig = signer
            .sign(&info.key, SigningAlgorithm::RS256, [7; 32])
            .await
            .unwrap();
        public_key(&der)
            .verify(rsa::Pkcs1v15Sign::new::<Sha256>(), &[7; 32], &sig)
            .expect("signed by the key of the label's certificate");
    }
    drop(signer);
    for (label, says) in [
        (
            TWICE,
            &[
                "CertificateAmbiguous",
                "keep one per key",
                "paired by CKA_ID",
            ][..],
        ),
        (EC, &["KeyNotRsa", "is an EC key", "an RSA key"][..]),
    ] {
        let stack = Stack::start_with(estate(hsm), on_the_token(hsm, label, "RS256")).await;
        let e = stack.get("contoso", GRAPH).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        for says in says {
            assert!(e.message().contains(says), "{}", e.message());
        }
        assert!(!e.message().contains("not found"), "{}", e.message());
        stack.stop().await;
    }
}

/// The demo estate, with contoso's app also trusting the certificate whose key is on the
/// token (imported into the emulator's vault only so that its app registration knows it).
fn estate(hsm: &Hsm) -> EmulatorConfig {
    let mut emu = EmulatorConfig::demo();
    for (name, pem) in [
        (KEY, &hsm.pem),
        (EXPIRED_KEY, &hsm.expired_pem),
        ("contoso-rotating-old", &hsm.rotating[0].0),
        ("contoso-rotating-new", &hsm.rotating[1].0),
    ] {
        emu.vaults[0].certificates.push(CertificateConfig {
            name: name.into(),
            key_type: "RSA".into(),
            key_size: 2048,
            versions: 1,
            import_pem: Some(pem.clone()),
            subject: None,
            validity_days: 365,
        });
        for t in &mut emu.tenants {
            for a in &mut t.apps {
                if a.client_id == demo::CONTOSO_APP {
                    a.certificates.push(format!("{}/{name}", demo::VAULT));
                }
            }
        }
    }
    emu
}

/// The broker configuration with contoso's credential on the token.
fn on_the_token(hsm: &Hsm, key: &str, algorithm: &str) -> impl FnOnce(String) -> String {
    let credential = format!(
        "credential = {{ type = \"pkcs11\", module = \"{}\", token = \"{TOKEN}\", key = \"{key}\", pin_file = \"{}\", algorithm = \"{algorithm}\", thumbprint = \"x5t_s256\" }}",
        hsm.module.display(),
        hsm.pin_file().display()
    );
    move |toml: String| {
        toml.lines()
            .map(|l| {
                if l.contains("certificate = \"contoso-app\"") {
                    credential.clone()
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

async fn a_tenant_with_its_key_on_the_token_gets_tokens_from_entra(hsm: &Hsm) {
    for algorithm in ["RS256", "PS256"] {
        let stack = Stack::start_with(estate(hsm), on_the_token(hsm, KEY, algorithm)).await;
        let signs_before = stack.total_signs().await;
        let t = stack.get("contoso", GRAPH).await.unwrap();
        assert_eq!(t.source, TokenSource::Exchange as i32);
        assert_eq!(t.tenant_id, demo::CONTOSO_TENANT);
        // The assertion Entra accepted names the token's certificate and was signed there,
        // not in Key Vault.
        let assertion = stack.assertions.lock().unwrap()[0].clone();
        let header = header_of(&assertion);
        assert_eq!(header["alg"], algorithm);
        use base64::Engine;
        assert_eq!(
            header["x5t#S256"],
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(&hsm.der))
        );
        assert_eq!(
            stack.total_signs().await,
            signs_before,
            "Key Vault signed nothing"
        );
        // Other tenants still sign in Key Vault.
        stack.get("fabrikam", GRAPH).await.unwrap();
        let metrics = stack.metrics().await;
        assert!(
            metrics.contains("upstream=\"hsm_sign\""),
            "the HSM's signs are counted as its own upstream"
        );
        stack.stop().await;
    }
}

async fn a_key_missing_from_the_token_is_a_failed_precondition_naming_the_fix(hsm: &Hsm) {
    let stack = Stack::start_with(estate(hsm), on_the_token(hsm, "no-such-key", "RS256")).await;
    let e = stack.get("contoso", GRAPH).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("no-such-key"), "{}", e.message());
    assert!(
        e.message().contains("module, token and key"),
        "{}",
        e.message()
    );
    stack.stop().await;
}

async fn the_online_check_tries_a_tenant_whose_key_is_on_the_token(hsm: &Hsm) {
    for (key, ok) in [(KEY, true), ("no-such-key", false)] {
        let (_emulator, path, _dir) =
            emulator_with_config(estate(hsm), on_the_token(hsm, key, "RS256")).await;
        let config = tokenbroker::config::Config::load(&path, &|_| None).unwrap();
        let up = tokenbroker::server::upstreams(&config).unwrap();
        let checks = tokenbroker::probe::check(
            &config,
            up,
            &["contoso".to_owned()],
            &[GRAPH.to_owned()],
            std::time::Duration::from_secs(60),
        )
        .await
        .unwrap();
        match (&checks[0].outcome, ok) {
            (
                tokenbroker::probe::Outcome::Ok {
                    certificate_ends_in: Some(s),
                    ..
                },
                true,
            ) => {
                // The token's certificate, read from the token, is valid for a year.
                assert!(*s > 300.0 * 86_400.0, "{s}");
            }
            (tokenbroker::probe::Outcome::Failed { code, message }, false) => {
                assert_eq!(*code, Code::FailedPrecondition);
                assert!(message.contains("no-such-key"), "{message}");
                assert!(message.contains("module, token and key"), "{message}");
            }
            (other, _) => panic!("{key}: {other:?}"),
        }
    }
}

async fn an_expired_certificate_is_refused_by_entra_with_the_fix(hsm: &Hsm) {
    let stack = Stack::start_with(estate(hsm), on_the_token(hsm, EXPIRED_KEY, "RS256")).await;
    let e = stack.get("contoso", GRAPH).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("AADSTS700027"), "{}", e.message());
    assert!(
        e.message().contains("expired on application"),
        "{}",
        e.message()
    );
    assert!(e.message().contains("renew it"), "{}", e.message());
    // The HSM signed it (it does not judge certificates): Entra refused the certificate.
    assert!(!stack.assertions.lock().unwrap().is_empty());
    stack.stop().await;
}

/// The decoded header of a JWT.
fn header_of(jwt: &str) -> serde_json::Value {
    use base64::Engine;
    let part = jwt.split('.').next().unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

fn version(der: &[u8]) -> String {
    Sha256::digest(der)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs last: it removes the newer rotating key from the token.
async fn a_rotation_under_one_label_signs_with_the_newest_and_outlives_its_removal(hsm: &Hsm) {
    let [(_, old), (_, new)] = &hsm.rotating;
    let signer =
        Pkcs11Signer::new(&[hsm.config(PinSource::File(hsm.pin_file()))], TIMEOUT).unwrap();
    // Of two keys labelled alike, the newest valid certificate is the current one...
    let info = signer.certificate(&hsm.url(), ROTATING).await.unwrap();
    assert_eq!(info.version, version(new));
    // ...and each version signs with its own key: the flow falls back to the previous
    // version while Entra does not know the new certificate yet.
    let digest: [u8; 32] = Sha256::digest(b"header.claims").into();
    for der in [new, old] {
        let key = tokenbroker::signer::KeyRef {
            version: version(der),
            ..info.key.clone()
        };
        let sig = signer
            .sign(&key, SigningAlgorithm::RS256, digest)
            .await
            .unwrap();
        public_key(der)
            .verify(rsa::Pkcs1v15Sign::new::<Sha256>(), &digest, &sig)
            .expect("signed by the key of that certificate");
    }
    let gone = tokenbroker::signer::KeyRef {
        version: "0000000000000000".into(),
        ..info.key.clone()
    };
    let e = signer
        .sign(&gone, SigningAlgorithm::RS256, digest)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SignerError::NotFound { code, .. } if code == "KeyVersionNotFound"),
        "{e:?}"
    );
    drop(signer);

    // End to end: a token signed with the newer key; then the newer key is removed from the
    // token (a rotation rolled back), and a forced refresh signs with the older one at once.
    let stack = Stack::start_with(estate(hsm), on_the_token(hsm, ROTATING, "RS256")).await;
    let first = stack.get("contoso", GRAPH).await.unwrap();
    let ctx = Pkcs11::new(&hsm.module).unwrap();
    let session = ctx.open_rw_session(token_slot(&ctx).unwrap()).unwrap();
    for handle in session.find_objects(&[Attribute::Id(vec![0xa4])]).unwrap() {
        session.destroy_object(handle).unwrap();
    }
    drop(session);
    let again = stack
        .force_refresh("contoso", GRAPH)
        .await
        .expect("the refresh signs with the remaining key");
    assert_ne!(again.access_token, first.access_token);
    let thumbprints: Vec<String> = stack
        .assertions
        .lock()
        .unwrap()
        .iter()
        .map(|a| header_of(a)["x5t#S256"].as_str().unwrap().to_owned())
        .collect();
    use base64::Engine;
    let b64 =
        |der: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(der));
    assert_eq!(thumbprints, [b64(new), b64(old)]);
    stack.stop().await;
}

fn main() -> ExitCode {
    let hsm = match set_up() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("hsm tests: cannot set up a SoftHSM token: {e}");
            return ExitCode::FAILURE;
        }
    };
    install_crypto();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    type Test = for<'a> fn(&'a Hsm) -> futures::future::BoxFuture<'a, ()>;
    let tests: [(&str, Test); 11] = [
        ("a_wrong_or_unreadable_pin_is_refused_with_the_fix", |h| {
            a_wrong_or_unreadable_pin_is_refused_with_the_fix(h).boxed()
        }),
        ("signs_with_the_token_key_and_reads_its_certificate", |h| {
            signs_with_the_token_key_and_reads_its_certificate(h).boxed()
        }),
        ("the_pin_can_come_from_the_environment", |h| {
            the_pin_can_come_from_the_environment(h).boxed()
        }),
        ("a_missing_key_token_or_module_is_named", |h| {
            a_missing_key_token_or_module_is_named(h).boxed()
        }),
        (
            "a_tenant_with_its_key_on_the_token_gets_tokens_from_entra",
            |h| a_tenant_with_its_key_on_the_token_gets_tokens_from_entra(h).boxed(),
        ),
        (
            "the_online_check_tries_a_tenant_whose_key_is_on_the_token",
            |h| the_online_check_tries_a_tenant_whose_key_is_on_the_token(h).boxed(),
        ),
        (
            "an_expired_certificate_is_refused_by_entra_with_the_fix",
            |h| an_expired_certificate_is_refused_by_entra_with_the_fix(h).boxed(),
        ),
        (
            "a_key_missing_from_the_token_is_a_failed_precondition_naming_the_fix",
            |h| a_key_missing_from_the_token_is_a_failed_precondition_naming_the_fix(h).boxed(),
        ),
        (
            "objects_that_cannot_be_paired_up_are_a_failed_precondition",
            |h| objects_that_cannot_be_paired_up_are_a_failed_precondition(h).boxed(),
        ),
        (
            "a_rotation_under_one_label_signs_with_the_newest_and_outlives_its_removal",
            |h| {
                a_rotation_under_one_label_signs_with_the_newest_and_outlives_its_removal(h).boxed()
            },
        ),
        ("a_token_deleted_while_in_use_is_named_as_absent", |h| {
            a_token_deleted_while_in_use_is_named_as_absent(h).boxed()
        }),
    ];
    let mut failed = 0;
    let mut ran = 0;
    for (name, test) in tests {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        ran += 1;
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| rt.block_on(test(&hsm))));
        match result {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                failed += 1;
                println!("test {name} ... FAILED");
            }
        }
    }
    println!(
        "\ntest result: {}. {} passed; {failed} failed",
        if failed == 0 { "ok" } else { "FAILED" },
        ran - failed
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A second token, made and deleted by `a_token_deleted_while_in_use_is_named_as_absent`.
const SPARE: &str = "tokenbroker-spare";

/// `softhsm2-util` on this run's tokens.
fn softhsm(hsm: &Hsm, args: &[&str]) {
    let out = Command::new("softhsm2-util")
        .args(args)
        .env("SOFTHSM2_CONF", hsm.dir.path().join("softhsm2.conf"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "softhsm2-util {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The spare token with `KEY` and its certificate on it. SoftHSM sees a token made by
/// another process only from its own start, so this one is made before any test runs.
fn spare_token(dir: &std::path::Path, key_pem: &std::path::Path) -> Result<(), String> {
    let conf = dir.join("softhsm2.conf");
    for args in [
        &[
            "--init-token",
            "--free",
            "--label",
            SPARE,
            "--so-pin",
            "so-8642",
            "--pin",
            PIN,
        ][..],
        &[
            "--import",
            &key_pem.to_string_lossy(),
            "--token",
            SPARE,
            "--label",
            KEY,
            "--id",
            "a1",
            "--pin",
            PIN,
        ],
    ] {
        let out = Command::new("softhsm2-util")
            .args(args)
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .map_err(|e| format!("softhsm2-util: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "softhsm2-util {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

/// A token deleted while the broker has sessions on it (a reset token, a removed one): its
/// fetches fail as they would had it been absent from the start (FAILED_PRECONDITION,
/// `TokenNotPresent`), not with a key "not found" on a token that is not there.
async fn a_token_deleted_while_in_use_is_named_as_absent(hsm: &Hsm) {
    let stack = Stack::start_with(estate(hsm), |toml| {
        on_the_token(hsm, KEY, "RS256")(toml).replace(
            &format!("token = \"{TOKEN}\""),
            &format!("token = \"{SPARE}\""),
        )
    })
    .await;
    stack.get("contoso", GRAPH).await.unwrap();
    softhsm(hsm, &["--delete-token", "--token", SPARE]);
    let e = stack.force_refresh("contoso", GRAPH).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    for says in ["TokenNotPresent", SPARE, "that the token is present"] {
        assert!(e.message().contains(says), "{}", e.message());
    }
    assert!(!e.message().contains("KeyNotFound"), "{}", e.message());
    stack.stop().await;
}
