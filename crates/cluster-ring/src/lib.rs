//! `cluster-ring`: a virtual-node consistent-hash ring that maps keys to `n` distinct replicas.
//!
//! Pure computation: no I/O, no async runtime, no knowledge of the cache. Every node and every
//! smart client builds the *same* ring from the same member list, on every platform, because
//! all hashing is xxh3-64 with fixed seeds ([`POINT_SEED`], [`KEY_SEED`]) over byte strings
//! whose layout is part of the format ([`FORMAT_VERSION`]).
//!
//! # How it works
//!
//! Each member gets `weight × vnodes_per_weight` points on a 64-bit circle. A key hashes to a
//! position; its primary owner is the member of the first point clockwise (at or after that
//! position, wrapping at the top), and its replicas are the next distinct members met while
//! walking on. Adding a member only takes over the arcs just before its own points, so only
//! about `1/(N+1)` of keys move — all of them to the new member. `docs/why/consistent-hashing.md`
//! explains it for someone learning.
//!
//! ```
//! use cluster_ring::{Member, NodeId, Ring};
//!
//! let members = ["a", "b", "c", "d"].map(|id| Member::new(NodeId::new(id).unwrap(), 1));
//! let ring = Ring::new(members, cluster_ring::DEFAULT_VNODES_PER_WEIGHT)?;
//!
//! let owner = ring.owner(b"user:42");
//! let replicas = ring.replicas(b"user:42", 3);
//! assert_eq!(replicas.len(), 3);
//! assert_eq!(replicas[0].id, owner.id); // the primary comes first
//! # Ok::<(), cluster_ring::RingError>(())
//! ```
//!
//! The ring is immutable: a membership change builds a new one ([`Ring::with_member`],
//! [`Ring::without_member`], or [`Ring::new`]), which its users swap in atomically. Two
//! parties compare [`Ring::fingerprint`] to know whether they agree.

#![forbid(unsafe_code)]

use std::fmt;
use std::sync::Arc;

use twox_hash::XxHash3_64;

/// Version of the hashing layout. Bump it (and the golden test) if point or key hashing
/// changes, because every node and client must agree on it.
pub const FORMAT_VERSION: u32 = 1;

/// Seed of the hash that places a member's points: `xxh3_64(id ++ vnode_index_le32)`.
pub const POINT_SEED: u64 = 0x6361_6368_652d_7269; // "cache-ri"

/// Seed of the key hash ([`key_hash`]).
pub const KEY_SEED: u64 = 0x6e67_2d6b_6579_2d31; // "ng-key-1"

/// Default points per unit of weight. With 10 equal members the largest share is ≤ 1.10 ×
/// the mean; see the table in `docs/why/consistent-hashing.md` (from
/// `cargo run -p cluster-ring --example rebalance`) for the trade-off.
pub const DEFAULT_VNODES_PER_WEIGHT: u32 = 1000;

/// Upper bound on the total number of points, so that a bad weight cannot make the ring
/// allocate gigabytes: 4M points × 12 bytes = 48 MiB.
pub const MAX_POINTS: usize = 1 << 22;

/// The hash of a key on the ring. Exposed so that other crates (the node's router, the
/// client) place keys exactly as the ring does.
pub fn key_hash(key: &[u8]) -> u64 {
    XxHash3_64::oneshot_with_seed(KEY_SEED, key)
}

/// The position of vnode `vnode` of member `id`.
fn point_hash(id: &str, vnode: u32) -> u64 {
    let mut buf = Vec::with_capacity(id.len() + 4);
    buf.extend_from_slice(id.as_bytes());
    buf.extend_from_slice(&vnode.to_le_bytes());
    XxHash3_64::oneshot_with_seed(POINT_SEED, &buf)
}

/// Why a ring could not be built. Nothing was built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// A ring needs at least one member to own keys.
    #[error("a ring needs at least one member")]
    NoMembers,
    /// Two members had the same id; ids must be unique.
    #[error("duplicate member id {0:?}")]
    DuplicateMember(NodeId),
    /// Node ids are non-empty and at most [`NodeId::MAX_LEN`] bytes.
    #[error("invalid node id {0:?}: ids are 1..=255 bytes")]
    InvalidNodeId(String),
    /// Weights start at 1 (remove a member instead of giving it weight 0).
    #[error("member {0:?} has weight 0")]
    ZeroWeight(NodeId),
    /// `vnodes_per_weight` must be at least 1.
    #[error("vnodes_per_weight must be at least 1")]
    ZeroVnodes,
    /// The weights and vnode count ask for more than [`MAX_POINTS`] points.
    #[error("the ring would have {0} points, more than the limit of {MAX_POINTS}")]
    TooManyPoints(u128),
    /// [`Ring::without_member`] was asked to remove a member that is not in the ring.
    #[error("no member {0:?} in the ring")]
    UnknownMember(NodeId),
}

/// A stable node name, independent of its address. Cheap to clone.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(Arc<str>);

impl NodeId {
    /// Longest accepted id, in bytes.
    pub const MAX_LEN: usize = 255;

    /// Checks and wraps an id: 1 to [`NodeId::MAX_LEN`] bytes.
    pub fn new(id: impl Into<String>) -> Result<Self, RingError> {
        let id = id.into();
        if id.is_empty() || id.len() > Self::MAX_LEN {
            return Err(RingError::InvalidNodeId(id));
        }
        Ok(Self(id.into()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A `NodeId` reads as the `str` it wraps, so it can be passed wherever an id is borrowed.
impl std::ops::Deref for NodeId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for NodeId {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<String> for NodeId {
    fn eq(&self, other: &String) -> bool {
        &*self.0 == other.as_str()
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A ring member: an id and a weight (how many shares of the key space it takes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    /// The member's stable id.
    pub id: NodeId,
    /// Relative capacity: a member of weight 2 owns about twice the keys of one of weight 1.
    pub weight: u32,
}

impl Member {
    /// A member with the given id and weight.
    pub fn new(id: NodeId, weight: u32) -> Self {
        Self { id, weight }
    }
}

/// An immutable consistent-hash ring.
#[derive(Clone, PartialEq, Eq)]
pub struct Ring {
    /// Sorted by id; `owners` index into it.
    members: Vec<Member>,
    /// Point positions, ascending. Kept apart from `owners` so the binary search touches only
    /// the 8-byte positions.
    hashes: Vec<u64>,
    /// `owners[i]` is the member index owning point `hashes[i]`.
    owners: Vec<u32>,
    vnodes_per_weight: u32,
    epoch: u64,
    fingerprint: u64,
}

/// Most replicas a [`ReplicaSet`] holds (a node's `--replication-factor` is at most this).
pub const MAX_REPLICAS: usize = 16;

/// A key's replicas as member indices of one [`Ring`], primary first, in a fixed-size
/// value: computing it allocates nothing. From [`Ring::replica_set`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaSet {
    members: [u32; MAX_REPLICAS],
    len: u8,
}

impl ReplicaSet {
    /// The member indices, primary first.
    pub fn indices(&self) -> &[u32] {
        &self.members[..usize::from(self.len)]
    }

    /// How many replicas.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Whether there are none (an empty ring).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Where [`Ring::walk`] collects owners.
trait Replicas {
    fn count(&self) -> usize;
    fn holds(&self, member: u32) -> bool;
    fn add(&mut self, member: u32);
}

impl Replicas for Vec<u32> {
    fn count(&self) -> usize {
        self.len()
    }
    fn holds(&self, member: u32) -> bool {
        self.contains(&member)
    }
    fn add(&mut self, member: u32) {
        self.push(member);
    }
}

impl Replicas for ReplicaSet {
    fn count(&self) -> usize {
        self.len()
    }
    fn holds(&self, member: u32) -> bool {
        self.indices().contains(&member)
    }
    fn add(&mut self, member: u32) {
        // The walk stops at MAX_REPLICAS.
        self.members[usize::from(self.len)] = member;
        self.len += 1;
    }
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("members", &self.members)
            .field("points", &self.hashes.len())
            .field("vnodes_per_weight", &self.vnodes_per_weight)
            .field("epoch", &self.epoch)
            .field("fingerprint", &format_args!("{:016x}", self.fingerprint))
            .finish()
    }
}

impl Ring {
    /// Builds a ring. The member order does not matter; ids must be unique, weights ≥ 1.
    pub fn new(
        members: impl IntoIterator<Item = Member>,
        vnodes_per_weight: u32,
    ) -> Result<Self, RingError> {
        if vnodes_per_weight == 0 {
            return Err(RingError::ZeroVnodes);
        }
        let mut members: Vec<Member> = members.into_iter().collect();
        if members.is_empty() {
            return Err(RingError::NoMembers);
        }
        members.sort_by(|a, b| a.id.cmp(&b.id));
        for pair in members.windows(2) {
            if pair[0].id == pair[1].id {
                return Err(RingError::DuplicateMember(pair[0].id.clone()));
            }
        }
        let mut total: u128 = 0;
        for m in &members {
            if m.weight == 0 {
                return Err(RingError::ZeroWeight(m.id.clone()));
            }
            total += u128::from(m.weight) * u128::from(vnodes_per_weight);
        }
        if total > MAX_POINTS as u128 {
            return Err(RingError::TooManyPoints(total));
        }
        let mut points: Vec<(u64, u32)> = Vec::with_capacity(total as usize);
        for (i, m) in members.iter().enumerate() {
            let count = m.weight * vnodes_per_weight; // ≤ MAX_POINTS, checked above
            points.extend((0..count).map(|v| (point_hash(m.id.as_str(), v), i as u32)));
        }
        // Ties between equal positions break by member index, i.e. by id: deterministic
        // whatever order the members were given in.
        points.sort_unstable();
        let (hashes, owners) = points.into_iter().unzip();
        let fingerprint = fingerprint(&members, vnodes_per_weight);
        Ok(Self {
            members,
            hashes,
            owners,
            vnodes_per_weight,
            epoch: 0,
            fingerprint,
        })
    }

    /// The same ring stamped with a membership epoch (who built it, and from which view).
    pub fn with_epoch(mut self, epoch: u64) -> Self {
        self.epoch = epoch;
        self
    }

    /// A new ring with `member` added (or re-weighted, if its id is already present).
    pub fn with_member(&self, member: Member) -> Result<Self, RingError> {
        let mut members: Vec<Member> = self
            .members
            .iter()
            .filter(|m| m.id != member.id)
            .cloned()
            .collect();
        members.push(member);
        Ok(Self::new(members, self.vnodes_per_weight)?.with_epoch(self.epoch))
    }

    /// A new ring without member `id`.
    pub fn without_member(&self, id: &NodeId) -> Result<Self, RingError> {
        if !self.members.iter().any(|m| &m.id == id) {
            return Err(RingError::UnknownMember(id.clone()));
        }
        let members = self.members.iter().filter(|m| &m.id != id).cloned();
        Ok(Self::new(members, self.vnodes_per_weight)?.with_epoch(self.epoch))
    }

    /// Members, sorted by id.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Points per unit of weight.
    pub fn vnodes_per_weight(&self) -> u32 {
        self.vnodes_per_weight
    }

    /// Total number of points on the ring.
    pub fn point_count(&self) -> usize {
        self.hashes.len()
    }

    /// The membership epoch this ring was stamped with ([`Ring::with_epoch`]); 0 if none.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A hash of everything that decides placement: [`FORMAT_VERSION`], `vnodes_per_weight`,
    /// and each member's id and weight. Equal fingerprints mean identical placement; the epoch
    /// is not part of it.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Index of the first point at or after `hash`, wrapping to 0.
    fn first_point(&self, hash: u64) -> usize {
        let i = self.hashes.partition_point(|&h| h < hash);
        if i == self.hashes.len() { 0 } else { i }
    }

    /// The primary owner of `key`. No allocation.
    pub fn owner(&self, key: &[u8]) -> &Member {
        self.owner_of_hash(key_hash(key))
    }

    /// The primary owner of ring position `hash` (see [`key_hash`]).
    pub fn owner_of_hash(&self, hash: u64) -> &Member {
        &self.members[self.owners[self.first_point(hash)] as usize]
    }

    /// The first `n` distinct members clockwise from `key`, primary first. `n` is capped at
    /// the member count.
    pub fn replicas(&self, key: &[u8], n: usize) -> Vec<&Member> {
        self.replicas_of_hash(key_hash(key), n)
    }

    /// [`Ring::replicas`] for a ring position.
    pub fn replicas_of_hash(&self, hash: u64, n: usize) -> Vec<&Member> {
        let mut found: Vec<u32> = Vec::with_capacity(n.min(self.members.len()));
        self.walk(hash, n, &mut found);
        found
            .into_iter()
            .map(|i| &self.members[i as usize])
            .collect()
    }

    /// [`Ring::replicas`] without allocating: the first `min(n, MAX_REPLICAS)` replicas as
    /// member indices in a fixed-size value (what a node computes for every request).
    /// [`Ring::member_at`] turns an index into its member.
    pub fn replica_set(&self, key: &[u8], n: usize) -> ReplicaSet {
        self.replica_set_of_hash(key_hash(key), n)
    }

    /// [`Ring::replica_set`] for a ring position.
    pub fn replica_set_of_hash(&self, hash: u64, n: usize) -> ReplicaSet {
        let mut set = ReplicaSet::default();
        self.walk(hash, n.min(MAX_REPLICAS), &mut set);
        set
    }

    /// The member at `index` (an entry of a [`ReplicaSet`] of this ring).
    ///
    /// # Panics
    ///
    /// If `index` is not a member index of this ring (it did not come from this ring).
    pub fn member_at(&self, index: u32) -> &Member {
        &self.members[index as usize]
    }

    /// Walks the ring clockwise from `hash`, collecting the first `n` distinct owners.
    fn walk(&self, hash: u64, n: usize, found: &mut impl Replicas) {
        let n = n.min(self.members.len());
        let start = self.first_point(hash);
        let len = self.hashes.len();
        for step in 0..len {
            if found.count() == n {
                break;
            }
            let owner = self.owners[(start + step) % len];
            if !found.holds(owner) {
                found.add(owner);
            }
        }
    }

    /// Each member's share of the key space as primary owner, exactly (by arc length), in
    /// member order. Shares sum to 1.
    pub fn shares(&self) -> Vec<(NodeId, f64)> {
        let mut owned = vec![0u128; self.members.len()];
        let len = self.hashes.len();
        for i in 0..len {
            // Point i owns (previous point, this point]; point 0 also owns the wrap-around arc.
            let arc = if i == 0 {
                u128::from(self.hashes[0])
                    + (u128::from(u64::MAX) - u128::from(self.hashes[len - 1]))
                    + 1
            } else {
                u128::from(self.hashes[i] - self.hashes[i - 1])
            };
            owned[self.owners[i] as usize] += arc;
        }
        let circle = u128::from(u64::MAX) + 1;
        self.members
            .iter()
            .zip(owned)
            .map(|(m, o)| (m.id.clone(), o as f64 / circle as f64))
            .collect()
    }
}

/// See [`Ring::fingerprint`].
fn fingerprint(members: &[Member], vnodes_per_weight: u32) -> u64 {
    let mut buf = Vec::new();
    buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    buf.extend_from_slice(&vnodes_per_weight.to_le_bytes());
    for m in members {
        buf.extend_from_slice(&(m.id.as_str().len() as u32).to_le_bytes());
        buf.extend_from_slice(m.id.as_str().as_bytes());
        buf.extend_from_slice(&m.weight.to_le_bytes());
    }
    XxHash3_64::oneshot_with_seed(POINT_SEED, &buf)
}

/// A range of ring positions: `(start, end]`, wrapping through `u64::MAX` to 0 when
/// `start >= end` (the range that contains the top of the circle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRange {
    /// Exclusive lower end.
    pub start: u64,
    /// Inclusive upper end.
    pub end: u64,
}

impl TokenRange {
    /// Whether ring position `hash` falls in the range.
    pub fn contains(&self, hash: u64) -> bool {
        if self.start < self.end {
            hash > self.start && hash <= self.end
        } else {
            hash > self.start || hash <= self.end
        }
    }
}

/// A range whose replica list differs between two rings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeChange {
    /// The positions concerned.
    pub range: TokenRange,
    /// Replicas before, primary first.
    pub old: Vec<NodeId>,
    /// Replicas after, primary first.
    pub new: Vec<NodeId>,
}

/// The ranges whose first-`n` replica list differs between `old` and `new`, with both lists:
/// what a rebalance must move. Adjacent ranges with the same lists are merged.
pub fn changes(old: &Ring, new: &Ring, n: usize) -> Vec<RangeChange> {
    let mut bounds: Vec<u64> = old.hashes.iter().chain(&new.hashes).copied().collect();
    bounds.sort_unstable();
    bounds.dedup();
    let ids = |ring: &Ring, h: u64| -> Vec<NodeId> {
        ring.replicas_of_hash(h, n)
            .into_iter()
            .map(|m| m.id.clone())
            .collect()
    };
    let mut out: Vec<RangeChange> = Vec::new();
    for (i, &end) in bounds.iter().enumerate() {
        // Range (previous bound, end]; the first one wraps from the last bound.
        let start = if i == 0 {
            bounds[bounds.len() - 1]
        } else {
            bounds[i - 1]
        };
        let (o, nw) = (ids(old, end), ids(new, end));
        if o == nw {
            continue;
        }
        match out.last_mut() {
            Some(last) if i > 0 && last.range.end == start && last.old == o && last.new == nw => {
                last.range.end = end
            }
            _ => out.push(RangeChange {
                range: TokenRange { start, end },
                old: o,
                new: nw,
            }),
        }
    }
    out
}
