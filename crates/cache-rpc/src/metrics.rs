//! The node's metrics, registered once on the node's own Prometheus recorder.
//!
//! Handles are created up front so the request path only increments atomics: no registry
//! lookup, no label hashing per request. Engine counters (`cache_hits_total`, ...) are not
//! counted on the hot path at all: they are copied from `Cache::stats()` when `/metrics` is
//! scraped. Nothing here is global, so several nodes can live in one process (tests).

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Latency buckets of `cache_request_duration_seconds`: 25 µs to 1 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 1.0,
];

/// The RPCs, as they appear in the `op` label.
pub const OPS: [&str; 10] = [
    "get",
    "set",
    "delete",
    "touch",
    "multi_get",
    "multi_set",
    "stats",
    "cluster_info",
    "incr",
    "update",
];

/// The outcomes that appear in the `result` label.
pub const RESULTS: [&str; 14] = [
    "ok",
    "hit",
    "miss",
    "not_stored",
    "invalid_argument",
    "out_of_range",
    "resource_exhausted",
    "unavailable",
    "wrong_owner",
    "version_refused",
    "deadline_exceeded",
    "shutting_down",
    "storage",
    "internal",
];

/// Buckets of `cache_aof_fsync_seconds`: 50 µs to 2.5 s.
const FSYNC_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    2.5,
];

/// Creates the node's recorder with histogram buckets configured.
pub fn recorder() -> PrometheusRecorder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("cache_request_duration_seconds".into()),
            LATENCY_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("cache_aof_fsync_seconds".into()),
                FSYNC_BUCKETS,
            )
        })
        .expect("the bucket lists are non-empty constants")
        .build_recorder()
}

static META: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

fn counter(r: &dyn Recorder, name: &'static str, labels: Vec<Label>) -> Counter {
    r.register_counter(&Key::from_parts(name, labels), &META)
}

fn gauge(r: &dyn Recorder, name: &'static str) -> Gauge {
    r.register_gauge(&Key::from_name(name), &META)
}

/// The anti-entropy series.
struct SyncSeries {
    syncing: Gauge,
    peers_synced: Gauge,
    peers_total: Gauge,
    rounds: Counter,
    failures: Counter,
    pulled: Counter,
    pushed: Counter,
    bytes: Counter,
    last_round: Gauge,
}

/// The persistence series (registered only with `--data-dir`).
pub struct PersistSeries {
    /// `cache_aof_fsync_seconds`: every fsync of the append-only file.
    pub fsync: Histogram,
    log_bytes: Gauge,
    written: Counter,
    errors: Counter,
    writable: Gauge,
    snapshots_ok: Counter,
    snapshots_failed: Counter,
    snapshot_last: Gauge,
    snapshot_duration: Gauge,
    snapshot_bytes: Gauge,
    snapshot_entries: Gauge,
    recovery_seconds: Gauge,
    recovery_records: Gauge,
}

impl PersistSeries {
    /// Registers the series on `recorder`.
    fn register(r: &dyn Recorder) -> Self {
        let g = |name| gauge(r, name);
        let c = |name| counter(r, name, Vec::new());
        let snapshots = |result| {
            counter(
                r,
                "cache_snapshots_total",
                vec![Label::new("result", result)],
            )
        };
        Self {
            fsync: r.register_histogram(&Key::from_name("cache_aof_fsync_seconds"), &META),
            log_bytes: g("cache_aof_bytes"),
            written: c("cache_aof_written_bytes_total"),
            errors: c("cache_aof_errors_total"),
            writable: g("cache_aof_writable"),
            snapshots_ok: snapshots("ok"),
            snapshots_failed: snapshots("failed"),
            snapshot_last: g("cache_snapshot_last_unix_seconds"),
            snapshot_duration: g("cache_snapshot_duration_seconds"),
            snapshot_bytes: g("cache_snapshot_bytes"),
            snapshot_entries: g("cache_snapshot_entries"),
            recovery_seconds: g("cache_recovery_seconds"),
            recovery_records: g("cache_recovery_records"),
        }
    }

    /// Copies the log's and snapshots' counters (on each scrape).
    pub fn publish(&self, p: &cache_persist::Persistence) {
        use std::sync::atomic::Ordering::Relaxed;
        let log = p.log_stats();
        self.log_bytes.set(log.segment_bytes.load(Relaxed) as f64);
        self.written.absolute(log.bytes_written.load(Relaxed));
        self.errors.absolute(log.errors.load(Relaxed));
        self.writable
            .set(if log.failed.load(Relaxed) { 0.0 } else { 1.0 });
        let s = p.snapshot_stats();
        self.snapshots_ok.absolute(s.completed.load(Relaxed));
        self.snapshots_failed.absolute(s.failed.load(Relaxed));
        self.snapshot_last
            .set(s.last_unix_secs.load(Relaxed) as f64);
        self.snapshot_duration
            .set(s.last_duration_ms.load(Relaxed) as f64 / 1000.0);
        self.snapshot_bytes.set(s.last_bytes.load(Relaxed) as f64);
        self.snapshot_entries
            .set(s.last_entries.load(Relaxed) as f64);
        let r = p.recovery();
        self.recovery_seconds.set(r.took.as_secs_f64());
        self.recovery_records.set(r.records as f64);
    }
}

/// The connection series of one listener.
struct ConnSeries {
    open: Gauge,
    refused: Counter,
    handshake: Counter,
    idle: Counter,
    accept_errors: Counter,
}

impl ConnSeries {
    fn register(r: &dyn Recorder, listener: &'static str) -> Self {
        let l = || vec![Label::new("listener", listener)];
        let closed = |reason: &'static str| {
            counter(
                r,
                "cache_connections_closed_total",
                vec![
                    Label::new("listener", listener),
                    Label::new("reason", reason),
                ],
            )
        };
        Self {
            open: r.register_gauge(&Key::from_parts("cache_connections", l()), &META),
            refused: counter(r, "cache_connections_refused_total", l()),
            handshake: closed("handshake_timeout"),
            idle: closed("idle_timeout"),
            accept_errors: counter(r, "cache_accept_errors_total", l()),
        }
    }
}

/// Every metric the node exports, as ready handles.
pub struct NodeMetrics {
    /// Kept to register per-peer series when a peer is first used.
    recorder: PrometheusRecorder,
    /// Connection series of the client, peer, admin and RESP listeners.
    connections: [ConnSeries; 4],
    /// `cache_auth_failures_total{reason}`: missing, unknown, forbidden.
    auth_failures: [Counter; 3],
    /// Persistence series, once registered (`--data-dir`).
    persist: std::sync::OnceLock<Arc<PersistSeries>>,
    /// `cache_requests_total{op,result}`, indexed `[op][result]`.
    requests: Vec<Vec<Counter>>,
    /// `cache_request_duration_seconds{op}`, indexed by op.
    durations: Vec<Histogram>,
    hits: Counter,
    misses: Counter,
    inserts: Counter,
    updates: Counter,
    deletes: Counter,
    evictions: Counter,
    expired: Counter,
    stale: Counter,
    items: Gauge,
    bytes: Gauge,
    max_bytes: Gauge,
    uptime: Gauge,
    resident: Gauge,
    footprint: Gauge,
    forwarded: Counter,
    read_repairs: Counter,
    mismatches: Counter,
    versions_refused: Counter,
    stale_retries: Counter,
    sync: SyncSeries,
    /// Per-peer replication series, registered when a peer's queue first appears.
    replication: parking_lot::Mutex<std::collections::BTreeMap<String, ReplicationSeries>>,
    /// `cache_members{state}`, indexed alive, suspect, dead, left.
    members: Vec<Gauge>,
    /// `cache_peer_up{peer}`, registered when a peer is first called.
    peer_up: parking_lot::Mutex<std::collections::BTreeMap<String, Gauge>>,
    /// Gossip counters (gossip membership only): messages and bytes in/out, refused
    /// messages, probes, suspicions, refutations, deaths, suspicion-to-dead milliseconds.
    gossip: [Counter; 10],
    /// `cache_coordinator_up`: 1 while the coordinator is reachable (coordinator mode).
    coordinator_up: Gauge,
}

/// Per-peer replication metric handles.
#[derive(Clone)]
struct ReplicationSeries {
    /// `cache_replication_dropped_total{peer}`
    dropped: Counter,
    /// `cache_replication_sent_total{peer}`
    sent: Counter,
    /// `cache_replication_queue_depth{peer}`
    depth: Gauge,
    /// `cache_replication_lag_seconds{peer}`: age of the oldest entry of the last batch sent.
    lag: Gauge,
    /// `cache_hints_stored_total{peer}`, `..._delivered_total`, `..._dropped_total`, and
    /// the `cache_hints_pending{peer}` gauge: hinted handoff.
    hints_stored: Counter,
    hints_delivered: Counter,
    hints_dropped: Counter,
    hints_pending: Gauge,
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMetrics").finish_non_exhaustive()
    }
}

/// Index of an RPC in [`OPS`].
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// `Get`
    Get = 0,
    /// `Set`
    Set = 1,
    /// `Delete`
    Delete = 2,
    /// `Touch`
    Touch = 3,
    /// `MultiGet`
    MultiGet = 4,
    /// `MultiSet`
    MultiSet = 5,
    /// `Stats`
    Stats = 6,
    /// `ClusterInfo`
    ClusterInfo = 7,
    /// `Incr` (and RESP `INCR`, `INCRBY`, `DECR`, `DECRBY`)
    Incr = 8,
    /// RESP's other read-modify-writes: `SET .. GET`/`KEEPTTL`, `GETDEL`, `GETEX`, `PERSIST`
    Update = 9,
}

impl NodeMetrics {
    /// Registers every series on `recorder`, so all of them show up (at zero) from the start.
    pub fn register(recorder: PrometheusRecorder) -> Self {
        let r: &dyn Recorder = &recorder;
        let recorder_ref = r;
        let requests = OPS
            .iter()
            .map(|op| {
                RESULTS
                    .iter()
                    .map(|res| {
                        counter(
                            recorder_ref,
                            "cache_requests_total",
                            vec![Label::new("op", *op), Label::new("result", *res)],
                        )
                    })
                    .collect()
            })
            .collect();
        let durations = OPS
            .iter()
            .map(|op| {
                recorder_ref.register_histogram(
                    &Key::from_parts(
                        "cache_request_duration_seconds",
                        vec![Label::new("op", *op)],
                    ),
                    &META,
                )
            })
            .collect();
        let c = |name| counter(recorder_ref, name, Vec::new());
        let forwarded = c("cache_forwarded_requests_total");
        let read_repairs = c("cache_read_repairs_total");
        let mismatches = c("cache_ring_fingerprint_mismatch_total");
        let g = |name| gauge(recorder_ref, name);
        let (items, bytes, max_bytes, uptime, resident) = (
            g("cache_items"),
            g("cache_bytes"),
            g("cache_max_bytes"),
            g("process_uptime_seconds"),
            g("process_resident_memory_bytes"),
        );
        Self {
            forwarded,
            read_repairs,
            mismatches,
            versions_refused: c("cache_versions_refused_total"),
            stale_retries: c("cache_stale_write_retries_total"),
            sync: SyncSeries {
                syncing: g("cache_sync_syncing"),
                peers_synced: g("cache_sync_peers_synced"),
                peers_total: g("cache_sync_peers"),
                rounds: c("cache_sync_rounds_total"),
                failures: c("cache_sync_failures_total"),
                pulled: counter(
                    recorder_ref,
                    "cache_sync_keys_total",
                    vec![Label::new("direction", "pulled")],
                ),
                pushed: counter(
                    recorder_ref,
                    "cache_sync_keys_total",
                    vec![Label::new("direction", "pushed")],
                ),
                bytes: c("cache_sync_bytes_total"),
                last_round: g("cache_sync_last_round_seconds"),
            },
            replication: parking_lot::Mutex::new(std::collections::BTreeMap::new()),
            members: ["alive", "suspect", "dead", "left"]
                .iter()
                .map(|state| {
                    recorder_ref.register_gauge(
                        &Key::from_parts("cache_members", vec![Label::new("state", *state)]),
                        &META,
                    )
                })
                .collect(),
            peer_up: parking_lot::Mutex::new(std::collections::BTreeMap::new()),
            gossip: [
                c("cache_gossip_messages_received_total"),
                c("cache_gossip_bytes_received_total"),
                c("cache_gossip_messages_refused_total"),
                c("cache_gossip_messages_sent_total"),
                c("cache_gossip_bytes_sent_total"),
                c("cache_gossip_probes_total"),
                c("cache_gossip_suspicions_total"),
                c("cache_gossip_refutations_total"),
                c("cache_gossip_deaths_total"),
                c("cache_gossip_suspicion_to_dead_milliseconds_total"),
            ],
            coordinator_up: g("cache_coordinator_up"),
            items,
            bytes,
            max_bytes,
            uptime,
            resident,
            footprint: g("cache_engine_footprint_bytes"),
            requests,
            durations,
            hits: c("cache_hits_total"),
            misses: c("cache_misses_total"),
            inserts: c("cache_inserts_total"),
            updates: c("cache_updates_total"),
            deletes: c("cache_deletes_total"),
            evictions: c("cache_evictions_total"),
            expired: c("cache_expired_total"),
            stale: c("cache_stale_writes_total"),
            persist: std::sync::OnceLock::new(),
            auth_failures: ["missing", "unknown", "forbidden"].map(|reason| {
                counter(
                    recorder_ref,
                    "cache_auth_failures_total",
                    vec![Label::new("reason", reason)],
                )
            }),
            connections: [
                ConnSeries::register(recorder_ref, "client"),
                ConnSeries::register(recorder_ref, "peer"),
                ConnSeries::register(recorder_ref, "admin"),
                ConnSeries::register(recorder_ref, "resp"),
            ],
            recorder,
        }
    }

    /// The persistence series, registered on first use (only nodes with `--data-dir`
    /// export them).
    pub fn persist(&self) -> Arc<PersistSeries> {
        Arc::clone(
            self.persist
                .get_or_init(|| Arc::new(PersistSeries::register(&self.recorder))),
        )
    }

    /// Copies the authentication refusals (on each scrape).
    pub fn publish_auth(&self, auth: &crate::auth::Auth) {
        for (c, f) in self.auth_failures.iter().zip(&auth.failures) {
            c.absolute(f.load(std::sync::atomic::Ordering::Relaxed));
        }
    }

    /// Copies the listeners' connection counters (client, peer, admin, RESP; on each
    /// scrape).
    pub fn publish_connections(&self, stats: &[Arc<crate::conn::ConnStats>; 4]) {
        use std::sync::atomic::Ordering::Relaxed;
        for (series, s) in self.connections.iter().zip(stats) {
            series.open.set(s.open.load(Relaxed) as f64);
            series.refused.absolute(s.refused.load(Relaxed));
            series
                .handshake
                .absolute(s.handshake_timeouts.load(Relaxed));
            series.idle.absolute(s.idle_timeouts.load(Relaxed));
            series.accept_errors.absolute(s.accept_errors.load(Relaxed));
        }
    }

    /// The exposition handle of this node's registry.
    pub fn handle(&self) -> PrometheusHandle {
        self.recorder.handle()
    }

    /// Copies the cluster core's counters and each peer's replication queue into the
    /// exported series (called on each scrape).
    pub fn publish_core(
        &self,
        stats: &cluster_core::CoreStats,
        queues: &[cluster_core::QueueStats],
    ) {
        self.forwarded.absolute(stats.forwarded);
        self.read_repairs.absolute(stats.read_repairs);
        self.mismatches.absolute(stats.fingerprint_mismatches);
        self.versions_refused.absolute(stats.versions_refused);
        self.stale_retries.absolute(stats.stale_retries);
        let mut series = self.replication.lock();
        for q in queues {
            let s = series.entry(q.peer.to_string()).or_insert_with(|| {
                let r: &dyn Recorder = &self.recorder;
                let label = || vec![Label::new("peer", q.peer.to_string())];
                ReplicationSeries {
                    dropped: counter(r, "cache_replication_dropped_total", label()),
                    sent: counter(r, "cache_replication_sent_total", label()),
                    depth: r.register_gauge(
                        &Key::from_parts("cache_replication_queue_depth", label()),
                        &META,
                    ),
                    lag: r.register_gauge(
                        &Key::from_parts("cache_replication_lag_seconds", label()),
                        &META,
                    ),
                    hints_stored: counter(r, "cache_hints_stored_total", label()),
                    hints_delivered: counter(r, "cache_hints_delivered_total", label()),
                    hints_dropped: counter(r, "cache_hints_dropped_total", label()),
                    hints_pending: r
                        .register_gauge(&Key::from_parts("cache_hints_pending", label()), &META),
                }
            });
            s.dropped.absolute(q.dropped);
            s.sent.absolute(q.sent);
            s.depth.set(q.depth as f64);
            s.lag.set(q.lag_ms as f64 / 1000.0);
            s.hints_stored.absolute(q.hints_stored);
            s.hints_delivered.absolute(q.hints_delivered);
            s.hints_dropped.absolute(q.hints_dropped);
            s.hints_pending.set(q.hints_pending as f64);
        }
    }

    /// Copies the anti-entropy progress and counters into the exported series (on each
    /// scrape): `cache_sync_syncing` is 1 while the local copies are not authoritative.
    pub fn publish_sync(&self, status: &cluster_core::SyncStatus) {
        let s = &self.sync;
        s.syncing.set(if status.syncing { 1.0 } else { 0.0 });
        s.peers_synced.set(status.peers_synced as f64);
        s.peers_total.set(status.peers_total as f64);
        s.rounds.absolute(status.rounds);
        s.failures.absolute(status.failures);
        s.pulled.absolute(status.keys_pulled);
        s.pushed.absolute(status.keys_pushed);
        s.bytes.absolute(status.bytes_moved);
        s.last_round.set(status.last_round_ms as f64 / 1000.0);
    }

    /// Copies the membership view (members by state) and each peer's health (1 = calls
    /// succeed, 0 = skipped after a failure) into the exported series (on each scrape).
    pub fn publish_membership(
        &self,
        view: &cluster_membership::MembershipView,
        peers: &[(cluster_ring::NodeId, cluster_core::PeerHealth)],
    ) {
        use cluster_membership::MemberState;
        for (i, state) in [
            MemberState::Alive,
            MemberState::Suspect,
            MemberState::Dead,
            MemberState::Left,
        ]
        .iter()
        .enumerate()
        {
            let n = view.members.iter().filter(|m| m.state == *state).count();
            self.members[i].set(n as f64);
        }
        let now = tokio::time::Instant::now();
        let mut up = self.peer_up.lock();
        for (peer, health) in peers {
            let g = up.entry(peer.to_string()).or_insert_with(|| {
                let r: &dyn Recorder = &self.recorder;
                r.register_gauge(
                    &Key::from_parts("cache_peer_up", vec![Label::new("peer", peer.to_string())]),
                    &META,
                )
            });
            let down = health.unhealthy_until.is_some_and(|t| now < t);
            g.set(if down { 0.0 } else { 1.0 });
        }
    }

    /// Whether the coordinator is reachable (coordinator membership; on each scrape).
    pub fn publish_coordinator(&self, up: bool) {
        self.coordinator_up.set(if up { 1.0 } else { 0.0 });
    }

    /// Copies the gossip protocol's counters (on each scrape).
    pub fn publish_gossip(&self, s: &cluster_membership::swim::SwimStats) {
        let values = [
            s.messages_in,
            s.bytes_in,
            s.messages_refused,
            s.messages_out,
            s.bytes_out,
            s.probes,
            s.suspicions,
            s.refutations,
            s.deaths,
            s.suspicion_to_dead_ms,
        ];
        for (counter, v) in self.gossip.iter().zip(values) {
            counter.absolute(v);
        }
    }

    /// Counts one finished request.
    pub fn record(&self, op: Op, result: &str, elapsed: Duration) {
        let r = RESULTS
            .iter()
            .position(|x| *x == result)
            .unwrap_or(RESULTS.len() - 1);
        self.requests[op as usize][r].increment(1);
        self.durations[op as usize].record(elapsed.as_secs_f64());
    }

    /// Copies engine statistics and process figures into the exported series (called on
    /// each scrape).
    pub fn publish(
        &self,
        stats: &cache_core::CacheStats,
        footprint: u64,
        max_bytes: u64,
        uptime: Duration,
    ) {
        self.footprint.set(footprint as f64);
        self.hits.absolute(stats.hits);
        self.misses.absolute(stats.misses);
        self.inserts.absolute(stats.inserts);
        self.updates.absolute(stats.updates);
        self.deletes.absolute(stats.deletes);
        self.evictions.absolute(stats.evictions);
        self.expired.absolute(stats.expirations);
        self.stale.absolute(stats.stale_writes);
        self.items.set(stats.items as f64);
        self.bytes.set(stats.bytes as f64);
        self.max_bytes.set(max_bytes as f64);
        self.uptime.set(uptime.as_secs_f64());
        if let Some(rss) = resident_memory_bytes() {
            self.resident.set(rss as f64);
        }
    }
}

/// Resident set size of this process, from `/proc/self/statm` (Linux); `None` elsewhere.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}
