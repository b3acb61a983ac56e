//! The `tokenbroker` binary: a thin shell over `tokenbroker::cli`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

fn main() -> ExitCode {
    // One rustls crypto provider for the whole process (aws-lc-rs, as the Azure SDK uses).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = tokenbroker::cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokenbroker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(tokenbroker::cli::run(cli));
    // What must finish has finished (requests drained, the audit trail flushed). A file read
    // stuck on a hung mount or an abandoned PKCS#11 call, each on a blocking thread, must
    // not hold the exit: dropping the runtime would wait for them without end.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}
