//! Black-box tests of the real `cache-node` binary on ephemeral loopback ports: every RPC,
//! TTLs, every limit and error path, health, reflection, admin HTTP, start-up errors and
//! graceful shutdown.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cache_client::{Client, Error, SetOptions};
use cache_testkit::NodeProcess;
use tonic::Code;

async fn client(node: &NodeProcess) -> Client {
    Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(node.addr())
        .await
        .expect("connect to the node")
}

/// Polls `check` every 10 ms until it is true, failing after `deadline`.
async fn eventually(deadline: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !check().await {
        assert!(Instant::now() < until, "not within {deadline:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn every_rpc_round_trips() {
    every_rpc(&NodeProcess::start(&[])).await;
}

/// The same on a node that serves everything from one thread (the current-thread runtime
/// it picks when it has one CPU).
#[tokio::test]
async fn every_rpc_round_trips_on_one_thread() {
    let node = NodeProcess::start(&["--worker-threads", "1"]);
    assert!(
        node.log().contains("worker_threads=1"),
        "the startup record names the runtime's threads:\n{}",
        node.log()
    );
    let (_, metrics) = node.http_get("/metrics").expect("metrics");
    assert_eq!(
        cache_testkit::metric(&metrics, "cache_worker_threads"),
        Some(1.0),
        "{metrics}"
    );
    every_rpc(&node).await;
}

async fn every_rpc(node: &NodeProcess) {
    let c = client(node).await;

    assert_eq!(
        c.get("missing").await.expect("get"),
        None,
        "a miss is None, not an error"
    );
    c.set("k", "v").await.expect("set");
    assert_eq!(c.get("k").await.expect("get").as_deref(), Some(&b"v"[..]));
    let binary = Bytes::from(vec![0u8, 255, 10, 13, 0]);
    c.set(binary.clone(), binary.clone())
        .await
        .expect("binary-safe set");
    assert_eq!(c.get(binary.clone()).await.expect("get"), Some(binary));

    assert!(
        !c.set_with("k", "other", SetOptions::if_absent())
            .await
            .expect("nx")
    );
    assert!(
        c.set_with("k", "new", SetOptions::if_present())
            .await
            .expect("xx")
    );
    assert!(
        !c.set_with("nope", "x", SetOptions::if_present())
            .await
            .expect("xx")
    );
    assert_eq!(c.get("k").await.expect("get").as_deref(), Some(&b"new"[..]));

    assert!(
        c.touch("k", Some(Duration::from_secs(100)))
            .await
            .expect("touch")
    );
    let ttl = c
        .get_entry("k")
        .await
        .expect("get")
        .expect("present")
        .ttl
        .expect("has a ttl");
    assert!(
        ttl <= Duration::from_secs(100) && ttl > Duration::from_secs(90),
        "{ttl:?}"
    );
    assert!(c.touch("k", None).await.expect("persist"));
    assert_eq!(
        c.get_entry("k").await.expect("get").expect("present").ttl,
        None
    );
    assert!(!c.touch("missing", None).await.expect("touch"));

    assert!(c.delete("k").await.expect("delete"));
    assert!(!c.delete("k").await.expect("delete again"));

    c.set_many([("a", "1"), ("b", "2"), ("c", "3")], None)
        .await
        .expect("multi set");
    let got = c.get_many(["a", "zz", "c", "a"]).await.expect("multi get");
    let got: Vec<Option<&[u8]>> = got.iter().map(|v| v.as_deref()).collect();
    assert_eq!(
        got,
        vec![Some(&b"1"[..]), None, Some(&b"3"[..]), Some(&b"1"[..])]
    );

    let stats = c.stats().await.expect("stats");
    assert_eq!(stats.items, 4);
    assert!(stats.hits >= 5 && stats.misses >= 2, "{stats:?}");
    assert_eq!(stats.max_bytes, 1 << 30);
    let info = c.cluster_info().await.expect("cluster info");
    assert_eq!(info.members.len(), 1);
    assert_eq!(info.members[0].rpc_addr, node.addr());
    assert_eq!(info.vnodes_per_weight, cluster_ring_default_vnodes());
}

fn cluster_ring_default_vnodes() -> u32 {
    1000
}

#[tokio::test]
async fn ttl_expires_and_zero_ttl_means_none() {
    let node = NodeProcess::start(&["--reaper-interval", "10ms"]);
    let c = client(&node).await;
    c.set_with("short", "v", SetOptions::ttl(Duration::from_millis(200)))
        .await
        .expect("set");
    assert!(
        c.get("short").await.expect("get").is_some(),
        "present before expiry"
    );
    eventually(Duration::from_secs(10), "key expires", async || {
        c.get("short").await.expect("get").is_none()
    })
    .await;
    // The reaper gives the memory back without anyone reading the key.
    c.set_with("unread", "v", SetOptions::ttl(Duration::from_millis(50)))
        .await
        .expect("set");
    eventually(Duration::from_secs(10), "reaper reclaims", async || {
        c.stats().await.expect("stats").items == 0
    })
    .await;
}

fn code(e: &Error) -> Option<Code> {
    match e {
        Error::InvalidRequest { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test]
async fn limits_are_errors_not_panics() {
    let node = NodeProcess::start(&[
        "--max-key-size",
        "16",
        "--max-value-size",
        "1KiB",
        "--max-batch",
        "4",
    ]);
    let c = client(&node).await;
    let e = c.set("", "v").await.expect_err("empty key");
    assert_eq!(code(&e), Some(Code::InvalidArgument), "{e}");
    let e = c.set("k".repeat(17), "v").await.expect_err("long key");
    assert_eq!(code(&e), Some(Code::OutOfRange), "{e}");
    assert!(e.to_string().contains("limit of 16"), "{e}");
    let e = c.get("k".repeat(17)).await.expect_err("long key on get");
    assert_eq!(code(&e), Some(Code::OutOfRange), "{e}");
    let e = c.set("k", vec![0u8; 1025]).await.expect_err("big value");
    assert_eq!(code(&e), Some(Code::OutOfRange), "{e}");
    // The node refuses a batch over its limit and an empty one...
    let mut raw =
        cache_proto::v1::cache_client::CacheClient::connect(format!("http://{}", node.addr()))
            .await
            .expect("raw client");
    let keys = |n: usize| cache_proto::v1::MultiGetRequest {
        keys: (0..n)
            .map(|i| bytes::Bytes::from(format!("k{i}")))
            .collect(),
    };
    let e = raw.multi_get(keys(5)).await.expect_err("big batch");
    assert_eq!(e.code(), Code::OutOfRange, "{e}");
    let e = raw.multi_get(keys(0)).await.expect_err("empty batch");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    // ...which the SDK never sends: it splits to the limit and skips empty batches.
    assert_eq!(
        c.get_many(["a", "b", "c", "d", "e"])
            .await
            .expect("split batch"),
        vec![None; 5]
    );
    assert_eq!(
        c.get_many(Vec::<&str>::new()).await.expect("no call"),
        vec![]
    );
    let e = c
        .set_many([("a", vec![0u8; 10]), ("b", vec![0u8; 2000])], None)
        .await
        .expect_err("one bad entry");
    assert_eq!(code(&e), Some(Code::OutOfRange), "{e}");
    assert_eq!(
        c.get("a").await.expect("get"),
        None,
        "a refused batch applies nothing"
    );
    // A message larger than the node decodes at all.
    let e = c
        .set("k", vec![0u8; 512 << 10])
        .await
        .expect_err("huge message");
    assert_eq!(code(&e), Some(Code::OutOfRange), "{e}");
    // The node is still healthy after all that.
    c.set("k", "fine").await.expect("still serving");
    assert_eq!(node.http_get("/healthz").expect("healthz").0, 200);
}

#[tokio::test]
async fn unknown_enum_values_are_invalid_argument() {
    use cache_proto::v1::{
        DeleteRequest, GetRequest, MultiSetRequest, SetRequest, TouchRequest,
        cache_client::CacheClient,
    };
    let node = NodeProcess::start(&[]);
    let mut raw = CacheClient::connect(format!("http://{}", node.addr()))
        .await
        .expect("connect");
    for bad in [4, 7, -5, i32::MAX] {
        let set = SetRequest {
            key: "k".into(),
            value: "v".into(),
            consistency: bad,
            ..Default::default()
        };
        let checks = [
            raw.get(GetRequest {
                key: "k".into(),
                consistency: bad,
            })
            .await
            .map(drop),
            raw.set(set.clone()).await.map(drop),
            raw.set(SetRequest {
                consistency: 0,
                condition: bad,
                ..set.clone()
            })
            .await
            .map(drop),
            raw.delete(DeleteRequest {
                key: "k".into(),
                consistency: bad,
            })
            .await
            .map(drop),
            raw.touch(TouchRequest {
                key: "k".into(),
                ttl_ms: 0,
                consistency: bad,
            })
            .await
            .map(drop),
            raw.multi_set(MultiSetRequest {
                entries: vec![set.clone()],
                consistency: 0,
            })
            .await
            .map(drop),
        ];
        for (i, r) in checks.into_iter().enumerate() {
            let status = r.expect_err("an unknown enum value is refused");
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "check {i}, value {bad}: {status:?}"
            );
        }
    }
    let found = raw
        .get(GetRequest {
            key: "k".into(),
            consistency: 0,
        })
        .await
        .expect("get")
        .into_inner()
        .found;
    assert!(!found, "nothing was written");
}

#[tokio::test]
async fn full_without_eviction_is_resource_exhausted() {
    let node = NodeProcess::start(&[
        "--max-memory",
        "64KiB",
        "--shards",
        "1",
        "--eviction",
        "false",
    ]);
    let c = client(&node).await;
    let mut stored = 0;
    let err = loop {
        match c.set(format!("key-{stored}"), vec![7u8; 1000]).await {
            Ok(()) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 1000, "64 KiB cannot hold 1000 KB");
    };
    assert!(matches!(err, Error::Full(_)), "{err}");
    assert!(stored > 10);
    // Nothing acknowledged was evicted.
    for i in 0..stored {
        assert!(
            c.get(format!("key-{i}")).await.expect("get").is_some(),
            "key-{i} lost"
        );
    }
}

#[tokio::test]
async fn health_and_reflection() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let node = NodeProcess::start(&[]);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.addr()))
        .expect("valid url")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel.clone());
    let status = health
        .check(HealthCheckRequest {
            service: "cache.v1.Cache".into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = stream
        .message()
        .await
        .expect("stream")
        .expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"cache.v1.Cache".to_string()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
}

#[tokio::test]
async fn metrics_and_status_pages_reflect_traffic() {
    let node = NodeProcess::start(&[]);
    let c = client(&node).await;
    c.set("k", "v").await.expect("set");
    c.get("k").await.expect("get");
    c.get("k").await.expect("get");
    c.get("missing").await.expect("get");
    let _ = c.set("", "v").await;
    // One unary call too (the SDK uses the pipelined stream).
    let mut raw =
        cache_proto::v1::cache_client::CacheClient::connect(format!("http://{}", node.addr()))
            .await
            .expect("raw client");
    raw.get(cache_proto::v1::GetRequest {
        key: Bytes::from_static(b"k"),
        consistency: 0,
    })
    .await
    .expect("unary get");
    let (status, body) = node.http_get("/metrics").expect("metrics");
    // Latency as the transport sees it, per transport and operation.
    let count = |labels: &str| -> f64 {
        let prefix = format!("cache_transport_request_duration_seconds_count{{{labels}}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(count("transport=\"grpc_stream\",op=\"get\""), 3.0, "{body}");
    assert_eq!(count("transport=\"grpc_stream\",op=\"set\""), 2.0, "{body}");
    assert_eq!(count("transport=\"grpc\",op=\"get\""), 1.0, "{body}");
    assert_eq!(status, 200);
    for line in [
        "cache_requests_total{op=\"get\",result=\"hit\"} 3",
        "cache_requests_total{op=\"get\",result=\"miss\"} 1",
        "cache_requests_total{op=\"set\",result=\"ok\"} 1",
        "cache_requests_total{op=\"set\",result=\"invalid_argument\"} 1",
        "cache_hits_total 3",
        "cache_misses_total 1",
        "cache_items 1",
        "cache_evictions_total 0",
        "cache_expired_total 0",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in:\n{body}"
        );
    }
    for prefix in [
        "cache_request_duration_seconds_bucket{op=\"get\"",
        "cache_bytes ",
        "process_resident_memory_bytes ",
        "cache_engine_footprint_bytes ",
        "process_cpu_seconds_total ",
        "process_open_fds ",
        "process_max_fds ",
        "process_start_time_seconds ",
        "cache_build_info{",
    ] {
        assert!(
            body.lines().any(|l| l.starts_with(prefix)),
            "missing {prefix:?} in:\n{body}"
        );
    }
    // Every series says what it is, and no series stands for what cannot happen: an
    // error's series appears once it happened (set's invalid_argument above), not before.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/grafana/cache-cluster.json"),
    )
    .expect("the dashboard");
    for ty in body.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = ty.split_whitespace().nth(2).expect("name");
        assert!(
            body.lines()
                .any(|l| l.starts_with(&format!("# HELP {name} "))),
            "no HELP for {name}"
        );
        // ...and has a panel on the Grafana dashboard (deploy/grafana/generate.py).
        assert!(
            dashboard.contains(&format!("\"title\": \"{name}\"")),
            "no dashboard panel for {name}: run python3 deploy/grafana/generate.py"
        );
    }
    for absent in [
        "op=\"stats\",result=\"miss\"",
        "op=\"get\",result=\"not_stored\"",
        "op=\"get\",result=\"invalid_argument\"",
    ] {
        assert!(!body.contains(absent), "{absent} in:\n{body}");
    }
    let (status, html) = node.http_get("/status").expect("status");
    assert_eq!(status, 200);
    assert!(html.contains("<th>items</th><td>1</td>"), "{html}");
    assert!(html.contains("hit ratio</th><td>75.0 %"), "{html}");
    assert!(
        html.contains("process resident ")
            && html.contains("engine footprint ")
            && html.contains("eviction policy sieve"),
        "{html}"
    );
    assert_eq!(node.http_get("/readyz").expect("readyz").0, 200);
    assert_eq!(node.http_get("/nope").expect("404").0, 404);
}

/// `--eviction-policy` reaches the engine: on two full nodes, a key read once and then
/// followed by about 1.5 × capacity new keys nobody reads is gone under `lru` (it fell off the
/// tail) and kept under `sieve` (its visited bit bought it a second pass of the hand).
#[tokio::test]
async fn the_eviction_policy_decides_what_a_stream_of_new_keys_flushes() {
    for (policy, kept) in [("lru", false), ("sieve", true)] {
        let node = NodeProcess::start(&[
            "--eviction-policy",
            policy,
            "--max-memory",
            "256KiB",
            "--shards",
            "1",
        ]);
        let c = client(&node).await;
        let value = "x".repeat(100);
        c.set("hot", value.clone()).await.expect("set hot");
        assert!(c.get("hot").await.expect("get").is_some());
        // 256 KiB / (a 120-byte chunk + slot and index: 160 B charged) ≈ 1 640 entries.
        for i in 0..2_400 {
            c.set(format!("stream-{i:05}"), value.clone())
                .await
                .expect("set");
        }
        assert_eq!(
            c.get("hot").await.expect("get").is_some(),
            kept,
            "{policy}: the key read before the stream"
        );
        let (_, metrics) = node.http_get("/metrics").expect("metrics");
        let evictions = cache_testkit::metric(&metrics, "cache_evictions_total").expect("series");
        assert!(evictions > 500.0, "{policy}: {evictions} evictions");
        let (_, html) = node.http_get("/status").expect("status");
        assert!(
            html.contains(&format!("eviction policy {policy}")),
            "{html}"
        );
    }
}

#[tokio::test]
async fn idle_connections_do_not_hurt() {
    let node = NodeProcess::start(&[]);
    // Connections that never send a byte.
    let idle: Vec<_> = (0..50)
        .map(|_| std::net::TcpStream::connect(node.grpc).expect("connect"))
        .collect();
    // Garbage instead of HTTP/2.
    {
        use std::io::Write;
        let mut junk = std::net::TcpStream::connect(node.grpc).expect("connect");
        let _ = junk.write_all(b"GET / HTTP/1.0\r\n\r\nnot grpc at all\0\0\0");
    }
    let c = client(&node).await;
    c.set("k", "v")
        .await
        .expect("serving despite idle connections");
    assert_eq!(c.get("k").await.expect("get").as_deref(), Some(&b"v"[..]));
    drop(idle);
}

// Multi-threaded: the test body blocks (waiting for the process) while the writer runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_writing_applies_every_acknowledged_write_and_exits_zero() {
    sigterm_while_writing(&[]).await;
}

/// The same drain on a node serving everything from one thread: the signal, the notice
/// period and the in-flight requests share that thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_writing_drains_a_one_thread_node_too() {
    sigterm_while_writing(&["--worker-threads", "1"]).await;
}

async fn sigterm_while_writing(extra: &[&str]) {
    // A long notice period: the admin server stays up while the node refuses requests, so
    // the test can read the node's own count of applied writes after the writer stopped.
    let args: Vec<&str> = ["--shutdown-grace", "6s", "--shutdown-notice", "3s"]
        .iter()
        .chain(extra)
        .copied()
        .collect();
    let mut node = NodeProcess::start(&args);
    let c = Client::builder()
        .timeout(Duration::from_secs(2))
        .retries(0)
        .connect(node.addr())
        .await
        .expect("connect");
    let writer = tokio::spawn({
        let c = c.clone();
        async move {
            let mut acked = 0u64;
            for i in 0..1_000_000u32 {
                match c.set(format!("k{i}"), "v").await {
                    Ok(()) => acked += 1,
                    // After SIGTERM: refused. Never a hang, never an internal error.
                    Err(Error::Unavailable(_)) => return acked,
                    Err(e) => panic!("unexpected error during shutdown: {e}"),
                }
            }
            panic!("the writer was never refused");
        }
    });
    eventually(Duration::from_secs(10), "writes flowing", async || {
        c.stats().await.map(|s| s.items > 100).unwrap_or(false)
    })
    .await;
    node.signal("TERM");
    let acked = tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .expect("the writer is refused promptly")
        .expect("writer did not panic");
    // Every acknowledged write was applied: the engine counted exactly that many inserts.
    let (_, metrics) = node
        .http_get("/metrics")
        .expect("admin still up during the notice period");
    let inserts: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("cache_inserts_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("cache_inserts_total");
    assert!(acked > 100, "acked {acked}");
    assert_eq!(inserts, acked, "writes applied vs writes acknowledged");
    assert_eq!(
        node.http_get("/readyz").expect("readyz").0,
        503,
        "not ready while draining"
    );
    let status = node
        .wait_exit(Duration::from_secs(30))
        .expect("exits within the grace period");
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        node.log()
    );
    let log = node.log();
    assert!(
        log.contains("SIGTERM received") && log.contains("node stopped"),
        "{log}"
    );
}

#[test]
fn startup_errors_are_one_clear_line() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_addr = busy.local_addr().expect("addr").to_string();
    let out = std::process::Command::new(cache_testkit::node_binary())
        .args(["--listen", &busy_addr, "--admin-listen", "127.0.0.1:0"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot listen on") && err.contains(&busy_addr),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    for (flag, value, expect) in [
        ("--max-memory", "lots", "max-memory"),
        ("--listen", "not-an-address", "invalid value"),
        ("--shards", "3", "power of two"),
        ("--reaper-interval", "soon", "reaper-interval"),
        // Settings that parse but cannot work: one clear line, exit 2.
        (
            "--reaper-interval",
            "0s",
            "reaper-interval is 0ns; it must be between",
        ),
        (
            "--max-value-size",
            "1TiB",
            "over what one engine shard can hold",
        ),
        ("--peer-timeout", "2h", "peer-timeout"),
        ("--replication-factor", "100", "replication-factor is 100"),
        ("--max-batch", "10000000", "max-batch"),
        ("--anti-entropy-interval", "1ms", "anti-entropy-interval"),
    ] {
        let out = std::process::Command::new(cache_testkit::node_binary())
            .args([flag, value])
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(expect) && !err.contains("panicked"),
            "{flag} {value}: {err}"
        );
    }
}

#[test]
fn a_memory_limit_beyond_the_machine_starts_with_a_warning() {
    let node = NodeProcess::start(&["--max-memory", "1PiB"]);
    let log = node.log();
    assert!(log.contains("more than this machine's memory"), "{log}");
}

/// SIGHUP reloads the log level from the config file and says what else needs a restart;
/// it never kills the node.
#[tokio::test]
async fn sighup_reloads_the_log_level_and_names_what_needs_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("node.toml");
    std::fs::write(&file, "log-level = \"warn\"\n").expect("write config");
    let f = file.to_str().expect("utf-8");
    let node = NodeProcess::start(&["--config", f]);
    let c = client(&node).await;
    std::fs::write(&file, "log-level = \"info\"\n").expect("write config");
    node.signal("HUP");
    eventually(Duration::from_secs(5), "log level reloaded", async || {
        node.log().contains("SIGHUP: log level changed")
    })
    .await;
    std::fs::write(&file, "log-level = \"info\"\nmax-memory = \"2GiB\"\n").expect("write");
    node.signal("HUP");
    eventually(
        Duration::from_secs(5),
        "restart-only change named",
        async || node.log().contains("take effect at the next restart"),
    )
    .await;
    std::fs::write(&file, "max-memory = \"lots\"\n").expect("write");
    node.signal("HUP");
    eventually(
        Duration::from_secs(5),
        "invalid config refused",
        async || {
            node.log()
                .contains("the configuration is invalid now; keeping the running one")
        },
    )
    .await;
    c.set("still", "here").await.expect("the node kept serving");
    assert_eq!(
        c.get("still").await.expect("get").as_deref(),
        Some(&b"here"[..])
    );
}
