//! `cache-core`: a sharded, byte-bounded in-memory cache — exact LRU by default, SIEVE as an
//! option — with TTLs, versions and tombstones.
//!
//! This is the engine of cache-cluster's nodes, and a crate you can use on its own. It never
//! does I/O and never needs an async runtime: the only thread it can start is the optional
//! background [`Reaper`], which stops when dropped.
//!
//! # Module map
//!
//! - [`Cache`] (this file): picks a shard by key hash, takes its lock, delegates.
//! - `shard`: entries as arena chunks + `u32`-linked list + `hashbrown::HashTable<u32>` index, eviction
//!   (LRU or SIEVE), all the accounting, and [`Cache::validate`]'s invariant checks.
//! - `arena`: where entries live: one size-class chunk in 8 KiB pages per entry (its header,
//!   key and value; no allocation per entry); entries above 1 000 bytes keep their key and
//!   value in a shared `Bytes` of their own.
//! - [`clock`]: [`Clock`], [`SystemClock`] and [`ManualClock`] (absolute unix milliseconds).
//! - [`reaper`]: the background thread that runs [`Cache::reap`] periodically.
//! - [`CacheConfig`], [`ConfigError`], [`InsertError`].
//!
//! # Quick start
//!
//! ```
//! use std::time::Duration;
//! use cache_core::{Cache, CacheConfig};
//!
//! let cache = Cache::new(CacheConfig::new().with_max_bytes(64 << 20))?;
//! cache.set(b"greeting", b"hello")?;
//! assert_eq!(cache.get(b"greeting").as_deref(), Some(&b"hello"[..]));
//!
//! cache.set_with_ttl(b"session", b"token", Duration::from_secs(30))?;
//! assert!(cache.delete(b"greeting"));
//! assert_eq!(cache.get(b"greeting"), None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Versions and tombstones
//!
//! Replicas converge by last-writer-wins on a caller-supplied `u64` version: a versioned write
//! or delete older than what is stored (a live value or a tombstone) is refused with
//! [`WriteOutcome::Stale`] / [`DeleteOutcome::Stale`]. A versioned delete leaves a tombstone
//! for [`CacheConfig::tombstone_ttl`] so a delayed older write cannot resurrect the key.
//! Equal versions are applied (they can only be the same write delivered twice).
//! An expired *versioned* value is an expiry at its version: it reads as absent, and stays
//! as a tombstone for [`CacheConfig::tombstone_ttl`] after it expires, so an older copy
//! cannot win against it. [`Cache::get_versioned`] reports such tombstones with their
//! versions (replicas compare them), and [`Cache::touch_versioned`] changes an expiry and a
//! version under one lock.
//! Unversioned writes ([`Cache::set`], [`Cache::delete`]) skip those checks entirely.
//!
//! ```
//! use cache_core::{Cache, CacheConfig, DeleteOutcome, WriteOptions, WriteOutcome};
//!
//! let cache = Cache::new(CacheConfig::new().with_max_bytes(1 << 20))?;
//! assert_eq!(cache.write(b"k", b"v2", WriteOptions::versioned(2))?, WriteOutcome::Stored);
//! // A late, older write is ignored.
//! assert_eq!(cache.write(b"k", b"v1", WriteOptions::versioned(1))?, WriteOutcome::Stale);
//! assert_eq!(cache.delete_versioned(b"k", 3), DeleteOutcome::Deleted);
//! // The tombstone keeps version 2 out, too.
//! assert_eq!(cache.write(b"k", b"v2", WriteOptions::versioned(2))?, WriteOutcome::Stale);
//! assert_eq!(cache.get(b"k"), None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Sharding and exactness
//!
//! Each shard is an exact LRU (with [`EvictionPolicy::Lru`], the default): every hit or write
//! moves the entry to the front and eviction takes the tail. Across shards the order is approximate (eviction happens in the shard the
//! new key hashes to), which with uniform hashing behaves like a global LRU in aggregate.

#![forbid(unsafe_code)]

mod arena;
pub mod clock;
mod config;
mod error;
/// The reference model and its driver, for the property tests and the fuzz target.
#[cfg(any(test, feature = "model"))]
#[doc(hidden)]
pub mod model;
pub mod reaper;
mod shard;

#[cfg(test)]
mod tests;

use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;

pub use cache_types::Condition;
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{CacheConfig, EvictionPolicy, MAX_SHARD_BYTES, MAX_SHARDS};
pub use error::{ConfigError, InsertError};
pub use reaper::Reaper;
use shard::Shard;
pub use shard::{ENTRY_OVERHEAD, ReapStep, entry_charge};

/// What a hit returns: the value and its metadata. A value of an entry above 1 KiB shares the
/// cache's buffer (no copy); a smaller one is a copy of its bytes (they live inline in the
/// shard's pages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// The value.
    pub value: Bytes,
    /// The version it was written with (`0` if unversioned).
    pub version: u64,
    /// Absolute expiry in unix milliseconds, `None` if it never expires.
    pub expires_at: Option<u64>,
}

/// What [`Cache::get_versioned`] found: a live value, or the version of a delete or an
/// expiry that still blocks older versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionedRead {
    /// A live value.
    Live(Lookup),
    /// A tombstone, or a versioned value that has expired (which reads as a tombstone at its
    /// version until [`CacheConfig::tombstone_ttl`] after its expiry): the key is absent, and
    /// any copy older than `version` elsewhere is stale.
    Dead {
        /// The version of the delete or of the expired write.
        version: u64,
    },
}

impl VersionedRead {
    /// The version, live or dead.
    pub fn version(&self) -> u64 {
        match self {
            VersionedRead::Live(l) => l.version,
            VersionedRead::Dead { version } => *version,
        }
    }
}

/// What [`Cache::touch_versioned`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum TouchOutcome {
    /// The live value now has the new expiry and version; here is what is stored.
    Touched(Lookup),
    /// The expiry was in the past: the key is now a tombstone at the new version.
    Deleted,
    /// No live value.
    NotFound,
    /// Not applied: a newer version is stored.
    Stale,
}

/// The change a [`Cache::update_stamped`] decision makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Store `value`, expiring at `expires_at` (absolute unix ms; `None` = never; in the
    /// past = delete).
    Put {
        /// The new value.
        value: Bytes,
        /// Absolute expiry in unix milliseconds.
        expires_at: Option<u64>,
    },
    /// Delete the key (a tombstone at the update's version).
    Delete,
}

/// What [`Cache::update_stamped`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum UpdateOutcome {
    /// The value was stored (an expiry in the past deletes instead, as for any write).
    Put {
        /// The value stored.
        value: Bytes,
        /// Its absolute expiry.
        expires_at: Option<u64>,
    },
    /// The key was deleted (a tombstone at the update's version).
    Deleted,
    /// The decision was to change nothing.
    Unchanged,
    /// A newer version is stored: nothing was decided or changed.
    Stale,
}

/// One live entry, as returned by [`Cache::scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: Bytes,
    /// The value.
    pub value: Bytes,
    /// Its version (`0` if unversioned).
    pub version: u64,
    /// Absolute expiry in unix milliseconds, `None` if it never expires.
    pub expires_at: Option<u64>,
}

/// A versioned key as [`Scanner::versions`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVersion {
    /// The key.
    pub key: Bytes,
    /// Its version (never `0`: unversioned entries are not listed).
    pub version: u64,
    /// A live value (`false`: a tombstone or an expired value still remembered).
    pub live: bool,
    /// The value's length in bytes (`0` when dead).
    pub value_len: usize,
}

/// How [`Cache::write`] stores a value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// `Some(v)`: a versioned write, refused if a newer version (or tombstone) is stored.
    /// `None`: unconditional, stored with version 0.
    pub version: Option<u64>,
    /// Absolute expiry in unix milliseconds, `None` for no expiry. An expiry that is already
    /// past deletes the key instead of storing it (as Redis does). Stored to the millisecond
    /// up to ~26 years after the cache was created, then to the second (rounded up), up to
    /// ~34 800 years; later ones are stored as that.
    pub expires_at: Option<u64>,
    /// Whether the write depends on the key's presence.
    pub condition: Condition,
}

impl WriteOptions {
    /// A versioned write with no expiry and no condition.
    pub fn versioned(version: u64) -> Self {
        Self {
            version: Some(version),
            ..Self::default()
        }
    }

    /// Sets the absolute expiry (unix milliseconds).
    pub fn expires_at(mut self, at_ms: u64) -> Self {
        self.expires_at = Some(at_ms);
        self
    }

    /// Sets the presence condition.
    pub fn condition(mut self, condition: Condition) -> Self {
        self.condition = condition;
        self
    }
}

/// What [`Cache::write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum WriteOutcome {
    /// The write was applied (stored, or — for an expiry in the past — the key deleted).
    Stored,
    /// Not applied: a newer version or tombstone is stored. Counted in
    /// [`CacheStats::stale_writes`].
    Stale,
    /// Not applied: the [`Condition`] did not hold.
    ConditionNotMet,
}

/// What a delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum DeleteOutcome {
    /// A live value was removed.
    Deleted,
    /// There was no live value (a versioned delete still leaves its tombstone).
    NotFound,
    /// Not applied: a newer version is stored.
    Stale,
}

/// How long a key has left, from [`Cache::ttl`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// The key never expires.
    Never,
    /// The key expires after this long (rounded to milliseconds).
    Remaining(Duration),
}

/// Counters and sizes summed over all shards.
///
/// Counters are kept per shard, under the lock each operation already holds, so keeping them
/// costs no atomic operation on the hit path; reading them takes each shard lock briefly.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Gets that found a live value.
    pub hits: u64,
    /// Gets that found nothing (absent, expired, or tombstone).
    pub misses: u64,
    /// Writes that created an entry.
    pub inserts: u64,
    /// Writes that replaced a live value.
    pub updates: u64,
    /// Deletes (and touches into the past) that removed a live value.
    pub deletes: u64,
    /// Entries removed to make room.
    pub evictions: u64,
    /// Expired values removed, lazily on access or by the reaper.
    pub expirations: u64,
    /// Versioned writes and deletes refused because a newer version was stored.
    pub stale_writes: u64,
    /// Stored values, including expired ones not yet reclaimed.
    pub items: u64,
    /// Stored tombstones.
    pub tombstones: u64,
    /// Bytes charged (keys + values + [`ENTRY_OVERHEAD`] per entry, tombstones included).
    pub bytes: u64,
}

/// What one call to [`Cache::reap`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReapReport {
    /// Slots examined.
    pub visited: usize,
    /// Expired values and tombstones freed.
    pub reclaimed: usize,
    /// Lock acquisitions: each examined at most `budget` chunks.
    pub steps: usize,
}

/// Where a [`Cache::scan`] resumes. Start with [`ScanCursor::default`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanCursor {
    shard: usize,
    /// Chunk position in the shard (see `Shard::scan`).
    pos: usize,
}

impl ScanCursor {
    /// Bits of [`ScanCursor::to_u64`] that hold the chunk position; the shard is above them.
    const POS_BITS: u32 = 48;

    /// The cursor as one number, for a client to hand back (`SCAN`): the start is `0`, and
    /// a cursor returned by [`Cache::scan`] is never `0`.
    pub fn to_u64(self) -> u64 {
        let pos = (self.pos as u64) & ((1 << Self::POS_BITS) - 1);
        ((self.shard as u64) << Self::POS_BITS) | pos
    }

    /// A cursor from a number a client sent. Any number is safe: one that no scan returned
    /// resumes somewhere, or ends the iteration, but never fails.
    pub fn from_u64(raw: u64) -> Self {
        Self {
            shard: usize::try_from(raw >> Self::POS_BITS).unwrap_or(usize::MAX),
            pos: usize::try_from(raw & ((1 << Self::POS_BITS) - 1)).unwrap_or(usize::MAX),
        }
    }
}

/// A complete scan in progress: see [`Cache::scanner`].
pub struct Scanner<'a, C: Clock> {
    cache: &'a Cache<C>,
    /// The shard being scanned (`shard_count()` when done).
    shard: usize,
    phase: ScanPhase,
}

/// Where a [`Scanner`] is within its current shard.
#[derive(Debug, Clone, Copy)]
enum ScanPhase {
    /// Not registered with the shard yet.
    Start,
    /// Walking chunk positions from `pos`; registered at `seq`.
    Walk { pos: usize, seq: u64 },
    /// Replaying the shard's relocation log from `next`; registered at `seq`.
    Replay { next: u64, seq: u64 },
}

impl<C: Clock> Scanner<'_, C> {
    /// The next live entries (at most `budget` chunks examined under one shard lock), or
    /// `None` when the scan is complete. A step may return an empty list.
    pub fn entries(&mut self, budget: usize) -> Option<Vec<Entry>> {
        self.step(budget, |shard, h, now, out| {
            shard.collect_entry(h, now, out)
        })
    }

    /// The next versioned keys with their versions, live or dead (a dead one is a tombstone
    /// or an expired versioned value still remembered, see [`VersionedRead::Dead`];
    /// unversioned entries are left out): what anti-entropy and snapshots compare. `None`
    /// when the scan is complete. Values are not copied.
    pub fn versions(&mut self, budget: usize) -> Option<Vec<KeyVersion>> {
        self.step(budget, |shard, h, now, out| {
            shard.collect_version(h, now, out)
        })
    }

    /// One lock acquisition's worth of scanning, or `None` when every shard is done.
    fn step<T>(
        &mut self,
        budget: usize,
        collect: impl Fn(&Shard, u32, &mut shard::Now<'_, C>, &mut Vec<T>),
    ) -> Option<Vec<T>> {
        let cache = self.cache;
        if self.shard >= cache.shards.len() {
            return None;
        }
        let mut out = Vec::new();
        let mut shard = cache.shard(self.shard).lock();
        let mut now = shard::Now::new(&cache.clock);
        self.phase = match self.phase {
            ScanPhase::Start => ScanPhase::Walk {
                pos: 0,
                seq: shard.scan_begin(),
            },
            phase => phase,
        };
        match self.phase {
            ScanPhase::Start => unreachable!("registered above"),
            ScanPhase::Walk { pos, seq } => {
                let next = shard.walk(pos, budget, |h| collect(&shard, h, &mut now, &mut out));
                self.phase = match next {
                    Some(pos) => ScanPhase::Walk { pos, seq },
                    None => ScanPhase::Replay { next: seq, seq },
                };
            }
            ScanPhase::Replay { next, seq } => {
                let (next, done) =
                    shard.replay(next, budget, |h| collect(&shard, h, &mut now, &mut out));
                if done {
                    shard.scan_end(seq);
                    self.shard += 1;
                    self.phase = ScanPhase::Start;
                } else {
                    self.phase = ScanPhase::Replay { next, seq };
                }
            }
        }
        Some(out)
    }
}

impl<C: Clock> Drop for Scanner<'_, C> {
    fn drop(&mut self) {
        if let ScanPhase::Walk { seq, .. } | ScanPhase::Replay { seq, .. } = self.phase
            && let Some(s) = self.cache.shards.get(self.shard)
        {
            s.0.lock().scan_end(seq);
        }
    }
}

impl<C: Clock> std::fmt::Debug for Scanner<'_, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scanner")
            .field("shard", &self.shard)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

/// A shard padded to its own cache lines so that two threads working on neighbouring shards
/// do not invalidate each other's lock word.
#[repr(align(128))]
struct PaddedShard(Mutex<Shard>);

/// The cache: `N` shards, each an exact LRU behind a `parking_lot::Mutex`.
///
/// `Cache` is `Send + Sync`; share it with `Arc`. Every method takes `&self` and locks exactly
/// one shard, except the whole-cache ones ([`Cache::len`], [`Cache::stats`], [`Cache::clear`],
/// [`Cache::reap`], [`Cache::validate`]), which lock shards one at a time.
pub struct Cache<C: Clock = SystemClock> {
    shards: Box<[PaddedShard]>,
    /// `shards.len() - 1`.
    shard_mask: usize,
    /// Hashes keys once per operation; the shard index comes from bits 32.. of the hash and
    /// the shard's table uses the low bits and top 7 bits, so the two choices are independent.
    hasher: ahash::RandomState,
    clock: C,
    config: CacheConfig,
    tombstone_ttl_ms: u64,
}

impl Cache<SystemClock> {
    /// A cache on the system clock.
    pub fn new(config: CacheConfig) -> Result<Self, ConfigError> {
        Self::with_clock(config, SystemClock)
    }
}

impl<C: Clock> Cache<C> {
    /// A cache reading time from `clock` (a [`ManualClock`] in tests).
    pub fn with_clock(config: CacheConfig, clock: C) -> Result<Self, ConfigError> {
        config.validate()?;
        let n = config.resolved_shards();
        let hasher = ahash::RandomState::new();
        let capacity = config.max_bytes / n as u64;
        let max_items = config.max_items.map_or(u64::MAX, |m| m.div_ceil(n as u64));
        let now_ms = clock.now_ms();
        let shards = (0..n)
            .map(|_| {
                PaddedShard(Mutex::new(Shard::new(
                    capacity,
                    max_items,
                    config.evict,
                    config.eviction_policy,
                    u64::try_from(config.tombstone_ttl.as_millis()).unwrap_or(u64::MAX),
                    hasher.clone(),
                    now_ms,
                )))
            })
            .collect();
        Ok(Self {
            shards,
            shard_mask: n - 1,
            hasher,
            clock,
            tombstone_ttl_ms: u64::try_from(config.tombstone_ttl.as_millis()).unwrap_or(u64::MAX),
            config,
        })
    }

    /// The configuration the cache was built with.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The clock the cache reads.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard `key` lives in (for tests and tools that reason about per-shard LRU order).
    pub fn shard_of(&self, key: &[u8]) -> usize {
        self.locate(key).1
    }

    fn locate(&self, key: &[u8]) -> (u64, usize) {
        let hash = self.hasher.hash_one(key);
        (hash, (hash >> 32) as usize & self.shard_mask)
    }

    fn shard(&self, i: usize) -> &Mutex<Shard> {
        &self.shards[i].0
    }

    /// The value of `key`, if live. A hit makes it the most recently used entry and returns
    /// the stored buffer by refcount (no copy, no allocation).
    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.get_entry(key).map(|l| l.value)
    }

    /// Like [`Cache::get`], with the entry's version and expiry.
    pub fn get_entry(&self, key: &[u8]) -> Option<Lookup> {
        let (hash, i) = self.locate(key);
        self.shard(i).lock().get(hash, key, &self.clock)
    }

    /// The value of `key`, if live, lent to `read` while the key's shard is locked: the
    /// same hit (or miss) as [`Cache::get`], without the allocation and copy of a small
    /// value. For a caller that copies the value on anyway (a server writing it into a reply
    /// buffer). `read` runs under the shard lock, so it must be short and must not touch
    /// the cache.
    pub fn read_with<R>(&self, key: &[u8], read: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let (hash, i) = self.locate(key);
        self.shard(i).lock().read_with(hash, key, &self.clock, read)
    }

    /// Stores `key` = `value` with no expiry, unconditionally. Evicts least-recently-used
    /// entries if needed.
    pub fn set(&self, key: &[u8], value: &[u8]) -> Result<(), InsertError> {
        self.write(key, value, WriteOptions::default()).map(drop)
    }

    /// Stores `key` = `value`, expiring `ttl` from now. A zero TTL deletes the key.
    pub fn set_with_ttl(&self, key: &[u8], value: &[u8], ttl: Duration) -> Result<(), InsertError> {
        let opts = WriteOptions {
            expires_at: Some(self.expiry_after(ttl)),
            ..WriteOptions::default()
        };
        self.write(key, value, opts).map(drop)
    }

    /// The general write: versioned or not, with an absolute expiry and a presence condition.
    /// On `Err` the cache is unchanged.
    pub fn write(
        &self,
        key: &[u8],
        value: &[u8],
        opts: WriteOptions,
    ) -> Result<WriteOutcome, InsertError> {
        let (hash, i) = self.locate(key);
        self.shard(i)
            .lock()
            .write(hash, key, value, opts, &self.clock, self.tombstone_ttl_ms)
    }

    /// A versioned write whose version is issued by `stamp` *while the key's shard lock is
    /// held*, so that writes of one key are applied in the order of their versions. With a
    /// monotonic `stamp` (a node's hybrid logical clock), a locally stamped write can only
    /// be stale against a version the clock has not seen. Returns the outcome and the
    /// version used; `Ok(None)` if `stamp` refused to issue a version (nothing changed:
    /// the caller's clock is exhausted, or the write came too late to be ordered).
    pub fn write_stamped(
        &self,
        key: &[u8],
        value: &[u8],
        expires_at: Option<u64>,
        condition: Condition,
        stamp: impl FnOnce() -> Option<u64>,
    ) -> Result<Option<(WriteOutcome, u64)>, InsertError> {
        let (hash, i) = self.locate(key);
        let mut shard = self.shard(i).lock();
        let Some(version) = stamp() else {
            return Ok(None);
        };
        let opts = WriteOptions {
            version: Some(version),
            expires_at,
            condition,
        };
        let outcome = shard.write(hash, key, value, opts, &self.clock, self.tombstone_ttl_ms)?;
        Ok(Some((outcome, version)))
    }

    /// [`Cache::delete_versioned`] with the version issued by `stamp` under the shard lock
    /// (see [`Cache::write_stamped`]); `None` if `stamp` refused (nothing changed).
    pub fn delete_stamped(
        &self,
        key: &[u8],
        stamp: impl FnOnce() -> Option<u64>,
    ) -> Option<(DeleteOutcome, u64)> {
        let (hash, i) = self.locate(key);
        let mut shard = self.shard(i).lock();
        let version = stamp()?;
        let outcome = shard.delete(hash, key, Some(version), &self.clock, self.tombstone_ttl_ms);
        Some((outcome, version))
    }

    /// An atomic read-modify-write of one key, for counters and get-and-set style commands:
    /// under the key's shard lock, `decide` sees the live value (if any) and returns the
    /// change to make, if any, plus a result for the caller; the change is applied with the
    /// version issued by `stamp` (see [`Cache::write_stamped`]). No other write of the key
    /// can come between the read and the write.
    ///
    /// Returns the outcome, the version issued, and `decide`'s result. If a version as new
    /// as the stamp or newer is stored (only possible when the stamping clock is behind it,
    /// or the stamp is a version given earlier and this update is a second copy of it),
    /// `decide` is not called and the outcome is [`UpdateOutcome::Stale`]: an update is
    /// never decided twice at one version. On `Err` (the new
    /// value does not fit) the cache is unchanged; `Ok(None)` if `stamp` refused (nothing
    /// changed, `decide` not called).
    pub fn update_stamped<R>(
        &self,
        key: &[u8],
        decide: impl FnOnce(Option<&Lookup>) -> (Option<Change>, R),
        stamp: impl FnOnce() -> Option<u64>,
    ) -> Result<Option<(UpdateOutcome, u64, Option<R>)>, InsertError> {
        let (hash, i) = self.locate(key);
        let mut shard = self.shard(i).lock();
        let current = shard.get_versioned(hash, key, &self.clock, true);
        let Some(version) = stamp() else {
            return Ok(None);
        };
        if current.as_ref().is_some_and(|c| c.version() >= version) {
            return Ok(Some((UpdateOutcome::Stale, version, None)));
        }
        let live = match &current {
            Some(VersionedRead::Live(l)) => Some(l),
            _ => None,
        };
        let (change, result) = decide(live);
        let outcome = match change {
            None => UpdateOutcome::Unchanged,
            Some(Change::Put { value, expires_at }) => {
                let opts = WriteOptions {
                    version: Some(version),
                    expires_at,
                    condition: Condition::Always,
                };
                match shard.write(hash, key, &value, opts, &self.clock, self.tombstone_ttl_ms)? {
                    WriteOutcome::Stored => UpdateOutcome::Put { value, expires_at },
                    // Checked above, under the same lock.
                    WriteOutcome::Stale | WriteOutcome::ConditionNotMet => UpdateOutcome::Stale,
                }
            }
            Some(Change::Delete) => {
                match shard.delete(hash, key, Some(version), &self.clock, self.tombstone_ttl_ms) {
                    DeleteOutcome::Stale => UpdateOutcome::Stale,
                    DeleteOutcome::Deleted | DeleteOutcome::NotFound => UpdateOutcome::Deleted,
                }
            }
        };
        Ok(Some((outcome, version, Some(result))))
    }

    /// [`Cache::touch_versioned`] with the version issued by `stamp` under the shard lock
    /// (see [`Cache::write_stamped`]); `None` if `stamp` refused (nothing changed).
    pub fn touch_stamped(
        &self,
        key: &[u8],
        expires_at: Option<u64>,
        stamp: impl FnOnce() -> Option<u64>,
    ) -> Option<(TouchOutcome, u64)> {
        let (hash, i) = self.locate(key);
        let mut shard = self.shard(i).lock();
        let version = stamp()?;
        let outcome = shard.touch_versioned(hash, key, expires_at, version, &self.clock);
        Some((outcome, version))
    }

    /// Removes `key` unconditionally (no tombstone). Returns whether a live value was removed.
    pub fn delete(&self, key: &[u8]) -> bool {
        let (hash, i) = self.locate(key);
        let outcome = self.shard(i).lock().delete(hash, key, None, &self.clock, 0);
        outcome == DeleteOutcome::Deleted
    }

    /// Deletes `key` at `version`, leaving a tombstone for [`CacheConfig::tombstone_ttl`]
    /// unless a newer version is stored.
    pub fn delete_versioned(&self, key: &[u8], version: u64) -> DeleteOutcome {
        let (hash, i) = self.locate(key);
        self.shard(i)
            .lock()
            .delete(hash, key, Some(version), &self.clock, self.tombstone_ttl_ms)
    }

    /// Sets the absolute expiry of a live value (`None` = never expire; in the past = delete).
    /// Returns whether the key held a live value.
    pub fn touch(&self, key: &[u8], expires_at: Option<u64>) -> bool {
        let (hash, i) = self.locate(key);
        self.shard(i)
            .lock()
            .touch(hash, key, expires_at, &self.clock)
    }

    /// Like [`Cache::get_entry`], but also reports deletes and expiries that are still
    /// remembered, with their versions (see [`VersionedRead`]). `None`: nothing is known.
    pub fn get_versioned(&self, key: &[u8]) -> Option<VersionedRead> {
        let (hash, i) = self.locate(key);
        self.shard(i)
            .lock()
            .get_versioned(hash, key, &self.clock, true)
    }

    /// Like [`Cache::get_versioned`], but not a use: the LRU order and the hit and miss
    /// counters stay as they were. For whole-engine walks (snapshots) that must not promote
    /// every entry they read.
    pub fn peek_versioned(&self, key: &[u8]) -> Option<VersionedRead> {
        let (hash, i) = self.locate(key);
        self.shard(i)
            .lock()
            .get_versioned(hash, key, &self.clock, false)
    }

    /// Sets the absolute expiry of a live value (`None` = never) *and* its version, under one
    /// shard lock, so a concurrent write can never be overwritten by a read-then-rewrite. A
    /// newer stored version makes it [`TouchOutcome::Stale`].
    pub fn touch_versioned(
        &self,
        key: &[u8],
        expires_at: Option<u64>,
        version: u64,
    ) -> TouchOutcome {
        let (hash, i) = self.locate(key);
        self.shard(i)
            .lock()
            .touch_versioned(hash, key, expires_at, version, &self.clock)
    }

    /// Makes a live value expire `ttl` from now. Returns whether the key held a live value.
    pub fn expire(&self, key: &[u8], ttl: Duration) -> bool {
        self.touch(key, Some(self.expiry_after(ttl)))
    }

    /// Removes the expiry of a live value. Returns whether the key held a live value.
    pub fn persist(&self, key: &[u8]) -> bool {
        self.touch(key, None)
    }

    /// How long a live value has left; `None` if the key holds no live value. Does not count
    /// as a use for LRU purposes.
    pub fn ttl(&self, key: &[u8]) -> Option<Ttl> {
        let (hash, i) = self.locate(key);
        let expiry = self.shard(i).lock().expiry(hash, key, &self.clock)?;
        Some(match expiry {
            None => Ttl::Never,
            Some(at) => Ttl::Remaining(Duration::from_millis(
                at.saturating_sub(self.clock.now_ms()),
            )),
        })
    }

    /// `now + ttl` in unix milliseconds, saturating.
    fn expiry_after(&self, ttl: Duration) -> u64 {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.clock.now_ms().saturating_add(ttl_ms)
    }

    /// Stored values, including expired ones the reaper has not reclaimed yet (tombstones are
    /// not counted).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.0.lock().items() as usize)
            .sum()
    }

    /// Whether [`Cache::len`] is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes charged against the budget (see [`CacheStats::bytes`]).
    pub fn bytes_used(&self) -> u64 {
        self.shards.iter().map(|s| s.0.lock().used_bytes()).sum()
    }

    /// The largest charge one entry may have: one shard's budget.
    pub fn max_entry_charge(&self) -> u64 {
        self.shard(0).lock().capacity()
    }

    /// Bytes the engine really holds, summed over shards: indexes, arena pages and
    /// large entries, slack included (what [`CacheStats::bytes`] charges leaves the slack out).
    /// Takes each shard's lock briefly (a few additions); for metrics and the node's memory
    /// trimming, not for every request.
    pub fn footprint(&self) -> u64 {
        self.shards.iter().map(|s| s.0.lock().footprint()).sum()
    }

    /// Drops every entry and tombstone, shard by shard.
    pub fn clear(&self) {
        for s in self.shards.iter() {
            s.0.lock().clear();
        }
    }

    /// Counters and sizes summed over shards.
    pub fn stats(&self) -> CacheStats {
        let mut st = CacheStats::default();
        for s in self.shards.iter() {
            let shard = s.0.lock();
            let c = shard.counters;
            st.hits += c.hits;
            st.misses += c.misses;
            st.inserts += c.inserts;
            st.updates += c.updates;
            st.deletes += c.deletes;
            st.evictions += c.evictions;
            st.expirations += c.expirations;
            st.stale_writes += c.stale_writes;
            st.items += shard.items();
            st.tombstones += shard.tombstones();
            st.bytes += shard.used_bytes();
        }
        st
    }

    /// One full pass of the expiry sweep over every shard: frees expired values and
    /// tombstones. Each lock acquisition examines at most `budget` chunks (`budget` is raised
    /// to 1), and the lock is released between steps, so other operations interleave.
    /// Shards with no expiring entries are skipped in O(1).
    pub fn reap(&self, budget: usize) -> ReapReport {
        let mut report = ReapReport::default();
        for i in 0..self.shards.len() {
            loop {
                let step = self.reap_step(i, budget);
                report.visited += step.visited;
                report.reclaimed += step.reclaimed;
                report.steps += 1;
                if step.pass_complete {
                    break;
                }
            }
        }
        report
    }

    /// One bounded step of the sweep on shard `shard` (`0..shard_count()`), for callers that
    /// schedule the work themselves: one lock acquisition, at most `budget` chunks examined.
    ///
    /// # Panics
    ///
    /// If `shard >= shard_count()` (a programming error, not an input).
    pub fn reap_step(&self, shard: usize, budget: usize) -> ReapStep {
        self.shard(shard)
            .lock()
            .reap_step(budget.max(1), &self.clock)
    }

    /// Live entries in chunks, from a cursor a client holds between calls (`SCAN`):
    /// returns the entries found while examining at most `budget` chunks under one shard
    /// lock, and the cursor to continue from (`None` when done).
    ///
    /// The cursor is a chunk position and nothing is registered between calls, so this
    /// walk is **not complete**: an entry that a page give-back or a rewrite into another
    /// size class carried from ahead of the cursor to behind it while the client was away is
    /// missed (one moved the other way is seen twice). Code that must see every entry uses
    /// [`Cache::scanner`], which is. Order is unspecified.
    ///
    /// ```
    /// use cache_core::{Cache, CacheConfig, ScanCursor};
    /// let cache = Cache::new(CacheConfig::new().with_max_bytes(1 << 20))?;
    /// for i in 0..100u32 {
    ///     cache.set(&i.to_be_bytes(), b"v")?;
    /// }
    /// let (mut seen, mut cursor) = (0, Some(ScanCursor::default()));
    /// while let Some(c) = cursor {
    ///     let (entries, next) = cache.scan(c, 16);
    ///     seen += entries.len();
    ///     cursor = next;
    /// }
    /// assert_eq!(seen, 100);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn scan(&self, cursor: ScanCursor, budget: usize) -> (Vec<Entry>, Option<ScanCursor>) {
        let mut out = Vec::new();
        let mut cursor = cursor;
        while cursor.shard < self.shards.len() {
            let shard = self.shard(cursor.shard).lock();
            let mut now = shard::Now::new(&self.clock);
            let next = shard.walk(cursor.pos, budget, |h| {
                shard.collect_entry(h, &mut now, &mut out);
            });
            drop(shard);
            cursor = match next {
                Some(pos) => ScanCursor { pos, ..cursor },
                None => ScanCursor {
                    shard: cursor.shard + 1,
                    pos: 0,
                },
            };
            if next.is_some() || !out.is_empty() {
                break;
            }
        }
        let more = cursor.shard < self.shards.len();
        (out, more.then_some(cursor))
    }

    /// A complete scan of every entry: [`Scanner::entries`] and [`Scanner::versions`] walk
    /// the shards in bounded steps (one shard lock at a time, at most `budget` chunks per
    /// acquisition) and return **every entry present for the whole scan at least once**,
    /// whatever evictions, expiries, deletes, rewrites and page give-backs do meanwhile
    /// (the guarantee Redis's `SCAN` gives). Entries written or deleted during the scan
    /// may or may not be returned; an entry may be returned twice. Snapshots, flush,
    /// anti-entropy and hand-over rely on this.
    ///
    /// The scanner registers itself with the shard it is in, so that chunks moved meanwhile
    /// are logged for it; dropping it unregisters it. Hold one only while scanning.
    ///
    /// ```
    /// use cache_core::{Cache, CacheConfig};
    /// let cache = Cache::new(CacheConfig::new().with_max_bytes(1 << 20))?;
    /// for i in 0..100u32 {
    ///     cache.set(&i.to_be_bytes(), b"v")?;
    /// }
    /// let mut scan = cache.scanner();
    /// let mut seen = 0;
    /// while let Some(entries) = scan.entries(16) {
    ///     seen += entries.len();
    /// }
    /// assert_eq!(seen, 100);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn scanner(&self) -> Scanner<'_, C> {
        Scanner {
            cache: self,
            shard: 0,
            phase: ScanPhase::Start,
        }
    }

    /// Checks every invariant of every shard (list and index agree, accounting matches, no
    /// cycles, free list sane, limits respected). For tests and debugging; O(entries).
    pub fn validate(&self) -> Result<(), String> {
        for (i, s) in self.shards.iter().enumerate() {
            s.0.lock()
                .validate()
                .map_err(|e| format!("shard {i}: {e}"))?;
        }
        Ok(())
    }

    #[cfg(any(test, feature = "model"))]
    pub(crate) fn shard_keys_mru_to_lru(&self, i: usize) -> Vec<Vec<u8>> {
        self.shard(i).lock().keys_mru_to_lru()
    }
}

impl<C: Clock> std::fmt::Debug for Cache<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("shards", &self.shards.len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
