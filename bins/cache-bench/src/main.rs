//! `cache-bench`: one workload definition, run against cache-node over gRPC (through
//! `cache-client`) or against redis-server over RESP (through the `redis` crate), so the two
//! are compared like for like.
//!
//! ```text
//! cache-bench --target grpc://127.0.0.1:7000 --concurrency 50 --keys 100000 --prefill
//! cache-bench --target redis://127.0.0.1:6379 --concurrency 50 --keys 100000 --prefill
//! ```
//!
//! Keys are `key:NNNNNNNNNNNN` (16 bytes). Each of `--concurrency` tasks keeps one request
//! (of `--batch` keys: a `MultiGet`/`MultiSet`, or a Redis pipeline of that depth) in flight
//! over one of `--connections` connections. Latency is recorded per request in HDR
//! histograms (microseconds); the warm-up is not counted.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;

/// Load generator for cache-node and redis-server.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
struct Args {
    /// `grpc://host:port` (one cache-node; a cluster node forwards what it does not own),
    /// `grpc+cluster://host:port,host:port` (ring-aware client), or `redis://host:port`.
    #[arg(long)]
    target: String,
    /// Connections to open (requests are spread over them).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Key popularity: `uniform` or `zipf:S` (e.g. `zipf:0.99`).
    #[arg(long, default_value = "uniform")]
    distribution: String,
    /// Value size in bytes.
    #[arg(long, default_value_t = 64)]
    value_size: usize,
    /// get:set ratio, e.g. `9:1`, `1:0` (reads only), `0:1` (writes only).
    #[arg(long, default_value = "9:1")]
    ratio: String,
    /// Keys per request: MultiGet/MultiSet size for gRPC, pipeline depth for Redis.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// How long to measure (after the warm-up). `0s` skips the measurement (with --prefill:
    /// just load the data).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many requests instead of after --duration.
    #[arg(long)]
    requests: Option<u64>,
    /// Run the workload this long before measuring.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Write every key once before starting.
    #[arg(long)]
    prefill: bool,
    /// Per-request deadline.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Consistency of gRPC reads and writes: `one`, `quorum` or `all` [default: the node's
    /// default for writes, the primary for reads].
    #[arg(long)]
    consistency: Option<cache_types::Consistency>,
    /// How gRPC requests travel: `stream` (the pipelined stream, the SDK's default: many
    /// requests per HTTP/2 stream) or `unary` (one call each).
    #[arg(long, default_value = "stream")]
    grpc_mode: GrpcMode,
    /// Connect with TLS, trusting this CA (PEM), for nodes started with --tls-cert.
    #[arg(long, env = "CACHE_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for nodes started with --tls-client-ca; with --tls-key.
    #[arg(long, env = "CACHE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "CACHE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// `--tls-ca`, `--tls-cert`, `--tls-key`.
#[derive(Debug, Clone, Default)]
struct TlsPaths {
    ca: Option<std::path::PathBuf>,
    cert: Option<std::path::PathBuf>,
    key: Option<std::path::PathBuf>,
}

/// `--grpc-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum GrpcMode {
    /// The pipelined stream.
    Stream,
    /// One unary call per request.
    Unary,
}

/// Key popularity.
#[derive(Debug, Clone)]
enum Distribution {
    Uniform,
    /// Cumulative weights of ranks 1..=keys for Zipf(s).
    Zipf(Arc<Vec<f64>>),
}

impl Distribution {
    fn parse(s: &str, keys: u64) -> Result<Self> {
        if s == "uniform" {
            return Ok(Self::Uniform);
        }
        let Some(exp) = s.strip_prefix("zipf:") else {
            bail!("--distribution must be `uniform` or `zipf:S`, got {s:?}");
        };
        let exp: f64 = exp
            .parse()
            .with_context(|| format!("bad Zipf exponent in {s:?}"))?;
        if !(exp > 0.0 && exp.is_finite()) {
            bail!("the Zipf exponent must be positive, got {exp}");
        }
        let mut total = 0.0;
        let cdf = (1..=keys)
            .map(|rank| {
                total += 1.0 / (rank as f64).powf(exp);
                total
            })
            .collect();
        Ok(Self::Zipf(Arc::new(cdf)))
    }

    fn sample(&self, rng: &mut Rng, keys: u64) -> u64 {
        match self {
            Self::Uniform => rng.next() % keys,
            Self::Zipf(cdf) => {
                let total = cdf.last().copied().unwrap_or(1.0);
                let u = rng.unit() * total;
                let rank = cdf.partition_point(|&c| c < u) as u64;
                // Spread popular ranks over the key space (an odd multiplier permutes Z/2^64,
                // then fold into range) so the hot keys are not neighbours.
                rank.wrapping_mul(0x9E37_79B9_7F4A_7C15) % keys
            }
        }
    }
}

/// xorshift64*: fast, deterministic per task.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn key(i: u64) -> Bytes {
    Bytes::from(format!("key:{i:012}"))
}

/// One connection to the system under test.
#[derive(Clone)]
enum Conn {
    /// `grpc://addr` (through that node) or `grpc+cluster://seed,seed,...` (the ring-aware
    /// client, straight to each key's owner): the same SDK client either way.
    Grpc(cache_client::Client),
    Redis(redis::aio::MultiplexedConnection),
}

impl Conn {
    async fn open(
        target: &str,
        timeout: Duration,
        consistency: Option<cache_types::Consistency>,
        mode: GrpcMode,
        tls: &TlsPaths,
    ) -> Result<Self> {
        let mut builder = cache_client::Client::builder()
            .timeout(timeout)
            .pipelined(mode == GrpcMode::Stream);
        if let Some(c) = consistency {
            builder = builder.write_consistency(c).read_consistency(c);
        }
        if let Ok(token) = std::env::var("CACHE_TOKEN") {
            builder = builder.token(&token)?;
        }
        if tls.ca.is_some() || tls.cert.is_some() {
            builder = builder.tls(cache_client::Tls::from_files(
                tls.ca.as_deref(),
                tls.cert.as_deref(),
                tls.key.as_deref(),
            )?);
        }
        if let Some(seeds) = target.strip_prefix("grpc+cluster://") {
            let client = builder
                .connect_cluster(seeds.split(','))
                .await
                .with_context(|| format!("connecting to the cluster {target}"))?;
            Ok(Self::Grpc(client))
        } else if let Some(addr) = target.strip_prefix("grpc://") {
            let client = builder
                .retries(0)
                .connect(addr)
                .await
                .with_context(|| format!("connecting to {target}"))?;
            Ok(Self::Grpc(client))
        } else if target.starts_with("redis://") {
            let client =
                redis::Client::open(target).with_context(|| format!("bad Redis URL {target}"))?;
            let conn = client
                .get_multiplexed_async_connection()
                .await
                .with_context(|| format!("connecting to {target}: is redis-server running?"))?;
            Ok(Self::Redis(conn))
        } else {
            bail!("--target must start with grpc://, grpc+cluster:// or redis://, got {target:?}")
        }
    }

    /// Reads `keys`; returns how many were found.
    async fn get(&mut self, keys: &[Bytes]) -> Result<usize> {
        match self {
            Self::Grpc(c) if keys.len() == 1 => {
                Ok(usize::from(c.get(keys[0].clone()).await?.is_some()))
            }
            Self::Grpc(c) => Ok(c
                .get_many(keys.iter().cloned())
                .await?
                .iter()
                .flatten()
                .count()),
            Self::Redis(c) if keys.len() == 1 => {
                let v: Option<Vec<u8>> = redis::cmd("GET").arg(&keys[0][..]).query_async(c).await?;
                Ok(usize::from(v.is_some()))
            }
            Self::Redis(c) => {
                let mut pipe = redis::pipe();
                for k in keys {
                    pipe.cmd("GET").arg(&k[..]);
                }
                let vs: Vec<Option<Vec<u8>>> = pipe.query_async(c).await?;
                Ok(vs.iter().flatten().count())
            }
        }
    }

    /// Writes `keys` = `value`.
    async fn set(&mut self, keys: &[Bytes], value: &Bytes) -> Result<()> {
        match self {
            Self::Grpc(c) if keys.len() == 1 => Ok(c.set(keys[0].clone(), value.clone()).await?),
            Self::Grpc(c) => Ok(c
                .set_many(keys.iter().map(|k| (k.clone(), value.clone())), None)
                .await?),
            Self::Redis(c) if keys.len() == 1 => {
                let () = redis::cmd("SET")
                    .arg(&keys[0][..])
                    .arg(&value[..])
                    .query_async(c)
                    .await?;
                Ok(())
            }
            Self::Redis(c) => {
                let mut pipe = redis::pipe();
                for k in keys {
                    pipe.cmd("SET").arg(&k[..]).arg(&value[..]).ignore();
                }
                let () = pipe.query_async(c).await?;
                Ok(())
            }
        }
    }
}

/// What one task measured.
struct TaskStats {
    get: Histogram<u64>,
    set: Histogram<u64>,
    keys: u64,
    hits: u64,
    errors: u64,
    first_error: Option<String>,
}

impl TaskStats {
    fn new() -> Self {
        let h = || Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
        Self {
            get: h(),
            set: h(),
            keys: 0,
            hits: 0,
            errors: 0,
            first_error: None,
        }
    }

    fn merge(&mut self, other: &TaskStats) {
        let _ = self.get.add(&other.get);
        let _ = self.set.add(&other.set);
        self.keys += other.keys;
        self.hits += other.hits;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }
}

/// Shared run control.
struct Control {
    measuring: AtomicBool,
    stop: AtomicBool,
    requests: AtomicU64,
    budget: Option<u64>,
}

async fn worker(
    mut conn: Conn,
    args: Arc<Args>,
    dist: Distribution,
    ratio: (u64, u64),
    seed: u64,
    control: Arc<Control>,
) -> TaskStats {
    let mut rng = Rng(seed | 1);
    let value = Bytes::from(vec![b'v'; args.value_size]);
    let mut stats = TaskStats::new();
    let mut keys = Vec::with_capacity(args.batch);
    while !control.stop.load(Ordering::Relaxed) {
        keys.clear();
        for _ in 0..args.batch {
            keys.push(key(dist.sample(&mut rng, args.keys)));
        }
        let is_get = rng.next() % (ratio.0 + ratio.1) < ratio.0;
        let start = Instant::now();
        let outcome = if is_get {
            conn.get(&keys).await
        } else {
            conn.set(&keys, &value).await.map(|()| 0)
        };
        let micros = start.elapsed().as_micros().max(1) as u64;
        if !control.measuring.load(Ordering::Relaxed) {
            continue;
        }
        match outcome {
            Ok(hits) => {
                let h = if is_get {
                    &mut stats.get
                } else {
                    &mut stats.set
                };
                let _ = h.record(micros.min(60_000_000));
                stats.keys += keys.len() as u64;
                stats.hits += hits as u64;
            }
            Err(e) => {
                stats.errors += 1;
                if stats.first_error.is_none() {
                    stats.first_error = Some(format!("{e:#}"));
                }
            }
        }
        let done = control.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if control.budget.is_some_and(|b| done >= b) {
            control.stop.store(true, Ordering::Relaxed);
        }
    }
    stats
}

fn parse_ratio(s: &str) -> Result<(u64, u64)> {
    let (g, w) = s
        .split_once(':')
        .with_context(|| format!("--ratio must be GET:SET like 9:1, got {s:?}"))?;
    let (g, w): (u64, u64) = (g.parse()?, w.parse()?);
    if g + w == 0 {
        bail!("--ratio {s} has no operations");
    }
    Ok((g, w))
}

async fn prefill(conns: &[Conn], args: &Args) -> Result<()> {
    let value = Bytes::from(vec![b'v'; args.value_size]);
    let chunk = 64u64;
    let tasks = args.concurrency.clamp(1, 16) as u64;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let mut conn = conns[t as usize % conns.len()].clone();
        let (value, total) = (value.clone(), args.keys);
        handles.push(tokio::spawn(async move {
            let mut start = t * chunk;
            while start < total {
                let keys: Vec<Bytes> = (start..(start + chunk).min(total)).map(key).collect();
                conn.set(&keys, &value).await?;
                start += tasks * chunk;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(())
}

/// Client CPU utilisation from which a run is called client-bound.
const CLIENT_BOUND: f64 = 0.9;

/// CPU time (user + system) this process has used so far, from `/proc/self/stat`; `None`
/// where that file does not exist (not Linux).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name (which may hold spaces) follow its last ')':
    // state is field 3, utime and stime are fields 14 and 15, in clock ticks.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ: 100 on every Linux architecture that cache-bench builds for.
    Some(Duration::from_millis(ticks.saturating_mul(10)))
}

fn percentile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    let dist = Distribution::parse(&args.distribution, args.keys)?;
    let ratio = parse_ratio(&args.ratio)?;
    if args.keys == 0 || args.batch == 0 || args.concurrency == 0 || args.connections == 0 {
        bail!("--keys, --batch, --concurrency and --connections must be at least 1");
    }
    let mut conns = Vec::new();
    for _ in 0..args.connections {
        conns.push(
            Conn::open(
                &args.target,
                args.timeout,
                args.consistency,
                args.grpc_mode,
                &TlsPaths {
                    ca: args.tls_ca.clone(),
                    cert: args.tls_cert.clone(),
                    key: args.tls_key.clone(),
                },
            )
            .await?,
        );
    }
    if args.prefill {
        let t = Instant::now();
        prefill(&conns, &args).await?;
        if !args.json {
            eprintln!(
                "prefilled {} keys in {:.1}s",
                args.keys,
                t.elapsed().as_secs_f64()
            );
        }
    }
    if args.duration.is_zero() && args.requests.is_none() {
        return Ok(());
    }
    let control = Arc::new(Control {
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        requests: AtomicU64::new(0),
        budget: args.requests,
    });
    let handles: Vec<_> = (0..args.concurrency)
        .map(|i| {
            tokio::spawn(worker(
                conns[i % conns.len()].clone(),
                Arc::clone(&args),
                dist.clone(),
                ratio,
                0x5EED_0000 + i as u64 * 7919,
                Arc::clone(&control),
            ))
        })
        .collect();
    tokio::time::sleep(args.warmup).await;
    control.measuring.store(true, Ordering::SeqCst);
    let start = Instant::now();
    let cpu_start = process_cpu();
    let bar = if std::io::stderr().is_terminal() && !args.json {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let done = control.requests.load(Ordering::Relaxed);
        let secs = start.elapsed().as_secs_f64();
        bar.set_message(format!(
            "{done} requests, {:.0} req/s",
            done as f64 / secs.max(1e-9)
        ));
        if control.stop.load(Ordering::Relaxed)
            || (args.requests.is_none() && start.elapsed() >= args.duration)
        {
            break;
        }
    }
    control.measuring.store(false, Ordering::SeqCst);
    let elapsed = start.elapsed().as_secs_f64();
    // How busy the load generator itself was: near 100 % of its CPUs, the figures are
    // (also) the client's limit, not the server's.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let client_cpu = cpu_start
        .zip(process_cpu())
        .map(|(a, b)| b.saturating_sub(a).as_secs_f64());
    let client_util = client_cpu.map(|c| c / (elapsed * cores as f64));
    control.stop.store(true, Ordering::SeqCst);
    bar.finish_and_clear();
    let mut total = TaskStats::new();
    for h in handles {
        total.merge(&h.await.context("a worker panicked")?);
    }
    let requests = total.get.len() + total.set.len();
    let summary = serde_json::json!({
        "target": args.target,
        "connections": args.connections,
        "concurrency": args.concurrency,
        "keys": args.keys,
        "distribution": args.distribution,
        "value_size": args.value_size,
        "ratio": args.ratio,
        "batch": args.batch,
        "seconds": elapsed,
        "requests": requests,
        "requests_per_second": requests as f64 / elapsed,
        "keys_per_second": total.keys as f64 / elapsed,
        "get_hit_ratio": if total.get.is_empty() { 0.0 } else { total.hits as f64 / (total.get.len() as f64 * args.batch as f64) },
        "errors": total.errors,
        "first_error": total.first_error,
        "client_cpu_seconds": client_cpu,
        "client_cpu_utilization": client_util,
        "client_cores": cores,
        "get": { "count": total.get.len(), "p50_ms": percentile_ms(&total.get, 0.5), "p99_ms": percentile_ms(&total.get, 0.99), "p999_ms": percentile_ms(&total.get, 0.999), "max_ms": total.get.max() as f64 / 1000.0 },
        "set": { "count": total.set.len(), "p50_ms": percentile_ms(&total.set, 0.5), "p99_ms": percentile_ms(&total.set, 0.99), "p999_ms": percentile_ms(&total.set, 0.999), "max_ms": total.set.max() as f64 / 1000.0 },
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "target {}  ({} connections, {} in flight, batch {}, {} keys {}, {} B values, get:set {})",
            args.target,
            args.connections,
            args.concurrency,
            args.batch,
            args.keys,
            args.distribution,
            args.value_size,
            args.ratio
        );
        println!(
            "{:>10.0} requests/s   {:>10.0} keys/s   {} errors over {:.1}s",
            requests as f64 / elapsed,
            total.keys as f64 / elapsed,
            total.errors,
            elapsed
        );
        println!(
            "{:<4} {:>10} {:>10} {:>10} {:>10}",
            "op", "count", "p50 ms", "p99 ms", "p99.9 ms"
        );
        for (name, h) in [("get", &total.get), ("set", &total.set)] {
            println!(
                "{:<4} {:>10} {:>10.3} {:>10.3} {:>10.3}",
                name,
                h.len(),
                percentile_ms(h, 0.5),
                percentile_ms(h, 0.99),
                percentile_ms(h, 0.999)
            );
        }
        if let Some(u) = client_util {
            println!(
                "cache-bench used {:.0} % of its {cores} CPU(s){}",
                u * 100.0,
                if u >= CLIENT_BOUND {
                    ": the figures above are (also) this client's limit"
                } else {
                    ""
                }
            );
        }
        if let Some(e) = &total.first_error {
            println!("first error: {e}");
        }
    }
    if total.errors > 0 && requests == 0 {
        bail!(
            "every request failed: {}",
            total.first_error.unwrap_or_default()
        );
    }
    Ok(())
}
