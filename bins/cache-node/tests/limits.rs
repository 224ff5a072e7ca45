//! Connection limits with a real node: idle and half-open connections cannot exhaust its
//! descriptors, health checks keep answering, and slow admin clients are cut off.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use cache_client::Client;
use cache_testkit::{NodeProcess, metric};

/// Whether the server closed `s` within `within` (a read returns EOF or an error).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let until = Instant::now() + within;
    let mut buf = [0u8; 256];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left.min(Duration::from_millis(200))))
            .expect("timeout");
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_exhaust_descriptors_under_ulimit_256() {
    let node = NodeProcess::start_limited(256, &["--handshake-timeout", "1s"]);
    assert!(
        node.log()
            .contains("--max-connections lowered to fit the open-file limit"),
        "{}",
        node.log()
    );
    // 400 connections that never speak: more than the node has descriptors for.
    let mut idle: Vec<TcpStream> = (0..400)
        .filter_map(|_| TcpStream::connect(node.grpc).ok())
        .collect();
    // The admin port has its own budget: health checks answer meanwhile.
    let (code, _) = node.http_get("/healthz").expect("healthz while flooded");
    assert_eq!(code, 200);
    // Within the handshake deadline every idle connection is closed...
    let started = Instant::now();
    let mut still_open = 0;
    for s in &mut idle {
        if !closed_within(s, Duration::from_secs(4)) {
            still_open += 1;
        }
    }
    assert_eq!(
        still_open,
        0,
        "{still_open} idle connections still open after {:?}",
        started.elapsed()
    );
    // ...and new clients are served.
    let c = Client::builder()
        .timeout(Duration::from_secs(5))
        .connect(node.addr())
        .await
        .expect("connect after the flood");
    c.set("k", "v").await.expect("served");
    let (_, metrics) = node.http_get("/metrics").expect("metrics");
    let refused = metric(
        &metrics,
        "cache_connections_refused_total{listener=\"client\"}",
    )
    .unwrap_or(0.0);
    let timed_out = metric(
        &metrics,
        "cache_connections_closed_total{listener=\"client\",reason=\"handshake_timeout\"}",
    )
    .unwrap_or(0.0);
    eprintln!(
        "ulimit -n 256, 400 idle connections: {refused} refused at the cap, {timed_out} closed at the handshake deadline"
    );
    assert!(refused > 0.0 && timed_out > 0.0, "{metrics}");
}

#[test]
fn slow_admin_clients_are_cut_off_and_health_checks_still_answer() {
    let node = NodeProcess::start(&[]);
    // 20 slowloris clients: a request line and half a header, then nothing.
    let mut slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(node.admin).expect("connect");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .expect("write");
            s
        })
        .collect();
    let (code, _) = node.http_get("/healthz").expect("healthz while slowed");
    assert_eq!(code, 200);
    let started = Instant::now();
    for s in &mut slow {
        assert!(
            closed_within(s, Duration::from_secs(8)),
            "a slow admin client still connected after {:?}",
            started.elapsed()
        );
    }
    eprintln!(
        "20 slowloris admin clients closed after {:?}",
        started.elapsed()
    );
}

/// A request with oversized metadata (over the advertised 64 KiB header list) fails alone
/// (HTTP 431 on its stream): the connection and the other calls on it (here an open
/// `WatchCluster` stream) survive. (A 1 MiB block still ends the connection inside h2.)
#[tokio::test]
async fn oversized_metadata_fails_one_call_not_the_connection() {
    use cache_proto::v1::{ClusterInfoRequest, StatsRequest, cache_client::CacheClient};
    let node = NodeProcess::start(&[]);
    let mut c = CacheClient::connect(format!("http://{}", node.addr()))
        .await
        .expect("connect");
    let mut watch = c
        .watch_cluster(ClusterInfoRequest {})
        .await
        .expect("watch")
        .into_inner();
    watch.message().await.expect("first view").expect("a view");
    let mut big = tonic::Request::new(StatsRequest {});
    big.metadata_mut().insert(
        "x-big",
        "a".repeat(100 << 10).parse().expect("ascii metadata"),
    );
    let err = c
        .stats(big)
        .await
        .expect_err("1 MiB of metadata is refused");
    eprintln!("1 MiB of metadata: {:?} {}", err.code(), err.message());
    // The same connection still serves, and the stream on it is still open.
    c.stats(StatsRequest {})
        .await
        .expect("the connection survived");
    let still_open = tokio::time::timeout(Duration::from_millis(300), watch.message()).await;
    assert!(
        still_open.is_err(),
        "the watch stream ended: {still_open:?}"
    );
}

/// A connection may hold at most 1 024 calls open at once (advertised in HTTP/2 SETTINGS;
/// without it one connection opening 50 000 calls held 60 MB of the node), and a client
/// with more calls than that in flight on one connection just queues them: 3 000
/// concurrent unary calls on one connection all succeed.
#[tokio::test]
async fn calls_per_connection_are_bounded_and_more_queue() {
    let node = NodeProcess::start(&[]);
    let tcp = tokio::net::TcpStream::connect(node.addr())
        .await
        .expect("connect");
    let (_send, mut conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    // Until the server's SETTINGS arrive the client assumes no limit.
    let advertised = tokio::time::timeout(
        Duration::from_secs(10),
        std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(r) = std::pin::Pin::new(&mut conn).poll(cx) {
                return std::task::Poll::Ready(Err(format!("connection ended: {r:?}")));
            }
            match conn.max_concurrent_send_streams() {
                usize::MAX => std::task::Poll::Pending,
                n => std::task::Poll::Ready(Ok(n)),
            }
        }),
    )
    .await
    .expect("SETTINGS within 10 s")
    .expect("settings");
    assert_eq!(advertised, 1024);

    let client = Client::builder()
        .pipelined(false)
        .timeout(Duration::from_secs(60))
        .connect(node.addr())
        .await
        .expect("connect");
    client.set("k", "v").await.expect("set");
    let calls: Vec<_> = (0..3000)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.get("k").await })
        })
        .collect();
    for call in calls {
        let got = call.await.expect("task").expect("a queued call");
        assert_eq!(got.as_deref(), Some(&b"v"[..]));
    }
}

/// A unary call whose body never comes is ended a second after the request timeout rather
/// than holding its stream (and its share of the 1 024) until the connection closes.
#[tokio::test]
async fn a_call_whose_body_never_comes_is_ended() {
    let node = NodeProcess::start(&["--request-timeout", "1s"]);
    let tcp = tokio::net::TcpStream::connect(node.addr())
        .await
        .expect("connect");
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut send = send.ready().await.expect("ready");
    let request = http::Request::post(format!("http://{}/cache.v1.Cache/Get", node.addr()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    // Headers only: the stream stays open, the body never follows.
    let (answer, _body) = send.send_request(request, false).expect("send");
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(20), answer)
        .await
        .expect("the node ends the call instead of waiting for its body");
    // Either an answer carrying a gRPC status or a reset of the stream: the call is over.
    if let Ok(response) = outcome {
        let status = response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap_or("?").to_string());
        assert!(status.is_some_and(|s| s != "0"), "{response:?}");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}

/// An admin slowloris that keeps every slot full — 48 connections with unfinished headers,
/// each reopened as soon as it is cut off — never keeps a health probe out: a new
/// connection makes room by closing the oldest one that has not sent a complete request.
/// (Before: 32 such connections kept `/healthz` failing for as long as they were reopened,
/// which would have a liveness probe restart the node.)
#[test]
fn health_probes_answer_under_an_admin_slowloris() {
    let node = NodeProcess::start(&[]);
    let admin = node.admin;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let open = || {
                let mut s = TcpStream::connect(admin).ok()?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    .ok()?;
                s.set_nonblocking(true).ok()?;
                Some(s)
            };
            let mut slow: Vec<TcpStream> = (0..48).filter_map(|_| open()).collect();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Reopen the ones the node closed.
                slow.retain_mut(|s| {
                    let mut b = [0u8; 1];
                    matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                });
                while slow.len() < 48 {
                    match open() {
                        Some(s) => slow.push(s),
                        None => break,
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut failures = 0;
    for _ in 0..40 {
        match node.http_get("/healthz") {
            Ok((200, _)) => {}
            _ => failures += 1,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    attacker.join().expect("attacker thread");
    assert_eq!(failures, 0, "health probes failed under the slowloris");
}
