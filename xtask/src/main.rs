//! Developer tasks, run as `cargo xtask <task>` (the alias lives in `.cargo/config.toml`).
//!
//! - `cargo xtask ci`: exactly what CI runs (`.ci/run` calls this): `cargo fmt --check`,
//!   `cargo clippy --workspace --all-targets -- -D warnings`, `cargo test --workspace`.
//! - `cargo xtask bench engine`: the engine benchmarks against moka, quick_cache and
//!   lru+Mutex, then one table of ratios.
//! - `cargo xtask bench ring`: the ring lookup benchmarks against `hash % N` and jump hash.
//! - `cargo xtask bench resp [--baseline BIN]`: only the RESP rows of `bench net`
//!   (redis-benchmark against cache-node's RESP port and redis-server; with `--baseline`,
//!   also against another cache-node binary in the same rounds).
//! - `cargo xtask bench memory [--node BIN]`: RSS holding 1M small entries against redis-server, and RSS
//!   against `--max-memory 64MiB` after ~1.7 GB of mixed-size overwrites.
//! - `cargo xtask bench cluster`: a 3-node cluster: smart vs one-address client, RF 1 vs 3.
//! - `cargo xtask bench rebalance [--keys N [--sync-rate R]]`: keeping N copies with 5 real
//!   gossip nodes: restore after `kill -9`, a join under read load, anti-entropy at rest
//!   (see `rebalance.rs`).
//! - `cargo xtask bench persist [--keys N]`: appendfsync write throughput, recovery time and
//!   snapshot cost against redis-server with the same settings (see `persist.rs`).
//! - `cargo xtask bench pause`: `QUORUM` latency with one of 3 replicas SIGSTOPped vs all
//!   healthy, same run.
//! - `cargo xtask cluster up N`: N local nodes (gRPC 127.0.0.1:7000.., admin :7080..) that
//!   know each other; Ctrl-C stops them all.
//! - `cargo xtask bench net [--baseline BIN]`: cache-node against redis-server over loopback,
//!   same workload, server on CPU 0 and load generator on CPU 1 (see `docs/benchmarks.md`);
//!   with `--baseline`, also against another cache-node binary (an older build).
//! - `cargo xtask sim --seeds N [--start S]`: the cluster core's randomized simulation over
//!   seeds `S..S+N` (default 0), in release mode; a failure prints its seed and how to
//!   replay it (`SIM_SEED=...`). CI runs the first 200 seeds in debug mode as part of the
//!   test suite.
//!
//! Tasks are Rust rather than shell so they run the same everywhere cargo does.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

mod docker;
mod net;
mod persist;
mod prom;
mod rebalance;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["ci"] => ci(),
        ["prometheus"] => prom::check(),
        ["docker", "build"] => docker::build().map(drop),
        ["docker", "chaos"] => docker::chaos(),
        ["bench", "engine"] => bench_engine(),
        ["bench", "ring"] => bench_ring(),
        ["bench", "net"] => net::bench_net(None),
        ["bench", "net", "--baseline", bin] => net::bench_net(Some(bin)),
        ["bench", "resp"] => net::bench_resp(&net::build_release()?, None),
        ["bench", "resp", "--baseline", bin] => net::bench_resp(&net::build_release()?, Some(bin)),
        ["bench", "memory"] => net::bench_memory(&net::build_release()?),
        ["bench", "memory", "--node", bin] => {
            net::build_release()?;
            net::bench_memory(bin)
        }
        ["bench", "cluster"] => net::bench_cluster(),
        ["bench", "pause"] => net::bench_pause(),
        ["bench", "persist"] => persist::bench_persist(1_000_000),
        ["bench", "persist", "--keys", n] => {
            persist::bench_persist(n.parse().context("--keys takes a number")?)
        }
        ["bench", "rebalance"] => rebalance::bench_rebalance(100_000, None),
        ["bench", "rebalance", "--keys", n] => {
            rebalance::bench_rebalance(n.parse().context("--keys N: N is a number")?, None)
        }
        ["bench", "rebalance", "--keys", n, "--sync-rate", r] => {
            rebalance::bench_rebalance(n.parse().context("--keys N: N is a number")?, Some(r))
        }
        ["cluster", "up", n] => cluster_up(n.parse().context("cluster up N: N is a number")?),
        ["sim", "--seeds", n] => sim(n, "0"),
        ["sim", "--seeds", n, "--start", s] | ["sim", "--start", s, "--seeds", n] => sim(n, s),
        _ => {
            eprintln!(
                "usage: cargo xtask ci | bench engine | bench ring | bench net [--baseline BIN] | bench cluster | bench pause | bench rebalance [--keys N [--sync-rate R]] | cluster up N | sim --seeds N [--start S]"
            );
            bail!("unknown task {args:?}")
        }
    }
}

/// Runs the randomized cluster simulation over `count` seeds from `start`, in release mode.
fn sim(count: &str, start: &str) -> Result<()> {
    let count: u64 = count.parse().context("sim --seeds N: N is a number")?;
    let start: u64 = start.parse().context("sim --start S: S is a number")?;
    eprintln!("simulating seeds {start}..{}", start + count);
    let began = std::time::Instant::now();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "test",
            "--release",
            "-p",
            "cluster-core",
            "--test",
            "random",
            "--",
            "--nocapture",
        ])
        .env("SIM_SEEDS", count.to_string())
        .env("SIM_SEED_START", start.to_string())
        .current_dir(root())
        .status()
        .context("cannot run cargo test")?;
    if !status.success() {
        bail!("the simulation failed ({status}); its seed is printed above");
    }
    eprintln!("{count} seeds passed in {:.1?}", began.elapsed());
    Ok(())
}

/// The workspace root (xtask lives one level below it).
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// The cargo that runs this xtask.
fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs `cargo <args>` in the workspace root, failing if it fails.
pub(crate) fn cargo(args: &[&str]) -> Result<()> {
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(cargo_bin())
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn ci() -> Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&["test", "--workspace"])?;
    one_thread_nodes()?;
    docs()?;
    deny()?;
    Ok(())
}

/// The test targets that start real `cache-node` processes (cache-node's, the CLI's and
/// the load generator's).
const REAL_PROCESS_TESTS: &[&str] = &[
    "auth",
    "cluster",
    "deploy",
    "gossip",
    "limits",
    "node",
    "persistence",
    "pipeline",
    "resp",
    "sdk",
    "tls",
    "cli",
    "bench",
];

/// The real-process tests again, with every node they start on one thread
/// (`CACHE_WORKER_THREADS=1`: the current-thread runtime a node picks when it has one CPU,
/// as in a container limited to one core), so cluster behaviour, shutdown and both front
/// ends are proven on that runtime as well as on the work-stealing one.
fn one_thread_nodes() -> Result<()> {
    // Named test targets of the whole workspace, not `-p cache-node`: the same feature
    // set as the full run, so nothing is compiled again. (`persistence` also names
    // cache-persist's in-process tests; they run again too, in seconds.)
    let mut args = vec!["test", "--workspace"];
    for target in REAL_PROCESS_TESTS {
        args.extend(["--test", target]);
    }
    eprintln!("$ CACHE_WORKER_THREADS=1 cargo {}", args.join(" "));
    let status = Command::new(cargo_bin())
        .current_dir(root())
        .env("CACHE_WORKER_THREADS", "1")
        .args(&args)
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!("the real-process tests failed on one-thread nodes");
    }
    Ok(())
}

/// `cargo doc` with warnings as errors: every public item documented, no broken links.
fn docs() -> Result<()> {
    let status = Command::new(cargo_bin())
        .current_dir(root())
        .env("RUSTDOCFLAGS", "-D warnings")
        .args(["doc", "--workspace", "--no-deps"])
        .status()
        .context("running cargo doc")?;
    if !status.success() {
        bail!("cargo doc -D warnings failed");
    }
    Ok(())
}

/// `cargo deny check` of licenses, bans and sources (deny.toml), installing cargo-deny
/// from crates.io first if this machine lacks it. Advisories are not checked here: their
/// database is fetched from GitHub, which CI machines cannot reach; run
/// `cargo deny check advisories` where it can.
fn deny() -> Result<()> {
    let have = Command::new(cargo_bin())
        .args(["deny", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        eprintln!("cargo-deny is not installed: installing it from crates.io (a few minutes)");
        cargo(&["install", "--locked", "cargo-deny@0.20.2"])?;
    }
    cargo(&[
        "deny",
        "--workspace",
        "check",
        "licenses",
        "bans",
        "sources",
    ])
}

/// Mean time per iteration (ns) of a criterion benchmark, from its `estimates.json`.
fn criterion_mean_ns(group: &str, id: &str) -> Result<f64> {
    let path = root()
        .join("target/criterion")
        .join(group)
        .join(id)
        .join("new/estimates.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    // {"mean":{"confidence_interval":{...},"point_estimate":123.4,...
    let mean = text.find("\"mean\"").context("no mean in estimates.json")?;
    let rest = &text[mean..];
    let pe = rest
        .find("\"point_estimate\":")
        .context("no point_estimate")?;
    let num: String = rest[pe + "\"point_estimate\":".len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
        .collect();
    num.parse()
        .with_context(|| format!("bad number {num:?} in {}", path.display()))
}

/// Prints `ours` against each peer as a ratio of throughput (higher is better for us).
fn ratio_table(
    title: &str,
    group: &str,
    ours: &str,
    peers: &[&str],
    elements_per_iter: f64,
) -> Result<()> {
    println!("\n{title}");
    println!(
        "{:<28} {:>14} {:>18}",
        "implementation",
        "Mops/s",
        format!("{ours} ÷ peer")
    );
    let ours_ns = criterion_mean_ns(group, ours)?;
    for name in std::iter::once(&ours).chain(peers) {
        let ns = criterion_mean_ns(group, name)?;
        let mops = elements_per_iter / ns * 1e3;
        println!("{:<28} {:>14.2} {:>17.2}x", name, mops, ns / ours_ns);
    }
    Ok(())
}

fn bench_engine() -> Result<()> {
    cargo(&["bench", "-p", "cache-core", "--bench", "engine"])?;
    cargo(&["bench", "-p", "cache-core", "--bench", "engine_report"])?;
    let peers = ["cache-core-sieve", "quick_cache", "moka", "lru_mutex"];
    // Must match OPS_PER_ITER in crates/cache-core/benches/engine.rs.
    let ops = 10_000.0;
    ratio_table(
        "throughput, 1 thread (zipf 0.99, 90% get)",
        "throughput_1_thread",
        "cache-core",
        &peers,
        ops,
    )?;
    ratio_table(
        "throughput, 2 threads (zipf 0.99, 90% get)",
        "throughput_2_threads",
        "cache-core",
        &peers,
        ops,
    )?;
    ratio_table("get hit, 1 thread", "get_hit", "cache-core", &peers, 1.0)?;
    Ok(())
}

fn bench_ring() -> Result<()> {
    cargo(&["bench", "-p", "cluster-ring", "--bench", "ring"])?;
    for members in ["10", "100"] {
        let group = format!("lookup_{members}_members");
        ratio_table(
            &format!("lookup, {members} members (lookups per second; ratio = ring ÷ baseline)"),
            &group,
            "ring_owner",
            &["ring_replicas_3", "mod_n", "jump_hash"],
            1.0,
        )?;
    }
    Ok(())
}

/// Starts `n` release nodes on 127.0.0.1:7000+i (admin 7080+i) with static membership and
/// waits; Ctrl-C (which reaches the nodes too) shuts them down gracefully.
fn cluster_up(n: usize) -> Result<()> {
    if !(1..=10).contains(&n) {
        bail!("cluster up takes 1 to 10 nodes");
    }
    crate::net::build_release_bins(&["cache-node", "cache-cli"])?;
    let bin = root().join("target/release/cache-node");
    let peers: Vec<String> = (0..n)
        .map(|i| format!("node-{i}=127.0.0.1:{}", 7000 + i))
        .collect();
    let peers = peers.join(",");
    let mut children = Vec::new();
    for i in 0..n {
        let child = Command::new(&bin)
            .args(["--node-id", &format!("node-{i}")])
            .args(["--listen", &format!("127.0.0.1:{}", 7000 + i)])
            .args(["--admin-listen", &format!("127.0.0.1:{}", 7080 + i)])
            .args(["--peers", &peers, "--max-memory", "256MiB"])
            .spawn()
            .with_context(|| format!("start node-{i}"))?;
        children.push(child);
    }
    let seeds: Vec<String> = (0..n).map(|i| format!("127.0.0.1:{}", 7000 + i)).collect();
    eprintln!(
        "\n{n} nodes up. Try:\n  target/release/cache-cli --seeds {seeds} set greeting hello\n  \
         target/release/cache-cli --seeds {seeds} members\n  open http://127.0.0.1:7080/status\nCtrl-C stops them.\n",
        seeds = seeds.join(",")
    );
    let mut failed = false;
    for mut child in children {
        failed |= !child.wait().is_ok_and(|s| s.success());
    }
    if failed {
        bail!("a node exited with an error (see its output above)");
    }
    Ok(())
}
