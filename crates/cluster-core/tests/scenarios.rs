//! The bugs the cluster-core issue reported, each reproduced in the simulator (or on the
//! store) and now fixed. Time is paused: timeouts elapse instantly and deterministically.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cluster_core::sim::{SimCluster, SimConfig};
use cluster_core::{
    Condition, Consistency, CoreError, Mutation, MutationOp, MutationSink, NodeClock, PeerCall,
    Request, RequestContext, Response, SetCommand, Store,
};
use parking_lot::Mutex;

const T: Duration = Duration::from_millis(800);

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn set(key: &str, value: &str, c: Consistency) -> Request {
    Request::Set {
        cmd: SetCommand {
            key: b(key),
            value: b(value),
            ttl_ms: None,
            condition: Condition::Always,
        },
        consistency: Some(c),
    }
}

fn set_ttl(key: &str, value: &str, ttl_ms: u64, c: Consistency) -> Request {
    Request::Set {
        cmd: SetCommand {
            key: b(key),
            value: b(value),
            ttl_ms: Some(ttl_ms),
            condition: Condition::Always,
        },
        consistency: Some(c),
    }
}

fn get(key: &str, c: Consistency) -> Request {
    Request::Get {
        key: b(key),
        consistency: Some(c),
    }
}

fn del(key: &str, c: Consistency) -> Request {
    Request::Delete {
        key: b(key),
        consistency: Some(c),
    }
}

fn value(r: Result<Response, CoreError>) -> Option<Bytes> {
    match r.expect("request succeeds") {
        Response::Get(found) => found.map(|l| l.value),
        other => panic!("not a get response: {other:?}"),
    }
}

/// Replica indexes of `key`, primary first.
fn replicas(c: &SimCluster, key: &str) -> Vec<usize> {
    c.node(0)
        .ring()
        .load()
        .replicas(key.as_bytes())
        .iter()
        .map(|id| c.index_of(id))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn quorum_get_after_delete_never_returns_the_deleted_value() {
    let c = SimCluster::new(SimConfig::default());
    for i in 0..200 {
        let key = format!("k{i}");
        let r = replicas(&c, &key);
        // Set then delete at ONE through the primary; the replicas may not have either yet.
        c.request(r[0], set(&key, "v", Consistency::One), T)
            .await
            .expect("set");
        match c.request(r[0], del(&key, Consistency::One), T).await {
            Ok(Response::Delete { deleted }) => assert!(deleted),
            other => panic!("delete: {other:?}"),
        }
        for via in 0..3 {
            assert_eq!(
                value(c.request(via, get(&key, Consistency::Quorum), T).await),
                None,
                "key {key} via n{via}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn quorum_get_after_quorum_delete_with_a_replica_paused() {
    let c = SimCluster::new(SimConfig::default());
    for i in 0..30 {
        let key = format!("p{i}");
        let r = replicas(&c, &key);
        c.request(r[0], set(&key, "old", Consistency::All), T)
            .await
            .expect("set at ALL");
        // The last replica misses the delete.
        c.pause(r[2]);
        c.request(r[1], del(&key, Consistency::Quorum), T)
            .await
            .expect("quorum delete with one replica paused");
        c.resume(r[2]);
        // Whoever coordinates the read, it overlaps the delete's quorum.
        c.pause(r[1]);
        for via in [r[0], r[2]] {
            assert_eq!(
                value(c.request(via, get(&key, Consistency::Quorum), T).await),
                None,
                "key {key} via n{via}"
            );
        }
        c.resume(r[1]);
    }
}

#[tokio::test(start_paused = true)]
async fn quorum_get_after_an_expiry_never_returns_an_older_value() {
    let c = SimCluster::new(SimConfig::default());
    let key = "expiring";
    let r = replicas(&c, key);
    c.request(r[0], set(key, "forever", Consistency::All), T)
        .await
        .expect("set at ALL");
    // The newer write, with a TTL, reaches a quorum but not the paused replica.
    c.pause(r[2]);
    c.request(r[0], set_ttl(key, "brief", 1_000, Consistency::Quorum), T)
        .await
        .expect("quorum set");
    assert_eq!(
        value(c.request(r[0], get(key, Consistency::Quorum), T).await),
        Some(b("brief"))
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for i in 0..3 {
        // The reaper has run everywhere: expired versioned values are tombstones now.
        let _ = c.node(i).store().engine().reap(1024);
    }
    c.resume(r[2]);
    // The paused replica still holds "forever" (older version, no TTL).
    for via in 0..3 {
        assert_eq!(
            value(c.request(via, get(key, Consistency::Quorum), T).await),
            None,
            "via n{via}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn one_reads_go_to_the_primary_so_one_writes_are_read_back() {
    let c = SimCluster::new(SimConfig::default());
    for i in 0..100 {
        let key = format!("ryw{i}");
        let via = i % 3;
        c.request(via, set(&key, &format!("v{i}"), Consistency::One), T)
            .await
            .expect("set");
        assert_eq!(
            value(
                c.request((via + 1) % 3, get(&key, Consistency::One), T)
                    .await
            ),
            Some(b(&format!("v{i}"))),
            "read-your-writes through another node at ONE"
        );
    }
}

/// The lent read (`read_here`, RESP's `GET`) answers exactly when and what the general path
/// answers from the key's primary, and hands every other case back to it.
#[tokio::test(start_paused = true)]
async fn a_lent_read_answers_only_what_the_primary_answers_alone() {
    let c = SimCluster::new(SimConfig::default());
    for i in 0..60 {
        let key = format!("lent{i}");
        if i % 2 == 0 {
            c.request(0, set(&key, &format!("v{i}"), Consistency::All), T)
                .await
                .expect("set");
        }
        let reps = replicas(&c, &key);
        for node in 0..3 {
            let lent = c
                .node(node)
                .read_here(key.as_bytes(), Bytes::copy_from_slice);
            if node != reps[0] {
                assert!(lent.is_none(), "{key} at a non-primary: {lent:?}");
                continue;
            }
            let lent = lent.expect("the primary answers").expect("no error");
            let general = value(c.request(node, get(&key, Consistency::One), T).await);
            assert_eq!(lent, general, "{key}");
            assert_eq!(lent.is_some(), i % 2 == 0, "{key}");
        }
    }
    let too_long = vec![b'k'; 1 << 20];
    assert!(matches!(
        c.node(0).read_here(&too_long, |_| ()),
        Some(Err(CoreError::TooLarge(_)))
    ));
    assert!(matches!(
        c.node(0).read_here(b"", |_| ()),
        Some(Err(CoreError::Invalid(_)))
    ));
}

#[tokio::test(start_paused = true)]
async fn forged_far_future_versions_are_refused_and_counted() {
    let c = SimCluster::new(SimConfig::default());
    let node = c.node(0);
    let before = node.store().hlc().last();
    let from = c.ids()[1].clone();
    for version in [u64::MAX, (node.store().now_ms() + 3_600_000) << 16] {
        let call = PeerCall {
            from: from.clone(),
            ring_fingerprint: 0,
            deadline: tokio::time::Instant::now() + T,
            not_after_ms: None,
            version: None,
        };
        let forged = Mutation {
            key: b("pinned"),
            version,
            op: MutationOp::Put {
                value: b("evil"),
                expires_at: None,
            },
        };
        let err = node
            .handle_replicate(&call, &[forged])
            .await
            .expect_err("a forged version is refused");
        assert!(matches!(err, CoreError::VersionRefused(_)), "{err}");
    }
    assert_eq!(node.stats().versions_refused, 2);
    assert_eq!(node.store().hlc().last(), before, "the clock did not move");
    // Writes keep working and are really stored.
    for i in 0..600 {
        let v = format!("v{i}");
        match c.request(0, set("pinned", &v, Consistency::One), T).await {
            Ok(Response::Set { stored }) => assert!(stored),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            value(c.request(0, get("pinned", Consistency::One), T).await),
            Some(b(&v))
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_stale_coordinator_write_advances_the_clock_and_is_really_stored() {
    let c = SimCluster::new(SimConfig::default());
    let key = "ahead";
    let r = replicas(&c, key);
    let primary = c.node(r[0]);
    // A replica (with a clock 3 s ahead, within the allowed drift) wrote this version.
    let ahead = (primary.store().now_ms() + 3_000) << 16;
    let call = PeerCall {
        from: c.ids()[r[1]].clone(),
        ring_fingerprint: 0,
        deadline: tokio::time::Instant::now() + T,
        not_after_ms: None,
        version: None,
    };
    let m = Mutation {
        key: b(key),
        version: ahead,
        op: MutationOp::Put {
            value: b("from the future"),
            expires_at: None,
        },
    };
    primary
        .handle_replicate(&call, &[m])
        .await
        .expect("within drift");
    // The primary's own fresh version is older; it must not answer stored for nothing.
    match c.request(r[0], set(key, "mine", Consistency::One), T).await {
        Ok(Response::Set { stored }) => assert!(stored),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        value(c.request(r[0], get(key, Consistency::One), T).await),
        Some(b("mine"))
    );

    // A version the clock never observed (as after a restart that reloads data written by a
    // clock that ran ahead): the fresh version loses, the store moves its clock past the
    // stored one and writes again instead of acknowledging nothing.
    let primary = c.node(replicas(&c, "unseen")[0]);
    let unseen = (primary.store().now_ms() + 4_000) << 16;
    let _ = primary.store().engine().write(
        b"unseen",
        b"old",
        cache_core::WriteOptions::versioned(unseen),
    );
    match c
        .request(0, set("unseen", "new", Consistency::One), T)
        .await
    {
        Ok(Response::Set { stored }) => assert!(stored),
        other => panic!("{other:?}"),
    }
    let stored = primary.store().get(b"unseen").expect("stored");
    assert_eq!(stored.value, b("new"));
    assert!(stored.version > unseen);
    assert!(primary.stats().stale_retries >= 1);
}

#[test]
fn touch_never_overwrites_a_concurrent_set() {
    // Two threads race a Set loop against a Touch loop on one key. A touch that read the
    // value and wrote it back under a second lock would sometimes restore an older value
    // after the last Set; the atomic versioned touch cannot.
    let store = Arc::new(
        Store::new(
            "n0",
            cache_core::CacheConfig::new().with_max_bytes(1 << 20),
            NodeClock::System,
            cluster_core::Limits::default(),
            Duration::from_secs(5),
        )
        .expect("valid"),
    );
    let key = b("raced");
    let setter = {
        let (store, key) = (Arc::clone(&store), key.clone());
        std::thread::spawn(move || {
            let mut last = Bytes::new();
            for i in 0..20_000u32 {
                last = Bytes::from(i.to_le_bytes().to_vec());
                store
                    .set(
                        &key,
                        &last,
                        None,
                        Condition::Always,
                        cluster_core::Stamping::FRESH,
                    )
                    .expect("set");
            }
            last
        })
    };
    let toucher = {
        let (store, key) = (Arc::clone(&store), key.clone());
        std::thread::spawn(move || {
            for i in 0..20_000u64 {
                let _ = store
                    .touch(&key, Some(60_000 + i), cluster_core::Stamping::FRESH)
                    .expect("touch");
            }
        })
    };
    let last = setter.join().expect("setter");
    toucher.join().expect("toucher");
    assert_eq!(store.get(&key).map(|l| l.value), Some(last));
    store.engine().validate().expect("valid");
}

/// Records every applied mutation.
#[derive(Default)]
struct Recorder(Mutex<Vec<Mutation>>);

impl MutationSink for Recorder {
    fn applied(&self, m: &Mutation) {
        self.0.lock().push(m.clone());
    }
}

#[tokio::test(start_paused = true)]
async fn every_applied_mutation_reaches_the_sinks() {
    let c = SimCluster::new(SimConfig::default());
    let sinks: Vec<Arc<Recorder>> = (0..3)
        .map(|i| {
            let r = Arc::new(Recorder::default());
            c.node(i).store().add_sink(r.clone());
            r
        })
        .collect();
    c.request(0, set("a", "1", Consistency::All), T)
        .await
        .expect("set");
    c.request(1, del("a", Consistency::All), T)
        .await
        .expect("del");
    for s in &sinks {
        let seen = s.0.lock().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(matches!(seen[1].op, MutationOp::Delete));
        assert!(seen[0].version < seen[1].version);
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_the_queues_or_counts_what_it_could_not_deliver() {
    // A paused peer: nothing can be delivered, so all of it is counted as dropped.
    let c = SimCluster::new(SimConfig::default());
    c.pause(2);
    let mut writes = 0u64;
    for i in 0..300 {
        let key = format!("q{i}");
        if replicas(&c, &key).contains(&2) && replicas(&c, &key)[0] == 0 {
            c.request(0, set(&key, "v", Consistency::One), T)
                .await
                .expect("set");
            writes += 1;
        }
    }
    assert!(writes > 10);
    c.node(0).shutdown(Duration::from_millis(500)).await;
    let to2 = c
        .node(0)
        .queue_stats()
        .into_iter()
        .find(|q| q.peer == c.ids()[2])
        .expect("a queue to n2");
    assert_eq!(to2.sent + to2.dropped, writes, "{to2:?}");
    assert!(to2.dropped > 0, "{to2:?}");

    // A healthy peer: shutdown delivers everything queued within the grace period.
    let c = SimCluster::new(SimConfig::default());
    c.set_delay(20, 40);
    let mut keys = Vec::new();
    for i in 0..300 {
        let key = format!("d{i}");
        if replicas(&c, &key)[0] == 0 {
            c.request(0, set(&key, "v", Consistency::One), Duration::from_secs(5))
                .await
                .expect("set");
            keys.push(key);
        }
    }
    c.node(0).shutdown(Duration::from_secs(5)).await;
    for q in c.node(0).queue_stats() {
        assert_eq!(q.dropped, 0, "{q:?}");
    }
    for key in keys {
        for &i in &replicas(&c, &key) {
            assert!(
                c.node(i).store().get(key.as_bytes()).is_some(),
                "{key} on n{i} after the drain"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn quorum_writes_return_on_the_fastest_majority() {
    let c = SimCluster::new(SimConfig::default());
    let key = "fast";
    let r = replicas(&c, key);
    c.pause(r[2]);
    let start = tokio::time::Instant::now();
    c.request(r[0], set(key, "v", Consistency::Quorum), T)
        .await
        .expect("quorum with one replica paused");
    assert!(
        start.elapsed() < Duration::from_millis(100),
        "did not wait for the paused replica: {:?}",
        start.elapsed()
    );
    // ALL cannot succeed, and says how far it got.
    match c.request(r[0], set(key, "v2", Consistency::All), T).await {
        Err(CoreError::Unavailable { acks, required, .. }) => {
            assert_eq!((acks, required), (2, 3));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn batches_fall_back_key_by_key_when_a_primary_is_unreachable() {
    let c = SimCluster::new(SimConfig::default());
    let keys: Vec<String> = (0..60).map(|i| format!("m{i}")).collect();
    let entries = keys
        .iter()
        .map(|k| SetCommand {
            key: b(k),
            value: b(k),
            ttl_ms: None,
            condition: Condition::Always,
        })
        .collect();
    match c
        .request(
            0,
            Request::MultiSet {
                entries,
                consistency: Some(Consistency::All),
            },
            T,
        )
        .await
    {
        Ok(Response::MultiSet(stored)) => assert!(stored.iter().all(|s| *s)),
        other => panic!("{other:?}"),
    }
    // n1 unreachable from n0: its keys are read from their next replicas.
    c.cut(0, 1);
    let req = Request::MultiGet {
        keys: keys.iter().map(|k| b(k)).collect(),
    };
    match c.request(0, req, Duration::from_secs(3)).await {
        Ok(Response::MultiGet(found)) => {
            for (k, f) in keys.iter().zip(found) {
                assert_eq!(f.map(|l| l.value), Some(b(k)));
            }
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn forwarded_requests_are_never_forwarded_again() {
    let c = SimCluster::new(SimConfig {
        core: cluster_core::CoreConfig {
            replication_factor: 1,
            ..SimConfig::default().core
        },
        ..SimConfig::default()
    });
    let key = "owned";
    let r = replicas(&c, key);
    let other = (r[0] + 1) % 3;
    let call = PeerCall {
        from: c.ids()[r[0]].clone(),
        ring_fingerprint: 0,
        deadline: tokio::time::Instant::now() + T,
        not_after_ms: None,
        version: None,
    };
    let err = c
        .node(other)
        .handle_forward(call, get(key, Consistency::One))
        .await
        .expect_err("not a replica");
    assert!(matches!(err, CoreError::WrongOwner { epoch: 1 }), "{err}");
}

#[tokio::test(start_paused = true)]
async fn replication_batches_stay_within_the_message_limit() {
    // Values of 200 KiB: a replication batch holds about one (the byte bound is one maximal
    // request), yet every copy arrives and none is dropped.
    let limits = cluster_core::Limits {
        max_value_bytes: 200 << 10,
        ..cluster_core::Limits::default()
    };
    let c = SimCluster::new(SimConfig {
        limits,
        ..SimConfig::default()
    });
    let mut keys = Vec::new();
    for i in 0..40 {
        let key = format!("big{i}");
        if replicas(&c, &key)[0] == 0 {
            let value = Bytes::from(vec![b'x'; 200 << 10]);
            let req = Request::Set {
                cmd: SetCommand {
                    key: b(&key),
                    value,
                    ttl_ms: None,
                    condition: Condition::Always,
                },
                consistency: Some(Consistency::One),
            };
            c.request(0, req, T).await.expect("set");
            keys.push(key);
        }
    }
    assert!(keys.len() >= 5);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for q in c.node(0).queue_stats() {
        assert_eq!(q.dropped, 0, "{q:?}");
        assert_eq!(q.sent, keys.len() as u64, "{q:?}");
    }
    for key in &keys {
        for &i in &replicas(&c, key) {
            assert!(
                c.node(i).store().get(key.as_bytes()).is_some(),
                "{key} on n{i}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_hung_primary_costs_one_timeout_not_one_per_request() {
    let c = SimCluster::new(SimConfig::default());
    let key = "hung";
    let r = replicas(&c, key);
    c.request(r[0], set(key, "v", Consistency::All), T)
        .await
        .expect("set at ALL");
    c.pause(r[0]);
    // Twenty reads through the second replica: the first waits one peer timeout (200 ms)
    // for the paused primary, then serves locally; the rest skip the primary at once.
    let start = tokio::time::Instant::now();
    for _ in 0..20 {
        assert_eq!(
            value(c.request(r[1], get(key, Consistency::One), T).await),
            Some(b("v"))
        );
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(450),
        "20 reads took {took:?}: the hung primary was waited for more than once per backoff"
    );
    // Writes too (a plain set fails over to the next replica).
    let start = tokio::time::Instant::now();
    for i in 0..20 {
        c.request(r[1], set(key, &format!("w{i}"), Consistency::Quorum), T)
            .await
            .expect("quorum write with the primary paused");
    }
    assert!(
        start.elapsed() < Duration::from_millis(450),
        "{:?}",
        start.elapsed()
    );
    // Once the primary is back, it is used again after the backoff.
    c.resume(r[0]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        value(c.request(r[1], get(key, Consistency::Quorum), T).await),
        Some(b("w19"))
    );
}

/// Every request's future holds what `handle` holds across its awaits; a gRPC call
/// allocates and moves it, and a pipelined stream keeps one per operation in flight (up to
/// 1 024). The general path (forwarding, quorums, batches: 2.6 KB of state) is boxed so the
/// hot path does not pay for it; this keeps anyone from inlining it again.
#[tokio::test(start_paused = true)]
async fn the_request_future_stays_small() {
    let c = SimCluster::new(SimConfig::default());
    let node = c.node(0);
    let ctx = RequestContext::until(tokio::time::Instant::now() + T);
    let future = node.handle(get("k", Consistency::One), ctx);
    let size = std::mem::size_of_val(&future);
    assert!(size <= 1024, "Coordinator::handle's future is {size} bytes");
    drop(future);
}

/// The outside drill's zombie write: a coordinator forwards a `ONE` write to the key's
/// primary, which is paused; the forward times out, the write is re-sent to the next
/// replica and acknowledged, and more writes of the key are acknowledged after it. When the
/// primary wakes it reads the first forward from its socket. Stamped then, with a fresh
/// version, it beat every write acknowledged meanwhile (12 of 600 keys reverted on real
/// nodes, 8 of 11 runs); stamped where it was first accepted, it loses to them. The same
/// with the write duplicated by the network, and at `QUORUM`.
#[tokio::test(start_paused = true)]
async fn a_paused_primary_never_brings_back_a_write_its_coordinator_gave_up_on() {
    for consistency in [Consistency::One, Consistency::Quorum] {
        let c = SimCluster::new(SimConfig::default());
        let key = "zombie";
        let r = replicas(&c, key);
        let (primary, via) = (r[0], r[1]);
        c.pause(primary);
        c.set_duplicates(1000);
        c.request(via, set(key, "first", consistency), T)
            .await
            .expect("re-sent to the next replica and acknowledged");
        for i in 0..5 {
            c.request(via, set(key, &format!("later-{i}"), consistency), T)
                .await
                .expect("acknowledged");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c.resume(primary);
        tokio::time::sleep(Duration::from_secs(3)).await;
        for &i in &r {
            let held = c.node(i).store().get(key.as_bytes()).map(|l| l.value);
            assert_eq!(
                held.as_deref(),
                Some(&b"later-4"[..]),
                "{consistency}: replica n{i} holds an earlier write than the last acknowledged one"
            );
        }
        assert!(
            c.node(primary).store().late_writes_refused() > 0
                || c.node(primary).store().stats().stale_writes > 0,
            "{consistency}: the late forward reached the primary and lost"
        );
    }
}

/// The outside drill's split brain: in a partition {n0, n1} | {n2}, each side's failure
/// detector declares the other side dead. The lone n2 then routed every key to itself and,
/// counting `QUORUM` against the members it could see, acknowledged `QUORUM` writes alone
/// (13 132 in 10 s on real nodes) and served stale `QUORUM` reads; after the heal its values
/// won for 18 of 40 keys the majority had written at `QUORUM`. `QUORUM` and `ALL` now count a
/// key's home replicas, dead ones included: the minority refuses, the majority serves.
#[tokio::test(start_paused = true)]
async fn a_minority_partition_refuses_quorum_and_the_majority_loses_nothing() {
    let c = SimCluster::new(SimConfig::default());
    for i in 0..20 {
        c.request(0, set(&format!("k{i}"), "before", Consistency::Quorum), T)
            .await
            .expect("healthy");
    }
    c.isolate(2);
    c.detect_failures();
    assert_eq!(
        c.node(2).ring().load().ring.members().len(),
        1,
        "n2 sees itself alone"
    );
    assert_eq!(c.node(0).ring().load().ring.members().len(), 2);
    for i in 0..20 {
        let key = format!("k{i}");
        for consistency in [Consistency::Quorum, Consistency::All] {
            let err = c
                .request(2, set(&key, "minority", consistency), T)
                .await
                .expect_err("a minority cannot make a quorum");
            assert!(matches!(err, CoreError::Unavailable { .. }), "{err}");
            let err = c
                .request(2, get(&key, consistency), T)
                .await
                .expect_err("nor read at one");
            assert!(matches!(err, CoreError::Unavailable { .. }), "{err}");
        }
        // (An ALL write that fails stays applied where it landed: the QUORUM write after it
        // is the last one.)
        assert!(
            c.request(1, set(&key, "all", Consistency::All), T)
                .await
                .is_err(),
            "ALL needs the unreachable replica too"
        );
        c.request(0, set(&key, "majority", Consistency::Quorum), T)
            .await
            .expect("the majority makes its quorums");
    }
    c.heal();
    c.detect_failures();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..20 {
        let key = format!("k{i}");
        for via in 0..3 {
            let got = value(c.request(via, get(&key, Consistency::Quorum), T).await);
            assert_eq!(got, Some(b("majority")), "{key} via n{via}");
        }
    }
}

/// The survivor of two kills (both declared dead) refuses `QUORUM` and `ALL` (it answered OK
/// from +10 s on real nodes), and serves `ONE`.
#[tokio::test(start_paused = true)]
async fn the_survivor_of_two_kills_refuses_quorum_and_all() {
    let c = SimCluster::new(SimConfig::default());
    c.kill_and_declare_dead(1).await;
    c.kill_and_declare_dead(2).await;
    for consistency in [Consistency::Quorum, Consistency::All] {
        let err = c
            .request(0, set("k", "v", consistency), T)
            .await
            .expect_err("one of three replicas is no quorum");
        assert!(
            matches!(err, CoreError::Unavailable { acks: 1, .. }),
            "{err}"
        );
    }
    c.request(0, set("k", "v", Consistency::One), T)
        .await
        .expect("ONE stays available");
}

/// Version tags are unique by construction: in a cluster of 24 nodes several ids share a
/// hash tag (two coordinators of one key writing in the same millisecond then made one
/// version for two values, and replicas kept whichever arrived last, forever), but every
/// node's clock gets a tag of its own, the same assignment on every node.
#[tokio::test(start_paused = true)]
async fn no_two_members_issue_versions_with_the_same_tag() {
    let c = SimCluster::new(SimConfig {
        nodes: 24,
        ..SimConfig::default()
    });
    let preferred: std::collections::BTreeSet<u64> = c
        .ids()
        .iter()
        .map(|id| cluster_core::preferred_tag(id))
        .collect();
    assert!(
        preferred.len() < 24,
        "the test needs ids whose hash tags collide"
    );
    let tags: std::collections::BTreeSet<u64> =
        (0..24).map(|i| c.node(i).store().hlc().tag()).collect();
    assert_eq!(tags.len(), 24, "each node its own tag");
    // Two nodes that would have shared a tag write one key in the same millisecond: two
    // different versions, and every replica ends with the same one.
    let key = "same-ms";
    let versions: Vec<u64> = (0..24)
        .map(|i| {
            c.node(i)
                .store()
                .hlc()
                .next(c.node(i).store().now_ms())
                .expect("version")
        })
        .collect();
    let distinct: std::collections::BTreeSet<u64> = versions.iter().copied().collect();
    assert_eq!(distinct.len(), 24, "{key}: no two versions equal");
}
