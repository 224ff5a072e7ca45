//! Prints the tables behind `docs/why/consistent-hashing.md`:
//!
//! 1. keys moved when a cluster grows from 10 to 11 members (and shrinks to 9), for
//!    `hash % N`, jump consistent hash and the ring;
//! 2. load spread and cost against the vnode count, for 10 equal members.
//!
//! `cargo run --release -p cluster-ring --example rebalance`

use std::time::Instant;

use cluster_ring::{DEFAULT_VNODES_PER_WEIGHT, Member, NodeId, Ring, key_hash};

const SAMPLE_KEYS: u32 = 1_000_000;

fn members(n: usize) -> Vec<Member> {
    (0..n)
        .map(|i| Member::new(NodeId::new(format!("node-{i}")).expect("valid id"), 1))
        .collect()
}

#[path = "../benches/common/baselines.rs"]
mod baselines;
use baselines::jump_hash;

fn fraction_moved(
    mut owner_before: impl FnMut(u64) -> String,
    mut owner_after: impl FnMut(u64) -> String,
) -> f64 {
    let mut moved = 0u32;
    for k in 0..SAMPLE_KEYS {
        let h = key_hash(format!("key-{k}").as_bytes());
        if owner_before(h) != owner_after(h) {
            moved += 1;
        }
    }
    f64::from(moved) / f64::from(SAMPLE_KEYS)
}

fn main() {
    let ten = Ring::new(members(10), DEFAULT_VNODES_PER_WEIGHT).expect("valid ring");
    let eleven = Ring::new(members(11), DEFAULT_VNODES_PER_WEIGHT).expect("valid ring");
    let nine = Ring::new(members(9), DEFAULT_VNODES_PER_WEIGHT).expect("valid ring");

    println!("Keys moved ({SAMPLE_KEYS} sample keys)\n");
    println!("| scheme | 10 → 11 members | 10 → 9 members |");
    println!("| --- | ---: | ---: |");
    let modn = |n: u64| move |h: u64| format!("node-{}", h % n);
    println!(
        "| `hash % N` | {:.1} % | {:.1} % |",
        100.0 * fraction_moved(modn(10), modn(11)),
        100.0 * fraction_moved(modn(10), modn(9))
    );
    let jump = |n: u32| move |h: u64| format!("node-{}", jump_hash(h, n));
    println!(
        "| jump consistent hash | {:.1} % | {:.1} % |",
        100.0 * fraction_moved(jump(10), jump(11)),
        100.0 * fraction_moved(jump(10), jump(9))
    );
    let ring = |r: &Ring| {
        let r = r.clone();
        move |h: u64| r.owner_of_hash(h).id.to_string()
    };
    println!(
        "| ring, {DEFAULT_VNODES_PER_WEIGHT} vnodes | {:.1} % | {:.1} % |",
        100.0 * fraction_moved(ring(&ten), ring(&eleven)),
        100.0 * fraction_moved(ring(&ten), ring(&nine))
    );
    println!("| ideal | {:.1} % | {:.1} % |", 100.0 / 11.0, 100.0 / 10.0);
    println!(
        "\n(jump hash can only add or remove the *last* bucket; the ring can drop any member.)"
    );

    println!("\nLoad spread, 10 equal members (exact arc lengths)\n");
    println!(
        "| vnodes per member | largest share ÷ mean | smallest share ÷ mean | std dev ÷ mean | points memory | build time |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for vnodes in [50u32, 100, 200, 500, 1000, 2000] {
        let mut best = f64::MAX;
        let mut ring = None;
        for _ in 0..20 {
            let t = Instant::now();
            let r = Ring::new(members(10), vnodes).expect("valid ring");
            best = best.min(t.elapsed().as_secs_f64());
            ring = Some(r);
        }
        let ring = ring.expect("built at least once");
        let shares: Vec<f64> = ring.shares().into_iter().map(|(_, s)| s / 0.1).collect();
        let max = shares.iter().copied().fold(0.0, f64::max);
        let min = shares.iter().copied().fold(f64::MAX, f64::min);
        let var = shares.iter().map(|s| (s - 1.0).powi(2)).sum::<f64>() / shares.len() as f64;
        let marker = if vnodes == DEFAULT_VNODES_PER_WEIGHT {
            " (default)"
        } else {
            ""
        };
        println!(
            "| {vnodes}{marker} | {max:.3} | {min:.3} | {:.3} | {} KiB | {:.0} µs |",
            var.sqrt(),
            ring.point_count() * 12 / 1024,
            best * 1e6
        );
    }
}
