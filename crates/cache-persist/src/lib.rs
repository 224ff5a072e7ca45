//! `cache-persist`: cache-cluster's persistence — an append-only log of every applied
//! mutation plus periodic snapshots, the way Redis pairs its AOF and RDB.
//!
//! - [`log`]: the on-disk format shared by log segments and snapshots — a versioned header,
//!   then records framed by length and CRC32C. Its reader bounds every length before it
//!   allocates, tells a torn tail (the last record cut by a crash: cut off with a warning)
//!   from corruption in the middle (refuse to start), and never panics on any input.
//! - [`aof`]: [`AppendLog`], the store's mutation sink: group commit, `appendfsync
//!   always|everysec|no`, writes refused while the file cannot be written.
//! - [`data_dir`]: [`Persistence`] — recovery at start, snapshots, compaction — and
//!   [`check`], the `cache-node check-data` verifier and repairer.
//!
//! The design and its measured costs are in `docs/why/persistence.md`.

#![forbid(unsafe_code)]

pub mod aof;
pub mod data_dir;
pub mod log;

pub use aof::{AppendLog, FsyncPolicy, LogStats, SegmentFile};
pub use data_dir::{
    FileCheck, PersistConfig, PersistError, Persistence, RecoveryReport, SnapshotReport,
    SnapshotStats, check,
};
pub use log::{
    FileKind, LogError, LogLimits, LogReader, LogWriter, ScanOutcome, ScanReport, fuzz_read, scan,
};
