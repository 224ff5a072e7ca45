//! The client side of the pipelined stream (`cache.v1.Cache/Pipeline`): many requests on
//! one long-lived HTTP/2 stream instead of one stream each.
//!
//! Calls queue their operation; one driver task per stream packs every operation that is
//! ready (up to [`PACK`]) into one message, gives each an id, and routes each answer — in
//! whatever order the node sends them — back to its caller. At most [`IN_FLIGHT`]
//! operations are outstanding per stream (a caller beyond that waits for a slot), which
//! matches what the node runs concurrently per stream. A caller that stops waiting (its
//! deadline passed, its future was dropped) is reported to the node in the next message as
//! cancelled. The stream is opened on first use and again after it breaks; a node without
//! the `Pipeline` RPC (`UNIMPLEMENTED`) makes the client use unary calls from then on, and
//! operations over [`MAX_PIPELINED_BYTES`] always go as unary calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_proto::v1::cache_client::CacheClient;
use cache_proto::v1::pipelined_op::Op;
use cache_proto::v1::pipelined_result::Result as PResult;
use cache_proto::v1::{self as pb};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Most operations outstanding on one stream (the node runs as many at once per stream).
pub(crate) const IN_FLIGHT: usize = 1024;
/// Larger operations (encoded) are sent as unary calls.
pub(crate) const MAX_PIPELINED_BYTES: usize = 64 << 10;
/// Most operations packed into one message.
pub(crate) const PACK: usize = 256;
/// Most bytes of operations (with [`OP_FRAMING`] each) packed into one message; one larger
/// operation goes alone. Any node decodes a request of 64 KiB plus its largest key and
/// value, so a full pack plus the cancelled ids (≤ 1 024 × 11 bytes) is always under its
/// limit, and so is one operation alone with them (the limit exceeds any valid operation by
/// nearly 64 KiB).
const PACK_BYTES: usize = 32 << 10;
/// What the message adds to each operation: its id, its timeout, the field tags and lengths.
const OP_FRAMING: usize = 24;

type Reply = oneshot::Sender<Result<PResult, Status>>;

struct Queued {
    op: Op,
    /// `op.encoded_len()` plus [`OP_FRAMING`].
    bytes: usize,
    timeout: Duration,
    reply: Reply,
    permit: OwnedSemaphorePermit,
}

/// One client's pipelined stream (shared by its clones).
#[derive(Debug)]
pub(crate) struct Pipeline {
    sender: Mutex<Option<mpsc::Sender<Queued>>>,
    permits: Arc<Semaphore>,
    /// The node has no `Pipeline` RPC: use unary calls.
    unsupported: AtomicBool,
    /// The client's decode limit, sent to the node when a stream opens (as
    /// `cache_proto::MAX_RESPONSE_HEADER`) so that an answer over it fails alone.
    max_response_bytes: usize,
}

impl Pipeline {
    /// A pipeline whose streams tell the node this client decodes messages of at most
    /// `max_response_bytes`.
    pub(crate) fn new(max_response_bytes: usize) -> Self {
        Self {
            sender: Mutex::new(None),
            permits: Arc::new(Semaphore::new(IN_FLIGHT)),
            unsupported: AtomicBool::new(false),
            max_response_bytes,
        }
    }

    /// Sends `op` on the stream and waits for its answer. `None`: the node does not support
    /// the stream (the operation was not sent; use the unary RPC).
    pub(crate) async fn call(
        &self,
        client: &CacheClient<Channel>,
        auth: Option<MetadataValue<Ascii>>,
        op: Op,
        timeout: Duration,
    ) -> Option<Result<PResult, Status>> {
        // Large requests go as unary calls: they would hold up the stream's other requests,
        // and one over the node's message limit would end the stream for all of them.
        let len = op.encoded_len();
        if self.unsupported.load(Ordering::Relaxed) || len > MAX_PIPELINED_BYTES {
            return None;
        }
        let Ok(permit) = Arc::clone(&self.permits).acquire_owned().await else {
            return Some(Err(Status::unavailable("the pipeline is closed")));
        };
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
            op,
            bytes: len + OP_FRAMING,
            timeout,
            reply,
            permit,
        };
        if self.sender(client, auth).send(queued).await.is_err() {
            return Some(Err(Status::unavailable("the pipeline stream closed")));
        }
        match answer.await {
            Ok(Err(status)) if status.code() == Code::Unimplemented => {
                self.unsupported.store(true, Ordering::Relaxed);
                None
            }
            Ok(result) => Some(result),
            Err(_) => Some(Err(Status::unavailable("the pipeline stream ended"))),
        }
    }

    /// The queue of the open stream, opening one (with a driver task) if there is none.
    fn sender(
        &self,
        client: &CacheClient<Channel>,
        auth: Option<MetadataValue<Ascii>>,
    ) -> mpsc::Sender<Queued> {
        let mut sender = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = sender.as_ref()
            && !tx.is_closed()
        {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        tokio::spawn(drive(client.clone(), auth, self.max_response_bytes, rx));
        *sender = Some(tx.clone());
        tx
    }
}

/// Fails every caller waiting on `pending` and every operation still queued in `rx`.
fn fail_all(
    pending: &mut HashMap<u64, (Reply, OwnedSemaphorePermit)>,
    rx: &mut mpsc::Receiver<Queued>,
    status: &Status,
) {
    rx.close();
    for (_, (reply, _)) in pending.drain() {
        let _ = reply.send(Err(status.clone()));
    }
    while let Ok(q) = rx.try_recv() {
        let _ = q.reply.send(Err(status.clone()));
    }
}

/// One stream's driver: sends queued operations in packs, routes answers by id.
async fn drive(
    mut client: CacheClient<Channel>,
    auth: Option<MetadataValue<Ascii>>,
    max_response_bytes: usize,
    mut rx: mpsc::Receiver<Queued>,
) {
    let (out, out_rx) = mpsc::channel::<pb::PipelineRequest>(64);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(out_rx));
    if let Some(auth) = auth {
        request.metadata_mut().insert("authorization", auth);
    }
    request.metadata_mut().insert(
        cache_proto::MAX_RESPONSE_HEADER,
        MetadataValue::from(max_response_bytes as u64),
    );
    let mut pending: HashMap<u64, (Reply, OwnedSemaphorePermit)> = HashMap::new();
    let mut inbound = match client.pipeline(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            fail_all(&mut pending, &mut rx, &status);
            return;
        }
    };
    let mut next_id: u64 = 0;
    loop {
        tokio::select! {
            queued = rx.recv() => {
                // Every client clone is gone (and so is every caller).
                let Some(first) = queued else { return };
                // Everything queued, in messages of at most PACK operations and
                // PACK_BYTES.
                let mut next = Some(first);
                while let Some(first) = next.take() {
                    let mut bytes = first.bytes;
                    let mut batch = vec![first];
                    while batch.len() < PACK {
                        match rx.try_recv() {
                            Ok(q) if bytes + q.bytes > PACK_BYTES => {
                                next = Some(q);
                                break;
                            }
                            Ok(q) => {
                                bytes += q.bytes;
                                batch.push(q);
                            }
                            Err(_) => break,
                        }
                    }
                    let mut ops = Vec::with_capacity(batch.len());
                    for q in batch {
                        next_id += 1;
                        let timeout_ms = u32::try_from(q.timeout.as_millis()).unwrap_or(u32::MAX).max(1);
                        ops.push(pb::PipelinedOp { id: next_id, timeout_ms, op: Some(q.op) });
                        pending.insert(next_id, (q.reply, q.permit));
                    }
                    // Callers that stopped waiting: tell the node, free their slots.
                    let mut cancel = Vec::new();
                    pending.retain(|id, (reply, _)| {
                        let gone = reply.is_closed();
                        if gone {
                            cancel.push(*id);
                        }
                        !gone
                    });
                    if out.send(pb::PipelineRequest { ops, cancel }).await.is_err() {
                        let status = Status::unavailable("the pipeline stream closed");
                        if let Some(q) = next.take() {
                            let _ = q.reply.send(Err(status.clone()));
                        }
                        fail_all(&mut pending, &mut rx, &status);
                        return;
                    }
                }
            }
            message = inbound.message() => match message {
                Ok(Some(response)) => {
                    for r in response.results {
                        if let Some((reply, _permit)) = pending.remove(&r.id) {
                            let _ = reply.send(result(r.result));
                        }
                    }
                }
                Ok(None) => {
                    let status = Status::unavailable(
                        "the node ended the pipeline stream (shutting down?)",
                    );
                    fail_all(&mut pending, &mut rx, &status);
                    return;
                }
                Err(status) => {
                    fail_all(&mut pending, &mut rx, &broken(&status));
                    return;
                }
            },
        }
    }
}

/// A stream that failed under its calls: a broken connection (the node died, the network
/// failed) is `UNAVAILABLE` — what a unary call reports — so idempotent calls are retried;
/// the node's own refusals keep their code.
fn broken(status: &Status) -> Status {
    match status.code() {
        Code::Unknown | Code::Internal | Code::Cancelled | Code::Unavailable => {
            Status::unavailable(format!("the pipeline stream broke: {}", status.message()))
        }
        _ => status.clone(),
    }
}

fn result(r: Option<PResult>) -> Result<PResult, Status> {
    match r {
        Some(PResult::Error(e)) => Err(Status::new(Code::from(e.code), e.message)),
        Some(r) => Ok(r),
        None => Err(Status::internal("a pipelined answer without a result")),
    }
}
