//! Ring lookups against the two usual alternatives, in the same run:
//! `cargo xtask bench ring` (prints ratios) or `cargo bench -p cluster-ring --bench ring`.
//!
//! Every variant hashes the same 16-byte key with the same xxh3 [`key_hash`], so the
//! comparison is of the placement step plus hashing. `mod_n` and `jump_hash` are the
//! baselines: cheaper, but they move most keys (`% N`) or cannot remove an arbitrary member
//! (jump).

use std::hint::black_box;

use cluster_ring::{DEFAULT_VNODES_PER_WEIGHT, Member, NodeId, Ring, key_hash};
use criterion::{Criterion, criterion_group, criterion_main};

fn members(n: usize) -> Vec<Member> {
    (0..n)
        .map(|i| Member::new(NodeId::new(format!("node-{i}")).expect("valid id"), 1))
        .collect()
}

#[path = "common/baselines.rs"]
mod baselines;
use baselines::jump_hash;

fn benches(c: &mut Criterion) {
    let keys: Vec<[u8; 16]> = (0..4096u64)
        .map(|i| {
            let mut k = [0u8; 16];
            k[..8].copy_from_slice(&i.to_le_bytes());
            k[8..].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
            k
        })
        .collect();
    for n in [10usize, 100] {
        let ring = Ring::new(members(n), DEFAULT_VNODES_PER_WEIGHT).expect("valid ring");
        let mut group = c.benchmark_group(format!("lookup_{n}_members"));
        let mut i = 0usize;
        let mut next = || {
            i = (i + 1) & 4095;
            &keys[i]
        };
        group.bench_function("ring_owner", |b| {
            b.iter(|| black_box(ring.owner(black_box(next())).weight))
        });
        group.bench_function("ring_replicas_3", |b| {
            b.iter(|| black_box(ring.replicas(black_box(next()), 3).len()))
        });
        // The same placement without allocating (what the node's request path uses).
        group.bench_function("ring_replica_set_3", |b| {
            b.iter(|| black_box(ring.replica_set(black_box(next()), 3).len()))
        });
        group.bench_function("mod_n", |b| {
            b.iter(|| black_box(key_hash(black_box(next())) % n as u64))
        });
        group.bench_function("jump_hash", |b| {
            b.iter(|| black_box(jump_hash(key_hash(black_box(next())), n as u32)))
        });
        group.finish();
    }
    let mut group = c.benchmark_group("build");
    for n in [10usize, 100] {
        let m = members(n);
        group.bench_function(format!("ring_{n}_members"), |b| {
            b.iter(|| {
                black_box(
                    Ring::new(m.clone(), DEFAULT_VNODES_PER_WEIGHT)
                        .expect("valid ring")
                        .point_count(),
                )
            })
        });
    }
    group.finish();
}

criterion_group!(ring, benches);
criterion_main!(ring);
