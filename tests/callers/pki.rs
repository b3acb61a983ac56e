//! Certificates made in the test with rcgen: a caller CA, server and client certificates
//! (good, expired, not yet valid, from another CA, without the clientAuth usage).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// A positive 16-byte serial number, distinct per certificate.
fn rand_serial() -> [u8; 16] {
    let mut b = *uuid::Uuid::new_v4().as_bytes();
    b[0] &= 0x7f;
    b[0] |= 0x01;
    b
}

pub struct Ca {
    pub issuer: CertifiedIssuer<'static, KeyPair>,
}

pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub serial: SerialNumber,
}

impl Leaf {
    /// Writes `NAME.crt` and `NAME.key` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let c = dir.join(format!("{name}.crt"));
        let k = dir.join(format!("{name}.key"));
        std::fs::write(&c, &self.cert_pem).unwrap();
        std::fs::write(&k, &self.key_pem).unwrap();
        (c, k)
    }
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn sign(&self, mut p: CertificateParams) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let serial = SerialNumber::from_slice(&rand_serial());
        p.serial_number = Some(serial.clone());
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial,
        }
    }

    /// A revocation list (PEM) of this CA revoking `revoked`, numbered `number`.
    pub fn crl(&self, number: u64, revoked: &[&Leaf]) -> String {
        let now = OffsetDateTime::now_utc();
        CertificateRevocationListParams {
            this_update: now - Duration::minutes(1),
            next_update: now + Duration::days(1),
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|l| RevokedCertParams {
                    serial_number: l.serial.clone(),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .unwrap()
        .pem()
        .unwrap()
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Leaf {
        self.sign(server_params())
    }

    /// A server certificate for `localhost` and 127.0.0.1, valid from `not_before` to
    /// `not_after`.
    pub fn server_valid(&self, not_before: OffsetDateTime, not_after: OffsetDateTime) -> Leaf {
        let mut p = server_params();
        p.not_before = not_before;
        p.not_after = not_after;
        self.sign(p)
    }

    /// A client certificate with the given SANs (`spiffe://…` URIs, else DNS names) and
    /// extended key usage (none: no such extension).
    pub fn client_with(
        &self,
        sans: &[&str],
        usage: impl Into<Option<ExtendedKeyUsagePurpose>>,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Leaf {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "test caller");
        for s in sans {
            p.subject_alt_names.push(if s.starts_with("spiffe://") {
                SanType::URI(s.to_string().try_into().unwrap())
            } else {
                SanType::DnsName(s.to_string().try_into().unwrap())
            });
        }
        p.extended_key_usages = usage.into().into_iter().collect();
        p.not_before = not_before;
        p.not_after = not_after;
        self.sign(p)
    }

    pub fn client(&self, sans: &[&str]) -> Leaf {
        let now = OffsetDateTime::now_utc();
        self.client_with(
            sans,
            ExtendedKeyUsagePurpose::ClientAuth,
            now - Duration::hours(1),
            now + Duration::days(1),
        )
    }
}

fn server_params() -> CertificateParams {
    let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p
}
