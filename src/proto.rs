//! Code generated from `proto/` at build time (see `build.rs`); never committed.

#![allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    missing_debug_implementations
)]

/// `sluice.v1`: Broker and Admin.
pub mod v1 {
    tonic::include_proto!("sluice.v1");
}

/// `broker`: the seed design's API, served unchanged.
pub mod seed {
    tonic::include_proto!("broker");
}

/// The encoded descriptors of every proto file, served by the reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sluice_descriptor.bin"));
