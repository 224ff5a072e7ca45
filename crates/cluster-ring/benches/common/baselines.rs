//! The placement baselines the ring is compared with, shared by `benches/ring.rs` and
//! `examples/rebalance.rs` (included with `#[path]`, so there is one copy).

/// Jump consistent hash (Lamping & Veach, 2014): a bucket in `0..buckets` for `key`.
/// Tiny and perfectly balanced, but it can only add or remove the *last* bucket.
pub(crate) fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}
