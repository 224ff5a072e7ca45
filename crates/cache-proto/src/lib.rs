//! `cache-proto`: the compiled cache-cluster APIs: the public `cache.v1` and the
//! node-to-node `cache.peer.v1`.
//!
//! Generated from `crates/cache-proto/proto/cache/v1/cache.proto` and `crates/cache-proto/proto/cache/peer/v1/peer.proto` at build time (by `protox`, no system
//! `protoc`). It holds only types, client stubs and server traits, so the client SDK can
//! depend on it without pulling in the server, the engine or the metrics stack.
//! `bytes` fields are `bytes::Bytes`, so values move between the network and the engine
//! without extra copies, and every stub encodes with [`codec::FittedCodec`] (small starting
//! buffers: see there).

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

/// The protobuf codec every generated client and server uses: prost's, with buffers fitted
/// to this API's messages.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::{ProstDecoder, ProstEncoder};

    /// Bytes each call's encode and decode buffers start with (they grow for larger
    /// messages). tonic's default is 8 KiB; a request or answer for one key is tens of
    /// bytes. Below 1 KiB glibc serves the buffers from its per-thread cache; from 1 KiB up
    /// every allocation first sweeps the allocator's fast bins (`malloc_consolidate`).
    pub const BUFFER_BYTES: usize = 512;
    const YIELD_BYTES: usize = 32 << 10;

    /// `tonic_prost::ProstCodec` with [`BUFFER_BYTES`] buffers.
    #[derive(Debug, Clone)]
    pub struct FittedCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for FittedCodec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> Codec for FittedCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = ProstDecoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstEncoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstDecoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
        }
    }
}

/// Request metadata of `cache.v1.Cache/Pipeline` by which a client says the largest message it
/// decodes (decimal bytes, at least [`MIN_CLIENT_RESPONSE_BYTES`]). The node keeps every
/// message of answers on that stream under it, and an answer over it fails alone with
/// `OUT_OF_RANGE` instead of breaking the stream — and every other call on it — in the
/// client's decoder. Without it the node's own response limit applies.
pub const MAX_RESPONSE_HEADER: &str = "cache-max-response-bytes";

/// The smallest limit a client may name in [`MAX_RESPONSE_HEADER`] (a smaller one is refused
/// with `INVALID_ARGUMENT`): room for any refusal and for small values.
pub const MIN_CLIENT_RESPONSE_BYTES: usize = 64 << 10;

/// The encoded `FileDescriptorSet` of `cache.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/cache_v1_descriptor.bin"));

/// The one mapping between the shared vocabulary (`cache-types`) and the wire enums, used by
/// the node and the SDK alike. Decoding is strict: an unknown wire value is an `Err` carrying
/// it, never a silent default.
pub mod convert {
    use cache_types::{Condition, Consistency, MemberState};

    use crate::v1 as pb;

    /// A consistency on the wire; `None` is `CONSISTENCY_DEFAULT` (the node's default).
    pub fn consistency_to_pb(c: Option<Consistency>) -> i32 {
        (match c {
            None => pb::Consistency::Default,
            Some(Consistency::One) => pb::Consistency::One,
            Some(Consistency::Quorum) => pb::Consistency::Quorum,
            Some(Consistency::All) => pb::Consistency::All,
        }) as i32
    }

    /// A consistency from the wire; `Err(raw)` for an unknown value.
    pub fn consistency_from_pb(raw: i32) -> Result<Option<Consistency>, i32> {
        match pb::Consistency::try_from(raw) {
            Ok(pb::Consistency::Default) => Ok(None),
            Ok(pb::Consistency::One) => Ok(Some(Consistency::One)),
            Ok(pb::Consistency::Quorum) => Ok(Some(Consistency::Quorum)),
            Ok(pb::Consistency::All) => Ok(Some(Consistency::All)),
            Err(_) => Err(raw),
        }
    }

    /// A condition on the wire.
    pub fn condition_to_pb(c: Condition) -> i32 {
        (match c {
            Condition::Always => pb::Condition::Always,
            Condition::IfAbsent => pb::Condition::IfAbsent,
            Condition::IfPresent => pb::Condition::IfPresent,
        }) as i32
    }

    /// A condition from the wire; `Err(raw)` for an unknown value.
    pub fn condition_from_pb(raw: i32) -> Result<Condition, i32> {
        match pb::Condition::try_from(raw) {
            Ok(pb::Condition::Always) => Ok(Condition::Always),
            Ok(pb::Condition::IfAbsent) => Ok(Condition::IfAbsent),
            Ok(pb::Condition::IfPresent) => Ok(Condition::IfPresent),
            Err(_) => Err(raw),
        }
    }

    /// A member state on the wire.
    pub fn member_state_to_pb(s: MemberState) -> i32 {
        (match s {
            MemberState::Alive => pb::MemberState::Alive,
            MemberState::Suspect => pb::MemberState::Suspect,
            MemberState::Dead => pb::MemberState::Dead,
            MemberState::Left => pb::MemberState::Left,
        }) as i32
    }

    /// A member state from the wire; `Err(raw)` for an unknown (or unspecified) value.
    pub fn member_state_from_pb(raw: i32) -> Result<MemberState, i32> {
        match pb::MemberState::try_from(raw) {
            Ok(pb::MemberState::Alive) => Ok(MemberState::Alive),
            Ok(pb::MemberState::Suspect) => Ok(MemberState::Suspect),
            Ok(pb::MemberState::Dead) => Ok(MemberState::Dead),
            Ok(pb::MemberState::Left) => Ok(MemberState::Left),
            _ => Err(raw),
        }
    }
}
