//! Asynchronous replication: one bounded, batching queue per peer, drained by one owned task
//! per peer (not one task per write).
//!
//! A full queue drops the mutation and counts it; a failed batch is counted as dropped too
//! (hinted handoff and anti-entropy, later, make these good). On shutdown the queues stop
//! accepting, each sender delivers what is queued until the drain deadline, and whatever is
//! left is counted as dropped: no loss is silent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

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
}

struct Queued {
    mutation: Mutation,
    at: Instant,
}

struct PeerQueue {
    tx: mpsc::Sender<Queued>,
    counters: Arc<QueueCounters>,
}

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
        }
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
}

impl<T: PeerTransport> Sender<T> {
    async fn run(self, mut rx: mpsc::Receiver<Queued>) {
        let mut batch = Vec::new();
        // Normal operation: wait for a mutation, take what else is ready, send.
        loop {
            let held = self.held.lock().take();
            let first = match held {
                Some(q) => Some(q),
                None => tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => break,
                    q = rx.recv() => q,
                },
            };
            let Some(first) = first else { break };
            batch.push(first);
            self.fill(&mut rx, &mut batch);
            let deadline = Instant::now() + self.config.peer_timeout;
            self.send(&mut batch, deadline).await;
        }
        // Shutdown: deliver what is queued until the drain deadline; count the rest.
        rx.close();
        let until = self.drain_until.lock().unwrap_or_else(Instant::now);
        loop {
            self.fill(&mut rx, &mut batch);
            if batch.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= until {
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
            self.send(&mut batch, deadline).await;
        }
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

    async fn send(&self, batch: &mut Vec<Queued>, deadline: Instant) {
        let n = batch.len() as u64;
        let oldest = batch
            .iter()
            .map(|q| q.at)
            .min()
            .unwrap_or_else(Instant::now);
        let mutations = batch.drain(..).map(|q| q.mutation).collect();
        let call = PeerCall {
            from: self.local.clone(),
            ring_fingerprint: self.ring.load().ring.fingerprint(),
            deadline,
        };
        let sent = tokio::time::timeout_at(
            deadline,
            self.transport.replicate(&self.peer, call, mutations),
        )
        .await;
        match sent {
            Ok(Ok(_)) => {
                self.counters.sent.fetch_add(n, Ordering::Relaxed);
                let lag = u64::try_from(oldest.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.counters.lag_ms.store(lag, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                self.counters.dropped.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(peer = %self.peer, mutations = n, error = %e, "replication batch dropped");
            }
            Err(_) => {
                self.counters.dropped.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(peer = %self.peer, mutations = n, "replication batch dropped: no answer before the deadline");
            }
        }
    }
}
