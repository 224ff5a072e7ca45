//! Persistence with real `cache-node` processes: `kill -9` under write load with each fsync
//! policy, `kill -9` in the middle of a snapshot, a corrupt or torn log, `check-data`, and a
//! full disk.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cache_client::Client;
use cache_testkit::{NodeProcess, http_post, metric, node_binary};

async fn client(node: &NodeProcess) -> Client {
    Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(node.addr())
        .await
        .expect("connect to the node")
}

fn start(dir: &Path, fsync: &str) -> NodeProcess {
    let dir = dir.to_str().expect("utf-8 path");
    NodeProcess::start(&["--data-dir", dir, "--appendfsync", fsync])
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "aof"))
        .collect();
    out.sort();
    out
}

/// Writers hammer the node until it dies; returns every acknowledged (key, value).
async fn write_until_killed(node: &NodeProcess, writers: usize) -> Vec<(String, String)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let c = client(node).await;
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0u64.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (k, v) = (
                    format!("w{w}-{i}"),
                    format!("value-{w}-{i}-{}", "x".repeat(40)),
                );
                match c.set(k.clone(), v.clone()).await {
                    Ok(()) => acked.push((k, v)),
                    Err(_) => break,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    node.signal("KILL");
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("writer"));
    }
    acked
}

/// Reads every key back; returns the ones missing or different.
async fn missing(node: &NodeProcess, expected: &[(String, String)]) -> Vec<String> {
    let c = client(node).await;
    let mut out = Vec::new();
    for chunk in expected.chunks(500) {
        let keys: Vec<String> = chunk.iter().map(|(k, _)| k.clone()).collect();
        let got = c.get_many(keys).await.expect("get_many");
        for ((k, v), g) in chunk.iter().zip(got) {
            if g.as_deref() != Some(v.as_bytes()) {
                out.push(k.clone());
            }
        }
    }
    out
}

async fn kill_under_load(fsync: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = start(dir.path(), fsync);
    let acked = write_until_killed(&node, 8).await;
    assert!(
        acked.len() > 100,
        "only {} writes acknowledged",
        acked.len()
    );
    node.restart();
    let lost = missing(&node, &acked).await;
    eprintln!(
        "appendfsync {fsync}: kill -9 after {} acknowledged writes from 8 writers: {} lost",
        acked.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_with_always_loses_no_acknowledged_write() {
    kill_under_load("always").await;
}

/// Under `everysec` (and `no`) a write reaches the kernel before it is acknowledged, so a
/// crash of the process loses nothing either; only a crash of the machine can lose the
/// last second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_with_everysec_loses_no_acknowledged_write() {
    kill_under_load("everysec").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_snapshot_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = start(dir.path(), "everysec");
    let c = client(&node).await;
    let mut expected = Vec::new();
    for batch in 0..300 {
        let entries: Vec<(String, String)> = (0..1000)
            .map(|i| {
                (
                    format!("k{batch}-{i}"),
                    format!("v{batch}-{i}-{}", "y".repeat(60)),
                )
            })
            .collect();
        c.set_many(entries.clone(), None).await.expect("set_many");
        expected.extend(entries);
    }
    // A first snapshot, then more writes: the kill interrupts the second one.
    let (code, _) = http_post(node.admin, "/snapshot").expect("snapshot");
    assert_eq!(code, 200);
    for (k, _) in expected.iter_mut().take(1000) {
        c.set(k.clone(), "rewritten").await.expect("set");
    }
    for (_, v) in expected.iter_mut().take(1000) {
        *v = "rewritten".into();
    }
    let admin = node.admin;
    let snapshot = std::thread::spawn(move || http_post(admin, "/snapshot"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let tmp_seen = loop {
        let tmp = std::fs::read_dir(dir.path())
            .expect("read dir")
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"));
        if tmp || Instant::now() > deadline {
            break tmp;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    node.signal("KILL");
    let _ = snapshot.join();
    assert!(tmp_seen, "the snapshot never started");
    node.restart();
    let lost = missing(&node, &expected).await;
    assert!(
        lost.is_empty(),
        "{} keys lost, e.g. {:?}",
        lost.len(),
        &lost[..5.min(lost.len())]
    );
    let leftovers = std::fs::read_dir(dir.path())
        .expect("read dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .count();
    assert_eq!(leftovers, 0, "the unfinished snapshot is deleted at start");
}

fn check_data(dir: &Path, repair: bool) -> (i32, String) {
    let mut cmd = Command::new(node_binary());
    cmd.arg("check-data").arg(dir);
    if repair {
        cmd.arg("--repair");
    }
    let out = cmd.output().expect("run check-data");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Writes `n` keys and stops the node gracefully.
async fn populated(dir: &Path, n: usize) -> NodeProcess {
    let mut node = start(dir, "always");
    let c = client(&node).await;
    for i in 0..n {
        c.set(format!("key-{i}"), format!("value-{i}"))
            .await
            .expect("set");
    }
    node.signal("TERM");
    assert!(
        node.wait_exit(Duration::from_secs(15)).is_some(),
        "node stopped"
    );
    node
}

#[tokio::test]
async fn a_corrupt_log_refuses_to_start_until_check_data_repairs_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(populated(dir.path(), 200).await);
    let log = segments(dir.path()).pop().expect("a log segment");
    let mut bytes = std::fs::read(&log).expect("read log");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x04;
    std::fs::write(&log, &bytes).expect("write log");
    let d = dir.path().to_str().expect("utf-8");
    let err = NodeProcess::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--data-dir",
        d,
    ])
    .expect_err("a corrupt log refuses to start");
    assert!(
        err.contains("is corrupt at byte")
            && err.contains("cache-node check-data")
            && err.contains("--repair"),
        "{err}"
    );
    let (code, out) = check_data(dir.path(), false);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("DAMAGED"), "{out}");
    let (code, out) = check_data(dir.path(), true);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("REPAIRED"), "{out}");
    let (code, out) = check_data(dir.path(), false);
    assert_eq!(code, 0, "{out}");
    let node = start(dir.path(), "always");
    let c = client(&node).await;
    assert_eq!(
        c.get("key-0").await.expect("get").as_deref(),
        Some(&b"value-0"[..])
    );
    assert_eq!(
        c.get("key-199").await.expect("get"),
        None,
        "after the damage: cut"
    );
}

#[tokio::test]
async fn a_torn_tail_is_cut_with_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(populated(dir.path(), 50).await);
    let log = segments(dir.path()).pop().expect("a log segment");
    let len = std::fs::metadata(&log).expect("log").len();
    // Half a record: a frame announcing 40 bytes, and 10 of them.
    let mut tail = vec![40u8, 0, 0, 0, 1, 2, 3, 4];
    tail.extend_from_slice(&[7u8; 10]);
    let mut bytes = std::fs::read(&log).expect("read");
    bytes.extend_from_slice(&tail);
    std::fs::write(&log, &bytes).expect("write");
    let node = start(dir.path(), "always");
    let c = client(&node).await;
    assert_eq!(
        c.get("key-49").await.expect("get").as_deref(),
        Some(&b"value-49"[..])
    );
    let logged = node.log();
    assert!(
        logged.contains("cutting off a torn record") && logged.contains(&format!("offset={len}")),
        "{logged}"
    );
    assert_eq!(std::fs::metadata(&log).expect("log").len(), len, "cut back");
}

#[tokio::test]
async fn snapshots_replace_the_log_and_the_node_restarts_from_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = start(dir.path(), "everysec");
    let c = client(&node).await;
    for i in 0..100 {
        c.set(format!("k{i}"), "v").await.expect("set");
    }
    let (code, body) = http_post(node.admin, "/snapshot").expect("snapshot");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"entries\":100"), "{body}");
    c.delete("k0").await.expect("delete");
    let (_, metrics) = node.http_get("/metrics").expect("metrics");
    assert_eq!(
        metric(&metrics, "cache_snapshots_total{result=\"ok\"}"),
        Some(1.0)
    );
    assert_eq!(metric(&metrics, "cache_aof_writable"), Some(1.0));
    node.restart();
    let c = client(&node).await;
    assert_eq!(
        c.get("k0").await.expect("get"),
        None,
        "the delete after it is replayed"
    );
    assert_eq!(c.get("k99").await.expect("get").as_deref(), Some(&b"v"[..]));
    let (_, metrics) = node.http_get("/metrics").expect("metrics");
    assert_eq!(metric(&metrics, "cache_recovery_records"), Some(101.0));
    // Without --data-dir there is nothing to snapshot.
    let plain = NodeProcess::start(&[]);
    let (code, body) = http_post(plain.admin, "/snapshot").expect("snapshot");
    assert_eq!(code, 409, "{body}");
}

/// A full disk: a 1 MiB tmpfs as the data directory (needs root to mount; skipped with a
/// message otherwise — the refusal itself is also covered with an injected failure in
/// `cache-persist`'s tests).
#[tokio::test]
async fn a_full_disk_refuses_writes_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.path().to_path_buf());
    let node = start(dir.path(), "always");
    let c = client(&node).await;
    let value = "z".repeat(4000);
    let mut refused = None;
    for i in 0..1000 {
        if let Err(e) = c.set(format!("k{i}"), value.clone()).await {
            refused = Some((i, e));
            break;
        }
    }
    let (n, err) = refused.expect("a 1 MiB disk fills up");
    let msg = err.to_string();
    assert!(
        msg.contains("cannot persist") && msg.contains("No space left"),
        "{msg}"
    );
    // Reads still work; further writes are refused up front; the metric says so.
    assert!(c.get("k0").await.expect("get").is_some());
    assert!(c.set("another", "v").await.is_err());
    let (_, metrics) = node.http_get("/metrics").expect("metrics");
    assert_eq!(
        metric(&metrics, "cache_aof_writable"),
        Some(0.0),
        "{metrics}"
    );
    eprintln!("full disk: writes refused after {n} writes: {msg}");
}

#[tokio::test]
async fn the_log_is_compacted_once_it_outgrows_the_last_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8");
    let mut node = NodeProcess::start(&[
        "--data-dir",
        d,
        "--snapshot-interval",
        "0",
        "--aof-rewrite-min-size",
        "16KiB",
        "--aof-rewrite-percentage",
        "100",
    ]);
    let c = client(&node).await;
    // The same 50 keys over and over: the log grows, the data does not.
    for round in 0..20 {
        for i in 0..50 {
            c.set(format!("k{i}"), format!("round-{round}-{}", "p".repeat(80)))
                .await
                .expect("set");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = node.http_get("/metrics").expect("metrics");
        // Compacted at least once, and (writes over) the log is below the threshold again.
        let snapshots = metric(&metrics, "cache_snapshots_total{result=\"ok\"}").unwrap_or(0.0);
        let log = metric(&metrics, "cache_aof_bytes").unwrap_or(f64::MAX);
        if snapshots >= 1.0 && log < 16.0 * 1024.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not compacted within 10 s: {snapshots} snapshots, log {log} bytes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        segments(dir.path()).len(),
        1,
        "the segments before the snapshot are deleted"
    );
    node.restart();
    let c = client(&node).await;
    for i in 0..50 {
        let v = c.get(format!("k{i}")).await.expect("get").expect("present");
        assert!(v.starts_with(b"round-19-"), "latest value of k{i}");
    }
}

/// A flush is recorded like any delete: after a restart from the data directory (log and,
/// after a snapshot, the snapshot), the flushed keys stay gone and later writes stay.
// Multi-threaded: the clients' connection tasks must keep running (answering the server's
// GOAWAY ping) while this test blocks in `wait_exit`, or shutdown waits its whole grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_survives_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut node = start(dir.path(), "always");
    let c = client(&node).await;
    for i in 0..200 {
        c.set(format!("key-{i}"), "v").await.expect("set");
    }
    let flushed = c.flush().await.expect("flush");
    assert_eq!(flushed.deleted, 200);
    c.set("after", "kept").await.expect("set after the flush");
    // Once from the log alone, once from a snapshot taken after the flush.
    for snapshot_first in [false, true] {
        if snapshot_first {
            client(&node).await.snapshot().await.expect("snapshot");
        }
        node.signal("TERM");
        assert!(
            node.wait_exit(Duration::from_secs(15)).is_some(),
            "node stopped"
        );
        node.restart();
        let c = client(&node).await;
        for i in [0, 99, 199] {
            assert_eq!(
                c.get(format!("key-{i}")).await.expect("get"),
                None,
                "key-{i}"
            );
        }
        assert_eq!(
            c.get("after").await.expect("get").as_deref(),
            Some(&b"kept"[..])
        );
        assert_eq!(c.stats().await.expect("stats").items, 1);
    }
}
