//! Server-side TLS for the gRPC listener: the rustls configuration (aws-lc-rs only), the
//! server certificate that reloads itself when its files change, client-certificate
//! verification against the configured caller CA bundles and revocation lists (reloaded
//! when their files change), each CA vouching only for the identities it is scoped to when
//! trust domains have bundles of their own, and the stream of TLS connections
//! handed to tonic. Handshakes run off the accept loop, bounded in number and time, so a
//! slow or hostile client cannot stall other connections.

use std::collections::BTreeMap;
use std::fmt;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use futures::Stream;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, VerifierBuilderError, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::watched::{Look, WatchedFiles};
use tokio_rustls::server::TlsStream;
use tracing::{debug, info};

use crate::audit::rfc3339;
use crate::config::{ClientCertMode, ServerTls};

/// At most this many TLS handshakes run at once; further connections are closed.
const MAX_HANDSHAKES: usize = 256;
/// A client that has not finished its handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    /// The server certificate is outside its validity period: every client refuses it.
    #[error("server certificate {path}: {message}")]
    Validity { path: PathBuf, message: String },
    #[error("server certificate {cert} and key {key} do not form a usable pair: {message}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("client CA bundle {path}: {message}")]
    ClientCa { path: PathBuf, message: String },
    #[error("CA bundle {path} of trust domain {domain}: {message}")]
    TrustDomainCa {
        domain: String,
        path: PathBuf,
        message: String,
    },
    #[error("certificate revocation list {path}: {message}")]
    Crl { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The server certificate and key, re-read from their files when their content changes.
/// A broken new pair, or a certificate outside its validity period, is refused (logged once
/// per content, counted, and shown by `file_refused` while the files hold it) and the current
/// one keeps serving.
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
    files: WatchedFiles,
    /// Held from a reload's read of the pair to its install, as for the client trust: the one
    /// of two concurrent reloads (the watcher's, a SIGHUP's) that read first must not install
    /// its older pair over the other's newer one.
    reloading: Mutex<()>,
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<Self>, TlsError> {
        let (cert_pem, key_pem) = read_pair(cert_file, key_file)?;
        let key = certified_key(cert_file, key_file, &cert_pem, &key_pem)?;
        Ok(Arc::new(ReloadingCert {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: ArcSwap::from_pointee(key),
            files: WatchedFiles::new(Some(digest(&cert_pem, &key_pem))),
            reloading: Mutex::new(()),
        }))
    }

    /// Re-reads the files; installs the new pair when they changed and are valid.
    /// `Ok(true)` when a new certificate was installed.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        self.look().into_result(refused_before)
    }

    fn look(&self) -> Look<TlsError> {
        let _reloading = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let read = read_pair(&self.cert_file, &self.key_file).map(|(cert, key)| {
            let d = digest(&cert, &key);
            ((cert, key), d)
        });
        // Judged again at every look: a pair not yet valid becomes valid as it is.
        self.files.look(read, true, |(cert_pem, key_pem)| {
            let key = certified_key(&self.cert_file, &self.key_file, &cert_pem, &key_pem)?;
            self.current.store(Arc::new(key));
            Ok(())
        })
    }

    /// Whether the files hold a pair that was refused (or cannot be read), so that the
    /// certificate in use is an older one (`tokenbroker_server_certificate_refused`).
    pub fn file_refused(&self) -> bool {
        self.files.refused()
    }

    /// Contents of the files refused so far
    /// (`tokenbroker_server_certificate_reloads_refused`).
    pub fn refusals(&self) -> u64 {
        self.files.refusals()
    }

    /// The `notAfter` of the certificate in use.
    pub fn not_after(&self) -> Option<SystemTime> {
        validity(self.current.load().end_entity_cert().ok()?).map(|(_, not_after)| not_after)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The error of contents refused before and not judged again (the TLS files are judged at
/// every look, so this is never returned).
fn refused_before() -> TlsError {
    TlsError::Config("the files still hold the contents refused before".into())
}

fn read_pair(cert_file: &Path, key_file: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    Ok((read_file(cert_file)?, read_file(key_file)?))
}

fn digest(cert: &[u8], key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    hash_file(&mut h, cert);
    hash_file(&mut h, key);
    h.finalize().into()
}

/// Adds one file's content to a digest of several, length first so no two sets of files
/// run together into the same bytes.
fn hash_file(h: &mut Sha256, content: &[u8]) {
    h.update((content.len() as u64).to_be_bytes());
    h.update(content);
}

fn certified_key(
    cert_file: &Path,
    key_file: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let chain = certificates(cert_file, cert_pem)?;
    // Clients refuse a certificate outside its validity period: the broker would listen and
    // say it is ready, and no call would get through.
    if let Some((not_before, not_after)) = chain.first().and_then(validity) {
        let now = SystemTime::now();
        let problem = if now > not_after {
            Some(format!("expired at {}; renew it", rfc3339(not_after)))
        } else if now < not_before {
            Some(format!(
                "not valid before {} (or this host's clock is wrong)",
                rfc3339(not_before)
            ))
        } else {
            None
        };
        if let Some(message) = problem {
            return Err(TlsError::Validity {
                path: cert_file.to_owned(),
                message,
            });
        }
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
        path: key_file.to_owned(),
        message: format!("no usable private key: {e}"),
    })?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Pair {
        cert: cert_file.to_owned(),
        key: key_file.to_owned(),
        message: e.to_string(),
    })
}

/// A certificate's validity period (`notBefore`, `notAfter`); `None` when it does not parse
/// (rustls then says what is wrong with it).
fn validity(cert: &CertificateDer<'_>) -> Option<(SystemTime, SystemTime)> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, c) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let v = c.validity();
    Some((
        v.not_before.to_datetime().into(),
        v.not_after.to_datetime().into(),
    ))
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            message: "no PEM certificate found".into(),
        });
    }
    Ok(certs)
}

/// The listener's rustls configuration. The server certificate reloads through its
/// resolver (`ReloadingCert`); the client-certificate verifier is rebuilt, and the whole
/// configuration swapped for new connections, when the client CA bundle or a revocation list
/// changes. A broken new set is refused (logged once per content, counted, and shown by
/// `client_trust_refused` while the files hold it) and the current one stays.
pub struct ListenerConfig {
    tls: ServerTls,
    cert: Arc<ReloadingCert>,
    current: ArcSwap<rustls::ServerConfig>,
    /// The client-certificate verifier of `current` (rustls keeps its own private), to check
    /// again a certificate that opened a long-lived stream (`ClientCertCheck`).
    verifier: Mutex<Option<Arc<dyn ClientCertVerifier>>>,
    /// The CA bundle and revocation lists.
    trust: WatchedFiles,
    /// Held from a reload's read of the trust files to its install: the watcher's look and a
    /// SIGHUP's run at once, and the one that read first must not install its older files
    /// (a revocation list without the latest revocation) over the other's.
    reloading: Mutex<()>,
    /// Handshakes refused, by `HandshakeRefusal` (its index in `HandshakeRefusal::ALL`).
    refused: [AtomicU64; HandshakeRefusal::ALL.len()],
    /// Bumped after each new client trust is installed (`current` and `verifier` first): a
    /// connection's certificate verified under an older one is checked again at its next
    /// request (`VerifiedClient::still_trusted`).
    trust_generation: AtomicU64,
}

impl fmt::Debug for ListenerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerConfig")
            .field("client_ca_file", &self.tls.client_ca_file)
            .field("trust_domain_ca_files", &self.tls.trust_domain_ca_files)
            .field("client_crl_files", &self.tls.client_crl_files)
            .finish_non_exhaustive()
    }
}

impl ListenerConfig {
    /// The configuration for new connections.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current.load_full()
    }

    /// The server certificate (to reload it on demand).
    pub fn server_cert(&self) -> &Arc<ReloadingCert> {
        &self.cert
    }

    /// Re-reads the client CA bundle and revocation lists; installs a new verifier when they
    /// changed and are valid. `Ok(true)` when one was installed.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        self.look().into_result(refused_before)
    }

    fn look(&self) -> Look<TlsError> {
        let _reloading = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let read = TrustFiles::read(&self.tls).map(|files| {
            let d = files.digest;
            (files, d)
        });
        // Judged again at every look, as the server certificate is.
        self.trust.look(read, true, |files| {
            let verifier = files.verifier(&self.tls)?;
            let config = build_config(verifier.clone(), &self.cert)?;
            self.current.store(Arc::new(config));
            *self.verifier.lock().unwrap_or_else(|p| p.into_inner()) = verifier;
            self.trust_generation.fetch_add(1, Ordering::Release);
            Ok(())
        })
    }

    /// Whether the listener verifies client certificates (it has a client CA bundle, or a
    /// trust domain's).
    pub fn verifies_clients(&self) -> bool {
        self.tls.verifies_clients()
    }

    /// Whether the client CA bundle and revocation lists hold a set that was refused (or
    /// cannot be read), so that the trust in force is an older one
    /// (`tokenbroker_client_trust_refused`).
    pub fn client_trust_refused(&self) -> bool {
        self.trust.refused()
    }

    /// Contents of the client trust files refused so far
    /// (`tokenbroker_client_trust_reloads_refused`).
    pub fn client_trust_refusals(&self) -> u64 {
        self.trust.refusals()
    }

    /// Handshakes refused so far, for each reason
    /// (`tokenbroker_tls_handshakes_refused`).
    pub fn handshakes_refused(&self) -> impl Iterator<Item = (HandshakeRefusal, u64)> + '_ {
        HandshakeRefusal::ALL
            .iter()
            .zip(&self.refused)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
    }

    fn count_refusal(&self, why: HandshakeRefusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Re-reads the server certificate and the client trust files once, installing what
    /// changed and is valid, and logs the outcome: a refusal once per refused content (the
    /// watcher looks every few seconds), or again when an operator asks (`asked`: SIGHUP).
    pub fn reload_now(&self, asked: bool) {
        // Mid-rotation (cert written, key not yet) is refused too: the old pair keeps
        // serving, and the next look tries again.
        if self.cert.look().logged(
            asked,
            "server TLS certificate not reloaded; the previous one stays in use",
        ) {
            info!(cert = %self.cert.cert_file.display(), "server TLS certificate reloaded");
        }
        if self.verifies_clients()
            && self.look().logged(
                asked,
                "client CA bundle or revocation lists not reloaded; the previous ones stay in use",
            )
        {
            info!(
                trust_domains = self.tls.trust_domain_ca_files.len(),
                crls = self.tls.client_crl_files.len(),
                "client CA bundle and revocation lists reloaded"
            );
        }
    }
}

/// The client CA bundle, the trust domains' CA bundles and the revocation lists as read from
/// their files, and the digest of them all: compared first, as `ReloadingCert` does, so
/// unchanged files are not parsed again.
struct TrustFiles {
    ca: Option<Vec<u8>>,
    /// Each trust domain's bundle, in the order of `ServerTls::trust_domain_ca_files`.
    domains: Vec<Vec<u8>>,
    crls: Vec<Vec<u8>>,
    digest: [u8; 32],
}

impl TrustFiles {
    fn read(tls: &ServerTls) -> Result<TrustFiles, TlsError> {
        let mut h = Sha256::new();
        if !tls.verifies_clients() {
            return Ok(TrustFiles {
                ca: None,
                domains: Vec::new(),
                crls: Vec::new(),
                digest: h.finalize().into(),
            });
        }
        let ca = match &tls.client_ca_file {
            Some(path) => {
                let pem = read_file(path)?;
                hash_file(&mut h, &pem);
                Some(pem)
            }
            None => None,
        };
        let mut domains = Vec::with_capacity(tls.trust_domain_ca_files.len());
        for (domain, path) in &tls.trust_domain_ca_files {
            let pem = read_file(path)?;
            hash_file(&mut h, domain.as_bytes());
            hash_file(&mut h, &pem);
            domains.push(pem);
        }
        let mut crls = Vec::with_capacity(tls.client_crl_files.len());
        for path in &tls.client_crl_files {
            let pem = read_file(path)?;
            hash_file(&mut h, &pem);
            crls.push(pem);
        }
        Ok(TrustFiles {
            ca,
            domains,
            crls,
            digest: h.finalize().into(),
        })
    }

    /// The revocation lists the files hold, by file.
    fn revocation_lists<'t>(
        &self,
        tls: &'t ServerTls,
    ) -> Result<Vec<(&'t Path, Vec<CertificateRevocationListDer<'static>>)>, TlsError> {
        let mut crls = Vec::new();
        for (path, pem) in tls.client_crl_files.iter().zip(&self.crls) {
            let found = CertificateRevocationListDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::Crl {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            if found.is_empty() {
                return Err(TlsError::Crl {
                    path: path.clone(),
                    message: "no PEM revocation list (`-----BEGIN X509 CRL-----`) found".into(),
                });
            }
            crls.push((path.as_path(), found));
        }
        Ok(crls)
    }

    /// The client-certificate verifier the files make; none without a CA bundle. Without
    /// trust domains' bundles, every CA of `client_ca_file` vouches for every identity; with
    /// them, each CA only for the identities it is scoped to (`TrustDomainScopes`).
    fn verifier(&self, tls: &ServerTls) -> Result<Option<Arc<dyn ClientCertVerifier>>, TlsError> {
        if !tls.verifies_clients() {
            return Ok(None);
        }
        let by_file = self.revocation_lists(tls)?;
        let crls: Vec<_> = by_file
            .iter()
            .flat_map(|(_, c)| c.iter().cloned())
            .collect();
        let client_ca = match (&tls.client_ca_file, &self.ca) {
            (Some(path), Some(pem)) => Some((path, roots(path, pem, None)?)),
            _ => None,
        };
        let mut domains = Vec::with_capacity(self.domains.len());
        for ((domain, path), pem) in tls.trust_domain_ca_files.iter().zip(&self.domains) {
            domains.push((domain, path, roots(path, pem, Some(domain))?));
        }
        // The handshake accepts a chain to any of the CAs, as one bundle.
        let mut all = RootCertStore::empty();
        for store in client_ca
            .iter()
            .map(|(_, s)| s)
            .chain(domains.iter().map(|(_, _, s)| s))
        {
            all.roots.extend(store.roots.iter().cloned());
        }
        // A problem with the whole is told at the first file.
        let first = match (&client_ca, domains.first()) {
            (Some((path, _)), _) => (*path, None),
            (None, Some((domain, path, _))) => (*path, Some(domain.as_str())),
            (None, None) => return Ok(None),
        };
        // webpki checks the chain, validity period and the clientAuth extended key usage;
        // with revocation lists, every certificate of the chain must be covered by one (a
        // certificate whose status is unknown is refused).
        let all = Arc::new(all);
        let verifier = WebPkiClientVerifier::builder_with_provider(all.clone(), provider())
            .with_crls(crls.clone());
        let verifier = match tls.client_cert {
            ClientCertMode::Required => verifier,
            ClientCertMode::Optional => verifier.allow_unauthenticated(),
        };
        let verifier = verifier.build().map_err(|e| match e {
            // webpki parses the lists here: the file holding one it cannot use is told.
            VerifierBuilderError::InvalidCrl(_) => unusable_crl(&all, &by_file)
                .unwrap_or_else(|| bundle_error(first.0, first.1, e.to_string())),
            e => bundle_error(first.0, first.1, e.to_string()),
        })?;
        if domains.is_empty() {
            return Ok(Some(Arc::new(CallerVerifier {
                all: verifier,
                scopes: None,
            })));
        }
        // Each bundle alone, with the same revocation lists: what a chain must also verify
        // against for the identity it names.
        let alone = |path: &Path, domain: Option<&str>, roots: RootCertStore| {
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .with_crls(crls.clone())
                .build()
                .map_err(|e| bundle_error(path, domain, e.to_string()))
        };
        let client_ca = match client_ca {
            Some((path, roots)) => Some(alone(path, None, roots)?),
            None => None,
        };
        let mut scoped = BTreeMap::new();
        for (domain, path, roots) in domains {
            scoped.insert(domain.clone(), alone(path, Some(domain), roots)?);
        }
        Ok(Some(Arc::new(CallerVerifier {
            all: verifier,
            scopes: Some(TrustDomainScopes {
                domains: scoped,
                client_ca,
            }),
        })))
    }
}

/// The first revocation list file webpki cannot use on its own, as an error naming it.
fn unusable_crl(
    roots: &Arc<RootCertStore>,
    by_file: &[(&Path, Vec<CertificateRevocationListDer<'static>>)],
) -> Option<TlsError> {
    by_file.iter().find_map(|(path, crls)| {
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .with_crls(crls.iter().cloned())
            .build()
            .err()
            .map(|e| TlsError::Crl {
                path: path.to_path_buf(),
                message: match e {
                    VerifierBuilderError::InvalidCrl(e) => {
                        format!("not a revocation list the broker can use ({e:?})")
                    }
                    e => e.to_string(),
                },
            })
    })
}

/// The trust anchors of one CA bundle: `client_ca_file`, or the bundle of trust domain
/// `domain`.
fn roots(path: &Path, pem: &[u8], domain: Option<&str>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certificates(path, pem)? {
        roots
            .add(c)
            .map_err(|e| bundle_error(path, domain, e.to_string()))?;
    }
    Ok(roots)
}

fn bundle_error(path: &Path, domain: Option<&str>, message: String) -> TlsError {
    match domain {
        None => TlsError::ClientCa {
            path: path.to_owned(),
            message,
        },
        Some(domain) => TlsError::TrustDomainCa {
            domain: domain.to_owned(),
            path: path.to_owned(),
            message,
        },
    }
}

/// With trust domains' CA bundles (`server.trust_domain_ca_files`), a CA vouches only for
/// the identities it is scoped to, as the SPIFFE X.509-SVID specification requires: a
/// certificate naming a SPIFFE ID of a listed trust domain must also verify against that
/// domain's bundle alone; any other (a SPIFFE ID of a domain not listed, a DNS name, no
/// caller identity at all) against `client_ca_file` alone, and is refused without one.
#[derive(Debug)]
struct TrustDomainScopes {
    domains: BTreeMap<String, Arc<dyn ClientCertVerifier>>,
    client_ca: Option<Arc<dyn ClientCertVerifier>>,
}

impl TrustDomainScopes {
    /// Whether `end_entity` verifies against the bundle its caller identity is scoped to;
    /// `Err` says why not, for a person to act on.
    fn in_scope(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<(), String> {
        let named = crate::authn::mtls::identity(end_entity);
        let (names, domain) = match &named {
            Ok(i) => (
                format!("the certificate names {}", i.id),
                crate::authn::mtls::trust_domain(&i.id),
            ),
            Err(why) => (format!("the certificate names no caller ({why})"), None),
        };
        // Trust domain names are lower case; one written otherwise is still that domain's.
        let listed = domain.and_then(|d| {
            let d = d.to_ascii_lowercase();
            self.domains.get(&d).map(|v| (d, v))
        });
        // Why only client_ca_file can vouch for it.
        let unlisted = match (&named, domain) {
            (Ok(_), Some(d)) => format!("trust domain {d} is not in server.trust_domain_ca_files"),
            (Ok(_), None) => "DNS names are not scoped to a trust domain".to_string(),
            (Err(_), _) => {
                "it names no SPIFFE ID of a trust domain in server.trust_domain_ca_files"
                    .to_string()
            }
        };
        let (verifier, refused) = match (listed, &self.client_ca) {
            (Some((d, verifier)), _) => (
                verifier,
                format!(
                    "{names} but is not issued by trust domain {d}'s CA bundle (server.trust_domain_ca_files)"
                ),
            ),
            (None, Some(verifier)) => (
                verifier,
                format!(
                    "{names} but is not issued by a CA of server.client_ca_file, the only bundle that can vouch for it ({unlisted})"
                ),
            ),
            (None, None) => {
                return Err(format!(
                    "{names}, which no configured CA vouches for: {unlisted}, and no server.client_ca_file is configured"
                ));
            }
        };
        match verifier.verify_client_cert(end_entity, intermediates, now) {
            Ok(_) => Ok(()),
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
                Err(refused)
            }
            Err(e) => Err(format!("{refused}: {}", refusal_reason(&e))),
        }
    }
}

/// A client certificate refused for naming an identity its CA does not vouch for.
struct NotVouchedFor(String);

impl fmt::Debug for NotVouchedFor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // rustls shows a certificate error of its `Other` kind by its `Debug`.
        f.write_str(&self.0)
    }
}

impl fmt::Display for NotVouchedFor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotVouchedFor {}

/// Why rustls refused a certificate, in words: a refusal of `TrustDomainScopes` is told
/// as it is, not wrapped in rustls' `Other(OtherError(…))`.
fn refusal_reason(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
            format!("invalid peer certificate: {o}")
        }
        e => e.to_string(),
    }
}

/// The callers' certificate verifier: webpki's (chain to any configured CA, validity,
/// revocation), then the clientAuth purpose, then, with trust domains' bundles, the scope of
/// the CA that vouches for the identity named.
///
/// webpki requires the clientAuth extended key usage only when the certificate has the
/// extension: a certificate without any (a server or internal certificate issued by the
/// same CA) would pass as a caller's. It is refused here, at the handshake, as a certificate
/// for the wrong purpose.
#[derive(Debug)]
struct CallerVerifier {
    all: Arc<dyn ClientCertVerifier>,
    scopes: Option<TrustDomainScopes>,
}

impl ClientCertVerifier for CallerVerifier {
    fn offer_client_auth(&self) -> bool {
        self.all.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.all.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.all.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self
            .all
            .verify_client_cert(end_entity, intermediates, now)?;
        use x509_parser::prelude::{FromDer, X509Certificate};
        let client_auth = X509Certificate::from_der(end_entity.as_ref())
            .ok()
            .and_then(|(_, c)| {
                c.extended_key_usage()
                    .ok()
                    .flatten()
                    .map(|e| e.value.client_auth)
            });
        if client_auth != Some(true) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::InvalidPurpose,
            ));
        }
        if let Some(scopes) = &self.scopes {
            scopes
                .in_scope(end_entity, intermediates, now)
                .map_err(|why| {
                    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                        rustls::OtherError(Arc::new(NotVouchedFor(why))),
                    ))
                })?;
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.all.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.all.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.all.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.all.requires_raw_public_keys()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn build_config(
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    cert: &Arc<ReloadingCert>,
) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mutual = verifier.is_some();
    let builder = match verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(cert.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];
    if mutual {
        // A resumed session carries the client certificate of its first handshake without
        // checking it again (expiry, revocation lists, the CA bundle in force), and each
        // resumption can issue a fresh ticket: an expired or revoked certificate would keep
        // working. Every handshake with client certificates is a full one.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(config)
}

/// The rustls configuration for a TLS listener, with its reloading certificate and client
/// trust.
pub fn server_config(tls: &ServerTls) -> Result<Arc<ListenerConfig>, TlsError> {
    let cert = ReloadingCert::load(&tls.cert_file, &tls.key_file)?;
    let files = TrustFiles::read(tls)?;
    let verifier = files.verifier(tls)?;
    let config = build_config(verifier.clone(), &cert)?;
    Ok(Arc::new(ListenerConfig {
        tls: tls.clone(),
        cert,
        current: ArcSwap::from_pointee(config),
        verifier: Mutex::new(verifier),
        trust: WatchedFiles::new(Some(files.digest)),
        reloading: Mutex::new(()),
        refused: Default::default(),
        trust_generation: AtomicU64::new(0),
    }))
}

/// A connection's client certificate chain, checked again against the listener's trust as it
/// is now: the client CA bundle and revocation lists in force, which a long-lived stream
/// must keep passing (a certificate revoked after the handshake ends its watches).
pub struct ClientCertCheck {
    listener: Arc<ListenerConfig>,
    chain: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for ClientCertCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCertCheck").finish_non_exhaustive()
    }
}

impl ClientCertCheck {
    /// `Err` with the verifier's reason when the certificate would be refused now.
    pub fn still_accepted(&self) -> Result<(), String> {
        let verifier = self
            .listener
            .verifier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (Some(verifier), Some((leaf, intermediates))) = (verifier, self.chain.split_first())
        else {
            return Ok(());
        };
        verifier
            .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
            .map(drop)
            .map_err(|e| refusal_reason(&e))
    }
}

/// What the handshake established about a connection, computed once for all its requests
/// (the serve loop, `server::connections`, puts it in every request's extensions).
#[derive(Debug, Clone)]
pub struct TlsPeer {
    pub remote_addr: Option<SocketAddr>,
    /// The verified client certificate; `None` without one. One `Arc` for all the
    /// connection's requests, each of which clones it.
    pub client_identity: Option<Arc<VerifiedClient>>,
}

/// A connection's verified client certificate.
#[derive(Debug)]
pub struct VerifiedClient {
    /// Its caller identity (`authn::mtls::identity`), or why it has none.
    pub identity: Result<crate::authn::mtls::CertIdentity, String>,
    /// To check it again later against the trust then in force.
    pub check: ClientCertCheck,
    /// The client trust generation it was last accepted under.
    accepted_under: AtomicU64,
}

impl VerifiedClient {
    /// Whether the certificate is still accepted by the client trust in force: checked
    /// again (the whole chain, revocation included) only when the trust has changed since
    /// it was last accepted, so a connection opened before a revocation list or a CA
    /// bundle changed gets no more tokens once they refuse its certificate. Otherwise one
    /// atomic read.
    pub fn still_trusted(&self) -> Result<(), String> {
        let now = self.check.listener.trust_generation.load(Ordering::Acquire);
        if self.accepted_under.load(Ordering::Relaxed) == now {
            return Ok(());
        }
        self.check.still_accepted()?;
        self.accepted_under.store(now, Ordering::Relaxed);
        Ok(())
    }
}

/// A server-side TLS connection with its `TlsPeer`.
pub struct PeerStream {
    tls: TlsStream<TcpStream>,
    peer: TlsPeer,
}

impl PeerStream {
    /// `generation`: the client trust generation read before the handshake's configuration.
    fn new(
        tls: TlsStream<TcpStream>,
        remote_addr: SocketAddr,
        listener: &Arc<ListenerConfig>,
        generation: u64,
    ) -> PeerStream {
        let client_identity = tls.get_ref().1.peer_certificates().and_then(|chain| {
            let leaf = chain.first()?;
            Some(Arc::new(VerifiedClient {
                identity: crate::authn::mtls::identity(leaf),
                check: ClientCertCheck {
                    listener: listener.clone(),
                    chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
                },
                accepted_under: AtomicU64::new(generation),
            }))
        });
        PeerStream {
            tls,
            peer: TlsPeer {
                remote_addr: Some(remote_addr),
                client_identity,
            },
        }
    }
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = TlsPeer;

    fn connect_info(&self) -> TlsPeer {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and yields those that complete a TLS handshake. The accept loop
/// stops when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ListenerConfig>,
) -> impl Stream<Item = Result<PeerStream, std::io::Error>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<PeerStream, std::io::Error>>(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        let mut failures = crate::server::connections::Throttled::default();
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning
                        // (logged at most once per ten seconds).
                        failures.accept_failed(&e);
                        tokio::time::sleep(crate::server::connections::ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            // gRPC answers are small writes: without TCP_NODELAY, Nagle's algorithm holds them
            // for the peer's delayed ACK (about 40 ms on Linux).
            if let Err(e) = tcp.set_nodelay(true) {
                debug!(%peer, error = %e, "cannot set TCP_NODELAY");
            }
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                debug!(%peer, "too many TLS handshakes in progress; connection closed");
                config.count_refusal(HandshakeRefusal::OverCapacity);
                continue;
            };
            // The configuration in force when the connection arrived (client trust reloads),
            // and its generation, read first: a trust installed in between is newer than the
            // one recorded, and only costs the connection a check at its first request.
            let generation = config.trust_generation.load(Ordering::Acquire);
            let acceptor = TlsAcceptor::from(config.current());
            let tx = tx.clone();
            let config = config.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx
                            .send(Ok(PeerStream::new(tls, peer, &config, generation)))
                            .await;
                    }
                    Ok(Err(e)) => {
                        config.count_refusal(HandshakeRefusal::of(&e));
                        handshake_refused(peer, &e);
                    }
                    Err(_) => {
                        config.count_refusal(HandshakeRefusal::TimedOut);
                        debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Why the listener refused a connection at its TLS handshake: the bounded vocabulary of
/// `tokenbroker_tls_handshakes_refused`'s `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeRefusal {
    /// Mutual TLS required and the client sent no certificate.
    NoCertificate,
    /// A client certificate no configured CA issued.
    UnknownIssuer,
    /// A client certificate expired or not yet valid.
    OutsideValidity,
    /// A client certificate revoked by a configured revocation list.
    Revoked,
    /// A client certificate no revocation list covers, or covered only by an expired one.
    RevocationUnknown,
    /// A client certificate not made for client authentication.
    WrongPurpose,
    /// A certificate naming an identity its CA does not vouch for (trust domains).
    NotVouchedFor,
    /// Any other fault of the client certificate (encoding, signature, algorithm).
    BadCertificate,
    /// The client ended the handshake with an alert: often, it does not trust the broker's
    /// certificate.
    ClientAlert,
    /// Not TLS, or TLS the listener does not speak (version, cipher suites, ALPN).
    Protocol,
    /// The connection closed or failed mid-handshake.
    ConnectionLost,
    /// No handshake completed within the handshake timeout.
    TimedOut,
    /// Too many handshakes in progress: closed at once.
    OverCapacity,
}

impl HandshakeRefusal {
    /// Every reason, in the order of their discriminants.
    pub const ALL: [HandshakeRefusal; 13] = [
        HandshakeRefusal::NoCertificate,
        HandshakeRefusal::UnknownIssuer,
        HandshakeRefusal::OutsideValidity,
        HandshakeRefusal::Revoked,
        HandshakeRefusal::RevocationUnknown,
        HandshakeRefusal::WrongPurpose,
        HandshakeRefusal::NotVouchedFor,
        HandshakeRefusal::BadCertificate,
        HandshakeRefusal::ClientAlert,
        HandshakeRefusal::Protocol,
        HandshakeRefusal::ConnectionLost,
        HandshakeRefusal::TimedOut,
        HandshakeRefusal::OverCapacity,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeRefusal::NoCertificate => "no_certificate",
            HandshakeRefusal::UnknownIssuer => "unknown_issuer",
            HandshakeRefusal::OutsideValidity => "outside_validity",
            HandshakeRefusal::Revoked => "revoked",
            HandshakeRefusal::RevocationUnknown => "revocation_unknown",
            HandshakeRefusal::WrongPurpose => "wrong_purpose",
            HandshakeRefusal::NotVouchedFor => "not_vouched_for",
            HandshakeRefusal::BadCertificate => "bad_certificate",
            HandshakeRefusal::ClientAlert => "client_alert",
            HandshakeRefusal::Protocol => "protocol",
            HandshakeRefusal::ConnectionLost => "connection_lost",
            HandshakeRefusal::TimedOut => "timed_out",
            HandshakeRefusal::OverCapacity => "over_capacity",
        }
    }

    /// The reason of a handshake that failed with `e`.
    fn of(e: &std::io::Error) -> HandshakeRefusal {
        use rustls::CertificateError as C;
        let Some(e) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
            return HandshakeRefusal::ConnectionLost;
        };
        match e {
            rustls::Error::NoCertificatesPresented => HandshakeRefusal::NoCertificate,
            rustls::Error::InvalidCertificate(c) => match c {
                C::UnknownIssuer => HandshakeRefusal::UnknownIssuer,
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. } => HandshakeRefusal::OutsideValidity,
                C::Revoked => HandshakeRefusal::Revoked,
                C::UnknownRevocationStatus
                | C::ExpiredRevocationList
                | C::ExpiredRevocationListContext { .. } => HandshakeRefusal::RevocationUnknown,
                C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                    HandshakeRefusal::WrongPurpose
                }
                C::Other(o) if o.0.downcast_ref::<NotVouchedFor>().is_some() => {
                    HandshakeRefusal::NotVouchedFor
                }
                _ => HandshakeRefusal::BadCertificate,
            },
            rustls::Error::AlertReceived(_) => HandshakeRefusal::ClientAlert,
            _ => HandshakeRefusal::Protocol,
        }
    }
}

/// Most lines a second about refused handshakes: anyone who can reach the port can make
/// them, as fast as it can connect.
const HANDSHAKE_REFUSAL_LINES_PER_SEC: u32 = 20;

fn handshake_refused(peer: SocketAddr, e: &std::io::Error) {
    static BUDGET: crate::telemetry::LogBudget = crate::telemetry::LogBudget::new();
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let Some(held_back) = BUDGET.admit(second, HANDSHAKE_REFUSAL_LINES_PER_SEC) else {
        return;
    };
    if held_back > 0 {
        info!(
            not_logged = held_back,
            "refused TLS handshakes not logged (at most {HANDSHAKE_REFUSAL_LINES_PER_SEC} a second)"
        );
    }
    // A refused client certificate is the caller's configuration problem: worth a line at
    // info so operators can see it, without a stack of detail.
    match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(e) => info!(%peer, error = %refusal_reason(e), "TLS handshake refused"),
        None => info!(%peer, error = %e, "TLS handshake refused"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair, KeyUsagePurpose, SanType,
    };

    struct Ca(CertifiedIssuer<'static, KeyPair>);

    impl Ca {
        fn new(name: &str) -> Ca {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            Ca(CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap())
        }

        /// A caller's certificate naming `san` (`spiffe://…`, else a DNS name; none: "").
        fn client(&self, san: &str) -> CertificateDer<'static> {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            if san.starts_with("spiffe://") {
                p.subject_alt_names
                    .push(SanType::URI(san.to_string().try_into().unwrap()));
            } else if !san.is_empty() {
                p.subject_alt_names
                    .push(SanType::DnsName(san.to_string().try_into().unwrap()));
            }
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let cert = p.signed_by(&KeyPair::generate().unwrap(), &self.0).unwrap();
            cert.der().clone()
        }
    }

    /// The verifier of a listener trusting `client_ca` (if any) as client_ca_file and each
    /// `(domain, CA)` as that trust domain's bundle; what it says of each certificate.
    fn verdicts(
        client_ca: Option<&Ca>,
        domains: &[(&str, &Ca)],
        certs: &[&CertificateDer<'static>],
    ) -> Vec<Result<(), String>> {
        let dir = tempfile::tempdir().unwrap();
        let client_ca_file = client_ca.map(|ca| {
            let p = dir.path().join("callers-ca.pem");
            std::fs::write(&p, ca.0.pem()).unwrap();
            p
        });
        let trust_domain_ca_files = domains
            .iter()
            .map(|(d, ca)| {
                let p = dir.path().join(format!("{d}.pem"));
                std::fs::write(&p, ca.0.pem()).unwrap();
                (d.to_string(), p)
            })
            .collect();
        let tls = ServerTls {
            cert_file: dir.path().join("unused.crt"),
            key_file: dir.path().join("unused.key"),
            client_ca_file,
            trust_domain_ca_files,
            client_crl_files: Vec::new(),
            client_cert: ClientCertMode::Optional,
        };
        let verifier = TrustFiles::read(&tls)
            .unwrap()
            .verifier(&tls)
            .unwrap()
            .unwrap();
        certs
            .iter()
            .map(|c| {
                verifier
                    .verify_client_cert(c, &[], rustls::pki_types::UnixTime::now())
                    .map(drop)
                    .map_err(|e| refusal_reason(&e))
            })
            .collect()
    }

    #[test]
    fn a_refusal_for_the_trust_domain_scoping_says_which_bundle_vouches_for_the_name() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (callers, prod, partner) = (Ca::new("callers"), Ca::new("prod"), Ca::new("partner"));
        let prod_id = "spiffe://prod.example/ns/a/sa/x";
        let certs = [
            partner.client(prod_id),
            prod.client("svc.example.org"),
            prod.client("spiffe://elsewhere.example/ns/b"),
            prod.client(""),
            prod.client(prod_id),
            callers.client("svc.example.org"),
        ];
        let certs: Vec<_> = certs.iter().collect();
        let with = verdicts(
            Some(&callers),
            &[("prod.example", &prod), ("partner.example", &partner)],
            &certs,
        );
        let e = |i: usize| with[i].clone().unwrap_err();
        assert_eq!(
            e(0),
            "invalid peer certificate: the certificate names spiffe://prod.example/ns/a/sa/x but is not issued by trust domain prod.example's CA bundle (server.trust_domain_ca_files)"
        );
        assert_eq!(
            e(1),
            "invalid peer certificate: the certificate names dns:svc.example.org but is not issued by a CA of server.client_ca_file, the only bundle that can vouch for it (DNS names are not scoped to a trust domain)"
        );
        assert_eq!(
            e(2),
            "invalid peer certificate: the certificate names spiffe://elsewhere.example/ns/b but is not issued by a CA of server.client_ca_file, the only bundle that can vouch for it (trust domain elsewhere.example is not in server.trust_domain_ca_files)"
        );
        assert!(
            e(3).contains("names no caller (carries neither a SPIFFE ID (URI SAN) nor a DNS name) but is not issued by a CA of server.client_ca_file"),
            "{}",
            e(3)
        );
        assert_eq!(with[4], Ok(()));
        assert_eq!(with[5], Ok(()));

        let without = verdicts(
            None,
            &[("prod.example", &prod), ("partner.example", &partner)],
            &certs[..5],
        );
        assert_eq!(without[0], with[0]);
        assert_eq!(
            without[1].clone().unwrap_err(),
            "invalid peer certificate: the certificate names dns:svc.example.org, which no configured CA vouches for: DNS names are not scoped to a trust domain, and no server.client_ca_file is configured"
        );
        assert_eq!(
            without[2].clone().unwrap_err(),
            "invalid peer certificate: the certificate names spiffe://elsewhere.example/ns/b, which no configured CA vouches for: trust domain elsewhere.example is not in server.trust_domain_ca_files, and no server.client_ca_file is configured"
        );
        assert_eq!(without[4], Ok(()));

        // Without trust domains, client_ca_file's CAs vouch for every identity, as before.
        let one = verdicts(Some(&prod), &[], &certs[1..5]);
        assert!(one.iter().all(Result::is_ok), "{one:?}");
    }

    #[test]
    fn refused_handshakes_are_told_apart_by_a_bounded_reason() {
        for (i, r) in HandshakeRefusal::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}: ALL is in discriminant order");
        }
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let cert = |c: rustls::CertificateError| io(rustls::Error::InvalidCertificate(c));
        let cases = [
            (io(rustls::Error::NoCertificatesPresented), "no_certificate"),
            (
                cert(rustls::CertificateError::UnknownIssuer),
                "unknown_issuer",
            ),
            (cert(rustls::CertificateError::Expired), "outside_validity"),
            (
                cert(rustls::CertificateError::NotValidYet),
                "outside_validity",
            ),
            (cert(rustls::CertificateError::Revoked), "revoked"),
            (
                cert(rustls::CertificateError::UnknownRevocationStatus),
                "revocation_unknown",
            ),
            (
                cert(rustls::CertificateError::InvalidPurpose),
                "wrong_purpose",
            ),
            (
                cert(rustls::CertificateError::Other(rustls::OtherError(
                    Arc::new(NotVouchedFor("out of scope".into())),
                ))),
                "not_vouched_for",
            ),
            (
                cert(rustls::CertificateError::BadSignature),
                "bad_certificate",
            ),
            (
                io(rustls::Error::AlertReceived(
                    rustls::AlertDescription::UnknownCA,
                )),
                "client_alert",
            ),
            (
                io(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                )),
                "protocol",
            ),
            (
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                "connection_lost",
            ),
        ];
        for (e, reason) in cases {
            assert_eq!(HandshakeRefusal::of(&e).as_str(), reason, "{e}");
        }
    }

    #[test]
    fn refused_handshakes_are_logged_at_most_twenty_a_second() {
        let log = crate::telemetry::CapturedLog::default();
        let _installed = log.install();
        let peer: SocketAddr = "192.0.2.1:4242".parse().unwrap();
        let e = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        for _ in 0..200 {
            handshake_refused(peer, &e);
        }
        let lines = log.text().matches("TLS handshake refused").count();
        // A second may turn during the loop (two seconds' allowance), and other tests share
        // the allowance: never all of them.
        assert!((1..=40).contains(&lines), "{lines} lines");
    }
}
