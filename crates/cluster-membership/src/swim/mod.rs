//! SWIM gossip membership as a sans-I/O state machine, with the Lifeguard refinements.
//!
//! [`Swim`] never touches a socket or a clock. The runtime (UDP + TCP in production, an
//! in-memory network in tests) feeds it received bytes ([`Swim::handle_message`]) and the
//! current time ([`Swim::tick`], called at [`Swim::next_wakeup`] at the latest), and sends
//! what [`Swim::drain_outgoing`] returns. Every random choice comes from a seeded generator,
//! so a test replays exactly.
//!
//! # The protocol
//!
//! - **Probe.** Every protocol period (`probe_interval`) the node pings the next member of a
//!   shuffled round-robin list. No ack within `probe_timeout` → it asks `indirect_checks`
//!   other members to ping the target for it (`PingReq`), relaying any ack. No ack, direct
//!   or indirect, by the end of the period → the target is **suspect**.
//! - **Suspicion** is disseminated; the suspect refutes it by raising its **incarnation**
//!   and announcing itself alive. A suspicion not refuted within its timeout makes the
//!   member **dead**. The timeout follows Lifeguard: it starts at
//!   `suspicion_max_mult × min` and shrinks towards
//!   `min = suspicion_mult × max(1, log10 n) × probe_interval` as independent members
//!   confirm the suspicion (logarithmically in the number of confirmations; the minimum is
//!   reached with `suspicion_mult - 2` confirmations, memberlist's rule, or at once when
//!   fewer members could confirm).
//! - **Local health** (Lifeguard's awareness): a node whose own probes fail (or that has to
//!   refute a suspicion about itself) is probably the slow one; its probe interval and
//!   timeout are multiplied by `awareness + 1` (up to `awareness_max`), so a starved node
//!   slows down instead of accusing healthy ones.
//! - **Dissemination** piggybacks updates on every message (and on a gossip tick to a few
//!   random members every `gossip_interval`); each update is sent at most
//!   `retransmit_mult × ceil(log10(n + 1))` times, fewest-sent first, within the datagram
//!   budget.
//! - **Push-pull**: on join and every `push_pull_interval` (scaled up beyond 32 members, as
//!   memberlist does, since each exchange carries the whole list), a node exchanges its whole list
//!   with a random member (over the reliable path): this heals what gossip missed, and
//!   merges the two halves of a healed partition. Dead members not yet reaped, and the join
//!   seeds, stay candidates so a partition can heal.
//! - **Leave**: a leaving node announces itself `left` (at a higher incarnation) and stops
//!   probing. Dead and left members are forgotten after `reap_after`.
//! - **Precedence** of updates about one member: a higher incarnation wins; at the same
//!   incarnation `left`/`dead` beat `suspect`, which beats `alive`. Only the member itself
//!   raises its incarnation — to refute, to rejoin after a restart, or to announce a new
//!   address.

pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use cache_types::MemberState;

use crate::{MembershipView, SplitMix64};
pub use wire::{Addrs, Body, DecodeError, Message, Update};

/// Protocol settings. The defaults suit a LAN: memberlist's LAN profile with a shorter probe
/// interval and a suspicion multiplier of 3 instead of 4, for faster detection on small
/// clusters (measured: median 2.3 s, max 2.5 s on 5 real nodes, and no false death with 10 % loss in
/// simulation or with every core busy beside real nodes — see `docs/benchmarks.md`).
#[derive(Debug, Clone)]
pub struct SwimConfig {
    /// Messages from another cluster name are refused, so two clusters never merge.
    pub cluster_name: String,
    /// One probe per period.
    pub probe_interval: Duration,
    /// How long a direct ping waits before indirect probes start.
    pub probe_timeout: Duration,
    /// Members asked to probe indirectly.
    pub indirect_checks: usize,
    /// Minimum suspicion timeout = this × max(1, log10 n) × `probe_interval`.
    pub suspicion_mult: u32,
    /// Maximum suspicion timeout = this × the minimum.
    pub suspicion_max_mult: u32,
    /// Each update is sent at most this × ceil(log10(n + 1)) times.
    pub retransmit_mult: u32,
    /// How often pending updates are gossiped to `gossip_nodes` random members.
    pub gossip_interval: Duration,
    /// Members per gossip tick.
    pub gossip_nodes: usize,
    /// How often the whole member list is exchanged with one member, up to 32 members;
    /// beyond that it is multiplied by `1 + ceil(log2(n / 32))` so that push-pull bytes
    /// per member stay roughly flat as the list grows.
    pub push_pull_interval: Duration,
    /// How long dead and left members are remembered (and still gossiped to).
    pub reap_after: Duration,
    /// Largest local-health multiplier (Lifeguard).
    pub awareness_max: u32,
    /// Largest datagram sent; push-pull goes over the reliable path instead.
    pub max_datagram: usize,
}

impl Default for SwimConfig {
    fn default() -> Self {
        Self {
            cluster_name: "cache-cluster".into(),
            probe_interval: Duration::from_millis(500),
            probe_timeout: Duration::from_millis(200),
            indirect_checks: 3,
            suspicion_mult: 3,
            suspicion_max_mult: 6,
            retransmit_mult: 4,
            gossip_interval: Duration::from_millis(200),
            gossip_nodes: 3,
            push_pull_interval: Duration::from_secs(15),
            reap_after: Duration::from_secs(30),
            awareness_max: 8,
            max_datagram: 1400,
        }
    }
}

/// A message to send: to `to`, reliably (stream) for push-pull, else as one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The receiver's gossip address.
    pub to: SocketAddr,
    /// The encoded message.
    pub bytes: Vec<u8>,
    /// Send over the reliable path (TCP): the message may exceed a datagram.
    pub reliable: bool,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwimStats {
    /// Messages received (well-formed).
    pub messages_in: u64,
    /// Bytes received (well-formed).
    pub bytes_in: u64,
    /// Messages refused (malformed, wrong cluster or version).
    pub messages_refused: u64,
    /// Messages sent.
    pub messages_out: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Probes started.
    pub probes: u64,
    /// Members this node suspected.
    pub suspicions: u64,
    /// Suspicions about this node that it refuted.
    pub refutations: u64,
    /// Members this node declared dead.
    pub deaths: u64,
    /// Total milliseconds from suspicion to declared dead (divide by `deaths`).
    pub suspicion_to_dead_ms: u64,
}

#[derive(Debug, Clone)]
struct Suspicion {
    started: u64,
    confirmations: BTreeSet<String>,
}

#[derive(Debug, Clone)]
struct Record {
    update: Update,
    /// When its state last changed (ms).
    since: u64,
    suspicion: Option<Suspicion>,
}

#[derive(Debug, Clone)]
struct Probe {
    target: String,
    target_addr: SocketAddr,
    seq: u64,
    sent_at: u64,
    indirect_sent: bool,
    acked: bool,
}

/// A ping this node sends on behalf of another (indirect probe): relay the ack.
#[derive(Debug, Clone)]
struct Relay {
    origin: SocketAddr,
    origin_seq: u64,
    expires: u64,
}

#[derive(Debug, Clone)]
struct Broadcast {
    update: Update,
    transmits: u32,
}

/// Decodes a received message and counts it in `stats` (received, or refused).
pub(crate) fn decode_counted(
    cluster: &str,
    bytes: &[u8],
    stats: &mut SwimStats,
) -> Result<Message, DecodeError> {
    match wire::decode(cluster, bytes) {
        Ok(m) => {
            stats.messages_in += 1;
            stats.bytes_in += bytes.len() as u64;
            Ok(m)
        }
        Err(e) => {
            stats.messages_refused += 1;
            Err(e)
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Ordering of states at one incarnation: a higher rank overrides a lower one.
fn rank(s: MemberState) -> u8 {
    match s {
        MemberState::Alive => 0,
        MemberState::Suspect => 1,
        MemberState::Dead | MemberState::Left => 2,
    }
}

/// The SWIM state machine of one member. See the module docs.
#[derive(Debug)]
pub struct Swim {
    config: SwimConfig,
    me: Update,
    members: BTreeMap<String, Record>,
    /// Other members that own keys (alive or suspect): kept as members change so that
    /// `n()` costs nothing per message (it is read on every send).
    live: usize,
    /// Members under suspicion: the only ones with a suspicion deadline.
    suspects: BTreeSet<String>,
    /// When dead and left members are next reaped.
    next_reap_at: u64,
    probe: Option<Probe>,
    probe_order: Vec<String>,
    next_probe_at: u64,
    next_gossip_at: u64,
    next_push_pull_at: u64,
    seq: u64,
    relays: BTreeMap<u64, Relay>,
    broadcasts: Vec<Broadcast>,
    awareness: u32,
    /// The state machine's only source of chance.
    rng: SplitMix64,
    outbox: Vec<Outgoing>,
    seeds: Vec<SocketAddr>,
    leaving: bool,
    view_dirty: bool,
    stats: SwimStats,
}

impl Swim {
    /// A member with identity `me` (its state is set to alive), starting at time `now` (ms).
    pub fn new(config: SwimConfig, mut me: Update, seed: u64, now: u64) -> Self {
        me.state = MemberState::Alive;
        me.suspected_by = None;
        let mut rng = SplitMix64::new(seed ^ 0x5157_1a3b_0000_0001);
        let jitter = rng.below(ms(config.probe_interval).max(1));
        Self {
            next_probe_at: now + jitter,
            next_gossip_at: now + ms(config.gossip_interval),
            next_push_pull_at: now + ms(config.push_pull_interval),
            config,
            me,
            members: BTreeMap::new(),
            live: 0,
            suspects: BTreeSet::new(),
            next_reap_at: now,
            probe: None,
            probe_order: Vec::new(),
            seq: 0,
            relays: BTreeMap::new(),
            broadcasts: Vec::new(),
            awareness: 0,
            rng,
            outbox: Vec::new(),
            seeds: Vec::new(),
            leaving: false,
            view_dirty: true,
            stats: SwimStats::default(),
        }
    }

    /// This member's id.
    pub fn id(&self) -> &str {
        &self.me.id
    }

    /// This member's current incarnation.
    pub fn incarnation(&self) -> u64 {
        self.me.incarnation
    }

    /// Counters.
    pub fn stats(&self) -> SwimStats {
        self.stats
    }

    /// Every known member's latest update, this node included, sorted by id.
    pub fn updates(&self) -> Vec<Update> {
        let mut all: Vec<Update> = self.members.values().map(|r| r.update.clone()).collect();
        all.push(self.me.clone());
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// The state of member `id` as this node sees it.
    pub fn state_of(&self, id: &str) -> Option<MemberState> {
        if id == self.me.id {
            return Some(self.me.state);
        }
        self.members.get(id).map(|r| r.update.state)
    }

    /// The current view (members sorted by id), with a content epoch (see
    /// [`crate::view_of`]).
    pub fn view(&self) -> MembershipView {
        crate::view_of(self.updates())
    }

    /// The view, if it changed since the last call.
    pub fn take_view_change(&mut self) -> Option<MembershipView> {
        if !self.view_dirty {
            return None;
        }
        self.view_dirty = false;
        Some(self.view())
    }

    /// Messages to send now.
    pub fn drain_outgoing(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.outbox)
    }

    /// Starts joining through `seeds` (gossip addresses): a push-pull with each. The seeds
    /// are remembered and tried again at each push-pull round while they are not members,
    /// so a partition or a restart of every member heals.
    pub fn join(&mut self, seeds: &[SocketAddr], now: u64) {
        // Announce this member through gossip too, not only through the seeds' push-pull
        // (memberlist does the same): members learn of it from whoever it talks to.
        if !self.broadcasts.iter().any(|b| b.update.id == self.me.id) {
            self.enqueue_broadcast(self.me.clone());
        }
        self.seeds = seeds
            .iter()
            .copied()
            .filter(|s| *s != self.me.addrs.gossip)
            .collect();
        let targets = self.seeds.clone();
        for to in targets {
            self.push_pull(to, false, now);
        }
    }

    /// Leaves gracefully: announces `left` at a higher incarnation to a few members now
    /// (and to everyone through gossip), and stops probing.
    pub fn leave(&mut self, now: u64) {
        self.leaving = true;
        self.me.incarnation += 1;
        self.me.state = MemberState::Left;
        self.view_dirty = true;
        self.enqueue_broadcast(self.me.clone());
        let mut targets = self.live_others();
        self.rng.shuffle(&mut targets);
        for id in targets
            .into_iter()
            .take(self.config.gossip_nodes.max(1) * 2)
        {
            if let Some(addr) = self.members.get(&id).map(|r| r.update.addrs.gossip) {
                self.send(addr, Body::Gossip, now);
            }
        }
    }

    /// Announces a new address (or weight) for this node at a higher incarnation.
    pub fn update_identity(&mut self, addrs: Addrs, weight: u32) {
        self.me.addrs = addrs;
        self.me.weight = weight;
        self.me.incarnation += 1;
        self.view_dirty = true;
        self.enqueue_broadcast(self.me.clone());
    }

    /// The latest time `tick` should be called next.
    pub fn next_wakeup(&self) -> u64 {
        // The next probe starts when none is in flight (a probe stretched by a rise in
        // awareness can outlast `next_probe_at`); the one in flight has its own deadlines.
        let next_probe = if self.probe.is_some() {
            u64::MAX
        } else {
            self.next_probe_at
        };
        let mut t = next_probe
            .min(self.next_gossip_at)
            .min(self.next_push_pull_at);
        if let Some(p) = &self.probe {
            let scale = u64::from(self.awareness + 1);
            if !p.acked && !p.indirect_sent {
                t = t.min(p.sent_at + ms(self.config.probe_timeout) * scale);
            }
            t = t.min(p.sent_at + ms(self.config.probe_interval) * scale);
        }
        for id in &self.suspects {
            if let Some(deadline) = self
                .members
                .get(id)
                .and_then(|r| self.suspicion_deadline(r))
            {
                t = t.min(deadline);
            }
        }
        t.min(self.next_reap_at)
    }

    fn live_others(&self) -> Vec<String> {
        self.members
            .values()
            .filter(|r| r.update.state.owns_keys())
            .map(|r| r.update.id.clone())
            .collect()
    }

    fn n(&self) -> usize {
        1 + self.live
    }

    /// The push-pull period for the current size (memberlist's `pushPullScale`).
    fn push_pull_period(&self) -> u64 {
        const THRESHOLD: f64 = 32.0;
        let base = ms(self.config.push_pull_interval);
        let n = self.n() as f64;
        if n <= THRESHOLD {
            return base;
        }
        let mult = (n.log2() - THRESHOLD.log2()).ceil() + 1.0;
        base.saturating_mul(mult as u64)
    }

    fn retransmit_limit(&self) -> u32 {
        let n = self.n() as f64;
        self.config.retransmit_mult * ((n + 1.0).log10().ceil().max(1.0) as u32)
    }

    /// Lifeguard's suspicion timeout for a member with `confirmations` independent
    /// suspicions.
    fn suspicion_timeout(&self, confirmations: usize) -> u64 {
        let n = self.n().max(1) as f64;
        let min = f64::from(self.config.suspicion_mult)
            * n.log10().max(1.0)
            * ms(self.config.probe_interval) as f64;
        let max = f64::from(self.config.suspicion_max_mult) * min;
        // Confirmations expected before the minimum applies: memberlist's
        // `suspicion_mult - 2`, none when too few members could confirm.
        let k = self.config.suspicion_mult.saturating_sub(2) as usize;
        if k == 0 || self.n().saturating_sub(2) < k {
            return min as u64;
        }
        let c = confirmations as f64;
        let frac = ((c + 1.0).ln() / (k as f64 + 1.0).ln()).min(1.0);
        (max - (max - min) * frac).max(min) as u64
    }

    fn suspicion_deadline(&self, r: &Record) -> Option<u64> {
        let s = r.suspicion.as_ref()?;
        Some(s.started + self.suspicion_timeout(s.confirmations.len().saturating_sub(1)))
    }

    /// Advances timers to `now`: probes, indirect probes, suspicion timeouts, gossip,
    /// push-pull, reaping.
    pub fn tick(&mut self, now: u64) {
        let scale = u64::from(self.awareness + 1);
        // The probe in flight.
        if let Some(p) = self.probe.clone() {
            if !p.acked
                && !p.indirect_sent
                && now >= p.sent_at + ms(self.config.probe_timeout) * scale
            {
                self.indirect_probe(&p, now);
            }
            if now >= p.sent_at + ms(self.config.probe_interval) * scale {
                self.probe = None;
                if p.acked {
                    self.awareness = self.awareness.saturating_sub(1);
                } else {
                    self.awareness = (self.awareness + 1).min(self.config.awareness_max);
                    self.suspect(&p.target, now);
                }
            }
        }
        if self.probe.is_none() && now >= self.next_probe_at {
            if !self.leaving {
                self.start_probe(now);
            }
            self.next_probe_at =
                now + ms(self.config.probe_interval) * u64::from(self.awareness + 1);
        }
        // Suspicions that ran out. A death lowers n, which shortens the other suspicion
        // timeouts: repeat until none is due.
        loop {
            let expired: Vec<String> = self
                .suspects
                .iter()
                .filter_map(|id| self.members.get(id))
                .filter(|r| self.suspicion_deadline(r).is_some_and(|d| now >= d))
                .map(|r| r.update.id.clone())
                .collect();
            if expired.is_empty() {
                break;
            }
            self.declare_dead(expired, now);
        }
        // Gossip pending updates.
        if now >= self.next_gossip_at {
            self.next_gossip_at = now + ms(self.config.gossip_interval);
            if !self.broadcasts.is_empty() {
                // Only members that can pass the news on: a dead member would waste one
                // of an update's few transmissions.
                let mut targets: Vec<SocketAddr> = self
                    .members
                    .values()
                    .filter(|r| r.update.state.owns_keys())
                    .map(|r| r.update.addrs.gossip)
                    .collect();
                self.rng.shuffle(&mut targets);
                for to in targets.into_iter().take(self.config.gossip_nodes) {
                    self.send(to, Body::Gossip, now);
                }
            }
        }
        // Push-pull with one member (or a seed that is not a member).
        if now >= self.next_push_pull_at {
            self.next_push_pull_at = now + self.push_pull_period();
            let mut candidates: Vec<SocketAddr> = self
                .members
                .values()
                .filter(|r| r.update.state != MemberState::Left)
                .map(|r| r.update.addrs.gossip)
                .collect();
            let known: BTreeSet<SocketAddr> = self
                .members
                .values()
                .filter(|r| r.update.state.owns_keys())
                .map(|r| r.update.addrs.gossip)
                .collect();
            candidates.extend(self.seeds.iter().filter(|s| !known.contains(s)));
            if !candidates.is_empty() && !self.leaving {
                let to = candidates[self.rng.index(candidates.len())];
                self.push_pull(to, false, now);
            }
        }
        // Forget the long dead (once a probe period: it walks every member), and stale
        // relays. Only dead and left members go, so `live` and `suspects` do not change.
        if now >= self.next_reap_at {
            self.next_reap_at = now + ms(self.config.probe_interval).max(1);
            let reap = ms(self.config.reap_after);
            let before = self.members.len();
            self.members
                .retain(|_, r| r.update.state.owns_keys() || now.saturating_sub(r.since) < reap);
            if self.members.len() != before {
                self.view_dirty = true;
            }
            self.relays.retain(|_, r| r.expires > now);
            debug_assert_eq!(
                self.live,
                self.members
                    .values()
                    .filter(|r| r.update.state.owns_keys())
                    .count()
            );
        }
        debug_assert!(
            self.next_wakeup() > now,
            "tick must move every timer past now ({now}): probe {} gossip {} push-pull {} probe in flight {:?} suspicions {:?}",
            self.next_probe_at,
            self.next_gossip_at,
            self.next_push_pull_at,
            self.probe,
            self.members
                .values()
                .filter_map(|r| self.suspicion_deadline(r).map(|d| (
                    r.update.id.clone(),
                    r.update.state,
                    d
                )))
                .collect::<Vec<_>>()
        );
    }

    fn declare_dead(&mut self, ids: Vec<String>, now: u64) {
        for id in ids {
            if let Some(r) = self.members.get(&id) {
                let mut dead = r.update.clone();
                let started = r.suspicion.as_ref().map_or(now, |s| s.started);
                dead.state = MemberState::Dead;
                dead.suspected_by = None;
                self.stats.deaths += 1;
                self.stats.suspicion_to_dead_ms += now.saturating_sub(started);
                self.apply(dead, now);
            }
        }
    }

    fn start_probe(&mut self, now: u64) {
        // Round-robin over a shuffled list, reshuffled each full pass (SWIM's bounded
        // detection time: every member is probed once per pass).
        loop {
            if self.probe_order.is_empty() {
                self.probe_order = self.live_others();
                self.rng.shuffle(&mut self.probe_order);
                if self.probe_order.is_empty() {
                    return;
                }
            }
            let id = self.probe_order.pop().expect("not empty");
            let Some(r) = self.members.get(&id) else {
                continue;
            };
            if !r.update.state.owns_keys() {
                continue;
            }
            self.seq += 1;
            let p = Probe {
                target: id.clone(),
                target_addr: r.update.addrs.gossip,
                seq: self.seq,
                sent_at: now,
                indirect_sent: false,
                acked: false,
            };
            self.stats.probes += 1;
            self.send(
                p.target_addr,
                Body::Ping {
                    seq: p.seq,
                    target: id,
                },
                now,
            );
            self.probe = Some(p);
            return;
        }
    }

    fn indirect_probe(&mut self, p: &Probe, now: u64) {
        let mut helpers: Vec<SocketAddr> = self
            .members
            .values()
            .filter(|r| r.update.state == MemberState::Alive && r.update.id != p.target)
            .map(|r| r.update.addrs.gossip)
            .collect();
        self.rng.shuffle(&mut helpers);
        for to in helpers.into_iter().take(self.config.indirect_checks) {
            self.send(
                to,
                Body::PingReq {
                    seq: p.seq,
                    target: p.target.clone(),
                    target_addr: p.target_addr,
                },
                now,
            );
        }
        if let Some(probe) = &mut self.probe {
            probe.indirect_sent = true;
        }
    }

    /// This node's probe of `id` failed: suspect it, or — if it is already suspected at
    /// this incarnation — confirm the suspicion (Lifeguard: independent confirmations
    /// shorten the suspicion timeout).
    fn suspect(&mut self, id: &str, now: u64) {
        let Some(r) = self.members.get(id) else {
            return;
        };
        if !matches!(r.update.state, MemberState::Alive | MemberState::Suspect) {
            return;
        }
        let mut s = r.update.clone();
        s.state = MemberState::Suspect;
        s.suspected_by = Some(self.me.id.clone());
        if r.update.state == MemberState::Alive {
            self.stats.suspicions += 1;
        }
        self.apply(s, now);
    }

    fn push_pull(&mut self, to: SocketAddr, reply: bool, now: u64) {
        let msg = Message {
            from: self.me.id.clone(),
            from_addr: self.me.addrs.gossip,
            body: Body::PushPull {
                reply,
                members: self.updates(),
            },
            updates: Vec::new(),
        };
        let bytes = wire::encode(&self.config.cluster_name, &msg);
        self.count_out(bytes.len());
        self.outbox.push(Outgoing {
            to,
            bytes,
            reliable: true,
        });
        let _ = now;
    }

    fn count_out(&mut self, bytes: usize) {
        self.stats.messages_out += 1;
        self.stats.bytes_out += bytes as u64;
    }

    /// Sends `body` to `to` as a datagram, piggybacking as many pending updates as fit.
    fn send(&mut self, to: SocketAddr, body: Body, _now: u64) {
        let msg = Message {
            from: self.me.id.clone(),
            from_addr: self.me.addrs.gossip,
            body,
            updates: Vec::new(),
        };
        // Encoded once: the head, then as many pending updates (fewest-sent first) as fit
        // the datagram; an update that does not fit is cut off again and waits.
        let mut bytes = wire::encode_head(&self.config.cluster_name, &msg);
        let count_at = bytes.len();
        bytes.extend_from_slice(&[0, 0]);
        let mut count: u16 = 0;
        let limit = self.retransmit_limit();
        self.broadcasts.sort_by_key(|b| b.transmits);
        for b in &mut self.broadcasts {
            let mark = bytes.len();
            wire::put_update(&mut bytes, &b.update);
            if bytes.len() > self.config.max_datagram || usize::from(count) >= wire::MAX_MEMBERS {
                // Full: the rest wait for the next message (encoding them all only to cut
                // them off again costs O(pending) per datagram, felt at 1 000 members).
                bytes.truncate(mark);
                break;
            }
            count += 1;
            b.transmits += 1;
        }
        bytes[count_at..count_at + 2].copy_from_slice(&count.to_be_bytes());
        self.broadcasts.retain(|b| b.transmits < limit);
        self.count_out(bytes.len());
        self.outbox.push(Outgoing {
            to,
            bytes,
            reliable: false,
        });
    }

    fn enqueue_broadcast(&mut self, update: Update) {
        self.broadcasts.retain(|b| b.update.id != update.id);
        self.broadcasts.push(Broadcast {
            update,
            transmits: 0,
        });
    }

    /// Handles received bytes. A refused message changes nothing and is counted.
    pub fn handle_message(&mut self, bytes: &[u8], now: u64) -> Result<(), DecodeError> {
        let msg = decode_counted(&self.config.cluster_name, bytes, &mut self.stats)?;
        for u in msg.updates {
            self.apply(u, now);
        }
        match msg.body {
            Body::Ping { seq, target } => {
                if target == self.me.id {
                    self.send(msg.from_addr, Body::Ack { seq }, now);
                }
            }
            Body::Ack { seq } => {
                if let Some(p) = &mut self.probe
                    && p.seq == seq
                {
                    p.acked = true;
                }
                if let Some(relay) = self.relays.remove(&seq) {
                    self.send(
                        relay.origin,
                        Body::Ack {
                            seq: relay.origin_seq,
                        },
                        now,
                    );
                }
            }
            Body::PingReq {
                seq,
                target,
                target_addr,
            } => {
                self.seq += 1;
                let ours = self.seq;
                self.relays.insert(
                    ours,
                    Relay {
                        origin: msg.from_addr,
                        origin_seq: seq,
                        expires: now + ms(self.config.probe_interval) * 2,
                    },
                );
                self.send(target_addr, Body::Ping { seq: ours, target }, now);
            }
            Body::PushPull { reply, members } => {
                for u in members {
                    self.apply(u, now);
                }
                if !reply {
                    self.push_pull(msg.from_addr, true, now);
                }
            }
            Body::Gossip => {}
        }
        Ok(())
    }

    /// Merges one update by the precedence rules; refutes what is said about this node.
    fn apply(&mut self, u: Update, now: u64) {
        if u.id == self.me.id {
            self.about_me(&u);
            return;
        }
        let existing = self.members.get(&u.id);
        let newer = match existing {
            None => {
                // Only living members are learned from hearsay; a dead or suspect stranger
                // is not worth remembering.
                if u.state != MemberState::Alive {
                    return;
                }
                true
            }
            Some(r) => {
                u.incarnation > r.update.incarnation
                    || (u.incarnation == r.update.incarnation
                        && rank(u.state) > rank(r.update.state))
            }
        };
        if !newer {
            // The same suspicion from another member is a confirmation (Lifeguard).
            if let (Some(r), MemberState::Suspect, Some(by)) = (
                self.members.get_mut(&u.id),
                u.state,
                u.suspected_by.as_ref(),
            ) && r.update.state == MemberState::Suspect
                && r.update.incarnation == u.incarnation
                && let Some(s) = &mut r.suspicion
                && s.confirmations.insert(by.clone())
            {
                // Re-gossip a new confirmation so others can count it too.
                let again = u.clone();
                self.enqueue_broadcast(again);
            }
            return;
        }
        let state_changed = existing.is_none_or(|r| r.update.state != u.state);
        let addr_changed =
            existing.is_some_and(|r| r.update.addrs != u.addrs || r.update.weight != u.weight);
        let suspicion = (u.state == MemberState::Suspect).then(|| Suspicion {
            started: now,
            confirmations: u.suspected_by.iter().cloned().collect(),
        });
        let since = if state_changed {
            now
        } else {
            existing.map_or(now, |r| r.since)
        };
        if existing.is_none() {
            // A new member joins the current probe pass at a random place.
            let at = self.rng.index(self.probe_order.len() + 1);
            self.probe_order.insert(at, u.id.clone());
        }
        let was_live = existing.is_some_and(|r| r.update.state.owns_keys());
        if was_live != u.state.owns_keys() {
            if was_live {
                self.live -= 1;
            } else {
                self.live += 1;
            }
        }
        if u.state == MemberState::Suspect {
            self.suspects.insert(u.id.clone());
        } else {
            self.suspects.remove(&u.id);
        }
        self.members.insert(
            u.id.clone(),
            Record {
                update: u.clone(),
                since,
                suspicion,
            },
        );
        if state_changed || addr_changed {
            self.view_dirty = true;
        }
        self.enqueue_broadcast(u);
    }

    /// Someone says something about this node: refute suspicion and death (unless leaving)
    /// by announcing itself alive at a higher incarnation.
    fn about_me(&mut self, u: &Update) {
        if self.leaving {
            return;
        }
        let threatening = u.state != MemberState::Alive && u.incarnation >= self.me.incarnation;
        let stale_alive = u.state == MemberState::Alive && u.incarnation > self.me.incarnation;
        if threatening || stale_alive {
            self.me.incarnation = u.incarnation + 1;
            if threatening {
                self.stats.refutations += 1;
                // Being suspected is a sign this node is the slow one (Lifeguard).
                self.awareness = (self.awareness + 1).min(self.config.awareness_max);
            }
            self.enqueue_broadcast(self.me.clone());
            self.view_dirty = true;
        }
    }
}

impl crate::Protocol for Swim {
    fn handle_message(&mut self, bytes: &[u8], now: u64) -> Result<(), DecodeError> {
        Swim::handle_message(self, bytes, now)
    }

    fn tick(&mut self, now: u64) {
        Swim::tick(self, now);
    }

    fn next_wakeup(&self) -> u64 {
        Swim::next_wakeup(self)
    }

    fn drain_outgoing(&mut self) -> Vec<Outgoing> {
        Swim::drain_outgoing(self)
    }

    fn take_view_change(&mut self) -> Option<MembershipView> {
        Swim::take_view_change(self)
    }

    fn view(&self) -> MembershipView {
        Swim::view(self)
    }

    fn join(&mut self, seeds: &[SocketAddr], now: u64) {
        Swim::join(self, seeds, now);
    }

    fn leave(&mut self, now: u64) {
        Swim::leave(self, now);
    }

    fn stats(&self) -> SwimStats {
        Swim::stats(self)
    }
}
