//! Unit tests of the engine: a model-based property test against a simple reference
//! implementation, edge cases, the reaper, scans, and a multi-threaded stress test. Every
//! test calls `validate()` after its steps.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use crate::{
    Cache, CacheConfig, Condition, ConfigError, DeleteOutcome, ENTRY_OVERHEAD, EvictionPolicy,
    InsertError, ManualClock, ScanCursor, Ttl, WriteOptions, WriteOutcome,
};

use crate::model::{self, Op, START_MS, Setup, manual_cache};

// ----- the model test (the model itself is in `model.rs`) -----------------------------------

fn run_model(
    ops: Vec<Op>,
    shards: usize,
    per_shard: u64,
    max_items: Option<u64>,
    evict: bool,
    policy: EvictionPolicy,
) -> Result<(), TestCaseError> {
    let setup = Setup {
        shards,
        per_shard,
        max_items,
        evict,
        policy,
    };
    model::run(&ops, setup).map_err(TestCaseError::fail)
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let key = 0u8..12;
    let ttl = prop::option::of(0u64..50);
    let condition = prop_oneof![
        Just(Condition::Always),
        Just(Condition::IfAbsent),
        Just(Condition::IfPresent)
    ];
    prop_oneof![
        4 => key.clone().prop_map(Op::Get),
        3 => (key.clone(), 0usize..300, ttl.clone()).prop_map(|(key, len, ttl)| Op::Set { key, len, ttl }),
        3 => (key.clone(), 0usize..300, 0u64..6, ttl.clone(), condition)
            .prop_map(|(key, len, version, ttl, condition)| Op::VersionedSet { key, len, version, ttl, condition }),
        1 => key.clone().prop_map(Op::Delete),
        2 => (key.clone(), 0u64..6).prop_map(|(key, version)| Op::VersionedDelete { key, version }),
        1 => (key, prop::option::of(0u64..50)).prop_map(|(key, ttl)| Op::Touch { key, ttl }),
        2 => (1u64..40).prop_map(Op::Advance),
        1 => Just(Op::Reap),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// One shard, room for a handful of entries: exact LRU order, eviction, TTLs, versions.
    #[test]
    fn engine_matches_model_one_shard(ops in prop::collection::vec(op_strategy(), 1..120)) {
        run_model(ops, 1, 4 * (ENTRY_OVERHEAD as u64 + 150), None, true, EvictionPolicy::Lru)?;
    }

    /// Two shards with an item cap as well as a byte cap.
    #[test]
    fn engine_matches_model_two_shards_item_cap(ops in prop::collection::vec(op_strategy(), 1..120)) {
        run_model(ops, 2, 3 * (ENTRY_OVERHEAD as u64 + 150), Some(6), true, EvictionPolicy::Lru)?;
    }

    /// SIEVE on one shard: the same semantics, SIEVE's victims (hand, visited bits).
    #[test]
    fn engine_matches_model_sieve_one_shard(ops in prop::collection::vec(op_strategy(), 1..160)) {
        run_model(ops, 1, 4 * (ENTRY_OVERHEAD as u64 + 150), None, true, EvictionPolicy::Sieve)?;
    }

    /// SIEVE on two shards with an item cap as well as a byte cap.
    #[test]
    fn engine_matches_model_sieve_two_shards_item_cap(ops in prop::collection::vec(op_strategy(), 1..160)) {
        run_model(ops, 2, 3 * (ENTRY_OVERHEAD as u64 + 150), Some(6), true, EvictionPolicy::Sieve)?;
    }

    /// The fuzz target's input path on stable (what `fuzz/fuzz_targets/engine_model.rs`
    /// does with libFuzzer's bytes): one setup byte, then three bytes per operation.
    #[test]
    fn engine_matches_model_on_decoded_bytes(data in prop::collection::vec(any::<u8>(), 1..600)) {
        let ops = Op::decode_all(&data[1..]);
        model::run(&ops, Setup::decode(data[0])).map_err(TestCaseError::fail)?;
    }

    /// Eviction disabled: full shards refuse writes with `OutOfMemory` and lose nothing.
    #[test]
    fn engine_matches_model_without_eviction(ops in prop::collection::vec(op_strategy(), 1..120)) {
        run_model(ops, 1, 3 * (ENTRY_OVERHEAD as u64 + 150), None, false, EvictionPolicy::Lru)?;
    }
}

// ----- edge cases -------------------------------------------------------------------------

fn small_cache(per_shard_entries: u64) -> (Cache<ManualClock>, ManualClock) {
    manual_cache(
        CacheConfig::new()
            .with_shards(1)
            .with_max_bytes(per_shard_entries * crate::entry_charge(1, 1)),
    )
}

#[test]
fn empty_key_and_empty_value_are_ordinary_entries() {
    let (cache, _) = small_cache(8);
    cache.set(b"", b"empty key").expect("fits");
    cache.set(b"empty value", b"").expect("fits");
    assert_eq!(cache.get(b"").as_deref(), Some(&b"empty key"[..]));
    assert_eq!(cache.get(b"empty value").as_deref(), Some(&b""[..]));
    assert_eq!(cache.len(), 2);
    cache.validate().expect("valid");
}

#[test]
fn entry_larger_than_a_shard_is_refused_and_changes_nothing() {
    let (cache, _) = small_cache(4);
    cache.set(b"a", b"1").expect("fits");
    let huge = vec![0u8; 4 * (ENTRY_OVERHEAD + 16)];
    let err = cache.set(b"huge", &huge).expect_err("cannot fit");
    assert!(matches!(err, InsertError::EntryTooLarge { .. }), "{err}");
    assert_eq!(cache.get(b"a").as_deref(), Some(&b"1"[..]));
    assert_eq!(cache.len(), 1);
    cache.validate().expect("valid");
}

#[test]
fn capacity_of_exactly_one_entry_keeps_the_newest() {
    let per_entry = crate::entry_charge(1, 1);
    let (cache, _) = manual_cache(CacheConfig::new().with_shards(1).with_max_bytes(per_entry));
    cache.set(b"a", b"1").expect("fits");
    cache.set(b"b", b"2").expect("fits");
    assert_eq!(cache.get(b"a"), None);
    assert_eq!(cache.get(b"b").as_deref(), Some(&b"2"[..]));
    assert_eq!(cache.stats().evictions, 1);
    cache.validate().expect("valid");
}

#[test]
fn lru_evicts_the_least_recently_used() {
    let (cache, _) = small_cache(3);
    for k in [b"a", b"b", b"c"] {
        cache.set(k, b"v").expect("fits");
    }
    assert!(cache.get(b"a").is_some()); // a is now the most recent; b is the LRU
    cache.set(b"d", b"v").expect("fits");
    assert_eq!(cache.get(b"b"), None);
    assert!(cache.get(b"a").is_some() && cache.get(b"c").is_some() && cache.get(b"d").is_some());
    cache.validate().expect("valid");
}

/// The difference between the policies on a one-off scan: LRU lets the scan flush a key that
/// was just read; SIEVE keeps it (its visited bit buys it one pass of the hand) and evicts the
/// scan's keys, which nobody read.
#[test]
fn sieve_keeps_a_read_key_through_a_scan_that_flushes_lru() {
    for (policy, kept) in [(EvictionPolicy::Lru, false), (EvictionPolicy::Sieve, true)] {
        let (cache, _) = manual_cache(
            CacheConfig::new()
                .with_shards(1)
                .with_eviction_policy(policy)
                .with_max_bytes(4 * crate::entry_charge(2, 1)),
        );
        for k in [b"a", b"b", b"c", b"d"] {
            cache.set(k, b"v").expect("fits");
        }
        assert!(cache.get(b"a").is_some());
        for i in 0..6u8 {
            cache.set(&[b's', i], b"v").expect("fits");
            cache.validate().expect("valid");
        }
        assert_eq!(
            cache.get(b"a").is_some(),
            kept,
            "{policy}: the read key after a scan"
        );
        assert_eq!(cache.len(), 4, "{policy}");
        // The scan's newest key is always there (it is being written when room is made).
        assert!(cache.get(&[b's', 5]).is_some(), "{policy}");
    }
}

#[test]
fn eviction_policies_parse_from_their_names() {
    assert_eq!("lru".parse::<EvictionPolicy>(), Ok(EvictionPolicy::Lru));
    assert_eq!("SIEVE".parse::<EvictionPolicy>(), Ok(EvictionPolicy::Sieve));
    assert!(
        "arc"
            .parse::<EvictionPolicy>()
            .unwrap_err()
            .contains("unknown eviction policy")
    );
    assert_eq!(EvictionPolicy::Sieve.to_string(), "sieve");
}

#[test]
fn zero_ttl_and_ttl_in_the_past_delete_the_key() {
    let (cache, clock) = small_cache(8);
    cache.set(b"k", b"v").expect("fits");
    cache
        .set_with_ttl(b"k", b"v2", Duration::ZERO)
        .expect("fits");
    assert_eq!(cache.get(b"k"), None);
    cache.set(b"k", b"v").expect("fits");
    let past = crate::Clock::now_ms(&clock) - 1;
    assert_eq!(
        cache.write(b"k", b"v3", WriteOptions::default().expires_at(past)),
        Ok(WriteOutcome::Stored)
    );
    assert_eq!(cache.get(b"k"), None);
    assert_eq!(cache.len(), 0);
    cache.validate().expect("valid");
}

#[test]
fn ttl_expires_exactly_at_the_deadline() {
    let (cache, clock) = small_cache(8);
    cache
        .set_with_ttl(b"k", b"v", Duration::from_millis(100))
        .expect("fits");
    assert_eq!(
        cache.ttl(b"k"),
        Some(Ttl::Remaining(Duration::from_millis(100)))
    );
    clock.advance_ms(99);
    assert!(cache.get(b"k").is_some());
    clock.advance_ms(1);
    assert_eq!(cache.get(b"k"), None);
    assert_eq!(cache.stats().expirations, 1);
    assert_eq!(cache.ttl(b"k"), None);
    cache.validate().expect("valid");
}

/// Expiries are stored in 41 bits (see `shard.rs`): exact to the millisecond for decades,
/// then to the second (never earlier than asked), and absurd ones at the far limit.
#[test]
fn far_expiries_keep_their_time() {
    let (cache, clock) = small_cache(8);
    let now = crate::Clock::now_ms(&clock);
    let year_ms = 365 * 24 * 3_600_000u64;
    let write = |key: &[u8], at: u64| {
        let opts = WriteOptions {
            expires_at: Some(at),
            ..WriteOptions::default()
        };
        assert_eq!(cache.write(key, b"v", opts), Ok(WriteOutcome::Stored));
        cache
            .get_entry(key)
            .expect("stored")
            .expires_at
            .expect("expiry")
    };
    // Milliseconds: exact.
    for at in [now + 1, now + 10 * year_ms + 123] {
        assert_eq!(write(b"ms", at), at);
    }
    // Seconds: rounded up by less than a second.
    for at in [now + 30 * year_ms + 1, now + 1_000 * year_ms + 999] {
        let stored = write(b"s", at);
        assert!(
            stored >= at && stored - at < 1_000,
            "{at} stored as {stored}"
        );
    }
    // The far limit: still thousands of years away, still an expiry.
    let stored = write(b"far", u64::MAX - 1);
    assert!(
        stored > now + 30_000 * year_ms && stored < u64::MAX,
        "{stored}"
    );
    clock.advance_ms(20 * year_ms);
    assert!(cache.get(b"ms").is_none());
    assert!(cache.get(b"s").is_some() && cache.get(b"far").is_some());
    cache.validate().expect("valid");
}

#[test]
fn expire_and_persist_change_the_ttl() {
    let (cache, clock) = small_cache(8);
    cache.set(b"k", b"v").expect("fits");
    assert_eq!(cache.ttl(b"k"), Some(Ttl::Never));
    assert!(cache.expire(b"k", Duration::from_secs(5)));
    assert_eq!(
        cache.ttl(b"k"),
        Some(Ttl::Remaining(Duration::from_secs(5)))
    );
    assert!(cache.persist(b"k"));
    clock.advance_ms(10_000);
    assert_eq!(cache.ttl(b"k"), Some(Ttl::Never));
    assert!(!cache.expire(b"missing", Duration::from_secs(1)));
    cache.validate().expect("valid");
}

#[test]
fn version_ties_apply_and_older_versions_are_stale() {
    let (cache, _) = small_cache(8);
    assert_eq!(
        cache.write(b"k", b"a", WriteOptions::versioned(5)),
        Ok(WriteOutcome::Stored)
    );
    // The same version again is the same write delivered twice: applying it is harmless.
    assert_eq!(
        cache.write(b"k", b"a", WriteOptions::versioned(5)),
        Ok(WriteOutcome::Stored)
    );
    assert_eq!(
        cache.write(b"k", b"old", WriteOptions::versioned(4)),
        Ok(WriteOutcome::Stale)
    );
    assert_eq!(cache.delete_versioned(b"k", 4), DeleteOutcome::Stale);
    assert_eq!(
        cache.get_entry(b"k").map(|l| (l.value, l.version)),
        Some((bytes::Bytes::from_static(b"a"), 5))
    );
    assert_eq!(cache.stats().stale_writes, 2);
    // An unversioned write is unconditional.
    cache.set(b"k", b"plain").expect("fits");
    assert_eq!(cache.get_entry(b"k").map(|l| l.version), Some(0));
    cache.validate().expect("valid");
}

#[test]
fn tombstone_blocks_older_writes_until_it_expires() {
    let (cache, clock) = manual_cache(
        CacheConfig::new()
            .with_shards(1)
            .with_max_bytes(1 << 20)
            .with_tombstone_ttl(Duration::from_secs(10)),
    );
    // A delete that arrives before the write it follows (reordered replication).
    assert_eq!(cache.delete_versioned(b"k", 7), DeleteOutcome::NotFound);
    assert_eq!(
        cache.write(b"k", b"v", WriteOptions::versioned(6)),
        Ok(WriteOutcome::Stale)
    );
    assert_eq!(cache.get(b"k"), None);
    assert_eq!(cache.stats().tombstones, 1);
    assert!(
        cache.bytes_used() > 0,
        "tombstones are charged to the budget"
    );
    clock.advance_ms(10_000);
    assert_eq!(cache.reap(64).reclaimed, 1);
    assert_eq!(cache.stats().tombstones, 0);
    assert_eq!(cache.bytes_used(), 0);
    cache.validate().expect("valid");
}

#[test]
fn conditional_writes() {
    let (cache, _) = small_cache(8);
    let nx = WriteOptions::default().condition(Condition::IfAbsent);
    let xx = WriteOptions::default().condition(Condition::IfPresent);
    assert_eq!(
        cache.write(b"k", b"1", xx),
        Ok(WriteOutcome::ConditionNotMet)
    );
    assert_eq!(cache.write(b"k", b"1", nx), Ok(WriteOutcome::Stored));
    assert_eq!(
        cache.write(b"k", b"2", nx),
        Ok(WriteOutcome::ConditionNotMet)
    );
    assert_eq!(cache.write(b"k", b"3", xx), Ok(WriteOutcome::Stored));
    assert_eq!(cache.get(b"k").as_deref(), Some(&b"3"[..]));
}

#[test]
fn eviction_disabled_refuses_instead_of_dropping() {
    let (cache, _) = manual_cache(
        CacheConfig::new()
            .with_shards(1)
            .with_max_bytes(2 * crate::entry_charge(1, 1))
            .with_eviction(false),
    );
    cache.set(b"a", b"1").expect("fits");
    cache.set(b"b", b"2").expect("fits");
    assert!(matches!(
        cache.set(b"c", b"3"),
        Err(InsertError::OutOfMemory { .. })
    ));
    assert!(cache.get(b"a").is_some() && cache.get(b"b").is_some());
    // Replacing with a value of the same size still works.
    cache.set(b"a", b"9").expect("same size fits");
    cache.validate().expect("valid");
}

#[test]
fn bad_configs_are_errors() {
    assert_eq!(
        Cache::new(CacheConfig::new().with_shards(3)).err(),
        Some(ConfigError::Shards(3))
    );
    assert!(matches!(
        Cache::new(CacheConfig::new().with_shards(4).with_max_bytes(2)).err(),
        Some(ConfigError::MaxBytesTooSmall { .. })
    ));
    assert_eq!(
        Cache::new(CacheConfig::new().with_max_items(Some(0))).err(),
        Some(ConfigError::ZeroMaxItems)
    );
    // A shard addresses at most MAX_SHARD_BYTES: too few shards for the budget is an error,
    // and the automatic shard count grows to fit it.
    assert!(matches!(
        CacheConfig::new()
            .with_shards(2)
            .with_max_bytes(3 * crate::MAX_SHARD_BYTES)
            .validate(),
        Err(ConfigError::ShardTooLarge { shards: 2, .. })
    ));
    let huge = CacheConfig::new().with_max_bytes(1 << 50);
    assert!(huge.resolved_shards() >= (1 << 50) / crate::MAX_SHARD_BYTES as usize);
    assert_eq!(huge.validate(), Ok(()));
}

/// A large value (over 1 KiB with its key) is its own buffer and every hit shares it; a small
/// one lives in the arena and every hit is a copy of its bytes.
#[test]
fn large_hits_share_the_stored_buffer_and_small_hits_copy() {
    let (cache, _) = manual_cache(CacheConfig::new().with_shards(1).with_max_bytes(1 << 20));
    let big = vec![7u8; 4096];
    cache.set(b"big", &big).expect("fits");
    cache.set(b"small", b"value").expect("fits");
    let (a, b) = (
        cache.get(b"big").expect("hit"),
        cache.get(b"big").expect("hit"),
    );
    assert_eq!(
        a.as_ptr(),
        b.as_ptr(),
        "both hits point into the same buffer"
    );
    assert_eq!(a, big);
    let (a, b) = (
        cache.get(b"small").expect("hit"),
        cache.get(b"small").expect("hit"),
    );
    assert_ne!(a.as_ptr(), b.as_ptr(), "each small hit is its own copy");
    assert_eq!(a, &b"value"[..]);
    cache.validate().expect("valid");
}

#[test]
fn clear_and_stats() {
    let (cache, _) = small_cache(8);
    cache.set(b"a", b"1").expect("fits");
    cache.set(b"a", b"2").expect("fits");
    assert!(cache.get(b"a").is_some());
    assert!(cache.get(b"zz").is_none());
    let st = cache.stats();
    assert_eq!(
        (st.inserts, st.updates, st.hits, st.misses, st.items),
        (1, 1, 1, 1, 1)
    );
    assert_eq!(st.bytes, crate::entry_charge(1, 1));
    assert!(st.bytes <= (1 + 1 + ENTRY_OVERHEAD) as u64);
    cache.clear();
    assert!(cache.is_empty());
    assert_eq!(cache.bytes_used(), 0);
    cache.validate().expect("valid");
}

// ----- reaper and scan --------------------------------------------------------------------

#[test]
fn reaper_reclaims_every_expired_entry_in_bounded_steps() {
    let (cache, clock) = manual_cache(CacheConfig::new().with_shards(4).with_max_bytes(64 << 20));
    for i in 0..10_000u32 {
        let ttl = if i % 2 == 0 {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(100)
        };
        cache
            .set_with_ttl(&i.to_be_bytes(), b"v", ttl)
            .expect("fits");
    }
    cache.set(b"forever", b"v").expect("fits");
    clock.advance_ms(1_000);
    let budget = 100;
    let report = cache.reap(budget);
    assert_eq!(report.reclaimed, 5_000);
    assert!(
        report.steps >= 10_001 / budget,
        "work was split into steps of at most {budget} chunks"
    );
    assert_eq!(cache.len(), 5_001);
    assert_eq!(cache.stats().expirations, 5_000);
    cache.validate().expect("valid");
    // Each single step respects the budget.
    clock.advance_ms(100_000);
    for shard in 0..cache.shard_count() {
        let step = cache.reap_step(shard, 7);
        assert!(step.visited <= 7);
    }
    cache.reap(budget);
    assert_eq!(cache.len(), 1);
    cache.validate().expect("valid");
}

#[test]
fn background_reaper_runs_and_stops_on_drop() {
    let clock = ManualClock::new(START_MS);
    let cache = Arc::new(
        Cache::with_clock(CacheConfig::new().with_max_bytes(8 << 20), clock.clone())
            .expect("valid"),
    );
    for i in 0..1_000u32 {
        cache
            .set_with_ttl(&i.to_be_bytes(), b"v", Duration::from_millis(10))
            .expect("fits");
    }
    clock.advance_ms(10);
    let reaper = crate::Reaper::spawn(&cache, Duration::from_millis(1), 64).expect("thread");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cache.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "reaper did not reclaim within the deadline"
        );
        std::thread::yield_now();
    }
    drop(reaper); // joins: the test would hang here if the thread ignored the stop request
    assert_eq!(cache.bytes_used(), 0);
    cache.validate().expect("valid");
}

#[test]
fn scan_returns_each_live_entry_once_in_bounded_chunks() {
    let (cache, clock) = manual_cache(CacheConfig::new().with_shards(4).with_max_bytes(64 << 20));
    for i in 0..1_000u32 {
        cache.set(&i.to_be_bytes(), &i.to_le_bytes()).expect("fits");
    }
    cache
        .set_with_ttl(b"expired", b"v", Duration::from_millis(1))
        .expect("fits");
    let _ = cache.delete_versioned(b"tomb", 1);
    clock.advance_ms(1);
    let mut seen = HashMap::new();
    let mut cursor = Some(ScanCursor::default());
    while let Some(c) = cursor {
        let (entries, next) = cache.scan(c, 64);
        assert!(entries.len() <= 64);
        for e in entries {
            assert!(
                seen.insert(e.key.to_vec(), e.value.to_vec()).is_none(),
                "entry returned twice"
            );
        }
        cursor = next;
    }
    assert_eq!(seen.len(), 1_000);
    for i in 0..1_000u32 {
        assert_eq!(seen[&i.to_be_bytes().to_vec()], i.to_le_bytes().to_vec());
    }
}

#[test]
fn a_scan_cursor_survives_a_round_trip_through_a_number_and_any_number_is_safe() {
    let cache = Cache::new(CacheConfig::new().with_shards(4).with_max_bytes(64 << 20)).unwrap();
    for i in 0..500u32 {
        cache.set(&i.to_be_bytes(), b"v").expect("fits");
    }
    let (mut seen, mut raw) = (std::collections::HashSet::new(), 0u64);
    loop {
        let (entries, next) = cache.scan(ScanCursor::from_u64(raw), 16);
        seen.extend(entries.into_iter().map(|e| e.key));
        match next {
            Some(c) => {
                raw = c.to_u64();
                assert_ne!(raw, 0, "0 means the start");
            }
            None => break,
        }
    }
    assert_eq!(seen.len(), 500);
    for raw in [u64::MAX, 1 << 48, 3 << 48 | 0xffff_ffff, 0xffff_ffff_ffff] {
        let (_, next) = cache.scan(ScanCursor::from_u64(raw), 16);
        if let Some(c) = next {
            // Resumes within the cache, never past it.
            assert!(c.to_u64() > 0);
        }
    }
}

// ----- the arena under churn ---------------------------------------------------------------

/// The value stored for key `k` at write number `n`: its bytes say which write made them, so
/// a hit that returns another entry's bytes (a chunk moved to the wrong owner) is caught.
fn churn_value(k: u64, n: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let stamp = (k << 32 | n).to_le_bytes();
    while v.len() < len {
        v.push(stamp[v.len() % 8]);
    }
    v
}

/// Many sizes (every arena class and large entries), overwrites that change class, deletes
/// and evictions: pages are given back and chunks moved, and through it all every hit returns
/// exactly the bytes last written for its key and `validate()` (owners, chunk accounting,
/// pages within two of what is live) holds. With eviction off, nothing is lost either.
#[test]
fn arena_churn_moves_chunks_without_losing_or_mixing_bytes() {
    for evict in [false, true] {
        let max_bytes = if evict { 256 << 10 } else { 64 << 20 };
        let (cache, _) = manual_cache(
            CacheConfig::new()
                .with_shards(1)
                .with_max_bytes(max_bytes)
                .with_eviction(evict),
        );
        let mut last: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for n in 0..60_000u64 {
            let r = next();
            let k = r % 3_000;
            let key = k.to_be_bytes();
            match r >> 60 {
                0..=2 => {
                    cache.delete(&key);
                    last.remove(&k);
                }
                3..=9 => {
                    // Mostly small, now and then up to 1.5 KiB (large above ~1 KiB).
                    let len = if r >> 56 & 7 == 0 {
                        (r >> 20) as usize % 1_500
                    } else {
                        (r >> 20) as usize % 120
                    };
                    let v = churn_value(k, n, len);
                    cache.set(&key, &v).expect("set");
                    last.insert(k, v);
                }
                _ => match cache.get(&key) {
                    Some(got) => assert_eq!(
                        Some(got.as_ref()),
                        last.get(&k).map(Vec::as_slice),
                        "evict={evict} step {n}: key {k}"
                    ),
                    None => {
                        assert!(evict || !last.contains_key(&k), "step {n}: key {k} lost");
                        last.remove(&k);
                    }
                },
            }
            if n % 2_000 == 0 {
                cache.validate().expect("valid");
            }
        }
        cache.validate().expect("valid");
        for (k, v) in &last {
            match cache.get(&k.to_be_bytes()) {
                Some(got) => assert_eq!(got.as_ref(), v.as_slice(), "key {k}"),
                None => assert!(evict, "key {k} lost"),
            }
        }
        // The promised bound: charges, plus under two and a half pages per size class, and
        // the index's load factor.
        let (footprint, used) = (cache.footprint(), cache.bytes_used());
        let slack = 27 * 5 * crate::arena::PAGE_SIZE as u64 / 2 + used / 4;
        assert!(
            footprint <= used + slack,
            "evict={evict}: footprint {footprint} for {used} charged"
        );
    }
}

// ----- concurrency ------------------------------------------------------------------------

#[test]
fn concurrent_stress_keeps_every_invariant() {
    let cache = Arc::new(
        Cache::new(
            CacheConfig::new()
                .with_shards(4)
                .with_max_bytes(200 * (ENTRY_OVERHEAD as u64 + 64)),
        )
        .expect("valid"),
    );
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ t;
                for i in 0..50_000u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let key = (x % 500).to_be_bytes();
                    match x % 10 {
                        0..=4 => {
                            let _ = cache.get(&key);
                        }
                        5 | 6 => cache
                            .set(&key, &vec![t as u8; (x % 64) as usize])
                            .expect("fits"),
                        7 => {
                            let _ = cache.write(&key, b"v", WriteOptions::versioned(i));
                        }
                        8 => {
                            let _ = cache.delete_versioned(&key, i);
                        }
                        _ => {
                            let _ = cache.expire(&key, Duration::from_millis(x % 3));
                            if i % 100 == 0 {
                                cache.reap(16);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("worker panicked");
    }
    cache
        .validate()
        .expect("invariants hold after concurrent use");
    assert!(cache.bytes_used() <= cache.config().max_bytes);
}

#[test]
fn versioned_reads_report_tombstones_and_expiries_with_their_versions() {
    let config = CacheConfig::new()
        .with_max_bytes(1 << 20)
        .with_shards(1)
        .with_tombstone_ttl(Duration::from_millis(100));
    let (cache, clock) = manual_cache(config);
    assert_eq!(cache.get_versioned(b"k"), None);
    let _ = cache.write(b"k", b"v", WriteOptions::versioned(5));
    assert!(
        matches!(cache.get_versioned(b"k"), Some(crate::VersionedRead::Live(l)) if l.version == 5)
    );
    let _ = cache.delete_versioned(b"k", 6);
    assert_eq!(
        cache.get_versioned(b"k"),
        Some(crate::VersionedRead::Dead { version: 6 })
    );

    // An expired versioned value is a tombstone at its version for tombstone_ttl, so an older
    // replicated write (which the expired one superseded) cannot bring the key back.
    let _ = cache.write(
        b"e",
        b"v",
        WriteOptions::versioned(9).expires_at(START_MS + 10),
    );
    clock.advance_ms(10);
    assert_eq!(cache.get(b"e"), None);
    assert_eq!(
        cache.get_versioned(b"e"),
        Some(crate::VersionedRead::Dead { version: 9 })
    );
    assert_eq!(
        cache.write(b"e", b"older", WriteOptions::versioned(8)),
        Ok(WriteOutcome::Stale)
    );
    assert_eq!(cache.stats().tombstones, 2);
    cache.validate().expect("valid");
    // The reaper frees it once the grace is over; then nothing is known.
    clock.advance_ms(100);
    let _ = cache.reap(1024);
    assert_eq!(cache.get_versioned(b"e"), None);
    assert_eq!(cache.stats().tombstones, 0);
    // Unversioned values simply go when they expire.
    cache
        .set_with_ttl(b"u", b"v", Duration::from_millis(5))
        .expect("fits");
    clock.advance_ms(5);
    assert_eq!(cache.get_versioned(b"u"), None);
    cache.validate().expect("valid");
}

#[test]
fn reaper_turns_expired_versioned_values_into_tombstones() {
    let config = CacheConfig::new()
        .with_max_bytes(1 << 20)
        .with_shards(1)
        .with_tombstone_ttl(Duration::from_millis(100));
    let (cache, clock) = manual_cache(config);
    let _ = cache.write(
        b"e",
        &[7u8; 1000],
        WriteOptions::versioned(3).expires_at(START_MS + 1),
    );
    let before = cache.bytes_used();
    clock.advance_ms(2);
    let report = cache.reap(1024);
    assert_eq!(report.reclaimed, 1);
    assert!(
        cache.bytes_used() + 1000 <= before,
        "the value's bytes are freed"
    );
    assert_eq!(cache.len(), 0);
    assert_eq!(
        cache.get_versioned(b"e"),
        Some(crate::VersionedRead::Dead { version: 3 })
    );
    cache.validate().expect("valid");
}

#[test]
fn versioned_touch_is_atomic_and_respects_versions() {
    let (cache, _) = small_cache(8);
    assert_eq!(
        cache.touch_versioned(b"k", Some(START_MS + 500), 4),
        crate::TouchOutcome::NotFound
    );
    let _ = cache.write(b"k", b"v", WriteOptions::versioned(5));
    assert_eq!(
        cache.touch_versioned(b"k", None, 4),
        crate::TouchOutcome::Stale
    );
    match cache.touch_versioned(b"k", Some(START_MS + 500), 7) {
        crate::TouchOutcome::Touched(l) => {
            assert_eq!(
                (l.value.as_ref(), l.version, l.expires_at),
                (&b"v"[..], 7, Some(START_MS + 500))
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        cache.get_entry(b"k").map(|l| (l.version, l.expires_at)),
        Some((7, Some(START_MS + 500)))
    );
    // Into the past: a versioned delete.
    assert_eq!(
        cache.touch_versioned(b"k", Some(START_MS - 1), 8),
        crate::TouchOutcome::Deleted
    );
    assert_eq!(
        cache.get_versioned(b"k"),
        Some(crate::VersionedRead::Dead { version: 8 })
    );
    cache.validate().expect("valid");
}

#[test]
fn scan_versions_lists_what_get_versioned_would_answer() {
    let config = CacheConfig::new()
        .with_max_bytes(1 << 20)
        .with_shards(4)
        .with_tombstone_ttl(Duration::from_millis(100));
    let (cache, clock) = manual_cache(config);
    let _ = cache.write(b"live", b"v", WriteOptions::versioned(5));
    let _ = cache.write(b"dead", b"v", WriteOptions::versioned(6));
    let _ = cache.delete_versioned(b"dead", 7);
    let _ = cache.write(
        b"expiring",
        b"v",
        WriteOptions::versioned(8).expires_at(START_MS + 10),
    );
    cache.set(b"unversioned", b"v").expect("fits");
    let all = |cache: &Cache<ManualClock>| {
        let (mut seen, mut scan) = (Vec::new(), cache.scanner());
        while let Some(chunk) = scan.versions(1) {
            seen.extend(chunk);
        }
        let mut seen: Vec<(Vec<u8>, u64, bool)> = seen
            .into_iter()
            .map(|kv| (kv.key.to_vec(), kv.version, kv.live))
            .collect();
        seen.sort();
        seen
    };
    assert_eq!(
        all(&cache),
        vec![
            (b"dead".to_vec(), 7, false),
            (b"expiring".to_vec(), 8, true),
            (b"live".to_vec(), 5, true),
        ]
    );
    // Expired: dead at its version (as get_versioned says), without settling anything.
    clock.advance_ms(10);
    assert_eq!(
        all(&cache),
        vec![
            (b"dead".to_vec(), 7, false),
            (b"expiring".to_vec(), 8, false),
            (b"live".to_vec(), 5, true),
        ]
    );
    for (key, version, live) in all(&cache) {
        let read = cache.get_versioned(&key).expect("listed keys are known");
        assert_eq!(read.version(), version);
        assert_eq!(matches!(read, crate::VersionedRead::Live(_)), live);
    }
    // Past the tombstone time both are gone.
    clock.advance_ms(200);
    assert_eq!(all(&cache), vec![(b"live".to_vec(), 5, true)]);
    cache.validate().expect("valid");
}

// ----- complete scans ----------------------------------------------------------------------

/// One step of the scan-completeness test, interleaved with the scan's own steps.
#[derive(Debug, Clone)]
enum ChurnOp {
    /// Delete churn key `i` (frees a chunk; enough of them give a page back).
    Delete(usize),
    /// (Re)insert churn key `i` with a value of `len` bytes.
    Insert(usize, usize),
    /// Rewrite kept key `i` with a value of `len` bytes (possibly into another size class).
    Rewrite(usize, usize),
    /// Give churn key `i` a TTL of 1 ms, then let the clock pass it and reap a step.
    Expire(usize),
    /// Advance the scan by one step of `budget` chunks.
    Scan(usize),
}

const SCAN_KEPT: usize = 60;
const SCAN_CHURN: usize = 400;

fn churn_op_strategy() -> impl Strategy<Value = ChurnOp> {
    // Lengths cross size classes, small and large (inline up to 1 000 bytes, shared above).
    let len = prop_oneof![4 => 0usize..120, 2 => 120usize..1_100, 1 => 1_000usize..3_000];
    prop_oneof![
        5 => (0..SCAN_CHURN).prop_map(ChurnOp::Delete),
        2 => (0..SCAN_CHURN, len.clone()).prop_map(|(i, l)| ChurnOp::Insert(i, l)),
        3 => (0..SCAN_KEPT, len).prop_map(|(i, l)| ChurnOp::Rewrite(i, l)),
        1 => (0..SCAN_CHURN).prop_map(ChurnOp::Expire),
        3 => (1usize..40).prop_map(ChurnOp::Scan),
    ]
}

/// Runs `ops` against a filled cache while a complete scan is under way; returns an error
/// naming a key that was present for the whole scan but not returned.
fn check_scan_completeness(
    ops: &[ChurnOp],
    max_bytes: u64,
    policy: EvictionPolicy,
    versions: bool,
) -> Result<(), TestCaseError> {
    let config = CacheConfig::new()
        .with_shards(2)
        .with_max_bytes(max_bytes)
        .with_eviction_policy(policy);
    let (cache, clock) = manual_cache(config);
    let kept = |i: usize| format!("kept-{i}").into_bytes();
    let churn = |i: usize| format!("churn-{i}").into_bytes();
    let value = |len: usize, n: usize| vec![(n % 251) as u8; len];
    for i in 0..SCAN_CHURN {
        let _ = cache.write(&churn(i), &value(i % 90, i), WriteOptions::versioned(1));
    }
    for i in 0..SCAN_KEPT {
        let _ = cache.write(&kept(i), &value(i * 7 % 200, i), WriteOptions::versioned(1));
    }
    let present = |cache: &Cache<ManualClock>, k: &[u8]| {
        matches!(cache.peek_versioned(k), Some(crate::VersionedRead::Live(_)))
    };
    let all_keys: Vec<Vec<u8>> = (0..SCAN_KEPT)
        .map(kept)
        .chain((0..SCAN_CHURN).map(churn))
        .collect();
    let mut throughout: Vec<bool> = all_keys.iter().map(|k| present(&cache, k)).collect();
    let mut seen = std::collections::HashSet::new();
    let mut scan = cache.scanner();
    let mut done = false;
    let mut step = |scan: &mut crate::Scanner<'_, ManualClock>, budget: usize| -> bool {
        if versions {
            match scan.versions(budget) {
                Some(kvs) => {
                    seen.extend(
                        kvs.into_iter()
                            .filter(|kv| kv.live)
                            .map(|kv| kv.key.to_vec()),
                    );
                    false
                }
                None => true,
            }
        } else {
            match scan.entries(budget) {
                Some(es) => {
                    seen.extend(es.into_iter().map(|e| e.key.to_vec()));
                    false
                }
                None => true,
            }
        }
    };
    let mut n = 1u64;
    for op in ops {
        n += 1;
        match *op {
            ChurnOp::Delete(i) => {
                let _ = cache.delete_versioned(&churn(i), n);
            }
            ChurnOp::Insert(i, len) => {
                let _ = cache.write(
                    &churn(i),
                    &value(len, n as usize),
                    WriteOptions::versioned(n),
                );
            }
            ChurnOp::Rewrite(i, len) => {
                let _ = cache.write(
                    &kept(i),
                    &value(len, n as usize),
                    WriteOptions::versioned(n),
                );
            }
            ChurnOp::Expire(i) => {
                let _ = cache.touch_versioned(&churn(i), Some(START_MS), n);
                let _ = cache.reap_step(i % 2, 64);
            }
            ChurnOp::Scan(budget) => {
                if !done {
                    done = step(&mut scan, budget);
                }
            }
        }
        for (k, t) in all_keys.iter().zip(throughout.iter_mut()) {
            *t &= present(&cache, k);
        }
        cache.validate().map_err(TestCaseError::fail)?;
    }
    clock.advance_ms(0);
    while !done {
        done = step(&mut scan, 7);
    }
    drop(scan);
    for (k, t) in all_keys.iter().zip(&throughout) {
        if *t && !seen.contains(k) {
            return Err(TestCaseError::fail(format!(
                "{} was present for the whole scan and not returned",
                String::from_utf8_lossy(k)
            )));
        }
    }
    for i in 0..cache.shard_count() {
        prop_assert_eq!(
            cache.shard(i).lock().scan_log_len(),
            0,
            "the log is released"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Every entry present for the whole scan is returned, whatever deletes, rewrites across
    /// size classes, expiries and the page give-backs they cause do meanwhile (room for all:
    /// nothing is evicted).
    #[test]
    fn a_scan_returns_every_entry_present_throughout(
        ops in prop::collection::vec(churn_op_strategy(), 1..400),
        versions in any::<bool>(),
    ) {
        check_scan_completeness(&ops, 16 << 20, EvictionPolicy::Lru, versions)?;
    }

    /// The same with evictions (a cache smaller than what is written) under both policies.
    #[test]
    fn a_scan_returns_every_entry_present_throughout_while_evicting(
        ops in prop::collection::vec(churn_op_strategy(), 1..400),
        sieve in any::<bool>(),
    ) {
        let policy = if sieve { EvictionPolicy::Sieve } else { EvictionPolicy::Lru };
        check_scan_completeness(&ops, 96 << 10, policy, false)?;
    }
}

#[test]
fn a_dropped_scanner_releases_its_log() {
    let cache = Cache::new(CacheConfig::new().with_shards(1).with_max_bytes(8 << 20)).unwrap();
    for i in 0..2_000u32 {
        cache.set(&i.to_be_bytes(), b"v").expect("fits");
    }
    let mut scan = cache.scanner();
    let _ = scan.entries(10);
    for i in (0..2_000u32).filter(|i| i % 4 != 0) {
        cache.delete(&i.to_be_bytes());
    }
    assert!(
        cache.shard(0).lock().scan_log_len() > 0,
        "moves were logged"
    );
    drop(scan);
    assert_eq!(cache.shard(0).lock().scan_log_len(), 0);
    // Nothing is logged without a scan.
    for i in 0..2_000u32 {
        cache.set(&i.to_be_bytes(), b"v").expect("fits");
    }
    for i in (0..2_000u32).filter(|i| i % 4 != 0) {
        cache.delete(&i.to_be_bytes());
    }
    assert_eq!(cache.shard(0).lock().scan_log_len(), 0);
    cache.validate().expect("valid");
}

/// Two different writes that carry one version (two nodes that shared a version tag, a
/// bug) resolve the same way on every replica whatever order they arrive in: a delete wins,
/// then the larger content digest. Before, each replica kept whichever arrived last, and
/// anti-entropy (which compares versions) could never see the difference.
#[test]
fn equal_versions_resolve_the_same_way_in_any_order() {
    let replica = || Cache::new(CacheConfig::new().with_max_bytes(1 << 20)).unwrap();
    let (a, b) = (replica(), replica());
    let _ = a.write(b"k", b"first", WriteOptions::versioned(7));
    let _ = a.write(b"k", b"second", WriteOptions::versioned(7));
    let _ = b.write(b"k", b"second", WriteOptions::versioned(7));
    let _ = b.write(b"k", b"first", WriteOptions::versioned(7));
    assert_eq!(a.get(b"k"), b.get(b"k"), "the same winner in both orders");
    assert!(a.get(b"k").is_some());
    // The same write again is not refused.
    let won = a.get(b"k").expect("a value");
    assert_eq!(
        a.write(b"k", &won, WriteOptions::versioned(7))
            .expect("fits"),
        WriteOutcome::Stored
    );
    // A delete and a write of one version: the delete, in both orders.
    let (c, d) = (replica(), replica());
    let _ = c.write(b"k", b"v", WriteOptions::versioned(9));
    let _ = c.delete_versioned(b"k", 9);
    let _ = d.delete_versioned(b"k", 9);
    assert_eq!(
        d.write(b"k", b"v", WriteOptions::versioned(9))
            .expect("fits"),
        WriteOutcome::Stale
    );
    assert_eq!((c.get(b"k"), d.get(b"k")), (None, None));
    for cache in [&a, &b, &c, &d] {
        cache.validate().expect("valid");
    }
}
