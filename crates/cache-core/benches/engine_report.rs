//! Engine measurements that are not timings of a loop: memory overhead per entry, allocations
//! per get hit, hit ratio on the Zipf workload, and the reaper's lock hold times against the
//! naive "lock everything and scan" design. Run by `cargo xtask bench engine` (or
//! `cargo bench -p cache-core --bench engine_report`); prints tables.
//!
//! Memory is measured with a counting global allocator: bytes requested and not yet freed.
//! It counts what the program asked for, not the allocator's own rounding and headers.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cache_core::{Cache, CacheConfig, ManualClock, entry_charge};
use parking_lot::Mutex;

mod common;
use common::{
    BenchCache, KEY_LEN, KEYS, LruMutex, Moka, Op, QuickCache, SieveCache, VALUE_LEN, key,
    run_trace, with_scans, zipf_trace, zipf_trace_with,
};

struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// Forwarding to `System` is the whole implementation; `unsafe` is required by the
// `GlobalAlloc` trait itself, so this bench binary opts out of the workspace's `forbid`.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const MEMORY_ENTRIES: usize = 1_000_000;

/// (overhead bytes per entry beyond key + value, allocations per get hit)
fn memory<C: BenchCache>(settle: impl Fn(&C)) -> (f64, f64) {
    let keys: Vec<[u8; KEY_LEN]> = (0..MEMORY_ENTRIES as u32).map(key).collect();
    let value = [7u8; VALUE_LEN];
    let before = LIVE_BYTES.load(Ordering::SeqCst);
    // Room for every entry, so nothing is evicted.
    let cache = C::with_capacity(MEMORY_ENTRIES + MEMORY_ENTRIES / 10);
    for k in &keys {
        cache.set(k, &value);
    }
    // One read of each entry: the steady state of a cache that serves reads.
    for k in &keys {
        assert!(cache.get(k).is_some(), "{} lost an entry", C::NAME);
    }
    settle(&cache);
    let after = LIVE_BYTES.load(Ordering::SeqCst);
    let per_entry = (after - before) as f64 / MEMORY_ENTRIES as f64 - (KEY_LEN + VALUE_LEN) as f64;
    // Allocations during 100k get hits of already-read keys.
    let allocs_before = ALLOCATIONS.load(Ordering::SeqCst);
    for k in keys.iter().take(100_000) {
        std::hint::black_box(cache.get(k));
    }
    let allocs = (ALLOCATIONS.load(Ordering::SeqCst) - allocs_before) as f64 / 100_000.0;
    drop(cache);
    (per_entry, allocs)
}

fn hit_ratio<C: BenchCache>() -> f64 {
    let trace = zipf_trace(3_000_000, 1);
    let cache = C::with_capacity(common::CAPACITY);
    let value = [7u8; VALUE_LEN];
    run_trace(&cache, &trace[..1_000_000], &value); // warm-up
    let (gets, hits) = run_trace(&cache, &trace[1_000_000..], &value);
    hits as f64 / gets as f64
}

fn report<C: BenchCache>(settle: impl Fn(&C)) {
    let (overhead, allocs) = memory::<C>(settle);
    let ratio = hit_ratio::<C>();
    println!(
        "{:<14} {:>22.1} {:>20.3} {:>14.4}",
        C::NAME,
        overhead,
        allocs,
        ratio
    );
}

/// Hit ratio of `C` on `trace` at `capacity` entries: the first third warms the cache, the
/// rest is measured (gets that hit ÷ gets; a miss sets the key, cache-aside).
fn ratio_on<C: BenchCache>(trace: &[Op], capacity: usize, settle: &impl Fn(&C)) -> f64 {
    let cache = C::with_capacity(capacity);
    let value = [7u8; VALUE_LEN];
    let warm = trace.len() / 3;
    run_trace(&cache, &trace[..warm], &value);
    settle(&cache);
    let (gets, hits) = run_trace(&cache, &trace[warm..], &value);
    hits as f64 / gets as f64
}

/// The eviction policies against the peers: Zipf 0.8, Zipf 1.0, and Zipf 1.0 with one-off
/// scans, at 1 % and 10 % of the key space. Same traces for every cache.
fn hit_ratio_table() {
    const LEN: usize = 3_000_000;
    let zipf10 = zipf_trace_with(LEN, 7, 1.0);
    let workloads: [(&str, Vec<Op>); 3] = [
        ("zipf 0.8", zipf_trace_with(LEN, 7, 0.8)),
        // Every 20 000 operations a scan of 10 000 keys read once.
        ("zipf 1.0 + scans", with_scans(&zipf10, 20_000, 10_000)),
        ("zipf 1.0", zipf10),
    ];
    println!(
        "\nhit ratio by eviction policy ({KEYS} keys, {LEN} operations per workload, \
         {}% get with set on miss, first third warm-up)",
        common::GET_PERCENT
    );
    println!(
        "{:<18} {:>9} {:>11} {:>11} {:>11} {:>11} {:>11}",
        "workload", "capacity", "cc lru", "cc sieve", "quick_cache", "moka", "lru"
    );
    for (name, trace) in &workloads {
        for percent in [1usize, 10] {
            let capacity = KEYS * percent / 100;
            println!(
                "{:<18} {:>8}% {:>11.4} {:>11.4} {:>11.4} {:>11.4} {:>11.4}",
                name,
                percent,
                ratio_on::<Cache>(trace, capacity, &|_| {}),
                ratio_on::<SieveCache>(trace, capacity, &|_| {}),
                ratio_on::<QuickCache>(trace, capacity, &|_| {}),
                ratio_on::<Moka>(trace, capacity, &Moka::settle),
                ratio_on::<LruMutex>(trace, capacity, &|_| {}),
            );
        }
    }
}

/// 1M entries expiring in the same second: the incremental reaper against the naive design.
fn reaper() {
    const N: u32 = 1_000_000;
    const BUDGET: usize = 1024;
    let clock = ManualClock::new(1_000_000);
    let cache = Arc::new(Cache::with_clock(CacheConfig::new(), clock.clone()).expect("valid"));
    for i in 0..N {
        cache
            .set_with_ttl(
                &key(i),
                &[7u8; VALUE_LEN],
                Duration::from_millis(500 + u64::from(i % 500)),
            )
            .expect("fits");
    }
    let bytes_before = cache.bytes_used();
    clock.advance_ms(1_000);
    // What the background `Reaper` does on each tick, timed step by step.
    let (mut max_step, mut steps) = (Duration::ZERO, 0usize);
    let start = Instant::now();
    for shard in 0..cache.shard_count() {
        loop {
            let t = Instant::now();
            let step = cache.reap_step(shard, BUDGET);
            max_step = max_step.max(t.elapsed());
            steps += 1;
            if step.pass_complete {
                break;
            }
        }
    }
    let total = start.elapsed();
    assert_eq!(cache.len(), 0, "every expired entry reclaimed");
    assert_eq!(cache.bytes_used(), 0);

    // The naive design: one lock around a map, a periodic full scan under that lock.
    let naive: Mutex<HashMap<Bytes, (Bytes, u64)>> = Mutex::new(HashMap::new());
    for i in 0..N {
        naive.lock().insert(
            Bytes::copy_from_slice(&key(i)),
            (
                Bytes::copy_from_slice(&[7u8; VALUE_LEN]),
                1_000_500 + u64::from(i % 500),
            ),
        );
    }
    let t = Instant::now();
    {
        let mut map = naive.lock();
        map.retain(|_, (_, expires)| *expires > 1_001_000);
        map.shrink_to_fit();
    }
    let naive_hold = t.elapsed();
    println!(
        "\nreaper: {N} entries ({} MiB charged) expiring within the same second, {} shards, budget {BUDGET} chunks/step",
        bytes_before >> 20,
        cache.shard_count()
    );
    println!(
        "{:<34} {:>14} {:>16}",
        "design", "reclaim time", "longest lock hold"
    );
    println!(
        "{:<34} {:>11.1} ms {:>13.1} µs  ({steps} steps)",
        "cache-core incremental reaper",
        total.as_secs_f64() * 1e3,
        max_step.as_secs_f64() * 1e6
    );
    println!(
        "{:<34} {:>11.1} ms {:>13.1} µs",
        "naive: whole-map scan under lock",
        naive_hold.as_secs_f64() * 1e3,
        naive_hold.as_secs_f64() * 1e6
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing special.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!(
        "memory at {MEMORY_ENTRIES} entries ({KEY_LEN}-byte keys, {VALUE_LEN}-byte values), allocations per get hit, and hit ratio"
    );
    println!(
        "(zipf {} over {} keys, capacity {} entries, {}% get with set on miss)",
        common::ZIPF_S,
        common::KEYS,
        common::CAPACITY,
        common::GET_PERCENT
    );
    println!(
        "cache-core charges {} bytes per entry of this size ({} beyond key and value)\n",
        entry_charge(KEY_LEN, VALUE_LEN),
        entry_charge(KEY_LEN, VALUE_LEN) - (KEY_LEN + VALUE_LEN) as u64
    );
    println!(
        "{:<14} {:>22} {:>20} {:>14}",
        "cache", "overhead B/entry", "allocs per get hit", "hit ratio"
    );
    report::<Cache>(|_| {});
    report::<QuickCache>(|_| {});
    report::<Moka>(Moka::settle);
    report::<LruMutex>(|_| {});
    hit_ratio_table();
    reaper();
}
