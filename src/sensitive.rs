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
    pub fn fingerprint(&self) -> Fingerprint {
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
pub fn fingerprint(bytes: &[u8]) -> Fingerprint {
    let digest = Sha256::digest(bytes);
    let mut out = *FINGERPRINT_PREFIX;
    for (i, &b) in digest[..12].iter().enumerate() {
        let at = PREFIX_LEN + 2 * i;
        out[at..at + 2].copy_from_slice(&hex_digits(b));
    }
    Fingerprint(out)
}

const PREFIX_LEN: usize = "sha256:".len();
const FINGERPRINT_LEN: usize = PREFIX_LEN + 24;
const FINGERPRINT_PREFIX: &[u8; FINGERPRINT_LEN] = b"sha256:000000000000000000000000";

/// A token's fingerprint, `sha256:` and 24 hex digits, held inline: it is copied into every
/// audit record of a cache hit, and a copy of 31 bytes allocates nothing and shares nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; FINGERPRINT_LEN]);

impl Fingerprint {
    pub fn as_str(&self) -> &str {
        // Always ASCII (made only by `fingerprint`): the fallback is never taken.
        std::str::from_utf8(&self.0).unwrap_or("sha256:?")
    }
}

impl std::ops::Deref for Fingerprint {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq<&str> for Fingerprint {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
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
        assert!(shown.contains(s.fingerprint().as_str()));
    }

    #[test]
    fn fingerprint_is_stable_truncated_sha256() {
        // SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        assert_eq!(fingerprint(b"abc"), "sha256:ba7816bf8f01cfea414140de");
    }
}
