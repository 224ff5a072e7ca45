//! The gossip message decoder on arbitrary datagrams: no panic, no allocation beyond the
//! message limits (run with `-malloc_limit_mb=64`); what decodes re-encodes.
#![no_main]

use cluster_membership::swim::wire::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode("fuzz", data) {
        let again = encode("fuzz", &msg);
        assert!(decode("fuzz", &again).is_ok(), "a decoded message re-encodes");
    }
});
