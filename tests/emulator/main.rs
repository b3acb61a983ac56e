//! Integration tests of the local Azure emulator, through its HTTP interfaces only.
#![cfg(feature = "emulator")]

mod admin;
mod clock;
#[path = "../broker/cluster_issuer.rs"]
mod cluster_issuer;
mod common;
mod entra;
mod entra_v1;
mod federated;
mod graph;
mod identity;
mod keyvault;
mod lifecycle;
