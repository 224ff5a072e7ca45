//! Time, as the engine sees it: absolute unix-epoch milliseconds behind the [`Clock`] trait.
//!
//! Expiry times are absolute (not "seconds from now") so that replicas and persisted files
//! agree on when an entry dies. The engine never calls `SystemTime::now()` itself: it asks its
//! clock, so tests (and embedders' tests) can move time by hand with [`ManualClock`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of the current time in unix-epoch milliseconds.
///
/// The engine reads it lazily: only when an operation touches an entry that has an expiry,
/// or when it has to compute one, so a cache without TTLs never reads the clock on its hot path.
pub trait Clock: Send + Sync + 'static {
    /// The current time in milliseconds since the unix epoch.
    fn now_ms(&self) -> u64;
}

/// The wall clock (`SystemTime::now()`), for production use.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            // A clock set before 1970 is treated as the epoch itself rather than a panic.
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to; clones share the same time.
///
/// ```
/// use cache_core::{Clock, ManualClock};
/// let clock = ManualClock::new(1_000);
/// let seen_by_cache = clock.clone();
/// clock.advance_ms(500);
/// assert_eq!(seen_by_cache.now_ms(), 1_500);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    /// Shared so that the test keeps a handle while the cache owns a clone.
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock frozen at `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        Self {
            now: Arc::new(AtomicU64::new(now_ms)),
        }
    }

    /// Moves time forward by `ms`.
    pub fn advance_ms(&self, ms: u64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the time to `now_ms` (it may move backwards, as a real clock can).
    pub fn set_ms(&self, now_ms: u64) {
        self.now.store(now_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

impl<C: Clock> Clock for Arc<C> {
    fn now_ms(&self) -> u64 {
        (**self).now_ms()
    }
}
