//! [`Coordinator`]: routing, forwarding, write coordination per consistency, quorum reads with
//! repair, and the one scatter/gather for batches.
//!
//! # Routing
//!
//! Any node accepts any key. For a key whose replicas are `[r0, r1, r2]` (primary first):
//!
//! - The **primary serves**: it answers `One` reads from its engine, coordinates writes
//!   (version, apply, replicate) and coordinates `Quorum`/`All` reads.
//! - **Any other node forwards** to the replicas ahead of it in ring order, primary first,
//!   moving to the next one only if a replica is unreachable. If none answers and this node
//!   is itself a replica, it serves (the next replica takes over from a failed primary).
//! - A **forwarded request is never forwarded again**: a node that receives one for a key it
//!   replicates serves it; otherwise it answers [`CoreError::WrongOwner`] naming its ring
//!   epoch. No request can loop, even while two nodes disagree about the ring.
//!
//! `One` reads go to the primary, like writes, so a client that writes and then reads at
//! `One` through any node reads its own write (unless the primary fails in between).
//!
//! # Writes
//!
//! The coordinator applies a write to its own engine first (through the [`Store`], which
//! stamps the version), then replicates: asynchronously through the per-peer queues for
//! `One`, synchronously to all other replicas in parallel for `Quorum`/`All`, answering as
//! soon as enough replicas (itself included) acknowledged — the fastest majority, not the
//! slowest replica. Calls still running then finish in the background; a replica that fails
//! gets the mutation through its asynchronous queue instead.
//!
//! # Quorum reads
//!
//! The coordinator reads its own copy and fetches the others in parallel — versions,
//! tombstones and expiries included — and answers once enough replicas answered. The newest
//! version wins, whether it is a value, a delete or an expiry: so a quorum read after a
//! quorum delete or expiry never returns the deleted value. Stale replicas (the coordinator
//! included) are repaired with the winning version.
//!
//! Every peer call is bounded by the request's deadline (and the peer timeout), and the
//! whole request by its deadline.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cache_core::{Lookup, VersionedRead};
use cache_types::{Condition, Consistency};
use cluster_membership::MembershipView;
use cluster_ring::NodeId;
use futures_util::stream::{FuturesUnordered, StreamExt};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{CoreError, PeerError};
use crate::mutation::{Mutation, MutationOp};
use crate::replication::{QueueStats, ReplicationConfig, Replicator};
use crate::request::{Request, Response, SetCommand, UpdateOp};
use crate::ring::{RingState, RingView};
use crate::store::{Applied, ApplyReport, Stamping, Store};
use crate::transport::{PeerCall, PeerReply, PeerTransport};

/// How long a peer's ring may differ from this node's before it is logged as an error.
pub const MISMATCH_GRACE: Duration = Duration::from_secs(10);

/// Cluster settings.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Replicas per key (capped at the member count).
    pub replication_factor: usize,
    /// Consistency of writes that do not name one.
    pub default_consistency: Consistency,
    /// Longest wait for one peer call (the request's own deadline may be shorter).
    pub peer_timeout: Duration,
    /// Mutations each per-peer asynchronous replication queue holds before dropping.
    pub queue_capacity: usize,
    /// Most mutations sent in one replicate call (capped at
    /// [`MAX_MUTATIONS_PER_CALL`](crate::replication::MAX_MUTATIONS_PER_CALL)).
    pub batch_max: usize,
    /// Most key and value bytes of hints kept for one unreachable peer (hinted handoff; the
    /// count is bounded by `queue_capacity`).
    pub hint_bytes_max: usize,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            replication_factor: 3,
            default_consistency: Consistency::One,
            peer_timeout: Duration::from_secs(1),
            queue_capacity: 65_536,
            batch_max: 512,
            hint_bytes_max: 64 << 20,
        }
    }
}

/// Where a request comes from and how long it may take.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext {
    /// When the caller stops waiting.
    pub deadline: Instant,
    /// The request was forwarded by another node: never forward it again.
    pub forwarded: bool,
    /// The sender's deadline as a unix millisecond on the wall clock: a write of this
    /// request is refused ([`CoreError::TooLate`]) unless its version is stamped before it,
    /// so a request read after its sender gave up (and perhaps had it applied elsewhere)
    /// is never ordered after writes acknowledged meanwhile. `None`: the write is accepted
    /// here first, and its place in the order is wherever it is stamped.
    pub not_after_ms: Option<u64>,
    /// A forwarded write's version, given where it was first accepted (the first of one
    /// per entry for a `MultiSet`): see [`Stamping`]. `None`: stamp here.
    pub version: Option<u64>,
}

impl RequestContext {
    /// A client request that may take `timeout`.
    pub fn client(timeout: Duration) -> Self {
        Self::until(Instant::now() + timeout)
    }

    /// A client request due by `deadline`.
    pub fn until(deadline: Instant) -> Self {
        Self {
            deadline,
            forwarded: false,
            not_after_ms: None,
            version: None,
        }
    }

    /// How this request's (single) write is stamped. A given version is used for an
    /// unconditional write only (`exact`): a conditional write, touch or update is decided
    /// and stamped on the primary, under its lock — stamped where it was accepted, it would
    /// be refused whenever a concurrent update of the key got there first — and is kept
    /// from being applied late by the sender's deadline alone.
    pub fn stamping(&self, exact: bool) -> Stamping {
        Stamping {
            version: self.version.filter(|_| exact),
            not_after_ms: self.not_after_ms,
        }
    }

    /// How entry `i` of this request's `MultiSet` is stamped: the given versions are
    /// consecutive, one per entry, and used for unconditional entries (`exact`) only.
    fn stamping_of_entry(&self, i: usize, exact: bool) -> Result<Stamping, CoreError> {
        let version = match self.version.filter(|_| exact) {
            None => None,
            Some(base) => Some(
                u64::try_from(i)
                    .ok()
                    .and_then(|i| i.checked_mul(crate::clock::VERSION_STEP))
                    .and_then(|offset| base.checked_add(offset))
                    .ok_or_else(|| CoreError::Invalid("batch versions out of range".into()))?,
            ),
        };
        Ok(Stamping {
            version,
            not_after_ms: self.not_after_ms,
        })
    }
}

/// Health of the calls to one peer, for `/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerHealth {
    /// Successful calls.
    pub ok: u64,
    /// Failed calls.
    pub failed: u64,
    /// The last failure, if the last call failed.
    pub last_error: Option<String>,
    /// After a failed call the peer is skipped, while another replica can serve, until
    /// this time: one peer timeout after the first failure, doubling with each further
    /// failure in a row up to 32 (a hung peer costs a few timeouts per outage, not one per
    /// request or per second). A successful call clears it — replication and hint
    /// deliveries count, so a peer that is back is used again as soon as they reach it.
    pub unhealthy_until: Option<Instant>,
    /// Failed calls in a row.
    pub consecutive_failures: u32,
}

/// Counters of the core, copied into `/metrics` when it is scraped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreStats {
    /// Requests forwarded to another node.
    pub forwarded: u64,
    /// Stale replicas repaired by quorum reads.
    pub read_repairs: u64,
    /// Peer answers whose ring fingerprint differed from ours.
    pub fingerprint_mismatches: u64,
    /// Peer versions refused for being too far ahead of the clock.
    pub versions_refused: u64,
    /// Local writes retried after losing to a stored version.
    pub stale_retries: u64,
    /// Writes refused because they reached this node after their sender's deadline
    /// ([`CoreError::TooLate`]).
    pub late_writes_refused: u64,
}

/// Peer bookkeeping shared with background tasks.
#[derive(Debug)]
struct Peers {
    health: Mutex<BTreeMap<NodeId, PeerHealth>>,
    /// How long a peer is skipped after a failed call.
    backoff: Duration,
    /// Peers whose ring fingerprint differs from ours: peer → (their fingerprint, since
    /// when, whether the persistent mismatch was logged as an error).
    mismatches: Mutex<BTreeMap<NodeId, (u64, Instant, bool)>>,
    mismatch_count: AtomicU64,
}

impl Peers {
    fn record(&self, peer: &NodeId, result: Result<(), String>) {
        let mut health = self.health.lock();
        let h = health.entry(peer.clone()).or_default();
        match result {
            Ok(()) => {
                h.ok += 1;
                h.last_error = None;
                h.unhealthy_until = None;
                h.consecutive_failures = 0;
            }
            Err(e) => {
                h.failed += 1;
                h.last_error = Some(e);
                h.consecutive_failures = h.consecutive_failures.saturating_add(1);
                let factor = 1u32 << h.consecutive_failures.saturating_sub(1).min(5);
                h.unhealthy_until = Some(Instant::now() + self.backoff.saturating_mul(factor));
            }
        }
    }

    /// Whether a recent call to `peer` failed (and the backoff has not passed).
    fn recently_failed(&self, peer: &NodeId) -> bool {
        let now = Instant::now();
        self.health
            .lock()
            .get(peer)
            .and_then(|h| h.unhealthy_until)
            .is_some_and(|until| now < until)
    }
}

/// Where a key lives, from one ring state.
struct Placement {
    state: Arc<RingState>,
    /// The key's replicas, primary first (member indices of `state`'s ring: placing a
    /// request allocates nothing).
    set: cluster_ring::ReplicaSet,
    /// This node's position among the replicas, if it is one.
    local_index: Option<usize>,
}

impl Placement {
    fn is_primary(&self) -> bool {
        self.local_index == Some(0)
    }

    fn is_replica(&self) -> bool {
        self.local_index.is_some()
    }

    /// How many replicas the key has.
    fn len(&self) -> usize {
        self.set.len()
    }

    /// The replicas' ids, primary first.
    fn replicas(&self) -> impl Iterator<Item = &NodeId> + '_ {
        self.set.indices().iter().map(|&i| self.state.id_at(i))
    }

    /// The primary's id.
    fn primary(&self) -> Option<&NodeId> {
        self.replicas().next()
    }

    /// The replicas ahead of this node (all of them if it is not a replica).
    fn ahead(&self) -> impl Iterator<Item = &NodeId> + '_ {
        self.replicas()
            .take(self.local_index.unwrap_or(self.set.len()))
    }
}

/// How a forward attempt ended without an answer.
enum ForwardFailure {
    /// This is the answer (a peer's error, or an outcome that cannot be known).
    Answer(CoreError),
    /// No target did the work (or the request is idempotent): it may be served elsewhere.
    Unreachable(String),
}

impl Request {
    /// Whether sending this request twice (after a timeout) gives the same state and the
    /// same answer: reads, unconditional sets and deletes (whose `deleted` flag may then
    /// under-report, never over-report). Conditional sets and touches are not.
    pub(crate) fn idempotent(&self) -> bool {
        match self {
            Request::Get { .. } | Request::MultiGet { .. } | Request::Delete { .. } => true,
            Request::Set { cmd, .. } => cmd.condition == cache_types::Condition::Always,
            Request::MultiSet { entries, .. } => entries
                .iter()
                .all(|e| e.condition == cache_types::Condition::Always),
            Request::Touch { .. } | Request::Update { .. } => false,
        }
    }
}

/// The cluster core of one node. See the module docs.
pub struct Coordinator<T: PeerTransport> {
    local: NodeId,
    store: Arc<Store>,
    ring: Arc<RingView>,
    transport: Arc<T>,
    replicator: Arc<Replicator<T>>,
    config: CoreConfig,
    peers: Arc<Peers>,
    forwarded: AtomicU64,
    read_repairs: AtomicU64,
    shutting_down: AtomicBool,
    /// False while this node waits to join its cluster (see [`Coordinator::require_join`]):
    /// client requests are then refused.
    joined: Arc<AtomicBool>,
    sync: crate::sync::SyncState,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl<T: PeerTransport> std::fmt::Debug for Coordinator<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("local", &self.local)
            .field("epoch", &self.ring.load().epoch)
            .finish_non_exhaustive()
    }
}

fn unexpected(peer: &NodeId, what: &str) -> CoreError {
    CoreError::Internal(format!("{peer} answered {what}"))
}

impl<T: PeerTransport> Coordinator<T> {
    /// A coordinator for node `local` over `store`, routing by `ring`, reaching peers
    /// through `transport`.
    pub fn new(
        local: NodeId,
        store: Arc<Store>,
        ring: Arc<RingView>,
        transport: Arc<T>,
        config: CoreConfig,
    ) -> Self {
        let peer_timeout = config.peer_timeout;
        let peers = Arc::new(Peers {
            health: Mutex::new(BTreeMap::new()),
            backoff: peer_timeout,
            mismatches: Mutex::new(BTreeMap::new()),
            mismatch_count: AtomicU64::new(0),
        });
        let health = Arc::clone(&peers);
        let replicator = Arc::new(
            Replicator::new(
                local.clone(),
                Arc::clone(&transport),
                Arc::clone(&ring),
                ReplicationConfig {
                    queue_capacity: config.queue_capacity,
                    batch_max: config.batch_max,
                    batch_bytes_max: store.limits().max_request_bytes(),
                    peer_timeout: config.peer_timeout,
                    hint_capacity: config.queue_capacity.max(1),
                    hint_bytes_max: config.hint_bytes_max,
                },
            )
            .with_outcome_hook(Arc::new(move |peer, outcome| health.record(peer, outcome))),
        );
        Self {
            local,
            store,
            ring,
            transport,
            replicator,
            config,
            peers,
            forwarded: AtomicU64::new(0),
            read_repairs: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            joined: Arc::new(AtomicBool::new(true)),
            sync: crate::sync::SyncState::new(),
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
        }
    }

    /// This node's id.
    pub fn local_id(&self) -> &NodeId {
        &self.local
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The ring view.
    pub fn ring(&self) -> &Arc<RingView> {
        &self.ring
    }

    /// The settings.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// Follows membership: every new view rebuilds the ring (an owned task, stopped by
    /// [`Coordinator::shutdown`]). Must be called within a tokio runtime.
    pub fn follow(&self, mut views: watch::Receiver<MembershipView>) {
        let ring = Arc::clone(&self.ring);
        let cancel = self.cancel.clone();
        let joined = Arc::clone(&self.joined);
        let local = self.local.clone();
        let store = Arc::clone(&self.store);
        Self::assign_tag(&ring, &store, &local);
        self.tracker.spawn(async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    changed = views.changed() => if changed.is_err() { return },
                }
                let view = views.borrow_and_update().clone();
                match ring.update(view) {
                    Ok(()) => {
                        let state = ring.load();
                        Self::assign_tag(&ring, &store, &local);
                        tracing::info!(
                            epoch = state.epoch,
                            members = state.ring.members().len(),
                            "membership changed: new ring"
                        );
                        // Joined once the ring in use — not merely a view — holds another
                        // live member.
                        if !joined.load(Ordering::SeqCst)
                            && state.ring.members().iter().any(|m| m.id != local)
                        {
                            joined.store(true, Ordering::SeqCst);
                            tracing::info!(
                                members = state.ring.members().len(),
                                "joined the cluster"
                            );
                        }
                    }
                    Err(e) => tracing::error!(
                        error = %e,
                        "membership view has no usable ring; keeping the previous one"
                    ),
                }
            }
        });
    }

    /// Gives this node's clock the version tag [`crate::clock::assign_tags`] assigns it
    /// among every member its ring knows (no other member has it). [`Coordinator::follow`]
    /// does this on every view; call it after changing the ring by hand (the simulator).
    pub fn assign_version_tag(&self) {
        Self::assign_tag(&self.ring, &self.store, &self.local);
    }

    fn assign_tag(ring: &RingView, store: &Store, local: &NodeId) {
        let known = ring.known_members();
        let mut ids: Vec<&str> = known.keys().map(String::as_str).collect();
        ids.push(local.as_str());
        if let Some(tag) = crate::clock::assign_tags(ids).get(local.as_str()) {
            store.hlc().set_tag(*tag);
        }
    }

    /// Refuses client requests ([`CoreError::Unavailable`], "not joined") until a
    /// membership view that [`Coordinator::follow`] reads names another live member: for a
    /// node started with seeds to join. Until then its ring holds itself alone, and serving
    /// from it would answer authoritative misses and decide `IF_ABSENT` writes against an
    /// empty copy (a restarted member did both in its first milliseconds). Peer traffic is
    /// served meanwhile (the members that already know this node send it).
    pub fn require_join(&self) {
        self.joined.store(false, Ordering::SeqCst);
    }

    /// Whether this node serves clients as a member of its cluster (see
    /// [`Coordinator::require_join`]); always true for a node not told to join.
    pub fn is_joined(&self) -> bool {
        self.joined.load(Ordering::SeqCst)
    }

    /// From now on, client requests are refused with [`CoreError::ShuttingDown`]; peer
    /// traffic (replication in, forwarded requests) is still served.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Drains the replication queues for at most `grace` (counting what could not be
    /// delivered), then stops and awaits every background task.
    pub async fn shutdown(&self, grace: Duration) {
        self.begin_shutdown();
        self.replicator.shutdown(grace).await;
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Counters, for `/metrics`.
    pub fn stats(&self) -> CoreStats {
        CoreStats {
            forwarded: self.forwarded.load(Ordering::Relaxed),
            read_repairs: self.read_repairs.load(Ordering::Relaxed),
            fingerprint_mismatches: self.peers.mismatch_count.load(Ordering::Relaxed),
            versions_refused: self.store.versions_refused(),
            stale_retries: self.store.stale_retries(),
            late_writes_refused: self.store.late_writes_refused(),
        }
    }

    /// Replication queue counters, by peer.
    pub fn queue_stats(&self) -> Vec<QueueStats> {
        self.replicator.stats()
    }

    /// Peer call health, by peer.
    pub fn peer_health(&self) -> Vec<(NodeId, PeerHealth)> {
        self.peers
            .health
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Peers whose ring fingerprint differs from ours: (peer, their fingerprint).
    pub fn mismatches(&self) -> Vec<(NodeId, u64)> {
        self.peers
            .mismatches
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.0))
            .collect()
    }

    /// Notes the ring fingerprint a peer reported; logs and counts a mismatch. A mismatch
    /// is normal for a moment while a membership change spreads, so it is logged at info
    /// level first and as an error only if the same one persists for [`MISMATCH_GRACE`].
    pub fn check_fingerprint(&self, peer: &NodeId, theirs: u64) {
        let ours = self.ring.load().ring.fingerprint();
        if theirs == 0 || theirs == ours {
            self.peers.mismatches.lock().remove(peer);
            return;
        }
        self.peers.mismatch_count.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let (first, persistent) = {
            let mut m = self.peers.mismatches.lock();
            let entry = m.entry(peer.clone()).or_insert((theirs, now, false));
            if entry.0 != theirs {
                *entry = (theirs, now, false);
            }
            let first = entry.1 == now;
            let persistent = !entry.2 && now.duration_since(entry.1) >= MISMATCH_GRACE;
            if persistent {
                entry.2 = true;
            }
            (first, persistent)
        };
        if first {
            tracing::info!(
                peer = %peer,
                ours = format_args!("{ours:016x}"),
                theirs = format_args!("{theirs:016x}"),
                "ring mismatch with this peer (normal for a moment while membership changes)"
            );
        }
        if persistent {
            tracing::error!(
                peer = %peer,
                ours = format_args!("{ours:016x}"),
                theirs = format_args!("{theirs:016x}"),
                "RING MISMATCH: this peer has built a different ring for {MISMATCH_GRACE:?}; with \
                 static membership every node must be started with the same --peers"
            );
        }
    }

    pub(crate) fn sync_state(&self) -> &crate::sync::SyncState {
        &self.sync
    }

    pub(crate) fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    pub(crate) fn transport(&self) -> &Arc<T> {
        &self.transport
    }

    /// A peer call from this node, due by `deadline` (at most one peer timeout away). Its
    /// `not_after_ms` is that deadline on this node's wall clock, rounded down: the callee
    /// stamps the call's writes before it or refuses them, and this node stops waiting at
    /// the deadline (the same instant), so a write it then re-sends elsewhere is stamped at
    /// `not_after_ms` or later and orders after anything the callee stamped.
    pub(crate) fn call(&self, deadline: Instant) -> PeerCall {
        let now = Instant::now();
        let deadline = deadline.min(now + self.config.peer_timeout);
        let budget_ms =
            u64::try_from(deadline.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX);
        PeerCall {
            from: self.local.clone(),
            ring_fingerprint: self.ring.load().ring.fingerprint(),
            deadline,
            not_after_ms: Some(self.store.now_ms().saturating_add(budget_ms)),
            version: None,
        }
    }

    fn place(&self, state: &Arc<RingState>, key: &[u8]) -> Placement {
        let set = state.replica_set(key);
        let local_index = set
            .indices()
            .iter()
            .position(|&i| *state.id_at(i) == self.local);
        Placement {
            state: Arc::clone(state),
            set,
            local_index,
        }
    }

    fn wrong_owner(&self, state: &RingState) -> CoreError {
        CoreError::WrongOwner { epoch: state.epoch }
    }

    fn check_request(&self, request: &Request) -> Result<(), CoreError> {
        let limits = self.store.limits();
        match request {
            Request::Get { key, .. } | Request::Delete { key, .. } | Request::Touch { key, .. } => {
                limits.check_key(key)
            }
            Request::Set { cmd, .. } => {
                limits.check_key(&cmd.key)?;
                limits.check_value(&cmd.value)
            }
            Request::Update { key, op, .. } => {
                limits.check_key(key)?;
                match op {
                    UpdateOp::Set { value, .. } => limits.check_value(value),
                    _ => Ok(()),
                }
            }
            Request::MultiGet { keys } => {
                limits.check_batch(keys.len())?;
                keys.iter().try_for_each(|k| limits.check_key(k))
            }
            Request::MultiSet { entries, .. } => {
                limits.check_batch(entries.len())?;
                entries.iter().try_for_each(|e| {
                    limits.check_key(&e.key)?;
                    limits.check_value(&e.value)
                })
            }
        }
    }

    /// Serves one request: checks it, routes it, and answers by its deadline.
    pub async fn handle(
        &self,
        request: Request,
        ctx: RequestContext,
    ) -> Result<Response, CoreError> {
        if !ctx.forwarded && self.is_shutting_down() {
            return Err(CoreError::ShuttingDown);
        }
        if !ctx.forwarded && !self.is_joined() {
            return Err(not_joined());
        }
        self.check_request(&request)?;
        if let Some(answer) = self.answer_locally(&request, ctx) {
            return answer;
        }
        let budget = ctx.deadline.saturating_duration_since(Instant::now());
        // Boxed: the general path's state (forwarding, quorums, batches) is kilobytes, and
        // inline it would make every caller's future — the hot path's included — that big
        // (each gRPC call allocates and moves its whole future).
        let general = Box::pin(self.dispatch(request, ctx));
        match tokio::time::timeout_at(ctx.deadline, general).await {
            Ok(result) => result,
            Err(_) => Err(CoreError::DeadlineExceeded(budget)),
        }
    }

    /// A plain read (`Get` with the default consistency) answered at once when this node
    /// would answer it locally anyway (see `answer_locally`): the value is lent to `read`
    /// under the engine's lock, with no copy into a `Bytes` — for a front end that copies it
    /// straight into its reply buffer. `Some(Ok(None))` is a miss, `Some(Err(_))` what
    /// [`Coordinator::handle`] would have answered (shutting down, a bad key); `None`: the
    /// read needs the general path (another node is the key's primary, or this node is
    /// syncing), so call [`Coordinator::handle`] with a `Get`.
    pub fn read_here<R>(
        &self,
        key: &[u8],
        read: impl FnOnce(&[u8]) -> R,
    ) -> Option<Result<Option<R>, CoreError>> {
        if self.is_shutting_down() {
            return Some(Err(CoreError::ShuttingDown));
        }
        if !self.is_joined() {
            return Some(Err(not_joined()));
        }
        if let Err(e) = self.store.limits().check_key(key) {
            return Some(Err(e));
        }
        let primary = self.ring.load_guard().ring.owner(key).id == self.local;
        if !primary || !self.primary_reads_alone(None) {
            return None;
        }
        Some(Ok(self.store.read_with(key, read)))
    }

    /// Whether this node, a key's primary, answers a read at `consistency` from its own copy
    /// alone: the read needs one replica, and the node is not syncing (its copy could be
    /// missing or old).
    fn primary_reads_alone(&self, consistency: Option<Consistency>) -> bool {
        matches!(consistency, None | Some(Consistency::One)) && !self.is_syncing()
    }

    /// The hot path, without a task, a timer or an allocation for placement: a request
    /// this node can answer at once, exactly as the general path would (see `serve_here`):
    ///
    /// - a `One` read of a key whose primary is this node, when it is not syncing: the
    ///   local value (`local_reads` reads nothing else then);
    /// - a write or delete acknowledged by one replica (`One`, or a single replica) of a
    ///   key whose primary is this node, when nothing must be awaited for durability (no
    ///   mutation sink: no `--data-dir`), and — for a conditional write — the node is not
    ///   syncing: applied here, queued for the other replicas (`replicate` does the same
    ///   when one acknowledgement suffices).
    ///
    /// `None`: take the general path.
    fn answer_locally(
        &self,
        request: &Request,
        ctx: RequestContext,
    ) -> Option<Result<Response, CoreError>> {
        let state = self.ring.load_guard();
        let key = match request {
            Request::Get { key, .. } | Request::Delete { key, .. } => key,
            Request::Set { cmd, .. } => &cmd.key,
            _ => return None,
        };
        if state.ring.owner(key).id != self.local {
            return None;
        }
        let one = |c: &Option<Consistency>| {
            // Counted against the home replicas, as `replicate` does: a node that sees the
            // other replicas dead is not a quorum of one.
            let n = state.home_rf;
            c.unwrap_or(self.config.default_consistency).required(n) <= 1
        };
        let answer = match request {
            Request::Get { key, consistency } => {
                if !self.primary_reads_alone(*consistency) {
                    return None;
                }
                Ok(Response::Get(self.store.get(key)))
            }
            Request::Set { cmd, consistency } => {
                if !one(consistency)
                    || self.store.has_sinks()
                    || (cmd.condition != Condition::Always && self.is_syncing())
                {
                    return None;
                }
                self.store
                    .set(
                        &cmd.key,
                        &cmd.value,
                        cmd.ttl_ms,
                        cmd.condition,
                        ctx.stamping(cmd.condition == Condition::Always),
                    )
                    .map(|applied| match applied {
                        Applied::Done(m) => {
                            self.enqueue_for_others(&state, m);
                            Response::Set { stored: true }
                        }
                        Applied::NotApplied => Response::Set { stored: false },
                    })
            }
            Request::Delete { key, consistency } => {
                if !one(consistency) || self.store.has_sinks() {
                    return None;
                }
                // A tombstone whenever the key has other home replicas, seen alive or not:
                // a copy from one of them must not bring the value back.
                let replicated = state.home_rf > 1;
                self.store
                    .delete(key, replicated, ctx.stamping(true))
                    .map(|(deleted, m)| {
                        self.enqueue_for_others(&state, m);
                        Response::Delete { deleted }
                    })
            }
            _ => return None,
        };
        Some(answer)
    }

    /// Queues `m` for every other replica of its key (asynchronous replication), and for
    /// its home replicas that look dead (they get it as a hint when they answer again: a
    /// `ONE` write made on one side of a partition reaches the key's replicas after the
    /// heal, instead of staying on a node that no longer replicates the key).
    fn enqueue_for_others(&self, state: &RingState, m: Mutation) {
        if state.home_rf <= 1 {
            return;
        }
        let mut routed = Vec::new();
        for &i in state.replica_set(&m.key).indices() {
            let peer = state.id_at(i);
            if *peer != self.local {
                self.replicator.enqueue(peer, m.clone());
            }
            if state.home_differs {
                routed.push(peer.clone());
            }
        }
        for peer in state.home_extra(&m.key, &routed, &self.local) {
            self.replicator.enqueue(&peer, m.clone());
        }
    }

    async fn dispatch(&self, request: Request, ctx: RequestContext) -> Result<Response, CoreError> {
        let state = self.ring.load();
        match request {
            Request::MultiGet { keys } => self.multi_get(&state, keys, ctx).await,
            Request::MultiSet {
                entries,
                consistency,
            } => {
                let consistency = consistency.unwrap_or(self.config.default_consistency);
                self.multi_set(&state, entries, consistency, ctx).await
            }
            single => {
                let key = match &single {
                    Request::Get { key, .. }
                    | Request::Delete { key, .. }
                    | Request::Touch { key, .. }
                    | Request::Update { key, .. } => key.clone(),
                    Request::Set { cmd, .. } => cmd.key.clone(),
                    Request::MultiGet { .. } | Request::MultiSet { .. } => {
                        unreachable!("batches are matched above")
                    }
                };
                let p = self.place(&state, &key);
                self.single(&p, single, ctx).await
            }
        }
    }

    /// Routes a single-key request: serve here, or forward (with this node as the fallback
    /// if it is a replica and every replica ahead of it is unreachable).
    async fn single(
        &self,
        p: &Placement,
        request: Request,
        ctx: RequestContext,
    ) -> Result<Response, CoreError> {
        if p.is_primary() || (ctx.forwarded && p.is_replica()) {
            return self.serve_here(p, request, ctx).await;
        }
        if ctx.forwarded {
            return Err(self.wrong_owner(&p.state));
        }
        match self
            .forward_first(p.ahead(), &request, ctx, !p.is_replica(), p.is_replica())
            .await
        {
            Ok(response) => Ok(response),
            Err(ForwardFailure::Unreachable(_)) if p.is_replica() => {
                self.serve_here(p, request, ctx).await
            }
            Err(ForwardFailure::Unreachable(detail)) => Err(CoreError::Unavailable {
                acks: 0,
                required: 1,
                detail: format!("no replica of this key answered ({detail})"),
            }),
            Err(ForwardFailure::Answer(e)) => Err(e),
        }
    }

    /// Records a failed call to `peer` (it is skipped for a while).
    pub(crate) fn note_peer_failure(&self, peer: &NodeId, what: &str) {
        self.peers.record(peer, Err(what.to_string()));
    }

    /// Local reads of `keys`. While this node is syncing its copies are not authoritative
    /// (missing after a restart or a join, possibly older after a pause): every key is also
    /// read from another replica, and the newer answer wins (and is kept here).
    async fn local_reads(
        &self,
        state: &RingState,
        keys: &[Bytes],
        deadline: Instant,
    ) -> Vec<Option<Lookup>> {
        let mut found: Vec<Option<Lookup>> = keys.iter().map(|k| self.store.get(k)).collect();
        if state.replication_factor <= 1 || !self.is_syncing() {
            return found;
        }
        let remote = self.read_through(state, keys, deadline).await;
        for (slot, r) in found.iter_mut().zip(remote) {
            let Some(Some(read)) = r else { continue };
            let local = slot.as_ref().map_or(0, |l| l.version);
            if read.version() > local {
                *slot = match read {
                    VersionedRead::Live(l) => Some(l),
                    VersionedRead::Dead { .. } => None,
                };
            }
        }
        found
    }

    /// Before a decision that depends on the key's presence (a conditional write, a touch)
    /// on a syncing node: reads the key from another replica and applies it here. Refused
    /// if no other replica answers — the node does not decide on a copy that may be missing.
    async fn settle_before_deciding(
        &self,
        p: &Placement,
        key: &Bytes,
        ctx: RequestContext,
    ) -> Result<(), CoreError> {
        if p.len() <= 1 || !self.is_syncing() {
            return Ok(());
        }
        let answers = self
            .read_through(&p.state, std::slice::from_ref(key), ctx.deadline)
            .await;
        match answers.into_iter().next().flatten() {
            // The other replica knows nothing of the key: the local copy is complete.
            Some(None) => return Ok(()),
            // It holds a version: decide only if this node now holds it (or newer). The
            // repair can be refused (a version beyond the allowed clock drift).
            Some(Some(read)) => {
                let local = self.store.get_versioned(key).map_or(0, |r| r.version());
                if local >= read.version() {
                    return Ok(());
                }
                return Err(CoreError::Unavailable {
                    acks: 0,
                    required: 1,
                    detail: "this node is syncing and could not take another replica's newer \
                             copy of the key (is its clock behind?); a conditional write or \
                             touch is not decided on an older copy"
                        .into(),
                });
            }
            None => {}
        }
        Err(CoreError::Unavailable {
            acks: 0,
            required: 1,
            detail: "this node is syncing (it restarted or the ring changed) and no other replica \
                     answered; a conditional write or touch is not decided on a copy that may be \
                     incomplete"
                .into(),
        })
    }

    /// Whether `peer` should be avoided: a recent call failed, or membership suspects it.
    pub(crate) fn unhealthy(&self, peer: &NodeId) -> bool {
        self.peers.recently_failed(peer)
            || self
                .ring
                .load()
                .view
                .member(peer)
                .is_some_and(|m| m.state == cache_types::MemberState::Suspect)
    }

    /// Sends `request` to the first of `targets` that answers (skipping this node), healthy
    /// targets first. Unhealthy ones are tried last, and only if `try_unhealthy` (that is,
    /// when nothing else can serve the request). `fallback`: the caller can still serve the
    /// request another way if every target fails (so no attempt may use the whole budget).
    async fn forward_first<'t>(
        &self,
        targets: impl IntoIterator<Item = &'t NodeId>,
        request: &Request,
        ctx: RequestContext,
        try_unhealthy: bool,
        fallback: bool,
    ) -> Result<Response, ForwardFailure> {
        let mut last = String::from("no reachable replica");
        let (healthy, unhealthy): (Vec<&NodeId>, Vec<&NodeId>) = targets
            .into_iter()
            .filter(|t| **t != self.local)
            .partition(|t| !self.unhealthy(t));
        if !unhealthy.is_empty() {
            last = format!(
                "{} skipped: a recent call failed or it is suspect",
                unhealthy[0]
            );
        }
        let order: Vec<&NodeId> = if try_unhealthy {
            healthy.into_iter().chain(unhealthy).collect()
        } else {
            healthy
        };
        let count = order.len();
        for (n, target) in order.into_iter().enumerate() {
            self.forwarded.fetch_add(1, Ordering::Relaxed);
            // While a fallback remains (another target, or serving here), an attempt gets
            // half of what is left of the request's deadline: a hung peer is then recorded
            // (and skipped next time) and the fallback still has time to answer.
            let now = Instant::now();
            let left = ctx.deadline.saturating_duration_since(now);
            let budget = if n + 1 < count || fallback {
                left / 2
            } else {
                left
            };
            let mut call = self.call(now + budget);
            // A write's place in the order is fixed here, when this attempt is sent: the
            // callee applies exactly these versions, so a copy of the request that reaches
            // it late or twice is the same write, and a later attempt elsewhere (stamped
            // after this one) always wins over it.
            let writes = request.stamped_writes();
            if writes > 0 && !ctx.forwarded {
                call.version = match self.store.hlc().reserve(self.store.now_ms(), writes) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        return Err(ForwardFailure::Answer(CoreError::Internal(e.to_string())));
                    }
                };
            }
            let deadline = call.deadline;
            let outcome = tokio::time::timeout_at(
                deadline,
                self.transport.forward(target, call, request.clone()),
            )
            .await
            .unwrap_or_else(|_| {
                Err(PeerError::NoAnswer {
                    peer: target.to_string(),
                    detail: "no answer before the deadline".into(),
                })
            });
            match outcome {
                Ok(reply) => {
                    self.peers.record(target, Ok(()));
                    self.check_fingerprint(target, reply.ring_fingerprint);
                    return check_response(target, request, reply.body)
                        .map_err(ForwardFailure::Answer);
                }
                Err(e) if e.may_retry_elsewhere(request.idempotent()) => {
                    if !matches!(e, PeerError::Refused { .. }) {
                        self.peers.record(target, Err(e.to_string()));
                    }
                    last = e.to_string();
                }
                Err(PeerError::Refused { error, .. }) => {
                    self.peers.record(target, Ok(()));
                    return Err(ForwardFailure::Answer(error));
                }
                Err(e) => {
                    self.peers.record(target, Err(e.to_string()));
                    return Err(ForwardFailure::Answer(CoreError::Unavailable {
                        acks: 0,
                        required: 1,
                        detail: format!(
                            "{e}; the write may have been applied there, so its outcome is unknown \
                             (a conditional write or touch is not re-sent elsewhere)"
                        ),
                    }));
                }
            }
        }
        Err(ForwardFailure::Unreachable(last))
    }

    /// Serves a single-key request on this node, which replicates the key.
    async fn serve_here(
        &self,
        p: &Placement,
        request: Request,
        ctx: RequestContext,
    ) -> Result<Response, CoreError> {
        let default = self.config.default_consistency;
        match request {
            Request::Get { key, consistency } => {
                let consistency = consistency.unwrap_or(Consistency::One);
                if consistency.required(p.state.home_rf) <= 1 {
                    let found = self
                        .local_reads(&p.state, std::slice::from_ref(&key), ctx.deadline)
                        .await;
                    Ok(Response::Get(found.into_iter().next().flatten()))
                } else {
                    Ok(Response::Get(
                        self.quorum_read(p, &key, consistency, ctx).await?,
                    ))
                }
            }
            Request::Set { cmd, consistency } => {
                if cmd.condition != Condition::Always {
                    self.settle_before_deciding(p, &cmd.key, ctx).await?;
                }
                let stored = match self.store.set(
                    &cmd.key,
                    &cmd.value,
                    cmd.ttl_ms,
                    cmd.condition,
                    ctx.stamping(cmd.condition == Condition::Always),
                )? {
                    Applied::Done(m) => {
                        self.replicate_durably(p, m, consistency.unwrap_or(default), ctx)
                            .await?;
                        true
                    }
                    Applied::NotApplied => false,
                };
                Ok(Response::Set { stored })
            }
            Request::Delete { key, consistency } => {
                let (deleted, m) =
                    self.store
                        .delete(&key, p.state.home_rf > 1, ctx.stamping(true))?;
                self.replicate_durably(p, m, consistency.unwrap_or(default), ctx)
                    .await?;
                Ok(Response::Delete { deleted })
            }
            Request::Touch {
                key,
                ttl_ms,
                consistency,
            } => {
                self.settle_before_deciding(p, &key, ctx).await?;
                let found = match self.store.touch(&key, ttl_ms, ctx.stamping(false))? {
                    Applied::Done(m) => {
                        self.replicate_durably(p, m, consistency.unwrap_or(default), ctx)
                            .await?;
                        true
                    }
                    Applied::NotApplied => false,
                };
                Ok(Response::Touch { found })
            }
            Request::Update {
                key,
                op,
                consistency,
            } => {
                self.settle_before_deciding(p, &key, ctx).await?;
                let updated = self.store.update(&key, &op, ctx.stamping(false))?;
                if let Some(m) = updated.mutation {
                    self.replicate_durably(p, m, consistency.unwrap_or(default), ctx)
                        .await?;
                }
                Ok(Response::Update {
                    previous: updated.previous,
                    current: updated.current,
                })
            }
            Request::MultiGet { .. } | Request::MultiSet { .. } => Err(CoreError::Internal(
                "a batch reached the single-key path".into(),
            )),
        }
    }

    /// Replicates one mutation applied here and, at the same time, waits until it is as
    /// durable here as the persistence policy promises: a write is acknowledged only once
    /// both are done.
    async fn replicate_durably(
        &self,
        p: &Placement,
        m: Mutation,
        consistency: Consistency,
        ctx: RequestContext,
    ) -> Result<(), CoreError> {
        let (durable, replicated) =
            tokio::join!(self.store.durable(), self.replicate(p, m, consistency, ctx));
        durable?;
        replicated
    }

    /// Replicates one mutation applied here to the key's other replicas.
    async fn replicate(
        &self,
        p: &Placement,
        m: Mutation,
        consistency: Consistency,
        ctx: RequestContext,
    ) -> Result<(), CoreError> {
        let others: Vec<NodeId> = p
            .replicas()
            .filter(|r| **r != self.local)
            .cloned()
            .collect();
        if consistency.required(p.state.home_rf) <= 1 {
            self.enqueue_for_others(&p.state, m);
            return Ok(());
        }
        // QUORUM and ALL count the key's home replicas only (dead ones included), never
        // whoever this node can still see: a minority cannot make a quorum.
        let home = p.state.home_replicas(&m.key);
        let n = home.len();
        let required = consistency.required(n);
        let here = usize::from(home.contains(&self.local));
        let counted = |acked: &[NodeId]| here + acked.iter().filter(|a| home.contains(a)).count();
        let per_peer = others
            .into_iter()
            .map(|peer| (peer, vec![m.clone()]))
            .collect();
        let acked = self
            .replicate_sync(per_peer, |acked| counted(acked) >= required, ctx.deadline)
            .await;
        let acks = counted(&acked);
        if acks < required {
            return Err(CoreError::Unavailable {
                acks,
                required,
                detail: format!(
                    "the write is applied on {acks} of the key's {n} replicas and stays applied there"
                ),
            });
        }
        Ok(())
    }

    /// Sends each peer its mutations now, in parallel, and returns the peers that applied
    /// them as soon as `enough(acked)` holds (or every call ended). Calls still running
    /// finish in the background; a peer whose call fails gets its mutations through the
    /// asynchronous queue, so it converges once it is back.
    async fn replicate_sync(
        &self,
        per_peer: BTreeMap<NodeId, Vec<Mutation>>,
        enough: impl Fn(&[NodeId]) -> bool,
        deadline: Instant,
    ) -> Vec<NodeId> {
        let mut acked = Vec::new();
        if per_peer.is_empty() || enough(&acked) {
            for (peer, mutations) in per_peer {
                for m in mutations {
                    self.replicator.enqueue(&peer, m);
                }
            }
            return acked;
        }
        let (tx, mut rx) = mpsc::channel(per_peer.len());
        for (peer, mutations) in per_peer {
            let transport = Arc::clone(&self.transport);
            let replicator = Arc::clone(&self.replicator);
            let peers = Arc::clone(&self.peers);
            let call = self.call(deadline);
            let tx = tx.clone();
            self.tracker.spawn(async move {
                let deadline = call.deadline;
                let result = tokio::time::timeout_at(
                    deadline,
                    transport.replicate(&peer, call, mutations.clone()),
                )
                .await;
                let outcome: Result<PeerReply<ApplyReport>, String> = match result {
                    Ok(Ok(reply)) => Ok(reply),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("{peer}: no answer before the deadline")),
                };
                let ok = outcome.is_ok();
                peers.record(&peer, outcome.map(drop));
                if !ok {
                    for m in mutations {
                        replicator.enqueue(&peer, m);
                    }
                }
                // The coordinator may have stopped waiting; that is fine.
                let _ = tx.send((peer, ok)).await;
            });
        }
        drop(tx);
        while let Some((peer, ok)) = rx.recv().await {
            if ok {
                acked.push(peer);
                if enough(&acked) {
                    break;
                }
            }
        }
        acked
    }

    /// A `Quorum`/`All` read coordinated here: the newest version among enough replicas
    /// (this node included), deletes and expiries included; stale replicas repaired.
    async fn quorum_read(
        &self,
        p: &Placement,
        key: &Bytes,
        consistency: Consistency,
        ctx: RequestContext,
    ) -> Result<Option<Lookup>, CoreError> {
        // Counted against the key's home replicas (see `replicate`).
        let home = p.state.home_replicas(key);
        let required = consistency.required(home.len());
        let here = usize::from(home.contains(&self.local));
        let local = self.store.get_versioned(key);
        let mut fetches: FuturesUnordered<_> = p
            .replicas()
            .filter(|r| **r != self.local)
            .map(|peer| {
                let call = self.call(ctx.deadline);
                let deadline = call.deadline;
                let fetch = self.transport.fetch(peer, call, vec![key.clone()]);
                async move {
                    let result = tokio::time::timeout_at(deadline, fetch)
                        .await
                        .unwrap_or_else(|_| {
                            Err(PeerError::NoAnswer {
                                peer: peer.to_string(),
                                detail: "no answer before the deadline".into(),
                            })
                        });
                    (peer.clone(), result)
                }
            })
            .collect();
        let mut answers: Vec<(NodeId, Option<VersionedRead>)> = Vec::new();
        let mut last_error = String::from("no home replica of the key answered");
        let counted = |answers: &[(NodeId, Option<VersionedRead>)]| {
            here + answers
                .iter()
                .filter(|(peer, _)| home.contains(peer))
                .count()
        };
        while counted(&answers) < required {
            let Some((peer, result)) = fetches.next().await else {
                break;
            };
            match result.and_then(|reply| self.check_fetched(&peer, reply, 1)) {
                Ok(mut reads) => {
                    self.peers.record(&peer, Ok(()));
                    answers.push((peer, reads.pop().flatten()));
                }
                Err(e) => {
                    self.peers.record(&peer, Err(e.to_string()));
                    last_error = e.to_string();
                }
            }
        }
        drop(fetches);
        let acks = counted(&answers);
        if acks < required {
            return Err(CoreError::Unavailable {
                acks,
                required,
                detail: format!("quorum read: {last_error}"),
            });
        }
        let version = |r: &Option<VersionedRead>| r.as_ref().map_or(0, VersionedRead::version);
        let mut winner = local.clone();
        for (_, read) in &answers {
            if version(read) > version(&winner) {
                winner = read.clone();
            }
        }
        let Some(winner) = winner else {
            return Ok(None);
        };
        let repair = Mutation {
            key: key.clone(),
            version: winner.version(),
            op: match &winner {
                VersionedRead::Live(l) => MutationOp::Put {
                    value: l.value.clone(),
                    expires_at: l.expires_at,
                },
                VersionedRead::Dead { .. } => MutationOp::Delete,
            },
        };
        if version(&local) < winner.version() {
            self.read_repairs.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.store.apply_replicated(std::slice::from_ref(&repair)) {
                static THROTTLE: crate::LogThrottle =
                    crate::LogThrottle::new(crate::LogThrottle::DEFAULT_INTERVAL);
                THROTTLE.run(|held_back| {
                    tracing::warn!(error = %e, held_back, "read repair of the local copy failed");
                });
            }
        }
        for (peer, read) in &answers {
            if version(read) < winner.version() {
                self.read_repairs.fetch_add(1, Ordering::Relaxed);
                self.replicator.enqueue(peer, repair.clone());
            }
        }
        let now = self.store.now_ms();
        Ok(match winner {
            VersionedRead::Live(l) if l.expires_at.is_none_or(|at| at > now) => Some(l),
            _ => None,
        })
    }

    /// Bounds a fetch answer: the right count, versions within the allowed drift, values
    /// within the limits. A bad answer counts as no answer.
    fn check_fetched(
        &self,
        peer: &NodeId,
        reply: PeerReply<Vec<Option<VersionedRead>>>,
        expected: usize,
    ) -> Result<Vec<Option<VersionedRead>>, PeerError> {
        self.check_fingerprint(peer, reply.ring_fingerprint);
        let bad = |detail: String| PeerError::Unreachable {
            peer: peer.to_string(),
            detail,
        };
        if reply.body.len() != expected {
            return Err(bad(format!(
                "answered {} entries for {expected} keys",
                reply.body.len()
            )));
        }
        let now = self.store.now_ms();
        for read in reply.body.iter().flatten() {
            if let Err(e) = self.store.hlc().check(read.version(), now) {
                return Err(bad(e.to_string()));
            }
            if let VersionedRead::Live(l) = read {
                self.store
                    .limits()
                    .check_value(&l.value)
                    .map_err(|e| bad(e.to_string()))?;
            }
        }
        Ok(reply.body)
    }

    /// Groups a batch's keys (by index) under the node that handles each: this node for the
    /// keys it serves (primary, or any replica for a forwarded batch), else each key's
    /// primary. A forwarded batch with a key this node does not replicate is refused whole.
    fn group_by_coordinator<'k>(
        &self,
        state: &Arc<RingState>,
        keys: impl Iterator<Item = &'k Bytes>,
        ctx: RequestContext,
    ) -> Result<BTreeMap<NodeId, Vec<usize>>, CoreError> {
        let mut groups: BTreeMap<NodeId, Vec<usize>> = BTreeMap::new();
        for (i, k) in keys.enumerate() {
            let p = self.place(state, k);
            if p.is_primary() || (ctx.forwarded && p.is_replica()) {
                groups.entry(self.local.clone()).or_default().push(i);
            } else if ctx.forwarded {
                return Err(self.wrong_owner(state));
            } else {
                // The primary, unless a recent call to it failed: then the first replica
                // that is healthy (or this node, if it is one), as a single request would.
                let Some(target) = p
                    .replicas()
                    .find(|r| **r == self.local || !self.unhealthy(r))
                    .or_else(|| p.primary())
                else {
                    return Err(CoreError::Unavailable {
                        acks: 0,
                        required: 1,
                        detail: "the ring has no member to serve this key".into(),
                    });
                };
                groups.entry(target.clone()).or_default().push(i);
            }
        }
        Ok(groups)
    }

    /// The one scatter/gather: runs `per_target(target, indexes)` for every group at once
    /// and places each group's answers at their indexes. A group answering the wrong
    /// number of results is an error.
    async fn scatter<R, F, Fut>(
        groups: BTreeMap<NodeId, Vec<usize>>,
        per_target: F,
        results: &mut [Option<R>],
    ) -> Result<(), CoreError>
    where
        F: Fn(NodeId, Vec<usize>) -> Fut,
        Fut: Future<Output = Result<Vec<R>, CoreError>>,
    {
        let calls = groups.into_iter().map(|(target, idx)| {
            let fut = per_target(target.clone(), idx.clone());
            async move { (target, idx, fut.await) }
        });
        for (target, idx, answers) in futures_util::future::join_all(calls).await {
            let answers = answers?;
            if answers.len() != idx.len() {
                return Err(unexpected(
                    &target,
                    "a batch with the wrong number of results",
                ));
            }
            for (i, a) in idx.into_iter().zip(answers) {
                results[i] = Some(a);
            }
        }
        Ok(())
    }

    async fn multi_get(
        &self,
        state: &Arc<RingState>,
        keys: Vec<Bytes>,
        ctx: RequestContext,
    ) -> Result<Response, CoreError> {
        let groups = self.group_by_coordinator(state, keys.iter(), ctx)?;
        if groups.len() == 1 && groups.contains_key(&self.local) {
            // Every key is served here (a single node, or a batch routed by the ring): no
            // scatter, no intermediate vectors — this is the hot path of a smart client.
            let found = self.local_reads(state, &keys, ctx.deadline).await;
            return self.check_response_size(found);
        }
        let mut results: Vec<Option<Option<Lookup>>> = vec![None; keys.len()];
        let keys = &keys;
        Self::scatter(
            groups,
            |target, idx| async move {
                let batch: Vec<Bytes> = idx.iter().map(|&i| keys[i].clone()).collect();
                if target == self.local {
                    return Ok(self.local_reads(state, &batch, ctx.deadline).await);
                }
                let request = Request::MultiGet {
                    keys: batch.clone(),
                };
                match self
                    .forward_first(std::slice::from_ref(&target), &request, ctx, false, true)
                    .await
                {
                    Ok(Response::MultiGet(found)) => Ok(found),
                    Ok(_) => Err(unexpected(&target, "another request's response")),
                    Err(ForwardFailure::Answer(e)) => Err(e),
                    // The primary is unreachable: each key goes its own way (next replicas).
                    Err(ForwardFailure::Unreachable(_)) => {
                        let mut out = Vec::with_capacity(batch.len());
                        for key in batch {
                            let p = self.place(state, &key);
                            let request = Request::Get {
                                key,
                                consistency: Some(Consistency::One),
                            };
                            match self.single(&p, request, ctx).await? {
                                Response::Get(found) => out.push(found),
                                _ => return Err(unexpected(&target, "another request's response")),
                            }
                        }
                        Ok(out)
                    }
                }
            },
            &mut results,
        )
        .await?;
        self.check_response_size(results.into_iter().map(Option::flatten).collect())
    }

    /// A `MultiGet` answer, unless its values add up to more than a response may carry.
    fn check_response_size(&self, found: Vec<Option<Lookup>>) -> Result<Response, CoreError> {
        let total: usize = found.iter().flatten().map(|l| l.value.len()).sum();
        let max = self.store.limits().max_response_bytes();
        if total > max {
            return Err(CoreError::TooLarge(format!(
                "values add up to {total} bytes, over the response limit of {max} bytes; split the batch"
            )));
        }
        Ok(Response::MultiGet(found))
    }

    async fn multi_set(
        &self,
        state: &Arc<RingState>,
        entries: Vec<SetCommand>,
        consistency: Consistency,
        ctx: RequestContext,
    ) -> Result<Response, CoreError> {
        let groups = self.group_by_coordinator(state, entries.iter().map(|e| &e.key), ctx)?;
        if groups.len() == 1
            && let Some(idx) = groups.get(&self.local)
        {
            // Every entry is coordinated here: no scatter.
            let stored = self
                .multi_set_here(state, &entries, idx, consistency, ctx)
                .await?;
            return Ok(Response::MultiSet(stored));
        }
        let mut results: Vec<Option<bool>> = vec![None; entries.len()];
        let entries = &entries;
        Self::scatter(
            groups,
            |target, idx| async move {
                if target == self.local {
                    return self
                        .multi_set_here(state, entries, &idx, consistency, ctx)
                        .await;
                }
                let request = Request::MultiSet {
                    entries: idx.iter().map(|&i| entries[i].clone()).collect(),
                    consistency: Some(consistency),
                };
                match self
                    .forward_first(std::slice::from_ref(&target), &request, ctx, false, true)
                    .await
                {
                    Ok(Response::MultiSet(stored)) => Ok(stored),
                    Ok(_) => Err(unexpected(&target, "another request's response")),
                    Err(ForwardFailure::Answer(e)) => Err(e),
                    // The primary is unreachable (or did nothing, or the batch is
                    // idempotent): each entry goes its own way (the next replica coordinates).
                    Err(ForwardFailure::Unreachable(_)) => {
                        let mut out = Vec::with_capacity(idx.len());
                        for &i in &idx {
                            let p = self.place(state, &entries[i].key);
                            let request = Request::Set {
                                cmd: entries[i].clone(),
                                consistency: Some(consistency),
                            };
                            match self.single(&p, request, ctx).await? {
                                Response::Set { stored } => out.push(stored),
                                _ => return Err(unexpected(&target, "another request's response")),
                            }
                        }
                        Ok(out)
                    }
                }
            },
            &mut results,
        )
        .await?;
        Ok(Response::MultiSet(
            results.into_iter().map(|r| r.unwrap_or(false)).collect(),
        ))
    }

    /// Coordinates the entries at `idx` here: applies each, then replicates them with one
    /// call per peer; every key must reach its required acknowledgements.
    async fn multi_set_here(
        &self,
        state: &Arc<RingState>,
        entries: &[SetCommand],
        idx: &[usize],
        consistency: Consistency,
        ctx: RequestContext,
    ) -> Result<Vec<bool>, CoreError> {
        let mut stored = Vec::with_capacity(idx.len());
        let mut per_peer: BTreeMap<NodeId, Vec<Mutation>> = BTreeMap::new();
        // For each applied key: its home replicas (what QUORUM and ALL count, see
        // `replicate`) and how many of them must have it.
        let mut needs: Vec<(Vec<NodeId>, usize)> = Vec::new();
        for (n, &i) in idx.iter().enumerate() {
            let e = &entries[i];
            if e.condition != Condition::Always {
                let p = self.place(state, &e.key);
                self.settle_before_deciding(&p, &e.key, ctx).await?;
            }
            let applied = self
                .store
                .set(
                    &e.key,
                    &e.value,
                    e.ttl_ms,
                    e.condition,
                    ctx.stamping_of_entry(i, e.condition == Condition::Always)?,
                )
                .map_err(|err| match err {
                    CoreError::Full(m) => CoreError::Full(format!(
                        "entry {n} failed; earlier entries may be applied: {m}"
                    )),
                    other => other,
                })?;
            match applied {
                Applied::Done(m) => {
                    let p = self.place(state, &e.key);
                    let routed: Vec<NodeId> = p.replicas().cloned().collect();
                    // The routed replicas, and the home replicas that look dead (see
                    // `enqueue_for_others`: a failed call leaves a hint for them).
                    let others = routed
                        .iter()
                        .filter(|r| **r != self.local)
                        .cloned()
                        .chain(state.home_extra(&e.key, &routed, &self.local));
                    for peer in others {
                        per_peer.entry(peer).or_default().push(m.clone());
                    }
                    if consistency.required(state.home_rf) > 1 {
                        let home = state.home_replicas(&e.key);
                        let required = consistency.required(home.len());
                        needs.push((home, required));
                    }
                    stored.push(true);
                }
                Applied::NotApplied => stored.push(false),
            }
        }
        let counted = |home: &[NodeId], acked: &[NodeId]| {
            home.iter()
                .filter(|h| **h == self.local || acked.contains(h))
                .count()
        };
        let satisfied = |acked: &[NodeId]| {
            needs
                .iter()
                .all(|(home, required)| counted(home, acked) >= *required)
        };
        let (durable, acked) = tokio::join!(
            self.store.durable(),
            self.replicate_sync(per_peer, satisfied, ctx.deadline)
        );
        durable?;
        for (home, required) in &needs {
            let acks = counted(home, &acked);
            if acks < *required {
                return Err(CoreError::Unavailable {
                    acks,
                    required: *required,
                    detail: format!(
                        "a write of this batch is applied on {acks} of its key's {} replicas; applied entries stay applied",
                        home.len()
                    ),
                });
            }
        }
        Ok(stored)
    }

    // ----- peer ingress ---------------------------------------------------------------

    /// A request forwarded by `call.from`: served here, never forwarded again.
    pub async fn handle_forward(
        &self,
        call: PeerCall,
        request: Request,
    ) -> Result<Response, CoreError> {
        self.check_fingerprint(&call.from, call.ring_fingerprint);
        // The sender's wall-clock deadline bounds this one too: a call read late (this
        // node was paused) gets only what is left of it, not a fresh relative timeout.
        let deadline = match call.not_after_ms {
            Some(by) => {
                let left = Duration::from_millis(by.saturating_sub(self.store.now_ms()));
                call.deadline.min(Instant::now() + left)
            }
            None => call.deadline,
        };
        self.handle(
            request,
            RequestContext {
                deadline,
                forwarded: true,
                not_after_ms: call.not_after_ms,
                version: call.version,
            },
        )
        .await
    }

    /// Mutations replicated by `call.from`, applied by last writer wins after every entry
    /// was checked (see [`Store::apply_replicated`]), acknowledged once they are as durable
    /// as the persistence policy promises.
    pub async fn handle_replicate(
        &self,
        call: &PeerCall,
        mutations: &[Mutation],
    ) -> Result<ApplyReport, CoreError> {
        self.check_fingerprint(&call.from, call.ring_fingerprint);
        if mutations.len() > crate::replication::MAX_MUTATIONS_PER_CALL {
            return Err(CoreError::TooLarge(format!(
                "{} mutations in one call, over the limit of {}",
                mutations.len(),
                crate::replication::MAX_MUTATIONS_PER_CALL
            )));
        }
        let report = self.store.apply_replicated(mutations)?;
        self.store.durable().await?;
        Ok(report)
    }

    /// Versioned reads for `call.from`'s quorum read or repair.
    pub fn handle_fetch(
        &self,
        call: &PeerCall,
        keys: &[Bytes],
    ) -> Result<Vec<Option<VersionedRead>>, CoreError> {
        self.check_fingerprint(&call.from, call.ring_fingerprint);
        let limits = self.store.limits();
        limits.check_batch(keys.len())?;
        keys.iter().try_for_each(|k| limits.check_key(k))?;
        Ok(keys.iter().map(|k| self.store.get_versioned(k)).collect())
    }
}

/// What a client request gets before this node has joined its cluster.
fn not_joined() -> CoreError {
    CoreError::Unavailable {
        acks: 0,
        required: 1,
        detail:
            "this node has not joined its cluster yet (no seed answered): retry on another node"
                .into(),
    }
}

/// A forwarded request's answer must be of the request's kind and size.
fn check_response(
    peer: &NodeId,
    request: &Request,
    response: Response,
) -> Result<Response, CoreError> {
    let ok = match (request, &response) {
        (Request::Get { .. }, Response::Get(_))
        | (Request::Set { .. }, Response::Set { .. })
        | (Request::Delete { .. }, Response::Delete { .. })
        | (Request::Touch { .. }, Response::Touch { .. })
        | (Request::Update { .. }, Response::Update { .. }) => true,
        (Request::MultiGet { keys }, Response::MultiGet(r)) => keys.len() == r.len(),
        (Request::MultiSet { entries, .. }, Response::MultiSet(r)) => entries.len() == r.len(),
        _ => false,
    };
    if ok {
        Ok(response)
    } else {
        Err(unexpected(
            peer,
            "a response that does not match the request",
        ))
    }
}
