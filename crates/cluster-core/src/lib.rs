//! `cluster-core`: cache-cluster's cluster logic without the network.
//!
//! Everything a node decides about the cluster lives here, in domain types, testable in one
//! process: the front ends (gRPC and RESP in `cache-rpc`) translate their wire formats into a
//! [`Request`], call [`Coordinator::handle`], and map the [`Response`] or [`CoreError`] back.
//! Other nodes are reached only through [`PeerTransport`]: `cache-rpc` implements it over
//! gRPC, and [`sim`] implements it in memory with faults, so N coordinators run in one
//! process under a deterministic clock.
//!
//! # Module map
//!
//! - [`store`]: [`Store`], **the only writer of the engine**: stamps versions from the
//!   hybrid logical clock, applies local and replicated [`Mutation`]s, tells the
//!   [`MutationSink`]s.
//! - [`clock`]: [`NodeClock`] (system or tokio time) and the [`Hlc`] with checked arithmetic
//!   and a bounded drift for observed versions.
//! - [`coordinator`]: [`Coordinator`]: routing, forwarding once, write coordination per
//!   consistency, quorum reads with repair, the one scatter/gather for batches, peer ingress.
//! - [`replication`]: the bounded, batching per-peer queues and their owned sender tasks.
//! - [`sync`]: anti-entropy and range sync (digests per segment, pull and push what
//!   differs), and the *syncing* state of a node that has not caught up yet.
//! - [`ring`]: [`RingView`]: the ring from each membership view, swapped atomically, with a
//!   stream of [`RingChange`]s.
//! - [`transport`]: [`PeerTransport`], the seam to other nodes.
//! - [`request`], [`mutation`], [`error`], [`limits`]: the vocabulary.
//! - [`sim`]: the in-memory transport and test cluster with one-line faults.
//!
//! # What this crate never does
//!
//! It never opens a socket, never names a tonic, prost or protobuf type, and never writes the
//! engine except through [`Store`].

#![forbid(unsafe_code)]

pub mod clock;
pub mod coordinator;
pub mod error;
pub mod limits;
pub mod mutation;
pub mod replication;
pub mod request;
pub mod ring;
pub mod sim;
pub mod store;
pub mod sync;
pub mod throttle;
pub mod transport;

pub use cache_types::{Condition, Consistency, MemberState};
pub use clock::{ClockError, Hlc, NodeClock, assign_tags, preferred_tag};
pub use coordinator::{Coordinator, CoreConfig, CoreStats, PeerHealth, RequestContext};
pub use error::{CoreError, PeerError};
pub use limits::Limits;
pub use mutation::{DurableWait, Mutation, MutationOp, MutationSink};
pub use replication::QueueStats;
pub use request::{ExpireWhen, Expiry, Request, Response, SetCommand, UpdateOp};
pub use ring::{RingChange, RingState, RingView};
pub use store::{Applied, ApplyReport, RestoreReport, Stamping, Store, Updated};
pub use sync::{HandOver, SyncConfig, SyncEntry, SyncReply, SyncRequest, SyncStatus};
pub use throttle::LogThrottle;
pub use transport::{PeerCall, PeerReply, PeerTransport};
