//! [`PeerTransport`]: the only way the core reaches other nodes.
//!
//! The gRPC implementation lives in `cache-rpc` (on the separate peer listener); the
//! simulated one in [`crate::sim`]. The core never sees a socket, a channel or a status
//! code: it sends domain values and gets domain values or a [`PeerError`] back.

use std::future::Future;

use bytes::Bytes;
use cache_core::VersionedRead;
use cluster_ring::NodeId;
use tokio::time::Instant;

use crate::error::PeerError;
use crate::mutation::Mutation;
use crate::request::{Request, Response};
use crate::store::ApplyReport;
use crate::sync::{SyncReply, SyncRequest};

/// What every peer call carries besides its payload.
#[derive(Debug, Clone)]
pub struct PeerCall {
    /// The calling node.
    pub from: NodeId,
    /// The caller's ring fingerprint, so the callee can tell whether they agree.
    pub ring_fingerprint: u64,
    /// When the caller stops waiting; the transport must give up by then and the callee
    /// should not start work after it.
    pub deadline: Instant,
    /// The same deadline as a unix millisecond on the caller's wall clock, which the callee
    /// can check against its own wall clock even if it reads the call late (a relative
    /// timeout restarts when a paused callee reads it). A forwarded write is applied only
    /// if stamped before it (see [`crate::RequestContext::not_after_ms`]). `None`: not
    /// known (a caller that does not send it).
    pub not_after_ms: Option<u64>,
    /// For a forwarded write: the version the caller stamped it with (the first of
    /// consecutive versions for a `MultiSet`, one per entry, see
    /// [`crate::Hlc::reserve`]), which the callee applies exactly. `None` for reads and
    /// every other call.
    pub version: Option<u64>,
}

/// A successful peer answer with the peer's ring fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerReply<T> {
    /// The answer.
    pub body: T,
    /// The peer's ring fingerprint (0 if unknown).
    pub ring_fingerprint: u64,
}

/// Calls to other nodes. Implementations must return by `call.deadline`.
///
/// Delivery: a call may be lost, delayed, reordered or (except as below) delivered more
/// than once, and a callee may read it after the caller gave up; the core is built for all
/// of that (versions make replication, fetches and unconditional writes idempotent; a
/// forwarded write carries the version it was stamped with and the caller's deadline). One
/// rule: a forwarded *conditional* write, touch or update must reach the callee **at most
/// once**, since each delivery decides its condition anew. The gRPC transport keeps it:
/// HTTP/2 delivers a request once and neither tonic nor the core re-sends one to the same
/// node (a retry goes to another node, with a new version).
pub trait PeerTransport: Send + Sync + 'static {
    /// Hands `request` to node `to` to serve or coordinate. The callee never forwards it
    /// again (it answers [`CoreError::WrongOwner`](crate::CoreError::WrongOwner) instead), so
    /// no request loops.
    fn forward(
        &self,
        to: &NodeId,
        call: PeerCall,
        request: Request,
    ) -> impl Future<Output = Result<PeerReply<Response>, PeerError>> + Send;

    /// Applies `mutations` on node `to` (last writer wins).
    fn replicate(
        &self,
        to: &NodeId,
        call: PeerCall,
        mutations: Vec<Mutation>,
    ) -> impl Future<Output = Result<PeerReply<ApplyReport>, PeerError>> + Send;

    /// Reads `keys` on node `to` with their versions, tombstones and expiries included:
    /// one answer per key, in order.
    fn fetch(
        &self,
        to: &NodeId,
        call: PeerCall,
        keys: Vec<Bytes>,
    ) -> impl Future<Output = Result<PeerReply<Vec<Option<VersionedRead>>>, PeerError>> + Send;

    /// Anti-entropy: compares this node's digests of the keys it shares with node `to`, and
    /// gets back what differs with `to`'s versions (see [`crate::sync`]).
    fn sync(
        &self,
        to: &NodeId,
        call: PeerCall,
        request: SyncRequest,
    ) -> impl Future<Output = Result<PeerReply<SyncReply>, PeerError>> + Send;
}
