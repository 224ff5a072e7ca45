//! [`Client`]: the one client type, routing through one node or by the ring.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cache_proto::v1 as pb;

use crate::cluster::{ClusterMember, Router, View};
use crate::single_flight::Flights;
use crate::{ClientBuilder, Entry, Error, Node, SetOptions, ToBytes};

/// A cache-cluster client. Cheap to clone: clones share connections, the cluster view and
/// the single-flight table.
///
/// It routes in one of two ways ([`Routing`]), chosen when it connects and otherwise
/// invisible: [`ClientBuilder::connect`] sends everything to one node, which forwards what
/// it does not own; [`ClientBuilder::connect_cluster`] builds the nodes' ring itself and
/// sends each key straight to its replicas, failing over to the next one and splitting
/// batches per node. The data calls are the same either way.
///
/// Per-node operations ([`Client::stats`], [`Client::snapshot`], [`Client::flush`],
/// [`Client::scan`], [`Client::inspect`], [`Client::slowlog`], [`Client::cluster_info`]) go to the node a
/// direct client talks to; for a cluster, [`Client::each_member`] gives a direct client per
/// member.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// What clones of a [`Client`] share.
struct Inner {
    route: Route,
    flights: Flights,
}

enum Route {
    Direct(Node),
    Ring(Router),
}

/// How a [`Client`] routes requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Every request goes to one node, which forwards what it does not own.
    Direct,
    /// Each key goes straight to its replicas, computed from the cluster's ring.
    Ring,
}

/// The ring a ring-aware client routes by ([`Client::ring_summary`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingSummary {
    /// The ring's fingerprint (the same on every node with the same view).
    pub fingerprint: u64,
    /// The ring epoch.
    pub epoch: u64,
    /// Copies of each key.
    pub replication_factor: usize,
}

/// One replica of a key and what it holds ([`Client::locate`]).
#[derive(Debug, Clone)]
pub struct Location {
    /// The member's id.
    pub id: String,
    /// Its address.
    pub addr: String,
    /// Its rank among the key's replicas: 0 is the primary.
    pub rank: usize,
    /// Its own copy of the key, or why it could not be asked.
    pub copy: Result<pb::InspectResponse, Error>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner.route {
            Route::Direct(n) => f.debug_struct("Client").field("addr", &n.addr()).finish(),
            Route::Ring(r) => f.debug_struct("Client").field("ring", r).finish(),
        }
    }
}

/// Whether a failed cache read can be treated as a miss by cache-aside: the cache is
/// unreachable or slow, as opposed to the request being wrong.
fn cache_unreachable(e: &Error) -> bool {
    matches!(e, Error::Unavailable(_) | Error::TimedOut(_))
}

impl Client {
    pub(crate) fn direct(node: Node) -> Self {
        Self {
            inner: Arc::new(Inner {
                route: Route::Direct(node),
                flights: Flights::default(),
            }),
        }
    }

    pub(crate) fn ring(router: Router) -> Self {
        Self {
            inner: Arc::new(Inner {
                route: Route::Ring(router),
                flights: Flights::default(),
            }),
        }
    }

    /// The settings the client was built with.
    fn settings(&self) -> &ClientBuilder {
        match &self.inner.route {
            Route::Direct(n) => n.builder(),
            Route::Ring(r) => r.builder(),
        }
    }

    /// A builder with the default timeouts and retries.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Connects to one node with the defaults (see [`ClientBuilder::connect`]).
    pub async fn connect(addr: impl Into<String>) -> Result<Self, Error> {
        Self::builder().connect(addr).await
    }

    /// How this client routes.
    pub fn routing(&self) -> Routing {
        match self.inner.route {
            Route::Direct(_) => Routing::Direct,
            Route::Ring(_) => Routing::Ring,
        }
    }

    /// The node a direct client talks to; `None` for a ring-aware one.
    pub fn addr(&self) -> Option<&str> {
        match &self.inner.route {
            Route::Direct(n) => Some(n.addr()),
            Route::Ring(_) => None,
        }
    }

    /// The ring epoch of the client's view (ring-aware), or that the node reported in its
    /// last answer (direct; 0 before any).
    pub fn last_ring_epoch(&self) -> u64 {
        match &self.inner.route {
            Route::Direct(n) => n.last_ring_epoch(),
            Route::Ring(r) => r.ring_summary().1,
        }
    }

    /// The value of `key`, or `None` on a miss.
    pub async fn get(&self, key: impl ToBytes) -> Result<Option<Bytes>, Error> {
        Ok(self.get_entry(key).await?.map(|e| e.value))
    }

    /// The value of `key` with its TTL and version, or `None` on a miss.
    pub async fn get_entry(&self, key: impl ToBytes) -> Result<Option<Entry>, Error> {
        let key = key.to_bytes();
        match &self.inner.route {
            Route::Direct(n) => n.get_entry(key).await,
            Route::Ring(r) => r.get_entry(key).await,
        }
    }

    /// Stores `key` = `value` with no expiry.
    pub async fn set(&self, key: impl ToBytes, value: impl ToBytes) -> Result<(), Error> {
        self.set_with(key, value, SetOptions::default())
            .await
            .map(drop)
    }

    /// Stores `key` = `value` with options; returns whether it was stored (`false` only when
    /// a condition did not hold).
    pub async fn set_with(
        &self,
        key: impl ToBytes,
        value: impl ToBytes,
        options: SetOptions,
    ) -> Result<bool, Error> {
        let (key, value) = (key.to_bytes(), value.to_bytes());
        match &self.inner.route {
            Route::Direct(n) => n.set_with(key, value, options).await,
            Route::Ring(r) => r.set_with(key, value, options).await,
        }
    }

    /// Removes `key`; returns whether it held a live value.
    pub async fn delete(&self, key: impl ToBytes) -> Result<bool, Error> {
        let key = key.to_bytes();
        match &self.inner.route {
            Route::Direct(n) => n.delete(key).await,
            Route::Ring(r) => r.delete(key).await,
        }
    }

    /// Sets (or with `None` removes) the TTL of a live key; returns whether the key existed.
    pub async fn touch(&self, key: impl ToBytes, ttl: Option<Duration>) -> Result<bool, Error> {
        let key = key.to_bytes();
        match &self.inner.route {
            Route::Direct(n) => n.touch(key, ttl).await,
            Route::Ring(r) => r.touch(key, ttl).await,
        }
    }

    /// Adds `delta` to the 64-bit integer stored at `key` (a missing key counts as 0) and
    /// returns the result, atomically on the key's primary. The key keeps its TTL; a key this
    /// call creates gets `ttl_if_created`. A stored value that is not a decimal integer, or
    /// an overflow, is [`Error::InvalidRequest`] and changes nothing. A fixed-window rate
    /// limiter is `incr(key, 1, Some(window))`.
    ///
    /// Never retried: an increment is not idempotent, so a call that timed out or lost its
    /// connection may or may not have been applied.
    pub async fn incr(
        &self,
        key: impl ToBytes,
        delta: i64,
        ttl_if_created: Option<Duration>,
    ) -> Result<i64, Error> {
        let key = key.to_bytes();
        match &self.inner.route {
            Route::Direct(n) => n.incr(key, delta, ttl_if_created).await,
            Route::Ring(r) => r.incr(key, delta, ttl_if_created).await,
        }
    }

    /// The values of `keys`, in order (`None` for each miss). Any number of keys: a batch
    /// over the node's limit (`--max-batch`, 1 024 by default) is split and the parts sent
    /// concurrently; a ring-aware client also splits it per node. No keys: no call.
    pub async fn get_many<K: ToBytes>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<Option<Bytes>>, Error> {
        let keys: Vec<Bytes> = keys.into_iter().map(ToBytes::to_bytes).collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        match &self.inner.route {
            Route::Direct(n) => n.get_many(keys).await,
            Route::Ring(r) => r.get_many(keys).await,
        }
    }

    /// Stores every `(key, value)` pair with the same TTL, split as [`Client::get_many`]
    /// splits. Not atomic: on an error, some entries may have been stored. No entries: no
    /// call.
    pub async fn set_many<K: ToBytes, V: ToBytes>(
        &self,
        entries: impl IntoIterator<Item = (K, V)>,
        ttl: Option<Duration>,
    ) -> Result<(), Error> {
        let entries: Vec<(Bytes, Bytes)> = entries
            .into_iter()
            .map(|(k, v)| (k.to_bytes(), v.to_bytes()))
            .collect();
        if entries.is_empty() {
            return Ok(());
        }
        match &self.inner.route {
            Route::Direct(n) => n.set_many(entries, ttl).await,
            Route::Ring(r) => r.set_many(entries, ttl).await,
        }
    }

    /// Cache-aside with single-flight: the value of `key`, or else `loader`'s, stored with
    /// `ttl` (`None`: no expiry) and returned.
    ///
    /// However many tasks of this process miss the same key at once, `loader` runs once:
    /// the others wait for its result (the thundering herd that follows a popular key's
    /// expiry reaches the source of truth once, not once per request). A loader error is
    /// [`Error::Loader`], given to every waiter, and nothing is stored; the next miss loads
    /// again. If the task running the loader is cancelled, a waiting one runs its own.
    ///
    /// The cache is an optimisation here: if it is unreachable or times out, the value is
    /// loaded (still once) and returned, and a failed store is ignored. A request the node
    /// refuses (an empty or oversized key) is an error, as anywhere else.
    ///
    /// ```no_run
    /// # async fn demo(client: cache_client::Client) -> Result<(), cache_client::Error> {
    /// use std::time::Duration;
    /// let profile = client
    ///     .get_or_insert_with("user:42", Some(Duration::from_secs(60)), || async {
    ///         // The database query: runs once however many requests miss together.
    ///         Ok::<_, std::io::Error>(String::from("{\"name\":\"Ada\"}"))
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn get_or_insert_with<F, Fut, V, E>(
        &self,
        key: impl ToBytes,
        ttl: Option<Duration>,
        loader: F,
    ) -> Result<Bytes, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        V: ToBytes,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let key = key.to_bytes();
        match self.get(key.clone()).await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) if cache_unreachable(&e) => {}
            Err(e) => return Err(e),
        }
        let flight_key = key.clone();
        self.inner
            .flights
            .run(flight_key, || async move {
                // Another flight for this key may have landed between the miss above and
                // this one taking off: look once more before loading.
                match self.get(key.clone()).await {
                    Ok(Some(v)) => return Ok(v),
                    Ok(None) => {}
                    Err(e) if cache_unreachable(&e) => {}
                    Err(e) => return Err(e),
                }
                let value = loader()
                    .await
                    .map_err(|e| Error::Loader(Arc::from(e.into())))?
                    .to_bytes();
                let options = SetOptions {
                    ttl,
                    ..SetOptions::default()
                };
                // Best effort: the loaded value is right whether or not it could be cached.
                let _ = self.set_with(key, value.clone(), options).await;
                Ok(value)
            })
            .await
    }

    /// The members as the client sees them (ring-aware), with their share of the key space;
    /// empty for a direct client (see [`Client::each_member`]).
    pub fn members(&self) -> Vec<ClusterMember> {
        match &self.inner.route {
            Route::Direct(_) => Vec::new(),
            Route::Ring(r) => r.members(),
        }
    }

    /// The ring the client routes by; `None` for a direct client.
    pub fn ring_summary(&self) -> Option<RingSummary> {
        match &self.inner.route {
            Route::Direct(_) => None,
            Route::Ring(r) => {
                let (fingerprint, epoch, replication_factor) = r.ring_summary();
                Some(RingSummary {
                    fingerprint,
                    epoch,
                    replication_factor,
                })
            }
        }
    }

    /// The ids of `key`'s replicas, primary first, by the client's ring; empty for a direct
    /// client (see [`Client::locate`]).
    pub fn replicas_of(&self, key: impl AsRef<[u8]>) -> Vec<String> {
        match &self.inner.route {
            Route::Direct(_) => Vec::new(),
            Route::Ring(r) => r.replicas_of(key.as_ref()),
        }
    }

    /// Rebuilds a ring-aware client's view from any member now (it follows the cluster by
    /// itself; this is for callers that know the view changed). Nothing to do for a direct
    /// client.
    pub async fn refresh(&self) -> Result<(), Error> {
        match &self.inner.route {
            Route::Direct(_) => Ok(()),
            Route::Ring(r) => r.refresh().await,
        }
    }

    /// Every member with a direct client to it: from the client's view (ring-aware), or
    /// from the connected node's (direct). Connections are made on first use, so a member
    /// that is down fails only the calls made to it.
    pub async fn each_member(&self) -> Result<Vec<(ClusterMember, Client)>, Error> {
        Ok(self
            .view()
            .await?
            .member_nodes()
            .into_iter()
            .map(|(m, node)| (m, Client::direct(node)))
            .collect())
    }

    /// Where `key` lives: each replica by the ring (primary first) and its own copy — held
    /// or not, version, TTL, tombstone — read without forwarding or read-through. Replicas
    /// that disagree on the version are still converging (or one missed a write that
    /// anti-entropy will repair).
    pub async fn locate(&self, key: impl ToBytes) -> Result<Vec<Location>, Error> {
        let key = key.to_bytes();
        let view = self.view().await?;
        let (members, replicas) = (view.member_nodes(), view.replicas_of(&key));
        let mut out = Vec::with_capacity(replicas.len());
        for (rank, id) in replicas.into_iter().enumerate() {
            let Some((member, node)) = members.iter().find(|(m, _)| m.id == id) else {
                continue;
            };
            out.push(Location {
                id,
                addr: member.addr.clone(),
                rank,
                copy: node.inspect(key.clone()).await,
            });
        }
        Ok(out)
    }

    /// The cluster view: the client's own (ring-aware), or the connected node's, fetched now.
    async fn view(&self) -> Result<Arc<View>, Error> {
        match &self.inner.route {
            Route::Ring(r) => Ok(r.current_view()),
            Route::Direct(n) => Ok(Arc::new(
                Router::fetch_view(self.settings(), &[n.addr().to_string()]).await?,
            )),
        }
    }

    fn node(&self, what: &str) -> Result<&Node, Error> {
        match &self.inner.route {
            Route::Direct(n) => Ok(n),
            Route::Ring(_) => Err(Error::Cluster(format!(
                "{what} is a per-node operation: use each_member() (or connect() to one node)"
            ))),
        }
    }

    /// The node's counters and sizes (a direct client's node).
    pub async fn stats(&self) -> Result<pb::StatsResponse, Error> {
        self.node("stats")?.stats().await
    }

    /// Members and ring parameters as the node sees them (a direct client's node).
    pub async fn cluster_info(&self) -> Result<pb::ClusterInfoResponse, Error> {
        self.node("cluster_info")?.cluster_info().await
    }

    /// The node's cluster view now, then each time it changes, until the stream ends (the
    /// node shuts down or the connection breaks). Only the opening call has a deadline.
    pub async fn watch_cluster(&self) -> Result<tonic::Streaming<pb::ClusterInfoResponse>, Error> {
        self.node("watch_cluster")?.watch_cluster().await
    }

    /// Asks the node to take a snapshot of its data now; answers once it is durable (an
    /// admin operation; the node must run with `--data-dir`). Large data takes a while:
    /// give the client a timeout to match.
    pub async fn snapshot(&self) -> Result<pb::SnapshotResponse, Error> {
        self.node("snapshot")?.snapshot().await
    }

    /// Deletes every key the node holds (an admin operation). The deletes are versioned:
    /// they win over the other replicas' older copies, so anti-entropy spreads them — to
    /// empty a cluster, flush every member ([`Client::each_member`]). Writes made while a
    /// flush runs may survive it. Never retried.
    pub async fn flush(&self) -> Result<pb::FlushResponse, Error> {
        self.node("flush")?.flush().await
    }

    /// One step of an iteration over the keys the node holds (its primaries and replicas),
    /// as Redis's `SCAN`: start with cursor 0 and pass back each answer's cursor until it is
    /// 0. `pattern` is a glob (`user:*`; empty for every key); `count` is about how many
    /// entries to examine (0 for the node's default of 10). A key present throughout is
    /// returned at least once.
    pub async fn scan(
        &self,
        cursor: u64,
        pattern: impl ToBytes,
        count: u32,
    ) -> Result<(Vec<Bytes>, u64), Error> {
        self.node("scan")?
            .scan(cursor, pattern.to_bytes(), count)
            .await
    }

    /// The node's slow log: the newest `count` requests (0: 10) that took at least its
    /// `--slowlog-threshold`, newest first; `reset` clears it afterwards (an admin call).
    pub async fn slowlog(&self, count: u32, reset: bool) -> Result<pb::SlowLogResponse, Error> {
        self.node("slowlog")?.slowlog(count, reset).await
    }

    /// The node's own copy of `key` (no forwarding, no read-through).
    pub async fn inspect(&self, key: impl ToBytes) -> Result<pb::InspectResponse, Error> {
        self.node("inspect")?.inspect(key.to_bytes()).await
    }
}
