//! [`LogThrottle`]: a warning that can repeat per request is logged at most once per
//! interval, with how many were held back.
//!
//! A dead peer under write load, a full file-descriptor table or a client with a bad token
//! would otherwise print a line per request (thousands per second), burying everything else
//! in the log and costing CPU. Counters in `/metrics` keep the exact numbers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Lets one event through per interval and counts the ones it holds back.
#[derive(Debug)]
pub struct LogThrottle {
    every: Duration,
    last: Mutex<Option<Instant>>,
    held_back: AtomicU64,
}

impl LogThrottle {
    /// The usual interval between two lines of one warning.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

    /// A throttle letting one event through per `every`.
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(None),
            held_back: AtomicU64::new(0),
        }
    }

    /// Runs `log` with the number of events held back since the last one it ran for, if
    /// `every` has passed since then (or it never ran); otherwise counts this event.
    pub fn run(&self, log: impl FnOnce(u64)) {
        let mut last = self.last.lock();
        if last.is_none_or(|t| t.elapsed() >= self.every) {
            *last = Some(Instant::now());
            drop(last);
            log(self.held_back.swap(0, Ordering::Relaxed));
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new(Self::DEFAULT_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_held_back() {
        let t = LogThrottle::new(Duration::from_millis(50));
        let mut lines = Vec::new();
        for _ in 0..1000 {
            t.run(|held| lines.push(held));
        }
        assert_eq!(lines, vec![0], "one line for a burst");
        std::thread::sleep(Duration::from_millis(60));
        t.run(|held| lines.push(held));
        assert_eq!(
            lines,
            vec![0, 999],
            "the next line says how many were held back"
        );
    }
}
