//! Compiles the protocol buffers under `../proto` with protox (pure Rust, so no `protoc`
//! has to be installed) and generates prost messages and tonic services from them.

use std::path::PathBuf;

const PROTOS: [&str; 4] = [
    "refleet/routing/v1/routing.proto",
    "refleet/report/v1/report.proto",
    "refleet/placement/v1/placement.proto",
    "refleet/token/v1/token.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    for p in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    let fds = protox::compile(PROTOS, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Served by gRPC server reflection, so `grpcurl` works without the .proto files.
    std::fs::write(
        out.join("refleet_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}
