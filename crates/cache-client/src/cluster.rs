//! The ring-aware client: computes each key's replicas itself and talks to them directly.
//!
//! It bootstraps from seed addresses through `ClusterInfo`, builds the same ring as the
//! nodes with `cluster-ring` (and checks the fingerprint to be sure), and keeps one
//! [`Node`] per member. Each request goes to the key's primary — reads too, since the
//! nodes serve `One` reads at the primary — and, if that node is unreachable, to the next
//! replica.
//! Batches are split per primary and sent in parallel. The client keeps a `WatchCluster`
//! stream open and swaps in every new view as it arrives (joins, deaths, leaves); every
//! answer also carries the node's ring epoch, and when it differs from the client's, the
//! client refreshes its view — the fallback if the watch is down.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use cache_proto::v1 as pb;
use cluster_ring::{Member as RingMember, NodeId, Ring};

use crate::{ClientBuilder, Entry, Error, MemberState, Node, SetOptions};

/// One member as the client sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterMember {
    /// The member's id.
    pub id: String,
    /// Its address.
    pub addr: String,
    /// Its state as the answering node sees it.
    pub state: MemberState,
    /// Its incarnation (gossip; 0 with static membership).
    pub incarnation: u64,
    /// Ring weight.
    pub weight: u32,
    /// Its share of the key space as primary (0..1).
    pub share: f64,
}

/// The client's picture of the cluster at one epoch.
pub(crate) struct View {
    ring: Ring,
    epoch: u64,
    replication_factor: usize,
    members: Vec<ClusterMember>,
    /// Member id → client.
    nodes: HashMap<String, Node>,
}

/// A ring-aware client for a cache-cluster. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Router {
    builder: ClientBuilder,
    seeds: Arc<RwLock<Vec<String>>>,
    view: Arc<RwLock<Arc<View>>>,
    /// Dropped with the last clone: the watcher task sees its receiver close and stops.
    _watching: Arc<tokio::sync::watch::Sender<()>>,
    /// Members whose last call failed (unreachable or timed out): skipped while another
    /// replica can serve, until a background probe succeeds (see [`Unhealthy`]). A hung
    /// node costs one request timeout per outage, not one per request or per interval.
    unhealthy: Arc<RwLock<HashMap<String, Unhealthy>>>,
}

/// A member that failed a call. It is probed in the background — never with a client's
/// request — when `probe_at` has passed: a `Stats` call; success readmits it, failure
/// doubles the wait (from the client timeout, at most [`MAX_PROBE_INTERVAL`]).
#[derive(Debug, Clone, Copy)]
struct Unhealthy {
    probe_at: tokio::time::Instant,
    failures: u32,
    probing: bool,
}

/// The longest wait between two probes of an unhealthy member.
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(30);

/// Most members a cluster view may list (as many as SWIM gossip carries): a member list
/// over it is refused, not turned into as many connections.
const MAX_MEMBERS: usize = 8192;

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let view = self.view();
        f.debug_struct("Router")
            .field("epoch", &view.epoch)
            .field("members", &view.members.len())
            .finish_non_exhaustive()
    }
}

impl View {
    /// Every member with its connection.
    pub(crate) fn member_nodes(&self) -> Vec<(ClusterMember, Node)> {
        self.members
            .iter()
            .filter_map(|m| self.nodes.get(&m.id).map(|n| (m.clone(), n.clone())))
            .collect()
    }

    /// The ids of `key`'s replicas, primary first.
    pub(crate) fn replicas_of(&self, key: &[u8]) -> Vec<String> {
        self.ring
            .replicas(key, self.replication_factor)
            .into_iter()
            .map(|m| m.id.to_string())
            .collect()
    }
}

fn retryable(e: &Error) -> bool {
    matches!(e, Error::Unavailable(_) | Error::TimedOut(_))
}

impl Router {
    pub(crate) async fn connect(builder: ClientBuilder, seeds: Vec<String>) -> Result<Self, Error> {
        if seeds.is_empty() {
            return Err(Error::Cluster("no seed addresses given".into()));
        }
        let view = Self::fetch_view(&builder, &seeds).await?;
        let (watching, alive) = tokio::sync::watch::channel(());
        let client = Self {
            builder,
            seeds: Arc::new(RwLock::new(seeds)),
            view: Arc::new(RwLock::new(Arc::new(view))),
            _watching: Arc::new(watching),
            unhealthy: Arc::new(RwLock::new(HashMap::new())),
        };
        client.spawn_watcher(alive);
        Ok(client)
    }

    /// Follows the cluster: a `WatchCluster` stream from one member (or seed) at a time,
    /// each view swapped in as it arrives; on a broken stream, the next address after a
    /// short pause. Stops when the last clone of this client is dropped.
    fn spawn_watcher(&self, mut alive: tokio::sync::watch::Receiver<()>) {
        let view = Arc::downgrade(&self.view);
        let seeds = Arc::clone(&self.seeds);
        let builder = self.builder.clone();
        tokio::spawn(async move {
            let mut turn = 0usize;
            loop {
                let Some(holder) = view.upgrade() else { return };
                let mut addrs: Vec<String> = holder
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .members
                    .iter()
                    .filter(|m| m.state.owns_keys())
                    .map(|m| m.addr.clone())
                    .collect();
                addrs.extend(
                    seeds
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                        .cloned(),
                );
                drop(holder);
                let addr = addrs[turn % addrs.len().max(1)].clone();
                turn += 1;
                let watched = async {
                    let client = builder.clone().retries(0).node_lazy(addr)?;
                    let mut stream = client.watch_cluster().await?;
                    while let Some(info) = stream.message().await.map_err(|s| {
                        Error::Unavailable(format!("cluster watch ended: {}", s.message()))
                    })? {
                        let Some(holder) = view.upgrade() else {
                            return Ok(());
                        };
                        let previous =
                            Arc::clone(&holder.read().unwrap_or_else(|e| e.into_inner()));
                        if let Ok(next) = Self::build_view_from(&builder, info, Some(&previous)) {
                            *holder.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
                        }
                    }
                    Ok::<(), Error>(())
                };
                tokio::select! {
                    _ = alive.changed() => return,
                    _ = watched => {}
                }
                tokio::select! {
                    _ = alive.changed() => return,
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        });
    }

    /// Asks each seed in turn for `ClusterInfo` and builds a view from the first answer.
    pub(crate) async fn fetch_view(
        builder: &ClientBuilder,
        seeds: &[String],
    ) -> Result<View, Error> {
        let mut last = None;
        for seed in seeds {
            let client = match builder.clone().retries(0).connect_node(seed.clone()).await {
                Ok(c) => c,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            match client.cluster_info().await {
                Ok(info) => return Self::build_view(builder, info),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Unavailable("no seed answered".into())))
    }

    fn build_view(builder: &ClientBuilder, info: pb::ClusterInfoResponse) -> Result<View, Error> {
        Self::build_view_from(builder, info, None)
    }

    /// Builds a view, reusing `previous`'s connection to each member whose address did not
    /// change.
    fn build_view_from(
        builder: &ClientBuilder,
        info: pb::ClusterInfoResponse,
        previous: Option<&View>,
    ) -> Result<View, Error> {
        if info.members.len() > MAX_MEMBERS {
            return Err(Error::Cluster(format!(
                "the node lists {} members, more than a cluster can have ({MAX_MEMBERS})",
                info.members.len()
            )));
        }
        if info.ring_format_version != cluster_ring::FORMAT_VERSION {
            return Err(Error::Cluster(format!(
                "the nodes use ring format {}, this client {}: upgrade the client",
                info.ring_format_version,
                cluster_ring::FORMAT_VERSION
            )));
        }
        let owners = info
            .members
            .iter()
            .filter(|m| member_state(m.state).is_ok_and(MemberState::owns_keys))
            .map(|m| {
                NodeId::new(m.id.clone())
                    .map(|id| RingMember::new(id, m.weight))
                    .map_err(|e| Error::Cluster(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ring = Ring::new(owners, info.vnodes_per_weight)
            .map_err(|e| Error::Cluster(e.to_string()))?
            .with_epoch(info.ring_epoch);
        if ring.fingerprint() != info.ring_fingerprint {
            return Err(Error::Cluster(format!(
                "built ring {:016x} but the node reports {:016x}",
                ring.fingerprint(),
                info.ring_fingerprint
            )));
        }
        let shares: HashMap<String, f64> = ring
            .shares()
            .into_iter()
            .map(|(id, s)| (id.to_string(), s))
            .collect();
        let mut nodes = HashMap::new();
        let mut members = Vec::new();
        for m in &info.members {
            // Per-node clients do not retry: failing over to the next replica is faster.
            let reused = previous.and_then(|p| {
                let same_addr = p
                    .members
                    .iter()
                    .any(|o| o.id == m.id && o.addr == m.rpc_addr);
                same_addr.then(|| p.nodes.get(&m.id).cloned()).flatten()
            });
            let client = match reused {
                Some(c) => c,
                None => builder.clone().retries(0).node_lazy(m.rpc_addr.clone())?,
            };
            client.learn_max_batch(info.max_batch);
            nodes.insert(m.id.clone(), client);
            members.push(ClusterMember {
                id: m.id.clone(),
                addr: m.rpc_addr.clone(),
                state: member_state(m.state)?,
                incarnation: m.incarnation,
                weight: m.weight,
                share: shares.get(&m.id).copied().unwrap_or(0.0),
            });
        }
        Ok(View {
            ring,
            epoch: info.ring_epoch,
            replication_factor: (info.replication_factor as usize).max(1),
            members,
            nodes,
        })
    }

    /// Notes the outcome of a call to member `id`.
    fn record(&self, id: &str, ok: bool) {
        let mut unhealthy = self.unhealthy.write().unwrap_or_else(|e| e.into_inner());
        if ok {
            unhealthy.remove(id);
        } else {
            let failures = unhealthy
                .get(id)
                .map_or(1, |u| u.failures.saturating_add(1));
            unhealthy.insert(
                id.to_string(),
                Unhealthy {
                    probe_at: tokio::time::Instant::now() + self.probe_backoff(failures),
                    failures,
                    probing: false,
                },
            );
        }
    }

    /// Notes a failed attempt on member `id` that had `budget` to answer. A timeout only
    /// counts against the member when the budget was a fair share of the client's timeout
    /// (a quarter or more): an attempt cut short by the end of the caller's deadline says
    /// nothing about the node, and marking healthy nodes failed would leave no replica to
    /// prefer over a really hung one.
    fn record_failure(&self, id: &str, error: &Error, budget: Duration) {
        if matches!(error, Error::TimedOut(_)) && budget < self.builder.timeout / 4 {
            return;
        }
        self.record(id, false);
    }

    /// The wait before probing a member that failed `failures` times in a row.
    fn probe_backoff(&self, failures: u32) -> Duration {
        let base = self.builder.timeout.max(Duration::from_millis(500));
        base.saturating_mul(1u32 << failures.saturating_sub(1).min(6))
            .min(MAX_PROBE_INTERVAL)
    }

    /// Whether member `id` may get requests; an unhealthy one whose wait has passed is
    /// probed in the background (and stays skipped until the probe succeeds).
    fn is_healthy(&self, id: &str) -> bool {
        let now = tokio::time::Instant::now();
        let due = {
            let mut unhealthy = self.unhealthy.write().unwrap_or_else(|e| e.into_inner());
            let Some(u) = unhealthy.get_mut(id) else {
                return true;
            };
            let due = !u.probing && now >= u.probe_at;
            if due {
                u.probing = true;
            }
            due
        };
        if due {
            self.probe(id);
        }
        false
    }

    /// Probes member `id` with a `Stats` call in a background task.
    fn probe(&self, id: &str) {
        let Some(client) = self.view().nodes.get(id).cloned() else {
            self.unhealthy
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            return;
        };
        let this = self.clone();
        let id = id.to_string();
        let budget = self.builder.timeout;
        tokio::spawn(async move {
            let ok = tokio::time::timeout(budget, client.within(budget).stats())
                .await
                .is_ok_and(|r| r.is_ok());
            this.record(&id, ok);
        });
    }

    /// `key`'s replicas, healthy ones first (ring order within each group).
    fn replicas_by_health(&self, key: &[u8]) -> Vec<String> {
        let (healthy, unhealthy): (Vec<String>, Vec<String>) = self
            .replicas_of(key)
            .into_iter()
            .partition(|id| self.is_healthy(id));
        healthy.into_iter().chain(unhealthy).collect()
    }

    /// Runs `f` within the client's deadline: the whole call, failovers and batch
    /// fallbacks included, answers by then.
    async fn within_deadline<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        tokio::time::timeout(self.builder.timeout, f)
            .await
            .unwrap_or(Err(Error::TimedOut(self.builder.timeout)))
    }

    /// The deadline of a call starting now.
    fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.builder.timeout
    }

    fn view(&self) -> Arc<View> {
        Arc::clone(&self.view.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The current view.
    pub(crate) fn current_view(&self) -> Arc<View> {
        self.view()
    }

    /// The builder the router's connections were made with.
    pub(crate) fn builder(&self) -> &ClientBuilder {
        &self.builder
    }

    /// Rebuilds the view from any member (or seed). Called when a node reports another
    /// epoch or says it is the wrong node.
    pub(crate) async fn refresh(&self) -> Result<(), Error> {
        let current = self.view();
        let mut addrs: Vec<String> = current.members.iter().map(|m| m.addr.clone()).collect();
        addrs.extend(
            self.seeds
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned(),
        );
        let view = Self::fetch_view(&self.builder, &addrs).await?;
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
        Ok(())
    }

    /// Members with their address, state and share of the key space.
    pub(crate) fn members(&self) -> Vec<ClusterMember> {
        self.view().members.clone()
    }

    /// The ring's fingerprint, epoch and replication factor.
    pub(crate) fn ring_summary(&self) -> (u64, u64, usize) {
        let v = self.view();
        (v.ring.fingerprint(), v.epoch, v.replication_factor)
    }

    /// The ids of `key`'s replicas, primary first.
    pub(crate) fn replicas_of(&self, key: &[u8]) -> Vec<String> {
        self.view().replicas_of(key)
    }

    /// Runs `op` against the key's replicas in order until one answers; refreshes the view
    /// if the node reports a different epoch, or once if it says it is the wrong node.
    async fn routed<T, F, Fut>(
        &self,
        key: &[u8],
        deadline: tokio::time::Instant,
        op: F,
    ) -> Result<T, Error>
    where
        F: Fn(Node) -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        for attempt in 0..2 {
            let view = self.view();
            let order = self.replicas_by_health(key);
            let mut last = None;
            for (n, id) in order.iter().enumerate() {
                let Some(client) = view.nodes.get(id) else {
                    continue;
                };
                // While other replicas remain, an attempt gets half of what is left of the
                // deadline, so a hung replica is recorded and the next one still has time.
                let left = self
                    .builder
                    .timeout
                    .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
                if left.is_zero() {
                    return Err(Error::TimedOut(self.builder.timeout));
                }
                let budget = if n + 1 < order.len() { left / 2 } else { left };
                let outcome = tokio::time::timeout(budget, op(client.within(budget)))
                    .await
                    .unwrap_or(Err(Error::TimedOut(budget)));
                match outcome {
                    Ok(v) => {
                        self.record(id, true);
                        let seen = client.last_ring_epoch();
                        if seen != 0 && seen != view.epoch {
                            // Stale view: refresh for the next call (best effort).
                            let _ = self.refresh().await;
                        }
                        return Ok(v);
                    }
                    Err(e) if retryable(&e) => {
                        self.record_failure(id, &e, budget);
                        last = Some(e);
                    }
                    Err(e @ Error::WrongNode(_)) => {
                        last = Some(e);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            match last {
                Some(Error::WrongNode(_)) if attempt == 0 => {
                    self.refresh().await?;
                }
                Some(e) => return Err(e),
                None => return Err(Error::Unavailable("no replica of this key is known".into())),
            }
        }
        Err(Error::Unavailable("the cluster view kept changing".into()))
    }

    /// The value of `key` with its TTL and version.
    pub(crate) async fn get_entry(&self, key: Bytes) -> Result<Option<Entry>, Error> {
        self.within_deadline(self.routed(&key, self.deadline(), |c| {
            let key = key.clone();
            async move { c.get_entry(key).await }
        }))
        .await
    }

    /// Stores with options; returns whether it was stored.
    pub(crate) async fn set_with(
        &self,
        key: Bytes,
        value: Bytes,
        options: SetOptions,
    ) -> Result<bool, Error> {
        self.within_deadline(self.routed(&key, self.deadline(), |c| {
            let (key, value) = (key.clone(), value.clone());
            async move { c.set_with(key, value, options).await }
        }))
        .await
    }

    /// Removes `key`; returns whether it held a live value.
    pub(crate) async fn delete(&self, key: Bytes) -> Result<bool, Error> {
        self.within_deadline(self.routed(&key, self.deadline(), |c| {
            let key = key.clone();
            async move { c.delete(key).await }
        }))
        .await
    }

    /// Adds `delta` to the integer at `key` and returns the result (see [`Node::incr`]).
    /// Sent to the key's first healthy replica (which hands it to the primary) and never
    /// re-sent elsewhere: an increment is not idempotent, so a failed call's outcome is
    /// unknown.
    pub(crate) async fn incr(
        &self,
        key: Bytes,
        delta: i64,
        ttl_if_created: Option<Duration>,
    ) -> Result<i64, Error> {
        let view = self.view();
        let Some((id, client)) = self
            .replicas_by_health(&key)
            .into_iter()
            .find_map(|id| view.nodes.get(&id).cloned().map(|c| (id, c)))
        else {
            return Err(Error::Cluster("no member replicates this key".into()));
        };
        let outcome = self
            .within_deadline(client.incr(key, delta, ttl_if_created))
            .await;
        match &outcome {
            Ok(_) => self.record(&id, true),
            Err(e) if retryable(e) => self.record_failure(&id, e, self.builder.timeout),
            Err(_) => {}
        }
        outcome
    }

    /// Sets the TTL of a live key; returns whether it existed.
    pub(crate) async fn touch(&self, key: Bytes, ttl: Option<Duration>) -> Result<bool, Error> {
        self.within_deadline(self.routed(&key, self.deadline(), |c| {
            let key = key.clone();
            async move { c.touch(key, ttl).await }
        }))
        .await
    }

    /// Runs a batch operation over `keys`: the keys are grouped by the node to send them
    /// to (the primary, or the first healthy replica if the primary recently failed) and
    /// each group goes out as one call, all in parallel. The keys of a group whose node
    /// fails (unreachable, timed out) are regrouped by their next replica, skipping every
    /// node that failed during this call, and sent again, in batches too — so one hung node
    /// costs one attempt's budget, not one per key. Each attempt gets half of what is left
    /// of `deadline` while other replicas remain. `op` gets a node and the indices of the
    /// keys it must handle and returns one result per index, in order.
    async fn batched<T, F, Fut>(
        &self,
        keys: &[Bytes],
        deadline: tokio::time::Instant,
        op: F,
    ) -> Result<Vec<T>, Error>
    where
        T: Send + 'static,
        F: Fn(Node, Vec<usize>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<T>, Error>> + Send + 'static,
    {
        let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None).take(keys.len()).collect();
        let mut failed: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        let mut refreshed = false;
        let mut last: Option<Error> = None;
        while !pending.is_empty() {
            let view = self.view();
            let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            let mut last_chance = true;
            for &i in &pending {
                let candidates: Vec<String> = self
                    .replicas_by_health(&keys[i])
                    .into_iter()
                    .filter(|id| !failed.contains(id))
                    .collect();
                let Some(target) = candidates.first() else {
                    return Err(last.unwrap_or_else(|| {
                        Error::Unavailable("no replica of this key is known".into())
                    }));
                };
                last_chance &= candidates.len() == 1;
                groups.entry(target.clone()).or_default().push(i);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(last.unwrap_or(Error::TimedOut(self.builder.timeout)));
            }
            let budget = if last_chance { left } else { left / 2 };
            let mut set = tokio::task::JoinSet::new();
            for (target, idx) in std::mem::take(&mut groups) {
                let Some(client) = view.nodes.get(&target).cloned() else {
                    failed.insert(target);
                    pending.extend(idx);
                    continue;
                };
                let call = op(client.within(budget), idx.clone());
                set.spawn(async move {
                    let result = tokio::time::timeout(budget, call)
                        .await
                        .unwrap_or(Err(Error::TimedOut(budget)));
                    (target, idx, result)
                });
            }
            pending.clear();
            let mut wrong_node = false;
            while let Some(done) = set.join_next().await {
                let (target, idx, result) =
                    done.map_err(|e| Error::Cluster(format!("batch task failed: {e}")))?;
                match result {
                    Ok(values) if values.len() == idx.len() => {
                        self.record(&target, true);
                        for (i, v) in idx.into_iter().zip(values) {
                            out[i] = Some(v);
                        }
                    }
                    Ok(values) => {
                        return Err(Error::Cluster(format!(
                            "{target} answered {} results for {} keys",
                            values.len(),
                            idx.len()
                        )));
                    }
                    Err(e @ Error::WrongNode(_)) if !refreshed => {
                        wrong_node = true;
                        last = Some(e);
                        pending.extend(idx);
                    }
                    Err(e) if retryable(&e) => {
                        self.record_failure(&target, &e, budget);
                        failed.insert(target);
                        last = Some(e);
                        pending.extend(idx);
                    }
                    Err(e) => return Err(e),
                }
            }
            if wrong_node {
                refreshed = true;
                self.refresh().await?;
            }
        }
        out.into_iter()
            .collect::<Option<Vec<T>>>()
            .ok_or_else(|| Error::Cluster("a batch ended with keys unanswered".into()))
    }

    /// The values of `keys`, in order: one `MultiGet` per primary, in parallel; the keys of
    /// an unreachable primary are read, in batches again, from their next replicas.
    pub(crate) async fn get_many(&self, keys: Vec<Bytes>) -> Result<Vec<Option<Bytes>>, Error> {
        let shared = Arc::new(keys.clone());
        self.within_deadline(self.batched(&keys, self.deadline(), move |c, idx| {
            let group: Vec<Bytes> = idx.iter().map(|&i| shared[i].clone()).collect();
            async move { c.get_many(group).await }
        }))
        .await
    }

    /// Stores every pair with the same TTL: one `MultiSet` per primary, in parallel; the
    /// entries of an unreachable primary go, in batches again, to their next replicas.
    pub(crate) async fn set_many(
        &self,
        entries: Vec<(Bytes, Bytes)>,
        ttl: Option<Duration>,
    ) -> Result<(), Error> {
        let entries = Arc::new(entries);
        let keys: Vec<Bytes> = entries.iter().map(|(k, _)| k.clone()).collect();
        self.within_deadline(self.batched(&keys, self.deadline(), move |c, idx| {
            let group: Vec<(Bytes, Bytes)> = idx.iter().map(|&i| entries[i].clone()).collect();
            async move {
                let n = group.len();
                c.set_many(group, ttl).await.map(|()| vec![(); n])
            }
        }))
        .await
        .map(drop)
    }
}

/// A member state from the wire; an unknown value means the node is newer than this client.
fn member_state(raw: i32) -> Result<MemberState, Error> {
    cache_proto::convert::member_state_from_pb(raw).map_err(|raw| {
        Error::Cluster(format!(
            "a member has unknown state {raw}: upgrade the client"
        ))
    })
}
