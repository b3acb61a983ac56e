//! tokenbroker: Entra ID access tokens for many tenants, with client assertions signed
//! by Azure Key Vault, cached and served over gRPC. The broker holds no secrets.
//!
//! See `docs/ARCHITECTURE.md` for the map of modules and the invariants.
#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod api;
pub mod assertion;
pub mod audit;
pub mod authn;
#[cfg(feature = "emulator")]
pub mod bench;
pub mod broker;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
#[cfg(feature = "emulator")]
pub mod dev;
#[cfg(feature = "emulator")]
pub mod emulator;
pub mod entra;
pub mod flow;
pub mod identity;
pub mod limits;
pub mod lines;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod probe;
pub mod resilience;
pub mod sensitive;
pub mod server;
pub mod signer;
pub mod striped;
pub mod telemetry;
pub mod tls;

pub mod proto {
    //! Generated gRPC types for `tokenbroker.v1`.
    #![allow(clippy::all, missing_docs, unreachable_pub)]
    tonic::include_proto!("tokenbroker.v1");
    /// Encoded file descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tokenbroker_descriptor");
}
