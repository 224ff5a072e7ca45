//! Atomic read-modify-writes ([`Request::Update`]: counters, get-and-set, keep-TTL,
//! get-and-delete, expiry changes) in the simulator: decided once, on the key's primary,
//! whichever node the client asks, and replicated as ordinary versioned writes. Time is
//! paused, so timeouts elapse instantly and deterministically; each test names its seed.

use std::time::Duration;

use bytes::Bytes;
use cluster_core::sim::{SimCluster, SimConfig};
use cluster_core::{
    Condition, Consistency, CoreError, ExpireWhen, Expiry, Request, Response, UpdateOp,
};

const T: Duration = Duration::from_millis(800);

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn update(key: &str, op: UpdateOp, c: Consistency) -> Request {
    Request::Update {
        key: b(key),
        op,
        consistency: Some(c),
    }
}

fn incr(key: &str, delta: i64) -> Request {
    update(
        key,
        UpdateOp::Incr {
            delta,
            ttl_ms_if_created: None,
        },
        Consistency::Quorum,
    )
}

fn current(r: Result<Response, CoreError>) -> Option<cache_core::Lookup> {
    match r.expect("the update succeeds") {
        Response::Update { current, .. } => current,
        other => panic!("not an update response: {other:?}"),
    }
}

fn previous(r: Result<Response, CoreError>) -> Option<cache_core::Lookup> {
    match r.expect("the update succeeds") {
        Response::Update { previous, .. } => previous,
        other => panic!("not an update response: {other:?}"),
    }
}

fn cluster(seed: u64) -> SimCluster {
    SimCluster::new(SimConfig {
        seed,
        ..SimConfig::default()
    })
}

#[tokio::test(start_paused = true)]
async fn concurrent_increments_through_every_node_are_all_counted_on_every_replica() {
    let seed = 11;
    let c = cluster(seed);
    let per_node = 40;
    let clients = (0..3).map(|n| {
        let c = &c;
        async move {
            for _ in 0..per_node {
                current(c.request(n, incr("hits", 1), T).await);
            }
        }
    });
    futures_util::future::join_all(clients).await;
    let total = (3 * per_node).to_string();
    // Every replica holds the same count (QUORUM acked on two; the third gets it by the
    // asynchronous path).
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in 0..3 {
        let held = c.node(n).store().get(b"hits").map(|l| l.value);
        assert_eq!(held, Some(b(&total)), "seed {seed}: node {n}");
    }
}

#[tokio::test(start_paused = true)]
async fn increments_keep_the_expiry_and_refuse_what_is_not_a_counter() {
    let seed = 12;
    let c = cluster(seed);
    // Created with a TTL; later increments keep it.
    let first = current(
        c.request(
            1,
            update(
                "window",
                UpdateOp::Incr {
                    delta: 5,
                    ttl_ms_if_created: Some(60_000),
                },
                Consistency::All,
            ),
            T,
        )
        .await,
    )
    .expect("created");
    assert_eq!(first.value, b("5"), "seed {seed}");
    let expires = first.expires_at.expect("the window expires");
    let second = current(c.request(2, incr("window", -7), T).await).expect("live");
    assert_eq!(second.value, b("-2"), "seed {seed}");
    assert_eq!(
        second.expires_at,
        Some(expires),
        "seed {seed}: the expiry is kept"
    );

    // Not an integer, or an overflow: an error, and nothing changes anywhere.
    let set = update(
        "name",
        UpdateOp::Set {
            value: b("alice"),
            expiry: Expiry::Never,
            condition: Condition::Always,
        },
        Consistency::All,
    );
    current(c.request(0, set, T).await);
    for (key, delta) in [("name", 1), ("window", i64::MIN)] {
        let e = c
            .request(0, incr(key, delta), T)
            .await
            .expect_err("refused");
        assert!(matches!(e, CoreError::Invalid(_)), "seed {seed}: {e}");
    }
    for n in 0..3 {
        let node = c.node(n);
        let store = node.store();
        assert_eq!(store.get(b"name").map(|l| l.value), Some(b("alice")));
        assert_eq!(store.get(b"window").map(|l| l.value), Some(b("-2")));
    }
}

#[tokio::test(start_paused = true)]
async fn get_and_set_keep_ttl_get_and_delete_and_expiry_changes_replicate() {
    let seed = 13;
    let c = cluster(seed);
    let all = Consistency::All;
    let set = |value: &str, expiry, condition| {
        update(
            "k",
            UpdateOp::Set {
                value: b(value),
                expiry,
                condition,
            },
            all,
        )
    };
    // SET .. GET on a missing key: no previous value.
    let r = c
        .request(0, set("v1", Expiry::InMs(30_000), Condition::Always), T)
        .await;
    assert_eq!(previous(r), None, "seed {seed}");
    // SET .. KEEPTTL GET: the old value back, the expiry kept on every replica.
    let r = c
        .request(1, set("v2", Expiry::Keep, Condition::Always), T)
        .await;
    assert_eq!(previous(r).map(|l| l.value), Some(b("v1")));
    let expiries: Vec<_> = (0..3)
        .map(|n| c.node(n).store().get(b"k").expect("live").expires_at)
        .collect();
    assert!(
        expiries.iter().all(|e| e.is_some() && *e == expiries[0]),
        "seed {seed}: {expiries:?}"
    );
    // NX on a live key: not stored, value unchanged.
    let r = c
        .request(2, set("v3", Expiry::Never, Condition::IfAbsent), T)
        .await;
    assert_eq!(current(r).map(|l| l.value), Some(b("v2")));
    // PERSIST, then GETDEL.
    let r = c
        .request(
            0,
            update(
                "k",
                UpdateOp::Expire {
                    expiry: Expiry::Never,
                    when: ExpireWhen::Always,
                },
                all,
            ),
            T,
        )
        .await;
    assert_eq!(current(r).map(|l| l.expires_at), Some(None));
    let r = c.request(2, update("k", UpdateOp::Delete, all), T).await;
    assert_eq!(previous(r).map(|l| l.value), Some(b("v2")));
    for n in 0..3 {
        assert_eq!(c.node(n).store().get(b"k"), None, "seed {seed}: node {n}");
    }
    // An expiry in the past deletes.
    let r = c
        .request(1, set("v4", Expiry::Never, Condition::Always), T)
        .await;
    current(r);
    let r = c
        .request(
            0,
            update(
                "k",
                UpdateOp::Expire {
                    expiry: Expiry::AtMs(1),
                    when: ExpireWhen::Always,
                },
                all,
            ),
            T,
        )
        .await;
    assert_eq!(current(r), None);
    for n in 0..3 {
        assert_eq!(c.node(n).store().get(b"k"), None, "seed {seed}: node {n}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_increment_whose_primary_does_not_answer_is_not_applied_twice() {
    // The primary is paused: the forwarded increment times out with its outcome unknown,
    // and the coordinator must not apply it again itself (a counter would count twice).
    let seed = 14;
    let c = cluster(seed);
    current(c.request(0, incr("c", 1), T).await);
    let primary = c.index_of(&c.node(0).ring().load().replicas(b"c")[0]);
    let other = (0..3).find(|n| *n != primary).expect("three nodes");
    c.pause(primary);
    let r = c.request(other, incr("c", 1), T).await;
    c.resume(primary);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held: Vec<_> = (0..3)
        .map(|n| c.node(n).store().get(b"c").map(|l| l.value))
        .collect();
    match r {
        // Refused: at most the primary applied it (if the request reached it).
        Err(_) => assert!(
            held.iter()
                .all(|v| *v == Some(b("1")) || *v == Some(b("2"))),
            "seed {seed}: {held:?}"
        ),
        Ok(_) => panic!("seed {seed}: an increment through a paused primary was answered"),
    }
}
