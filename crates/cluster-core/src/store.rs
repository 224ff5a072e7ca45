//! [`Store`]: the engine's one writer.
//!
//! Every change to the node's data goes through here: local writes (which get a fresh
//! version from the hybrid logical clock) and replicated mutations (whose versions are
//! checked against the allowed clock drift before anything is applied). Each applied change
//! is handed, as a [`Mutation`], to the registered [`MutationSink`]s. No other code holds a
//! mutable path to the engine: the coordinator reads through [`Store::get`] and
//! [`Store::get_versioned`], and the admin paths only read statistics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cache_core::{
    Cache, CacheConfig, CacheStats, Change, Clock, Condition, DeleteOutcome, InsertError, Lookup,
    TouchOutcome, UpdateOutcome, VersionedRead, WriteOptions, WriteOutcome,
};
use parking_lot::RwLock;

use crate::clock::{ClockError, Hlc, NodeClock};
use crate::error::CoreError;
use crate::limits::Limits;
use crate::mutation::{Mutation, MutationOp, MutationSink};
use crate::request::UpdateOp;

/// How many times a local write whose fresh version lost to a stored one is retried (each
/// retry first moves the clock past the stored version, so one retry normally suffices).
const STALE_RETRIES: usize = 4;

/// What a local write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Applied; replicate this mutation.
    Done(Mutation),
    /// The write's condition did not hold (or, for touch, the key held no live value):
    /// nothing changed.
    NotApplied,
}

/// What [`Store::update`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Updated {
    /// The change to replicate; `None` if nothing changed.
    pub mutation: Option<Mutation>,
    /// The live value before.
    pub previous: Option<Lookup>,
    /// The live value after.
    pub current: Option<Lookup>,
}

/// How a write gets its version, and until when it may be applied: a write's place in the
/// order is fixed once, where it is first accepted (see `docs/why/replication.md`, "zombie
/// writes").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stamping {
    /// The version the node that first accepted the write gave it before forwarding it
    /// here: applied exactly (after the drift check; the clock moves past it), so every
    /// copy of the write — a duplicate, a late delivery to a paused node — is the same
    /// write at the same place in the order, and loses to anything stamped after it.
    /// `None`: a fresh version from this node's clock (the write is accepted here first).
    pub version: Option<u64>,
    /// The sender's deadline as a unix millisecond: the write is refused
    /// ([`CoreError::TooLate`], nothing changed) if this node's wall clock has reached it
    /// when the write is stamped. A request read after its sender gave up is then never ordered after writes
    /// acknowledged meanwhile. `None`: no deadline known.
    pub not_after_ms: Option<u64>,
}

impl Stamping {
    /// A write accepted here, with no sender's deadline: a fresh version.
    pub const FRESH: Stamping = Stamping {
        version: None,
        not_after_ms: None,
    };
}

/// Redis's error text for a value that is not a 64-bit decimal integer.
pub const NOT_AN_INTEGER: &str = "value is not an integer or out of range";
/// Redis's error text for an increment past the 64-bit range.
pub const OVERFLOW: &str = "increment or decrement would overflow";

/// Parses a signed 64-bit decimal integer as Redis does (`string2ll`): optional `-`, no
/// `+`, no leading zeros, no spaces, at most 20 bytes.
pub fn parse_integer(raw: &[u8]) -> Option<i64> {
    if raw.is_empty() || raw.len() > 20 {
        return None;
    }
    let (negative, digits) = match raw {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, raw),
    };
    match digits {
        [b'0'] if !negative => return Some(0),
        [b'1'..=b'9', rest @ ..] if rest.iter().all(u8::is_ascii_digit) => {}
        _ => return None,
    }
    // Accumulate negatively so that i64::MIN parses.
    let mut n: i64 = 0;
    for d in digits {
        n = n.checked_mul(10)?.checked_sub(i64::from(d - b'0'))?;
    }
    if negative { Some(n) } else { n.checked_neg() }
}

/// The live value an update saw, and whether the op was valid on it.
type Decided = (Option<Lookup>, Result<(), CoreError>);

/// The decision of one [`UpdateOp`] on the live value `live` at `now_ms`: the change to
/// make, and the value before plus whether the op was valid on it.
fn decide(op: &UpdateOp, live: Option<&Lookup>, now_ms: u64) -> (Option<Change>, Decided) {
    let previous = live.cloned();
    let put = |value: Bytes, expires_at: Option<u64>| {
        if expires_at.is_some_and(|at| at <= now_ms) {
            Change::Delete
        } else {
            Change::Put { value, expires_at }
        }
    };
    let change = match op {
        UpdateOp::Incr {
            delta,
            ttl_ms_if_created,
        } => {
            let (old, expires_at) = match live {
                None => (0, ttl_ms_if_created.map(|t| now_ms.saturating_add(t))),
                Some(l) => match parse_integer(&l.value) {
                    Some(n) => (n, l.expires_at),
                    None => {
                        return (
                            None,
                            (previous, Err(CoreError::Invalid(NOT_AN_INTEGER.into()))),
                        );
                    }
                },
            };
            let Some(new) = old.checked_add(*delta) else {
                return (None, (previous, Err(CoreError::Invalid(OVERFLOW.into()))));
            };
            Some(put(Bytes::from(new.to_string()), expires_at))
        }
        UpdateOp::Set {
            value,
            expiry,
            condition,
        } => {
            let holds = match condition {
                Condition::Always => true,
                Condition::IfAbsent => live.is_none(),
                Condition::IfPresent => live.is_some(),
            };
            holds.then(|| {
                put(
                    value.clone(),
                    expiry.resolve(live.and_then(|l| l.expires_at), now_ms),
                )
            })
        }
        UpdateOp::Delete => live.map(|_| Change::Delete),
        UpdateOp::Expire { expiry, when } => live.and_then(|l| {
            let at = expiry.resolve(l.expires_at, now_ms);
            (at != l.expires_at && when.holds(l.expires_at, at)).then(|| put(l.value.clone(), at))
        }),
    };
    (change, (previous, Ok(())))
}

/// What [`Store::apply_replicated`] did with a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Mutations that changed the state.
    pub applied: u32,
    /// Mutations older than what is stored (already superseded): no change.
    pub stale: u32,
}

/// What [`Store::restore`] did with recovered mutations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Changed the state.
    pub applied: u64,
    /// Older than what was already loaded: no change.
    pub stale: u64,
    /// Values whose expiry had passed: skipped.
    pub expired: u64,
    /// Refused by the engine (over the current size limits, or out of memory with eviction
    /// off): skipped.
    pub refused: u64,
}

/// The engine's only writer. See the module docs.
pub struct Store {
    cache: Arc<Cache<NodeClock>>,
    hlc: Hlc,
    limits: Limits,
    sinks: RwLock<Vec<Arc<dyn MutationSink>>>,
    /// Whether any sink is registered (read on the hot path without the lock).
    has_sinks: std::sync::atomic::AtomicBool,
    /// Replicated versions refused for being too far ahead (`cache_versions_refused_total`).
    versions_refused: AtomicU64,
    /// Local writes retried because their fresh version was older than the stored one.
    stale_retries: AtomicU64,
    /// Writes refused because they would have been stamped after their sender's deadline
    /// (`cache_late_writes_refused_total`).
    late_refused: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("cache", &self.cache)
            .field("hlc", &self.hlc)
            .finish_non_exhaustive()
    }
}

fn insert_error(e: InsertError) -> CoreError {
    match e {
        InsertError::EntryTooLarge { .. } | InsertError::KeyTooLong(_) => {
            CoreError::TooLarge(e.to_string())
        }
        InsertError::OutOfMemory { .. } => CoreError::Full(e.to_string()),
    }
}

fn clock_error(e: ClockError) -> CoreError {
    match e {
        ClockError::TooFarAhead { .. } => CoreError::VersionRefused(e.to_string()),
        ClockError::Exhausted => CoreError::Internal(e.to_string()),
    }
}

impl Store {
    /// A store over a new engine built from `config`, reading time from `clock`, issuing
    /// versions tagged for `node_id` and accepting observed versions up to `max_drift`
    /// ahead of `clock`.
    pub fn new(
        node_id: &str,
        config: CacheConfig,
        clock: NodeClock,
        limits: Limits,
        max_drift: Duration,
    ) -> Result<Self, cache_core::ConfigError> {
        Ok(Self {
            cache: Arc::new(Cache::with_clock(config, clock)?),
            hlc: Hlc::new(node_id, max_drift),
            limits,
            sinks: RwLock::new(Vec::new()),
            has_sinks: std::sync::atomic::AtomicBool::new(false),
            versions_refused: AtomicU64::new(0),
            stale_retries: AtomicU64::new(0),
            late_refused: AtomicU64::new(0),
        })
    }

    /// Registers a sink that hears every applied mutation from now on.
    pub fn add_sink(&self, sink: Arc<dyn MutationSink>) {
        self.sinks.write().push(sink);
        self.has_sinks.store(true, Ordering::Release);
    }

    /// Whether any [`MutationSink`] is registered (a write may then have to wait for
    /// durability before it is acknowledged).
    pub fn has_sinks(&self) -> bool {
        self.has_sinks.load(Ordering::Acquire)
    }

    /// The engine, read-only by convention: for statistics, the reaper and validation.
    /// Writing through it bypasses versions and sinks; only the store writes.
    pub fn engine(&self) -> &Arc<Cache<NodeClock>> {
        &self.cache
    }

    /// The limits every key and value is checked against.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The version clock.
    pub fn hlc(&self) -> &Hlc {
        &self.hlc
    }

    /// Unix milliseconds now, on the engine's clock.
    pub fn now_ms(&self) -> u64 {
        self.cache.clock().now_ms()
    }

    /// Engine statistics.
    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Replicated versions refused for being too far ahead of the clock.
    pub fn versions_refused(&self) -> u64 {
        self.versions_refused.load(Ordering::Relaxed)
    }

    /// Local writes retried after losing to a stored version.
    pub fn stale_retries(&self) -> u64 {
        self.stale_retries.load(Ordering::Relaxed)
    }

    /// Writes refused because they would have been stamped after their sender's deadline
    /// (see [`CoreError::TooLate`]).
    pub fn late_writes_refused(&self) -> u64 {
        self.late_refused.load(Ordering::Relaxed)
    }

    /// Refuses writes while a sink cannot take them (see [`MutationSink::writable`]).
    fn check_writable(&self) -> Result<(), CoreError> {
        for sink in self.sinks.read().iter() {
            sink.writable().map_err(CoreError::Storage)?;
        }
        Ok(())
    }

    /// Waits until every mutation applied so far is as durable as the sinks promise (see
    /// [`MutationSink::barrier`]); the coordinator calls it before acknowledging a write.
    pub async fn durable(&self) -> Result<(), CoreError> {
        let waits: Vec<_> = self
            .sinks
            .read()
            .iter()
            .filter_map(|s| s.barrier())
            .collect();
        for wait in waits {
            wait.await.map_err(CoreError::Storage)?;
        }
        Ok(())
    }

    /// Loads mutations recovered from disk (snapshot, then log, in order) by last writer
    /// wins: sinks do not hear them (they are already logged) and versions are not checked
    /// against the drift limit (they were accepted when first applied; the clock may have
    /// moved since). The clock moves past every version, so versions issued after a
    /// restart order after everything recovered. Values already expired are skipped.
    /// Returns how many changed the state.
    pub fn restore(&self, mutations: &[Mutation]) -> RestoreReport {
        let now = self.now_ms();
        let mut report = RestoreReport::default();
        for m in mutations {
            self.hlc.observe_unchecked(m.version);
            let outcome = match &m.op {
                MutationOp::Delete => {
                    Ok(self.cache.delete_versioned(&m.key, m.version) != DeleteOutcome::Stale)
                }
                MutationOp::Put { expires_at, .. } if expires_at.is_some_and(|at| at <= now) => {
                    report.expired += 1;
                    continue;
                }
                MutationOp::Put { value, expires_at } => self
                    .cache
                    .write(
                        &m.key,
                        value,
                        WriteOptions {
                            version: Some(m.version),
                            expires_at: *expires_at,
                            condition: Condition::Always,
                        },
                    )
                    .map(|o| o != WriteOutcome::Stale),
            };
            match outcome {
                Ok(true) => report.applied += 1,
                Ok(false) => report.stale += 1,
                Err(_) => report.refused += 1,
            }
        }
        report
    }

    fn publish(&self, mutation: &Mutation) {
        for sink in self.sinks.read().iter() {
            sink.applied(mutation);
        }
    }

    /// A stamp for the engine's `*_stamped` operations, run under the shard lock: the given
    /// version or the next one from the clock (see [`Stamping`]). It refuses — the engine
    /// then changes nothing, and `refused` says why — if the clock is exhausted
    /// (unreachable before the year 10889), a given version is beyond the allowed drift,
    /// or the sender's deadline has passed. The deadline is checked against the very clock
    /// reading the fresh version is made from, under the lock that applies it, so no pause
    /// between check and apply can slip a late write through.
    fn stamp<'a>(
        &'a self,
        stamping: Stamping,
        refused: &'a std::cell::Cell<Option<CoreError>>,
    ) -> impl FnOnce() -> Option<u64> + 'a {
        move || {
            let now = self.now_ms();
            let (version, at_ms) = match stamping.version {
                Some(0) => {
                    refused.set(Some(CoreError::Invalid(
                        "a write's version cannot be 0".into(),
                    )));
                    return None;
                }
                Some(v) => {
                    if let Err(e) = self.hlc.observe(v, now) {
                        self.versions_refused.fetch_add(1, Ordering::Relaxed);
                        refused.set(Some(clock_error(e)));
                        return None;
                    }
                    (v, now)
                }
                // The wall-clock reading the version is made from is what is checked (not
                // the version's own millisecond, which runs ahead of it after a faster
                // clock's version was observed: that would refuse every write in time).
                None => match self.hlc.next(now) {
                    Ok(v) => (v, now),
                    Err(e) => {
                        refused.set(Some(clock_error(e)));
                        return None;
                    }
                },
            };
            match stamping.not_after_ms {
                Some(by) if at_ms >= by => {
                    self.late_refused.fetch_add(1, Ordering::Relaxed);
                    refused.set(Some(CoreError::TooLate {
                        late_ms: at_ms - by,
                    }));
                    None
                }
                _ => Some(version),
            }
        }
    }

    /// The time a write's relative TTL counts from: its given version's millisecond (so
    /// every copy of a forwarded write gets the same expiry), else now.
    fn write_time(&self, stamping: Stamping) -> u64 {
        stamping
            .version
            .map_or_else(|| self.now_ms(), crate::clock::version_ms)
    }

    /// The error a refused stamp left in `refused`.
    fn refusal(refused: &std::cell::Cell<Option<CoreError>>) -> CoreError {
        refused
            .take()
            .unwrap_or_else(|| CoreError::Internal("a stamp refused without a reason".into()))
    }

    /// After a local write lost to `key`'s stored version: move the clock past it. A stored
    /// version beyond the allowed drift cannot have been accepted by this store, but is
    /// reported rather than trusted.
    fn catch_up(&self, key: &[u8]) -> Result<(), CoreError> {
        self.stale_retries.fetch_add(1, Ordering::Relaxed);
        if let Some(stored) = self.cache.get_versioned(key) {
            self.hlc
                .observe(stored.version(), self.now_ms())
                .map_err(clock_error)?;
        }
        Ok(())
    }

    /// The live value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<Lookup> {
        self.cache.get_entry(key)
    }

    /// The live value of `key` lent to `read` (see [`Cache::read_with`]): a [`Store::get`]
    /// without the copy.
    pub fn read_with<R>(&self, key: &[u8], read: impl FnOnce(&[u8]) -> R) -> Option<R> {
        self.cache.read_with(key, read)
    }

    /// The live value of `key`, or the version of its remembered delete or expiry.
    pub fn get_versioned(&self, key: &[u8]) -> Option<VersionedRead> {
        self.cache.get_versioned(key)
    }

    /// A local write, stamped as `stamping` says. A fresh version can only lose to a stored
    /// one if this node's clock is behind it: then the clock moves past it and the write is
    /// tried again — a write is never reported applied without having changed anything.
    /// A given version that loses was ordered before the stored write: an unconditional
    /// write is then reported applied (and its mutation still replicated, so replicas that
    /// lack the newer write order it too); a conditional one is refused with
    /// [`CoreError::Superseded`] (its condition cannot be judged at its place in the order).
    pub fn set(
        &self,
        key: &Bytes,
        value: &Bytes,
        ttl_ms: Option<u64>,
        condition: Condition,
        stamping: Stamping,
    ) -> Result<Applied, CoreError> {
        self.limits.check_key(key)?;
        self.limits.check_value(value)?;
        self.check_writable()?;
        for _ in 0..STALE_RETRIES {
            let refused = std::cell::Cell::new(None);
            let expires_at = ttl_ms.map(|t| self.write_time(stamping).saturating_add(t));
            let Some((outcome, version)) = self
                .cache
                .write_stamped(
                    key,
                    value,
                    expires_at,
                    condition,
                    self.stamp(stamping, &refused),
                )
                .map_err(insert_error)?
            else {
                return Err(Self::refusal(&refused));
            };
            let m = Mutation {
                key: key.clone(),
                version,
                op: MutationOp::Put {
                    value: value.clone(),
                    expires_at,
                },
            };
            match outcome {
                WriteOutcome::Stored => {
                    self.publish(&m);
                    return Ok(Applied::Done(m));
                }
                WriteOutcome::ConditionNotMet => return Ok(Applied::NotApplied),
                WriteOutcome::Stale if stamping.version.is_some() => {
                    return if condition == Condition::Always {
                        Ok(Applied::Done(m))
                    } else {
                        Err(CoreError::Superseded)
                    };
                }
                WriteOutcome::Stale => self.catch_up(key)?,
            }
        }
        Err(CoreError::Internal(format!(
            "a local write lost to a stored version {STALE_RETRIES} times in a row"
        )))
    }

    /// A local delete, stamped as `stamping` says (see [`Store::set`]). Returns whether a
    /// live value was removed, and the mutation to replicate. `tombstone = false` (a key
    /// with a single replica, where no older copy can arrive late) removes the key without
    /// leaving a tombstone. A given version that loses to the stored one removes nothing
    /// here (the newer write stays) and is still replicated.
    pub fn delete(
        &self,
        key: &Bytes,
        tombstone: bool,
        stamping: Stamping,
    ) -> Result<(bool, Mutation), CoreError> {
        self.limits.check_key(key)?;
        self.check_writable()?;
        for _ in 0..STALE_RETRIES {
            let refused = std::cell::Cell::new(None);
            let mutation = |version| Mutation {
                key: key.clone(),
                version,
                op: MutationOp::Delete,
            };
            let (deleted, version) = if tombstone {
                let Some((outcome, version)) = self
                    .cache
                    .delete_stamped(key, self.stamp(stamping, &refused))
                else {
                    return Err(Self::refusal(&refused));
                };
                match outcome {
                    DeleteOutcome::Deleted => (true, version),
                    DeleteOutcome::NotFound => (false, version),
                    DeleteOutcome::Stale if stamping.version.is_some() => {
                        return Ok((false, mutation(version)));
                    }
                    DeleteOutcome::Stale => {
                        self.catch_up(key)?;
                        continue;
                    }
                }
            } else {
                // No tombstone (one replica): nothing arrives late from elsewhere, but a
                // late delete would still remove a value written after it.
                let Some(version) = self.stamp(stamping, &refused)() else {
                    return Err(Self::refusal(&refused));
                };
                (self.cache.delete(key), version)
            };
            let m = mutation(version);
            self.publish(&m);
            return Ok((deleted, m));
        }
        Err(CoreError::Internal(format!(
            "a local delete lost to a stored version {STALE_RETRIES} times in a row"
        )))
    }

    /// Sets the expiry of a live value (`ttl_ms = None`: never expires) with a fresh version,
    /// atomically: a concurrent write is never overwritten by the touch. The mutation
    /// carries the value as stored, so replicas learn the new expiry through the same
    /// last-writer-wins path as any write.
    /// Stamped as `stamping` says (see [`Store::set`]); a given version that loses to the
    /// stored one is [`CoreError::Superseded`].
    pub fn touch(
        &self,
        key: &Bytes,
        ttl_ms: Option<u64>,
        stamping: Stamping,
    ) -> Result<Applied, CoreError> {
        self.limits.check_key(key)?;
        self.check_writable()?;
        for _ in 0..STALE_RETRIES {
            let refused = std::cell::Cell::new(None);
            let expires_at = ttl_ms.map(|t| self.write_time(stamping).saturating_add(t));
            let Some((outcome, version)) =
                self.cache
                    .touch_stamped(key, expires_at, self.stamp(stamping, &refused))
            else {
                return Err(Self::refusal(&refused));
            };
            let m = match outcome {
                TouchOutcome::Touched(l) => Mutation {
                    key: key.clone(),
                    version,
                    op: MutationOp::Put {
                        value: l.value,
                        expires_at: l.expires_at,
                    },
                },
                TouchOutcome::Deleted => Mutation {
                    key: key.clone(),
                    version,
                    op: MutationOp::Delete,
                },
                TouchOutcome::NotFound => return Ok(Applied::NotApplied),
                TouchOutcome::Stale if stamping.version.is_some() => {
                    return Err(CoreError::Superseded);
                }
                TouchOutcome::Stale => {
                    self.catch_up(key)?;
                    continue;
                }
            };
            self.publish(&m);
            return Ok(Applied::Done(m));
        }
        Err(CoreError::Internal(format!(
            "a local touch lost to a stored version {STALE_RETRIES} times in a row"
        )))
    }

    /// An atomic read-modify-write of `key` (see [`UpdateOp`]), stamped as `stamping` says:
    /// decided under the engine's lock on the live value, so no concurrent write of the key
    /// comes between the read and the write. Returns the mutation to replicate (`None`:
    /// nothing changed) and the live value before and after. A given version that is not
    /// newer than the stored one (a later write got here first, or this is a duplicate of
    /// the update itself) is [`CoreError::Superseded`]: an update is never decided twice.
    pub fn update(
        &self,
        key: &Bytes,
        op: &UpdateOp,
        stamping: Stamping,
    ) -> Result<Updated, CoreError> {
        self.limits.check_key(key)?;
        if let UpdateOp::Set { value, .. } = op {
            self.limits.check_value(value)?;
        }
        self.check_writable()?;
        for _ in 0..STALE_RETRIES {
            let refused = std::cell::Cell::new(None);
            let now = self.write_time(stamping);
            let Some((outcome, version, decided)) = self
                .cache
                .update_stamped(
                    key,
                    |live| decide(op, live, now),
                    self.stamp(stamping, &refused),
                )
                .map_err(insert_error)?
            else {
                return Err(Self::refusal(&refused));
            };
            if decided.is_none() && stamping.version.is_some() {
                return Err(CoreError::Superseded);
            }
            let Some((previous, checked)) = decided else {
                // Stale: a newer version is stored; catch up and decide again.
                self.catch_up(key)?;
                continue;
            };
            checked?;
            let (mutation, current) = match outcome {
                UpdateOutcome::Put { value, expires_at } => (
                    Some(Mutation {
                        key: key.clone(),
                        version,
                        op: MutationOp::Put {
                            value: value.clone(),
                            expires_at,
                        },
                    }),
                    Some(Lookup {
                        value,
                        version,
                        expires_at,
                    }),
                ),
                UpdateOutcome::Deleted => (
                    Some(Mutation {
                        key: key.clone(),
                        version,
                        op: MutationOp::Delete,
                    }),
                    None,
                ),
                UpdateOutcome::Unchanged => (None, previous.clone()),
                UpdateOutcome::Stale if stamping.version.is_some() => {
                    return Err(CoreError::Superseded);
                }
                UpdateOutcome::Stale => {
                    self.catch_up(key)?;
                    continue;
                }
            };
            if let Some(m) = &mutation {
                self.publish(m);
            }
            return Ok(Updated {
                mutation,
                previous,
                current,
            });
        }
        Err(CoreError::Internal(format!(
            "a local update lost to a stored version {STALE_RETRIES} times in a row"
        )))
    }

    /// Applies mutations from a peer (replication, repair) by last writer wins.
    ///
    /// The whole batch is checked first — key and value sizes against the limits, each
    /// entry against the engine's largest entry, versions against the allowed clock drift —
    /// and refused with no change if any entry fails, so a forged version can neither pin a
    /// key nor move this node's clock. Then each entry is applied, the clock observes its
    /// version, and sinks hear about the ones that changed something. One refusal cannot be
    /// checked ahead: with eviction off, a full engine refuses an entry mid-batch
    /// ([`CoreError::Full`]); the entries before it stay applied (each is a valid versioned
    /// write the sender will re-send, so replicas still converge).
    pub fn apply_replicated(&self, mutations: &[Mutation]) -> Result<ApplyReport, CoreError> {
        let now = self.now_ms();
        let max_charge = self.cache.max_entry_charge();
        for m in mutations {
            self.limits.check_key(&m.key)?;
            if let MutationOp::Put { value, .. } = &m.op {
                self.limits.check_value(value)?;
                let charge = cache_core::entry_charge(m.key.len(), value.len());
                if charge > max_charge {
                    return Err(CoreError::TooLarge(format!(
                        "a replicated entry of {charge} bytes (with overhead) exceeds this node's largest entry ({max_charge} bytes: its memory limit divided by its shards)"
                    )));
                }
            }
            if m.version == 0 {
                return Err(CoreError::Invalid(
                    "a replicated mutation must carry a version".into(),
                ));
            }
            if let Err(e) = self.hlc.check(m.version, now) {
                self.versions_refused.fetch_add(1, Ordering::Relaxed);
                return Err(clock_error(e));
            }
        }
        self.check_writable()?;
        let mut report = ApplyReport::default();
        for m in mutations {
            // Observe before applying: a local write stamped after this one was applied is
            // then always newer (checked above; cannot fail).
            let _ = self.hlc.observe(m.version, now);
            let fresh = match &m.op {
                MutationOp::Delete => {
                    self.cache.delete_versioned(&m.key, m.version) != DeleteOutcome::Stale
                }
                MutationOp::Put { value, expires_at } => {
                    let opts = WriteOptions {
                        version: Some(m.version),
                        expires_at: *expires_at,
                        condition: Condition::Always,
                    };
                    self.cache
                        .write(&m.key, value, opts)
                        .map_err(insert_error)?
                        != WriteOutcome::Stale
                }
            };
            if fresh {
                report.applied += 1;
                self.publish(m);
            } else {
                report.stale += 1;
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn store() -> Store {
        Store::new(
            "n0",
            CacheConfig::new().with_max_bytes(1 << 20),
            NodeClock::System,
            Limits::default(),
            Duration::from_secs(5),
        )
        .expect("valid")
    }

    fn state(store: &Store) -> Vec<(Vec<u8>, Vec<u8>, u64)> {
        let mut out = Vec::new();
        let mut scan = store.engine().scanner();
        while let Some(entries) = scan.entries(64) {
            out.extend(
                entries
                    .into_iter()
                    .map(|e| (e.key.to_vec(), e.value.to_vec(), e.version)),
            );
        }
        out.sort();
        out.dedup();
        out
    }

    fn mutation_strategy() -> impl Strategy<Value = Mutation> {
        (0u8..4, 1u64..40, any::<bool>()).prop_map(|(k, n, tombstone)| {
            // A version names one write, as the HLC guarantees: the same version always
            // carries the same content. Versions are recent (within the allowed drift).
            let base = NodeClock::System.now_ms() << 16;
            let version = base + n * 2 + u64::from(tombstone);
            Mutation {
                key: Bytes::from(vec![b'k', k]),
                version,
                op: if tombstone {
                    MutationOp::Delete
                } else {
                    MutationOp::Put {
                        value: Bytes::copy_from_slice(&version.to_le_bytes()),
                        expires_at: None,
                    }
                },
            }
        })
    }

    proptest! {
        /// Reordered and duplicated replication batches end in the same state everywhere.
        #[test]
        fn replicas_converge_whatever_the_order(
            mutations in prop::collection::vec(mutation_strategy(), 1..40),
            seeds in prop::collection::vec(any::<u64>(), 3),
        ) {
            let reference = store();
            reference.apply_replicated(&mutations).expect("applies");
            for seed in seeds {
                // A different order, with some mutations delivered twice, split into batches.
                let mut shuffled = mutations.clone();
                shuffled.extend(mutations.iter().step_by(3).cloned());
                let mut x = seed | 1;
                for i in (1..shuffled.len()).rev() {
                    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                    shuffled.swap(i, (x % (i as u64 + 1)) as usize);
                }
                let replica = store();
                for batch in shuffled.chunks(5) {
                    replica.apply_replicated(batch).expect("applies");
                }
                prop_assert_eq!(state(&replica), state(&reference));
            }
        }
    }

    #[test]
    fn integers_parse_as_redis_does() {
        for (text, n) in [
            ("0", Some(0)),
            ("-1", Some(-1)),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("+1", None),
            ("01", None),
            ("-0", None),
            (" 1", None),
            ("1.0", None),
            ("", None),
            ("-", None),
        ] {
            assert_eq!(parse_integer(text.as_bytes()), n, "{text:?}");
        }
    }

    #[test]
    fn an_update_is_decided_on_the_live_value_and_changes_nothing_when_refused() {
        let s = store();
        let key = Bytes::from_static(b"n");
        let incr = |delta| UpdateOp::Incr {
            delta,
            ttl_ms_if_created: None,
        };
        let u = s.update(&key, &incr(2), Stamping::FRESH).expect("applies");
        assert_eq!(u.current.map(|l| l.value), Some(Bytes::from_static(b"2")));
        assert!(u.mutation.is_some() && u.previous.is_none());
        let before = s.get_versioned(b"n");
        assert!(
            s.update(&key, &incr(i64::MAX), Stamping::FRESH).is_err(),
            "overflow"
        );
        assert_eq!(s.get_versioned(b"n"), before, "nothing changed");
        // An expiry change that changes nothing writes nothing.
        let u = s
            .update(
                &key,
                &UpdateOp::Expire {
                    expiry: crate::Expiry::Never,
                    when: crate::ExpireWhen::Always,
                },
                Stamping::FRESH,
            )
            .expect("applies");
        assert!(u.mutation.is_none());
        assert_eq!(u.previous, u.current);
    }

    #[test]
    fn a_replicated_entry_larger_than_the_engine_takes_is_refused_before_anything_applies() {
        let s = Store::new(
            "n0",
            CacheConfig::new().with_max_bytes(64 << 10).with_shards(4),
            NodeClock::System,
            Limits::default(),
            Duration::from_secs(5),
        )
        .expect("valid");
        let now = s.now_ms() << 16;
        let small = Mutation {
            key: Bytes::from_static(b"a"),
            version: now,
            op: MutationOp::Put {
                value: Bytes::from_static(b"v"),
                expires_at: None,
            },
        };
        let huge = Mutation {
            key: Bytes::from_static(b"b"),
            version: now,
            op: MutationOp::Put {
                value: Bytes::from(vec![0u8; 32 << 10]),
                expires_at: None,
            },
        };
        assert!(matches!(
            s.apply_replicated(&[small, huge]),
            Err(CoreError::TooLarge(_))
        ));
        assert_eq!(s.get_versioned(b"a"), None, "nothing was applied");
    }

    #[test]
    fn a_batch_with_one_bad_entry_changes_nothing() {
        let s = store();
        let now = s.now_ms() << 16;
        let good = Mutation {
            key: Bytes::from_static(b"a"),
            version: now,
            op: MutationOp::Delete,
        };
        let forged = Mutation {
            key: Bytes::from_static(b"b"),
            version: u64::MAX,
            op: MutationOp::Delete,
        };
        let empty_key = Mutation {
            key: Bytes::new(),
            version: now,
            op: MutationOp::Delete,
        };
        let unversioned = Mutation {
            version: 0,
            ..good.clone()
        };
        for bad in [forged, empty_key, unversioned] {
            assert!(s.apply_replicated(&[good.clone(), bad]).is_err());
            assert_eq!(s.get_versioned(b"a"), None, "nothing was applied");
        }
        assert_eq!(s.versions_refused(), 1);
    }
}
