//! Errors the engine returns. Each variant says what happened and what the caller can do.

/// A [`CacheConfig`](crate::CacheConfig) that cannot be used. Nothing was built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The shard count must be a power of two between 1 and 65536.
    #[error("shard count must be a power of two between 1 and 65536, got {0}")]
    Shards(usize),
    /// Every shard needs at least one byte of budget.
    #[error(
        "max_bytes {max_bytes} is smaller than the shard count {shards}: give the cache more memory or fewer shards"
    )]
    MaxBytesTooSmall {
        /// The configured memory limit.
        max_bytes: u64,
        /// The resolved shard count.
        shards: usize,
    },
    /// `max_items = Some(0)` would refuse every write; use `None` for "no item cap".
    #[error("max_items must be at least 1 (use no limit instead of 0)")]
    ZeroMaxItems,
    /// One shard would hold more than [`MAX_SHARD_BYTES`](crate::MAX_SHARD_BYTES) (32 GiB).
    #[error(
        "max_bytes {max_bytes} over {shards} shards is more than 32 GiB per shard: use more shards"
    )]
    ShardTooLarge {
        /// The configured memory limit.
        max_bytes: u64,
        /// The resolved shard count.
        shards: usize,
    },
}

/// Why a write was refused. The cache is unchanged when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InsertError {
    /// The entry's charge (key + value + per-entry overhead) exceeds what one shard may hold,
    /// so it could never be stored, even in an empty cache. Raise `max_bytes`, lower the shard
    /// count, or store a smaller value.
    #[error(
        "entry of {charge} bytes (with overhead) is larger than a shard's budget of {shard_capacity} bytes"
    )]
    EntryTooLarge {
        /// Bytes the entry would be charged.
        charge: u64,
        /// Budget of one shard (`max_bytes / shards`).
        shard_capacity: u64,
    },
    /// Eviction is disabled and the shard is full. Delete something or enable eviction.
    #[error(
        "cache is full ({used} of {capacity} bytes used in the key's shard) and eviction is disabled"
    )]
    OutOfMemory {
        /// Bytes in use in the key's shard.
        used: u64,
        /// That shard's budget.
        capacity: u64,
    },
    /// Keys are limited to `u32::MAX` bytes by the entry layout (the network layer sets far
    /// smaller limits).
    #[error("key of {0} bytes is too long for the engine")]
    KeyTooLong(usize),
}
