//! Domain requests and their outcomes: what the front ends (gRPC, RESP) translate their wire
//! formats into, and what travels between nodes when a request is forwarded.

use bytes::Bytes;
use cache_core::Lookup;
use cache_types::{Condition, Consistency};

/// One write of a `Set` or of one `MultiSet` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetCommand {
    /// The key.
    pub key: Bytes,
    /// The value.
    pub value: Bytes,
    /// Time to live in milliseconds; `None` = never expires.
    pub ttl_ms: Option<u64>,
    /// When the write applies.
    pub condition: Condition,
}

/// A request to the cluster. `consistency: None` means the node's default (writes) or
/// `One` (reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read one key.
    Get {
        /// The key.
        key: Bytes,
        /// How many replicas to read.
        consistency: Option<Consistency>,
    },
    /// Write one key.
    Set {
        /// The write.
        cmd: SetCommand,
        /// How many replicas must apply it.
        consistency: Option<Consistency>,
    },
    /// Delete one key.
    Delete {
        /// The key.
        key: Bytes,
        /// How many replicas must apply it.
        consistency: Option<Consistency>,
    },
    /// Change the expiry of a live key (`ttl_ms: None` removes it).
    Touch {
        /// The key.
        key: Bytes,
        /// New time to live in milliseconds; `None` = never expires.
        ttl_ms: Option<u64>,
        /// How many replicas must apply it.
        consistency: Option<Consistency>,
    },
    /// Read many keys (each at `One`).
    MultiGet {
        /// The keys.
        keys: Vec<Bytes>,
    },
    /// Write many keys.
    MultiSet {
        /// The writes.
        entries: Vec<SetCommand>,
        /// How many replicas must apply each write.
        consistency: Option<Consistency>,
    },
}

/// The answer to a [`Request`], variant for variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The value, if live.
    Get(Option<Lookup>),
    /// Whether the write was applied (`false`: its condition did not hold).
    Set {
        /// Applied.
        stored: bool,
    },
    /// Whether a live value was removed.
    Delete {
        /// Removed.
        deleted: bool,
    },
    /// Whether the key held a live value.
    Touch {
        /// Found.
        found: bool,
    },
    /// One answer per key, in request order.
    MultiGet(Vec<Option<Lookup>>),
    /// One `stored` per entry, in request order.
    MultiSet(Vec<bool>),
}
