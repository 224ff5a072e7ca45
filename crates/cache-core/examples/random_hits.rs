//! What one hit costs when the working set is larger than the CPU cache: a single thread
//! reads 100 000 keys (16-byte keys, 64-byte values) in random order, under LRU and SIEVE,
//! next to a `std::collections::HashMap<Vec<u8>, Vec<u8>>` that only looks the key up.
//! Every read is a hit, so the figures are the memory misses of the lookup (and, under LRU,
//! of relinking the entry between its neighbours).
//!
//! `cargo run --release -p cache-core --example random_hits`

use std::collections::HashMap;
use std::time::Instant;

use cache_core::{Cache, CacheConfig, EvictionPolicy};

const KEYS: usize = 100_000;
const READS: usize = 20_000_000;

/// A xorshift step: cheap, and its sequence is the same on every run.
fn next(x: &mut u64) -> usize {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    (*x % KEYS as u64) as usize
}

fn main() {
    let keys: Vec<Vec<u8>> = (0..KEYS)
        .map(|i| format!("key:{i:012}").into_bytes())
        .collect();
    let value = vec![b'x'; 64];

    let map: HashMap<Vec<u8>, Vec<u8>> = keys.iter().map(|k| (k.clone(), value.clone())).collect();
    let mut x = 88_172_645_463_325_252;
    let start = Instant::now();
    let mut found = 0usize;
    for _ in 0..READS {
        found += map.get(&keys[next(&mut x)]).map_or(0, Vec::len);
    }
    let ns = start.elapsed().as_nanos() as f64 / READS as f64;
    println!("std HashMap lookup: {ns:.1} ns per hit ({found} bytes seen)");

    for policy in [EvictionPolicy::Lru, EvictionPolicy::Sieve] {
        let config = CacheConfig::default()
            .with_max_bytes(1 << 30)
            .with_eviction_policy(policy);
        let cache = Cache::new(config).expect("valid config");
        for k in &keys {
            cache.set(k, &value).expect("fits");
        }
        let mut x = 88_172_645_463_325_252;
        let start = Instant::now();
        let mut hits = 0usize;
        for _ in 0..READS {
            hits += usize::from(cache.get_entry(&keys[next(&mut x)]).is_some());
        }
        let ns = start.elapsed().as_nanos() as f64 / READS as f64;
        println!("cache-core {policy:?} get: {ns:.1} ns per hit ({hits} hits)");
    }
}
