//! The snapshot reader on arbitrary bytes: no panic, no allocation beyond one record of the
//! limits (run with `-malloc_limit_mb=64`).
#![no_main]

use cache_persist::{FileKind, LogLimits, fuzz_read};
use libfuzzer_sys::fuzz_target;

const LIMITS: LogLimits = LogLimits {
    max_key_bytes: 1024,
    max_value_bytes: 64 * 1024,
};

fuzz_target!(|data: &[u8]| {
    let mut with_header = b"CCSNP\0\0\x01".to_vec();
    with_header.extend_from_slice(data);
    fuzz_read(&with_header, FileKind::Snapshot, LIMITS);
});
