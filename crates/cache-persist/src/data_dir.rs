//! The data directory: recovery at start, snapshots, compaction, and `check-data`.
//!
//! ```text
//! DIR/snapshot-0000000007.snap   the newest complete snapshot (generation 7)
//! DIR/log-0000000007.aof         mutations applied since snapshot 7 began
//! DIR/log-0000000008.aof         (a later segment, if a snapshot was interrupted)
//! DIR/*.tmp                      a snapshot being written (deleted at start)
//! ```
//!
//! **A snapshot of generation `g`** is taken in three steps: (1) the log moves to a new
//! segment `log-g` (the old one is synced first), (2) the engine is scanned shard by shard
//! into `snapshot-g.snap.tmp`, which is synced, renamed and the directory synced, (3) older
//! snapshots and segments are deleted. The scan in step 2 runs while writes continue, so
//! the snapshot is *fuzzy*: an entry may already reflect a mutation that is also in `log-g`.
//! That is harmless because every mutation carries its version and loading is last writer
//! wins: replaying `log-g` over `snapshot-g` ends in the same state whatever the overlap.
//!
//! **Recovery** loads the newest snapshot, then replays every segment of that generation or
//! later, in order. A crash at any point leaves a loadable set: before the rename, the
//! previous snapshot and every segment since it are still there (step 3 runs only after the
//! new snapshot is durable).
//!
//! **Damage**: the last segment may end in a torn record (a crash mid-append): it is cut
//! off with a warning naming the file and offset. Anything else — a bad record followed by
//! more data, a torn record in an older segment, a snapshot without its end record — is
//! corruption: the node refuses to start and names the file, the offset and the command
//! that repairs it ([`check`] with `repair`), which cuts the file at the first bad record.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cache_core::VersionedRead;
use cluster_core::{Mutation, MutationOp, Store};
use parking_lot::Mutex;

use crate::aof::{AppendLog, FsyncPolicy, LogStats, segment_path};
use crate::log::{FileKind, LogError, LogLimits, LogReader, LogWriter};

/// How many recovered mutations are applied per call into the store.
const RESTORE_BATCH: usize = 4096;
/// Keys read from the engine per step of a snapshot scan.
const SNAPSHOT_CHUNK: usize = 256;

/// Persistence settings.
#[derive(Debug, Clone)]
pub struct PersistConfig {
    /// The data directory (created if missing).
    pub dir: PathBuf,
    /// When the log is fsynced.
    pub fsync: FsyncPolicy,
    /// A snapshot this often (`None`: only on demand and for compaction).
    pub snapshot_interval: Option<Duration>,
    /// Compaction starts once the current log segment is at least this large...
    pub rewrite_min_bytes: u64,
    /// ...and at least this percentage of the last snapshot's size.
    pub rewrite_percentage: u64,
    /// Bounds on keys and values read back (the node's own limits).
    pub limits: LogLimits,
}

/// Why the data directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A file is damaged beyond a torn tail: the node must not start on it.
    #[error(
        "{path} is corrupt at byte {offset}: {detail}; run `cache-node check-data {dir} --repair` to cut it there (the records after that offset are lost; keep a copy of the directory first)"
    )]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
        /// Where the first bad record starts.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// A file's header is not this format (another program's file, or a newer version).
    #[error("{path}: {detail}")]
    Foreign {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// An I/O error.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> PersistError {
    let what = what.into();
    move |source| PersistError::Io { what, source }
}

/// What recovery found and loaded.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// The snapshot loaded and its entries.
    pub snapshot: Option<(PathBuf, u64)>,
    /// Log segments replayed.
    pub segments: usize,
    /// Records read (snapshot entries and log records).
    pub records: u64,
    /// Records that changed the state.
    pub applied: u64,
    /// Values skipped because they had expired.
    pub expired: u64,
    /// Records the engine refused (over the current limits or out of memory).
    pub refused: u64,
    /// A torn tail cut off: the file and the offset.
    pub torn: Option<(PathBuf, u64)>,
    /// How long recovery took.
    pub took: Duration,
}

/// What a snapshot wrote.
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    /// The snapshot file.
    pub path: PathBuf,
    /// Entries written (live values and tombstones).
    pub entries: u64,
    /// Its size in bytes.
    pub bytes: u64,
    /// How long it took.
    pub took: Duration,
}

/// Snapshot counters for `/metrics` and `/status`.
#[derive(Debug, Default)]
pub struct SnapshotStats {
    /// Snapshots completed.
    pub completed: AtomicU64,
    /// Snapshots that failed.
    pub failed: AtomicU64,
    /// Unix seconds of the last completed snapshot (0: none yet).
    pub last_unix_secs: AtomicU64,
    /// Its duration in milliseconds.
    pub last_duration_ms: AtomicU64,
    /// Its size in bytes.
    pub last_bytes: AtomicU64,
    /// Its entries.
    pub last_entries: AtomicU64,
}

/// The files of a data directory, by generation.
#[derive(Debug, Default)]
struct Listing {
    snapshots: Vec<u64>,
    logs: Vec<u64>,
    temporary: Vec<PathBuf>,
}

fn generation(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

fn list(dir: &Path) -> Result<Listing, PersistError> {
    let mut out = Listing::default();
    let entries = fs::read_dir(dir).map_err(io_err(format!("read {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(io_err(format!("read {}", dir.display())))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") {
            out.temporary.push(entry.path());
        } else if let Some(g) = generation(&name, "snapshot-", ".snap") {
            out.snapshots.push(g);
        } else if let Some(g) = generation(&name, "log-", ".aof") {
            out.logs.push(g);
        }
    }
    out.snapshots.sort_unstable();
    out.logs.sort_unstable();
    Ok(out)
}

/// The path of snapshot `generation` in `dir`.
pub fn snapshot_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("snapshot-{generation:010}.snap"))
}

/// Makes a rename or a new file in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), PersistError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("fsync directory {}", dir.display())))
}

fn read_error(path: &Path, dir: &Path, e: LogError) -> PersistError {
    match e {
        LogError::Header(detail) => PersistError::Foreign {
            path: path.to_path_buf(),
            detail,
        },
        LogError::Corrupt { offset, detail } => PersistError::Corrupt {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            offset,
            detail,
        },
        LogError::Io(source) => PersistError::Io {
            what: format!("read {}", path.display()),
            source,
        },
    }
}

/// Reads a whole file of `kind` and hands its records to `sink` in batches. Returns the
/// reader's final state: records read, the valid length, a torn tail and, for snapshots,
/// the END count.
struct FileRead {
    records: u64,
    valid_len: u64,
    torn: Option<(u64, String)>,
    end_count: Option<u64>,
}

fn read_file(
    path: &Path,
    dir: &Path,
    kind: FileKind,
    limits: LogLimits,
    mut sink: impl FnMut(&[Mutation]),
) -> Result<FileRead, PersistError> {
    let file = File::open(path).map_err(io_err(format!("open {}", path.display())))?;
    let mut reader = LogReader::open_kind(BufReader::with_capacity(1 << 20, file), kind, limits)
        .map_err(|e| read_error(path, dir, e))?;
    let mut batch = Vec::with_capacity(RESTORE_BATCH);
    let mut records = 0u64;
    loop {
        match reader.next_record() {
            Ok(Some(m)) => {
                records += 1;
                batch.push(m);
                if batch.len() == RESTORE_BATCH {
                    sink(&batch);
                    batch.clear();
                }
            }
            Ok(None) => break,
            Err(e) => return Err(read_error(path, dir, e)),
        }
    }
    sink(&batch);
    Ok(FileRead {
        records,
        valid_len: reader.offset(),
        torn: reader.torn_tail().map(|(o, d)| (o, d.to_string())),
        end_count: reader.end_count(),
    })
}

/// Where the log continues after recovery.
struct Resume {
    generation: u64,
    valid_len: u64,
}

/// Loads `dir` into `store` (see the module docs). Creates `dir` if missing, deletes
/// leftover temporary files, cuts a torn tail off the last segment.
fn recover(
    dir: &Path,
    store: &Store,
    limits: LogLimits,
) -> Result<(RecoveryReport, Resume), PersistError> {
    let began = Instant::now();
    fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
    let listing = list(dir)?;
    for tmp in &listing.temporary {
        tracing::info!(file = %tmp.display(), "deleting an unfinished snapshot");
        fs::remove_file(tmp).map_err(io_err(format!("delete {}", tmp.display())))?;
    }
    let mut report = RecoveryReport::default();
    let apply = |batch: &[Mutation], report: &mut RecoveryReport| {
        let r = store.restore(batch);
        report.applied += r.applied;
        report.expired += r.expired;
        report.refused += r.refused;
    };
    let base = listing.snapshots.last().copied();
    if let Some(g) = base {
        let path = snapshot_path(dir, g);
        let read = read_file(&path, dir, FileKind::Snapshot, limits, |b| {
            apply(b, &mut report);
        })?;
        match read.end_count {
            Some(n) if n == read.records => {}
            Some(n) => {
                return Err(PersistError::Corrupt {
                    path,
                    dir: dir.to_path_buf(),
                    offset: read.valid_len,
                    detail: format!(
                        "its end record counts {n} entries, {} were read",
                        read.records
                    ),
                });
            }
            None => {
                let (offset, detail) = read
                    .torn
                    .unwrap_or((read.valid_len, "the end record is missing".into()));
                return Err(PersistError::Corrupt {
                    path,
                    dir: dir.to_path_buf(),
                    offset,
                    detail: format!("incomplete snapshot: {detail}"),
                });
            }
        }
        report.records += read.records;
        report.snapshot = Some((path, read.records));
    }
    let segments: Vec<u64> = listing
        .logs
        .iter()
        .copied()
        .filter(|g| base.is_none_or(|b| *g >= b))
        .collect();
    let mut resume = Resume {
        generation: base.unwrap_or(1).max(1),
        valid_len: 0,
    };
    for (n, &g) in segments.iter().enumerate() {
        let path = segment_path(dir, g);
        let last = n + 1 == segments.len();
        let read = read_file(&path, dir, FileKind::Log, limits, |b| {
            apply(b, &mut report);
        })?;
        report.records += read.records;
        report.segments += 1;
        if let Some((offset, detail)) = read.torn {
            if !last {
                return Err(PersistError::Corrupt {
                    path,
                    dir: dir.to_path_buf(),
                    offset,
                    detail: format!("{detail} (in a segment that is not the last)"),
                });
            }
            tracing::warn!(
                file = %path.display(),
                offset,
                detail,
                "cutting off a torn record at the end of the append-only file (a crash during a write)"
            );
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err(format!("open {}", path.display())))?;
            f.set_len(offset)
                .and_then(|()| f.sync_all())
                .map_err(io_err(format!("truncate {}", path.display())))?;
            report.torn = Some((path.clone(), offset));
        }
        if last {
            resume = Resume {
                generation: g,
                valid_len: read.valid_len,
            };
        }
    }
    report.took = began.elapsed();
    Ok((report, resume))
}

struct Generation {
    current: u64,
    snapshot_bytes: u64,
}

/// A node's persistence: the append-only log registered as the store's sink, snapshots and
/// compaction. See the module docs.
pub struct Persistence {
    config: PersistConfig,
    store: Arc<Store>,
    log: Arc<AppendLog>,
    generation: Mutex<Generation>,
    /// One snapshot at a time.
    snapshotting: Mutex<()>,
    snapshots: SnapshotStats,
    recovery: RecoveryReport,
}

impl std::fmt::Debug for Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persistence")
            .field("dir", &self.config.dir)
            .field("fsync", &self.config.fsync)
            .finish_non_exhaustive()
    }
}

impl Persistence {
    /// Recovers `config.dir` into `store` (which must be empty and not yet serving), then
    /// starts the append-only log and registers it as the store's sink: from now on every
    /// applied mutation is logged. `on_fsync` hears every fsync's duration.
    pub fn open(
        config: PersistConfig,
        store: Arc<Store>,
        on_fsync: Box<dyn Fn(Duration) + Send + Sync>,
    ) -> Result<Arc<Self>, PersistError> {
        let (recovery, resume) = recover(&config.dir, &store, config.limits)?;
        let path = segment_path(&config.dir, resume.generation);
        let (file, len) = AppendLog::open_segment(&path, resume.valid_len)
            .map_err(io_err(format!("open {}", path.display())))?;
        sync_dir(&config.dir)?;
        let log = Arc::new(
            AppendLog::start(file, len, config.fsync, on_fsync)
                .map_err(io_err("start the log flusher"))?,
        );
        store.add_sink(Arc::clone(&log) as Arc<dyn cluster_core::MutationSink>);
        let snapshot_bytes = fs::metadata(snapshot_path(&config.dir, resume.generation))
            .map(|m| m.len())
            .unwrap_or(0);
        Ok(Arc::new(Self {
            config,
            store,
            log,
            generation: Mutex::new(Generation {
                current: resume.generation,
                snapshot_bytes,
            }),
            snapshotting: Mutex::new(()),
            snapshots: SnapshotStats::default(),
            recovery,
        }))
    }

    /// What recovery loaded at start.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The settings.
    pub fn config(&self) -> &PersistConfig {
        &self.config
    }

    /// The log's counters.
    pub fn log_stats(&self) -> Arc<LogStats> {
        self.log.stats()
    }

    /// Snapshot counters.
    pub fn snapshot_stats(&self) -> &SnapshotStats {
        &self.snapshots
    }

    /// Whether the log has grown enough over the last snapshot to compact it (see
    /// [`PersistConfig::rewrite_min_bytes`] and [`PersistConfig::rewrite_percentage`]).
    pub fn needs_compaction(&self) -> bool {
        let size = self.log.stats().segment_bytes.load(Ordering::Relaxed);
        let base = self.generation.lock().snapshot_bytes;
        size >= self.config.rewrite_min_bytes
            && u128::from(size) * 100
                >= u128::from(base) * u128::from(self.config.rewrite_percentage)
    }

    /// Takes a snapshot now (see the module docs) and deletes what it replaces. Blocks for
    /// the whole scan: call it from a blocking thread. A second call while one runs waits
    /// for it and takes another.
    pub fn snapshot(&self) -> Result<SnapshotReport, PersistError> {
        let _one = self.snapshotting.lock();
        let result = self.snapshot_inner();
        match &result {
            Ok(r) => {
                let s = &self.snapshots;
                s.completed.fetch_add(1, Ordering::Relaxed);
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                s.last_unix_secs.store(now, Ordering::Relaxed);
                s.last_duration_ms.store(
                    u64::try_from(r.took.as_millis()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                s.last_bytes.store(r.bytes, Ordering::Relaxed);
                s.last_entries.store(r.entries, Ordering::Relaxed);
                tracing::info!(
                    file = %r.path.display(),
                    entries = r.entries,
                    bytes = r.bytes,
                    took_ms = r.took.as_millis() as u64,
                    "snapshot written"
                );
            }
            Err(e) => {
                self.snapshots.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "snapshot failed; the previous snapshot and the log still hold everything");
            }
        }
        result
    }

    fn snapshot_inner(&self) -> Result<SnapshotReport, PersistError> {
        let began = Instant::now();
        let dir = &self.config.dir;
        let next = self.generation.lock().current + 1;
        // 1. New mutations go to a new segment.
        let seg = segment_path(dir, next);
        let (file, _) = AppendLog::open_segment(&seg, 0)
            .map_err(io_err(format!("create {}", seg.display())))?;
        sync_dir(dir)?;
        self.log
            .rotate(file)
            .map_err(io_err(format!("switch the log to {}", seg.display())))?;
        self.generation.lock().current = next;
        // 2. The engine, shard by shard, into a temporary file.
        let path = snapshot_path(dir, next);
        let tmp = path.with_extension("snap.tmp");
        let entries = self.write_snapshot(&tmp)?;
        fs::rename(&tmp, &path).map_err(io_err(format!("rename {}", tmp.display())))?;
        sync_dir(dir)?;
        let bytes = fs::metadata(&path).map_or(0, |m| m.len());
        self.generation.lock().snapshot_bytes = bytes;
        // 3. What it replaces.
        let listing = list(dir)?;
        for g in listing.snapshots.iter().filter(|g| **g < next) {
            let _ = fs::remove_file(snapshot_path(dir, *g));
        }
        for g in listing.logs.iter().filter(|g| **g < next) {
            let _ = fs::remove_file(segment_path(dir, *g));
        }
        sync_dir(dir)?;
        Ok(SnapshotReport {
            path,
            entries,
            bytes,
            took: began.elapsed(),
        })
    }

    fn write_snapshot(&self, tmp: &Path) -> Result<u64, PersistError> {
        let what = || format!("write {}", tmp.display());
        let file = File::create(tmp).map_err(io_err(what()))?;
        let mut out =
            LogWriter::create_kind(BufWriter::with_capacity(1 << 20, file), FileKind::Snapshot)
                .map_err(io_err(what()))?;
        let engine = self.store.engine();
        let mut count = 0u64;
        // A complete scan: every key held for the whole snapshot is in it, whatever the
        // engine moves meanwhile (the log segments before the snapshot are deleted after it,
        // so a key the scan missed would be lost for good).
        let mut scan = engine.scanner();
        loop {
            // Pacing: after each chunk, rest as long as it took, so a snapshot uses at most
            // about half of one core and leaves the rest to requests (on a node with one
            // core, an unpaced snapshot cut throughput to 0.29× and raised p99 16×).
            let began = Instant::now();
            let Some(keys) = scan.versions(SNAPSHOT_CHUNK) else {
                break;
            };
            for kv in keys {
                let m = match engine.peek_versioned(&kv.key) {
                    Some(VersionedRead::Live(l)) => Mutation {
                        key: kv.key,
                        version: l.version,
                        op: MutationOp::Put {
                            value: l.value,
                            expires_at: l.expires_at,
                        },
                    },
                    Some(VersionedRead::Dead { version }) => Mutation {
                        key: kv.key,
                        version,
                        op: MutationOp::Delete,
                    },
                    // Gone since the scan listed it (evicted): its delete is not a
                    // mutation, and nothing older can come back from this snapshot.
                    None => continue,
                };
                if m.version == 0 {
                    continue;
                }
                out.append(&m).map_err(io_err(what()))?;
                count += 1;
            }
            std::thread::sleep(began.elapsed());
        }
        out.finish_snapshot(count).map_err(io_err(what()))?;
        let file = out
            .into_inner()
            .into_inner()
            .map_err(|e| PersistError::Io {
                what: what(),
                source: e.into_error(),
            })?;
        file.sync_all().map_err(io_err(what()))?;
        Ok(count)
    }

    /// Stops logging: writes and syncs what is pending. Call it when the node has stopped
    /// taking writes.
    pub fn close(&self) {
        self.log.close();
    }
}

/// What `check-data` found in one file.
#[derive(Debug, Clone)]
pub struct FileCheck {
    /// The file.
    pub path: PathBuf,
    /// Valid records.
    pub records: u64,
    /// Its size.
    pub bytes: u64,
    /// `None` if it is sound, else the offset of the first bad byte and what is wrong.
    pub problem: Option<(u64, String)>,
    /// Whether `--repair` cut it.
    pub repaired: bool,
}

/// Checks every snapshot and log segment in `dir` (like `redis-check-aof`); with `repair`,
/// cuts each damaged file at its first bad record (a snapshot also gets its end record
/// back, so it loads with the entries before the damage). Never changes a sound file.
pub fn check(dir: &Path, limits: LogLimits, repair: bool) -> Result<Vec<FileCheck>, PersistError> {
    let listing = list(dir)?;
    let mut files: Vec<(PathBuf, FileKind)> = listing
        .snapshots
        .iter()
        .map(|g| (snapshot_path(dir, *g), FileKind::Snapshot))
        .collect();
    files.extend(
        listing
            .logs
            .iter()
            .map(|g| (segment_path(dir, *g), FileKind::Log)),
    );
    let mut out = Vec::new();
    for (path, kind) in files {
        let bytes = fs::metadata(&path).map_or(0, |m| m.len());
        let read = read_file(&path, dir, kind, limits, |_| {});
        let (records, problem, valid_len) = match read {
            Ok(r) => {
                let problem = match (kind, r.torn, r.end_count) {
                    (_, Some((o, d)), _) => Some((o, d)),
                    (FileKind::Snapshot, None, None) => {
                        Some((r.valid_len, "the end record is missing".into()))
                    }
                    (FileKind::Snapshot, None, Some(n)) if n != r.records => Some((
                        r.valid_len,
                        format!("the end record counts {n} entries, {} were read", r.records),
                    )),
                    _ => None,
                };
                (r.records, problem, r.valid_len)
            }
            Err(PersistError::Corrupt { offset, detail, .. }) => {
                // Count the valid records before the damage.
                let mut n = 0u64;
                let file = File::open(&path).map_err(io_err(format!("open {}", path.display())))?;
                if let Ok(mut reader) = LogReader::open_kind(BufReader::new(file), kind, limits) {
                    while reader.offset() < offset {
                        match reader.next_record() {
                            Ok(Some(_)) => n += 1,
                            _ => break,
                        }
                    }
                }
                (n, Some((offset, detail)), offset)
            }
            Err(e) => return Err(e),
        };
        let mut repaired = false;
        if repair && problem.is_some() {
            cut(&path, kind, valid_len, records)?;
            repaired = true;
        }
        out.push(FileCheck {
            path,
            records,
            bytes,
            problem,
            repaired,
        });
    }
    Ok(out)
}

/// Cuts `path` to `len` bytes; a snapshot gets an end record for its `records` entries.
fn cut(path: &Path, kind: FileKind, len: u64, records: u64) -> Result<(), PersistError> {
    let what = || format!("repair {}", path.display());
    let file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(what()))?;
    file.set_len(len).map_err(io_err(what()))?;
    if kind == FileKind::Snapshot {
        use std::io::Seek;
        let mut f = &file;
        f.seek(io::SeekFrom::Start(len)).map_err(io_err(what()))?;
        let mut w = LogWriter::append_to(&file, len);
        w.finish_snapshot(records).map_err(io_err(what()))?;
        w.get_mut().flush().map_err(io_err(what()))?;
    }
    file.sync_all().map_err(io_err(what()))
}
