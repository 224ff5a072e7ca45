//! `cargo xtask bench rebalance [--keys N] [--sync-rate R]`: keeping N copies with real
//! processes. Five release nodes with gossip membership and RF 3 are loaded with N keys at
//! `ALL` (every key on its three replicas). Then:
//!
//! 1. **Death**: `kill -9` node-4; time until membership declared it dead and every key has
//!    three live copies again (the survivors' item counts add up to 3 N and none is
//!    syncing), with the bytes anti-entropy moved.
//! 2. **Join under read load**: a 6th node joins while `cache-bench` reads every key at
//!    `ONE` through a ring-aware client; the hit ratio must stay 1 (no miss during the
//!    join); keys and bytes moved are compared with the ideal (the new node's share).
//! 3. **At rest**: anti-entropy rounds over 30 s with nothing to repair, and the digest
//!    bytes they cost (computed: each exchange sends 1 024 × 8 bytes and gets a reply of
//!    a few bytes).
//!
//! Every process runs on the same cores; the figures are for this machine only.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::root;

struct Node {
    child: Child,
    grpc: String,
    admin: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start(bin: &str, id: usize, join: Option<&str>, extra: &[String]) -> Result<(Node, String)> {
    let gossip = format!("127.0.0.1:{}", free_port()?);
    let mut cmd = Command::new(bin);
    cmd.args(["--node-id", &format!("node-{id}")])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--peer-listen", "127.0.0.1:0", "--gossip-listen", &gossip])
        .args(["--membership", "gossip", "--replication-factor", "3"])
        .args(["--log-level", "warn", "--max-memory", "4GiB"])
        .args(extra);
    if let Some(seed) = join {
        cmd.args(["--join", seed]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("start cache-node")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(str::to_string)
    };
    let (Some(grpc), Some(admin)) = (field("grpc="), field("admin=")) else {
        bail!("node-{id} printed no startup line: {line:?}");
    };
    Ok((Node { child, grpc, admin }, gossip))
}

/// `GET /metrics` of one node.
pub(crate) fn metrics(admin: &str) -> Result<String> {
    let mut s = std::net::TcpStream::connect(admin)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

pub(crate) fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn sum(nodes: &[&Node], series: &str) -> Result<f64> {
    let mut total = 0.0;
    for n in nodes {
        total += metric(&metrics(&n.admin)?, series);
    }
    Ok(total)
}

/// Polls until `check` holds, at most `limit`; returns how long it took.
fn wait(what: &str, limit: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if check()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn synced(nodes: &[&Node], alive: f64, items: f64) -> Result<bool> {
    for n in nodes {
        let m = metrics(&n.admin)?;
        if metric(&m, "cache_sync_syncing") != 0.0
            || metric(&m, "cache_members{state=\"alive\"}") != alive
        {
            return Ok(false);
        }
    }
    Ok(sum(nodes, "cache_items")? >= items)
}

fn moved(nodes: &[&Node]) -> Result<(f64, f64)> {
    Ok((
        sum(nodes, "cache_sync_keys_total{direction=\"pulled\"}")?
            + sum(nodes, "cache_sync_keys_total{direction=\"pushed\"}")?,
        sum(nodes, "cache_sync_bytes_total")?,
    ))
}

pub(crate) fn bench_rebalance(keys: u64, sync_rate: Option<&str>) -> Result<()> {
    let bin = crate::net::build_release()?;
    let bench = root().join("target/release/cache-bench");
    let extra: Vec<String> = sync_rate
        .map(|r| vec!["--sync-rate".to_string(), r.to_string()])
        .unwrap_or_default();
    let (first, seed) = start(&bin, 0, None, &extra)?;
    let mut nodes = vec![first];
    for i in 1..5 {
        nodes.push(start(&bin, i, Some(&seed), &extra)?.0);
    }
    let all: Vec<&Node> = nodes.iter().collect();
    wait("5 alive", Duration::from_secs(30), || {
        synced(&all, 5.0, 0.0)
    })?;
    let target = format!(
        "grpc+cluster://{}",
        nodes
            .iter()
            .map(|n| n.grpc.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    let value_size = 64u64;
    let load = Instant::now();
    let out = Command::new(&bench)
        .args(["--target", &target, "--keys", &keys.to_string()])
        .args(["--value-size", &value_size.to_string(), "--prefill"])
        .args(["--duration", "0s", "--consistency", "all", "--json"])
        .output()
        .context("cache-bench prefill")?;
    if !out.status.success() {
        bail!("prefill failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let copies = 3.0 * keys as f64;
    let loaded = sum(&all, "cache_items")?;
    println!(
        "loaded {keys} keys × 3 replicas ({loaded} items) in {:.1?}",
        load.elapsed()
    );
    if loaded < copies {
        bail!("only {loaded} of {copies} copies after a prefill at ALL");
    }

    // 1. Death.
    let mut victim = nodes.remove(4);
    let survivors: Vec<&Node> = nodes.iter().collect();
    let before = moved(&survivors)?;
    victim.child.kill()?;
    let restored = wait(
        "3 copies again after kill -9",
        Duration::from_secs(600),
        || synced(&survivors, 4.0, copies),
    )?;
    let after = moved(&survivors)?;
    println!(
        "\nkill -9 node-4: every key has 3 live copies again after {:.1} s (detection included); \
         anti-entropy moved {:.0} keys, {:.1} MiB",
        restored.as_secs_f64(),
        after.0 - before.0,
        (after.1 - before.1) / f64::from(1 << 20)
    );

    // 2. Join under read load.
    let (joiner, _) = start(&bin, 5, Some(&seed), &extra)?;
    let readers = {
        let mut cmd = Command::new(&bench);
        cmd.args(["--target", &target, "--keys", &keys.to_string()])
            .args([
                "--ratio",
                "1:0",
                "--consistency",
                "one",
                "--concurrency",
                "16",
            ])
            .args(["--duration", "15s", "--warmup", "0s", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().context("cache-bench readers")?
    };
    let mut members: Vec<&Node> = nodes.iter().collect();
    members.push(&joiner);
    let before = moved(&members)?;
    let joined = wait("the 6th node synced", Duration::from_secs(600), || {
        synced(&members, 5.0, copies)
    })?;
    let after = moved(&members)?;
    let reads = readers.wait_with_output()?;
    let v: serde_json::Value =
        serde_json::from_slice(&reads.stdout).context("cache-bench readers --json")?;
    let held = metric(&metrics(&joiner.admin)?, "cache_items");
    let ideal_keys = copies / 5.0;
    let ideal_bytes = ideal_keys * (value_size as f64 + 8.0);
    println!(
        "\nnode-5 joined under reads at ONE: synced after {:.1} s; it holds {held:.0} keys \
         (ideal 3/5 of {keys} = {ideal_keys:.0}); moved {:.0} keys ({:.2}× ideal), {:.1} MiB \
         ({:.2}× ideal); readers: {:.0} reads/s, hit ratio {:.6}, p99 {:.2} ms, errors {}",
        joined.as_secs_f64(),
        after.0 - before.0,
        (after.0 - before.0) / ideal_keys,
        (after.1 - before.1) / f64::from(1 << 20),
        (after.1 - before.1) / ideal_bytes,
        v["keys_per_second"].as_f64().unwrap_or(0.0),
        v["get_hit_ratio"].as_f64().unwrap_or(0.0),
        v["get"]["p99_ms"].as_f64().unwrap_or(0.0),
        v["errors"]
    );

    // 3. At rest.
    let rounds = sum(&members, "cache_sync_rounds_total")?;
    std::thread::sleep(Duration::from_secs(30));
    let rounds = sum(&members, "cache_sync_rounds_total")? - rounds;
    let (moved_at_rest, _) = moved(&members)?;
    // Each round: one exchange per peer (4), each sending 1 024 digests of 8 bytes.
    let digest_bytes = rounds * 4.0 * 8.0 * 1024.0;
    println!(
        "\nat rest, 30 s: {rounds:.0} rounds on 5 nodes, {:.0} keys moved, digests ≈ {:.0} bytes/s per node",
        moved_at_rest - after.0,
        digest_bytes / 30.0 / 5.0
    );
    Ok(())
}
