//! The engine's reference model: the same semantics as a shard written the obvious way, and
//! a driver that runs a sequence of operations against both and compares everything after
//! every step. Used by the property tests (`tests.rs`) and by the `engine_model` fuzz target
//! (`fuzz/`), which is why it is a module and not test-only code: built with `cfg(test)` or
//! the `model` feature, hidden from the docs, not part of the API.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use crate::{
    Cache, CacheConfig, Clock, Condition, DeleteOutcome, ENTRY_OVERHEAD, EvictionPolicy,
    InsertError, ManualClock, WriteOptions, WriteOutcome,
};

const NEVER: u64 = u64::MAX;

/// Where every model run's clock starts (unix milliseconds).
pub const START_MS: u64 = 1_700_000_000_000;

/// A cache on a [`ManualClock`] starting at [`START_MS`].
pub fn manual_cache(config: CacheConfig) -> (Cache<ManualClock>, ManualClock) {
    let clock = ManualClock::new(START_MS);
    let cache = Cache::with_clock(config, clock.clone()).expect("valid test config");
    (cache, clock)
}

/// `Err` with both sides and the context when they differ.
macro_rules! check_eq {
    ($left:expr, $right:expr $(,)?) => {
        check_eq!($left, $right, "{}", "")
    };
    ($left:expr, $right:expr, $($ctx:tt)+) => {{
        let (l, r) = (&$left, &$right);
        if l != r {
            return Err(format!(
                "engine {:?} != model {:?}: {}",
                l,
                r,
                format!($($ctx)+)
            ));
        }
    }};
}

#[derive(Debug, Clone)]
struct ModelEntry {
    value: Vec<u8>,
    version: u64,
    expires_at: u64,
    tombstone: bool,
}

/// The same semantics as a shard, written the obvious way: a `VecDeque` per shard for the
/// list order (front = head: the most recent use under LRU, the newest insert under SIEVE),
/// a `HashMap` for contents with the same byte accounting, and for SIEVE a set of visited
/// keys and each shard's hand (the key it points at).
struct Model {
    policy: EvictionPolicy,
    visited: HashSet<Vec<u8>>,
    hand: Vec<Option<Vec<u8>>>,
    order: Vec<VecDeque<Vec<u8>>>,
    map: HashMap<Vec<u8>, ModelEntry>,
    used: Vec<u64>,
    capacity: u64,
    max_items: u64,
    evict: bool,
    tombstone_ttl: u64,
}

/// What the engine charges: the model reuses the engine's one formula (the size classes are
/// the arena's business; the model checks that the engine sums its charges right).
fn charge(key: &[u8], e: &ModelEntry) -> u64 {
    crate::entry_charge(key.len(), e.value.len())
}

impl Model {
    fn expired(e: &ModelEntry, now: u64) -> bool {
        e.expires_at != NEVER && now >= e.expires_at
    }

    /// The engine's `settle`: an expired tombstone goes; an expired value goes if
    /// unversioned, else becomes a tombstone in place until `expires_at + tombstone_ttl`.
    fn settle(&mut self, s: usize, key: &[u8], now: u64) {
        let Some(e) = self.map.get(key).cloned() else {
            return;
        };
        if !Self::expired(&e, now) {
            return;
        }
        let dead_until = e.expires_at.saturating_add(self.tombstone_ttl);
        if e.tombstone || e.version == 0 || now >= dead_until {
            self.remove(s, key);
            return;
        }
        let tomb = ModelEntry {
            value: Vec::new(),
            version: e.version,
            expires_at: dead_until,
            tombstone: true,
        };
        self.used[s] -= charge(key, &e);
        self.used[s] += charge(key, &tomb);
        self.map.insert(key.to_vec(), tomb);
    }

    fn remove(&mut self, s: usize, key: &[u8]) {
        let e = self.map.remove(key).expect("model key present");
        self.used[s] -= charge(key, &e);
        if self.hand[s].as_deref() == Some(key) {
            // The hand moves to the entry towards the head (none at the head).
            let at = self.order[s].iter().position(|k| k == key).expect("listed");
            self.hand[s] = at.checked_sub(1).map(|i| self.order[s][i].clone());
        }
        self.visited.remove(key);
        self.order[s].retain(|k| k != key);
    }

    /// A use of `key`: LRU moves it to the front; SIEVE marks a listed key visited and
    /// puts a new one at the front.
    fn front(&mut self, s: usize, key: &[u8]) {
        if self.policy == EvictionPolicy::Sieve && self.order[s].iter().any(|k| k == key) {
            self.visited.insert(key.to_vec());
            return;
        }
        self.order[s].retain(|k| k != key);
        self.order[s].push_front(key.to_vec());
    }

    /// SIEVE's victim, walked from the hand (or the back) towards the front, wrapping.
    fn sieve_victim(&mut self, s: usize, protect: Option<&[u8]>) -> Option<Vec<u8>> {
        let len = self.order[s].len();
        let mut at = match &self.hand[s] {
            Some(h) => self.order[s]
                .iter()
                .position(|k| k == h)
                .expect("hand listed"),
            None => len.checked_sub(1)?,
        };
        for _ in 0..=2 * len {
            let key = self.order[s][at].clone();
            if Some(key.as_slice()) != protect && !self.visited.contains(&key) {
                self.hand[s] = at.checked_sub(1).map(|i| self.order[s][i].clone());
                return Some(key);
            }
            self.visited.remove(&key);
            at = at.checked_sub(1).unwrap_or(len - 1);
        }
        None
    }

    fn put(&mut self, s: usize, key: &[u8], e: ModelEntry) {
        if let Some(old) = self.map.get(key) {
            self.used[s] -= charge(key, old);
        }
        self.used[s] += charge(key, &e);
        self.map.insert(key.to_vec(), e);
        self.front(s, key);
    }

    fn fits(&self, s: usize, bytes: u64, items: u64) -> bool {
        self.used[s] + bytes <= self.capacity
            && self.order[s].len() as u64 + items <= self.max_items
    }

    fn evict(&mut self, s: usize, bytes: u64, items: u64, protect: Option<&[u8]>) {
        while !self.fits(s, bytes, items) {
            let victim = match self.policy {
                EvictionPolicy::Lru => self.order[s]
                    .back()
                    .cloned()
                    .filter(|tail| Some(tail.as_slice()) != protect),
                EvictionPolicy::Sieve => self.sieve_victim(s, protect),
            };
            let Some(victim) = victim else {
                break;
            };
            self.remove(s, &victim);
        }
    }

    fn get(&mut self, s: usize, key: &[u8], now: u64) -> Option<Vec<u8>> {
        self.settle(s, key, now);
        let e = self.map.get(key)?.clone();
        if e.tombstone {
            return None;
        }
        if Self::expired(&e, now) {
            self.remove(s, key);
            return None;
        }
        self.front(s, key);
        Some(e.value)
    }

    fn delete_inner(
        &mut self,
        s: usize,
        key: &[u8],
        version: Option<u64>,
        now: u64,
    ) -> DeleteOutcome {
        let existing = self.map.get(key).cloned();
        let outcome = match &existing {
            Some(e) if !Self::expired(e, now) && !e.tombstone => DeleteOutcome::Deleted,
            _ => DeleteOutcome::NotFound,
        };
        let Some(version) = version else {
            if existing.is_some() {
                self.remove(s, key);
            }
            return outcome;
        };
        let tomb = ModelEntry {
            value: Vec::new(),
            version,
            expires_at: now + self.tombstone_ttl,
            tombstone: true,
        };
        if existing.is_some() {
            self.put(s, key, tomb);
        } else {
            let c = charge(key, &tomb);
            if c > self.capacity || (!self.evict && !self.fits(s, c, 1)) {
                return outcome;
            }
            self.evict(s, c, 1, None);
            self.put(s, key, tomb);
        }
        outcome
    }

    fn delete(&mut self, s: usize, key: &[u8], version: Option<u64>, now: u64) -> DeleteOutcome {
        self.settle(s, key, now);
        if let (Some(e), Some(v)) = (self.map.get(key), version)
            && !Self::expired(e, now)
            && v < e.version
        {
            return DeleteOutcome::Stale;
        }
        self.delete_inner(s, key, version, now)
    }

    fn write(
        &mut self,
        s: usize,
        key: &[u8],
        value: &[u8],
        opts: WriteOptions,
        now: u64,
    ) -> Result<WriteOutcome, InsertError> {
        let new = ModelEntry {
            value: value.to_vec(),
            version: opts.version.unwrap_or(0),
            expires_at: opts.expires_at.unwrap_or(NEVER),
            tombstone: false,
        };
        let c = charge(key, &new);
        if c > self.capacity {
            return Err(InsertError::EntryTooLarge {
                charge: c,
                shard_capacity: self.capacity,
            });
        }
        self.settle(s, key, now);
        let existing = self.map.get(key).cloned();
        let mut present = false;
        if let Some(e) = &existing
            && !Self::expired(e, now)
        {
            if opts.version.is_some_and(|v| {
                v < e.version
                    || (v == e.version
                        && v != 0
                        && crate::shard::loses_tie(value, e.tombstone, &e.value))
            }) {
                return Ok(WriteOutcome::Stale);
            }
            present = !e.tombstone;
        }
        match opts.condition {
            Condition::IfAbsent if present => return Ok(WriteOutcome::ConditionNotMet),
            Condition::IfPresent if !present => return Ok(WriteOutcome::ConditionNotMet),
            _ => {}
        }
        if opts.expires_at.is_some_and(|at| at <= now) {
            let _ = self.delete_inner(s, key, opts.version, now);
            return Ok(WriteOutcome::Stored);
        }
        match existing {
            Some(old) => {
                let grow = c.saturating_sub(charge(key, &old));
                if !self.evict && !self.fits(s, grow, 0) {
                    return Err(InsertError::OutOfMemory {
                        used: self.used[s],
                        capacity: self.capacity,
                    });
                }
                self.put(s, key, new);
                self.evict(s, 0, 0, Some(key));
            }
            None => {
                if !self.evict && !self.fits(s, c, 1) {
                    return Err(InsertError::OutOfMemory {
                        used: self.used[s],
                        capacity: self.capacity,
                    });
                }
                self.evict(s, c, 1, None);
                self.put(s, key, new);
            }
        }
        Ok(WriteOutcome::Stored)
    }

    fn touch(&mut self, s: usize, key: &[u8], expires_at: Option<u64>, now: u64) -> bool {
        self.settle(s, key, now);
        let Some(e) = self.map.get(key).cloned() else {
            return false;
        };
        if e.tombstone {
            return false;
        }
        if Self::expired(&e, now) {
            self.remove(s, key);
            return false;
        }
        match expires_at {
            Some(at) if at <= now => self.remove(s, key),
            _ => {
                self.map.get_mut(key).expect("present").expires_at = expires_at.unwrap_or(NEVER);
                self.front(s, key);
            }
        }
        true
    }

    fn reap(&mut self, now: u64) {
        let dead: Vec<Vec<u8>> = self
            .map
            .iter()
            .filter(|(_, e)| Self::expired(e, now))
            .map(|(k, _)| k.clone())
            .collect();
        for k in dead {
            let s = (0..self.order.len())
                .find(|&s| self.order[s].contains(&k))
                .expect("key in some shard");
            self.settle(s, &k, now);
        }
    }
}

/// One step of a model run.
#[derive(Debug, Clone)]
pub enum Op {
    Get(u8),
    Set {
        key: u8,
        len: usize,
        ttl: Option<u64>,
    },
    VersionedSet {
        key: u8,
        len: usize,
        version: u64,
        ttl: Option<u64>,
        condition: Condition,
    },
    Delete(u8),
    VersionedDelete {
        key: u8,
        version: u64,
    },
    Touch {
        key: u8,
        ttl: Option<u64>,
    },
    Advance(u64),
    Reap,
}

/// The key for key number `k`: short, variable-length keys, the empty key included.
pub fn key_bytes(k: u8) -> Vec<u8> {
    // Variable-length keys, including the empty key.
    vec![b'k'; k as usize % 4]
        .into_iter()
        .chain([k])
        .take(k as usize % 5)
        .collect::<Vec<_>>()
        .into_iter()
        .chain(std::iter::once(k))
        .collect()
}

/// How [`run`] sizes the cache under test (and the model).
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// Shard count (a power of two).
    pub shards: usize,
    /// Byte budget per shard.
    pub per_shard: u64,
    /// Optional cap on entries, split over the shards like the engine does.
    pub max_items: Option<u64>,
    /// Evict (`true`) or refuse writes when full.
    pub evict: bool,
    /// The eviction policy.
    pub policy: EvictionPolicy,
}

/// Runs `ops` against a fresh [`Cache`] on a [`ManualClock`] and against the model, checking
/// after every step that every answer, the shard lists' order, the byte accounting and the
/// item count agree and that [`Cache::validate`] passes. `Err` names the step and the
/// difference.
pub fn run(ops: &[Op], setup: Setup) -> Result<(), String> {
    let Setup {
        shards,
        per_shard,
        max_items,
        evict,
        policy,
    } = setup;
    let config = CacheConfig::new()
        .with_eviction_policy(policy)
        .with_shards(shards)
        .with_max_bytes(per_shard * shards as u64)
        .with_max_items(max_items)
        .with_eviction(evict)
        .with_tombstone_ttl(Duration::from_millis(30));
    let (cache, clock) = manual_cache(config);
    let mut model = Model {
        policy,
        visited: HashSet::new(),
        hand: vec![None; shards],
        order: vec![VecDeque::new(); shards],
        map: HashMap::new(),
        used: vec![0; shards],
        capacity: per_shard,
        max_items: max_items.map_or(u64::MAX, |m| m.div_ceil(shards as u64)),
        evict,
        tombstone_ttl: 30,
    };
    for (step, op) in ops.iter().enumerate() {
        let now = clock.now_ms();
        let value = |len: usize| -> Vec<u8> { (0..len).map(|i| (i + step) as u8).collect() };
        match op.clone() {
            Op::Get(k) => {
                let key = key_bytes(k);
                let s = cache.shard_of(&key);
                // Every other read lends the value instead of copying it out: both are
                // the same hit (or miss) to the model.
                let got = if step % 2 == 0 {
                    cache.get(&key).map(|b| b.to_vec())
                } else {
                    cache.read_with(&key, <[u8]>::to_vec)
                };
                check_eq!(got, model.get(s, &key, now), "step {}: {:?}", step, op);
            }
            Op::Set { key, len, ttl } => {
                let key = key_bytes(key);
                let s = cache.shard_of(&key);
                let v = value(len);
                let opts = WriteOptions {
                    expires_at: ttl.map(|t| now + t),
                    ..WriteOptions::default()
                };
                check_eq!(
                    cache.write(&key, &v, opts),
                    model.write(s, &key, &v, opts, now),
                    "step {}: {:?}",
                    step,
                    op
                );
            }
            Op::VersionedSet {
                key,
                len,
                version,
                ttl,
                condition,
            } => {
                let key = key_bytes(key);
                let s = cache.shard_of(&key);
                let v = value(len);
                let opts = WriteOptions {
                    version: Some(version),
                    expires_at: ttl.map(|t| now + t),
                    condition,
                };
                check_eq!(
                    cache.write(&key, &v, opts),
                    model.write(s, &key, &v, opts, now),
                    "step {}: {:?}",
                    step,
                    op
                );
            }
            Op::Delete(k) => {
                let key = key_bytes(k);
                let s = cache.shard_of(&key);
                let expected = model.delete(s, &key, None, now) == DeleteOutcome::Deleted;
                check_eq!(cache.delete(&key), expected, "step {}: {:?}", step, op);
            }
            Op::VersionedDelete { key, version } => {
                let key = key_bytes(key);
                let s = cache.shard_of(&key);
                check_eq!(
                    cache.delete_versioned(&key, version),
                    model.delete(s, &key, Some(version), now),
                    "step {}: {:?}",
                    step,
                    op
                );
            }
            Op::Touch { key, ttl } => {
                let key = key_bytes(key);
                let s = cache.shard_of(&key);
                let at = ttl.map(|t| now + t);
                check_eq!(
                    cache.touch(&key, at),
                    model.touch(s, &key, at, now),
                    "step {}: {:?}",
                    step,
                    op
                );
            }
            Op::Advance(ms) => clock.advance_ms(ms),
            Op::Reap => {
                cache.reap(3);
                model.reap(now);
            }
        }
        if let Err(e) = cache.validate() {
            return Err(format!("step {step} ({op:?}): invariant broken: {e}"));
        }
        for s in 0..shards {
            check_eq!(
                cache.shard_keys_mru_to_lru(s),
                model.order[s].iter().cloned().collect::<Vec<_>>(),
                "step {}: {:?}: LRU order of shard {}",
                step,
                op,
                s
            );
        }
        check_eq!(cache.bytes_used(), model.used.iter().sum::<u64>());
        let model_items = model.map.values().filter(|e| !e.tombstone).count();
        check_eq!(cache.len(), model_items);
    }
    Ok(())
}

impl Op {
    /// Decodes operations from arbitrary bytes (the fuzz target's input), three bytes per
    /// operation; every input is valid and the sizes stay within what [`run`] exercises.
    pub fn decode_all(data: &[u8]) -> Vec<Op> {
        data.chunks_exact(3)
            .map(|c| {
                let (kind, a, b) = (c[0] % 16, c[1], c[2]);
                let key = a % 12;
                let ttl = (b & 0x80 != 0).then_some(u64::from(b % 50));
                let len = usize::from(b) + usize::from(a & 0x30);
                match kind {
                    0..=3 => Op::Get(key),
                    4..=6 => Op::Set { key, len, ttl },
                    7..=9 => Op::VersionedSet {
                        key,
                        len,
                        version: u64::from(a >> 5),
                        ttl,
                        condition: match b % 3 {
                            0 => Condition::Always,
                            1 => Condition::IfAbsent,
                            _ => Condition::IfPresent,
                        },
                    },
                    10 => Op::Delete(key),
                    11 | 12 => Op::VersionedDelete {
                        key,
                        version: u64::from(b % 6),
                    },
                    13 => Op::Touch { key, ttl },
                    14 => Op::Advance(1 + u64::from(b % 40)),
                    _ => Op::Reap,
                }
            })
            .collect()
    }
}

impl Setup {
    /// A setup chosen by one byte: one or two shards, an item cap or not, eviction on or off,
    /// LRU or SIEVE.
    pub fn decode(byte: u8) -> Setup {
        let shards = if byte & 1 == 0 { 1 } else { 2 };
        Setup {
            shards,
            per_shard: (3 + u64::from(byte >> 4 & 3)) * (ENTRY_OVERHEAD as u64 + 150),
            max_items: (byte & 2 != 0).then_some(3 * shards as u64),
            evict: byte & 4 == 0,
            policy: if byte & 8 == 0 {
                EvictionPolicy::Lru
            } else {
                EvictionPolicy::Sieve
            },
        }
    }
}
