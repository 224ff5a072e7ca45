//! Giving memory the engine freed back to the system.
//!
//! glibc's malloc keeps what a program frees for later reuse, and returns memory to the system
//! only from the top of a heap. A cache that evicts and overwrites all day frees in the middle
//! of its heaps, so its resident memory drifts far above what it holds: measured with
//! `cargo xtask bench memory`, a node with `--max-memory 64MiB` stayed at 118 MiB resident
//! while its engine held 23 MiB, after mixed-size overwrites; one `malloc_trim(0)` brought it
//! to 40 MiB (see `docs/benchmarks.md`). So a thread compares, four times a second, the process's
//! resident memory with what the engine holds ([`cache_core::Cache::footprint`]) and, when
//! the gap has grown by more than an eighth of the memory limit (at least 8 MiB) beyond what
//! it was at start (what the process held besides the engine), calls `malloc_trim(0)`, which gives every whole free page back to the
//! system. The call takes the allocator's locks for as long as it walks the heaps (about a
//! millisecond per hundred MiB of heap here), which is why it runs on its own thread and only
//! when there is something to give back.
//!
//! Only on Linux with glibc and the system allocator (jemalloc, `--features jemalloc`, returns
//! memory by itself).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_rpc::service::NodeCore;

/// How often the gap is checked: one `/proc/self/statm` read and a brief visit to each shard.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Starts the trimming thread for a node whose engine has a `max_bytes` limit. It lives as
/// long as the process.
pub(crate) fn spawn(core: Arc<NodeCore>, max_bytes: u64) {
    let Some(start_rss) = cache_rpc::metrics::resident_memory_bytes() else {
        return;
    };
    // What the process holds besides the engine (a node that recovered data from disk
    // already holds some at start).
    let base = start_rss.saturating_sub(core.store().engine().footprint());
    let slack = (max_bytes / 8).max(8 << 20);
    let spawned = std::thread::Builder::new()
        .name("memory-trim".into())
        .spawn(move || {
            loop {
                std::thread::sleep(CHECK_EVERY);
                let Some(rss) = cache_rpc::metrics::resident_memory_bytes() else {
                    return;
                };
                let held = core.store().engine().footprint();
                if rss <= base + held + slack {
                    continue;
                }
                let began = Instant::now();
                let released = malloc_trim();
                let after = cache_rpc::metrics::resident_memory_bytes().unwrap_or(rss);
                tracing::debug!(
                    rss_before = rss,
                    rss_after = after,
                    engine_holds = held,
                    released,
                    took_us = began.elapsed().as_micros() as u64,
                    "gave freed memory back to the system"
                );
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the memory-trim thread; freed memory stays with the process");
    }
}

/// `malloc_trim(0)`: true if glibc gave memory back.
#[allow(unsafe_code)]
fn malloc_trim() -> bool {
    // SAFETY: `malloc_trim` has no preconditions: it walks glibc's own heap structures under
    // their locks and `madvise`s whole free pages away; it reads or writes no memory this
    // program owns.
    unsafe { libc::malloc_trim(0) == 1 }
}
