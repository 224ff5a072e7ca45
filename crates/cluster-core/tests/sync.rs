//! Keeping N copies, in the simulator: anti-entropy repairs what a paused replica missed, a
//! node restarted empty neither misses keys nor decides conditions on its empty copy while it
//! syncs, a joining node gets its ranges without reads missing meanwhile, and the survivors
//! of a death restore the lost copies. Time is paused: everything is deterministic.

use std::time::Duration;

use bytes::Bytes;
use cache_core::VersionedRead;
use cluster_core::sim::{SimCluster, SimConfig};
use cluster_core::{
    Condition, Consistency, CoreConfig, CoreError, Request, Response, SetCommand, SyncConfig,
};

const T: Duration = Duration::from_millis(800);

fn key(i: usize) -> Bytes {
    Bytes::from(format!("key-{i}"))
}

fn set(i: usize, value: &str, c: Consistency, condition: Condition) -> Request {
    Request::Set {
        cmd: SetCommand {
            key: key(i),
            value: Bytes::copy_from_slice(value.as_bytes()),
            ttl_ms: None,
            condition,
        },
        consistency: Some(c),
    }
}

fn get(i: usize) -> Request {
    Request::Get {
        key: key(i),
        consistency: Some(Consistency::One),
    }
}

fn found(r: Result<Response, CoreError>) -> Option<Bytes> {
    match r.expect("read succeeds") {
        Response::Get(f) => f.map(|l| l.value),
        other => panic!("not a get answer: {other:?}"),
    }
}

fn config(nodes: usize, rf: usize, sync: SyncConfig) -> SimConfig {
    SimConfig {
        nodes,
        core: CoreConfig {
            replication_factor: rf,
            peer_timeout: Duration::from_millis(200),
            ..CoreConfig::default()
        },
        sync: Some(sync),
        ..SimConfig::default()
    }
}

fn quick_sync() -> SyncConfig {
    SyncConfig {
        interval: Duration::from_secs(1),
        bytes_per_sec: 0,
        give_up_after: Duration::from_secs(5),
        call_timeout: Duration::from_secs(2),
        ..SyncConfig::default()
    }
}

/// A throttle so slow that, once the first batch moved, the rest waits for hours: the node
/// stays syncing for the whole test.
fn stuck_sync() -> SyncConfig {
    SyncConfig {
        interval: Duration::from_secs(1),
        bytes_per_sec: 1,
        give_up_after: Duration::from_secs(5),
        call_timeout: Duration::from_secs(2),
        ..SyncConfig::default()
    }
}

/// Keys (of `0..n`) whose live replicas (by node 0's ring, skipping `dead`) do not all hold
/// the same version, and keys some replica does not hold at all.
fn divergent(c: &SimCluster, n: usize, dead: &[usize]) -> (usize, usize) {
    let state = c.node(0).ring().load();
    let (mut differ, mut missing) = (0, 0);
    for i in 0..n {
        let k = key(i);
        let versions: Vec<Option<u64>> = state
            .replicas(&k)
            .iter()
            .map(|id| c.index_of(id))
            .filter(|r| !dead.contains(r))
            .map(|r| {
                c.node(r)
                    .store()
                    .get_versioned(&k)
                    .map(|v: VersionedRead| v.version())
            })
            .collect();
        if versions.iter().any(Option::is_none) {
            missing += 1;
        }
        if versions.windows(2).any(|w| w[0] != w[1]) {
            differ += 1;
        }
    }
    (differ, missing)
}

async fn write_all(c: &SimCluster, n: usize, value: &str, consistency: Consistency) {
    for i in 0..n {
        let r = c
            .request(i % 2, set(i, value, consistency, Condition::Always), T)
            .await;
        assert!(
            matches!(r, Ok(Response::Set { stored: true })),
            "{i}: {r:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn anti_entropy_repairs_what_a_paused_replica_missed() {
    // No room for hints: only anti-entropy can repair.
    let mut cfg = config(3, 3, quick_sync());
    cfg.core.hint_bytes_max = 0;
    let c = SimCluster::new(cfg);
    write_all(&c, 300, "v1", Consistency::One).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(divergent(&c, 300, &[]), (0, 0), "healthy replication");

    // n2 is paused and cut off while every key is overwritten at ONE: its copies are lost
    // (a pause alone no longer loses them: the simulator delivers what was sent to a
    // paused node when it wakes, as a socket does).
    c.pause(2);
    c.isolate(2);
    write_all(&c, 300, "v2", Consistency::One).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (differ, _) = divergent(&c, 300, &[]);
    assert!(differ > 200, "the pause left {differ} keys divergent");
    c.heal();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        divergent(&c, 300, &[]),
        (0, 0),
        "anti-entropy repaired every key"
    );
    let status = c.node(2).sync_status();
    assert!(
        status.keys_pulled
            + c.node(0).sync_status().keys_pushed
            + c.node(1).sync_status().keys_pushed
            >= 200,
        "{status:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_node_restarted_empty_reads_through_and_refuses_to_decide_conditions_alone() {
    let c = SimCluster::new(config(3, 3, stuck_sync()));
    write_all(&c, 300, "v", Consistency::Quorum).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.restart_empty(2).await;
    assert!(c.node(2).is_syncing(), "a restarted node starts syncing");
    assert!(
        c.node(2).store().stats().items < 300,
        "the throttle keeps it from catching up during the test"
    );
    // The lent read (RESP's GET) never answers from the syncing copy: every key goes to
    // the general path, which reads through.
    for i in 0..300 {
        assert!(c.node(2).read_here(&key(i), |_| ()).is_none(), "key {i}");
    }
    // Every key read through n2 is found (n2 is the primary of about a third of them).
    let mut misses = 0;
    for i in 0..300 {
        if found(c.request(2, get(i), T).await).is_none() {
            misses += 1;
        }
    }
    assert_eq!(misses, 0, "reads through the restarted node miss nothing");
    // No IF_ABSENT write succeeds on an existing key, whoever coordinates it.
    let mut stored = 0;
    for i in 0..300 {
        let r = c
            .request(2, set(i, "late", Consistency::One, Condition::IfAbsent), T)
            .await;
        if matches!(r, Ok(Response::Set { stored: true })) {
            stored += 1;
        }
    }
    assert_eq!(stored, 0, "IF_ABSENT stored over existing keys");
    // A key that really is absent is still stored.
    let r = c
        .request(
            2,
            set(10_000, "new", Consistency::One, Condition::IfAbsent),
            T,
        )
        .await;
    assert!(matches!(r, Ok(Response::Set { stored: true })), "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn a_restarted_node_catches_up_and_stops_syncing() {
    let c = SimCluster::new(config(3, 3, quick_sync()));
    write_all(&c, 500, "v", Consistency::Quorum).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.restart_empty(1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!c.node(1).is_syncing(), "{:?}", c.node(1).sync_status());
    assert_eq!(c.node(1).store().stats().items, 500);
    assert_eq!(divergent(&c, 500, &[]), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_joining_node_gets_its_ranges_and_reads_never_miss_meanwhile() {
    let c = SimCluster::new(config(3, 2, stuck_sync()));
    write_all(&c, 300, "v", Consistency::All).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n3 = c.join();
    assert!(c.node(n3).is_syncing());
    // Reads through every node, the new one included, while it has (almost) nothing.
    for via in 0..4 {
        let mut misses = 0;
        for i in 0..300 {
            if found(c.request(via, get(i), T).await).is_none() {
                misses += 1;
            }
        }
        assert_eq!(misses, 0, "reads through n{via} during the join");
    }
}

#[tokio::test(start_paused = true)]
async fn a_join_moves_about_a_quarter_of_the_keys_and_then_every_replica_agrees() {
    let c = SimCluster::new(config(3, 2, quick_sync()));
    write_all(&c, 1000, "v", Consistency::All).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n3 = c.join();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!c.node(n3).is_syncing());
    assert_eq!(divergent(&c, 1000, &[]), (0, 0));
    // With RF 2 over 4 nodes the new one replicates about half of the keys.
    let held = c.node(n3).store().stats().items;
    assert!(
        (350..=650).contains(&held),
        "the new node holds {held} keys"
    );
}

#[tokio::test(start_paused = true)]
async fn survivors_of_a_death_restore_every_lost_copy() {
    let c = SimCluster::new(config(4, 3, quick_sync()));
    write_all(&c, 500, "v", Consistency::Quorum).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(divergent(&c, 500, &[]), (0, 0));
    c.kill_and_declare_dead(3).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Every key has 3 replicas again among the 3 survivors, all at the same version.
    assert_eq!(divergent(&c, 500, &[3]), (0, 0));
    for n in 0..3 {
        assert_eq!(c.node(n).store().stats().items, 500, "n{n}");
    }
}

#[tokio::test(start_paused = true)]
async fn deletes_are_synced_like_writes() {
    let c = SimCluster::new(config(3, 3, quick_sync()));
    write_all(&c, 100, "v", Consistency::All).await;
    c.pause(2);
    for i in 0..50 {
        let r = c
            .request(
                0,
                Request::Delete {
                    key: key(i),
                    consistency: Some(Consistency::Quorum),
                },
                T,
            )
            .await;
        assert!(r.is_ok(), "{r:?}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.resume(2);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(divergent(&c, 100, &[]), (0, 0));
    for i in 0..50 {
        assert!(
            matches!(
                c.node(2).store().get_versioned(&key(i)),
                Some(VersionedRead::Dead { .. })
            ),
            "key {i} is a tombstone on the paused replica too"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn hinted_handoff_delivers_what_a_paused_replica_missed_without_anti_entropy() {
    let c = SimCluster::new(SimConfig {
        sync: None,
        ..config(3, 3, quick_sync())
    });
    write_all(&c, 300, "v1", Consistency::One).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.pause(2);
    write_all(&c, 300, "v2", Consistency::One).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hinted: u64 = (0..2)
        .flat_map(|n| c.node(n).queue_stats())
        .filter(|q| q.peer.as_str() == "n2")
        .map(|q| q.hints_pending)
        .sum();
    assert!(
        hinted >= 250,
        "{hinted} hints pending for the paused replica"
    );
    c.resume(2);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(divergent(&c, 300, &[]), (0, 0), "hints delivered");
    for q in (0..2).flat_map(|n| c.node(n).queue_stats()) {
        assert_eq!(q.hints_pending, 0, "{q:?}");
        assert_eq!(q.dropped, 0, "{q:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn hints_beyond_their_bound_are_dropped_counted_and_repaired_by_anti_entropy() {
    let mut cfg = config(3, 3, quick_sync());
    cfg.core.hint_bytes_max = 1000; // about 70 small mutations per peer
    let c = SimCluster::new(cfg);
    c.pause(2);
    write_all(&c, 300, "v", Consistency::One).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dropped: u64 = (0..2)
        .flat_map(|n| c.node(n).queue_stats())
        .map(|q| q.hints_dropped)
        .sum();
    assert!(dropped > 0, "the bound was hit");
    c.resume(2);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        divergent(&c, 300, &[]),
        (0, 0),
        "anti-entropy repaired the rest"
    );
}

#[tokio::test(start_paused = true)]
async fn a_graceful_leave_hands_every_key_to_its_new_replica() {
    // No anti-entropy: only the hand-over can give the new replicas their keys.
    let c = SimCluster::new(SimConfig {
        sync: None,
        ..config(4, 2, quick_sync())
    });
    write_all(&c, 1000, "v", Consistency::All).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = c.node(3).store().stats().items;
    let report = c.leave_gracefully(3).await;
    assert!(report.complete, "{report:?}");
    // Each key n3 held gains exactly one new replica.
    assert_eq!(report.keys, held, "{report:?}");
    assert_eq!(divergent(&c, 1000, &[3]), (0, 0));
    for i in 0..1000 {
        assert!(
            found(c.request(i % 3, get(i), T).await).is_some(),
            "key {i}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_restarted_node_catches_up_on_more_keys_than_one_exchange_carries() {
    const N: usize = 12_000; // 4 exchanges of at most 3 000 keys with the first peer
    let c = SimCluster::new(config(
        3,
        3,
        SyncConfig {
            reply_entries: 3_000,
            ..quick_sync()
        },
    ));
    for chunk in 0..N / 1000 {
        let entries = (chunk * 1000..(chunk + 1) * 1000)
            .map(|i| SetCommand {
                key: key(i),
                value: Bytes::from_static(b"v"),
                ttl_ms: None,
                condition: Condition::Always,
            })
            .collect();
        let r = c
            .request(
                0,
                Request::MultiSet {
                    entries,
                    consistency: Some(Consistency::All),
                },
                Duration::from_secs(5),
            )
            .await;
        assert!(r.is_ok(), "{r:?}");
    }
    c.restart_empty(2).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!c.node(2).is_syncing(), "{:?}", c.node(2).sync_status());
    assert_eq!(c.node(2).store().stats().items, N as u64);
    let status = c.node(2).sync_status();
    // Pulled once each: from the first peer; the second has nothing newer.
    assert_eq!(status.keys_pulled, N as u64, "{status:?}");
}
