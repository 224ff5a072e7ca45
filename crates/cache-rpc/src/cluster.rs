//! The node's view of the cluster and its node-to-node machinery: the current ring (rebuilt
//! from each membership view and swapped in atomically), the pooled peer channels, the
//! hybrid logical clock that issues versions, the per-peer asynchronous replication queues,
//! and the apply path for replicated entries.
//!
//! It never decides *what* a request means — that is `service.rs` — only who owns a key,
//! how to reach them, and how versioned entries travel and land.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use cache_core::{Cache, DeleteOutcome, WriteOptions, WriteOutcome};
use cache_proto::v1::{self as pb, cache_client::CacheClient, peer_client::PeerClient};
use cluster_membership::{Membership, MembershipView};
use cluster_ring::{DEFAULT_VNODES_PER_WEIGHT, Member as RingMember, NodeId, Ring};
use metrics::{Counter, Gauge};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::metrics::NodeMetrics;

/// Write (and read) consistency of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// The coordinator alone; other replicas asynchronously.
    One,
    /// A majority of the key's replicas.
    Quorum,
    /// Every replica of the key.
    All,
}

impl Consistency {
    /// Replicas that must apply a write (coordinator included) out of `n`.
    pub fn required(self, n: usize) -> usize {
        match self {
            Consistency::One => 1,
            Consistency::Quorum => n / 2 + 1,
            Consistency::All => n,
        }
    }

    /// From the wire value; `DEFAULT` (and unknown values) give `default`.
    pub fn from_pb(raw: i32, default: Consistency) -> Consistency {
        match pb::Consistency::try_from(raw) {
            Ok(pb::Consistency::One) => Consistency::One,
            Ok(pb::Consistency::Quorum) => Consistency::Quorum,
            Ok(pb::Consistency::All) => Consistency::All,
            _ => default,
        }
    }

    /// Parses `one`, `quorum`, `all`.
    pub fn parse(s: &str) -> Option<Consistency> {
        match s.to_ascii_lowercase().as_str() {
            "one" => Some(Consistency::One),
            "quorum" => Some(Consistency::Quorum),
            "all" => Some(Consistency::All),
            _ => None,
        }
    }
}

/// Hybrid logical clock issuing write versions: 48 bits of unix milliseconds, 8 bits of
/// logical counter, 8 bits of node tag (a hash of the node id). Versions from one node
/// strictly increase; two nodes writing in the same millisecond with the same counter differ
/// by their tag, so ties are broken by node, deterministically. When the 8-bit counter runs
/// out within a millisecond the clock borrows the next millisecond, as HLCs do.
#[derive(Debug)]
pub struct Hlc {
    last: AtomicU64,
    tag: u64,
}

impl Hlc {
    /// A clock for node `node_id`.
    pub fn new(node_id: &str) -> Self {
        Self {
            last: AtomicU64::new(0),
            tag: cluster_ring::key_hash(node_id.as_bytes()) & 0xff,
        }
    }

    /// The next version at wall-clock time `now_ms`.
    pub fn next(&self, now_ms: u64) -> u64 {
        let physical = (now_ms & ((1 << 48) - 1)) << 16;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let base = last & !0xff;
            let candidate = if physical > base {
                physical
            } else {
                base + 0x100
            };
            let version = candidate | self.tag;
            match self.last.compare_exchange_weak(
                last,
                version,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return version,
                Err(seen) => last = seen,
            }
        }
    }

    /// Moves the clock past a version seen from another node (the HLC receive rule), so
    /// this node's next write orders after what it has applied.
    pub fn observe(&self, version: u64) {
        self.last.fetch_max(version & !0xff, Ordering::Relaxed);
    }
}

/// The ring and everything derived from one membership view.
#[derive(Debug)]
pub struct RingState {
    /// The ring of key-owning members.
    pub ring: Ring,
    /// The membership epoch it was built from.
    pub epoch: u64,
    /// Every member (any state), for `ClusterInfo` and `/status`.
    pub view: MembershipView,
    /// Replication factor in effect: the configured one capped at the owner count.
    pub replication_factor: usize,
}

impl RingState {
    fn build(view: MembershipView, configured_rf: usize) -> Result<Self, cluster_ring::RingError> {
        let owners: Vec<RingMember> = view
            .owners()
            .map(|m| Ok(RingMember::new(NodeId::new(m.id.clone())?, m.weight)))
            .collect::<Result<_, cluster_ring::RingError>>()?;
        let ring = Ring::new(owners, DEFAULT_VNODES_PER_WEIGHT)?.with_epoch(view.epoch);
        let replication_factor = configured_rf.clamp(1, ring.members().len());
        Ok(Self {
            ring,
            epoch: view.epoch,
            view,
            replication_factor,
        })
    }

    /// The ids of `key`'s replicas, primary first (cheap `Arc` clones, no string copies:
    /// this runs on every request).
    pub fn replicas(&self, key: &[u8]) -> Vec<NodeId> {
        self.ring
            .replicas(key, self.replication_factor)
            .into_iter()
            .map(|m| m.id.clone())
            .collect()
    }

    /// The gRPC address of member `id`.
    pub fn addr(&self, id: &str) -> Option<SocketAddr> {
        self.view.member(id).map(|m| m.rpc_addr)
    }
}

/// Health of the channel to one peer, for `/status`.
#[derive(Debug, Clone, Default)]
pub struct PeerHealth {
    /// Successful calls.
    pub ok: u64,
    /// Failed calls.
    pub failed: u64,
    /// The last failure, if the last call failed.
    pub last_error: Option<String>,
}

/// One replicated entry waiting in a queue, with when it was queued (for the lag metric).
struct Queued {
    entry: pb::ReplicatedEntry,
    at: Instant,
}

/// A peer's outgoing replication queue and its metrics.
struct PeerQueue {
    tx: mpsc::Sender<Queued>,
    dropped: Counter,
    capacity: usize,
}

/// Cluster settings from the node's configuration.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Replicas per key (capped at the member count).
    pub replication_factor: usize,
    /// Consistency of requests that do not name one.
    pub default_consistency: Consistency,
    /// Deadline of every call to a peer.
    pub peer_timeout: Duration,
    /// Entries each per-peer asynchronous replication queue holds before dropping.
    pub queue_capacity: usize,
    /// Most entries sent in one `Replicate` call.
    pub batch_max: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            replication_factor: 3,
            default_consistency: Consistency::One,
            peer_timeout: Duration::from_secs(1),
            queue_capacity: 65_536,
            batch_max: 512,
        }
    }
}

/// The node's cluster machinery. One per node, shared by the service and `/status`.
pub struct Cluster {
    /// This node's id.
    pub local_id: String,
    /// Settings.
    pub config: ClusterConfig,
    state: ArcSwap<RingState>,
    channels: Mutex<HashMap<String, (SocketAddr, Channel)>>,
    health: Mutex<HashMap<String, PeerHealth>>,
    queues: Mutex<HashMap<String, Arc<PeerQueue>>>,
    /// Issues write versions.
    pub hlc: Hlc,
    metrics: Arc<NodeMetrics>,
    /// Ring fingerprints seen from peers that differ from ours: peer id → fingerprint.
    mismatches: Mutex<HashMap<String, u64>>,
    /// Keeps the membership (and so its background work) alive.
    _membership: Arc<dyn Membership>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("local_id", &self.local_id)
            .field("epoch", &self.state.load().epoch)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Builds the ring from the membership's current view and starts following it.
    /// Must be called inside a tokio runtime.
    pub fn start(
        membership: Arc<dyn Membership>,
        config: ClusterConfig,
        metrics: Arc<NodeMetrics>,
    ) -> Result<Arc<Self>, cluster_ring::RingError> {
        let mut rx = membership.view();
        let first = rx.borrow_and_update().clone();
        let local_id = membership.local_id().to_string();
        let cluster = Arc::new(Self {
            hlc: Hlc::new(&local_id),
            local_id,
            state: ArcSwap::from_pointee(RingState::build(first, config.replication_factor)?),
            config,
            channels: Mutex::new(HashMap::new()),
            health: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
            metrics,
            mismatches: Mutex::new(HashMap::new()),
            _membership: membership,
        });
        let weak = Arc::downgrade(&cluster);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let view = rx.borrow_and_update().clone();
                let Some(cluster) = weak.upgrade() else {
                    return;
                };
                match RingState::build(view, cluster.config.replication_factor) {
                    Ok(state) => {
                        tracing::info!(
                            epoch = state.epoch,
                            members = state.ring.members().len(),
                            "membership changed: new ring"
                        );
                        cluster.state.store(Arc::new(state));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "membership view has no usable ring; keeping the previous one")
                    }
                }
            }
        });
        Ok(cluster)
    }

    /// The current ring state (cheap: an `Arc` load).
    pub fn state(&self) -> Arc<RingState> {
        self.state.load_full()
    }

    /// The pooled channel to peer `id`: one multiplexed HTTP/2 connection per peer, created
    /// lazily, replaced if the peer's address changes.
    pub fn channel(&self, id: &str) -> Option<Channel> {
        let addr = self.state.load().addr(id)?;
        let mut channels = self.channels.lock();
        if let Some((a, ch)) = channels.get(id)
            && *a == addr
        {
            return Some(ch.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(self.config.peer_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(self.config.peer_timeout.max(Duration::from_secs(1)))
            .keep_alive_while_idle(true);
        let channel = endpoint.connect_lazy();
        channels.insert(id.to_string(), (addr, channel.clone()));
        Some(channel)
    }

    /// A `Cache` client to peer `id` (for forwarding).
    pub fn cache_client(&self, id: &str) -> Option<CacheClient<Channel>> {
        self.channel(id).map(CacheClient::new)
    }

    /// A `Peer` client to peer `id`.
    pub fn peer_client(&self, id: &str) -> Option<PeerClient<Channel>> {
        self.channel(id).map(PeerClient::new)
    }

    /// Records the outcome of a call to `peer`.
    pub fn record_peer(&self, peer: &str, result: Result<(), String>) {
        let mut health = self.health.lock();
        let h = health.entry(peer.to_string()).or_default();
        match result {
            Ok(()) => {
                h.ok += 1;
                h.last_error = None;
            }
            Err(e) => {
                h.failed += 1;
                h.last_error = Some(e);
            }
        }
    }

    /// Peer channel health, by peer id.
    pub fn peer_health(&self) -> Vec<(String, PeerHealth)> {
        let mut v: Vec<_> = self
            .health
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Notes the ring fingerprint a peer reported; logs and counts a mismatch.
    pub fn check_fingerprint(&self, peer: &str, theirs: u64) {
        let ours = self.state.load().ring.fingerprint();
        if theirs == 0 || theirs == ours {
            self.mismatches.lock().remove(peer);
            return;
        }
        self.metrics.fingerprint_mismatch();
        let first = self.mismatches.lock().insert(peer.to_string(), theirs) != Some(theirs);
        if first {
            tracing::error!(
                peer,
                ours = format_args!("{ours:016x}"),
                theirs = format_args!("{theirs:016x}"),
                "RING MISMATCH: this peer builds a different ring from its member list; \
                 every node must be started with the same --peers"
            );
        }
    }

    /// Peers whose ring fingerprint differs from ours: (peer, their fingerprint).
    pub fn mismatches(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .mismatches
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        v.sort();
        v
    }

    /// Queues `entry` for asynchronous replication to `peer`. Never blocks: a full queue
    /// drops the entry and counts it in `cache_replication_dropped_total{peer}`.
    pub fn enqueue(self: &Arc<Self>, peer: &str, entry: pb::ReplicatedEntry) {
        let queue = self.queue(peer);
        if queue
            .tx
            .try_send(Queued {
                entry,
                at: Instant::now(),
            })
            .is_err()
        {
            queue.dropped.increment(1);
        }
    }

    /// Depth and capacity of each peer's replication queue.
    pub fn queue_depths(&self) -> Vec<(String, usize, usize)> {
        let mut v: Vec<_> = self
            .queues
            .lock()
            .iter()
            .map(|(k, q)| (k.clone(), q.capacity - q.tx.capacity(), q.capacity))
            .collect();
        v.sort();
        v
    }

    fn queue(self: &Arc<Self>, peer: &str) -> Arc<PeerQueue> {
        let mut queues = self.queues.lock();
        if let Some(q) = queues.get(peer) {
            return Arc::clone(q);
        }
        let (tx, rx) = mpsc::channel(self.config.queue_capacity);
        let labels = self.metrics.replication_series(peer);
        let queue = Arc::new(PeerQueue {
            tx,
            dropped: labels.dropped.clone(),
            capacity: self.config.queue_capacity,
        });
        queues.insert(peer.to_string(), Arc::clone(&queue));
        tokio::spawn(sender(Arc::downgrade(self), peer.to_string(), rx, labels));
        queue
    }

    /// Sends `entries` to `peer` now and waits (bounded by the peer timeout).
    pub async fn replicate_now(
        &self,
        peer: &str,
        entries: Vec<pb::ReplicatedEntry>,
    ) -> Result<(), String> {
        let Some(mut client) = self.peer_client(peer) else {
            return Err(format!("unknown peer {peer}"));
        };
        let mut req = tonic::Request::new(pb::ReplicateRequest {
            from: self.local_id.clone(),
            ring_fingerprint: self.state.load().ring.fingerprint(),
            entries,
        });
        req.set_timeout(self.config.peer_timeout);
        let result =
            match tokio::time::timeout(self.config.peer_timeout, client.replicate(req)).await {
                Ok(Ok(resp)) => {
                    self.check_fingerprint(peer, resp.get_ref().ring_fingerprint);
                    Ok(())
                }
                Ok(Err(status)) => Err(format!("{}: {}", peer, status.message())),
                Err(_) => Err(format!(
                    "{peer}: no answer within {:?}",
                    self.config.peer_timeout
                )),
            };
        self.record_peer(peer, result.clone());
        result
    }
}

/// Per-peer replication metric handles.
#[derive(Clone)]
pub struct ReplicationSeries {
    /// `cache_replication_dropped_total{peer}`
    pub dropped: Counter,
    /// `cache_replication_sent_total{peer}`
    pub sent: Counter,
    /// `cache_replication_queue_depth{peer}`
    pub depth: Gauge,
    /// `cache_replication_lag_seconds{peer}`: age of the oldest entry of the last batch sent.
    pub lag: Gauge,
}

/// Drains one peer's queue: waits for an entry, takes up to `batch_max` more without
/// waiting, sends them in one `Replicate` call. A failed call drops the batch (counted).
async fn sender(
    cluster: std::sync::Weak<Cluster>,
    peer: String,
    mut rx: mpsc::Receiver<Queued>,
    m: ReplicationSeries,
) {
    let mut batch: Vec<Queued> = Vec::new();
    while let Some(first) = rx.recv().await {
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        batch.clear();
        batch.push(first);
        while batch.len() < cluster.config.batch_max {
            match rx.try_recv() {
                Ok(q) => batch.push(q),
                Err(_) => break,
            }
        }
        m.depth.set(rx.len() as f64);
        let oldest = batch
            .iter()
            .map(|q| q.at)
            .min()
            .unwrap_or_else(Instant::now);
        let n = batch.len() as u64;
        let entries = batch.drain(..).map(|q| q.entry).collect();
        match cluster.replicate_now(&peer, entries).await {
            Ok(()) => {
                m.sent.increment(n);
                m.lag.set(oldest.elapsed().as_secs_f64());
            }
            Err(e) => {
                m.dropped.increment(n);
                tracing::warn!(peer, entries = n, error = %e, "replication batch dropped");
            }
        }
    }
}

/// A replicated entry for a write of `key` = `value` at `version`.
pub fn write_entry(
    key: Bytes,
    value: Bytes,
    version: u64,
    expires_at: Option<u64>,
) -> pb::ReplicatedEntry {
    pb::ReplicatedEntry {
        key,
        value,
        version,
        expires_at_ms: expires_at.unwrap_or(0),
        tombstone: false,
    }
}

/// A replicated entry for a delete of `key` at `version`.
pub fn delete_entry(key: Bytes, version: u64) -> pb::ReplicatedEntry {
    pb::ReplicatedEntry {
        key,
        value: Bytes::new(),
        version,
        expires_at_ms: 0,
        tombstone: true,
    }
}

/// Applies replicated entries to `cache` by last-writer-wins on their versions; returns
/// (applied, stale). Order and duplicates do not change the final state: that is what lets
/// asynchronous replication converge. An entry the engine cannot hold (too large for a
/// shard) is reported as an error string.
pub fn apply_replicated(
    cache: &Cache,
    entries: &[pb::ReplicatedEntry],
) -> Result<(u32, u32), String> {
    let (mut applied, mut stale) = (0u32, 0u32);
    for e in entries {
        if e.key.is_empty() {
            return Err("replicated entry with an empty key".into());
        }
        let fresh = if e.tombstone {
            cache.delete_versioned(&e.key, e.version) != DeleteOutcome::Stale
        } else {
            let mut opts = WriteOptions::versioned(e.version);
            if e.expires_at_ms != 0 {
                opts = opts.expires_at(e.expires_at_ms);
            }
            cache
                .write(&e.key, &e.value, opts)
                .map_err(|err| err.to_string())?
                != WriteOutcome::Stale
        };
        if fresh {
            applied += 1;
        } else {
            stale += 1;
        }
    }
    Ok((applied, stale))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cache_core::{CacheConfig, ScanCursor};
    use proptest::prelude::*;

    #[test]
    fn hlc_versions_increase_and_carry_the_node_tag() {
        let hlc = Hlc::new("node-a");
        let mut last = 0;
        for now in [1000, 1000, 1000, 999, 1001] {
            let v = hlc.next(now);
            assert!(v > last, "{v} after {last}");
            assert_eq!(v & 0xff, hlc.tag);
            last = v;
        }
        hlc.observe(5000 << 16);
        assert!(
            hlc.next(1002) > 5000 << 16,
            "observed versions push the clock forward"
        );
        // 300 writes in one millisecond borrow from the next millisecond.
        let hlc = Hlc::new("node-b");
        let versions: Vec<u64> = (0..300).map(|_| hlc.next(7)).collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn consistency_counts() {
        assert_eq!(Consistency::One.required(3), 1);
        assert_eq!(Consistency::Quorum.required(3), 2);
        assert_eq!(Consistency::Quorum.required(2), 2);
        assert_eq!(Consistency::All.required(3), 3);
    }

    fn state(cache: &Cache) -> Vec<(Vec<u8>, Vec<u8>, u64)> {
        let mut out = Vec::new();
        let mut cursor = Some(ScanCursor::default());
        while let Some(c) = cursor {
            let (entries, next) = cache.scan(c, 64);
            out.extend(
                entries
                    .into_iter()
                    .map(|e| (e.key.to_vec(), e.value.to_vec(), e.version)),
            );
            cursor = next;
        }
        out.sort();
        out
    }

    fn entry_strategy() -> impl Strategy<Value = pb::ReplicatedEntry> {
        (0u8..4, 1u64..40, any::<bool>()).prop_map(|(k, version, tombstone)| {
            // A version names one write, as the HLC guarantees: the same version always
            // carries the same content.
            let version = version * 2 + u64::from(tombstone);
            pb::ReplicatedEntry {
                key: Bytes::from(vec![b'k', k]),
                value: if tombstone {
                    Bytes::new()
                } else {
                    Bytes::copy_from_slice(&version.to_le_bytes())
                },
                version,
                expires_at_ms: 0,
                tombstone,
            }
        })
    }

    proptest! {
        /// Reordered and duplicated replication batches end in the same state everywhere.
        #[test]
        fn replicas_converge_whatever_the_order(
            entries in prop::collection::vec(entry_strategy(), 1..40),
            seeds in prop::collection::vec(any::<u64>(), 3),
        ) {
            let reference = Cache::new(CacheConfig::new().with_max_bytes(1 << 20)).expect("valid");
            apply_replicated(&reference, &entries).expect("applies");
            for seed in seeds {
                // A different order, with some entries delivered twice, split into batches.
                let mut shuffled: Vec<pb::ReplicatedEntry> = entries.clone();
                shuffled.extend(entries.iter().step_by(3).cloned());
                let mut x = seed | 1;
                for i in (1..shuffled.len()).rev() {
                    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                    shuffled.swap(i, (x % (i as u64 + 1)) as usize);
                }
                let replica = Cache::new(CacheConfig::new().with_max_bytes(1 << 20)).expect("valid");
                for batch in shuffled.chunks(5) {
                    apply_replicated(&replica, batch).expect("applies");
                }
                prop_assert_eq!(state(&replica), state(&reference));
            }
        }
    }
}
