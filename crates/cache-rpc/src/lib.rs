//! `cache-rpc`: the cache-cluster node as a library: front ends and wiring around the
//! network-free cluster core (`cluster-core`).
//!
//! - [`service`]: the gRPC front ends — the public `cache.v1.Cache` service and the internal
//!   `cache.peer.v1.Peer` service — as translators: wire message → domain request → core →
//!   wire message or status. No cluster logic lives here.
//! - [`wire`]: every protobuf ↔ domain conversion and the error ↔ status mapping.
//! - [`transport`]: [`GrpcTransport`], the core's `PeerTransport` over gRPC to each member's
//!   peer listener.
//! - [`node`]: [`Node`] wires the core, its reaper, the public gRPC server (with
//!   `grpc.health.v1` and server reflection), the peer server and the admin HTTP server, and
//!   shuts them down gracefully (replication drained or counted).
//! - [`resp`]: the Redis-protocol (RESP2) front end, a second translator onto the core.
//! - `admin`: `/metrics`, `/healthz`, `/readyz`, `/status`, `POST /snapshot`.
//! - [`auth`]: client tokens with roles (`--auth-file`).
//! - [`tls`]: TLS for the client listeners, with certificates reloaded on demand.
//! - [`conn`]: connection limits of every listener (a cap, a handshake deadline, an idle
//!   timeout).
//! - [`metrics`]: every exported series, registered up front on the node's own recorder.
//!
//! It never parses command lines or reads config files: that is the binary's job.

#![forbid(unsafe_code)]

mod admin;
pub mod auth;
pub mod conn;
pub mod latency;
pub mod metrics;
pub mod node;
pub mod resp;
pub mod service;
pub mod slowlog;
pub mod tls;
pub mod transport;
pub mod wire;

pub use cache_persist::{FsyncPolicy, LogLimits, PersistConfig, Persistence};
pub use cluster_core::{Consistency, CoreConfig, Limits, SyncConfig};
pub use conn::ConnLimits;
pub use node::{MembershipMode, NetworkProtocol, Node, NodeConfig, NodeError};
pub use service::{CacheService, PeerService};
pub use transport::GrpcTransport;
