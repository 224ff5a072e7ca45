//! Time for the core: the wall clock the engine and the version clock read, and the hybrid
//! logical clock ([`Hlc`]) that issues write versions.
//!
//! [`NodeClock::Tokio`] reads tokio's clock, so under `tokio::time::pause()` the simulator
//! controls expiry and version time exactly as it controls timeouts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cache_core::Clock;

/// The wall clock of one node, in unix milliseconds.
#[derive(Debug, Clone)]
pub enum NodeClock {
    /// The system clock (production).
    System,
    /// `origin_ms` plus the time elapsed on tokio's clock since `start` (the simulator, where
    /// tokio time is paused and advanced by the runtime).
    Tokio {
        /// Unix milliseconds at `start`.
        origin_ms: u64,
        /// The tokio instant that corresponds to `origin_ms`.
        start: tokio::time::Instant,
    },
}

impl NodeClock {
    /// A clock that follows tokio's (possibly paused) clock from `origin_ms`.
    pub fn tokio(origin_ms: u64) -> Self {
        NodeClock::Tokio {
            origin_ms,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for NodeClock {
    fn now_ms(&self) -> u64 {
        match self {
            NodeClock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            NodeClock::Tokio { origin_ms, start } => {
                let elapsed = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
                origin_ms.saturating_add(elapsed)
            }
        }
    }
}

/// Bits of a version below the milliseconds: 8 of logical counter, 8 of node tag.
const LOGICAL_BITS: u32 = 16;
/// The node tag's bits.
const TAG_MASK: u64 = 0xff;
/// One step of the logical counter.
const COUNTER_STEP: u64 = 0x100;
/// The distance between consecutive versions of one clock within a millisecond: the
/// versions of a batch reserved with [`Hlc::reserve`] are this far apart.
pub const VERSION_STEP: u64 = COUNTER_STEP;
/// The largest wall-clock millisecond a version can carry (48 bits: year 10889).
const MAX_MS: u64 = (1 << 48) - 1;

/// Why the version clock refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    /// An observed version is further ahead of this node's wall clock than the allowed
    /// drift: it was forged, or a clock is badly wrong. Nothing was changed.
    #[error(
        "version {version:#x} is {ahead_ms} ms ahead of this node's clock (allowed drift {max_drift_ms} ms); refused"
    )]
    TooFarAhead {
        /// The version.
        version: u64,
        /// How far its time is ahead of ours.
        ahead_ms: u64,
        /// The configured bound.
        max_drift_ms: u64,
    },
    /// The clock cannot go higher (its 48-bit millisecond field is full). Only reachable
    /// with a wall clock past the year 10889.
    #[error("the version clock is exhausted")]
    Exhausted,
}

/// The wall-clock milliseconds a version carries.
pub fn version_ms(version: u64) -> u64 {
    version >> LOGICAL_BITS
}

/// Hybrid logical clock issuing write versions: 48 bits of unix milliseconds, 8 bits of
/// logical counter, 8 bits of node tag (a hash of the node id).
///
/// Versions from one clock strictly increase. Two nodes writing in the same millisecond with
/// the same counter differ by their tag, so ties break by node, deterministically. When the
/// counter runs out within a millisecond the clock borrows the next one, as HLCs do. All
/// arithmetic is checked: the clock never wraps.
///
/// [`Hlc::observe`] (the HLC receive rule) moves the clock past a version seen from elsewhere,
/// but only if that version is at most `max_drift` ahead of the wall clock: a forged
/// `u64::MAX` would otherwise pin every key forever and exhaust the clock.
#[derive(Debug)]
pub struct Hlc {
    last: AtomicU64,
    /// The low 8 bits of every version issued: unique among the members (see
    /// [`assign_tags`]), so two nodes never issue the same version.
    tag: AtomicU64,
    max_drift_ms: u64,
}

/// The tag a node id starts from: 8 bits of a hash of the id.
pub fn preferred_tag(node_id: &str) -> u64 {
    cluster_ring::key_hash(node_id.as_bytes()) & TAG_MASK
}

/// Version tags for `members` that no two of them share while there are at most 256:
/// taken in id order, each member gets its [`preferred_tag`] or, if a member before it
/// already has that, the next free one. Every node computes the same assignment from the
/// same member list, so a node's tag is unique by construction, not by luck of a hash
/// (with 20 members two shared a hash tag more often than not). When views differ for a
/// moment two nodes may briefly share a tag; equal versions still resolve the same way on
/// every replica (the engine's tie-break). Beyond 256 members tags repeat.
pub fn assign_tags<'a>(
    members: impl IntoIterator<Item = &'a str>,
) -> std::collections::BTreeMap<&'a str, u64> {
    let mut ids: Vec<&str> = members.into_iter().collect();
    ids.sort_unstable();
    ids.dedup();
    let mut taken = [false; 256];
    let mut out = std::collections::BTreeMap::new();
    for (n, id) in ids.into_iter().enumerate() {
        let preferred = preferred_tag(id);
        let tag = if n >= 256 {
            preferred
        } else {
            (0..256u64)
                .map(|k| (preferred + k) & TAG_MASK)
                .find(|t| !taken[*t as usize])
                .unwrap_or(preferred)
        };
        taken[tag as usize] = true;
        out.insert(id, tag);
    }
    out
}

impl Hlc {
    /// A clock for node `node_id` that accepts observed versions up to `max_drift` ahead.
    /// It starts with the id's [`preferred_tag`]; [`Hlc::set_tag`] moves it to the one
    /// [`assign_tags`] gives once the members are known.
    pub fn new(node_id: &str, max_drift: Duration) -> Self {
        Self {
            last: AtomicU64::new(0),
            tag: AtomicU64::new(preferred_tag(node_id)),
            max_drift_ms: u64::try_from(max_drift.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// This node's tag (the low 8 bits of every version it issues).
    pub fn tag(&self) -> u64 {
        self.tag.load(Ordering::Relaxed)
    }

    /// Issues versions with tag `tag` (its low 8 bits) from now on. Versions keep
    /// increasing across the change (the tag is below the counter).
    pub fn set_tag(&self, tag: u64) {
        self.tag.store(tag & TAG_MASK, Ordering::Relaxed);
    }

    /// The next version at wall-clock time `now_ms`.
    pub fn next(&self, now_ms: u64) -> Result<u64, ClockError> {
        self.reserve(now_ms, 1)
    }

    /// `count` consecutive versions at wall-clock time `now_ms` (at least one): the first
    /// is returned, the others are `first + k * VERSION_STEP` for `k < count`, and the
    /// clock moves past the last. For a batch stamped where it is first accepted and
    /// applied elsewhere (see [`crate::Stamping`]).
    pub fn reserve(&self, now_ms: u64, count: usize) -> Result<u64, ClockError> {
        let span = u64::try_from(count.max(1) - 1)
            .ok()
            .and_then(|extra| extra.checked_mul(COUNTER_STEP))
            .ok_or(ClockError::Exhausted)?;
        let physical = now_ms.min(MAX_MS) << LOGICAL_BITS;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let base = last & !TAG_MASK;
            let candidate = if physical > base {
                physical
            } else {
                base.checked_add(COUNTER_STEP)
                    .ok_or(ClockError::Exhausted)?
            };
            let end = candidate.checked_add(span).ok_or(ClockError::Exhausted)?;
            if version_ms(end) > MAX_MS {
                return Err(ClockError::Exhausted);
            }
            let tag = self.tag();
            match self.last.compare_exchange_weak(
                last,
                end | tag,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(candidate | tag),
                Err(seen) => last = seen,
            }
        }
    }

    /// Checks that `version` is within the allowed drift of `now_ms`, without changing
    /// anything.
    pub fn check(&self, version: u64, now_ms: u64) -> Result<(), ClockError> {
        let ms = version_ms(version);
        let limit = now_ms.saturating_add(self.max_drift_ms);
        if ms > limit {
            return Err(ClockError::TooFarAhead {
                version,
                ahead_ms: ms - now_ms.min(ms),
                max_drift_ms: self.max_drift_ms,
            });
        }
        Ok(())
    }

    /// Moves the clock past `version` (seen from another node or stored locally), so this
    /// node's next version orders after it. Refused, with no change, if `version` is more
    /// than the allowed drift ahead of `now_ms`.
    pub fn observe(&self, version: u64, now_ms: u64) -> Result<(), ClockError> {
        self.check(version, now_ms)?;
        self.last.fetch_max(version & !TAG_MASK, Ordering::Relaxed);
        Ok(())
    }

    /// Moves the clock past `version` without the drift check: for versions this node
    /// already accepted once (recovered from its own disk).
    pub fn observe_unchecked(&self, version: u64) {
        self.last.fetch_max(version & !TAG_MASK, Ordering::Relaxed);
    }

    /// The last version issued or observed (for tests and `/status`).
    pub fn last(&self) -> u64 {
        self.last.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRIFT: Duration = Duration::from_secs(5);

    #[test]
    fn versions_increase_and_carry_the_node_tag() {
        let hlc = Hlc::new("node-a", DRIFT);
        let mut last = 0;
        for now in [1000, 1000, 1000, 999, 1001] {
            let v = hlc.next(now).expect("version");
            assert!(v > last, "{v} after {last}");
            assert_eq!(v & 0xff, hlc.tag());
            last = v;
        }
        // 300 writes in one millisecond borrow from the next millisecond.
        let hlc = Hlc::new("node-b", DRIFT);
        let versions: Vec<u64> = (0..300).map(|_| hlc.next(7).expect("version")).collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn observing_moves_the_clock_within_the_drift_only() {
        let hlc = Hlc::new("node-a", DRIFT);
        let now = 1_700_000_000_000;
        hlc.observe((now + 4_000) << 16, now).expect("within drift");
        assert!(hlc.next(now).expect("version") > (now + 4_000) << 16);
        let before = hlc.last();
        for forged in [u64::MAX, (now + 6_000) << 16] {
            let err = hlc.observe(forged, now).expect_err("too far ahead");
            assert!(matches!(err, ClockError::TooFarAhead { .. }), "{err}");
            assert_eq!(hlc.last(), before, "a refused version changes nothing");
        }
        // Thousands of writes after a forged version never wrap.
        for _ in 0..10_000 {
            let v = hlc.next(now).expect("version");
            assert!(version_ms(v) < now + 5_000);
        }
    }

    #[test]
    fn a_reserved_range_is_skipped_by_later_versions() {
        let hlc = Hlc::new("node-a", DRIFT);
        let first = hlc.reserve(1000, 5).expect("versions");
        let last = first + 4 * VERSION_STEP;
        assert_eq!(
            last & 0xff,
            hlc.tag(),
            "every reserved version carries the tag"
        );
        let next = hlc.next(1000).expect("version");
        assert!(next > last, "{next:#x} after {last:#x}");
        hlc.observe_unchecked(u64::MAX);
        assert_eq!(hlc.reserve(1000, 2), Err(ClockError::Exhausted));
    }

    #[test]
    fn assigned_tags_never_collide_among_256_members() {
        let ids: Vec<String> = (0..256).map(|i| format!("node-{i}")).collect();
        let preferred: std::collections::BTreeSet<u64> =
            ids.iter().map(|id| preferred_tag(id)).collect();
        assert!(preferred.len() < 256, "hash tags collide among 256 ids");
        let tags = assign_tags(ids.iter().map(String::as_str));
        let distinct: std::collections::BTreeSet<u64> = tags.values().copied().collect();
        assert_eq!(distinct.len(), 256, "every member its own tag");
        // The same members in another order: the same assignment (every node agrees).
        let again = assign_tags(ids.iter().rev().map(String::as_str));
        assert_eq!(tags, again);
        // Versions keep increasing when the tag changes.
        let hlc = Hlc::new("node-a", DRIFT);
        let before = hlc.next(5).expect("version");
        hlc.set_tag(hlc.tag() ^ 0xff);
        let after = hlc.next(5).expect("version");
        assert!(after > before && after & 0xff == hlc.tag());
    }

    #[test]
    fn the_clock_is_checked_at_its_limit() {
        let hlc = Hlc::new("node-a", Duration::from_millis(u64::MAX));
        hlc.observe(u64::MAX, 0).expect("unbounded drift");
        assert_eq!(hlc.next(0), Err(ClockError::Exhausted));
    }
}
