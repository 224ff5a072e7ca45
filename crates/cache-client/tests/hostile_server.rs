//! The SDK against a forged server: an HTTP/2 endpoint that answers every call with a gRPC
//! message whose length prefix announces almost 4 GiB. The client must refuse it from the
//! prefix alone (its `max_response_size`), not reserve the memory and wait for the rest.

use std::time::Duration;

use bytes::Bytes;
use cache_client::{Client, Error};
use tokio::net::TcpListener;

/// Serves forged answers on a loopback port until the test ends; returns the address.
async fn forged_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
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
                    // Uncompressed, 0xFFFF_FFF0 bytes announced, 3 sent; the stream stays
                    // open (the rest never comes).
                    let forged = Bytes::from_static(&[0, 0xff, 0xff, 0xff, 0xf0, 1, 2, 3]);
                    let _ = body.send_data(forged, false);
                    // Keep the stream (and its body) alive while the connection runs.
                    std::mem::forget(body);
                }
            });
        }
    });
    addr
}

async fn refused_quickly(client: &Client, how: &str) {
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
    let addr = forged_server().await;
    let unary = Client::builder()
        .timeout(Duration::from_secs(10))
        .retries(0)
        .pipelined(false)
        .connect(&addr)
        .await
        .expect("connect");
    refused_quickly(&unary, "unary").await;
    let stream = Client::builder()
        .timeout(Duration::from_secs(10))
        .retries(0)
        .connect(&addr)
        .await
        .expect("connect");
    refused_quickly(&stream, "pipelined stream").await;
}
