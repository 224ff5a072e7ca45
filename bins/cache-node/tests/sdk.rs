//! The SDK's conveniences against real nodes: keys and values by reference, batches of any
//! size, a lazy connection, cache-aside with single-flight, and the operator calls (each
//! member, locate, scan, flush) in both routing modes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cache_client::{Client, Error, Routing};
use cache_testkit::{Cluster, NodeProcess};

#[tokio::test]
async fn keys_and_values_are_taken_by_reference_or_owned() {
    let node = NodeProcess::start(&[]);
    let client = Client::connect(node.addr()).await.expect("connect");
    assert_eq!(client.routing(), Routing::Direct);
    let key = String::from("user:42");
    let raw = vec![0u8, 159, 146, 150];
    client.set(&key, "Ada").await.expect("set &String");
    client.set(raw.as_slice(), &raw).await.expect("set &[u8]");
    client.set(b"arr", [1u8, 2, 3]).await.expect("set arrays");
    client
        .set(Bytes::from_static(b"bytes"), String::from("owned"))
        .await
        .expect("set owned");
    assert_eq!(
        client.get(&key).await.expect("get").as_deref(),
        Some(&b"Ada"[..])
    );
    assert_eq!(
        client.get(key.as_str()).await.expect("get").as_deref(),
        Some(&b"Ada"[..])
    );
    assert_eq!(
        client.get(&raw).await.expect("get").as_deref(),
        Some(&raw[..])
    );
    assert_eq!(
        client.get(b"arr").await.expect("get").as_deref(),
        Some(&[1u8, 2, 3][..])
    );
    assert_eq!(
        client.get("bytes").await.expect("get").as_deref(),
        Some(&b"owned"[..])
    );
    let keys = vec![key.clone(), "nope".to_string()];
    let got = client.get_many(&keys).await.expect("get_many by reference");
    assert_eq!(got, vec![Some(Bytes::from_static(b"Ada")), None]);
}

#[tokio::test]
async fn batches_of_any_size_are_split_to_the_node_limit_and_empty_ones_cost_nothing() {
    for args in [&[][..], &["--max-batch", "7"][..]] {
        let node = NodeProcess::start(args);
        for pipelined in [true, false] {
            let client = Client::builder()
                .pipelined(pipelined)
                .timeout(Duration::from_secs(10))
                .connect(node.addr())
                .await
                .expect("connect");
            let n = 2_000;
            let entries: Vec<(String, String)> =
                (0..n).map(|i| (format!("k{i}"), format!("v{i}"))).collect();
            client
                .set_many(entries.iter().map(|(k, v)| (k, v)), None)
                .await
                .unwrap_or_else(|e| panic!("set_many of {n} with {args:?}: {e}"));
            let keys: Vec<String> = (0..n + 10).map(|i| format!("k{i}")).collect();
            let got = client
                .get_many(&keys)
                .await
                .unwrap_or_else(|e| panic!("get_many of {} with {args:?}: {e}", n + 10));
            assert_eq!(got.len(), n + 10);
            for (i, v) in got.iter().enumerate() {
                let want = (i < n).then(|| Bytes::from(format!("v{i}")));
                assert_eq!(v, &want, "key {i}: answers stay in request order");
            }
        }
        let client = Client::connect(node.addr()).await.expect("connect");
        let before = client.stats().await.expect("stats");
        let none: Vec<&str> = Vec::new();
        assert_eq!(
            client.get_many(&none).await.expect("empty get_many"),
            vec![]
        );
        client
            .set_many(Vec::<(&str, &str)>::new(), None)
            .await
            .expect("empty set_many");
        let after = client.stats().await.expect("stats");
        assert_eq!(
            (before.hits + before.misses, before.inserts),
            (after.hits + after.misses, after.inserts),
            "an empty batch reaches no node"
        );
    }
}

#[tokio::test]
async fn a_lazy_client_connects_on_first_use_and_says_when_nothing_is_there() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let client = Client::builder()
        .retries(0)
        .timeout(Duration::from_secs(1))
        .connect_lazy(format!("127.0.0.1:{port}"))
        .expect("no connection is made yet");
    let err = client.get("k").await.expect_err("nothing listens there");
    assert!(
        matches!(err, Error::Unavailable(_) | Error::TimedOut(_)),
        "{err}"
    );

    let node = NodeProcess::start(&[]);
    let client = Client::builder().connect_lazy(node.addr()).expect("lazy");
    client.set("k", "v").await.expect("first call connects");
    assert_eq!(
        client.get("k").await.expect("get").as_deref(),
        Some(&b"v"[..])
    );
    assert!(matches!(
        Client::builder().connect_lazy("not an address"),
        Err(Error::InvalidAddress { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_run_the_loader_once() {
    let node = NodeProcess::start(&[]);
    let client = Client::builder()
        .timeout(Duration::from_secs(10))
        .connect(node.addr())
        .await
        .expect("connect");
    let loads = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..1_000 {
        let (client, loads) = (client.clone(), Arc::clone(&loads));
        tasks.spawn(async move {
            client
                .get_or_insert_with("hot", Some(Duration::from_secs(60)), || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    // A slow source of truth: every task misses while it runs.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, std::io::Error>("from the database")
                })
                .await
        });
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(
            r.expect("task").expect("value").as_ref(),
            b"from the database"
        );
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1, "the loader ran once");
    let entry = client.get_entry("hot").await.expect("get").expect("cached");
    assert_eq!(entry.value.as_ref(), b"from the database");
    assert!(entry.ttl.is_some_and(|t| t <= Duration::from_secs(60)));

    // A later call is a hit: no load.
    let v = client
        .get_or_insert_with("hot", None, || async {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>("again")
        })
        .await
        .expect("hit");
    assert_eq!(v.as_ref(), b"from the database");
    assert_eq!(loads.load(Ordering::SeqCst), 1);

    // A failing loader: every waiter gets the error, nothing is stored.
    let err = client
        .get_or_insert_with("cold", None, || async {
            Err::<&str, _>(std::io::Error::other("database down"))
        })
        .await
        .expect_err("the loader failed");
    assert!(matches!(err, Error::Loader(_)), "{err}");
    assert!(err.to_string().contains("database down"), "{err}");
    assert_eq!(client.get("cold").await.expect("get"), None);
}

#[tokio::test]
async fn operator_calls_work_in_both_routing_modes() {
    let cluster = Cluster::start(3, &["--replication-factor", "2"]);
    let ring = Client::builder()
        .connect_cluster(cluster.seeds())
        .await
        .expect("connect cluster");
    let direct = Client::connect(cluster.nodes[0].addr())
        .await
        .expect("connect");
    assert_eq!(ring.routing(), Routing::Ring);
    for i in 0..100 {
        ring.set(format!("user:{i}"), "x").await.expect("set");
        ring.set(format!("order:{i}"), "y").await.expect("set");
    }
    for client in [&ring, &direct] {
        let members = client.each_member().await.expect("members");
        assert_eq!(members.len(), 3);
        // Every key is on two members; scanning all of them finds each once per copy.
        let mut copies = 0;
        let mut users = std::collections::BTreeSet::new();
        for (_, member) in &members {
            let mut cursor = 0;
            loop {
                let (keys, next) = member.scan(cursor, "user:*", 7).await.expect("scan");
                for k in keys {
                    assert!(k.starts_with(b"user:"), "{k:?}");
                    copies += 1;
                    users.insert(k);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        assert_eq!(users.len(), 100);
        assert_eq!(copies, 200);

        let located = client.locate("user:7").await.expect("locate");
        assert_eq!(located.len(), 2);
        assert_eq!(located[0].rank, 0);
        let versions: Vec<u64> = located
            .iter()
            .map(|l| {
                let copy = l.copy.as_ref().expect("inspect");
                assert!(copy.found, "{} holds it", l.id);
                assert_eq!(copy.node_id, l.id);
                copy.version
            })
            .collect();
        assert_eq!(versions[0], versions[1], "replicas agree");
    }
    assert!(matches!(ring.scan(0, "", 10).await, Err(Error::Cluster(_))));

    for (_, member) in direct.each_member().await.expect("members") {
        member.flush().await.expect("flush");
    }
    for i in 0..100 {
        assert_eq!(ring.get(format!("user:{i}")).await.expect("get"), None);
    }
    let located = ring.locate("user:7").await.expect("locate");
    assert!(located.iter().all(|l| {
        let c = l.copy.as_ref().expect("inspect");
        !c.found && c.tombstone
    }));
}
