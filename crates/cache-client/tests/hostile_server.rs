//! The SDK against forged servers: an HTTP/2 endpoint that answers every call with a gRPC
//! message whose length prefix announces almost 4 GiB — the client must refuse it from the
//! prefix alone (its `max_response_size`), not reserve the memory and wait for the rest —
//! and one whose `ClusterInfo` lists more members than a cluster can have.

use std::time::Duration;

use bytes::Bytes;
use cache_client::{Client, Error};
use tokio::net::TcpListener;

/// Serves `answer` (the body's DATA) to every call on a loopback port until the test ends,
/// then `grpc-status: 0` trailers if `end`, else nothing more (the stream stays open);
/// returns the address.
async fn forged_server(answer: Bytes, end: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((_request, mut respond))) = conn.accept().await {
                    let head = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(())
                        .expect("response head");
                    let Ok(mut body) = respond.send_response(head, false) else {
                        continue;
                    };
                    let _ = body.send_data(answer.clone(), false);
                    if end {
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        let _ = body.send_trailers(trailers);
                    } else {
                        // Keep the stream alive while the connection runs.
                        std::mem::forget(body);
                    }
                }
            });
        }
    });
    addr
}

/// A direct client of `addr` without retries, on the pipelined stream or unary calls.
async fn client(addr: &str, pipelined: bool) -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .retries(0)
        .pipelined(pipelined)
        .connect(addr)
        .await
        .expect("connect")
}

/// `message` as one uncompressed gRPC message.
fn grpc_frame(message: &impl prost::Message) -> Bytes {
    let encoded = message.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(encoded.len()).expect("small").to_be_bytes());
    framed.extend_from_slice(&encoded);
    Bytes::from(framed)
}

async fn refused_from_the_prefix(client: &Client, how: &str) {
    let err = client
        .get("k")
        .await
        .expect_err("a 4 GiB answer is refused");
    assert!(
        matches!(&err, Error::InvalidRequest { code, .. } if *code == tonic::Code::OutOfRange),
        "{how}: {err:?}"
    );
    // Refused from the prefix (by the default limit, named), not timed out waiting for
    // the rest of a 4 GiB reservation.
    assert!(err.to_string().contains("67108864"), "{how}: {err}");
}

#[tokio::test]
async fn a_forged_length_prefix_is_refused_before_anything_is_reserved() {
    // Uncompressed, 0xFFFF_FFF0 bytes announced, 3 sent; the stream stays open (the rest
    // never comes).
    let forged = Bytes::from_static(&[0, 0xff, 0xff, 0xff, 0xf0, 1, 2, 3]);
    let addr = forged_server(forged, false).await;
    let unary = client(&addr, false).await;
    refused_from_the_prefix(&unary, "unary").await;
    let stream = client(&addr, true).await;
    refused_from_the_prefix(&stream, "pipelined stream").await;
}

/// A `ClusterInfo` listing 10 000 members (a cluster has at most 8 192) is refused, not
/// turned into 10 000 connections.
#[tokio::test]
async fn a_member_list_larger_than_any_cluster_is_refused() {
    let info = cache_client::proto::ClusterInfoResponse {
        members: (0..10_000)
            .map(|i| cache_client::proto::Member {
                id: format!("n{i}"),
                rpc_addr: format!("127.0.0.1:{}", 10_000 + i),
                weight: 1,
                state: cache_client::proto::MemberState::Alive as i32,
                ..Default::default()
            })
            .collect(),
        vnodes_per_weight: 1,
        ring_format_version: cluster_ring::FORMAT_VERSION,
        ..Default::default()
    };
    // A consistent view (the fingerprint of the ring those members make), so nothing but
    // the member count is wrong.
    let owners: Vec<cluster_ring::Member> = info
        .members
        .iter()
        .map(|m| cluster_ring::Member::new(cluster_ring::NodeId::new(m.id.clone()).expect("id"), 1))
        .collect();
    let ring = cluster_ring::Ring::new(owners, 1).expect("ring");
    let info = cache_client::proto::ClusterInfoResponse {
        ring_fingerprint: ring.fingerprint(),
        ..info
    };
    let addr = forged_server(grpc_frame(&info), true).await;
    let err = Client::builder()
        .timeout(Duration::from_secs(10))
        .retries(0)
        .connect_cluster([addr])
        .await
        .expect_err("10 000 members");
    assert!(
        matches!(&err, Error::Cluster(m) if m.contains("10000 members")),
        "{err:?}"
    );
}

/// A `MultiGet` answered with fewer results than keys is an error, not a shorter list whose
/// values no longer line up with their keys.
#[tokio::test]
async fn a_batch_answer_that_does_not_match_the_keys_is_refused() {
    let one = cache_client::proto::MultiGetResponse {
        results: vec![cache_client::proto::GetResponse {
            found: true,
            value: Bytes::from_static(b"v"),
            ..Default::default()
        }],
        ..Default::default()
    };
    let addr = forged_server(grpc_frame(&one), true).await;
    let err = client(&addr, false)
        .await
        .get_many(["a", "b", "c"])
        .await
        .expect_err("1 result for 3 keys");
    assert!(
        err.to_string().contains("answered 1 results for 3 keys"),
        "{err:?}"
    );
}
