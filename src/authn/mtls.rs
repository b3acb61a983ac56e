//! The identity in a client certificate that the TLS handshake already verified (chain to
//! the caller CA bundle, validity period, clientAuth usage): its SPIFFE ID, else its DNS name.

use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A client certificate's caller identity, and the end of the certificate's validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub id: String,
    /// `notAfter`: a long-lived stream the certificate opened ends then.
    pub not_after: SystemTime,
}

/// `spiffe://…` from the URI SANs (a certificate with several is refused, as the SPIFFE
/// X.509-SVID specification requires), else `dns:NAME` from the first DNS SAN.
pub fn identity(cert: &CertificateDer<'_>) -> Result<CertIdentity, String> {
    let (_, cert) =
        X509Certificate::from_der(cert.as_ref()).map_err(|e| format!("cannot be parsed: {e}"))?;
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0));
    let id = id_of(&cert)?;
    // The identity is in log lines (a line break would start one of the certificate's
    // making) and policy grants (which could not name it).
    if id.chars().any(char::is_control) {
        return Err("names its caller with control characters".into());
    }
    Ok(CertIdentity { id, not_after })
}

/// The trust domain of a SPIFFE ID (`spiffe://TRUST-DOMAIN/path`) as the certificate
/// writes it; `None` for any other identity.
pub fn trust_domain(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("spiffe://")?;
    Some(rest.split('/').next().unwrap_or(rest))
}

fn id_of(cert: &X509Certificate<'_>) -> Result<String, String> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("invalid subjectAltName: {e}"))?;
    let names = san.map(|s| s.value.general_names.as_slice()).unwrap_or(&[]);
    let spiffe: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u)
                if u.get(..9)
                    .is_some_and(|s| s.eq_ignore_ascii_case("spiffe://")) =>
            {
                Some(*u)
            }
            _ => None,
        })
        .collect();
    match spiffe.as_slice() {
        [one] => return Ok(format!("spiffe://{}", &one[9..])),
        [] => {}
        _ => return Err("carries more than one SPIFFE ID".into()),
    }
    names
        .iter()
        .find_map(|n| match n {
            GeneralName::DNSName(d) if !d.is_empty() => {
                Some(format!("dns:{}", d.to_ascii_lowercase()))
            }
            _ => None,
        })
        .ok_or_else(|| "carries neither a SPIFFE ID (URI SAN) nor a DNS name".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(san: rcgen::SanType) -> CertificateDer<'static> {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names.push(san);
        p.self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .clone()
    }

    #[test]
    fn a_name_with_control_characters_names_no_caller() {
        // The identity is in log lines, where a line break would start one of the
        // certificate's making, and no grant could name it.
        for san in [
            rcgen::SanType::URI(
                "spiffe://td/ns/a\n2026-11-24T21:00:00Z  INFO tokenbroker: forged"
                    .try_into()
                    .unwrap(),
            ),
            rcgen::SanType::DnsName("svc.example\r".try_into().unwrap()),
        ] {
            let e = identity(&leaf(san)).unwrap_err();
            assert!(e.contains("control characters"), "{e}");
        }
        assert_eq!(
            identity(&leaf(rcgen::SanType::URI(
                "spiffe://td/ns/a/sa/b".try_into().unwrap()
            )))
            .unwrap()
            .id,
            "spiffe://td/ns/a/sa/b"
        );
    }
}
