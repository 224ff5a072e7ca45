//! The node's view of who owns what: the ring built from each membership view, swapped in
//! atomically, with a stream of ring changes for the rebalancer.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use cluster_membership::MembershipView;
use cluster_ring::{DEFAULT_VNODES_PER_WEIGHT, Member as RingMember, NodeId, Ring, RingError};
use tokio::sync::broadcast;

/// Ring changes kept for slow subscribers before they see `Lagged`.
const CHANGE_BUFFER: usize = 64;

/// The ring and everything derived from one membership view. Immutable: a change builds a
/// new one.
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
    /// Builds the ring of `view`'s key-owning members.
    pub fn build(view: MembershipView, configured_rf: usize) -> Result<Self, RingError> {
        let owners: Vec<RingMember> = view
            .owners()
            .map(|m| Ok(RingMember::new(NodeId::new(m.id.clone())?, m.weight)))
            .collect::<Result<_, RingError>>()?;
        let ring = Ring::new(owners, DEFAULT_VNODES_PER_WEIGHT)?.with_epoch(view.epoch);
        // At most the members, and at most what a placement holds (the node's
        // --replication-factor is bounded to the same 16).
        let replication_factor =
            configured_rf.clamp(1, ring.members().len().clamp(1, cluster_ring::MAX_REPLICAS));
        Ok(Self {
            ring,
            epoch: view.epoch,
            view,
            replication_factor,
        })
    }

    /// `key`'s replicas as member indices of this ring, primary first, without allocating
    /// (what each request is placed by); [`RingState::id_at`] names them.
    pub fn replica_set(&self, key: &[u8]) -> cluster_ring::ReplicaSet {
        self.ring.replica_set(key, self.replication_factor)
    }

    /// The id of the member at `index` of a [`RingState::replica_set`].
    pub fn id_at(&self, index: u32) -> &NodeId {
        &self.ring.member_at(index).id
    }

    /// The ids of `key`'s replicas, primary first.
    pub fn replicas(&self, key: &[u8]) -> Vec<NodeId> {
        self.ring
            .replicas(key, self.replication_factor)
            .into_iter()
            .map(|m| m.id.clone())
            .collect()
    }

    /// The peer-listener address of member `id`.
    pub fn peer_addr(&self, id: &str) -> Option<SocketAddr> {
        self.view.member(id).map(|m| m.peer_addr)
    }
}

/// One ring change: what was, and what is.
#[derive(Debug, Clone)]
pub struct RingChange {
    /// The ring before.
    pub old: Arc<RingState>,
    /// The ring after.
    pub new: Arc<RingState>,
}

/// The current ring, swappable, with change notifications.
#[derive(Debug)]
pub struct RingView {
    current: ArcSwap<RingState>,
    changes: broadcast::Sender<RingChange>,
    configured_rf: usize,
}

impl RingView {
    /// A view starting at `first`, with replication factor `configured_rf` (capped at the
    /// owner count of each ring).
    pub fn new(first: MembershipView, configured_rf: usize) -> Result<Self, RingError> {
        let (changes, _) = broadcast::channel(CHANGE_BUFFER);
        Ok(Self {
            current: ArcSwap::from_pointee(RingState::build(first, configured_rf)?),
            changes,
            configured_rf,
        })
    }

    /// The current ring (an `Arc` load).
    pub fn load(&self) -> Arc<RingState> {
        self.current.load_full()
    }

    /// The current ring, borrowed (no reference count change in the common case): for
    /// the request hot path, which must not hold it across an await.
    pub fn load_guard(&self) -> arc_swap::Guard<Arc<RingState>> {
        self.current.load()
    }

    /// Rebuilds the ring from `view` and swaps it in; subscribers get a [`RingChange`].
    /// A view that forms no ring is refused and the old ring kept.
    pub fn update(&self, view: MembershipView) -> Result<(), RingError> {
        let new = Arc::new(RingState::build(view, self.configured_rf)?);
        let old = self.current.swap(Arc::clone(&new));
        // Nobody listening is fine.
        let _ = self.changes.send(RingChange { old, new });
        Ok(())
    }

    /// Ring changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<RingChange> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_membership::{Member, MemberState};

    fn view(epoch: u64, ids: &[&str]) -> MembershipView {
        MembershipView {
            epoch,
            members: ids
                .iter()
                .enumerate()
                .map(|(i, id)| Member {
                    id: (*id).to_string(),
                    rpc_addr: ([127, 0, 0, 1], 7000 + i as u16).into(),
                    peer_addr: ([127, 0, 0, 1], 7100 + i as u16).into(),
                    state: MemberState::Alive,
                    incarnation: 0,
                    weight: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn updates_swap_the_ring_and_announce_old_and_new() {
        let ring = RingView::new(view(1, &["a", "b"]), 3).expect("ring");
        assert_eq!(ring.load().replication_factor, 2, "capped at the members");
        let mut changes = ring.subscribe();
        ring.update(view(2, &["a", "b", "c"])).expect("ring");
        let change = changes.try_recv().expect("a change");
        assert_eq!((change.old.epoch, change.new.epoch), (1, 2));
        assert_eq!(change.new.ring.members().len(), 3);
        assert_eq!(ring.load().epoch, 2);
        assert_eq!(ring.load().replication_factor, 3);
        // A view that forms no ring is refused; the old one stays.
        assert!(ring.update(view(3, &[])).is_err());
        assert_eq!(ring.load().epoch, 2);
        assert!(changes.try_recv().is_err(), "no change announced");
    }
}
