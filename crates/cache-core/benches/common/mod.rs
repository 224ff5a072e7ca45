//! The engine workload shared by `engine.rs` (criterion timings) and `engine_report.rs`
//! (memory, hit ratio, reaper): the same caches, keys and Zipf trace in both.
#![allow(dead_code, unreachable_pub)]

use std::num::NonZeroUsize;

use bytes::Bytes;
use cache_core::{Cache, CacheConfig, EvictionPolicy, entry_charge};
use parking_lot::Mutex;

/// Distinct keys in the workload.
pub const KEYS: usize = 1_000_000;
/// Cache capacity in entries.
pub const CAPACITY: usize = 100_000;
pub const KEY_LEN: usize = 16;
pub const VALUE_LEN: usize = 64;
/// Zipf exponent.
pub const ZIPF_S: f64 = 0.99;
/// Percentage of operations that are gets (the rest are sets).
pub const GET_PERCENT: u64 = 90;

/// The operations every cache under test supports, monomorphised per cache (no dyn call).
pub trait BenchCache: Send + Sync {
    const NAME: &'static str;
    fn with_capacity(entries: usize) -> Self;
    fn get(&self, key: &[u8]) -> Option<Bytes>;
    /// Stores copies of `key` and `value`, as a server must (they arrive in a network buffer).
    fn set(&self, key: &[u8], value: &[u8]);
}

impl BenchCache for Cache {
    const NAME: &'static str = "cache-core";
    fn with_capacity(entries: usize) -> Self {
        let per_entry = entry_charge(KEY_LEN, VALUE_LEN);
        Cache::new(CacheConfig::new().with_max_bytes(entries as u64 * per_entry))
            .expect("valid config")
    }
    fn get(&self, key: &[u8]) -> Option<Bytes> {
        Cache::get(self, key)
    }
    fn set(&self, key: &[u8], value: &[u8]) {
        Cache::set(self, key, value).expect("entry fits");
    }
}

/// cache-core with `--eviction-policy sieve`.
pub struct SieveCache(Cache);

impl BenchCache for SieveCache {
    const NAME: &'static str = "cache-core-sieve";
    fn with_capacity(entries: usize) -> Self {
        let per_entry = entry_charge(KEY_LEN, VALUE_LEN);
        Self(
            Cache::new(
                CacheConfig::new()
                    .with_max_bytes(entries as u64 * per_entry)
                    .with_eviction_policy(EvictionPolicy::Sieve),
            )
            .expect("valid config"),
        )
    }
    fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.0.get(key)
    }
    fn set(&self, key: &[u8], value: &[u8]) {
        self.0.set(key, value).expect("entry fits");
    }
}

pub struct QuickCache(quick_cache::sync::Cache<Bytes, Bytes>);

impl BenchCache for QuickCache {
    const NAME: &'static str = "quick_cache";
    fn with_capacity(entries: usize) -> Self {
        Self(quick_cache::sync::Cache::new(entries))
    }
    fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.0.get(key)
    }
    fn set(&self, key: &[u8], value: &[u8]) {
        self.0
            .insert(Bytes::copy_from_slice(key), Bytes::copy_from_slice(value));
    }
}

pub struct Moka(moka::sync::Cache<Bytes, Bytes>);

impl BenchCache for Moka {
    const NAME: &'static str = "moka";
    fn with_capacity(entries: usize) -> Self {
        Self(moka::sync::Cache::new(entries as u64))
    }
    fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.0.get(key)
    }
    fn set(&self, key: &[u8], value: &[u8]) {
        self.0
            .insert(Bytes::copy_from_slice(key), Bytes::copy_from_slice(value));
    }
}

impl Moka {
    /// moka applies some writes lazily; flush before measuring memory.
    pub fn settle(&self) {
        self.0.run_pending_tasks();
    }
}

pub struct LruMutex(Mutex<lru::LruCache<Bytes, Bytes>>);

impl BenchCache for LruMutex {
    const NAME: &'static str = "lru_mutex";
    fn with_capacity(entries: usize) -> Self {
        Self(Mutex::new(lru::LruCache::new(
            NonZeroUsize::new(entries).expect("capacity > 0"),
        )))
    }
    fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.0.lock().get(key).cloned()
    }
    fn set(&self, key: &[u8], value: &[u8]) {
        self.0
            .lock()
            .put(Bytes::copy_from_slice(key), Bytes::copy_from_slice(value));
    }
}

/// The 16-byte key for key number `i`.
pub fn key(i: u32) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[..8].copy_from_slice(&u64::from(i).to_be_bytes());
    k[8..].copy_from_slice(&(u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes());
    k
}

/// xorshift64*: a tiny deterministic generator, so every run and every cache sees the same
/// trace without pulling in `rand`.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One operation of the trace: key number and whether it is a get.
#[derive(Clone, Copy)]
pub struct Op {
    pub key: u32,
    pub is_get: bool,
}

/// `len` operations over [`KEYS`] keys with Zipf(`ZIPF_S`) popularity (rank 0 most popular;
/// rank mapped to a key number by a fixed permutation), [`GET_PERCENT`] % gets.
pub fn zipf_trace(len: usize, seed: u64) -> Vec<Op> {
    zipf_trace_with(len, seed, ZIPF_S)
}

/// [`zipf_trace`] with exponent `s`.
pub fn zipf_trace_with(len: usize, seed: u64, s: f64) -> Vec<Op> {
    let mut cdf = Vec::with_capacity(KEYS);
    let mut total = 0.0f64;
    for rank in 1..=KEYS {
        total += 1.0 / (rank as f64).powf(s);
        cdf.push(total);
    }
    let mut rng = XorShift::new(seed);
    (0..len)
        .map(|_| {
            let u = rng.next_f64() * total;
            let rank = cdf.partition_point(|&c| c < u).min(KEYS - 1) as u64;
            // An odd multiplier mod 2^20 permutes 0..2^20; skip the few numbers >= KEYS.
            let mut k = rank;
            loop {
                k = k.wrapping_mul(0x9E37_79B1) & ((1 << 20) - 1);
                if (k as usize) < KEYS {
                    break;
                }
            }
            Op {
                key: k as u32,
                is_get: rng.next_u64() % 100 < GET_PERCENT,
            }
        })
        .collect()
}

/// Mixes one-off scans into `trace`: after every `every` operations, `scan_len` gets of keys
/// that never occur anywhere else (numbers from [`KEYS`] up), each a miss followed by a set —
/// a batch job or a crawler walking through data nobody reads twice.
pub fn with_scans(trace: &[Op], every: usize, scan_len: usize) -> Vec<Op> {
    let mut out = Vec::with_capacity(trace.len() + trace.len() / every * scan_len);
    let mut next = KEYS as u32;
    for (i, op) in trace.iter().enumerate() {
        out.push(*op);
        if (i + 1) % every == 0 {
            for _ in 0..scan_len {
                out.push(Op {
                    key: next,
                    is_get: true,
                });
                next += 1;
            }
        }
    }
    out
}

/// Runs `ops` against `cache`: a get, and on a miss a set (the usual cache-aside pattern);
/// a set op sets. Returns (gets, hits).
pub fn run_trace<C: BenchCache>(cache: &C, ops: &[Op], value: &[u8]) -> (u64, u64) {
    let (mut gets, mut hits) = (0u64, 0u64);
    for op in ops {
        let k = key(op.key);
        if op.is_get {
            gets += 1;
            if cache.get(&k).is_some() {
                hits += 1;
            } else {
                cache.set(&k, value);
            }
        } else {
            cache.set(&k, value);
        }
    }
    (gets, hits)
}
