//! The gossip runtime over real UDP and TCP sockets on loopback: members find each other
//! through one seed, a stopped member is declared dead, a leaving one is seen left.
//! Waits poll with a deadline; nothing sleeps a fixed time to pass.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cache_types::MemberState;
use cluster_membership::swim::{Addrs, SwimConfig, Update};
use cluster_membership::{GossipConfig, GossipMembership, Membership, ProtocolConfig};

/// Member `i` of `cluster` (each test names its own, so that members of tests running at
/// the same time — which may reuse the ports of each other's stopped members — refuse each
/// other's messages instead of merging into one cluster).
fn config(cluster: &str, i: usize, join: Vec<String>) -> GossipConfig {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    GossipConfig {
        identity: Update {
            id: format!("g{i}"),
            addrs: Addrs {
                gossip: any,
                rpc: SocketAddr::from(([127, 0, 0, 1], 7000)),
                peer: SocketAddr::from(([127, 0, 0, 1], 7100)),
            },
            weight: 1,
            incarnation: 0,
            state: MemberState::Alive,
            suspected_by: None,
        },
        bind: any,
        join,
        keyring: None,
        protocol: ProtocolConfig::Swim(SwimConfig {
            cluster_name: cluster.into(),
            probe_interval: Duration::from_millis(300),
            probe_timeout: Duration::from_millis(150),
            gossip_interval: Duration::from_millis(50),
            ..SwimConfig::default()
        }),
    }
}

async fn wait_for(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < deadline,
            "{what}: not within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

fn states(m: &GossipMembership) -> Vec<(String, MemberState)> {
    m.view()
        .borrow()
        .members
        .iter()
        .map(|x| (x.id.clone(), x.state))
        .collect()
}

fn sees(m: &GossipMembership, id: &str, state: MemberState) -> bool {
    states(m).iter().any(|(i, s)| i == id && *s == state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_detect_a_stopped_member_and_see_a_leave() {
    let seed = GossipMembership::start(config("join-stop-leave", 0, Vec::new()))
        .await
        .expect("seed starts");
    let join = vec![seed.gossip_addr().to_string()];
    let mut others = Vec::new();
    for i in 1..4 {
        others.push(
            GossipMembership::start(config("join-stop-leave", i, join.clone()))
                .await
                .expect("member starts"),
        );
    }
    let all_alive = |m: &GossipMembership| {
        let s = states(m);
        s.len() == 4 && s.iter().all(|(_, st)| *st == MemberState::Alive)
    };
    wait_for(
        "4 members alive everywhere",
        Duration::from_secs(10),
        || all_alive(&seed) && others.iter().all(&all_alive),
    )
    .await;

    // Stop g3 without leaving (its tasks end: it answers nothing, like a killed process).
    let stopped = others.pop().expect("g3");
    drop(stopped);
    let took = wait_for("g3 declared dead", Duration::from_secs(30), || {
        sees(&seed, "g3", MemberState::Dead)
            && others.iter().all(|m| sees(m, "g3", MemberState::Dead))
    })
    .await;
    eprintln!("a stopped member was seen dead by the 3 others after {took:?}");

    // g2 leaves gracefully.
    others[1].leave().expect("leave");
    wait_for("g2 seen left", Duration::from_secs(15), || {
        sees(&seed, "g2", MemberState::Left) && sees(&others[0], "g2", MemberState::Left)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_join_address_is_retried_not_fatal() {
    // The seed is not up yet: the member keeps retrying, then finds it.
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").expect("port");
    let port = probe.local_addr().expect("addr").port();
    drop(probe);
    let seed_addr = format!("127.0.0.1:{port}");
    let late = GossipMembership::start(config(
        "late-seed",
        1,
        vec![seed_addr.clone(), "no-such-host.invalid:1".into()],
    ))
    .await
    .expect("starts although no seed answers");
    let mut seed_config = config("late-seed", 0, Vec::new());
    seed_config.bind = seed_addr.parse().expect("addr");
    let Ok(seed) = GossipMembership::start(seed_config).await else {
        eprintln!("the chosen port was taken meanwhile; nothing to test on this run");
        return;
    };
    wait_for(
        "joined once the seed came up",
        Duration::from_secs(10),
        || sees(&late, "g0", MemberState::Alive) && sees(&seed, "g1", MemberState::Alive),
    )
    .await;
}

fn coordinator_config(cluster: &str, i: usize, coordinator: Option<String>) -> GossipConfig {
    let mut c = config(cluster, i, Vec::new());
    c.protocol = ProtocolConfig::Coordinator {
        config: cluster_membership::RegistryConfig {
            cluster_name: cluster.into(),
            heartbeat_interval: Duration::from_millis(100),
            dead_after: Duration::from_millis(1000),
            ..cluster_membership::RegistryConfig::default()
        },
        coordinator,
    };
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_membership_registers_detects_and_survives_its_coordinator() {
    let coordinator = GossipMembership::start(coordinator_config("coordinator", 0, None))
        .await
        .expect("coordinator starts");
    let addr = Some(coordinator.gossip_addr().to_string());
    let mut members = Vec::new();
    for i in 1..4 {
        members.push(
            GossipMembership::start(coordinator_config("coordinator", i, addr.clone()))
                .await
                .expect("member starts"),
        );
    }
    let all_alive = |m: &GossipMembership| {
        let s = states(m);
        s.len() == 4 && s.iter().all(|(_, st)| *st == MemberState::Alive)
    };
    wait_for("4 registered everywhere", Duration::from_secs(20), || {
        all_alive(&coordinator) && members.iter().all(&all_alive)
    })
    .await;
    assert_eq!(members[0].coordinator_up(), Some(true));

    // A member stops heartbeating: the coordinator marks it dead and tells the others.
    drop(members.pop());
    wait_for("g3 dead everywhere", Duration::from_secs(20), || {
        sees(&coordinator, "g3", MemberState::Dead)
            && members.iter().all(|m| sees(m, "g3", MemberState::Dead))
    })
    .await;

    // The coordinator dies: members keep their last view and report it.
    drop(coordinator);
    wait_for("coordinator reported down", Duration::from_secs(20), || {
        members.iter().all(|m| m.coordinator_up() == Some(false))
    })
    .await;
    assert!(
        sees(&members[0], "g1", MemberState::Alive),
        "the last view is kept"
    );
    assert!(
        sees(&members[0], "g0", MemberState::Alive),
        "the last view is kept"
    );
}

fn keyed(cluster: &str, i: usize, join: Vec<String>, secrets: &[&str]) -> GossipConfig {
    GossipConfig {
        keyring: Some(cluster_membership::Keyring::new(secrets).expect("valid secrets")),
        ..config(cluster, i, join)
    }
}

/// Members with a shared secret gossip; a member with another secret (or none) is refused,
/// counted, and never joins; a rotation (new key added second, then first) keeps everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyring_keeps_strangers_out_and_rotates() {
    let old = "old-cluster-secret-0123456789";
    let new = "new-cluster-secret-9876543210";
    // Rotation step 1 done everywhere (the new key added second: accepted, not used), step 2
    // begun on `c` (the new key first: `c` signs with it).
    let a = GossipMembership::start(keyed("keyring", 0, vec![], &[old, new]))
        .await
        .expect("a");
    let seed = vec![a.gossip_addr().to_string()];
    let b = GossipMembership::start(keyed("keyring", 1, seed.clone(), &[old, new]))
        .await
        .expect("b");
    let c = GossipMembership::start(keyed("keyring", 2, seed.clone(), &[new, old]))
        .await
        .expect("c");
    for m in [&a, &b, &c] {
        wait_for("three keyed members", Duration::from_secs(10), || {
            m.view().borrow().members.len() == 3
        })
        .await;
    }
    let stranger = GossipMembership::start(keyed(
        "keyring",
        3,
        seed.clone(),
        &["some-other-secret-abcdefgh"],
    ))
    .await
    .expect("stranger");
    let plain = GossipMembership::start(config("keyring", 4, seed))
        .await
        .expect("plain");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        stranger.view().borrow().members.len(),
        1,
        "a stranger never joins"
    );
    assert_eq!(
        plain.view().borrow().members.len(),
        1,
        "an unkeyed member never joins"
    );
    let alive = a
        .view()
        .borrow()
        .members
        .iter()
        .filter(|m| m.state == MemberState::Alive)
        .count();
    assert_eq!(
        alive, 3,
        "the keyed members stay alive through the rotation"
    );
    assert!(a.stats().messages_refused > 0, "refusals are counted");
}

/// With encryption, members gossip (datagrams and push-pull) and nothing on the wire shows
/// a member id; a tagging-only member and a stranger stay out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypting_keyring_hides_membership_and_keeps_strangers_out() {
    let secret = "encrypting-cluster-secret-0123";
    let enc = |i: usize, join: Vec<String>, secrets: &[&str]| GossipConfig {
        keyring: Some(
            cluster_membership::Keyring::new(secrets)
                .expect("valid secrets")
                .encrypting(),
        ),
        ..config("encrypting", i, join)
    };
    let a = GossipMembership::start(enc(0, vec![], &[secret]))
        .await
        .expect("a");
    let seed = vec![a.gossip_addr().to_string()];
    let b = GossipMembership::start(enc(1, seed.clone(), &[secret]))
        .await
        .expect("b");
    let c = GossipMembership::start(enc(2, seed.clone(), &[secret]))
        .await
        .expect("c");
    for m in [&a, &b, &c] {
        wait_for("three encrypting members", Duration::from_secs(10), || {
            m.view().borrow().members.len() == 3
        })
        .await;
    }
    // Same secret, but tagging only: cannot read the others, nor they it.
    let tagging = GossipMembership::start(keyed("encrypting", 3, seed.clone(), &[secret]))
        .await
        .expect("tagging");
    let stranger = GossipMembership::start(enc(4, seed, &["some-other-secret-abcdefgh"]))
        .await
        .expect("stranger");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(a.view().borrow().members.len(), 3, "nobody else joined");
    assert!(tagging.view().borrow().members.len() <= 1);
    assert!(stranger.view().borrow().members.len() <= 1);

    // Sealed bytes never contain the plaintext.
    let k = cluster_membership::Keyring::new(&[secret])
        .expect("valid")
        .encrypting();
    let plain = b"member g0 at 127.0.0.1:7200 is alive";
    let sealed = k.seal(plain);
    assert!(!sealed.windows(plain.len()).any(|w| w == plain));
    assert_eq!(k.open(&sealed).as_deref(), Some(&plain[..]));
    let mut flipped = sealed.clone();
    flipped[30] ^= 1;
    assert!(k.open(&flipped).is_none(), "a changed byte is refused");
    assert_ne!(k.seal(plain), sealed, "a fresh nonce per message");
}

/// The push-pull listener under a flood: hundreds of connections that announce a
/// megabyte and send nothing (no tag, no body). At most 64 are read at once, each for at
/// most 2 s, and nothing is allocated for what was only announced; the rest are closed on
/// accept and counted. Before: a task and a buffer of the announced size per connection,
/// without a cap. A member still joins through the flooded seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_pull_flood_is_capped_and_the_seed_still_admits_members() {
    use tokio::io::AsyncWriteExt;
    let seed = GossipMembership::start(config("pushpull-flood", 0, Vec::new()))
        .await
        .expect("seed starts");
    let mut flood = Vec::new();
    for _ in 0..300 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(seed.gossip_addr()).await {
            let _ = s.write_all(&(1u32 << 20).to_be_bytes()).await;
            flood.push(s);
        }
    }
    wait_for(
        "connections beyond the cap refused",
        Duration::from_secs(5),
        || seed.stats().messages_refused >= 200,
    )
    .await;
    let member = GossipMembership::start(config(
        "pushpull-flood",
        1,
        vec![seed.gossip_addr().to_string()],
    ))
    .await
    .expect("member starts");
    wait_for(
        "the member joins through the flooded seed",
        Duration::from_secs(15),
        || sees(&seed, "g1", MemberState::Alive) && sees(&member, "g0", MemberState::Alive),
    )
    .await;
    drop(flood);
}
