//! Anti-entropy and range sync: how replicas of a key find out they differ and exchange
//! only what differs. One mechanism serves four needs — periodic anti-entropy, a restarted
//! (empty) node catching up, a joining node receiving the ranges it gained, and the
//! survivors of a death restoring the lost copies — because each of them is "the replicas
//! of some keys disagree; make every replica hold the newest version".
//!
//! # The exchange
//!
//! For a pair of nodes A and B with the same ring, the keys both should hold are those
//! whose replica set contains both. A hashes them into [`SEGMENTS`] segments by key hash and
//! keeps, per segment, the XOR of a hash of each `(key, version)` — live values, tombstones
//! and expired values still remembered alike, so a delete is compared like a write. A sends
//! its digests ([`SyncRequest`]); B computes its own for A, and answers with the segments
//! that differ and its `(key, version)` list for as many of them as fit
//! ([`MAX_SYNC_ENTRIES`]) ([`SyncReply`]). A then **pulls** (fetch, apply by last writer
//! wins) every key B holds newer or A lacks; what A holds newer, B pulls in its own round
//! (every node runs rounds with every peer), so a key travels to a node once. Repeat until
//! no segment differs. Digests are
//! order-independent and need no stored tree: each round scans the engine, which is
//! bounded by yielding between chunks and by the transfer throttle
//! ([`SyncConfig::bytes_per_sec`]).
//!
//! A node refuses a sync from a peer whose ring fingerprint differs from its own (it
//! answers [`CoreError::WrongOwner`]): with different rings they would disagree about which
//! keys they share, and the caller retries once the views agree.
//!
//! # Syncing state
//!
//! A node is **syncing** until it has completed an exchange with every peer it shares keys
//! with under its current ring — after it starts (empty, or after a restart) and after every
//! ring change (a join, a leave, a death moves ranges). A peer that cannot be reached is
//! retried, and given up on after [`SyncConfig::give_up_after`] (logged), so a node whose
//! replicas are all down does not stay syncing forever; a node whose timers fired more than
//! 2 s late (it was stopped) is syncing again. While syncing, the coordinator
//! does not treat its local copy as authoritative: a read also asks another replica and the
//! newer copy wins, and a conditional write (`IF_ABSENT`/`IF_PRESENT`) or touch first reads
//! the key from another replica (see `Coordinator::read_through`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cache_core::{KeyVersion, VersionedRead};
use cluster_ring::NodeId;
use futures_util::stream::{FuturesUnordered, StreamExt};
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::coordinator::Coordinator;
use crate::error::{CoreError, PeerError};
use crate::mutation::{Mutation, MutationOp};
use crate::replication::MAX_MUTATIONS_PER_CALL;
use crate::ring::RingState;
use crate::transport::PeerTransport;

/// Digest segments per exchange: a protocol constant (both sides must agree).
pub const SEGMENTS: usize = 1024;

/// Most `(key, version)` pairs one [`SyncReply`] carries; the rest of the differing
/// segments are covered by the next exchange.
pub const MAX_SYNC_ENTRIES: usize = 65_536;

/// Engine slots examined between two yields of a scan.
const SCAN_CHUNK: usize = 4096;

/// A node whose timers fired this late was stopped (`SIGSTOP`, a VM pause, a long stall):
/// it may have missed writes, so it syncs before trusting its copies again.
const PAUSE_THRESHOLD: Duration = Duration::from_secs(2);

/// How often the pause detector ticks.
const PAUSE_TICK: Duration = Duration::from_millis(200);

/// Most exchanges with one peer in one round (each covers up to [`MAX_SYNC_ENTRIES`] keys);
/// a round that needs more resumes at the next one.
const MAX_EXCHANGES_PER_ROUND: usize = 256;

/// Anti-entropy settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncConfig {
    /// Time between anti-entropy rounds at rest. A ring change starts a round at once.
    pub interval: Duration,
    /// Key and value bytes per second pulled and pushed (`0`: unthrottled), so repair does
    /// not starve client traffic.
    pub bytes_per_sec: u64,
    /// How long a peer that cannot be reached may keep this node syncing.
    pub give_up_after: Duration,
    /// Most keys this node puts in one answer to a peer (at most [`MAX_SYNC_ENTRIES`]).
    pub reply_entries: usize,
    /// Deadline of one anti-entropy call. Not the peer timeout (1 s, sized for client
    /// requests): the callee scans its engine to answer, which takes longer on a large
    /// node — measured at 1 000 000 keys, 1 s deadlines made exchanges time out under load.
    pub call_timeout: Duration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(15),
            bytes_per_sec: 64 << 20,
            give_up_after: Duration::from_secs(10),
            reply_entries: MAX_SYNC_ENTRIES,
            call_timeout: Duration::from_secs(30),
        }
    }
}

/// A's digests of the keys it shares with the callee: [`SEGMENTS`] values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRequest {
    /// Per segment, the XOR of the `(key, version)` hashes.
    pub digests: Vec<u64>,
    /// Compare from this segment on: the caller's cursor through a large difference.
    pub from_segment: u32,
}

/// B's answer: what differs, and B's versions for the first differing segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReply {
    /// Segments from the requested one on whose digests differ, ascending.
    pub differing: Vec<u32>,
    /// How many of `differing` (a prefix, at least one if any) `entries` covers in full.
    pub covered: u32,
    /// The callee's shared keys in the covered segments, with their versions.
    pub entries: Vec<SyncEntry>,
}

/// One key of a [`SyncReply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncEntry {
    /// The key.
    pub key: Bytes,
    /// Its version there (live or dead).
    pub version: u64,
    /// Its value's length there (`0` if dead), so the caller can size its fetches.
    pub value_len: u32,
}

/// Which segment `key` falls in.
pub fn segment_of(key: &[u8]) -> usize {
    segment_of_hash(cluster_ring::key_hash(key))
}

/// Which segment a key with ring hash `hash` falls in (its top bits).
fn segment_of_hash(hash: u64) -> usize {
    let bits = SEGMENTS.trailing_zeros();
    (hash >> (64 - bits)) as usize
}

/// Bytes one `(key, version)` entry of a [`SyncReply`] takes on the wire, at most.
fn entry_wire_bytes(key: &[u8]) -> usize {
    key.len() + 16
}

/// The hash of one `(key, version)` (given the key's ring hash), XORed into its segment's
/// digest.
fn contribution(hash: u64, version: u64) -> u64 {
    // A SplitMix64 finalizer over the key hash and the version.
    let mut z = hash ^ version.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Counters and progress, for `/status` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStatus {
    /// Whether the node is syncing (see the module docs).
    pub syncing: bool,
    /// Rounds completed (every peer synced or given up on).
    pub rounds: u64,
    /// Exchanges that failed (unreachable peer, refused, malformed answer).
    pub failures: u64,
    /// Keys pulled from peers (newer there, or missing here).
    pub keys_pulled: u64,
    /// Keys pushed to peers (a graceful leave's hand-over).
    pub keys_pushed: u64,
    /// Key and value bytes pulled and pushed.
    pub bytes_moved: u64,
    /// Peers synced under the current ring, and those still pending.
    pub peers_synced: usize,
    /// Peers this node shares keys with under the current ring.
    pub peers_total: usize,
    /// Milliseconds the last completed round took.
    pub last_round_ms: u64,
}

/// The sync bookkeeping of one node.
#[derive(Debug, Default)]
pub(crate) struct SyncState {
    /// The ring fingerprint this node last completed a round for; syncing while it differs
    /// from the current one. `0`: never.
    synced_fingerprint: AtomicU64,
    /// Sync was never started (a node without anti-entropy, or one replica): never syncing.
    disabled: AtomicBool,
    rounds: AtomicU64,
    failures: AtomicU64,
    keys_pulled: AtomicU64,
    keys_pushed: AtomicU64,
    bytes_moved: AtomicU64,
    last_round_ms: AtomicU64,
    /// Progress of the round in flight: (peers done, peers total).
    progress: Mutex<(usize, usize)>,
    /// Most keys in one answer (from the config given at start).
    reply_entries: AtomicU64,
    /// Milliseconds (since `origin`) of the pause detector's last tick.
    last_tick_ms: AtomicU64,
    origin: std::sync::OnceLock<Instant>,
    /// Wakes the anti-entropy loop (a detected pause).
    wake: tokio::sync::Notify,
}

impl SyncState {
    pub(crate) fn new() -> Self {
        Self {
            disabled: AtomicBool::new(true),
            reply_entries: AtomicU64::new(MAX_SYNC_ENTRIES as u64),
            ..Self::default()
        }
    }
}

/// What went wrong in one exchange.
#[derive(Debug)]
enum ExchangeError {
    /// The peer could not be reached or did not answer: retry, or give up on it.
    Peer(PeerError),
    /// The peer answered something this node refuses (malformed, out of bounds).
    Bad(String),
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::Peer(e) => write!(f, "{e}"),
            ExchangeError::Bad(e) => write!(f, "refused its answer: {e}"),
        }
    }
}

/// A read of one key as a mutation that recreates it elsewhere.
pub(crate) fn as_mutation(key: Bytes, read: VersionedRead) -> Mutation {
    match read {
        VersionedRead::Live(l) => Mutation {
            key,
            version: l.version,
            op: MutationOp::Put {
                value: l.value,
                expires_at: l.expires_at,
            },
        },
        VersionedRead::Dead { version } => Mutation {
            key,
            version,
            op: MutationOp::Delete,
        },
    }
}

impl<T: PeerTransport> Coordinator<T> {
    /// Whether this node is syncing: its local misses are not authoritative (see the
    /// [`sync`](crate::sync) module docs).
    pub fn is_syncing(&self) -> bool {
        let s = self.sync_state();
        if s.disabled.load(Ordering::Relaxed) {
            return false;
        }
        s.synced_fingerprint.load(Ordering::Relaxed) != self.ring().load_guard().ring.fingerprint()
            || self.was_paused()
    }

    /// Whether the pause detector has not ticked for [`PAUSE_THRESHOLD`]: the node was
    /// stopped and has just resumed (or is starved), and the detector has not yet marked it
    /// syncing — requests that arrive first must not trust the local copies either.
    fn was_paused(&self) -> bool {
        self.ms_since_tick() > u64::try_from(PAUSE_THRESHOLD.as_millis()).unwrap_or(u64::MAX)
    }

    /// Milliseconds since the pause detector last ticked (0 before anti-entropy starts).
    fn ms_since_tick(&self) -> u64 {
        let s = self.sync_state();
        let Some(origin) = s.origin.get() else {
            return 0;
        };
        let now = u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        now.saturating_sub(s.last_tick_ms.load(Ordering::Relaxed))
    }

    /// Sync progress and counters.
    pub fn sync_status(&self) -> SyncStatus {
        let s = self.sync_state();
        let (peers_synced, peers_total) = *s.progress.lock();
        SyncStatus {
            syncing: self.is_syncing(),
            rounds: s.rounds.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            keys_pulled: s.keys_pulled.load(Ordering::Relaxed),
            keys_pushed: s.keys_pushed.load(Ordering::Relaxed),
            bytes_moved: s.bytes_moved.load(Ordering::Relaxed),
            peers_synced,
            peers_total,
            last_round_ms: s.last_round_ms.load(Ordering::Relaxed),
        }
    }

    /// Starts anti-entropy (an owned task, stopped by `shutdown`): a round at once, after
    /// every ring change, and every `config.interval`. From now until the first round
    /// completes the node is syncing. Must be called within a tokio runtime.
    pub fn start_anti_entropy(self: &Arc<Self>, config: SyncConfig) {
        self.sync_state().disabled.store(false, Ordering::Relaxed);
        self.sync_state().reply_entries.store(
            config.reply_entries.clamp(1, MAX_SYNC_ENTRIES) as u64,
            Ordering::Relaxed,
        );
        let _ = self.sync_state().origin.set(Instant::now());
        self.sync_state().last_tick_ms.store(0, Ordering::Relaxed);
        // The pause detector: a tick that comes late means this process was stopped.
        {
            let me = Arc::clone(self);
            let cancel = self.cancel_token().clone();
            self.tracker().spawn(async move {
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(PAUSE_TICK) => {}
                    }
                    let s = me.sync_state();
                    if me.was_paused() {
                        let gap = Duration::from_millis(me.ms_since_tick());
                        tracing::warn!(
                            gap_ms = u64::try_from(gap.as_millis()).unwrap_or(u64::MAX),
                            "this node was stopped (or starved); syncing before trusting its copies"
                        );
                        s.synced_fingerprint.store(0, Ordering::Relaxed);
                        s.wake.notify_one();
                    }
                    let now = s.origin.get().map_or(0, |o| {
                        u64::try_from(o.elapsed().as_millis()).unwrap_or(u64::MAX)
                    });
                    s.last_tick_ms.store(now, Ordering::Relaxed);
                }
            });
        }
        let me = Arc::clone(self);
        let mut changes = self.ring().subscribe();
        let cancel = self.cancel_token().clone();
        self.tracker().spawn(async move {
            // Per ring fingerprint: when this node started trying to sync it.
            let mut started: (u64, Instant) = (0, Instant::now());
            loop {
                let state = me.ring().load();
                let fingerprint = state.ring.fingerprint();
                if started.0 != fingerprint {
                    started = (fingerprint, Instant::now());
                }
                let give_up = started.1 + config.give_up_after;
                // Shutdown does not wait for a round (a call to a hung peer may take the
                // whole sync deadline).
                let complete = tokio::select! {
                    () = cancel.cancelled() => return,
                    complete = me.round(&state, &config, give_up) => complete,
                };
                let wait = if complete {
                    config.interval
                } else {
                    Duration::from_millis(500)
                };
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = changes.recv() => {
                        // Let a burst of changes settle before scanning for the new ring.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        while changes.try_recv().is_ok() {}
                    }
                    () = tokio::time::sleep(wait) => {}
                    () = me.sync_state().wake.notified() => {}
                }
            }
        });
    }

    /// One round: an exchange with every peer this node shares keys with. Returns whether
    /// every peer was synced or given up on (then the node is synced for `state`'s ring).
    async fn round(&self, state: &Arc<RingState>, config: &SyncConfig, give_up: Instant) -> bool {
        let began = Instant::now();
        let s = self.sync_state();
        let fingerprint = state.ring.fingerprint();
        let peers: Vec<NodeId> = if state.replication_factor <= 1 {
            Vec::new()
        } else {
            state
                .ring
                .members()
                .iter()
                .map(|m| m.id.clone())
                .filter(|id| *id != *self.local_id())
                .collect()
        };
        *s.progress.lock() = (0, peers.len());
        let mut done = 0;
        // Some peer is neither synced nor given up on: the round is incomplete.
        let mut pending = false;
        for peer in &peers {
            if self.cancel_token().is_cancelled() {
                return false;
            }
            match self.sync_with(state, peer, config).await {
                Ok(true) => done += 1,
                Ok(false) => pending = true,
                Err(e) => {
                    s.failures.fetch_add(1, Ordering::Relaxed);
                    if Instant::now() >= give_up {
                        tracing::warn!(
                            peer = %peer,
                            error = %e,
                            "anti-entropy: giving up on this peer for this ring; its keys are \
                             synced from the other replicas"
                        );
                        done += 1;
                    } else {
                        tracing::debug!(peer = %peer, error = %e, "anti-entropy exchange failed");
                        pending = true;
                    }
                }
            }
            s.progress.lock().0 = done;
        }
        if pending || self.ring().load().ring.fingerprint() != fingerprint {
            return false;
        }
        let was_syncing = self.is_syncing();
        s.synced_fingerprint.store(fingerprint, Ordering::Relaxed);
        s.rounds.fetch_add(1, Ordering::Relaxed);
        let ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
        s.last_round_ms.store(ms, Ordering::Relaxed);
        if was_syncing {
            tracing::info!(
                peers = peers.len(),
                took_ms = ms,
                pulled = s.keys_pulled.load(Ordering::Relaxed),
                "synced with every replica for this ring"
            );
        }
        true
    }

    /// Exchanges with `peer` until nothing differs (`Ok(true)`) or the round's exchange
    /// budget is spent (`Ok(false)`).
    async fn sync_with(
        &self,
        state: &Arc<RingState>,
        peer: &NodeId,
        config: &SyncConfig,
    ) -> Result<bool, ExchangeError> {
        // The digests are computed once: each exchange moves the cursor past the segments
        // it covered, so later pulls cannot change what the peer compares.
        let digests = self.digests(state, peer).await;
        let mut from_segment = 0u32;
        for _ in 0..MAX_EXCHANGES_PER_ROUND {
            if self.ring().load().ring.fingerprint() != state.ring.fingerprint() {
                // The ring changed under this round: its notion of shared keys is stale.
                return Ok(false);
            }
            let mut call = self.sync_call(config);
            call.ring_fingerprint = state.ring.fingerprint();
            let reply = self
                .transport()
                .sync(
                    peer,
                    call,
                    SyncRequest {
                        digests: digests.clone(),
                        from_segment,
                    },
                )
                .await
                .map_err(ExchangeError::Peer)?;
            self.check_fingerprint(peer, reply.ring_fingerprint);
            let reply = reply.body;
            self.check_reply(&reply, from_segment)
                .map_err(ExchangeError::Bad)?;
            if reply.differing.is_empty() {
                return Ok(true);
            }
            let covered = &reply.differing[..reply.covered as usize];
            let last = *covered.last().expect("every answer covers a segment");
            let covered: BTreeSet<usize> = covered.iter().map(|&s| s as usize).collect();
            self.reconcile(peer, &covered, reply.entries, config)
                .await?;
            if reply.covered as usize == reply.differing.len() {
                // Everything that differed was exchanged; the next round re-checks.
                return Ok(true);
            }
            from_segment = last + 1;
        }
        Ok(false)
    }

    /// Bounds a peer's sync answer before anything in it is used.
    fn check_reply(&self, reply: &SyncReply, from_segment: u32) -> Result<(), String> {
        if reply.differing.len() > SEGMENTS {
            return Err(format!("{} differing segments", reply.differing.len()));
        }
        if reply.differing.windows(2).any(|w| w[0] >= w[1])
            || reply.differing.iter().any(|&s| s as usize >= SEGMENTS)
        {
            return Err("differing segments not ascending and in range".into());
        }
        if reply.covered as usize > reply.differing.len() {
            return Err("covers more segments than differ".into());
        }
        if reply.differing.first().is_some_and(|&s| s < from_segment) {
            return Err("a differing segment before the one asked from".into());
        }
        if !reply.differing.is_empty() && reply.covered == 0 {
            return Err("covers no segment".into());
        }
        if reply.entries.len() > MAX_SYNC_ENTRIES {
            return Err(format!("{} entries", reply.entries.len()));
        }
        let bytes: usize = reply.entries.iter().map(|e| entry_wire_bytes(&e.key)).sum();
        if bytes > self.sync_reply_bytes() {
            return Err(format!("{bytes} bytes of entries"));
        }
        let covered: BTreeSet<u32> = reply.differing[..reply.covered as usize]
            .iter()
            .copied()
            .collect();
        let now = self.store().now_ms();
        let max_value = self.store().limits().max_value_bytes;
        for SyncEntry {
            key,
            version,
            value_len,
        } in &reply.entries
        {
            self.store()
                .limits()
                .check_key(key)
                .map_err(|e| e.to_string())?;
            if *value_len as usize > max_value {
                return Err(format!("a value of {value_len} bytes"));
            }
            if *version == 0 {
                return Err("an entry at version 0".into());
            }
            self.store()
                .hlc()
                .check(*version, now)
                .map_err(|e| e.to_string())?;
            if !covered.contains(&(segment_of(key) as u32)) {
                return Err("an entry outside the covered segments".into());
            }
        }
        Ok(())
    }

    /// A background call due in `config.call_timeout` (not capped at the peer timeout).
    fn sync_call(&self, config: &SyncConfig) -> crate::transport::PeerCall {
        let mut call = self.call(Instant::now());
        call.deadline = Instant::now() + config.call_timeout;
        call
    }

    /// Most key bytes (with framing) one sync answer carries: half a peer response.
    fn sync_reply_bytes(&self) -> usize {
        self.store().limits().max_response_bytes() / 2
    }

    /// Per segment, the digest of the versioned keys this node shares with `peer`.
    async fn digests(&self, state: &RingState, peer: &NodeId) -> Vec<u64> {
        let mut digests = vec![0u64; SEGMENTS];
        self.scan_shared(
            state,
            peer,
            |_| true,
            |kv, hash| {
                digests[segment_of_hash(hash)] ^= contribution(hash, kv.version);
            },
        )
        .await;
        digests
    }

    /// Calls `f(key, ring hash)` for every versioned key (live or dead) in a segment
    /// `segment` accepts whose replicas under `state` include this node and `peer`,
    /// yielding between chunks. The key is hashed once; the cheap segment test comes before
    /// the ring walk.
    async fn scan_shared(
        &self,
        state: &RingState,
        peer: &NodeId,
        segment: impl Fn(usize) -> bool,
        mut f: impl FnMut(&KeyVersion, u64),
    ) {
        let me = self.local_id();
        self.scan_segments(segment, |kv, hash| {
            let replicas = state.ring.replicas_of_hash(hash, state.replication_factor);
            if replicas.iter().any(|m| m.id == *peer) && replicas.iter().any(|m| m.id == *me) {
                f(kv, hash);
            }
        })
        .await;
    }

    /// Calls `f(key, ring hash)` for every versioned key (live or dead) in a segment
    /// `segment` accepts, whatever the ring says, yielding between chunks of the engine.
    async fn scan_segments(
        &self,
        segment: impl Fn(usize) -> bool,
        mut f: impl FnMut(&KeyVersion, u64),
    ) {
        // A complete scan: a key present for the whole round is compared even if the
        // engine moves it meanwhile (a missed key would look absent and be pulled again, or
        // worse, make this node's digest disagree for a whole round).
        let mut scan = self.store().engine().scanner();
        while let Some(chunk) = scan.versions(SCAN_CHUNK) {
            for kv in &chunk {
                let hash = cluster_ring::key_hash(&kv.key);
                if segment(segment_of_hash(hash)) {
                    f(kv, hash);
                }
            }
            tokio::task::yield_now().await;
        }
    }

    /// Pulls what `peer` holds newer in the `covered` segments (or this node lacks). What
    /// `peer` lacks it pulls in its own round: pulling only means a key reaches a node once,
    /// even when several replicas could send it (measured: pushing too moved 1.35–1.6× the
    /// ideal on a join or a death).
    async fn reconcile(
        &self,
        peer: &NodeId,
        covered: &BTreeSet<usize>,
        theirs: Vec<SyncEntry>,
        config: &SyncConfig,
    ) -> Result<(), ExchangeError> {
        let s = self.sync_state();
        // Every key this node holds in the covered segments, whatever the ring says (a key
        // it holds is not pulled again).
        let mut ours: BTreeMap<Bytes, u64> = BTreeMap::new();
        self.scan_segments(
            |seg| covered.contains(&seg),
            |kv, _| {
                ours.insert(kv.key.clone(), kv.version);
            },
        )
        .await;
        // What to pull, with the size the peer reported (key + value).
        let pull: Vec<(Bytes, usize)> = theirs
            .into_iter()
            .filter(|e| ours.get(&e.key).is_none_or(|mine| *mine < e.version))
            .map(|e| {
                let size = e.key.len() + e.value_len as usize;
                (e.key, size)
            })
            .collect();
        let max_batch = self
            .store()
            .limits()
            .max_batch
            .clamp(1, MAX_MUTATIONS_PER_CALL);
        // Fetches sized by the value lengths the peer reported, within half a response.
        let fetch_bytes = self.store().limits().max_response_bytes() / 2;
        let mut batches: Vec<Vec<Bytes>> = Vec::new();
        let mut bytes = 0;
        for (key, size) in pull {
            let size = size + 64;
            match batches.last_mut() {
                Some(b) if b.len() < max_batch && bytes + size <= fetch_bytes => {
                    bytes += size;
                    b.push(key);
                }
                _ => {
                    bytes = size;
                    batches.push(vec![key]);
                }
            }
        }
        for keys in &batches {
            let call = self.sync_call(config);
            let reply = self
                .transport()
                .fetch(peer, call, keys.to_vec())
                .await
                .map_err(ExchangeError::Peer)?;
            if reply.body.len() != keys.len() {
                return Err(ExchangeError::Bad(
                    "a fetch answer of the wrong length".into(),
                ));
            }
            let mutations: Vec<Mutation> = keys
                .iter()
                .zip(reply.body)
                .filter_map(|(k, r)| r.map(|r| as_mutation(k.clone(), r)))
                .collect();
            let bytes: usize = mutations.iter().map(Mutation::size).sum();
            self.store()
                .apply_replicated(&mutations)
                .map_err(|e| ExchangeError::Bad(e.to_string()))?;
            s.keys_pulled
                .fetch_add(mutations.len() as u64, Ordering::Relaxed);
            self.throttle(bytes, config).await;
        }
        Ok(())
    }

    /// Counts `bytes` moved and sleeps long enough to hold the configured rate.
    async fn throttle(&self, bytes: usize, config: &SyncConfig) {
        self.sync_state()
            .bytes_moved
            .fetch_add(bytes as u64, Ordering::Relaxed);
        if config.bytes_per_sec > 0 && bytes > 0 {
            let secs = bytes as f64 / config.bytes_per_sec as f64;
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        }
    }

    /// Answers a peer's digests (see the module docs): refused unless both build the same
    /// ring.
    pub async fn handle_sync(
        &self,
        call: &crate::transport::PeerCall,
        request: SyncRequest,
    ) -> Result<SyncReply, CoreError> {
        self.check_fingerprint(&call.from, call.ring_fingerprint);
        let state = self.ring().load();
        if call.ring_fingerprint != state.ring.fingerprint() {
            return Err(CoreError::WrongOwner { epoch: state.epoch });
        }
        if request.digests.len() != SEGMENTS {
            return Err(CoreError::Invalid(format!(
                "{} digests, expected {SEGMENTS}",
                request.digests.len()
            )));
        }
        if !state.ring.members().iter().any(|m| m.id == call.from) {
            return Err(CoreError::WrongOwner { epoch: state.epoch });
        }
        let peer = call.from.clone();
        let mut mine = vec![0u64; SEGMENTS];
        let mut counts = vec![0usize; SEGMENTS];
        let mut sizes = vec![0usize; SEGMENTS];
        let from = (request.from_segment as usize).min(SEGMENTS);
        self.scan_shared(
            &state,
            &peer,
            |seg| seg >= from,
            |kv, hash| {
                let seg = segment_of_hash(hash);
                mine[seg] ^= contribution(hash, kv.version);
                counts[seg] += 1;
                sizes[seg] += entry_wire_bytes(&kv.key);
            },
        )
        .await;
        let max_bytes = self.sync_reply_bytes();
        let max_entries = usize::try_from(self.sync_state().reply_entries.load(Ordering::Relaxed))
            .unwrap_or(MAX_SYNC_ENTRIES);
        let differing: Vec<u32> = (from..SEGMENTS)
            .filter(|&s| mine[s] != request.digests[s])
            .map(|s| s as u32)
            .collect();
        // Cover a prefix of the differing segments that fits one answer (at least one, so
        // every exchange makes progress).
        let mut covered = 0;
        let mut total = 0;
        let mut bytes = 0;
        for &seg in &differing {
            let (c, b) = (counts[seg as usize], sizes[seg as usize]);
            if covered > 0 && (total + c > max_entries || bytes + b > max_bytes) {
                break;
            }
            total += c;
            bytes += b;
            covered += 1;
        }
        // A single segment over the bounds (tens of millions of shared keys) is answered
        // truncated: the caller then pushes keys it believes missing here (harmless, last
        // writer wins) and the rest is covered by later rounds as versions change.
        let mut budget = max_bytes;
        let wanted: BTreeSet<usize> = differing[..covered].iter().map(|&s| s as usize).collect();
        let mut entries = Vec::with_capacity(total.min(max_entries));
        self.scan_shared(
            &state,
            &peer,
            |seg| wanted.contains(&seg),
            |kv, _| {
                if entries.len() < max_entries && budget >= entry_wire_bytes(&kv.key) {
                    budget -= entry_wire_bytes(&kv.key);
                    entries.push(SyncEntry {
                        key: kv.key.clone(),
                        version: kv.version,
                        value_len: u32::try_from(kv.value_len).unwrap_or(u32::MAX),
                    });
                }
            },
        )
        .await;
        Ok(SyncReply {
            differing,
            covered: covered as u32,
            entries,
        })
    }
}

impl<T: PeerTransport> Coordinator<T> {
    /// Reads `keys` from their other replicas while this node is syncing: every other
    /// replica of a key is asked at once (one fetch per replica, in parallel; replicas that
    /// recently failed only for keys with no healthy other replica), and a key is settled by
    /// the first replica that answers for it, so one paused replica costs nothing while
    /// another answers. Answers are applied here by last writer wins (so the next read is
    /// local) and returned; `None` for a key no other replica answered for before half the
    /// remaining budget, `Some(None)` for a key an answering replica does not know.
    pub(crate) async fn read_through(
        &self,
        state: &RingState,
        keys: &[Bytes],
        deadline: Instant,
    ) -> Vec<Option<Option<VersionedRead>>> {
        let mut out: Vec<Option<Option<VersionedRead>>> = vec![None; keys.len()];
        let mut groups: BTreeMap<NodeId, Vec<usize>> = BTreeMap::new();
        for (i, key) in keys.iter().enumerate() {
            let others: Vec<NodeId> = state
                .replicas(key)
                .into_iter()
                .filter(|r| r != self.local_id())
                .collect();
            let healthy: Vec<&NodeId> = others.iter().filter(|r| !self.unhealthy(r)).collect();
            let ask = if healthy.is_empty() {
                others.iter().collect()
            } else {
                healthy
            };
            for target in ask {
                groups.entry(target.clone()).or_default().push(i);
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if groups.is_empty() || left.is_zero() {
            return out;
        }
        let call = self.call(Instant::now() + left / 2);
        let mut calls: FuturesUnordered<_> = groups
            .into_iter()
            .map(|(target, idx)| {
                let batch: Vec<Bytes> = idx.iter().map(|&i| keys[i].clone()).collect();
                let call = call.clone();
                async move {
                    let answer = tokio::time::timeout_at(
                        call.deadline,
                        self.transport().fetch(&target, call.clone(), batch.clone()),
                    )
                    .await;
                    (target, idx, batch, answer)
                }
            })
            .collect();
        let mut unanswered = keys.len();
        while let Some((target, idx, batch, answer)) = calls.next().await {
            let reply = match answer {
                Ok(Ok(reply)) if reply.body.len() == batch.len() => reply,
                _ => {
                    self.note_peer_failure(&target, "read-through fetch failed");
                    continue;
                }
            };
            let mut repairs = Vec::new();
            for ((&i, key), read) in idx.iter().zip(batch).zip(reply.body) {
                if let Some(r) = &read {
                    repairs.push(as_mutation(key, r.clone()));
                }
                let newer = match (&out[i], &read) {
                    (None, _) => {
                        unanswered -= 1;
                        true
                    }
                    (Some(have), Some(r)) => {
                        have.as_ref().is_none_or(|h| r.version() > h.version())
                    }
                    (Some(_), None) => false,
                };
                if newer {
                    out[i] = Some(read);
                }
            }
            if !repairs.is_empty()
                && let Err(e) = self.store().apply_replicated(&repairs)
            {
                tracing::debug!(peer = %target, error = %e, "read-through repair refused");
            }
            if unanswered == 0 {
                break;
            }
        }
        out
    }
}

/// What [`Coordinator::hand_over`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandOver {
    /// Keys sent to a node that becomes their replica once this node has left.
    pub keys: u64,
    /// Key and value bytes sent.
    pub bytes: u64,
    /// Every key was handed over before the deadline.
    pub complete: bool,
}

impl<T: PeerTransport> Coordinator<T> {
    /// A graceful leave: sends every key this node replicates to the node that replicates
    /// it once this node is gone (the ring without it), by `deadline`. Each key gains
    /// exactly one new replica when one member leaves, so this moves about 1/N of the data
    /// once. Call it after the leave was announced and before [`Coordinator::shutdown`].
    pub async fn hand_over(&self, deadline: Instant) -> HandOver {
        let mut report = HandOver::default();
        // The rings with this node and without it, from the current view (which may already
        // say this node left: the leave is announced first).
        let current = self.ring().load();
        let with_state = |state: cache_types::MemberState| {
            let mut view = current.view.clone();
            for m in &mut view.members {
                if *self.local_id() == m.id {
                    m.state = state;
                }
            }
            RingState::build(
                view,
                self.config().replication_factor,
                &self.ring().known_members(),
            )
        };
        let (Ok(state), Ok(after)) = (
            with_state(cache_types::MemberState::Alive),
            with_state(cache_types::MemberState::Left),
        ) else {
            report.complete = true; // nobody is left to hand over to
            return report;
        };
        let max_batch = self
            .store()
            .limits()
            .max_batch
            .clamp(1, MAX_MUTATIONS_PER_CALL);
        let max_bytes = self.store().limits().max_request_bytes();
        let mut batches: BTreeMap<NodeId, (Vec<Mutation>, usize)> = BTreeMap::new();
        // A complete scan: every key held for the whole hand-over is handed over.
        let mut scan = self.store().engine().scanner();
        while let Some(chunk) = scan.versions(SCAN_CHUNK) {
            if Instant::now() >= deadline {
                return report;
            }
            for kv in chunk {
                let before = state.replicas(&kv.key);
                if !before.contains(self.local_id()) {
                    continue;
                }
                for target in after.replicas(&kv.key) {
                    if before.contains(&target) {
                        continue;
                    }
                    let Some(read) = self.store().get_versioned(&kv.key) else {
                        continue;
                    };
                    let m = as_mutation(kv.key.clone(), read);
                    let (batch, bytes) = batches.entry(target.clone()).or_default();
                    if !batch.is_empty()
                        && (batch.len() >= max_batch || *bytes + m.size() > max_bytes)
                    {
                        let full = std::mem::take(batch);
                        *bytes = 0;
                        if !self
                            .hand_over_batch(&target, full, deadline, &mut report)
                            .await
                        {
                            return report;
                        }
                    }
                    let (batch, bytes) = batches.entry(target).or_default();
                    *bytes += m.size();
                    batch.push(m);
                }
            }
            tokio::task::yield_now().await;
        }
        for (target, (batch, _)) in batches {
            if !batch.is_empty()
                && !self
                    .hand_over_batch(&target, batch, deadline, &mut report)
                    .await
            {
                return report;
            }
        }
        report.complete = true;
        report
    }

    async fn hand_over_batch(
        &self,
        target: &NodeId,
        batch: Vec<Mutation>,
        deadline: Instant,
        report: &mut HandOver,
    ) -> bool {
        let (n, bytes) = (
            batch.len() as u64,
            batch.iter().map(Mutation::size).sum::<usize>(),
        );
        let mut call = self.call(deadline);
        call.deadline = call.deadline.min(deadline);
        match self.transport().replicate(target, call, batch).await {
            Ok(_) => {
                report.keys += n;
                report.bytes += bytes as u64;
                let s = self.sync_state();
                s.keys_pushed.fetch_add(n, Ordering::Relaxed);
                s.bytes_moved.fetch_add(bytes as u64, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(peer = %target, error = %e, "hand-over batch failed; stopping the hand-over (anti-entropy on the remaining replicas restores the copies)");
                false
            }
        }
    }
}
