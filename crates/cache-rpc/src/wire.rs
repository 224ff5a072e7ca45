//! Every translation between protobuf and the core's domain types, in one place: requests,
//! responses, mutations, versioned reads, and errors to and from gRPC statuses.
//!
//! Enum fields are validated: an unknown `consistency`, `condition` or mutation kind is
//! [`CoreError::Invalid`] (`INVALID_ARGUMENT`), never a silent default.

use cache_core::{Lookup, VersionedRead};
use cache_proto::convert::{self, condition_to_pb, consistency_to_pb};
use cache_proto::peer::v1 as peer;
use cache_proto::v1 as pb;
use cluster_core::{
    Condition, Consistency, CoreError, ExpireWhen, Expiry, Mutation, MutationOp, PeerError,
    Request, Response, SetCommand, SyncEntry, SyncReply, UpdateOp,
};
use tonic::{Code, Status};

/// Metadata key naming the core error kind on an error status from the peer service, so the
/// caller can tell the peer's own answer from a transport failure.
pub const ERROR_KIND_HEADER: &str = "x-cache-error";

/// From the wire: `DEFAULT` is `None` (the node's default); unknown values are refused.
pub fn consistency(raw: i32) -> Result<Option<Consistency>, CoreError> {
    convert::consistency_from_pb(raw).map_err(|raw| {
        CoreError::Invalid(format!(
            "unknown consistency {raw}; expected 0 (default), 1 (one), 2 (quorum) or 3 (all)"
        ))
    })
}

/// From the wire; unknown values are refused.
pub fn condition(raw: i32) -> Result<Condition, CoreError> {
    convert::condition_from_pb(raw).map_err(|raw| {
        CoreError::Invalid(format!(
            "unknown condition {raw}; expected 0 (always), 1 (if absent) or 2 (if present)"
        ))
    })
}

fn ttl(ttl_ms: u64) -> Option<u64> {
    (ttl_ms > 0).then_some(ttl_ms)
}

fn set_command(req: pb::SetRequest) -> Result<SetCommand, CoreError> {
    Ok(SetCommand {
        key: req.key,
        value: req.value,
        ttl_ms: ttl(req.ttl_ms),
        condition: condition(req.condition)?,
    })
}

fn set_to_pb(cmd: SetCommand, consistency: Option<Consistency>) -> pb::SetRequest {
    pb::SetRequest {
        key: cmd.key,
        value: cmd.value,
        ttl_ms: cmd.ttl_ms.unwrap_or(0),
        condition: condition_to_pb(cmd.condition),
        consistency: consistency_to_pb(consistency),
    }
}

/// `Get` from the wire.
pub fn get(req: pb::GetRequest) -> Result<Request, CoreError> {
    Ok(Request::Get {
        consistency: consistency(req.consistency)?,
        key: req.key,
    })
}

/// `Set` from the wire.
pub fn set(req: pb::SetRequest) -> Result<Request, CoreError> {
    let consistency = consistency(req.consistency)?;
    Ok(Request::Set {
        cmd: set_command(req)?,
        consistency,
    })
}

/// `Delete` from the wire.
pub fn delete(req: pb::DeleteRequest) -> Result<Request, CoreError> {
    Ok(Request::Delete {
        consistency: consistency(req.consistency)?,
        key: req.key,
    })
}

/// `Touch` from the wire.
pub fn touch(req: pb::TouchRequest) -> Result<Request, CoreError> {
    Ok(Request::Touch {
        consistency: consistency(req.consistency)?,
        ttl_ms: ttl(req.ttl_ms),
        key: req.key,
    })
}

/// `MultiGet` from the wire.
pub fn multi_get(req: pb::MultiGetRequest) -> Request {
    Request::MultiGet { keys: req.keys }
}

/// `MultiSet` from the wire. The batch's consistency applies to every entry (an entry's own
/// field is validated but ignored).
pub fn multi_set(req: pb::MultiSetRequest) -> Result<Request, CoreError> {
    let batch = consistency(req.consistency)?;
    let entries = req
        .entries
        .into_iter()
        .map(|e| {
            consistency(e.consistency)?;
            set_command(e)
        })
        .collect::<Result<_, _>>()?;
    Ok(Request::MultiSet {
        entries,
        consistency: batch,
    })
}

/// A found value (or a miss) on the wire; `now_ms` gives the remaining TTL.
pub fn get_response(found: Option<Lookup>, now_ms: u64, ring_epoch: u64) -> pb::GetResponse {
    match found {
        Some(l) => pb::GetResponse {
            found: true,
            value: l.value,
            expires_at_ms: l.expires_at,
            ttl_ms: l.expires_at.map(|at| at.saturating_sub(now_ms)),
            version: l.version,
            ring_epoch,
        },
        None => pb::GetResponse {
            ring_epoch,
            ..Default::default()
        },
    }
}

fn lookup(r: pb::GetResponse) -> Option<Lookup> {
    r.found.then_some(Lookup {
        value: r.value,
        version: r.version,
        expires_at: r.expires_at_ms,
    })
}

/// `Incr` from the wire.
pub fn incr(req: pb::IncrRequest) -> Result<Request, CoreError> {
    Ok(Request::Update {
        key: req.key,
        op: UpdateOp::Incr {
            delta: req.delta,
            ttl_ms_if_created: ttl(req.ttl_ms_if_created),
        },
        consistency: consistency(req.consistency)?,
    })
}

/// The integer an increment left (its value after an `Incr` update).
pub fn counter_value(current: Option<Lookup>) -> Result<i64, CoreError> {
    current
        .and_then(|l| cluster_core::store::parse_integer(&l.value))
        .ok_or_else(|| CoreError::Internal("an increment left no integer".into()))
}

fn expiry_to_pb(expiry: Expiry) -> peer::Expiry {
    use peer::expiry::Kind;
    peer::Expiry {
        kind: Some(match expiry {
            Expiry::Keep => Kind::Keep(peer::Delete {}),
            Expiry::Never => Kind::Never(peer::Delete {}),
            Expiry::InMs(ms) => Kind::InMs(ms),
            Expiry::AtMs(at) => Kind::AtMs(at),
        }),
    }
}

fn expiry(e: Option<peer::Expiry>) -> Result<Expiry, CoreError> {
    use peer::expiry::Kind;
    match e.and_then(|e| e.kind) {
        Some(Kind::Keep(_)) => Ok(Expiry::Keep),
        Some(Kind::Never(_)) => Ok(Expiry::Never),
        Some(Kind::InMs(ms)) => Ok(Expiry::InMs(ms)),
        Some(Kind::AtMs(at)) => Ok(Expiry::AtMs(at)),
        None => Err(CoreError::Invalid("an update names no expiry".into())),
    }
}

fn update_to_pb(key: bytes::Bytes, op: UpdateOp, c: Option<Consistency>) -> peer::UpdateRequest {
    use peer::update_request::Op;
    let expire_when = match &op {
        UpdateOp::Expire { when, .. } => match when {
            ExpireWhen::Always => peer::ExpireWhen::Always,
            ExpireWhen::NoExpiry => peer::ExpireWhen::NoExpiry,
            ExpireWhen::HasExpiry => peer::ExpireWhen::HasExpiry,
            ExpireWhen::Later => peer::ExpireWhen::Later,
            ExpireWhen::Earlier => peer::ExpireWhen::Earlier,
            ExpireWhen::EarlierThanSome => peer::ExpireWhen::EarlierThanSome,
        },
        _ => peer::ExpireWhen::Always,
    } as i32;
    peer::UpdateRequest {
        key,
        consistency: consistency_to_pb(c),
        expire_when,
        op: Some(match op {
            UpdateOp::Incr {
                delta,
                ttl_ms_if_created,
            } => Op::Incr(peer::Incr {
                delta,
                ttl_ms_if_created,
            }),
            UpdateOp::Set {
                value,
                expiry,
                condition,
            } => Op::Set(peer::UpdateSet {
                value,
                expiry: Some(expiry_to_pb(expiry)),
                condition: condition_to_pb(condition),
            }),
            UpdateOp::Delete => Op::Delete(peer::Delete {}),
            UpdateOp::Expire { expiry, .. } => Op::Expire(expiry_to_pb(expiry)),
        }),
    }
}

fn update(req: peer::UpdateRequest) -> Result<Request, CoreError> {
    use peer::update_request::Op;
    let op = match req.op {
        Some(Op::Incr(i)) => UpdateOp::Incr {
            delta: i.delta,
            ttl_ms_if_created: i.ttl_ms_if_created,
        },
        Some(Op::Set(s)) => UpdateOp::Set {
            value: s.value,
            expiry: expiry(s.expiry)?,
            condition: condition(s.condition)?,
        },
        Some(Op::Delete(_)) => UpdateOp::Delete,
        Some(Op::Expire(e)) => UpdateOp::Expire {
            expiry: expiry(Some(e))?,
            when: match peer::ExpireWhen::try_from(req.expire_when) {
                Ok(peer::ExpireWhen::Always) => ExpireWhen::Always,
                Ok(peer::ExpireWhen::NoExpiry) => ExpireWhen::NoExpiry,
                Ok(peer::ExpireWhen::HasExpiry) => ExpireWhen::HasExpiry,
                Ok(peer::ExpireWhen::Later) => ExpireWhen::Later,
                Ok(peer::ExpireWhen::Earlier) => ExpireWhen::Earlier,
                Ok(peer::ExpireWhen::EarlierThanSome) => ExpireWhen::EarlierThanSome,
                Err(_) => {
                    return Err(CoreError::Invalid(format!(
                        "unknown expire condition {}",
                        req.expire_when
                    )));
                }
            },
        },
        None => return Err(CoreError::Invalid("an update names no operation".into())),
    };
    Ok(Request::Update {
        key: req.key,
        op,
        consistency: consistency(req.consistency)?,
    })
}

fn live_to_pb(l: Lookup) -> peer::LiveEntry {
    peer::LiveEntry {
        value: l.value,
        version: l.version,
        expires_at_ms: l.expires_at,
    }
}

fn live(l: peer::LiveEntry) -> Lookup {
    Lookup {
        value: l.value,
        version: l.version,
        expires_at: l.expires_at_ms,
    }
}

/// A domain request as a forwarded peer request.
pub fn forward_request(request: Request) -> peer::forward_request::Request {
    use peer::forward_request::Request as F;
    match request {
        Request::Get { key, consistency } => F::Get(pb::GetRequest {
            key,
            consistency: consistency_to_pb(consistency),
        }),
        Request::Set { cmd, consistency } => F::Set(set_to_pb(cmd, consistency)),
        Request::Delete { key, consistency } => F::Delete(pb::DeleteRequest {
            key,
            consistency: consistency_to_pb(consistency),
        }),
        Request::Touch {
            key,
            ttl_ms,
            consistency,
        } => F::Touch(pb::TouchRequest {
            key,
            ttl_ms: ttl_ms.unwrap_or(0),
            consistency: consistency_to_pb(consistency),
        }),
        Request::Update {
            key,
            op,
            consistency,
        } => F::Update(update_to_pb(key, op, consistency)),
        Request::MultiGet { keys } => F::MultiGet(pb::MultiGetRequest { keys }),
        Request::MultiSet {
            entries,
            consistency,
        } => F::MultiSet(pb::MultiSetRequest {
            entries: entries
                .into_iter()
                .map(|e| set_to_pb(e, consistency))
                .collect(),
            consistency: consistency_to_pb(consistency),
        }),
    }
}

/// A forwarded peer request as a domain request (validated like a client's).
pub fn from_forward_request(
    request: Option<peer::forward_request::Request>,
) -> Result<Request, CoreError> {
    use peer::forward_request::Request as F;
    match request {
        Some(F::Get(r)) => get(r),
        Some(F::Set(r)) => set(r),
        Some(F::Delete(r)) => delete(r),
        Some(F::Touch(r)) => touch(r),
        Some(F::MultiGet(r)) => Ok(multi_get(r)),
        Some(F::MultiSet(r)) => multi_set(r),
        Some(F::Update(r)) => update(r),
        None => Err(CoreError::Invalid(
            "forwarded request names no operation".into(),
        )),
    }
}

/// A domain response as a forwarded peer response.
pub fn forward_response(response: Response) -> peer::forward_response::Response {
    use peer::forward_response::Response as F;
    // Forwarded answers carry versions and absolute expiries; the TTL and epoch fields are
    // filled by the node that answers the client.
    match response {
        Response::Get(found) => F::Get(get_response(found, 0, 0)),
        Response::Set { stored } => F::Set(pb::SetResponse {
            stored,
            ring_epoch: 0,
        }),
        Response::Delete { deleted } => F::Delete(pb::DeleteResponse {
            deleted,
            ring_epoch: 0,
        }),
        Response::Touch { found } => F::Touch(pb::TouchResponse {
            found,
            ring_epoch: 0,
        }),
        Response::Update { previous, current } => F::Update(peer::UpdateResponse {
            previous: previous.map(live_to_pb),
            current: current.map(live_to_pb),
        }),
        Response::MultiGet(found) => F::MultiGet(pb::MultiGetResponse {
            results: found.into_iter().map(|f| get_response(f, 0, 0)).collect(),
            ring_epoch: 0,
        }),
        Response::MultiSet(stored) => F::MultiSet(pb::MultiSetResponse {
            results: stored
                .into_iter()
                .map(|stored| pb::SetResponse {
                    stored,
                    ring_epoch: 0,
                })
                .collect(),
            ring_epoch: 0,
        }),
    }
}

/// A forwarded peer response as a domain response. The coordinator checks that it matches
/// the request (kind and length).
pub fn from_forward_response(
    response: Option<peer::forward_response::Response>,
) -> Result<Response, String> {
    use peer::forward_response::Response as F;
    Ok(match response {
        Some(F::Get(r)) => Response::Get(lookup(r)),
        Some(F::Set(r)) => Response::Set { stored: r.stored },
        Some(F::Delete(r)) => Response::Delete { deleted: r.deleted },
        Some(F::Touch(r)) => Response::Touch { found: r.found },
        Some(F::MultiGet(r)) => Response::MultiGet(r.results.into_iter().map(lookup).collect()),
        Some(F::MultiSet(r)) => {
            Response::MultiSet(r.results.into_iter().map(|s| s.stored).collect())
        }
        Some(F::Update(r)) => Response::Update {
            previous: r.previous.map(live),
            current: r.current.map(live),
        },
        None => return Err("forward response names no operation".into()),
    })
}

/// A mutation on the wire.
pub fn mutation_to_pb(m: Mutation) -> peer::Mutation {
    peer::Mutation {
        key: m.key,
        version: m.version,
        op: Some(match m.op {
            MutationOp::Put { value, expires_at } => peer::mutation::Op::Put(peer::Put {
                value,
                expires_at_ms: expires_at,
            }),
            MutationOp::Delete => peer::mutation::Op::Delete(peer::Delete {}),
        }),
    }
}

/// A mutation from the wire (sizes and versions are checked by the store).
pub fn mutation(m: peer::Mutation) -> Result<Mutation, CoreError> {
    let op = match m.op {
        Some(peer::mutation::Op::Put(p)) => MutationOp::Put {
            value: p.value,
            expires_at: p.expires_at_ms,
        },
        Some(peer::mutation::Op::Delete(_)) => MutationOp::Delete,
        None => return Err(CoreError::Invalid("mutation names no operation".into())),
    };
    Ok(Mutation {
        key: m.key,
        version: m.version,
        op,
    })
}

/// A versioned read on the wire.
pub fn versioned_to_pb(read: Option<VersionedRead>) -> peer::VersionedEntry {
    use peer::versioned_entry::State;
    peer::VersionedEntry {
        state: read.map(|r| match r {
            VersionedRead::Live(l) => State::Live(peer::LiveEntry {
                value: l.value,
                version: l.version,
                expires_at_ms: l.expires_at,
            }),
            VersionedRead::Dead { version } => State::DeadVersion(version),
        }),
    }
}

/// A versioned read from the wire (versions and sizes are checked by the coordinator).
pub fn versioned(entry: peer::VersionedEntry) -> Option<VersionedRead> {
    use peer::versioned_entry::State;
    entry.state.map(|s| match s {
        State::Live(l) => VersionedRead::Live(Lookup {
            value: l.value,
            version: l.version,
            expires_at: l.expires_at_ms,
        }),
        State::DeadVersion(version) => VersionedRead::Dead { version },
    })
}

/// A sync answer from the wire (bounded and checked by the coordinator before use).
pub fn sync_reply(reply: &peer::SyncResponse) -> SyncReply {
    SyncReply {
        differing: reply.differing.clone(),
        covered: reply.covered,
        entries: reply
            .entries
            .iter()
            .map(|e| SyncEntry {
                key: e.key.clone(),
                version: e.version,
                value_len: e.value_len,
            })
            .collect(),
    }
}

/// A sync answer for the wire.
pub fn sync_reply_to_pb(reply: SyncReply, ring_fingerprint: u64) -> peer::SyncResponse {
    peer::SyncResponse {
        differing: reply.differing,
        covered: reply.covered,
        entries: reply
            .entries
            .into_iter()
            .map(|e| peer::SyncEntry {
                key: e.key,
                version: e.version,
                value_len: e.value_len,
            })
            .collect(),
        ring_fingerprint,
    }
}

/// The short name of an error kind, for the [`ERROR_KIND_HEADER`] and metric labels.
pub fn error_kind(e: &CoreError) -> &'static str {
    match e {
        CoreError::Invalid(_) => "invalid_argument",
        CoreError::TooLarge(_) => "out_of_range",
        CoreError::WrongOwner { .. } => "wrong_owner",
        CoreError::Unavailable { .. } => "unavailable",
        CoreError::Full(_) => "resource_exhausted",
        CoreError::VersionRefused(_) => "version_refused",
        CoreError::DeadlineExceeded(_) => "deadline_exceeded",
        CoreError::TooLate { .. } => "too_late",
        CoreError::Superseded => "superseded",
        CoreError::Storage(_) => "storage",
        CoreError::ShuttingDown => "shutting_down",
        CoreError::Internal(_) => "internal",
    }
}

/// The gRPC status of a core error (see `docs/api.md` for the table).
pub fn status(e: &CoreError) -> Status {
    let code = match e {
        CoreError::Invalid(_) => Code::InvalidArgument,
        CoreError::TooLarge(_) => Code::OutOfRange,
        CoreError::WrongOwner { .. } => Code::Aborted,
        CoreError::Unavailable { .. } | CoreError::ShuttingDown | CoreError::Storage(_) => {
            Code::Unavailable
        }
        CoreError::Full(_) => Code::ResourceExhausted,
        CoreError::Superseded => Code::Aborted,
        CoreError::VersionRefused(_) => Code::FailedPrecondition,
        CoreError::DeadlineExceeded(_) | CoreError::TooLate { .. } => Code::DeadlineExceeded,
        CoreError::Internal(_) => Code::Internal,
    };
    let mut status = Status::new(code, e.to_string());
    if let Ok(v) = tonic::metadata::MetadataValue::try_from(error_kind(e)) {
        status.metadata_mut().insert(ERROR_KIND_HEADER, v);
    }
    status
}

/// A failed peer call as the core sees it: the peer's own answer (its status carries
/// [`ERROR_KIND_HEADER`]), a call that never reached it, or one whose outcome is unknown.
pub fn peer_error(peer: &str, status: &Status) -> PeerError {
    let kind = status
        .metadata()
        .get(ERROR_KIND_HEADER)
        .and_then(|v| v.to_str().ok());
    let message = status.message().to_string();
    let error = match kind {
        Some("invalid_argument") => CoreError::Invalid(message),
        Some("out_of_range") => CoreError::TooLarge(message),
        Some("wrong_owner") => CoreError::WrongOwner { epoch: 0 },
        Some("unavailable") => CoreError::Unavailable {
            acks: 0,
            required: 1,
            detail: message,
        },
        Some("resource_exhausted") => CoreError::Full(message),
        Some("version_refused") => CoreError::VersionRefused(message),
        Some("deadline_exceeded") => {
            return PeerError::NoAnswer {
                peer: peer.to_string(),
                detail: message,
            };
        }
        Some("shutting_down") => CoreError::ShuttingDown,
        Some("storage") => CoreError::Storage(message),
        // Nothing was applied there; the count is for the callee's logs only.
        Some("too_late") => CoreError::TooLate { late_ms: 0 },
        Some("superseded") => CoreError::Superseded,
        Some(_) => CoreError::Internal(message),
        None if is_connect_error(status) => {
            return PeerError::Unreachable {
                peer: peer.to_string(),
                detail: message,
            };
        }
        // A transport failure after the call may have been sent, or a status from
        // something that is not our peer service.
        None => {
            return PeerError::NoAnswer {
                peer: peer.to_string(),
                detail: format!("{:?}: {message}", status.code()),
            };
        }
    };
    PeerError::Refused {
        peer: peer.to_string(),
        error,
    }
}

/// Whether a transport status means the connection was never established (so the request
/// was certainly not delivered).
fn is_connect_error(status: &Status) -> bool {
    if status.code() != Code::Unavailable {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        if e.to_string().contains("tcp connect error") {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn unknown_enum_values_are_invalid() {
        for raw in [4, 7, -5, i32::MAX] {
            assert!(
                matches!(consistency(raw), Err(CoreError::Invalid(_))),
                "{raw}"
            );
        }
        for raw in [3, -1, i32::MAX] {
            assert!(
                matches!(condition(raw), Err(CoreError::Invalid(_))),
                "{raw}"
            );
        }
        let bad = pb::MultiSetRequest {
            entries: vec![pb::SetRequest {
                key: Bytes::from_static(b"k"),
                consistency: 9,
                ..Default::default()
            }],
            consistency: 0,
        };
        assert!(matches!(multi_set(bad), Err(CoreError::Invalid(_))));
        assert_eq!(consistency(0), Ok(None));
    }

    #[test]
    fn requests_and_mutations_round_trip() {
        let request = Request::MultiSet {
            entries: vec![SetCommand {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"v"),
                ttl_ms: Some(5),
                condition: Condition::IfAbsent,
            }],
            consistency: Some(Consistency::All),
        };
        assert_eq!(
            from_forward_request(Some(forward_request(request.clone()))),
            Ok(request)
        );
        for m in [
            Mutation {
                key: Bytes::from_static(b"k"),
                version: 9,
                op: MutationOp::Delete,
            },
            Mutation {
                key: Bytes::from_static(b"k"),
                version: 10,
                op: MutationOp::Put {
                    value: Bytes::from_static(b"v"),
                    expires_at: Some(77),
                },
            },
        ] {
            assert_eq!(mutation(mutation_to_pb(m.clone())), Ok(m));
        }
        for read in [
            None,
            Some(VersionedRead::Dead { version: 4 }),
            Some(VersionedRead::Live(Lookup {
                value: Bytes::from_static(b"v"),
                version: 5,
                expires_at: None,
            })),
        ] {
            assert_eq!(versioned(versioned_to_pb(read.clone())), read);
        }
    }

    #[test]
    fn peer_errors_keep_their_kind() {
        let s = status(&CoreError::ShuttingDown);
        assert!(matches!(
            peer_error("p", &s),
            PeerError::Refused {
                error: CoreError::ShuttingDown,
                ..
            }
        ));
        let bare = Status::unavailable("connection reset");
        assert!(matches!(peer_error("p", &bare), PeerError::NoAnswer { .. }));
    }
}
