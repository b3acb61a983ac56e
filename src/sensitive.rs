//! `Sensitive`: a string that must never reach a log, an error message or `Debug` output
//! (access tokens, client assertions). Owns the token fingerprint used in audit records.

use std::fmt;

use sha2::{Digest, Sha256};

/// A secret-bearing string. `Debug` and `Display` print only a fingerprint.
#[derive(Clone, PartialEq, Eq)]
pub struct Sensitive(Box<str>);

impl Sensitive {
    pub fn new(value: impl Into<Box<str>>) -> Self {
        Sensitive(value.into())
    }

    /// The secret itself. Call only where it leaves the process on purpose
    /// (a gRPC response, a form field to Entra).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Truncated SHA-256 (first 12 bytes, hex): identifies a token in logs and audit
    /// records without revealing it.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.0.as_bytes())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Truncated SHA-256 fingerprint of arbitrary bytes.
pub fn fingerprint(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(31);
    out.push_str("sha256:");
    for &b in &digest[..12] {
        let [high, low] = hex_digits(b);
        out.push(char::from(high));
        out.push(char::from(low));
    }
    out
}

/// The two lower-case hex digits of a byte.
pub fn hex_digits(b: u8) -> [u8; 2] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    [HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]
}

impl fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sensitive({})", self.fingerprint())
    }
}

impl fmt::Display for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[redacted {}]", self.fingerprint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_the_first_twelve_bytes_of_sha256_in_hex() {
        // SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223…
        assert_eq!(fingerprint(b"abc"), "sha256:ba7816bf8f01cfea414140de");
        assert_eq!(hex_digits(0x0f), *b"0f");
        assert_eq!(hex_digits(0xa0), *b"a0");
    }

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Sensitive::new("eyJhbGciOiJSUzI1NiJ9.payload.signature");
        let shown = format!("{s:?} {s}");
        assert!(!shown.contains("eyJ"), "{shown}");
        assert!(!shown.contains("payload"), "{shown}");
        assert!(shown.contains(&s.fingerprint()));
    }

    #[test]
    fn fingerprint_is_stable_truncated_sha256() {
        // SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        assert_eq!(fingerprint(b"abc"), "sha256:ba7816bf8f01cfea414140de");
    }
}
