//! The peer protocol's apply path on arbitrary bytes: a `Replicate` request decoded by
//! prost, converted by the node's wire layer and applied by the store — every entry checked
//! first (sizes, versions against the clock drift); no panic, no unbounded allocation.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use cache_core::CacheConfig;
use cache_proto::peer::v1::ReplicateRequest;
use cluster_core::{Limits, NodeClock, Store};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(|| {
        Store::new(
            "fuzz",
            CacheConfig::new().with_max_bytes(16 << 20),
            NodeClock::System,
            Limits::default(),
            Duration::from_secs(5),
        )
        .expect("valid store")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = ReplicateRequest::decode(data) else {
        return;
    };
    let Ok(mutations) = req
        .mutations
        .into_iter()
        .map(cache_rpc::wire::mutation)
        .collect::<Result<Vec<_>, _>>()
    else {
        return;
    };
    let _ = store().apply_replicated(&mutations);
});
