//! Compiles the gRPC contract with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tokenbroker/v1/broker.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("tokenbroker_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        // Its Debug (src/lib.rs) shows the token's fingerprint, never the token.
        .skip_debug([".tokenbroker.v1.GetTokenResponse"])
        .compile_fds(fds)?;
    Ok(())
}
