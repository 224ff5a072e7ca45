//! [`AppendLog`]: the store's mutation sink that writes the append-only log, with Redis's
//! three fsync policies and group commit.
//!
//! Writers never touch the file. [`MutationSink::applied`] encodes the mutation into a
//! shared buffer (a memcpy under a mutex) and numbers it; one **flusher thread** takes the
//! whole buffer, writes it with one `write` call, and — under [`FsyncPolicy::Always`] —
//! `fdatasync`s once for everything it took. Writers that arrived while an fsync was running
//! are all covered by the next one: that is group commit, and it is why `always` costs one
//! fsync per *batch* of concurrent writes rather than per write.
//!
//! [`MutationSink::barrier`] is what the coordinator awaits before acknowledging a write: it
//! resolves once the flusher has **written** everything numbered so far to the kernel
//! (`everysec`, `no`) or **written and synced** it (`always`). So under every policy a write
//! is acknowledged only after it reached the kernel — a crash of the process (`kill -9`)
//! loses nothing acknowledged; what the policy decides is what a crash of the *machine* can
//! lose: nothing (`always`), about the last second (`everysec`: a second thread fsyncs once
//! per second), or whatever the kernel had not written back (`no`, typically up to 30 s on
//! Linux).
//!
//! A failed write or fsync puts the log in the **failed** state: [`MutationSink::writable`]
//! then refuses every write (the store answers `CoreError::Storage`), waiting writers get
//! the error, the file is cut back to its last complete record, and the flusher retries the
//! pending records once per second; the first retry that succeeds clears the state.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cluster_core::{DurableWait, Mutation, MutationSink};
use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::log::{LogWriter, encode_record};

/// When the log is fsynced (Redis's `appendfsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After every batch of writes, before they are acknowledged: a machine crash loses
    /// nothing acknowledged.
    Always,
    /// Once per second, in the background: a machine crash loses up to about a second
    /// (two in the worst case) of acknowledged writes.
    EverySec,
    /// Never explicitly: the kernel writes back when it wants.
    No,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(Self::Always),
            "everysec" => Ok(Self::EverySec),
            "no" => Ok(Self::No),
            other => Err(format!(
                "unknown appendfsync policy {other:?} (always, everysec or no)"
            )),
        }
    }
}

impl std::fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Always => "always",
            Self::EverySec => "everysec",
            Self::No => "no",
        })
    }
}

/// The file a log segment is written to. [`std::fs::File`] in production; tests inject
/// failures (a full disk) through it.
pub trait SegmentFile: Send + Sync + 'static {
    /// Writes all of `buf` at the end.
    fn append(&self, buf: &[u8]) -> io::Result<()>;
    /// `fdatasync`.
    fn sync(&self) -> io::Result<()>;
    /// Cuts the file to `len` bytes (after a failed, possibly partial, write) and moves the
    /// write position there.
    fn truncate(&self, len: u64) -> io::Result<()>;
}

impl SegmentFile for std::fs::File {
    fn append(&self, buf: &[u8]) -> io::Result<()> {
        (&*self).write_all(buf)
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        use std::io::Seek;
        self.set_len(len)?;
        (&*self).seek(io::SeekFrom::Start(len))?;
        Ok(())
    }
}

/// Where the flusher and the waiters meet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Progress {
    /// Records (by number) written to the kernel.
    written: u64,
    /// Records fsynced.
    synced: u64,
    /// Bumped on every failure: waiters whose records are not done fail with it.
    failures: u64,
}

/// A request to switch segments: the new file, and where to report the outcome.
type Rotation = (
    Arc<dyn SegmentFile>,
    std::sync::mpsc::Sender<io::Result<()>>,
);

/// Records appended and not yet taken by the flusher.
struct Pending {
    buf: Vec<u8>,
    /// Number of the last record appended.
    seq: u64,
    /// A request to switch to a new segment.
    rotate: Option<Rotation>,
    closing: bool,
}

/// Counters for `/metrics` and `/status`.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Bytes in the current segment.
    pub segment_bytes: AtomicU64,
    /// Bytes written since start.
    pub bytes_written: AtomicU64,
    /// Records written since start.
    pub records: AtomicU64,
    /// fsyncs done.
    pub fsyncs: AtomicU64,
    /// Failed writes or fsyncs.
    pub errors: AtomicU64,
    /// Whether writes are refused right now.
    pub failed: AtomicBool,
}

struct Shared {
    policy: FsyncPolicy,
    pending: Mutex<Pending>,
    /// Wakes the flusher (records appended, rotation, close).
    wake: Condvar,
    /// Wakes the everysec thread (close).
    tick: Condvar,
    progress: watch::Sender<Progress>,
    error: Mutex<Option<String>>,
    stats: Arc<LogStats>,
    on_fsync: Box<dyn Fn(Duration) + Send + Sync>,
    /// The segment the everysec thread syncs.
    current: Mutex<Arc<dyn SegmentFile>>,
}

/// The append-only log as the store's [`MutationSink`]. See the module docs.
pub struct AppendLog {
    shared: Arc<Shared>,
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
    syncer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for AppendLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppendLog")
            .field("policy", &self.shared.policy)
            .finish_non_exhaustive()
    }
}

/// How long the flusher waits before retrying after a failure.
const RETRY_AFTER: Duration = Duration::from_secs(1);

impl AppendLog {
    /// Starts logging to `file`, whose valid content is `len` bytes long (its header
    /// included) and whose write position is at its end. `on_fsync` hears every fsync's
    /// duration (the node feeds a histogram with it).
    pub fn start(
        file: Arc<dyn SegmentFile>,
        len: u64,
        policy: FsyncPolicy,
        on_fsync: Box<dyn Fn(Duration) + Send + Sync>,
    ) -> io::Result<Self> {
        let stats = Arc::new(LogStats::default());
        stats.segment_bytes.store(len, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            policy,
            pending: Mutex::new(Pending {
                buf: Vec::with_capacity(64 * 1024),
                seq: 0,
                rotate: None,
                closing: false,
            }),
            wake: Condvar::new(),
            tick: Condvar::new(),
            progress: watch::channel(Progress::default()).0,
            error: Mutex::new(None),
            stats,
            on_fsync,
            current: Mutex::new(Arc::clone(&file)),
        });
        let flusher = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("aof-flush".into())
                .spawn(move || flush_loop(&shared, file, len))?
        };
        let syncer = if policy == FsyncPolicy::EverySec {
            let shared = Arc::clone(&shared);
            Some(
                std::thread::Builder::new()
                    .name("aof-fsync".into())
                    .spawn(move || everysec_loop(&shared))?,
            )
        } else {
            None
        };
        Ok(Self {
            shared,
            flusher: Mutex::new(Some(flusher)),
            syncer: Mutex::new(syncer),
        })
    }

    /// Opens (or creates) the segment at `path` for appending after `valid_len` bytes (0: a
    /// new segment, which gets a header).
    pub fn open_segment(path: &Path, valid_len: u64) -> io::Result<(Arc<dyn SegmentFile>, u64)> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(path)?;
        let len = if valid_len == 0 {
            file.set_len(0)?;
            let w = LogWriter::create(&file)?;
            let len = w.len();
            file.sync_data()?;
            len
        } else {
            valid_len
        };
        let file: Arc<dyn SegmentFile> = Arc::new(file);
        file.truncate(len)?;
        Ok((file, len))
    }

    /// The counters.
    pub fn stats(&self) -> Arc<LogStats> {
        Arc::clone(&self.shared.stats)
    }

    /// The fsync policy.
    pub fn policy(&self) -> FsyncPolicy {
        self.shared.policy
    }

    /// Switches to a new segment: everything appended before the call goes to the old one,
    /// which is synced first; everything after, to `file` (a new segment with its header
    /// written and synced). Blocks until done: call it from a blocking thread.
    pub fn rotate(&self, file: Arc<dyn SegmentFile>) -> io::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut p = self.shared.pending.lock();
            if p.closing {
                return Err(io::Error::other("the log is closed"));
            }
            p.rotate = Some((file, tx));
        }
        self.shared.wake.notify_one();
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::other("the log flusher stopped")))
    }

    /// Writes and syncs what is pending, then stops the threads. Later mutations are not
    /// logged (the node has stopped taking writes).
    pub fn close(&self) {
        self.shared.pending.lock().closing = true;
        self.shared.wake.notify_all();
        self.shared.tick.notify_all();
        if let Some(h) = self.flusher.lock().take() {
            let _ = h.join();
        }
        if let Some(h) = self.syncer.lock().take() {
            let _ = h.join();
        }
    }
}

impl Drop for AppendLog {
    fn drop(&mut self) {
        self.close();
    }
}

impl MutationSink for AppendLog {
    fn applied(&self, mutation: &Mutation) {
        let mut p = self.shared.pending.lock();
        if p.closing {
            return;
        }
        if encode_record(mutation, &mut p.buf).is_ok() {
            p.seq += 1;
        }
        drop(p);
        self.shared.wake.notify_one();
    }

    fn writable(&self) -> Result<(), String> {
        match &*self.shared.error.lock() {
            Some(e) => Err(format!(
                "the append-only file cannot be written ({e}); retried every second"
            )),
            None => Ok(()),
        }
    }

    fn barrier(&self) -> Option<DurableWait> {
        if let Err(e) = self.writable() {
            return Some(Box::pin(async move { Err(e) }));
        }
        let target = self.shared.pending.lock().seq;
        let always = self.shared.policy == FsyncPolicy::Always;
        let mut rx = self.shared.progress.subscribe();
        let shared = Arc::clone(&self.shared);
        let start = *rx.borrow();
        let done = move |p: &Progress| {
            if always {
                p.synced >= target
            } else {
                p.written >= target
            }
        };
        if done(&start) {
            return None;
        }
        Some(Box::pin(async move {
            let seen_failures = start.failures;
            loop {
                {
                    let p = *rx.borrow_and_update();
                    if done(&p) {
                        return Ok(());
                    }
                    if p.failures != seen_failures {
                        let e = shared.error.lock().clone().unwrap_or_default();
                        return Err(format!("the append-only file could not be written: {e}"));
                    }
                }
                if rx.changed().await.is_err() {
                    return Err("the append-only file was closed".into());
                }
            }
        }))
    }
}

fn fail(shared: &Shared, what: &str, e: &io::Error) {
    let first = shared
        .error
        .lock()
        .replace(format!("{what}: {e}"))
        .is_none();
    shared.stats.errors.fetch_add(1, Ordering::Relaxed);
    shared.stats.failed.store(true, Ordering::Relaxed);
    if first {
        tracing::error!(error = %e, "{what} failed: refusing writes until the append-only file can be written again");
    }
    shared.progress.send_modify(|p| p.failures += 1);
}

fn recovered(shared: &Shared) {
    if shared.error.lock().take().is_some() {
        shared.stats.failed.store(false, Ordering::Relaxed);
        tracing::warn!("the append-only file can be written again: accepting writes");
    }
}

fn timed_sync(shared: &Shared, file: &dyn SegmentFile) -> io::Result<()> {
    let began = Instant::now();
    let r = file.sync();
    (shared.on_fsync)(began.elapsed());
    shared.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
    r
}

/// The flusher: takes the pending buffer, writes it, syncs under `always`, handles
/// rotation, close and retries after failures.
fn flush_loop(shared: &Shared, mut file: Arc<dyn SegmentFile>, mut len: u64) {
    // Records taken but not yet written (kept across failures), and the last number in it.
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let (rotate, closing, carry_seq) = {
            let mut p = shared.pending.lock();
            let failed = shared.error.lock().is_some();
            while p.buf.is_empty()
                && p.rotate.is_none()
                && !p.closing
                && carry.is_empty()
                && !failed
            {
                shared.wake.wait(&mut p);
            }
            if failed && !p.closing && p.rotate.is_none() {
                // Wait before retrying; new records keep accumulating meanwhile.
                shared.wake.wait_for(&mut p, RETRY_AFTER);
            }
            if carry.is_empty() {
                std::mem::swap(&mut carry, &mut p.buf);
            } else {
                carry.extend_from_slice(&p.buf);
                p.buf.clear();
            }
            (p.rotate.take(), p.closing, p.seq)
        };
        if carry.is_empty() && shared.error.lock().is_some() {
            // A failed fsync with nothing left to write: retry the fsync.
            if timed_sync(shared, &*file).is_ok() {
                shared.progress.send_modify(|p| p.synced = p.written);
                recovered(shared);
            }
        }
        if !carry.is_empty() {
            match file.append(&carry) {
                Ok(()) => {
                    len += carry.len() as u64;
                    shared
                        .stats
                        .bytes_written
                        .fetch_add(carry.len() as u64, Ordering::Relaxed);
                    shared.stats.segment_bytes.store(len, Ordering::Relaxed);
                    carry.clear();
                    let synced = shared.policy != FsyncPolicy::Always
                        || match timed_sync(shared, &*file) {
                            Ok(()) => true,
                            Err(e) => {
                                fail(shared, "fsync of the append-only file", &e);
                                false
                            }
                        };
                    shared.progress.send_modify(|p| {
                        p.written = carry_seq;
                        if synced && shared.policy == FsyncPolicy::Always {
                            p.synced = carry_seq;
                        }
                    });
                    if synced {
                        recovered(shared);
                    }
                }
                Err(e) => {
                    // A partial write leaves part of a record: cut back to the last whole one.
                    if let Err(t) = file.truncate(len) {
                        tracing::error!(error = %t, "cannot cut the append-only file back after a failed write");
                    }
                    fail(shared, "write to the append-only file", &e);
                }
            }
        }
        if let Some((next, reply)) = rotate {
            let result = if carry.is_empty() {
                timed_sync(shared, &*file).map(|()| {
                    file = Arc::clone(&next);
                    *shared.current.lock() = next;
                    len = crate::log::HEADER_LEN;
                    shared.stats.segment_bytes.store(len, Ordering::Relaxed);
                })
            } else {
                Err(io::Error::other(
                    "the current segment cannot be written; not rotating",
                ))
            };
            let _ = reply.send(result);
        }
        if closing {
            if carry.is_empty() {
                let _ = timed_sync(shared, &*file);
                shared.progress.send_modify(|p| p.synced = p.written);
            }
            return;
        }
    }
}

/// `everysec`: fsyncs the current segment once per second when something was written.
fn everysec_loop(shared: &Shared) {
    let mut synced_up_to = 0u64;
    loop {
        {
            let mut p = shared.pending.lock();
            if p.closing {
                return;
            }
            shared.tick.wait_for(&mut p, Duration::from_secs(1));
            if p.closing {
                return;
            }
        }
        let written = shared.progress.borrow().written;
        if written == synced_up_to {
            continue;
        }
        let file = Arc::clone(&*shared.current.lock());
        match timed_sync(shared, &*file) {
            Ok(()) => {
                synced_up_to = written;
                shared
                    .progress
                    .send_modify(|p| p.synced = p.synced.max(written));
            }
            Err(e) => fail(shared, "fsync of the append-only file", &e),
        }
    }
}

/// The path of log segment `generation` in `dir`.
pub fn segment_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("log-{generation:010}.aof"))
}
