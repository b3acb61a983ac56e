//! Callers end to end: TLS and mutual TLS with certificates made in the test, bearer JWTs
//! from a test issuer and from the emulated Entra, the policy, the audit trail and the
//! per-caller limits, all through real gRPC over real TLS handshakes.

mod harness;
mod issuer;
mod pki;

mod alerts;
mod audit;
mod cli;
mod http2;
mod jwt;
mod limits;
mod mtls;
mod policy;
mod watch;
