//! `cache-persist`: cache-cluster's on-disk formats.
//!
//! - [`log`]: the append-only log of [`Mutation`](cluster_core::Mutation)s — a versioned file
//!   header, then records framed by length and CRC32C. Its reader bounds every length before
//!   it allocates, tells a torn tail (the last record cut by a crash: cut off with a warning)
//!   from corruption in the middle (refuse to start), and never panics on any input.
//!
//! This crate is the first step of the persistence issue: the format and its reader, tested
//! alone. The store's mutation sink, fsync policies, snapshots, compaction and recovery at
//! start build on it.

#![forbid(unsafe_code)]

pub mod log;

pub use log::{LogError, LogLimits, LogReader, LogWriter, ScanOutcome, ScanReport, scan};
