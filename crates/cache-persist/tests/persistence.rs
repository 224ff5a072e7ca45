//! Persistence end to end on a real directory: recovery, snapshots, torn tails, corruption
//! and repair, a failing disk, group commit.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cache_core::{CacheConfig, VersionedRead};
use cache_persist::aof::segment_path;
use cache_persist::data_dir::snapshot_path;
use cache_persist::{
    AppendLog, FsyncPolicy, LogLimits, PersistConfig, PersistError, Persistence, SegmentFile, check,
};
use cluster_core::{Condition, CoreError, Limits, MutationSink, NodeClock, Stamping, Store};
use proptest::prelude::*;

const LIMITS: LogLimits = LogLimits {
    max_key_bytes: 64 << 10,
    max_value_bytes: 8 << 20,
};

fn store() -> Arc<Store> {
    Arc::new(
        Store::new(
            "n0",
            CacheConfig::new().with_max_bytes(64 << 20),
            NodeClock::System,
            Limits::default(),
            Duration::from_secs(5),
        )
        .expect("valid config"),
    )
}

fn config(dir: &Path, fsync: FsyncPolicy) -> PersistConfig {
    PersistConfig {
        dir: dir.to_path_buf(),
        fsync,
        snapshot_interval: None,
        rewrite_min_bytes: 64 << 20,
        rewrite_percentage: 100,
        limits: LIMITS,
    }
}

fn open(dir: &Path) -> (Arc<Store>, Arc<Persistence>) {
    let s = store();
    let p = Persistence::open(
        config(dir, FsyncPolicy::Always),
        Arc::clone(&s),
        Box::new(|_| {}),
    )
    .expect("recovers");
    (s, p)
}

/// Every versioned entry: (key, Some(value) | None for a tombstone, version).
fn state(s: &Store) -> Vec<(Vec<u8>, Option<Vec<u8>>, u64)> {
    let mut out = Vec::new();
    let mut scan = s.engine().scanner();
    while let Some(keys) = scan.versions(256) {
        for kv in keys {
            match s.get_versioned(&kv.key) {
                Some(VersionedRead::Live(l)) => {
                    out.push((kv.key.to_vec(), Some(l.value.to_vec()), l.version));
                }
                Some(VersionedRead::Dead { version }) => out.push((kv.key.to_vec(), None, version)),
                None => {}
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn write(s: &Store, key: &str, value: &str) {
    s.set(&b(key), &b(value), None, Condition::Always, Stamping::FRESH)
        .expect("applied");
    s.durable().await.expect("durable");
}

#[tokio::test]
async fn everything_written_comes_back_with_its_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before = {
        let (s, p) = open(dir.path());
        for i in 0..500 {
            write(&s, &format!("k{i}"), &format!("v{i}")).await;
        }
        for i in 0..50 {
            s.delete(&b(&format!("k{i}")), true, Stamping::FRESH)
                .expect("deleted");
        }
        s.set(
            &b("ttl"),
            &b("x"),
            Some(3_600_000),
            Condition::Always,
            Stamping::FRESH,
        )
        .expect("applied");
        s.durable().await.expect("durable");
        p.close();
        state(&s)
    };
    let (s, p) = open(dir.path());
    assert_eq!(state(&s), before);
    assert_eq!(p.recovery().records, 551);
    assert!(
        s.get(b"ttl").and_then(|l| l.expires_at).is_some(),
        "expiry kept"
    );
    // New versions order after every recovered one.
    let last = before.iter().map(|e| e.2).max().unwrap_or(0);
    s.set(&b("new"), &b("v"), None, Condition::Always, Stamping::FRESH)
        .expect("applied");
    let v = s.get(b"new").map(|l| l.version).unwrap_or(0);
    assert!(v > last, "{v} > {last}");
}

#[tokio::test]
async fn a_snapshot_replaces_the_log_and_writes_during_it_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before = {
        let (s, p) = open(dir.path());
        for i in 0..2000 {
            write(&s, &format!("k{i}"), "old").await;
        }
        // Writes race the snapshot scan: the snapshot is fuzzy, the log holds them.
        let writer = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                for i in 0..2000 {
                    s.set(
                        &b(&format!("k{i}")),
                        &b("new"),
                        None,
                        Condition::Always,
                        Stamping::FRESH,
                    )
                    .expect("applied");
                }
            })
        };
        let hits = s.stats().hits;
        let report = p.snapshot().expect("snapshot");
        writer.join().expect("writer");
        assert_eq!(
            s.stats().hits,
            hits,
            "a snapshot reads without counting hits or promoting"
        );
        s.durable().await.expect("durable");
        assert!(report.entries >= 2000, "{report:?}");
        assert_eq!(report.path, snapshot_path(dir.path(), 2));
        assert!(!segment_path(dir.path(), 1).exists(), "old segment deleted");
        for i in 0..10 {
            write(&s, &format!("after{i}"), "v").await;
        }
        p.close();
        state(&s)
    };
    let (s, p) = open(dir.path());
    assert_eq!(state(&s), before);
    assert!(p.recovery().snapshot.is_some());
    assert!(
        before
            .iter()
            .filter(|e| e.1.as_deref() == Some(b"new"))
            .count()
            == 2000
    );
}

/// A snapshot taken while as many other keys of the same size are deleted holds every
/// kept key: the deletes give pages back and move kept entries across the scan's cursor
/// (before the scan was complete, 2 of 4 such runs on a real node lost kept keys for good:
/// the log segments that held them are deleted after the snapshot).
#[tokio::test]
async fn a_snapshot_during_deletes_keeps_every_kept_key() {
    const N: usize = 40_000;
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (s, p) = open(dir.path());
        for i in 0..N {
            // Interleaved, so kept and deleted entries share pages.
            for prefix in ["keep", "drop"] {
                s.set(
                    &b(&format!("{prefix}{i}")),
                    &b("0123456789abcdef"),
                    None,
                    Condition::Always,
                    Stamping::FRESH,
                )
                .expect("applied");
            }
        }
        s.durable().await.expect("durable");
        let deleter = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                for i in 0..N {
                    s.delete(&b(&format!("drop{i}")), true, Stamping::FRESH)
                        .expect("deleted");
                }
            })
        };
        let report = p.snapshot().expect("snapshot");
        deleter.join().expect("deleter");
        s.durable().await.expect("durable");
        assert!(report.entries >= N as u64, "{report:?}");
        // No close: the process dies here as under kill -9 (every write was fsynced).
        drop(p);
    }
    let (s, _p) = open(dir.path());
    let missing: Vec<usize> = (0..N)
        .filter(|i| s.get(format!("keep{i}").as_bytes()).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "{} kept keys lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

#[tokio::test]
async fn an_interrupted_snapshot_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before = {
        let (s, p) = open(dir.path());
        for i in 0..300 {
            write(&s, &format!("k{i}"), "v").await;
        }
        p.snapshot().expect("snapshot");
        for i in 0..300 {
            write(&s, &format!("k{i}"), "w").await;
        }
        p.close();
        state(&s)
    };
    // What a crash in the middle of the next snapshot leaves: a new (empty) segment and a
    // half-written temporary file.
    let (file, _) = AppendLog::open_segment(&segment_path(dir.path(), 3), 0).expect("segment");
    drop(file);
    std::fs::write(
        snapshot_path(dir.path(), 3).with_extension("snap.tmp"),
        b"CCSNP\0\0\x01garbage",
    )
    .expect("tmp");
    let (s, _p) = open(dir.path());
    assert_eq!(state(&s), before);
    assert!(
        !snapshot_path(dir.path(), 3)
            .with_extension("snap.tmp")
            .exists()
    );
}

/// The log of `n` writes, closed, and the offsets where each record ends.
async fn logged(dir: &Path, n: usize) -> (Vec<u8>, Vec<(Vec<u8>, Option<Vec<u8>>, u64)>) {
    let (s, p) = open(dir);
    for i in 0..n {
        write(&s, &format!("key-{i}"), &"x".repeat(i % 7 + 1)).await;
    }
    p.close();
    let bytes = std::fs::read(segment_path(dir, 1)).expect("log");
    (bytes, state(&s))
}

/// One log of 40 writes, made once for every case of the property test.
fn full_log() -> &'static [u8] {
    static LOG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        rt.block_on(logged(dir.path(), 40)).0
    })
}

fn copy_with(src: &[u8], dir: &Path) {
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(segment_path(dir, 1), src).expect("write");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// A log cut anywhere after its header loads exactly the records before the cut, and
    /// says where it cut.
    #[test]
    fn a_cut_log_loads_the_records_before_the_cut(cut_at in 8usize..2000) {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = full_log();
        let cut_at = cut_at.min(bytes.len());
        let case = dir.path().join("cut");
        copy_with(&bytes[..cut_at], &case);
        // The reference: the same writes replayed up to the last whole record.
        let whole = cache_persist::scan(&bytes[..cut_at], LIMITS).expect("no corruption");
        let (s, p) = open(&case);
        prop_assert_eq!(p.recovery().records, whole.records.len() as u64);
        let torn = cut_at as u64 != whole.valid_len;
        prop_assert_eq!(p.recovery().torn.is_some(), torn);
        prop_assert_eq!(
            std::fs::metadata(segment_path(&case, 1)).expect("log").len(),
            whole.valid_len
        );
        for (i, m) in whole.records.iter().enumerate() {
            prop_assert!(s.get(&m.key).is_some(), "record {} missing", i);
        }
        let next_key = format!("key-{}", whole.records.len());
        prop_assert!(s.get(next_key.as_bytes()).is_none(), "a record after the cut loaded");
    }
}

#[tokio::test]
async fn a_flipped_bit_in_the_middle_refuses_to_start_until_repaired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut bytes, _) = logged(&dir.path().join("full"), 100).await;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    let case = dir.path().join("case");
    copy_with(&bytes, &case);
    let err = Persistence::open(
        config(&case, FsyncPolicy::Always),
        store(),
        Box::new(|_| {}),
    )
    .expect_err("corruption refuses to start");
    let msg = err.to_string();
    assert!(matches!(err, PersistError::Corrupt { .. }), "{msg}");
    assert!(
        msg.contains("log-0000000001.aof") && msg.contains("check-data"),
        "{msg}"
    );
    let found = check(&case, LIMITS, false).expect("check");
    let offset = found[0].problem.as_ref().map(|p| p.0).expect("a problem");
    assert!(offset <= mid as u64, "{offset} <= {mid}");
    assert!(!found[0].repaired);
    let fixed = check(&case, LIMITS, true).expect("repair");
    assert!(fixed[0].repaired);
    assert!(
        check(&case, LIMITS, false).expect("check")[0]
            .problem
            .is_none()
    );
    let (s, p) = open(&case);
    assert_eq!(p.recovery().records, found[0].records);
    assert!(found[0].records > 0 && found[0].records < 100);
    assert!(s.get(b"key-0").is_some());
}

#[tokio::test]
async fn a_flipped_bit_in_a_snapshot_refuses_to_start_until_repaired() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (s, p) = open(dir.path());
        for i in 0..200 {
            write(&s, &format!("k{i}"), "value").await;
        }
        p.snapshot().expect("snapshot");
        p.close();
    }
    let path = snapshot_path(dir.path(), 2);
    let mut bytes = std::fs::read(&path).expect("snapshot");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");
    let err = Persistence::open(
        config(dir.path(), FsyncPolicy::Always),
        store(),
        Box::new(|_| {}),
    )
    .expect_err("refuses");
    assert!(
        err.to_string().contains("snapshot-0000000002.snap"),
        "{err}"
    );
    check(dir.path(), LIMITS, true).expect("repair");
    let (s, p) = open(dir.path());
    let n = p.recovery().records;
    assert!(n > 0 && n < 200, "{n}");
    assert_eq!(state(&s).len() as u64, n);
}

/// A segment file that fails while `full` is set (a full disk), counting fsyncs.
struct Flaky {
    inner: std::fs::File,
    full: Arc<AtomicBool>,
    syncs: Arc<AtomicU64>,
}

impl SegmentFile for Flaky {
    fn append(&self, buf: &[u8]) -> io::Result<()> {
        if self.full.load(Ordering::Relaxed) {
            // Half of it lands, as a real full disk may do.
            let _ = self.inner.append(&buf[..buf.len() / 2]);
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "No space left on device",
            ));
        }
        self.inner.append(buf)
    }
    fn sync(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.inner.sync()
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.inner.truncate(len)
    }
}

fn flaky_log(dir: &Path, policy: FsyncPolicy) -> (Arc<AppendLog>, Arc<AtomicBool>, Arc<AtomicU64>) {
    let path = segment_path(dir, 1);
    let (_, len) = AppendLog::open_segment(&path, 0).expect("segment");
    let inner = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    inner.truncate(len).expect("seek");
    let full = Arc::new(AtomicBool::new(false));
    let syncs = Arc::new(AtomicU64::new(0));
    let file = Flaky {
        inner,
        full: Arc::clone(&full),
        syncs: Arc::clone(&syncs),
    };
    let log = AppendLog::start(Arc::new(file), len, policy, Box::new(|_| {})).expect("log");
    (Arc::new(log), full, syncs)
}

#[tokio::test]
async fn a_full_disk_refuses_writes_and_they_resume_when_it_clears() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, full, _) = flaky_log(dir.path(), FsyncPolicy::Always);
    let s = store();
    s.add_sink(Arc::clone(&log) as Arc<dyn MutationSink>);
    write(&s, "before", "v").await;
    full.store(true, Ordering::Relaxed);
    // The write that hits the full disk is applied in memory but never acknowledged.
    s.set(
        &b("during"),
        &b("v"),
        None,
        Condition::Always,
        Stamping::FRESH,
    )
    .expect("applied");
    let err = s.durable().await.expect_err("not durable");
    assert!(matches!(err, CoreError::Storage(_)), "{err}");
    // Now every write is refused up front, with the reason.
    let refused = s
        .set(
            &b("next"),
            &b("v"),
            None,
            Condition::Always,
            Stamping::FRESH,
        )
        .expect_err("refused");
    assert!(refused.to_string().contains("No space left"), "{refused}");
    assert!(s.get(b"next").is_none(), "a refused write changes nothing");
    assert!(log.stats().failed.load(Ordering::Relaxed));
    full.store(false, Ordering::Relaxed);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s
        .set(
            &b("next"),
            &b("v"),
            None,
            Condition::Always,
            Stamping::FRESH,
        )
        .is_err()
    {
        assert!(std::time::Instant::now() < deadline, "writes never resumed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.durable().await.expect("durable again");
    log.close();
    // The file holds whole records only: the half-written batch was cut off and re-sent.
    let report = cache_persist::scan(
        std::fs::File::open(segment_path(dir.path(), 1)).expect("open"),
        LIMITS,
    )
    .expect("no corruption");
    assert_eq!(report.outcome, cache_persist::ScanOutcome::Clean);
    let keys: Vec<&[u8]> = report.records.iter().map(|m| &m.key[..]).collect();
    assert_eq!(keys, vec![&b"before"[..], b"during", b"next"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_fsyncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _, syncs) = flaky_log(dir.path(), FsyncPolicy::Always);
    let s = store();
    s.add_sink(Arc::clone(&log) as Arc<dyn MutationSink>);
    let mut tasks = Vec::new();
    for t in 0..32 {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                s.set(
                    &b(&format!("t{t}-{i}")),
                    &b("v"),
                    None,
                    Condition::Always,
                    Stamping::FRESH,
                )
                .expect("applied");
                s.durable().await.expect("durable");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let n = syncs.load(Ordering::Relaxed);
    assert!(
        n > 0 && n < 1600,
        "1600 acknowledged writes took {n} fsyncs"
    );
    eprintln!("group commit: 1600 writes, {n} fsyncs");
    log.close();
    let report = cache_persist::scan(
        std::fs::File::open(segment_path(dir.path(), 1)).expect("open"),
        LIMITS,
    )
    .expect("clean");
    assert_eq!(report.records.len(), 1600);
}
