//! Generates the gRPC code from `proto/` with protox (pure Rust: no system `protoc` needed).

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/sluice/v1/broker.proto", "proto/broker.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("sluice_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .bytes(".")
        .codec_path("crate::proto::codec::Codec")
        .compile_fds(fds)?;
    // The cluster port's service: generated apart, so that the client port's reflection (the
    // descriptor set above) does not list a service it does not serve.
    let cluster = "proto/sluice/cluster/v1/raft.proto";
    println!("cargo:rerun-if-changed={cluster}");
    tonic_prost_build::configure()
        .bytes(".")
        .codec_path("crate::proto::codec::Codec")
        .compile_fds(protox::compile([cluster], ["proto"])?)?;
    Ok(())
}
