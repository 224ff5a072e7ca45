//! `cache-proto`: the compiled cache-cluster APIs: the public `cache.v1` and the
//! node-to-node `cache.peer.v1`.
//!
//! Generated from `proto/cache/v1/cache.proto` and `proto/cache/peer/v1/peer.proto` at build time (by `protox`, no system
//! `protoc`). It holds only types, client stubs and server traits, so the client SDK can
//! depend on it without pulling in the server, the engine or the metrics stack.
//! `bytes` fields are `bytes::Bytes`, so values move between the network and the engine
//! without extra copies.

#![forbid(unsafe_code)]

/// Package `cache.v1`: the public `Cache` service.
pub mod v1 {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/cache.v1.rs"));
}

/// Package `cache.peer.v1`: the node-to-node `Peer` service (its own listener).
pub mod peer {
    /// Version 1.
    pub mod v1 {
        #![allow(missing_docs, unreachable_pub, clippy::all)]
        include!(concat!(env!("OUT_DIR"), "/cache.peer.v1.rs"));
    }
}

/// The encoded `FileDescriptorSet` of `cache.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/cache_v1_descriptor.bin"));
