//! The RESP request parser on arbitrary bytes, consumed command by command as a connection
//! does: no panic, every argument inside the command that holds it, progress on every
//! command, and nothing accepted beyond the limits (run with `-malloc_limit_mb=64`).
#![no_main]

use cache_rpc::resp::parse::{ParseLimits, Parsed, parse};
use libfuzzer_sys::fuzz_target;

const LIMITS: ParseLimits = ParseLimits {
    max_args: 64,
    max_arg_bytes: 512,
    max_inline_bytes: 1024,
    max_command_bytes: 4096,
};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut args = Vec::new();
    while !rest.is_empty() {
        match parse(rest, &LIMITS, &mut args) {
            Ok(Parsed::Command(n)) => {
                assert!(n > 0 && n <= rest.len(), "a command takes bytes from the buffer");
                assert!(n <= LIMITS.max_command_bytes.max(LIMITS.max_inline_bytes + 1));
                assert!(args.len() <= LIMITS.max_args);
                for r in &args {
                    assert!(r.end <= n && r.start <= r.end);
                    assert!(r.len() <= LIMITS.max_arg_bytes.max(LIMITS.max_inline_bytes));
                }
                rest = &rest[n..];
            }
            Ok(Parsed::Incomplete(need)) => {
                assert!(need > rest.len(), "incomplete means more bytes are needed");
                break;
            }
            Err(_) => break,
        }
    }
});
