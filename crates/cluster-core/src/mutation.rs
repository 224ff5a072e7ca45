//! [`Mutation`]: one applied change of one key, the unit of replication and of the
//! append-only log; [`MutationSink`]: who hears about every applied mutation.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

/// What a mutation does to its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MutationOp {
    /// Store `value`, expiring at `expires_at` (absolute unix ms; `None` = never). An
    /// expiry in the past deletes (a tombstone at the mutation's version).
    Put {
        /// The value.
        value: Bytes,
        /// Absolute expiry in unix milliseconds.
        expires_at: Option<u64>,
    },
    /// Delete: a tombstone at the mutation's version.
    Delete,
}

/// One versioned change of one key. Applying the same set of mutations in any order, any
/// number of times, gives the same state (last writer wins on `version`): this is what lets
/// replicas converge when messages are lost, duplicated or reordered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mutation {
    /// The key.
    pub key: Bytes,
    /// Its version, from the coordinator's hybrid logical clock.
    pub version: u64,
    /// The change.
    pub op: MutationOp,
}

impl Mutation {
    /// Bytes this mutation carries (key + value), for batch and queue bounds.
    pub fn size(&self) -> usize {
        self.key.len()
            + match &self.op {
                MutationOp::Put { value, .. } => value.len(),
                MutationOp::Delete => 0,
            }
    }
}

/// Where the store reports each mutation it applied (the append-only file, tests).
///
/// Called after the engine applied the mutation, outside the shard lock, once per applied
/// mutation (local or replicated; stale ones that changed nothing are not reported). A sink
/// must be quick; it must not call back into the store.
pub trait MutationSink: Send + Sync + 'static {
    /// `mutation` was applied.
    fn applied(&self, mutation: &Mutation);

    /// Whether this sink can take mutations now. An error (the append-only file could not
    /// be written or synced) makes the store refuse every write, local or replicated, with
    /// [`CoreError::Storage`](crate::CoreError::Storage) until it clears: a write the node
    /// could not log is never acknowledged.
    fn writable(&self) -> Result<(), String> {
        Ok(())
    }

    /// A wait that resolves once every mutation this sink heard before the call is as
    /// durable as the sink promises (written to the kernel, or fsynced under
    /// `appendfsync always`), or with the error that prevents it. `None`: nothing to wait
    /// for. The coordinator awaits it before acknowledging a write.
    fn barrier(&self) -> Option<DurableWait> {
        None
    }
}

/// What [`MutationSink::barrier`] returns.
pub type DurableWait = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'static>>;
