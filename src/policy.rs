//! Who may have which tokens: grants of tenants and scopes to caller identities, deny by
//! default. Owns the grant file format, its validation, and the live policy that reloads on
//! SIGHUP or when its file changes (an invalid new policy is refused and the old one stays).
//!
//! ```toml
//! [[grant]]
//! callers = ["spiffe://prod.example/ns/logs/sa/collector",  # exact SPIFFE ID
//!            "spiffe://prod.example/ns/ingest/*",           # any SPIFFE ID under this path
//!            "dns:collector.corp.example",                  # exact DNS name of a client cert
//!            "jwt:k8s:system:serviceaccount:logs:shipper"]  # issuer name + identity claim
//! tenants = ["contoso", "fabrikam"]
//! scopes = ["https://graph.microsoft.com/.default"]
//! ```
//!
//! Tenants and scopes match exactly. A request is allowed when every scope it asks for is
//! granted to the caller for its tenant (the grants' union). `*` for tenants or scopes is
//! accepted only in a grant to `dev:loopback` alone, the development identity.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::authn::DEV_LOOPBACK;
use crate::watched::WatchedFiles;

/// Longest caller pattern, tenant or scope accepted in a grant.
const MAX_ITEM_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid policy{}: {}", .path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default(), .problems.join("; "))]
    Invalid {
        path: Option<PathBuf>,
        problems: Vec<String>,
    },
    /// The file still holds the content refused before (refused once, not parsed again).
    #[error("the policy file still holds the policy refused before")]
    Unchanged,
}

/// A caller pattern: an exact identity, or a SPIFFE path prefix (`spiffe://td/path/*`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum CallerPattern {
    Exact(String),
    /// Holds the prefix including its trailing `/`.
    Under(String),
}

impl CallerPattern {
    fn matches(&self, id: &str) -> bool {
        match self {
            CallerPattern::Exact(e) => e == id,
            CallerPattern::Under(p) => id.len() > p.len() && id.starts_with(p.as_str()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Set {
    Any,
    Exactly(BTreeSet<String>),
}

impl Set {
    fn contains(&self, s: &str) -> bool {
        match self {
            Set::Any => true,
            Set::Exactly(v) => v.contains(s),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    callers: Vec<CallerPattern>,
    tenants: Set,
    scopes: Set,
}

/// A validated set of grants. The empty policy denies everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    grants: Vec<Grant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    grant: Vec<RawGrant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    #[serde(default)]
    callers: Vec<String>,
    #[serde(default)]
    tenants: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
}

impl Policy {
    /// Denies every request.
    pub fn deny_all() -> Policy {
        Policy::default()
    }

    /// Parses a policy file's text. `tenants` are the configured tenant names: a grant of an
    /// unknown tenant is a mistake worth refusing.
    /// Each problem names its line in `text` when it can be found (`line 7: grant[2].tenants: …`).
    pub fn parse(text: &str, tenants: &BTreeSet<String>) -> Result<Policy, Vec<String>> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            vec![match crate::config::toml_error_line(text, &e) {
                Some(n) => format!("line {n}: {}", e.message()),
                None => e.message().to_string(),
            }]
        })?;
        Policy::from_grants(raw.grant, tenants, "grant").map_err(|problems| {
            problems
                .into_iter()
                .map(|p| {
                    let line = p
                        .split_once(": ")
                        .and_then(|(path, _)| crate::config::line_of(text, path));
                    match line {
                        Some(n) => format!("line {n}: {p}"),
                        None => p,
                    }
                })
                .collect()
        })
    }

    /// Validates the `grant` array of an inline `[policy]` table (the main configuration).
    pub fn from_toml_value(
        grants: toml::Value,
        tenants: &BTreeSet<String>,
        path: &str,
    ) -> Result<Policy, Vec<String>> {
        let raw: Vec<RawGrant> = grants
            .try_into()
            .map_err(|e: toml::de::Error| vec![format!("{path}: {}", e.message())])?;
        Policy::from_grants(raw, tenants, path)
    }

    fn from_grants(
        raw: Vec<RawGrant>,
        tenants: &BTreeSet<String>,
        path: &str,
    ) -> Result<Policy, Vec<String>> {
        let mut problems = Vec::new();
        let mut grants = Vec::new();
        for (i, g) in raw.into_iter().enumerate() {
            let at = format!("{path}[{i}]");
            let mut p = |field: &str, m: String| problems.push(format!("{at}.{field}: {m}"));
            if g.callers.is_empty() {
                p("callers", "at least one caller is required".into());
            }
            if g.tenants.is_empty() {
                p("tenants", "at least one tenant is required".into());
            }
            if g.scopes.is_empty() {
                p("scopes", "at least one scope is required".into());
            }
            let mut callers = Vec::new();
            for c in &g.callers {
                match parse_caller(c) {
                    Ok(pat) => callers.push(pat),
                    Err(m) => p("callers", format!("`{}`: {m}", shorten(c))),
                }
            }
            let dev_only = g.callers.iter().all(|c| c == DEV_LOOPBACK) && !g.callers.is_empty();
            let mut set = |field: &str, items: &[String], known: Option<&BTreeSet<String>>| {
                if items.iter().any(|s| s == "*") {
                    if !dev_only || items.len() != 1 {
                        p(
                            field,
                            format!(
                                "`*` is accepted only alone and only in a grant to `{DEV_LOOPBACK}` (development); name each {field} entry"
                            ),
                        );
                    }
                    return Set::Any;
                }
                let mut out = BTreeSet::new();
                for s in items {
                    let t = s.trim();
                    if t.is_empty() || t.len() > MAX_ITEM_LEN {
                        p(
                            field,
                            format!("entries must be 1 to {MAX_ITEM_LEN} characters"),
                        );
                    } else if let Some(known) = known
                        && !known.contains(t)
                    {
                        p(
                            field,
                            format!("`{}` is not a configured tenant", shorten(t)),
                        );
                    } else if known.is_none()
                        && let Err(e) = crate::broker::normalise_scopes(&[t.to_owned()])
                    {
                        // A scope the broker refuses in every request could never be served.
                        p(field, format!("`{}`: {e}", shorten(t)));
                    } else {
                        out.insert(t.to_owned());
                    }
                }
                Set::Exactly(out)
            };
            let tenants = set("tenants", &g.tenants, Some(tenants));
            let scopes = set("scopes", &g.scopes, None);
            grants.push(Grant {
                callers,
                tenants,
                scopes,
            });
        }
        if problems.is_empty() {
            Ok(Policy { grants })
        } else {
            Err(problems)
        }
    }

    /// Whether `caller` may have a token for `tenant` with all of `scopes` (normalised).
    pub fn allows(&self, caller: &str, tenant: &str, scopes: &[String]) -> bool {
        let grants_caller =
            |g: &&Grant| g.tenants.contains(tenant) && g.callers.iter().any(|c| c.matches(caller));
        match scopes {
            [] => return false,
            // Nearly every request asks for one scope: nothing to collect.
            [scope] => {
                return self
                    .grants
                    .iter()
                    .any(|g| g.scopes.contains(scope) && grants_caller(&g));
            }
            _ => {}
        }
        let grants: Vec<&Grant> = self.grants.iter().filter(grants_caller).collect();
        scopes
            .iter()
            .all(|s| grants.iter().any(|g| g.scopes.contains(s)))
    }

    pub fn grant_count(&self) -> usize {
        self.grants.len()
    }

    /// Every scope the grants name (not `*`), for the configuration's checks.
    pub fn named_scopes(&self) -> BTreeSet<&str> {
        self.grants
            .iter()
            .filter_map(|g| match &g.scopes {
                Set::Exactly(s) => Some(s.iter().map(String::as_str)),
                Set::Any => None,
            })
            .flatten()
            .collect()
    }

    /// Every caller the grants name, as written (`spiffe://td/ns/*` for a prefix).
    pub fn caller_patterns(&self) -> BTreeSet<String> {
        self.grants
            .iter()
            .flat_map(|g| &g.callers)
            .map(|c| match c {
                CallerPattern::Exact(e) => e.clone(),
                CallerPattern::Under(prefix) => format!("{prefix}*"),
            })
            .collect()
    }
}

fn shorten(s: &str) -> String {
    s.chars().take(80).collect()
}

fn parse_caller(c: &str) -> Result<CallerPattern, String> {
    if c.len() > MAX_ITEM_LEN || c.trim() != c || c.is_empty() {
        return Err(format!(
            "must be 1 to {MAX_ITEM_LEN} characters without surrounding spaces"
        ));
    }
    if c == DEV_LOOPBACK {
        return Ok(CallerPattern::Exact(c.to_owned()));
    }
    if let Some(rest) = c.strip_prefix("spiffe://") {
        if let Some(prefix) = c.strip_suffix("/*") {
            if rest.split('/').count() < 2 || prefix.contains('*') {
                return Err("a SPIFFE pattern is `spiffe://TRUST-DOMAIN/PATH/*`".into());
            }
            return Ok(CallerPattern::Under(format!("{prefix}/")));
        }
        if c.contains('*') {
            return Err("`*` is accepted only as a final `/*` path segment".into());
        }
        if rest.is_empty() || rest.starts_with('/') {
            return Err("a SPIFFE ID needs a trust domain".into());
        }
        return Ok(CallerPattern::Exact(c.to_owned()));
    }
    if c.contains('*') {
        return Err("patterns (`/*`) are accepted for SPIFFE IDs only".into());
    }
    if let Some(dns) = c.strip_prefix("dns:") {
        if dns.is_empty() {
            return Err("`dns:` needs a host name".into());
        }
        // Certificate DNS names are compared in lower case.
        return Ok(CallerPattern::Exact(format!(
            "dns:{}",
            dns.to_ascii_lowercase()
        )));
    }
    if let Some(rest) = c.strip_prefix("jwt:") {
        match rest.split_once(':') {
            Some((issuer, subject)) if !issuer.is_empty() && !subject.is_empty() => {
                return Ok(CallerPattern::Exact(c.to_owned()));
            }
            _ => return Err("a JWT caller is `jwt:ISSUER-NAME:SUBJECT`".into()),
        }
    }
    Err("a caller is `spiffe://…`, `dns:NAME` or `jwt:ISSUER-NAME:SUBJECT`".into())
}

/// Where a live policy comes from.
#[derive(Debug, Clone)]
enum Source {
    Fixed,
    File {
        path: PathBuf,
        tenants: BTreeSet<String>,
    },
}

/// Why an empty policy file is refused: it is more likely a file being written than a
/// decision to deny every caller, which a policy with no grants and a comment says.
const EMPTY_POLICY: &str = "the file is empty (being written?); a policy that denies every caller says so with a comment and no grants";

/// The policy in force. Reads are lock-free; a reload swaps it whole.
#[derive(Debug)]
pub struct PolicyHandle {
    current: ArcSwap<Policy>,
    source: Source,
    /// The file's contents in use and refused: while it holds a refused policy, the policy in
    /// force is older than the file (a revoked grant may still be in force).
    file: WatchedFiles,
    /// Held from a reload's read to its install: the watcher's look and a SIGHUP's run at
    /// once, and the one that read first must not install its older policy over the other's.
    reloading: std::sync::Mutex<()>,
}

impl PolicyHandle {
    /// A policy that never reloads (inline in the main configuration, or none).
    pub fn fixed(policy: Policy) -> Arc<PolicyHandle> {
        Arc::new(PolicyHandle {
            current: ArcSwap::from_pointee(policy),
            source: Source::Fixed,
            file: WatchedFiles::new(None),
            reloading: std::sync::Mutex::new(()),
        })
    }

    /// Loads a policy file (refused when empty, see `EMPTY_POLICY`); it reloads with
    /// `reload` (and `watch`).
    pub fn from_file(path: &Path, tenants: BTreeSet<String>) -> Result<Arc<Self>, PolicyError> {
        let handle = PolicyHandle {
            current: ArcSwap::from_pointee(Policy::deny_all()),
            source: Source::File {
                path: path.to_owned(),
                tenants,
            },
            file: WatchedFiles::new(None),
            reloading: std::sync::Mutex::new(()),
        };
        handle.reload()?;
        Ok(Arc::new(handle))
    }

    /// The policy in force. A guard, not a clone of the `Arc`: every request asks, and
    /// counting references would have every request write the one shared reference count.
    pub fn current(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.current.load()
    }

    /// Re-reads the policy file. A valid, changed policy replaces the current one
    /// (`Ok(true)`); an unreadable or invalid one is refused and the current one stays.
    pub fn reload(&self) -> Result<bool, PolicyError> {
        self.reload_with(false)
    }

    /// `reload`; `again`: a content refused before is parsed again, to tell its problems
    /// again (not counted again).
    fn reload_with(&self, again: bool) -> Result<bool, PolicyError> {
        let Source::File { path, tenants } = &self.source else {
            return Ok(false);
        };
        let _reloading = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let read = std::fs::read_to_string(path)
            .map(|text| {
                let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
                (text, digest)
            })
            .map_err(|source| PolicyError::Read {
                path: path.clone(),
                source,
            });
        // A policy is judged by its text alone: one refused before is parsed again only to
        // tell its problems again.
        self.file
            .look(read, again, |text| {
                // An editor or a copy that truncates before it writes shows an empty file for
                // a moment: taken as a policy, it would deny every caller and end every watch.
                if text.trim().is_empty() {
                    return Err(PolicyError::Invalid {
                        path: Some(path.clone()),
                        problems: vec![EMPTY_POLICY.to_owned()],
                    });
                }
                let policy =
                    Policy::parse(&text, tenants).map_err(|problems| PolicyError::Invalid {
                        path: Some(path.clone()),
                        problems,
                    })?;
                self.current.store(Arc::new(policy));
                Ok(())
            })
            .into_result(|| PolicyError::Unchanged)
    }

    /// Whether the policy file holds a policy that was refused, so that an older one is in
    /// force (`tokenbroker_policy_file_refused`).
    pub fn file_refused(&self) -> bool {
        self.file.refused()
    }

    /// Policy file contents refused so far (`tokenbroker_policy_reloads_refused`).
    pub fn refusals(&self) -> u64 {
        self.file.refusals()
    }

    /// Whether the policy comes from a file of its own (and so can be reloaded).
    pub fn reloadable(&self) -> bool {
        matches!(self.source, Source::File { .. })
    }

    /// Re-reads the policy file once and logs the outcome: a refusal once per refused
    /// content (the watcher looks every few seconds), or again when an operator asks
    /// (`asked`: SIGHUP).
    pub fn reload_now(&self, asked: bool) {
        let before = self.refusals();
        match self.reload_with(asked) {
            Ok(true) => info!(
                grants = self.current().grant_count(),
                "caller policy reloaded"
            ),
            Ok(false) => {}
            Err(e) if asked || self.refusals() > before => {
                warn!(error = %e, "caller policy refused; the previous policy stays in force")
            }
            Err(e) => tracing::debug!(error = %e, "caller policy still refused"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn tenants() -> BTreeSet<String> {
        ["contoso", "fabrikam"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    const GRAPH: &str = "https://graph.microsoft.com/.default";

    fn policy(text: &str) -> Policy {
        Policy::parse(text, &tenants()).unwrap()
    }

    #[test]
    fn grants_tenants_and_scopes_exactly() {
        let p = policy(&format!(
            "[[grant]]\ncallers = [\"spiffe://td/ns/a/sa/x\"]\ntenants = [\"contoso\"]\nscopes = [\"{GRAPH}\"]\n"
        ));
        let id = "spiffe://td/ns/a/sa/x";
        assert!(p.allows(id, "contoso", &[GRAPH.into()]));
        assert!(!p.allows(id, "fabrikam", &[GRAPH.into()]));
        assert!(!p.allows(id, "contoso", &["api://other/.default".into()]));
        assert!(!p.allows(
            id,
            "contoso",
            &[GRAPH.into(), "api://other/.default".into()]
        ));
        assert!(!p.allows("spiffe://td/ns/a/sa/y", "contoso", &[GRAPH.into()]));
        assert!(!p.allows("spiffe://td/ns/a/sa/x/more", "contoso", &[GRAPH.into()]));
    }

    #[test]
    fn spiffe_prefix_patterns_match_below_the_path_only() {
        let p = policy(&format!(
            "[[grant]]\ncallers = [\"spiffe://td/ns/ingest/*\"]\ntenants = [\"contoso\"]\nscopes = [\"{GRAPH}\"]\n"
        ));
        assert!(p.allows("spiffe://td/ns/ingest/sa/a", "contoso", &[GRAPH.into()]));
        assert!(!p.allows("spiffe://td/ns/ingest", "contoso", &[GRAPH.into()]));
        assert!(!p.allows("spiffe://td/ns/ingest-evil/sa", "contoso", &[GRAPH.into()]));
    }

    #[test]
    fn scopes_may_come_from_several_grants() {
        let p = policy(
            "[[grant]]\ncallers = [\"dns:a.example\"]\ntenants = [\"contoso\"]\nscopes = [\"api://s1/.default\"]\n\
             [[grant]]\ncallers = [\"dns:A.example\"]\ntenants = [\"contoso\"]\nscopes = [\"api://s2/.default\"]\n",
        );
        assert!(p.allows(
            "dns:a.example",
            "contoso",
            &["api://s1/.default".into(), "api://s2/.default".into()]
        ));
    }

    #[test]
    fn refuses_unknown_tenants_wildcards_and_bad_callers() {
        let g = |callers: &str, tenants: &str, scopes: &str| {
            format!("[[grant]]\ncallers = [{callers}]\ntenants = [{tenants}]\n{scopes}\n")
        };
        let bad = [
            (
                g("\"dns:a\"", "\"nope\"", "scopes = [\"s\"]"),
                "grant[0].tenants: `nope` is not a configured tenant",
            ),
            (
                g("\"dns:a\"", "\"*\"", "scopes = [\"s\"]"),
                "grant[0].tenants: `*` is accepted only alone and only in a grant to `dev:loopback`",
            ),
            (
                g("\"dns:a\"", "\"contoso\"", "scopes = [\"*\"]"),
                "grant[0].scopes: `*` is accepted only alone and only in a grant to `dev:loopback`",
            ),
            (
                g("\"dns:*.example\"", "\"contoso\"", "scopes = [\"s\"]"),
                "patterns (`/*`) are accepted for SPIFFE IDs only",
            ),
            (
                g("\"alice\"", "\"contoso\"", "scopes = [\"s\"]"),
                "`alice`: a caller is `spiffe://…`, `dns:NAME` or `jwt:ISSUER-NAME:SUBJECT`",
            ),
            (
                g("\"spiffe://td/a*\"", "\"contoso\"", "scopes = [\"s\"]"),
                "`*` is accepted only as a final `/*` path segment",
            ),
            (
                g("", "\"contoso\"", "scopes = [\"s\"]"),
                "grant[0].callers: at least one caller is required",
            ),
            (
                g("\"dns:a\"", "\"contoso\"", "scope = [\"s\"]"),
                "unknown field `scope`",
            ),
            (
                g("\"dns:a\"", "\"contoso\"", "scopes = [\"a\\tb\"]"),
                "grant[0].scopes: `a\tb`: invalid scopes: scope `a\\tb` contains whitespace",
            ),
        ];
        for (text, why) in bad {
            let e = Policy::parse(&text, &tenants()).unwrap_err();
            assert!(e.iter().any(|m| m.contains(why)), "{text}: {e:?}");
        }
    }

    #[test]
    fn wildcards_only_for_the_dev_identity() {
        let p = policy(
            "[[grant]]\ncallers = [\"dev:loopback\"]\ntenants = [\"*\"]\nscopes = [\"*\"]\n",
        );
        assert!(p.allows("dev:loopback", "anything", &["any".into()]));
        assert!(!p.allows("dns:a", "contoso", &["any".into()]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_policy_file_takes_effect_at_the_next_look() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        let grant = |tenant: &str| {
            format!(
                "[[grant]]\ncallers = [\"dns:a\"]\ntenants = [\"{tenant}\"]\nscopes = [\"{GRAPH}\"]\n"
            )
        };
        std::fs::write(&path, grant("contoso")).unwrap();
        let h = PolicyHandle::from_file(&path, tenants()).unwrap();
        let watched = h.clone();
        let watching =
            crate::server::reload_every(Duration::from_secs(5), move || watched.reload_now(false));
        tokio::task::yield_now().await;
        std::fs::write(&path, grant("fabrikam")).unwrap();
        assert!(
            h.current().allows("dns:a", "contoso", &[GRAPH.into()]),
            "not before the next look"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        // The watcher reads the file on a blocking thread: wait (in real time, bounded) for
        // the reload to land.
        for _ in 0..500 {
            if h.current().allows("dns:a", "fabrikam", &[GRAPH.into()]) {
                break;
            }
            tokio::task::yield_now().await;
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(h.current().allows("dns:a", "fabrikam", &[GRAPH.into()]));
        assert!(!h.current().allows("dns:a", "contoso", &[GRAPH.into()]));
        watching.abort();
    }

    /// A policy file granting `dns:a` Graph in contoso, and its handle.
    fn granting_contoso() -> (tempfile::TempDir, PathBuf, String, Arc<PolicyHandle>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        let good = format!(
            "[[grant]]\ncallers = [\"dns:a\"]\ntenants = [\"contoso\"]\nscopes = [\"{GRAPH}\"]\n"
        );
        std::fs::write(&path, &good).unwrap();
        let h = PolicyHandle::from_file(&path, tenants()).unwrap();
        (dir, path, good, h)
    }

    #[test]
    fn an_empty_policy_file_is_refused_and_a_commented_one_denies_everyone() {
        let (dir, path, good, h) = granting_contoso();
        // Truncated for a rewrite: refused, the policy in force stays.
        for empty in ["", "\n  \n"] {
            std::fs::write(&path, empty).unwrap();
            let e = h.reload().unwrap_err().to_string();
            assert!(e.contains("empty"), "{e}");
            assert!(h.current().allows("dns:a", "contoso", &[GRAPH.into()]));
        }
        std::fs::write(&path, &good).unwrap();
        assert!(!h.reload().unwrap(), "the policy in force, unchanged");
        // Said in a comment: every caller denied.
        std::fs::write(&path, "# no caller may have tokens for now\n").unwrap();
        assert!(h.reload().unwrap());
        assert!(!h.current().allows("dns:a", "contoso", &[GRAPH.into()]));
        // At start, an empty file is refused too.
        let fresh = dir.path().join("empty.toml");
        std::fs::write(&fresh, "").unwrap();
        let e = PolicyHandle::from_file(&fresh, tenants()).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[test]
    fn reload_keeps_the_old_policy_when_the_new_one_is_invalid() {
        let (_dir, path, good, h) = granting_contoso();
        assert!(h.current().allows("dns:a", "contoso", &[GRAPH.into()]));
        assert!(!h.reload().unwrap(), "unchanged file");

        std::fs::write(
            &path,
            "[[grant]]\ncallers = [\"dns:a\"]\ntenants = [\"nope\"]\n",
        )
        .unwrap();
        let e = h.reload().unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        assert!(h.current().allows("dns:a", "contoso", &[GRAPH.into()]));

        std::fs::write(&path, good.replace("contoso", "fabrikam")).unwrap();
        assert!(h.reload().unwrap());
        assert!(!h.current().allows("dns:a", "contoso", &[GRAPH.into()]));
        assert!(h.current().allows("dns:a", "fabrikam", &[GRAPH.into()]));
    }

    /// A reload that read the file before another reload read and installed a newer policy
    /// (the watcher's look and a SIGHUP's at once) must not install its older read over it:
    /// a grant revoked by the newer file would be back in force.
    #[cfg(unix)]
    #[test]
    fn a_reload_never_installs_a_read_older_than_the_policy_in_force() {
        use std::io::Write;
        let (dir, path, good, h) = granting_contoso();
        // The first reload's read is held open: the file is a FIFO its writer keeps open.
        std::fs::remove_file(&path).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        let first = std::thread::spawn({
            let h = h.clone();
            move || h.reload().map_err(|e| e.to_string())
        });
        let mut writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        writer
            .write_all(good.replace("contoso", "fabrikam").as_bytes())
            .unwrap();
        // Meanwhile the file is replaced with a newer policy, and reloaded again.
        let newer = dir.path().join("newer.toml");
        std::fs::write(&newer, good.replace("dns:a", "dns:b")).unwrap();
        std::fs::rename(&newer, &path).unwrap();
        let second = std::thread::spawn({
            let h = h.clone();
            move || h.reload().map_err(|e| e.to_string())
        });
        // Let the second reload finish if it can before the first read ends (it may
        // instead wait for the first: then the order is right whatever the time).
        let until = std::time::Instant::now() + Duration::from_secs(2);
        while !second.is_finished() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(writer);
        first.join().unwrap().unwrap();
        second.join().unwrap().unwrap();
        assert!(
            h.current().allows("dns:b", "contoso", &[GRAPH.into()]),
            "the file's policy is in force"
        );
        assert!(!h.current().allows("dns:a", "fabrikam", &[GRAPH.into()]));
    }

    #[test]
    fn a_refused_file_is_known_until_it_is_fixed_and_each_content_is_counted_once() {
        let (_dir, path, good, h) = granting_contoso();
        assert!(!h.file_refused());
        std::fs::write(&path, "[[grant]]\ntenants = [\"nope\"]\n").unwrap();
        assert!(matches!(h.reload(), Err(PolicyError::Invalid { .. })));
        assert!(h.file_refused());
        // The same content, looked at again: not parsed nor counted again; asked again
        // (SIGHUP), its problems are told again, not counted.
        assert!(matches!(h.reload(), Err(PolicyError::Unchanged)));
        assert!(
            matches!(h.reload_with(true), Err(PolicyError::Invalid { problems, .. }) if problems.iter().any(|p| p.contains("nope")))
        );
        assert_eq!(h.refusals(), 1);
        // Put back as it was: what is in force is the file again.
        std::fs::write(&path, &good).unwrap();
        assert!(!h.reload().unwrap());
        assert!(!h.file_refused());
        // Unreadable: refused once, until it can be read and is valid.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(h.reload(), Err(PolicyError::Read { .. })));
        assert!(matches!(h.reload(), Err(PolicyError::Read { .. })));
        assert!(h.file_refused());
        assert_eq!(h.refusals(), 2);
        std::fs::write(&path, good.replace("contoso", "fabrikam")).unwrap();
        assert!(h.reload().unwrap());
        assert!(!h.file_refused());
    }
}
