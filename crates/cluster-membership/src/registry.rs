//! Coordinator membership as a sans-I/O state machine: one designated node keeps the
//! registry; the others register, heartbeat, and take the list it broadcasts.
//!
//! It reuses the gossip wire format (a heartbeat is a push-pull carrying the member's own
//! record; the coordinator's broadcast is a push-pull reply carrying every record) and the
//! same runtime ([`crate::gossip`]). It is simpler than SWIM and easy to reason about — one
//! source of truth — but the coordinator is a **single point of failure**: while it is down
//! nobody learns of joins or deaths, and every member keeps its last view (and says so in
//! its log, on `/status` and in `cache_coordinator_up`). Gossip has no such point.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use cache_types::MemberState;

use crate::swim::wire::{self, Body, Message, Update};
use crate::swim::{Outgoing, SwimStats};
use crate::{MembershipView, Protocol};

/// Settings of coordinator membership.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Messages from another cluster name are refused.
    pub cluster_name: String,
    /// How often members heartbeat (and the coordinator re-sends the list).
    pub heartbeat_interval: Duration,
    /// A member silent this long is marked dead (by the coordinator); a coordinator silent
    /// this long is reported unreachable (by the members).
    pub dead_after: Duration,
    /// Dead and left members are forgotten after this.
    pub reap_after: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            cluster_name: "cache-cluster".into(),
            heartbeat_interval: Duration::from_millis(500),
            dead_after: Duration::from_secs(3),
            reap_after: Duration::from_secs(30),
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One member of coordinator membership (the coordinator, or a registered member).
#[derive(Debug)]
pub struct Registry {
    config: RegistryConfig,
    me: Update,
    /// `None`: this node is the coordinator.
    coordinator: Option<SocketAddr>,
    /// The list: the coordinator's registry, or a member's copy of it. Excludes `me`.
    members: BTreeMap<String, (Update, u64)>,
    next_heartbeat_at: u64,
    /// When the coordinator's list last arrived (members only).
    last_list_at: Option<u64>,
    coordinator_up: bool,
    leaving: bool,
    outbox: Vec<Outgoing>,
    view_dirty: bool,
    stats: SwimStats,
}

impl Registry {
    /// The coordinator (`coordinator: None`) or a member registering with the coordinator
    /// at that gossip address.
    pub fn new(
        config: RegistryConfig,
        mut me: Update,
        coordinator: Option<SocketAddr>,
        now: u64,
    ) -> Self {
        me.state = MemberState::Alive;
        me.suspected_by = None;
        Self {
            config,
            me,
            coordinator,
            members: BTreeMap::new(),
            next_heartbeat_at: now,
            last_list_at: None,
            coordinator_up: coordinator.is_none(),
            leaving: false,
            outbox: Vec::new(),
            view_dirty: true,
            stats: SwimStats::default(),
        }
    }

    fn list(&self) -> Vec<Update> {
        let mut all: Vec<Update> = self.members.values().map(|(u, _)| u.clone()).collect();
        all.push(self.me.clone());
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    fn push(&mut self, to: SocketAddr, reply: bool, members: Vec<Update>) {
        let msg = Message {
            from: self.me.id.clone(),
            from_addr: self.me.addrs.gossip,
            body: Body::PushPull { reply, members },
            updates: Vec::new(),
        };
        let bytes = wire::encode(&self.config.cluster_name, &msg);
        self.stats.messages_out += 1;
        self.stats.bytes_out += bytes.len() as u64;
        self.outbox.push(Outgoing {
            to,
            bytes,
            reliable: true,
        });
    }

    /// The coordinator sends the whole list to every member it believes alive.
    fn broadcast(&mut self) {
        let list = self.list();
        let targets: Vec<SocketAddr> = self
            .members
            .values()
            .filter(|(u, _)| u.state == MemberState::Alive)
            .map(|(u, _)| u.addrs.gossip)
            .collect();
        for to in targets {
            self.push(to, true, list.clone());
        }
    }

    fn set_state(&mut self, id: &str, state: MemberState, now: u64) {
        if let Some((u, seen)) = self.members.get_mut(id)
            && u.state != state
        {
            u.state = state;
            *seen = now;
            self.view_dirty = true;
        }
    }
}

impl Protocol for Registry {
    fn handle_message(&mut self, bytes: &[u8], now: u64) -> Result<(), wire::DecodeError> {
        let msg = crate::swim::decode_counted(&self.config.cluster_name, bytes, &mut self.stats)?;
        let Body::PushPull { reply, members } = msg.body else {
            return Ok(()); // coordinator membership uses push-pull only
        };
        if self.coordinator.is_none() {
            // A heartbeat (or a leave): the sender's own record.
            if reply {
                return Ok(());
            }
            let Some(u) = members.into_iter().find(|u| u.id == msg.from) else {
                return Ok(());
            };
            if u.id == self.me.id {
                return Ok(());
            }
            let changed = self.members.get(&u.id).is_none_or(|(old, _)| {
                old.state != u.state || old.addrs != u.addrs || old.weight != u.weight
            });
            let state = if u.state == MemberState::Left {
                MemberState::Left
            } else {
                MemberState::Alive
            };
            self.members.insert(
                u.id.clone(),
                (
                    Update {
                        state,
                        suspected_by: None,
                        ..u
                    },
                    now,
                ),
            );
            if changed {
                self.view_dirty = true;
                self.broadcast();
            }
        } else if reply && Some(msg.from_addr) == self.coordinator {
            // The coordinator's list replaces ours (it is the source of truth).
            let list: BTreeMap<String, (Update, u64)> = members
                .into_iter()
                .filter(|u| u.id != self.me.id)
                .map(|u| (u.id.clone(), (u, now)))
                .collect();
            let before: Vec<(String, MemberState)> = self
                .members
                .values()
                .map(|(u, _)| (u.id.clone(), u.state))
                .collect();
            let after: Vec<(String, MemberState)> = list
                .values()
                .map(|(u, _)| (u.id.clone(), u.state))
                .collect();
            if before != after {
                self.view_dirty = true;
            }
            self.members = list;
            self.last_list_at = Some(now);
            if !self.coordinator_up {
                tracing::info!("coordinator reachable again");
                self.coordinator_up = true;
            }
        }
        Ok(())
    }

    fn tick(&mut self, now: u64) {
        let interval = ms(self.config.heartbeat_interval);
        let dead_after = ms(self.config.dead_after);
        if now >= self.next_heartbeat_at {
            self.next_heartbeat_at = now + interval;
            match self.coordinator {
                Some(coordinator) if !self.leaving => {
                    self.push(coordinator, false, vec![self.me.clone()]);
                }
                Some(_) => {}
                None => self.broadcast(),
            }
        }
        match self.coordinator {
            None => {
                // Members that stopped heartbeating are dead; the long dead are forgotten.
                let silent: Vec<String> = self
                    .members
                    .values()
                    .filter(|(u, seen)| {
                        u.state == MemberState::Alive && now.saturating_sub(*seen) > dead_after
                    })
                    .map(|(u, _)| u.id.clone())
                    .collect();
                if !silent.is_empty() {
                    for id in &silent {
                        self.set_state(id, MemberState::Dead, now);
                        self.stats.deaths += 1;
                        self.stats.suspicion_to_dead_ms += dead_after;
                    }
                    self.broadcast();
                }
                let reap = ms(self.config.reap_after);
                let before = self.members.len();
                self.members.retain(|_, (u, seen)| {
                    u.state == MemberState::Alive || now.saturating_sub(*seen) < reap
                });
                if self.members.len() != before {
                    self.view_dirty = true;
                }
            }
            Some(_) => {
                let silent = self
                    .last_list_at
                    .is_none_or(|t| now.saturating_sub(t) > dead_after);
                if silent && self.coordinator_up {
                    tracing::warn!(
                        "coordinator unreachable: keeping the last member list until it is back \
                         (coordinator membership has a single point of failure; gossip does not)"
                    );
                    self.coordinator_up = false;
                }
            }
        }
    }

    fn next_wakeup(&self) -> u64 {
        self.next_heartbeat_at
    }

    fn drain_outgoing(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.outbox)
    }

    fn take_view_change(&mut self) -> Option<MembershipView> {
        if !self.view_dirty {
            return None;
        }
        self.view_dirty = false;
        Some(self.view())
    }

    fn view(&self) -> MembershipView {
        crate::view_of(self.list())
    }

    fn join(&mut self, seeds: &[SocketAddr], now: u64) {
        // The coordinator address is given at construction; the first heartbeat goes now.
        let _ = seeds;
        self.next_heartbeat_at = now;
    }

    fn leave(&mut self, now: u64) {
        self.leaving = true;
        self.me.state = MemberState::Left;
        self.me.incarnation += 1;
        self.view_dirty = true;
        match self.coordinator {
            Some(coordinator) => self.push(coordinator, false, vec![self.me.clone()]),
            None => self.broadcast(),
        }
        let _ = now;
    }

    fn stats(&self) -> SwimStats {
        self.stats
    }

    fn coordinator_up(&self) -> Option<bool> {
        Some(self.coordinator_up)
    }
}
