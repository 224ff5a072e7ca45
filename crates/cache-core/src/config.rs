//! Configuration of a [`Cache`](crate::Cache): limits, shard count, eviction and tombstones.

use std::time::Duration;

use crate::error::ConfigError;

/// One gibibyte, the default memory limit.
const GIB: u64 = 1 << 30;

/// How a [`Cache`](crate::Cache) is sized and behaves. Build one with [`CacheConfig::new`] and
/// the `with_*` methods; [`Cache::new`](crate::Cache::new) validates it.
///
/// ```
/// use cache_core::CacheConfig;
/// let config = CacheConfig::new()
///     .with_max_bytes(64 << 20)
///     .with_max_items(Some(100_000))
///     .with_shards(8);
/// assert_eq!(config.max_bytes, 64 << 20);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Memory budget in bytes, split evenly across shards. Every entry is charged
    /// `key.len() + value.len() + ENTRY_OVERHEAD` (see [`crate::ENTRY_OVERHEAD`]). Because the
    /// budget is per shard, one entry can never be larger than `max_bytes / shards`.
    pub max_bytes: u64,
    /// Optional cap on the number of stored entries (tombstones included), split across shards
    /// (rounded up, so the real cap may exceed it by less than the shard count).
    pub max_items: Option<u64>,
    /// Number of shards; a power of two. `0` picks one from the core count
    /// (`4 × cores`, rounded up to a power of two), enough that two threads rarely meet on a
    /// lock — or more, so that no shard holds over [`MAX_SHARD_BYTES`].
    pub shards: usize,
    /// When `true` (the default) an insert that does not fit evicts least-recently-used entries.
    /// When `false` it is refused with [`InsertError::OutOfMemory`](crate::InsertError) instead —
    /// for users who would rather see an error than lose data.
    pub evict: bool,
    /// How long a versioned delete keeps its tombstone. It must outlive any replication delay:
    /// an older write that arrives after the tombstone is gone could resurrect the key.
    pub tombstone_ttl: Duration,
    /// Which entry goes when an insert does not fit: exact LRU (the default) or SIEVE.
    pub eviction_policy: EvictionPolicy,
}

/// How a full shard picks the entry to evict. Both run on the same chunks and list; see
/// `docs/why/lru.md` for the measured hit ratios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvictionPolicy {
    /// Exact least-recently-used: every hit moves the entry to the head of the list; the tail
    /// goes. Predictable, and what a Redis or memcached user expects.
    #[default]
    Lru,
    /// SIEVE (Zhang et al., NSDI '24): a hit only sets a "visited" bit; new entries enter at
    /// the head; a hand walks from the tail towards the head, clearing visited bits and
    /// evicting the first entry not visited since the hand last passed. One-hit wonders (a
    /// scan) leave quickly and popular entries stay, and a hit writes one bit instead of
    /// relinking four nodes.
    Sieve,
}

impl EvictionPolicy {
    /// The policy's name as the node's `--eviction-policy` flag spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lru => "lru",
            Self::Sieve => "sieve",
        }
    }
}

impl std::fmt::Display for EvictionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EvictionPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "lru" => Ok(Self::Lru),
            "sieve" => Ok(Self::Sieve),
            other => Err(format!(
                "unknown eviction policy {other:?} (expected \"lru\" or \"sieve\")"
            )),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: GIB,
            max_items: None,
            shards: 0,
            evict: true,
            tombstone_ttl: Duration::from_secs(60),
            eviction_policy: EvictionPolicy::Lru,
        }
    }
}

impl CacheConfig {
    /// The defaults: 1 GiB, no item cap, shards from the core count, eviction on (exact LRU),
    /// tombstones kept for 60 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`CacheConfig::max_bytes`].
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Sets [`CacheConfig::max_items`].
    pub fn with_max_items(mut self, max_items: Option<u64>) -> Self {
        self.max_items = max_items;
        self
    }

    /// Sets [`CacheConfig::shards`].
    pub fn with_shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self
    }

    /// Sets [`CacheConfig::evict`].
    pub fn with_eviction(mut self, evict: bool) -> Self {
        self.evict = evict;
        self
    }

    /// Sets [`CacheConfig::eviction_policy`].
    pub fn with_eviction_policy(mut self, policy: EvictionPolicy) -> Self {
        self.eviction_policy = policy;
        self
    }

    /// Sets [`CacheConfig::tombstone_ttl`].
    pub fn with_tombstone_ttl(mut self, ttl: Duration) -> Self {
        self.tombstone_ttl = ttl;
        self
    }

    /// The shard count this configuration resolves to (`shards`, or the automatic choice).
    pub fn resolved_shards(&self) -> usize {
        if self.shards != 0 {
            return self.shards;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Enough shards that none holds more than `MAX_SHARD_BYTES`.
        let for_bytes =
            usize::try_from(self.max_bytes.div_ceil(MAX_SHARD_BYTES)).unwrap_or(usize::MAX);
        (cores * 4)
            .max(for_bytes)
            .checked_next_power_of_two()
            .unwrap_or(MAX_SHARDS)
            .min(MAX_SHARDS)
    }

    /// Checks the configuration; [`Cache::new`](crate::Cache::new) calls this.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let shards = self.resolved_shards();
        if !shards.is_power_of_two() || shards > MAX_SHARDS {
            return Err(ConfigError::Shards(shards));
        }
        if self.max_bytes < shards as u64 {
            return Err(ConfigError::MaxBytesTooSmall {
                max_bytes: self.max_bytes,
                shards,
            });
        }
        if self.max_items == Some(0) {
            return Err(ConfigError::ZeroMaxItems);
        }
        if self.max_bytes / shards as u64 > MAX_SHARD_BYTES {
            return Err(ConfigError::ShardTooLarge {
                max_bytes: self.max_bytes,
                shards,
            });
        }
        Ok(())
    }
}

/// The most bytes one shard may hold: a shard addresses its chunks with `u32` handles (64 GiB
/// of pages); half of that leaves room for the pages' slack.
pub const MAX_SHARD_BYTES: u64 = 32 << 30;

/// The largest shard count accepted: far more than any machine needs, small enough that the
/// shard index comes from hash bits the per-shard table does not use (see `cache.rs`).
pub const MAX_SHARDS: usize = 1 << 16;
