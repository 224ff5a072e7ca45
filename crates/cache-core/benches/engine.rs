//! Engine timings against peers from crates.io, in the same run: `cargo xtask bench engine`
//! (which also prints the ratio table), or `cargo bench -p cache-core --bench engine`.
//!
//! - `throughput_1_thread` / `throughput_2_threads`: Zipf(0.99) over 1M keys, capacity 100k
//!   entries, 90 % get (set on miss) / 10 % set, 16-byte keys, 64-byte values. One iteration
//!   is `OPS_PER_ITER` operations spread over the threads.
//! - `get_hit`: one get of a present key, single thread.
//!
//! `cache-core` is the default (exact LRU); `cache-core-sieve` the same engine with SIEVE.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_core::Cache;
use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};

mod common;
use common::{
    BenchCache, LruMutex, Moka, Op, QuickCache, SieveCache, VALUE_LEN, key, run_trace, zipf_trace,
};

/// Operations per criterion iteration (all threads together). `xtask` divides by this.
const OPS_PER_ITER: usize = 10_000;
/// Length of each thread's trace; iterations walk through it and wrap.
const TRACE_LEN: usize = 2_000_000;

fn throughput<C: BenchCache + 'static>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    threads: usize,
    traces: &Arc<Vec<Vec<Op>>>,
) {
    let cache = Arc::new(C::with_capacity(common::CAPACITY));
    let value = [7u8; VALUE_LEN];
    // Warm the cache to its steady state before timing.
    run_trace(&*cache, &traces[0][..TRACE_LEN / 2], &value);
    let mut offset = 0usize;
    group.bench_function(C::NAME, |b| {
        b.iter_custom(|iters| {
            let per_thread = OPS_PER_ITER / threads;
            let total = per_thread * iters as usize;
            let start_offset = offset;
            offset = (offset + total) % TRACE_LEN;
            let start = Instant::now();
            std::thread::scope(|s| {
                for t in 0..threads {
                    let cache = Arc::clone(&cache);
                    let trace = &traces[t];
                    s.spawn(move || {
                        let mut done = 0;
                        let mut at = start_offset;
                        while done < total {
                            let n = (total - done).min(TRACE_LEN - at);
                            black_box(run_trace(&*cache, &trace[at..at + n], &value));
                            done += n;
                            at = (at + n) % TRACE_LEN;
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
}

fn get_hit<C: BenchCache>(group: &mut BenchmarkGroup<'_, WallTime>) {
    let cache = C::with_capacity(common::CAPACITY);
    let keys: Vec<_> = (0..1024u32).map(key).collect();
    for k in &keys {
        cache.set(k, &[7u8; VALUE_LEN]);
    }
    let mut i = 0usize;
    group.bench_function(C::NAME, |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(cache.get(black_box(&keys[i])))
        })
    });
}

fn benches(c: &mut Criterion) {
    let traces = Arc::new(vec![zipf_trace(TRACE_LEN, 1), zipf_trace(TRACE_LEN, 2)]);
    for (threads, name) in [(1, "throughput_1_thread"), (2, "throughput_2_threads")] {
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Elements(OPS_PER_ITER as u64));
        group.measurement_time(Duration::from_secs(5));
        throughput::<Cache>(&mut group, threads, &traces);
        throughput::<SieveCache>(&mut group, threads, &traces);
        throughput::<QuickCache>(&mut group, threads, &traces);
        throughput::<Moka>(&mut group, threads, &traces);
        throughput::<LruMutex>(&mut group, threads, &traces);
        group.finish();
    }
    let mut group = c.benchmark_group("get_hit");
    get_hit::<Cache>(&mut group);
    get_hit::<SieveCache>(&mut group);
    get_hit::<QuickCache>(&mut group);
    get_hit::<Moka>(&mut group);
    get_hit::<LruMutex>(&mut group);
    group.finish();
}

criterion_group!(engine, benches);
criterion_main!(engine);
