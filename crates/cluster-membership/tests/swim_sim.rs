//! SWIM over a simulated network: a discrete-event loop that delivers messages with a
//! random delay, loses datagrams, partitions, pauses and kills members — all from one seed,
//! so a run replays exactly. Time is simulated milliseconds; nothing sleeps.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;

use cache_types::MemberState;
use cluster_membership::SplitMix64;
use cluster_membership::swim::{Addrs, Outgoing, Swim, SwimConfig, Update};

fn addr(i: usize) -> SocketAddr {
    let port = 10_000 + u16::try_from(i).expect("small cluster");
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn identity(i: usize) -> Update {
    Update {
        id: format!("m{i:03}"),
        addrs: Addrs {
            gossip: addr(i),
            rpc: SocketAddr::from(([127, 0, 0, 2], 7000)),
            peer: SocketAddr::from(([127, 0, 0, 2], 7100)),
        },
        weight: 1,
        incarnation: 0,
        state: MemberState::Alive,
        suspected_by: None,
    }
}

/// A message in flight.
type InFlight = Reverse<(u64, u64, usize, Vec<u8>)>;

struct Net {
    nodes: Vec<Option<Swim>>,
    /// Each node's `next_wakeup`, cached: it changes only when the node handles a message
    /// or ticks, and reading it for every node at every event is what would make 1 000
    /// members slow.
    wake: Vec<u64>,
    paused: Vec<bool>,
    /// Group of each member while partitioned; messages between groups are lost.
    groups: Option<Vec<u8>>,
    loss_per_mille: u64,
    queue: BinaryHeap<InFlight>,
    seq: u64,
    rng: SplitMix64,
    now: u64,
    config: SwimConfig,
}

impl Net {
    fn new(n: usize, seed: u64) -> Self {
        Self {
            nodes: (0..n).map(|_| None).collect(),
            wake: vec![u64::MAX; n],
            paused: vec![false; n],
            groups: None,
            loss_per_mille: 0,
            queue: BinaryHeap::new(),
            seq: 0,
            rng: SplitMix64::new(seed),
            now: 0,
            config: SwimConfig::default(),
        }
    }

    /// Starts member `i` (fresh state, incarnation 0) and joins it through member `seed`.
    fn start(&mut self, i: usize, seed: Option<usize>) {
        let mut swim = Swim::new(
            self.config.clone(),
            identity(i),
            self.rng.next_u64(),
            self.now,
        );
        if let Some(s) = seed {
            swim.join(&[addr(s)], self.now);
        }
        self.nodes[i] = Some(swim);
        self.flush(i);
    }

    fn index_of(addr: SocketAddr) -> usize {
        usize::from(addr.port() - 10_000)
    }

    fn flush(&mut self, from: usize) {
        let Some(node) = self.nodes[from].as_mut() else {
            self.wake[from] = u64::MAX;
            return;
        };
        self.wake[from] = node.next_wakeup();
        let out: Vec<Outgoing> = node.drain_outgoing();
        for o in out {
            let to = Self::index_of(o.to);
            if let Some(groups) = &self.groups
                && groups[from] != groups[to]
            {
                continue;
            }
            if !o.reliable && self.loss_per_mille > 0 && self.rng.below(1000) < self.loss_per_mille
            {
                continue;
            }
            let delay = 1 + self.rng.below(5);
            self.seq += 1;
            self.queue
                .push(Reverse((self.now + delay, self.seq, to, o.bytes)));
        }
    }

    /// Runs the simulation until `until` (ms).
    fn run_until(&mut self, until: u64) {
        loop {
            let next_msg = self.queue.peek().map(|Reverse((t, ..))| *t);
            let next_tick = self
                .wake
                .iter()
                .enumerate()
                .filter(|(i, _)| !self.paused[*i])
                .map(|(_, w)| *w)
                .filter(|w| *w != u64::MAX)
                .min();
            let next = match (next_msg, next_tick) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) => a,
                (None, Some(b)) => b,
                (None, None) => until,
            }
            .max(self.now);
            if next > until {
                self.now = until;
                return;
            }
            self.now = next;
            while let Some(Reverse((t, ..))) = self.queue.peek() {
                if *t > self.now {
                    break;
                }
                let Reverse((_, _, to, bytes)) = self.queue.pop().expect("peeked");
                if self.paused[to] {
                    continue; // a stopped process reads nothing; the datagram is lost
                }
                if let Some(node) = self.nodes[to].as_mut() {
                    node.handle_message(&bytes, self.now).expect("well-formed");
                    self.flush(to);
                }
            }
            for i in 0..self.nodes.len() {
                if self.paused[i] || self.wake[i] > self.now {
                    continue;
                }
                if let Some(node) = self.nodes[i].as_mut() {
                    node.tick(self.now);
                }
                self.flush(i); // also clears the wake-up of a killed node
            }
        }
    }

    /// Runs until `check` holds (checked every 100 ms) or `limit` ms pass; returns when.
    fn run_until_true(&mut self, limit: u64, mut check: impl FnMut(&Net) -> bool) -> Option<u64> {
        let start = self.now;
        while self.now < start + limit {
            if check(self) {
                return Some(self.now - start);
            }
            let t = self.now + 100;
            self.run_until(t);
        }
        check(self).then(|| self.now - start)
    }

    fn live(&self) -> impl Iterator<Item = (usize, &Swim)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
    }

    /// Whether every running member sees member `j` in `states` (absent counts as `Dead`).
    fn all_see(&self, j: usize, states: &[MemberState]) -> bool {
        let id = identity(j).id;
        self.live().filter(|(i, _)| *i != j).all(|(_, n)| {
            let s = n.state_of(&id).unwrap_or(MemberState::Dead);
            states.contains(&s)
        })
    }

    fn all_alive(&self, members: impl Iterator<Item = usize> + Clone) -> bool {
        self.live().all(|(_, n)| {
            members
                .clone()
                .all(|j| n.state_of(&identity(j).id) == Some(MemberState::Alive))
        })
    }
}

/// What [`grow_and_join`] measured.
struct Growth {
    converged_ms: u64,
    bytes_per_s_per_member: f64,
    join_ms: u64,
}

/// Starts `n` members, every one joining through member 0; waits until all see all alive;
/// lets the join traffic settle for `settle_ms`, then measures steady-state bandwidth over
/// `window_ms`; then starts one more member (joining through member `n / 2`) and times how
/// long until every member sees it alive.
fn grow_and_join(n: usize, seed: u64, settle_ms: u64, window_ms: u64) -> Growth {
    let mut net = Net::new(n + 1, seed);
    net.start(0, None);
    for i in 1..n {
        net.start(i, Some(0));
    }
    let converged_ms = net
        .run_until_true(120_000, |net| net.all_alive(0..n))
        .unwrap_or_else(|| panic!("seed {seed}: {n} members converge within 120 s"));
    net.run_until(net.now + settle_ms);
    let before: u64 = net.live().map(|(_, m)| m.stats().bytes_out).sum();
    net.run_until(net.now + window_ms);
    let after: u64 = net.live().map(|(_, m)| m.stats().bytes_out).sum();
    let bytes_per_s_per_member = (after - before) as f64 * 1000.0 / n as f64 / window_ms as f64;
    net.start(n, Some(n / 2));
    let join_ms = net
        .run_until_true(60_000, |net| net.all_see(n, &[MemberState::Alive]))
        .unwrap_or_else(|| panic!("seed {seed}: a join reaches all {n} members within 60 s"));
    Growth {
        converged_ms,
        bytes_per_s_per_member,
        join_ms,
    }
}

#[test]
fn a_hundred_members_converge_after_joining_through_one_seed() {
    let g = grow_and_join(100, 1, 0, 60_000);
    let periods = g.converged_ms / 500;
    eprintln!(
        "100 members: converged in {} ms ({periods} protocol periods); steady state {:.0} \
         bytes/s sent per member; a 101st member reached everyone in {} ms",
        g.converged_ms, g.bytes_per_s_per_member, g.join_ms
    );
    assert!(periods <= 40, "{periods} periods");
    // A join spreads by gossip in O(log n) periods; 100 checks are 100 ms apart.
    assert!(g.join_ms <= 10_000, "join took {} ms", g.join_ms);
}

/// The 1 000-member measurement for `docs/benchmarks.md` (about 1.5 minutes in release):
/// `cargo test --release -p cluster-membership --test swim_sim -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, run by hand in release"]
fn a_thousand_members_converge_and_a_join_reaches_everyone() {
    // Settle a minute (each of the 1 000 joins is retransmitted ~16 times by every member),
    // then measure one push-pull period (90 s at this size).
    let g = grow_and_join(1000, 7, 60_000, 90_000);
    eprintln!(
        "1000 members: converged in {} ms ({} protocol periods); steady state {:.0} bytes/s \
         sent per member; a 1001st member reached everyone in {} ms",
        g.converged_ms,
        g.converged_ms / 500,
        g.bytes_per_s_per_member,
        g.join_ms
    );
    assert!(g.join_ms <= 20_000, "join took {} ms", g.join_ms);
}

#[test]
fn a_killed_member_is_declared_dead_by_every_other_member() {
    for seed in 0..5 {
        let mut net = Net::new(10, seed);
        net.start(0, None);
        for i in 1..10 {
            net.start(i, Some(0));
        }
        net.run_until_true(30_000, |n| n.all_alive(0..10))
            .expect("converged");
        net.nodes[3] = None;
        let took = net
            .run_until_true(30_000, |n| n.all_see(3, &[MemberState::Dead]))
            .expect("declared dead");
        eprintln!("seed {seed}: member killed, every other member saw it dead after {took} ms");
        assert!(took <= 10_000, "seed {seed}: {took} ms");
        for j in (0..10).filter(|j| *j != 3) {
            assert!(
                net.all_see(j, &[MemberState::Alive]),
                "seed {seed}: m{j} is not alive everywhere"
            );
        }
    }
}

#[test]
fn ten_percent_loss_for_ten_minutes_never_kills_a_live_member() {
    let mut net = Net::new(20, 7);
    net.start(0, None);
    for i in 1..20 {
        net.start(i, Some(0));
    }
    net.run_until_true(30_000, |n| n.all_alive(0..20))
        .expect("converged");
    net.loss_per_mille = 100;
    let end = net.now + 600_000;
    let mut suspicions = 0;
    while net.now < end {
        net.run_until(net.now + 1000);
        for j in 0..20 {
            assert!(
                net.all_see(j, &[MemberState::Alive, MemberState::Suspect]),
                "m{j} declared dead at {} ms with 10 % loss",
                net.now
            );
        }
        suspicions = net.live().map(|(_, n)| n.stats().suspicions).sum::<u64>();
    }
    eprintln!(
        "10 % loss, 10 min, 20 members: {suspicions} suspicions, all refuted, no false death"
    );
}

#[test]
fn a_partition_is_detected_and_heals() {
    let mut net = Net::new(10, 3);
    net.start(0, None);
    for i in 1..10 {
        net.start(i, Some(0));
    }
    net.run_until_true(30_000, |n| n.all_alive(0..10))
        .expect("converged");
    net.groups = Some((0..10).map(|i| u8::from(i >= 5)).collect());
    net.run_until(net.now + 60_000);
    for viewer in 0..5 {
        for j in 5..10 {
            let s = net.nodes[viewer]
                .as_ref()
                .and_then(|n| n.state_of(&identity(j).id))
                .unwrap_or(MemberState::Dead);
            assert_ne!(
                s,
                MemberState::Alive,
                "m{viewer} still sees m{j} alive across the partition"
            );
        }
    }
    net.groups = None;
    let took = net
        .run_until_true(120_000, |n| n.all_alive(0..10))
        .expect("views merge after healing");
    eprintln!("partition healed: all views alive again after {took} ms");
}

#[test]
fn a_paused_member_refutes_its_suspicion_when_it_comes_back() {
    let mut net = Net::new(8, 11);
    net.start(0, None);
    for i in 1..8 {
        net.start(i, Some(0));
    }
    net.run_until_true(30_000, |n| n.all_alive(0..8))
        .expect("converged");
    let before = net.nodes[5]
        .as_ref()
        .map(Swim::incarnation)
        .expect("running");
    net.paused[5] = true;
    net.run_until_true(10_000, |n| {
        n.all_see(5, &[MemberState::Suspect, MemberState::Dead])
    })
    .expect("suspected while paused");
    net.paused[5] = false;
    net.run_until_true(60_000, |n| n.all_alive(0..8))
        .expect("alive again");
    let after = net.nodes[5]
        .as_ref()
        .map(Swim::incarnation)
        .expect("running");
    assert!(
        after > before,
        "refuted with a higher incarnation ({before} -> {after})"
    );
    assert!(net.nodes[5].as_ref().expect("running").stats().refutations >= 1);
}

#[test]
fn a_restarted_member_rejoins_with_a_higher_incarnation() {
    let mut net = Net::new(8, 13);
    net.start(0, None);
    for i in 1..8 {
        net.start(i, Some(0));
    }
    net.run_until_true(30_000, |n| n.all_alive(0..8))
        .expect("converged");
    net.nodes[4] = None;
    net.run_until_true(30_000, |n| n.all_see(4, &[MemberState::Dead]))
        .expect("dead");
    // Same id, fresh state (incarnation 0), joining through another member.
    net.start(4, Some(1));
    let took = net
        .run_until_true(60_000, |n| n.all_alive(0..8))
        .expect("rejoined");
    eprintln!("restarted member alive everywhere after {took} ms");
}

#[test]
fn a_leaving_member_is_seen_left_and_then_forgotten() {
    let mut net = Net::new(6, 17);
    net.start(0, None);
    for i in 1..6 {
        net.start(i, Some(0));
    }
    net.run_until_true(30_000, |n| n.all_alive(0..6))
        .expect("converged");
    let now = net.now;
    net.nodes[2].as_mut().expect("running").leave(now);
    net.flush(2);
    net.run_until_true(5_000, |n| n.all_see(2, &[MemberState::Left]))
        .expect("everyone sees the leave within 5 s");
    net.nodes[2] = None;
    net.run_until(net.now + 40_000);
    for (_, n) in net.live() {
        assert_eq!(n.state_of(&identity(2).id), None, "reaped after reap_after");
        assert_eq!(n.stats().deaths, 0, "a leave is not a death");
    }
}

#[test]
fn a_member_can_change_its_address() {
    let mut net = Net::new(4, 19);
    net.start(0, None);
    for i in 1..4 {
        net.start(i, Some(0));
    }
    net.run_until_true(30_000, |n| n.all_alive(0..4))
        .expect("converged");
    let mut addrs = identity(3).addrs;
    addrs.rpc = SocketAddr::from(([127, 0, 0, 3], 9000));
    net.nodes[3]
        .as_mut()
        .expect("running")
        .update_identity(addrs, 2);
    net.run_until_true(10_000, |n| {
        n.live().all(|(_, s)| {
            s.view()
                .member(&identity(3).id)
                .is_some_and(|m| m.rpc_addr == addrs.rpc && m.weight == 2)
        })
    })
    .expect("the new address reaches everyone");
}

#[test]
fn other_clusters_and_garbage_are_refused() {
    let mut a = Swim::new(SwimConfig::default(), identity(0), 1, 0);
    let mut other = Swim::new(
        SwimConfig {
            cluster_name: "other".into(),
            ..SwimConfig::default()
        },
        identity(1),
        2,
        0,
    );
    other.join(&[addr(0)], 0);
    for o in other.drain_outgoing() {
        assert!(a.handle_message(&o.bytes, 1).is_err());
    }
    assert!(a.handle_message(b"\x00\x01garbage", 1).is_err());
    assert_eq!(a.stats().messages_refused, 2);
    assert_eq!(a.view().members.len(), 1, "nothing was learned");
}

#[test]
fn members_that_agree_report_the_same_epoch() {
    let mut net = Net::new(5, 23);
    net.start(0, None);
    for i in 1..5 {
        net.start(i, Some(0));
    }
    net.run_until_true(30_000, |n| n.all_alive(0..5))
        .expect("converged");
    let epochs: Vec<u64> = net.live().map(|(_, n)| n.view().epoch).collect();
    assert!(epochs.windows(2).all(|w| w[0] == w[1]), "{epochs:?}");
    net.nodes[2] = None;
    net.run_until_true(30_000, |n| n.all_see(2, &[MemberState::Dead]))
        .expect("dead");
    let after: Vec<u64> = net.live().map(|(_, n)| n.view().epoch).collect();
    assert!(after.windows(2).all(|w| w[0] == w[1]), "{after:?}");
    assert_ne!(after[0], epochs[0], "a ring change changes the epoch");
}

mod hostile_input {
    use cluster_membership::swim::wire::{decode, encode};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// The gossip decoder on arbitrary datagrams (bounded for CI; the unbounded run is the
        /// `gossip_decode` fuzz target): never panics, and what decodes re-encodes.
        #[test]
        fn arbitrary_datagrams_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1500)) {
            if let Ok(msg) = decode("c", &bytes) {
                prop_assert!(decode("c", &encode("c", &msg)).is_ok());
            }
        }
    }
}
