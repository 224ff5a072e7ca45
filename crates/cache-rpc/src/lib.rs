//! `cache-rpc`: the cache-cluster node as a library.
//!
//! - [`service`]: the `cache.v1.Cache` gRPC service over a `cache-core` engine: limits
//!   checked before work, routing (serve, forward once, or coordinate), engine outcomes
//!   mapped to documented status codes, one metric sample and one debug span (with the key's
//!   hash, never the key) per request; and the internal `cache.v1.Peer` service.
//! - [`cluster`]: the ring (swapped atomically on membership changes), pooled peer channels,
//!   the hybrid logical clock, per-peer asynchronous replication queues, the apply path.
//! - [`node`]: [`Node`] wires the engine, its reaper, the gRPC server (with `grpc.health.v1`
//!   and server reflection) and the admin HTTP server, and shuts them down gracefully.
//! - `admin`: `/metrics`, `/healthz`, `/readyz`, `/status`.
//! - [`metrics`]: every exported series, registered up front on the node's own recorder.
//! - [`limits`]: the [`Limits`] on keys, values, batches and messages.
//!
//! It never parses command lines or reads config files: that is the binary's job.

#![forbid(unsafe_code)]

mod admin;
pub mod cluster;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod service;

pub use cluster::{Cluster, ClusterConfig, Consistency};
pub use limits::Limits;
pub use node::{Node, NodeConfig, NodeError};
pub use service::{CacheService, PeerService};
