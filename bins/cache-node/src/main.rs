//! `cache-node`: configuration → wiring → run until SIGTERM or SIGINT.
//!
//! All behaviour lives in `cache-rpc`; this binary parses flags, environment and the config
//! file (see `config.rs` and `docs/operations.md`), sets up logging, prints one startup line
//! on stdout, and maps start-up errors to one line on stderr and exit code 1.

mod config;
#[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "jemalloc")))]
mod trim;

use std::io::IsTerminal;
use std::process::ExitCode;

use cache_rpc::Node;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::config::{Args, LogFormat, NodeCommand};

fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(command) = args.command.take() {
        return maintenance(command);
    }
    let resolved = match args.resolve() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cache-node: {e:#}");
            return ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&resolved.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let reload: Reload = match resolved.log_format {
        LogFormat::Json => {
            let logs = logs.json().with_filter_reloading();
            let handle = logs.reload_handle();
            logs.init();
            Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
        LogFormat::Pretty => {
            let logs = logs.with_filter_reloading();
            let handle = logs.reload_handle();
            logs.init();
            Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
    };
    for w in &resolved.warnings {
        tracing::warn!("{w}");
    }
    let reloader = Reloader {
        reload,
        log_level: resolved.log_level.clone(),
        node: restart_settings(&resolved),
        tls: std::sync::Arc::default(),
    };
    let runtime = match runtime(resolved.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cache-node: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(resolved.node, reloader)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cache-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The async runtime for `workers` request-serving threads.
///
/// One thread gets tokio's current-thread runtime: every task, timer and socket is served
/// by the thread that runs the node, and a task woken by another waits its turn in one
/// queue. The multi-thread scheduler, even with one worker, runs a woken task next (its
/// LIFO slot), so an HTTP/2 connection task flushes after every finished unary call: one
/// `writev` per response instead of one per round of ready responses. Measured on one CPU,
/// unary gRPC `Get`: 1.42× with `cache-bench` as the client (then the client's limit),
/// 1.79× with `h2load`; the pipelined stream and RESP the same within the noise
/// (docs/benchmarks.md, "One CPU: the current-thread runtime"). More threads get the
/// work-stealing pool, which is what spreads connections over cores.
fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

/// What SIGHUP compares to tell the operator a restart is needed: every setting but the
/// log level and format.
fn restart_settings(resolved: &config::Resolved) -> String {
    format!(
        "{:?} worker_threads={}",
        resolved.node, resolved.worker_threads
    )
}

/// GET `path` from the admin listener at `admin`; Ok if it answers 200 within 2 s.
fn healthcheck(admin: &str, path: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = admin
        .parse()
        .map_err(|e| format!("admin address {admin:?}: {e}"))?;
    let addr = if addr.ip().is_unspecified() {
        let lo: std::net::IpAddr = if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        std::net::SocketAddr::new(lo, addr.port())
    } else {
        addr
    };
    let timeout = std::time::Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{addr}: {e}"))?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).map_err(|e| format!("{addr}: {e}"))?;
    let status = String::from_utf8_lossy(&head[..n]);
    if status.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!(
            "{addr}{path} answered {:?}",
            status.lines().next().unwrap_or("")
        ))
    }
}

/// Runs a maintenance command (no node is started).
fn maintenance(command: NodeCommand) -> ExitCode {
    match command {
        NodeCommand::HashToken { name, role } => {
            if let Err(e) = role.parse::<cache_rpc::auth::Role>() {
                eprintln!("cache-node: {e}");
                return ExitCode::from(2);
            }
            let mut token = String::new();
            if std::io::stdin().read_line(&mut token).is_err() {
                eprintln!("cache-node: cannot read the token from stdin");
                return ExitCode::from(2);
            }
            let token = token.trim_end_matches(['\r', '\n']);
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                eprintln!("cache-node: a token must be non-empty visible ASCII (no spaces)");
                return ExitCode::from(2);
            }
            println!("{name} {role} {}", cache_rpc::auth::hash_token(token));
            ExitCode::SUCCESS
        }
        NodeCommand::Healthcheck { admin, path } => match healthcheck(&admin, &path) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cache-node: unhealthy: {e}");
                ExitCode::FAILURE
            }
        },
        NodeCommand::CheckData {
            dir,
            repair,
            max_key_size,
            max_value_size,
        } => {
            let defaults = cache_rpc::Limits::default();
            let size = |what: &str, v: Option<String>, default: usize| -> anyhow::Result<usize> {
                match v {
                    Some(s) => Ok(usize::try_from(config::parse_size(what, &s)?)?),
                    None => Ok(default),
                }
            };
            let limits = match (
                size("max-key-size", max_key_size, defaults.max_key_bytes),
                size("max-value-size", max_value_size, defaults.max_value_bytes),
            ) {
                (Ok(k), Ok(v)) => cache_rpc::LogLimits {
                    max_key_bytes: k,
                    max_value_bytes: v,
                },
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("cache-node: {e:#}");
                    return ExitCode::from(2);
                }
            };
            if !dir.is_dir() {
                eprintln!("cache-node: {} is not a directory", dir.display());
                return ExitCode::from(2);
            }
            let files = match cache_persist::check(&dir, limits, repair) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("cache-node: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if files.is_empty() {
                println!("{}: no snapshot or append-only file", dir.display());
            }
            let mut damaged = false;
            for f in &files {
                match &f.problem {
                    None => println!(
                        "ok       {}: {} records, {} bytes",
                        f.path.display(),
                        f.records,
                        f.bytes
                    ),
                    Some((offset, detail)) if f.repaired => println!(
                        "REPAIRED {}: cut at byte {offset} ({detail}); {} records kept, {} bytes dropped",
                        f.path.display(),
                        f.records,
                        f.bytes.saturating_sub(*offset)
                    ),
                    Some((offset, detail)) => {
                        damaged = true;
                        println!(
                            "DAMAGED  {}: first bad record at byte {offset} ({detail}); {} valid records before it, {} bytes from it to the end",
                            f.path.display(),
                            f.records,
                            f.bytes.saturating_sub(*offset)
                        );
                    }
                }
            }
            if damaged {
                println!(
                    "run `cache-node check-data {} --repair` to cut the damaged files at their first bad record",
                    dir.display()
                );
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}

/// Applies a new log filter.
type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// What SIGHUP can change, and what it compares against.
struct Reloader {
    reload: Reload,
    log_level: String,
    node: String,
    /// The client listeners' TLS, whose certificate SIGHUP reloads (set once the node is
    /// bound; the handler is installed before that, so an early SIGHUP does not kill).
    tls: std::sync::Arc<std::sync::OnceLock<Vec<std::sync::Arc<cache_rpc::tls::ServerTls>>>>,
}

impl Reloader {
    /// SIGHUP: reads the flags, environment and `--config` file again. The log level is
    /// applied at once (unless `RUST_LOG` overrides it); any other changed setting is
    /// logged as needing a restart; an invalid configuration is logged and ignored.
    fn reload(&mut self) {
        for tls in self.tls.get().into_iter().flatten() {
            match tls.reload() {
                Ok(()) => tracing::info!(
                    cert = %tls.files().cert.display(),
                    "SIGHUP: TLS certificate reloaded; new connections use it"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: cannot reload the TLS certificate; keeping the running one")
                }
            }
        }
        let resolved = match Args::try_parse()
            .map_err(anyhow::Error::from)
            .and_then(Args::resolve)
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "SIGHUP: the configuration is invalid now; keeping the running one");
                return;
            }
        };
        if resolved.log_level != self.log_level {
            if std::env::var_os("RUST_LOG").is_some() {
                tracing::warn!(
                    "SIGHUP: log-level changed, but RUST_LOG is set and wins; unchanged"
                );
            } else {
                match EnvFilter::try_new(&resolved.log_level)
                    .map_err(|e| e.to_string())
                    .and_then(|f| (self.reload)(f))
                {
                    Ok(()) => {
                        tracing::info!(log_level = %resolved.log_level, "SIGHUP: log level changed");
                        self.log_level = resolved.log_level.clone();
                    }
                    Err(e) => tracing::error!(error = %e, "SIGHUP: cannot apply the new log level"),
                }
            }
        }
        let node = restart_settings(&resolved);
        if node != self.node {
            tracing::warn!(
                "SIGHUP: other settings changed; they take effect at the next restart (only the log level is reloaded)"
            );
        } else {
            tracing::info!("SIGHUP: configuration read again; nothing else changed");
        }
    }
}

/// Reloads on every SIGHUP (instead of SIGHUP's default: dying).
#[cfg(unix)]
fn on_sighup(mut reloader: Reloader) {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    reloader.reload();
                }
            });
        }
        Err(e) => tracing::error!(error = %e, "cannot listen for SIGHUP"),
    }
}

#[cfg(not(unix))]
fn on_sighup(_reloader: Reloader) {}

/// With `--features jemalloc`: jemalloc instead of the system allocator (see Cargo.toml).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

async fn run(config: cache_rpc::NodeConfig, reloader: Reloader) -> anyhow::Result<()> {
    let tls_slot = std::sync::Arc::clone(&reloader.tls);
    on_sighup(reloader);
    let max_bytes = config.cache.max_bytes;
    let node_id = config.node_id.clone();
    let node = Node::bind(config).await?;
    let _ = tls_slot.set(node.tls().into_iter().chain(node.peer_tls()).collect());
    #[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "jemalloc")))]
    trim::spawn(std::sync::Arc::clone(node.core()), max_bytes);
    // The one startup line, on stdout so scripts and tests can read the bound ports.
    let gossip = node
        .gossip_addr()
        .map(|a| format!(" gossip={a}"))
        .unwrap_or_default();
    let resp = node
        .resp_addr()
        .map(|a| format!(" resp={a}"))
        .unwrap_or_default();
    println!(
        "cache-node {} node_id={} grpc={} peer={} admin={}{gossip}{resp} max_memory={}",
        env!("CARGO_PKG_VERSION"),
        node_id,
        node.grpc_addr(),
        node.peer_addr(),
        node.admin_addr(),
        max_bytes
    );
    // The same, as a record in the log stream (for log collectors that never see stdout).
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        node_id = %node_id,
        grpc = %node.grpc_addr(),
        peer = %node.peer_addr(),
        admin = %node.admin_addr(),
        gossip = ?node.gossip_addr(),
        resp = ?node.resp_addr(),
        max_memory = max_bytes,
        // What the runtime has, as the cache_worker_threads gauge reports it.
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "listening"
    );
    node.run(shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
