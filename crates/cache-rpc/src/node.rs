//! A whole node: engine + reaper + gRPC server (Cache, health, reflection) + admin HTTP
//! (`/metrics`, `/healthz`, `/readyz`, `/status`), with graceful shutdown.
//!
//! [`Node::bind`] binds both listeners (so "address in use" is reported before anything
//! starts) and [`Node::run`] serves until the shutdown future completes, then drains in two
//! phases: first, for a short notice period (`shutdown_notice`, 1 s by default), every new
//! request is answered `UNAVAILABLE` and health/readiness report not serving, so
//! clients move on using the connections they have; then the listeners close, in-flight
//! requests finish within the rest of the grace period, the reaper stops, and `run` returns.
//! This is the usual load-balancer-friendly order: fail readiness first, stop later.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_core::{Cache, CacheConfig, Reaper};
use cache_proto::v1::{cache_server::CacheServer, peer_server::PeerServer};
use cluster_membership::{Membership, PeerSpec, StaticMembership};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

use crate::cluster::{Cluster, ClusterConfig};
use crate::limits::Limits;
use crate::metrics::NodeMetrics;
use crate::service::{CacheService, PeerService, Shared};

/// Everything a node needs to start. The binary fills it from flags, env and file.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's stable id.
    pub node_id: String,
    /// gRPC listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Admin HTTP listen address (port 0 picks a free port).
    pub admin_listen: SocketAddr,
    /// The engine's configuration.
    pub cache: CacheConfig,
    /// Request limits.
    pub limits: Limits,
    /// How often the background reaper sweeps.
    pub reaper_interval: Duration,
    /// Slots examined per shard lock by the reaper.
    pub reaper_budget: usize,
    /// How long in-flight requests get to finish after shutdown starts.
    pub shutdown_grace: Duration,
    /// The first part of the grace period, during which the node stays connected but
    /// answers `UNAVAILABLE` and fails readiness (capped at `shutdown_grace`).
    pub shutdown_notice: Duration,
    /// Every member of the cluster, this node included (`--peers`); empty for a single node.
    pub peers: Vec<PeerSpec>,
    /// Replication and peer settings.
    pub cluster: ClusterConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: "local".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7000)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7080)),
            cache: CacheConfig::default(),
            limits: Limits::default(),
            reaper_interval: Duration::from_millis(100),
            reaper_budget: 1024,
            shutdown_grace: Duration::from_secs(10),
            shutdown_notice: Duration::from_secs(1),
            peers: Vec::new(),
            cluster: ClusterConfig::default(),
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
    /// The member list is invalid.
    #[error("invalid --peers")]
    Membership(#[from] cluster_membership::MembershipError),
    /// The reaper thread could not be started.
    #[error("cannot start the reaper thread: {0}")]
    Reaper(std::io::Error),
    /// The gRPC server failed while running.
    #[error("gRPC server failed")]
    Serve(#[from] tonic::transport::Error),
    /// Reflection could not be set up (the embedded descriptor is broken: a build bug).
    #[error("gRPC reflection could not be set up")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The admin HTTP server failed while running.
    #[error("admin HTTP server failed: {0}")]
    Admin(std::io::Error),
}

/// A node with its listeners bound, ready to [`Node::run`].
#[derive(Debug)]
pub struct Node {
    shared: Arc<Shared>,
    config: NodeConfig,
    grpc: TcpListener,
    admin: TcpListener,
    prometheus: PrometheusHandle,
}

impl Node {
    /// Builds the engine and binds both listeners. Fails fast, before serving anything.
    pub async fn bind(config: NodeConfig) -> Result<Self, NodeError> {
        let cache = Arc::new(Cache::new(config.cache.clone())?);
        let grpc = bind(config.listen, "gRPC").await?;
        let admin = bind(config.admin_listen, "admin HTTP").await?;
        let grpc_addr = grpc.local_addr().map_err(|source| NodeError::Bind {
            addr: config.listen,
            what: "gRPC",
            source,
        })?;
        let metrics = Arc::new(NodeMetrics::register(crate::metrics::recorder()));
        let prometheus = metrics.handle();
        let membership: Arc<dyn Membership> = if config.peers.is_empty() {
            Arc::new(StaticMembership::single(&config.node_id, grpc_addr))
        } else {
            Arc::new(StaticMembership::new(
                &config.node_id,
                config.peers.clone(),
            )?)
        };
        membership.join()?;
        let cluster = Cluster::start(membership, config.cluster.clone(), Arc::clone(&metrics))?;
        let shared = Arc::new(Shared {
            cache,
            limits: config.limits,
            metrics,
            shutting_down: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            started: Instant::now(),
            cluster,
        });
        Ok(Self {
            shared,
            config,
            grpc,
            admin,
            prometheus,
        })
    }

    /// The bound gRPC address (useful with port 0).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.local_addr().unwrap_or(self.config.listen)
    }

    /// The bound admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().unwrap_or(self.config.admin_listen)
    }

    /// The engine (for embedding and tests).
    pub fn cache(&self) -> &Arc<Cache> {
        &self.shared.cache
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
            admin,
            prometheus,
        } = self;
        let reaper = Reaper::spawn(&shared.cache, config.reaper_interval, config.reaper_budget)
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

        // One shutdown signal fans out to both servers.
        let (stop_tx, stop_rx) = watch::channel(false);
        let drain_started = {
            let shared = Arc::clone(&shared);
            let health = health.clone();
            let notice = config.shutdown_notice.min(config.shutdown_grace);
            async move {
                shutdown.await;
                tracing::info!(
                    "shutdown requested: refusing new requests, draining in-flight ones"
                );
                // Phase 1: stay connected but answer UNAVAILABLE (and fail health/readiness),
                // so clients learn to go elsewhere on the connection they already have.
                shared.shutting_down.store(true, Ordering::SeqCst);
                health.set_not_serving::<CacheServer<CacheService>>().await;
                tokio::time::sleep(notice).await;
                // Phase 2: close the listeners and let HTTP/2 connections finish.
                let _ = stop_tx.send(true);
            }
        };
        tokio::spawn(drain_started);

        let grpc_stop = wait_for(stop_rx.clone());
        let grpc_server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(service)
            .add_service(peer_service)
            .serve_with_incoming_shutdown(
                // Our own listener (bound early to report errors), so the server's
                // tcp_nodelay does not apply: set it per accepted socket here, or Nagle's
                // algorithm adds tens of milliseconds to multi-segment requests.
                TcpIncoming::from(grpc).with_nodelay(Some(true)),
                grpc_stop,
            );

        // Histogram samples accumulate in the recorder until drained; drain them on a
        // timer too, so a node nobody scrapes does not grow without bound.
        let upkeep = {
            let prometheus = prometheus.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    prometheus.run_upkeep();
                }
            })
        };
        let admin_router = crate::admin::router(Arc::clone(&shared), prometheus);
        let admin_stop = wait_for(stop_rx.clone());
        let admin_server = async move {
            axum::serve(admin, admin_router)
                .with_graceful_shutdown(admin_stop)
                .await
                .map_err(NodeError::Admin)
        };

        let grace = config.shutdown_grace;
        let mut stop_seen = stop_rx;
        let servers = async {
            tokio::try_join!(
                async { grpc_server.await.map_err(NodeError::from) },
                admin_server
            )
        };
        tokio::pin!(servers);
        let result = tokio::select! {
            r = &mut servers => r.map(drop),
            () = async { let _ = stop_seen.wait_for(|s| *s).await; tokio::time::sleep(grace).await } => {
                tracing::warn!(grace_ms = grace.as_millis() as u64, "in-flight requests did not finish within the shutdown grace period; exiting anyway");
                Ok(())
            }
        };
        upkeep.abort();
        drop(reaper);
        tracing::info!("node stopped");
        result
    }
}

/// Binds `addr`, naming the listener (`what`) in the error.
async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind { addr, what, source })
}

/// Resolves when the watch flips to `true` (or its sender is gone).
async fn wait_for(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}
