//! The RESP commands: a table (name, arity, flags, key positions, role) that drives the
//! arity check, the role check and the `COMMAND` reply, and one translator per command onto
//! the cluster core's [`Request`]s — the same requests the gRPC front end builds, so a key
//! is routed, forwarded, replicated and made durable exactly as over gRPC.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cluster_core::store::{NOT_AN_INTEGER, parse_integer};
use cluster_core::{
    Condition, CoreError, ExpireWhen, Expiry, Request, RequestContext, Response, SetCommand,
    UpdateOp,
};

use super::reply;
use crate::auth::Role;
use crate::metrics::Op;
use crate::service::Shared;

/// What the connection does after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flow {
    /// Read the next command.
    Continue,
    /// Write the replies so far, then close (`QUIT`).
    Close,
}

/// Which translator runs a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Ping,
    Echo,
    Quit,
    Hello,
    Select,
    Client,
    Command,
    Config,
    Info,
    Dbsize,
    Scan,
    Keys,
    Slowlog,
    Flushall,
    Auth,
    Get,
    Set,
    Setex,
    Psetex,
    Setnx,
    Getdel,
    Getex,
    Del,
    Exists,
    Expire,
    Pexpire,
    Expireat,
    Pexpireat,
    Persist,
    Ttl,
    Pttl,
    Mget,
    Mset,
    Incr,
    Incrby,
    Decr,
    Decrby,
    Type,
    Strlen,
    Multi,
    Exec,
    Discard,
    Watch,
    Unwatch,
}

/// One command of the table.
struct Spec {
    /// Lower-case name.
    name: &'static str,
    /// Redis's arity: `n` exactly n arguments (the name included), `-n` at least n.
    arity: i32,
    /// Redis's command flags, for `COMMAND`.
    flags: &'static [&'static str],
    /// First key, last key (negative: from the end), step, for `COMMAND`.
    keys: (i32, i32, i32),
    /// The role a token needs (`None`: allowed before `AUTH`).
    role: Option<Role>,
    cmd: Cmd,
}

const RO: &[&str] = &["readonly", "fast"];
const WR: &[&str] = &["write", "denyoom"];
const WF: &[&str] = &["write", "fast"];
const CONN: &[&str] = &["fast", "loading", "stale"];
const NOAUTH: &[&str] = &["noscript", "loading", "stale", "fast", "no_auth"];

const fn spec(
    name: &'static str,
    arity: i32,
    flags: &'static [&'static str],
    keys: (i32, i32, i32),
    role: Option<Role>,
    cmd: Cmd,
) -> Spec {
    Spec {
        name,
        arity,
        flags,
        keys,
        role,
        cmd,
    }
}

const R: Option<Role> = Some(Role::Read);
const W: Option<Role> = Some(Role::Write);
const A: Option<Role> = Some(Role::Admin);
const NONE: (i32, i32, i32) = (0, 0, 0);
const ONE: (i32, i32, i32) = (1, 1, 1);
const ALL: (i32, i32, i32) = (1, -1, 1);

/// Every command this front end serves.
static TABLE: &[Spec] = &[
    spec("ping", -1, CONN, NONE, R, Cmd::Ping),
    spec("echo", 2, CONN, NONE, R, Cmd::Echo),
    spec("quit", -1, NOAUTH, NONE, None, Cmd::Quit),
    spec("hello", -1, NOAUTH, NONE, None, Cmd::Hello),
    spec("auth", -2, NOAUTH, NONE, None, Cmd::Auth),
    spec("select", 2, CONN, NONE, R, Cmd::Select),
    spec("client", -2, CONN, NONE, R, Cmd::Client),
    spec("command", -1, CONN, NONE, R, Cmd::Command),
    spec("config", -2, CONN, NONE, R, Cmd::Config),
    spec("info", -1, CONN, NONE, R, Cmd::Info),
    spec("dbsize", 1, RO, NONE, R, Cmd::Dbsize),
    spec("scan", -2, &["readonly"], NONE, R, Cmd::Scan),
    spec(
        "slowlog",
        -2,
        &["admin", "loading", "stale"],
        NONE,
        A,
        Cmd::Slowlog,
    ),
    spec("flushall", -1, &["write"], NONE, A, Cmd::Flushall),
    spec("flushdb", -1, &["write"], NONE, A, Cmd::Flushall),
    spec("get", 2, RO, ONE, R, Cmd::Get),
    spec("set", -3, WR, ONE, W, Cmd::Set),
    spec("setex", 4, WR, ONE, W, Cmd::Setex),
    spec("psetex", 4, WR, ONE, W, Cmd::Psetex),
    spec("setnx", 3, WF, ONE, W, Cmd::Setnx),
    spec("getdel", 2, WF, ONE, W, Cmd::Getdel),
    spec("getex", -2, WF, ONE, W, Cmd::Getex),
    spec("del", -2, &["write"], ALL, W, Cmd::Del),
    spec("unlink", -2, WF, ALL, W, Cmd::Del),
    spec("exists", -2, RO, ALL, R, Cmd::Exists),
    spec("expire", -3, WF, ONE, W, Cmd::Expire),
    spec("pexpire", -3, WF, ONE, W, Cmd::Pexpire),
    spec("expireat", -3, WF, ONE, W, Cmd::Expireat),
    spec("pexpireat", -3, WF, ONE, W, Cmd::Pexpireat),
    spec("persist", 2, WF, ONE, W, Cmd::Persist),
    spec("ttl", 2, RO, ONE, R, Cmd::Ttl),
    spec("pttl", 2, RO, ONE, R, Cmd::Pttl),
    spec("mget", -2, RO, ALL, R, Cmd::Mget),
    spec("mset", -3, WR, (1, -1, 2), W, Cmd::Mset),
    spec("incr", 2, WR, ONE, W, Cmd::Incr),
    spec("incrby", 3, WR, ONE, W, Cmd::Incrby),
    spec("decr", 2, WR, ONE, W, Cmd::Decr),
    spec("decrby", 3, WR, ONE, W, Cmd::Decrby),
    spec("type", 2, RO, ONE, R, Cmd::Type),
    spec("strlen", 2, RO, ONE, R, Cmd::Strlen),
    spec("multi", 1, CONN, NONE, R, Cmd::Multi),
    spec(
        "exec",
        1,
        &["noscript", "loading", "stale"],
        NONE,
        R,
        Cmd::Exec,
    ),
    spec("discard", 1, CONN, NONE, R, Cmd::Discard),
    spec("watch", -2, CONN, ALL, R, Cmd::Watch),
    spec("unwatch", 1, CONN, NONE, R, Cmd::Unwatch),
    // Last: the table is searched in order, and the hot commands come first.
    spec("keys", 2, &["readonly"], NONE, R, Cmd::Keys),
];

/// Keys `KEYS` walks between yields: about half a millisecond of work, so the other
/// connections of a one-thread node wait no longer than that (10 000 keys per step held
/// them up to ~6 ms; measured with 1 M keys).
const KEYS_PAGE: usize = 1_000;

/// Most commands queued in one `MULTI` block.
const MAX_QUEUED: usize = 65_536;
/// Most bytes (arguments) queued in one `MULTI` block.
const MAX_QUEUED_BYTES: usize = 64 << 20;

fn lookup(name: &[u8]) -> Option<&'static Spec> {
    TABLE
        .iter()
        .find(|s| s.name.as_bytes().eq_ignore_ascii_case(name))
}

/// Redis's text for an unknown command: the name and the first arguments, quoted.
fn unknown_command(args: &[Bytes]) -> String {
    let mut msg = format!(
        "ERR unknown command '{}', with args beginning with: ",
        printable(&args[0])
    );
    for a in args.iter().skip(1) {
        if msg.len() > 256 {
            break;
        }
        msg.push_str(&format!("'{}' ", printable(a)));
    }
    msg
}

/// At most 128 bytes of `b`, lossily as text, for error messages.
fn printable(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(128)]).into_owned()
}

fn wrong_arity(name: &str) -> String {
    format!("ERR wrong number of arguments for '{name}' command")
}

const SYNTAX: &str = "ERR syntax error";
const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
/// The `redis_version` reported by `INFO` and `HELLO`: the Redis release whose command
/// semantics this front end follows (clients use it to pick features).
const REDIS_VERSION: &str = "7.0.0";

/// An integer argument.
fn int_arg(b: &[u8]) -> Result<i64, String> {
    parse_integer(b).ok_or_else(|| NOT_INTEGER.to_string())
}

/// A core error as a RESP error.
fn core_error(e: &CoreError) -> String {
    match e {
        CoreError::Full(_) => "OOM command not allowed when used memory > 'maxmemory'.".into(),
        CoreError::Invalid(m) if m == NOT_AN_INTEGER => NOT_INTEGER.into(),
        CoreError::Invalid(m) => format!("ERR {m}"),
        CoreError::DeadlineExceeded(_) | CoreError::TooLate { .. } => format!("TIMEOUT {e}"),
        CoreError::Unavailable { .. } | CoreError::ShuttingDown | CoreError::Superseded => {
            format!("TRYAGAIN {e}")
        }
        _ => format!("ERR {e}"),
    }
}

/// One RESP connection's state.
pub(super) struct Session {
    shared: Arc<Shared>,
    /// A connection number, for `CLIENT ID`.
    id: u64,
    /// `CLIENT SETNAME`.
    name: Option<Bytes>,
    /// The role of the token given with `AUTH` (everything without `--auth-file`).
    role: Option<Role>,
    /// The RESP listener's port, for `INFO`.
    port: u16,
    /// `HELLO 3` switched this connection to RESP3 (nulls and maps differ).
    resp3: bool,
    /// Inside `MULTI`: the queued commands (`EXEC` runs them in order).
    queued: Option<Vec<Vec<Bytes>>>,
    /// Bytes queued, for the bound.
    queued_bytes: usize,
    /// A command of the `MULTI` block was refused: `EXEC` aborts.
    multi_failed: bool,
    /// The core requests run since the replies were last written (their latency is
    /// recorded once the write is done).
    ran: parking_lot::Mutex<Vec<Op>>,
    /// When the command being run started, in nanoseconds after `origin`: the read that
    /// brought it, or the end of the command before it in the same batch. One clock read
    /// per command then times it and starts the next.
    mark: AtomicU64,
    origin: Instant,
}

impl Session {
    /// A new connection's session.
    pub(super) fn new(shared: Arc<Shared>, id: u64, port: u16) -> Self {
        let role = if shared.auth.is_some() {
            None
        } else {
            Some(Role::Admin)
        };
        Self {
            shared,
            id,
            name: None,
            role,
            port,
            resp3: false,
            queued: None,
            queued_bytes: 0,
            multi_failed: false,
            ran: parking_lot::Mutex::new(Vec::new()),
            mark: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    /// Bytes arrived at `at`: the next command starts then.
    pub(super) fn arrived(&self, at: Instant) {
        self.mark.store(self.nanos(at), Ordering::Relaxed);
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Records the latency of every request run since the last call, as the client sees
    /// it: from `read_at` (the read that brought the commands) to now (their replies are
    /// written).
    pub(super) fn replies_written(&mut self, read_at: std::time::Instant) {
        let elapsed = read_at.elapsed();
        for op in self.ran.get_mut().drain(..) {
            self.shared.metrics.record_transport(
                crate::metrics::Transport::Resp,
                Some(op),
                elapsed,
            );
        }
    }

    /// Runs `request` through the core, recording the request's metric with `label`'s
    /// verdict on the answer.
    async fn run(
        &self,
        op: Op,
        request: Request,
        label: impl FnOnce(&Response) -> &'static str,
    ) -> Result<Response, String> {
        let (key, keys) = request.first_key();
        let key = key.cloned();
        let start = self.started();
        let ctx = RequestContext::until(
            tokio::time::Instant::from_std(start) + self.shared.request_timeout,
        );
        let outcome = self.shared.core.handle(request, ctx).await;
        let result = match &outcome {
            Ok(r) => label(r),
            Err(e) => crate::wire::error_kind(e),
        };
        self.finish(op, result, start, key.as_ref(), keys);
        outcome.map_err(|e| core_error(&e))
    }

    /// When the command being run started (see `mark`).
    fn started(&self) -> Instant {
        self.origin + Duration::from_nanos(self.mark.load(Ordering::Relaxed))
    }

    /// Counts a core request that started at `start` and ended now with `result`: its
    /// metrics, the slow log, and its client-side latency once the replies are written.
    /// Now is also when the next command of the batch starts.
    fn finish(
        &self,
        op: Op,
        result: &'static str,
        start: Instant,
        key: Option<&Bytes>,
        keys: usize,
    ) {
        let end = Instant::now();
        self.mark.store(self.nanos(end), Ordering::Relaxed);
        let elapsed = end.saturating_duration_since(start);
        self.shared.metrics.record(op, result, elapsed);
        self.shared
            .record_slow(op, result, elapsed, key, keys, "resp");
        self.ran.lock().push(op);
        self.shared.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// A read of `key` through the general path (a `Get` request, counted as one).
    async fn read(&self, key: &Bytes) -> Result<Option<cache_core::Lookup>, String> {
        let request = Request::Get {
            key: key.clone(),
            consistency: None,
        };
        let Response::Get(found) = self.run(Op::Get, request, hit_or_miss).await? else {
            return Err(mismatch());
        };
        Ok(found)
    }

    /// `GET`: when this node answers the key from its own copy, the value goes straight
    /// from the engine into the reply (no copy into a `Bytes` first); otherwise the general
    /// path (forwarding, read-through while syncing).
    async fn get(&self, key: &Bytes, out: &mut Vec<u8>) -> Result<(), String> {
        let start = self.started();
        let resp3 = self.resp3;
        match self
            .shared
            .core
            .read_here(key, |value| reply::bulk(out, value))
        {
            Some(outcome) => {
                let result = match &outcome {
                    Ok(Some(())) => "hit",
                    Ok(None) => "miss",
                    Err(e) => crate::wire::error_kind(e),
                };
                self.finish(Op::Get, result, start, Some(key), 1);
                if outcome.map_err(|e| core_error(&e))?.is_none() {
                    reply::nil(out, resp3);
                }
            }
            None => {
                let found = self.read(key).await?;
                reply::bulk_or_nil(out, found.as_ref().map(|l| &l.value[..]), resp3);
            }
        }
        Ok(())
    }

    /// Runs one command, appending its reply to `out`.
    pub(super) async fn execute(&mut self, args: &[Bytes], out: &mut Vec<u8>) -> Flow {
        let Some(spec) = lookup(&args[0]) else {
            self.multi_failed |= self.queued.is_some();
            reply::error(out, &unknown_command(args));
            return Flow::Continue;
        };
        let n = i32::try_from(args.len()).unwrap_or(i32::MAX);
        if (spec.arity > 0 && n != spec.arity) || (spec.arity < 0 && n < -spec.arity) {
            self.multi_failed |= self.queued.is_some();
            reply::error(out, &wrong_arity(spec.name));
            return Flow::Continue;
        }
        if let Some(need) = spec.role {
            match self.role {
                None => {
                    reply::error(out, "NOAUTH Authentication required.");
                    return Flow::Continue;
                }
                Some(role) if role < need => {
                    if let Some(auth) = &self.shared.auth {
                        auth.refused(&crate::auth::AuthError::Forbidden {
                            name: "(RESP connection)".into(),
                            role,
                            need,
                        });
                    }
                    reply::error(
                        out,
                        &format!(
                            "NOPERM this user has no permissions to run the '{}' command",
                            spec.name
                        ),
                    );
                    return Flow::Continue;
                }
                Some(_) => {}
            }
        }
        match spec.cmd {
            Cmd::Quit => {
                reply::simple(out, "OK");
                return Flow::Close;
            }
            Cmd::Multi | Cmd::Exec | Cmd::Discard | Cmd::Watch | Cmd::Unwatch => {
                self.transaction(spec.cmd, out).await;
                return Flow::Continue;
            }
            _ => {}
        }
        if let Some(queued) = &mut self.queued {
            let bytes: usize = args.iter().map(Bytes::len).sum();
            if queued.len() >= MAX_QUEUED || self.queued_bytes + bytes > MAX_QUEUED_BYTES {
                self.multi_failed = true;
                reply::error(
                    out,
                    &format!(
                        "ERR a MULTI block holds at most {MAX_QUEUED} commands and {MAX_QUEUED_BYTES} bytes"
                    ),
                );
                return Flow::Continue;
            }
            self.queued_bytes += bytes;
            queued.push(args.to_vec());
            reply::simple(out, "QUEUED");
            return Flow::Continue;
        }
        if let Err(msg) = self.dispatch(spec, args, out).await {
            reply::error(out, &msg);
        }
        Flow::Continue
    }

    /// `MULTI`, `EXEC`, `DISCARD`, `WATCH`, `UNWATCH`. `EXEC` runs the queued commands in
    /// order and answers an array of their replies. It is **not atomic**: each command is
    /// its own request to the cluster (its keys may live on different nodes), so another
    /// client's commands can come between them, and a command that fails does not undo the
    /// others (Redis does not roll back either). `WATCH` (optimistic locking) is refused.
    async fn transaction(&mut self, cmd: Cmd, out: &mut Vec<u8>) {
        match cmd {
            Cmd::Multi if self.queued.is_some() => {
                reply::error(out, "ERR MULTI calls can not be nested");
            }
            Cmd::Multi => {
                self.queued = Some(Vec::new());
                self.queued_bytes = 0;
                self.multi_failed = false;
                reply::simple(out, "OK");
            }
            Cmd::Discard | Cmd::Exec if self.queued.is_none() => {
                let name = if cmd == Cmd::Exec { "EXEC" } else { "DISCARD" };
                reply::error(out, &format!("ERR {name} without MULTI"));
            }
            Cmd::Discard => {
                self.queued = None;
                reply::simple(out, "OK");
            }
            Cmd::Exec => {
                let queued = self.queued.take().unwrap_or_default();
                if std::mem::take(&mut self.multi_failed) {
                    reply::error(
                        out,
                        "EXECABORT Transaction discarded because of previous errors.",
                    );
                    return;
                }
                reply::array(out, queued.len());
                for args in &queued {
                    // Checked when queued.
                    let Some(spec) = lookup(&args[0]) else {
                        reply::error(out, &unknown_command(args));
                        continue;
                    };
                    if let Err(msg) = self.dispatch(spec, args, out).await {
                        reply::error(out, &msg);
                    }
                }
            }
            Cmd::Watch => reply::error(
                out,
                "ERR WATCH is not supported: cache-cluster has no optimistic transactions \
                 (use SET NX/XX or INCR for conditional updates)",
            ),
            _ => reply::simple(out, "OK"),
        }
    }

    async fn dispatch(
        &mut self,
        spec: &Spec,
        args: &[Bytes],
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        match spec.cmd {
            Cmd::Quit => reply::simple(out, "OK"),
            Cmd::Multi | Cmd::Exec | Cmd::Discard | Cmd::Watch | Cmd::Unwatch => {
                return Err("ERR MULTI, EXEC, DISCARD and WATCH cannot be queued".into());
            }
            Cmd::Type => {
                let found = self.read(&args[1]).await?;
                reply::simple(out, if found.is_some() { "string" } else { "none" });
            }
            Cmd::Strlen => {
                let found = self.read(&args[1]).await?;
                let len = found.map_or(0, |l| l.value.len());
                reply::int(out, i64::try_from(len).unwrap_or(i64::MAX));
            }
            Cmd::Ping => match args.get(1) {
                None => reply::simple(out, "PONG"),
                Some(m) if args.len() == 2 => reply::bulk(out, m),
                Some(_) => return Err(wrong_arity("ping")),
            },
            Cmd::Echo => reply::bulk(out, &args[1]),
            Cmd::Select => {
                if int_arg(&args[1])? != 0 {
                    return Err("ERR DB index is out of range".into());
                }
                reply::simple(out, "OK");
            }
            Cmd::Auth => self.auth(args, out)?,
            Cmd::Hello => self.hello(args, out)?,
            Cmd::Client => self.client(args, out)?,
            Cmd::Command => command(args, out, self.resp3)?,
            Cmd::Config => self.config(args, out)?,
            Cmd::Info => self.info(out),
            Cmd::Dbsize => {
                let n = self.shared.core.store().engine().len();
                reply::int(out, i64::try_from(n).unwrap_or(i64::MAX));
            }
            Cmd::Scan => self.scan(args, out)?,
            Cmd::Keys => self.keys(&args[1], out).await?,
            Cmd::Slowlog => self.slowlog(args, out)?,
            Cmd::Flushall => {
                // ASYNC and SYNC both run it now; nothing else is accepted.
                let mode_ok = args
                    .get(1)
                    .is_none_or(|m| matches!(&m.to_ascii_uppercase()[..], b"ASYNC" | b"SYNC"));
                if !mode_ok || args.len() > 2 {
                    return Err("ERR syntax error".into());
                }
                self.shared.flush().await.map_err(|e| core_error(&e))?;
                reply::simple(out, "OK");
            }
            Cmd::Get => self.get(&args[1], out).await?,
            Cmd::Set => self.set(args, out).await?,
            Cmd::Setex | Cmd::Psetex => {
                let n = int_arg(&args[2])?;
                let ms = if spec.cmd == Cmd::Setex {
                    n.checked_mul(1000)
                } else {
                    Some(n)
                };
                let ms = ms
                    .filter(|ms| *ms > 0)
                    .ok_or_else(|| format!("ERR invalid expire time in '{}' command", spec.name))?;
                let cmd = SetCommand {
                    key: args[1].clone(),
                    value: args[3].clone(),
                    ttl_ms: Some(ms.unsigned_abs()),
                    condition: Condition::Always,
                };
                self.plain_set(cmd).await?;
                reply::simple(out, "OK");
            }
            Cmd::Setnx => {
                let cmd = SetCommand {
                    key: args[1].clone(),
                    value: args[2].clone(),
                    ttl_ms: None,
                    condition: Condition::IfAbsent,
                };
                let stored = self.plain_set(cmd).await?;
                reply::int(out, i64::from(stored));
            }
            Cmd::Getdel => {
                let (previous, _) = self.update(&args[1], UpdateOp::Delete).await?;
                reply::bulk_or_nil(out, previous.as_ref().map(|l| &l.value[..]), self.resp3);
            }
            Cmd::Getex => self.getex(args, out).await?,
            Cmd::Del => self.del(&args[1..], out).await?,
            Cmd::Exists => {
                let found = self.multi_get(&args[1..]).await?;
                let n = found.iter().filter(|f| f.is_some()).count();
                reply::int(out, i64::try_from(n).unwrap_or(i64::MAX));
            }
            Cmd::Expire | Cmd::Pexpire | Cmd::Expireat | Cmd::Pexpireat => {
                let when = expire_when(&args[3..])?;
                let n = int_arg(&args[2])?;
                let invalid = || format!("ERR invalid expire time in '{}' command", spec.name);
                let expiry = match spec.cmd {
                    Cmd::Expire => relative(n.checked_mul(1000).ok_or_else(invalid)?),
                    Cmd::Pexpire => relative(n),
                    Cmd::Expireat => absolute(n.checked_mul(1000).ok_or_else(invalid)?),
                    _ => absolute(n),
                };
                let (previous, _) = self
                    .update(&args[1], UpdateOp::Expire { expiry, when })
                    .await?;
                // The primary decided on this same value: the condition's verdict here is
                // its verdict (a relative expiry is resolved against this node's clock).
                let now = self.shared.core.store().now_ms();
                let set = previous
                    .is_some_and(|l| when.holds(l.expires_at, expiry.resolve(l.expires_at, now)));
                reply::int(out, i64::from(set));
            }
            Cmd::Persist => {
                let op = UpdateOp::Expire {
                    expiry: Expiry::Never,
                    when: ExpireWhen::Always,
                };
                let (previous, _) = self.update(&args[1], op).await?;
                let had_ttl = previous.is_some_and(|l| l.expires_at.is_some());
                reply::int(out, i64::from(had_ttl));
            }
            Cmd::Ttl | Cmd::Pttl => {
                let found = self.read(&args[1]).await?;
                let now = self.shared.core.store().now_ms();
                let n = match found {
                    None => -2,
                    Some(l) => match l.expires_at {
                        None => -1,
                        Some(at) => {
                            let ms = at.saturating_sub(now);
                            let v = if spec.cmd == Cmd::Ttl {
                                ms.saturating_add(500) / 1000
                            } else {
                                ms
                            };
                            i64::try_from(v).unwrap_or(i64::MAX)
                        }
                    },
                };
                reply::int(out, n);
            }
            Cmd::Mget => {
                let found = self.multi_get(&args[1..]).await?;
                reply::array(out, found.len());
                for f in &found {
                    reply::bulk_or_nil(out, f.as_ref().map(|l| &l.value[..]), self.resp3);
                }
            }
            Cmd::Mset => {
                if args.len() % 2 != 1 {
                    return Err(wrong_arity("mset"));
                }
                self.mset(&args[1..]).await?;
                reply::simple(out, "OK");
            }
            Cmd::Incr | Cmd::Decr | Cmd::Incrby | Cmd::Decrby => {
                let delta = match spec.cmd {
                    Cmd::Incr => 1,
                    Cmd::Decr => -1,
                    Cmd::Incrby => int_arg(&args[2])?,
                    _ => int_arg(&args[2])?
                        .checked_neg()
                        .ok_or_else(|| "ERR decrement would overflow".to_string())?,
                };
                let op = UpdateOp::Incr {
                    delta,
                    ttl_ms_if_created: None,
                };
                let (_, current) = self.update_as(Op::Incr, &args[1], op).await?;
                let value = crate::wire::counter_value(current).map_err(|e| core_error(&e))?;
                reply::int(out, value);
            }
        }
        Ok(())
    }

    /// A plain `Set`; returns whether it was stored.
    async fn plain_set(&self, cmd: SetCommand) -> Result<bool, String> {
        let request = Request::Set {
            cmd,
            consistency: None,
        };
        let Response::Set { stored } = self
            .run(Op::Set, request, |r| match r {
                Response::Set { stored: false } => "not_stored",
                _ => "ok",
            })
            .await?
        else {
            return Err(mismatch());
        };
        Ok(stored)
    }

    async fn update(
        &self,
        key: &Bytes,
        op: UpdateOp,
    ) -> Result<(Option<cache_core::Lookup>, Option<cache_core::Lookup>), String> {
        self.update_as(Op::Update, key, op).await
    }

    /// An atomic update of `key`: the live value before and after.
    async fn update_as(
        &self,
        metric: Op,
        key: &Bytes,
        op: UpdateOp,
    ) -> Result<(Option<cache_core::Lookup>, Option<cache_core::Lookup>), String> {
        let request = Request::Update {
            key: key.clone(),
            op,
            consistency: None,
        };
        let Response::Update { previous, current } = self.run(metric, request, |_| "ok").await?
        else {
            return Err(mismatch());
        };
        Ok((previous, current))
    }

    /// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]`.
    async fn set(&self, args: &[Bytes], out: &mut Vec<u8>) -> Result<(), String> {
        let mut condition = Condition::Always;
        let mut get = false;
        let mut expiry: Option<Expiry> = None;
        let mut i = 3;
        while i < args.len() {
            let opt = args[i].to_ascii_uppercase();
            match &opt[..] {
                b"NX" if condition != Condition::IfPresent => condition = Condition::IfAbsent,
                b"XX" if condition != Condition::IfAbsent => condition = Condition::IfPresent,
                b"GET" => get = true,
                b"KEEPTTL" if expiry.is_none_or(|e| e == Expiry::Keep) => {
                    expiry = Some(Expiry::Keep);
                }
                b"EX" | b"PX" | b"EXAT" | b"PXAT" if expiry.is_none() && i + 1 < args.len() => {
                    i += 1;
                    let n = int_arg(&args[i])?;
                    let invalid = || "ERR invalid expire time in 'set' command".to_string();
                    if n <= 0 {
                        return Err(invalid());
                    }
                    let ms = match &opt[..] {
                        b"EX" | b"EXAT" => n.checked_mul(1000).ok_or_else(invalid)?,
                        _ => n,
                    };
                    let ms = ms.unsigned_abs();
                    expiry = Some(if opt.ends_with(b"AT") {
                        Expiry::AtMs(ms)
                    } else {
                        Expiry::InMs(ms)
                    });
                }
                _ => return Err(SYNTAX.into()),
            }
            i += 1;
        }
        let (key, value) = (args[1].clone(), args[2].clone());
        let plain = match expiry {
            None => Some(None),
            Some(Expiry::InMs(ms)) => Some(Some(ms)),
            Some(_) => None,
        };
        if let (false, Some(ttl_ms)) = (get, plain) {
            let stored = self
                .plain_set(SetCommand {
                    key,
                    value,
                    ttl_ms,
                    condition,
                })
                .await?;
            if stored {
                reply::simple(out, "OK");
            } else {
                reply::nil(out, self.resp3);
            }
            return Ok(());
        }
        let op = UpdateOp::Set {
            value,
            expiry: expiry.unwrap_or(Expiry::Never),
            condition,
        };
        let (previous, _) = self.update(&key, op).await?;
        if get {
            reply::bulk_or_nil(out, previous.as_ref().map(|l| &l.value[..]), self.resp3);
        } else {
            let stored = match condition {
                Condition::Always => true,
                Condition::IfAbsent => previous.is_none(),
                Condition::IfPresent => previous.is_some(),
            };
            if stored {
                reply::simple(out, "OK");
            } else {
                reply::nil(out, self.resp3);
            }
        }
        Ok(())
    }

    /// `GETEX key [EX s|PX ms|EXAT s|PXAT ms|PERSIST]`.
    async fn getex(&self, args: &[Bytes], out: &mut Vec<u8>) -> Result<(), String> {
        let key = &args[1];
        let expiry = match &args[2..] {
            [] => None,
            [opt] if opt.eq_ignore_ascii_case(b"PERSIST") => Some(Expiry::Never),
            [opt, n] => {
                let opt = opt.to_ascii_uppercase();
                let n = int_arg(n)?;
                let invalid = || "ERR invalid expire time in 'getex' command".to_string();
                if n <= 0 {
                    return Err(invalid());
                }
                let secs = |n: i64| n.checked_mul(1000).ok_or_else(invalid);
                Some(match &opt[..] {
                    b"EX" => Expiry::InMs(secs(n)?.unsigned_abs()),
                    b"PX" => Expiry::InMs(n.unsigned_abs()),
                    b"EXAT" => Expiry::AtMs(secs(n)?.unsigned_abs()),
                    b"PXAT" => Expiry::AtMs(n.unsigned_abs()),
                    _ => return Err(SYNTAX.into()),
                })
            }
            _ => return Err(SYNTAX.into()),
        };
        let value = match expiry {
            None => self.read(key).await?,
            Some(expiry) => {
                let op = UpdateOp::Expire {
                    expiry,
                    when: ExpireWhen::Always,
                };
                self.update(key, op).await?.0
            }
        };
        reply::bulk_or_nil(out, value.as_ref().map(|l| &l.value[..]), self.resp3);
        Ok(())
    }

    /// `DEL`/`UNLINK`: each key's delete goes to its own primary, up to 64 at a time.
    async fn del(&self, keys: &[Bytes], out: &mut Vec<u8>) -> Result<(), String> {
        let mut deleted = 0i64;
        for chunk in keys.chunks(64) {
            let results = futures_util::future::join_all(chunk.iter().map(|key| {
                let request = Request::Delete {
                    key: key.clone(),
                    consistency: None,
                };
                self.run(Op::Delete, request, |r| match r {
                    Response::Delete { deleted: false } => "miss",
                    _ => "ok",
                })
            }))
            .await;
            for r in results {
                match r? {
                    Response::Delete { deleted: true } => deleted += 1,
                    Response::Delete { deleted: false } => {}
                    _ => return Err(mismatch()),
                }
            }
        }
        reply::int(out, deleted);
        Ok(())
    }

    /// Reads `keys` in batches of the node's batch limit; refuses an answer larger than the
    /// node's response limit (it would all be held in memory before it is written).
    async fn multi_get(&self, keys: &[Bytes]) -> Result<Vec<Option<cache_core::Lookup>>, String> {
        let limits = *self.shared.core.store().limits();
        let max_bytes = limits.max_response_bytes();
        let mut bytes = 0usize;
        let mut found = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(limits.max_batch.max(1)) {
            let request = Request::MultiGet {
                keys: chunk.to_vec(),
            };
            let Response::MultiGet(part) = self.run(Op::MultiGet, request, |_| "ok").await? else {
                return Err(mismatch());
            };
            bytes += part.iter().flatten().map(|l| l.value.len()).sum::<usize>();
            if bytes > max_bytes {
                return Err(format!(
                    "ERR the values add up to more than this node answers at once ({max_bytes} bytes): ask for fewer keys"
                ));
            }
            found.extend(part);
        }
        Ok(found)
    }

    /// Writes `key value` pairs in batches of the node's batch limit.
    async fn mset(&self, pairs: &[Bytes]) -> Result<(), String> {
        let batch = self.shared.core.store().limits().max_batch.max(1);
        for chunk in pairs.chunks(2 * batch) {
            let entries = chunk
                .chunks_exact(2)
                .map(|kv| SetCommand {
                    key: kv[0].clone(),
                    value: kv[1].clone(),
                    ttl_ms: None,
                    condition: Condition::Always,
                })
                .collect();
            let request = Request::MultiSet {
                entries,
                consistency: None,
            };
            self.run(Op::MultiSet, request, |_| "ok").await?;
        }
        Ok(())
    }

    /// `AUTH [username] password`: the password is a token of `--auth-file`; a username
    /// other than `default` must be the token's name.
    fn auth(&mut self, args: &[Bytes], out: &mut Vec<u8>) -> Result<(), String> {
        let (user, password) = match args {
            [_, p] => (None, p),
            [_, u, p] => (Some(u), p),
            _ => return Err(SYNTAX.into()),
        };
        self.authenticate(user.map(|u| &u[..]), password)?;
        reply::simple(out, "OK");
        Ok(())
    }

    fn authenticate(&mut self, user: Option<&[u8]>, password: &[u8]) -> Result<(), String> {
        let Some(auth) = &self.shared.auth else {
            return Err(
                "ERR AUTH <password> called without any password configured for the \
                        default user. Are you sure your configuration is correct?"
                    .into(),
            );
        };
        let mut header = b"Bearer ".to_vec();
        header.extend_from_slice(password);
        let wrong = || "WRONGPASS invalid username-password pair or user is disabled.".to_string();
        let (name, role) = auth.identify(Some(&header)).map_err(|_| wrong())?;
        if let Some(u) = user
            && u != b"default"
            && u != name.as_bytes()
        {
            return Err(wrong());
        }
        self.role = Some(role);
        Ok(())
    }

    /// `HELLO [2|3 [AUTH user pass] [SETNAME name]]`: answers the server's description and
    /// switches the connection to the protocol version asked for.
    fn hello(&mut self, args: &[Bytes], out: &mut Vec<u8>) -> Result<(), String> {
        let mut i = 1;
        let mut resp3 = self.resp3;
        if let Some(v) = args.get(1) {
            match parse_integer(v) {
                Some(2) => resp3 = false,
                Some(3) => resp3 = true,
                Some(_) => {
                    return Err("NOPROTO sorry, this protocol version is not supported".into());
                }
                None => return Err("ERR Protocol version is not an integer or out of range".into()),
            }
            i = 2;
        }
        let mut name = None;
        while i < args.len() {
            let opt = args[i].to_ascii_uppercase();
            match &opt[..] {
                b"AUTH" if i + 2 < args.len() => {
                    self.authenticate(Some(&args[i + 1]), &args[i + 2])?;
                    i += 3;
                }
                b"SETNAME" if i + 1 < args.len() => {
                    name = Some(args[i + 1].clone());
                    i += 2;
                }
                _ => {
                    return Err(format!(
                        "ERR Syntax error in HELLO option '{}'",
                        printable(&opt)
                    ));
                }
            }
        }
        if self.role.is_none() {
            return Err(
                "NOAUTH HELLO must be called with the client already authenticated, \
                        otherwise the HELLO <proto> AUTH <user> <pass> option can be used to \
                        authenticate the client and select the RESP protocol version at the \
                        same time"
                    .into(),
            );
        }
        if let Some(n) = name {
            check_name(&n)?;
            self.name = Some(n);
        }
        self.resp3 = resp3;
        reply::map(out, 7, resp3);
        for (k, v) in [("server", "redis"), ("version", REDIS_VERSION)] {
            reply::bulk(out, k.as_bytes());
            reply::bulk(out, v.as_bytes());
        }
        reply::bulk(out, b"proto");
        reply::int(out, if resp3 { 3 } else { 2 });
        reply::bulk(out, b"id");
        reply::int(out, i64::try_from(self.id).unwrap_or(i64::MAX));
        for (k, v) in [("mode", "standalone"), ("role", "master")] {
            reply::bulk(out, k.as_bytes());
            reply::bulk(out, v.as_bytes());
        }
        reply::bulk(out, b"modules");
        reply::array(out, 0);
        Ok(())
    }

    /// `CLIENT SETNAME|GETNAME|ID|SETINFO|INFO`.
    fn client(&mut self, args: &[Bytes], out: &mut Vec<u8>) -> Result<(), String> {
        let sub = args[1].to_ascii_uppercase();
        match (&sub[..], args.len()) {
            (b"SETNAME", 3) => {
                check_name(&args[2])?;
                self.name = (!args[2].is_empty()).then(|| args[2].clone());
                reply::simple(out, "OK");
            }
            (b"GETNAME", 2) => reply::bulk_or_nil(out, self.name.as_deref(), self.resp3),
            (b"ID", 2) => reply::int(out, i64::try_from(self.id).unwrap_or(i64::MAX)),
            // Library name and version: accepted and not kept.
            (b"SETINFO", 4) => reply::simple(out, "OK"),
            (b"INFO", 2) => {
                let name = self.name.as_deref().map(printable).unwrap_or_default();
                let proto = if self.resp3 { 3 } else { 2 };
                let line = format!("id={} name={} db=0 resp={proto}\n", self.id, name);
                reply::bulk(out, line.as_bytes());
            }
            (b"SETNAME" | b"GETNAME" | b"ID" | b"SETINFO" | b"INFO", _) => {
                return Err(format!(
                    "ERR wrong number of arguments for 'client|{}' command",
                    printable(&sub).to_ascii_lowercase()
                ));
            }
            _ => {
                return Err(format!(
                    "ERR unknown subcommand '{}'. Try CLIENT HELP.",
                    printable(&args[1])
                ));
            }
        }
        Ok(())
    }

    /// `CONFIG GET pattern...`: the few settings clients and `redis-benchmark` ask for,
    /// answered from the node's real configuration. Nothing can be set at run time.
    /// `SCAN cursor [MATCH pattern] [COUNT count] [TYPE type]`: one step over this node's
    /// keys (they are all strings, so `TYPE string` changes nothing and another type finds
    /// none).
    fn scan(&self, args: &[Bytes], out: &mut Vec<u8>) -> Result<(), String> {
        let cursor: u64 = std::str::from_utf8(&args[1])
            .ok()
            .and_then(|c| c.parse().ok())
            .ok_or("ERR invalid cursor")?;
        let (mut pattern, mut count, mut strings) = (&b""[..], 10usize, true);
        let mut rest = args[2..].chunks(2);
        for pair in rest.by_ref() {
            let [option, value] = pair else {
                return Err("ERR syntax error".into());
            };
            match &option.to_ascii_uppercase()[..] {
                b"MATCH" => pattern = &value[..],
                b"COUNT" => {
                    count = std::str::from_utf8(value)
                        .ok()
                        .and_then(|c| c.parse::<usize>().ok())
                        .filter(|&c| c >= 1)
                        .ok_or("ERR value is not an integer or out of range")?;
                }
                b"TYPE" => strings = value.eq_ignore_ascii_case(b"string"),
                _ => return Err("ERR syntax error".into()),
            }
        }
        let pattern = self.glob(pattern)?;
        let (keys, next) = self.shared.scan(cursor, pattern, count);
        let keys = if strings { keys } else { Vec::new() };
        reply::array(out, 2);
        reply::bulk(out, next.to_string().as_bytes());
        reply::array(out, keys.len());
        for k in &keys {
            reply::bulk(out, k);
        }
        Ok(())
    }

    /// A `SCAN MATCH` / `KEYS` pattern as the engine's scan takes it (`*` matches all: no
    /// filter); one longer than the largest key is refused.
    fn glob<'p>(&self, pattern: &'p [u8]) -> Result<&'p [u8], String> {
        if pattern.len() > self.shared.core.store().limits().max_key_bytes {
            return Err("ERR pattern is longer than the largest key".into());
        }
        Ok(if pattern == b"*" { b"" } else { pattern })
    }

    /// `KEYS pattern`: every key of this node's engine that matches (like `SCAN`, the keys
    /// this node holds — its own and its replicas' copies — not the whole cluster's). It
    /// walks the engine in pages of [`KEYS_PAGE`], yielding between them so other
    /// connections are served meanwhile, and refuses — rather than build — a reply over the
    /// node's response limit (`SCAN` walks any number of keys).
    async fn keys(&self, pattern: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let pattern = self.glob(pattern)?;
        let limit = self.shared.core.store().limits().max_response_bytes();
        // The keys' replies, encoded page by page (each page's keys are dropped before the
        // next yield): no per-key allocation outlives its page.
        // A complete scan (every key live for the whole walk is listed, whatever the engine
        // moves meanwhile); it may meet a key twice, so keys already listed are skipped.
        let engine = self.shared.core.store().engine();
        let mut scan = engine.scanner();
        let (mut body, mut listed) = (Vec::new(), std::collections::HashSet::new());
        while let Some(page) = scan.entries(KEYS_PAGE) {
            for e in page {
                if !pattern.is_empty() && !cache_types::glob_match(pattern, &e.key) {
                    continue;
                }
                // A bulk string's framing: `$`, up to 20 digits, two CRLFs.
                if body.len() + e.key.len() + 25 > limit {
                    return Err(format!(
                        "ERR KEYS would reply more than {limit} bytes: use SCAN with MATCH"
                    ));
                }
                if listed.insert(e.key.clone()) {
                    reply::bulk(&mut body, &e.key);
                }
            }
            tokio::task::yield_now().await;
        }
        let count = listed.len();
        reply::array(out, count);
        out.extend_from_slice(&body);
        Ok(())
    }

    /// `SLOWLOG GET [count] | LEN | RESET | HELP`, in Redis's reply shapes: each entry is
    /// id, Unix time (s), duration (µs), the arguments (operation and first key), and an
    /// empty client address and name.
    fn slowlog(&self, args: &[Bytes], out: &mut Vec<u8>) -> Result<(), String> {
        let log = &self.shared.slowlog;
        match &args[1].to_ascii_uppercase()[..] {
            b"GET" if args.len() <= 3 => {
                let count = match args.get(2) {
                    None => 10,
                    Some(n) => {
                        let n: i64 = std::str::from_utf8(n)
                            .ok()
                            .and_then(|n| n.parse().ok())
                            .ok_or("ERR value is not an integer or out of range")?;
                        // Redis: -1 means all.
                        if n < 0 {
                            usize::MAX
                        } else {
                            usize::try_from(n).unwrap_or(usize::MAX)
                        }
                    }
                };
                let entries = log.get(count);
                reply::array(out, entries.len());
                for e in entries {
                    reply::array(out, 6);
                    reply::int(out, i64::try_from(e.id).unwrap_or(i64::MAX));
                    reply::int(out, i64::try_from(e.at_unix_ms / 1000).unwrap_or(i64::MAX));
                    reply::int(
                        out,
                        i64::try_from(e.duration.as_micros()).unwrap_or(i64::MAX),
                    );
                    reply::array(out, 2);
                    reply::bulk(out, e.op.as_bytes());
                    reply::bulk(out, &e.key);
                    reply::bulk(out, b"");
                    reply::bulk(out, e.via.as_bytes());
                }
            }
            b"LEN" if args.len() == 2 => {
                reply::int(out, i64::try_from(log.len()).unwrap_or(i64::MAX));
            }
            b"RESET" if args.len() == 2 => {
                log.reset();
                reply::simple(out, "OK");
            }
            b"HELP" if args.len() == 2 => {
                let lines = [
                    "SLOWLOG <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                    "GET [<count>]",
                    "    Return top <count> entries from the slowlog (default: 10, -1 mean all).",
                    "LEN",
                    "    Return the length of the slowlog.",
                    "RESET",
                    "    Reset the slowlog.",
                ];
                reply::array(out, lines.len());
                for l in lines {
                    reply::simple(out, l);
                }
            }
            _ => {
                return Err(format!(
                    "ERR unknown subcommand or wrong number of arguments for '{}'. Try SLOWLOG HELP.",
                    printable(&args[1])
                ));
            }
        }
        Ok(())
    }

    fn config(&self, args: &[Bytes], out: &mut Vec<u8>) -> Result<(), String> {
        let sub = args[1].to_ascii_uppercase();
        if &sub[..] != b"GET" {
            return Err(format!(
                "ERR CONFIG {} is not supported: cache-cluster is configured with cache-node's \
                 flags (a SIGHUP reloads the reloadable ones)",
                printable(&args[1])
            ));
        }
        if args.len() < 3 {
            return Err("ERR wrong number of arguments for 'config|get' command".into());
        }
        let cache = self.shared.core.store().engine().config();
        let values: [(&str, String); 6] = [
            ("maxmemory", cache.max_bytes.to_string()),
            ("maxmemory-policy", maxmemory_policy(cache).into()),
            (
                "appendonly",
                if self.shared.persistence.is_some() {
                    "yes"
                } else {
                    "no"
                }
                .into(),
            ),
            ("save", String::new()),
            ("databases", "1".into()),
            ("timeout", "0".into()),
        ];
        let matching: Vec<&(&str, String)> = values
            .iter()
            .filter(|(name, _)| {
                args[2..]
                    .iter()
                    .any(|p| cache_types::glob_match(&p.to_ascii_lowercase(), name.as_bytes()))
            })
            .collect();
        reply::map(out, matching.len(), self.resp3);
        for (name, value) in matching {
            reply::bulk(out, name.as_bytes());
            reply::bulk(out, value.as_bytes());
        }
        Ok(())
    }

    /// `INFO`: the sections clients and tools read, from the node's real state.
    fn info(&self, out: &mut Vec<u8>) {
        let core = &self.shared.core;
        let stats = core.store().stats();
        let cache = core.store().engine().config();
        let uptime = self.shared.started.elapsed().as_secs();
        let clients = self.shared.connections[3].open.load(Ordering::Relaxed);
        let text = format!(
            "# Server\r\nredis_version:{REDIS_VERSION}\r\ncache_cluster_version:{}\r\n\
             redis_mode:standalone\r\nnode_id:{}\r\nprocess_id:{}\r\ntcp_port:{}\r\n\
             uptime_in_seconds:{uptime}\r\nuptime_in_days:{}\r\n\r\n\
             # Clients\r\nconnected_clients:{clients}\r\n\r\n\
             # Memory\r\nused_memory:{}\r\nused_memory_rss:{}\r\nmaxmemory:{}\r\n\
             maxmemory_policy:{}\r\n\r\n\
             # Persistence\r\naof_enabled:{}\r\n\r\n\
             # Stats\r\ntotal_commands_processed:{}\r\nkeyspace_hits:{}\r\nkeyspace_misses:{}\r\n\
             evicted_keys:{}\r\nexpired_keys:{}\r\n\r\n\
             # Replication\r\nrole:master\r\nconnected_slaves:0\r\n\r\n\
             # Cluster\r\ncluster_enabled:0\r\nring_epoch:{}\r\n\r\n\
             # Keyspace\r\ndb0:keys={},expires=0,avg_ttl=0\r\n",
            env!("CARGO_PKG_VERSION"),
            core.local_id(),
            std::process::id(),
            self.port,
            uptime / 86_400,
            stats.bytes,
            crate::metrics::resident_memory_bytes().unwrap_or(0),
            cache.max_bytes,
            maxmemory_policy(cache),
            u8::from(self.shared.persistence.is_some()),
            self.shared.requests.load(Ordering::Relaxed),
            stats.hits,
            stats.misses,
            stats.evictions,
            stats.expirations,
            core.ring().load().epoch,
            core.store().engine().len(),
        );
        reply::bulk(out, text.as_bytes());
    }
}

/// The engine's eviction settings as Redis names them, for `INFO` and `CONFIG GET
/// maxmemory-policy` alike.
fn maxmemory_policy(cache: &cache_core::CacheConfig) -> &'static str {
    match (cache.evict, cache.eviction_policy) {
        (false, _) => "noeviction",
        (true, cache_core::EvictionPolicy::Lru) => "allkeys-lru",
        // Not a Redis policy name; what a client that prints it should see.
        (true, cache_core::EvictionPolicy::Sieve) => "allkeys-sieve",
    }
}

fn hit_or_miss(r: &Response) -> &'static str {
    match r {
        Response::Get(Some(_)) => "hit",
        _ => "miss",
    }
}

fn mismatch() -> String {
    "ERR internal error: the core answered another request's response".into()
}

/// `EXPIRE`'s options: `NX`, `XX`, `GT`, `LT` (`XX` combines with `GT` or `LT`, which
/// then decide; the others exclude each other, as in Redis).
fn expire_when(options: &[Bytes]) -> Result<ExpireWhen, String> {
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for o in options {
        match &o.to_ascii_uppercase()[..] {
            b"NX" => nx = true,
            b"XX" => xx = true,
            b"GT" => gt = true,
            b"LT" => lt = true,
            _ => return Err(format!("ERR Unsupported option {}", printable(o))),
        }
    }
    if (nx && (xx || gt || lt)) || (gt && lt) {
        return Err("ERR NX and XX, GT or LT options at the same time are not compatible".into());
    }
    Ok(match (nx, xx, gt, lt) {
        (true, ..) => ExpireWhen::NoExpiry,
        (_, _, true, _) => ExpireWhen::Later,
        (_, true, _, true) => ExpireWhen::EarlierThanSome,
        (_, _, _, true) => ExpireWhen::Earlier,
        (_, true, ..) => ExpireWhen::HasExpiry,
        _ => ExpireWhen::Always,
    })
}

/// A relative expiry in milliseconds; zero or negative deletes (as Redis does).
fn relative(ms: i64) -> Expiry {
    if ms <= 0 {
        Expiry::AtMs(0)
    } else {
        Expiry::InMs(ms.unsigned_abs())
    }
}

/// An absolute expiry in unix milliseconds; in the past (or negative) deletes.
fn absolute(at_ms: i64) -> Expiry {
    Expiry::AtMs(u64::try_from(at_ms).unwrap_or(0))
}

fn check_name(name: &[u8]) -> Result<(), String> {
    if name.iter().any(|b| !(b'!'..=b'~').contains(b)) {
        return Err(
            "ERR Client names cannot contain spaces, newlines or special characters.".into(),
        );
    }
    Ok(())
}

/// One `COMMAND` entry: name, arity, flags, first key, last key, step.
fn command_entry(s: &Spec, out: &mut Vec<u8>) {
    reply::array(out, 6);
    reply::bulk(out, s.name.as_bytes());
    reply::int(out, i64::from(s.arity));
    reply::array(out, s.flags.len());
    for f in s.flags {
        reply::simple(out, f);
    }
    reply::int(out, i64::from(s.keys.0));
    reply::int(out, i64::from(s.keys.1));
    reply::int(out, i64::from(s.keys.2));
}

/// `COMMAND [COUNT|INFO name...|DOCS|LIST]`.
fn command(args: &[Bytes], out: &mut Vec<u8>, resp3: bool) -> Result<(), String> {
    let Some(sub) = args.get(1) else {
        reply::array(out, TABLE.len());
        for s in TABLE {
            command_entry(s, out);
        }
        return Ok(());
    };
    match &sub.to_ascii_uppercase()[..] {
        b"COUNT" => reply::int(out, i64::try_from(TABLE.len()).unwrap_or(0)),
        b"LIST" => {
            reply::array(out, TABLE.len());
            for s in TABLE {
                reply::bulk(out, s.name.as_bytes());
            }
        }
        // No documentation is served: redis-cli then completes without hints.
        b"DOCS" => reply::map(out, 0, resp3),
        b"INFO" => {
            let names = &args[2..];
            if names.is_empty() {
                reply::array(out, TABLE.len());
                for s in TABLE {
                    command_entry(s, out);
                }
            } else {
                reply::array(out, names.len());
                for n in names {
                    match lookup(n) {
                        Some(s) => command_entry(s, out),
                        None => reply::nil(out, resp3),
                    }
                }
            }
        }
        _ => {
            return Err(format!(
                "ERR unknown subcommand '{}'. Try COMMAND HELP.",
                printable(sub)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_lower_case_and_unique() {
        for (i, s) in TABLE.iter().enumerate() {
            assert_eq!(s.name, s.name.to_ascii_lowercase());
            assert!(
                TABLE[i + 1..].iter().all(|t| t.name != s.name),
                "{}",
                s.name
            );
        }
        assert!(lookup(b"gEt").is_some());
        assert!(lookup(b"lpush").is_none());
    }

    #[test]
    fn config_patterns_glob() {
        assert!(cache_types::glob_match(b"*", b"save"));
        assert!(cache_types::glob_match(b"max*", b"maxmemory-policy"));
        assert!(cache_types::glob_match(b"s?ve", b"save"));
        assert!(!cache_types::glob_match(b"max", b"maxmemory"));
    }

    #[test]
    fn unknown_commands_quote_their_arguments() {
        let args = [Bytes::from_static(b"FOO"), Bytes::from_static(b"a b")];
        assert_eq!(
            unknown_command(&args),
            "ERR unknown command 'FOO', with args beginning with: 'a b' "
        );
    }
}
