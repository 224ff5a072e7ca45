//! Multi-process cluster tests: real `cache-node` processes on loopback, static membership,
//! forwarding, smart routing, replication at ONE/QUORUM/ALL, SIGKILL and SIGSTOP of nodes,
//! loop protection for forwarded requests, the separate peer listener, forged versions
//! from a peer, and ring-mismatch detection.

use std::time::{Duration, Instant};

use cache_client::{Client, Consistency, Error};
use cache_testkit::{Cluster, NodeProcess, metric};

/// `None`: the node's default.
async fn plain(node: &NodeProcess, consistency: Option<Consistency>) -> Client {
    let mut builder = Client::builder().timeout(Duration::from_secs(5));
    if let Some(c) = consistency {
        builder = builder.write_consistency(c);
    }
    builder.connect(node.addr()).await.expect("connect")
}

/// `None`: the node's default for writes, the primary for reads.
async fn smart(cluster: &Cluster, write: Option<Consistency>, read: Option<Consistency>) -> Client {
    let mut builder = Client::builder().timeout(Duration::from_secs(5));
    if let Some(c) = write {
        builder = builder.write_consistency(c);
    }
    if let Some(c) = read {
        builder = builder.read_consistency(c);
    }
    builder
        .connect_cluster(cluster.seeds())
        .await
        .expect("connect to the cluster")
}

fn metric_of(node: &NodeProcess, series: &str) -> f64 {
    let (_, text) = node.http_get("/metrics").expect("metrics");
    metric(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

fn value(i: u32) -> String {
    format!("value-{i}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_answers_for_any_key() {
    any_node_answers(&[]).await;
}

/// The same on nodes that serve everything from one thread (the current-thread runtime a
/// node picks when it has one CPU): forwarding and replication between them included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_answers_for_any_key_on_one_thread_nodes() {
    any_node_answers(&["--worker-threads", "1"]).await;
}

async fn any_node_answers(extra: &[&str]) {
    let args: Vec<&str> = ["--replication-factor", "2"]
        .iter()
        .chain(extra)
        .copied()
        .collect();
    let cluster = Cluster::start(3, &args);
    let writer = plain(&cluster.nodes[0], Some(Consistency::All)).await;
    for i in 0..60u32 {
        writer
            .set(format!("key-{i}"), value(i))
            .await
            .expect("write through node-0");
    }
    for node in &cluster.nodes {
        let reader = plain(node, None).await;
        for i in 0..60u32 {
            let got = reader.get(format!("key-{i}")).await.expect("read");
            assert_eq!(
                got.as_deref(),
                Some(value(i).as_bytes()),
                "key-{i} through {}",
                node.addr()
            );
        }
    }
    // Node-0 had to forward writes for keys it is not primary of.
    assert!(metric_of(&cluster.nodes[0], "cache_forwarded_requests_total") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_client_goes_straight_to_the_owner() {
    let cluster = Cluster::start(3, &["--replication-factor", "1"]);
    let client = smart(&cluster, None, None).await;
    let members = client.members();
    assert_eq!(members.len(), 3);
    let total: f64 = members.iter().map(|m| m.share).sum();
    assert!((total - 1.0).abs() < 1e-9);
    for i in 0..200u32 {
        client.set(format!("k{i}"), value(i)).await.expect("set");
    }
    let keys: Vec<String> = (0..200u32).map(|i| format!("k{i}")).collect();
    let got = client.get_many(keys.clone()).await.expect("get_many");
    for (i, v) in got.iter().enumerate() {
        assert_eq!(v.as_deref(), Some(value(i as u32).as_bytes()));
    }
    for node in &cluster.nodes {
        assert_eq!(
            metric_of(node, "cache_forwarded_requests_total"),
            0.0,
            "smart routing never forwards"
        );
    }
    // Through one address, node-0 must forward about two thirds of the requests.
    let single = plain(&cluster.nodes[0], None).await;
    for k in &keys {
        assert!(single.get(k.clone()).await.expect("get").is_some());
    }
    assert!(metric_of(&cluster.nodes[0], "cache_forwarded_requests_total") > 50.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_writes_survive_sigkill_of_a_primary() {
    let mut cluster = Cluster::start(3, &["--replication-factor", "2", "--peer-timeout", "500ms"]);
    let client = smart(&cluster, Some(Consistency::All), None).await;
    for i in 0..300u32 {
        client
            .set(format!("key-{i}"), value(i))
            .await
            .expect("ALL write");
    }
    let victim = "node-1";
    let owned_by_victim = (0..300u32)
        .filter(|i| client.replicas_of(format!("key-{i}").as_bytes())[0] == victim)
        .count();
    assert!(
        owned_by_victim > 50,
        "the victim is primary of {owned_by_victim} keys"
    );
    cluster.nodes[1].signal("KILL");
    cluster.nodes[1]
        .wait_exit(Duration::from_secs(10))
        .expect("killed");
    // Through the smart client (fails over to the next replica) and through each survivor.
    for i in 0..300u32 {
        let got = client
            .get(format!("key-{i}"))
            .await
            .expect("read after kill");
        assert_eq!(got.as_deref(), Some(value(i).as_bytes()), "key-{i}");
    }
    for survivor in [&cluster.nodes[0], &cluster.nodes[2]] {
        let reader = plain(survivor, None).await;
        for i in 0..300u32 {
            let got = reader
                .get(format!("key-{i}"))
                .await
                .expect("read through a survivor");
            assert_eq!(got.as_deref(), Some(value(i).as_bytes()), "key-{i}");
        }
    }
    drop(cluster.nodes.remove(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_writes_lose_nothing_when_a_node_dies() {
    let cluster = Cluster::start(3, &["--replication-factor", "3", "--peer-timeout", "500ms"]);
    let client = smart(
        &cluster,
        Some(Consistency::Quorum),
        Some(Consistency::Quorum),
    )
    .await;
    for i in 0..300u32 {
        client
            .set(format!("key-{i}"), value(i))
            .await
            .expect("QUORUM write");
    }
    cluster.nodes[2].signal("KILL");
    for i in 0..300u32 {
        let got = client
            .get(format!("key-{i}"))
            .await
            .expect("QUORUM read with one node down");
        assert_eq!(got.as_deref(), Some(value(i).as_bytes()), "key-{i} lost");
    }
    // With one of three replicas gone, ALL can no longer be met: a clear UNAVAILABLE.
    let all = plain(&cluster.nodes[0], Some(Consistency::All)).await;
    let err = all
        .set("needs-all", "x")
        .await
        .expect_err("ALL with a dead replica");
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("of the key's 3 replicas"), "{err}");
}

/// Not a pass/fail bound: measures how many ONE writes acknowledged by a primary are lost
/// when it is SIGKILLed right after the acknowledgement (reported in docs/why/replication.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_writes_lost_when_the_primary_dies_right_after_the_ack() {
    let cluster = Cluster::start(3, &["--replication-factor", "3", "--peer-timeout", "500ms"]);
    let client = smart(&cluster, Some(Consistency::One), Some(Consistency::Quorum)).await;
    let victim = "node-2";
    let keys: Vec<String> = (0..20_000u32)
        .map(|i| format!("one-{i}"))
        .filter(|k| client.replicas_of(k.as_bytes())[0] == victim)
        .take(2_000)
        .collect();
    let batch: Vec<(String, String)> = keys.iter().map(|k| (k.clone(), format!("v-{k}"))).collect();
    for chunk in batch.chunks(100) {
        client
            .set_many(chunk.to_vec(), None)
            .await
            .expect("ONE writes");
    }
    cluster.node(victim).signal("KILL");
    let mut lost = 0;
    for k in &keys {
        if client
            .get(k.clone())
            .await
            .expect("QUORUM read from the survivors")
            .is_none()
        {
            lost += 1;
        }
    }
    // Reported, not asserted: the test fails only if the survivors cannot be read.
    println!(
        "ONE writes lost when their primary was SIGKILLed right after the last ack: {lost} of {}",
        keys.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_peer_does_not_block_other_keys() {
    let cluster = Cluster::start(3, &["--replication-factor", "1", "--peer-timeout", "2s"]);
    let smart_view = smart(&cluster, None, None).await;
    let owned_by = |id: &str| -> Vec<String> {
        (0..5_000u32)
            .map(|i| format!("k{i}"))
            .filter(|k| smart_view.replicas_of(k.as_bytes())[0] == id)
            .take(20)
            .collect()
    };
    let (mine, theirs) = (owned_by("node-0"), owned_by("node-2"));
    let client = Client::builder()
        .timeout(Duration::from_secs(6))
        .retries(0)
        .connect(cluster.nodes[0].addr())
        .await
        .expect("connect");
    for k in mine.iter().chain(&theirs) {
        client
            .set(k.clone(), "v")
            .await
            .expect("set before the stop");
    }
    cluster.nodes[2].signal("STOP");
    // Keys of node-0 are served without waiting for the stopped peer (which would take the
    // 2 s peer timeout).
    let start = Instant::now();
    for k in &mine {
        assert!(client.get(k.clone()).await.expect("local key").is_some());
    }
    let local_time = start.elapsed();
    // Keys of the stopped node fail with UNAVAILABLE after the peer deadline, not a hang.
    let start = Instant::now();
    let err = client
        .get(theirs[0].clone())
        .await
        .expect_err("owner is stopped");
    let waited = start.elapsed();
    cluster.nodes[2].signal("CONT");
    assert!(
        local_time < Duration::from_secs(2),
        "20 local reads took {local_time:?}"
    );
    assert!(matches!(err, Error::Unavailable(_)), "{err}");
    assert!(waited < Duration::from_secs(6), "gave up after {waited:?}");
    // Once resumed it serves again.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(_)) = client.get(theirs[0].clone()).await {
            break;
        }
        assert!(
            Instant::now() < until,
            "node-2 did not serve again after SIGCONT"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn peer_request<T>(body: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(body);
    req.set_timeout(Duration::from_secs(2));
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_is_never_forwarded_again() {
    use cache_proto::peer::v1::{ForwardRequest, forward_request, peer_client::PeerClient};
    use cache_proto::v1::GetRequest;
    let cluster = Cluster::start(3, &["--replication-factor", "1"]);
    let view = smart(&cluster, None, None).await;
    let key = (0..1000u32)
        .map(|i| format!("k{i}"))
        .find(|k| view.replicas_of(k.as_bytes())[0] != "node-0")
        .expect("some key is not node-0's");
    let mut raw = PeerClient::connect(format!("http://{}", cluster.nodes[0].peer_addr()))
        .await
        .expect("connect to the peer listener");
    let status = raw
        .forward(peer_request(ForwardRequest {
            from: "node-1".into(),
            ring_fingerprint: 0,
            request: Some(forward_request::Request::Get(GetRequest {
                key: key.into(),
                consistency: 0,
            })),
            not_after_ms: 0,
            version: 0,
        }))
        .await
        .expect_err("a forwarded request for a foreign key");
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(status.message().contains("ring epoch"), "{status:?}");
    assert_eq!(
        metric_of(&cluster.nodes[0], "cache_forwarded_requests_total"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_port_does_not_serve_the_peer_service() {
    use cache_proto::peer::v1::{ReplicateRequest, peer_client::PeerClient};
    let cluster = Cluster::start(2, &[]);
    let mut wrong = PeerClient::connect(format!("http://{}", cluster.nodes[0].addr()))
        .await
        .expect("connect to the public port");
    let status = wrong
        .replicate(peer_request(ReplicateRequest {
            from: "node-1".into(),
            ring_fingerprint: 0,
            mutations: Vec::new(),
        }))
        .await
        .expect_err("no Peer service on the public port");
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_versions_from_a_peer_are_refused_and_counted() {
    use cache_proto::peer::v1::{
        Mutation, Put, ReplicateRequest, mutation, peer_client::PeerClient,
    };
    let cluster = Cluster::start(1, &[]);
    let node = &cluster.nodes[0];
    let mut peer = PeerClient::connect(format!("http://{}", node.peer_addr()))
        .await
        .expect("connect to the peer listener");
    for version in [u64::MAX, 1 << 63] {
        let status = peer
            .replicate(peer_request(ReplicateRequest {
                from: "node-9".into(),
                ring_fingerprint: 0,
                mutations: vec![Mutation {
                    key: "pinned".into(),
                    version,
                    op: Some(mutation::Op::Put(Put {
                        value: "evil".into(),
                        expires_at_ms: None,
                    })),
                }],
            }))
            .await
            .expect_err("a far-future version is refused");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    }
    assert_eq!(metric_of(node, "cache_versions_refused_total"), 2.0);
    // The key was not pinned: writes are stored and read back.
    let client = plain(node, None).await;
    for i in 0..300u32 {
        client.set("pinned", value(i)).await.expect("set");
        assert_eq!(
            client.get("pinned").await.expect("get").as_deref(),
            Some(value(i).as_bytes())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_different_member_list_is_reported() {
    let ports: Vec<u16> = {
        let ls: Vec<_> = (0..6)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        ls.iter()
            .map(|l| l.local_addr().expect("addr").port())
            .collect()
    };
    let a = format!("127.0.0.1:{}", ports[0]);
    let b = format!("127.0.0.1:{}", ports[1]);
    let (peer_a, peer_b) = (
        format!("127.0.0.1:{}", ports[4]),
        format!("127.0.0.1:{}", ports[5]),
    );
    let good = format!("a={a}/{peer_a},b={b}/{peer_b}");
    // b also lists a member that a does not know.
    let bad = format!("a={a}/{peer_a},b={b}/{peer_b},ghost=127.0.0.1:9");
    let admin_a = format!("127.0.0.1:{}", ports[2]);
    let admin_b = format!("127.0.0.1:{}", ports[3]);
    let (Ok(node_a), Ok(node_b)) = (
        NodeProcess::spawn(&[
            "--node-id",
            "a",
            "--listen",
            &a,
            "--admin-listen",
            &admin_a,
            "--peer-listen",
            &peer_a,
            "--peers",
            &good,
            "--replication-factor",
            "2",
        ]),
        NodeProcess::spawn(&[
            "--node-id",
            "b",
            "--listen",
            &b,
            "--admin-listen",
            &admin_b,
            "--peer-listen",
            &peer_b,
            "--peers",
            &bad,
            "--replication-factor",
            "2",
        ]),
    ) else {
        // A port was taken between picking and binding: nothing to test on this run.
        eprintln!("could not bind the chosen ports; skipping");
        return;
    };
    let client = plain(&node_a, Some(Consistency::All)).await;
    // Some key with a as primary replicates to b, which compares fingerprints.
    for i in 0..50u32 {
        let _ = client.set(format!("k{i}"), "v").await;
    }
    let until = Instant::now() + Duration::from_secs(10);
    while metric_of(&node_b, "cache_ring_fingerprint_mismatch_total") == 0.0 {
        assert!(Instant::now() < until, "b never noticed the mismatch");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        metric_of(&node_a, "cache_ring_fingerprint_mismatch_total") > 0.0,
        "a sees b's answer too"
    );
    let (_, status) = node_a.http_get("/status").expect("status");
    assert!(status.contains("RING MISMATCH"), "{status}");
    assert!(node_b.log().contains("ring mismatch"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_counts_the_replication_it_could_not_deliver() {
    let mut cluster = Cluster::start(
        2,
        &[
            "--replication-factor",
            "2",
            "--shutdown-notice",
            "0s",
            "--shutdown-grace",
            "1s",
        ],
    );
    // The peer is paused (and seen stopped): nothing queued for it can be delivered.
    cluster.nodes[1].pause();
    let client = plain(&cluster.nodes[0], Some(Consistency::One)).await;
    let view_keys: Vec<String> = (0..200u32).map(|i| format!("q{i}")).collect();
    let mut written = 0;
    for key in &view_keys {
        // Keys whose primary is node-1 would be forwarded to the paused node.
        if client.set(key.clone(), "v").await.is_ok() {
            written += 1;
        }
        if written >= 20 {
            break;
        }
    }
    assert!(written >= 20, "node-0 coordinates enough keys");
    cluster.nodes[0].signal("TERM");
    let status = cluster.nodes[0]
        .wait_exit(Duration::from_secs(10))
        .expect("node-0 exits within its grace period");
    assert!(status.success(), "{status:?}");
    let log = cluster.nodes[0].log();
    let dropped: u64 = log
        .lines()
        .find_map(|l| {
            l.split("replication_dropped_total=")
                .nth(1)
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| panic!("no drop count in the last log line:\n{log}"));
    assert!(
        dropped >= 20,
        "every undelivered copy is counted: {dropped}\n{log}"
    );
    cluster.nodes[1].signal("CONT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_client_keeps_its_deadline_and_skips_a_paused_node() {
    let cluster = Cluster::start(3, &["--replication-factor", "3"]);
    let writer = smart(&cluster, Some(Consistency::All), None).await;
    let keys: Vec<String> = (0..300u32).map(|i| format!("d{i}")).collect();
    writer
        .set_many(keys.iter().map(|k| (k.clone(), "v")), None)
        .await
        .expect("written to all replicas");
    let client = Client::builder()
        .timeout(Duration::from_millis(500))
        .connect_cluster(cluster.seeds())
        .await
        .expect("cluster client");
    cluster.nodes[1].signal("STOP");
    // The first batch may time out (node-1 is not known to be down yet), but it answers by
    // its deadline, not after one timeout per key.
    let start = Instant::now();
    let first = client.get_many(keys.clone()).await;
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "get_many took {took:?} with a 500 ms deadline"
    );
    // Then node-1 is skipped: every key is read from its other replicas, quickly.
    let start = Instant::now();
    let values = match client.get_many(keys.clone()).await {
        Ok(v) => v,
        Err(e) => panic!(
            "second batch: {e:?} after {:?}; first {first:?} in {took:?}",
            start.elapsed()
        ),
    };
    let second = start.elapsed();
    assert!(values.iter().all(|v| v.as_deref() == Some(&b"v"[..])));
    eprintln!(
        "paused node: first get_many {took:?} ({}), second {second:?}",
        if first.is_ok() { "ok" } else { "timed out" }
    );
    assert!(
        second < Duration::from_millis(500),
        "second get_many took {second:?}"
    );
    cluster.nodes[1].signal("CONT");
}

/// Each key's version on `node` itself (its peer API's `Fetch`: no routing), `None` if the
/// node does not know the key.
async fn local_versions(node: &NodeProcess, keys: &[String]) -> Vec<Option<u64>> {
    use cache_proto::peer::v1::{FetchRequest, peer_client::PeerClient, versioned_entry::State};
    let mut peer = PeerClient::connect(format!("http://{}", node.peer_addr()))
        .await
        .expect("connect to the peer listener");
    let reply = peer
        .fetch(peer_request(FetchRequest {
            from: "test".into(),
            ring_fingerprint: 0,
            keys: keys.iter().map(|k| k.clone().into()).collect(),
        }))
        .await
        .expect("fetch")
        .into_inner();
    reply
        .entries
        .into_iter()
        .map(|e| {
            e.state.map(|s| match s {
                State::Live(l) => l.version,
                State::DeadVersion(v) => v,
            })
        })
        .collect()
}

/// Keys whose version differs between the nodes (every node replicates every key: RF 3 on
/// 3 nodes), or that some node lacks.
async fn divergent_keys(cluster: &Cluster, keys: &[String]) -> usize {
    let mut per_node = Vec::new();
    for node in &cluster.nodes {
        per_node.push(local_versions(node, keys).await);
    }
    (0..keys.len())
        .filter(|&i| {
            per_node.iter().any(|v| v[i].is_none())
                || per_node.windows(2).any(|w| w[0][i] != w[1][i])
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_replica_holds_every_key_again_soon_after_sigcont() {
    let cluster = Cluster::start(
        3,
        &["--replication-factor", "3", "--anti-entropy-interval", "5s"],
    );
    let client = smart(&cluster, Some(Consistency::One), None).await;
    let keys: Vec<String> = (0..600).map(|i| format!("pause-{i}")).collect();
    for k in &keys {
        client.set(k.clone(), "v1").await.expect("set");
    }
    cluster.nodes[2].signal("STOP");
    let stopped = Instant::now();
    let mut passes = 0;
    while stopped.elapsed() < Duration::from_secs(5) {
        for k in &keys {
            client
                .set(k.clone(), "v2")
                .await
                .expect("set while node-2 is paused");
        }
        passes += 1;
    }
    let paused_for = stopped.elapsed();
    // What node-2 missed waits on node-0 and node-1 as hints or queued copies.
    let waiting: f64 = cluster.nodes[..2]
        .iter()
        .map(|n| {
            let (_, text) = n.http_get("/metrics").expect("metrics");
            metric(&text, "cache_hints_pending{peer=\"node-2\"}").unwrap_or(0.0)
                + metric(&text, "cache_replication_queue_depth{peer=\"node-2\"}").unwrap_or(0.0)
                + metric(&text, "cache_hints_dropped_total{peer=\"node-2\"}").unwrap_or(0.0)
        })
        .sum();
    assert!(
        waiting > 0.0,
        "the pause left nothing to repair: the test would prove nothing"
    );
    cluster.nodes[2].signal("CONT");
    let resumed = Instant::now();
    // Right away, reads at ONE through node-2 itself (it serves those it is the primary of,
    // about a third) see the writes it missed: a node that was stopped syncs, and reads
    // through meanwhile. (The ring-aware client would still be skipping node-2.)
    let direct = plain(&cluster.nodes[2], None).await;
    let mut stale = 0;
    for k in &keys {
        if direct.get(k.clone()).await.expect("get").as_deref() != Some(&b"v2"[..]) {
            stale += 1;
        }
    }
    assert_eq!(stale, 0, "stale reads right after SIGCONT");
    let before = divergent_keys(&cluster, &keys).await;
    let mut now = before;
    while now > 0 {
        assert!(
            resumed.elapsed() < Duration::from_secs(30),
            "{now} of {} keys still divergent 30 s after SIGCONT ({before} right after)",
            keys.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        now = divergent_keys(&cluster, &keys).await;
    }
    eprintln!(
        "node-2 paused {paused_for:?}: {passes} passes over {} keys written meanwhile; after \
         SIGCONT: {waiting} copies were waiting for node-2; 0 stale reads; {before} keys \
         divergent after the reads; 0 after {:?}",
        keys.len(),
        resumed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_empty_misses_nothing_and_takes_no_if_absent_write() {
    use cache_client::{Condition, SetOptions};
    let mut cluster = Cluster::start(3, &["--replication-factor", "3"]);
    let client = smart(&cluster, Some(Consistency::Quorum), None).await;
    let keys: Vec<String> = (0..300).map(|i| format!("restart-{i}")).collect();
    for k in &keys {
        client.set(k.clone(), "v").await.expect("set");
    }
    cluster.nodes[1].restart();
    // Reads at ONE go to each key's primary, node-1 for about a third of them.
    let client = smart(&cluster, Some(Consistency::Quorum), None).await;
    let mut misses = 0;
    for k in &keys {
        if client.get(k.clone()).await.expect("get").is_none() {
            misses += 1;
        }
    }
    let mut stored = 0;
    for k in &keys {
        let options = SetOptions {
            condition: Condition::IfAbsent,
            ..SetOptions::default()
        };
        if client
            .set_with(k.clone(), "late", options)
            .await
            .expect("set if absent")
        {
            stored += 1;
        }
    }
    assert_eq!(misses, 0, "reads missed keys the other replicas hold");
    assert_eq!(stored, 0, "IF_ABSENT stored over existing keys");
    // It catches up: every key on every node, and it says it is synced.
    let start = Instant::now();
    while divergent_keys(&cluster, &keys).await > 0
        || metric_of(&cluster.nodes[1], "cache_sync_syncing") != 0.0
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "node-1 did not catch up within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "restarted node-1 synced {:?} after it was ready",
        start.elapsed()
    );
    assert!(
        metric_of(
            &cluster.nodes[1],
            "cache_sync_keys_total{direction=\"pulled\"}"
        ) > 0.0
    );
}

/// With `--data-dir` a restarted node comes back with its data and its versions, so
/// anti-entropy moves only the writes it missed, not everything it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_with_its_data_moves_only_what_it_missed() {
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let mut cluster = Cluster::start_each(3, |i| {
        vec![
            "--replication-factor".into(),
            "3".into(),
            "--data-dir".into(),
            dirs[i].path().display().to_string(),
        ]
    });
    let client = smart(&cluster, Some(Consistency::Quorum), None).await;
    let mut keys: Vec<String> = (0..2000).map(|i| format!("held-{i}")).collect();
    for chunk in keys.chunks(200) {
        client
            .set_many(chunk.iter().map(|k| (k.clone(), "v1")), None)
            .await
            .expect("written");
    }
    // node-2 holds all of it before it dies (QUORUM acknowledged with two copies; the
    // third may still be on its way).
    let start = Instant::now();
    loop {
        let mut divergent = 0;
        for chunk in keys.chunks(1000) {
            divergent += divergent_keys(&cluster, chunk).await;
        }
        if divergent == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "replicas never agreed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Applied is not yet logged: the flusher writes within microseconds of the apply; give
    // it ample time so the kill tests recovery, not that race.
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.nodes[2].signal("KILL");
    let _ = cluster.nodes[2].wait_exit(Duration::from_secs(5));
    // What node-2 misses while it is down: 100 new keys and 50 overwrites.
    let missed: Vec<String> = (0..100).map(|i| format!("missed-{i}")).collect();
    for k in missed.iter().chain(keys.iter().take(50)) {
        client.set(k.clone(), "v2").await.expect("quorum of two");
    }
    keys.extend(missed);
    cluster.nodes[2].restart();
    let start = Instant::now();
    let mut divergent = usize::MAX;
    while metric_of(&cluster.nodes[2], "cache_sync_syncing") != 0.0 || divergent > 0 {
        divergent = 0;
        for chunk in keys.chunks(1000) {
            divergent += divergent_keys(&cluster, chunk).await;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "node-2 did not catch up within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pulled = metric_of(
        &cluster.nodes[2],
        "cache_sync_keys_total{direction=\"pulled\"}",
    );
    let recovered = metric_of(&cluster.nodes[2], "cache_recovery_records");
    eprintln!(
        "node-2 restarted with its data: {recovered} records recovered, synced {:?} after it was ready, {pulled} keys pulled",
        start.elapsed()
    );
    assert!(recovered >= 2000.0, "{recovered} records recovered");
    assert!(
        pulled <= 300.0,
        "{pulled} keys pulled: more than the 150 it missed (it held 2000)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_quorum_writes_loses_no_acknowledged_write() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut cluster = Cluster::start(5, &["--replication-factor", "3", "--shutdown-notice", "0s"]);
    let client = Arc::new(
        smart(
            &cluster,
            Some(Consistency::Quorum),
            Some(Consistency::Quorum),
        )
        .await,
    );
    // `ROLLING_KEYS=100000 cargo test --release -p cache-node --test cluster rolling` for the
    // full-size run; CI loads 2 000.
    let keys: usize = std::env::var("ROLLING_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let prefill = Instant::now();
    for chunk in (0..keys).collect::<Vec<_>>().chunks(500) {
        client
            .set_many(chunk.iter().map(|k| (format!("roll-{k}"), "0")), None)
            .await
            .expect("prefill at QUORUM");
    }
    eprintln!("{keys} keys loaded at QUORUM in {:?}", prefill.elapsed());
    // Per key: the last value acknowledged, and every value attempted since (a write that
    // failed may still have been applied).
    type Ledger = Vec<(Option<u64>, Vec<u64>)>;
    let acked: Arc<parking_lot::Mutex<Ledger>> =
        Arc::new(parking_lot::Mutex::new(vec![(Some(0), Vec::new()); keys]));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (client, acked, stop) = (Arc::clone(&client), Arc::clone(&acked), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut n = 0u64;
            let (mut ok, mut failed) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let k = (n as usize * 7919) % keys;
                acked.lock()[k].1.push(n);
                match client.set(format!("roll-{k}"), n.to_string()).await {
                    Ok(()) => {
                        ok += 1;
                        let mut a = acked.lock();
                        a[k] = (Some(n), Vec::new());
                    }
                    Err(_) => failed += 1,
                }
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..5 {
        cluster.nodes[i].signal("TERM");
        let _ = cluster.nodes[i].wait_exit(Duration::from_secs(15));
        cluster.nodes[i].restart();
        let start = Instant::now();
        while metric_of(&cluster.nodes[i], "cache_sync_syncing") != 0.0 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "node-{i} still syncing 30 s after its restart"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("node-{i} restarted and synced in {:?}", start.elapsed());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = writer.await.expect("writer");
    let acked = acked.lock().clone();
    let parse = |v: Option<bytes::Bytes>| -> Option<u64> {
        v.and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
    };
    let mut lost = Vec::new();
    let all: Vec<usize> = (0..keys).collect();
    for chunk in all.chunks(500) {
        // A batch read first (at each primary); a key it does not confirm is read again at
        // QUORUM before it counts as lost.
        let names: Vec<String> = chunk.iter().map(|k| format!("roll-{k}")).collect();
        let batch = client.get_many(names.clone()).await.expect("batch read");
        for ((&k, name), got) in chunk.iter().zip(names).zip(batch) {
            let (Some(last), since) = &acked[k] else {
                continue;
            };
            let fine =
                |got: Option<u64>| got == Some(*last) || got.is_some_and(|g| since.contains(&g));
            if fine(parse(got)) {
                continue;
            }
            let again = parse(
                client
                    .get(name)
                    .await
                    .expect("quorum read after the rolling restart"),
            );
            if !fine(again) {
                lost.push((k, *last, again));
            }
        }
    }
    eprintln!(
        "rolling restart of 5 nodes under QUORUM writes: {ok} acknowledged, {failed} failed, {} lost",
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(ok > 200, "the writer made progress ({ok} acknowledged)");
}

/// `/readyz` tells the truth about a node that is still syncing: restarted while the other
/// replica is down, node-0 has not caught up (it reads through, and gives up on the peer
/// after 10 s), so it answers 503 "syncing" until then — a rolling restart that waits for
/// readiness waits for the data too. `--ready-while-syncing` keeps the old behaviour.
#[test]
fn readiness_waits_for_sync_unless_told_otherwise() {
    for ready_while_syncing in [false, true] {
        let extra: Vec<String> = if ready_while_syncing {
            vec!["--ready-while-syncing".into()]
        } else {
            Vec::new()
        };
        let cluster = Cluster::start_each(2, |_| extra.clone());
        cluster.nodes[1].signal("KILL");
        let args: Vec<String> = cluster.nodes[0].args().to_vec();
        cluster.nodes[0].signal("KILL");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let restarted = NodeProcess::spawn_unready(&args).expect("restarts");
        let until = Instant::now() + Duration::from_secs(5);
        let (code, body) = loop {
            match restarted.http_get("/readyz") {
                Ok(answer) => break answer,
                Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("readyz: {e}"),
            }
        };
        if ready_while_syncing {
            assert_eq!(code, 200, "{body}");
        } else {
            assert_eq!(code, 503, "{body}");
            assert!(body.contains("syncing"), "{body}");
            // Ready once it gives the dead peer up (10 s), not before.
            restarted.wait_ready(Duration::from_secs(30));
        }
    }
}
