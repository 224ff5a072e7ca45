//! A deterministic in-process cluster: N [`Coordinator`]s over an in-memory [`SimTransport`]
//! whose faults are one line each.
//!
//! Run it on a current-thread tokio runtime with time paused (`#[tokio::test(start_paused =
//! true)]`): timeouts then elapse instantly when every task waits, the nodes' clocks
//! ([`NodeClock::tokio`]) follow the same paused time, and every random choice (message loss,
//! delay) comes from one seeded generator — so a seed replays the same run.
//!
//! What a fault does to a call from A to B:
//!
//! - [`SimCluster::cut`] / [`SimCluster::isolate`]: the request is lost; A waits until its
//!   deadline (a partition, not a refused connection).
//! - [`SimCluster::set_loss`]: each request, and each reply, is lost with this probability
//!   (a lost reply means B did the work but A never hears of it).
//! - [`SimCluster::set_delay`]: each message takes a random time in the range.
//! - [`SimCluster::set_duplicates`]: a request is delivered again a little later (B does the
//!   work twice; nobody reads the second answer) — every kind of call except the forward of
//!   a conditional write, touch or update. Those are decided where they are delivered, so
//!   the core needs them delivered at most once: the gRPC transport gives that (HTTP/2
//!   delivers a request once, tonic never re-sends one, and the core re-sends a request
//!   only to another node, with new versions). [`PeerTransport`] states it as a rule.
//! - [`SimCluster::pause`]: B stops working (like `SIGSTOP`): calls reach it but wait until
//!   [`SimCluster::resume`]; A gives up at its deadline, and B then still does the work —
//!   however late, as a paused process reads its socket when it wakes. B's own calls (its
//!   queues, its anti-entropy) wait too. So do client requests sent to B.
//! - [`SimCluster::heal`] undoes cuts, loss, delay and duplicates, and resumes every node.
//!
//! The callee's work runs in its own task, so a caller that gives up does not cancel it —
//! as with a real server.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use cache_core::{CacheConfig, VersionedRead};
use cluster_membership::{Member, MemberState, MembershipView};
use cluster_ring::NodeId;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::clock::NodeClock;
use crate::coordinator::{Coordinator, CoreConfig, RequestContext};
use crate::error::{CoreError, PeerError};
use crate::limits::Limits;
use crate::mutation::Mutation;
use crate::request::{Request, Response};
use crate::ring::RingView;
use crate::store::{ApplyReport, Store};
use crate::sync::{SyncConfig, SyncReply, SyncRequest};
use crate::transport::{PeerCall, PeerReply, PeerTransport};

/// The simulator's only source of chance (the protocols' generator, so seeds replay).
pub type SimRng = cluster_membership::SplitMix64;

/// The network's current faults.
#[derive(Debug, Default)]
struct Faults {
    /// Cut links, as (smaller id, larger id).
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Chance per message of being lost, per mille.
    loss_per_mille: u32,
    /// Delay range per message, milliseconds.
    delay_ms: (u64, u64),
    /// Chance per request of being delivered a second time later, per mille.
    duplicate_per_mille: u32,
}

fn link(a: &NodeId, b: &NodeId) -> (NodeId, NodeId) {
    if a <= b {
        (a.clone(), b.clone())
    } else {
        (b.clone(), a.clone())
    }
}

/// The simulated network: who is reachable, and the faults between them.
#[derive(Debug)]
pub struct SimNet {
    nodes: Mutex<BTreeMap<NodeId, Weak<dyn SimNode>>>,
    paused: Mutex<BTreeMap<NodeId, watch::Sender<bool>>>,
    faults: Mutex<Faults>,
    rng: Mutex<SimRng>,
}

impl SimNet {
    fn new(seed: u64) -> Self {
        Self {
            nodes: Mutex::new(BTreeMap::new()),
            paused: Mutex::new(BTreeMap::new()),
            faults: Mutex::new(Faults::default()),
            rng: Mutex::new(SimRng::new(seed ^ 0x5151_5151)),
        }
    }

    fn lost(&self) -> bool {
        let per_mille = self.faults.lock().loss_per_mille;
        per_mille > 0 && self.rng.lock().chance(per_mille)
    }

    fn delay(&self) -> Duration {
        let (lo, hi) = self.faults.lock().delay_ms;
        if hi == 0 {
            return Duration::ZERO;
        }
        let ms = lo + self.rng.lock().below(hi.saturating_sub(lo) + 1);
        Duration::from_millis(ms)
    }

    /// Waits while `node` is paused (or until `deadline`); `false` if the deadline came first.
    async fn wait_running(&self, node: &NodeId, deadline: Instant) -> bool {
        let rx = self.paused.lock().get(node).map(watch::Sender::subscribe);
        let Some(mut rx) = rx else {
            return true;
        };
        tokio::time::timeout_at(deadline, rx.wait_for(|paused| !*paused))
            .await
            .is_ok()
    }

    /// Chance per message of being delivered twice.
    fn duplicated(&self) -> bool {
        let per_mille = self.faults.lock().duplicate_per_mille;
        per_mille > 0 && self.rng.lock().chance(per_mille)
    }

    /// Whether `callee` is still the process registered as `id` (not killed or replaced by
    /// a restart): a dead process executes nothing, even what was sent to it before.
    fn is_current(&self, id: &NodeId, callee: &Arc<dyn SimNode>) -> bool {
        self.nodes
            .lock()
            .get(id)
            .and_then(Weak::upgrade)
            .is_some_and(|now| std::ptr::addr_eq(Arc::as_ptr(&now), Arc::as_ptr(callee)))
    }

    /// Delivers one request to `callee` in its own task, as a socket does: it waits while
    /// the callee is paused — however long, whatever the sender's deadline (a `SIGSTOP`ped
    /// server reads its socket when it wakes) — and then the callee does the work, unless
    /// its process is gone by then.
    fn deliver<R: Send + 'static>(
        self: &Arc<Self>,
        to: &NodeId,
        callee: Arc<dyn SimNode>,
        work: Work<R>,
    ) -> tokio::task::JoinHandle<Result<R, CoreError>> {
        let net = Arc::clone(self);
        let to = to.clone();
        let rx = self.paused.lock().get(&to).map(watch::Sender::subscribe);
        tokio::spawn(async move {
            if let Some(mut rx) = rx {
                // A dropped sender (the cluster is gone) ends the wait too.
                let _ = rx.wait_for(|paused| !*paused).await;
            }
            if !net.is_current(&to, &callee) {
                return Err(CoreError::ShuttingDown);
            }
            work.await
        })
    }

    /// Carries one call from `call.from` to `to`: faults, then `work` on the callee in its
    /// own task (late if the callee is paused, and sometimes twice if `may_duplicate`), then
    /// the reply back through the same faults.
    async fn carry<R, F>(
        self: &Arc<Self>,
        to: &NodeId,
        call: PeerCall,
        may_duplicate: bool,
        work: F,
    ) -> Result<R, PeerError>
    where
        R: Send + 'static,
        F: Fn(Arc<dyn SimNode>, PeerCall) -> Work<R>,
    {
        let deadline = call.deadline;
        let unreachable = |detail: &str| PeerError::Unreachable {
            peer: to.to_string(),
            detail: detail.to_string(),
        };
        let no_answer = |detail: &str| PeerError::NoAnswer {
            peer: to.to_string(),
            detail: detail.to_string(),
        };
        let hang = |detail: &'static str| async move {
            tokio::time::sleep_until(deadline).await;
            Err(no_answer(detail))
        };
        // A paused node sends nothing either (like SIGSTOP): its background work (queues,
        // anti-entropy) waits until it is resumed.
        if !self.wait_running(&call.from, deadline).await {
            return Err(no_answer("the caller is paused"));
        }
        let callee = self.nodes.lock().get(to).and_then(Weak::upgrade);
        let Some(callee) = callee else {
            return Err(unreachable("connection refused (node is down)"));
        };
        if self.faults.lock().cut.contains(&link(&call.from, to)) {
            return hang("link cut").await;
        }
        if self.lost() {
            return hang("request lost").await;
        }
        tokio::time::sleep(self.delay()).await;
        if may_duplicate && self.duplicated() {
            // A second copy arrives later (a retransmission, a retried connection): the
            // callee does the work again; nobody reads that answer.
            let extra = self.delay() + Duration::from_millis(1 + self.rng.lock().below(50));
            let copy = work(Arc::clone(&callee), call.clone());
            let net = Arc::clone(self);
            let (to, callee) = (to.clone(), Arc::clone(&callee));
            tokio::spawn(async move {
                tokio::time::sleep(extra).await;
                let _ = net.deliver(&to, callee, copy).await;
            });
        }
        let task = self.deliver(to, callee.clone(), work(Arc::clone(&callee), call));
        let reply = match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(join)) => return Err(no_answer(&format!("callee task failed: {join}"))),
            Err(_) => return Err(no_answer("no answer before the deadline")),
        };
        if self.lost() {
            return hang("reply lost").await;
        }
        tokio::time::sleep(self.delay()).await;
        if Instant::now() > deadline {
            return Err(no_answer("reply arrived after the deadline"));
        }
        reply.map_err(|error| PeerError::Refused {
            peer: to.to_string(),
            error,
        })
    }
}

/// The callee's side of a call, boxed: a forwarded request may itself call peers, so its
/// future's type would otherwise contain itself.
type Work<R> = Pin<Box<dyn Future<Output = Result<R, CoreError>> + Send>>;

/// The in-memory [`PeerTransport`] of one simulated node.
#[derive(Debug, Clone)]
pub struct SimTransport {
    net: Arc<SimNet>,
}

/// A simulated node as the network sees it: the three kinds of call it answers. The
/// callee's future is boxed here, behind a trait object, so that the transport's futures do
/// not contain the coordinator's (which contain the transport's: a cycle the compiler cannot
/// size).
trait SimNode: Send + Sync + std::fmt::Debug {
    fn forward(self: Arc<Self>, call: PeerCall, request: Request) -> Work<PeerReply<Response>>;
    fn replicate(
        self: Arc<Self>,
        call: PeerCall,
        mutations: Vec<Mutation>,
    ) -> Work<PeerReply<ApplyReport>>;
    fn fetch(
        self: Arc<Self>,
        call: PeerCall,
        keys: Vec<Bytes>,
    ) -> Work<PeerReply<Vec<Option<VersionedRead>>>>;
    fn sync(self: Arc<Self>, call: PeerCall, request: SyncRequest) -> Work<PeerReply<SyncReply>>;
}

impl SimNode for Coordinator<SimTransport> {
    fn forward(self: Arc<Self>, call: PeerCall, request: Request) -> Work<PeerReply<Response>> {
        Box::pin(async move {
            let body = self.handle_forward(call, request).await?;
            Ok(PeerReply {
                body,
                ring_fingerprint: self.ring().load().ring.fingerprint(),
            })
        })
    }

    fn replicate(
        self: Arc<Self>,
        call: PeerCall,
        mutations: Vec<Mutation>,
    ) -> Work<PeerReply<ApplyReport>> {
        Box::pin(async move {
            let body = self.handle_replicate(&call, &mutations).await?;
            Ok(PeerReply {
                body,
                ring_fingerprint: self.ring().load().ring.fingerprint(),
            })
        })
    }

    fn fetch(
        self: Arc<Self>,
        call: PeerCall,
        keys: Vec<Bytes>,
    ) -> Work<PeerReply<Vec<Option<VersionedRead>>>> {
        Box::pin(async move {
            let body = self.handle_fetch(&call, &keys)?;
            Ok(PeerReply {
                body,
                ring_fingerprint: self.ring().load().ring.fingerprint(),
            })
        })
    }

    fn sync(self: Arc<Self>, call: PeerCall, request: SyncRequest) -> Work<PeerReply<SyncReply>> {
        Box::pin(async move {
            let body = self.handle_sync(&call, request).await?;
            Ok(PeerReply {
                body,
                ring_fingerprint: self.ring().load().ring.fingerprint(),
            })
        })
    }
}

impl PeerTransport for SimTransport {
    async fn forward(
        &self,
        to: &NodeId,
        call: PeerCall,
        request: Request,
    ) -> Result<PeerReply<Response>, PeerError> {
        self.net
            .carry(to, call, request.idempotent(), |callee, call| {
                callee.forward(call, request.clone())
            })
            .await
    }

    async fn replicate(
        &self,
        to: &NodeId,
        call: PeerCall,
        mutations: Vec<Mutation>,
    ) -> Result<PeerReply<ApplyReport>, PeerError> {
        self.net
            .carry(to, call, true, |callee, call| {
                callee.replicate(call, mutations.clone())
            })
            .await
    }

    async fn fetch(
        &self,
        to: &NodeId,
        call: PeerCall,
        keys: Vec<Bytes>,
    ) -> Result<PeerReply<Vec<Option<VersionedRead>>>, PeerError> {
        self.net
            .carry(to, call, true, |callee, call| {
                callee.fetch(call, keys.clone())
            })
            .await
    }

    async fn sync(
        &self,
        to: &NodeId,
        call: PeerCall,
        request: SyncRequest,
    ) -> Result<PeerReply<SyncReply>, PeerError> {
        self.net
            .carry(to, call, true, |callee, call| {
                callee.sync(call, request.clone())
            })
            .await
    }
}

/// Settings of a simulated cluster.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Nodes (`n0`, `n1`, ...).
    pub nodes: usize,
    /// Seeds the network's faults.
    pub seed: u64,
    /// Each node's cluster settings.
    pub core: CoreConfig,
    /// Each node's engine.
    pub cache: CacheConfig,
    /// Each node's limits.
    pub limits: Limits,
    /// Allowed drift of observed versions.
    pub max_drift: Duration,
    /// Anti-entropy on every node (`None`: off, as before it existed).
    pub sync: Option<SyncConfig>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nodes: 3,
            seed: 0,
            core: CoreConfig {
                peer_timeout: Duration::from_millis(200),
                ..CoreConfig::default()
            },
            cache: CacheConfig::new().with_max_bytes(64 << 20).with_shards(4),
            limits: Limits::default(),
            max_drift: Duration::from_secs(5),
            sync: None,
        }
    }
}

/// Unix milliseconds at which simulated time starts.
pub const SIM_EPOCH_MS: u64 = 1_700_000_000_000;

/// N coordinators over one [`SimNet`]. Must be created inside a tokio runtime.
///
/// Membership changes (restart, join, leave, death) take `&self`, so a fault task can make
/// them while clients hold the cluster too.
#[derive(Debug)]
pub struct SimCluster {
    net: Arc<SimNet>,
    nodes: Mutex<Vec<Arc<Coordinator<SimTransport>>>>,
    ids: Mutex<Vec<NodeId>>,
    config: SimConfig,
    /// The membership view every node follows (static membership: the test changes it).
    view: Mutex<MembershipView>,
    /// When the cluster started: a node started later reads the same clock as the others.
    started: Instant,
}

fn sim_member(i: usize, id: &NodeId) -> Member {
    let port = 7000 + u16::try_from(i).expect("a simulated cluster is small");
    Member {
        id: id.to_string(),
        rpc_addr: ([127, 0, 0, 1], port).into(),
        peer_addr: ([127, 0, 0, 1], port + 100).into(),
        state: MemberState::Alive,
        incarnation: 0,
        weight: 1,
    }
}

impl SimCluster {
    /// Starts `config.nodes` nodes that all know each other (static membership).
    pub fn new(config: SimConfig) -> Self {
        let net = Arc::new(SimNet::new(config.seed));
        let ids: Vec<NodeId> = (0..config.nodes).map(Self::id).collect();
        let members = ids
            .iter()
            .enumerate()
            .map(|(i, id)| sim_member(i, id))
            .collect();
        let view = MembershipView { epoch: 1, members };
        let cluster = Self {
            net,
            nodes: Mutex::new(Vec::new()),
            ids: Mutex::new(ids.clone()),
            config,
            view: Mutex::new(view),
            started: Instant::now(),
        };
        for id in &ids {
            let node = cluster.make_node(id);
            cluster.nodes.lock().push(node);
        }
        cluster
    }

    fn id(i: usize) -> NodeId {
        NodeId::new(format!("n{i}")).expect("short ids are valid")
    }

    /// A fresh (empty) node `id` following the current view, registered on the network.
    fn make_node(&self, id: &NodeId) -> Arc<Coordinator<SimTransport>> {
        let config = &self.config;
        let store = Store::new(
            id,
            config.cache.clone(),
            NodeClock::tokio(
                SIM_EPOCH_MS
                    + u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            ),
            config.limits,
            config.max_drift,
        )
        .expect("the simulator's cache config is valid");
        let view = self.view.lock().clone();
        let ring = RingView::new(view, config.core.replication_factor)
            .expect("simulated members form a ring");
        let node = Arc::new(Coordinator::new(
            id.clone(),
            Arc::new(store),
            Arc::new(ring),
            Arc::new(SimTransport {
                net: Arc::clone(&self.net),
            }),
            config.core.clone(),
        ));
        node.assign_version_tag();
        if let Some(sync) = config.sync {
            node.start_anti_entropy(sync);
        }
        let weak: Weak<dyn SimNode> = Arc::downgrade(&node) as Weak<Coordinator<SimTransport>>;
        self.net.nodes.lock().insert(id.clone(), weak);
        self.net
            .paused
            .lock()
            .entry(id.clone())
            .or_insert_with(|| watch::channel(false).0);
        node
    }

    /// Sets member `id`'s state in the view and gives every node the new view (a
    /// membership change).
    fn publish_state(&self, id: &NodeId, state: MemberState) {
        let view = {
            let mut view = self.view.lock();
            for m in &mut view.members {
                if *id == m.id {
                    m.state = state;
                }
            }
            view.epoch += 1;
            view.clone()
        };
        self.publish(&view);
    }

    fn publish(&self, view: &MembershipView) {
        let nodes = self.nodes.lock().clone();
        for node in nodes {
            node.ring()
                .update(view.clone())
                .expect("simulated members form a ring");
            node.assign_version_tag();
        }
    }

    /// Kills node `a` and starts it again empty with the same id (a restart without
    /// persistence): the old one stops answering at once.
    pub async fn restart_empty(&self, a: usize) {
        let old = self.node(a);
        let id = self.id_of(a);
        self.net.nodes.lock().remove(&id);
        old.shutdown(Duration::ZERO).await;
        let fresh = self.make_node(&id);
        self.nodes.lock()[a] = fresh;
    }

    /// Starts a new, empty node and adds it to every node's view (a join); returns its
    /// index.
    pub fn join(&self) -> usize {
        let (i, id) = {
            let mut ids = self.ids.lock();
            let i = ids.len();
            let id = Self::id(i);
            ids.push(id.clone());
            (i, id)
        };
        let view = {
            let mut view = self.view.lock();
            view.members.push(sim_member(i, &id));
            view.epoch += 1;
            view.clone()
        };
        let node = self.make_node(&id);
        self.nodes.lock().push(node);
        self.publish(&view);
        i
    }

    /// Node `a` leaves gracefully: it hands its keys over to their replicas in the ring
    /// without it ([`Coordinator::hand_over`]), shuts down, and every other node's view
    /// marks it left.
    pub async fn leave_gracefully(&self, a: usize) -> crate::sync::HandOver {
        let node = self.node(a);
        let report = node
            .hand_over(Instant::now() + Duration::from_secs(10))
            .await;
        node.shutdown(Duration::from_secs(1)).await;
        let id = self.id_of(a);
        self.net.nodes.lock().remove(&id);
        self.publish_state(&id, MemberState::Left);
        report
    }

    /// Kills node `a` (it stops answering) and, as membership would after detecting it,
    /// marks it dead in every other node's view.
    pub async fn kill_and_declare_dead(&self, a: usize) {
        let id = self.id_of(a);
        self.net.nodes.lock().remove(&id);
        self.node(a).shutdown(Duration::ZERO).await;
        self.publish_state(&id, MemberState::Dead);
    }

    /// Runs every node's failure detector once, each on its own: node `i` marks as dead
    /// every member it cannot reach now (a cut link, a paused or killed node, itself
    /// paused: nothing answers it) and as alive every member it can; members that left or
    /// were declared dead by [`SimCluster::kill_and_declare_dead`] stay so. Each node gets
    /// its own view, so a partition gives diverging views — a minority that sees the
    /// majority dead, as gossip would after its suspicion timeout — and a heal followed by
    /// another round brings them back together.
    pub fn detect_failures(&self) {
        let ids = self.ids();
        let base = self.view.lock().clone();
        let faults = self.net.faults.lock();
        let paused: BTreeSet<NodeId> = self
            .net
            .paused
            .lock()
            .iter()
            .filter(|(_, tx)| *tx.borrow())
            .map(|(id, _)| id.clone())
            .collect();
        let up: BTreeSet<NodeId> = self.net.nodes.lock().keys().cloned().collect();
        let mut views = Vec::with_capacity(ids.len());
        for me in &ids {
            let mut view = base.clone();
            for m in &mut view.members {
                if m.id == **me || !matches!(m.state, MemberState::Alive | MemberState::Dead) {
                    continue;
                }
                let Ok(them) = NodeId::new(m.id.clone()) else {
                    continue;
                };
                // A killed node (declared dead by `kill_and_declare_dead`) is not `up`.
                let reachable = up.contains(&them)
                    && !paused.contains(&them)
                    && !paused.contains(me)
                    && !faults.cut.contains(&link(me, &them));
                m.state = if reachable {
                    MemberState::Alive
                } else {
                    MemberState::Dead
                };
            }
            // Comparable epochs, as the network memberships make them: a hash of the owners.
            view.epoch = view
                .owners()
                .flat_map(|m| m.id.bytes().chain([0xff]))
                .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                });
            views.push(view);
        }
        drop(faults);
        let nodes = self.nodes.lock().clone();
        for (node, view) in nodes.iter().zip(views) {
            // A view that forms no ring (a node that sees nobody, itself included, as an
            // owner) cannot happen: a node always sees itself alive.
            let _ = node.ring().update(view);
            node.assign_version_tag();
        }
    }

    /// An operator's removal of dead node `a` on every node ([`RingView::forget`]): its
    /// keys' quorums count the members that took its place from now on.
    pub fn forget(&self, a: usize) {
        let id = self.id_of(a);
        self.view.lock().members.retain(|m| *id != m.id);
        for node in self.nodes.lock().iter() {
            let _ = node.ring().forget(&id);
        }
    }

    /// Node `i` (the current process of that id).
    pub fn node(&self, i: usize) -> Arc<Coordinator<SimTransport>> {
        Arc::clone(&self.nodes.lock()[i])
    }

    /// Node ids, by index.
    pub fn ids(&self) -> Vec<NodeId> {
        self.ids.lock().clone()
    }

    fn id_of(&self, i: usize) -> NodeId {
        self.ids.lock()[i].clone()
    }

    /// The index of node `id`.
    pub fn index_of(&self, id: &NodeId) -> usize {
        self.ids
            .lock()
            .iter()
            .position(|x| x == id)
            .expect("a node of this cluster")
    }

    /// A client request to node `i` that may take `timeout`, sent as the SDK sends it: with
    /// its deadline as a wall-clock time ([`RequestContext::not_after_ms`]). A paused node
    /// does not answer until resumed — the client gives up at its deadline — and then still
    /// reads and serves the request, as a real server reads its socket when it wakes.
    pub async fn request(
        &self,
        i: usize,
        request: Request,
        timeout: Duration,
    ) -> Result<Response, CoreError> {
        let node = self.node(i);
        let mut ctx = RequestContext::client(timeout);
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        ctx.not_after_ms = Some(node.store().now_ms().saturating_add(timeout_ms));
        let callee: Arc<dyn SimNode> = Arc::clone(&node) as Arc<Coordinator<SimTransport>>;
        let work: Work<Response> = Box::pin(async move { node.handle(request, ctx).await });
        let task = self.net.deliver(&self.id_of(i), callee, work);
        match tokio::time::timeout_at(ctx.deadline, task).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(join)) => Err(CoreError::Internal(format!("request task failed: {join}"))),
            Err(_) => Err(CoreError::DeadlineExceeded(timeout)),
        }
    }

    /// Cuts the link between nodes `a` and `b` (both directions).
    pub fn cut(&self, a: usize, b: usize) {
        let l = link(&self.id_of(a), &self.id_of(b));
        self.net.faults.lock().cut.insert(l);
    }

    /// Cuts every link of node `a`.
    pub fn isolate(&self, a: usize) {
        let n = self.ids.lock().len();
        for b in 0..n {
            if b != a {
                self.cut(a, b);
            }
        }
    }

    /// Loses each message with probability `per_mille / 1000`.
    pub fn set_loss(&self, per_mille: u32) {
        self.net.faults.lock().loss_per_mille = per_mille.min(1000);
    }

    /// Delays each message by a random time in `min_ms..=max_ms` (messages overtake each
    /// other: a reordering network).
    pub fn set_delay(&self, min_ms: u64, max_ms: u64) {
        self.net.faults.lock().delay_ms = (min_ms, max_ms.max(min_ms));
    }

    /// Delivers each request a second time, a little later, with probability
    /// `per_mille / 1000` (the callee does the work twice; the second answer is lost).
    pub fn set_duplicates(&self, per_mille: u32) {
        self.net.faults.lock().duplicate_per_mille = per_mille.min(1000);
    }

    /// Pauses node `a` (it answers nothing until resumed).
    pub fn pause(&self, a: usize) {
        if let Some(tx) = self.net.paused.lock().get(&self.id_of(a)) {
            tx.send_replace(true);
        }
    }

    /// Resumes node `a`.
    pub fn resume(&self, a: usize) {
        if let Some(tx) = self.net.paused.lock().get(&self.id_of(a)) {
            tx.send_replace(false);
        }
    }

    /// Removes every cut, loss and delay, and resumes every node.
    pub fn heal(&self) {
        *self.net.faults.lock() = Faults::default();
        for tx in self.net.paused.lock().values() {
            tx.send_replace(false);
        }
    }

    /// Shuts every node down (draining replication for at most `grace`).
    pub async fn shutdown(&self, grace: Duration) {
        let nodes = self.nodes.lock().clone();
        for node in nodes {
            node.shutdown(grace).await;
        }
    }
}
