//! Integration tests of the local Azure emulator, through its HTTP interfaces only.
#![cfg(feature = "emulator")]

mod admin;
mod clock;
mod common;
mod entra;
mod graph;
mod identity;
mod keyvault;
mod lifecycle;
