//! `cache-cli` as a library: parse arguments, run one command against a node through
//! `cache-client`, print human or JSON output, and return a documented exit code.
//!
//! The binary (`bins/cache-cli`) only calls [`main_with`]. Keys and values are taken as raw
//! bytes from the OS (binary-safe on Unix), values may come from an argument, stdin (`-`) or
//! `--file`.
//!
//! Output for scripts: values go to stdout as raw bytes; "not found" and errors go to stderr;
//! no colour unless stderr is a terminal and `NO_COLOR` is unset; a closed pipe (`| head`)
//! ends the command quietly.
//!
//! # Exit codes
//!
//! | code | meaning |
//! | ---: | --- |
//! | 0 | success |
//! | 1 | the key does not exist (`get`, `ttl`, `touch`, `del`, `locate`), or a `set --nx/--xx` condition did not hold |
//! | 2 | bad command line (unknown flag, missing argument, malformed address, `--ttl 0`, `--seeds` with `--addr`, `flush` unconfirmed) |
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
use cache_client::{Client, Consistency, Error, SetOptions};
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

/// Read and write keys in a cache-cluster and look after its nodes.
#[derive(Debug, Parser)]
#[command(
    name = "cache-cli",
    version,
    about = "Read and write keys in a cache-cluster and look after its nodes",
    long_about = "Read and write keys in a cache-cluster and look after its nodes.\n\n\
        Talks gRPC to one node (--addr, which forwards keys it does not own) or, with \
        --seeds, to the whole cluster, sending each key straight to its replicas.",
    after_help = "Examples:\n  \
        cache-cli set greeting hello --ttl 10m\n  \
        cache-cli get greeting\n  \
        cache-cli --seeds 10.0.0.1:7000,10.0.0.2:7000 --consistency quorum set k v\n  \
        cache-cli incr visits:today --ttl 1d\n  \
        cache-cli scan --match 'user:*'\n  \
        cache-cli locate user:42\n  \
        cache-cli --json stats\n\n\
        Exit codes: 0 ok, 1 not found, 2 usage, 3 unreachable, 4 refused, 5 timeout, 6 other."
)]
pub struct Cli {
    /// Node address (host:port, or an http:// or https:// URL).
    #[arg(
        long,
        global = true,
        env = "CACHE_ADDR",
        default_value = "127.0.0.1:7000",
        value_parser = parse_addr,
        conflicts_with = "seeds"
    )]
    addr: String,
    /// Cluster seed addresses (comma-separated): route each key straight to its replicas,
    /// like the SDK's cluster client. Without it, requests go to --addr, which forwards.
    #[arg(long, global = true, env = "CACHE_SEEDS", value_delimiter = ',', value_parser = parse_addr)]
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
    /// Largest answer to accept, e.g. 64MiB, 1GiB (at least 64KiB): raise it to read values
    /// over 64 MiB from nodes started with a larger --max-value-size.
    #[arg(long, global = true, default_value = "64MiB", value_parser = parse_response_size)]
    max_response_size: usize,
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
        /// Expire after this long, e.g. 10s, 5m (more than zero).
        #[arg(long, value_parser = parse_ttl)]
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
    /// Print the time KEY has left, in whole seconds ("9m 58s"; "850ms" under a second;
    /// "never" if it does not expire; exit 1 if missing).
    Ttl {
        /// The key.
        key: OsString,
    },
    /// Change the TTL of KEY (exit 1 if missing).
    Touch {
        /// The key.
        key: OsString,
        /// New time to live, e.g. 10s (more than zero).
        #[arg(long, value_parser = parse_ttl, required_unless_present = "persist")]
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
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<Duration>,
    },
    /// Print counters and sizes of every member, and the cluster's totals.
    Stats {
        /// Only the node at --addr.
        #[arg(long)]
        node: bool,
    },
    /// Print how many keys the cluster holds (copies on every member divided by the
    /// replication factor: an estimate while replicas converge); with --node, the exact
    /// number of entries on the node at --addr, as Redis's DBSIZE.
    Dbsize {
        /// Only the node at --addr.
        #[arg(long)]
        node: bool,
    },
    /// Delete every key on every member (asks for confirmation; --yes for scripts).
    Flush {
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
    /// List keys matching a glob. Without --cursor: every key in the cluster, once each.
    /// With --cursor: one step of the node at --addr (start at 0): the next cursor on the
    /// first line (0 when done), then the keys, as redis-cli prints SCAN.
    Scan {
        /// Glob: `*`, `?`, `[a-z]`, `[^x]`, `\` escapes (default: every key).
        #[arg(long = "match", default_value = "*")]
        pattern: OsString,
        /// Entries to examine per step (the node caps it at 10 000).
        #[arg(long, default_value_t = 1000)]
        count: u32,
        /// Take one step from this cursor on the node at --addr.
        #[arg(long)]
        cursor: Option<u64>,
    },
    /// Show which members hold KEY: its replicas (primary first), and each one's version
    /// and TTL (exit 1 if no replica holds it).
    Locate {
        /// The key.
        key: OsString,
    },
    /// Print the slow log of every member (--node: the node at --addr): requests that took
    /// at least the node's --slowlog-threshold, newest first.
    Slowlog {
        /// Entries per node.
        #[arg(long, default_value_t = 10)]
        count: u32,
        /// Clear the slow logs after printing them (an admin operation).
        #[arg(long)]
        reset: bool,
        /// Only the node at --addr.
        #[arg(long)]
        node: bool,
    },
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

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (try 500ms, 10s or 5m)"))
}

/// `--max-response-size`: a size of at least 64 KiB that fits this machine's addresses.
fn parse_response_size(s: &str) -> Result<usize, String> {
    let size: bytesize::ByteSize = s
        .trim()
        .parse()
        .map_err(|e| format!("{e} (try 64MiB or 1GiB)"))?;
    let bytes = usize::try_from(size.as_u64()).map_err(|_| format!("{s} is too large"))?;
    if bytes < cache_client::MIN_CLIENT_RESPONSE_BYTES {
        return Err(format!(
            "must be at least 64KiB ({} bytes)",
            cache_client::MIN_CLIENT_RESPONSE_BYTES
        ));
    }
    Ok(bytes)
}

/// A TTL: a duration of more than zero (zero would mean "expire now" to some and "never" to
/// others; `touch --persist` removes an expiry).
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("a TTL must be more than zero (touch --persist removes an expiry)".into());
    }
    Ok(d)
}

/// A node address: `host:port` with a numeric port, or an `http://` / `https://` URL with
/// one. Checked here so that a typo is a usage error naming the problem, not a connection
/// failure (`127.0.0.1` alone would otherwise mean port 80).
fn parse_addr(s: &str) -> Result<String, String> {
    let rest = match s.split_once("://") {
        Some(("http" | "https", rest)) => rest.trim_end_matches('/'),
        Some((scheme, _)) => {
            return Err(format!(
                "unsupported scheme {scheme:?} (use host:port, http:// or https://)"
            ));
        }
        None => s,
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(format!(
            "{s:?} has no port (expected host:port, e.g. 127.0.0.1:7000)"
        ));
    };
    if host.is_empty()
        || host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        return Err(format!("{s:?} has no valid host (expected host:port)"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(s.to_string()),
        _ => Err(format!("{port:?} is not a port number (1-65535)")),
    }
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

/// A key for JSON output: the string, or `{"hex": ...}` if it is not UTF-8.
fn json_key(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => json!({ "hex": b.iter().map(|x| format!("{x:02x}")).collect::<String>() }),
    }
}

/// A TTL as `cache-cli ttl` prints it: whole seconds (rounded), or milliseconds under one.
fn human_ttl(t: Duration) -> String {
    if t < Duration::from_secs(1) {
        return format!("{}ms", t.as_millis());
    }
    let secs = (t.as_millis() + 500) / 1000;
    humantime::format_duration(Duration::from_secs(u64::try_from(secs).unwrap_or(u64::MAX)))
        .to_string()
}

/// What a command produced: an exit code, what to print on stdout, and a note for stderr
/// (a miss: "(not found: KEY)").
struct Outcome {
    code: u8,
    human: Vec<u8>,
    note: Option<String>,
    json: Value,
}

impl Outcome {
    fn ok(human: impl Into<Vec<u8>>, json: Value) -> Self {
        Self {
            code: EXIT_OK,
            human: human.into(),
            note: None,
            json,
        }
    }
}

/// Whether to colour messages on stderr: only for a terminal, and never with `NO_COLOR`
/// set (<https://no-color.org>).
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Writes `bytes`; a closed pipe (`cache-cli ... | head -1`) is not an error.
fn emit(out: &mut dyn Write, bytes: &[u8]) -> Result<(), ()> {
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(_) => Err(()),
    }
}

/// Parses `args` (including the program name), runs the command, writes to `stdout` /
/// `stderr`, reads `stdin` for `set KEY -` (and `flush`'s confirmation), and returns the
/// exit code.
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
            let text = if colour() {
                e.render().ansi().to_string()
            } else {
                e.render().to_string()
            };
            let _ = if e.use_stderr() {
                emit(stderr, text.as_bytes())
            } else {
                emit(stdout, text.as_bytes())
            };
            return code;
        }
    };
    if let Command::Completions { shell } = cli.command {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "cache-cli", &mut script);
        return match emit(stdout, &script) {
            Ok(()) => EXIT_OK,
            Err(()) => EXIT_OTHER,
        };
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
    let result = runtime.block_on(run(cli, stdin, stderr));
    match result {
        Ok(out) => {
            let written = if json {
                emit(stdout, format!("{}\n", out.json).as_bytes())
            } else {
                emit(stdout, &out.human)
            };
            if let Some(note) = &out.note
                && !json
            {
                let _ = emit(stderr, format!("{note}\n").as_bytes());
            }
            if written.is_err() {
                return EXIT_OTHER;
            }
            out.code
        }
        Err((code, message)) => {
            if json {
                let _ = emit(
                    stdout,
                    format!("{}\n", json!({ "error": message, "exit_code": code })).as_bytes(),
                );
            }
            let _ = emit(stderr, format!("cache-cli: {message}\n").as_bytes());
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
        Error::InvalidAddress { addr, message } => {
            (EXIT_USAGE, format!("invalid address {addr:?}: {message}"))
        }
        Error::Full(m) => (
            EXIT_OTHER,
            format!("the node is full and does not evict: {m}"),
        ),
        other => (EXIT_OTHER, other.to_string()),
    }
}

fn missing(key: &[u8], json: Value) -> Outcome {
    Outcome {
        code: EXIT_NOT_FOUND,
        human: Vec::new(),
        note: Some(format!("(not found: {})", String::from_utf8_lossy(key))),
        json,
    }
}

/// One member's stats as a JSON object.
fn stats_json(s: &cache_client::proto::StatsResponse) -> Value {
    json!({
        "node_id": s.node_id, "version": s.version, "uptime_seconds": s.uptime_seconds,
        "items": s.items, "bytes": s.bytes, "max_bytes": s.max_bytes, "hits": s.hits,
        "misses": s.misses, "inserts": s.inserts, "updates": s.updates, "deletes": s.deletes,
        "evictions": s.evictions, "expirations": s.expirations,
    })
}

fn hit_ratio(hits: u64, misses: u64) -> f64 {
    let lookups = hits + misses;
    if lookups == 0 {
        0.0
    } else {
        hits as f64 / lookups as f64
    }
}

async fn run(
    cli: Cli,
    stdin: &mut dyn Read,
    stderr: &mut dyn Write,
) -> Result<Outcome, (u8, String)> {
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
        .connect_timeout(cli.timeout)
        .max_response_size(cli.max_response_size);
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
    let target = seeds.join(",");
    let fail = |e| failure(&target, e);
    let client = if !cli.seeds.is_empty() || needs_view {
        builder.clone().connect_cluster(seeds.clone()).await
    } else {
        builder.clone().connect(addr.clone()).await
    }
    .map_err(fail)?;
    // Per-node commands talk to one node: --addr, or the first seed that answers.
    let one_node = || async {
        if client.addr().is_some() {
            return Ok(client.clone());
        }
        let mut last = None;
        for a in &seeds {
            match builder.clone().connect(a.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(failure(a, e)),
            }
        }
        Err(last.unwrap_or((EXIT_UNAVAILABLE, "no address".into())))
    };
    Ok(match cli.command {
        Command::Get { key } => {
            let key = os_bytes(&key);
            match client.get(&key).await.map_err(fail)? {
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
            if client.set_with(key, value, options).await.map_err(fail)? {
                Outcome::ok("OK\n", json!({ "stored": true }))
            } else {
                Outcome {
                    code: EXIT_NOT_FOUND,
                    human: Vec::new(),
                    note: Some("(not stored: condition not met)".into()),
                    json: json!({ "stored": false }),
                }
            }
        }
        Command::Del { key } => {
            let key = os_bytes(&key);
            if client.delete(&key).await.map_err(fail)? {
                Outcome::ok("deleted\n", json!({ "deleted": true }))
            } else {
                missing(&key, json!({ "deleted": false }))
            }
        }
        Command::Ttl { key } => {
            let key = os_bytes(&key);
            match client.get_entry(&key).await.map_err(fail)? {
                Some(e) => match e.ttl {
                    None => Outcome::ok("never\n", json!({ "found": true, "ttl_ms": null })),
                    Some(t) => Outcome::ok(
                        format!("{}\n", human_ttl(t)),
                        json!({ "found": true, "ttl_ms": t.as_millis() as u64 }),
                    ),
                },
                None => missing(&key, json!({ "found": false })),
            }
        }
        Command::Touch { key, ttl, persist } => {
            let key = os_bytes(&key);
            let ttl = if persist { None } else { ttl };
            if client.touch(&key, ttl).await.map_err(fail)? {
                Outcome::ok("OK\n", json!({ "found": true }))
            } else {
                missing(&key, json!({ "found": false }))
            }
        }
        Command::Incr { key, delta, ttl } => {
            let value = client
                .incr(os_bytes(&key), delta, ttl)
                .await
                .map_err(fail)?;
            Outcome::ok(format!("{value}\n"), json!({ "value": value }))
        }
        Command::Stats { node } => {
            let rows = if node {
                let s = one_node().await?.stats().await.map_err(fail)?;
                vec![(s.node_id.clone(), Ok(s))]
            } else {
                every_member(&client, |c| async move { c.stats().await })
                    .await
                    .map_err(fail)?
            };
            stats_outcome(rows, node)
        }
        Command::Dbsize { node } => {
            if node {
                let s = one_node().await?.stats().await.map_err(fail)?;
                Outcome::ok(
                    format!("{}\n", s.items),
                    json!({ "node_id": s.node_id, "items": s.items }),
                )
            } else {
                let rows = every_member(&client, |c| async move { c.stats().await })
                    .await
                    .map_err(fail)?;
                let rf = one_node()
                    .await?
                    .cluster_info()
                    .await
                    .map_err(fail)?
                    .replication_factor
                    .max(1);
                let (mut copies, mut answered, mut down) = (0u64, 0usize, Vec::new());
                for (id, r) in &rows {
                    match r {
                        Ok(s) => {
                            copies += s.items;
                            answered += 1;
                        }
                        Err(_) => down.push(id.clone()),
                    }
                }
                // Every key is on `rf` members (fewer if there are fewer members).
                let spread = u64::from(rf).min(rows.len().max(1) as u64);
                let keys = copies.div_ceil(spread);
                let mut outcome = Outcome::ok(
                    format!("{keys}\n"),
                    json!({
                        "keys": keys, "copies": copies, "replication_factor": rf,
                        "members": rows.len(), "members_answered": answered, "members_down": down,
                    }),
                );
                if !down.is_empty() {
                    outcome.note =
                        Some(format!("(not counted: {} did not answer)", down.join(", ")));
                }
                outcome
            }
        }
        Command::Flush { yes } => {
            let members = client.each_member().await.map_err(fail)?;
            let ids: Vec<&str> = members.iter().map(|(m, _)| m.id.as_str()).collect();
            if !yes {
                confirm_flush(&ids, stdin, stderr)?;
            }
            let mut human = String::new();
            let mut rows = Vec::new();
            let mut worst = EXIT_OK;
            for (m, c) in &members {
                match c.flush().await {
                    Ok(r) => {
                        human.push_str(&format!(
                            "{:<16} deleted {} keys in {} ms\n",
                            m.id, r.deleted, r.took_ms
                        ));
                        rows.push(
                            json!({ "node_id": m.id, "deleted": r.deleted, "took_ms": r.took_ms }),
                        );
                    }
                    Err(e) => member_failed(&m.id, &m.addr, e, &mut human, &mut rows, &mut worst),
                }
            }
            Outcome {
                code: worst,
                human: human.into_bytes(),
                note: None,
                json: json!({ "members": rows }),
            }
        }
        Command::Scan {
            pattern,
            count,
            cursor,
        } => {
            let pattern = os_bytes(&pattern);
            let pattern = if pattern.as_ref() == b"*" {
                Bytes::new()
            } else {
                pattern
            };
            match cursor {
                Some(cursor) => {
                    let node = one_node().await?;
                    let (keys, next) = node.scan(cursor, &pattern, count).await.map_err(fail)?;
                    let mut human = format!("{next}\n").into_bytes();
                    for k in &keys {
                        human.extend_from_slice(k);
                        human.push(b'\n');
                    }
                    let keys: Vec<Value> = keys.iter().map(|k| json_key(k)).collect();
                    Outcome::ok(human, json!({ "cursor": next, "keys": keys }))
                }
                None => {
                    let mut seen = std::collections::BTreeSet::new();
                    for (m, c) in client.each_member().await.map_err(fail)? {
                        if !m.state.owns_keys() {
                            continue;
                        }
                        let mut cursor = 0u64;
                        loop {
                            let (keys, next) = c
                                .scan(cursor, &pattern, count)
                                .await
                                .map_err(|e| failure(&m.addr, e))?;
                            seen.extend(keys);
                            if next == 0 {
                                break;
                            }
                            cursor = next;
                        }
                    }
                    let mut human = Vec::new();
                    for k in &seen {
                        human.extend_from_slice(k);
                        human.push(b'\n');
                    }
                    let keys: Vec<Value> = seen.iter().map(|k| json_key(k)).collect();
                    Outcome::ok(human, json!({ "keys": keys }))
                }
            }
        }
        Command::Locate { key } => {
            let key = os_bytes(&key);
            let locations = client.locate(&key).await.map_err(fail)?;
            let mut human = format!(
                "{:<4} {:<16} {:<22} {:<10} {:>20}  {}\n",
                "rank", "id", "address", "holds", "version", "ttl"
            );
            let mut rows = Vec::new();
            let mut held = false;
            for l in &locations {
                let (holds, version, ttl, row) = match &l.copy {
                    Ok(c) => {
                        held |= c.found;
                        let holds = if c.found {
                            "value"
                        } else if c.tombstone {
                            "tombstone"
                        } else {
                            "nothing"
                        };
                        let ttl = match (c.found, c.ttl_ms) {
                            (false, _) => "-".to_string(),
                            (true, None) => "never".to_string(),
                            (true, Some(ms)) => human_ttl(Duration::from_millis(ms)),
                        };
                        (
                            holds.to_string(),
                            c.version.to_string(),
                            ttl,
                            json!({ "rank": l.rank, "id": l.id, "addr": l.addr, "holds": holds, "version": c.version, "ttl_ms": c.ttl_ms, "value_bytes": c.value_bytes }),
                        )
                    }
                    Err(e) => (
                        "unreachable".to_string(),
                        "-".to_string(),
                        "-".to_string(),
                        json!({ "rank": l.rank, "id": l.id, "addr": l.addr, "error": e.to_string() }),
                    ),
                };
                human.push_str(&format!(
                    "{:<4} {:<16} {:<22} {:<10} {:>20}  {}\n",
                    l.rank, l.id, l.addr, holds, version, ttl
                ));
                rows.push(row);
            }
            Outcome {
                code: if held { EXIT_OK } else { EXIT_NOT_FOUND },
                human: human.into_bytes(),
                note: None,
                json: json!({ "found": held, "replicas": rows }),
            }
        }
        Command::Slowlog { count, reset, node } => {
            let rows = if node {
                let n = one_node().await?;
                let r = n.slowlog(count, reset).await;
                vec![(
                    r.as_ref()
                        .map_or_else(|_| addr.clone(), |r| r.node_id.clone()),
                    r,
                )]
            } else {
                every_member(&client, |c| async move { c.slowlog(count, reset).await })
                    .await
                    .map_err(fail)?
            };
            let mut human = format!(
                "{:<16} {:>8} {:<24} {:>10}  {:<10} {:<12} {:<5} {}\n",
                "member", "id", "finished (UTC)", "took", "op", "result", "via", "key"
            );
            let mut members = Vec::new();
            let mut worst = EXIT_OK;
            for (id, r) in rows {
                match r {
                    Ok(log) => {
                        let mut entries = Vec::new();
                        for e in &log.entries {
                            let at = humantime::format_rfc3339_millis(
                                std::time::UNIX_EPOCH + Duration::from_millis(e.at_unix_ms),
                            );
                            let key = String::from_utf8_lossy(&e.key);
                            let more = if e.keys > 1 {
                                format!(" (+{} keys)", e.keys - 1)
                            } else {
                                String::new()
                            };
                            human.push_str(&format!(
                                "{:<16} {:>8} {:<24} {:>8.2}ms  {:<10} {:<12} {:<5} {key}{more}\n",
                                id,
                                e.id,
                                at,
                                e.duration_us as f64 / 1000.0,
                                e.op,
                                e.result,
                                e.via
                            ));
                            entries.push(json!({
                                "id": e.id, "at_unix_ms": e.at_unix_ms, "duration_us": e.duration_us,
                                "op": e.op, "result": e.result, "key": json_key(&e.key),
                                "key_len": e.key_len, "keys": e.keys, "via": e.via,
                            }));
                        }
                        members.push(json!({
                            "node_id": id, "len": log.len, "threshold_us": log.threshold_us,
                            "entries": entries,
                        }));
                    }
                    Err(e) => member_failed(&id, &id, e, &mut human, &mut members, &mut worst),
                }
            }
            Outcome {
                code: worst,
                human: human.into_bytes(),
                note: None,
                json: json!({ "members": members }),
            }
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
                "node        {}\nring epoch  {}\nfingerprint {:016x}\nvnodes      {} per weight\nreplication {}\nmax batch   {}\nmembers:\n",
                i.node_id,
                i.ring_epoch,
                i.ring_fingerprint,
                i.vnodes_per_weight,
                i.replication_factor,
                i.max_batch
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
                    "max_batch": i.max_batch, "members": members,
                }),
            )
        }
        Command::Members | Command::Ring => {
            let members = client.members();
            let Some(ring) = client.ring_summary() else {
                return Err((EXIT_OTHER, "internal: no cluster view".into()));
            };
            // Each member's own sync progress (its Stats); "?" when it does not answer.
            let stats: std::collections::HashMap<String, _> =
                every_member(&client, |c| async move { c.stats().await })
                    .await
                    .map_err(fail)?
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
                    "fingerprint {:016x}\nring epoch  {}\nreplication {}\n",
                    ring.fingerprint, ring.epoch, ring.replication_factor
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
                json!({ "ring_fingerprint": format!("{:016x}", ring.fingerprint), "ring_epoch": ring.epoch, "replication_factor": ring.replication_factor, "members": rows }),
            )
        }
        Command::Completions { .. } => unreachable!("handled before connecting"),
    })
}

/// Notes a member whose call failed: a line of the table, a JSON row, and (for the first
/// failure) the exit code.
fn member_failed(
    id: &str,
    addr: &str,
    e: Error,
    human: &mut String,
    rows: &mut Vec<Value>,
    worst: &mut u8,
) {
    let (code, message) = failure(addr, e);
    human.push_str(&format!("{id:<16} FAILED: {message}\n"));
    rows.push(json!({ "node_id": id, "error": message }));
    if *worst == EXIT_OK {
        *worst = code;
    }
}

/// Runs `call` on every member that owns keys (alive or suspect), one after another; the
/// result per member id.
async fn every_member<T, F, Fut>(
    client: &Client,
    call: F,
) -> Result<Vec<(String, Result<T, Error>)>, Error>
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut out = Vec::new();
    for (m, c) in client.each_member().await? {
        if m.state.owns_keys() {
            out.push((m.id, call(c).await));
        }
    }
    Ok(out)
}

/// The `stats` table: one row per member and, for a cluster, the totals.
fn stats_outcome(
    rows: Vec<(String, Result<cache_client::proto::StatsResponse, Error>)>,
    node_only: bool,
) -> Outcome {
    if node_only && let Some((_, Ok(s))) = rows.first() {
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
            hit_ratio(s.hits, s.misses) * 100.0,
            s.inserts,
            s.updates,
            s.deletes,
            s.evictions,
            s.expirations
        );
        return Outcome::ok(human, stats_json(s));
    }
    let mut human = format!(
        "{:<16} {:>10} {:>14} {:>14} {:>9} {:>11} {:>10}\n",
        "member", "items", "bytes", "max bytes", "hit ratio", "evictions", "uptime"
    );
    let (mut items, mut bytes, mut max_bytes, mut hits, mut misses, mut evictions) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut members = Vec::new();
    let mut down = Vec::new();
    for (id, r) in &rows {
        match r {
            Ok(s) => {
                human.push_str(&format!(
                    "{:<16} {:>10} {:>14} {:>14} {:>8.1}% {:>11} {:>9}s\n",
                    id,
                    s.items,
                    s.bytes,
                    s.max_bytes,
                    hit_ratio(s.hits, s.misses) * 100.0,
                    s.evictions,
                    s.uptime_seconds
                ));
                items += s.items;
                bytes += s.bytes;
                max_bytes += s.max_bytes;
                hits += s.hits;
                misses += s.misses;
                evictions += s.evictions;
                members.push(stats_json(s));
            }
            Err(e) => {
                human.push_str(&format!("{id:<16} unreachable: {e}\n"));
                members.push(json!({ "node_id": id, "error": e.to_string() }));
                down.push(id.clone());
            }
        }
    }
    human.push_str(&format!(
        "{:<16} {:>10} {:>14} {:>14} {:>8.1}% {:>11}\n",
        "total",
        items,
        bytes,
        max_bytes,
        hit_ratio(hits, misses) * 100.0,
        evictions
    ));
    Outcome {
        // Every member answering is success; a member down is worth knowing in scripts.
        code: if down.is_empty() {
            EXIT_OK
        } else {
            EXIT_UNAVAILABLE
        },
        human: human.into_bytes(),
        note: (!down.is_empty()).then(|| format!("(unreachable: {})", down.join(", "))),
        json: json!({
            "members": members,
            "total": { "items": items, "bytes": bytes, "max_bytes": max_bytes, "hits": hits,
                       "misses": misses, "evictions": evictions },
        }),
    }
}

/// Asks for `flush` to be confirmed on a terminal; without one (a script), `--yes` is
/// required.
fn confirm_flush(
    ids: &[&str],
    stdin: &mut dyn Read,
    stderr: &mut dyn Write,
) -> Result<(), (u8, String)> {
    if !std::io::stdin().is_terminal() {
        return Err((
            EXIT_USAGE,
            "flush deletes every key on every member: pass --yes to confirm (stdin is not a terminal)"
                .into(),
        ));
    }
    let _ = write!(
        stderr,
        "This deletes every key on {} member(s): {}.\nType \"flush\" to confirm: ",
        ids.len(),
        ids.join(", ")
    );
    let _ = stderr.flush();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stdin.read(&mut byte).is_ok_and(|n| n == 1) && byte[0] != b'\n' && line.len() < 64 {
        line.push(byte[0]);
    }
    if line.trim_ascii() == b"flush" {
        Ok(())
    } else {
        Err((
            EXIT_USAGE,
            "flush not confirmed: nothing was deleted".into(),
        ))
    }
}
