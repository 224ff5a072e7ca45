//! The gRPC front ends, as translators onto the cluster core: the public `cache.v1.Cache`
//! service and the internal `cache.peer.v1.Peer` service (on its own listener).
//!
//! A handler decodes its message into a domain [`Request`] (validating every enum), calls
//! the [`Coordinator`], and maps the [`Response`] or [`CoreError`] back (see
//! [`wire::status`]). It holds no cluster logic: routing, forwarding, replication and quorums
//! are the core's. Each client request gets one metric sample; its deadline is the client's
//! `grpc-timeout` capped at the node's request timeout.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_proto::peer::v1::{self as peer, peer_server};
use cache_proto::v1::{self as pb, cache_server};
use cluster_core::{Coordinator, CoreError, PeerCall, Request, RequestContext, Response};
use cluster_ring::NodeId;
use tonic::{Status, metadata::MetadataMap};

use crate::auth::Role;
use crate::metrics::{NodeMetrics, Op};
use crate::transport::GrpcTransport;
use crate::wire;

/// The node's core, as the front ends use it.
pub type NodeCore = Coordinator<GrpcTransport>;

/// State shared by the services, the admin HTTP server and the node's lifecycle.
#[derive(Debug)]
pub struct Shared {
    /// The cluster core (which owns the store, and so the engine).
    pub core: Arc<NodeCore>,
    /// Metric handles.
    pub metrics: Arc<NodeMetrics>,
    /// All client requests answered, for the request rate on `/status`.
    pub requests: AtomicU64,
    /// When the node started.
    pub started: Instant,
    /// Longest a client request may take (a shorter `grpc-timeout` wins).
    pub request_timeout: Duration,
    /// Cancelled when shutdown begins: ends the open `WatchCluster` streams.
    pub stopping: tokio_util::sync::CancellationToken,
    /// The membership, for its gossip counters.
    pub membership: MembershipHandle,
    /// The append-only file and snapshots, with `--data-dir`.
    pub persistence: Option<Arc<cache_persist::Persistence>>,
    /// Client tokens (`--auth-file`); `None`: no authentication.
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// Connection counters of the client, peer, admin and RESP listeners, in that order.
    pub connections: [Arc<crate::conn::ConnStats>; 4],
}

/// The node's membership behind a `Debug` name.
#[derive(Clone)]
pub struct MembershipHandle(pub Arc<dyn cluster_membership::Membership>);

impl std::fmt::Debug for MembershipHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Membership")
            .field(&self.0.local_id())
            .finish()
    }
}

/// Parses a `grpc-timeout` header value (`<up to 8 digits><H|M|S|m|u|n>`).
fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let raw = metadata.get("grpc-timeout")?.to_str().ok()?;
    if raw.len() < 2 || raw.len() > 9 {
        return None;
    }
    let (digits, unit) = raw.split_at(raw.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The deadline of a request: its `grpc-timeout`, capped at `cap`.
fn deadline(metadata: &MetadataMap, cap: Duration) -> tokio::time::Instant {
    let budget = grpc_timeout(metadata).map_or(cap, |t| t.min(cap));
    tokio::time::Instant::now() + budget
}

/// The `cache.v1.Cache` service. Cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct CacheService {
    shared: Arc<Shared>,
}

impl CacheService {
    /// A service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn core(&self) -> &NodeCore {
        &self.shared.core
    }

    /// With `--auth-file`: the request's token must have role `need` (UNAUTHENTICATED
    /// without a known token, PERMISSION_DENIED below the role). Without it: everyone may.
    fn authorize<T>(&self, request: &tonic::Request<T>, need: Role) -> Result<(), Status> {
        let Some(auth) = &self.shared.auth else {
            return Ok(());
        };
        let header = request
            .metadata()
            .get("authorization")
            .map(tonic::metadata::MetadataValue::as_bytes);
        match auth.check(header, need) {
            Ok(_) => Ok(()),
            Err(e @ crate::auth::AuthError::Forbidden { .. }) => {
                Err(Status::permission_denied(e.to_string()))
            }
            Err(e) => Err(Status::unauthenticated(e.to_string())),
        }
    }

    fn epoch(&self) -> u64 {
        self.core().ring().load().epoch
    }

    /// Runs `f`, then records the request's metric with the result it reports.
    async fn observe<T>(
        &self,
        op: Op,
        f: impl Future<Output = Result<(T, &'static str), CoreError>>,
    ) -> Result<tonic::Response<T>, Status> {
        let start = Instant::now();
        let outcome = f.await;
        let result = match &outcome {
            Ok((_, label)) => label,
            Err(e) => wire::error_kind(e),
        };
        self.shared.metrics.record(op, result, start.elapsed());
        self.shared.requests.fetch_add(1, Ordering::Relaxed);
        outcome
            .map(|(body, _)| tonic::Response::new(body))
            .map_err(|e| wire::status(&e))
    }

    /// Decodes with `decode`, runs the request through the core by its deadline.
    async fn run<M>(
        &self,
        request: tonic::Request<M>,
        decode: impl FnOnce(M) -> Result<Request, CoreError>,
    ) -> Result<Response, CoreError> {
        let ctx = RequestContext {
            deadline: deadline(request.metadata(), self.shared.request_timeout),
            forwarded: false,
        };
        let request = decode(request.into_inner())?;
        self.core().handle(request, ctx).await
    }
}

/// Takes a snapshot on a blocking thread (the engine scan and the fsyncs block). The error
/// says why there is none (persistence off, or the snapshot failed).
pub(crate) async fn take_snapshot(
    shared: &Shared,
) -> Result<cache_persist::SnapshotReport, String> {
    let Some(p) = shared.persistence.clone() else {
        return Err("this node persists nothing (start it with --data-dir)".into());
    };
    tokio::task::spawn_blocking(move || p.snapshot())
        .await
        .map_err(|e| format!("the snapshot task failed: {e}"))?
        .map_err(|e| e.to_string())
}

fn mismatch() -> CoreError {
    CoreError::Internal("the core answered another request's response".into())
}

#[tonic::async_trait]
impl cache_server::Cache for CacheService {
    async fn get(
        &self,
        request: tonic::Request<pb::GetRequest>,
    ) -> Result<tonic::Response<pb::GetResponse>, Status> {
        self.authorize(&request, Role::Read)?;
        self.observe(Op::Get, async {
            let Response::Get(found) = self.run(request, wire::get).await? else {
                return Err(mismatch());
            };
            let label = if found.is_some() { "hit" } else { "miss" };
            let now = self.core().store().now_ms();
            Ok((wire::get_response(found, now, self.epoch()), label))
        })
        .await
    }

    async fn set(
        &self,
        request: tonic::Request<pb::SetRequest>,
    ) -> Result<tonic::Response<pb::SetResponse>, Status> {
        self.authorize(&request, Role::Write)?;
        self.observe(Op::Set, async {
            let Response::Set { stored } = self.run(request, wire::set).await? else {
                return Err(mismatch());
            };
            let label = if stored { "ok" } else { "not_stored" };
            let ring_epoch = self.epoch();
            Ok((pb::SetResponse { stored, ring_epoch }, label))
        })
        .await
    }

    async fn delete(
        &self,
        request: tonic::Request<pb::DeleteRequest>,
    ) -> Result<tonic::Response<pb::DeleteResponse>, Status> {
        self.authorize(&request, Role::Write)?;
        self.observe(Op::Delete, async {
            let Response::Delete { deleted } = self.run(request, wire::delete).await? else {
                return Err(mismatch());
            };
            let label = if deleted { "ok" } else { "miss" };
            let ring_epoch = self.epoch();
            Ok((
                pb::DeleteResponse {
                    deleted,
                    ring_epoch,
                },
                label,
            ))
        })
        .await
    }

    async fn touch(
        &self,
        request: tonic::Request<pb::TouchRequest>,
    ) -> Result<tonic::Response<pb::TouchResponse>, Status> {
        self.authorize(&request, Role::Write)?;
        self.observe(Op::Touch, async {
            let Response::Touch { found } = self.run(request, wire::touch).await? else {
                return Err(mismatch());
            };
            let label = if found { "ok" } else { "miss" };
            let ring_epoch = self.epoch();
            Ok((pb::TouchResponse { found, ring_epoch }, label))
        })
        .await
    }

    async fn incr(
        &self,
        request: tonic::Request<pb::IncrRequest>,
    ) -> Result<tonic::Response<pb::IncrResponse>, Status> {
        self.authorize(&request, Role::Write)?;
        self.observe(Op::Incr, async {
            let Response::Update { current, .. } = self.run(request, wire::incr).await? else {
                return Err(mismatch());
            };
            let value = wire::counter_value(current)?;
            let ring_epoch = self.epoch();
            Ok((pb::IncrResponse { value, ring_epoch }, "ok"))
        })
        .await
    }

    async fn multi_get(
        &self,
        request: tonic::Request<pb::MultiGetRequest>,
    ) -> Result<tonic::Response<pb::MultiGetResponse>, Status> {
        self.authorize(&request, Role::Read)?;
        self.observe(Op::MultiGet, async {
            let Response::MultiGet(found) = self.run(request, |r| Ok(wire::multi_get(r))).await?
            else {
                return Err(mismatch());
            };
            let now = self.core().store().now_ms();
            let results = found
                .into_iter()
                .map(|f| wire::get_response(f, now, 0))
                .collect();
            let ring_epoch = self.epoch();
            Ok((
                pb::MultiGetResponse {
                    results,
                    ring_epoch,
                },
                "ok",
            ))
        })
        .await
    }

    async fn multi_set(
        &self,
        request: tonic::Request<pb::MultiSetRequest>,
    ) -> Result<tonic::Response<pb::MultiSetResponse>, Status> {
        self.authorize(&request, Role::Write)?;
        self.observe(Op::MultiSet, async {
            let Response::MultiSet(stored) = self.run(request, wire::multi_set).await? else {
                return Err(mismatch());
            };
            let results = stored
                .into_iter()
                .map(|stored| pb::SetResponse {
                    stored,
                    ring_epoch: 0,
                })
                .collect();
            let ring_epoch = self.epoch();
            Ok((
                pb::MultiSetResponse {
                    results,
                    ring_epoch,
                },
                "ok",
            ))
        })
        .await
    }

    async fn stats(
        &self,
        request: tonic::Request<pb::StatsRequest>,
    ) -> Result<tonic::Response<pb::StatsResponse>, Status> {
        self.authorize(&request, Role::Read)?;
        self.observe(Op::Stats, async {
            let store = self.core().store();
            let s = store.stats();
            let sync = self.core().sync_status();
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
                    max_bytes: store.engine().config().max_bytes,
                    uptime_seconds: self.shared.started.elapsed().as_secs(),
                    node_id: self.core().local_id().to_string(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    syncing: sync.syncing,
                    sync_peers: u32::try_from(sync.peers_total).unwrap_or(u32::MAX),
                    sync_peers_synced: u32::try_from(sync.peers_synced).unwrap_or(u32::MAX),
                },
                "ok",
            ))
        })
        .await
    }

    async fn snapshot(
        &self,
        request: tonic::Request<pb::SnapshotRequest>,
    ) -> Result<tonic::Response<pb::SnapshotResponse>, Status> {
        self.authorize(&request, Role::Admin)?;
        match take_snapshot(&self.shared).await {
            Ok(r) => Ok(tonic::Response::new(pb::SnapshotResponse {
                path: r.path.display().to_string(),
                entries: r.entries,
                bytes: r.bytes,
                took_ms: u64::try_from(r.took.as_millis()).unwrap_or(u64::MAX),
            })),
            Err(e) if self.shared.persistence.is_none() => Err(Status::failed_precondition(e)),
            Err(e) => Err(Status::internal(e)),
        }
    }

    async fn cluster_info(
        &self,
        request: tonic::Request<pb::ClusterInfoRequest>,
    ) -> Result<tonic::Response<pb::ClusterInfoResponse>, Status> {
        self.authorize(&request, Role::Read)?;
        self.observe(Op::ClusterInfo, async {
            Ok((self.cluster_info_of(&self.core().ring().load()), "ok"))
        })
        .await
    }

    type WatchClusterStream = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<pb::ClusterInfoResponse, Status>> + Send>,
    >;

    async fn watch_cluster(
        &self,
        request: tonic::Request<pb::ClusterInfoRequest>,
    ) -> Result<tonic::Response<Self::WatchClusterStream>, Status> {
        self.authorize(&request, Role::Read)?;
        let changes = self.core().ring().subscribe();
        let first = self.cluster_info_of(&self.core().ring().load());
        let stopping = self.shared.stopping.clone();
        let this = self.clone();
        let stream = futures_util::stream::unfold(
            (Some(first), changes, this, stopping),
            |(first, mut changes, this, stopping)| async move {
                if let Some(first) = first {
                    return Some((Ok(first), (None, changes, this, stopping)));
                }
                // Ends when the node shuts down, so open watches never hold up shutdown.
                let next = tokio::select! {
                    () = stopping.cancelled() => return None,
                    r = changes.recv() => r,
                };
                let info = match next {
                    Ok(change) => this.cluster_info_of(&change.new),
                    // Fell behind: the current view says it all.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        this.cluster_info_of(&this.core().ring().load())
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                };
                Some((Ok(info), (None, changes, this, stopping)))
            },
        );
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

impl CacheService {
    /// `ClusterInfo` of one ring state.
    fn cluster_info_of(&self, state: &cluster_core::RingState) -> pb::ClusterInfoResponse {
        pb::ClusterInfoResponse {
            node_id: self.core().local_id().to_string(),
            members: state
                .view
                .members
                .iter()
                .map(|m| pb::Member {
                    id: m.id.clone(),
                    rpc_addr: m.rpc_addr.to_string(),
                    state: cache_proto::convert::member_state_to_pb(m.state),
                    weight: m.weight,
                    incarnation: m.incarnation,
                })
                .collect(),
            vnodes_per_weight: state.ring.vnodes_per_weight(),
            ring_format_version: cluster_ring::FORMAT_VERSION,
            ring_fingerprint: state.ring.fingerprint(),
            replication_factor: u32::try_from(state.replication_factor).unwrap_or(u32::MAX),
            ring_epoch: state.epoch,
        }
    }
}

/// The `cache.peer.v1.Peer` service: forwarded requests, replicated mutations and versioned
/// reads from other nodes, on the peer listener only.
#[derive(Debug, Clone)]
pub struct PeerService {
    shared: Arc<Shared>,
}

impl PeerService {
    /// A peer service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn call(
        &self,
        metadata: &MetadataMap,
        from: String,
        ring_fingerprint: u64,
    ) -> Result<PeerCall, Status> {
        let from = NodeId::new(from)
            .map_err(|e| wire::status(&CoreError::Invalid(format!("bad caller id: {e}"))))?;
        Ok(PeerCall {
            from,
            ring_fingerprint,
            deadline: deadline(metadata, self.shared.request_timeout),
        })
    }

    fn fingerprint(&self) -> u64 {
        self.shared.core.ring().load().ring.fingerprint()
    }
}

#[tonic::async_trait]
impl peer_server::Peer for PeerService {
    async fn forward(
        &self,
        request: tonic::Request<peer::ForwardRequest>,
    ) -> Result<tonic::Response<peer::ForwardResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let call = self.call(&metadata, req.from, req.ring_fingerprint)?;
        let request = wire::from_forward_request(req.request).map_err(|e| wire::status(&e))?;
        let response = self
            .shared
            .core
            .handle_forward(call, request)
            .await
            .map_err(|e| wire::status(&e))?;
        Ok(tonic::Response::new(peer::ForwardResponse {
            ring_fingerprint: self.fingerprint(),
            response: Some(wire::forward_response(response)),
        }))
    }

    async fn replicate(
        &self,
        request: tonic::Request<peer::ReplicateRequest>,
    ) -> Result<tonic::Response<peer::ReplicateResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let call = self.call(&metadata, req.from, req.ring_fingerprint)?;
        let mutations = req
            .mutations
            .into_iter()
            .map(wire::mutation)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| wire::status(&e))?;
        let report = self
            .shared
            .core
            .handle_replicate(&call, &mutations)
            .await
            .map_err(|e| wire::status(&e))?;
        Ok(tonic::Response::new(peer::ReplicateResponse {
            applied: report.applied,
            stale: report.stale,
            ring_fingerprint: self.fingerprint(),
        }))
    }

    async fn fetch(
        &self,
        request: tonic::Request<peer::FetchRequest>,
    ) -> Result<tonic::Response<peer::FetchResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let call = self.call(&metadata, req.from, req.ring_fingerprint)?;
        let reads = self
            .shared
            .core
            .handle_fetch(&call, &req.keys)
            .map_err(|e| wire::status(&e))?;
        Ok(tonic::Response::new(peer::FetchResponse {
            entries: reads.into_iter().map(wire::versioned_to_pb).collect(),
            ring_fingerprint: self.fingerprint(),
        }))
    }

    async fn sync(
        &self,
        request: tonic::Request<peer::SyncRequest>,
    ) -> Result<tonic::Response<peer::SyncResponse>, Status> {
        let (metadata, _, req) = request.into_parts();
        let call = self.call(&metadata, req.from, req.ring_fingerprint)?;
        let reply = self
            .shared
            .core
            .handle_sync(
                &call,
                cluster_core::SyncRequest {
                    digests: req.digests,
                    from_segment: req.from_segment,
                },
            )
            .await
            .map_err(|e| wire::status(&e))?;
        Ok(tonic::Response::new(wire::sync_reply_to_pb(
            reply,
            self.fingerprint(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_bad_ones_are_ignored() {
        let mut m = MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        m.insert("grpc-timeout", "250m".parse().expect("ascii"));
        assert_eq!(grpc_timeout(&m), Some(Duration::from_millis(250)));
        m.insert("grpc-timeout", "99999999H".parse().expect("ascii"));
        assert_eq!(
            grpc_timeout(&m),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        for bad in ["5", "x5S", "123456789S", "5Q"] {
            m.insert("grpc-timeout", bad.parse().expect("ascii"));
            assert_eq!(grpc_timeout(&m), None, "{bad}");
        }
    }
}
