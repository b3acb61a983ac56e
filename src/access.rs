//! Access control for every request, in one place: the in-flight cap, authentication,
//! the caller's rate limit, then the policy; and the audit record of the decision.
//! The policy is asked before the tenant is looked up, so a denial reads the same whether
//! the tenant exists or not.

use std::sync::Arc;
use std::time::Duration;

use crate::audit::{Audit, AuditSink, JsonLines};
use crate::authn::{Authenticator, AuthnError, Caller, Credentials};
use crate::config::{AuditOutput, Config, PolicyConfig};
use crate::limits::{CallerRefused, CallerSlot, Limits};
use crate::policy::{Policy, PolicyError, PolicyHandle};

/// Why a request was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{0}")]
    Unauthenticated(#[from] AuthnError),
    /// Deliberately says nothing about the tenant: not whether it exists, not what is granted.
    #[error("caller `{caller}` is not granted this tenant and scopes")]
    Denied { caller: String },
    #[error("caller `{caller}` is over its request rate")]
    RateLimited {
        caller: String,
        retry_after: Duration,
    },
    /// Every place for a caller's rate is held by a caller seen within the idle time.
    #[error(
        "the broker tracks the request rate of at most {max} callers (limits.max_callers), and each is held by a caller active within limits.caller_idle_secs; caller `{caller}` is refused until one frees"
    )]
    CallersFull {
        caller: String,
        max: u64,
        retry_after: Duration,
    },
    #[error(
        "caller `{caller}` has {max} requests in flight, its limit (limits.max_in_flight_per_caller)"
    )]
    CallerInFlight { caller: String, max: usize },
    #[error("the broker is at its limit of requests in flight")]
    Overloaded,
    #[error("the audit trail cannot be written ({reason}); no token is served unaudited")]
    AuditUnavailable { reason: String },
    #[error(
        "caller `{caller}` has {open} watches open, its limit (limits.max_watches_per_caller); close one, or share one watch per tenant and scopes"
    )]
    TooManyWatches { caller: String, open: u32 },
    #[error("the broker is at its limit of {0} open watches (limits.max_watches)")]
    WatchesFull(usize),
    /// A watch outlived the credential that opened it.
    #[error(
        "the caller's credential expired at {}; open a new watch with a fresh credential",
        crate::audit::rfc3339(*at)
    )]
    CredentialExpired { at: std::time::SystemTime },
    /// The client certificate a connection was opened with would be refused now (revoked,
    /// or its CA no longer trusted): its requests and the watches it opened end.
    #[error(
        "the caller's client certificate is no longer accepted ({reason}); connect again with a valid certificate"
    )]
    CertificateNoLongerAccepted { reason: String },
}

impl AccessError {
    /// Whether a client can make this refusal as fast as it sends requests (bad
    /// credentials, over a limit). The audit trail summarises those when they repeat; a
    /// policy denial is always recorded on its own, with the tenant it was for.
    pub fn is_repeatable(&self) -> bool {
        !matches!(self, AccessError::Denied { .. })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessSetupError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("cannot open the audit log {path}: {source}")]
    Audit {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the audit writer: {source}")]
    AuditWriter {
        #[source]
        source: std::io::Error,
    },
}

/// Authentication, policy, limits and audit for the API. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Access {
    authn: Authenticator,
    policy: Arc<PolicyHandle>,
    limits: Limits,
    max_callers: u64,
    audit: Audit,
    refuse_unaudited: bool,
}

impl Access {
    /// From the configuration, with the audit sink it names.
    pub fn from_config(config: &Config, http: reqwest::Client) -> Result<Access, AccessSetupError> {
        let sink: Arc<dyn AuditSink> = match &config.audit.output {
            AuditOutput::Stdout => Arc::new(
                JsonLines::stdout().map_err(|source| AccessSetupError::AuditWriter { source })?,
            ),
            AuditOutput::File(path) => {
                Arc::new(
                    JsonLines::file(path).map_err(|source| AccessSetupError::Audit {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
        };
        Access::with_sink(config, http, sink)
    }

    /// From the configuration, with a given audit sink (tests keep records in memory).
    pub fn with_sink(
        config: &Config,
        http: reqwest::Client,
        sink: Arc<dyn AuditSink>,
    ) -> Result<Access, AccessSetupError> {
        let policy = match &config.policy {
            PolicyConfig::None => PolicyHandle::fixed(Policy::deny_all()),
            PolicyConfig::Inline(p) => PolicyHandle::fixed(p.clone()),
            PolicyConfig::File(path) => {
                PolicyHandle::from_file(path, config.tenants.keys().cloned().collect())?
            }
        };
        Ok(Access {
            authn: Authenticator::new(&config.callers, &config.limits, http),
            policy,
            limits: Limits::new(&config.limits),
            max_callers: config.limits.max_callers,
            audit: Audit::new(sink),
            refuse_unaudited: config.audit.refuse_unaudited,
        })
    }

    pub fn policy(&self) -> &Arc<PolicyHandle> {
        &self.policy
    }

    pub fn authenticator(&self) -> &Authenticator {
        &self.authn
    }

    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// Whether tokens are refused while the audit trail cannot be written (the default).
    pub fn refuses_unaudited(&self) -> bool {
        self.refuse_unaudited
    }

    /// Refuses while the audit trail cannot be written, unless configured to serve anyway
    /// (`[audit] on_write_failure = "serve"`): a token must not go out without its record.
    pub fn check_audit(&self) -> Result<(), AccessError> {
        match self.audit.failure() {
            Some(reason) if self.refuse_unaudited => Err(AccessError::AuditUnavailable { reason }),
            _ => Ok(()),
        }
    }

    /// A place among the open watches, within the caller's limit and the broker's; held for
    /// the life of the stream.
    pub fn open_watch(&self, caller: &str) -> Result<crate::limits::WatchSlot, AccessError> {
        self.limits
            .open_watch(caller)
            .map_err(|refused| match refused {
                crate::limits::WatchRefused::Caller(open) => AccessError::TooManyWatches {
                    caller: caller.to_owned(),
                    open,
                },
                crate::limits::WatchRefused::Broker(open) => AccessError::WatchesFull(open),
            })
    }

    /// A slot among the requests in flight; held for the whole request.
    pub fn enter(&self) -> Result<crate::limits::InFlight<'_>, AccessError> {
        self.limits.enter().ok_or(AccessError::Overloaded)
    }

    /// Who is calling.
    pub async fn authenticate(&self, creds: &Credentials<'_>) -> Result<Caller, AccessError> {
        Ok(self.authn.authenticate(creds).await?)
    }

    /// Whether the caller is within its request rate and its requests in flight. Asked before the policy, so a caller
    /// probing for tenants spends its own budget and the audit volume it causes is bounded.
    /// The place it returns is held while the request runs.
    pub fn check_rate(&self, caller: &Caller) -> Result<CallerSlot, AccessError> {
        self.limits
            .check_caller(&caller.id)
            .map_err(|refused| match refused {
                CallerRefused::Rate(retry_after) => AccessError::RateLimited {
                    caller: caller.id.clone(),
                    retry_after,
                },
                CallerRefused::Full(retry_after) => AccessError::CallersFull {
                    caller: caller.id.clone(),
                    max: self.max_callers,
                    retry_after,
                },
                CallerRefused::InFlight(max) => AccessError::CallerInFlight {
                    caller: caller.id.clone(),
                    max,
                },
            })
    }

    /// Whether the policy grants `caller` the tenant and every one of the (normalised) scopes.
    pub fn authorize(
        &self,
        caller: &Caller,
        tenant: &str,
        scopes: &[String],
    ) -> Result<(), AccessError> {
        if self.policy.current().allows(&caller.id, tenant, scopes) {
            Ok(())
        } else {
            Err(AccessError::Denied {
                caller: caller.id.clone(),
            })
        }
    }
}
