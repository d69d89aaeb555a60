//! Compiles the `.proto` files with protox (pure Rust, so no system `protoc`
//! is needed on a fresh machine) and writes the descriptor set that server
//! reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "common.proto",
    "envelope.proto",
    "admin.proto",
    "chat.proto",
    "peer.proto",
    "web.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("saferchat_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // Small per-stream buffers (see src/codec.rs).
        .codec_path("crate::codec::LeanCodec")
        // Byte fields as `bytes::Bytes`: envelopes are sliced and shared
        // between recipients without copying.
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
