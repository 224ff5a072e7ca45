//! What can go wrong in the core, in the caller's terms: each variant says what happened
//! and what the caller can do. Front ends map these to their wire codes (gRPC status, RESP
//! error); nothing here knows any wire format.

use std::time::Duration;

/// Why a request was not carried out (or not fully).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// The request is malformed or breaks a limit on its shape (empty key, unknown enum,
    /// too many keys): fix the request; nothing was changed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A key, value, batch or response is larger than allowed: split or shrink it; nothing
    /// was changed.
    #[error("too large: {0}")]
    TooLarge(String),
    /// A forwarded request reached a node that does not replicate the key at its ring epoch
    /// (the sender's view is stale): refresh the cluster view and retry.
    #[error("this node does not replicate the key at ring epoch {epoch}; refresh the cluster view")]
    WrongOwner {
        /// This node's ring epoch.
        epoch: u64,
    },
    /// Not enough replicas answered in time. For a write, `acks` replicas (the coordinator
    /// among them) did apply it and keep it: the write may still become visible; retrying
    /// is safe (last writer wins).
    #[error("{acks} of the {required} required replicas answered: {detail}")]
    Unavailable {
        /// Replicas that answered (applied, for a write).
        acks: usize,
        /// Replicas required by the consistency level.
        required: usize,
        /// What failed.
        detail: String,
    },
    /// The node's memory limit is reached and eviction is off: free space or raise
    /// `--max-memory`.
    #[error("out of memory: {0}")]
    Full(String),
    /// A version from a peer is too far ahead of this node's clock (forged, or a clock is
    /// wrong): the entries were refused and nothing changed. Check the clocks (NTP).
    #[error("refused: {0}")]
    VersionRefused(String),
    /// The request's deadline passed before it finished; a write may have been applied.
    #[error("deadline of {0:?} exceeded")]
    DeadlineExceeded(Duration),
    /// A write reached the node that would apply it after its sender's deadline had passed
    /// (it waited in a socket while this node was paused or overloaded). The sender has
    /// given up and may have had the write applied elsewhere since, so it is refused and
    /// nothing changed: applied now, with a version from now, it would override writes
    /// acknowledged after it (see `docs/why/replication.md`, "zombie writes").
    #[error("write refused: it arrived {late_ms} ms after its sender's deadline")]
    TooLate {
        /// How far past the deadline the write would have been stamped.
        late_ms: u64,
    },
    /// A conditional write, touch or update was stamped where it was first accepted, and a
    /// write of the key stamped after it reached this replica first: its condition cannot
    /// be judged at its place in the order, so it was not applied by this request. (If the
    /// network delivered a second copy of the request, that copy may have been: so, like
    /// a timeout, this does not let a non-idempotent request be re-sent elsewhere.)
    #[error("not applied: a newer write of the key (or a copy of this request) was applied first")]
    Superseded,
    /// The node cannot persist writes (its append-only file could not be written or
    /// synced: disk full, I/O error, read-only data directory): writes are refused, and
    /// nothing was applied, until the cause is fixed; reads still work. Retry on another
    /// replica.
    #[error("writes refused: this node cannot persist them: {0}")]
    Storage(String),
    /// The node is shutting down: retry on another node.
    #[error("node is shutting down; retry on another node or later")]
    ShuttingDown,
    /// A bug or an impossible state; the message says which. Report it.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Why a call to a peer failed, as the transport reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The call never reached the peer (connection refused, unknown peer): nothing was
    /// done there, so another replica is worth trying for any request.
    #[error("{peer} unreachable: {detail}")]
    Unreachable {
        /// The peer.
        peer: String,
        /// What the transport saw.
        detail: String,
    },
    /// The peer did not answer before the deadline (timeout, lost reply, paused peer): it
    /// may or may not have done the work. Only idempotent requests may be re-sent elsewhere.
    #[error("no answer from {peer}: {detail}")]
    NoAnswer {
        /// The peer.
        peer: String,
        /// What the transport saw.
        detail: String,
    },
    /// The peer answered with an error: it is up, and the error is the answer.
    #[error("{peer} refused: {error}")]
    Refused {
        /// The peer.
        peer: String,
        /// Its error.
        error: CoreError,
    },
}

impl PeerError {
    /// Whether the request may be sent to another replica after this failure. Always if
    /// the peer certainly did nothing (unreachable, shutting down, not an owner); after an
    /// ambiguous failure (no answer, or a partial failure there) only if the request is
    /// `idempotent` — re-sending a conditional write or a touch could report the wrong
    /// outcome of a write that did happen.
    pub fn may_retry_elsewhere(&self, idempotent: bool) -> bool {
        match self {
            PeerError::Unreachable { .. } => true,
            PeerError::NoAnswer { .. } => idempotent,
            PeerError::Refused { error, .. } => match error {
                CoreError::ShuttingDown
                | CoreError::WrongOwner { .. }
                | CoreError::Storage(_)
                | CoreError::TooLate { .. } => true,
                CoreError::DeadlineExceeded(_)
                | CoreError::Unavailable { .. }
                | CoreError::Superseded => idempotent,
                _ => false,
            },
        }
    }
}
