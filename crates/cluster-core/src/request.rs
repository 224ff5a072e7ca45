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

/// How an [`UpdateOp`] sets the key's expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Keep the current expiry (`KEEPTTL`; a new key never expires).
    Keep,
    /// Never expire (`PERSIST`, a plain `SET`).
    Never,
    /// Expire this many milliseconds after the update applies (`EX`, `PX`).
    InMs(u64),
    /// Expire at this unix time in milliseconds (`EXAT`, `PXAT`); in the past deletes.
    AtMs(u64),
}

impl Expiry {
    /// The absolute expiry this gives a value whose current expiry is `current`, at `now_ms`.
    pub fn resolve(self, current: Option<u64>, now_ms: u64) -> Option<u64> {
        match self {
            Expiry::Keep => current,
            Expiry::Never => None,
            Expiry::InMs(ms) => Some(now_ms.saturating_add(ms)),
            Expiry::AtMs(at) => Some(at),
        }
    }
}

/// When an [`UpdateOp::Expire`] applies, given the live value's current expiry (Redis's
/// `EXPIRE` options; a value without an expiry counts as an infinite one for `Gt`/`Lt`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ExpireWhen {
    /// Always.
    #[default]
    Always,
    /// Only if the value has no expiry (`NX`).
    NoExpiry,
    /// Only if the value has an expiry (`XX`).
    HasExpiry,
    /// Only if the new expiry is later (`GT`).
    Later,
    /// Only if the new expiry is earlier (`LT`).
    Earlier,
    /// Only if the value has an expiry and the new one is earlier (`XX LT`).
    EarlierThanSome,
}

impl ExpireWhen {
    /// Whether a value expiring at `current` gets the expiry `new` (`None`: never).
    pub fn holds(self, current: Option<u64>, new: Option<u64>) -> bool {
        let infinite = |at: Option<u64>| at.unwrap_or(u64::MAX);
        match self {
            ExpireWhen::Always => true,
            ExpireWhen::NoExpiry => current.is_none(),
            ExpireWhen::HasExpiry => current.is_some(),
            ExpireWhen::Later => infinite(new) > infinite(current),
            ExpireWhen::Earlier => infinite(new) < infinite(current),
            ExpireWhen::EarlierThanSome => current.is_some() && infinite(new) < infinite(current),
        }
    }
}

/// An atomic read-modify-write of one key, decided on the key's primary under the engine's
/// lock and replicated as an ordinary versioned write (so replicas converge exactly as
/// they do for `Set` and `Delete`). What counters (`INCR`) and Redis's get-and-change
/// commands (`SET .. GET`, `KEEPTTL`, `GETDEL`, `GETEX`, `PERSIST`) are built on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateOp {
    /// Adds `delta` to the signed 64-bit decimal integer stored at the key (a missing key
    /// counts as 0) and stores the result as its decimal text. The key keeps its expiry; a
    /// key the increment creates expires after `ttl_ms_if_created` (none if `None`).
    /// A value that is not such an integer, or an overflow, is an error and changes nothing.
    Incr {
        /// The amount to add (negative to decrement).
        delta: i64,
        /// Time to live of a key this increment creates.
        ttl_ms_if_created: Option<u64>,
    },
    /// Stores `value` if `condition` holds, with an expiry from `expiry`.
    Set {
        /// The value.
        value: Bytes,
        /// Its expiry (`Keep` is `SET .. KEEPTTL`).
        expiry: Expiry,
        /// When the write applies.
        condition: Condition,
    },
    /// Deletes a live value (`GETDEL`).
    Delete,
    /// Changes the expiry of a live value (`GETEX`, `PERSIST`, `EXPIRE`) if `when` holds; no
    /// change if it is the same.
    Expire {
        /// The new expiry.
        expiry: Expiry,
        /// When to change it (`EXPIRE`'s `NX`, `XX`, `GT`, `LT`).
        when: ExpireWhen,
    },
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
    /// An atomic read-modify-write of one key (see [`UpdateOp`]).
    Update {
        /// The key.
        key: Bytes,
        /// What to do with it.
        op: UpdateOp,
        /// How many replicas must apply the change.
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

impl Request {
    /// How many versions the request needs when it is stamped where it is first accepted
    /// (see `Stamping`): one per unconditional write — a `Set` without a condition, a
    /// `Delete`, every entry of a `MultiSet` that has one (entries take their versions by
    /// position). 0 for reads, conditional writes, touches and updates, which the primary
    /// stamps itself.
    pub fn stamped_writes(&self) -> usize {
        match self {
            Request::Set { cmd, .. } if cmd.condition == Condition::Always => 1,
            Request::Delete { .. } => 1,
            Request::MultiSet { entries, .. }
                if entries.iter().any(|e| e.condition == Condition::Always) =>
            {
                entries.len()
            }
            _ => 0,
        }
    }

    /// The request's first key and how many keys it carries (for logs: the slow log).
    pub fn first_key(&self) -> (Option<&Bytes>, usize) {
        match self {
            Request::Get { key, .. }
            | Request::Delete { key, .. }
            | Request::Touch { key, .. }
            | Request::Update { key, .. } => (Some(key), 1),
            Request::Set { cmd, .. } => (Some(&cmd.key), 1),
            Request::MultiGet { keys } => (keys.first(), keys.len()),
            Request::MultiSet { entries, .. } => (entries.first().map(|e| &e.key), entries.len()),
        }
    }
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
    /// The live value before and after an [`Request::Update`] (equal when nothing changed).
    Update {
        /// Before.
        previous: Option<Lookup>,
        /// After.
        current: Option<Lookup>,
    },
    /// One answer per key, in request order.
    MultiGet(Vec<Option<Lookup>>),
    /// One `stored` per entry, in request order.
    MultiSet(Vec<bool>),
}
