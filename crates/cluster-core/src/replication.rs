//! Asynchronous replication: one bounded, batching queue per peer, drained by one owned task
//! per peer (not one task per write), with **hinted handoff**.
//!
//! A batch the peer did not take (unreachable, no answer, paused) becomes *hints*: kept per
//! key (only the newest version of a key matters under last writer wins), bounded in count
//! and bytes, and delivered in version order when the peer answers again — retried with a
//! backoff from one peer timeout up to eight, and at once after any successful batch. While
//! hints are pending and no retry is due, new batches for that peer join the hints without
//! a call, so a dead peer costs one timeout per retry, not one per batch. A hint that does
//! not fit the bounds, and a full queue, drop the mutation and count it; anti-entropy
//! (see [`crate::sync`]) repairs what was dropped. On shutdown the queues stop accepting,
//! each sender delivers its hints and what is queued until the drain deadline, and whatever
//! is left is counted as dropped: no loss is silent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cluster_ring::NodeId;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::mutation::Mutation;
use crate::ring::RingView;
use crate::transport::{PeerCall, PeerTransport};

/// Most mutations one replicate call may carry: a protocol constant, the same on every
/// node, so a receiver never refuses a sender's batch for its count (its own `--max-batch`
/// is for client requests).
pub const MAX_MUTATIONS_PER_CALL: usize = 4096;

/// Replication queue settings.
#[derive(Debug, Clone, Copy)]
pub struct ReplicationConfig {
    /// Mutations each per-peer queue holds before dropping.
    pub queue_capacity: usize,
    /// Most mutations sent in one replicate call (capped at [`MAX_MUTATIONS_PER_CALL`]).
    pub batch_max: usize,
    /// Most key and value bytes in one replicate call (a single larger mutation still goes
    /// alone), so a batch stays within the peer message limit.
    pub batch_bytes_max: usize,
    /// Deadline of each replicate call.
    pub peer_timeout: Duration,
    /// Most hints (keys) kept for one unreachable peer.
    pub hint_capacity: usize,
    /// Most key and value bytes of hints kept for one unreachable peer.
    pub hint_bytes_max: usize,
}

/// Counters of one peer's queue (read by `/metrics` and `/status`).
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Mutations delivered.
    pub sent: AtomicU64,
    /// Mutations dropped (queue full, failed batch, or undelivered at shutdown).
    pub dropped: AtomicU64,
    /// Age in milliseconds of the oldest mutation of the last batch delivered.
    pub lag_ms: AtomicU64,
    /// Mutations kept as hints after the peer did not take them.
    pub hints_stored: AtomicU64,
    /// Hints delivered once the peer answered again.
    pub hints_delivered: AtomicU64,
    /// Hints dropped at the bounds (or superseded by a newer hint for the same key: not a
    /// loss, counted separately below).
    pub hints_dropped: AtomicU64,
    /// Hints pending now.
    pub hints_pending: AtomicU64,
}

/// A snapshot of one peer's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStats {
    /// The peer.
    pub peer: NodeId,
    /// Mutations delivered.
    pub sent: u64,
    /// Mutations dropped.
    pub dropped: u64,
    /// Mutations waiting.
    pub depth: usize,
    /// Queue capacity.
    pub capacity: usize,
    /// Age in milliseconds of the oldest mutation of the last batch delivered.
    pub lag_ms: u64,
    /// Mutations kept as hints.
    pub hints_stored: u64,
    /// Hints delivered.
    pub hints_delivered: u64,
    /// Hints dropped at the bounds (anti-entropy repairs them).
    pub hints_dropped: u64,
    /// Hints pending.
    pub hints_pending: u64,
}

struct Queued {
    mutation: Mutation,
    at: Instant,
}

struct PeerQueue {
    tx: mpsc::Sender<Queued>,
    counters: Arc<QueueCounters>,
}

/// Told the outcome of every replicate call to a peer (`Err` with what failed): the
/// coordinator's peer health, so background replication doubles as a health probe.
pub type OutcomeHook = Arc<dyn Fn(&NodeId, Result<(), String>) + Send + Sync>;

/// The per-peer queues and their sender tasks.
pub struct Replicator<T: PeerTransport> {
    local: NodeId,
    transport: Arc<T>,
    ring: Arc<RingView>,
    config: ReplicationConfig,
    queues: Mutex<BTreeMap<NodeId, PeerQueue>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    /// Set once shutdown starts: until when senders may still deliver.
    drain_until: Arc<Mutex<Option<Instant>>>,
    closed: AtomicBool,
    on_outcome: Option<OutcomeHook>,
}

impl<T: PeerTransport> std::fmt::Debug for Replicator<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("local", &self.local)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<T: PeerTransport> Replicator<T> {
    /// Queues for node `local`, sending through `transport`.
    pub fn new(
        local: NodeId,
        transport: Arc<T>,
        ring: Arc<RingView>,
        config: ReplicationConfig,
    ) -> Self {
        Self {
            local,
            transport,
            ring,
            config,
            queues: Mutex::new(BTreeMap::new()),
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
            drain_until: Arc::new(Mutex::new(None)),
            closed: AtomicBool::new(false),
            on_outcome: None,
        }
    }

    /// Reports every replicate call's outcome to `hook`.
    #[must_use]
    pub fn with_outcome_hook(mut self, hook: OutcomeHook) -> Self {
        self.on_outcome = Some(hook);
        self
    }

    /// Queues `mutation` for `peer`. Never blocks; a full queue (or one closed by shutdown)
    /// drops it and counts it. Must be called within a tokio runtime.
    pub fn enqueue(&self, peer: &NodeId, mutation: Mutation) {
        let mut queues = self.queues.lock();
        let queue = queues
            .entry(peer.clone())
            .or_insert_with(|| self.start_queue(peer));
        if self.closed.load(Ordering::Acquire) {
            queue.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let queued = Queued {
            mutation,
            at: Instant::now(),
        };
        if queue.tx.try_send(queued).is_err() {
            queue.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn start_queue(&self, peer: &NodeId) -> PeerQueue {
        let (tx, rx) = mpsc::channel(self.config.queue_capacity.max(1));
        let counters = Arc::new(QueueCounters::default());
        let sender = Sender {
            local: self.local.clone(),
            peer: peer.clone(),
            transport: Arc::clone(&self.transport),
            ring: Arc::clone(&self.ring),
            config: self.config,
            counters: Arc::clone(&counters),
            cancel: self.cancel.clone(),
            drain_until: Arc::clone(&self.drain_until),
            held: Mutex::new(None),
            on_outcome: self.on_outcome.clone(),
            hints_full_log: crate::LogThrottle::default(),
        };
        self.tracker.spawn(sender.run(rx));
        PeerQueue { tx, counters }
    }

    /// Every queue's counters, by peer.
    pub fn stats(&self) -> Vec<QueueStats> {
        self.queues
            .lock()
            .iter()
            .map(|(peer, q)| QueueStats {
                peer: peer.clone(),
                sent: q.counters.sent.load(Ordering::Relaxed),
                dropped: q.counters.dropped.load(Ordering::Relaxed),
                depth: self.config.queue_capacity.max(1) - q.tx.capacity(),
                capacity: self.config.queue_capacity.max(1),
                lag_ms: q.counters.lag_ms.load(Ordering::Relaxed),
                hints_stored: q.counters.hints_stored.load(Ordering::Relaxed),
                hints_delivered: q.counters.hints_delivered.load(Ordering::Relaxed),
                hints_dropped: q.counters.hints_dropped.load(Ordering::Relaxed),
                hints_pending: q.counters.hints_pending.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Stops accepting, lets every sender deliver what is queued until `grace` has passed,
    /// counts the rest as dropped, and waits for the senders to finish.
    pub async fn shutdown(&self, grace: Duration) {
        *self.drain_until.lock() = Some(Instant::now() + grace);
        self.closed.store(true, Ordering::Release);
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// One peer's sender task.
struct Sender<T: PeerTransport> {
    local: NodeId,
    peer: NodeId,
    transport: Arc<T>,
    ring: Arc<RingView>,
    config: ReplicationConfig,
    counters: Arc<QueueCounters>,
    cancel: CancellationToken,
    drain_until: Arc<Mutex<Option<Instant>>>,
    /// A mutation taken from the queue that did not fit the last batch's byte bound.
    held: Mutex<Option<Queued>>,
    on_outcome: Option<OutcomeHook>,
    /// "hints full" can happen on every batch while the peer is down.
    hints_full_log: crate::LogThrottle,
}

/// The hints kept for one peer: the newest mutation per key.
#[derive(Default)]
struct Hints {
    by_key: BTreeMap<Bytes, Mutation>,
    bytes: usize,
}

impl Hints {
    fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Keeps `m` unless a newer version of its key is kept already; `false` if the bounds
    /// leave no room.
    fn add(&mut self, m: Mutation, config: &ReplicationConfig) -> bool {
        if let Some(old) = self.by_key.get(&m.key) {
            if old.version >= m.version {
                return true;
            }
            self.bytes -= old.size();
            self.by_key.remove(&m.key);
        }
        if self.by_key.len() >= config.hint_capacity
            || self.bytes + m.size() > config.hint_bytes_max
        {
            return false;
        }
        self.bytes += m.size();
        self.by_key.insert(m.key.clone(), m);
        true
    }

    /// Every hint, oldest version first.
    fn take_in_version_order(&mut self) -> Vec<Mutation> {
        self.bytes = 0;
        let mut all: Vec<Mutation> = std::mem::take(&mut self.by_key).into_values().collect();
        all.sort_by_key(|m| m.version);
        all
    }
}

impl<T: PeerTransport> Sender<T> {
    async fn run(self, mut rx: mpsc::Receiver<Queued>) {
        let mut batch = Vec::new();
        let mut hints = Hints::default();
        let mut backoff = self.config.peer_timeout;
        let mut retry_at = Instant::now();
        // Normal operation: wait for a mutation (or a hint retry), take what else is ready,
        // send.
        loop {
            let held = self.held.lock().take();
            let first = match held {
                Some(q) => Some(q),
                None => tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => break,
                    () = tokio::time::sleep_until(retry_at), if !hints.is_empty() => {
                        let deadline = Instant::now() + self.config.peer_timeout;
                        if self.deliver_hints(&mut hints, deadline).await {
                            backoff = self.config.peer_timeout;
                        } else {
                            backoff = (backoff * 2).min(self.config.peer_timeout * 8);
                            retry_at = Instant::now() + backoff;
                        }
                        continue;
                    }
                    q = rx.recv() => q,
                },
            };
            let Some(first) = first else { break };
            batch.push(first);
            self.fill(&mut rx, &mut batch);
            if !hints.is_empty() && Instant::now() < retry_at {
                // The peer is down: keep the batch as hints without another timeout.
                let mutations = batch.drain(..).map(|q| q.mutation).collect();
                self.hint(&mut hints, mutations);
                continue;
            }
            let deadline = Instant::now() + self.config.peer_timeout;
            match self.send(&mut batch, deadline).await {
                Ok(()) => {
                    if !hints.is_empty() {
                        // It answers again: hand the hints over now.
                        let deadline = Instant::now() + self.config.peer_timeout;
                        if !self.deliver_hints(&mut hints, deadline).await {
                            retry_at = Instant::now() + backoff;
                        }
                    }
                    backoff = self.config.peer_timeout;
                }
                Err(failed) => {
                    self.hint(&mut hints, failed);
                    retry_at = Instant::now() + backoff;
                }
            }
        }
        // Shutdown: deliver the hints and what is queued until the drain deadline; count
        // the rest.
        rx.close();
        let until = self.drain_until.lock().unwrap_or_else(Instant::now);
        if !hints.is_empty() && Instant::now() < until {
            let deadline = until.min(Instant::now() + self.config.peer_timeout);
            self.deliver_hints(&mut hints, deadline).await;
        }
        loop {
            self.fill(&mut rx, &mut batch);
            if batch.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= until || !hints.is_empty() {
                let left = batch.len() + rx.len() + usize::from(self.held.lock().take().is_some());
                self.counters
                    .dropped
                    .fetch_add(left as u64, Ordering::Relaxed);
                tracing::warn!(
                    peer = %self.peer,
                    mutations = left,
                    "shutdown: replication mutations not delivered within the grace period"
                );
                batch.clear();
                while rx.try_recv().is_ok() {}
                break;
            }
            let deadline = until.min(now + self.config.peer_timeout);
            if let Err(failed) = self.send(&mut batch, deadline).await {
                // No time left to hint them: the peer missed them, counted.
                self.counters
                    .dropped
                    .fetch_add(failed.len() as u64, Ordering::Relaxed);
                tracing::warn!(
                    peer = %self.peer,
                    mutations = failed.len(),
                    "shutdown: replication batch not delivered"
                );
            }
        }
        if !hints.is_empty() {
            let left = hints.len() as u64;
            self.counters.dropped.fetch_add(left, Ordering::Relaxed);
            self.counters
                .hints_dropped
                .fetch_add(left, Ordering::Relaxed);
            self.counters.hints_pending.store(0, Ordering::Relaxed);
            tracing::warn!(
                peer = %self.peer,
                hints = left,
                "shutdown: hints not delivered within the grace period; anti-entropy on the \
                 other replicas repairs them"
            );
        }
    }

    /// Keeps `mutations` as hints for this peer; what does not fit is dropped and counted.
    fn hint(&self, hints: &mut Hints, mutations: Vec<Mutation>) {
        let n = mutations.len() as u64;
        let mut dropped = 0u64;
        for m in mutations {
            if !hints.add(m, &self.config) {
                dropped += 1;
            }
        }
        self.counters
            .hints_stored
            .fetch_add(n - dropped, Ordering::Relaxed);
        if dropped > 0 {
            self.counters.dropped.fetch_add(dropped, Ordering::Relaxed);
            self.counters
                .hints_dropped
                .fetch_add(dropped, Ordering::Relaxed);
            self.hints_full_log.run(|held_back| {
                tracing::warn!(
                    peer = %self.peer,
                    dropped,
                    held_back,
                    "hints full: mutations dropped (anti-entropy repairs them; \
                     cache_hints_dropped_total counts every one)"
                );
            });
        }
        self.counters
            .hints_pending
            .store(hints.len() as u64, Ordering::Relaxed);
    }

    /// Sends every hint, oldest version first, in bounded batches by `deadline` per batch;
    /// `true` if all were delivered. What was not delivered stays a hint.
    async fn deliver_hints(&self, hints: &mut Hints, deadline: Instant) -> bool {
        let all = hints.take_in_version_order();
        let max = self.config.batch_max.clamp(1, MAX_MUTATIONS_PER_CALL);
        let mut rest = all.into_iter().peekable();
        let mut ok = true;
        while rest.peek().is_some() {
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            while let Some(m) = rest.peek() {
                if batch.len() >= max
                    || (!batch.is_empty() && bytes + m.size() > self.config.batch_bytes_max)
                {
                    break;
                }
                bytes += m.size();
                batch.push(rest.next().expect("peeked"));
            }
            let n = batch.len() as u64;
            match self
                .call(
                    batch,
                    deadline.max(Instant::now() + self.config.peer_timeout),
                )
                .await
            {
                Ok(()) => {
                    self.counters
                        .hints_delivered
                        .fetch_add(n, Ordering::Relaxed);
                    self.counters.sent.fetch_add(n, Ordering::Relaxed);
                }
                Err(failed) => {
                    for m in failed.into_iter().chain(rest.by_ref()) {
                        // They fitted before; they fit again.
                        let _ = hints.add(m, &self.config);
                    }
                    ok = false;
                    break;
                }
            }
        }
        self.counters
            .hints_pending
            .store(hints.len() as u64, Ordering::Relaxed);
        if ok {
            tracing::info!(peer = %self.peer, "hints delivered: the peer answers again");
        }
        ok
    }

    /// One replicate call; the mutations back if the peer did not take them.
    async fn call(&self, mutations: Vec<Mutation>, deadline: Instant) -> Result<(), Vec<Mutation>> {
        let call = PeerCall {
            from: self.local.clone(),
            ring_fingerprint: self.ring.load().ring.fingerprint(),
            deadline,
            // Replicated mutations carry their versions: late delivery cannot reorder them.
            not_after_ms: None,
            version: None,
        };
        let sent = tokio::time::timeout_at(
            deadline,
            self.transport
                .replicate(&self.peer, call, mutations.clone()),
        )
        .await;
        let outcome = match sent {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                tracing::debug!(peer = %self.peer, error = %e, "replication batch failed");
                Err(e.to_string())
            }
            Err(_) => {
                tracing::debug!(peer = %self.peer, "replication batch: no answer before the deadline");
                Err("replication: no answer before the deadline".to_string())
            }
        };
        if let Some(hook) = &self.on_outcome {
            hook(&self.peer, outcome.clone());
        }
        outcome.map_err(|_| mutations)
    }

    /// Adds queued mutations to `batch` up to the count and byte bounds. A mutation that
    /// would cross the byte bound waits in `self.held` for the next batch.
    fn fill(&self, rx: &mut mpsc::Receiver<Queued>, batch: &mut Vec<Queued>) {
        let max = self.config.batch_max.clamp(1, MAX_MUTATIONS_PER_CALL);
        let mut bytes: usize = batch.iter().map(|q| q.mutation.size()).sum();
        let mut held = self.held.lock();
        while batch.len() < max {
            let next = match held.take() {
                Some(q) => q,
                None => match rx.try_recv() {
                    Ok(q) => q,
                    Err(_) => break,
                },
            };
            let size = next.mutation.size();
            if !batch.is_empty() && bytes.saturating_add(size) > self.config.batch_bytes_max {
                *held = Some(next);
                break;
            }
            bytes = bytes.saturating_add(size);
            batch.push(next);
        }
    }

    /// Sends `batch` (emptied); the mutations back if the peer did not take them.
    async fn send(&self, batch: &mut Vec<Queued>, deadline: Instant) -> Result<(), Vec<Mutation>> {
        let n = batch.len() as u64;
        let oldest = batch
            .iter()
            .map(|q| q.at)
            .min()
            .unwrap_or_else(Instant::now);
        let mutations = batch.drain(..).map(|q| q.mutation).collect();
        self.call(mutations, deadline).await?;
        self.counters.sent.fetch_add(n, Ordering::Relaxed);
        let lag = u64::try_from(oldest.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.counters.lag_ms.store(lag, Ordering::Relaxed);
        Ok(())
    }
}
