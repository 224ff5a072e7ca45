//! `cargo xtask docker build` makes the container image with no registry (`FROM scratch`
//! plus the release binaries and the shared libraries they load); `cargo xtask docker
//! chaos` runs the 3-node gossip cluster of `deploy/docker/compose.yml` and breaks it: a
//! container killed, a node partitioned, every node restarted in turn, checking through
//! `cache-cli` that it keeps serving and loses no acknowledged `QUORUM` write.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::root;

/// The image's name.
pub(crate) const IMAGE: &str = "cache-cluster";

/// Builds the image; returns its tag (`cache-cluster:VERSION`, also tagged `latest`).
pub(crate) fn build() -> Result<String> {
    crate::net::build_release_bins(&["cache-node", "cache-cli"])?;
    let ctx = root().join("target/docker");
    let _ = std::fs::remove_dir_all(&ctx);
    let rootfs = ctx.join("rootfs");
    std::fs::create_dir_all(rootfs.join("usr/local/bin"))?;
    std::fs::create_dir_all(ctx.join("data"))?;
    let mut libs = BTreeSet::new();
    for bin in ["cache-node", "cache-cli"] {
        let path = root().join("target/release").join(bin);
        let staged = rootfs.join("usr/local/bin").join(bin);
        std::fs::copy(&path, &staged).with_context(|| format!("copying {}", path.display()))?;
        // The release profile keeps line tables for profiling; the image does not need
        // them (symbols stay, so backtraces still name functions).
        if crate::net::has("strip") {
            run(Command::new("strip").arg("--strip-debug").arg(&staged))?;
        }
        libs.extend(shared_libraries(&path)?);
    }
    for lib in &libs {
        let dest = rootfs.join(lib.strip_prefix("/").unwrap_or(lib));
        std::fs::create_dir_all(dest.parent().context("a library path has a parent")?)?;
        // Copy the file itself, under the name the loader asks for.
        std::fs::copy(lib, &dest).with_context(|| format!("copying {}", lib.display()))?;
    }
    std::fs::create_dir_all(rootfs.join("etc"))?;
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\ncache:x:10001:10001:cache-node:/data:/sbin/nologin\n",
    )?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\ncache:x:10001:\n")?;
    std::fs::create_dir_all(rootfs.join("tmp"))?;
    std::fs::copy(
        root().join("deploy/docker/Dockerfile"),
        ctx.join("Dockerfile"),
    )?;
    let version = env!("CARGO_PKG_VERSION");
    let tag = format!("{IMAGE}:{version}");
    run(Command::new("docker").args([
        "build",
        "--tag",
        &tag,
        "--tag",
        &format!("{IMAGE}:latest"),
        ctx.to_str().context("utf-8 path")?,
    ]))?;
    println!(
        "built {tag} from {} shared libraries: {}",
        libs.len(),
        libs.iter()
            .map(|l| l.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(tag)
}

/// The shared libraries `bin` loads, as absolute paths (from `ldd`).
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Polls `check` every 250 ms until it is true or `within` has passed.
pub(crate) fn wait_for(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if check() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!("{what}: not within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `docker-compose` (v1) if installed, else `docker compose` (v2).
fn compose() -> Command {
    if crate::net::has("docker-compose") {
        Command::new("docker-compose")
    } else {
        let mut c = Command::new("docker");
        c.arg("compose");
        c
    }
}

const PROJECT: &str = "cachechaos";
const NODES: [(&str, &str); 3] = [
    ("node-1", "172.28.45.11"),
    ("node-2", "172.28.45.12"),
    ("node-3", "172.28.45.13"),
];

/// Stops and removes the compose project when dropped, even when a check failed.
struct Project(PathBuf);

impl Project {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = compose();
        c.arg("-f").arg(&self.0).args(["-p", PROJECT]).args(args);
        c
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self
            .cmd(&["down", "--volumes", "--remove-orphans", "--timeout", "5"])
            .output();
    }
}

/// The container of a compose service.
fn container(service: &str) -> Result<String> {
    let out = run(Command::new("docker").args([
        "ps",
        "-aq",
        "--filter",
        &format!("label=com.docker.compose.project={PROJECT}"),
        "--filter",
        &format!("label=com.docker.compose.service={service}"),
    ]))?;
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if id.is_empty() {
        bail!("no container for {service}");
    }
    Ok(id)
}

/// The network the project's nodes share.
fn network() -> Result<String> {
    let out = run(Command::new("docker").args([
        "network",
        "ls",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={PROJECT}"),
    ]))?;
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if id.is_empty() {
        bail!("no network for {PROJECT}");
    }
    Ok(id)
}

/// Runs the host's `cache-cli` with `args`.
fn cli(args: &[&str]) -> Output {
    let bin = root().join("target/release/cache-cli");
    Command::new(bin)
        .args(["--timeout", "2s"])
        .args(args)
        .env_remove("CACHE_ADDR")
        .env_remove("CACHE_SEEDS")
        .output()
        .unwrap_or_else(|e| panic!("cache-cli: {e}"))
}

/// States of every member as `addr` sees them (id -> state).
fn states(addr: &str) -> Option<std::collections::BTreeMap<String, String>> {
    let out = cli(&["--addr", addr, "--json", "info"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v["members"]
            .as_array()?
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap_or("").to_string(),
                    m["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect(),
    )
}

fn grpc(ip: &str) -> String {
    format!("{ip}:7000")
}

/// Whether every node in `observers` sees every member of `NODES` alive.
fn all_alive(observers: &[&str]) -> bool {
    observers.iter().all(|ip| {
        states(&grpc(ip)).is_some_and(|s| {
            NODES
                .iter()
                .all(|(id, _)| s.get(*id).is_some_and(|st| st == "alive"))
        })
    })
}

fn seeds(ips: &[&str]) -> String {
    ips.iter().map(|ip| grpc(ip)).collect::<Vec<_>>().join(",")
}

/// Writes `keys` with QUORUM through `seeds`; returns the ones acknowledged.
fn write_quorum(seeds: &str, keys: impl Iterator<Item = String>) -> Vec<String> {
    keys.filter(|k| {
        cli(&[
            "--seeds",
            seeds,
            "--consistency",
            "quorum",
            "set",
            k,
            &format!("v-{k}"),
        ])
        .status
        .success()
    })
    .collect()
}

/// Keys of `keys` that a QUORUM read through `seeds` does not return with their value.
fn lost(seeds: &str, keys: &[String]) -> Vec<String> {
    keys.iter()
        .filter(|k| {
            let o = cli(&["--seeds", seeds, "--consistency", "quorum", "get", k]);
            !(o.status.success() && o.stdout == format!("v-{k}").as_bytes())
        })
        .cloned()
        .collect()
}

/// The chaos run.
pub(crate) fn chaos() -> Result<()> {
    build()?;
    let project = Project(root().join("deploy/docker/compose.yml"));
    // A leftover from an interrupted run would hold the subnet.
    let _ = project
        .cmd(&["down", "--volumes", "--remove-orphans", "--timeout", "1"])
        .output();
    run(&mut project.cmd(&["up", "-d"]))?;
    let ips: Vec<&str> = NODES.iter().map(|(_, ip)| *ip).collect();
    let all = seeds(&ips);
    let took = wait_for(
        "3 nodes up and alive to each other",
        Duration::from_secs(60),
        || all_alive(&ips),
    )?;
    println!("cluster formed: 3 members alive on every node after {took:.1?}");

    // 1. Kill a container: detected, and the keys are still served.
    let acked = write_quorum(&all, (0..100).map(|i| format!("before-kill-{i}")));
    if acked.len() != 100 {
        bail!(
            "only {} of 100 QUORUM writes acknowledged on a healthy cluster",
            acked.len()
        );
    }
    let victim = container("node-3")?;
    run(Command::new("docker").args(["kill", "--signal", "KILL", &victim]))?;
    let took = wait_for("node-3 declared dead", Duration::from_secs(30), || {
        ["172.28.45.11", "172.28.45.12"].iter().all(|ip| {
            states(&grpc(ip)).is_some_and(|s| s.get("node-3").is_some_and(|st| st == "dead"))
        })
    })?;
    let survivors = seeds(&["172.28.45.11", "172.28.45.12"]);
    let missing = lost(&survivors, &acked);
    println!(
        "kill -9 node-3: dead on both survivors after {took:.1?}; {} of {} acknowledged keys served by the survivors",
        acked.len() - missing.len(),
        acked.len()
    );
    if !missing.is_empty() {
        bail!("keys lost after a kill: {missing:?}");
    }
    run(Command::new("docker").args(["start", &victim]))?;
    let took = wait_for("node-3 back", Duration::from_secs(60), || all_alive(&ips))?;
    println!("node-3 restarted: alive everywhere after {took:.1?}");

    // 2. Partition node-3: the majority keeps serving QUORUM; the cluster heals.
    let net = network()?;
    let victim = container("node-3")?;
    run(Command::new("docker").args(["network", "disconnect", &net, &victim]))?;
    let during = write_quorum(&survivors, (0..100).map(|i| format!("partition-{i}")));
    println!(
        "node-3 partitioned: {} of 100 QUORUM writes acknowledged by the majority",
        during.len()
    );
    if during.len() != 100 {
        bail!("the majority refused QUORUM writes during the partition");
    }
    run(Command::new("docker").args([
        "network",
        "connect",
        "--ip",
        "172.28.45.13",
        &net,
        &victim,
    ]))?;
    let took = wait_for("partition healed", Duration::from_secs(60), || {
        all_alive(&ips)
    })?;
    let converged = wait_for("node-3 converged", Duration::from_secs(120), || {
        during.iter().step_by(10).all(|k| {
            let o = cli(&["--seeds", &all, "--json", "locate", k]);
            serde_json::from_slice::<serde_json::Value>(&o.stdout).is_ok_and(|v| {
                v["replicas"]
                    .as_array()
                    .is_some_and(|r| r.len() == 3 && r.iter().all(|x| x["holds"] == "value"))
            })
        })
    })?;
    println!(
        "partition healed after {took:.1?}; every sampled key on all 3 replicas {converged:.1?} later"
    );
    let missing = lost(&all, &during);
    if !missing.is_empty() {
        bail!("keys written during the partition lost: {missing:?}");
    }

    // 3. Rolling restart of every node under QUORUM writes: nothing acknowledged is lost.
    let writer_seeds = all.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let (mut acked, mut refused, mut i) = (Vec::new(), 0usize, 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let k = format!("rolling-{i}");
                i += 1;
                let o = cli(&[
                    "--seeds",
                    &writer_seeds,
                    "--consistency",
                    "quorum",
                    "set",
                    &k,
                    &format!("v-{k}"),
                ]);
                if o.status.success() {
                    acked.push(k);
                } else {
                    refused += 1;
                }
            }
            (acked, refused)
        })
    };
    for (service, _) in NODES {
        let id = container(service)?;
        run(Command::new("docker").args(["restart", "--time", "15", &id]))?;
        let took = wait_for(
            &format!("{service} back after restart"),
            Duration::from_secs(90),
            || all_alive(&ips),
        )?;
        println!("restarted {service}: alive everywhere after {took:.1?}");
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, refused) = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?;
    let missing = lost(&all, &acked);
    println!(
        "rolling restart of 3 nodes: {} QUORUM writes acknowledged ({refused} refused), {} lost",
        acked.len(),
        missing.len()
    );
    if !missing.is_empty() {
        bail!("acknowledged writes lost in the rolling restart: {missing:?}");
    }
    println!("docker chaos: passed");
    Ok(())
}
