//! The `tokenbroker` binary: a thin shell over `tokenbroker::cli`.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    // One rustls crypto provider for the whole process (aws-lc-rs, as the Azure SDK uses).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tokenbroker::cli::run(tokenbroker::cli::Cli::parse()).await
}
