//! The admin HTTP server: `/metrics` (Prometheus text), `/healthz` (the process is up),
//! `/readyz` (the node accepts requests and has its data: 503 while shutting down, before
//! it has joined its cluster, and while syncing unless `--ready-while-syncing`), `/status` (a small
//! human page: uptime, items, bytes, hit ratio, request rate, persistence) and
//! `POST /snapshot` (take a snapshot now; `--data-dir` only), `POST /forget?member=ID` (stop
//! counting a dead member among the home replicas). Plain HTML, no JavaScript.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Mutex;

use crate::service::Shared;

struct AdminState {
    shared: Arc<Shared>,
    prometheus: PrometheusHandle,
    /// (when, total requests) samples taken on each `/status` view, to show a recent rate.
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

/// Serves `router` on `listener` until `stop` is cancelled, then lets in-flight requests
/// finish. HTTP/1.1 only (what probes, Prometheus and browsers use), with limits of its own:
/// at most [`crate::node::ADMIN_CONNECTIONS`] connections (a new one makes room by closing
/// the oldest that has not sent a complete request: see [`Slots`]), request headers within
/// [`crate::node::ADMIN_HEADER_TIMEOUT`] (a slowloris client is cut off), a connection idle
/// for 30 s closed, and request bodies of at most 64 KiB.
/// One open admin connection, as [`serve`] tracks them to make room (see [`Slots`]).
struct Slot {
    id: u64,
    /// Whether a complete request came on it (headers read): a real client.
    served: Arc<std::sync::atomic::AtomicBool>,
    /// Ends the connection.
    evict: tokio_util::sync::CancellationToken,
}

/// The admin connections open now. At [`crate::node::ADMIN_CONNECTIONS`], a new connection
/// closes the oldest one that has not sent a complete request yet: connections that hold
/// a slot with unfinished headers (a slowloris, reopened as fast as they are cut off) can
/// then never keep a health probe out, which sends its request at once and is served. Up
/// to twice that many connections are accepted at all (the listener's hard cap).
#[derive(Default)]
struct Slots {
    open: Mutex<VecDeque<Slot>>,
    next: std::sync::atomic::AtomicU64,
}

impl Slots {
    /// Registers a new connection, evicting the oldest unserved one if the slots are full.
    fn admit(
        &self,
    ) -> (
        u64,
        Arc<std::sync::atomic::AtomicBool>,
        tokio_util::sync::CancellationToken,
    ) {
        use std::sync::atomic::Ordering;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let served = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let evict = tokio_util::sync::CancellationToken::new();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() >= crate::node::ADMIN_CONNECTIONS
            && let Some(i) = open.iter().position(|s| !s.served.load(Ordering::Relaxed))
            && let Some(victim) = open.remove(i)
        {
            victim.evict.cancel();
        }
        open.push_back(Slot {
            id,
            served: Arc::clone(&served),
            evict: evict.clone(),
        });
        (id, served, evict)
    }

    /// The connection `id` ended.
    fn release(&self, id: u64) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = open.iter().position(|s| s.id == id) {
            open.remove(i);
        }
    }
}

/// One admin HTTP/1 connection, in the clear or under TLS, until it ends, shutdown, or
/// `evict` (see [`Slots`]); `served` is set at its first complete request.
async fn serve_connection(
    io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    router: Router,
    stop: tokio_util::sync::CancellationToken,
    served: Arc<std::sync::atomic::AtomicBool>,
    evict: tokio_util::sync::CancellationToken,
) {
    use tower::ServiceExt;
    let service = hyper::service::service_fn(move |request| {
        served.store(true, std::sync::atomic::Ordering::Relaxed);
        router.clone().oneshot(request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(crate::node::ADMIN_HEADER_TIMEOUT);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    futures_util::pin_mut!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = evict.cancelled() => {}
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    stats: Arc<crate::conn::ConnStats>,
    stop: tokio_util::sync::CancellationToken,
    tls: Option<Arc<crate::tls::ServerTls>>,
) {
    let limits = crate::conn::ConnLimits {
        max_connections: 2 * crate::node::ADMIN_CONNECTIONS,
        handshake_timeout: None,
        idle_timeout: Some(std::time::Duration::from_secs(30)),
    };
    let router = router.layer(axum::extract::DefaultBodyLimit::max(64 << 10));
    let incoming = crate::conn::guarded(listener, limits, stats, "admin");
    futures_util::pin_mut!(incoming);
    let slots = Arc::new(Slots::default());
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let io = tokio::select! {
            () = stop.cancelled() => break,
            next = futures_util::StreamExt::next(&mut incoming) => match next {
                Some(Ok(io)) => io,
                _ => break,
            },
        };
        let router = router.clone();
        let stop = stop.clone();
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        let (id, served, evict) = slots.admit();
        let slots = Arc::clone(&slots);
        connections.spawn(async move {
            match acceptor {
                None => serve_connection(io, router, stop, served, evict).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(
                        crate::node::ADMIN_HEADER_TIMEOUT,
                        acceptor.accept(io),
                    );
                    let handshake = tokio::select! {
                        h = handshake => h,
                        () = evict.cancelled() => return slots.release(id),
                    };
                    if let Ok(Ok(stream)) = handshake {
                        serve_connection(stream, router, stop, served, evict).await;
                    }
                }
            }
            slots.release(id);
        });
    }
    connections.close();
    connections.wait().await;
}

/// The admin routes.
pub(crate) fn router(shared: Arc<Shared>, prometheus: PrometheusHandle) -> Router {
    let state = Arc::new(AdminState {
        shared,
        prometheus,
        samples: Mutex::new(VecDeque::new()),
    });
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/snapshot", post(snapshot))
        .route("/forget", post(forget))
        .route("/", get(status))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let shared = &state.shared;
    let store = shared.core.store();
    shared.metrics.publish(
        &store.stats(),
        store.engine().footprint(),
        store.engine().config().max_bytes,
        shared.started.elapsed(),
    );
    shared
        .metrics
        .publish_core(&shared.core.stats(), &shared.core.queue_stats());
    shared.metrics.publish_sync(&shared.core.sync_status());
    shared
        .metrics
        .publish_membership(&shared.core.ring().load().view, &shared.core.peer_health());
    if let Some(gossip) = shared.membership.0.gossip_stats() {
        shared.metrics.publish_gossip(&gossip);
    }
    if let Some(up) = shared.membership.0.coordinator_up() {
        shared.metrics.publish_coordinator(up);
    }
    if let Some(p) = &shared.persistence {
        shared.metrics.persist().publish(p);
    }
    shared.metrics.publish_connections(&shared.connections);
    if let Some(auth) = &shared.auth {
        shared.metrics.publish_auth(auth);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.prometheus.render(),
    )
        .into_response()
}

/// With `--auth-file`, refuses a request whose bearer token lacks the admin role.
fn require_admin(
    state: &AdminState,
    headers: &axum::http::HeaderMap,
) -> Result<(), (StatusCode, String)> {
    if let Some(auth) = &state.shared.auth
        && let Err(e) = auth.check(
            headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()),
            crate::auth::Role::Admin,
        )
    {
        let code = if matches!(e, crate::auth::AuthError::Forbidden { .. }) {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNAUTHORIZED
        };
        return Err((code, format!("{e}\n")));
    }
    Ok(())
}

/// `POST /forget?member=ID`: this node stops counting dead member `ID` among its keys'
/// home replicas (an operator's word that it is gone for good; run it on every member).
/// Until then `QUORUM` and `ALL` of the keys it held count it, so they may fail while it
/// is away — by design: a member that merely looks dead must not let a minority make
/// quorums. 409 while `ID` is alive or suspect here, 404 if it is not counted, 400 for a
/// missing or malformed id.
async fn forget(
    State(state): State<Arc<AdminState>>,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    if let Err(refused) = require_admin(&state, &headers) {
        return refused.into_response();
    }
    let member = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("member="))
        .unwrap_or("");
    if cluster_ring::NodeId::new(member.to_string()).is_err() {
        return (
            StatusCode::BAD_REQUEST,
            "name the member: POST /forget?member=ID (a valid member id)\n",
        )
            .into_response();
    }
    let ring = state.shared.core.ring();
    let alive = ring.load().view.owners().any(|m| m.id == member);
    match ring.forget(member) {
        Ok(true) => {
            tracing::warn!(
                member,
                "member forgotten by an admin request: its keys' quorums no longer count it"
            );
            (StatusCode::OK, format!("forgot {member}\n")).into_response()
        }
        Ok(false) if alive => (
            StatusCode::CONFLICT,
            format!("{member} is alive or suspect here: only a dead member can be forgotten\n"),
        )
            .into_response(),
        Ok(false) => (
            StatusCode::NOT_FOUND,
            format!("{member} is not counted among any key's replicas here\n"),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// `POST /snapshot`: takes a snapshot now and answers when it is durable, with what it
/// wrote as JSON. 409 without `--data-dir`, 500 if it failed (the previous snapshot and the
/// log still hold everything).
async fn snapshot(
    State(state): State<Arc<AdminState>>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(refused) = require_admin(&state, &headers) {
        return refused.into_response();
    }
    match crate::service::take_snapshot(&state.shared).await {
        Ok(r) => (
            [(header::CONTENT_TYPE, "application/json")],
            format!(
                "{{\"path\":\"{}\",\"entries\":{},\"bytes\":{},\"took_ms\":{}}}\n",
                escape_json(&r.path.display().to_string()),
                r.entries,
                r.bytes,
                r.took.as_millis()
            ),
        )
            .into_response(),
        Err(e) => {
            let code = if state.shared.persistence.is_none() {
                StatusCode::CONFLICT
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            (code, format!("{e}\n")).into_response()
        }
    }
}

fn escape_json(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    if state.shared.core.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if !state.shared.core.is_joined() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not joined: no --join seed (or coordinator) has answered yet\n",
        )
            .into_response()
    } else if !state.shared.ready_while_syncing && state.shared.core.is_syncing() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "syncing: catching up with the other replicas (reads go through them meanwhile; --ready-while-syncing answers 200 now)\n",
        )
            .into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

async fn status(State(state): State<Arc<AdminState>>) -> Html<String> {
    let shared = &state.shared;
    let stats = shared.core.store().stats();
    let total = shared.requests.load(Ordering::Relaxed);
    let now = Instant::now();
    let rate = {
        let mut samples = state.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.push_back((now, total));
        while samples.len() > 2 && now.duration_since(samples[0].0).as_secs() > 60 {
            samples.pop_front();
        }
        let (t0, n0) = samples[0];
        let secs = now.duration_since(t0).as_secs_f64();
        if secs > 0.0 {
            (total - n0) as f64 / secs
        } else {
            total as f64 / shared.started.elapsed().as_secs_f64().max(1e-3)
        }
    };
    let lookups = stats.hits + stats.misses;
    let hit_ratio = if lookups == 0 {
        "n/a".to_string()
    } else {
        format!("{:.1} %", 100.0 * stats.hits as f64 / lookups as f64)
    };
    let max = shared.core.store().engine().config().max_bytes;
    let up = shared.started.elapsed().as_secs();
    let cluster = &shared.core;
    let state = cluster.ring().load();
    let shares: std::collections::HashMap<String, f64> = state
        .ring
        .shares()
        .into_iter()
        .map(|(id, s)| (id.to_string(), s))
        .collect();
    let members: String = state
        .view
        .members
        .iter()
        .map(|m| {
            let me = if *cluster.local_id() == m.id {
                " (this node)"
            } else {
                ""
            };
            format!(
                "<tr><td>{}{me}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1} %</td></tr>",
                escape(&m.id),
                m.rpc_addr,
                m.peer_addr,
                m.state,
                m.incarnation,
                shares.get(&m.id).copied().unwrap_or(0.0) * 100.0
            )
        })
        .collect();
    let view = cluster.ring().load();
    let peers: String = cluster
        .peer_health()
        .iter()
        .map(|(id, h)| {
            // What membership says comes first: a dead member's channel is not "ok" just
            // because nothing has called it since.
            let state = view.view.member(id.as_str()).map(|m| m.state);
            let last = match (state, h.last_error.as_deref()) {
                (Some(cluster_membership::MemberState::Alive), None) => "ok".to_string(),
                (Some(cluster_membership::MemberState::Alive), Some(e)) => e.to_string(),
                (Some(s), _) => format!("{s:?} in membership").to_lowercase(),
                (None, _) => "not a member".to_string(),
            };
            format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(id.as_str()),
                h.ok,
                h.failed,
                escape(&last)
            )
        })
        .collect();
    let queues: String = cluster
        .queue_stats()
        .iter()
        .map(|q| {
            format!(
                "<tr><td>{}</td><td>{} of {}</td><td>{}</td><td>{}</td><td>{} pending ({} delivered)</td></tr>",
                escape(q.peer.as_str()),
                q.depth,
                q.capacity,
                q.sent,
                q.dropped,
                q.hints_pending,
                q.hints_delivered
            )
        })
        .collect();
    let sync = cluster.sync_status();
    let sync = format!(
        "<p>anti-entropy: <b>{}</b> ({} of {} peers synced for this ring); {} rounds, {} failed \
         exchanges, {} keys pulled, {} pushed, {} bytes moved; last round took {} ms</p>",
        if sync.syncing {
            "SYNCING — reads also ask another replica, the newer copy wins"
        } else {
            "synced"
        },
        sync.peers_synced,
        sync.peers_total,
        sync.rounds,
        sync.failures,
        sync.keys_pulled,
        sync.keys_pushed,
        sync.bytes_moved,
        sync.last_round_ms,
    );
    let coordinator = match shared.membership.0.coordinator_up() {
        Some(false) => {
            "<p><b>COORDINATOR UNREACHABLE</b>: this node keeps its last member list until the coordinator is back (coordinator membership has a single point of failure; gossip does not).</p>"
        }
        _ => "",
    };
    let mismatches: String = cluster
        .mismatches()
        .iter()
        .map(|(id, fp)| {
            format!(
                "<p><b>RING MISMATCH</b>: {} builds ring {fp:016x}, this node {:016x}. Start every node with the same --peers.</p>",
                escape(id.as_str()),
                state.ring.fingerprint()
            )
        })
        .collect();
    let persistence = match &shared.persistence {
        None => "<p>persistence: off (no <code>--data-dir</code>)</p>".to_string(),
        Some(p) => {
            let log = p.log_stats();
            let s = p.snapshot_stats();
            let last = s.last_unix_secs.load(Ordering::Relaxed);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            format!(
                "<p>persistence: <code>{}</code>, appendfsync {}, log {} bytes{}; last snapshot: {}; \
                 recovered {} records at start in {} ms</p>",
                escape(&p.config().dir.display().to_string()),
                p.config().fsync,
                log.segment_bytes.load(Ordering::Relaxed),
                if log.failed.load(Ordering::Relaxed) {
                    " — <b>WRITES REFUSED: the append-only file cannot be written</b>"
                } else {
                    ""
                },
                if last == 0 {
                    "none since start".to_string()
                } else {
                    format!(
                        "{} s ago, {} entries, {} bytes, {} ms",
                        now.saturating_sub(last),
                        s.last_entries.load(Ordering::Relaxed),
                        s.last_bytes.load(Ordering::Relaxed),
                        s.last_duration_ms.load(Ordering::Relaxed)
                    )
                },
                p.recovery().records,
                p.recovery().took.as_millis()
            )
        }
    };
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>cache-node {node}</title>\
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em 1em;text-align:left}}</style></head><body>\
<h1>cache-node <code>{node}</code></h1>\
<table>\
<tr><th>version</th><td>{version}</td></tr>\
<tr><th>state</th><td>{state}</td></tr>\
<tr><th>uptime</th><td>{h}h {m}m {s}s</td></tr>\
<tr><th>items</th><td>{items}</td></tr>\
<tr><th>memory</th><td>{bytes} of {max} bytes charged by the engine ({pct:.1} %); engine footprint {footprint} bytes (slack included); process resident {rss}; eviction policy {policy}</td></tr>\
<tr><th>hit ratio</th><td>{hit_ratio} ({hits} hits, {misses} misses)</td></tr>\
<tr><th>request rate</th><td>{rate:.1} requests/s (since the previous view of this page, up to 60 s)</td></tr>\
<tr><th>requests</th><td>{total}</td></tr>\
<tr><th>evictions</th><td>{evictions}</td></tr>\
<tr><th>expirations</th><td>{expired}</td></tr>\
</table>\
{persistence}<h2>Cluster</h2>{coordinator}{mismatches}{sync}<p>ring epoch {epoch}, fingerprint {fingerprint:016x}, replication factor {rf}; \
replication drops are counted in <code>cache_replication_dropped_total</code></p>\
<table><tr><th>member</th><th>address</th><th>peer address</th><th>state</th><th>incarnation</th><th>key space (primary)</th></tr>{members}</table>\
<h3>Peer channels</h3><table><tr><th>peer</th><th>calls ok</th><th>failed</th><th>last</th></tr>{peers}</table>\
<h3>Replication queues</h3><table><tr><th>peer</th><th>depth</th><th>sent</th><th>dropped</th><th>hints</th></tr>{queues}</table>\
<p><a href=\"/metrics\">/metrics</a> · <a href=\"/healthz\">/healthz</a> · <a href=\"/readyz\">/readyz</a></p>\
</body></html>\n",
        node = escape(cluster.local_id().as_str()),
        epoch = state.epoch,
        fingerprint = state.ring.fingerprint(),
        rf = state.replication_factor,
        version = env!("CARGO_PKG_VERSION"),
        state = if shared.core.is_shutting_down() {
            "shutting down"
        } else {
            "serving"
        },
        h = up / 3600,
        m = up / 60 % 60,
        s = up % 60,
        items = stats.items,
        bytes = stats.bytes,
        pct = 100.0 * stats.bytes as f64 / max as f64,
        footprint = shared.core.store().engine().footprint(),
        rss = crate::metrics::resident_memory_bytes()
            .map_or_else(|| "unknown".to_string(), |b| format!("{b} bytes")),
        policy = shared.core.store().engine().config().eviction_policy,
        hits = stats.hits,
        misses = stats.misses,
        evictions = stats.evictions,
        expired = stats.expirations,
    ))
}
