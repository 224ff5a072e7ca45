//! `cluster-membership`: who is in the cluster, behind one trait.
//!
//! A [`Membership`] publishes a [`MembershipView`] — an epoch and the member list — through a
//! `tokio::sync::watch`, so consumers (the node's router, `/status`) always read the latest
//! view and are woken when it changes. It knows nothing of the cache or the ring: it only
//! says who exists, where they listen, and what state they are in.
//!
//! Implementations:
//! - [`StaticMembership`]: the member list given at start-up (`--peers`). Every member is
//!   `Alive` forever; [`Membership::leave`] marks the local node `Left`.
//! - [`swim`]: the SWIM + Lifeguard gossip protocol as a sans-I/O state machine; its tests
//!   drive it over a simulated network.
//! - [`GossipMembership`] ([`gossip`]): that state machine over UDP (and TCP for push-pull).
//!   Coordinator membership comes later, behind the same trait.
//!
//! ```
//! use cluster_membership::{Membership, MemberState, StaticMembership, parse_peers};
//!
//! let peers = parse_peers("a=127.0.0.1:7001,b=127.0.0.1:7002,c=127.0.0.1:7003")?;
//! let membership = StaticMembership::new("b", peers)?;
//! let view = membership.view().borrow().clone();
//! assert_eq!(view.members.len(), 3);
//! assert!(view.members.iter().all(|m| m.state == MemberState::Alive));
//! # Ok::<(), cluster_membership::MembershipError>(())
//! ```

#![forbid(unsafe_code)]

pub mod gossip;
pub mod registry;
pub mod rng;
pub mod swim;

pub use gossip::{GossipConfig, GossipMembership, Keyring, ProtocolConfig};
pub use registry::{Registry, RegistryConfig};
pub use rng::SplitMix64;

/// A membership protocol as a sans-I/O state machine: fed received bytes and the time,
/// it returns messages to send and publishes views. [`swim::Swim`] (gossip) and
/// [`Registry`] (coordinator) implement it; [`GossipMembership`] drives either over the
/// network, and tests drive them over simulated ones.
pub trait Protocol: Send + std::fmt::Debug + 'static {
    /// Handles received bytes; a refused message changes nothing.
    fn handle_message(&mut self, bytes: &[u8], now: u64) -> Result<(), swim::DecodeError>;
    /// Advances timers to `now` (milliseconds).
    fn tick(&mut self, now: u64);
    /// The latest time `tick` should be called next.
    fn next_wakeup(&self) -> u64;
    /// Messages to send now.
    fn drain_outgoing(&mut self) -> Vec<swim::Outgoing>;
    /// The view, if it changed since the last call.
    fn take_view_change(&mut self) -> Option<MembershipView>;
    /// The current view.
    fn view(&self) -> MembershipView;
    /// Starts joining through `seeds`.
    fn join(&mut self, seeds: &[std::net::SocketAddr], now: u64);
    /// Leaves gracefully.
    fn leave(&mut self, now: u64);
    /// Counters.
    fn stats(&self) -> swim::SwimStats;
    /// Whether the coordinator is reachable (`None` for protocols without one).
    fn coordinator_up(&self) -> Option<bool> {
        None
    }
}

/// A view of `updates`, with an epoch that is a hash of what routing depends on — the
/// key-owning members with their addresses and weights — so two nodes that agree report
/// the same epoch and a client can compare the epochs of any two nodes (a per-node counter
/// would differ between nodes that agree, and make ring-aware clients refresh on every
/// answer).
pub fn view_of(mut updates: Vec<swim::Update>) -> MembershipView {
    updates.sort_by(|a, b| a.id.cmp(&b.id));
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for u in updates.iter().filter(|u| u.state.owns_keys()) {
        eat(u.id.as_bytes());
        eat(&[0xff]);
        eat(u.addrs.rpc.to_string().as_bytes());
        eat(u.addrs.peer.to_string().as_bytes());
        eat(&u.weight.to_be_bytes());
    }
    MembershipView {
        // Never 0 (clients read 0 as "unknown"), and within i64 for JSON consumers.
        epoch: (h >> 1).max(1),
        members: updates
            .into_iter()
            .map(|u| Member {
                id: u.id,
                rpc_addr: u.addrs.rpc,
                peer_addr: u.addrs.peer,
                state: u.state,
                incarnation: u.incarnation,
                weight: u.weight,
            })
            .collect(),
    }
}

use std::net::SocketAddr;

use tokio::sync::watch;

/// Why a membership could not be built or changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// A `--peers` entry is not `id=host:port`.
    #[error("peer entry {entry:?} is not id=host:port: {reason}")]
    BadPeer {
        /// The offending entry.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two members share an id.
    #[error("member id {0:?} appears twice")]
    DuplicateId(String),
    /// Two members share an address.
    #[error("address {0} is given to two members")]
    DuplicateAddr(SocketAddr),
    /// The local node's id is not in the member list.
    #[error("the local node {0:?} is not in the member list; add it to --peers")]
    LocalMissing(String),
    /// The gossip socket could not be bound.
    #[error("cannot listen for gossip on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        reason: String,
    },
}

/// A seed for a member's protocol randomness: its id mixed with the start time, so members
/// (and restarts) do not probe in lockstep.
fn swim_seed(id: &str) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) ^ nanos
}

pub use cache_types::MemberState;

/// One member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Stable id (a name, not an address).
    pub id: String,
    /// Where its `cache.v1` gRPC service listens (for clients).
    pub rpc_addr: SocketAddr,
    /// Where its peer listener (`cache.peer.v1`: forwarding, replication) listens.
    pub peer_addr: SocketAddr,
    /// Its state.
    pub state: MemberState,
    /// Bumped by the member itself to refute suspicion (gossip); 0 for static members.
    pub incarnation: u64,
    /// Relative capacity on the ring.
    pub weight: u32,
}

/// Everyone this node knows about, at one epoch. Members are sorted by id.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MembershipView {
    /// Increases with every change this node sees.
    pub epoch: u64,
    /// The members, sorted by id.
    pub members: Vec<Member>,
}

impl MembershipView {
    /// The member with id `id`.
    pub fn member(&self, id: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.id == id)
    }

    /// Members that should own keys.
    pub fn owners(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.state.owns_keys())
    }
}

/// A source of membership views. Implementations own their background work (probing,
/// gossip) and stop it when dropped.
pub trait Membership: Send + Sync + 'static {
    /// The local node's id.
    fn local_id(&self) -> &str;

    /// The current view, and a way to wait for the next one.
    fn view(&self) -> watch::Receiver<MembershipView>;

    /// Announces the local node (a no-op for static membership).
    fn join(&self) -> Result<(), MembershipError>;

    /// Announces that the local node is leaving: it is marked `Left` in the view.
    fn leave(&self) -> Result<(), MembershipError>;

    /// Gossip protocol counters, for metrics (`None` for memberships without gossip).
    fn gossip_stats(&self) -> Option<swim::SwimStats> {
        None
    }

    /// Whether the coordinator is reachable (`None` unless coordinator membership).
    fn coordinator_up(&self) -> Option<bool> {
        None
    }
}

/// How far above the client port a member's peer listener is when `--peers` does not name
/// it (`id=127.0.0.1:7000` means the peer listener is `127.0.0.1:7100`), the same rule as the
/// node's default `--peer-listen`.
pub const DEFAULT_PEER_PORT_OFFSET: u16 = 100;

/// The peer address a member listens on when none is given: same IP, client port + 100.
/// `None` if that port does not exist.
pub fn default_peer_addr(rpc_addr: SocketAddr) -> Option<SocketAddr> {
    let port = rpc_addr.port().checked_add(DEFAULT_PEER_PORT_OFFSET)?;
    Some(SocketAddr::new(rpc_addr.ip(), port))
}

/// A peer from `--peers`: `id=host:port` or `id=host:port/host:peerport`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// The member's id.
    pub id: String,
    /// Its client gRPC address.
    pub addr: SocketAddr,
    /// Its peer-listener address.
    pub peer_addr: SocketAddr,
}

/// Parses `id=host:port[/host:peerport],...` (whitespace around entries is ignored). Without
/// `/host:peerport` the peer listener is assumed at [`default_peer_addr`].
pub fn parse_peers(s: &str) -> Result<Vec<PeerSpec>, MembershipError> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|entry| {
            let bad = |reason: &str| MembershipError::BadPeer {
                entry: entry.to_string(),
                reason: reason.to_string(),
            };
            let (id, addr) = entry.split_once('=').ok_or_else(|| bad("missing `=`"))?;
            let id = id.trim();
            if id.is_empty() || id.len() > 255 {
                return Err(bad("the id must be 1 to 255 bytes"));
            }
            let (addr, peer) = match addr.split_once('/') {
                Some((a, p)) => (a, Some(p)),
                None => (addr, None),
            };
            let addr: SocketAddr = addr
                .trim()
                .parse()
                .map_err(|e: std::net::AddrParseError| bad(&format!("bad address: {e}")))?;
            let peer_addr = match peer {
                Some(p) => p.trim().parse().map_err(|e: std::net::AddrParseError| {
                    bad(&format!("bad peer address: {e}"))
                })?,
                None => default_peer_addr(addr).ok_or_else(|| {
                    bad("the port is too high to derive a peer port (+100); give /host:peerport")
                })?,
            };
            Ok(PeerSpec {
                id: id.to_string(),
                addr,
                peer_addr,
            })
        })
        .collect()
}

/// Membership fixed at start-up. Every node must be given the same list; nodes compare ring
/// fingerprints on every peer call and report a mismatch loudly.
#[derive(Debug)]
pub struct StaticMembership {
    local: String,
    tx: watch::Sender<MembershipView>,
}

impl StaticMembership {
    /// A membership of `peers` (which must include `local_id`), all alive, weight 1.
    pub fn new(local_id: &str, peers: Vec<PeerSpec>) -> Result<Self, MembershipError> {
        let mut members: Vec<Member> = peers
            .into_iter()
            .map(|p| Member {
                id: p.id,
                rpc_addr: p.addr,
                peer_addr: p.peer_addr,
                state: MemberState::Alive,
                incarnation: 0,
                weight: 1,
            })
            .collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        for pair in members.windows(2) {
            if pair[0].id == pair[1].id {
                return Err(MembershipError::DuplicateId(pair[0].id.clone()));
            }
        }
        let mut addrs: Vec<SocketAddr> = members
            .iter()
            .flat_map(|m| [m.rpc_addr, m.peer_addr])
            .collect();
        addrs.sort();
        for pair in addrs.windows(2) {
            if pair[0] == pair[1] {
                return Err(MembershipError::DuplicateAddr(pair[0]));
            }
        }
        if !members.iter().any(|m| m.id == local_id) {
            return Err(MembershipError::LocalMissing(local_id.to_string()));
        }
        let (tx, _rx) = watch::channel(MembershipView { epoch: 1, members });
        Ok(Self {
            local: local_id.to_string(),
            tx,
        })
    }

    /// A one-member cluster: just this node.
    pub fn single(local_id: &str, addr: SocketAddr, peer_addr: SocketAddr) -> Self {
        let (tx, _rx) = watch::channel(MembershipView {
            epoch: 1,
            members: vec![Member {
                id: local_id.to_string(),
                rpc_addr: addr,
                peer_addr,
                state: MemberState::Alive,
                incarnation: 0,
                weight: 1,
            }],
        });
        Self {
            local: local_id.to_string(),
            tx,
        }
    }
}

impl Membership for StaticMembership {
    fn local_id(&self) -> &str {
        &self.local
    }

    fn view(&self) -> watch::Receiver<MembershipView> {
        self.tx.subscribe()
    }

    fn join(&self) -> Result<(), MembershipError> {
        Ok(())
    }

    fn leave(&self) -> Result<(), MembershipError> {
        let local = self.local.clone();
        self.tx.send_modify(|view| {
            if let Some(m) = view.members.iter_mut().find(|m| m.id == local) {
                m.state = MemberState::Left;
            }
            view.epoch += 1;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_peers_and_rejects_bad_entries() {
        let peers = parse_peers(" a=127.0.0.1:1 , b=127.0.0.2:2,").expect("valid");
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[1].addr, "127.0.0.2:2".parse().expect("addr"));
        assert_eq!(peers[1].peer_addr, "127.0.0.2:102".parse().expect("addr"));
        let explicit = parse_peers("a=127.0.0.1:1/127.0.0.1:9").expect("valid");
        assert_eq!(explicit[0].peer_addr, "127.0.0.1:9".parse().expect("addr"));
        assert!(matches!(
            parse_peers("a=127.0.0.1:65500"),
            Err(MembershipError::BadPeer { .. })
        ));
        assert!(matches!(
            parse_peers("a=127.0.0.1:1/nope"),
            Err(MembershipError::BadPeer { .. })
        ));
        assert!(matches!(
            parse_peers("a127.0.0.1:1"),
            Err(MembershipError::BadPeer { .. })
        ));
        assert!(matches!(
            parse_peers("a=localhost"),
            Err(MembershipError::BadPeer { .. })
        ));
        assert!(matches!(
            parse_peers("=127.0.0.1:1"),
            Err(MembershipError::BadPeer { .. })
        ));
    }

    #[test]
    fn static_membership_validates_and_leaves() {
        let peers = parse_peers("b=127.0.0.1:2,a=127.0.0.1:1").expect("valid");
        let m = StaticMembership::new("a", peers.clone()).expect("valid");
        let rx = m.view();
        let view = rx.borrow().clone();
        assert_eq!(view.members[0].id, "a", "sorted by id");
        assert_eq!(view.owners().count(), 2);
        m.leave().expect("leave");
        let view = m.view().borrow().clone();
        assert_eq!(view.epoch, 2);
        assert_eq!(view.member("a").map(|x| x.state), Some(MemberState::Left));
        assert_eq!(view.owners().count(), 1);
        assert_eq!(
            StaticMembership::new("zz", peers.clone()).err(),
            Some(MembershipError::LocalMissing("zz".into()))
        );
        let dup = parse_peers("a=127.0.0.1:1,a=127.0.0.1:2").expect("parses");
        assert!(matches!(
            StaticMembership::new("a", dup),
            Err(MembershipError::DuplicateId(_))
        ));
        let dup = parse_peers("a=127.0.0.1:1,b=127.0.0.1:101/127.0.0.1:7").expect("parses");
        assert!(matches!(
            StaticMembership::new("a", dup),
            Err(MembershipError::DuplicateAddr(_))
        ));
    }
}
