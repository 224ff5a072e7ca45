//! One shard: an exact LRU over entries stored as arena chunks linked by `u32` handles,
//! indexed by a `hashbrown::HashTable<u32>`.
//!
//! This module owns every invariant of the engine's memory layout and accounting; the
//! [`Cache`](crate::Cache) only picks a shard and takes its lock. It never does I/O, never
//! reads the clock unless an entry with an expiry is involved, and never holds more than the
//! one lock its caller took.
//!
//! Layout: every entry is one chunk of the shard's [`Arena`] — a 24-byte header (`prev`,
//! `next`, `version`, `meta`) followed by the key and the value (see `arena.rs`). The
//! header's `prev`/`next` are chunk handles: the intrusive doubly linked LRU list (`head` is
//! the most recently used, `tail` the least). The index maps a key's hash to its chunk. An
//! entry too large for any chunk (over 1 000 bytes of key and value) keeps its bytes in one
//! `Bytes` in `large` and a 32-byte chunk holding its header and that buffer's number.
//!
//! A chunk can move: when the arena gives a page back it moves the page's live chunks
//! elsewhere, and a rewrite to a different size class takes a new chunk. After every move
//! [`Shard::moved`] repoints the neighbours' links, `head`/`tail`, SIEVE's hand and the index
//! entry. Code that holds a handle across an operation that frees chunks follows it through
//! `tracked`.
//!
//! `meta` packs, from the lowest bit: the expiry (41 bits after the shard's `base_ms`:
//! milliseconds, or seconds above [`E_SECONDS`]; all ones for "never"), the key's and the value's lengths (10 bits each; a
//! chunk is at most 1 KiB), and the tombstone, visited (SIEVE) and large flags. An entry's
//! `meta` is never 0, which is how the arena tells a free chunk.

use bytes::Bytes;
use hashbrown::HashTable;

use crate::arena::{self, Arena, HEADER_BYTES};
use crate::clock::Clock;
use crate::config::EvictionPolicy;
use crate::error::InsertError;
use crate::{
    Condition, DeleteOutcome, Entry, KeyVersion, Lookup, TouchOutcome, VersionedRead, WriteOptions,
    WriteOutcome,
};

/// The "no link" value of `prev`, `next`, `head`, `tail`, `hand` and `tracked`.
const NIL: u32 = u32::MAX;

/// `expires_at` of an entry that never expires.
pub(crate) const NEVER: u64 = u64::MAX;

/// Size of the `bytes` crate's shared header (buffer pointer, capacity, refcount), allocated
/// once per large entry when its buffer is made shareable at insert time.
const BYTES_SHARED_HEADER: usize = 24;

/// Bytes of hash index per entry: a `u32` chunk handle plus one control byte, at hashbrown's
/// maximum load factor of 7/8, rounded up.
const INDEX_BYTES_PER_ENTRY: usize = 8;

/// Bytes at the start of a large entry's buffer: the key's length (`u32`).
const LARGE_HEADER: usize = 4;

/// Bytes charged for a large entry beyond its key, value and chunk: its `Bytes` handle in
/// `Shard::large`, the buffer's shared header and its length header.
const LARGE_EXTRA: usize = std::mem::size_of::<Bytes>() + BYTES_SHARED_HEADER + LARGE_HEADER;

/// The most bytes charged per small entry (key and value up to 104 bytes together) on top of
/// its key and value: the chunk's header, at most 7 bytes of size-class rounding, and the
/// index. Larger entries are charged their size class (at most 25 % above their size, up to
/// 1 KiB) or, above that, their bytes plus a 32-byte chunk, a `Bytes` handle and header; see
/// [`entry_charge`]. `benches/engine_report.rs` measures the real figure.
pub const ENTRY_OVERHEAD: usize = HEADER_BYTES + 7 + INDEX_BYTES_PER_ENTRY;

/// Largest key plus value kept inline in a chunk.
const MAX_INLINE: usize = arena::MAX_CHUNK - HEADER_BYTES;

// Lengths of inline entries fit their 10-bit fields.
const _: () = assert!(MAX_INLINE < 1 << LEN_BITS);

const EXPIRY_BITS: u32 = 41;
const LEN_BITS: u32 = 10;
/// The expiry code for "never".
const E_NEVER: u64 = (1 << EXPIRY_BITS) - 1;
const KLEN_SHIFT: u32 = EXPIRY_BITS;
const VLEN_SHIFT: u32 = EXPIRY_BITS + LEN_BITS;
const LEN_MASK: u64 = (1 << LEN_BITS) - 1;
const TOMBSTONE: u64 = 1 << 61;
const VISITED: u64 = 1 << 62;
const LARGE: u64 = 1 << 63;

/// How far before the shard's creation its expiry codes start: a wall clock stepped back by
/// up to this much (~8.7 years) still encodes exactly.
const BASE_MARGIN_MS: u64 = 1 << 38;

/// Expiry codes below this count milliseconds after the base (exact for ~26 years after the
/// shard's creation); codes with this bit set count whole seconds (rounded up, so an entry
/// never expires early) for ~34 800 years more. A later expiry is stored as that limit.
const E_SECONDS: u64 = 1 << (EXPIRY_BITS - 1);

/// Bytes an entry with a `key_len`-byte key and a `value_len`-byte value is charged against
/// the memory limit: what the engine really holds for it (its chunk, or its chunk and buffer,
/// and its share of the index).
pub fn entry_charge(key_len: usize, value_len: usize) -> u64 {
    let data = key_len.saturating_add(value_len);
    charge_for(layout(data), data)
}

/// Where `data_len` bytes of key and value go: the chunk class, and whether they live in a
/// buffer of their own (`true`) rather than inline.
fn layout(data_len: usize) -> (u8, bool) {
    match arena::class_for(HEADER_BYTES.saturating_add(data_len)) {
        Some(class) => (class, false),
        None => (large_class(), true),
    }
}

/// The chunk class of a large entry: its header and the buffer's number.
fn large_class() -> u8 {
    arena::class_for(HEADER_BYTES + 4).unwrap_or(0)
}

fn charge_for((class, large): (u8, bool), data_len: usize) -> u64 {
    let mut stored = arena::class_size(class) + INDEX_BYTES_PER_ENTRY;
    if large {
        stored = stored.saturating_add(data_len.saturating_add(LARGE_EXTRA));
    }
    stored as u64
}

/// One entry's header, decoded.
#[derive(Debug, Clone, Copy)]
struct Node {
    /// Absolute expiry in unix milliseconds, [`NEVER`] for none. Tombstones always expire.
    expires_at: u64,
    /// Caller-supplied version; higher wins. `0` for unversioned writes.
    version: u64,
    /// Towards the head (more recently used); [`NIL`] at the head.
    prev: u32,
    /// Towards the tail (less recently used); [`NIL`] at the tail.
    next: u32,
    /// A tombstone reads as absent but still blocks older versioned writes.
    tombstone: bool,
    /// SIEVE's bit: used since the hand last passed (always `false` under LRU).
    visited: bool,
    /// Key and value are in `Shard::large`, not inline.
    large: bool,
}

impl Node {
    fn is_expired(&self, now: &mut Now<'_, impl Clock>) -> bool {
        self.expires_at != NEVER && now.get() >= self.expires_at
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

/// The number of a large entry's buffer, stored in its chunk.
fn large_index(arena: &Arena, h: u32) -> usize {
    let d = arena.data(h);
    u32::from_le_bytes([d[0], d[1], d[2], d[3]]) as usize
}

/// The key and the value of the entry in chunk `h`, wherever they are stored.
fn entry_in<'a>(arena: &'a Arena, large: &'a [Bytes], h: u32) -> (&'a [u8], &'a [u8]) {
    let meta = arena.meta(h);
    if meta & LARGE != 0 {
        let (k, rest) = large_parts(&large[large_index(arena, h)]);
        rest.split_at(k)
    } else {
        let k = ((meta >> KLEN_SHIFT) & LEN_MASK) as usize;
        let v = ((meta >> VLEN_SHIFT) & LEN_MASK) as usize;
        let (key, rest) = arena.data(h).split_at(k);
        (key, &rest[..v])
    }
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

/// A digest of a value, for breaking ties between different writes that carry the same
/// version: FNV-1a, fixed on every platform and process (ahash is seeded per process).
pub(crate) fn content_digest(value: &[u8]) -> u64 {
    value.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Whether a versioned write of `value` loses to a stored entry of the same version
/// (`stored_tombstone`, `stored_value`): equal versions should be one write delivered
/// twice, but if two writes ever share a version every replica must keep the same one,
/// whatever order they arrived in — so a delete wins, then the larger [`content_digest`].
/// The same write again does not lose (it rewrites what is there).
pub(crate) fn loses_tie(value: &[u8], stored_tombstone: bool, stored_value: &[u8]) -> bool {
    stored_tombstone || content_digest(value) < content_digest(stored_value)
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
    /// Chunks examined (at most the budget).
    pub visited: usize,
    /// Expired entries and tombstones removed.
    pub reclaimed: usize,
    /// True when the sweep reached the end of the shard's pages and starts over next time.
    pub pass_complete: bool,
}

/// The relocation log that makes scans complete.
///
/// A scan walks chunk positions, and chunks move (a page given back, a rewrite into another
/// size class): an entry carried from ahead of a scan's cursor to behind it would be missed.
/// So while any scan is registered on the shard, [`Shard::moved`] appends every
/// relocation's destination here, and each scan, after its walk, replays the log from the
/// point where it registered up to the log's end. An entry present for the whole scan is
/// then returned at least once: either the walk found it where it was, or it moved behind
/// the cursor, and its last move before the replay reached the log's end is in the log
/// with the chunk it is in. A logged chunk that was freed or reused since is skipped or
/// returns another live entry, which is harmless (a scan may return an entry twice).
///
/// Costs: one branch per relocation when no scan runs; 4 bytes per relocation while one
/// does, released when the oldest scan still registered ends.
#[derive(Debug, Default)]
pub(crate) struct ScanLog {
    /// Sequence number of `moved[0]`.
    base: u64,
    /// Each relocated entry's new chunk, in order, since the oldest registered scan began.
    moved: Vec<u32>,
    /// Where each registered scan's replay starts (one element per scan under way here).
    active: Vec<u64>,
}

impl ScanLog {
    /// The sequence number the next relocation gets.
    fn end(&self) -> u64 {
        self.base + self.moved.len() as u64
    }
}

/// One shard of the cache. See the module docs for the layout.
pub(crate) struct Shard {
    /// Every entry's chunk.
    arena: Arena,
    /// Key and value of each large entry; freed entries are empty.
    large: Vec<Bytes>,
    /// Free indices in `large`.
    large_free: Vec<u32>,
    /// Bytes of the buffers in `large`, shared headers included.
    large_bytes: usize,
    /// Key hash -> chunk handle.
    index: HashTable<u32>,
    /// Most recently used entry, or [`NIL`] when empty.
    head: u32,
    /// Least recently used entry (next to be evicted), or [`NIL`] when empty.
    tail: u32,
    /// A handle an operation holds across frees; [`Shard::moved`] keeps it current.
    tracked: u32,
    /// Sum of the charges of all entries.
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
    /// Entries holding values (not tombstones), expired or not.
    items: u64,
    /// Entries holding tombstones.
    tombstones: u64,
    /// Entries with an expiry; when 0 the reaper has nothing to do here.
    expiring: u64,
    /// Where the reaper's sweep resumes (a chunk position, see [`Arena::live_at`]).
    reap_cursor: usize,
    /// While a reaper step settles an entry: the sweep's position.
    reaping_at: Option<usize>,
    /// An entry with an expiry moved behind the sweep during this pass: the pass goes again
    /// before it reports itself complete.
    reap_missed: bool,
    /// Expiry codes count milliseconds from here (see [`BASE_MARGIN_MS`]).
    base_ms: u64,
    /// Where entries went that moved while scans were under way, so that every scan sees
    /// them (see [`ScanLog`]).
    scan_log: ScanLog,
    /// Re-hashes keys when the index grows or a chunk moves; the same hasher the cache uses
    /// to pick the shard.
    hasher: ahash::RandomState,
    pub(crate) counters: ShardCounters,
}

impl Shard {
    /// A shard; `now_ms` is the clock's reading at creation (expiry codes start
    /// [`BASE_MARGIN_MS`] before it).
    pub(crate) fn new(
        capacity: u64,
        max_items: u64,
        evict: bool,
        policy: EvictionPolicy,
        tombstone_ttl_ms: u64,
        hasher: ahash::RandomState,
        now_ms: u64,
    ) -> Self {
        Self {
            tombstone_ttl_ms,
            arena: Arena::new(),
            large: Vec::new(),
            large_free: Vec::new(),
            large_bytes: 0,
            index: HashTable::new(),
            head: NIL,
            tail: NIL,
            tracked: NIL,
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
            reaping_at: None,
            reap_missed: false,
            base_ms: now_ms.saturating_sub(BASE_MARGIN_MS),
            scan_log: ScanLog::default(),
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

    /// Bytes this shard really holds: index, arena pages and tables, and large entries'
    /// buffers and handles. Differs from `used_bytes` by the slack the charges do not see
    /// (free chunks, index growth room); see `docs/why/lru.md`.
    pub(crate) fn footprint(&self) -> u64 {
        let index_buckets = match self.index.capacity() {
            0 => 0,
            c => (c * 8 / 7).next_power_of_two(),
        };
        (index_buckets * (4 + 1)
            + self.arena.footprint()
            + self.large_bytes
            + self.large.capacity() * std::mem::size_of::<Bytes>()
            + self.large_free.capacity() * 4) as u64
    }

    // ----- headers ------------------------------------------------------------------------

    /// The 41-bit code of absolute expiry `at` (see [`E_SECONDS`]); never 0.
    fn encode_expiry(&self, at: u64) -> u64 {
        if at == NEVER {
            return E_NEVER;
        }
        let ms = at.saturating_sub(self.base_ms).max(1);
        if ms < E_SECONDS {
            ms
        } else {
            E_SECONDS | ms.div_ceil(1000).min(E_SECONDS - 2)
        }
    }

    /// The absolute expiry a code stands for.
    fn decode_expiry(&self, code: u64) -> u64 {
        if code == E_NEVER {
            NEVER
        } else if code & E_SECONDS != 0 {
            self.base_ms + (code & !E_SECONDS) * 1000
        } else {
            self.base_ms + code
        }
    }

    fn node(&self, h: u32) -> Node {
        let meta = self.arena.meta(h);
        Node {
            expires_at: self.decode_expiry(meta & E_NEVER),
            version: self.arena.version(h),
            prev: self.arena.prev(h),
            next: self.arena.next(h),
            tombstone: meta & TOMBSTONE != 0,
            visited: meta & VISITED != 0,
            large: meta & LARGE != 0,
        }
    }

    /// Writes `node`'s header into chunk `h`; `inline` is the key's and value's lengths of
    /// an inline entry (ignored for a large one).
    fn write_node(&mut self, h: u32, node: &Node, inline: (usize, usize)) {
        let mut meta = self.encode_expiry(node.expires_at);
        if node.large {
            meta |= LARGE;
        } else {
            meta |= (inline.0 as u64) << KLEN_SHIFT | (inline.1 as u64) << VLEN_SHIFT;
        }
        if node.tombstone {
            meta |= TOMBSTONE;
        }
        if node.visited {
            meta |= VISITED;
        }
        self.arena.set_prev(h, node.prev);
        self.arena.set_next(h, node.next);
        self.arena.set_version(h, node.version);
        self.arena.set_meta(h, meta);
    }

    fn set_expiry(&mut self, h: u32, at: u64) {
        let meta = self.arena.meta(h) & !E_NEVER;
        let code = self.encode_expiry(at);
        self.arena.set_meta(h, meta | code);
    }

    fn set_visited(&mut self, h: u32, visited: bool) {
        let meta = self.arena.meta(h);
        let meta = if visited {
            meta | VISITED
        } else {
            meta & !VISITED
        };
        self.arena.set_meta(h, meta);
    }

    /// The key and the value of entry `h`.
    fn entry(&self, h: u32) -> (&[u8], &[u8]) {
        entry_in(&self.arena, &self.large, h)
    }

    /// The key of entry `h`.
    fn key(&self, h: u32) -> &[u8] {
        self.entry(h).0
    }

    /// The key as `Bytes`: a slice of a large entry's buffer, a copy of a small one's.
    fn key_bytes(&self, h: u32) -> Bytes {
        if self.arena.meta(h) & LARGE != 0 {
            let buf = &self.large[large_index(&self.arena, h)];
            let (k, _) = large_parts(buf);
            buf.slice(LARGE_HEADER..LARGE_HEADER + k)
        } else {
            Bytes::copy_from_slice(self.key(h))
        }
    }

    /// The value: a slice of a large entry's buffer (no copy), a copy of a small one's (a few
    /// nanoseconds for a value of up to 1 KiB, against microseconds for a request).
    fn value(&self, h: u32) -> Bytes {
        if self.arena.meta(h) & LARGE != 0 {
            let buf = &self.large[large_index(&self.arena, h)];
            let (k, _) = large_parts(buf);
            buf.slice(LARGE_HEADER + k..)
        } else {
            Bytes::copy_from_slice(self.entry(h).1)
        }
    }

    /// Bytes entry `h` is charged against the shard's budget.
    fn charge(&self, h: u32) -> u64 {
        if self.arena.meta(h) & LARGE != 0 {
            let data = self.large[large_index(&self.arena, h)].len() - LARGE_HEADER;
            charge_for((large_class(), true), data)
        } else {
            charge_for((self.arena.class_of(h), false), 0)
        }
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<u32> {
        let (arena, large) = (&self.arena, &self.large);
        self.index
            .find(hash, |&h| entry_in(arena, large, h).0 == key)
            .copied()
    }

    // ----- storage ------------------------------------------------------------------------

    /// Stores a large entry's bytes; returns its number in `large`.
    fn store_large(&mut self, key: &[u8], value: &[u8]) -> u32 {
        let data = entry_buffer(key, value);
        self.large_bytes += data.len() + BYTES_SHARED_HEADER;
        match self.large_free.pop() {
            Some(i) => {
                self.large[i as usize] = data;
                i
            }
            None => {
                self.large.push(data);
                (self.large.len() - 1) as u32
            }
        }
    }

    fn release_large(&mut self, i: usize) {
        let data = std::mem::take(&mut self.large[i]);
        self.large_bytes -= data.len() + BYTES_SHARED_HEADER;
        self.large_free.push(i as u32);
    }

    /// A chunk of `class`. The configuration bounds a shard's budget to what its page
    /// numbers address (see `CacheConfig::validate`), and charges count whole chunks, so the
    /// arena cannot run out of pages before the budget runs out.
    fn alloc(&mut self, class: u8) -> u32 {
        self.arena
            .alloc(class)
            .expect("a shard's budget fits in its page numbers")
    }

    /// Frees chunk `h` (already unlinked and unindexed) and follows every chunk the arena
    /// moves to give a page back.
    fn free_chunk(&mut self, h: u32) {
        if let Some(mut release) = self.arena.free(h) {
            while let Some((from, to)) = self.arena.move_one(&mut release) {
                self.moved(from, to);
            }
        }
    }

    /// The entry in chunk `from` now lives in chunk `to` (header and bytes copied): points
    /// its neighbours, the list ends, the hand, `tracked` and the index at `to`.
    fn moved(&mut self, from: u32, to: u32) {
        if !self.scan_log.active.is_empty() {
            self.scan_log.moved.push(to);
        }
        let (prev, next) = (self.arena.prev(to), self.arena.next(to));
        self.join(prev, to, to, next);
        if self.hand == from {
            self.hand = to;
        }
        if self.tracked == from {
            self.tracked = to;
        }
        if let Some(pos) = self.reaping_at
            && (to as usize) < pos
            && self.arena.meta(to) & E_NEVER != E_NEVER
        {
            self.reap_missed = true;
        }
        let hash = self.hasher.hash_one(self.key(to));
        if let Some(slot) = self.index.find_mut(hash, |&h| h == from) {
            *slot = to;
        }
    }

    // ----- list primitives ----------------------------------------------------------------

    /// Points `prev`'s next link at `after_prev` and `next`'s prev link at `before_next`
    /// (`head`/`tail` where `prev`/`next` is [`NIL`]).
    fn join(&mut self, prev: u32, after_prev: u32, before_next: u32, next: u32) {
        match prev {
            NIL => self.head = after_prev,
            p => self.arena.set_next(p, after_prev),
        }
        match next {
            NIL => self.tail = before_next,
            n => self.arena.set_prev(n, before_next),
        }
    }

    /// Unlinks `h` from the LRU list (the entry stays in its chunk).
    fn unlink(&mut self, h: u32) {
        let (prev, next) = (self.arena.prev(h), self.arena.next(h));
        self.join(prev, next, prev, next);
    }

    /// Links `h` at the head (most recently used).
    fn push_front(&mut self, h: u32) {
        let old_head = self.head;
        self.arena.set_prev(h, NIL);
        self.arena.set_next(h, old_head);
        self.join(NIL, h, h, old_head);
    }

    fn move_to_front(&mut self, h: u32) {
        if self.head != h {
            self.unlink(h);
            self.push_front(h);
        }
    }

    /// Records a use of `h` (a hit, an overwrite, a touch): under LRU it moves to the head;
    /// under SIEVE it is marked visited and stays where it is.
    fn promote(&mut self, h: u32) {
        match self.policy {
            EvictionPolicy::Lru => self.move_to_front(h),
            EvictionPolicy::Sieve => self.set_visited(h, true),
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
        let mut h = if self.hand == NIL {
            self.tail
        } else {
            self.hand
        };
        let mut steps = 0u64;
        while h != NIL && steps <= 2 * entries {
            steps += 1;
            let prev = self.arena.prev(h);
            let visited = self.arena.meta(h) & VISITED != 0;
            if h != protect && !visited {
                self.hand = prev;
                return Some(h);
            }
            if visited {
                self.set_visited(h, false);
            }
            h = if prev == NIL { self.tail } else { prev };
        }
        None
    }

    /// Adds the per-entry counters (`add`) or removes them.
    fn account(&mut self, charge: u64, tombstone: bool, expiring: bool, add: bool) {
        let delta = |v: &mut u64, d: u64| {
            if add {
                *v += d;
            } else {
                *v -= d;
            }
        };
        delta(&mut self.used_bytes, charge);
        if tombstone {
            delta(&mut self.tombstones, 1);
        } else {
            delta(&mut self.items, 1);
        }
        if expiring {
            delta(&mut self.expiring, 1);
        }
    }

    /// Stores a new entry in a new chunk, links it at the head and indexes it.
    fn insert_node(
        &mut self,
        hash: u64,
        key: &[u8],
        value: &[u8],
        expires_at: u64,
        version: u64,
        tombstone: bool,
    ) -> u32 {
        let (class, large) = layout(key.len() + value.len());
        let h = self.alloc(class);
        if large {
            let i = self.store_large(key, value);
            self.arena.write_data(h, &[&i.to_le_bytes()]);
        } else {
            self.arena.write_data(h, &[key, value]);
        }
        let node = Node {
            expires_at,
            version,
            prev: NIL,
            next: NIL,
            tombstone,
            visited: false,
            large,
        };
        self.write_node(h, &node, (key.len(), value.len()));
        self.account(self.charge(h), tombstone, expires_at != NEVER, true);
        self.push_front(h);
        let (arena, large, hasher) = (&self.arena, &self.large, &self.hasher);
        self.index
            .insert_unique(hash, h, |&i| hasher.hash_one(entry_in(arena, large, i).0));
        h
    }

    /// Unlinks, un-indexes and frees entry `h`; returns whether it held a tombstone.
    fn remove_node(&mut self, h: u32) -> bool {
        let node = self.node(h);
        if self.hand == h {
            self.hand = node.prev;
        }
        self.unlink(h);
        let hash = self.hasher.hash_one(self.key(h));
        if let Ok(entry) = self.index.find_entry(hash, |&i| i == h) {
            entry.remove();
        }
        self.account(
            self.charge(h),
            node.tombstone,
            node.expires_at != NEVER,
            false,
        );
        if node.large {
            self.release_large(large_index(&self.arena, h));
        }
        self.free_chunk(h);
        node.tombstone
    }

    /// Rewrites entry `h` keeping its list position: its bytes go to the same chunk if they
    /// fit its class, else to a new chunk, and the old one is freed. Returns the entry's
    /// handle afterwards. A write then records a use ([`Shard::promote`]); an expiry turning
    /// a value into a tombstone does not.
    fn rewrite(
        &mut self,
        h: u32,
        key: &[u8],
        value: &[u8],
        expires_at: u64,
        version: u64,
        tombstone: bool,
    ) -> u32 {
        let old = self.node(h);
        self.account(
            self.charge(h),
            old.tombstone,
            old.expires_at != NEVER,
            false,
        );
        let (class, large) = layout(key.len() + value.len());
        let target = if class == self.arena.class_of(h) {
            h
        } else {
            self.alloc(class)
        };
        // The bytes: a large entry keeps its buffer number when it stays large.
        let old_large = old.large.then(|| large_index(&self.arena, h));
        match (old_large, large) {
            (Some(i), true) => {
                let data = entry_buffer(key, value);
                self.large_bytes -= self.large[i].len();
                self.large_bytes += data.len();
                self.large[i] = data;
                self.arena.write_data(target, &[&(i as u32).to_le_bytes()]);
            }
            (old_large, true) => {
                if let Some(i) = old_large {
                    self.release_large(i);
                }
                let i = self.store_large(key, value);
                self.arena.write_data(target, &[&i.to_le_bytes()]);
            }
            (old_large, false) => {
                if let Some(i) = old_large {
                    self.release_large(i);
                }
                self.arena.write_data(target, &[key, value]);
            }
        }
        let node = Node {
            expires_at,
            version,
            tombstone,
            large,
            ..old
        };
        self.write_node(target, &node, (key.len(), value.len()));
        self.account(self.charge(target), tombstone, expires_at != NEVER, true);
        if target == h {
            return h;
        }
        // The entry moved: take over the old chunk's place in the list and the index, then
        // free it (which may move chunks again, the new one included).
        self.moved(h, target);
        self.tracked = target;
        self.free_chunk(h);
        std::mem::replace(&mut self.tracked, NIL)
    }

    /// Evicts until `extra_bytes` and `extra_items` more fit. Never evicts `protect` (the
    /// entry being written, already in place); returns its handle afterwards.
    fn evict_until_fits(&mut self, extra_bytes: u64, extra_items: u64, protect: u32) -> u32 {
        self.tracked = protect;
        while self.used_bytes + extra_bytes > self.capacity
            || self.items + self.tombstones + extra_items > self.max_items
        {
            let Some(victim) = self.victim(self.tracked) else {
                break;
            };
            self.remove_node(victim);
            self.counters.evictions += 1;
        }
        std::mem::replace(&mut self.tracked, NIL)
    }

    /// Would an insert of `extra_bytes` / `extra_items` fit without evicting?
    fn fits(&self, extra_bytes: u64, extra_items: u64) -> bool {
        self.used_bytes + extra_bytes <= self.capacity
            && self.items + self.tombstones + extra_items <= self.max_items
    }

    /// Brings entry `h` up to date with the clock and returns its handle if it still
    /// exists: an expired tombstone is freed; an expired value is freed if unversioned, and
    /// otherwise becomes a tombstone at its version until `expires_at + tombstone_ttl`.
    ///
    /// Why: with last-writer-wins replication an expiry is a write like a delete. If the
    /// expired value simply vanished, its version would be lost and an older live copy on
    /// another replica (one that missed the write) would win a versioned read or a repair,
    /// bringing an expired value back.
    fn settle<C: Clock>(&mut self, h: u32, now: &mut Now<'_, C>) -> Option<(u32, Node)> {
        let node = self.node(h);
        if node.expires_at == NEVER || now.get() < node.expires_at {
            return Some((h, node));
        }
        if node.tombstone {
            self.remove_node(h);
            return None;
        }
        self.counters.expirations += 1;
        let dead_until = node
            .expires_at
            .saturating_add(self.tombstone_ttl_ms)
            .min(NEVER - 1);
        if node.version == 0 || now.get() >= dead_until {
            self.remove_node(h);
            return None;
        }
        let h = self.entomb(h, dead_until);
        Some((h, self.node(h)))
    }

    /// Turns the value in entry `h` into a tombstone expiring at `expires_at`, in place
    /// (same list position, same version): frees the value's bytes. Returns its handle.
    fn entomb(&mut self, h: u32, expires_at: u64) -> u32 {
        let key = self.key(h).to_vec();
        let version = self.node(h).version;
        self.rewrite(h, &key, &[], expires_at, version, true)
    }

    /// Finds `key` and settles it (see [`Shard::settle`]): its handle and header.
    fn find_settled<C: Clock>(
        &mut self,
        hash: u64,
        key: &[u8],
        now: &mut Now<'_, C>,
    ) -> Option<(u32, Node)> {
        let h = self.find(hash, key)?;
        self.settle(h, now)
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
        let found = self.find_settled(hash, key, &mut now);
        let existing = found.map(|(h, _)| h);

        // Is there a live value or tombstone, and does it block this write?
        let mut present = false;
        if let Some((h, node)) = found {
            if let Some(v) = opts.version
                && (v < node.version
                    || (v == node.version
                        && v != 0
                        && loses_tie(value, node.tombstone, self.entry(h).1)))
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
                let old_charge = self.charge(idx);
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
                let idx = self.rewrite(idx, key, value, expires_at, version, false);
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
        let found = self.find_settled(hash, key, &mut now);
        let existing = found.map(|(h, _)| h);
        if let (Some((_, node)), Some(v)) = (found, version)
            && v < node.version
        {
            self.counters.stale_writes += 1;
            return DeleteOutcome::Stale;
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
                let idx = self.rewrite(idx, key, &[], expires_at, version, true);
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
        let Some((idx, node)) = self.find_settled(hash, key, &mut now) else {
            return false;
        };
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
                self.set_expiry(idx, new_at);
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
        let (idx, node) = match self.find_live(hash, key, clock, use_it) {
            Ok(found) => found,
            Err(dead) => return dead.map(|version| VersionedRead::Dead { version }),
        };
        let lookup = Lookup {
            value: self.value(idx),
            version: node.version,
            expires_at: (node.expires_at != NEVER).then_some(node.expires_at),
        };
        if use_it {
            self.hit(idx);
        }
        Some(VersionedRead::Live(lookup))
    }

    /// A live value lent to `read` under the lock instead of copied out: the same hit (or
    /// miss) as [`Shard::get`]. See [`Cache::read_with`](crate::Cache::read_with).
    pub(crate) fn read_with<C: Clock, R>(
        &mut self,
        hash: u64,
        key: &[u8],
        clock: &C,
        read: impl FnOnce(&[u8]) -> R,
    ) -> Option<R> {
        let (idx, _) = self.find_live(hash, key, clock, true).ok()?;
        let answer = read(self.entry(idx).1);
        self.hit(idx);
        Some(answer)
    }

    /// A read's lookup: the live entry, or `Err` with the version of a remembered delete or
    /// expiry (`None`: nothing known). When the read counts (`use_it`), anything but a live
    /// entry is counted as a miss here; the caller counts a hit with [`Shard::hit`].
    fn find_live<C: Clock>(
        &mut self,
        hash: u64,
        key: &[u8],
        clock: &C,
        use_it: bool,
    ) -> Result<(u32, Node), Option<u64>> {
        let mut now = Now::new(clock);
        let found = self.find_settled(hash, key, &mut now);
        match found {
            Some((idx, node)) if !node.tombstone => Ok((idx, node)),
            dead => {
                if use_it {
                    self.counters.misses += 1;
                }
                Err(dead.map(|(_, node)| node.version))
            }
        }
    }

    /// A read used live entry `idx`: it counts as a hit and as a use for eviction.
    fn hit(&mut self, idx: u32) {
        self.promote(idx);
        self.counters.hits += 1;
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
        let Some((idx, node)) = self.find_settled(hash, key, &mut now) else {
            return TouchOutcome::NotFound;
        };
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
        let value = self.value(idx);
        let was_expiring = node.expires_at != NEVER;
        let new_at = expires_at.unwrap_or(NEVER);
        self.set_expiry(idx, new_at);
        self.arena.set_version(idx, version);
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

    /// One bounded step of the expiry sweep: examines at most `budget` chunks from where the
    /// last step stopped and frees the expired entries and tombstones among them.
    pub(crate) fn reap_step<C: Clock>(&mut self, budget: usize, clock: &C) -> ReapStep {
        let mut step = ReapStep::default();
        if self.expiring == 0 {
            self.reap_cursor = 0;
            self.reap_missed = false;
            step.pass_complete = true;
            return step;
        }
        let now = clock.now_ms();
        let mut pos = self.reap_cursor;
        while step.visited < budget && pos < self.arena.positions() {
            match self.arena.live_at(pos) {
                Ok(h) => {
                    let expires_at = self.node(h).expires_at;
                    if expires_at != NEVER && expires_at <= now {
                        let mut now = Now::new(clock);
                        // A versioned value becomes a tombstone (its bytes are freed all the
                        // same). Chunks may move meanwhile: if one with an expiry lands
                        // behind the sweep, the pass goes round again.
                        self.reaping_at = Some(pos);
                        let _ = self.settle(h, &mut now);
                        self.reaping_at = None;
                        step.reclaimed += 1;
                    }
                    step.visited += 1;
                    pos += 1;
                }
                Err(next) => {
                    if next == pos + 1 {
                        step.visited += 1;
                    }
                    pos = next;
                }
            }
        }
        if pos >= self.arena.positions() {
            pos = 0;
            step.pass_complete = !std::mem::take(&mut self.reap_missed);
        }
        self.reap_cursor = pos;
        step
    }

    /// Registers a scan: from now on every relocation is logged for it until
    /// [`Shard::scan_end`]. Returns where its replay starts.
    pub(crate) fn scan_begin(&mut self) -> u64 {
        let seq = self.scan_log.end();
        self.scan_log.active.push(seq);
        seq
    }

    /// Unregisters the scan that [`Shard::scan_begin`] registered at `seq`, and drops the
    /// part of the log no registered scan still needs.
    pub(crate) fn scan_end(&mut self, seq: u64) {
        let log = &mut self.scan_log;
        if let Some(i) = log.active.iter().position(|&s| s == seq) {
            log.active.swap_remove(i);
        }
        let keep_from = log
            .active
            .iter()
            .copied()
            .min()
            .unwrap_or_else(|| log.end());
        let drop = usize::try_from(keep_from.saturating_sub(log.base))
            .unwrap_or(usize::MAX)
            .min(log.moved.len());
        log.moved.drain(..drop);
        log.base += drop as u64;
    }

    /// Relocations logged and not yet dropped (for tests).
    #[cfg(test)]
    pub(crate) fn scan_log_len(&self) -> usize {
        self.scan_log.moved.len()
    }

    /// Calls `each` with the live chunks logged from sequence `from`, at most `budget` of
    /// them. Returns the sequence to resume from and whether that is the log's end.
    pub(crate) fn replay(
        &self,
        from: u64,
        budget: usize,
        mut each: impl FnMut(u32),
    ) -> (u64, bool) {
        let log = &self.scan_log;
        let start = usize::try_from(from.saturating_sub(log.base)).unwrap_or(usize::MAX);
        let logged = log.moved.get(start..).unwrap_or(&[]);
        let take = logged.len().min(budget.max(1));
        for &h in &logged[..take] {
            if self.arena.live_at(h as usize) == Ok(h) {
                each(h);
            }
        }
        let next = from + take as u64;
        (next, next >= log.end())
    }

    /// Calls `each` with every entry in chunk positions `from..`, examining at most `budget`
    /// chunks. Returns the position to resume from (`None` when the shard is done).
    pub(crate) fn walk(
        &self,
        from: usize,
        budget: usize,
        mut each: impl FnMut(u32),
    ) -> Option<usize> {
        let (end, mut pos, mut examined) = (self.arena.positions(), from, 0);
        while examined < budget.max(1) && pos < end {
            match self.arena.live_at(pos) {
                Ok(h) => {
                    each(h);
                    examined += 1;
                    pos += 1;
                }
                Err(next) => {
                    if next == pos + 1 {
                        examined += 1;
                    }
                    pos = next;
                }
            }
        }
        (pos < end).then_some(pos)
    }

    /// Adds the entry in chunk `h` to `out` if it holds a live value (what a scan returns).
    pub(crate) fn collect_entry<C: Clock>(
        &self,
        h: u32,
        now: &mut Now<'_, C>,
        out: &mut Vec<Entry>,
    ) {
        let node = self.node(h);
        if !node.tombstone && !node.is_expired(now) {
            out.push(Entry {
                key: self.key_bytes(h),
                value: self.value(h),
                version: node.version,
                expires_at: (node.expires_at != NEVER).then_some(node.expires_at),
            });
        }
    }

    /// Adds the entry in chunk `h` to `out` with its version, live or dead, classified as
    /// [`Shard::get_versioned`] would (an expired versioned value is dead at its version
    /// until its tombstone time runs out; an expired tombstone and an unversioned entry are
    /// left out): what anti-entropy and snapshots read. Changes nothing.
    pub(crate) fn collect_version<C: Clock>(
        &self,
        h: u32,
        now: &mut Now<'_, C>,
        out: &mut Vec<KeyVersion>,
    ) {
        let node = self.node(h);
        if node.version == 0 {
            return;
        }
        let live = if !node.is_expired(now) {
            !node.tombstone
        } else if node.tombstone
            || now.get()
                >= node
                    .expires_at
                    .saturating_add(self.tombstone_ttl_ms)
                    .min(NEVER - 1)
        {
            return;
        } else {
            false
        };
        out.push(KeyVersion {
            key: self.key_bytes(h),
            version: node.version,
            live,
            value_len: if live { self.entry(h).1.len() } else { 0 },
        });
    }

    /// Drops every entry (counters other than sizes are kept).
    pub(crate) fn clear(&mut self) {
        self.arena.clear();
        self.large = Vec::new();
        self.large_free = Vec::new();
        self.large_bytes = 0;
        self.index = HashTable::new();
        self.head = NIL;
        self.tail = NIL;
        self.hand = NIL;
        self.tracked = NIL;
        self.used_bytes = 0;
        self.items = 0;
        self.tombstones = 0;
        self.expiring = 0;
        self.reap_cursor = 0;
        self.reap_missed = false;
    }

    /// Keys from most to least recently used, tombstones and expired entries included.
    #[cfg(any(test, feature = "model"))]
    pub(crate) fn keys_mru_to_lru(&self) -> Vec<Vec<u8>> {
        let mut keys = Vec::new();
        let mut h = self.head;
        while h != NIL {
            keys.push(self.key(h).to_vec());
            h = self.arena.next(h);
        }
        keys
    }

    /// Checks every invariant of the shard; `Err` names the first one broken.
    pub(crate) fn validate(&self) -> Result<(), String> {
        // Every entry, found by walking the pages.
        let mut entries = Vec::new();
        let mut pos = 0;
        while pos < self.arena.positions() {
            match self.arena.live_at(pos) {
                Ok(h) => {
                    entries.push(h);
                    pos += 1;
                }
                Err(next) => pos = next,
            }
        }
        let occupied = entries.len();
        let is_entry = |h: u32| entries.binary_search(&h).is_ok();
        // The LRU list: well linked, acyclic, covering every entry.
        let mut seen = 0usize;
        let mut prev = NIL;
        let mut h = self.head;
        while h != NIL {
            if seen > occupied {
                return Err("LRU list has a cycle or more nodes than entries".into());
            }
            if !is_entry(h) {
                return Err(format!(
                    "LRU list reaches chunk {h:#x}, which holds no entry"
                ));
            }
            if self.arena.prev(h) != prev {
                return Err(format!(
                    "chunk {h:#x}: prev is {:#x} but the list came from {prev:#x}",
                    self.arena.prev(h)
                ));
            }
            prev = h;
            h = self.arena.next(h);
            seen += 1;
        }
        if self.tail != prev {
            return Err(format!(
                "tail is {:#x} but the list ends at {prev:#x}",
                self.tail
            ));
        }
        if seen != occupied {
            return Err(format!(
                "LRU list has {seen} nodes but {occupied} chunks hold entries"
            ));
        }
        // SIEVE's hand points at a listed entry (or nowhere); LRU never uses it.
        if self.hand != NIL && (self.policy == EvictionPolicy::Lru || !is_entry(self.hand)) {
            return Err(format!(
                "hand at chunk {:#x}, which is not a listed entry",
                self.hand
            ));
        }
        if self.tracked != NIL {
            return Err(format!("chunk {:#x} still tracked", self.tracked));
        }
        // The index agrees with the chunks.
        if self.index.len() != occupied {
            return Err(format!(
                "index has {} entries, the pages {occupied}",
                self.index.len()
            ));
        }
        let (mut bytes, mut items, mut tombstones, mut expiring) = (0u64, 0u64, 0u64, 0u64);
        let mut large = 0usize;
        for &h in &entries {
            let node = self.node(h);
            if node.large {
                let i = large_index(&self.arena, h);
                let data = self.large.get(i).map_or(0, Bytes::len);
                if data < LARGE_HEADER || large_parts(&self.large[i]).0 > data - LARGE_HEADER {
                    return Err(format!(
                        "chunk {h:#x}: large entry of {data} bytes, its key length beyond it"
                    ));
                }
                if self.arena.class_of(h) != large_class() {
                    return Err(format!("chunk {h:#x}: large entry in the wrong class"));
                }
                large += 1;
            } else {
                let meta = self.arena.meta(h);
                let k = ((meta >> KLEN_SHIFT) & LEN_MASK) as usize;
                let v = ((meta >> VLEN_SHIFT) & LEN_MASK) as usize;
                if layout(k + v) != (self.arena.class_of(h), false) {
                    return Err(format!(
                        "chunk {h:#x}: {k} + {v} bytes in class {}, not their own",
                        self.arena.class_of(h)
                    ));
                }
            }
            let key = self.key(h);
            if self.find(self.hasher.hash_one(key), key) != Some(h) {
                return Err(format!("chunk {h:#x} is not found through the index"));
            }
            if node.visited && self.policy == EvictionPolicy::Lru {
                return Err(format!("chunk {h:#x}: visited under LRU"));
            }
            bytes += self.charge(h);
            if node.tombstone {
                tombstones += 1;
                if node.expires_at == NEVER {
                    return Err(format!("chunk {h:#x}: tombstone without expiry"));
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
        self.arena.validate(&entries)?;
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
