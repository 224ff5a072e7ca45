//! The slow log: requests that took at least `--slowlog-threshold`, newest first, at most
//! `--slowlog-max-len` of them (as Redis's `SLOWLOG`), each also logged as a warning (at most
//! one line per second, with how many were held back).
//!
//! Served by the `SlowLog` RPC (`cache-cli slowlog`), RESP `SLOWLOG GET|LEN|RESET`, and
//! counted in `cache_slow_requests_total`. The time is the handler's (decode to answer,
//! forwarding and replication included), the same as `cache_request_duration_seconds`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cluster_core::LogThrottle;
use parking_lot::Mutex;

/// Longest key kept in an entry; longer keys are cut (the entry says how long it was).
pub const MAX_KEY_BYTES: usize = 128;

/// The slow log's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowLogConfig {
    /// Requests taking at least this long are logged; `None`: the slow log is off.
    pub threshold: Option<Duration>,
    /// Entries kept (oldest dropped first); 0 keeps none but still counts and logs.
    pub max_len: usize,
}

impl Default for SlowLogConfig {
    fn default() -> Self {
        Self {
            threshold: Some(Duration::from_millis(10)),
            max_len: 128,
        }
    }
}

/// One slow request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlowEntry {
    /// Increases by one per slow request (never reused, also across `reset`).
    pub id: u64,
    /// When it finished, in Unix milliseconds.
    pub at_unix_ms: u64,
    /// How long it took.
    pub duration: Duration,
    /// The operation (`get`, `multi_set`, ...).
    pub op: &'static str,
    /// Its outcome (`hit`, `ok`, or the error kind).
    pub result: &'static str,
    /// Its (first) key, cut to [`MAX_KEY_BYTES`].
    pub key: Bytes,
    /// The key's full length.
    pub key_len: usize,
    /// Keys in the request (more than one for batches).
    pub keys: usize,
    /// `grpc` or `resp`.
    pub via: &'static str,
}

/// The slow log of a node.
#[derive(Debug)]
pub struct SlowLog {
    config: SlowLogConfig,
    entries: Mutex<VecDeque<SlowEntry>>,
    next_id: AtomicU64,
    log: LogThrottle,
}

impl SlowLog {
    /// An empty slow log.
    pub fn new(config: SlowLogConfig) -> Self {
        Self {
            config,
            entries: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(0),
            log: LogThrottle::new(Duration::from_secs(1)),
        }
    }

    /// The settings.
    pub fn config(&self) -> SlowLogConfig {
        self.config
    }

    /// Whether a request that took `elapsed` is slow.
    pub fn is_slow(&self, elapsed: Duration) -> bool {
        self.config.threshold.is_some_and(|t| elapsed >= t)
    }

    /// Records a request that took `elapsed`, if it is slow; `key` is its first key (and
    /// the number of keys), looked at only then. Returns whether it was slow.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        op: &'static str,
        result: &'static str,
        elapsed: Duration,
        key: Option<&Bytes>,
        keys: usize,
        via: &'static str,
    ) -> bool {
        if !self.is_slow(elapsed) {
            return false;
        }
        let full = key.cloned().unwrap_or_default();
        let entry = SlowEntry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            duration: elapsed,
            op,
            result,
            key_len: full.len(),
            key: full.slice(..full.len().min(MAX_KEY_BYTES)),
            keys,
            via,
        };
        self.log.run(|held_back| {
            tracing::warn!(
                op,
                result,
                via,
                took_ms = elapsed.as_secs_f64() * 1000.0,
                key = %String::from_utf8_lossy(&entry.key),
                keys,
                held_back,
                "slow request (see cache-cli slowlog; logged at most once a second)"
            );
        });
        if self.config.max_len > 0 {
            let mut entries = self.entries.lock();
            if entries.len() >= self.config.max_len {
                entries.pop_back();
            }
            entries.push_front(entry);
        }
        true
    }

    /// The newest `count` entries, newest first.
    pub fn get(&self, count: usize) -> Vec<SlowEntry> {
        self.entries.lock().iter().take(count).cloned().collect()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every entry.
    pub fn reset(&self) {
        self.entries.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_slow_requests_only() {
        let log = SlowLog::new(SlowLogConfig {
            threshold: Some(Duration::from_millis(5)),
            max_len: 3,
        });
        let key = Bytes::from(vec![b'k'; 300]);
        assert!(!log.record(
            "get",
            "hit",
            Duration::from_millis(4),
            Some(&key),
            1,
            "grpc"
        ));
        for i in 0..5u64 {
            assert!(log.record(
                "set",
                "ok",
                Duration::from_millis(5 + i),
                Some(&key),
                1,
                "resp"
            ));
        }
        let got = log.get(10);
        assert_eq!(got.len(), 3);
        assert_eq!(got.iter().map(|e| e.id).collect::<Vec<_>>(), vec![4, 3, 2]);
        assert_eq!(got[0].key.len(), MAX_KEY_BYTES);
        assert_eq!(got[0].key_len, 300);
        assert_eq!(got[0].duration, Duration::from_millis(9));
        log.reset();
        assert!(log.is_empty());
        log.record("get", "miss", Duration::from_secs(1), None, 1, "grpc");
        assert_eq!(log.get(1)[0].id, 5, "ids are never reused");
        let off = SlowLog::new(SlowLogConfig {
            threshold: None,
            max_len: 3,
        });
        assert!(!off.record("get", "hit", Duration::from_secs(9), None, 1, "grpc"));
    }
}
