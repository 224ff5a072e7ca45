//! The `cache.v1.Cache` gRPC service over a `cache-core` engine.
//!
//! Every handler checks the request against [`Limits`] before touching the engine, maps
//! engine outcomes and errors to the status codes documented in `docs/api.md`, records one
//! metric sample, and logs (at debug level) a span with the key's *hash*, never the key.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_core::{Cache, Condition, InsertError, Lookup, WriteOptions, WriteOutcome};
use cache_proto::v1::{self as pb, cache_server};
use tonic::{Request, Response, Status};

use crate::limits::Limits;
use crate::metrics::{NodeMetrics, Op};
use crate::node::ClusterView;

/// State shared by the service, the admin HTTP server and the node's lifecycle.
#[derive(Debug)]
pub struct Shared {
    /// The engine.
    pub cache: Arc<Cache>,
    /// Request limits.
    pub limits: Limits,
    /// Metric handles.
    pub metrics: NodeMetrics,
    /// Set when shutdown starts: new requests get `UNAVAILABLE`, `/readyz` turns 503.
    pub shutting_down: AtomicBool,
    /// All requests answered, for the request rate on `/status`. One relaxed atomic add per
    /// request.
    pub requests: AtomicU64,
    /// When the node started.
    pub started: Instant,
    /// What `ClusterInfo` reports.
    pub cluster: ClusterView,
}

/// The tonic service. Cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct CacheService {
    shared: Arc<Shared>,
}

impl CacheService {
    /// A service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Refuses work once shutdown has begun.
    fn check_open(&self) -> Result<(), Status> {
        if self.shared.shutting_down.load(Ordering::Relaxed) {
            return Err(Status::unavailable(
                "node is shutting down; retry on another node or later",
            ));
        }
        Ok(())
    }

    /// Runs `f`, then records the request's metric with the result `f` reports.
    fn observe<T>(
        &self,
        op: Op,
        f: impl FnOnce() -> Result<(T, &'static str), Status>,
    ) -> Result<Response<T>, Status> {
        let start = Instant::now();
        let outcome = self.check_open().and_then(|()| f());
        let result = match &outcome {
            Ok((_, label)) => *label,
            Err(status) => status_label(status),
        };
        self.shared.metrics.record(op, result, start.elapsed());
        self.shared.requests.fetch_add(1, Ordering::Relaxed);
        outcome.map(|(body, _)| Response::new(body))
    }

    fn epoch(&self) -> u64 {
        self.shared.cluster.ring_epoch
    }
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

fn ms(d: u64) -> Duration {
    Duration::from_millis(d)
}

/// The key's ring hash, for logs (keys may be secrets; their hash is not).
fn key_hash(key: &[u8]) -> u64 {
    cluster_ring::key_hash(key)
}

impl CacheService {
    fn lookup_to_pb(&self, lookup: Option<Lookup>, now_ms: u64) -> pb::GetResponse {
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

    fn now_ms(&self) -> u64 {
        cache_core::Clock::now_ms(self.shared.cache.clock())
    }

    /// Validates and applies one Set; returns whether it was stored.
    fn apply_set(&self, req: &pb::SetRequest) -> Result<bool, Status> {
        let opts = self.set_options(req)?;
        self.write(req, opts)
    }

    fn set_options(&self, req: &pb::SetRequest) -> Result<WriteOptions, Status> {
        self.shared.limits.check_key(&req.key)?;
        self.shared.limits.check_value(&req.value)?;
        let condition = condition(req.condition)?;
        let expires_at = (req.ttl_ms > 0).then(|| self.now_ms().saturating_add(req.ttl_ms));
        Ok(WriteOptions {
            version: None,
            expires_at,
            condition,
        })
    }

    fn write(&self, req: &pb::SetRequest, opts: WriteOptions) -> Result<bool, Status> {
        let _span =
            tracing::debug_span!("set", key_hash = key_hash(&req.key), len = req.value.len())
                .entered();
        match self
            .shared
            .cache
            .write(&req.key, &req.value, opts)
            .map_err(insert_error)?
        {
            WriteOutcome::Stored => Ok(true),
            WriteOutcome::ConditionNotMet | WriteOutcome::Stale => Ok(false),
        }
    }
}

#[tonic::async_trait]
impl cache_server::Cache for CacheService {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let req = request.into_inner();
        self.observe(Op::Get, || {
            self.shared.limits.check_key(&req.key)?;
            let _span = tracing::debug_span!("get", key_hash = key_hash(&req.key)).entered();
            let lookup = self.shared.cache.get_entry(&req.key);
            let label = if lookup.is_some() { "hit" } else { "miss" };
            let now = if lookup.as_ref().is_some_and(|l| l.expires_at.is_some()) {
                self.now_ms()
            } else {
                0
            };
            let mut resp = self.lookup_to_pb(lookup, now);
            resp.ring_epoch = self.epoch();
            Ok((resp, label))
        })
    }

    async fn set(
        &self,
        request: Request<pb::SetRequest>,
    ) -> Result<Response<pb::SetResponse>, Status> {
        let req = request.into_inner();
        self.observe(Op::Set, || {
            let stored = self.apply_set(&req)?;
            let label = if stored { "ok" } else { "not_stored" };
            Ok((
                pb::SetResponse {
                    stored,
                    ring_epoch: self.epoch(),
                },
                label,
            ))
        })
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let req = request.into_inner();
        self.observe(Op::Delete, || {
            self.shared.limits.check_key(&req.key)?;
            let _span = tracing::debug_span!("delete", key_hash = key_hash(&req.key)).entered();
            let deleted = self.shared.cache.delete(&req.key);
            Ok((
                pb::DeleteResponse {
                    deleted,
                    ring_epoch: self.epoch(),
                },
                if deleted { "ok" } else { "miss" },
            ))
        })
    }

    async fn touch(
        &self,
        request: Request<pb::TouchRequest>,
    ) -> Result<Response<pb::TouchResponse>, Status> {
        let req = request.into_inner();
        self.observe(Op::Touch, || {
            self.shared.limits.check_key(&req.key)?;
            let _span = tracing::debug_span!("touch", key_hash = key_hash(&req.key)).entered();
            let found = if req.ttl_ms == 0 {
                self.shared.cache.persist(&req.key)
            } else {
                self.shared.cache.expire(&req.key, ms(req.ttl_ms))
            };
            Ok((
                pb::TouchResponse {
                    found,
                    ring_epoch: self.epoch(),
                },
                if found { "ok" } else { "miss" },
            ))
        })
    }

    async fn multi_get(
        &self,
        request: Request<pb::MultiGetRequest>,
    ) -> Result<Response<pb::MultiGetResponse>, Status> {
        let req = request.into_inner();
        self.observe(Op::MultiGet, || {
            let limits = &self.shared.limits;
            limits.check_batch(req.keys.len())?;
            for k in &req.keys {
                limits.check_key(k)?;
            }
            let now = self.now_ms();
            let mut total = 0usize;
            let mut results = Vec::with_capacity(req.keys.len());
            for k in &req.keys {
                let r = self.lookup_to_pb(self.shared.cache.get_entry(k), now);
                total += r.value.len() + k.len();
                if total > limits.max_response_bytes() {
                    return Err(Status::out_of_range(format!(
                        "values add up to more than the response limit of {} bytes; split the batch",
                        limits.max_response_bytes()
                    )));
                }
                results.push(r);
            }
            Ok((
                pb::MultiGetResponse {
                    results,
                    ring_epoch: self.epoch(),
                },
                "ok",
            ))
        })
    }

    async fn multi_set(
        &self,
        request: Request<pb::MultiSetRequest>,
    ) -> Result<Response<pb::MultiSetResponse>, Status> {
        let req = request.into_inner();
        self.observe(Op::MultiSet, || {
            self.shared.limits.check_batch(req.entries.len())?;
            // Validate every entry before applying any.
            let opts = req
                .entries
                .iter()
                .map(|e| self.set_options(e))
                .collect::<Result<Vec<_>, _>>()?;
            let mut results = Vec::with_capacity(req.entries.len());
            for (i, (entry, opts)) in req.entries.iter().zip(opts).enumerate() {
                let stored = self.write(entry, opts).map_err(|s| {
                    Status::new(
                        s.code(),
                        format!(
                            "entry {i} failed after entries 0..{i} were applied: {}",
                            s.message()
                        ),
                    )
                })?;
                results.push(pb::SetResponse {
                    stored,
                    ring_epoch: 0,
                });
            }
            Ok((
                pb::MultiSetResponse {
                    results,
                    ring_epoch: self.epoch(),
                },
                "ok",
            ))
        })
    }

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        self.observe(Op::Stats, || {
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
                    node_id: self.shared.cluster.node_id.clone(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                },
                "ok",
            ))
        })
    }

    async fn cluster_info(
        &self,
        _request: Request<pb::ClusterInfoRequest>,
    ) -> Result<Response<pb::ClusterInfoResponse>, Status> {
        self.observe(Op::ClusterInfo, || Ok((self.shared.cluster.to_pb(), "ok")))
    }
}
