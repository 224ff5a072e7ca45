//! The append-only log reader on arbitrary bytes: no panic, no allocation beyond one record
//! of the limits (run with `-malloc_limit_mb=64`), `scan` agreeing with the reader.
#![no_main]

use cache_persist::{FileKind, LogLimits, fuzz_read};
use libfuzzer_sys::fuzz_target;

const LIMITS: LogLimits = LogLimits {
    max_key_bytes: 1024,
    max_value_bytes: 64 * 1024,
};

fuzz_target!(|data: &[u8]| {
    // Half the inputs get a valid header, so the fuzzer reaches the records quickly.
    let mut with_header = b"CCAOF\0\0\x01".to_vec();
    with_header.extend_from_slice(data);
    fuzz_read(&with_header, FileKind::Log, LIMITS);
    fuzz_read(data, FileKind::Log, LIMITS);
});
