//! The Redis-protocol (RESP2) front end (`--resp-listen`): a second translator onto the
//! cluster core, so `redis-cli`, `redis-benchmark` and any Redis client library can use the
//! cluster. Any node serves any key: requests are routed, forwarded, replicated and made
//! durable exactly as over gRPC.
//!
//! One task per connection reads into a reused buffer, parses **every complete command** in
//! it ([`parse`]), runs them in order, and writes all their replies with one write — so a
//! pipelining client gets its answers in one segment. Commands on one connection run one
//! after the other (Redis's ordering guarantee for a connection); connections run in
//! parallel.
//!
//! Bounds: arguments per command, bytes per argument (the node's key and value limits),
//! bytes per command (the node's response limit: 4 maximal values, at least 64 MiB) and
//! inline line length are checked before a command's body is awaited; a multi-key reply
//! (`MGET`) larger than the response limit is refused; a request that breaks
//! the protocol is answered with `-ERR Protocol error: ...` and the connection is closed (the
//! stream cannot be resynchronised). Replies are flushed every 64 KiB within a batch, and a
//! client that does not read its replies stops being read (TCP backpressure). The listener
//! shares the connection cap and idle timeout of the client listener, with its own counters
//! (`listener="resp"`). Shutdown stops accepting, lets each connection finish the batch it
//! is running, then closes it.
//!
//! With `--auth-file`, every command but `AUTH`, `HELLO .. AUTH` and `QUIT` answers
//! `-NOAUTH` until the connection authenticates with a token (`AUTH token` or
//! `AUTH name token`); each command then needs the token's role (`read` for reads, `write`
//! for writes).

mod commands;
pub mod parse;
mod reply;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conn::ConnLimits;
use crate::service::Shared;
use commands::{Flow, Session};
use parse::{ParseLimits, Parsed, ProtocolError};

/// Most arguments in one RESP command: enough for an `MSET` or `MGET` of many batches.
pub const MAX_ARGS: usize = 1 << 16;
/// Longest inline command (`GET key` typed into telnet): 64 KiB, as Redis.
pub const MAX_INLINE: usize = 64 << 10;
/// Replies are written once this many bytes are pending, even mid-batch.
const FLUSH_AT: usize = 64 << 10;
/// The read buffer starts (and is kept) at this size.
const READ_BUFFER: usize = 16 << 10;

/// Serves RESP on `listener` until `stop` fires, then waits for the connections to finish
/// the batch they are running.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    limits: ConnLimits,
    stop: CancellationToken,
    tls: Option<Arc<crate::tls::ServerTls>>,
) {
    let handshake = limits
        .handshake_timeout
        .unwrap_or(std::time::Duration::from_secs(10));
    let port = listener.local_addr().map_or(0, |a| a.port());
    let store_limits = *shared.core.store().limits();
    let parse_limits = ParseLimits {
        max_args: MAX_ARGS,
        max_arg_bytes: store_limits.max_key_bytes.max(store_limits.max_value_bytes),
        max_inline_bytes: MAX_INLINE,
        // What the gRPC side accepts in one response: room for an MSET of several
        // maximal values, never the product of the count and size limits.
        max_command_bytes: store_limits.max_response_bytes(),
    };
    // RESP has no preface: a client may connect and stay quiet until it needs the cache,
    // so only the idle timeout applies.
    let limits = ConnLimits {
        handshake_timeout: None,
        ..limits
    };
    let incoming =
        crate::conn::guarded(listener, limits, Arc::clone(&shared.connections[3]), "resp");
    futures_util::pin_mut!(incoming);
    let tasks = TaskTracker::new();
    let ids = AtomicU64::new(1);
    loop {
        let io = tokio::select! {
            () = stop.cancelled() => break,
            next = incoming.next() => match next {
                Some(Ok(io)) => io,
                Some(Err(_)) | None => continue,
            },
        };
        let session = Session::new(
            Arc::clone(&shared),
            ids.fetch_add(1, Ordering::Relaxed),
            port,
        );
        let stop = stop.clone();
        match &tls {
            None => {
                tasks.spawn(connection(io, session, parse_limits, stop));
            }
            Some(tls) => {
                let acceptor = tls.acceptor();
                tasks.spawn(async move {
                    match tokio::time::timeout(handshake, acceptor.accept(io)).await {
                        Ok(Ok(stream)) => connection(stream, session, parse_limits, stop).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "RESP TLS handshake failed"),
                        Err(_) => {
                            tracing::debug!("RESP TLS handshake not done within the deadline")
                        }
                    }
                });
            }
        }
    }
    tasks.close();
    tasks.wait().await;
}

/// One connection: read, run every complete command, write the replies, repeat.
async fn connection(
    mut io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    mut session: Session,
    limits: ParseLimits,
    stop: CancellationToken,
) {
    let mut buf = BytesMut::with_capacity(READ_BUFFER);
    let mut out: Vec<u8> = Vec::with_capacity(READ_BUFFER);
    let mut ranges = Vec::new();
    let mut args: Vec<Bytes> = Vec::new();
    // When the bytes being parsed arrived (the start of their commands' latency).
    let mut read_at = std::time::Instant::now();
    loop {
        // Run every complete command in the buffer.
        loop {
            match parse::parse(&buf, &limits, &mut ranges) {
                Ok(Parsed::Command(n)) => {
                    let frame = buf.split_to(n).freeze();
                    if ranges.is_empty() {
                        continue;
                    }
                    args.clear();
                    args.extend(ranges.iter().map(|r| frame.slice(r.clone())));
                    let flow = session.execute(&args, &mut out).await;
                    if flow == Flow::Close {
                        let _ = io.write_all(&out).await;
                        return;
                    }
                    if out.len() >= FLUSH_AT {
                        if io.write_all(&out).await.is_err() {
                            return;
                        }
                        session.replies_written(read_at);
                        out.clear();
                        // The next command starts now, not before the write.
                        session.arrived(std::time::Instant::now());
                    }
                }
                Ok(Parsed::Incomplete(need)) => {
                    if need > buf.capacity() {
                        buf.reserve(need - buf.len());
                    }
                    break;
                }
                Err(ProtocolError(msg)) => {
                    reply::error(&mut out, &format!("ERR {msg}"));
                    let _ = io.write_all(&out).await;
                    return;
                }
            }
        }
        if !out.is_empty() {
            // Let the other connections with bytes waiting run their commands first, so the
            // replies of one round go out together, as Redis writes its pending replies
            // after serving every readable client. Writing at once instead wakes a waiting
            // client per write: a cross-CPU wake-up (an IPI, a VM exit on a virtual machine)
            // billed to this thread — measured at 17 % of the node's CPU under
            // `redis-benchmark -P 16` (`docs/benchmarks.md`, "RESP at parity").
            tokio::task::yield_now().await;
            if io.write_all(&out).await.is_err() {
                return;
            }
            session.replies_written(read_at);
            out.clear();
            if out.capacity() > 4 * FLUSH_AT {
                out.shrink_to(READ_BUFFER);
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_BUFFER);
        }
        tokio::select! {
            read = io.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    read_at = std::time::Instant::now();
                    session.arrived(read_at);
                }
            },
            () = stop.cancelled() => return,
        }
    }
}
