//! Request latency as the client's transport sees it, for unary gRPC calls: a tower layer
//! on the gRPC server that starts a clock when a request's headers reach the server and
//! stops it when the last frame of its response (the trailers) is handed to HTTP/2 — or
//! when the response is dropped unfinished. Unlike `cache_request_duration_seconds`, which
//! times only the handler, this includes waiting for a runtime thread, decoding, encoding
//! and HTTP/2 flow control: what makes a client's p99 differ from the handler's.
//!
//! Streaming calls are not timed here (a stream's life is not a request's latency): the
//! pipelined stream times each operation itself (`Transport::GrpcStream`).
//!
//! The same layer is the backstop deadline of unary calls ([`LatencyLayer::with_deadline`]):
//! the core answers every request within the request timeout, but a call whose body never
//! arrives never reaches the core and would hold its HTTP/2 stream until the connection
//! closes. `Flush` and `Snapshot` are exempt: they may legitimately run longer (within the
//! client's own deadline), and `Flush` must not stop half-way.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;

use crate::metrics::{NodeMetrics, Op, Transport};

/// What a gRPC method is for the latency histogram.
enum Timing {
    /// A streaming method: not timed here.
    Skip,
    /// A unary method: timed under this operation (`None`: `other`).
    Unary(Option<Op>),
}

fn timing(path: &str) -> Timing {
    let Some(method) = path.strip_prefix("/cache.v1.Cache/") else {
        // Health checks are unary; reflection and the health watch are streams.
        return match path {
            "/grpc.health.v1.Health/Check" => Timing::Unary(None),
            _ => Timing::Skip,
        };
    };
    Timing::Unary(Some(match method {
        "Get" => Op::Get,
        "Set" => Op::Set,
        "Delete" => Op::Delete,
        "Touch" => Op::Touch,
        "Incr" => Op::Incr,
        "MultiGet" => Op::MultiGet,
        "MultiSet" => Op::MultiSet,
        "Stats" => Op::Stats,
        "ClusterInfo" => Op::ClusterInfo,
        "Pipeline" | "WatchCluster" => return Timing::Skip,
        _ => return Timing::Unary(None),
    }))
}

/// Whether a unary call of this path may run past the backstop deadline.
fn long_running(path: &str) -> bool {
    matches!(path, "/cache.v1.Cache/Flush" | "/cache.v1.Cache/Snapshot")
}

/// The layer: wraps the gRPC server's routes.
#[derive(Debug, Clone)]
pub struct LatencyLayer {
    metrics: Arc<NodeMetrics>,
    deadline: Option<std::time::Duration>,
}

impl LatencyLayer {
    /// A layer recording into `metrics`, with no backstop deadline.
    pub fn new(metrics: Arc<NodeMetrics>) -> Self {
        Self {
            metrics,
            deadline: None,
        }
    }

    /// Ends a unary call (other than `Flush` and `Snapshot`) that has not answered within
    /// `deadline` with `DEADLINE_EXCEEDED`, and so frees its stream: set it a little past the
    /// request timeout, which the core itself keeps.
    pub fn with_deadline(mut self, deadline: std::time::Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }
}

impl<S> tower::Layer<S> for LatencyLayer {
    type Service = Latency<S>;

    fn layer(&self, inner: S) -> Latency<S> {
        Latency {
            inner,
            metrics: Arc::clone(&self.metrics),
            deadline: self.deadline,
        }
    }
}

/// The service [`LatencyLayer`] makes.
#[derive(Debug, Clone)]
pub struct Latency<S> {
    inner: S,
    metrics: Arc<NodeMetrics>,
    deadline: Option<std::time::Duration>,
}

impl<S, B> tower::Service<http::Request<B>> for Latency<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let start = Instant::now();
        let path = request.uri().path();
        let timing = timing(path);
        let deadline = self
            .deadline
            .filter(|_| matches!(timing, Timing::Unary(_)) && !long_running(path));
        let metrics = Arc::clone(&self.metrics);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = match deadline {
                None => response.await?,
                Some(d) => match tokio::time::timeout(d, response).await {
                    Ok(response) => response?,
                    Err(_) => tonic::Status::deadline_exceeded(format!(
                        "no answer within {d:?}: the request body did not arrive in time"
                    ))
                    .into_http(),
                },
            };
            let Timing::Unary(op) = timing else {
                return Ok(response);
            };
            let (parts, body) = response.into_parts();
            let body = tonic::body::Body::new(Timed {
                inner: body,
                clock: Some((start, metrics, op)),
            });
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

/// A response body that records the request's latency when it ends (or is dropped).
struct Timed {
    inner: tonic::body::Body,
    clock: Option<(Instant, Arc<NodeMetrics>, Option<Op>)>,
}

impl Timed {
    fn stop(&mut self) {
        if let Some((start, metrics, op)) = self.clock.take() {
            metrics.record_transport(Transport::Grpc, op, start.elapsed());
        }
    }
}

impl http_body::Body for Timed {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            // The trailers are a gRPC response's last frame.
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => self.stop(),
            Poll::Ready(None | Some(Err(_))) => self.stop(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_map_to_operations_and_streams_are_skipped() {
        assert!(matches!(
            timing("/cache.v1.Cache/Get"),
            Timing::Unary(Some(Op::Get))
        ));
        assert!(matches!(
            timing("/cache.v1.Cache/MultiSet"),
            Timing::Unary(Some(Op::MultiSet))
        ));
        assert!(matches!(
            timing("/cache.v1.Cache/Flush"),
            Timing::Unary(None)
        ));
        assert!(matches!(timing("/cache.v1.Cache/Pipeline"), Timing::Skip));
        assert!(matches!(
            timing("/cache.v1.Cache/WatchCluster"),
            Timing::Skip
        ));
        assert!(matches!(
            timing("/grpc.health.v1.Health/Check"),
            Timing::Unary(None)
        ));
        assert!(matches!(
            timing("/grpc.health.v1.Health/Watch"),
            Timing::Skip
        ));
        assert!(matches!(timing("/nope"), Timing::Skip));
        assert!(long_running("/cache.v1.Cache/Flush"));
        assert!(long_running("/cache.v1.Cache/Snapshot"));
        assert!(!long_running("/cache.v1.Cache/Get"));
    }
}
