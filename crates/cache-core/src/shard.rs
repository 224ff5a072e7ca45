//! One shard: an exact LRU over a slab of nodes linked by `u32` indices, indexed by a
//! `hashbrown::HashTable<u32>`.
//!
//! This module owns every invariant of the engine's memory layout and accounting; the
//! [`Cache`](crate::Cache) only picks a shard and takes its lock. It never does I/O, never
//! reads the clock unless an entry with an expiry is involved, and never holds more than the
//! one lock its caller took.
//!
//! Layout: `slots` is a `Vec` of [`Slot`]s. An occupied slot holds a [`Node`] with `prev`/`next`
//! indices into the same `Vec` (the intrusive doubly linked LRU list: `head` is the most
//! recently used, `tail` the least). Vacant slots form a singly linked free list through
//! `next_free`, so slot numbers are reused and never move while an entry lives — which is what
//! lets [`Shard::scan`] resume from a slot number.

use bytes::Bytes;
use hashbrown::HashTable;

use crate::arena::{self, Arena};
use crate::clock::Clock;
use crate::config::EvictionPolicy;
use crate::error::InsertError;
use crate::{
    Condition, DeleteOutcome, Entry, KeyVersion, Lookup, TouchOutcome, VersionedRead, WriteOptions,
    WriteOutcome,
};

/// The "no link" value of `prev`, `next`, `head`, `tail` and `free_head`.
const NIL: u32 = u32::MAX;

/// `expires_at` of an entry that never expires.
pub(crate) const NEVER: u64 = u64::MAX;

/// Size of the `bytes` crate's shared header (buffer pointer, capacity, refcount), allocated
/// once per large entry when its buffer is made shareable at insert time.
const BYTES_SHARED_HEADER: usize = 24;

/// Bytes of hash index per entry: a `u32` slot number plus one control byte, at hashbrown's
/// maximum load factor of 7/8, rounded up.
const INDEX_BYTES_PER_ENTRY: usize = 8;

/// Bytes of one slab slot.
const SLOT_BYTES: usize = std::mem::size_of::<Slot>();

// The slot stays at 32 bytes: `Vacant` hides in a `bool`'s spare values, no tag word.
const _: () = assert!(SLOT_BYTES == 32);

/// `Node::class` of an entry too large for any arena chunk: its key and value are one `Bytes`
/// in `Shard::large`, and a hit returns a slice of it without copying.
const LARGE: u8 = u8::MAX;

/// Bytes at the start of a large entry's buffer: the key's length (`u32`).
const LARGE_HEADER: usize = 4;

/// Bytes charged for a large entry beyond its key and value: its `Bytes` handle in
/// `Shard::large`, the buffer's shared header and its length header.
const LARGE_EXTRA: usize = std::mem::size_of::<Bytes>() + BYTES_SHARED_HEADER + LARGE_HEADER;

/// The most bytes charged per small entry (key and value up to 120 bytes together) on top of
/// its key and value: the slab slot, the index, and at most 16 bytes for the chunk's header
/// and size-class rounding (chunks are at least 16 bytes, then in 8-byte steps). Larger entries are charged their size class (at most 25 % above their
/// size, up to 1 KiB) or, above 1 KiB, their bytes plus a `Bytes` handle and header; see
/// [`entry_charge`]. `benches/engine_report.rs` measures the real figure.
pub const ENTRY_OVERHEAD: usize = SLOT_BYTES + INDEX_BYTES_PER_ENTRY + 16;

// Small entries' rounding and header fit the bound: 8 header bytes + at most 7 of rounding.
const _: () = assert!(arena::HEADER_BYTES + 7 <= 16);

/// Bytes an entry with a `key_len`-byte key and a `value_len`-byte value is charged against
/// the memory limit: what the engine really holds for it (its chunk or buffer, its slot, its
/// share of the index).
pub fn entry_charge(key_len: usize, value_len: usize) -> u64 {
    let data = key_len.saturating_add(value_len);
    stored_charge(class_of_data(data), data)
}

/// The arena class for `data_len` bytes of key and value, or [`LARGE`].
fn class_of_data(data_len: usize) -> u8 {
    arena::class_for(arena::HEADER_BYTES.saturating_add(data_len)).unwrap_or(LARGE)
}

fn stored_charge(class: u8, data_len: usize) -> u64 {
    let stored = if class == LARGE {
        data_len.saturating_add(LARGE_EXTRA)
    } else {
        arena::class_size(class)
    };
    stored.saturating_add(SLOT_BYTES + INDEX_BYTES_PER_ENTRY) as u64
}

/// One stored entry: a value, or a tombstone left by a versioned delete. Its bytes (key, then
/// value) are in the shard's arena, or in `Shard::large` when `class` is [`LARGE`].
#[derive(Debug)]
struct Node {
    /// Absolute expiry in unix milliseconds, [`NEVER`] for none. Tombstones always expire.
    expires_at: u64,
    /// Caller-supplied version; higher wins. `0` for unversioned writes.
    version: u64,
    /// The arena chunk handle, or the index in `Shard::large` for a [`LARGE`] entry. The
    /// key's and value's lengths are stored with the bytes (see `arena.rs`, [`LARGE_HEADER`]).
    loc: u32,
    /// Towards the head (more recently used); [`NIL`] at the head.
    prev: u32,
    /// Towards the tail (less recently used); [`NIL`] at the tail.
    next: u32,
    /// The arena size class of the chunk, or [`LARGE`].
    class: u8,
    /// A tombstone reads as absent but still blocks older versioned writes.
    tombstone: bool,
    /// SIEVE's bit: used since the hand last passed (always `false` under LRU).
    visited: bool,
}

impl Node {
    /// Bytes this entry is charged against the shard's budget.
    fn charge(&self, large: &[Bytes]) -> u64 {
        if self.class == LARGE {
            stored_charge(LARGE, large[self.loc as usize].len() - LARGE_HEADER)
        } else {
            stored_charge(self.class, 0)
        }
    }

    fn is_expired(&self, now: &mut Now<'_, impl Clock>) -> bool {
        self.expires_at != NEVER && now.get() >= self.expires_at
    }

    /// The key and the value, wherever they are stored.
    fn entry<'a>(&self, arena: &'a Arena, large: &'a [Bytes]) -> (&'a [u8], &'a [u8]) {
        if self.class == LARGE {
            let (k, rest) = large_parts(&large[self.loc as usize]);
            rest.split_at(k)
        } else {
            arena.entry(self.loc, self.class)
        }
    }

    /// The key, wherever it is stored.
    fn key<'a>(&self, arena: &'a Arena, large: &'a [Bytes]) -> &'a [u8] {
        self.entry(arena, large).0
    }

    /// The key as `Bytes`: a slice of a large entry's buffer, a copy of a small one's.
    fn key_bytes(&self, arena: &Arena, large: &[Bytes]) -> Bytes {
        if self.class == LARGE {
            let buf = &large[self.loc as usize];
            let (k, _) = large_parts(buf);
            buf.slice(LARGE_HEADER..LARGE_HEADER + k)
        } else {
            Bytes::copy_from_slice(self.key(arena, large))
        }
    }

    /// The value: a slice of a large entry's buffer (no copy), a copy of a small one's (a few
    /// nanoseconds for a value of up to 1 KiB, against microseconds for a request).
    fn value(&self, arena: &Arena, large: &[Bytes]) -> Bytes {
        if self.class == LARGE {
            let buf = &large[self.loc as usize];
            let (k, _) = large_parts(buf);
            buf.slice(LARGE_HEADER + k..)
        } else {
            Bytes::copy_from_slice(self.entry(arena, large).1)
        }
    }
}

/// A large entry's buffer `[key length | key | value]` as the key's length and the rest.
fn large_parts(buf: &[u8]) -> (usize, &[u8]) {
    let (len, rest) = buf.split_at(LARGE_HEADER);
    (
        u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize,
        rest,
    )
}

/// A slab slot.
#[derive(Debug)]
enum Slot {
    Occupied(Node),
    Vacant { next_free: u32 },
}

/// Copies a large entry's `key` and `value` into one buffer and makes it shareable now, so that
/// every later hit clones it by refcount without allocating. (A `Bytes` built from a `Vec` allocates its
/// shared header on first clone; paying that at insert keeps the get path allocation-free.)
fn entry_buffer(key: &[u8], value: &[u8]) -> Bytes {
    let mut buf = Vec::with_capacity(LARGE_HEADER + key.len() + value.len());
    buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
    buf.extend_from_slice(key);
    buf.extend_from_slice(value);
    let data = Bytes::from(buf);
    drop(data.clone());
    data
}

/// The current time, read from the clock at most once per operation and only if needed.
pub(crate) struct Now<'a, C: Clock> {
    clock: &'a C,
    cached: Option<u64>,
}

impl<'a, C: Clock> Now<'a, C> {
    pub(crate) fn new(clock: &'a C) -> Self {
        Self {
            clock,
            cached: None,
        }
    }

    pub(crate) fn get(&mut self) -> u64 {
        *self.cached.get_or_insert_with(|| self.clock.now_ms())
    }
}

/// Per-shard counters. They are plain integers because they are only touched under the shard
/// lock the operation already holds: counting costs nothing on the hit path and never
/// contends across shards.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ShardCounters {
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) inserts: u64,
    pub(crate) updates: u64,
    pub(crate) deletes: u64,
    pub(crate) evictions: u64,
    pub(crate) expirations: u64,
    pub(crate) stale_writes: u64,
}

/// Result of one bounded reaper step on a shard ([`Cache::reap_step`](crate::Cache::reap_step)).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReapStep {
    /// Slots examined (at most the budget).
    pub visited: usize,
    /// Expired entries and tombstones removed.
    pub reclaimed: usize,
    /// True when the sweep reached the end of the slab and starts over next time.
    pub pass_complete: bool,
}

/// One shard of the cache. See the module docs for the layout.
pub(crate) struct Shard {
    /// The slab.
    slots: Vec<Slot>,
    /// Key and value bytes of small entries.
    arena: Arena,
    /// Key and value of each large entry (see [`LARGE`]); freed entries are empty.
    large: Vec<Bytes>,
    /// Free indices in `large`.
    large_free: Vec<u32>,
    /// Bytes of the buffers in `large`, shared headers included.
    large_bytes: usize,
    /// First vacant slot, or [`NIL`].
    free_head: u32,
    /// Key hash -> slot number.
    index: HashTable<u32>,
    /// Most recently used entry, or [`NIL`] when empty.
    head: u32,
    /// Least recently used entry (next to be evicted), or [`NIL`] when empty.
    tail: u32,
    /// Sum of the charges of all occupied slots.
    used_bytes: u64,
    /// This shard's share of `max_bytes`.
    capacity: u64,
    /// This shard's share of `max_items` (`u64::MAX` for no cap).
    max_items: u64,
    /// Whether an insert that does not fit may evict.
    evict: bool,
    /// How the entry to evict is chosen.
    policy: EvictionPolicy,
    /// SIEVE's hand: the next eviction candidate, walking from the tail towards the head;
    /// [`NIL`] to start at the tail. Always [`NIL`] under LRU.
    hand: u32,
    /// How long a tombstone stays, in milliseconds; also how long an expired *versioned*
    /// value keeps blocking older versions (as a tombstone) after its expiry.
    tombstone_ttl_ms: u64,
    /// Occupied slots holding values (not tombstones), expired or not.
    items: u64,
    /// Occupied slots holding tombstones.
    tombstones: u64,
    /// Occupied slots with an expiry; when 0 the reaper has nothing to do here.
    expiring: u64,
    /// Where the reaper's sweep resumes.
    reap_cursor: u32,
    /// Re-hashes keys when the index grows or an entry is found by slot number; the same
    /// hasher the cache uses to pick the shard.
    hasher: ahash::RandomState,
    pub(crate) counters: ShardCounters,
}

impl Shard {
    pub(crate) fn new(
        capacity: u64,
        max_items: u64,
        evict: bool,
        policy: EvictionPolicy,
        tombstone_ttl_ms: u64,
        hasher: ahash::RandomState,
    ) -> Self {
        Self {
            tombstone_ttl_ms,
            slots: Vec::new(),
            arena: Arena::new(),
            large: Vec::new(),
            large_free: Vec::new(),
            large_bytes: 0,
            free_head: NIL,
            index: HashTable::new(),
            head: NIL,
            tail: NIL,
            used_bytes: 0,
            capacity,
            max_items,
            evict,
            policy,
            hand: NIL,
            items: 0,
            tombstones: 0,
            expiring: 0,
            reap_cursor: 0,
            hasher,
            counters: ShardCounters::default(),
        }
    }

    pub(crate) fn items(&self) -> u64 {
        self.items
    }

    pub(crate) fn tombstones(&self) -> u64 {
        self.tombstones
    }

    pub(crate) fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes this shard really holds: slab capacity, index, arena pages and tables, and large
    /// entries' buffers and handles. Differs from `used_bytes` by the slack the charges do not
    /// see (free chunks, slab and index growth room); see `docs/why/lru.md`.
    pub(crate) fn footprint(&self) -> u64 {
        let index_buckets = match self.index.capacity() {
            0 => 0,
            c => (c * 8 / 7).next_power_of_two(),
        };
        (self.slots.capacity() * SLOT_BYTES
            + index_buckets * (4 + 1)
            + self.arena.footprint()
            + self.large_bytes
            + self.large.capacity() * std::mem::size_of::<Bytes>()
            + self.large_free.capacity() * 4) as u64
    }

    // ----- slab and list primitives -------------------------------------------------------

    fn node(&self, idx: u32) -> &Node {
        match &self.slots[idx as usize] {
            Slot::Occupied(node) => node,
            Slot::Vacant { .. } => unreachable!("slot {idx} is linked but vacant"),
        }
    }

    fn node_mut(&mut self, idx: u32) -> &mut Node {
        match &mut self.slots[idx as usize] {
            Slot::Occupied(node) => node,
            Slot::Vacant { .. } => unreachable!("slot {idx} is linked but vacant"),
        }
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<u32> {
        let (slots, arena, large) = (&self.slots, &self.arena, &self.large);
        self.index
            .find(hash, |&idx| match &slots[idx as usize] {
                Slot::Occupied(node) => node.key(arena, large) == key,
                Slot::Vacant { .. } => false,
            })
            .copied()
    }

    /// The key of occupied slot `idx`.
    fn key(&self, idx: u32) -> &[u8] {
        self.node(idx).key(&self.arena, &self.large)
    }

    /// Stores `key` and `value` for slot `owner`: in an arena chunk, or as a large entry.
    /// Returns the node's `(class, loc)`.
    fn store(&mut self, owner: u32, key: &[u8], value: &[u8]) -> (u8, u32) {
        let class = class_of_data(key.len() + value.len());
        if class != LARGE
            && let Some(h) = self.arena.alloc(class)
        {
            self.arena.fill(h, class, owner, key, value);
            return (class, h);
        }
        let data = entry_buffer(key, value);
        self.large_bytes += data.len() + BYTES_SHARED_HEADER;
        match self.large_free.pop() {
            Some(i) => {
                self.large[i as usize] = data;
                (LARGE, i)
            }
            None => {
                self.large.push(data);
                (LARGE, (self.large.len() - 1) as u32)
            }
        }
    }

    /// Frees what [`Shard::store`] returned. Arena chunks moved to give a page back are
    /// followed: their owners' `loc` is updated.
    fn release(&mut self, class: u8, loc: u32) {
        if class == LARGE {
            let data = std::mem::take(&mut self.large[loc as usize]);
            self.large_bytes -= data.len() + BYTES_SHARED_HEADER;
            self.large_free.push(loc);
            return;
        }
        let slots = &mut self.slots;
        self.arena.free(loc, class, |owner, to| {
            if let Some(Slot::Occupied(node)) = slots.get_mut(owner as usize) {
                node.loc = to;
            }
        });
    }

    /// Unlinks `idx` from the LRU list (the node stays in its slot).
    fn unlink(&mut self, idx: u32) {
        let (prev, next) = {
            let node = self.node(idx);
            (node.prev, node.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.node_mut(p).next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.node_mut(n).prev = prev,
        }
    }

    /// Links `idx` at the head (most recently used).
    fn push_front(&mut self, idx: u32) {
        let old_head = self.head;
        {
            let node = self.node_mut(idx);
            node.prev = NIL;
            node.next = old_head;
        }
        match old_head {
            NIL => self.tail = idx,
            h => self.node_mut(h).prev = idx,
        }
        self.head = idx;
    }

    fn move_to_front(&mut self, idx: u32) {
        if self.head != idx {
            self.unlink(idx);
            self.push_front(idx);
        }
    }

    /// Records a use of `idx` (a hit, an overwrite, a touch): under LRU it moves to the head;
    /// under SIEVE it is marked visited and stays where it is.
    fn promote(&mut self, idx: u32) {
        match self.policy {
            EvictionPolicy::Lru => self.move_to_front(idx),
            EvictionPolicy::Sieve => self.node_mut(idx).visited = true,
        }
    }

    /// The next entry to evict, never `protect`; `None` if nothing else is left.
    fn victim(&mut self, protect: u32) -> Option<u32> {
        match self.policy {
            EvictionPolicy::Lru => Some(self.tail).filter(|&t| t != NIL && t != protect),
            EvictionPolicy::Sieve => self.sieve_victim(protect),
        }
    }

    /// SIEVE: from the hand towards the head (wrapping to the tail), clear visited bits until
    /// an unvisited entry is found; it is the victim and the hand stops just before it. Two
    /// passes over the list at most: the first clears every bit.
    fn sieve_victim(&mut self, protect: u32) -> Option<u32> {
        let entries = self.items + self.tombstones;
        let mut idx = if self.hand == NIL {
            self.tail
        } else {
            self.hand
        };
        let mut steps = 0u64;
        while idx != NIL && steps <= 2 * entries {
            steps += 1;
            let node = self.node_mut(idx);
            let prev = node.prev;
            if idx != protect && !node.visited {
                self.hand = prev;
                return Some(idx);
            }
            node.visited = false;
            idx = if prev == NIL { self.tail } else { prev };
        }
        None
    }

    /// Adds the per-node counters of `node` (`sign` = +1) or removes them (`sign` = -1).
    fn account(&mut self, node_charge: u64, tombstone: bool, expiring: bool, add: bool) {
        let delta = |v: &mut u64, d: u64| {
            if add {
                *v += d;
            } else {
                *v -= d;
            }
        };
        delta(&mut self.used_bytes, node_charge);
        if tombstone {
            delta(&mut self.tombstones, 1);
        } else {
            delta(&mut self.items, 1);
        }
        if expiring {
            delta(&mut self.expiring, 1);
        }
    }

    /// Stores a new entry in a free slot, links it at the head and indexes it.
    fn insert_node(
        &mut self,
        hash: u64,
        key: &[u8],
        value: &[u8],
        expires_at: u64,
        version: u64,
        tombstone: bool,
    ) -> u32 {
        let idx = match self.free_head {
            NIL => u32::try_from(self.slots.len())
                .ok()
                .filter(|&i| i != NIL)
                .expect("a shard holds fewer than u32::MAX entries"),
            idx => idx,
        };
        let (class, loc) = self.store(idx, key, value);
        let node = Node {
            expires_at,
            version,
            loc,
            prev: NIL,
            next: NIL,
            class,
            tombstone,
            visited: false,
        };
        self.account(
            node.charge(&self.large),
            tombstone,
            expires_at != NEVER,
            true,
        );
        if idx as usize == self.slots.len() {
            // Grow in steps of an eighth, not by doubling: the slab's slack stays small and
            // bounded (what the memory limit does not see).
            if self.slots.len() == self.slots.capacity() {
                self.slots.reserve_exact((self.slots.len() / 8).max(64));
            }
            self.slots.push(Slot::Occupied(node));
        } else {
            let slot = std::mem::replace(&mut self.slots[idx as usize], Slot::Occupied(node));
            match slot {
                Slot::Vacant { next_free } => self.free_head = next_free,
                Slot::Occupied(_) => unreachable!("free list points at occupied slot {idx}"),
            }
        }
        self.push_front(idx);
        let (slots, arena, large, hasher) = (&self.slots, &self.arena, &self.large, &self.hasher);
        self.index
            .insert_unique(hash, idx, |&i| match &slots[i as usize] {
                Slot::Occupied(node) => hasher.hash_one(node.key(arena, large)),
                Slot::Vacant { .. } => 0,
            });
        idx
    }

    /// Unlinks, un-indexes and frees slot `idx`; returns whether it held a tombstone.
    fn remove_node(&mut self, idx: u32) -> bool {
        if self.hand == idx {
            self.hand = self.node(idx).prev;
        }
        self.unlink(idx);
        let hash = self.hasher.hash_one(self.key(idx));
        if let Ok(entry) = self.index.find_entry(hash, |&i| i == idx) {
            entry.remove();
        }
        let slot = std::mem::replace(
            &mut self.slots[idx as usize],
            Slot::Vacant {
                next_free: self.free_head,
            },
        );
        self.free_head = idx;
        match slot {
            Slot::Occupied(node) => {
                self.account(
                    node.charge(&self.large),
                    node.tombstone,
                    node.expires_at != NEVER,
                    false,
                );
                self.release(node.class, node.loc);
                node.tombstone
            }
            Slot::Vacant { .. } => unreachable!("removed vacant slot {idx}"),
        }
    }

    /// Rewrites occupied slot `idx` in place, keeping its slot number (so a scan in progress
    /// neither misses nor repeats it) and its list position: its bytes go to the same chunk if
    /// they fit its class, else to new storage, and the old is freed. A write then records a
    /// use ([`Shard::promote`]); an expiry turning a value into a tombstone does not.
    fn rewrite(
        &mut self,
        idx: u32,
        key: &[u8],
        value: &[u8],
        expires_at: u64,
        version: u64,
        tombstone: bool,
    ) {
        let (old_charge, old_tomb, old_expiring, old_class, old_loc) = {
            let node = self.node(idx);
            let expiring = node.expires_at != NEVER;
            (
                node.charge(&self.large),
                node.tombstone,
                expiring,
                node.class,
                node.loc,
            )
        };
        self.account(old_charge, old_tomb, old_expiring, false);
        let class = class_of_data(key.len() + value.len());
        if class == old_class && class != LARGE {
            self.arena.fill(old_loc, class, idx, key, value);
        } else {
            let (class, loc) = self.store(idx, key, value);
            let node = self.node_mut(idx);
            node.class = class;
            node.loc = loc;
            // The node points at its new bytes before the old are freed: freeing may move
            // chunks, the new one included, and the move updates the node.
            self.release(old_class, old_loc);
        }
        let node = self.node_mut(idx);
        node.expires_at = expires_at;
        node.version = version;
        node.tombstone = tombstone;
        let new_charge = self.node(idx).charge(&self.large);
        self.account(new_charge, tombstone, expires_at != NEVER, true);
    }

    /// Evicts from the tail until `extra_bytes` and `extra_items` more fit. Never evicts
    /// `protect` (the entry being written, already at the head).
    fn evict_until_fits(&mut self, extra_bytes: u64, extra_items: u64, protect: u32) {
        while self.used_bytes + extra_bytes > self.capacity
            || self.items + self.tombstones + extra_items > self.max_items
        {
            let Some(victim) = self.victim(protect) else {
                break;
            };
            self.remove_node(victim);
            self.counters.evictions += 1;
        }
    }

    /// Would an insert of `extra_bytes` / `extra_items` fit without evicting?
    fn fits(&self, extra_bytes: u64, extra_items: u64) -> bool {
        self.used_bytes + extra_bytes <= self.capacity
            && self.items + self.tombstones + extra_items <= self.max_items
    }

    /// Brings the entry in slot `idx` up to date with the clock and returns it if it still
    /// exists: an expired tombstone is freed; an expired value is freed if unversioned, and
    /// otherwise becomes a tombstone at its version until `expires_at + tombstone_ttl`.
    ///
    /// Why: with last-writer-wins replication an expiry is a write like a delete. If the
    /// expired value simply vanished, its version would be lost and an older live copy on
    /// another replica (one that missed the write) would win a versioned read or a repair,
    /// bringing an expired value back.
    fn settle<C: Clock>(&mut self, idx: u32, now: &mut Now<'_, C>) -> Option<u32> {
        let (expires_at, tombstone, version) = {
            let node = self.node(idx);
            (node.expires_at, node.tombstone, node.version)
        };
        if expires_at == NEVER || now.get() < expires_at {
            return Some(idx);
        }
        if tombstone {
            self.remove_node(idx);
            return None;
        }
        self.counters.expirations += 1;
        let dead_until = expires_at
            .saturating_add(self.tombstone_ttl_ms)
            .min(NEVER - 1);
        if version == 0 || now.get() >= dead_until {
            self.remove_node(idx);
            return None;
        }
        self.entomb(idx, dead_until);
        Some(idx)
    }

    /// Turns the value in slot `idx` into a tombstone expiring at `expires_at`, in place
    /// (same slot, same list position, same version): frees the value's bytes.
    fn entomb(&mut self, idx: u32, expires_at: u64) {
        let key = self.key(idx).to_vec();
        let version = self.node(idx).version;
        self.rewrite(idx, &key, &[], expires_at, version, true);
    }

    /// Finds `key` and settles it (see [`Shard::settle`]).
    fn find_settled<C: Clock>(
        &mut self,
        hash: u64,
        key: &[u8],
        now: &mut Now<'_, C>,
    ) -> Option<u32> {
        let idx = self.find(hash, key)?;
        self.settle(idx, now)
    }

    // ----- operations ---------------------------------------------------------------------

    /// Looks `key` up, counting a hit or a miss; a hit becomes the most recently used entry.
    pub(crate) fn get<C: Clock>(&mut self, hash: u64, key: &[u8], clock: &C) -> Option<Lookup> {
        match self.get_versioned(hash, key, clock, true)? {
            VersionedRead::Live(lookup) => Some(lookup),
            VersionedRead::Dead { .. } => None,
        }
    }

    /// Writes `key` = `value` under `opts`. See [`Cache::write`](crate::Cache::write).
    pub(crate) fn write<C: Clock>(
        &mut self,
        hash: u64,
        key: &[u8],
        value: &[u8],
        opts: WriteOptions,
        clock: &C,
        tombstone_ttl_ms: u64,
    ) -> Result<WriteOutcome, InsertError> {
        u32::try_from(key.len()).map_err(|_| InsertError::KeyTooLong(key.len()))?;
        let charge = entry_charge(key.len(), value.len());
        if charge > self.capacity || u32::try_from(value.len()).is_err() {
            return Err(InsertError::EntryTooLarge {
                charge,
                shard_capacity: self.capacity,
            });
        }
        let mut now = Now::new(clock);
        let existing = self.find_settled(hash, key, &mut now);

        // Is there a live value or tombstone, and does it block this write?
        let mut present = false;
        if let Some(idx) = existing {
            let node = self.node(idx);
            if let Some(v) = opts.version
                && v < node.version
            {
                self.counters.stale_writes += 1;
                return Ok(WriteOutcome::Stale);
            }
            present = !node.tombstone;
        }
        match opts.condition {
            Condition::Always => {}
            Condition::IfAbsent if present => return Ok(WriteOutcome::ConditionNotMet),
            Condition::IfPresent if !present => return Ok(WriteOutcome::ConditionNotMet),
            Condition::IfAbsent | Condition::IfPresent => {}
        }

        // A write that is dead on arrival deletes the key, as Redis does for an expiry in the
        // past; a versioned one leaves a tombstone so older writes stay out.
        if let Some(at) = opts.expires_at
            && at <= now.get()
        {
            let _deleted = self.delete_inner(
                hash,
                key,
                existing,
                opts.version,
                &mut now,
                tombstone_ttl_ms,
            );
            return Ok(WriteOutcome::Stored);
        }
        let expires_at = opts.expires_at.unwrap_or(NEVER);
        let version = opts.version.unwrap_or(0);

        match existing {
            Some(idx) => {
                let old_charge = self.node(idx).charge(&self.large);
                let grow = charge.saturating_sub(old_charge);
                if !self.evict && !self.fits(grow, 0) {
                    return Err(InsertError::OutOfMemory {
                        used: self.used_bytes,
                        capacity: self.capacity,
                    });
                }
                if present {
                    self.counters.updates += 1;
                } else {
                    self.counters.inserts += 1;
                }
                self.rewrite(idx, key, value, expires_at, version, false);
                self.promote(idx);
                self.evict_until_fits(0, 0, idx);
            }
            None => {
                if !self.evict && !self.fits(charge, 1) {
                    return Err(InsertError::OutOfMemory {
                        used: self.used_bytes,
                        capacity: self.capacity,
                    });
                }
                self.evict_until_fits(charge, 1, NIL);
                self.insert_node(hash, key, value, expires_at, version, false);
                self.counters.inserts += 1;
            }
        }
        Ok(WriteOutcome::Stored)
    }

    /// Deletes `key`. Unversioned (`version == None`): removes it outright. Versioned: refuses
    /// if a newer version is stored, else leaves a tombstone for `tombstone_ttl_ms`.
    pub(crate) fn delete<C: Clock>(
        &mut self,
        hash: u64,
        key: &[u8],
        version: Option<u64>,
        clock: &C,
        tombstone_ttl_ms: u64,
    ) -> DeleteOutcome {
        let mut now = Now::new(clock);
        let existing = self.find_settled(hash, key, &mut now);
        if let (Some(idx), Some(v)) = (existing, version) {
            let node = self.node(idx);
            if v < node.version {
                self.counters.stale_writes += 1;
                return DeleteOutcome::Stale;
            }
        }
        self.delete_inner(hash, key, existing, version, &mut now, tombstone_ttl_ms)
    }

    /// The part of a delete after the version check.
    fn delete_inner<C: Clock>(
        &mut self,
        hash: u64,
        key: &[u8],
        existing: Option<u32>,
        version: Option<u64>,
        now: &mut Now<'_, C>,
        tombstone_ttl_ms: u64,
    ) -> DeleteOutcome {
        let mut outcome = DeleteOutcome::NotFound;
        if let Some(idx) = existing
            && !self.node(idx).tombstone
        {
            self.counters.deletes += 1;
            outcome = DeleteOutcome::Deleted;
        }
        let Some(version) = version else {
            if let Some(idx) = existing {
                self.remove_node(idx);
            }
            return outcome;
        };
        let expires_at = now.get().saturating_add(tombstone_ttl_ms);
        match existing {
            // A tombstone is never larger than what it replaces, so it always fits.
            Some(idx) => {
                self.rewrite(idx, key, &[], expires_at, version, true);
                self.promote(idx);
            }
            None => {
                let charge = entry_charge(key.len(), 0);
                // With eviction disabled and no room, or a key too large for any shard, the
                // tombstone is skipped: the key is absent either way, only the protection
                // against older replicated writes is lost.
                if charge > self.capacity || (!self.evict && !self.fits(charge, 1)) {
                    return outcome;
                }
                self.evict_until_fits(charge, 1, NIL);
                self.insert_node(hash, key, &[], expires_at, version, true);
            }
        }
        outcome
    }

    /// Sets (`Some`) or removes (`None`) the expiry of a live value. An expiry in the past
    /// deletes it. Returns whether the key held a live value.
    pub(crate) fn touch<C: Clock>(
        &mut self,
        hash: u64,
        key: &[u8],
        expires_at: Option<u64>,
        clock: &C,
    ) -> bool {
        let mut now = Now::new(clock);
        let Some(idx) = self.find_settled(hash, key, &mut now) else {
            return false;
        };
        let node = self.node(idx);
        if node.tombstone {
            return false;
        }
        match expires_at {
            Some(at) if at <= now.get() => {
                self.remove_node(idx);
                self.counters.deletes += 1;
            }
            _ => {
                let was_expiring = node.expires_at != NEVER;
                let new_at = expires_at.unwrap_or(NEVER);
                self.node_mut(idx).expires_at = new_at;
                match (was_expiring, new_at != NEVER) {
                    (false, true) => self.expiring += 1,
                    (true, false) => self.expiring -= 1,
                    _ => {}
                }
                self.promote(idx);
            }
        }
        true
    }

    /// A read that also reports tombstones (and expired versioned values, which are
    /// tombstones until their grace ends) with their version. Counts a hit or a miss; a
    /// live hit becomes the most recently used entry.
    /// `use_it`: a lookup that counts (hit/miss counters, LRU promotion); `false` for a
    /// peek that leaves both unchanged.
    pub(crate) fn get_versioned<C: Clock>(
        &mut self,
        hash: u64,
        key: &[u8],
        clock: &C,
        use_it: bool,
    ) -> Option<VersionedRead> {
        let mut now = Now::new(clock);
        let Some(idx) = self.find_settled(hash, key, &mut now) else {
            if use_it {
                self.counters.misses += 1;
            }
            return None;
        };
        let node = self.node(idx);
        if node.tombstone {
            let version = node.version;
            if use_it {
                self.counters.misses += 1;
            }
            return Some(VersionedRead::Dead { version });
        }
        let lookup = Lookup {
            value: node.value(&self.arena, &self.large),
            version: node.version,
            expires_at: (node.expires_at != NEVER).then_some(node.expires_at),
        };
        if use_it {
            self.promote(idx);
            self.counters.hits += 1;
        }
        Some(VersionedRead::Live(lookup))
    }

    /// Sets the expiry of a live value and stamps it with `version`, atomically (one lock):
    /// refused as stale if a newer version is stored. An expiry in the past deletes the key
    /// (a versioned tombstone).
    pub(crate) fn touch_versioned<C: Clock>(
        &mut self,
        hash: u64,
        key: &[u8],
        expires_at: Option<u64>,
        version: u64,
        clock: &C,
    ) -> TouchOutcome {
        let mut now = Now::new(clock);
        let Some(idx) = self.find_settled(hash, key, &mut now) else {
            return TouchOutcome::NotFound;
        };
        let node = self.node(idx);
        if node.tombstone {
            return TouchOutcome::NotFound;
        }
        if version < node.version {
            self.counters.stale_writes += 1;
            return TouchOutcome::Stale;
        }
        if let Some(at) = expires_at
            && at <= now.get()
        {
            let ttl = self.tombstone_ttl_ms;
            let _ = self.delete_inner(hash, key, Some(idx), Some(version), &mut now, ttl);
            return TouchOutcome::Deleted;
        }
        let value = node.value(&self.arena, &self.large);
        let was_expiring = node.expires_at != NEVER;
        let new_at = expires_at.unwrap_or(NEVER);
        let node = self.node_mut(idx);
        node.expires_at = new_at;
        node.version = version;
        match (was_expiring, new_at != NEVER) {
            (false, true) => self.expiring += 1,
            (true, false) => self.expiring -= 1,
            _ => {}
        }
        self.promote(idx);
        TouchOutcome::Touched(Lookup {
            value,
            version,
            expires_at,
        })
    }

    /// The expiry of a live value without touching its LRU position: `None` if absent,
    /// `Some(None)` if it never expires.
    pub(crate) fn expiry<C: Clock>(
        &mut self,
        hash: u64,
        key: &[u8],
        clock: &C,
    ) -> Option<Option<u64>> {
        let mut now = Now::new(clock);
        let idx = self.find(hash, key)?;
        let node = self.node(idx);
        if node.tombstone || node.is_expired(&mut now) {
            return None;
        }
        Some((node.expires_at != NEVER).then_some(node.expires_at))
    }

    /// One bounded step of the expiry sweep: examines at most `budget` slots from where the
    /// last step stopped and frees the expired entries and tombstones among them.
    pub(crate) fn reap_step<C: Clock>(&mut self, budget: usize, clock: &C) -> ReapStep {
        let mut step = ReapStep::default();
        if self.expiring == 0 {
            self.reap_cursor = 0;
            step.pass_complete = true;
            return step;
        }
        let now = clock.now_ms();
        let end = self.slots.len();
        let mut cursor = self.reap_cursor as usize;
        while step.visited < budget && cursor < end {
            if let Slot::Occupied(node) = &self.slots[cursor]
                && node.expires_at != NEVER
                && node.expires_at <= now
            {
                let mut now = Now::new(clock);
                // A versioned value becomes a tombstone (its bytes are freed all the same).
                let _ = self.settle(cursor as u32, &mut now);
                step.reclaimed += 1;
            }
            cursor += 1;
            step.visited += 1;
        }
        if cursor >= end {
            cursor = 0;
            step.pass_complete = true;
        }
        self.reap_cursor = cursor as u32;
        step
    }

    /// Live values in slots `from..` examining at most `budget` slots. Returns the entries and
    /// the slot to resume from (`None` when the shard is done).
    pub(crate) fn scan<C: Clock>(
        &self,
        from: usize,
        budget: usize,
        clock: &C,
        out: &mut Vec<Entry>,
    ) -> Option<usize> {
        let mut now = Now::new(clock);
        let end = self.slots.len().min(from.saturating_add(budget.max(1)));
        for slot in self.slots.get(from..end).unwrap_or_default() {
            if let Slot::Occupied(node) = slot
                && !node.tombstone
                && !node.is_expired(&mut now)
            {
                out.push(Entry {
                    key: node.key_bytes(&self.arena, &self.large),
                    value: node.value(&self.arena, &self.large),
                    version: node.version,
                    expires_at: (node.expires_at != NEVER).then_some(node.expires_at),
                });
            }
        }
        (end < self.slots.len()).then_some(end)
    }

    /// Like [`Shard::scan`] for anti-entropy: every versioned entry's key and version, live
    /// or dead, classified as [`Shard::get_versioned`] would (an expired versioned value is
    /// dead at its version until its tombstone time runs out; an expired tombstone and an
    /// unversioned entry are left out). Changes nothing.
    pub(crate) fn scan_versions<C: Clock>(
        &self,
        from: usize,
        budget: usize,
        clock: &C,
        out: &mut Vec<KeyVersion>,
    ) -> Option<usize> {
        let mut now = Now::new(clock);
        let end = self.slots.len().min(from.saturating_add(budget.max(1)));
        for slot in self.slots.get(from..end).unwrap_or_default() {
            let Slot::Occupied(node) = slot else {
                continue;
            };
            if node.version == 0 {
                continue;
            }
            let live = if !node.is_expired(&mut now) {
                !node.tombstone
            } else if node.tombstone
                || now.get()
                    >= node
                        .expires_at
                        .saturating_add(self.tombstone_ttl_ms)
                        .min(NEVER - 1)
            {
                continue;
            } else {
                false
            };
            out.push(KeyVersion {
                key: node.key_bytes(&self.arena, &self.large),
                version: node.version,
                live,
                value_len: if live {
                    node.entry(&self.arena, &self.large).1.len()
                } else {
                    0
                },
            });
        }
        (end < self.slots.len()).then_some(end)
    }

    /// Drops every entry (counters other than sizes are kept).
    pub(crate) fn clear(&mut self) {
        self.slots = Vec::new();
        self.arena.clear();
        self.large = Vec::new();
        self.large_free = Vec::new();
        self.large_bytes = 0;
        self.index = HashTable::new();
        self.free_head = NIL;
        self.head = NIL;
        self.tail = NIL;
        self.hand = NIL;
        self.used_bytes = 0;
        self.items = 0;
        self.tombstones = 0;
        self.expiring = 0;
        self.reap_cursor = 0;
    }

    /// Keys from most to least recently used, tombstones and expired entries included.
    #[cfg(any(test, feature = "model"))]
    pub(crate) fn keys_mru_to_lru(&self) -> Vec<Vec<u8>> {
        let mut keys = Vec::new();
        let mut idx = self.head;
        while idx != NIL {
            keys.push(self.key(idx).to_vec());
            idx = self.node(idx).next;
        }
        keys
    }

    /// Checks every invariant of the shard; `Err` names the first one broken.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let occupied = self
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::Occupied(_)))
            .count();
        // The LRU list: well linked, acyclic, covering every occupied slot.
        let mut seen = 0usize;
        let mut prev = NIL;
        let mut idx = self.head;
        while idx != NIL {
            if seen > occupied {
                return Err("LRU list has a cycle or more nodes than occupied slots".into());
            }
            let Some(Slot::Occupied(node)) = self.slots.get(idx as usize) else {
                return Err(format!(
                    "LRU list reaches slot {idx}, which is not occupied"
                ));
            };
            if node.prev != prev {
                return Err(format!(
                    "slot {idx}: prev is {} but the list came from {prev}",
                    node.prev
                ));
            }
            prev = idx;
            idx = node.next;
            seen += 1;
        }
        if self.tail != prev {
            return Err(format!("tail is {} but the list ends at {prev}", self.tail));
        }
        // SIEVE's hand points at a listed entry (or nowhere); LRU never uses it.
        if self.hand != NIL
            && (self.policy == EvictionPolicy::Lru
                || !matches!(self.slots.get(self.hand as usize), Some(Slot::Occupied(_))))
        {
            return Err(format!(
                "hand at slot {}, which is not a listed entry",
                self.hand
            ));
        }
        if seen != occupied {
            return Err(format!(
                "LRU list has {seen} nodes but {occupied} slots are occupied"
            ));
        }
        // The free list: only vacant slots, acyclic, covering every vacant slot.
        let mut free = 0usize;
        let mut idx = self.free_head;
        while idx != NIL {
            if free > self.slots.len() - occupied {
                return Err("free list has a cycle".into());
            }
            match self.slots.get(idx as usize) {
                Some(Slot::Vacant { next_free }) => idx = *next_free,
                _ => return Err(format!("free list reaches slot {idx}, which is not vacant")),
            }
            free += 1;
        }
        if free + occupied != self.slots.len() {
            return Err(format!(
                "{free} free + {occupied} occupied != {} slots",
                self.slots.len()
            ));
        }
        // The index agrees with the slab.
        if self.index.len() != occupied {
            return Err(format!(
                "index has {} entries, slab {occupied}",
                self.index.len()
            ));
        }
        let (mut bytes, mut items, mut tombstones, mut expiring) = (0u64, 0u64, 0u64, 0u64);
        let (mut chunks, mut large) = (Vec::new(), 0usize);
        for (i, slot) in self.slots.iter().enumerate() {
            let Slot::Occupied(node) = slot else { continue };
            let key = node.key(&self.arena, &self.large);
            let hash = self.hasher.hash_one(key);
            if self.find(hash, key) != Some(i as u32) {
                return Err(format!("slot {i} is not found through the index"));
            }
            if node.visited && self.policy == EvictionPolicy::Lru {
                return Err(format!("slot {i}: visited under LRU"));
            }
            if node.class == LARGE {
                let data = self.large.get(node.loc as usize).map_or(0, Bytes::len);
                if data < LARGE_HEADER
                    || large_parts(&self.large[node.loc as usize]).0 > data - LARGE_HEADER
                {
                    return Err(format!(
                        "slot {i}: large entry of {data} bytes, its key length beyond it"
                    ));
                }
                large += 1;
            } else {
                // The arena checks each chunk's header (`Arena::validate` below).
                if self.arena.owner(node.loc, node.class) != i as u32 {
                    return Err(format!("slot {i}: its chunk names another owner"));
                }
                chunks.push((node.loc, node.class));
            }
            bytes += node.charge(&self.large);
            if node.tombstone {
                tombstones += 1;
                if node.expires_at == NEVER {
                    return Err(format!("slot {i}: tombstone without expiry"));
                }
            } else {
                items += 1;
            }
            if node.expires_at != NEVER {
                expiring += 1;
            }
        }
        if (bytes, items, tombstones, expiring)
            != (self.used_bytes, self.items, self.tombstones, self.expiring)
        {
            return Err(format!(
                "accounting: counted (bytes {bytes}, items {items}, tombstones {tombstones}, expiring {expiring}) \
                 but the shard says ({}, {}, {}, {})",
                self.used_bytes, self.items, self.tombstones, self.expiring
            ));
        }
        self.arena.validate(&chunks)?;
        let large_bytes: usize = (self.large.iter())
            .filter(|b| !b.is_empty())
            .map(|b| b.len() + BYTES_SHARED_HEADER)
            .sum();
        if large_bytes != self.large_bytes {
            return Err(format!(
                "large entries hold {large_bytes} bytes, counted {}",
                self.large_bytes
            ));
        }
        if large + self.large_free.len() != self.large.len() {
            return Err(format!(
                "{large} large entries + {} free != {}",
                self.large_free.len(),
                self.large.len()
            ));
        }
        if self.used_bytes > self.capacity {
            return Err(format!(
                "{} bytes used over a capacity of {}",
                self.used_bytes, self.capacity
            ));
        }
        if self.items + self.tombstones > self.max_items {
            return Err(format!(
                "{} entries over a cap of {}",
                self.items + self.tombstones,
                self.max_items
            ));
        }
        Ok(())
    }
}
