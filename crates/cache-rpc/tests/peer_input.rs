//! The peer protocol's apply path on hostile input, bounded for CI (the unbounded run is the
//! `peer_apply` fuzz target in `fuzz/`): arbitrary bytes decoded as a `Replicate` request,
//! converted by the wire layer and applied by the store never panic, and a batch with any
//! bad entry changes nothing.

use std::time::Duration;

use cache_core::CacheConfig;
use cache_proto::peer::v1::ReplicateRequest;
use cluster_core::{Limits, NodeClock, Store};
use proptest::prelude::*;
use prost::Message;

fn store() -> Store {
    Store::new(
        "peer-input",
        CacheConfig::new().with_max_bytes(4 << 20),
        NodeClock::System,
        Limits::default(),
        Duration::from_secs(5),
    )
    .expect("valid store")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_replicate_requests_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let s = store();
        if let Ok(req) = ReplicateRequest::decode(bytes.as_slice())
            && let Ok(ms) = req
                .mutations
                .into_iter()
                .map(cache_rpc::wire::mutation)
                .collect::<Result<Vec<_>, _>>()
        {
            let before = s.stats().items;
            if s.apply_replicated(&ms).is_err() {
                prop_assert_eq!(s.stats().items, before, "a refused batch changed the store");
            }
        }
    }
}
