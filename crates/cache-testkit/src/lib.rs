//! `cache-testkit`: run real `cache-node` processes from tests.
//!
//! [`NodeProcess::start`] launches the binary on ephemeral loopback ports (`127.0.0.1:0`,
//! never a fixed port), reads the bound addresses from its startup line, and polls
//! `/readyz` until it answers 200 or a deadline passes — no bare sleeps. Dropping a
//! [`NodeProcess`] kills the child and reaps it, also when the test panics; its log is
//! printed if the test is failing, so CI output shows what the node said.
//!
//! [`Cluster`] starts several nodes that know each other. Used by every integration test
//! that needs a node or a cluster.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a node may take to print its startup line and become ready.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// Path of the `cache-node` binary: `$CACHE_NODE_BIN`, or next to the running test's
/// target directory (`target/<profile>/cache-node`), built with cargo if missing.
pub fn node_binary() -> PathBuf {
    binary("cache-node", "CACHE_NODE_BIN")
}

/// Path of the `cache-cli` binary, found like [`node_binary`] (`$CACHE_CLI_BIN`).
pub fn cli_binary() -> PathBuf {
    binary("cache-cli", "CACHE_CLI_BIN")
}

fn binary(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-binary>  ->  target/<profile>/<name>
    let exe = std::env::current_exe().expect("the test binary has a path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binaries live in target/<profile>/deps")
        .to_path_buf();
    let path = profile_dir.join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--bin", name]);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo runs");
        assert!(status.success(), "building {name} failed");
    }
    path
}

/// A running `cache-node` child process.
#[derive(Debug)]
pub struct NodeProcess {
    child: Child,
    /// The gRPC address it bound.
    pub grpc: SocketAddr,
    /// The peer listener address it bound.
    pub peer: SocketAddr,
    /// The gossip address it bound (gossip membership only).
    pub gossip: Option<SocketAddr>,
    /// The admin HTTP address it bound.
    pub admin: SocketAddr,
    /// The RESP address it bound (with `--resp-listen`).
    pub resp: Option<SocketAddr>,
    /// Where its stderr (logs) goes.
    log: PathBuf,
    /// The flags it was started with, for [`NodeProcess::restart`].
    args: Vec<String>,
}

impl NodeProcess {
    /// Starts a node with `args` added to `--listen 127.0.0.1:0 --admin-listen 127.0.0.1:0`
    /// and waits until `/readyz` answers 200. Panics (after killing the child) if it does not
    /// within [`START_DEADLINE`].
    pub fn start(args: &[&str]) -> Self {
        let mut full = vec!["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
        full.extend_from_slice(args);
        Self::spawn(&full).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a node with exactly `args` and waits until it is ready. `Err` (with the
    /// node's log) if it exits or prints no startup line within [`START_DEADLINE`]; the
    /// child is killed in that case.
    pub fn spawn(args: &[&str]) -> Result<Self, String> {
        let node = Self::spawn_limited(args, None)?;
        node.wait_ready(START_DEADLINE);
        Ok(node)
    }

    /// Starts a node with exactly `args` and returns once it has printed its startup line
    /// (its listeners are bound), without waiting for it to be ready: for nodes that are
    /// not meant to become ready yet.
    pub fn spawn_unready(args: &[&str]) -> Result<Self, String> {
        Self::spawn_limited(args, None)
    }

    /// Like [`NodeProcess::start`], under `ulimit -n open_files` (through `sh`, which
    /// `exec`s the node, so the pid is the node's).
    pub fn start_limited(open_files: u64, args: &[&str]) -> Self {
        let mut full = vec!["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
        full.extend_from_slice(args);
        let node = Self::spawn_limited(&full, Some(open_files)).unwrap_or_else(|e| panic!("{e}"));
        node.wait_ready(START_DEADLINE);
        node
    }

    fn spawn_limited(args: &[&str], open_files: Option<u64>) -> Result<Self, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let log = std::env::temp_dir().join(format!(
            "cache-node-{}-{}.log",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let log_file = std::fs::File::create(&log).map_err(|e| format!("create log file: {e}"))?;
        let mut command = match open_files {
            None => Command::new(node_binary()),
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(node_binary());
                c
            }
        };
        command.args(args).env_remove("RUST_LOG");
        // `CACHE_NODE_LOG` sets the nodes' `RUST_LOG` (e.g. `cluster_core=debug,info`) when a
        // failing test needs more of their story; tests otherwise see the default level.
        if let Ok(filter) = std::env::var("CACHE_NODE_LOG") {
            command.env("RUST_LOG", filter);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .map_err(|e| format!("spawn cache-node: {e}"))?;
        let stdout = child.stdout.take().ok_or("stdout is piped")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(START_DEADLINE) {
            Ok(line) if !line.is_empty() => line,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let _ = std::fs::remove_file(&log);
                return Err(format!(
                    "cache-node printed no startup line ({other:?}); log:\n{text}"
                ));
            }
        };
        let field = |name: &str| -> Option<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|v| v.parse().ok())
        };
        let (Some(grpc), Some(peer), Some(admin)) =
            (field("grpc="), field("peer="), field("admin="))
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no grpc=/peer=/admin= in startup line {line:?}"));
        };
        let node = Self {
            grpc,
            peer,
            gossip: field("gossip="),
            admin,
            resp: field("resp="),
            child,
            log,
            args: args.iter().map(|a| (*a).to_string()).collect(),
        };
        Ok(node)
    }

    /// `kill -9`s the node and starts it again with the same flags (same ports when they
    /// were given explicitly, as [`Cluster::start`] does): a crash and restart — empty
    /// unless it runs with `--data-dir`. Waits until the new process is ready.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let fresh = Self::spawn(&args).unwrap_or_else(|e| panic!("restart: {e}"));
        *self = fresh;
    }

    /// Polls `/readyz` until 200, panicking after `deadline`.
    pub fn wait_ready(&self, deadline: Duration) {
        let until = Instant::now() + deadline;
        loop {
            if let Ok((200, _)) = self.http_get("/readyz") {
                return;
            }
            assert!(
                Instant::now() < until,
                "node not ready within {deadline:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `host:port` of the gRPC server, as clients take it.
    pub fn addr(&self) -> String {
        self.grpc.to_string()
    }

    /// `host:port` of the peer listener (node-to-node traffic).
    pub fn peer_addr(&self) -> String {
        self.peer.to_string()
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`"TERM"`, `"INT"`, `"KILL"`, `"STOP"`, `"CONT"`) with `kill(1)`.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Stops the process (SIGSTOP) and waits until the kernel reports it stopped: `kill`
    /// returns once the signal is queued, and a node can still answer a call or two before
    /// every thread has stopped. Panics if it is not stopped within 5 s.
    pub fn pause(&self) {
        self.signal("STOP");
        let stat = format!("/proc/{}/stat", self.pid());
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            // The state is the field after the parenthesised command name.
            let state = std::fs::read_to_string(&stat).ok().and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_string))
            });
            if matches!(state.as_deref(), Some("T" | "t")) {
                return;
            }
            assert!(
                Instant::now() < until,
                "node not stopped after SIGSTOP: {state:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits up to `deadline` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + deadline;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What the node logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The flags it was started with.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// `GET path` on the admin server: (status code, body).
    pub fn http_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.admin, path)
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- cache-node log ({}) ----\n{}",
                self.log.display(),
                self.log()
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The value of a Prometheus series (exact name with labels, e.g.
/// `cache_forwarded_requests_total`) in exposition text; `None` if absent.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

/// A cluster of real `cache-node` processes on loopback, all killed on drop.
#[derive(Debug)]
pub struct Cluster {
    /// The nodes, `node-0` … `node-{n-1}`.
    pub nodes: Vec<NodeProcess>,
    /// `static`, `gossip` or `coordinator`.
    mode: &'static str,
    /// `--cluster-name` of a gossip or coordinated cluster: unique per cluster, so that
    /// clusters of tests running at the same time (which may reuse the ports of each
    /// other's killed nodes) refuse each other's membership messages instead of merging.
    name: String,
}

impl Cluster {
    /// Starts `n` nodes named `node-0…` that know each other through `--peers`, each with
    /// `args` added, and waits until all are ready.
    ///
    /// Static membership needs every address before any node starts, so the ports are
    /// picked by binding port 0 and releasing it. Another process could take one in between;
    /// then that node fails to bind and the whole cluster is started again on new ports (up
    /// to 5 times), so a port race costs a retry, never a flaky test.
    pub fn start(n: usize, args: &[&str]) -> Self {
        let args: Vec<String> = args.iter().map(|a| (*a).to_string()).collect();
        Self::start_each(n, |_| args.clone())
    }

    /// Like [`Cluster::start`], with each node's own extra flags: `args(i)` for `node-i`
    /// (a data directory per node, say).
    pub fn start_each(n: usize, args: impl Fn(usize) -> Vec<String>) -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            let ports: Vec<u16> = {
                let listeners: Vec<std::net::TcpListener> = (0..3 * n)
                    .map(|_| {
                        std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port")
                    })
                    .collect();
                listeners
                    .iter()
                    .map(|l| l.local_addr().expect("bound").port())
                    .collect()
            };
            let peers: Vec<String> = (0..n)
                .map(|i| {
                    format!(
                        "node-{i}=127.0.0.1:{}/127.0.0.1:{}",
                        ports[3 * i],
                        ports[3 * i + 2]
                    )
                })
                .collect();
            let peers = peers.join(",");
            let mut nodes = Vec::new();
            for i in 0..n {
                let (id, listen, admin, peer) = (
                    format!("node-{i}"),
                    format!("127.0.0.1:{}", ports[3 * i]),
                    format!("127.0.0.1:{}", ports[3 * i + 1]),
                    format!("127.0.0.1:{}", ports[3 * i + 2]),
                );
                let mut full = vec![
                    "--node-id",
                    &id,
                    "--listen",
                    &listen,
                    "--admin-listen",
                    &admin,
                    "--peer-listen",
                    &peer,
                    "--peers",
                    &peers,
                ];
                let own = args(i);
                full.extend(own.iter().map(String::as_str));
                // Not ready yet: a node syncs with peers that start after it (each is
                // waited for below, once all run).
                match NodeProcess::spawn_unready(&full) {
                    Ok(node) => nodes.push(node),
                    Err(e) => {
                        last = e;
                        break;
                    }
                }
            }
            if nodes.len() == n {
                for node in &nodes {
                    node.wait_ready(START_DEADLINE);
                }
                return Self {
                    nodes,
                    mode: "static",
                    name: String::new(),
                };
            }
        }
        panic!("could not start a {n}-node cluster in 5 attempts; last error: {last}");
    }

    /// Starts `n` nodes named `node-0…` with `--membership gossip` on ephemeral ports:
    /// `node-0` starts the cluster, the others join through it. Waits until each is ready
    /// (not until they see each other: tests poll for that).
    pub fn start_gossip(n: usize, args: &[&str]) -> Self {
        Self::start_network("gossip", n, args)
    }

    /// Like [`Cluster::start_gossip`] with `--membership coordinator`: `node-0` is the
    /// coordinator, the others name it with `--coordinator`.
    pub fn start_coordinated(n: usize, args: &[&str]) -> Self {
        Self::start_network("coordinator", n, args)
    }

    fn start_network(mode: &'static str, n: usize, args: &[&str]) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let mut cluster = Self {
            nodes: Vec::new(),
            mode,
            name: format!(
                "testkit-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
        };
        for _ in 0..n {
            cluster.add_gossip_node(args);
        }
        cluster
    }

    /// Starts one more node, `node-{len}`, with the cluster's network membership (gossip by
    /// default), joining through `node-0` (or naming it as the coordinator), and waits
    /// until it is ready (it has joined).
    pub fn add_gossip_node(&mut self, args: &[&str]) -> &NodeProcess {
        self.add_network_node(args, true)
    }

    /// Like [`Cluster::add_gossip_node`] without waiting for readiness: for a node that is
    /// not meant to join (other gossip keys, say), which stays unready.
    pub fn add_stranger(&mut self, args: &[&str]) -> &NodeProcess {
        self.add_network_node(args, false)
    }

    fn add_network_node(&mut self, args: &[&str], ready: bool) -> &NodeProcess {
        let id = format!("node-{}", self.nodes.len());
        let first = self
            .nodes
            .first()
            .and_then(|n| n.gossip)
            .map(|a| a.to_string());
        let mode = if self.mode == "coordinator" {
            "coordinator"
        } else {
            "gossip"
        };
        let mut full = vec![
            "--node-id",
            &id,
            "--membership",
            mode,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--cluster-name",
            &self.name,
        ];
        if let Some(first) = &first {
            let flag = if mode == "coordinator" {
                "--coordinator"
            } else {
                "--join"
            };
            full.extend_from_slice(&[flag, first]);
        }
        full.extend_from_slice(args);
        let spawned = if ready {
            NodeProcess::spawn(&full)
        } else {
            NodeProcess::spawn_unready(&full)
        };
        self.nodes.push(spawned.unwrap_or_else(|e| panic!("{e}")));
        self.nodes.last().expect("just pushed")
    }

    /// The node with id `id` (`node-3` is index 3).
    pub fn node(&self, id: &str) -> &NodeProcess {
        let i: usize = id
            .trim_start_matches("node-")
            .parse()
            .expect("ids are node-N");
        &self.nodes[i]
    }

    /// Every node's gRPC address, as seeds for a cluster client.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(NodeProcess::addr).collect()
    }
}

/// A minimal HTTP/1.1 `GET` (enough for the admin endpoints; no dependency needed).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path)
}

/// A minimal HTTP/1.1 `POST` with an empty body (`/snapshot`), waiting up to 60 s.
pub fn http_post(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "POST", path)
}

fn http_request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    let wait = if method == "GET" { 5 } else { 60 };
    stream.set_read_timeout(Some(Duration::from_secs(wait)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {raw:?}")))?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
