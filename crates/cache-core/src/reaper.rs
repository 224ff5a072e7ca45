//! The background reaper: a plain thread that calls [`Cache::reap`] every `interval`.
//!
//! Expired entries are already invisible the moment they expire (every read checks); the
//! reaper exists to give back the memory of entries nobody reads again. Its work per lock
//! acquisition is bounded by the budget, so it never stalls requests on a shard for longer
//! than examining `budget` chunks. It owns nothing but a weak reference to the cache: dropping
//! the [`Reaper`] stops and joins the thread, and dropping the cache ends it too.

use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::{Cache, Clock};

/// Handle to the background reaper thread. Dropping it stops the thread and waits for it.
#[derive(Debug)]
pub struct Reaper {
    /// `true` once stop was requested; the condvar wakes the thread early.
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    /// Starts a thread that reaps `cache` every `interval`, examining at most `budget` chunks
    /// per shard lock acquisition. Fails only if the OS refuses a thread.
    pub fn spawn<C: Clock>(
        cache: &Arc<Cache<C>>,
        interval: Duration,
        budget: usize,
    ) -> std::io::Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let weak: Weak<Cache<C>> = Arc::downgrade(cache);
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("cache-reaper".into())
            .spawn(move || {
                let (lock, cvar) = &*thread_stop;
                loop {
                    {
                        let mut stopped = lock.lock();
                        if !*stopped {
                            cvar.wait_for(&mut stopped, interval);
                        }
                        if *stopped {
                            return;
                        }
                    }
                    let Some(cache) = weak.upgrade() else { return };
                    cache.reap(budget);
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let (lock, cvar) = &*self.stop;
        *lock.lock() = true;
        cvar.notify_all();
        if let Some(thread) = self.thread.take() {
            // A panic in the reaper thread has already been reported by the panic hook.
            let _ = thread.join();
        }
    }
}
