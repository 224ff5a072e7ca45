//! [`GrpcTransport`]: the core's [`PeerTransport`] over gRPC, to each member's peer listener.
//!
//! One multiplexed HTTP/2 channel per peer, created lazily and replaced if the peer's
//! address changes. Every call carries the request's remaining budget as its gRPC deadline
//! and is abandoned locally at that deadline too. Statuses are mapped back to the core's
//! [`PeerError`] by [`wire::peer_error`]: the peer's own answer, a call that never reached it,
//! or one whose outcome is unknown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cache_core::VersionedRead;
use cache_proto::peer::v1::{self as peer, peer_client::PeerClient};
use cluster_core::{
    ApplyReport, Mutation, PeerCall, PeerError, PeerReply, PeerTransport, Request, Response,
    RingView, SyncReply, SyncRequest,
};
use cluster_ring::NodeId;
use parking_lot::Mutex;
use tonic::transport::{Channel, Endpoint};

use crate::wire;

/// gRPC calls to other nodes' peer listeners.
#[derive(Debug)]
pub struct GrpcTransport {
    ring: Arc<RingView>,
    /// Per peer: its address, the TLS generation the channel was built with, the channel.
    channels: Mutex<HashMap<NodeId, (SocketAddr, u64, Channel)>>,
    connect_timeout: Duration,
    max_message_bytes: usize,
    /// Mutual TLS to other members (`--peer-tls-*`); `None`: plaintext.
    tls: Option<Arc<crate::tls::ServerTls>>,
}

impl GrpcTransport {
    /// Calls peers at the addresses `ring`'s membership view gives, refusing messages
    /// larger than `max_message_bytes` in either direction.
    pub fn new(ring: Arc<RingView>, connect_timeout: Duration, max_message_bytes: usize) -> Self {
        Self {
            ring,
            channels: Mutex::new(HashMap::new()),
            connect_timeout,
            max_message_bytes,
            tls: None,
        }
    }

    /// Calls peers over mutual TLS with `tls`'s certificate and cluster CA; channels are
    /// rebuilt after the certificate is reloaded.
    pub fn with_tls(mut self, tls: Arc<crate::tls::ServerTls>) -> Self {
        self.tls = Some(tls);
        self
    }

    fn client(&self, to: &NodeId) -> Result<PeerClient<Channel>, PeerError> {
        let unreachable = |detail: String| PeerError::Unreachable {
            peer: to.to_string(),
            detail,
        };
        let addr = self
            .ring
            .load()
            .peer_addr(to)
            .ok_or_else(|| unreachable("not a member".into()))?;
        let generation = self.tls.as_ref().map_or(0, |t| t.generation());
        let channel = {
            let mut channels = self.channels.lock();
            match channels.get(to) {
                Some((a, g, ch)) if *a == addr && *g == generation => ch.clone(),
                _ => {
                    let scheme = if self.tls.is_some() { "https" } else { "http" };
                    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
                        .map_err(|e| unreachable(e.to_string()))?;
                    if let Some(tls) = &self.tls {
                        let config = tls
                            .peer_client_config()
                            .map_err(|e| unreachable(e.to_string()))?;
                        endpoint = endpoint
                            .tls_config(config)
                            .map_err(|e| unreachable(e.to_string()))?;
                    }
                    let endpoint = endpoint
                        .connect_timeout(self.connect_timeout)
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(10))
                        .keep_alive_timeout(self.connect_timeout.max(Duration::from_secs(1)))
                        .keep_alive_while_idle(true);
                    let channel = endpoint.connect_lazy();
                    channels.insert(to.clone(), (addr, generation, channel.clone()));
                    channel
                }
            }
        };
        Ok(PeerClient::new(channel)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes))
    }

    /// Runs one call with the deadline as its gRPC timeout, abandoned at the deadline.
    async fn call<Req, Resp, F, Fut>(
        &self,
        to: &NodeId,
        call: &PeerCall,
        body: Req,
        send: F,
    ) -> Result<Resp, PeerError>
    where
        F: FnOnce(PeerClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let client = self.client(to)?;
        let budget = call
            .deadline
            .saturating_duration_since(tokio::time::Instant::now());
        let mut request = tonic::Request::new(body);
        request.set_timeout(budget);
        match tokio::time::timeout_at(call.deadline, send(client, request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(wire::peer_error(to, &status)),
            Err(_) => Err(PeerError::NoAnswer {
                peer: to.to_string(),
                detail: format!("no answer within {budget:?}"),
            }),
        }
    }
}

fn bad_answer(to: &NodeId, detail: String) -> PeerError {
    PeerError::NoAnswer {
        peer: to.to_string(),
        detail: format!("malformed answer: {detail}"),
    }
}

impl PeerTransport for GrpcTransport {
    async fn forward(
        &self,
        to: &NodeId,
        call: PeerCall,
        request: Request,
    ) -> Result<PeerReply<Response>, PeerError> {
        let body = peer::ForwardRequest {
            from: call.from.to_string(),
            ring_fingerprint: call.ring_fingerprint,
            request: Some(wire::forward_request(request)),
            not_after_ms: call.not_after_ms.unwrap_or(0),
            version: call.version.unwrap_or(0),
        };
        let reply = self
            .call(
                to,
                &call,
                body,
                |mut c, r| async move { c.forward(r).await },
            )
            .await?;
        Ok(PeerReply {
            body: wire::from_forward_response(reply.response).map_err(|e| bad_answer(to, e))?,
            ring_fingerprint: reply.ring_fingerprint,
        })
    }

    async fn replicate(
        &self,
        to: &NodeId,
        call: PeerCall,
        mutations: Vec<Mutation>,
    ) -> Result<PeerReply<ApplyReport>, PeerError> {
        let body = peer::ReplicateRequest {
            from: call.from.to_string(),
            ring_fingerprint: call.ring_fingerprint,
            mutations: mutations.into_iter().map(wire::mutation_to_pb).collect(),
        };
        let reply = self
            .call(
                to,
                &call,
                body,
                |mut c, r| async move { c.replicate(r).await },
            )
            .await?;
        Ok(PeerReply {
            body: ApplyReport {
                applied: reply.applied,
                stale: reply.stale,
            },
            ring_fingerprint: reply.ring_fingerprint,
        })
    }

    async fn fetch(
        &self,
        to: &NodeId,
        call: PeerCall,
        keys: Vec<Bytes>,
    ) -> Result<PeerReply<Vec<Option<VersionedRead>>>, PeerError> {
        let body = peer::FetchRequest {
            from: call.from.to_string(),
            ring_fingerprint: call.ring_fingerprint,
            keys,
        };
        let reply = self
            .call(to, &call, body, |mut c, r| async move { c.fetch(r).await })
            .await?;
        Ok(PeerReply {
            body: reply.entries.into_iter().map(wire::versioned).collect(),
            ring_fingerprint: reply.ring_fingerprint,
        })
    }

    async fn sync(
        &self,
        to: &NodeId,
        call: PeerCall,
        request: SyncRequest,
    ) -> Result<PeerReply<SyncReply>, PeerError> {
        let body = peer::SyncRequest {
            from: call.from.to_string(),
            ring_fingerprint: call.ring_fingerprint,
            digests: request.digests,
            from_segment: request.from_segment,
        };
        let reply = self
            .call(to, &call, body, |mut c, r| async move { c.sync(r).await })
            .await?;
        Ok(PeerReply {
            body: wire::sync_reply(&reply),
            ring_fingerprint: reply.ring_fingerprint,
        })
    }
}
