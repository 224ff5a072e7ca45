//! The `cache.v1.Cache` gRPC service: limits, routing, coordination, status codes.
//!
//! Every handler checks the request against [`Limits`] before any work, then routes:
//!
//! - **Reads** are served locally if this node is one of the key's replicas; otherwise they
//!   are forwarded to the replicas in ring order (primary first, the next one if it is
//!   unreachable). `CONSISTENCY_QUORUM` reads are coordinated by the primary: it reads a
//!   majority of replicas, returns the newest version and repairs stale replicas.
//! - **Writes** are coordinated by the key's primary: it stamps a version from the hybrid
//!   logical clock, applies it, and replicates it (asynchronously for `ONE`; synchronously to
//!   a majority or to all for `QUORUM`/`ALL`). A non-primary forwards the write to the
//!   primary, or to the next replica if the primary is unreachable.
//! - A forwarded request carries the `x-cache-hop` marker and is **never forwarded again**:
//!   a node that receives one for a key it replicates serves (or coordinates) it; otherwise
//!   it answers `ABORTED` naming its ring epoch, so the sender refreshes its view. No request
//!   can loop.
//!
//! One metric sample and one debug span (with the key's *hash*, never the key) per request.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use cache_core::{
    Cache, Condition, DeleteOutcome, InsertError, Lookup, WriteOptions, WriteOutcome,
};
use cache_proto::v1::{self as pb, cache_client::CacheClient, cache_server};
use cluster_ring::NodeId;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::cluster::{Cluster, Consistency, RingState, delete_entry, write_entry};
use crate::limits::Limits;
use crate::metrics::{NodeMetrics, Op};

/// Metadata key marking a request forwarded by another node.
pub const HOP_HEADER: &str = "x-cache-hop";

/// State shared by the services, the admin HTTP server and the node's lifecycle.
#[derive(Debug)]
pub struct Shared {
    /// The engine.
    pub cache: Arc<Cache>,
    /// Request limits.
    pub limits: Limits,
    /// Metric handles.
    pub metrics: Arc<NodeMetrics>,
    /// Set when shutdown starts: new requests get `UNAVAILABLE`, `/readyz` turns 503.
    pub shutting_down: AtomicBool,
    /// All requests answered, for the request rate on `/status`.
    pub requests: AtomicU64,
    /// When the node started.
    pub started: Instant,
    /// Ring, peers, replication.
    pub cluster: Arc<Cluster>,
}

/// The tonic service. Cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct CacheService {
    shared: Arc<Shared>,
}

/// The `result` label of a failed request.
fn status_label(status: &Status) -> &'static str {
    match status.code() {
        tonic::Code::InvalidArgument => "invalid_argument",
        tonic::Code::OutOfRange => "out_of_range",
        tonic::Code::ResourceExhausted => "resource_exhausted",
        tonic::Code::Unavailable => "unavailable",
        _ => "internal",
    }
}

/// Maps a refused write to its status code.
fn insert_error(e: InsertError) -> Status {
    match e {
        InsertError::EntryTooLarge { .. } | InsertError::KeyTooLong(_) => {
            Status::out_of_range(e.to_string())
        }
        InsertError::OutOfMemory { .. } => Status::resource_exhausted(e.to_string()),
    }
}

fn condition(raw: i32) -> Result<Condition, Status> {
    match pb::Condition::try_from(raw) {
        Ok(pb::Condition::Always) => Ok(Condition::Always),
        Ok(pb::Condition::IfAbsent) => Ok(Condition::IfAbsent),
        Ok(pb::Condition::IfPresent) => Ok(Condition::IfPresent),
        Err(_) => Err(Status::invalid_argument(format!("unknown condition {raw}"))),
    }
}

/// The key's ring hash, for logs (keys may be secrets; their hash is not).
fn key_hash(key: &[u8]) -> u64 {
    cluster_ring::key_hash(key)
}

fn is_forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(HOP_HEADER)
}

/// Statuses after which the next replica is worth trying.
fn is_unreachable(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
    )
}

/// What a locally coordinated Set did.
enum Applied {
    /// Its condition did not hold.
    NotStored,
    /// A newer version was already stored (written concurrently with a later version):
    /// ours is ordered before it and superseded, which is what last-writer-wins means.
    /// Nothing to replicate; the client's write counts as done.
    Superseded,
    /// Stored; replicate this entry.
    Stored(pb::ReplicatedEntry),
}

/// Where a write goes: the replicas ahead of this node, in order.
struct WriteRoute {
    ahead: Vec<NodeId>,
    /// Whether this node may coordinate if none of `ahead` answers (it is a replica).
    local_fallback: bool,
}

/// Where a key's request is handled.
struct Placement {
    state: Arc<RingState>,
    replicas: Vec<NodeId>,
    local_is_primary: bool,
    local_is_replica: bool,
}

impl CacheService {
    /// A service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn check_open(&self) -> Result<(), Status> {
        if self.shared.shutting_down.load(Ordering::Relaxed) {
            return Err(Status::unavailable(
                "node is shutting down; retry on another node or later",
            ));
        }
        Ok(())
    }

    /// Runs `f`, then records the request's metric with the result `f` reports.
    async fn observe<T>(
        &self,
        op: Op,
        f: impl Future<Output = Result<(T, &'static str), Status>>,
    ) -> Result<Response<T>, Status> {
        let start = Instant::now();
        let outcome = match self.check_open() {
            Ok(()) => f.await,
            Err(e) => Err(e),
        };
        let result = match &outcome {
            Ok((_, label)) => *label,
            Err(status) => status_label(status),
        };
        self.shared.metrics.record(op, result, start.elapsed());
        self.shared.requests.fetch_add(1, Ordering::Relaxed);
        outcome.map(|(body, _)| Response::new(body))
    }

    fn cluster(&self) -> &Arc<Cluster> {
        &self.shared.cluster
    }

    fn now_ms(&self) -> u64 {
        cache_core::Clock::now_ms(self.shared.cache.clock())
    }

    fn place(&self, key: &[u8]) -> Placement {
        let state = self.cluster().state();
        let replicas = state.replicas(key);
        let local = &self.cluster().local_id;
        Placement {
            local_is_primary: replicas.first().is_some_and(|r| r == local),
            local_is_replica: replicas.iter().any(|r| r == local),
            replicas,
            state,
        }
    }

    fn wrong_owner(&self, p: &Placement) -> Status {
        Status::aborted(format!(
            "node {} does not replicate this key at ring epoch {}; refresh the cluster view",
            self.cluster().local_id,
            p.state.epoch
        ))
    }

    /// Sends a request to the first reachable node of `targets` (skipping this node), with the
    /// hop marker and the peer deadline. Counts one forwarded request.
    async fn forward<Req, Resp, F, Fut>(
        &self,
        targets: &[NodeId],
        msg: Req,
        call: F,
    ) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(CacheClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let cluster = self.cluster();
        let mut last = None;
        for target in targets.iter().filter(|t| **t != cluster.local_id) {
            let Some(client) = cluster.cache_client(target.as_str()) else {
                continue;
            };
            let mut req = Request::new(msg.clone());
            req.metadata_mut()
                .insert(HOP_HEADER, tonic::metadata::MetadataValue::from_static("1"));
            req.set_timeout(cluster.config.peer_timeout);
            self.shared.metrics.forwarded();
            let outcome = tokio::time::timeout(cluster.config.peer_timeout, call(client, req))
                .await
                .unwrap_or_else(|_| {
                    Err(Status::deadline_exceeded(format!(
                        "{target} did not answer in time"
                    )))
                });
            match outcome {
                Ok(resp) => {
                    cluster.record_peer(target, Ok(()));
                    return Ok(resp.into_inner());
                }
                Err(status) if is_unreachable(&status) => {
                    cluster.record_peer(target, Err(status.message().to_string()));
                    last = Some(format!("{target}: {}", status.message()));
                }
                Err(status) => return Err(status),
            }
        }
        Err(Status::unavailable(format!(
            "no replica of this key answered (last error: {})",
            last.unwrap_or_else(|| "no reachable replica".into())
        )))
    }

    /// Who coordinates a write of a key placed at `p`: this node (no targets), or the
    /// replicas ahead of it in ring order, with this node as the fallback if it is a replica.
    fn write_route(&self, p: &Placement, forwarded: bool) -> Result<WriteRoute, Status> {
        let local = &self.cluster().local_id;
        if p.local_is_primary || (forwarded && p.local_is_replica) {
            return Ok(WriteRoute {
                ahead: Vec::new(),
                local_fallback: true,
            });
        }
        if forwarded {
            return Err(self.wrong_owner(p));
        }
        let ahead: Vec<NodeId> = p
            .replicas
            .iter()
            .take_while(|r| *r != local)
            .cloned()
            .collect();
        Ok(WriteRoute {
            ahead,
            local_fallback: p.local_is_replica,
        })
    }

    /// Forwards a write along `route`; `Ok(None)` means "coordinate it here" (this node is
    /// the coordinator, or every replica ahead of it is unreachable).
    async fn forward_write<Req, Resp, F, Fut>(
        &self,
        route: &WriteRoute,
        msg: Req,
        call: F,
    ) -> Result<Option<Resp>, Status>
    where
        Req: Clone,
        F: Fn(CacheClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        if route.ahead.is_empty() {
            return Ok(None);
        }
        match self.forward(&route.ahead, msg, call).await {
            Ok(resp) => Ok(Some(resp)),
            Err(status) if route.local_fallback && status.code() == tonic::Code::Unavailable => {
                Ok(None)
            }
            Err(status) => Err(status),
        }
    }

    /// Sends `entries` to the other replicas with `consistency`; `Ok` once enough applied.
    async fn replicate(
        &self,
        p: &Placement,
        entries: Vec<pb::ReplicatedEntry>,
        consistency: Consistency,
    ) -> Result<(), Status> {
        let cluster = self.cluster();
        let others: Vec<&NodeId> = p
            .replicas
            .iter()
            .filter(|r| **r != cluster.local_id)
            .collect();
        let required = consistency.required(p.replicas.len());
        if required <= 1 {
            for peer in others {
                for e in &entries {
                    cluster.enqueue(peer, e.clone());
                }
            }
            return Ok(());
        }
        let per_peer = others
            .into_iter()
            .map(|peer| (peer.clone(), entries.clone()))
            .collect();
        let acks = 1 + self.replicate_sync(per_peer).await.len();
        if acks < required {
            return Err(Status::unavailable(format!(
                "write applied on {acks} of {} replicas, {required} required; it stays applied there",
                p.replicas.len()
            )));
        }
        Ok(())
    }

    /// Sends each peer its entries now, in parallel, bounded by the peer deadline. Peers that
    /// fail get the entries queued asynchronously, so they converge once they are back.
    /// Returns the peers that acknowledged.
    async fn replicate_sync(
        &self,
        per_peer: BTreeMap<NodeId, Vec<pb::ReplicatedEntry>>,
    ) -> Vec<NodeId> {
        let mut set = tokio::task::JoinSet::new();
        for (peer, entries) in per_peer {
            let cluster = Arc::clone(self.cluster());
            set.spawn(async move {
                let ok = cluster.replicate_now(&peer, entries.clone()).await.is_ok();
                if !ok {
                    for e in entries {
                        cluster.enqueue(&peer, e);
                    }
                }
                (peer, ok)
            });
        }
        let mut acked = Vec::new();
        while let Some(done) = set.join_next().await {
            if let Ok((peer, true)) = done {
                acked.push(peer);
            }
        }
        acked
    }

    fn lookup_to_pb(lookup: Option<Lookup>, now_ms: u64) -> pb::GetResponse {
        match lookup {
            Some(l) => pb::GetResponse {
                found: true,
                value: l.value,
                expires_at_ms: l.expires_at,
                ttl_ms: l.expires_at.map(|at| at.saturating_sub(now_ms)),
                version: l.version,
                ring_epoch: 0,
            },
            None => pb::GetResponse::default(),
        }
    }

    fn local_get(&self, key: &[u8]) -> pb::GetResponse {
        let _span = tracing::debug_span!("get", key_hash = key_hash(key)).entered();
        let lookup = self.shared.cache.get_entry(key);
        let now = if lookup.as_ref().is_some_and(|l| l.expires_at.is_some()) {
            self.now_ms()
        } else {
            0
        };
        Self::lookup_to_pb(lookup, now)
    }

    /// A QUORUM read coordinated here: newest version among a majority, stale ones repaired.
    async fn quorum_get(&self, p: &Placement, key: &Bytes) -> Result<pb::GetResponse, Status> {
        let cluster = self.cluster();
        let local = self.shared.cache.get_entry(key);
        let required = Consistency::Quorum.required(p.replicas.len());
        let mut set = tokio::task::JoinSet::new();
        for peer in p.replicas.iter().filter(|r| **r != cluster.local_id) {
            let (cluster, peer, key) = (Arc::clone(cluster), peer.clone(), key.clone());
            set.spawn(async move {
                let client = cluster.peer_client(&peer);
                let result = match client {
                    None => Err("unknown peer".to_string()),
                    Some(mut c) => {
                        let mut req = Request::new(pb::FetchRequest {
                            key,
                            from: cluster.local_id.clone(),
                            ring_fingerprint: cluster.state().ring.fingerprint(),
                        });
                        req.set_timeout(cluster.config.peer_timeout);
                        match tokio::time::timeout(cluster.config.peer_timeout, c.fetch(req)).await
                        {
                            Ok(Ok(r)) => Ok(r.into_inner()),
                            Ok(Err(s)) => Err(s.message().to_string()),
                            Err(_) => Err("timed out".to_string()),
                        }
                    }
                };
                cluster.record_peer(&peer, result.as_ref().map(drop).map_err(Clone::clone));
                (peer, result)
            });
        }
        let mut answers: Vec<(NodeId, pb::FetchResponse)> = Vec::new();
        while let Some(done) = set.join_next().await {
            if let Ok((peer, Ok(r))) = done {
                cluster.check_fingerprint(&peer, r.ring_fingerprint);
                answers.push((peer, r));
            }
        }
        if answers.len() + 1 < required {
            return Err(Status::unavailable(format!(
                "quorum read reached {} of {} replicas, {required} required",
                answers.len() + 1,
                p.replicas.len()
            )));
        }
        // The newest version among the answers and the local copy.
        let local_version = local.as_ref().map_or(0, |l| l.version);
        let newest_remote = answers
            .iter()
            .filter(|(_, r)| r.found)
            .max_by_key(|(_, r)| r.version);
        let now = self.now_ms();
        let (winner, entry) = match (local, newest_remote) {
            (Some(l), Some((_, r))) if r.version > l.version => (None, Some(r.clone())),
            (Some(l), _) => (Some(l), None),
            (None, Some((_, r))) => (None, Some(r.clone())),
            (None, None) => (None, None),
        };
        let (response, repair) = match (winner, entry) {
            (Some(l), _) => {
                let e = write_entry(key.clone(), l.value.clone(), l.version, l.expires_at);
                (Self::lookup_to_pb(Some(l), now), Some(e))
            }
            (None, Some(r)) => {
                let expires = (r.expires_at_ms != 0).then_some(r.expires_at_ms);
                let e = write_entry(key.clone(), r.value.clone(), r.version, expires);
                crate::cluster::apply_replicated(&self.shared.cache, std::slice::from_ref(&e))
                    .map_err(Status::internal)?;
                if r.version > local_version {
                    self.shared.metrics.read_repair();
                }
                let l = Lookup {
                    value: r.value,
                    version: r.version,
                    expires_at: expires,
                };
                (Self::lookup_to_pb(Some(l), now), Some(e))
            }
            (None, None) => (pb::GetResponse::default(), None),
        };
        if let Some(entry) = repair {
            for (peer, r) in &answers {
                if !r.found || r.version < entry.version {
                    self.shared.metrics.read_repair();
                    cluster.enqueue(peer, entry.clone());
                }
            }
        }
        Ok(response)
    }

    /// Coordinates one Set here: version, apply, replicate. Returns whether it was stored.
    async fn coordinate_set(
        &self,
        p: &Placement,
        req: &pb::SetRequest,
        consistency: Consistency,
    ) -> Result<bool, Status> {
        match self.apply_set(req)? {
            Applied::NotStored => Ok(false),
            Applied::Superseded => Ok(true),
            Applied::Stored(entry) => {
                self.replicate(p, vec![entry], consistency).await?;
                Ok(true)
            }
        }
    }

    /// Applies a Set locally with a fresh version.
    fn apply_set(&self, req: &pb::SetRequest) -> Result<Applied, Status> {
        let _span =
            tracing::debug_span!("set", key_hash = key_hash(&req.key), len = req.value.len())
                .entered();
        let now = self.now_ms();
        let version = self.cluster().hlc.next(now);
        let expires_at = (req.ttl_ms > 0).then(|| now.saturating_add(req.ttl_ms));
        let opts = WriteOptions {
            version: Some(version),
            expires_at,
            condition: condition(req.condition)?,
        };
        Ok(
            match self
                .shared
                .cache
                .write(&req.key, &req.value, opts)
                .map_err(insert_error)?
            {
                WriteOutcome::ConditionNotMet => Applied::NotStored,
                WriteOutcome::Stale => Applied::Superseded,
                WriteOutcome::Stored => Applied::Stored(write_entry(
                    req.key.clone(),
                    req.value.clone(),
                    version,
                    expires_at,
                )),
            },
        )
    }

    fn check_set(&self, req: &pb::SetRequest) -> Result<(), Status> {
        self.shared.limits.check_key(&req.key)?;
        self.shared.limits.check_value(&req.value)?;
        condition(req.condition).map(drop)
    }

    fn default_consistency(&self) -> Consistency {
        self.cluster().config.default_consistency
    }
}

#[tonic::async_trait]
impl cache_server::Cache for CacheService {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        self.observe(Op::Get, async {
            self.shared.limits.check_key(&req.key)?;
            let p = self.place(&req.key);
            let quorum = Consistency::from_pb(req.consistency, Consistency::One)
                == Consistency::Quorum
                && p.replicas.len() > 1;
            let mut resp = if quorum && (p.local_is_primary || (forwarded && p.local_is_replica)) {
                self.quorum_get(&p, &req.key).await?
            } else if !quorum && p.local_is_replica {
                self.local_get(&req.key)
            } else if forwarded {
                return Err(self.wrong_owner(&p));
            } else {
                self.forward(&p.replicas, req.clone(), |mut c, r| async move {
                    c.get(r).await
                })
                .await?
            };
            let label = if resp.found { "hit" } else { "miss" };
            resp.ring_epoch = p.state.epoch;
            Ok((resp, label))
        })
        .await
    }

    async fn set(
        &self,
        request: Request<pb::SetRequest>,
    ) -> Result<Response<pb::SetResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        self.observe(Op::Set, async {
            self.check_set(&req)?;
            let p = self.place(&req.key);
            let route = self.write_route(&p, forwarded)?;
            let remote = self
                .forward_write(
                    &route,
                    req.clone(),
                    |mut c, r| async move { c.set(r).await },
                )
                .await?;
            let stored = match remote {
                Some(r) => r.stored,
                None => {
                    let consistency =
                        Consistency::from_pb(req.consistency, self.default_consistency());
                    self.coordinate_set(&p, &req, consistency).await?
                }
            };
            Ok((
                pb::SetResponse {
                    stored,
                    ring_epoch: p.state.epoch,
                },
                if stored { "ok" } else { "not_stored" },
            ))
        })
        .await
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        self.observe(Op::Delete, async {
            self.shared.limits.check_key(&req.key)?;
            let p = self.place(&req.key);
            let route = self.write_route(&p, forwarded)?;
            let remote = self
                .forward_write(
                    &route,
                    req.clone(),
                    |mut c, r| async move { c.delete(r).await },
                )
                .await?;
            let deleted = match remote {
                Some(r) => r.deleted,
                None if p.replicas.len() == 1 => {
                    // The only replica: no copy can arrive late, so no tombstone is needed.
                    tracing::debug_span!("delete", key_hash = key_hash(&req.key))
                        .in_scope(|| self.shared.cache.delete(&req.key))
                }
                None => {
                    let version = self.cluster().hlc.next(self.now_ms());
                    let outcome = tracing::debug_span!("delete", key_hash = key_hash(&req.key))
                        .in_scope(|| self.shared.cache.delete_versioned(&req.key, version));
                    if outcome != DeleteOutcome::Stale {
                        let consistency =
                            Consistency::from_pb(req.consistency, self.default_consistency());
                        self.replicate(
                            &p,
                            vec![delete_entry(req.key.clone(), version)],
                            consistency,
                        )
                        .await?;
                    }
                    outcome == DeleteOutcome::Deleted
                }
            };
            Ok((
                pb::DeleteResponse {
                    deleted,
                    ring_epoch: p.state.epoch,
                },
                if deleted { "ok" } else { "miss" },
            ))
        })
        .await
    }

    async fn touch(
        &self,
        request: Request<pb::TouchRequest>,
    ) -> Result<Response<pb::TouchResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        self.observe(Op::Touch, async {
            self.shared.limits.check_key(&req.key)?;
            let p = self.place(&req.key);
            let route = self.write_route(&p, forwarded)?;
            let remote = self
                .forward_write(
                    &route,
                    req.clone(),
                    |mut c, r| async move { c.touch(r).await },
                )
                .await?;
            let found = match remote {
                Some(r) => r.found,
                None => {
                    // A touch is a rewrite of the current value at a new version, so replicas
                    // learn the new expiry through the same last-writer-wins path.
                    let rewrite = tracing::debug_span!("touch", key_hash = key_hash(&req.key))
                        .in_scope(|| {
                            let Some(current) = self.shared.cache.get_entry(&req.key) else {
                                return Ok::<_, Status>((false, None));
                            };
                            let now = self.now_ms();
                            let version = self.cluster().hlc.next(now);
                            let expires_at =
                                (req.ttl_ms > 0).then(|| now.saturating_add(req.ttl_ms));
                            let opts = WriteOptions {
                                version: Some(version),
                                expires_at,
                                condition: Condition::IfPresent,
                            };
                            Ok(
                                match self
                                    .shared
                                    .cache
                                    .write(&req.key, &current.value, opts)
                                    .map_err(insert_error)?
                                {
                                    WriteOutcome::Stored => (
                                        true,
                                        Some(write_entry(
                                            req.key.clone(),
                                            current.value,
                                            version,
                                            expires_at,
                                        )),
                                    ),
                                    WriteOutcome::Stale => (true, None),
                                    WriteOutcome::ConditionNotMet => (false, None),
                                },
                            )
                        })?;
                    if let (_, Some(e)) = &rewrite {
                        self.replicate(&p, vec![e.clone()], self.default_consistency())
                            .await?;
                    }
                    rewrite.0
                }
            };
            Ok((
                pb::TouchResponse {
                    found,
                    ring_epoch: p.state.epoch,
                },
                if found { "ok" } else { "miss" },
            ))
        })
        .await
    }

    async fn multi_get(
        &self,
        request: Request<pb::MultiGetRequest>,
    ) -> Result<Response<pb::MultiGetResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        self.observe(Op::MultiGet, async {
            let limits = &self.shared.limits;
            limits.check_batch(req.keys.len())?;
            for k in &req.keys {
                limits.check_key(k)?;
            }
            let state = self.cluster().state();
            let local = self.cluster().local_id.clone();
            let mut results: Vec<Option<pb::GetResponse>> = vec![None; req.keys.len()];
            // Keys this node replicates are answered here; the rest go to their primaries,
            // one MultiGet per primary, in parallel.
            let mut remote: BTreeMap<NodeId, Vec<usize>> = Default::default();
            for (i, k) in req.keys.iter().enumerate() {
                let replicas = state.replicas(k);
                if replicas.iter().any(|r| *r == local) {
                    results[i] = Some(self.local_get(k));
                } else if forwarded {
                    return Err(Status::aborted(format!(
                        "node {local} does not replicate every key of this batch at ring epoch {}",
                        state.epoch
                    )));
                } else {
                    remote.entry(replicas[0].clone()).or_default().push(i);
                }
            }
            let mut set = tokio::task::JoinSet::new();
            for (primary, idx) in remote {
                let this = self.clone();
                let keys: Vec<Bytes> = idx.iter().map(|&i| req.keys[i].clone()).collect();
                let state = Arc::clone(&state);
                set.spawn(async move {
                    let batch = pb::MultiGetRequest { keys: keys.clone() };
                    let got = this
                        .forward(
                            std::slice::from_ref(&primary),
                            batch,
                            |mut c, r| async move { c.multi_get(r).await },
                        )
                        .await;
                    let answers = match got {
                        Ok(r) => Ok(r.results),
                        // The primary is unreachable: each key goes to its next replicas.
                        Err(_) => {
                            let mut out = Vec::with_capacity(keys.len());
                            for k in &keys {
                                let replicas = state.replicas(k);
                                let r = this
                                    .forward(
                                        &replicas,
                                        pb::GetRequest {
                                            key: k.clone(),
                                            consistency: 0,
                                        },
                                        |mut c, r| async move { c.get(r).await },
                                    )
                                    .await;
                                match r {
                                    Ok(r) => out.push(r),
                                    Err(e) => return (idx, Err(e)),
                                }
                            }
                            Ok(out)
                        }
                    };
                    (idx, answers)
                });
            }
            while let Some(done) = set.join_next().await {
                let (idx, answers) =
                    done.map_err(|e| Status::internal(format!("batch task failed: {e}")))?;
                let answers = answers?;
                if answers.len() != idx.len() {
                    return Err(Status::internal(
                        "a peer answered a batch with the wrong number of results",
                    ));
                }
                for (i, mut a) in idx.into_iter().zip(answers) {
                    a.ring_epoch = 0;
                    results[i] = Some(a);
                }
            }
            let mut total = 0usize;
            let results: Vec<pb::GetResponse> =
                results.into_iter().map(Option::unwrap_or_default).collect();
            for r in &results {
                total += r.value.len();
            }
            if total > limits.max_response_bytes() {
                return Err(Status::out_of_range(format!(
                    "values add up to more than the response limit of {} bytes; split the batch",
                    limits.max_response_bytes()
                )));
            }
            Ok((
                pb::MultiGetResponse {
                    results,
                    ring_epoch: state.epoch,
                },
                "ok",
            ))
        })
        .await
    }

    async fn multi_set(
        &self,
        request: Request<pb::MultiSetRequest>,
    ) -> Result<Response<pb::MultiSetResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let req = request.into_inner();
        self.observe(Op::MultiSet, async {
            self.shared.limits.check_batch(req.entries.len())?;
            for e in &req.entries {
                self.check_set(e)?;
            }
            let consistency = Consistency::from_pb(req.consistency, self.default_consistency());
            let state = self.cluster().state();
            let local = self.cluster().local_id.clone();
            let mut results = vec![pb::SetResponse::default(); req.entries.len()];
            let mut remote: BTreeMap<NodeId, Vec<usize>> = Default::default();
            // Coordinate the keys whose primary is this node (or, for a forwarded batch, that
            // it replicates), grouping their replication per peer.
            let mut mine: Vec<(usize, Placement)> = Vec::new();
            for (i, e) in req.entries.iter().enumerate() {
                let p = self.place(&e.key);
                if p.local_is_primary || (forwarded && p.local_is_replica) {
                    mine.push((i, p));
                } else if forwarded {
                    return Err(Status::aborted(format!(
                        "node {local} does not replicate every key of this batch at ring epoch {}",
                        state.epoch
                    )));
                } else {
                    remote.entry(p.replicas[0].clone()).or_default().push(i);
                }
            }
            let mut set = tokio::task::JoinSet::new();
            for (primary, idx) in remote {
                let this = self.clone();
                let entries: Vec<pb::SetRequest> = idx.iter().map(|&i| req.entries[i].clone()).collect();
                let raw_consistency = req.consistency;
                set.spawn(async move {
                    let batch = pb::MultiSetRequest { entries: entries.clone(), consistency: raw_consistency };
                    let got = this
                        .forward(std::slice::from_ref(&primary), batch, |mut c, r| async move { c.multi_set(r).await })
                        .await;
                    let answers = match got {
                        Ok(r) => Ok(r.results),
                        Err(_) => {
                            // Primary unreachable: each entry goes through the normal Set path
                            // (next replica coordinates).
                            let mut out = Vec::with_capacity(entries.len());
                            for mut e in entries {
                                e.consistency = raw_consistency;
                                let replicas = this.cluster().state().replicas(&e.key);
                                match this.forward(&replicas, e, |mut c, r| async move { c.set(r).await }).await {
                                    Ok(r) => out.push(r),
                                    Err(err) => return (idx, Err(err)),
                                }
                            }
                            Ok(out)
                        }
                    };
                    (idx, answers)
                });
            }
            let mut per_peer: BTreeMap<NodeId, Vec<pb::ReplicatedEntry>> = Default::default();
            let mut replicated: Vec<&Placement> = Vec::new();
            for (i, p) in &mine {
                let applied = self.apply_set(&req.entries[*i]).map_err(|s| {
                    Status::new(s.code(), format!("entry {i} failed; earlier entries may be applied: {}", s.message()))
                })?;
                results[*i].stored = !matches!(applied, Applied::NotStored);
                if let Applied::Stored(entry) = applied {
                    for peer in p.replicas.iter().filter(|r| **r != local) {
                        per_peer.entry(peer.clone()).or_default().push(entry.clone());
                    }
                    replicated.push(p);
                }
            }
            if consistency == Consistency::One {
                for (peer, entries) in per_peer {
                    for e in entries {
                        self.cluster().enqueue(&peer, e);
                    }
                }
            } else if !per_peer.is_empty() {
                // One synchronous Replicate per peer, in parallel; then every key must have
                // enough acknowledging replicas (itself included).
                let acked = self.replicate_sync(per_peer).await;
                for p in replicated {
                    let acks = 1 + p.replicas.iter().filter(|r| **r != local && acked.contains(*r)).count();
                    let required = consistency.required(p.replicas.len());
                    if acks < required {
                        return Err(Status::unavailable(format!(
                            "a write of this batch was applied on {acks} of {} replicas, {required} required; applied entries stay applied",
                            p.replicas.len()
                        )));
                    }
                }
            }
            while let Some(done) = set.join_next().await {
                let (idx, answers) = done.map_err(|e| Status::internal(format!("batch task failed: {e}")))?;
                let answers = answers?;
                if answers.len() != idx.len() {
                    return Err(Status::internal("a peer answered a batch with the wrong number of results"));
                }
                for (i, a) in idx.into_iter().zip(answers) {
                    results[i].stored = a.stored;
                }
            }
            Ok((pb::MultiSetResponse { results, ring_epoch: state.epoch }, "ok"))
        })
        .await
    }

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        self.observe(Op::Stats, async {
            let s = self.shared.cache.stats();
            Ok((
                pb::StatsResponse {
                    hits: s.hits,
                    misses: s.misses,
                    inserts: s.inserts,
                    updates: s.updates,
                    deletes: s.deletes,
                    evictions: s.evictions,
                    expirations: s.expirations,
                    items: s.items,
                    bytes: s.bytes,
                    max_bytes: self.shared.cache.config().max_bytes,
                    uptime_seconds: self.shared.started.elapsed().as_secs(),
                    node_id: self.cluster().local_id.clone(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                },
                "ok",
            ))
        })
        .await
    }

    async fn cluster_info(
        &self,
        _request: Request<pb::ClusterInfoRequest>,
    ) -> Result<Response<pb::ClusterInfoResponse>, Status> {
        self.observe(Op::ClusterInfo, async {
            let state = self.cluster().state();
            Ok((
                pb::ClusterInfoResponse {
                    node_id: self.cluster().local_id.clone(),
                    members: state
                        .view
                        .members
                        .iter()
                        .map(|m| pb::Member {
                            id: m.id.clone(),
                            rpc_addr: m.rpc_addr.to_string(),
                            state: m.state.as_str().to_string(),
                            weight: m.weight,
                        })
                        .collect(),
                    vnodes_per_weight: state.ring.vnodes_per_weight(),
                    ring_format_version: cluster_ring::FORMAT_VERSION,
                    ring_fingerprint: state.ring.fingerprint(),
                    replication_factor: state.replication_factor as u32,
                    ring_epoch: state.epoch,
                },
                "ok",
            ))
        })
        .await
    }
}

/// The internal `cache.v1.Peer` service: replicated writes in, versioned reads out.
#[derive(Debug, Clone)]
pub struct PeerService {
    shared: Arc<Shared>,
}

impl PeerService {
    /// A peer service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn replicate(
        &self,
        request: Request<pb::ReplicateRequest>,
    ) -> Result<Response<pb::ReplicateResponse>, Status> {
        let req = request.into_inner();
        let cluster = &self.shared.cluster;
        cluster.check_fingerprint(&req.from, req.ring_fingerprint);
        for e in &req.entries {
            self.shared.limits.check_key(&e.key)?;
            self.shared.limits.check_value(&e.value)?;
            cluster.hlc.observe(e.version);
        }
        let (applied, stale) = crate::cluster::apply_replicated(&self.shared.cache, &req.entries)
            .map_err(Status::out_of_range)?;
        Ok(Response::new(pb::ReplicateResponse {
            applied,
            stale,
            ring_fingerprint: cluster.state().ring.fingerprint(),
        }))
    }

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        let req = request.into_inner();
        let cluster = &self.shared.cluster;
        cluster.check_fingerprint(&req.from, req.ring_fingerprint);
        self.shared.limits.check_key(&req.key)?;
        let fingerprint = cluster.state().ring.fingerprint();
        Ok(Response::new(match self.shared.cache.get_entry(&req.key) {
            Some(l) => pb::FetchResponse {
                found: true,
                value: l.value,
                version: l.version,
                expires_at_ms: l.expires_at.unwrap_or(0),
                ring_fingerprint: fingerprint,
            },
            None => pb::FetchResponse {
                ring_fingerprint: fingerprint,
                ..Default::default()
            },
        }))
    }
}
