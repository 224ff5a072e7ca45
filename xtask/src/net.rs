//! `cargo xtask bench net`: cache-node vs redis-server on this machine.
//!
//! Builds release binaries, starts a `cache-node` and a `redis-server` pinned to CPU 0,
//! runs `cache-bench` pinned to CPU 1 with the same workload against each, prints the
//! ratios, and stops everything it started (also on error). redis-server comes from
//! Debian's `redis-server` package (`apt-get install redis-server`); without it, our side
//! runs alone and the ratios are skipped.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{cargo, root};

/// A child process killed on drop.
pub(crate) struct Guard(pub(crate) Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn has(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `taskset -c CPU program args...` when taskset exists and there are at least 2 CPUs.
pub(crate) fn pinned(cpu: &str, program: &str) -> Command {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if has("taskset") && cpus >= 2 {
        let mut c = Command::new("taskset");
        c.args(["-c", cpu, program]);
        c
    } else {
        Command::new(program)
    }
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_node(bin: &str) -> Result<(Guard, String)> {
    spawn_node(bin, &[]).map(|(guard, grpc, _, _)| (guard, grpc))
}

/// Starts cache-node pinned to CPU 0 on ephemeral ports with `args` added; returns it, its
/// gRPC and admin addresses, and the time from spawn to its startup line.
pub(crate) fn spawn_node(bin: &str, args: &[&str]) -> Result<(Guard, String, String, Duration)> {
    let (guard, line, took) = spawn_node_line(bin, args)?;
    Ok((guard, field(&line, "grpc=")?, field(&line, "admin=")?, took))
}

/// The value of `name` (`grpc=`, `resp=`, ...) in a node's startup line.
fn field(line: &str, name: &str) -> Result<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name))
        .map(str::to_string)
        .with_context(|| format!("no {name} in startup line {line:?}"))
}

/// [`spawn_node`], returning the node's whole startup line.
fn spawn_node_line(bin: &str, args: &[&str]) -> Result<(Guard, String, Duration)> {
    let began = Instant::now();
    let mut child = pinned("0", bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--log-level",
            "warn",
        ])
        .args(if args.contains(&"--max-memory") {
            &[][..]
        } else {
            &["--max-memory", "4GiB"][..]
        })
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start cache-node")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    Ok((Guard(child), line, began.elapsed()))
}

fn start_redis() -> Result<Option<(Guard, String)>> {
    if !has("redis-server") {
        eprintln!(
            "redis-server is not installed: running cache-node alone (install it with `apt-get install redis-server`)"
        );
        return Ok(None);
    }
    let port = free_port()?;
    let child = pinned("0", "redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("start redis-server")?;
    let guard = Guard(child);
    let until = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > until {
            bail!("redis-server did not start listening on {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some((guard, format!("127.0.0.1:{port}"))))
}

pub(crate) fn bench(target: &str, args: &[&str]) -> Result<Value> {
    let bin = root().join("target/release/cache-bench");
    let out = pinned("1", bin.to_str().context("utf-8 path")?)
        .args(["--target", target, "--json"])
        .args(args)
        .output()
        .context("run cache-bench")?;
    if !out.status.success() {
        bail!(
            "cache-bench {target} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("cache-bench --json output")
}

fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// Builds release `cache-node` and `cache-bench`; returns the node binary's path.
pub(crate) fn build_release() -> Result<String> {
    build_release_bins(&["cache-node", "cache-bench"])?;
    let bin = root().join("target/release/cache-node");
    Ok(bin.to_str().context("utf-8 path")?.to_string())
}

/// Builds the release binaries `bins` (the one `cargo build --release` every task uses).
pub(crate) fn build_release_bins(bins: &[&str]) -> Result<()> {
    let mut args = vec!["build", "--release"];
    for bin in bins {
        args.extend(["--bin", bin]);
    }
    cargo(&args)
}

/// `cache-bench`'s own CPU utilisation in a run, as a percentage ("-" if it could not tell).
fn client_cpu(v: &Value) -> String {
    v["client_cpu_utilization"]
        .as_f64()
        .map_or_else(|| "-".into(), |u| format!("{:.0} %", u * 100.0))
}

pub(crate) fn f(v: &Value, path: &[&str]) -> f64 {
    path.iter().fold(v, |v, k| &v[*k]).as_f64().unwrap_or(0.0)
}

/// `baseline`: another `cache-node` binary (an older build) measured with the same workload
/// in the same run, for before/after ratios.
pub(crate) fn bench_net(baseline: Option<&str>) -> Result<()> {
    let node_bin = build_release()?;
    let node_bin = node_bin.as_str();

    // Throughput: 100k keys, 64-byte values, 50 requests in flight.
    let common = [
        "--keys",
        "100000",
        "--value-size",
        "64",
        "--concurrency",
        "50",
        "--connections",
        "4",
        "--ratio",
        "1:0",
        "--duration",
        "10s",
        "--warmup",
        "2s",
        "--prefill",
    ];
    // (name, node-only flags, flags for both): redis-server runs once per batch size.
    let scenarios: [(&str, &[&str], &[&str]); 4] = [
        ("unary Get", &["--grpc-mode", "unary"], &["--batch", "1"]),
        (
            "stream Get (pipelined stream)",
            &["--grpc-mode", "stream"],
            &["--batch", "1"],
        ),
        (
            "MultiGet 16 / pipeline 16",
            &["--grpc-mode", "unary"],
            &["--batch", "16"],
        ),
        (
            "MultiGet 16 over the stream / pipeline 16",
            &["--grpc-mode", "stream"],
            &["--batch", "16"],
        ),
    ];
    let mut redis_rows: std::collections::HashMap<String, Value> = Default::default();
    println!(
        "\ncache-node vs redis-server: server on CPU 0, cache-bench on CPU 1, 100k keys, 64 B values, 50 in flight, reads only\n"
    );
    println!(
        "| scenario | cache-node keys/s | p99 ms | cache-bench CPU | redis-server keys/s | p99 ms | cache-bench CPU | node ÷ redis |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut baseline_rows = Vec::new();
    for (name, node_only, extra) in scenarios {
        let args: Vec<&str> = common.iter().chain(extra.iter()).copied().collect();
        let node_args: Vec<&str> = args.iter().chain(node_only.iter()).copied().collect();
        let (node, grpc) = start_node(node_bin)?;
        let ours = bench(&format!("grpc://{grpc}"), &node_args)?;
        drop(node);
        if let Some(bin) = baseline {
            let (old, grpc) = start_node(bin)?;
            let before = bench(&format!("grpc://{grpc}"), &node_args)?;
            drop(old);
            let (ok, bk) = (
                f(&ours, &["keys_per_second"]),
                f(&before, &["keys_per_second"]),
            );
            baseline_rows.push(format!(
                "| {name} | {ok:.0} | {:.3} | {bk:.0} | {:.3} | {:.2} |",
                f(&ours, &["get", "p99_ms"]),
                f(&before, &["get", "p99_ms"]),
                ok / bk
            ));
        }
        let key = extra.join(" ");
        let theirs = match redis_rows.get(&key) {
            Some(v) => Some(v.clone()),
            None => match start_redis()? {
                Some((redis, addr)) => {
                    let v = bench(&format!("redis://{addr}"), &args)?;
                    drop(redis);
                    redis_rows.insert(key, v.clone());
                    Some(v)
                }
                None => None,
            },
        };
        let ok = f(&ours, &["keys_per_second"]);
        match theirs {
            Some(t) => {
                let tk = f(&t, &["keys_per_second"]);
                println!(
                    "| {name} | {ok:.0} | {:.3} | {} | {tk:.0} | {:.3} | {} | {:.2} |",
                    f(&ours, &["get", "p99_ms"]),
                    client_cpu(&ours),
                    f(&t, &["get", "p99_ms"]),
                    client_cpu(&t),
                    ok / tk
                );
            }
            None => println!(
                "| {name} | {ok:.0} | {:.3} | {} | - | - | - | - |",
                f(&ours, &["get", "p99_ms"]),
                client_cpu(&ours)
            ),
        }
    }
    println!(
        "\n(cache-bench CPU: how busy the load generator was, of its one CPU; near 100 % a row is\n(also) the client's limit, not the server's.)"
    );
    if let Some(bin) = baseline {
        println!("\nthis build vs the baseline {bin}, same workload, same run\n");
        println!(
            "| scenario | this build keys/s | p99 ms | baseline keys/s | p99 ms | this ÷ baseline |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
        for row in baseline_rows {
            println!("{row}");
        }
    }

    bench_resp(node_bin, baseline)?;
    memory_vs_redis(node_bin)
}

/// `cargo xtask bench memory`: resident memory against redis-server holding 1M small entries,
/// then how close RSS stays to `--max-memory` under mixed-size overwrites.
pub(crate) fn bench_memory(node_bin: &str) -> Result<()> {
    memory_vs_redis(node_bin)?;
    memory_limit(node_bin)
}

/// A node with `--max-memory 64MiB` overwritten with values of many sizes (three passes over
/// ten sizes from 40 B to 16 KiB, 200 000 keys, ~1.7 GB written): its RSS against the limit,
/// with the engine's charged bytes and footprint.
fn memory_limit(node_bin: &str) -> Result<()> {
    const LIMIT_MIB: u64 = 64;
    let (node, grpc, admin, _) = spawn_node(node_bin, &["--max-memory", "64MiB"])?;
    let idle = rss_bytes(node.0.id())?;
    let sizes = [64u64, 256, 1024, 4096, 16_384, 100, 700, 2_500, 9_000, 40];
    let mut written = 0u64;
    let mut peak = idle;
    for _pass in 0..3 {
        for size in sizes {
            let requests = (75_000_000 / size).min(300_000);
            let (requests_s, size_s) = (requests.to_string(), size.to_string());
            bench(
                &format!("grpc://{grpc}"),
                &[
                    "--keys",
                    "200000",
                    "--value-size",
                    &size_s,
                    "--ratio",
                    "0:1",
                    "--requests",
                    &requests_s,
                    "--warmup",
                    "0s",
                    "--concurrency",
                    "32",
                ],
            )?;
            written += requests * size;
            peak = peak.max(rss_bytes(node.0.id())?);
        }
    }
    let rss = rss_bytes(node.0.id())?;
    let text = crate::rebalance::metrics(&admin)?;
    let charged = crate::rebalance::metric(&text, "cache_bytes");
    let footprint = crate::rebalance::metric(&text, "cache_engine_footprint_bytes");
    let limit = (LIMIT_MIB << 20) as f64;
    println!(
        "\n--max-memory {LIMIT_MIB}MiB after {:.2} GB of mixed-size writes (40 B to 16 KiB values)\n",
        written as f64 / 1e9
    );
    println!(
        "| RSS empty | RSS after | peak RSS | engine charged | engine footprint | (RSS − empty) ÷ limit |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} |",
        mib(idle),
        mib(rss),
        mib(peak),
        charged / (1 << 20) as f64,
        footprint / (1 << 20) as f64,
        (rss - idle) as f64 / limit
    );
    Ok(())
}

/// Resident memory holding 1M entries of 16-byte keys and 16-byte values: the node against
/// redis-server.
fn memory_vs_redis(node_bin: &str) -> Result<()> {
    // Memory: 1M entries of 16-byte keys and 16-byte values.
    let fill = [
        "--keys",
        "1000000",
        "--value-size",
        "16",
        "--concurrency",
        "16",
        "--prefill",
        "--duration",
        "0s",
    ];
    let (node, grpc) = start_node(node_bin)?;
    let node_idle = rss_bytes(node.0.id())?;
    bench(&format!("grpc://{grpc}"), &fill).ok();
    let node_rss = rss_bytes(node.0.id())?;
    drop(node);
    println!("\nresident memory holding 1M entries (16 B keys, 16 B values)\n");
    println!("| server | RSS empty | RSS with 1M entries | node ÷ redis |");
    println!("| --- | ---: | ---: | ---: |");
    match start_redis()? {
        Some((redis, addr)) => {
            let redis_idle = rss_bytes(redis.0.id())?;
            bench(&format!("redis://{addr}"), &fill).ok();
            let redis_rss = rss_bytes(redis.0.id())?;
            println!(
                "| cache-node | {:.1} MiB | {:.1} MiB | {:.2} |",
                mib(node_idle),
                mib(node_rss),
                node_rss as f64 / redis_rss as f64
            );
            println!(
                "| redis-server | {:.1} MiB | {:.1} MiB | 1.00 |",
                mib(redis_idle),
                mib(redis_rss)
            );
        }
        None => println!(
            "| cache-node | {:.1} MiB | {:.1} MiB | - |",
            mib(node_idle),
            mib(node_rss)
        ),
    }
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Starts an `n`-node release cluster on free ports with `--replication-factor rf`;
/// returns the guards and the gRPC addresses.
fn start_cluster(bin: &str, n: usize, rf: usize) -> Result<(Vec<Guard>, Vec<String>)> {
    let ports: Vec<u16> = (0..3 * n).map(|_| free_port()).collect::<Result<_>>()?;
    let addrs: Vec<String> = (0..n)
        .map(|i| format!("127.0.0.1:{}", ports[3 * i]))
        .collect();
    let peer_addrs: Vec<String> = (0..n)
        .map(|i| format!("127.0.0.1:{}", ports[3 * i + 2]))
        .collect();
    let peers: Vec<String> = (0..n)
        .map(|i| format!("node-{i}={}/{}", addrs[i], peer_addrs[i]))
        .collect();
    let peers = peers.join(",");
    let mut guards = Vec::new();
    for i in 0..n {
        let mut child = Command::new(bin)
            .args(["--node-id", &format!("node-{i}"), "--listen", &addrs[i]])
            .args(["--admin-listen", &format!("127.0.0.1:{}", ports[3 * i + 1])])
            .args(["--peer-listen", &peer_addrs[i]])
            .args([
                "--peers",
                &peers,
                "--replication-factor",
                &rf.to_string(),
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .context("start cache-node")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        guards.push(Guard(child));
        if line.is_empty() {
            bail!("node-{i} did not start (port taken?)");
        }
    }
    Ok((guards, addrs))
}

/// `cargo xtask bench cluster`: a 3-node local cluster; smart client vs one address, and
/// replication factor 1 vs 3 for ONE writes. Nodes and load share the machine's cores.
pub(crate) fn bench_cluster() -> Result<()> {
    let node_bin = build_release()?;
    let node_bin = node_bin.as_str();
    let common = [
        "--keys",
        "100000",
        "--value-size",
        "64",
        "--concurrency",
        "50",
        "--connections",
        "4",
        "--duration",
        "8s",
        "--warmup",
        "2s",
    ];
    println!(
        "\n3-node cluster on one machine (nodes and cache-bench share 2 cores), 100k keys, 64 B values, 50 in flight\n"
    );
    println!("| scenario | keys/s | get p99 ms | set p99 ms |");
    println!("| --- | ---: | ---: | ---: |");
    let row = |name: &str, v: &Value| {
        println!(
            "| {name} | {:.0} | {:.3} | {:.3} |",
            f(v, &["keys_per_second"]),
            f(v, &["get", "p99_ms"]),
            f(v, &["set", "p99_ms"])
        );
    };
    // RF 1, so that the one-address client really makes node-0 forward two thirds of the
    // requests (with RF 3 on 3 nodes every node replicates every key and serves it itself).
    let (guards, addrs) = start_cluster(node_bin, 3, 1)?;
    let mut reads: Vec<&str> = common.to_vec();
    reads.extend(["--ratio", "1:0", "--prefill"]);
    let smart = bench(&format!("grpc+cluster://{}", addrs.join(",")), &reads)?;
    let single = bench(&format!("grpc://{}", addrs[0]), &reads)?;
    row("reads, smart client (RF 1)", &smart);
    row("reads, one address, node-0 forwards 2/3 (RF 1)", &single);
    drop(guards);
    let mut writes: Vec<&str> = common.to_vec();
    writes.extend(["--ratio", "0:1"]);
    let mut write_rates = Vec::new();
    for rf in [1usize, 3] {
        let (guards, addrs) = start_cluster(node_bin, 3, rf)?;
        let v = bench(&format!("grpc+cluster://{}", addrs.join(",")), &writes)?;
        row(&format!("ONE writes, smart client, RF {rf}"), &v);
        write_rates.push(f(&v, &["keys_per_second"]));
        drop(guards);
    }
    println!(
        "\nsmart ÷ one-address reads: {:.2}   RF 3 ÷ RF 1 ONE writes: {:.2}",
        f(&smart, &["keys_per_second"]) / f(&single, &["keys_per_second"]),
        write_rates[1] / write_rates[0]
    );
    Ok(())
}

/// `QUORUM` latency with one replica paused (SIGSTOP) against all healthy, same run: a
/// 3-node cluster with RF 3, requests through node-0 (which forwards and coordinates), a
/// 1:1 get:set mix at `--consistency quorum`; then node-2 is stopped and the same load runs
/// again.
pub(crate) fn bench_pause() -> Result<()> {
    let node_bin = build_release()?;
    let (guards, addrs) = start_cluster(&node_bin, 3, 3)?;
    let target = format!("grpc://{}", addrs[0]);
    let common = [
        "--keys",
        "20000",
        "--value-size",
        "64",
        "--concurrency",
        "16",
        "--connections",
        "2",
        "--ratio",
        "1:1",
        "--consistency",
        "quorum",
        "--duration",
        "8s",
        "--warmup",
        "2s",
    ];
    let mut first: Vec<&str> = common.to_vec();
    first.push("--prefill");
    let healthy = bench(&target, &first)?;
    let paused_pid = guards[2].0.id().to_string();
    let stop = Command::new("kill").args(["-STOP", &paused_pid]).status()?;
    if !stop.success() {
        bail!("could not SIGSTOP node-2");
    }
    let paused = bench(&target, &common);
    let _ = Command::new("kill").args(["-CONT", &paused_pid]).status();
    let paused = paused?;
    drop(guards);
    println!(
        "\nQUORUM reads and writes (1:1) through node-0 of 3 (RF 3), 16 in flight: all healthy vs node-2 SIGSTOPped\n"
    );
    println!("| scenario | keys/s | get p99 ms | set p99 ms | get max ms | set max ms | errors |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (name, v) in [("all healthy", &healthy), ("node-2 paused", &paused)] {
        println!(
            "| {name} | {:.0} | {:.3} | {:.3} | {:.1} | {:.1} | {:.0} |",
            f(v, &["keys_per_second"]),
            f(v, &["get", "p99_ms"]),
            f(v, &["set", "p99_ms"]),
            f(v, &["get", "max_ms"]),
            f(v, &["set", "max_ms"]),
            f(v, &["errors"]),
        );
    }
    println!(
        "\npaused ÷ healthy: get p99 {:.2}, set p99 {:.2}, throughput {:.2}",
        f(&paused, &["get", "p99_ms"]) / f(&healthy, &["get", "p99_ms"]),
        f(&paused, &["set", "p99_ms"]) / f(&healthy, &["set", "p99_ms"]),
        f(&paused, &["keys_per_second"]) / f(&healthy, &["keys_per_second"]),
    );
    Ok(())
}

/// One `redis-benchmark` run on CPU 1 against `addr`: requests per second.
fn redis_benchmark(addr: &str, test: &str, pipeline: u32, requests: u32) -> Result<f64> {
    let (host, port) = addr.rsplit_once(':').context("host:port")?;
    let out = pinned("1", "redis-benchmark")
        .args([
            "-h", host, "-p", port, "-c", "50", "-r", "100000", "-d", "64",
        ])
        .args(["-P", &pipeline.to_string(), "-n", &requests.to_string()])
        .args(["-t", test, "--csv"])
        .output()
        .context("run redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // `"test","rps",...` then `"SET","80160.33",...`
    text.lines()
        .filter_map(|l| l.split(',').nth(1))
        .find_map(|rps| rps.trim_matches('"').parse::<f64>().ok())
        .with_context(|| format!("no rate in redis-benchmark output {text:?}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The RESP rows: `redis-benchmark` (not our load generator) against cache-node's RESP
/// port and against redis-server, 50 connections, 64-byte values over 100k random keys,
/// pipeline 1 and 16; three alternating rounds, medians. With `baseline` (an older
/// `cache-node` binary), that node is measured in the same rounds too.
pub(crate) fn bench_resp(node_bin: &str, baseline: Option<&str>) -> Result<()> {
    if !has("redis-benchmark") || !has("redis-server") {
        eprintln!(
            "redis-benchmark or redis-server missing (apt-get install redis-server redis-tools): no RESP rows"
        );
        return Ok(());
    }
    let (node, line, _) = spawn_node_line(node_bin, &["--resp-listen", "127.0.0.1:0"])?;
    let resp = field(&line, "resp=")?;
    let before = match baseline {
        Some(bin) => {
            let (node, line, _) = spawn_node_line(bin, &["--resp-listen", "127.0.0.1:0"])?;
            Some((node, field(&line, "resp=")?))
        }
        None => None,
    };
    let Some((redis, addr)) = start_redis()? else {
        return Ok(());
    };
    println!(
        "\nRESP: redis-benchmark on CPU 1 (-c 50 -r 100000 -d 64) against cache-node's RESP port and redis-server, each on CPU 0; medians of 3 alternating rounds\n"
    );
    match baseline {
        None => {
            println!(
                "| command | pipeline | cache-node req/s | redis-server req/s | node ÷ redis |"
            );
            println!("| --- | ---: | ---: | ---: | ---: |");
        }
        Some(bin) => {
            println!("baseline: {bin}\n");
            println!(
                "| command | pipeline | cache-node req/s | redis-server req/s | node ÷ redis | baseline req/s | baseline ÷ redis |"
            );
            println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        }
    }
    for (test, pipeline, requests) in [
        ("set", 1, 300_000),
        ("get", 1, 300_000),
        ("set", 16, 2_000_000),
        ("get", 16, 2_000_000),
    ] {
        let (mut ours, mut theirs, mut older) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            ours.push(redis_benchmark(&resp, test, pipeline, requests)?);
            theirs.push(redis_benchmark(&addr, test, pipeline, requests)?);
            if let Some((_, addr)) = &before {
                older.push(redis_benchmark(addr, test, pipeline, requests)?);
            }
        }
        let (o, t) = (median(ours), median(theirs));
        let extra = if older.is_empty() {
            String::new()
        } else {
            let b = median(older);
            format!(" {b:.0} | {:.2} |", b / t)
        };
        println!(
            "| {} | {pipeline} | {o:.0} | {t:.0} | {:.2} |{extra}",
            test.to_uppercase(),
            o / t
        );
    }
    drop(node);
    drop(before);
    drop(redis);
    Ok(())
}
