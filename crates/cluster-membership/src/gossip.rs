//! [`GossipMembership`]: a membership [`Protocol`] — SWIM gossip ([`Swim`]) or coordinator
//! membership ([`Registry`]) — driven over the network: datagrams over UDP, push-pull (whole
//! member lists) over TCP on the same port; every view change is published through the
//! [`Membership`] watch.
//!
//! Three tasks: the UDP receiver, the TCP acceptor, and the timer (sleeps until the
//! protocol's next wakeup). A fourth retries joining — resolving the `--join` host names
//! again at every attempt, so a Kubernetes headless service works — until another member is
//! known. Each selects on one cancellation token, cancelled when the membership is dropped;
//! a reliable (TCP) send is a short task of its own, bounded by a 2 s timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::registry::{Registry, RegistryConfig};
use crate::swim::wire::MAX_MESSAGE_BYTES;
use crate::swim::{Outgoing, Swim, SwimConfig, SwimStats, Update};
use crate::{Membership, MembershipError, MembershipView, Protocol};

/// Which protocol the runtime drives.
#[derive(Debug, Clone)]
pub enum ProtocolConfig {
    /// SWIM gossip.
    Swim(SwimConfig),
    /// Coordinator membership: `coordinator` is the coordinator's gossip address
    /// (`host:port`, resolved at start), or `None` on the coordinator itself.
    Coordinator {
        /// Settings.
        config: RegistryConfig,
        /// The coordinator's gossip address; `None`: this node is the coordinator.
        coordinator: Option<String>,
    },
}

/// How long one reliable (TCP) send may take.
const STREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Push-pull streams read at once; more connections are closed on accept.
const MAX_STREAMS: usize = 64;
/// How often a member that has not joined yet says so in the log.
const NOT_JOINED_WARNING: Duration = Duration::from_secs(10);
/// How often joining is retried while no other member is known.
const JOIN_RETRY: Duration = Duration::from_secs(1);

/// Settings of a gossip member.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// This member: id, addresses (the gossip one is where others reach it), weight.
    pub identity: Update,
    /// Where to bind the gossip socket (UDP and TCP, same port).
    pub bind: SocketAddr,
    /// Seed members' gossip addresses (`host:port`), resolved at every attempt.
    pub join: Vec<String>,
    /// The protocol and its settings.
    pub protocol: ProtocolConfig,
    /// Cluster secrets authenticating every gossip message (`None`: unauthenticated).
    pub keyring: Option<Keyring>,
}

/// Bytes of the authentication tag appended to every message when a [`Keyring`] is set.
pub const TAG_BYTES: usize = 32;
/// Bytes an encrypting [`Keyring`] adds to every message: a 24-byte random nonce and a
/// 16-byte Poly1305 tag.
pub const SEALED_BYTES: usize = 24 + 16;
/// The most any keyring adds to a message (what datagrams leave room for).
pub const MAX_SEAL_OVERHEAD: usize = if TAG_BYTES > SEALED_BYTES {
    TAG_BYTES
} else {
    SEALED_BYTES
};

/// Cluster secrets, like memberlist's keyring: every gossip message (datagram or push-pull)
/// carries an HMAC-SHA256 tag made with the **first** key; a message is accepted if its tag
/// matches **any** key. Rotation: add the new key second on every member, then move it first
/// on every member, then remove the old one — at each step every member accepts what every
/// other sends. Messages without a valid tag are dropped before the protocol sees them and
/// counted in `messages_refused`. Tags authenticate, they do not encrypt: membership
/// (addresses, states) stays readable on the wire, and an old message can be replayed (SWIM's
/// incarnation numbers make a replayed state stale).
///
/// With [`Keyring::encrypting`] messages are instead encrypted and authenticated with
/// XChaCha20-Poly1305 (a random 24-byte nonce per message, a key derived from each secret):
/// nobody without a secret can read membership either. Every member must agree on it:
/// an encrypting member and a tagging one cannot read each other.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<[u8; 32]>,
    /// Encryption keys derived from `keys`, when encrypting.
    ciphers: Option<Vec<chacha20poly1305::XChaCha20Poly1305>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring({} keys)", self.keys.len())
    }
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

impl Keyring {
    /// A keyring from secrets, the signing one first. Each secret must be at least 16 bytes
    /// (it is hashed to the HMAC key).
    pub fn new<S: AsRef<[u8]>>(secrets: &[S]) -> Result<Self, String> {
        use sha2::Digest;
        if secrets.is_empty() {
            return Err("a keyring needs at least one secret".into());
        }
        let mut keys = Vec::new();
        for (i, s) in secrets.iter().enumerate() {
            let s = s.as_ref();
            if s.len() < 16 {
                return Err(format!(
                    "secret {} is {} bytes; use at least 16 random bytes",
                    i + 1,
                    s.len()
                ));
            }
            keys.push(sha2::Sha256::digest(s).into());
        }
        Ok(Self {
            keys,
            ciphers: None,
        })
    }

    /// The same secrets, encrypting every message (see the type's docs).
    pub fn encrypting(mut self) -> Self {
        use chacha20poly1305::KeyInit;
        use sha2::Digest;
        let ciphers = self
            .keys
            .iter()
            .map(|k| {
                let mut h = sha2::Sha256::new();
                h.update(b"cache-cluster gossip encryption v1");
                h.update(k);
                let key: [u8; 32] = h.finalize().into();
                chacha20poly1305::XChaCha20Poly1305::new(&key.into())
            })
            .collect();
        self.ciphers = Some(ciphers);
        self
    }

    fn mac(key: &[u8; 32]) -> HmacSha256 {
        use hmac::Mac;
        <HmacSha256 as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"))
    }

    /// `bytes` followed by its tag, or (encrypting) a nonce and `bytes` encrypted.
    pub fn seal(&self, bytes: &[u8]) -> Vec<u8> {
        use hmac::Mac;
        if let Some(ciphers) = &self.ciphers {
            use chacha20poly1305::AeadCore;
            use chacha20poly1305::aead::{Aead, OsRng};
            let nonce = chacha20poly1305::XChaCha20Poly1305::generate_nonce(&mut OsRng);
            // Encryption of an in-memory buffer cannot fail.
            let sealed = ciphers[0].encrypt(&nonce, bytes).unwrap_or_default();
            let mut out = Vec::with_capacity(nonce.len() + sealed.len());
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&sealed);
            return out;
        }
        let mut mac = Self::mac(&self.keys[0]);
        mac.update(bytes);
        let mut out = Vec::with_capacity(bytes.len() + TAG_BYTES);
        out.extend_from_slice(bytes);
        out.extend_from_slice(&mac.finalize().into_bytes());
        out
    }

    /// The message without its tag, if the tag matches one of the keys (compared in
    /// constant time); encrypting, the decrypted message if one of the keys opens it.
    pub fn open<'a>(&self, sealed: &'a [u8]) -> Option<std::borrow::Cow<'a, [u8]>> {
        use hmac::Mac;
        if let Some(ciphers) = &self.ciphers {
            use chacha20poly1305::aead::Aead;
            if sealed.len() < SEALED_BYTES {
                return None;
            }
            let (nonce, body) = sealed.split_at(24);
            let nonce = chacha20poly1305::XNonce::from_slice(nonce);
            return ciphers
                .iter()
                .find_map(|c| c.decrypt(nonce, body).ok())
                .map(std::borrow::Cow::Owned);
        }
        let split = sealed.len().checked_sub(TAG_BYTES)?;
        let (body, tag) = sealed.split_at(split);
        let mut ok = false;
        for key in &self.keys {
            let mut mac = Self::mac(key);
            mac.update(body);
            ok |= mac.verify_slice(tag).is_ok();
        }
        ok.then_some(std::borrow::Cow::Borrowed(body))
    }
}

/// Shared state of the tasks.
/// Publishes `protocol`'s view on `views` if it changed; returns the view replaced and the
/// new one, for the log. The caller holds the protocol's lock, so views are published in
/// the order the protocol produced them: two flushes racing (a datagram handled while a
/// tick flushes) used to take their views under the lock and publish them after it, so the
/// older could be published last — and as nothing changed afterwards, a node kept a stale
/// one-member ring for as long as it ran (1 start in 21 in an outside drill).
fn publish_view_change(
    protocol: &mut dyn Protocol,
    views: &watch::Sender<MembershipView>,
) -> Option<(MembershipView, MembershipView)> {
    let view = protocol.take_view_change()?;
    let old = views.send_replace(view.clone());
    Some((old, view))
}

struct Shared {
    swim: Mutex<Box<dyn Protocol>>,
    keyring: Option<Keyring>,
    /// Messages dropped for a missing or wrong tag.
    unauthenticated: std::sync::atomic::AtomicU64,
    /// Push-pull connections closed on accept because [`MAX_STREAMS`] were being read.
    streams_refused: std::sync::atomic::AtomicU64,
    udp: UdpSocket,
    start: Instant,
    views: watch::Sender<MembershipView>,
    cancel: CancellationToken,
}

impl Shared {
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Sends what the state machine produced, and publishes a changed view.
    fn flush(self: &Arc<Self>) {
        let (out, change) = {
            let mut swim = self.swim.lock();
            let out = swim.drain_outgoing();
            (out, publish_view_change(&mut **swim, &self.views))
        };
        for o in out {
            self.send(o);
        }
        if let Some((old, new)) = change {
            log_changes(&old, &new);
        }
    }

    fn send(self: &Arc<Self>, mut o: Outgoing) {
        if let Some(k) = &self.keyring {
            o.bytes = k.seal(&o.bytes);
        }
        if o.reliable {
            let cancel = self.cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    r = tokio::time::timeout(STREAM_TIMEOUT, send_stream(o.to, &o.bytes)) => {
                        if !matches!(r, Ok(Ok(()))) {
                            tracing::debug!(to = %o.to, "gossip push-pull send failed");
                        }
                    }
                }
            });
        } else if let Err(e) = self.udp.try_send_to(&o.bytes, o.to) {
            tracing::debug!(to = %o.to, error = %e, "gossip datagram not sent");
        }
    }

    fn handle(self: &Arc<Self>, bytes: &[u8]) {
        let bytes = match &self.keyring {
            None => std::borrow::Cow::Borrowed(bytes),
            Some(k) => match k.open(bytes) {
                Some(body) => body,
                None => {
                    self.unauthenticated
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!("gossip message without a valid tag refused");
                    return;
                }
            },
        };
        let now = self.now();
        let result = self.swim.lock().handle_message(&bytes, now);
        if let Err(e) = result {
            tracing::debug!(error = %e, "gossip message refused");
        }
        self.flush();
    }
}

/// Binds UDP and TCP on the same port. With port 0 the OS picks the UDP port, which TCP may
/// already use elsewhere: then both are dropped and another port is tried.
async fn bind_pair(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener, SocketAddr)> {
    let mut last = None;
    for _ in 0..20 {
        let udp = UdpSocket::bind(addr).await?;
        let bound = udp.local_addr()?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp, bound)),
            Err(e) if addr.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse => {
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::ErrorKind::AddrInUse.into()))
}

/// One log line per member whose state (or address) changed between two views. Each line
/// is a real transition, so a flapping member logs at most once per change.
fn log_changes(old: &MembershipView, new: &MembershipView) {
    for m in &new.members {
        match old.member(&m.id) {
            None => {
                tracing::info!(member = %m.id, state = %m.state, addr = %m.rpc_addr, "member joined")
            }
            Some(o) if o.state != m.state => {
                if matches!(m.state, crate::MemberState::Dead) {
                    tracing::warn!(member = %m.id, from = %o.state, incarnation = m.incarnation, "member declared dead");
                } else {
                    tracing::info!(member = %m.id, from = %o.state, to = %m.state, incarnation = m.incarnation, "member state changed");
                }
            }
            Some(o) if o.rpc_addr != m.rpc_addr || o.peer_addr != m.peer_addr => {
                tracing::info!(member = %m.id, addr = %m.rpc_addr, "member changed address");
            }
            Some(_) => {}
        }
    }
    for o in &old.members {
        if new.member(&o.id).is_none() {
            tracing::info!(member = %o.id, "member forgotten (reaped)");
        }
    }
}

async fn send_stream(to: SocketAddr, bytes: &[u8]) -> std::io::Result<()> {
    let mut s = TcpStream::connect(to).await?;
    let len = u32::try_from(bytes.len()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    s.write_all(&len.to_be_bytes()).await?;
    s.write_all(bytes).await?;
    s.shutdown().await
}

async fn read_stream(s: TcpStream) -> std::io::Result<Vec<u8>> {
    let mut s = s;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE_BYTES + MAX_SEAL_OVERHEAD {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    // The buffer grows as bytes arrive, never to the announced length up front: a sender
    // that announces a megabyte and sends nothing (before any tag is checked) costs nothing.
    let mut buf = Vec::with_capacity(len.min(64 << 10));
    let read = (&mut s).take(len as u64).read_to_end(&mut buf).await?;
    if read != len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(buf)
}

/// Membership by SWIM gossip. Dropping it stops its tasks (without leaving: call
/// [`Membership::leave`] first for a graceful exit).
pub struct GossipMembership {
    local: String,
    shared: Arc<Shared>,
    gossip_addr: SocketAddr,
}

impl std::fmt::Debug for GossipMembership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipMembership")
            .field("local", &self.local)
            .field("gossip_addr", &self.gossip_addr)
            .finish_non_exhaustive()
    }
}

impl Drop for GossipMembership {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

impl GossipMembership {
    /// Binds the gossip socket and starts the member's tasks. Must be called within a
    /// tokio runtime. If `config.identity.addrs.gossip` has port 0, the bound port is used.
    pub async fn start(config: GossipConfig) -> Result<Self, MembershipError> {
        let bind_err = |e: std::io::Error| MembershipError::Bind {
            addr: config.bind,
            reason: e.to_string(),
        };
        let (udp, tcp, bound) = bind_pair(config.bind).await.map_err(bind_err)?;
        let mut identity = config.identity.clone();
        if identity.addrs.gossip.port() == 0 {
            identity.addrs.gossip.set_port(bound.port());
        }
        if identity.id.is_empty() || identity.id.len() > 255 {
            return Err(MembershipError::BadPeer {
                entry: identity.id,
                reason: "the node id must be 1 to 255 bytes".into(),
            });
        }
        let gossip_addr = identity.addrs.gossip;
        let swim: Box<dyn Protocol> = match &config.protocol {
            ProtocolConfig::Swim(swim) => Box::new(Swim::new(
                SwimConfig {
                    // Room for the tag in every datagram.
                    max_datagram: if config.keyring.is_some() {
                        swim.max_datagram.saturating_sub(MAX_SEAL_OVERHEAD)
                    } else {
                        swim.max_datagram
                    },
                    ..swim.clone()
                },
                identity.clone(),
                crate::swim_seed(&identity.id),
                0,
            )),
            ProtocolConfig::Coordinator {
                config: registry,
                coordinator,
            } => {
                let coordinator = match coordinator {
                    None => None,
                    Some(host) => Some(
                        tokio::net::lookup_host(host.as_str())
                            .await
                            .ok()
                            .and_then(|mut a| a.next())
                            .ok_or_else(|| MembershipError::BadPeer {
                                entry: host.clone(),
                                reason: "cannot resolve the coordinator's address".into(),
                            })?,
                    ),
                };
                Box::new(Registry::new(
                    registry.clone(),
                    identity.clone(),
                    coordinator,
                    0,
                ))
            }
        };
        let (views, _) = watch::channel(swim.view());
        let shared = Arc::new(Shared {
            swim: Mutex::new(swim),
            keyring: config.keyring.clone(),
            unauthenticated: std::sync::atomic::AtomicU64::new(0),
            streams_refused: std::sync::atomic::AtomicU64::new(0),
            udp,
            start: Instant::now(),
            views,
            cancel: CancellationToken::new(),
        });
        // UDP receiver.
        {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    tokio::select! {
                        () = shared.cancel.cancelled() => return,
                        r = shared.udp.recv_from(&mut buf) => match r {
                            Ok((n, _from)) => shared.handle(&buf[..n]),
                            Err(e) => tracing::debug!(error = %e, "gossip receive failed"),
                        },
                    }
                }
            });
        }
        // TCP acceptor (push-pull).
        {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                // At most MAX_STREAMS push-pulls are read at once, each within
                // STREAM_TIMEOUT; a connection beyond that is closed at once (counted), so a
                // flood of idle or slow connections holds neither memory nor tasks.
                let permits = Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS));
                let streams = tokio_util::task::TaskTracker::new();
                loop {
                    let accepted = tokio::select! {
                        () = shared.cancel.cancelled() => break,
                        a = tcp.accept() => a,
                    };
                    let Ok((stream, _)) = accepted else { continue };
                    let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                        shared
                            .streams_refused
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        drop(stream);
                        continue;
                    };
                    let shared = Arc::clone(&shared);
                    streams.spawn(async move {
                        let _permit = permit;
                        let read = tokio::time::timeout(STREAM_TIMEOUT, read_stream(stream));
                        tokio::select! {
                            () = shared.cancel.cancelled() => {}
                            r = read => if let Ok(Ok(bytes)) = r {
                                shared.handle(&bytes);
                            },
                        }
                    });
                }
                streams.close();
                streams.wait().await;
            });
        }
        // Timers.
        {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                loop {
                    let wake = shared.swim.lock().next_wakeup();
                    let at = shared.start + Duration::from_millis(wake);
                    tokio::select! {
                        () = shared.cancel.cancelled() => return,
                        () = tokio::time::sleep_until(at) => {}
                    }
                    let now = shared.now();
                    shared.swim.lock().tick(now);
                    shared.flush();
                }
            });
        }
        // Joining, retried until another member is known.
        if !config.join.is_empty() {
            let shared = Arc::clone(&shared);
            let join = config.join.clone();
            tokio::spawn(async move {
                let began = Instant::now();
                let mut warned = began;
                loop {
                    let known = shared.views.borrow().members.len() > 1;
                    if known {
                        if warned != began {
                            tracing::info!(after = ?began.elapsed(), "joined through the --join seeds");
                        }
                        return;
                    }
                    // A wrong or unreachable seed must not go unnoticed: the node serves no
                    // client until it joins, and says so at least every 10 s.
                    if warned.elapsed() >= NOT_JOINED_WARNING
                        || (warned == began && began.elapsed() >= JOIN_RETRY * 2)
                    {
                        warned = Instant::now();
                        tracing::warn!(
                            seeds = ?join,
                            waiting = ?began.elapsed(),
                            "not joined yet: no --join seed has answered; this node serves no client request until one does (check the addresses, the cluster name and the gossip keys)"
                        );
                    }
                    let mut seeds = Vec::new();
                    for host in &join {
                        match tokio::net::lookup_host(host.as_str()).await {
                            Ok(addrs) => seeds.extend(addrs),
                            Err(e) => {
                                tracing::warn!(seed = %host, error = %e, "cannot resolve a --join seed")
                            }
                        }
                    }
                    if !seeds.is_empty() {
                        let now = shared.now();
                        shared.swim.lock().join(&seeds, now);
                        shared.flush();
                    }
                    tokio::select! {
                        () = shared.cancel.cancelled() => return,
                        () = tokio::time::sleep(JOIN_RETRY) => {}
                    }
                }
            });
        }
        Ok(Self {
            local: identity.id,
            shared,
            gossip_addr,
        })
    }

    /// The gossip address others use for this member.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.gossip_addr
    }

    /// Protocol counters (for metrics); messages refused for a missing or wrong tag, and
    /// push-pull connections closed because 64 were already being read, count in
    /// `messages_refused`.
    pub fn stats(&self) -> SwimStats {
        let mut s = self.shared.swim.lock().stats();
        s.messages_refused += self
            .shared
            .unauthenticated
            .load(std::sync::atomic::Ordering::Relaxed)
            + self
                .shared
                .streams_refused
                .load(std::sync::atomic::Ordering::Relaxed);
        s
    }
}

impl Membership for GossipMembership {
    fn local_id(&self) -> &str {
        &self.local
    }

    fn view(&self) -> watch::Receiver<MembershipView> {
        self.shared.views.subscribe()
    }

    fn join(&self) -> Result<(), MembershipError> {
        Ok(())
    }

    fn gossip_stats(&self) -> Option<SwimStats> {
        Some(self.stats())
    }

    fn coordinator_up(&self) -> Option<bool> {
        self.shared.swim.lock().coordinator_up()
    }

    fn leave(&self) -> Result<(), MembershipError> {
        let now = self.shared.now();
        self.shared.swim.lock().leave(now);
        self.shared.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protocol whose view's epoch counts its ticks.
    #[derive(Debug)]
    struct Counter {
        ticks: u64,
        dirty: bool,
    }

    impl Protocol for Counter {
        fn handle_message(&mut self, _: &[u8], _: u64) -> Result<(), crate::swim::DecodeError> {
            Ok(())
        }
        fn tick(&mut self, _: u64) {
            self.ticks += 1;
            self.dirty = true;
        }
        fn next_wakeup(&self) -> u64 {
            u64::MAX
        }
        fn drain_outgoing(&mut self) -> Vec<Outgoing> {
            Vec::new()
        }
        fn take_view_change(&mut self) -> Option<MembershipView> {
            std::mem::take(&mut self.dirty).then(|| self.view())
        }
        fn view(&self) -> MembershipView {
            MembershipView {
                epoch: self.ticks,
                members: Vec::new(),
            }
        }
        fn join(&mut self, _: &[SocketAddr], _: u64) {}
        fn leave(&mut self, _: u64) {}
        fn stats(&self) -> crate::swim::SwimStats {
            crate::swim::SwimStats::default()
        }
    }

    /// Views produced concurrently by many threads are published in order: the last one
    /// published is the protocol's newest, and no subscriber ever sees the epoch go back.
    #[test]
    fn concurrent_view_changes_publish_the_newest_last() {
        let protocol: Arc<Mutex<Box<dyn Protocol>>> = Arc::new(Mutex::new(Box::new(Counter {
            ticks: 0,
            dirty: false,
        })));
        let (views, mut rx) = watch::channel(MembershipView {
            epoch: 0,
            members: Vec::new(),
        });
        let views = Arc::new(views);
        let watcher = std::thread::spawn(move || {
            let mut last = 0;
            while rx.has_changed().is_ok() {
                let epoch = rx.borrow_and_update().epoch;
                assert!(
                    epoch >= last,
                    "published epoch went back from {last} to {epoch}"
                );
                last = epoch;
                if last == 8 * 2_000 {
                    break;
                }
                std::thread::yield_now();
            }
        });
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (protocol, views) = (Arc::clone(&protocol), Arc::clone(&views));
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        let mut p = protocol.lock();
                        p.tick(0);
                        let _ = publish_view_change(&mut **p, &views);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("no panic");
        }
        assert_eq!(
            views.borrow().epoch,
            8 * 2_000,
            "the newest view is the one published"
        );
        watcher.join().expect("epochs never went back");
    }
}
