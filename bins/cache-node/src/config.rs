//! Configuration: flags > `CACHE_*` environment variables > TOML file (`--config`) > defaults.
//!
//! clap handles flags and environment (each flag names its variable); the file fills what
//! neither gave; `NodeConfig::default()` fills the rest. Every file key is the flag's long
//! name (`max-memory = "512MiB"`); unknown keys are an error, so typos do not pass silently.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cache_core::{CacheConfig, EvictionPolicy};
use cache_rpc::{Consistency, CoreConfig, Limits, MembershipMode, NetworkProtocol, NodeConfig};
use clap::{Parser, ValueEnum};
use cluster_membership::default_peer_addr;
use cluster_membership::parse_peers;
use serde::Deserialize;

/// The node's eviction policy unless `--eviction-policy` says otherwise: SIEVE, not the
/// engine library's exact-LRU default. A SIEVE hit sets one bit in the entry's own header;
/// an LRU hit relinks the entry, writing to its two neighbours — two more cache misses on
/// every read of a working set larger than the CPU cache (measured: a median 0.71 against
/// 0.86 µs of user CPU per pipelined `GET`, `docs/benchmarks.md`). SIEVE also measured a
/// higher hit ratio than LRU on every skewed workload (`docs/why/lru.md`).
const NODE_EVICTION_POLICY: EvictionPolicy = EvictionPolicy::Sieve;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// cache-node: one node of cache-cluster, a distributed in-memory cache.
///
/// With no options it serves gRPC on 127.0.0.1:7000 and admin HTTP (metrics, health,
/// status) on 127.0.0.1:7080 with a 1 GiB memory limit.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
pub(crate) struct Args {
    /// Instead of serving: a maintenance command.
    #[command(subcommand)]
    pub(crate) command: Option<NodeCommand>,
    /// TOML configuration file; its keys are these flags' long names.
    #[arg(long, env = "CACHE_CONFIG")]
    config: Option<PathBuf>,
    /// This node's stable id [default: local].
    #[arg(long, env = "CACHE_NODE_ID")]
    node_id: Option<String>,
    /// gRPC listen address for clients [default: 127.0.0.1:7000].
    #[arg(long, env = "CACHE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Peer listen address: node-to-node forwarding and replication only, so it can be
    /// firewalled off from clients [default: the --listen IP, port + 100 (127.0.0.1:7100);
    /// an ephemeral port if --listen uses port 0].
    #[arg(long, env = "CACHE_PEER_LISTEN")]
    peer_listen: Option<SocketAddr>,
    /// Admin HTTP listen address [default: 127.0.0.1:7080].
    #[arg(long, env = "CACHE_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Redis-protocol (RESP2) listen address, for redis-cli, redis-benchmark and Redis
    /// client libraries, e.g. 127.0.0.1:6380 [default: off].
    #[arg(long, env = "CACHE_RESP_LISTEN")]
    resp_listen: Option<SocketAddr>,
    /// Memory limit, e.g. 512MiB, 1GiB [default: 1GiB].
    #[arg(long, env = "CACHE_MAX_MEMORY")]
    max_memory: Option<String>,
    /// Optional cap on the number of entries.
    #[arg(long, env = "CACHE_MAX_ITEMS")]
    max_items: Option<u64>,
    /// Engine shards, a power of two [default: 4 × cores].
    #[arg(long, env = "CACHE_SHARDS")]
    shards: Option<usize>,
    /// Evict least-recently-used entries when full (false: refuse writes) [default: true].
    #[arg(long, env = "CACHE_EVICTION")]
    eviction: Option<bool>,
    /// Which entry goes when memory is full: sieve (a hit sets a bit; keeps popular keys
    /// through one-off scans; a higher hit ratio on skewed loads) or lru (exact
    /// least-recently-used; a hit relinks the entry) [default: sieve].
    #[arg(long, env = "CACHE_EVICTION_POLICY")]
    eviction_policy: Option<String>,
    /// Largest key, e.g. 64KiB [default: 64KiB].
    #[arg(long, env = "CACHE_MAX_KEY_SIZE")]
    max_key_size: Option<String>,
    /// Largest value, e.g. 8MiB [default: 8MiB].
    #[arg(long, env = "CACHE_MAX_VALUE_SIZE")]
    max_value_size: Option<String>,
    /// Most keys in one MultiGet/MultiSet [default: 1024].
    #[arg(long, env = "CACHE_MAX_BATCH")]
    max_batch: Option<usize>,
    /// How often expired entries are reclaimed, e.g. 100ms [default: 100ms].
    #[arg(long, env = "CACHE_REAPER_INTERVAL")]
    reaper_interval: Option<String>,
    /// How long in-flight requests may take to finish on shutdown, e.g. 10s [default: 10s].
    #[arg(long, env = "CACHE_SHUTDOWN_GRACE")]
    shutdown_grace: Option<String>,
    /// First part of the grace period: refuse new requests and fail readiness while still
    /// connected, so clients move away before connections close [default: 1s].
    #[arg(long, env = "CACHE_SHUTDOWN_NOTICE")]
    shutdown_notice: Option<String>,
    /// Every cluster member, this node included: id=host:port[/host:peerport],... (the
    /// client address, and the peer address if it is not the client port + 100). Every node
    /// must get the same list. Empty: a single node.
    #[arg(long, env = "CACHE_PEERS")]
    peers: Option<String>,
    /// How members find each other: `static` (--peers, or a single node), `gossip` (SWIM:
    /// --join seeds, failure detection, no single point of failure) or `coordinator` (one
    /// node keeps the list: started without --coordinator it is the coordinator; the others
    /// give --coordinator) [default: static].
    #[arg(long, env = "CACHE_MEMBERSHIP")]
    membership: Option<String>,
    /// Gossip listen address, UDP and TCP (gossip only) [default: the --listen IP, port +
    /// 200 (127.0.0.1:7200); an ephemeral port if --listen uses port 0].
    #[arg(long, env = "CACHE_GOSSIP_LISTEN")]
    gossip_listen: Option<SocketAddr>,
    /// Gossip addresses of members to join through, host:port,... (gossip only); host names
    /// are resolved again at every attempt. Empty: this node starts a new cluster.
    #[arg(long, env = "CACHE_JOIN")]
    join: Option<String>,
    /// The coordinator's gossip address, host:port (coordinator membership only); without
    /// it this node is the coordinator.
    #[arg(long, env = "CACHE_COORDINATOR")]
    coordinator: Option<String>,
    /// Only nodes with the same cluster name form a cluster (gossip only)
    /// [default: cache-cluster].
    #[arg(long, env = "CACHE_CLUSTER_NAME")]
    cluster_name: Option<String>,
    /// The IP other nodes and clients use to reach this node, when --listen binds a
    /// wildcard address (gossip only).
    #[arg(long, env = "CACHE_ADVERTISE")]
    advertise: Option<std::net::IpAddr>,
    /// Replicas of each key, capped at the member count [default: 3].
    #[arg(long, env = "CACHE_REPLICATION_FACTOR")]
    replication_factor: Option<usize>,
    /// Consistency of writes that do not ask for one: one, quorum or all [default: one].
    #[arg(long, env = "CACHE_WRITE_CONSISTENCY")]
    write_consistency: Option<String>,
    /// Deadline of every call to another node, e.g. 500ms [default: 1s].
    #[arg(long, env = "CACHE_PEER_TIMEOUT")]
    peer_timeout: Option<String>,
    /// Longest a client request may take, forwarding and replication included (a shorter
    /// client deadline wins), e.g. 2s [default: 5s].
    #[arg(long, env = "CACHE_REQUEST_TIMEOUT")]
    request_timeout: Option<String>,
    /// Requests taking at least this long go to the slow log (cache-cli slowlog, RESP
    /// SLOWLOG) and are logged, at most once a second, e.g. 50ms; `off` disables it
    /// [default: 10ms].
    #[arg(long, env = "CACHE_SLOWLOG_THRESHOLD")]
    slowlog_threshold: Option<String>,
    /// Slow requests the slow log keeps, newest first (0 to 100 000) [default: 128].
    #[arg(long, env = "CACHE_SLOWLOG_MAX_LEN")]
    slowlog_max_len: Option<usize>,
    /// How far ahead of this node's clock a version from a peer may be; later ones are
    /// refused and counted (cache_versions_refused_total), e.g. 5s [default: 5s].
    #[arg(long, env = "CACHE_MAX_CLOCK_DRIFT")]
    max_clock_drift: Option<String>,
    /// Entries each per-peer asynchronous replication queue holds before dropping
    /// (drops are counted in cache_replication_dropped_total) [default: 65536].
    #[arg(long, env = "CACHE_REPLICATION_QUEUE")]
    replication_queue: Option<usize>,
    /// Key and value bytes of hints kept for each unreachable peer (hinted handoff: writes
    /// it missed, delivered when it answers again; beyond this they are dropped, counted in
    /// cache_hints_dropped_total, and left to anti-entropy), e.g. 64MiB [default: 64MiB].
    #[arg(long, env = "CACHE_HINTS_MEMORY")]
    hints_memory: Option<String>,
    /// Time between anti-entropy rounds, in which replicas compare digests and exchange what
    /// differs; a ring change starts a round at once. `0` turns anti-entropy off (then a
    /// restarted node is never caught up) [default: 15s].
    #[arg(long, env = "CACHE_ANTI_ENTROPY_INTERVAL")]
    anti_entropy_interval: Option<String>,
    /// Bytes per second anti-entropy and rebalancing may move (pulled plus pushed), e.g.
    /// 16MiB; `0`: unthrottled [default: 64MiB].
    #[arg(long, env = "CACHE_SYNC_RATE")]
    sync_rate: Option<String>,
    /// Most open client connections; more are accepted and closed at once (counted in
    /// cache_connections_refused_total). Lowered at start, with a warning, to fit the
    /// open-file limit (ulimit -n) [default: 10000].
    #[arg(long, env = "CACHE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Time a new client or peer connection has to send its HTTP/2 preface; `0`: no
    /// deadline [default: 10s].
    #[arg(long, env = "CACHE_HANDSHAKE_TIMEOUT")]
    handshake_timeout: Option<String>,
    /// A client or peer connection that sends nothing for this long is closed (live gRPC
    /// clients answer keepalive pings every 30 s); `0`: never [default: 5m].
    #[arg(long, env = "CACHE_IDLE_TIMEOUT")]
    idle_timeout: Option<String>,
    /// Cluster secrets authenticating gossip: one per line (at least 16 bytes), the first
    /// signs, all are accepted (rotate by adding the new one second everywhere, then first,
    /// then removing the old). Every member needs the same file.
    #[arg(long, env = "CACHE_GOSSIP_KEYS_FILE")]
    gossip_keys_file: Option<PathBuf>,
    /// Encrypt gossip with the --gossip-keys-file secrets (XChaCha20-Poly1305) instead of
    /// only authenticating it: membership is then unreadable on the wire. Every member must
    /// set it (an encrypting and a non-encrypting member cannot read each other).
    #[arg(long, env = "CACHE_GOSSIP_ENCRYPT")]
    gossip_encrypt: bool,
    /// Client tokens: one `NAME ROLE SHA256-HEX` per line (roles read, write, admin;
    /// `cache-node hash-token NAME ROLE` prints a line). With it every client call needs
    /// `authorization: Bearer TOKEN`; without it anyone who reaches the port may do anything.
    #[arg(long, env = "CACHE_AUTH_FILE")]
    auth_file: Option<PathBuf>,
    /// TLS certificate chain (PEM) for the client gRPC and RESP listeners; with --tls-key.
    /// Reloaded on SIGHUP (new connections get the new certificate).
    #[arg(long, env = "CACHE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, env = "CACHE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA certificates (PEM): with it, every client must present a certificate this CA
    /// signed (mutual TLS).
    #[arg(long, env = "CACHE_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Serve the admin HTTP port over TLS too, with --tls-cert (probes then need https;
    /// with --tls-client-ca they need a client certificate as well).
    #[arg(long, env = "CACHE_ADMIN_TLS")]
    admin_tls: bool,
    /// Answer 200 on /readyz while the node is still syncing (after a restart, a join or a
    /// pause it reads through other replicas until anti-entropy has caught up). Without it
    /// /readyz answers 503 until then, so a rolling restart that waits for readiness also
    /// waits for the data to be back.
    #[arg(long, env = "CACHE_READY_WHILE_SYNCING")]
    ready_while_syncing: bool,
    /// This member's certificate (PEM) for mutual TLS on the peer listener and to other
    /// members; it must name the address others reach it by. With --peer-tls-key and
    /// --peer-tls-ca. Reloaded on SIGHUP.
    #[arg(long, env = "CACHE_PEER_TLS_CERT")]
    peer_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --peer-tls-cert.
    #[arg(long, env = "CACHE_PEER_TLS_KEY")]
    peer_tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): only members whose certificates it signed may call the peer
    /// listener, and peers are trusted only if it signed theirs.
    #[arg(long, env = "CACHE_PEER_TLS_CA")]
    peer_tls_ca: Option<PathBuf>,
    /// Start even though a listener is reachable beyond this machine without protection
    /// (neither --auth-file nor --tls-cert for clients, no --peer-tls-* for the peer
    /// listener, no --gossip-keys-file for gossip).
    /// Without it such a node refuses to start (protected mode).
    #[arg(long, env = "CACHE_INSECURE_ALLOW_PLAINTEXT")]
    insecure_allow_plaintext: bool,
    /// Directory for the append-only file and snapshots. Without it nothing is persisted
    /// (a restarted node comes back empty and is refilled by its replicas); with it, the
    /// node loads the directory at start and logs every applied write.
    #[arg(long, env = "CACHE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// When the append-only file is fsynced: `always` (before each write is acknowledged;
    /// concurrent writes share an fsync), `everysec` (once per second in the background),
    /// or `no` (left to the kernel). Every policy writes to the kernel before acknowledging,
    /// so only a machine crash can lose acknowledged writes [default: everysec].
    #[arg(long, env = "CACHE_APPENDFSYNC")]
    appendfsync: Option<String>,
    /// Time between snapshots; `0`: only on demand and for compaction [default: 1h].
    #[arg(long, env = "CACHE_SNAPSHOT_INTERVAL")]
    snapshot_interval: Option<String>,
    /// Compact (snapshot and start a new log) once the log is at least this large...
    /// [default: 64MiB].
    #[arg(long, env = "CACHE_AOF_REWRITE_MIN_SIZE")]
    aof_rewrite_min_size: Option<String>,
    /// ...and at least this percentage of the last snapshot's size [default: 100].
    #[arg(long, env = "CACHE_AOF_REWRITE_PERCENTAGE")]
    aof_rewrite_percentage: Option<u64>,
    /// Threads that serve requests: 1 runs everything on one thread (a current-thread
    /// runtime: cheapest per request on one core), more a work-stealing pool of that many
    /// [default: the CPUs this process may use].
    #[arg(long, env = "CACHE_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Log format [default: pretty].
    #[arg(long, env = "CACHE_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Log level or filter (RUST_LOG syntax), used when RUST_LOG is unset [default: info].
    #[arg(long, env = "CACHE_LOG_LEVEL")]
    log_level: Option<String>,
}

/// Maintenance commands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum NodeCommand {
    /// Verify a data directory's snapshots and append-only files (like redis-check-aof):
    /// print each file's records and the first bad one. Exit 0 if every file is sound (or
    /// was repaired), 1 if one is damaged.
    CheckData {
        /// The data directory (what --data-dir names).
        dir: PathBuf,
        /// Cut each damaged file at its first bad record, so the node starts with the valid
        /// part (what follows that record is lost: keep a copy of the directory first).
        #[arg(long)]
        repair: bool,
        /// The largest key the node accepts, as its --max-key-size [default: 64KiB].
        #[arg(long)]
        max_key_size: Option<String>,
        /// The largest value the node accepts, as its --max-value-size [default: 8MiB].
        #[arg(long)]
        max_value_size: Option<String>,
    },
    /// Check that a node on this machine is alive: GET /healthz on its admin listener, exit
    /// 0 if it answers 200 within 2 s, 1 otherwise. For container health checks, which
    /// have no curl in a minimal image. Plain HTTP only (not an admin port with TLS).
    Healthcheck {
        /// The admin address; a wildcard IP (`0.0.0.0`, `[::]`) means this machine's loopback.
        #[arg(long, env = "CACHE_ADMIN_LISTEN", default_value = "127.0.0.1:7080")]
        admin: String,
        /// The path to ask: /healthz (alive) or /readyz (ready for traffic).
        #[arg(long, default_value = "/healthz")]
        path: String,
    },
    /// Print the --auth-file line for a token read from stdin (its first line), so the
    /// token never appears in a command line or shell history.
    HashToken {
        /// A name for the token (appears in logs; never the token).
        name: String,
        /// read, write or admin.
        role: String,
    },
}

/// The same settings, as they appear in the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    node_id: Option<String>,
    listen: Option<SocketAddr>,
    peer_listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    resp_listen: Option<SocketAddr>,
    max_memory: Option<String>,
    max_items: Option<u64>,
    shards: Option<usize>,
    eviction: Option<bool>,
    eviction_policy: Option<String>,
    max_key_size: Option<String>,
    max_value_size: Option<String>,
    max_batch: Option<usize>,
    reaper_interval: Option<String>,
    shutdown_grace: Option<String>,
    shutdown_notice: Option<String>,
    peers: Option<String>,
    membership: Option<String>,
    gossip_listen: Option<SocketAddr>,
    join: Option<String>,
    coordinator: Option<String>,
    cluster_name: Option<String>,
    advertise: Option<std::net::IpAddr>,
    replication_factor: Option<usize>,
    write_consistency: Option<String>,
    peer_timeout: Option<String>,
    request_timeout: Option<String>,
    slowlog_threshold: Option<String>,
    slowlog_max_len: Option<usize>,
    max_clock_drift: Option<String>,
    replication_queue: Option<usize>,
    hints_memory: Option<String>,
    anti_entropy_interval: Option<String>,
    sync_rate: Option<String>,
    max_connections: Option<usize>,
    handshake_timeout: Option<String>,
    idle_timeout: Option<String>,
    auth_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    admin_tls: Option<bool>,
    ready_while_syncing: Option<bool>,
    peer_tls_cert: Option<PathBuf>,
    peer_tls_key: Option<PathBuf>,
    peer_tls_ca: Option<PathBuf>,
    gossip_keys_file: Option<PathBuf>,
    gossip_encrypt: Option<bool>,
    insecure_allow_plaintext: Option<bool>,
    data_dir: Option<PathBuf>,
    appendfsync: Option<String>,
    snapshot_interval: Option<String>,
    aof_rewrite_min_size: Option<String>,
    aof_rewrite_percentage: Option<u64>,
    worker_threads: Option<usize>,
    log_format: Option<LogFormat>,
    log_level: Option<String>,
}

/// The resolved configuration: the node's, plus logging and the runtime.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub(crate) node: NodeConfig,
    pub(crate) log_format: LogFormat,
    pub(crate) log_level: String,
    /// Request-serving threads (`--worker-threads`): 1 selects the current-thread runtime.
    pub(crate) worker_threads: usize,
    /// Settings that work but are probably a mistake, to log once logging is up.
    pub(crate) warnings: Vec<String>,
}

/// The most `--worker-threads` accepted: far more than any machine's cores, few enough
/// that a typo cannot start thousands of threads.
const MAX_WORKER_THREADS: usize = 1024;

/// `what` must lie within `lo..=hi`.
fn within<T: PartialOrd + std::fmt::Debug>(what: &str, v: T, lo: T, hi: T) -> Result<()> {
    if v < lo || v > hi {
        bail!("{what} is {v:?}; it must be between {lo:?} and {hi:?}");
    }
    Ok(())
}

/// Physical memory, from `/proc/meminfo` (Linux); `None` elsewhere.
fn physical_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Reads a gossip keyring: one secret per line (at least 16 bytes; blank lines and `#`
/// comments skipped), the signing one first.
fn read_keyring(path: &std::path::Path) -> Result<cluster_membership::Keyring> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the gossip keys file {}", path.display()))?;
    let secrets: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    cluster_membership::Keyring::new(&secrets)
        .map_err(|e| anyhow::anyhow!("gossip keys file {}: {e}", path.display()))
}

/// Protected mode (Redis's idea): a listener reachable beyond loopback must be protected,
/// or the operator must say, with `--insecure-allow-plaintext`, that the network is.
/// Clients are protected by `--auth-file` or `--tls-cert`, the peer listener by mutual TLS
/// (`--peer-tls-*`), gossip by `--gossip-keys-file`.
fn protected_mode(n: &NodeConfig, allow: bool) -> Result<()> {
    if allow {
        return Ok(());
    }
    let open = |a: &SocketAddr| !a.ip().is_loopback();
    let mut exposed: Vec<String> = Vec::new();
    if n.auth.is_none() && n.tls.is_none() {
        let resp = n.resp_listen.map(|a| ("--resp-listen", a));
        for (flag, addr) in [("--listen", n.listen), ("--admin-listen", n.admin_listen)]
            .into_iter()
            .chain(resp)
        {
            if open(&addr) {
                exposed.push(format!("{flag} {addr} (no --auth-file or --tls-cert)"));
            }
        }
    }
    if open(&n.peer_listen) && n.peer_tls.is_none() {
        exposed.push(format!(
            "--peer-listen {} (no --peer-tls-cert/--peer-tls-key/--peer-tls-ca)",
            n.peer_listen
        ));
    }
    if let cache_rpc::MembershipMode::Network {
        listen, keyring, ..
    } = &n.membership
        && open(listen)
        && keyring.is_none()
    {
        exposed.push(format!("--gossip-listen {listen} (no --gossip-keys-file)"));
    }
    if exposed.is_empty() {
        return Ok(());
    }
    bail!(
        "protected mode: {} reachable beyond this machine without protection, so anyone who reaches it could read and write every key; bind to 127.0.0.1; protect clients with --auth-file or --tls-cert, members with --peer-tls-cert/--peer-tls-key/--peer-tls-ca and --gossip-keys-file; or, on a network you trust (a private network, a firewalled VPC), pass --insecure-allow-plaintext (see docs/security.md)",
        exposed.join(", ")
    );
}

/// Every duration, size and count within the range where it can work: a setting outside
/// is one clear error (exit code 2), never a spinning core or a limit that cannot hold.
/// Returns warnings for settings that work but are probably wrong.
fn check_bounds(n: &NodeConfig) -> Result<Vec<String>> {
    const MS: Duration = Duration::from_millis(1);
    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86_400);
    within("reaper-interval", n.reaper_interval, MS, HOUR)?;
    within("shutdown-grace", n.shutdown_grace, Duration::ZERO, HOUR)?;
    within("shutdown-notice", n.shutdown_notice, Duration::ZERO, HOUR)?;
    within(
        "peer-timeout",
        n.cluster.peer_timeout,
        MS,
        Duration::from_secs(300),
    )?;
    within("request-timeout", n.request_timeout, MS, HOUR)?;
    within("slowlog-max-len", n.slowlog.max_len, 0, 100_000)?;
    if let Some(t) = n.slowlog.threshold {
        within("slowlog-threshold", t, Duration::ZERO, HOUR)?;
    }
    within("max-clock-drift", n.max_clock_drift, MS, HOUR)?;
    within("replication-factor", n.cluster.replication_factor, 1, 16)?;
    within("replication-queue", n.cluster.queue_capacity, 1, 10_000_000)?;
    within("max-batch", n.limits.max_batch, 1, 100_000)?;
    within("max-key-size", n.limits.max_key_bytes, 1, 64 << 10)?;
    within("max-memory", n.cache.max_bytes, 4 << 10, 1 << 50)?;
    // A value larger than one shard's budget could never be stored; and the value limit
    // sizes the largest request the node accepts, so it is capped well below memory.
    let shard_budget = n.cache.max_bytes / n.cache.shards.max(1) as u64;
    let max_value = (shard_budget.min(512 << 20)) as usize;
    if n.limits.max_value_bytes > max_value {
        bail!(
            "max-value-size is {} bytes, over what one engine shard can hold ({} bytes: max-memory {} / {} shards, at most 512 MiB); lower it, raise --max-memory or use fewer --shards",
            n.limits.max_value_bytes,
            max_value,
            n.cache.max_bytes,
            n.cache.shards
        );
    }
    within(
        "max-connections",
        n.connections.max_connections,
        1,
        1_000_000,
    )?;
    if let Some(h) = n.connections.handshake_timeout {
        within(
            "handshake-timeout",
            h,
            Duration::from_millis(100),
            Duration::from_secs(300),
        )?;
    }
    if let Some(i) = n.connections.idle_timeout {
        within("idle-timeout", i, Duration::from_secs(1), DAY)?;
    }
    if let Some(s) = &n.anti_entropy {
        within(
            "anti-entropy-interval",
            s.interval,
            Duration::from_millis(100),
            DAY,
        )?;
    }
    if let Some(p) = &n.persistence {
        if let Some(i) = p.snapshot_interval {
            within("snapshot-interval", i, Duration::from_secs(1), 30 * DAY)?;
        }
        within(
            "aof-rewrite-min-size",
            p.rewrite_min_bytes,
            1 << 10,
            1 << 50,
        )?;
        within("aof-rewrite-percentage", p.rewrite_percentage, 0, 100_000)?;
    }
    let mut warnings = Vec::new();
    if let Some(ram) = physical_memory()
        && n.cache.max_bytes > ram
    {
        warnings.push(format!(
            "--max-memory {} is more than this machine's memory ({ram} bytes): the kernel may kill the node before it starts evicting",
            n.cache.max_bytes
        ));
    }
    Ok(warnings)
}

/// Parses `512MiB`, `1GiB`, `64KiB`, `1000000` (bytes), `10MB`.
pub(crate) fn parse_size(what: &str, s: &str) -> Result<u64> {
    let size: bytesize::ByteSize = s.trim().parse().map_err(|e| {
        anyhow::anyhow!("{what}: cannot read {s:?} as a size (try 512MiB or 1GiB): {e}")
    })?;
    Ok(size.as_u64())
}

/// Parses `500ms`, `10s`, `1m`.
pub(crate) fn parse_duration(what: &str, s: &str) -> Result<Duration> {
    humantime::parse_duration(s.trim())
        .with_context(|| format!("{what}: cannot read {s:?} as a duration (try 500ms or 10s)"))
}

fn usize_size(what: &str, s: &str) -> Result<usize> {
    usize::try_from(parse_size(what, s)?).with_context(|| format!("{what}: {s} is too large"))
}

impl Args {
    /// Applies the precedence rules and checks every value.
    pub(crate) fn resolve(self) -> Result<Resolved> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("config file {} is invalid", path.display()))?
            }
            None => FileConfig::default(),
        };
        let d = NodeConfig::default();
        let dc = CacheConfig::default();
        let dl = Limits::default();
        let max_memory = match self.max_memory.or(file.max_memory) {
            Some(s) => parse_size("max-memory", &s)?,
            None => dc.max_bytes,
        };
        if max_memory == 0 {
            bail!("max-memory must be greater than zero");
        }
        let limits = Limits {
            max_key_bytes: match self.max_key_size.or(file.max_key_size) {
                Some(s) => usize_size("max-key-size", &s)?,
                None => dl.max_key_bytes,
            },
            max_value_bytes: match self.max_value_size.or(file.max_value_size) {
                Some(s) => usize_size("max-value-size", &s)?,
                // The default never exceeds what one shard can hold (small --max-memory).
                None => dl.max_value_bytes.min(
                    usize::try_from(
                        max_memory / self.shards.or(file.shards).unwrap_or(dc.shards).max(1) as u64,
                    )
                    .unwrap_or(usize::MAX),
                ),
            },
            max_batch: self.max_batch.or(file.max_batch).unwrap_or(dl.max_batch),
        };
        if limits.max_key_bytes == 0 || limits.max_batch == 0 {
            bail!("max-key-size and max-batch must be greater than zero");
        }
        let cache = CacheConfig {
            max_bytes: max_memory,
            max_items: self.max_items.or(file.max_items),
            shards: self.shards.or(file.shards).unwrap_or(dc.shards),
            evict: self.eviction.or(file.eviction).unwrap_or(dc.evict),
            eviction_policy: match self.eviction_policy.or(file.eviction_policy) {
                Some(p) => p
                    .parse::<EvictionPolicy>()
                    .map_err(|e| anyhow::anyhow!("--eviction-policy: {e}"))?,
                None => NODE_EVICTION_POLICY,
            },
            ..dc
        };
        cache.validate().context("invalid cache settings")?;
        let dk = CoreConfig::default();
        let cluster = CoreConfig {
            replication_factor: self
                .replication_factor
                .or(file.replication_factor)
                .unwrap_or(dk.replication_factor),
            default_consistency: match self.write_consistency.or(file.write_consistency) {
                Some(s) => s
                    .parse::<Consistency>()
                    .with_context(|| format!("write-consistency: {s:?}"))?,
                None => dk.default_consistency,
            },
            peer_timeout: match self.peer_timeout.or(file.peer_timeout) {
                Some(s) => parse_duration("peer-timeout", &s)?,
                None => dk.peer_timeout,
            },
            queue_capacity: self
                .replication_queue
                .or(file.replication_queue)
                .unwrap_or(dk.queue_capacity),
            hint_bytes_max: match self.hints_memory.or(file.hints_memory) {
                Some(s) => usize::try_from(parse_size("hints-memory", &s)?)
                    .context("hints-memory is too large for this machine")?,
                None => dk.hint_bytes_max,
            },
            ..dk
        };
        if cluster.replication_factor == 0
            || cluster.queue_capacity == 0
            || cluster.peer_timeout.is_zero()
        {
            bail!(
                "replication-factor, replication-queue and peer-timeout must be greater than zero"
            );
        }
        let peers = match self.peers.or(file.peers) {
            Some(s) => parse_peers(&s).context("invalid --peers")?,
            None => Vec::new(),
        };
        let request_timeout = match self.request_timeout.or(file.request_timeout) {
            Some(s) => parse_duration("request-timeout", &s)?,
            None => d.request_timeout,
        };
        let max_clock_drift = match self.max_clock_drift.or(file.max_clock_drift) {
            Some(s) => parse_duration("max-clock-drift", &s)?,
            None => d.max_clock_drift,
        };
        let slowlog = cache_rpc::slowlog::SlowLogConfig {
            threshold: match self.slowlog_threshold.or(file.slowlog_threshold) {
                Some(s) if s.eq_ignore_ascii_case("off") => None,
                Some(s) => Some(parse_duration("slowlog-threshold", &s)?),
                None => d.slowlog.threshold,
            },
            max_len: self
                .slowlog_max_len
                .or(file.slowlog_max_len)
                .unwrap_or(d.slowlog.max_len),
        };
        if request_timeout.is_zero() || max_clock_drift.is_zero() {
            bail!("request-timeout and max-clock-drift must be greater than zero");
        }
        let anti_entropy = {
            let default = cache_rpc::SyncConfig::default();
            let interval = match self.anti_entropy_interval.or(file.anti_entropy_interval) {
                Some(s) => parse_duration("anti-entropy-interval", &s)?,
                None => default.interval,
            };
            let bytes_per_sec = match self.sync_rate.or(file.sync_rate) {
                Some(s) => parse_size("sync-rate", &s)?,
                None => default.bytes_per_sec,
            };
            (!interval.is_zero()).then_some(cache_rpc::SyncConfig {
                interval,
                bytes_per_sec,
                ..default
            })
        };
        let connections = {
            let dc = d.connections;
            let optional = |what: &str,
                            v: Option<String>,
                            default: Option<Duration>|
             -> Result<Option<Duration>> {
                match v {
                    Some(s) => {
                        let d = parse_duration(what, &s)?;
                        Ok((!d.is_zero()).then_some(d))
                    }
                    None => Ok(default),
                }
            };
            cache_rpc::ConnLimits {
                max_connections: self
                    .max_connections
                    .or(file.max_connections)
                    .unwrap_or(dc.max_connections),
                handshake_timeout: optional(
                    "handshake-timeout",
                    self.handshake_timeout.or(file.handshake_timeout),
                    dc.handshake_timeout,
                )?,
                idle_timeout: optional(
                    "idle-timeout",
                    self.idle_timeout.or(file.idle_timeout),
                    dc.idle_timeout,
                )?,
            }
        };
        let auth = match self.auth_file.or(file.auth_file) {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read the auth file {}", path.display()))?;
                Some(
                    cache_rpc::auth::parse_tokens(&text)
                        .map_err(|e| anyhow::anyhow!("auth file {}: {e}", path.display()))?,
                )
            }
        };
        let tls = match (
            self.tls_cert.or(file.tls_cert),
            self.tls_key.or(file.tls_key),
            self.tls_client_ca.or(file.tls_client_ca),
        ) {
            (Some(cert), Some(key), client_ca) => Some(cache_rpc::tls::TlsFiles {
                cert,
                key,
                client_ca,
            }),
            (None, None, None) => None,
            _ => bail!(
                "TLS needs both --tls-cert and --tls-key (and --tls-client-ca only with them)"
            ),
        };
        let peer_tls = match (
            self.peer_tls_cert.or(file.peer_tls_cert),
            self.peer_tls_key.or(file.peer_tls_key),
            self.peer_tls_ca.or(file.peer_tls_ca),
        ) {
            (Some(cert), Some(key), Some(ca)) => Some(cache_rpc::tls::TlsFiles {
                cert,
                key,
                client_ca: Some(ca),
            }),
            (None, None, None) => None,
            _ => bail!("peer TLS needs --peer-tls-cert, --peer-tls-key and --peer-tls-ca together"),
        };
        let persistence = match self.data_dir.or(file.data_dir) {
            None => None,
            Some(dir) => {
                let fsync = match self.appendfsync.or(file.appendfsync) {
                    Some(s) => s
                        .parse::<cache_rpc::FsyncPolicy>()
                        .map_err(|e| anyhow::anyhow!("appendfsync: {e}"))?,
                    None => cache_rpc::FsyncPolicy::EverySec,
                };
                let interval = match self.snapshot_interval.or(file.snapshot_interval) {
                    Some(s) => parse_duration("snapshot-interval", &s)?,
                    None => Duration::from_secs(3600),
                };
                let rewrite_min_bytes =
                    match self.aof_rewrite_min_size.or(file.aof_rewrite_min_size) {
                        Some(s) => parse_size("aof-rewrite-min-size", &s)?,
                        None => 64 << 20,
                    };
                let rewrite_percentage = self
                    .aof_rewrite_percentage
                    .or(file.aof_rewrite_percentage)
                    .unwrap_or(100);
                Some(cache_rpc::PersistConfig {
                    dir,
                    fsync,
                    snapshot_interval: (!interval.is_zero()).then_some(interval),
                    rewrite_min_bytes,
                    rewrite_percentage,
                    limits: cache_rpc::LogLimits {
                        max_key_bytes: limits.max_key_bytes,
                        max_value_bytes: limits.max_value_bytes,
                    },
                })
            }
        };
        let listen = self.listen.or(file.listen).unwrap_or(d.listen);
        let peer_listen = match self.peer_listen.or(file.peer_listen) {
            Some(a) => a,
            None if listen.port() == 0 => SocketAddr::new(listen.ip(), 0),
            None => default_peer_addr(listen).with_context(|| {
                format!("--listen port {} leaves no room for the default peer port (+100); set --peer-listen", listen.port())
            })?,
        };
        let membership = match self
            .membership
            .or(file.membership)
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("static") => MembershipMode::Static,
            Some(mode @ ("gossip" | "coordinator")) => {
                if !peers.is_empty() {
                    bail!(
                        "--peers is for static membership; with {mode}, name seeds with --join or --coordinator"
                    );
                }
                let coordinator = self.coordinator.or(file.coordinator);
                let protocol = if mode == "gossip" {
                    if coordinator.is_some() {
                        bail!("--coordinator is for --membership coordinator");
                    }
                    NetworkProtocol::Gossip
                } else {
                    NetworkProtocol::Coordinator { coordinator }
                };
                let listen = match self.gossip_listen.or(file.gossip_listen) {
                    Some(a) => a,
                    None if listen.port() == 0 => SocketAddr::new(listen.ip(), 0),
                    None => {
                        let port = listen.port().checked_add(200).with_context(|| {
                            format!("--listen port {} leaves no room for the default gossip port (+200); set --gossip-listen", listen.port())
                        })?;
                        SocketAddr::new(listen.ip(), port)
                    }
                };
                let join = self
                    .join
                    .or(file.join)
                    .map(|j| {
                        j.split(',')
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty())
                            .collect()
                    })
                    .unwrap_or_default();
                let cluster_name = self
                    .cluster_name
                    .or(file.cluster_name)
                    .unwrap_or_else(|| "cache-cluster".into());
                if cluster_name.len() > 64 {
                    bail!("cluster-name must be at most 64 bytes");
                }
                let encrypt = self.gossip_encrypt || file.gossip_encrypt.unwrap_or(false);
                MembershipMode::Network {
                    protocol,
                    listen,
                    join,
                    cluster_name,
                    advertise: self.advertise.or(file.advertise),
                    keyring: match self
                        .gossip_keys_file
                        .clone()
                        .or(file.gossip_keys_file.clone())
                    {
                        None if encrypt => {
                            bail!(
                                "--gossip-encrypt needs --gossip-keys-file (the secrets it encrypts with)"
                            )
                        }
                        None => None,
                        Some(path) if encrypt => Some(read_keyring(&path)?.encrypting()),
                        Some(path) => Some(read_keyring(&path)?),
                    },
                }
            }
            Some(other) => bail!("membership: {other:?} is not static, gossip or coordinator"),
        };
        let node = NodeConfig {
            membership,
            node_id: self.node_id.or(file.node_id).unwrap_or(d.node_id),
            listen,
            peer_listen,
            request_timeout,
            slowlog,
            max_clock_drift,
            admin_listen: self
                .admin_listen
                .or(file.admin_listen)
                .unwrap_or(d.admin_listen),
            resp_listen: self.resp_listen.or(file.resp_listen),
            cache,
            limits,
            reaper_interval: match self.reaper_interval.or(file.reaper_interval) {
                Some(s) => parse_duration("reaper-interval", &s)?,
                None => d.reaper_interval,
            },
            reaper_budget: d.reaper_budget,
            shutdown_grace: match self.shutdown_grace.or(file.shutdown_grace) {
                Some(s) => parse_duration("shutdown-grace", &s)?,
                None => d.shutdown_grace,
            },
            shutdown_notice: match self.shutdown_notice.or(file.shutdown_notice) {
                Some(s) => parse_duration("shutdown-notice", &s)?,
                None => d.shutdown_notice,
            },
            peers,
            cluster,
            anti_entropy,
            persistence,
            connections,
            auth,
            tls,
            peer_tls,
            admin_tls: self.admin_tls || file.admin_tls.unwrap_or(false),
            ready_while_syncing: self.ready_while_syncing
                || file.ready_while_syncing.unwrap_or(false),
        };
        let warnings = check_bounds(&node)?;
        protected_mode(
            &node,
            self.insecure_allow_plaintext || file.insecure_allow_plaintext.unwrap_or(false),
        )?;
        let worker_threads = match self.worker_threads.or(file.worker_threads) {
            Some(n) => {
                within("worker-threads", n, 1, MAX_WORKER_THREADS)?;
                n
            }
            None => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_WORKER_THREADS),
        };
        Ok(Resolved {
            warnings,
            node,
            worker_threads,
            log_format: self
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Pretty),
            log_level: check_log_level(
                self.log_level
                    .or(file.log_level)
                    .unwrap_or_else(|| "info".into()),
            )?,
        })
    }
}

/// Checks a `--log-level`: a level (`trace`, `debug`, `info`, `warn`, `error`, `off`) or a
/// comma-separated list of `target=level` directives (RUST_LOG syntax). The filter parser
/// itself takes any bare word as a target name, so a typo (`--log-level verbose`) would
/// silently log nothing but that target's events: refused here instead.
pub(crate) fn check_log_level(spec: String) -> anyhow::Result<String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |s: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s.trim()));
    for directive in spec.split(',').filter(|d| !d.trim().is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !is_level(level) {
            bail!(
                "log-level {spec:?}: {:?} is not a level (trace, debug, info, warn, error, off) \
                 or a target=level directive",
                directive.trim()
            );
        }
    }
    if spec.trim().is_empty() {
        bail!("log-level must not be empty (trace, debug, info, warn, error, off)");
    }
    tracing_subscriber::EnvFilter::try_new(&spec)
        .map_err(|e| anyhow::anyhow!("log-level {spec:?}: {e}"))?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("cache-node").chain(list.iter().copied()))
            .expect("valid flags")
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("x", "512MiB").expect("size"), 512 << 20);
        assert_eq!(parse_size("x", "1GiB").expect("size"), 1 << 30);
        assert_eq!(parse_size("x", "4096").expect("size"), 4096);
        assert!(parse_size("x", "lots").is_err());
        assert_eq!(
            parse_duration("x", "500ms").expect("duration"),
            Duration::from_millis(500)
        );
        assert_eq!(
            parse_duration("x", "10s").expect("duration"),
            Duration::from_secs(10)
        );
        assert!(parse_duration("x", "soon").is_err());
    }

    #[test]
    fn defaults_need_no_configuration() {
        let r = args(&[]).resolve().expect("defaults are valid");
        assert_eq!(r.node.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(r.node.admin_listen.to_string(), "127.0.0.1:7080");
        assert_eq!(r.node.peer_listen.to_string(), "127.0.0.1:7100");
        let r = args(&["--listen", "127.0.0.1:0"]).resolve().expect("valid");
        assert_eq!(r.node.peer_listen.port(), 0, "ephemeral follows ephemeral");
        let r = args(&["--listen", "127.0.0.1:9000"])
            .resolve()
            .expect("valid");
        assert_eq!(r.node.peer_listen.to_string(), "127.0.0.1:9100");
        assert_eq!(r.node.cache.max_bytes, 1 << 30);
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let dir = std::env::temp_dir().join(format!("cache-node-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("node.toml");
        std::fs::write(
            &path,
            "max-memory = \"64MiB\"\nnode-id = \"from-file\"\nmax-batch = 7\nworker-threads = 3\n",
        )
        .expect("write");
        let path_s = path.to_string_lossy().to_string();
        let r = args(&["--config", &path_s, "--max-memory", "32MiB"])
            .resolve()
            .expect("valid");
        assert_eq!(r.node.cache.max_bytes, 32 << 20, "flag wins over file");
        assert_eq!(r.node.node_id, "from-file", "file wins over default");
        assert_eq!(r.node.limits.max_batch, 7);
        if std::env::var_os("CACHE_WORKER_THREADS").is_none() {
            assert_eq!(r.worker_threads, 3, "the file sets the runtime's threads");
        }
        std::fs::write(&path, "max-memroy = \"64MiB\"\n").expect("write");
        let err = args(&["--config", &path_s])
            .resolve()
            .expect_err("typo is an error");
        assert!(format!("{err:#}").contains("max-memroy"), "{err:#}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let err = args(&["--max-memory", "huge"])
            .resolve()
            .expect_err("bad size");
        assert!(format!("{err:#}").contains("max-memory"));
        let err = args(&["--write-consistency", "most"])
            .resolve()
            .expect_err("bad consistency");
        assert!(format!("{err:#}").contains("one, quorum, all"), "{err:#}");
        let err = args(&["--listen", "127.0.0.1:65500"])
            .resolve()
            .expect_err("no default peer port");
        assert!(format!("{err:#}").contains("--peer-listen"), "{err:#}");
        let err = args(&["--shards", "3"]).resolve().expect_err("bad shards");
        assert!(format!("{err:#}").contains("power of two"), "{err:#}");
        let err = args(&["--eviction-policy", "arc"])
            .resolve()
            .expect_err("bad policy");
        assert!(
            format!("{err:#}").contains("--eviction-policy: unknown eviction policy"),
            "{err:#}"
        );
    }

    #[test]
    fn the_eviction_policy_reaches_the_engine() {
        let config = args(&["--eviction-policy", "sieve"])
            .resolve()
            .expect("valid");
        assert_eq!(config.node.cache.eviction_policy, EvictionPolicy::Sieve);
        let config = args(&[]).resolve().expect("valid");
        assert_eq!(config.node.cache.eviction_policy, EvictionPolicy::Sieve);
        let config = args(&["--eviction-policy", "lru"])
            .resolve()
            .expect("valid");
        assert_eq!(config.node.cache.eviction_policy, EvictionPolicy::Lru);
    }

    #[test]
    fn worker_threads_default_to_the_usable_cpus_and_are_bounded() {
        // The suite also runs with CACHE_WORKER_THREADS=1 (every real node on one thread).
        let default = std::env::var("CACHE_WORKER_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        assert_eq!(args(&[]).resolve().expect("valid").worker_threads, default);
        let one = args(&["--worker-threads", "1"]).resolve().expect("valid");
        assert_eq!(one.worker_threads, 1);
        for bad in ["0", "1025"] {
            let e = args(&["--worker-threads", bad])
                .resolve()
                .expect_err(bad)
                .to_string();
            assert!(e.contains("worker-threads"), "{e}");
        }
    }

    #[test]
    fn an_unknown_log_level_is_an_error_not_silence() {
        for good in [
            "info",
            "DEBUG",
            "warn,cache_rpc=debug",
            "cluster_core=trace",
            "off",
        ] {
            assert_eq!(check_log_level(good.into()).expect(good), good);
        }
        for bad in ["verbose", "", "cache_rpc=loud", "info,chatty"] {
            let e = check_log_level(bad.into()).expect_err(bad).to_string();
            assert!(e.contains("level"), "{bad}: {e}");
        }
    }
}
