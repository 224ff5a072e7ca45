//! The engine against its reference model on arbitrary operation sequences: the first byte
//! picks the setup (shards, item cap, eviction on or off, LRU or SIEVE), every further three
//! bytes one operation (`cache_core::model::Op::decode_all`). After every step the engine's
//! answers, list order, accounting and `validate()` must agree with the model.
#![no_main]

use cache_core::model::{self, Op, Setup};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&setup, rest)) = data.split_first() else {
        return;
    };
    let ops = Op::decode_all(rest);
    if let Err(e) = model::run(&ops, Setup::decode(setup)) {
        panic!("engine and model disagree: {e}");
    }
});
