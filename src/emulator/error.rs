//! The one error type of the emulator: everything that can stop it from starting or running.
//!
//! Request-level failures (a bad assertion, a missing role) are not errors here: they are
//! ordinary HTTP responses shaped like Azure's, built by the route modules.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// Why the emulator could not load its configuration, start, or keep running.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// A file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TOML file is not valid TOML or does not match the schema.
    #[error("parsing emulator config {path}: {source}")]
    Toml {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    /// The configuration parsed but is inconsistent (duplicate ids, dangling references...).
    #[error("invalid emulator config: {0}")]
    Config(String),
    /// Key generation, certificate creation or import failed.
    #[error("emulator key material: {0}")]
    Crypto(String),
    /// The emulator only listens on loopback addresses.
    #[error("refusing to bind the emulator to non-loopback address {0}")]
    NotLoopback(IpAddr),
    /// A listener could not be bound.
    #[error("binding emulator listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client that fetches external issuers' keys could not be built.
    #[error("emulator HTTP client: {0}")]
    Http(String),
    /// The endpoints file could not be serialised.
    #[error("serialising endpoints: {0}")]
    Json(#[from] serde_json::Error),
    /// Installing the SIGINT/SIGTERM handlers failed.
    #[error("installing signal handlers: {0}")]
    Signal(#[source] std::io::Error),
}

impl EmulatorError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn crypto(what: impl std::fmt::Display) -> Self {
        Self::Crypto(what.to_string())
    }
}
