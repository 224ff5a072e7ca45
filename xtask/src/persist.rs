//! `cargo xtask bench persist [--keys N]`: persistence against redis-server, same run, same
//! load generator. Server on CPU 0, `cache-bench` on CPU 1, data directories under the
//! system temporary directory (the same disk for both servers).
//!
//! 1. Write throughput with `appendfsync always|everysec|no` against redis-server with
//!    `appendonly yes` and the same `appendfsync`.
//! 2. Recovery of N keys (default 1 000 000): from the log alone and from a snapshot,
//!    against redis-server loading an AOF (no RDB preamble) and an RDB — time from process
//!    start to the first answered request.
//! 3. Snapshot duration with N keys, and the foreground p99 of a mixed load while
//!    snapshots run back to back, against the same load without them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::net::{Guard, bench, build_release, f, free_port, has, pinned};

/// redis-server persisting to a plain AOF (no RDB preamble), fsync left to the kernel.
const REDIS_AOF_ONLY: &[&str] = &[
    "--save",
    "",
    "--appendonly",
    "yes",
    "--appendfsync",
    "no",
    "--aof-use-rdb-preamble",
    "no",
];

fn fresh_dir(name: &str) -> Result<PathBuf> {
    let dir =
        std::env::temp_dir().join(format!("cache-bench-persist-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Starts cache-node with `args`; returns it, its gRPC and admin addresses, and how long it
/// took from spawn to its startup line (recovery happens before it).
fn node(bin: &str, args: &[&str]) -> Result<(Guard, String, String, Duration)> {
    crate::net::spawn_node(bin, args)
}

fn stop_gracefully(mut g: Guard) -> Result<()> {
    let pid = g.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status()?;
    let until = Instant::now() + Duration::from_secs(60);
    while g.0.try_wait()?.is_none() {
        if Instant::now() > until {
            bail!("cache-node did not stop within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Starts redis-server in `dir` with `args`; returns it, its address and the time from
/// spawn to the first `PING` answered with `PONG` (not `LOADING`).
fn redis(dir: &Path, args: &[&str]) -> Result<(Guard, String, Duration)> {
    let port = free_port()?;
    let began = Instant::now();
    let child = pinned("0", "redis-server")
        .current_dir(dir)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
        .arg(dir)
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .context("start redis-server")?;
    let guard = Guard(child);
    let until = Instant::now() + Duration::from_secs(300);
    loop {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "ping"])
            .output()?;
        if String::from_utf8_lossy(&out.stdout).trim() == "PONG" {
            break;
        }
        if Instant::now() > until {
            bail!("redis-server did not answer PING within 300 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((guard, format!("127.0.0.1:{port}"), began.elapsed()))
}

fn redis_cli(addr: &str, args: &[&str]) -> Result<String> {
    let port = addr.rsplit(':').next().context("port")?;
    let out = Command::new("redis-cli")
        .args(["-p", port])
        .args(args)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn post(admin: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin)?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    if !raw.starts_with("HTTP/1.1 200") {
        bail!("POST {path}: {raw}");
    }
    Ok(raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// Writes `keys` keys once (cache-bench's prefill, no measurement).
fn prefill(target: &str, keys: u64) -> Result<()> {
    let bin = crate::root().join("target/release/cache-bench");
    let k = keys.to_string();
    let out = pinned("1", bin.to_str().context("utf-8 path")?)
        .args(["--target", target, "--keys", &k, "--value-size", "64"])
        .args(["--concurrency", "64", "--batch", "64", "--prefill"])
        .args(["--duration", "0s", "--warmup", "0s"])
        .output()
        .context("run cache-bench")?;
    if !out.status.success() {
        bail!(
            "prefill of {target} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub(crate) fn bench_persist(keys: u64) -> Result<()> {
    if !has("redis-server") || !has("redis-cli") {
        bail!("this benchmark compares against redis-server: `apt-get install redis-server`");
    }
    let bin = build_release()?;
    let bin = bin.as_str();

    // 1. Write throughput per fsync policy.
    println!(
        "\nwrites only, 100k keys, 64 B values, 50 in flight, unary (Redis: no pipelining), 8 s; server on CPU 0, cache-bench on CPU 1\n"
    );
    println!(
        "| appendfsync (`off`: no persistence) | cache-node writes/s | p99 ms | redis-server writes/s | p99 ms | node ÷ redis |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let load = [
        "--keys",
        "100000",
        "--value-size",
        "64",
        "--concurrency",
        "50",
        "--connections",
        "4",
        "--ratio",
        "0:1",
        "--duration",
        "8s",
        "--warmup",
        "2s",
    ];
    let mut off = None;
    for policy in ["off", "always", "everysec", "no"] {
        let dir = fresh_dir(&format!("w-{policy}"))?;
        let d = dir.to_str().context("utf-8")?;
        let flags: Vec<&str> = if policy == "off" {
            Vec::new()
        } else {
            vec!["--data-dir", d, "--appendfsync", policy]
        };
        let (n, grpc, _, _) = node(bin, &flags)?;
        let ours = bench(&format!("grpc://{grpc}"), &load)?;
        drop(n);
        let rdir = fresh_dir(&format!("rw-{policy}"))?;
        let redis_flags: Vec<&str> = if policy == "off" {
            vec!["--save", "", "--appendonly", "no"]
        } else {
            vec!["--save", "", "--appendonly", "yes", "--appendfsync", policy]
        };
        let (r, addr, _) = redis(&rdir, &redis_flags)?;
        let theirs = bench(&format!("redis://{addr}"), &load)?;
        drop(r);
        let (o, t) = (
            f(&ours, &["keys_per_second"]),
            f(&theirs, &["keys_per_second"]),
        );
        let base = *off.get_or_insert((o, t));
        println!(
            "| {policy} | {o:.0} ({:.2}× off) | {:.3} | {t:.0} ({:.2}× off) | {:.3} | {:.2} |",
            o / base.0,
            f(&ours, &["set", "p99_ms"]),
            t / base.1,
            f(&theirs, &["set", "p99_ms"]),
            o / t
        );
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&rdir);
    }

    // 2. Recovery.
    println!("\nrecovery of {keys} keys (64 B values): process start to first answered request\n");
    println!("| from | cache-node | redis-server | node ÷ redis |");
    println!("| --- | ---: | ---: | ---: |");
    let dir = fresh_dir("recovery")?;
    let d = dir.to_str().context("utf-8")?;
    let flags = [
        "--data-dir",
        d,
        "--appendfsync",
        "no",
        "--snapshot-interval",
        "0",
        "--aof-rewrite-min-size",
        "64GiB",
    ];
    let (n, grpc, _, _) = node(bin, &flags)?;
    prefill(&format!("grpc://{grpc}"), keys)?;
    stop_gracefully(n)?;
    let log_bytes = dir_bytes(&dir)?;
    let (n, _, admin, from_log) = node(bin, &flags)?;
    let snap = post(&admin, "/snapshot")?;
    stop_gracefully(n)?;
    let (n, _, _, from_snapshot) = node(bin, &flags)?;
    drop(n);
    let _ = std::fs::remove_dir_all(&dir);

    let rdir = fresh_dir("raof")?;
    let (r, addr, _) = redis(&rdir, REDIS_AOF_ONLY)?;
    prefill(&format!("redis://{addr}"), keys)?;
    drop(r);
    let (r, addr, redis_aof) = redis(&rdir, REDIS_AOF_ONLY)?;
    let loaded = redis_cli(&addr, &["dbsize"])?;
    redis_cli(&addr, &["save"])?;
    drop(r);
    let (r, addr, redis_rdb) = redis(&rdir, &["--save", "", "--appendonly", "no"])?;
    let loaded_rdb = redis_cli(&addr, &["dbsize"])?;
    drop(r);
    let _ = std::fs::remove_dir_all(&rdir);
    println!(
        "| log ({:.0} MB) vs AOF ({loaded} keys) | {:.2} s | {:.2} s | {:.2} |",
        log_bytes as f64 / 1e6,
        from_log.as_secs_f64(),
        redis_aof.as_secs_f64(),
        from_log.as_secs_f64() / redis_aof.as_secs_f64()
    );
    println!(
        "| snapshot vs RDB ({loaded_rdb} keys) | {:.2} s | {:.2} s | {:.2} |",
        from_snapshot.as_secs_f64(),
        redis_rdb.as_secs_f64(),
        from_snapshot.as_secs_f64() / redis_rdb.as_secs_f64()
    );
    println!("\nsnapshot of {keys} keys: {}", snap.trim());

    // 3. Foreground latency while snapshots run back to back.
    let dir = fresh_dir("fg")?;
    let d = dir.to_str().context("utf-8")?;
    let (n, grpc, admin, _) = node(bin, &["--data-dir", d, "--snapshot-interval", "0"])?;
    let target = format!("grpc://{grpc}");
    prefill(&target, keys)?;
    let k = keys.to_string();
    let mixed = [
        "--keys",
        &k,
        "--value-size",
        "64",
        "--concurrency",
        "16",
        "--connections",
        "4",
        "--ratio",
        "9:1",
        "--duration",
        "10s",
        "--warmup",
        "1s",
    ];
    let quiet = bench(&target, &mixed)?;
    let admin2 = admin.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = std::sync::Arc::clone(&stop);
    let snapshots = std::thread::spawn(move || {
        let mut out: Vec<String> = Vec::new();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            match post(&admin2, "/snapshot") {
                Ok(b) => out.push(b.trim().to_string()),
                Err(e) => {
                    out.push(format!("error: {e}"));
                    break;
                }
            }
        }
        out
    });
    let busy = bench(&target, &mixed)?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let taken = snapshots
        .join()
        .map_err(|_| anyhow::anyhow!("snapshot thread"))?;
    drop(n);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "\nforeground with {keys} keys, 9:1 get:set, 16 in flight, 10 s: without snapshots vs {} snapshots back to back\n",
        taken.len()
    );
    println!("| | keys/s | get p99 ms | set p99 ms |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, v) in [("no snapshot", &quiet), ("snapshots running", &busy)] {
        println!(
            "| {name} | {:.0} | {:.3} | {:.3} |",
            f(v, &["keys_per_second"]),
            f(v, &["get", "p99_ms"]),
            f(v, &["set", "p99_ms"])
        );
    }
    println!(
        "| ratio | {:.2} | {:.2} | {:.2} |",
        f(&busy, &["keys_per_second"]) / f(&quiet, &["keys_per_second"]),
        f(&busy, &["get", "p99_ms"]) / f(&quiet, &["get", "p99_ms"]),
        f(&busy, &["set", "p99_ms"]) / f(&quiet, &["set", "p99_ms"])
    );
    for t in taken.iter().take(3) {
        println!("snapshot: {t}");
    }
    Ok(())
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        total += e?.metadata()?.len();
    }
    Ok(total)
}
