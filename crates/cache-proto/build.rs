//! Compiles `crates/cache-proto/proto/cache/v1/cache.proto` and `crates/cache-proto/proto/cache/peer/v1/peer.proto` with `protox` (a pure-Rust protobuf compiler, so no
//! system `protoc` is needed) and generates prost types and tonic stubs. Also writes the
//! encoded descriptor set that the node serves through gRPC reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let files = [
        root.join("cache/v1/cache.proto"),
        root.join("cache/peer/v1/peer.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("cache_v1_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".")
        .codec_path("crate::codec::FittedCodec")
        .compile_fds(fds)?;
    Ok(())
}
