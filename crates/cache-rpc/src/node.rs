//! A whole node: the cluster core (store, engine, reaper, replication) behind three
//! listeners — the public gRPC API (`cache.v1.Cache`, health, reflection), the peer listener
//! (`cache.peer.v1.Peer` only, so it can be firewalled) and admin HTTP (`/metrics`,
//! `/healthz`, `/readyz`, `/status`) — with graceful shutdown.
//!
//! [`Node::bind`] binds every listener (so "address in use" is reported before anything
//! starts) and [`Node::run`] serves until the shutdown future completes, then drains in
//! phases, all within `shutdown_grace`:
//!
//! 1. For the notice period (`shutdown_notice`, 1 s by default) every new client request is
//!    answered `UNAVAILABLE` and health/readiness report not serving, so clients move on
//!    using the connections they have. Peer traffic is still served.
//! 2. The public and admin listeners close; in-flight client requests finish.
//! 3. With network membership (a leave), every key is handed over to the node that
//!    replicates it once this one is gone (`Coordinator::hand_over`, half of the grace left).
//!    The replication queues drain to the peers with whatever grace is left; what cannot be
//!    delivered is counted in `cache_replication_dropped_total`. Then the peer listener
//!    closes, every owned background task is awaited, and the reaper stops.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use cache_core::{CacheConfig, Reaper};
use cache_proto::peer::v1::peer_server::PeerServer;
use cache_proto::v1::cache_server::CacheServer;
use cluster_core::{Coordinator, CoreConfig, Limits, NodeClock, RingView, Store, SyncConfig};
use cluster_membership::swim::{Addrs, SwimConfig, Update};
use cluster_membership::{
    GossipConfig, GossipMembership, Membership, PeerSpec, ProtocolConfig, RegistryConfig,
    StaticMembership,
};
use cluster_ring::NodeId;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::NodeMetrics;
use crate::service::{CacheService, PeerService, Shared};
use crate::transport::GrpcTransport;

/// How the node learns who is in the cluster.
#[derive(Debug, Clone, Default)]
pub enum MembershipMode {
    /// The member list given at start-up (`--peers`; a single node without it).
    #[default]
    Static,
    /// Members find each other over the network (`--membership gossip|coordinator`).
    Network {
        /// SWIM gossip, or a coordinator's registry.
        protocol: NetworkProtocol,
        /// Where to listen (UDP, and TCP for whole lists; port 0 picks one).
        listen: SocketAddr,
        /// Seed members' gossip addresses (`host:port`), resolved at every attempt.
        join: Vec<String>,
        /// Only members with the same name form a cluster.
        cluster_name: String,
        /// The IP others should use to reach this node (all three addresses), when the
        /// listeners bind a wildcard address.
        advertise: Option<std::net::IpAddr>,
        /// Cluster secrets authenticating gossip (`--gossip-keys-file`); `None`: gossip is
        /// unauthenticated.
        keyring: Option<cluster_membership::Keyring>,
    },
}

/// The network membership protocols.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkProtocol {
    /// SWIM gossip: no single point of failure.
    Gossip,
    /// A coordinator's registry: `coordinator` is its gossip address (`host:port`), or
    /// `None` on the coordinator itself.
    Coordinator {
        /// The coordinator's address; `None`: this node is the coordinator.
        coordinator: Option<String>,
    },
}

/// Everything a node needs to start. The binary fills it from flags, env and file.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's stable id.
    pub node_id: String,
    /// Public gRPC listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Peer listener address (node-to-node traffic only; port 0 picks a free port).
    pub peer_listen: SocketAddr,
    /// Admin HTTP listen address (port 0 picks a free port).
    pub admin_listen: SocketAddr,
    /// Redis-protocol (RESP2) listen address; `None` (the default): no RESP listener.
    pub resp_listen: Option<SocketAddr>,
    /// The engine's configuration.
    pub cache: CacheConfig,
    /// Request limits.
    pub limits: Limits,
    /// How often the background reaper sweeps.
    pub reaper_interval: Duration,
    /// Slots examined per shard lock by the reaper.
    pub reaper_budget: usize,
    /// How long shutdown may take in all (in-flight requests, then the replication drain).
    pub shutdown_grace: Duration,
    /// The first part of the grace period, during which the node stays connected but
    /// answers `UNAVAILABLE` and fails readiness (capped at `shutdown_grace`).
    pub shutdown_notice: Duration,
    /// Every member of the cluster, this node included (`--peers`); empty for a single node.
    pub peers: Vec<PeerSpec>,
    /// Static membership or gossip.
    pub membership: MembershipMode,
    /// Replication and peer settings.
    pub cluster: CoreConfig,
    /// How far ahead of this node's clock a peer's version may be before it is refused.
    pub max_clock_drift: Duration,
    /// Longest a client request may take (a shorter client deadline wins).
    pub request_timeout: Duration,
    /// Which requests the slow log keeps (`--slowlog-threshold`, `--slowlog-max-len`).
    pub slowlog: crate::slowlog::SlowLogConfig,
    /// Anti-entropy and range sync (`None`: off; a restarted node then stays empty).
    pub anti_entropy: Option<SyncConfig>,
    /// The append-only file and snapshots (`None`: nothing is persisted).
    pub persistence: Option<cache_persist::PersistConfig>,
    /// Limits of the client gRPC listener; the peer listener uses the same deadlines with
    /// at most [`PEER_CONNECTIONS`] connections. Lowered at start to fit the open-file limit
    /// (see [`Node::bind`]).
    pub connections: crate::conn::ConnLimits,
    /// Client tokens (`--auth-file`, parsed); `None`: every client may do everything.
    pub auth: Option<Vec<crate::auth::TokenEntry>>,
    /// TLS on the client gRPC and RESP listeners (`--tls-cert`, `--tls-key`,
    /// `--tls-client-ca`); `None`: plaintext.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Mutual TLS between members on the peer listener (`--peer-tls-cert`,
    /// `--peer-tls-key`, `--peer-tls-ca`: `client_ca` is the cluster CA, required);
    /// `None`: plaintext.
    pub peer_tls: Option<crate::tls::TlsFiles>,
    /// Serve the admin HTTP port over TLS with the client certificate (`--admin-tls`;
    /// needs `tls`).
    pub admin_tls: bool,
    /// `/readyz` answers 200 while the node is syncing (`--ready-while-syncing`); by
    /// default it answers 503 until the node has caught up with its replicas.
    pub ready_while_syncing: bool,
}

/// Largest header list (metadata) a request may carry: 64 KiB. gRPC metadata is small;
/// h2's default (16 MiB) let one request with 1 MiB of metadata tear down the whole
/// connection, and every other call on it.
pub const MAX_HEADER_LIST_BYTES: u32 = 64 << 10;

/// Most calls (HTTP/2 streams) open at once on one connection, advertised in SETTINGS.
/// tonic's default is no limit: one connection that opened 50 000 calls and never sent
/// their bodies held 60 MB of the node's memory. A client at the limit queues further calls
/// until one finishes (h2 does that); the SDK sends its calls on one pipelined stream.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// Most connections the peer listener accepts (other members: one channel each).
pub const PEER_CONNECTIONS: usize = 1024;
/// Most connections the admin listener accepts: its own budget, so health checks and
/// `/metrics` answer when clients are at their limit.
pub const ADMIN_CONNECTIONS: usize = 32;
/// How long an admin HTTP client may take to send its request headers (slowloris).
pub const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// File descriptors kept out of the client and peer budgets: the admin listener, the data
/// directory, outgoing peer channels, gossip, logs.
const RESERVED_FDS: u64 = ADMIN_CONNECTIONS as u64 + 64;

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: "local".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7000)),
            peer_listen: SocketAddr::from(([127, 0, 0, 1], 7100)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7080)),
            resp_listen: None,
            cache: CacheConfig::default(),
            limits: Limits::default(),
            reaper_interval: Duration::from_millis(100),
            reaper_budget: 1024,
            shutdown_grace: Duration::from_secs(10),
            shutdown_notice: Duration::from_secs(1),
            peers: Vec::new(),
            membership: MembershipMode::Static,
            cluster: CoreConfig::default(),
            max_clock_drift: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            slowlog: crate::slowlog::SlowLogConfig::default(),
            anti_entropy: Some(SyncConfig::default()),
            persistence: None,
            connections: crate::conn::ConnLimits {
                max_connections: 10_000,
                handshake_timeout: Some(Duration::from_secs(10)),
                idle_timeout: Some(Duration::from_secs(300)),
            },
            auth: None,
            tls: None,
            peer_tls: None,
            admin_tls: false,
            ready_while_syncing: false,
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A listener could not be bound (address in use, not local, no permission...).
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Which listener.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The engine configuration is invalid.
    #[error("invalid cache configuration")]
    Config(#[from] cache_core::ConfigError),
    /// The member list does not form a ring (bad node id, ...).
    #[error("invalid cluster membership")]
    Ring(#[from] cluster_ring::RingError),
    /// The member list is invalid, or gossip could not start.
    #[error("membership")]
    Membership(#[from] cluster_membership::MembershipError),
    /// The addresses cannot be advertised as they are (a wildcard bind without
    /// `--advertise`, or gossip combined with `--peers`).
    #[error("{0}")]
    Advertise(String),
    /// The reaper thread could not be started.
    #[error("cannot start the reaper thread: {0}")]
    Reaper(std::io::Error),
    /// A gRPC server failed while running.
    #[error("gRPC server failed")]
    Serve(#[from] tonic::transport::Error),
    /// Reflection could not be set up (the embedded descriptor is broken: a build bug).
    #[error("gRPC reflection could not be set up")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The data directory could not be loaded (corrupt, unreadable) or the log started.
    #[error("{0}")]
    Persist(#[from] cache_persist::PersistError),
    /// The TLS certificate, key or client CA could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The admin HTTP server failed while running.
    #[error("admin HTTP server failed: {0}")]
    Admin(std::io::Error),
}

/// A node with its listeners bound, ready to [`Node::run`].
pub struct Node {
    shared: Arc<Shared>,
    config: NodeConfig,
    grpc: TcpListener,
    peer: TcpListener,
    admin: TcpListener,
    resp: Option<TcpListener>,
    tls: Option<Arc<crate::tls::ServerTls>>,
    peer_tls: Option<Arc<crate::tls::ServerTls>>,
    prometheus: PrometheusHandle,
    /// Keeps the membership (and so its background work) alive; left on shutdown.
    membership: Arc<dyn Membership>,
    /// The gossip address, in gossip mode.
    gossip_addr: Option<SocketAddr>,
    /// The peer listener's connection cap (fitted to the open-file limit).
    peer_max: usize,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("config", &self.config)
            .field("core", &self.shared.core)
            .finish_non_exhaustive()
    }
}

fn local_addr(
    l: &TcpListener,
    addr: SocketAddr,
    what: &'static str,
) -> Result<SocketAddr, NodeError> {
    l.local_addr()
        .map_err(|source| NodeError::Bind { addr, what, source })
}

impl Node {
    /// Builds the core and binds every listener. Fails fast, before serving anything.
    ///
    /// The client and peer connection caps are lowered, with a warning, when the open-file
    /// limit (`ulimit -n`) cannot hold them plus a reserve for the admin port and the
    /// node's own files: three quarters of what is left go to clients, a quarter to peers.
    pub async fn bind(mut config: NodeConfig) -> Result<Self, NodeError> {
        let mut peer_max = PEER_CONNECTIONS;
        if let Some(limit) = crate::conn::open_files_limit() {
            let available = limit.saturating_sub(RESERVED_FDS).max(8);
            let clients = usize::try_from(available * 3 / 4).unwrap_or(usize::MAX);
            peer_max = peer_max.min(usize::try_from(available / 4).unwrap_or(usize::MAX).max(2));
            if config.connections.max_connections > clients {
                tracing::warn!(
                    configured = config.connections.max_connections,
                    using = clients,
                    open_files_limit = limit,
                    "--max-connections lowered to fit the open-file limit (ulimit -n); raise the limit to serve more clients"
                );
                config.connections.max_connections = clients;
            }
        }
        let node_id = NodeId::new(config.node_id.clone())?;
        let store = Arc::new(Store::new(
            &config.node_id,
            config.cache.clone(),
            NodeClock::System,
            config.limits,
            config.max_clock_drift,
        )?);
        let grpc = bind(config.listen, "gRPC").await?;
        let peer = bind(config.peer_listen, "peer").await?;
        let admin = bind(config.admin_listen, "admin HTTP").await?;
        let resp = match config.resp_listen {
            Some(addr) => Some(bind(addr, "RESP").await?),
            None => None,
        };
        let tls = match config.tls.clone() {
            Some(files) => Some(Arc::new(crate::tls::ServerTls::load(files)?)),
            None if config.admin_tls => {
                return Err(NodeError::Tls(crate::tls::TlsError::Config(
                    "--admin-tls serves the certificate of --tls-cert/--tls-key: set them".into(),
                )));
            }
            None => None,
        };
        let peer_tls = match config.peer_tls.clone() {
            Some(files) if files.client_ca.is_none() => {
                return Err(NodeError::Tls(crate::tls::TlsError::Config(
                    "peer TLS needs the cluster CA (--peer-tls-ca): only members may call the peer listener".into(),
                )));
            }
            Some(files) => Some(Arc::new(crate::tls::ServerTls::load(files)?)),
            None => None,
        };
        let grpc_addr = local_addr(&grpc, config.listen, "gRPC")?;
        let peer_addr = local_addr(&peer, config.peer_listen, "peer")?;
        let metrics = Arc::new(NodeMetrics::register(crate::metrics::recorder()));
        // The data directory is loaded before anything serves or syncs: the node joins
        // with what it had, and anti-entropy fills only the gap.
        let persistence = match config.persistence.clone() {
            None => None,
            Some(pc) => {
                let series = metrics.persist();
                let on_fsync = Box::new(move |d: Duration| series.fsync.record(d.as_secs_f64()));
                let store = Arc::clone(&store);
                let p = tokio::task::spawn_blocking(move || {
                    cache_persist::Persistence::open(pc, store, on_fsync)
                })
                .await
                .map_err(|e| {
                    NodeError::Persist(cache_persist::PersistError::Io {
                        what: "the recovery task".into(),
                        source: std::io::Error::other(e.to_string()),
                    })
                })??;
                let r = p.recovery();
                tracing::info!(
                    dir = %p.config().dir.display(),
                    appendfsync = %p.config().fsync,
                    snapshot = r.snapshot.as_ref().map(|s| s.0.display().to_string()),
                    segments = r.segments,
                    records = r.records,
                    applied = r.applied,
                    expired = r.expired,
                    refused = r.refused,
                    took_ms = r.took.as_millis() as u64,
                    "data directory loaded"
                );
                Some(p)
            }
        };
        let prometheus = metrics.handle();
        let mut gossip_addr = None;
        let membership: Arc<dyn Membership> = match &config.membership {
            MembershipMode::Static if config.peers.is_empty() => Arc::new(
                StaticMembership::single(&config.node_id, grpc_addr, peer_addr),
            ),
            MembershipMode::Static => Arc::new(StaticMembership::new(
                &config.node_id,
                config.peers.clone(),
            )?),
            MembershipMode::Network {
                protocol,
                listen,
                join,
                cluster_name,
                advertise,
                keyring,
            } => {
                if !config.peers.is_empty() {
                    return Err(NodeError::Advertise(
                        "--peers is for static membership; with gossip, name seeds with --join"
                            .into(),
                    ));
                }
                let ip = match advertise {
                    Some(ip) => *ip,
                    None if grpc_addr.ip().is_unspecified() => {
                        return Err(NodeError::Advertise(format!(
                            "--listen {grpc_addr} is a wildcard address: set --advertise to the IP other nodes and clients should use"
                        )));
                    }
                    None => grpc_addr.ip(),
                };
                let gossip = GossipMembership::start(GossipConfig {
                    identity: Update {
                        id: config.node_id.clone(),
                        addrs: Addrs {
                            gossip: SocketAddr::new(ip, listen.port()),
                            rpc: SocketAddr::new(ip, grpc_addr.port()),
                            peer: SocketAddr::new(ip, peer_addr.port()),
                        },
                        weight: 1,
                        incarnation: 0,
                        state: cluster_membership::MemberState::Alive,
                        suspected_by: None,
                    },
                    bind: *listen,
                    join: join.clone(),
                    keyring: keyring.clone(),
                    protocol: match protocol {
                        NetworkProtocol::Gossip => ProtocolConfig::Swim(SwimConfig {
                            cluster_name: cluster_name.clone(),
                            ..SwimConfig::default()
                        }),
                        NetworkProtocol::Coordinator { coordinator } => {
                            ProtocolConfig::Coordinator {
                                config: RegistryConfig {
                                    cluster_name: cluster_name.clone(),
                                    ..RegistryConfig::default()
                                },
                                coordinator: coordinator.clone(),
                            }
                        }
                    },
                })
                .await?;
                gossip_addr = Some(gossip.gossip_addr());
                Arc::new(gossip)
            }
        };
        membership.join()?;
        let mut views = membership.view();
        let first = views.borrow_and_update().clone();
        if let Some(me) = first.member(&config.node_id)
            && me.peer_addr.port() != peer_addr.port()
        {
            tracing::warn!(
                listed = %me.peer_addr,
                bound = %peer_addr,
                "--peers gives this node a peer address other than the one it listens on; \
                 peers will not reach it (set --peer-listen or id=addr/peer_addr)"
            );
        }
        let alone = !first.members.iter().any(|m| m.id != config.node_id);
        let ring = Arc::new(RingView::new(first, config.cluster.replication_factor)?);
        let mut transport = GrpcTransport::new(
            Arc::clone(&ring),
            config.cluster.peer_timeout,
            config.limits.max_response_bytes(),
        );
        if let Some(t) = &peer_tls {
            transport = transport.with_tls(Arc::clone(t));
        }
        let transport = Arc::new(transport);
        let core = Arc::new(Coordinator::new(
            node_id,
            store,
            ring,
            transport,
            config.cluster.clone(),
        ));
        // A node told where its cluster is serves no client until it has joined it.
        let seeded = match &config.membership {
            MembershipMode::Network { join, protocol, .. } => {
                !join.is_empty()
                    || matches!(
                        protocol,
                        NetworkProtocol::Coordinator {
                            coordinator: Some(_)
                        }
                    )
            }
            MembershipMode::Static => false,
        };
        if seeded && alone {
            core.require_join();
        }
        core.follow(views);
        if let Some(sync) = config.anti_entropy {
            core.start_anti_entropy(sync);
        }
        let shared = Arc::new(Shared {
            core,
            metrics,
            requests: AtomicU64::new(0),
            started: Instant::now(),
            request_timeout: config.request_timeout,
            slowlog: crate::slowlog::SlowLog::new(config.slowlog),
            stopping: CancellationToken::new(),
            membership: crate::service::MembershipHandle(Arc::clone(&membership)),
            persistence,
            auth: config
                .auth
                .clone()
                .map(|t| Arc::new(crate::auth::Auth::new(t))),
            connections: Default::default(),
            ready_while_syncing: config.ready_while_syncing,
        });
        Ok(Self {
            shared,
            config,
            grpc,
            peer,
            admin,
            resp,
            tls,
            peer_tls,
            prometheus,
            membership,
            gossip_addr,
            peer_max,
        })
    }

    /// The peer listener's mutual TLS, to reload its certificate.
    pub fn peer_tls(&self) -> Option<Arc<crate::tls::ServerTls>> {
        self.peer_tls.clone()
    }

    /// The client listeners' TLS, to reload its certificate (`ServerTls::reload`).
    pub fn tls(&self) -> Option<Arc<crate::tls::ServerTls>> {
        self.tls.clone()
    }

    /// The bound RESP address, with `--resp-listen`.
    pub fn resp_addr(&self) -> Option<SocketAddr> {
        self.resp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The gossip address others use for this node, in gossip mode.
    pub fn gossip_addr(&self) -> Option<SocketAddr> {
        self.gossip_addr
    }

    /// The bound public gRPC address (useful with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().unwrap_or(self.config.listen)
    }

    /// The bound peer address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer.local_addr().unwrap_or(self.config.peer_listen)
    }

    /// The bound admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.config.admin_listen)
    }

    /// The cluster core (for embedding and tests).
    pub fn core(&self) -> &Arc<crate::service::NodeCore> {
        &self.shared.core
    }

    /// Serves until `shutdown` completes, then shuts down gracefully (see the module docs).
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), NodeError> {
        let Node {
            shared,
            config,
            grpc,
            peer,
            admin,
            resp,
            tls,
            peer_tls,
            prometheus,
            membership,
            gossip_addr,
            peer_max,
        } = self;
        let core = Arc::clone(&shared.core);
        let reaper = Reaper::spawn(
            core.store().engine(),
            config.reaper_interval,
            config.reaper_budget,
        )
        .map_err(NodeError::Reaper)?;

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<CacheServer<CacheService>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(cache_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let service = CacheServer::new(CacheService::new(Arc::clone(&shared)))
            .max_decoding_message_size(config.limits.max_request_bytes())
            .max_encoding_message_size(config.limits.max_response_bytes());
        let peer_service = PeerServer::new(PeerService::new(Arc::clone(&shared)))
            .max_decoding_message_size(config.limits.max_response_bytes())
            .max_encoding_message_size(config.limits.max_response_bytes());

        let tasks = TaskTracker::new();
        let stop_tasks = CancellationToken::new();
        let public_stop = CancellationToken::new();
        let peer_stop = CancellationToken::new();

        // Phase 1 on the shutdown signal: refuse new client requests, fail readiness, keep
        // the connections for the notice period; then close the public listeners.
        {
            let shared_stopping = shared.stopping.clone();
            let (core, health, public_stop, stop_tasks, membership) = (
                Arc::clone(&core),
                health.clone(),
                public_stop.clone(),
                stop_tasks.clone(),
                Arc::clone(&membership),
            );
            let notice = config.shutdown_notice.min(config.shutdown_grace);
            tasks.spawn(async move {
                tokio::select! {
                    () = shutdown => {}
                    () = stop_tasks.cancelled() => return,
                }
                tracing::info!(
                    "shutdown requested: refusing new requests, draining in-flight ones"
                );
                core.begin_shutdown();
                shared_stopping.cancel();
                if gossip_addr.is_some() {
                    // Tell the cluster before the listeners close, so peers stop routing here.
                    if let Err(e) = membership.leave() {
                        tracing::warn!(error = %e, "could not announce the leave");
                    }
                }
                health.set_not_serving::<CacheServer<CacheService>>().await;
                tokio::time::sleep(notice).await;
                public_stop.cancel();
            });
        }
        // Snapshots: periodic, and compaction when the log has grown enough.
        if let Some(p) = shared.persistence.clone() {
            let stop_tasks = stop_tasks.clone();
            tasks.spawn(async move {
                let mut last = tokio::time::Instant::now();
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        () = stop_tasks.cancelled() => return,
                    }
                    let due = p
                        .config()
                        .snapshot_interval
                        .is_some_and(|i| last.elapsed() >= i);
                    let compact = p.needs_compaction();
                    if !due && !compact {
                        continue;
                    }
                    if compact {
                        tracing::info!("the append-only file has grown past its compaction threshold: taking a snapshot");
                    }
                    let p2 = Arc::clone(&p);
                    let _ = tokio::task::spawn_blocking(move || p2.snapshot()).await;
                    last = tokio::time::Instant::now();
                }
            });
        }
        // Histogram samples accumulate in the recorder until drained; drain them on a
        // timer too, so a node nobody scrapes does not grow without bound.
        {
            let (prometheus, stop_tasks) = (prometheus.clone(), stop_tasks.clone());
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = tick.tick() => prometheus.run_upkeep(),
                        () = stop_tasks.cancelled() => return,
                    }
                }
            });
        }

        let grpc_server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            // Advertised in SETTINGS: a client refuses to send more (one call fails, the
            // connection lives), and the server answers a larger header block on its own
            // stream instead of tearing the connection down.
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
            // The backstop a second past the request timeout (which the core keeps) ends
            // a unary call whose body never arrives instead of letting it hold its stream.
            .layer(
                crate::latency::LatencyLayer::new(Arc::clone(&shared.metrics))
                    .with_deadline(config.request_timeout + Duration::from_secs(1)),
            )
            .add_service(health_service)
            .add_service(reflection)
            .add_service(service)
            .serve_with_incoming_shutdown(
                // Our own listener (bound early to report errors), so the server's
                // tcp_nodelay does not apply: set it per accepted socket here, or Nagle's
                // algorithm adds tens of milliseconds to multi-segment requests.
                with_tls(
                    crate::conn::guarded(
                        grpc,
                        config.connections,
                        Arc::clone(&shared.connections[0]),
                        "client",
                    ),
                    tls.clone(),
                    config
                        .connections
                        .handshake_timeout
                        .unwrap_or(Duration::from_secs(10)),
                ),
                public_stop.clone().cancelled_owned(),
            );
        let peer_server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            // Advertised in SETTINGS: a client refuses to send more (one call fails, the
            // connection lives), and the server answers a larger header block on its own
            // stream instead of tearing the connection down.
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
            .add_service(peer_service)
            .serve_with_incoming_shutdown(
                with_tls(
                    crate::conn::guarded(
                        peer,
                        crate::conn::ConnLimits {
                            max_connections: peer_max,
                            ..config.connections
                        },
                        Arc::clone(&shared.connections[1]),
                        "peer",
                    ),
                    peer_tls,
                    config
                        .connections
                        .handshake_timeout
                        .unwrap_or(Duration::from_secs(10)),
                ),
                peer_stop.clone().cancelled_owned(),
            );
        let peer_server = tasks.spawn(peer_server);
        let admin_router = crate::admin::router(Arc::clone(&shared), prometheus);
        let admin_server = crate::admin::serve(
            admin,
            admin_router,
            Arc::clone(&shared.connections[2]),
            public_stop.clone(),
            tls.clone().filter(|_| config.admin_tls),
        );

        let resp_server = async {
            if let Some(listener) = resp {
                crate::resp::serve(
                    listener,
                    Arc::clone(&shared),
                    config.connections,
                    public_stop.clone(),
                    tls.clone(),
                )
                .await;
            }
        };

        // Phase 2: the public servers end once the listeners closed and in-flight requests
        // finished — or the grace period ends first.
        let grace = config.shutdown_grace;
        let public = async {
            tokio::try_join!(
                async { grpc_server.await.map_err(NodeError::from) },
                async {
                    admin_server.await;
                    Ok::<(), NodeError>(())
                },
                async {
                    resp_server.await;
                    Ok::<(), NodeError>(())
                }
            )
        };
        let mut result = tokio::select! {
            r = public => r.map(drop),
            () = async { public_stop.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(grace_ms = grace.as_millis() as u64, "in-flight requests did not finish within the shutdown grace period; exiting anyway");
                Ok(())
            }
        };
        // Phase 3: drain replication with what is left of the grace, then close the peer
        // listener and await every owned task.
        let mut left = grace
            .saturating_sub(config.shutdown_notice.min(grace))
            .max(Duration::from_millis(100));
        if gossip_addr.is_some() {
            // A leave: hand every key to the node that replicates it once this one is gone
            // (with half of what is left; the queues drain with the rest).
            let began = Instant::now();
            let report = core.hand_over(tokio::time::Instant::now() + left / 2).await;
            tracing::info!(
                keys = report.keys,
                bytes = report.bytes,
                complete = report.complete,
                took_ms = began.elapsed().as_millis() as u64,
                "leave: keys handed over to their new replicas"
            );
            left = left
                .saturating_sub(began.elapsed())
                .max(Duration::from_millis(100));
        }
        core.shutdown(left).await;
        peer_stop.cancel();
        stop_tasks.cancel();
        match tokio::time::timeout(Duration::from_secs(1), peer_server).await {
            Ok(Ok(Err(e))) if result.is_ok() => result = Err(e.into()),
            _ => {}
        }
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
        drop(reaper);
        if let Some(p) = &shared.persistence {
            // Everything applied is written and synced before the process exits.
            let p = Arc::clone(p);
            let _ = tokio::task::spawn_blocking(move || p.close()).await;
        }
        let dropped: u64 = core.queue_stats().iter().map(|q| q.dropped).sum();
        tracing::info!(replication_dropped_total = dropped, "node stopped");
        drop(membership);
        result
    }
}

/// The client gRPC connections, under TLS when `tls` is set: handshakes run concurrently
/// (up to 256 at once, each within `handshake`), off the accept loop; a failed or late one
/// closes its connection and is logged at debug level.
fn with_tls(
    incoming: impl futures_util::Stream<Item = Result<crate::conn::GuardedIo, std::io::Error>>
    + Send
    + 'static,
    tls: Option<Arc<crate::tls::ServerTls>>,
    handshake: Duration,
) -> impl futures_util::Stream<Item = Result<crate::tls::MaybeTls, std::io::Error>> + Send + 'static
{
    use futures_util::StreamExt;
    incoming
        .map(move |accepted| {
            let tls = tls.clone();
            async move {
                let io = accepted.ok()?;
                let Some(tls) = tls else {
                    return Some(crate::tls::MaybeTls::Plain(io));
                };
                match tokio::time::timeout(handshake, tls.grpc_acceptor().accept(io)).await {
                    Ok(Ok(stream)) => Some(crate::tls::MaybeTls::Tls(Box::new(stream))),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        None
                    }
                    Err(_) => {
                        tracing::debug!("TLS handshake not done within the deadline");
                        None
                    }
                }
            }
        })
        .buffer_unordered(256)
        .filter_map(|io| async move { io.map(Ok) })
}

/// Binds `addr`, naming the listener (`what`) in the error.
async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind { addr, what, source })
}
