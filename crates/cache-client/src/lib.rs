//! `cache-client`: the async Rust SDK for cache-cluster.
//!
//! One type, [`Client`], does everything. It depends only on the compiled API
//! (`cache-proto`) and the ring (`cluster-ring`), never on the server, the engine or the
//! metrics stack.
//!
//! # Connecting
//!
//! [`ClientBuilder::connect`] talks to one node, which forwards what it does not own (one
//! extra hop for most keys, nothing to configure). [`ClientBuilder::connect_cluster`]
//! reads the member list from any seed, builds the nodes' ring itself and sends each key
//! straight to its replicas: no forwarding hop, failover to the next replica, batches split
//! per node, and the view follows joins, deaths and leaves as they happen. Both give the
//! same [`Client`]; [`Client::routing`] says which it is. [`ClientBuilder::connect_lazy`]
//! makes no connection until the first call, for services that start before the cache.
//!
//! ```no_run
//! use std::time::Duration;
//! use cache_client::{Client, Consistency, SetOptions};
//!
//! # async fn demo() -> Result<(), cache_client::Error> {
//! let client = Client::builder()
//!     .timeout(Duration::from_millis(500))
//!     .write_consistency(Consistency::Quorum)
//!     .connect_cluster(["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"])
//!     .await?;
//! client.set("greeting", "hello").await?;
//! assert_eq!(client.get("greeting").await?.as_deref(), Some(&b"hello"[..]));
//!
//! // Keys and values by reference or owned: &str, &[u8], String, Vec<u8>, Bytes, ...
//! let user = String::from("user:42");
//! client.set_with(&user, b"Ada", SetOptions::ttl(Duration::from_secs(30))).await?;
//! println!("{user} lives on {:?}", client.replicas_of(&user));
//!
//! // Batches of any size (split to the node's limit); a miss is `None`, not an error.
//! let values = client.get_many(["greeting", "missing"]).await?;
//! assert_eq!(values[1], None);
//! # Ok(()) }
//! ```
//!
//! # Cache-aside without a thundering herd
//!
//! [`Client::get_or_insert_with`] returns the cached value or runs a loader, stores its
//! result and returns it; concurrent misses of one key in one process run the loader once.
//!
//! ```no_run
//! # async fn demo(client: cache_client::Client) -> Result<(), cache_client::Error> {
//! use std::time::Duration;
//! let page = client
//!     .get_or_insert_with("page:/home", Some(Duration::from_secs(10)), || async {
//!         Ok::<_, std::io::Error>(String::from("<html>...</html>")) // render once
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Counters: [`Client::incr`] adds to an integer atomically on the key's primary (a fixed-
//! window rate limiter is `incr(key, 1, Some(window))`).
//!
//! A complete program is `examples/quickstart.rs`:
//! `cargo run -p cache-client --example quickstart -- 127.0.0.1:7000`.
//!
//! # Transport
//!
//! By default a client sends its calls on one long-lived pipelined stream per connection
//! (`cache.v1.Cache/Pipeline`): concurrent calls share it, are packed several per message,
//! and their answers come back as they are ready. This costs far less per call than a
//! unary gRPC call (docs/why/protocols.md). [`ClientBuilder::pipelined`]`(false)` makes every
//! call a unary RPC; requests over 64 KiB always are.
//!
//! What the client reads is bounded: an answer over [`ClientBuilder::max_response_size`]
//! (64 MiB by default, the most a node with default limits sends) is refused from its
//! length prefix, a cluster view over 8 192 members is refused, and a batch answer must
//! have one result per key. A broken or hostile endpoint gets an [`Error`], never the
//! client's memory.
//!
//! # Errors and retries
//!
//! Every call has a deadline ([`ClientBuilder::timeout`]), sent to the node as the gRPC
//! deadline and enforced locally. Failures are an [`Error`] that says what kind of problem
//! it is; a miss is never an error. Idempotent calls (everything except a conditional set,
//! `incr` and `flush`) are retried on [`Error::Unavailable`] with exponential backoff, up to
//! [`ClientBuilder::retries`] times.
//!
//! # Operating a cluster
//!
//! [`Client::each_member`] gives a direct client per member, for the per-node calls:
//! [`Client::stats`], [`Client::scan`], [`Client::flush`], [`Client::snapshot`].
//! [`Client::locate`] shows which members hold a key and at which version.

#![forbid(unsafe_code)]

mod client;
mod cluster;
mod node_arg;
mod pipeline;
mod single_flight;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use cache_types::{Condition, Consistency, MemberState};
pub use client::{Client, Location, RingSummary, Routing};
pub use cluster::ClusterMember;
use cluster::Router;
pub use node_arg::ToBytes;

use bytes::Bytes;
use cache_proto::v1::pipelined_op::Op;
use cache_proto::v1::pipelined_result::Result as PResult;
use cache_proto::v1::{self as pb, cache_client::CacheClient};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

/// The batch limit a node has unless started with `--max-batch`.
const DEFAULT_MAX_BATCH: usize = 1024;

/// The largest answer a client decodes unless told otherwise
/// ([`ClientBuilder::max_response_size`]): 64 MiB, the most a node with the default limits
/// ever sends.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 << 20;

/// The smallest [`ClientBuilder::max_response_size`] (64 KiB).
pub use cache_proto::MIN_CLIENT_RESPONSE_BYTES;

/// The generated API types, for calls the SDK does not wrap (`Stats`, `ClusterInfo` results).
pub use cache_proto::v1 as proto;

/// What went wrong, by what the caller can do about it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request itself is wrong: empty key, a key/value/batch over the node's limits,
    /// an unknown option. Retrying will not help; fix the request.
    #[error("invalid request ({code:?}): {message}")]
    InvalidRequest {
        /// `InvalidArgument`, `OutOfRange` or `FailedPrecondition`.
        code: Code,
        /// The node's explanation.
        message: String,
    },
    /// The node is out of memory and does not evict. Delete data or retry later.
    #[error("node is full: {0}")]
    Full(String),
    /// The node cannot be reached or is shutting down. Idempotent calls were retried.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// No answer within the deadline.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    /// The address could not be parsed.
    #[error("invalid address {addr:?}: {message}")]
    InvalidAddress {
        /// What was given.
        addr: String,
        /// Why it is not usable.
        message: String,
    },
    /// The node does not own the key at its ring epoch (a forwarded request reached a node
    /// whose ring differs): refresh the cluster view and retry.
    #[error("wrong node: {0}")]
    WrongNode(String),
    /// The cluster's members could not be turned into a ring, or the client's ring format
    /// differs from the nodes'.
    #[error("cluster view: {0}")]
    Cluster(String),
    /// The node requires a token (`--auth-file`) and none, or an unknown one, was sent.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The token's role does not allow this call (a `read` token writing, a `write` token
    /// taking a snapshot).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The loader of [`Client::get_or_insert_with`] failed (every task waiting on the same
    /// load gets this error); the source is the loader's own error.
    #[error("loader failed: {0}")]
    Loader(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// Any other status from the node.
    #[error("server error ({code:?}): {message}")]
    Server {
        /// The gRPC status code.
        code: Code,
        /// The node's message.
        message: String,
    },
}

impl Error {
    fn from_status(status: Status, addr: &str, timeout: Duration) -> Self {
        let message = status.message().to_string();
        match status.code() {
            code @ (Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition) => {
                Error::InvalidRequest { code, message }
            }
            Code::ResourceExhausted => Error::Full(message),
            Code::Unavailable => Error::Unavailable(format!("{addr}: {message}")),
            // The server's own deadline fired.
            Code::Cancelled if message.contains("Timeout expired") => Error::TimedOut(timeout),
            // tonic reports a connection that cannot be (re)established, or that broke under
            // an in-flight call, this way: the node is not reachable.
            Code::Cancelled => Error::Unavailable(format!("{addr}: {message}")),
            Code::Unknown if message.contains("transport error") => {
                Error::Unavailable(format!("{addr}: {message}"))
            }
            Code::DeadlineExceeded => Error::TimedOut(timeout),
            Code::Aborted => Error::WrongNode(message),
            Code::Unauthenticated => Error::Unauthenticated(message),
            Code::PermissionDenied => Error::PermissionDenied(message),
            code => Error::Server { code, message },
        }
    }
}

use cache_proto::convert::{condition_to_pb, consistency_to_pb as consistency_pb};

/// Options of [`Client::set_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetOptions {
    /// Time to live; `None` for no expiry.
    pub ttl: Option<Duration>,
    /// Presence condition.
    pub condition: Condition,
    /// Write consistency; `None` uses the client's ([`ClientBuilder::write_consistency`]),
    /// or else the node's default.
    pub consistency: Option<Consistency>,
}

impl SetOptions {
    /// Expire after `ttl`.
    pub fn ttl(ttl: Duration) -> Self {
        Self {
            ttl: Some(ttl),
            ..Self::default()
        }
    }

    /// Only store if the key holds no live value (`SET NX`).
    pub fn if_absent() -> Self {
        Self {
            condition: Condition::IfAbsent,
            ..Self::default()
        }
    }

    /// Only store if the key holds a live value (`SET XX`).
    pub fn if_present() -> Self {
        Self {
            condition: Condition::IfPresent,
            ..Self::default()
        }
    }
}

/// A value with its metadata, from [`Client::get_entry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Bytes,
    /// Time left before expiry, as computed by the node; `None` if it never expires.
    pub ttl: Option<Duration>,
    /// The stored version (0 for unversioned writes).
    pub version: u64,
}

/// Configures and connects a [`Client`]: to one node ([`ClientBuilder::connect`]) or to a
/// cluster, ring-aware ([`ClientBuilder::connect_cluster`]).
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    timeout: Duration,
    connect_timeout: Duration,
    retries: u32,
    backoff: Duration,
    write_consistency: Option<Consistency>,
    read_consistency: Option<Consistency>,
    /// `authorization` metadata sent with every request (`Bearer TOKEN`).
    auth: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// Send requests on one pipelined stream (default) instead of one unary call each.
    pipelined: bool,
    /// Connect with TLS (nodes started with `--tls-cert`).
    tls: Option<Tls>,
    /// Largest answer decoded ([`ClientBuilder::max_response_size`]).
    max_response_bytes: usize,
}

/// TLS settings for nodes started with `--tls-cert` ([`ClientBuilder::tls`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    ca_pem: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain: Option<String>,
}

impl Tls {
    /// TLS that trusts the system's root certificates.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trust this CA (PEM) instead of the system's roots: the cluster's own CA.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Present this client certificate and key (PEM), for nodes that require one
    /// (`--tls-client-ca`).
    pub fn identity_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// Verify the node's certificate for this name instead of the address's host.
    pub fn domain(mut self, name: impl Into<String>) -> Self {
        self.domain = Some(name.into());
        self
    }

    /// Reads the CA and the client certificate and key from PEM files (what `--tls-ca`,
    /// `--tls-cert` and `--tls-key` name in the CLI and the load generator).
    pub fn from_files(
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> Result<Self, Error> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| Error::InvalidAddress {
                addr: p.display().to_string(),
                message: format!("cannot read the TLS file: {e}"),
            })
        };
        let mut tls = Self::new();
        if let Some(ca) = ca {
            tls = tls.ca_pem(read(ca)?);
        }
        match (cert, key) {
            (Some(c), Some(k)) => tls = tls.identity_pem(read(c)?, read(k)?),
            (None, None) => {}
            _ => {
                return Err(Error::InvalidAddress {
                    addr: String::new(),
                    message: "a client certificate needs its key, and a key its certificate".into(),
                });
            }
        }
        Ok(tls)
    }
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            retries: 3,
            backoff: Duration::from_millis(20),
            write_consistency: None,
            read_consistency: None,
            auth: None,
            pipelined: true,
            tls: None,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

impl ClientBuilder {
    /// Sends `token` with every request (`authorization: Bearer TOKEN`), for nodes started
    /// with `--auth-file`. A token that cannot travel as HTTP/2 metadata (empty, or not
    /// visible ASCII) is refused here.
    pub fn token(mut self, token: &str) -> Result<Self, Error> {
        let value = (!token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic()))
            .then(|| format!("Bearer {token}").parse().ok())
            .flatten()
            .ok_or_else(|| {
                Error::Unauthenticated("a token must be non-empty visible ASCII".into())
            })?;
        self.auth = Some(value);
        Ok(self)
    }

    /// Whether single-key calls and batches travel on one pipelined stream per connection
    /// (`cache.v1.Cache/Pipeline`, the default: many requests share one HTTP/2 stream, and
    /// answers come back as they are ready) or as one unary call each (`false`; what plain
    /// gRPC tools do). A node without the stream is detected and served with unary calls.
    pub fn pipelined(mut self, on: bool) -> Self {
        self.pipelined = on;
        self
    }

    /// Connects with TLS (`https`), for nodes started with `--tls-cert`.
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Deadline of each call, including its retries (default 2 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long connecting may take (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Retries of an idempotent call after `Unavailable` (default 3; 0 disables).
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// First retry delay; each next one doubles, with jitter (default 20 ms).
    pub fn backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// Consistency of writes that do not name one (default: the node's default).
    pub fn write_consistency(mut self, c: Consistency) -> Self {
        self.write_consistency = Some(c);
        self
    }

    /// Consistency of reads (`Quorum` reads a majority, `All` every replica, and both
    /// repair; default: the key's primary).
    pub fn read_consistency(mut self, c: Consistency) -> Self {
        self.read_consistency = Some(c);
        self
    }

    /// The largest answer this client decodes, in bytes (default
    /// [`DEFAULT_MAX_RESPONSE_BYTES`], 64 MiB; at least
    /// [`MIN_CLIENT_RESPONSE_BYTES`], 64 KiB). Every length read from the
    /// network is checked against it before anything is allocated, so a broken or hostile
    /// endpoint cannot make the client reserve gigabytes. A unary answer over it fails that
    /// call with [`Error::InvalidRequest`] (`OutOfRange`, "decoded message length too
    /// large"); on the pipelined stream the node is told the limit and refuses just that
    /// operation the same way, the stream's other calls going on. Raise it for nodes whose
    /// `--max-value-size` is above 64 MiB, or for `MultiGet`s of many large values.
    pub fn max_response_size(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes.max(MIN_CLIENT_RESPONSE_BYTES);
        self
    }

    fn endpoint(&self, addr: &str) -> Result<Endpoint, Error> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let url = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("{scheme}://{addr}")
        };
        let invalid = |e: &dyn std::fmt::Display| Error::InvalidAddress {
            addr: addr.to_string(),
            message: e.to_string(),
        };
        let mut endpoint = Endpoint::from_shared(url).map_err(|e| invalid(&e))?;
        if let Some(tls) = &self.tls {
            let mut config = tonic::transport::ClientTlsConfig::new();
            config = match &tls.ca_pem {
                Some(ca) => config.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
                None => config.with_native_roots(),
            };
            if let Some((cert, key)) = &tls.identity {
                config = config.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            if let Some(domain) = &tls.domain {
                config = config.domain_name(domain.clone());
            }
            endpoint = endpoint.tls_config(config).map_err(|e| invalid(&e))?;
        }
        Ok(endpoint
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true))
    }

    fn node(self, channel: Channel, addr: String) -> Node {
        Node {
            // What is sent is the node's to bound; what is read is bounded here.
            inner: CacheClient::new(channel)
                .max_decoding_message_size(self.max_response_bytes)
                .max_encoding_message_size(usize::MAX),
            addr,
            pipeline: Arc::new(pipeline::Pipeline::new(self.max_response_bytes)),
            cfg: self,
            epoch: Arc::new(AtomicU64::new(0)),
            max_batch: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Connects to one node at `addr` (`host:port`, or an `http://` URL); that node
    /// forwards requests for keys it does not own. Fails with [`Error::Unavailable`] if
    /// nothing answers there.
    pub async fn connect(self, addr: impl Into<String>) -> Result<Client, Error> {
        Ok(Client::direct(self.connect_node(addr.into()).await?))
    }

    /// A connection to `addr`, made now.
    pub(crate) async fn connect_node(self, addr: String) -> Result<Node, Error> {
        let channel = self.endpoint(&addr)?.connect().await.map_err(|e| {
            Error::Unavailable(format!(
                "cannot connect to {addr}: is cache-node running? ({e})"
            ))
        })?;
        Ok(self.node(channel, addr))
    }

    /// A client for one node at `addr` that connects on its first call, not now: for
    /// services that must start while the cache is down (calls fail with
    /// [`Error::Unavailable`] until it is up). Fails only on a malformed address.
    pub fn connect_lazy(self, addr: impl Into<String>) -> Result<Client, Error> {
        Ok(Client::direct(self.node_lazy(addr.into())?))
    }

    /// A connection to `addr` made on first use (for cluster members that may be down).
    pub(crate) fn node_lazy(self, addr: String) -> Result<Node, Error> {
        let channel = self.endpoint(&addr)?.connect_lazy();
        Ok(self.node(channel, addr))
    }

    /// Connects to a cluster through any of `seeds`: reads the member list and ring
    /// parameters (`ClusterInfo`), builds the same ring as the nodes, and then sends every
    /// request straight to the key's replicas (see [`Client`]).
    pub async fn connect_cluster<S: Into<String>>(
        self,
        seeds: impl IntoIterator<Item = S>,
    ) -> Result<Client, Error> {
        let router = Router::connect(self, seeds.into_iter().map(Into::into).collect()).await?;
        Ok(Client::ring(router))
    }
}

/// A connection to one node: what [`Client`] uses directly, or once per member when it
/// routes by the ring. Cheap to clone; clones share the HTTP/2 connection, which
/// multiplexes concurrent calls.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    inner: CacheClient<Channel>,
    addr: String,
    cfg: ClientBuilder,
    /// The ring epoch of the node's last answer (for the ring router's staleness check).
    epoch: Arc<AtomicU64>,
    /// The pipelined stream, shared by clones.
    pipeline: Arc<pipeline::Pipeline>,
    /// The node's batch limit (`ClusterInfo.max_batch`), learnt before the first batch;
    /// 0 until then.
    max_batch: Arc<AtomicUsize>,
}

impl Node {
    /// The same connection with another call deadline (sent to the node as `grpc-timeout`,
    /// so the node plans its own forwarding within it).
    pub(crate) fn within(&self, timeout: Duration) -> Node {
        let mut c = self.clone();
        c.cfg.timeout = timeout;
        c
    }

    /// The address this client talks to.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// The settings this connection was made with.
    pub(crate) fn builder(&self) -> &ClientBuilder {
        &self.cfg
    }

    /// Records the node's batch limit, from a `ClusterInfo` answer (0: an older node that
    /// does not say; the default limit is assumed).
    pub(crate) fn learn_max_batch(&self, limit: u32) {
        let limit = match limit {
            0 => DEFAULT_MAX_BATCH,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        self.max_batch.store(limit, Ordering::Relaxed);
    }

    /// The node's batch limit, asking it once if it is not known yet.
    async fn max_batch(&self) -> usize {
        match self.max_batch.load(Ordering::Relaxed) {
            0 => {
                // If the node cannot say, the batch will most likely fail the same way;
                // the default limit is the best guess meanwhile.
                let limit = self.cluster_info().await.map_or(0, |i| i.max_batch);
                self.learn_max_batch(limit);
                self.max_batch.load(Ordering::Relaxed)
            }
            n => n,
        }
    }

    /// Runs `call` on `items` in parts of at most the node's batch limit, concurrently, and
    /// joins the results in order.
    async fn in_parts<I, T, F, Fut>(&self, items: Vec<I>, call: F) -> Result<Vec<T>, Error>
    where
        I: Send + 'static,
        T: Send + 'static,
        F: Fn(Node, Vec<I>) -> Fut,
        Fut: Future<Output = Result<Vec<T>, Error>> + Send + 'static,
    {
        let limit = self.max_batch().await.max(1);
        if items.len() <= limit {
            return call(self.clone(), items).await;
        }
        let mut parts = tokio::task::JoinSet::new();
        let mut items = items.into_iter();
        let mut index = 0usize;
        loop {
            let part: Vec<I> = items.by_ref().take(limit).collect();
            if part.is_empty() {
                break;
            }
            let fut = call(self.clone(), part);
            parts.spawn(async move { (index, fut.await) });
            index += 1;
        }
        let mut done: Vec<(usize, Vec<T>)> = Vec::with_capacity(index);
        while let Some(joined) = parts.join_next().await {
            let (i, result) = joined.map_err(|e| Error::Server {
                code: Code::Internal,
                message: format!("a batch part failed: {e}"),
            })?;
            done.push((i, result?));
        }
        done.sort_unstable_by_key(|(i, _)| *i);
        Ok(done.into_iter().flat_map(|(_, part)| part).collect())
    }

    /// The ring epoch the node reported in its last answer (0 before any, or on one node).
    pub(crate) fn last_ring_epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    fn saw_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Relaxed);
    }

    /// Runs one RPC with the deadline, retrying `Unavailable` if `idempotent`.
    async fn call<T, F, Fut>(&self, idempotent: bool, mut rpc: F) -> Result<T, Error>
    where
        F: FnMut(CacheClient<Channel>, Stamp) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.cfg.timeout;
        let mut attempt = 0u32;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(Error::TimedOut(self.cfg.timeout));
            }
            let stamp = Stamp {
                timeout: left,
                auth: self.cfg.auth.clone(),
            };
            let outcome = match tokio::time::timeout(left, rpc(self.inner.clone(), stamp)).await {
                Err(_) => return Err(Error::TimedOut(self.cfg.timeout)),
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(status)) => {
                    Error::from_status(self.name_decode_limit(status), &self.addr, self.cfg.timeout)
                }
            };
            if !(idempotent
                && matches!(outcome, Error::Unavailable(_))
                && attempt < self.cfg.retries)
            {
                return Err(outcome);
            }
            let delay = backoff(self.cfg.backoff, attempt)
                .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// tonic's refusal of an answer over this client's decode limit names neither the client
    /// nor how to raise the limit; this says both (other statuses pass unchanged).
    fn name_decode_limit(&self, status: Status) -> Status {
        let limit = self.cfg.max_response_bytes;
        let ours = status.code() == Code::OutOfRange
            && status
                .message()
                .contains("decoded message length too large")
            && status
                .message()
                .ends_with(&format!("the limit is: {limit} bytes"));
        if !ours {
            return status;
        }
        Status::out_of_range(format!(
            "the answer is over this client's response limit of {limit} bytes (raise ClientBuilder::max_response_size): {}",
            status.message()
        ))
    }

    /// Runs one operation — on the pipelined stream, or as a unary call — with the
    /// deadline, retrying `Unavailable` if `idempotent`.
    async fn op(&self, idempotent: bool, op: Op) -> Result<PResult, Error> {
        let pipeline = self.cfg.pipelined.then_some(&self.pipeline);
        self.call(idempotent, |c, t| {
            let op = op.clone();
            async move {
                if let Some(p) = pipeline
                    && let Some(r) = p.call(&c, t.auth.clone(), op.clone(), t.timeout).await
                {
                    return r.map(Response::new);
                }
                unary(c, op, t).await
            }
        })
        .await
    }

    /// The value of `key` with its TTL and version, or `None` on a miss.
    pub(crate) async fn get_entry(&self, key: Bytes) -> Result<Option<Entry>, Error> {
        let consistency = consistency_pb(self.cfg.read_consistency);
        let op = Op::Get(pb::GetRequest { key, consistency });
        let PResult::Get(resp) = self.op(true, op).await? else {
            return Err(mismatch());
        };
        self.saw_epoch(resp.ring_epoch);
        Ok(to_entry(resp))
    }

    /// Stores `key` = `value` with options; returns whether it was stored (`false` only when
    /// a condition did not hold).
    pub(crate) async fn set_with(
        &self,
        key: Bytes,
        value: Bytes,
        options: SetOptions,
    ) -> Result<bool, Error> {
        let req = set_request(key, value, options, self.cfg.write_consistency);
        // A conditional write is not idempotent: a retry after an unknown outcome could
        // see its own first attempt and report "not stored".
        let idempotent = options.condition == Condition::Always;
        let PResult::Set(resp) = self.op(idempotent, Op::Set(req)).await? else {
            return Err(mismatch());
        };
        self.saw_epoch(resp.ring_epoch);
        Ok(resp.stored)
    }

    /// Removes `key`; returns whether it held a live value.
    pub(crate) async fn delete(&self, key: Bytes) -> Result<bool, Error> {
        let op = Op::Delete(pb::DeleteRequest {
            key,
            consistency: consistency_pb(self.cfg.write_consistency),
        });
        let PResult::Delete(resp) = self.op(true, op).await? else {
            return Err(mismatch());
        };
        self.saw_epoch(resp.ring_epoch);
        Ok(resp.deleted)
    }

    /// Sets (or with `None` removes) the TTL of a live key; returns whether the key existed.
    pub(crate) async fn touch(&self, key: Bytes, ttl: Option<Duration>) -> Result<bool, Error> {
        let op = Op::Touch(pb::TouchRequest {
            key,
            ttl_ms: ttl.map_or(0, |t| duration_ms(t).max(1)),
            consistency: consistency_pb(self.cfg.write_consistency),
        });
        let PResult::Touch(resp) = self.op(true, op).await? else {
            return Err(mismatch());
        };
        self.saw_epoch(resp.ring_epoch);
        Ok(resp.found)
    }

    /// Adds `delta` to the 64-bit integer stored at `key` (a missing key counts as 0) and
    /// returns the result, atomically on the key's primary. The key keeps its TTL; a key this
    /// call creates gets `ttl_if_created`. A stored value that is not a decimal integer, or
    /// an overflow, is [`Error::InvalidRequest`] and changes nothing.
    ///
    /// Never retried: an increment is not idempotent, so a call that timed out or lost its
    /// connection may or may not have been applied.
    pub(crate) async fn incr(
        &self,
        key: Bytes,
        delta: i64,
        ttl_if_created: Option<Duration>,
    ) -> Result<i64, Error> {
        let op = Op::Incr(pb::IncrRequest {
            key,
            delta,
            ttl_ms_if_created: ttl_if_created.map_or(0, |t| duration_ms(t).max(1)),
            consistency: consistency_pb(self.cfg.write_consistency),
        });
        let PResult::Incr(resp) = self.op(false, op).await? else {
            return Err(mismatch());
        };
        self.saw_epoch(resp.ring_epoch);
        Ok(resp.value)
    }

    /// The values of `keys`, in order (`None` for each miss): one `MultiGet` per part of
    /// at most the node's batch limit.
    pub(crate) async fn get_many(&self, keys: Vec<Bytes>) -> Result<Vec<Option<Bytes>>, Error> {
        self.in_parts(keys, |node, keys| async move {
            let asked = keys.len();
            let PResult::MultiGet(resp) = node
                .op(true, Op::MultiGet(pb::MultiGetRequest { keys }))
                .await?
            else {
                return Err(mismatch());
            };
            // One result per key, or the values cannot be matched to their keys.
            if resp.results.len() != asked {
                return Err(Error::Server {
                    code: Code::Internal,
                    message: format!(
                        "{} answered {} results for {asked} keys",
                        node.addr,
                        resp.results.len()
                    ),
                });
            }
            node.saw_epoch(resp.ring_epoch);
            Ok(resp
                .results
                .into_iter()
                .map(|r| to_entry(r).map(|e| e.value))
                .collect())
        })
        .await
    }

    /// Stores every `(key, value)` pair with the same TTL: one `MultiSet` per part of at
    /// most the node's batch limit. Not atomic.
    pub(crate) async fn set_many(
        &self,
        entries: Vec<(Bytes, Bytes)>,
        ttl: Option<Duration>,
    ) -> Result<(), Error> {
        let options = SetOptions {
            ttl,
            ..SetOptions::default()
        };
        self.in_parts(entries, move |node, part| async move {
            let n = part.len();
            let entries: Vec<pb::SetRequest> = part
                .into_iter()
                .map(|(k, v)| set_request(k, v, options, None))
                .collect();
            let op = Op::MultiSet(pb::MultiSetRequest {
                entries,
                consistency: consistency_pb(node.cfg.write_consistency),
            });
            let PResult::MultiSet(resp) = node.op(true, op).await? else {
                return Err(mismatch());
            };
            node.saw_epoch(resp.ring_epoch);
            Ok(vec![(); n])
        })
        .await
        .map(drop)
    }

    /// Deletes every key the node holds (admin). Never retried.
    pub(crate) async fn flush(&self) -> Result<pb::FlushResponse, Error> {
        self.call(false, |mut c, t| async move {
            c.flush(with_timeout(pb::FlushRequest {}, t)).await
        })
        .await
    }

    /// One step of a scan of the node's keys.
    pub(crate) async fn scan(
        &self,
        cursor: u64,
        pattern: Bytes,
        count: u32,
    ) -> Result<(Vec<Bytes>, u64), Error> {
        let resp = self
            .call(true, |mut c, t| {
                let pattern = pattern.clone();
                async move {
                    c.scan(with_timeout(
                        pb::ScanRequest {
                            cursor,
                            pattern,
                            count,
                        },
                        t,
                    ))
                    .await
                }
            })
            .await?;
        Ok((resp.keys, resp.cursor))
    }

    /// The node's slow log, newest first; `reset` clears it afterwards (admin).
    pub(crate) async fn slowlog(
        &self,
        count: u32,
        reset: bool,
    ) -> Result<pb::SlowLogResponse, Error> {
        self.call(!reset, |mut c, t| async move {
            c.slow_log(with_timeout(pb::SlowLogRequest { count, reset }, t))
                .await
        })
        .await
    }

    /// The node's own copy of `key`.
    pub(crate) async fn inspect(&self, key: Bytes) -> Result<pb::InspectResponse, Error> {
        self.call(true, |mut c, t| {
            let key = key.clone();
            async move { c.inspect(with_timeout(pb::InspectRequest { key }, t)).await }
        })
        .await
    }

    /// The node's counters and sizes.
    pub(crate) async fn stats(&self) -> Result<pb::StatsResponse, Error> {
        self.call(true, |mut c, t| async move {
            c.stats(with_timeout(pb::StatsRequest {}, t)).await
        })
        .await
    }

    /// Asks the node to take a snapshot of its data now; answers once it is durable (an
    /// admin operation; the node must run with `--data-dir`). Large data takes a while:
    /// give the client a timeout to match.
    pub(crate) async fn snapshot(&self) -> Result<pb::SnapshotResponse, Error> {
        self.call(false, |mut c, t| async move {
            c.snapshot(with_timeout(pb::SnapshotRequest {}, t)).await
        })
        .await
    }

    /// Members and ring parameters.
    pub(crate) async fn cluster_info(&self) -> Result<pb::ClusterInfoResponse, Error> {
        self.call(true, |mut c, t| async move {
            c.cluster_info(with_timeout(pb::ClusterInfoRequest {}, t))
                .await
        })
        .await
    }

    /// The cluster view now, then each time it changes, until the stream ends (the node
    /// shuts down or the connection breaks). Only the opening call has a deadline.
    pub(crate) async fn watch_cluster(
        &self,
    ) -> Result<tonic::Streaming<pb::ClusterInfoResponse>, Error> {
        let mut c = self.inner.clone();
        let t = self.cfg.connect_timeout;
        let mut req = Request::new(pb::ClusterInfoRequest {});
        if let Some(auth) = self.cfg.auth.clone() {
            req.metadata_mut().insert("authorization", auth);
        }
        match tokio::time::timeout(t, c.watch_cluster(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(Error::from_status(status, &self.addr, t)),
            Err(_) => Err(Error::TimedOut(t)),
        }
    }
}

/// What every request carries besides its message: its deadline and the token.
#[derive(Clone)]
struct Stamp {
    timeout: Duration,
    auth: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

fn with_timeout<T>(msg: T, stamp: Stamp) -> Request<T> {
    let mut req = Request::new(msg);
    req.set_timeout(stamp.timeout);
    if let Some(auth) = stamp.auth {
        req.metadata_mut().insert("authorization", auth);
    }
    req
}

/// One operation as its unary call.
async fn unary(mut c: CacheClient<Channel>, op: Op, t: Stamp) -> Result<Response<PResult>, Status> {
    Ok(match op {
        Op::Get(r) => c.get(with_timeout(r, t)).await?.map(PResult::Get),
        Op::Set(r) => c.set(with_timeout(r, t)).await?.map(PResult::Set),
        Op::Delete(r) => c.delete(with_timeout(r, t)).await?.map(PResult::Delete),
        Op::Touch(r) => c.touch(with_timeout(r, t)).await?.map(PResult::Touch),
        Op::Incr(r) => c.incr(with_timeout(r, t)).await?.map(PResult::Incr),
        Op::MultiGet(r) => c
            .multi_get(with_timeout(r, t))
            .await?
            .map(PResult::MultiGet),
        Op::MultiSet(r) => c
            .multi_set(with_timeout(r, t))
            .await?
            .map(PResult::MultiSet),
    })
}

fn mismatch() -> Error {
    Error::Server {
        code: Code::Internal,
        message: "the node answered another operation's result".into(),
    }
}

fn to_entry(r: pb::GetResponse) -> Option<Entry> {
    r.found.then(|| Entry {
        value: r.value,
        ttl: r.ttl_ms.map(Duration::from_millis),
        version: r.version,
    })
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn set_request(
    key: Bytes,
    value: Bytes,
    options: SetOptions,
    client_default: Option<Consistency>,
) -> pb::SetRequest {
    pb::SetRequest {
        consistency: consistency_pb(options.consistency.or(client_default)),
        key,
        value,
        // A sub-millisecond TTL still expires (rounded up to 1 ms), rather than meaning "never".
        ttl_ms: options.ttl.map_or(0, |t| duration_ms(t).max(1)),
        condition: condition_to_pb(options.condition),
    }
}

/// `base × 2^attempt`, plus up to 50 % jitter so that many clients do not retry in step.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16));
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    exp + exp.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_what_the_caller_can_do() {
        let t = Duration::from_secs(1);
        let map = |code| Error::from_status(Status::new(code, "m"), "a:1", t);
        assert!(matches!(
            map(Code::InvalidArgument),
            Error::InvalidRequest { .. }
        ));
        assert!(matches!(
            map(Code::OutOfRange),
            Error::InvalidRequest { .. }
        ));
        assert!(matches!(map(Code::ResourceExhausted), Error::Full(_)));
        assert!(matches!(map(Code::Unavailable), Error::Unavailable(_)));
        assert!(matches!(map(Code::DeadlineExceeded), Error::TimedOut(_)));
        assert!(matches!(map(Code::NotFound), Error::Server { .. }));
        assert!(matches!(map(Code::Internal), Error::Server { .. }));
        assert!(matches!(map(Code::Cancelled), Error::Unavailable(_)));
        assert!(matches!(map(Code::Aborted), Error::WrongNode(_)));
    }

    #[test]
    fn backoff_grows_and_is_bounded_by_jitter() {
        let base = Duration::from_millis(10);
        for attempt in 0..5 {
            let d = backoff(base, attempt);
            let exp = base * (1 << attempt);
            assert!(d >= exp && d <= exp + exp / 2, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn sub_millisecond_ttl_still_expires() {
        let r = set_request(
            Bytes::from_static(b"k"),
            Bytes::new(),
            SetOptions::ttl(Duration::from_micros(10)),
            None,
        );
        assert_eq!(r.ttl_ms, 1);
        let r = set_request(
            Bytes::from_static(b"k"),
            Bytes::new(),
            SetOptions::default(),
            Some(Consistency::All),
        );
        assert_eq!(r.ttl_ms, 0);
        assert_eq!(
            r.consistency,
            pb::Consistency::All as i32,
            "the client default applies"
        );
    }

    #[tokio::test]
    async fn connecting_to_nothing_is_unavailable_with_a_hint() {
        // Bind and drop a listener to get a local port with nothing behind it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let err = Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .connect(format!("127.0.0.1:{port}"))
            .await
            .expect_err("nothing listens there");
        assert!(matches!(err, Error::Unavailable(_)), "{err}");
        assert!(err.to_string().contains("is cache-node running?"), "{err}");
        let err = Client::connect("not a url at all \u{0}")
            .await
            .expect_err("bad address");
        assert!(
            matches!(err, Error::InvalidAddress { .. } | Error::Unavailable(_)),
            "{err}"
        );
    }
}
