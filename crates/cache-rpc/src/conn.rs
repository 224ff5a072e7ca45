//! Connection limits for the node's listeners: a cap on open connections, a handshake
//! deadline and an idle timeout, so idle or half-open connections cannot exhaust the
//! process's file descriptors.
//!
//! Each listener gets its own accept loop ([`guarded`]) that yields [`GuardedIo`]s to the
//! server:
//!
//! - **a connection cap** (a semaphore per listener): beyond it a new connection is accepted
//!   and closed at once, counted (`cache_connections_refused_total{listener}`) and logged at
//!   most every 10 s. The admin listener has its own cap, so health checks and `/metrics`
//!   still answer when clients are at their limit.
//! - **a handshake deadline**: a connection that has not sent the HTTP/2 preface and a frame
//!   header (33 bytes) within it is closed — an idle TCP connection costs a descriptor for
//!   seconds, not forever.
//! - **an idle timeout**: a connection that has sent nothing at all for that long is closed.
//!   A live gRPC client answers the server's keepalive pings (every 30 s), so only dead or
//!   stalled peers hit it.
//!
//! Both deadlines work by failing the connection's next read: the wrapper polls a timer
//! alongside every read, so the server's connection task is woken when it fires.
//! `accept` errors (descriptors exhausted) back off for 100 ms instead of spinning.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Bytes of the HTTP/2 client preface plus one frame header: what a client sends first.
pub const HANDSHAKE_BYTES: usize = 24 + 9;

/// Limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Time a new connection has to send [`HANDSHAKE_BYTES`] (`None`: no deadline).
    pub handshake_timeout: Option<Duration>,
    /// A connection that sends nothing for this long is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
}

/// Counters of one listener, for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections accepted and closed at once because the cap was reached.
    pub refused: AtomicU64,
    /// Connections closed for missing the handshake deadline.
    pub handshake_timeouts: AtomicU64,
    /// Connections closed for being idle.
    pub idle_timeouts: AtomicU64,
    /// Failed `accept` calls (descriptors exhausted, ...).
    pub accept_errors: AtomicU64,
}

/// A connection under the listener's limits. See the module docs.
pub struct GuardedIo {
    inner: TcpStream,
    stats: Arc<ConnStats>,
    _permit: OwnedSemaphorePermit,
    /// Fires at the handshake deadline, until the handshake bytes arrived.
    handshake: Option<Pin<Box<Sleep>>>,
    received: usize,
    /// Fires at the idle deadline; re-armed from `last_read` when it fires early.
    idle: Option<(Pin<Box<Sleep>>, Duration)>,
    last_read: Instant,
}

impl GuardedIo {
    fn check_deadlines(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if let Some(h) = &mut self.handshake
            && h.as_mut().poll(cx).is_ready()
        {
            self.stats
                .handshake_timeouts
                .fetch_add(1, Ordering::Relaxed);
            return Some(io::Error::new(
                io::ErrorKind::TimedOut,
                "no handshake before the deadline",
            ));
        }
        if let Some((sleep, after)) = &mut self.idle
            && sleep.as_mut().poll(cx).is_ready()
        {
            let due = self.last_read + *after;
            if Instant::now() >= due {
                self.stats.idle_timeouts.fetch_add(1, Ordering::Relaxed);
                return Some(io::Error::new(io::ErrorKind::TimedOut, "idle connection"));
            }
            sleep.as_mut().reset(due);
            // Register the re-armed timer with this task.
            let _ = sleep.as_mut().poll(cx);
        }
        None
    }
}

impl Drop for GuardedIo {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    this.received = this.received.saturating_add(n);
                    if this.received >= HANDSHAKE_BYTES {
                        this.handshake = None;
                    }
                    if this.idle.is_some() {
                        this.last_read = Instant::now();
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.check_deadlines(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for GuardedIo {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The accept loop of one listener under `limits`: a stream of connections for the server
/// (it never yields an error; failed accepts are counted and retried after 100 ms).
pub fn guarded(
    listener: TcpListener,
    limits: ConnLimits,
    stats: Arc<ConnStats>,
    what: &'static str,
) -> impl futures_util::Stream<Item = Result<GuardedIo, io::Error>> + Send + 'static {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let last_warning = Arc::new(cluster_core::LogThrottle::default());
    futures_util::stream::unfold(listener, move |listener| {
        let (permits, stats, last_warning) = (
            Arc::clone(&permits),
            Arc::clone(&stats),
            Arc::clone(&last_warning),
        );
        async move {
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                        last_warning.run(|held_back| {
                            tracing::warn!(listener = what, error = %e, held_back, "accept failed (out of file descriptors?); retrying in 100 ms");
                        });
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    last_warning.run(|held_back| {
                        tracing::warn!(
                            listener = what,
                            limit = limits.max_connections,
                            held_back,
                            "connection limit reached: refusing new connections (see --max-connections)"
                        );
                    });
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                stats.open.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                let io = GuardedIo {
                    inner: stream,
                    stats: Arc::clone(&stats),
                    _permit: permit,
                    handshake: limits
                        .handshake_timeout
                        .map(|d| Box::pin(tokio::time::sleep_until(now + d))),
                    received: 0,
                    idle: limits
                        .idle_timeout
                        .map(|d| (Box::pin(tokio::time::sleep_until(now + d)), d)),
                    last_read: now,
                };
                return Some((Ok(io), listener));
            }
        }
    })
}

/// The soft limit on open file descriptors (`ulimit -n`), from `/proc/self/limits` (Linux);
/// `None` elsewhere or when unlimited.
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
