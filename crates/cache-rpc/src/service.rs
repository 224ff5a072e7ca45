//! The gRPC front ends, as translators onto the cluster core: the public `cache.v1.Cache`
//! service and the internal `cache.peer.v1.Peer` service (on its own listener).
//!
//! A handler decodes its message into a domain [`Request`](cluster_core::Request) (validating every enum), calls
//! the [`Coordinator`], and maps the [`Response`] or [`CoreError`] back (see
//! [`wire::status`]). It holds no cluster logic: routing, forwarding, replication and quorums
//! are the core's. Each client request gets one metric sample; its deadline is the client's
//! `grpc-timeout` capped at the node's request timeout. Unary calls and the operations of
//! the pipelined stream (`Pipeline`) go through the same `exec`, so they cannot differ in
//! validation, routing or metrics; a stream is one task running its operations
//! concurrently (see `run_pipeline`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_proto::peer::v1::{self as peer, peer_server};
use cache_proto::v1::pipelined_op::Op as POp;
use cache_proto::v1::pipelined_result::Result as PResult;
use cache_proto::v1::{self as pb, cache_server};
use cluster_core::{Coordinator, CoreError, PeerCall, RequestContext, Response};
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
    /// Requests that took at least the slow-log threshold.
    pub slowlog: crate::slowlog::SlowLog,
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
    /// `/readyz` answers 200 while syncing (`--ready-while-syncing`).
    pub ready_while_syncing: bool,
}

impl Shared {
    /// Deletes every key this node holds, each as a delete with a tombstone (newer than
    /// every other replica's copy, so anti-entropy spreads it rather than restoring the
    /// value; the append-only file records it). Yields between chunks. Returns the live
    /// keys deleted and the time taken; stops with `ShuttingDown` if shutdown begins.
    pub async fn flush(&self) -> Result<(u64, Duration), CoreError> {
        let start = Instant::now();
        let store = self.core.store();
        let mut deleted = 0u64;
        // A complete scan: every key live for the whole flush is deleted, whatever the
        // engine moves meanwhile (the flush's own deletes give pages back and move chunks).
        let mut scan = store.engine().scanner();
        while let Some(entries) = scan.entries(1024) {
            if self.stopping.is_cancelled() {
                tracing::warn!(deleted, "flush stopped by shutdown");
                return Err(CoreError::ShuttingDown);
            }
            for e in entries {
                if store.delete(&e.key, true, cluster_core::Stamping::FRESH)?.0 {
                    deleted += 1;
                }
            }
            tokio::task::yield_now().await;
        }
        tracing::warn!(deleted, "flushed by an admin request");
        Ok((deleted, start.elapsed()))
    }

    /// One step of a scan of this node's keys: up to `count` entries examined from
    /// `cursor` (0 starts), the keys matching `pattern` (empty: all), and the next cursor
    /// (0 when done).
    pub fn scan(&self, cursor: u64, pattern: &[u8], count: usize) -> (Vec<bytes::Bytes>, u64) {
        let (entries, next) = self.core.store().engine().scan(
            cache_core::ScanCursor::from_u64(cursor),
            count.clamp(1, MAX_SCAN_COUNT),
        );
        let keys = entries
            .into_iter()
            .filter(|e| pattern.is_empty() || cache_types::glob_match(pattern, &e.key))
            .map(|e| e.key)
            .collect();
        (keys, next.map_or(0, cache_core::ScanCursor::to_u64))
    }

    /// Records a request in the slow log (and its counter) if it took long enough.
    pub fn record_slow(
        &self,
        op: Op,
        result: &'static str,
        elapsed: Duration,
        key: Option<&bytes::Bytes>,
        keys: usize,
        via: &'static str,
    ) {
        if self.slowlog.record(
            crate::metrics::OPS[op as usize],
            result,
            elapsed,
            key,
            keys,
            via,
        ) {
            self.metrics.count_slow();
        }
    }
}

/// The first key of an operation and how many it carries (a cheap `Bytes` clone), for the
/// slow log.
fn first_key(op: &POp) -> (Option<bytes::Bytes>, usize) {
    match op {
        POp::Get(r) => (Some(r.key.clone()), 1),
        POp::Set(r) => (Some(r.key.clone()), 1),
        POp::Delete(r) => (Some(r.key.clone()), 1),
        POp::Touch(r) => (Some(r.key.clone()), 1),
        POp::Incr(r) => (Some(r.key.clone()), 1),
        POp::MultiGet(r) => (r.keys.first().cloned(), r.keys.len()),
        POp::MultiSet(r) => (r.entries.first().map(|e| e.key.clone()), r.entries.len()),
    }
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

/// Most entries one `Scan` call examines (its `count` is capped here).
pub const MAX_SCAN_COUNT: usize = 10_000;

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
        self.check_token(request.metadata(), need)
    }

    fn check_token(&self, metadata: &MetadataMap, need: Role) -> Result<(), Status> {
        let Some(auth) = &self.shared.auth else {
            return Ok(());
        };
        let header = metadata
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

    /// A unary call: checks the token's role for the operation, runs it by the call's
    /// deadline (`grpc-timeout` capped at the request timeout), answers its result.
    async fn unary<M, R>(
        &self,
        request: tonic::Request<M>,
        wrap: impl FnOnce(M) -> POp,
        unwrap: impl FnOnce(PResult) -> Option<R>,
    ) -> Result<tonic::Response<R>, Status> {
        let deadline = deadline(request.metadata(), self.shared.request_timeout);
        let (metadata, _, message) = request.into_parts();
        let op = wrap(message);
        self.check_token(&metadata, op_kind(&op).1)?;
        let result = self
            .exec(op, deadline)
            .await
            .map_err(|e| wire::status(&e))?;
        unwrap(result)
            .map(tonic::Response::new)
            .ok_or_else(|| wire::status(&mismatch()))
    }

    /// Runs one operation through the core by `deadline` and records its metric.
    async fn exec(&self, op: POp, deadline: tokio::time::Instant) -> Result<PResult, CoreError> {
        let metric = op_kind(&op).0;
        let (key, keys) = first_key(&op);
        let start = Instant::now();
        let outcome = self.exec_op(op, deadline).await;
        let result = match &outcome {
            Ok((_, label)) => label,
            Err(e) => wire::error_kind(e),
        };
        let elapsed = start.elapsed();
        self.shared.metrics.record(metric, result, elapsed);
        self.shared
            .record_slow(metric, result, elapsed, key.as_ref(), keys, "grpc");
        self.shared.requests.fetch_add(1, Ordering::Relaxed);
        outcome.map(|(r, _)| r)
    }

    /// Decodes one operation into a domain request, runs it, encodes the answer (with the
    /// label of its metric sample).
    async fn exec_op(
        &self,
        op: POp,
        deadline: tokio::time::Instant,
    ) -> Result<(PResult, &'static str), CoreError> {
        let ctx = RequestContext::until(deadline);
        let (request, kind) = match op {
            POp::Get(r) => (wire::get(r)?, Op::Get),
            POp::Set(r) => (wire::set(r)?, Op::Set),
            POp::Delete(r) => (wire::delete(r)?, Op::Delete),
            POp::Touch(r) => (wire::touch(r)?, Op::Touch),
            POp::Incr(r) => (wire::incr(r)?, Op::Incr),
            POp::MultiGet(r) => (wire::multi_get(r), Op::MultiGet),
            POp::MultiSet(r) => (wire::multi_set(r)?, Op::MultiSet),
        };
        let response = self.core().handle(request, ctx).await?;
        let ring_epoch = self.epoch();
        Ok(match (kind, response) {
            (Op::Get, Response::Get(found)) => {
                let label = if found.is_some() { "hit" } else { "miss" };
                let now = self.core().store().now_ms();
                (
                    PResult::Get(wire::get_response(found, now, ring_epoch)),
                    label,
                )
            }
            (Op::Set, Response::Set { stored }) => (
                PResult::Set(pb::SetResponse { stored, ring_epoch }),
                if stored { "ok" } else { "not_stored" },
            ),
            (Op::Delete, Response::Delete { deleted }) => (
                PResult::Delete(pb::DeleteResponse {
                    deleted,
                    ring_epoch,
                }),
                if deleted { "ok" } else { "miss" },
            ),
            (Op::Touch, Response::Touch { found }) => (
                PResult::Touch(pb::TouchResponse { found, ring_epoch }),
                if found { "ok" } else { "miss" },
            ),
            (Op::Incr, Response::Update { current, .. }) => {
                let value = wire::counter_value(current)?;
                (PResult::Incr(pb::IncrResponse { value, ring_epoch }), "ok")
            }
            (Op::MultiGet, Response::MultiGet(found)) => {
                let now = self.core().store().now_ms();
                let results = found
                    .into_iter()
                    .map(|f| wire::get_response(f, now, 0))
                    .collect();
                (
                    PResult::MultiGet(pb::MultiGetResponse {
                        results,
                        ring_epoch,
                    }),
                    "ok",
                )
            }
            (Op::MultiSet, Response::MultiSet(stored)) => {
                let results = stored
                    .into_iter()
                    .map(|stored| pb::SetResponse {
                        stored,
                        ring_epoch: 0,
                    })
                    .collect();
                (
                    PResult::MultiSet(pb::MultiSetResponse {
                        results,
                        ring_epoch,
                    }),
                    "ok",
                )
            }
            _ => return Err(mismatch()),
        })
    }

    /// The name and role of the token a stream was opened with (every role without
    /// `--auth-file`).
    fn stream_role<T>(&self, request: &tonic::Request<T>) -> Result<(String, Role), Status> {
        let Some(auth) = &self.shared.auth else {
            return Ok((String::new(), Role::Admin));
        };
        let header = request
            .metadata()
            .get("authorization")
            .map(tonic::metadata::MetadataValue::as_bytes);
        auth.identify(header)
            .map(|(name, role)| (name.to_string(), role))
            .map_err(|e| Status::unauthenticated(e.to_string()))
    }

    /// Sends one message of answers on a pipelined stream and records each operation's
    /// transport time; `false` when the client is gone.
    async fn send_answers(
        &self,
        tx: &tokio::sync::mpsc::Sender<Result<pb::PipelineResponse, Status>>,
        results: Vec<pb::PipelinedResult>,
        clocks: impl Iterator<Item = (Instant, Option<Op>)>,
    ) -> bool {
        if tx.send(Ok(pb::PipelineResponse { results })).await.is_err() {
            return false;
        }
        for (arrived, op) in clocks {
            self.shared.metrics.record_transport(
                crate::metrics::Transport::GrpcStream,
                op,
                arrived.elapsed(),
            );
        }
        true
    }

    /// One pipelined stream: reads operations while fewer than [`PIPELINE_IN_FLIGHT`] are
    /// running, runs them concurrently in this one task, and sends the answers that are
    /// ready together (in messages of at most [`PIPELINE_MESSAGE_BYTES`], or `limit` if
    /// smaller). An answer over `limit` — the smaller of the node's response limit and the
    /// client's ([`cache_proto::MAX_RESPONSE_HEADER`]) — becomes its operation's
    /// `OUT_OF_RANGE`. Ends when the client ends its side (or the node begins to shut down)
    /// and every operation has been answered, or when either side fails.
    async fn run_pipeline(
        self,
        mut incoming: tonic::Streaming<pb::PipelineRequest>,
        tx: tokio::sync::mpsc::Sender<Result<pb::PipelineResponse, Status>>,
        (name, role): (String, Role),
        limit: usize,
    ) {
        use futures_util::future::{AbortHandle, Abortable, FutureExt};
        use futures_util::stream::{FuturesUnordered, StreamExt};
        let mut running = FuturesUnordered::new();
        let mut aborts: std::collections::HashMap<u64, AbortHandle> = Default::default();
        let mut reading = true;
        let message_bytes = PIPELINE_MESSAGE_BYTES.min(limit);
        let cap = self.shared.request_timeout;
        let stopping = self.shared.stopping.clone();
        loop {
            tokio::select! {
                Some((id, outcome, timed)) = running.next(), if !running.is_empty() => {
                    // Every answer that is ready, in messages of at most `message_bytes`
                    // (one larger answer alone): many large values ready at once must not
                    // add up to a message over the response limit (the node's or the
                    // client's), which would end the stream for every caller. Each answer
                    // counts its framing in the message (at most 16 bytes).
                    let (first, mut bytes) = pipelined_result(id, outcome, limit);
                    let mut results = vec![first];
                    let mut clocks: Vec<(Instant, Option<Op>)> = vec![timed];
                    aborts.remove(&id);
                    while let Some(Some((id, outcome, timed))) = running.next().now_or_never() {
                        aborts.remove(&id);
                        let (answer, len) = pipelined_result(id, outcome, limit);
                        if bytes + len > message_bytes {
                            let full = std::mem::take(&mut results);
                            if !self.send_answers(&tx, full, clocks.drain(..)).await {
                                return;
                            }
                            bytes = 0;
                        }
                        bytes += len;
                        results.push(answer);
                        clocks.push(timed);
                    }
                    if !self.send_answers(&tx, results, clocks.drain(..)).await {
                        return;
                    }
                }
                // Shutdown: read nothing more, answer what is running, end the stream.
                () = stopping.cancelled(), if reading => reading = false,
                message = incoming.message(), if reading && running.len() < PIPELINE_IN_FLIGHT => {
                    let request = match message {
                        Ok(Some(r)) => r,
                        Ok(None) => {
                            reading = false;
                            continue;
                        }
                        // Undecodable or over the message limit: the stream cannot go on;
                        // the client learns why.
                        Err(status) => {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                    };
                    if request.ops.len() > PIPELINE_IN_FLIGHT {
                        let _ = tx
                            .send(Err(Status::out_of_range(format!(
                                "a pipeline message carries at most {PIPELINE_IN_FLIGHT} operations; this one has {}",
                                request.ops.len()
                            ))))
                            .await;
                        return;
                    }
                    for id in request.cancel {
                        if let Some(handle) = aborts.remove(&id) {
                            handle.abort();
                        }
                    }
                    let arrived = Instant::now();
                    for op in request.ops {
                        let id = op.id;
                        let kind = op.op.as_ref().map(|o| op_kind(o).0);
                        let timeout = match op.timeout_ms {
                            0 => cap,
                            ms => Duration::from_millis(u64::from(ms)).min(cap),
                        };
                        let deadline = tokio::time::Instant::now() + timeout;
                        let this = self.clone();
                        let name = name.clone();
                        let (handle, registration) = AbortHandle::new_pair();
                        aborts.insert(id, handle);
                        let work = async move {
                            let Some(op) = op.op else {
                                return error_result(&CoreError::Invalid(
                                    "a pipelined operation names no operation".into(),
                                ));
                            };
                            let need = op_kind(&op).1;
                            if role < need {
                                let e = crate::auth::AuthError::Forbidden { name, role, need };
                                if let Some(auth) = &this.shared.auth {
                                    auth.refused(&e);
                                }
                                return PResult::Error(pb::PipelineError {
                                    code: tonic::Code::PermissionDenied as i32,
                                    message: e.to_string(),
                                });
                            }
                            this.exec(op, deadline)
                                .await
                                .unwrap_or_else(|e| error_result(&e))
                        };
                        running.push(
                            Abortable::new(work, registration)
                                .map(move |r| (id, r.ok(), (arrived, kind))),
                        );
                    }
                }
                else => return,
            }
        }
    }
}

/// Most operations running at once on one pipelined stream (beyond it the node stops
/// reading the stream: TCP and HTTP/2 flow control push back on the client), and most
/// operations in one message.
pub const PIPELINE_IN_FLIGHT: usize = 1024;

/// Answers sent together on a pipelined stream add up to at most this many encoded bytes
/// (one larger answer goes alone, up to the response limit).
pub const PIPELINE_MESSAGE_BYTES: usize = 1 << 20;

/// What a [`pb::PipelinedResult`] adds to a message around its own encoding (its field tag
/// and length) plus the message's own framing, rounded up.
const ANSWER_FRAMING: usize = 16;

/// The response limit of one pipelined stream: the node's, or the client's
/// ([`cache_proto::MAX_RESPONSE_HEADER`]) if that is smaller. A header that is not a decimal
/// number of at least [`cache_proto::MIN_CLIENT_RESPONSE_BYTES`] is refused with
/// `INVALID_ARGUMENT`.
fn client_response_limit(
    metadata: &tonic::metadata::MetadataMap,
    node_limit: usize,
) -> Result<usize, Status> {
    use cache_proto::{MAX_RESPONSE_HEADER, MIN_CLIENT_RESPONSE_BYTES};
    let Some(value) = metadata.get(MAX_RESPONSE_HEADER) else {
        return Ok(node_limit);
    };
    let bad = || {
        Status::invalid_argument(format!(
            "{MAX_RESPONSE_HEADER} must be a number of bytes of at least {MIN_CLIENT_RESPONSE_BYTES}"
        ))
    };
    let text = value.to_str().map_err(|_| bad())?;
    // At most 20 digits: a u64; a larger number means "no limit of my own".
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let asked = text
        .parse::<u64>()
        .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
    if asked < MIN_CLIENT_RESPONSE_BYTES {
        return Err(bad());
    }
    Ok(asked.min(node_limit))
}

/// A failed operation's result: the status a unary call would have answered.
fn error_result(e: &CoreError) -> PResult {
    let status = wire::status(e);
    PResult::Error(pb::PipelineError {
        code: status.code() as i32,
        message: status.message().to_string(),
    })
}

/// The result of one pipelined operation on the wire (`None`: it was cancelled), with its
/// encoded length plus [`ANSWER_FRAMING`]; an answer over the response `limit` becomes that
/// operation's `OUT_OF_RANGE`.
fn pipelined_result(
    id: u64,
    outcome: Option<PResult>,
    limit: usize,
) -> (pb::PipelinedResult, usize) {
    let result = match outcome {
        Some(r) => r,
        None => PResult::Error(pb::PipelineError {
            code: tonic::Code::Cancelled as i32,
            message: "cancelled by the client".into(),
        }),
    };
    let answer = pb::PipelinedResult {
        id,
        result: Some(result),
    };
    // As a unary call would be refused by the encoder's limit: this one operation fails,
    // not the stream.
    let len = prost::Message::encoded_len(&answer) + ANSWER_FRAMING;
    if len > limit {
        let refusal = pb::PipelinedResult {
            id,
            result: Some(PResult::Error(pb::PipelineError {
                code: tonic::Code::OutOfRange as i32,
                message: format!(
                    "the answer is {len} bytes, over the response limit of {limit} bytes (the node's, or the client's if smaller): split the batch or raise the limit"
                ),
            })),
        };
        let len = prost::Message::encoded_len(&refusal) + ANSWER_FRAMING;
        return (refusal, len);
    }
    (answer, len)
}

/// The metric and the role of an operation.
fn op_kind(op: &POp) -> (Op, Role) {
    match op {
        POp::Get(_) => (Op::Get, Role::Read),
        POp::MultiGet(_) => (Op::MultiGet, Role::Read),
        POp::Set(_) => (Op::Set, Role::Write),
        POp::Delete(_) => (Op::Delete, Role::Write),
        POp::Touch(_) => (Op::Touch, Role::Write),
        POp::Incr(_) => (Op::Incr, Role::Write),
        POp::MultiSet(_) => (Op::MultiSet, Role::Write),
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
        self.unary(request, POp::Get, |r| match r {
            PResult::Get(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn set(
        &self,
        request: tonic::Request<pb::SetRequest>,
    ) -> Result<tonic::Response<pb::SetResponse>, Status> {
        self.unary(request, POp::Set, |r| match r {
            PResult::Set(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn delete(
        &self,
        request: tonic::Request<pb::DeleteRequest>,
    ) -> Result<tonic::Response<pb::DeleteResponse>, Status> {
        self.unary(request, POp::Delete, |r| match r {
            PResult::Delete(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn touch(
        &self,
        request: tonic::Request<pb::TouchRequest>,
    ) -> Result<tonic::Response<pb::TouchResponse>, Status> {
        self.unary(request, POp::Touch, |r| match r {
            PResult::Touch(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn incr(
        &self,
        request: tonic::Request<pb::IncrRequest>,
    ) -> Result<tonic::Response<pb::IncrResponse>, Status> {
        self.unary(request, POp::Incr, |r| match r {
            PResult::Incr(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn multi_get(
        &self,
        request: tonic::Request<pb::MultiGetRequest>,
    ) -> Result<tonic::Response<pb::MultiGetResponse>, Status> {
        self.unary(request, POp::MultiGet, |r| match r {
            PResult::MultiGet(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn multi_set(
        &self,
        request: tonic::Request<pb::MultiSetRequest>,
    ) -> Result<tonic::Response<pb::MultiSetResponse>, Status> {
        self.unary(request, POp::MultiSet, |r| match r {
            PResult::MultiSet(r) => Some(r),
            _ => None,
        })
        .await
    }

    type PipelineStream = std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<pb::PipelineResponse, Status>> + Send>,
    >;

    async fn pipeline(
        &self,
        request: tonic::Request<tonic::Streaming<pb::PipelineRequest>>,
    ) -> Result<tonic::Response<Self::PipelineStream>, Status> {
        let role = self.stream_role(&request)?;
        let node_limit = self.core().store().limits().max_response_bytes();
        let limit = client_response_limit(request.metadata(), node_limit)?;
        let incoming = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move { this.run_pipeline(incoming, tx, role, limit).await });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
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

    async fn flush(
        &self,
        request: tonic::Request<pb::FlushRequest>,
    ) -> Result<tonic::Response<pb::FlushResponse>, Status> {
        self.authorize(&request, Role::Admin)?;
        let (deleted, took) = self.shared.flush().await.map_err(|e| wire::status(&e))?;
        Ok(tonic::Response::new(pb::FlushResponse {
            deleted,
            took_ms: u32::try_from(took.as_millis()).unwrap_or(u32::MAX),
        }))
    }

    async fn scan(
        &self,
        request: tonic::Request<pb::ScanRequest>,
    ) -> Result<tonic::Response<pb::ScanResponse>, Status> {
        self.authorize(&request, Role::Read)?;
        let req = request.into_inner();
        let limits = *self.core().store().limits();
        if req.pattern.len() > limits.max_key_bytes {
            return Err(Status::out_of_range(format!(
                "a pattern of {} bytes is over the key limit of {} bytes",
                req.pattern.len(),
                limits.max_key_bytes
            )));
        }
        let count = match req.count {
            0 => 10,
            n => usize::try_from(n).unwrap_or(usize::MAX).min(MAX_SCAN_COUNT),
        };
        let (keys, cursor) = self.shared.scan(req.cursor, &req.pattern, count);
        Ok(tonic::Response::new(pb::ScanResponse { keys, cursor }))
    }

    async fn slow_log(
        &self,
        request: tonic::Request<pb::SlowLogRequest>,
    ) -> Result<tonic::Response<pb::SlowLogResponse>, Status> {
        let need = if request.get_ref().reset {
            Role::Admin
        } else {
            Role::Read
        };
        self.authorize(&request, need)?;
        let req = request.into_inner();
        let count = match req.count {
            0 => 10,
            n => usize::try_from(n).unwrap_or(usize::MAX).min(MAX_SCAN_COUNT),
        };
        let log = &self.shared.slowlog;
        let len = u32::try_from(log.len()).unwrap_or(u32::MAX);
        let entries = log
            .get(count)
            .into_iter()
            .map(|e| pb::SlowLogEntry {
                id: e.id,
                at_unix_ms: e.at_unix_ms,
                duration_us: u64::try_from(e.duration.as_micros()).unwrap_or(u64::MAX),
                op: e.op.to_string(),
                result: e.result.to_string(),
                key: e.key,
                key_len: e.key_len as u64,
                keys: u32::try_from(e.keys).unwrap_or(u32::MAX),
                via: e.via.to_string(),
            })
            .collect();
        if req.reset {
            log.reset();
        }
        Ok(tonic::Response::new(pb::SlowLogResponse {
            entries,
            len,
            threshold_us: log
                .config()
                .threshold
                .map(|t| u64::try_from(t.as_micros()).unwrap_or(u64::MAX)),
            node_id: self.core().local_id().to_string(),
        }))
    }

    async fn inspect(
        &self,
        request: tonic::Request<pb::InspectRequest>,
    ) -> Result<tonic::Response<pb::InspectResponse>, Status> {
        self.authorize(&request, Role::Read)?;
        let key = request.into_inner().key;
        let store = self.core().store();
        store
            .limits()
            .check_key(&key)
            .map_err(|e| wire::status(&e))?;
        let now = store.now_ms();
        let mut out = pb::InspectResponse {
            node_id: self.core().local_id().to_string(),
            ..Default::default()
        };
        match store.engine().peek_versioned(&key) {
            Some(cache_core::VersionedRead::Live(l)) => {
                out.found = true;
                out.version = l.version;
                out.ttl_ms = l.expires_at.map(|at| at.saturating_sub(now));
                out.value_bytes = l.value.len() as u64;
            }
            Some(cache_core::VersionedRead::Dead { version }) => {
                out.tombstone = true;
                out.version = version;
            }
            None => {}
        }
        Ok(tonic::Response::new(out))
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
        let limits = *self.core().store().limits();
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
            max_batch: u32::try_from(limits.max_batch).unwrap_or(u32::MAX),
            max_key_bytes: limits.max_key_bytes as u64,
            max_value_bytes: limits.max_value_bytes as u64,
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
            not_after_ms: None,
            version: None,
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
        let mut call = self.call(&metadata, req.from, req.ring_fingerprint)?;
        // Any value is safe: a far-future one only leaves the write unchecked, as an old
        // sender's (0) does.
        call.not_after_ms = (req.not_after_ms != 0).then_some(req.not_after_ms);
        // A version is checked against the allowed clock drift before it is applied.
        call.version = (req.version != 0).then_some(req.version);
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
