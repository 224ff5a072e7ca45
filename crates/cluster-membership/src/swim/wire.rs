//! The gossip wire format: versioned, length-checked, hand-written (no serialization
//! crate), so every count and size read from the network is bounded before it is used.
//!
//! ```text
//! message  = magic "CCGS" | version u8 (=1) | cluster str8 | from str8 | from_addr addr
//!            | body | updates u16 count, update*
//! body     = 0 ping     seq u64, target str8
//!          | 1 ack      seq u64
//!          | 2 ping-req seq u64, target str8, target_addr addr
//!          | 3 push-pull reply u8, members u16 count, update*
//!          | 4 gossip   (nothing: the updates are the message)
//! update   = id str8 | gossip addr | rpc addr | peer addr | weight u32 | incarnation u64
//!            | state u8 (0 alive, 1 suspect, 2 dead, 3 left) | [suspect: by str8]
//! addr     = 4 ipv4[4] port u16 | 6 ipv6[16] port u16
//! str8     = len u8 (1..=255; the cluster name may be empty) bytes (UTF-8)
//! ```
//!
//! Integers are big-endian. A message must be consumed exactly: trailing bytes are an error.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use cache_types::MemberState;

/// The first bytes of every gossip message.
pub const MAGIC: &[u8; 4] = b"CCGS";
/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// The largest message read or written at all (push-pull state over the reliable path).
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// The most members one message may list.
pub const MAX_MEMBERS: usize = 8192;

/// Why a gossip message was refused. Nothing is changed by a refused message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than [`MAX_MESSAGE_BYTES`].
    #[error("message of {0} bytes is over the limit")]
    TooLarge(usize),
    /// Not a gossip message of this project.
    #[error("not a cache-cluster gossip message")]
    BadMagic,
    /// Written by a newer (or unknown) version of the protocol.
    #[error("unsupported gossip version {0}")]
    UnsupportedVersion(u8),
    /// From another cluster on the same network (the two never merge).
    #[error("message from cluster {0:?}, not ours")]
    WrongCluster(String),
    /// Cut short, or a field is malformed.
    #[error("malformed gossip message: {0}")]
    Malformed(&'static str),
}

/// A member's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addrs {
    /// Where its gossip listens (UDP, and TCP for push-pull).
    pub gossip: SocketAddr,
    /// Where clients reach it.
    pub rpc: SocketAddr,
    /// Where other nodes reach it.
    pub peer: SocketAddr,
}

/// What one member says, or is said, about one member: the unit of dissemination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The member's id.
    pub id: String,
    /// Its addresses.
    pub addrs: Addrs,
    /// Its ring weight.
    pub weight: u32,
    /// Its incarnation: only the member itself raises it (to refute, rejoin, change address).
    pub incarnation: u64,
    /// Its state at that incarnation.
    pub state: MemberState,
    /// For `Suspect`: the member that suspected it (confirmations count distinct ones).
    pub suspected_by: Option<String>,
}

/// The kinds of message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// "Are you alive?" — `target` is the id the sender expects to reach.
    Ping {
        /// Sequence number to echo in the ack.
        seq: u64,
        /// Expected receiver.
        target: String,
    },
    /// "Yes", for the ping with `seq`.
    Ack {
        /// The ping's sequence number.
        seq: u64,
    },
    /// "Please ping `target` at `target_addr` for me" (indirect probe).
    PingReq {
        /// The requester's sequence number, echoed in the relayed ack.
        seq: u64,
        /// The member to probe.
        target: String,
        /// Where to probe it.
        target_addr: SocketAddr,
    },
    /// The sender's whole member list (sent reliably); `reply` answers one.
    PushPull {
        /// Whether this answers a push-pull.
        reply: bool,
        /// Every member the sender knows, itself included.
        members: Vec<Update>,
    },
    /// Only the piggybacked updates.
    Gossip,
}

/// One gossip message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The sender's id.
    pub from: String,
    /// The sender's gossip address (where to answer).
    pub from_addr: SocketAddr,
    /// What it says.
    pub body: Body,
    /// Piggybacked membership updates.
    pub updates: Vec<Update>,
}

fn state_code(s: MemberState) -> u8 {
    match s {
        MemberState::Alive => 0,
        MemberState::Suspect => 1,
        MemberState::Dead => 2,
        MemberState::Left => 3,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    // Ids are checked to be 1..=255 bytes where they enter; the cluster name too.
    let len = b.len().min(255);
    out.push(len as u8);
    out.extend_from_slice(&b[..len]);
}

fn put_addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

/// Appends one encoded update.
pub fn put_update(out: &mut Vec<u8>, u: &Update) {
    put_str(out, &u.id);
    put_addr(out, u.addrs.gossip);
    put_addr(out, u.addrs.rpc);
    put_addr(out, u.addrs.peer);
    out.extend_from_slice(&u.weight.to_be_bytes());
    out.extend_from_slice(&u.incarnation.to_be_bytes());
    out.push(state_code(u.state));
    if u.state == MemberState::Suspect {
        put_str(out, u.suspected_by.as_deref().unwrap_or(""));
    }
}

/// Encodes everything of `msg` before its piggybacked updates (magic, version, cluster,
/// sender, body). A sender appends the update count and the updates itself, so it can stop
/// adding updates when a datagram is full without encoding anything twice.
pub fn encode_head(cluster: &str, msg: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    put_str(&mut out, cluster);
    put_str(&mut out, &msg.from);
    put_addr(&mut out, msg.from_addr);
    match &msg.body {
        Body::Ping { seq, target } => {
            out.push(0);
            out.extend_from_slice(&seq.to_be_bytes());
            put_str(&mut out, target);
        }
        Body::Ack { seq } => {
            out.push(1);
            out.extend_from_slice(&seq.to_be_bytes());
        }
        Body::PingReq {
            seq,
            target,
            target_addr,
        } => {
            out.push(2);
            out.extend_from_slice(&seq.to_be_bytes());
            put_str(&mut out, target);
            put_addr(&mut out, *target_addr);
        }
        Body::PushPull { reply, members } => {
            out.push(3);
            out.push(u8::from(*reply));
            let n = members.len().min(MAX_MEMBERS);
            out.extend_from_slice(&(n as u16).to_be_bytes());
            for m in &members[..n] {
                put_update(&mut out, m);
            }
        }
        Body::Gossip => out.push(4),
    }
    out
}

/// Encodes `msg` for `cluster`, with the piggybacked updates in `msg.updates`.
pub fn encode(cluster: &str, msg: &Message) -> Vec<u8> {
    let mut out = encode_head(cluster, msg);
    let n = msg.updates.len().min(MAX_MEMBERS);
    out.extend_from_slice(&(n as u16).to_be_bytes());
    for u in &msg.updates[..n] {
        put_update(&mut out, u);
    }
    out
}

/// A cursor over received bytes; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Malformed("truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn str8(&mut self, allow_empty: bool) -> Result<String, DecodeError> {
        let len = self.u8()? as usize;
        if len == 0 && !allow_empty {
            return Err(DecodeError::Malformed("empty id"));
        }
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Malformed("id is not UTF-8"))
    }

    fn addr(&mut self) -> Result<SocketAddr, DecodeError> {
        let ip = match self.u8()? {
            4 => {
                let b = self.take(4)?;
                IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            6 => {
                let b = self.take(16)?;
                let mut a = [0u8; 16];
                a.copy_from_slice(b);
                IpAddr::V6(Ipv6Addr::from(a))
            }
            _ => return Err(DecodeError::Malformed("unknown address family")),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }

    fn count(&mut self) -> Result<usize, DecodeError> {
        let n = self.u16()? as usize;
        if n > MAX_MEMBERS {
            return Err(DecodeError::Malformed("too many members"));
        }
        Ok(n)
    }

    fn update(&mut self) -> Result<Update, DecodeError> {
        let id = self.str8(false)?;
        let addrs = Addrs {
            gossip: self.addr()?,
            rpc: self.addr()?,
            peer: self.addr()?,
        };
        let weight = self.u32()?;
        if weight == 0 || weight > 1000 {
            return Err(DecodeError::Malformed("weight out of range (1..=1000)"));
        }
        let incarnation = self.u64()?;
        let state = match self.u8()? {
            0 => MemberState::Alive,
            1 => MemberState::Suspect,
            2 => MemberState::Dead,
            3 => MemberState::Left,
            _ => return Err(DecodeError::Malformed("unknown member state")),
        };
        let suspected_by = if state == MemberState::Suspect {
            Some(self.str8(true)?).filter(|s| !s.is_empty())
        } else {
            None
        };
        Ok(Update {
            id,
            addrs,
            weight,
            incarnation,
            state,
            suspected_by,
        })
    }

    fn updates(&mut self) -> Result<Vec<Update>, DecodeError> {
        let n = self.count()?;
        // Each update takes at least 30 bytes: a count larger than the rest allows is a lie.
        if n.saturating_mul(30) > self.buf.len() {
            return Err(DecodeError::Malformed("count larger than the message"));
        }
        (0..n).map(|_| self.update()).collect()
    }
}

/// Decodes a message, refusing anything from another cluster, another version, or not
/// exactly well-formed.
pub fn decode(cluster: &str, bytes: &[u8]) -> Result<Message, DecodeError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let mut r = Reader { buf: bytes };
    if r.take(4).map_err(|_| DecodeError::BadMagic)? != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let theirs = r.str8(true)?;
    if theirs != cluster {
        return Err(DecodeError::WrongCluster(theirs));
    }
    let from = r.str8(false)?;
    let from_addr = r.addr()?;
    let body = match r.u8()? {
        0 => Body::Ping {
            seq: r.u64()?,
            target: r.str8(false)?,
        },
        1 => Body::Ack { seq: r.u64()? },
        2 => Body::PingReq {
            seq: r.u64()?,
            target: r.str8(false)?,
            target_addr: r.addr()?,
        },
        3 => {
            let reply = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(DecodeError::Malformed("bad reply flag")),
            };
            Body::PushPull {
                reply,
                members: r.updates()?,
            }
        }
        4 => Body::Gossip,
        _ => return Err(DecodeError::Malformed("unknown message kind")),
    };
    let updates = r.updates()?;
    if !r.buf.is_empty() {
        return Err(DecodeError::Malformed("trailing bytes"));
    }
    Ok(Message {
        from,
        from_addr,
        body,
        updates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    fn update(id: &str, state: MemberState) -> Update {
        Update {
            id: id.into(),
            addrs: Addrs {
                gossip: addr(1),
                rpc: "[::1]:2".parse().expect("v6"),
                peer: addr(3),
            },
            weight: 1,
            incarnation: 7,
            state,
            suspected_by: (state == MemberState::Suspect).then(|| "x".to_string()),
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let updates = vec![
            update("a", MemberState::Alive),
            update("b", MemberState::Suspect),
            update("c", MemberState::Dead),
            update("d", MemberState::Left),
        ];
        for body in [
            Body::Ping {
                seq: 1,
                target: "t".into(),
            },
            Body::Ack { seq: 2 },
            Body::PingReq {
                seq: 3,
                target: "t".into(),
                target_addr: addr(9),
            },
            Body::PushPull {
                reply: true,
                members: updates.clone(),
            },
            Body::Gossip,
        ] {
            let msg = Message {
                from: "me".into(),
                from_addr: addr(5),
                body,
                updates: updates.clone(),
            };
            let bytes = encode("prod", &msg);
            assert_eq!(decode("prod", &bytes), Ok(msg));
        }
    }

    #[test]
    fn foreign_truncated_and_forged_messages_are_refused() {
        let msg = Message {
            from: "me".into(),
            from_addr: addr(5),
            body: Body::Gossip,
            updates: vec![update("a", MemberState::Alive)],
        };
        let bytes = encode("prod", &msg);
        assert_eq!(
            decode("staging", &bytes),
            Err(DecodeError::WrongCluster("prod".into()))
        );
        for cut in 0..bytes.len() {
            assert!(decode("prod", &bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode("prod", &trailing).is_err());
        let mut newer = bytes.clone();
        newer[4] = 2;
        assert_eq!(
            decode("prod", &newer),
            Err(DecodeError::UnsupportedVersion(2))
        );
        // A count that claims more updates than the bytes can hold.
        let mut lying = encode(
            "prod",
            &Message {
                updates: Vec::new(),
                ..msg.clone()
            },
        );
        let n = lying.len();
        lying[n - 2..].copy_from_slice(&8000u16.to_be_bytes());
        assert!(matches!(
            decode("prod", &lying),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode("prod", &vec![0u8; MAX_MESSAGE_BYTES + 1]),
            Err(DecodeError::TooLarge(_))
        ));
        assert_eq!(
            decode("prod", b"GET / HTTP/1.1"),
            Err(DecodeError::BadMagic)
        );
    }
}
