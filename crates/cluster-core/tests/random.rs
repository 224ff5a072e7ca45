//! The seeded randomized simulation: a few clients send random requests of every kind, at
//! every consistency, with conditions and TTLs, to a simulated 3- to 5-node cluster while a
//! fault task cuts links, isolates and pauses nodes (briefly, or past the peer timeout),
//! loses, delays (reorders) and duplicates messages, lets each node's failure detector
//! update its own view (so views diverge in a partition), and heals. Then
//! it checks, from the record of what every request saw:
//!
//! - no `Quorum`/`All`-acknowledged write is lost or reverted: a `Quorum`/`All` read returns
//!   the latest such write that completed before it started, or something at least as new
//!   (deletes and expiries included) — also in a final read of every key after healing;
//! - a client's own writes are never reordered, at any consistency (`One` included): each
//!   client also writes a key of its own, and after healing every replica of that key holds
//!   the client's last acknowledged write or a later one whose outcome was unknown — never
//!   an earlier one (a write that came back from the dead: a paused primary executing a
//!   forward its coordinator had given up on and re-sent elsewhere);
//! - every request is answered within its deadline;
//! - nothing panics (a panic hook counts panics in any task).
//!
//! `SIM_SEEDS=N` runs seeds `SIM_SEED_START..SIM_SEED_START+N` (default 0..200);
//! `SIM_SEED=S` replays one seed. A failure prints its seed and the request history of
//! the key concerned. `cargo xtask sim --seeds N` runs this in release mode.
//!
//! Real time vs. versions: versions come from hybrid logical clocks with millisecond
//! granularity, so two writes coordinated by different nodes within the same millisecond
//! are ordered by node tag, not by real time. "A happened before B" therefore means
//! "A ended more than [`SLACK`] before B started".

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cluster_core::sim::{SimCluster, SimConfig, SimRng};
use cluster_core::{
    Condition, Consistency, CoreError, Expiry, Request, Response, SetCommand, UpdateOp,
};
use tokio::time::Instant;

/// Clock granularity for real-time order (see the module docs).
const SLACK: Duration = Duration::from_millis(2);
/// Every client request's deadline.
const TIMEOUT: Duration = Duration::from_millis(600);
const CLIENTS: usize = 4;
const OPS_PER_CLIENT: usize = 40;
const KEYS: usize = 6;
/// Client `c` alone writes key `KEYS + c` (unconditional sets and deletes, no TTL).
const OWNED: usize = CLIENTS;

static PANICS: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, Clone)]
enum Kind {
    /// A write of a unique value.
    Set {
        value: Bytes,
        ttl_ms: Option<u64>,
        /// Shown in failure reports.
        #[allow(dead_code)]
        condition: Condition,
    },
    Delete,
    Touch {
        ttl_ms: Option<u64>,
    },
    Get,
}

/// What a request's answer says about whether it changed the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// Acknowledged as applied.
    Applied,
    /// Acknowledged as not applied (condition false, key absent for touch).
    NoOp,
    /// Failed: may or may not have been applied somewhere.
    Maybe,
}

#[derive(Debug, Clone)]
struct Record {
    client: usize,
    key: usize,
    kind: Kind,
    consistency: Consistency,
    start: Instant,
    end: Instant,
    effect: Effect,
    /// For a get: what it returned (`None` for an error).
    read: Option<Option<Bytes>>,
    via: usize,
    error: Option<String>,
}

fn key_name(k: usize) -> Bytes {
    Bytes::from(format!("key{k}"))
}

fn before(a: &Record, b: &Record) -> bool {
    a.end + SLACK < b.start
}

/// Checks one quorum read against the history. `Err` describes the violation.
fn check_read(history: &[Record], r: &Record) -> Result<(), String> {
    let Some(result) = &r.read else {
        return Ok(());
    };
    let on_key: Vec<&Record> = history
        .iter()
        .filter(|x| x.key == r.key && !matches!(x.kind, Kind::Get))
        .collect();
    // Writes that may have changed the state (applied, or maybe).
    let writes = || on_key.iter().filter(|x| x.effect != Effect::NoOp);
    let may_have_produced_absence = |x: &Record| match &x.kind {
        Kind::Delete => true,
        Kind::Set { ttl_ms, .. } | Kind::Touch { ttl_ms } => {
            ttl_ms.is_some_and(|t| x.start + Duration::from_millis(t) <= r.end)
        }
        Kind::Get => false,
    };
    let touches_not_before = |w: &Record| {
        writes().any(|t| matches!(t.kind, Kind::Touch { .. }) && !before(t, w) && t.start <= r.end)
    };
    // The value's origin.
    let origin = match result {
        Some(v) => {
            let Some(x) =
                writes().find(|x| matches!(&x.kind, Kind::Set { value, .. } if value == v))
            else {
                return Err(format!("read {v:?}, which no write wrote"));
            };
            if x.start > r.end {
                return Err(format!("read {v:?} before it was written"));
            }
            let any_touch = writes().any(|t| matches!(t.kind, Kind::Touch { .. }));
            if let Kind::Set {
                ttl_ms: Some(t), ..
            } = x.kind
                && !any_touch
                && x.end + Duration::from_millis(t) + SLACK <= r.start
            {
                return Err(format!("read {v:?} after it expired"));
            }
            Some(*x)
        }
        None => None,
    };
    // Every quorum-acknowledged write that completed before the read started.
    for w in on_key.iter().filter(|w| {
        w.effect == Effect::Applied
            && matches!(w.consistency, Consistency::Quorum | Consistency::All)
            && !matches!(w.kind, Kind::Touch { .. })
            && before(w, r)
    }) {
        match origin {
            Some(x) => {
                if before(x, w) && !touches_not_before(w) {
                    return Err(format!(
                        "read {:?} written by client {} at {:?}, older than a {} write acknowledged {:?} later by client {}",
                        result,
                        x.client,
                        x.end,
                        w.consistency,
                        w.end.duration_since(x.end),
                        w.client
                    ));
                }
            }
            None => {
                let explained = may_have_produced_absence(w)
                    || writes()
                        .any(|y| !before(y, w) && y.start <= r.end && may_have_produced_absence(y));
                if !explained {
                    return Err(format!(
                        "read nothing, but a {} write by client {} was acknowledged {:?} before the read and nothing deleted or expired it",
                        w.consistency,
                        w.client,
                        r.start.duration_since(w.end)
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Checks a key written by one client alone against what replica `replica` holds after
/// healing (`held`: its live value, `None` if absent or deleted). The client's operations
/// are sequential, so its writes are totally ordered: the value held must be that of its
/// last acknowledged write, or of a later one whose outcome was unknown. `Err` describes
/// the violation.
fn check_owned(history: &[Record], key: usize, held: Option<&Bytes>) -> Result<(), String> {
    let mut ops: Vec<&Record> = history
        .iter()
        .filter(|r| r.key == key && !matches!(r.kind, Kind::Get))
        .collect();
    ops.sort_by_key(|r| r.start);
    let last_applied = ops.iter().rposition(|r| r.effect == Effect::Applied);
    let allowed: Vec<&Record> = ops
        .iter()
        .enumerate()
        .filter(|(i, r)| match last_applied {
            Some(last) => *i == last || (*i > last && r.effect == Effect::Maybe),
            None => r.effect == Effect::Maybe,
        })
        .map(|(_, r)| *r)
        .collect();
    let explains = |r: &Record| match (&r.kind, held) {
        (Kind::Set { value, .. }, Some(v)) => value == v,
        (Kind::Delete, None) => true,
        _ => false,
    };
    if allowed.iter().any(|r| explains(r)) || (held.is_none() && last_applied.is_none()) {
        return Ok(());
    }
    let culprit = ops.iter().position(|r| explains(r));
    Err(match culprit {
        Some(i) => format!(
            "holds {held:?}, written by operation {i} of {}, but operation {} was acknowledged after it: an earlier write overrode a later acknowledged one",
            ops.len(),
            last_applied.map_or(0, |l| l)
        ),
        None => format!("holds {held:?}, which no write of the key explains"),
    })
}

fn pick<T: Copy>(rng: &mut SimRng, items: &[T]) -> T {
    items[rng.below(items.len() as u64) as usize]
}

fn random_consistency(rng: &mut SimRng) -> Consistency {
    pick(
        rng,
        &[
            Consistency::One,
            Consistency::Quorum,
            Consistency::Quorum,
            Consistency::All,
        ],
    )
}

/// One client: sequential random requests to random nodes.
async fn client(
    id: usize,
    nodes: u64,
    cluster: Rc<SimCluster>,
    rng: Rc<RefCell<SimRng>>,
    history: Rc<RefCell<Vec<Record>>>,
) -> Result<(), String> {
    for seq in 0..OPS_PER_CLIENT {
        let (via, key, pause, choice, consistency, ttl, condition, owned) = {
            let mut g = rng.borrow_mut();
            // Some operations are a set or delete of the client's own key.
            let owned = g.chance(300).then(|| g.chance(250));
            let via = g.below(nodes) as usize;
            let key = g.below(KEYS as u64) as usize;
            let pause = 1 + g.below(15);
            let choice = g.below(100);
            let consistency = random_consistency(&mut g);
            let ttl = if g.chance(250) {
                Some(20 + g.below(200))
            } else {
                None
            };
            let condition = pick(
                &mut g,
                &[
                    Condition::Always,
                    Condition::Always,
                    Condition::IfAbsent,
                    Condition::IfPresent,
                ],
            );
            (via, key, pause, choice, consistency, ttl, condition, owned)
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let value = Bytes::from(format!("c{id}-{seq}"));
        let mine = KEYS + id;
        let (request, kinds): (Request, Vec<(usize, Kind)>) = match (owned, choice) {
            (Some(true), _) => (
                Request::Delete {
                    key: key_name(mine),
                    consistency: Some(consistency),
                },
                vec![(mine, Kind::Delete)],
            ),
            (Some(false), _) => (
                Request::Set {
                    cmd: SetCommand {
                        key: key_name(mine),
                        value: value.clone(),
                        ttl_ms: None,
                        condition: Condition::Always,
                    },
                    consistency: Some(consistency),
                },
                vec![(
                    mine,
                    Kind::Set {
                        value,
                        ttl_ms: None,
                        condition: Condition::Always,
                    },
                )],
            ),
            (None, 0..=34) => (
                Request::Get {
                    key: key_name(key),
                    consistency: Some(consistency),
                },
                vec![(key, Kind::Get)],
            ),
            (None, 35..=64) => (
                // A third of the writes go through the atomic update path (`SET .. GET`).
                if choice >= 55 {
                    Request::Update {
                        key: key_name(key),
                        op: UpdateOp::Set {
                            value: value.clone(),
                            expiry: ttl.map_or(Expiry::Never, Expiry::InMs),
                            condition,
                        },
                        consistency: Some(consistency),
                    }
                } else {
                    Request::Set {
                        cmd: SetCommand {
                            key: key_name(key),
                            value: value.clone(),
                            ttl_ms: ttl,
                            condition,
                        },
                        consistency: Some(consistency),
                    }
                },
                vec![(
                    key,
                    Kind::Set {
                        value,
                        ttl_ms: ttl,
                        condition,
                    },
                )],
            ),
            (None, 65..=76) => (
                // Some deletes are `GETDEL`s (the update path).
                if choice >= 73 {
                    Request::Update {
                        key: key_name(key),
                        op: UpdateOp::Delete,
                        consistency: Some(consistency),
                    }
                } else {
                    Request::Delete {
                        key: key_name(key),
                        consistency: Some(consistency),
                    }
                },
                vec![(key, Kind::Delete)],
            ),
            (None, 77..=84) => (
                Request::Touch {
                    key: key_name(key),
                    ttl_ms: ttl,
                    consistency: Some(consistency),
                },
                vec![(key, Kind::Touch { ttl_ms: ttl })],
            ),
            (None, 85..=92) => {
                let keys: Vec<usize> = (0..3).map(|i| (key + i) % KEYS).collect();
                (
                    Request::MultiGet {
                        keys: keys.iter().map(|&k| key_name(k)).collect(),
                    },
                    Vec::new(),
                )
            }
            (None, _) => {
                let keys: Vec<usize> = (0..3).map(|i| (key + i * 2) % KEYS).collect();
                let mut seen = Vec::new();
                let mut entries = Vec::new();
                let mut kinds = Vec::new();
                for (n, &k) in keys.iter().enumerate() {
                    if seen.contains(&k) {
                        continue;
                    }
                    seen.push(k);
                    let value = Bytes::from(format!("c{id}-{seq}-{n}"));
                    entries.push(SetCommand {
                        key: key_name(k),
                        value: value.clone(),
                        ttl_ms: ttl,
                        condition,
                    });
                    kinds.push((
                        k,
                        Kind::Set {
                            value,
                            ttl_ms: ttl,
                            condition,
                        },
                    ));
                }
                (
                    Request::MultiSet {
                        entries,
                        consistency: Some(consistency),
                    },
                    kinds,
                )
            }
        };
        let start = Instant::now();
        let result = cluster.request(via, request, TIMEOUT).await;
        let end = Instant::now();
        if end.duration_since(start) > TIMEOUT + Duration::from_millis(1) {
            return Err(format!(
                "client {id} request {seq} took {:?}, over its deadline of {TIMEOUT:?}",
                end.duration_since(start)
            ));
        }
        if let Err(CoreError::Internal(e)) = &result {
            return Err(format!("client {id} request {seq}: internal error {e}"));
        }
        let error = result.as_ref().err().map(ToString::to_string);
        let mut h = history.borrow_mut();
        for (i, (k, kind)) in kinds.into_iter().enumerate() {
            let (effect, read) = match (&kind, &result) {
                (Kind::Get, Ok(Response::Get(found))) => {
                    (Effect::NoOp, Some(found.as_ref().map(|l| l.value.clone())))
                }
                (Kind::Get, _) => (Effect::NoOp, None),
                (_, Err(_)) => (Effect::Maybe, None),
                (Kind::Set { .. }, Ok(Response::Set { stored })) => (applied(*stored), None),
                (Kind::Set { .. }, Ok(Response::MultiSet(stored))) => (applied(stored[i]), None),
                (Kind::Set { condition, .. }, Ok(Response::Update { previous, .. })) => {
                    let stored = match condition {
                        Condition::Always => true,
                        Condition::IfAbsent => previous.is_none(),
                        Condition::IfPresent => previous.is_some(),
                    };
                    (applied(stored), None)
                }
                (Kind::Delete, Ok(Response::Delete { .. })) => (Effect::Applied, None),
                // A `GETDEL` of an absent key changes nothing.
                (Kind::Delete, Ok(Response::Update { previous, .. })) => {
                    (applied(previous.is_some()), None)
                }
                (Kind::Touch { .. }, Ok(Response::Touch { found })) => (applied(*found), None),
                (_, Ok(other)) => {
                    return Err(format!("client {id}: unexpected response {other:?}"));
                }
            };
            h.push(Record {
                client: id,
                key: k,
                kind,
                consistency,
                start,
                end,
                effect,
                read,
                via,
                error: error.clone(),
            });
        }
    }
    Ok(())
}

fn applied(yes: bool) -> Effect {
    if yes { Effect::Applied } else { Effect::NoOp }
}

/// Random faults until `done`.
async fn faults(
    nodes: u64,
    cluster: Rc<SimCluster>,
    rng: Rc<RefCell<SimRng>>,
    done: Rc<RefCell<bool>>,
) {
    // Long pauses (past a peer timeout, so callers give up and re-send elsewhere), each
    // ended at its time unless a heal ends it first.
    let mut resumes: Vec<(Instant, usize)> = Vec::new();
    while !*done.borrow() {
        let (wait, action, a, b, amount) = {
            let mut g = rng.borrow_mut();
            (
                5 + g.below(60),
                g.below(11),
                g.below(nodes) as usize,
                g.below(nodes) as usize,
                g.below(150),
            )
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let now = Instant::now();
        resumes.retain(|&(at, node)| {
            if at <= now {
                cluster.resume(node);
            }
            at > now
        });
        match action {
            7 => {
                cluster.pause(a);
                resumes.push((now + Duration::from_millis(250 + amount * 5), a));
            }
            0 if a != b => cluster.cut(a, b),
            1 => cluster.isolate(a),
            2 => cluster.pause(a),
            3 => cluster.resume(a),
            4 => cluster.set_loss(u32::try_from(amount).unwrap_or(0)),
            5 => cluster.set_delay(0, amount / 5),
            6 => cluster.set_duplicates(u32::try_from(amount).unwrap_or(0)),
            // Each node's failure detector catches up with what it can reach: the views
            // diverge in a partition (a minority sees the majority dead).
            8 => cluster.detect_failures(),
            _ => cluster.heal(),
        }
    }
}

fn describe(history: &[Record], key: usize, base: Instant) -> String {
    let mut on_key: Vec<&Record> = history.iter().filter(|r| r.key == key).collect();
    on_key.sort_by_key(|r| r.start);
    on_key
        .into_iter()
        .map(|r| {
            format!(
                "  c{} via n{} {:?} {:?} {}..{} effect={:?} read={:?} err={:?}",
                r.client,
                r.via,
                r.kind,
                r.consistency,
                r.start.duration_since(base).as_millis(),
                r.end.duration_since(base).as_millis(),
                r.effect,
                r.read,
                r.error
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs one seed; `Err` says what broke.
fn run_seed(seed: u64) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let base = Instant::now();
        // 3 to 5 nodes, replication factor 2 or 3: with more nodes than replicas, requests
        // reach nodes that do not replicate their key and are forwarded.
        let nodes = 3 + seed % 3;
        let replication_factor = if seed % 7 == 3 { 2 } else { 3 };
        let defaults = SimConfig::default();
        let cluster = Rc::new(SimCluster::new(SimConfig {
            seed,
            nodes: usize::try_from(nodes).expect("small"),
            core: cluster_core::CoreConfig {
                replication_factor,
                ..defaults.core.clone()
            },
            // Anti-entropy, as on every real node: with each node's own view, a `ONE` write
            // made while a replica looked dead is not queued for it, and only a sync round
            // after the views agree again brings it there.
            sync: Some(cluster_core::SyncConfig {
                interval: Duration::from_secs(1),
                bytes_per_sec: 0,
                give_up_after: Duration::from_secs(3),
                call_timeout: Duration::from_secs(2),
                ..cluster_core::SyncConfig::default()
            }),
            ..defaults
        }));
        let rng = Rc::new(RefCell::new(SimRng::new(seed)));
        let history = Rc::new(RefCell::new(Vec::new()));
        let done = Rc::new(RefCell::new(false));
        let clients = (0..CLIENTS).map(|id| {
            client(id, nodes, Rc::clone(&cluster), Rc::clone(&rng), Rc::clone(&history))
        });
        let run = async {
            let results = futures_util::future::join_all(clients).await;
            *done.borrow_mut() = true;
            results
        };
        let (results, ()) = tokio::join!(run, faults(nodes, Rc::clone(&cluster), Rc::clone(&rng), Rc::clone(&done)));
        for r in results {
            r?;
        }
        // Heal, let every view catch up and the queues drain, then read every key at
        // QUORUM from a random node.
        cluster.heal();
        cluster.detect_failures();
        tokio::time::sleep(Duration::from_secs(4)).await;
        for key in 0..KEYS {
            let via = rng.borrow_mut().below(nodes) as usize;
            let start = Instant::now();
            let result = cluster
                .request(via, Request::Get { key: key_name(key), consistency: Some(Consistency::Quorum) }, TIMEOUT)
                .await
                .map_err(|e| format!("final quorum read of key{key} failed after healing: {e}"))?;
            let Response::Get(found) = result else {
                return Err("final read: not a get response".into());
            };
            history.borrow_mut().push(Record {
                client: usize::MAX,
                key,
                kind: Kind::Get,
                consistency: Consistency::Quorum,
                start,
                end: Instant::now(),
                effect: Effect::NoOp,
                read: Some(found.map(|l| l.value)),
                via,
                error: None,
            });
        }
        let history = history.borrow().clone();
        // Every replica of every client's own key holds that client's last acknowledged
        // write (or a later one whose outcome was unknown).
        for key in KEYS..KEYS + OWNED {
            let state = cluster.node(0).ring().load();
            for replica in state.replicas(&key_name(key)) {
                let i = cluster.index_of(&replica);
                let held = match cluster.node(i).store().get_versioned(&key_name(key)) {
                    Some(cache_core::VersionedRead::Live(l)) => Some(l.value),
                    _ => None,
                };
                if let Err(e) = check_owned(&history, key, held.as_ref()) {
                    return Err(format!(
                        "key{key} (client {}'s own) on replica {replica}: {e}\nhistory of key{key} (ms since the start):\n{}",
                        key - KEYS,
                        describe(&history, key, base)
                    ));
                }
            }
        }
        for r in history.iter().filter(|r| {
            matches!(r.kind, Kind::Get) && matches!(r.consistency, Consistency::Quorum | Consistency::All)
        }) {
            if let Err(e) = check_read(&history, r) {
                return Err(format!(
                    "key{} read by client {} via n{} at {:?}: {e}\nhistory of key{} (ms since the start):\n{}",
                    r.key,
                    r.client,
                    r.via,
                    r.start.duration_since(base),
                    r.key,
                    describe(&history, r.key, base)
                ));
            }
        }
        cluster.shutdown(Duration::from_millis(200)).await;
        for i in 0..cluster.ids().len() {
            cluster
                .node(i)
                .store()
                .engine()
                .validate()
                .map_err(|e| format!("n{i} engine invariant broken: {e}"))?;
        }
        Ok(())
    })?;
    let panics = PANICS.swap(0, Ordering::SeqCst);
    if panics > 0 {
        return Err(format!("{panics} task(s) panicked"));
    }
    Ok(())
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn randomized_simulation_keeps_quorum_promises() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let seeds: Vec<u64> = match env_u64("SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let start = env_u64("SIM_SEED_START").unwrap_or(0);
            let count = env_u64("SIM_SEEDS").unwrap_or(200);
            (start..start + count).collect()
        }
    };
    let started = std::time::Instant::now();
    for &seed in &seeds {
        if let Err(e) = run_seed(seed) {
            panic!(
                "simulation seed {seed} failed: {e}\nreplay: SIM_SEED={seed} cargo test -p cluster-core --test random"
            );
        }
    }
    eprintln!(
        "simulation: {} seeds passed in {:.1?}",
        seeds.len(),
        started.elapsed()
    );
}
