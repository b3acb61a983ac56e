//! Claims requests for Entra's token endpoint (OpenID Connect's `claims` parameter, which
//! Entra takes in the client-credentials grant too): the client capabilities a tenant opts
//! in to (`cp1`: continuous access evaluation), and a caller's claims challenge, the
//! `claims` a resource named in its `WWW-Authenticate: Bearer error="insufficient_claims"`
//! answer. Both go to Entra as one JSON object, the capabilities as
//! `access_token.xms_cc.values`.

use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::sensitive::{Fingerprint, fingerprint};

/// The longest claims challenge a caller may pass, as sent (base64 or JSON). A resource's
/// challenge is a few hundred bytes; the bound keeps a request's form to Entra small, and
/// leaves room for the rest of a GetToken request within `limits.max_request_bytes`'
/// default (16 KiB).
pub const MAX_CLAIMS_LEN: usize = 8 * 1024;

/// The client capabilities Entra knows: `cp1`, "this client handles claims challenges",
/// which makes Microsoft Graph's tokens for the app CAE tokens.
pub const KNOWN_CAPABILITIES: &[&str] = &["cp1"];

/// A caller's claims challenge, validated: a JSON object of claims requests (each member,
/// such as `access_token`, an object). Kept in one canonical form (keys sorted, no
/// whitespace), so two callers passing the same challenge, however encoded, carry the same
/// claims. `Debug` shows its digest only: a challenge may name a network address or a
/// policy, which logs have no need of.
#[derive(Clone, PartialEq, Eq)]
pub struct Claims {
    json: Arc<str>,
    digest: Fingerprint,
}

impl fmt::Debug for Claims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Claims({})", self.digest)
    }
}

impl Claims {
    /// Reads a claims challenge as the resource sent it: the base64 value of the
    /// `WWW-Authenticate` header's `claims` parameter (standard or URL-safe alphabet,
    /// padded or not), or the JSON it decodes to. Says what is wrong, never quoting it.
    pub fn parse(text: &str) -> Result<Claims, String> {
        let text = text.trim();
        if text.len() > MAX_CLAIMS_LEN {
            return Err(format!(
                "at most {MAX_CLAIMS_LEN} bytes (the claims challenge as the resource sent it), got {}",
                text.len()
            ));
        }
        let value: Value = if text.starts_with('{') {
            serde_json::from_str(text).map_err(|e| {
                format!(
                    "not valid JSON ({}, line {} column {}): pass the challenge's claims as the resource sent them",
                    category(&e),
                    e.line(),
                    e.column()
                )
            })?
        } else {
            let bytes = decode_base64(text).ok_or(
                "neither a JSON object nor base64 of one: pass the `claims` value of the resource's WWW-Authenticate challenge, or the JSON it decodes to",
            )?;
            serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "base64 of something other than JSON ({}): pass the `claims` value of the resource's WWW-Authenticate challenge as it came",
                    category(&e)
                )
            })?
        };
        let Value::Object(map) = value else {
            return Err(
                "must be a JSON object of claims requests, such as {\"access_token\":{\"nbf\":{\"essential\":true,\"value\":\"1700000000\"}}}".into(),
            );
        };
        if map.is_empty() {
            return Err("names no claims: the challenge's JSON object is empty".into());
        }
        if let Some((key, _)) = map.iter().find(|(_, v)| !v.is_object()) {
            return Err(format!(
                "member `{}` must be a JSON object of requested claims (as in {{\"access_token\":{{...}}}})",
                key.chars().take(64).collect::<String>().escape_debug()
            ));
        }
        // Keys sorted (serde_json's map is ordered by key), no whitespace.
        let json = Value::Object(map).to_string();
        Ok(Claims {
            digest: fingerprint(json.as_bytes()),
            json: json.into(),
        })
    }

    /// The canonical JSON.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The canonical JSON, shared (what a fetch carrying these claims is known by).
    pub fn shared(&self) -> Arc<str> {
        self.json.clone()
    }

    /// Truncated SHA-256 of the canonical JSON: what the audit record and logs show.
    pub fn digest(&self) -> Fingerprint {
        self.digest
    }
}

/// What kind of JSON error `e` is, without the text it read.
fn category(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Eof => "it ends early",
        serde_json::error::Category::Syntax => "a syntax error",
        serde_json::error::Category::Data => "an unexpected value",
        serde_json::error::Category::Io => "unreadable",
    }
}

/// Base64, standard or URL-safe, padded or not; `None` if it is neither.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let standard: String = text
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    LENIENT.decode(standard).ok()
}

/// The `claims` parameter of a token request: the caller's challenge, if any, with the
/// tenant's client `capabilities` added to `access_token.xms_cc.values` (after any the
/// challenge names, each once). `None` when there is neither: the request carries no
/// `claims`, exactly as without this feature.
pub fn request_parameter(capabilities: &[String], challenge: Option<&Claims>) -> Option<String> {
    if capabilities.is_empty() {
        return challenge.map(|c| c.json().to_owned());
    }
    let mut root = match challenge.map(|c| serde_json::from_str::<Value>(c.json())) {
        Some(Ok(Value::Object(m))) => m,
        _ => Map::new(),
    };
    let mut access = take_object(&mut root, "access_token");
    let mut xms_cc = take_object(&mut access, "xms_cc");
    // Entra reads capabilities from `values`; a lone string there, or in `value`, is one.
    let mut values = match xms_cc.remove("values") {
        Some(Value::Array(v)) => v,
        Some(s @ Value::String(_)) => vec![s],
        _ => xms_cc
            .remove("value")
            .filter(Value::is_string)
            .into_iter()
            .collect(),
    };
    for cap in capabilities {
        if !values.iter().any(|v| v.as_str() == Some(cap.as_str())) {
            values.push(Value::String(cap.clone()));
        }
    }
    xms_cc.insert("values".into(), Value::Array(values));
    access.insert("xms_cc".into(), Value::Object(xms_cc));
    root.insert("access_token".into(), Value::Object(access));
    Some(Value::Object(root).to_string())
}

/// The object at `key`, taken out of `map` (a new one if there is none, or something else).
fn take_object(map: &mut Map<String, Value>, key: &str) -> Map<String, Value> {
    match map.remove(key) {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    const CHALLENGE: &str = r#"{"access_token":{"nbf":{"essential":true,"value":"1604106651"}}}"#;

    fn cp1() -> Vec<String> {
        vec!["cp1".to_owned()]
    }

    fn parsed(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn a_challenge_is_read_from_base64_of_either_alphabet_or_json_in_one_canonical_form() {
        let std = base64::engine::general_purpose::STANDARD.encode(CHALLENGE);
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(CHALLENGE);
        let reordered =
            r#"{ "access_token" : { "nbf" : { "value":"1604106651", "essential":true } } }"#;
        let all: Vec<Claims> = [CHALLENGE, &std, &url, reordered, &format!("  {std}\n")]
            .iter()
            .map(|s| Claims::parse(s).unwrap())
            .collect();
        for c in &all {
            assert_eq!(c, &all[0]);
            assert_eq!(c.digest(), all[0].digest());
        }
        assert_eq!(
            all[0].json(),
            r#"{"access_token":{"nbf":{"essential":true,"value":"1604106651"}}}"#
        );
        assert_eq!(all[0].digest(), fingerprint(all[0].json().as_bytes()));
        // Debug shows the digest, not the claims.
        let shown = format!("{:?}", all[0]);
        assert!(
            !shown.contains("nbf") && shown.contains("sha256:"),
            "{shown}"
        );
    }

    #[test]
    fn what_is_not_a_claims_object_is_refused_saying_why_without_quoting_it() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let cases: Vec<(String, &str)> = vec![
            ("{\"access_token\":".into(), "not valid JSON"),
            ("{secret-looking}".into(), "not valid JSON"),
            (
                "not base64 at all!".into(),
                "neither a JSON object nor base64",
            ),
            (
                b64("secret-looking text"),
                "base64 of something other than JSON",
            ),
            ("[1,2]".into(), "neither a JSON object"),
            (b64("[1,2]"), "must be a JSON object"),
            (b64("\"text\""), "must be a JSON object"),
            ("{}".into(), "names no claims"),
            (
                r#"{"access_token":"cp1"}"#.into(),
                "member `access_token` must be",
            ),
            (
                format!(
                    "{{\"access_token\":{{\"x\":\"{}\"}}}}",
                    "a".repeat(MAX_CLAIMS_LEN)
                ),
                "at most 8192 bytes",
            ),
        ];
        for (input, why) in cases {
            let e = Claims::parse(&input).unwrap_err();
            assert!(e.contains(why), "{input:.80}: {e}");
            assert!(!e.contains("secret-looking"), "{e}");
        }
        // Exactly at the bound is fine.
        let pad = MAX_CLAIMS_LEN - r#"{"access_token":{"x":""}}"#.len();
        let at = format!("{{\"access_token\":{{\"x\":\"{}\"}}}}", "a".repeat(pad));
        assert_eq!(at.len(), MAX_CLAIMS_LEN);
        assert!(Claims::parse(&at).is_ok());
    }

    #[test]
    fn without_capabilities_or_challenge_no_claims_are_sent() {
        assert_eq!(request_parameter(&[], None), None);
        let c = Claims::parse(CHALLENGE).unwrap();
        assert_eq!(request_parameter(&[], Some(&c)).as_deref(), Some(c.json()));
    }

    #[test]
    fn capabilities_alone_are_the_cae_opt_in() {
        assert_eq!(
            request_parameter(&cp1(), None).as_deref(),
            Some(r#"{"access_token":{"xms_cc":{"values":["cp1"]}}}"#)
        );
    }

    #[test]
    fn a_challenge_is_merged_with_the_capabilities() {
        let c = Claims::parse(CHALLENGE).unwrap();
        let merged = parsed(&request_parameter(&cp1(), Some(&c)).unwrap());
        assert_eq!(
            merged,
            parsed(
                r#"{"access_token":{"nbf":{"essential":true,"value":"1604106651"},"xms_cc":{"values":["cp1"]}}}"#
            )
        );
        // Members other than access_token are kept as they are.
        let c = Claims::parse(r#"{"id_token":{"acrs":{"essential":true,"value":"c1"}}}"#).unwrap();
        let merged = parsed(&request_parameter(&cp1(), Some(&c)).unwrap());
        assert_eq!(
            merged,
            parsed(
                r#"{"id_token":{"acrs":{"essential":true,"value":"c1"}},"access_token":{"xms_cc":{"values":["cp1"]}}}"#
            )
        );
    }

    #[test]
    fn capabilities_the_challenge_names_already_are_not_repeated_and_others_kept() {
        for (challenge, values) in [
            (
                r#"{"access_token":{"xms_cc":{"values":["cp1"]}}}"#,
                vec!["cp1"],
            ),
            (
                r#"{"access_token":{"xms_cc":{"values":["cp2"]}}}"#,
                vec!["cp2", "cp1"],
            ),
            (
                r#"{"access_token":{"xms_cc":{"value":"cp2"}}}"#,
                vec!["cp2", "cp1"],
            ),
            (
                r#"{"access_token":{"xms_cc":{"values":"cp1"}}}"#,
                vec!["cp1"],
            ),
            (r#"{"access_token":{"xms_cc":"cp1"}}"#, vec!["cp1"]),
        ] {
            let c = Claims::parse(challenge).unwrap();
            let merged = parsed(&request_parameter(&cp1(), Some(&c)).unwrap());
            assert_eq!(
                merged["access_token"]["xms_cc"]["values"],
                serde_json::json!(values),
                "{challenge}"
            );
        }
    }
}
