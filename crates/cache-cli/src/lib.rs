//! `cache-cli` as a library: parse arguments, run one command against a node through
//! `cache-client`, print human or JSON output, and return a documented exit code.
//!
//! The binary (`bins/cache-cli`) only calls [`main_with`]. Keys and values are taken as raw
//! bytes from the OS (binary-safe on Unix), values may come from an argument, stdin (`-`) or
//! `--file`.
//!
//! # Exit codes
//!
//! | code | meaning |
//! | ---: | --- |
//! | 0 | success |
//! | 1 | the key does not exist (`get`, `ttl`, `touch`, `del`), or a `set --nx/--xx` condition did not hold |
//! | 2 | bad command line (unknown flag, missing argument, invalid UTF-8 where text is expected) |
//! | 3 | cannot reach the node, or it is unavailable (shutting down) |
//! | 4 | the node refused the request as invalid (empty key, over a size limit) |
//! | 5 | timed out |
//! | 6 | any other error (node full, server error, unreadable value file) |

#![forbid(unsafe_code)]

use std::ffi::{OsStr, OsString};
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use cache_client::{Client, ClusterClient, Consistency, Error, SetOptions};
use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{Value, json};

/// Success.
pub const EXIT_OK: u8 = 0;
/// The key does not exist, or a condition did not hold.
pub const EXIT_NOT_FOUND: u8 = 1;
/// Bad command line (clap's own code).
pub const EXIT_USAGE: u8 = 2;
/// Cannot connect, or the node is unavailable.
pub const EXIT_UNAVAILABLE: u8 = 3;
/// The node refused the request as invalid.
pub const EXIT_INVALID: u8 = 4;
/// Timed out.
pub const EXIT_TIMEOUT: u8 = 5;
/// Any other error.
pub const EXIT_OTHER: u8 = 6;

/// cache-cli: talk to a cache-cluster node.
#[derive(Debug, Parser)]
#[command(name = "cache-cli", version, about, long_about = None)]
pub struct Cli {
    /// Node address (host:port).
    #[arg(
        long,
        global = true,
        env = "CACHE_ADDR",
        default_value = "127.0.0.1:7000"
    )]
    addr: String,
    /// Cluster seed addresses (comma-separated): route each key straight to its replicas,
    /// like the SDK's cluster client. Without it, requests go to --addr, which forwards.
    #[arg(long, global = true, env = "CACHE_SEEDS", value_delimiter = ',')]
    seeds: Vec<String>,
    /// Consistency of writes and reads: one, quorum or all.
    #[arg(long, global = true, value_parser = parse_consistency)]
    consistency: Option<Consistency>,
    /// Print JSON instead of human output.
    #[arg(long, global = true)]
    json: bool,
    /// Deadline of the request, e.g. 500ms, 2s.
    #[arg(long, global = true, default_value = "2s", value_parser = parse_duration)]
    timeout: Duration,
    /// Token for nodes started with --auth-file (sent as `authorization: Bearer TOKEN`).
    /// Prefer the environment variable: a flag shows up in `ps` and shell history.
    #[arg(long, global = true, env = "CACHE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Connect with TLS, trusting this CA (PEM): for nodes started with --tls-cert.
    #[arg(long, global = true, env = "CACHE_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for nodes started with --tls-client-ca; with --tls-key.
    #[arg(long, global = true, env = "CACHE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "CACHE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the value of KEY (raw bytes; exit 1 if missing).
    Get {
        /// The key.
        key: OsString,
    },
    /// Store a value: from VALUE, from stdin with `-`, or from --file.
    Set {
        /// The key.
        key: OsString,
        /// The value; `-` reads stdin.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        value: Option<OsString>,
        /// Read the value from this file.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Expire after this long, e.g. 10s, 5m.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Only if the key does not exist (exit 1 if it does).
        #[arg(long, conflicts_with = "xx")]
        nx: bool,
        /// Only if the key exists (exit 1 if it does not).
        #[arg(long)]
        xx: bool,
    },
    /// Delete KEY (exit 1 if it did not exist).
    Del {
        /// The key.
        key: OsString,
    },
    /// Print the time KEY has left ("never" if it does not expire; exit 1 if missing).
    Ttl {
        /// The key.
        key: OsString,
    },
    /// Change the TTL of KEY (exit 1 if missing).
    Touch {
        /// The key.
        key: OsString,
        /// New time to live, e.g. 10s.
        #[arg(long, value_parser = parse_duration, required_unless_present = "persist")]
        ttl: Option<Duration>,
        /// Remove the expiry instead.
        #[arg(long, conflicts_with = "ttl")]
        persist: bool,
    },
    /// Add DELTA (default 1; negative decrements) to the integer at KEY and print the result
    /// (a missing key counts as 0). Atomic on the key's primary; never retried.
    Incr {
        /// The key.
        key: OsString,
        /// The amount to add.
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        delta: i64,
        /// Time to live of a key this call creates (an existing key keeps its own).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// Print the node's counters and sizes.
    Stats,
    /// Make the node (--addr) write a snapshot of its data now (it must run with
    /// --data-dir); waits until it is durable: raise --timeout for large data.
    Snapshot,
    /// Print the cluster's members and ring parameters, as one node reports them.
    Info,
    /// Print the members: id, address, state, share of the key space.
    Members,
    /// Print the ring: fingerprint, epoch, replication factor, ownership per member.
    Ring,
    /// Print a shell completion script.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// The name of a member state as it came over the wire (`unknown` for a value this CLI
/// does not know, from a newer node).
fn member_state_name(raw: i32) -> &'static str {
    cache_proto::convert::member_state_from_pb(raw).map_or("unknown", |s| s.as_str())
}

fn parse_consistency(s: &str) -> Result<Consistency, String> {
    s.parse()
        .map_err(|e: cache_types::UnknownValue| e.to_string())
}

/// Where the CLI sends requests: one node (which forwards), or the cluster directly.
enum Conn {
    Single(Client),
    Cluster(ClusterClient),
}

impl Conn {
    async fn get_entry(&self, key: Bytes) -> Result<Option<cache_client::Entry>, Error> {
        match self {
            Conn::Single(c) => c.get_entry(key).await,
            Conn::Cluster(c) => c.get_entry(key).await,
        }
    }
    async fn set_with(&self, key: Bytes, value: Bytes, options: SetOptions) -> Result<bool, Error> {
        match self {
            Conn::Single(c) => c.set_with(key, value, options).await,
            Conn::Cluster(c) => c.set_with(key, value, options).await,
        }
    }
    async fn delete(&self, key: Bytes) -> Result<bool, Error> {
        match self {
            Conn::Single(c) => c.delete(key).await,
            Conn::Cluster(c) => c.delete(key).await,
        }
    }
    async fn touch(&self, key: Bytes, ttl: Option<Duration>) -> Result<bool, Error> {
        match self {
            Conn::Single(c) => c.touch(key, ttl).await,
            Conn::Cluster(c) => c.touch(key, ttl).await,
        }
    }
    async fn incr(&self, key: Bytes, delta: i64, ttl: Option<Duration>) -> Result<i64, Error> {
        match self {
            Conn::Single(c) => c.incr(key, delta, ttl).await,
            Conn::Cluster(c) => c.incr(key, delta, ttl).await,
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (try 500ms, 10s or 5m)"))
}

/// Raw bytes of an OS string: exact on Unix; elsewhere, lossy UTF-8.
fn os_bytes(s: &OsStr) -> Bytes {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Bytes::copy_from_slice(s.as_bytes())
    }
    #[cfg(not(unix))]
    {
        Bytes::from(s.to_string_lossy().into_owned())
    }
}

/// A value for JSON: a string if it is UTF-8, otherwise hex under `*_hex`.
fn json_bytes(name: &str, b: &[u8]) -> (String, Value) {
    match std::str::from_utf8(b) {
        Ok(s) => (name.to_string(), Value::String(s.to_string())),
        Err(_) => (
            format!("{name}_hex"),
            Value::String(b.iter().map(|x| format!("{x:02x}")).collect()),
        ),
    }
}

/// What a command produced: an exit code, and what to print.
struct Outcome {
    code: u8,
    human: Vec<u8>,
    json: Value,
}

impl Outcome {
    fn ok(human: impl Into<Vec<u8>>, json: Value) -> Self {
        Self {
            code: EXIT_OK,
            human: human.into(),
            json,
        }
    }
}

/// Parses `args` (including the program name), runs the command, writes to `stdout` /
/// `stderr`, reads `stdin` for `set KEY -`, and returns the exit code.
pub fn main_with(
    args: impl IntoIterator<Item = OsString>,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> u8 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let text = e.render().ansi().to_string();
            let _ = if e.use_stderr() {
                stderr.write_all(text.as_bytes())
            } else {
                stdout.write_all(text.as_bytes())
            };
            return code;
        }
    };
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "cache-cli", stdout);
        return EXIT_OK;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(stderr, "cache-cli: cannot start the async runtime: {e}");
            return EXIT_OTHER;
        }
    };
    let json = cli.json;
    let result = runtime.block_on(run(cli, stdin));
    match result {
        Ok(out) => {
            let written = if json {
                writeln!(stdout, "{}", out.json)
            } else {
                stdout.write_all(&out.human)
            };
            if written.is_err() {
                return EXIT_OTHER;
            }
            out.code
        }
        Err((code, message)) => {
            if json {
                let _ = writeln!(stdout, "{}", json!({ "error": message, "exit_code": code }));
            }
            let _ = writeln!(stderr, "cache-cli: {message}");
            code
        }
    }
}

/// Maps an SDK error to an exit code and a message that says what to try.
fn failure(addr: &str, e: Error) -> (u8, String) {
    match e {
        Error::Unavailable(m) => (EXIT_UNAVAILABLE, m),
        Error::InvalidRequest { message, .. } => (
            EXIT_INVALID,
            format!("the node refused the request: {message}"),
        ),
        Error::TimedOut(d) => (
            EXIT_TIMEOUT,
            format!(
                "no answer from {addr} within {d:?}: is the node overloaded? (raise --timeout)"
            ),
        ),
        Error::InvalidAddress { addr, message } => (
            EXIT_UNAVAILABLE,
            format!("invalid address {addr:?}: {message}"),
        ),
        Error::Full(m) => (
            EXIT_OTHER,
            format!("the node is full and does not evict: {m}"),
        ),
        Error::NotFound(m) => (EXIT_NOT_FOUND, m),
        other => (EXIT_OTHER, other.to_string()),
    }
}

fn missing(key: &[u8], json: Value) -> Outcome {
    Outcome {
        code: EXIT_NOT_FOUND,
        human: format!("(not found: {})\n", String::from_utf8_lossy(key)).into_bytes(),
        json,
    }
}

async fn run(cli: Cli, stdin: &mut dyn Read) -> Result<Outcome, (u8, String)> {
    let addr = cli.addr.clone();
    // Read the value before connecting, so a bad file is reported as such.
    let value = match &cli.command {
        Command::Set { value, file, .. } => Some(match (value, file) {
            (_, Some(path)) => Bytes::from(
                std::fs::read(path)
                    .map_err(|e| (EXIT_OTHER, format!("cannot read {}: {e}", path.display())))?,
            ),
            (Some(v), None) if v == "-" => {
                let mut buf = Vec::new();
                stdin
                    .read_to_end(&mut buf)
                    .map_err(|e| (EXIT_OTHER, format!("cannot read stdin: {e}")))?;
                Bytes::from(buf)
            }
            (Some(v), None) => os_bytes(v),
            (None, None) => return Err((EXIT_USAGE, "set needs a VALUE, `-` or --file".into())),
        }),
        _ => None,
    };
    let mut builder = Client::builder()
        .timeout(cli.timeout)
        .connect_timeout(cli.timeout);
    if let Some(c) = cli.consistency {
        builder = builder.write_consistency(c).read_consistency(c);
    }
    if let Some(t) = &cli.token {
        builder = builder.token(t).map_err(|e| (EXIT_USAGE, e.to_string()))?;
    }
    if cli.tls_ca.is_some() || cli.tls_cert.is_some() {
        let tls = cache_client::Tls::from_files(
            cli.tls_ca.as_deref(),
            cli.tls_cert.as_deref(),
            cli.tls_key.as_deref(),
        )
        .map_err(|e| (EXIT_USAGE, e.to_string()))?;
        builder = builder.tls(tls);
    }
    let needs_view = matches!(cli.command, Command::Members | Command::Ring);
    let seeds = if cli.seeds.is_empty() {
        vec![addr.clone()]
    } else {
        cli.seeds.clone()
    };
    let conn = if !cli.seeds.is_empty() || needs_view {
        Conn::Cluster(
            builder
                .clone()
                .connect_cluster(seeds.clone())
                .await
                .map_err(|e| failure(&seeds.join(","), e))?,
        )
    } else {
        Conn::Single(
            builder
                .clone()
                .connect(addr.clone())
                .await
                .map_err(|e| failure(&addr, e))?,
        )
    };
    // Stats and info talk to one node: --addr, or the first seed that answers.
    let one_node = || async {
        let mut last = None;
        for a in &seeds {
            match builder.clone().connect(a.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(failure(a, e)),
            }
        }
        Err(last.unwrap_or((EXIT_UNAVAILABLE, "no address".into())))
    };
    let fail = |e| failure(&addr, e);
    Ok(match cli.command {
        Command::Get { key } => {
            let key = os_bytes(&key);
            match conn
                .get_entry(key.clone())
                .await
                .map_err(fail)?
                .map(|e| e.value)
            {
                Some(v) => {
                    let mut human = v.to_vec();
                    if std::io::stdout().is_terminal() {
                        human.push(b'\n');
                    }
                    let (k, jv) = json_bytes("value", &v);
                    let mut obj = serde_json::Map::new();
                    obj.insert("found".into(), Value::Bool(true));
                    obj.insert(k, jv);
                    Outcome::ok(human, Value::Object(obj))
                }
                None => missing(&key, json!({ "found": false })),
            }
        }
        Command::Set {
            key, ttl, nx, xx, ..
        } => {
            let key = os_bytes(&key);
            let value = value.unwrap_or_default();
            let mut options = if nx {
                SetOptions::if_absent()
            } else if xx {
                SetOptions::if_present()
            } else {
                SetOptions::default()
            };
            options.ttl = ttl;
            if conn
                .set_with(key.clone(), value, options)
                .await
                .map_err(fail)?
            {
                Outcome::ok("OK\n", json!({ "stored": true }))
            } else {
                Outcome {
                    code: EXIT_NOT_FOUND,
                    human: b"(not stored: condition not met)\n".to_vec(),
                    json: json!({ "stored": false }),
                }
            }
        }
        Command::Del { key } => {
            let key = os_bytes(&key);
            if conn.delete(key.clone()).await.map_err(fail)? {
                Outcome::ok("deleted\n", json!({ "deleted": true }))
            } else {
                missing(&key, json!({ "deleted": false }))
            }
        }
        Command::Ttl { key } => {
            let key = os_bytes(&key);
            match conn.get_entry(key.clone()).await.map_err(fail)? {
                Some(e) => match e.ttl {
                    None => Outcome::ok("never\n", json!({ "found": true, "ttl_ms": null })),
                    Some(t) => Outcome::ok(
                        format!(
                            "{}\n",
                            humantime::format_duration(Duration::from_millis(t.as_millis() as u64))
                        ),
                        json!({ "found": true, "ttl_ms": t.as_millis() as u64 }),
                    ),
                },
                None => missing(&key, json!({ "found": false })),
            }
        }
        Command::Touch { key, ttl, persist } => {
            let key = os_bytes(&key);
            let ttl = if persist { None } else { ttl };
            if conn.touch(key.clone(), ttl).await.map_err(fail)? {
                Outcome::ok("OK\n", json!({ "found": true }))
            } else {
                missing(&key, json!({ "found": false }))
            }
        }
        Command::Incr { key, delta, ttl } => {
            let value = conn.incr(os_bytes(&key), delta, ttl).await.map_err(fail)?;
            Outcome::ok(format!("{value}\n"), json!({ "value": value }))
        }
        Command::Stats => {
            let s = one_node().await?.stats().await.map_err(fail)?;
            let lookups = s.hits + s.misses;
            let ratio = if lookups == 0 {
                0.0
            } else {
                s.hits as f64 / lookups as f64
            };
            let human = format!(
                "node        {}\nversion     {}\nuptime      {}s\nitems       {}\nbytes       {} of {}\nhits        {}\nmisses      {}\nhit ratio   {:.1} %\ninserts     {}\nupdates     {}\ndeletes     {}\nevictions   {}\nexpirations {}\n",
                s.node_id,
                s.version,
                s.uptime_seconds,
                s.items,
                s.bytes,
                s.max_bytes,
                s.hits,
                s.misses,
                ratio * 100.0,
                s.inserts,
                s.updates,
                s.deletes,
                s.evictions,
                s.expirations
            );
            Outcome::ok(
                human,
                json!({
                    "node_id": s.node_id, "version": s.version, "uptime_seconds": s.uptime_seconds,
                    "items": s.items, "bytes": s.bytes, "max_bytes": s.max_bytes, "hits": s.hits,
                    "misses": s.misses, "inserts": s.inserts, "updates": s.updates, "deletes": s.deletes,
                    "evictions": s.evictions, "expirations": s.expirations,
                }),
            )
        }
        Command::Snapshot => {
            let s = one_node().await?.snapshot().await.map_err(fail)?;
            Outcome::ok(
                format!(
                    "snapshot {}: {} entries, {} bytes in {} ms\n",
                    s.path, s.entries, s.bytes, s.took_ms
                ),
                json!({"path": s.path, "entries": s.entries, "bytes": s.bytes, "took_ms": s.took_ms}),
            )
        }
        Command::Info => {
            let i = one_node().await?.cluster_info().await.map_err(fail)?;
            let mut human = format!(
                "node        {}\nring epoch  {}\nfingerprint {:016x}\nvnodes      {} per weight\nreplication {}\nmembers:\n",
                i.node_id,
                i.ring_epoch,
                i.ring_fingerprint,
                i.vnodes_per_weight,
                i.replication_factor
            );
            for m in &i.members {
                human.push_str(&format!(
                    "  {:<16} {:<22} {:<8} weight {}\n",
                    m.id,
                    m.rpc_addr,
                    member_state_name(m.state),
                    m.weight
                ));
            }
            let members: Vec<Value> = i
                .members
                .iter()
                .map(|m| json!({ "id": m.id, "rpc_addr": m.rpc_addr, "state": member_state_name(m.state), "weight": m.weight }))
                .collect();
            Outcome::ok(
                human,
                json!({
                    "node_id": i.node_id, "ring_epoch": i.ring_epoch,
                    "ring_fingerprint": format!("{:016x}", i.ring_fingerprint),
                    "vnodes_per_weight": i.vnodes_per_weight, "replication_factor": i.replication_factor,
                    "members": members,
                }),
            )
        }
        Command::Members | Command::Ring => {
            let Conn::Cluster(cluster) = &conn else {
                return Err((EXIT_OTHER, "internal: no cluster view".into()));
            };
            let members = cluster.members();
            let (fingerprint, epoch, rf) = cluster.ring_summary();
            // Each member's own sync progress (its Stats); "?" when it does not answer.
            let stats: std::collections::HashMap<String, _> = cluster
                .stats()
                .await
                .into_iter()
                .filter_map(|(id, r)| r.ok().map(|s| (id, s)))
                .collect();
            let sync_of = |id: &str| -> (String, Value) {
                match stats.get(id) {
                    Some(s) if s.syncing => (
                        format!("syncing {}/{}", s.sync_peers_synced, s.sync_peers),
                        json!({ "syncing": true, "peers": s.sync_peers, "peers_synced": s.sync_peers_synced }),
                    ),
                    Some(s) => (
                        "synced".to_string(),
                        json!({ "syncing": false, "peers": s.sync_peers, "peers_synced": s.sync_peers_synced }),
                    ),
                    None => ("?".to_string(), Value::Null),
                }
            };
            let rows: Vec<Value> = members
                .iter()
                .map(|m| json!({ "id": m.id, "addr": m.addr, "state": m.state.as_str(), "incarnation": m.incarnation, "weight": m.weight, "share": m.share, "sync": sync_of(&m.id).1 }))
                .collect();
            let mut human = String::new();
            if matches!(cli.command, Command::Ring) {
                human.push_str(&format!(
                    "fingerprint {fingerprint:016x}\nring epoch  {epoch}\nreplication {rf}\n"
                ));
            }
            human.push_str(&format!(
                "{:<16} {:<22} {:<8} {:>11} {:>6} {:>9}  {}\n",
                "id", "address", "state", "incarnation", "weight", "key space", "sync"
            ));
            for m in &members {
                human.push_str(&format!(
                    "{:<16} {:<22} {:<8} {:>11} {:>6} {:>8.1}%  {}\n",
                    m.id,
                    m.addr,
                    m.state,
                    m.incarnation,
                    m.weight,
                    m.share * 100.0,
                    sync_of(&m.id).0
                ));
            }
            Outcome::ok(
                human,
                json!({ "ring_fingerprint": format!("{fingerprint:016x}"), "ring_epoch": epoch, "replication_factor": rf, "members": rows }),
            )
        }
        Command::Completions { .. } => unreachable!("handled before connecting"),
    })
}
