//! Placing a key allocates nothing: [`Ring::replica_set`] is what a node computes for every
//! request, so it must not touch the allocator (issue: the request path's three small
//! allocations for the replica list). Counted with a counting global allocator.

// The counting allocator is the one `unsafe` here: it forwards to the system allocator.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use cluster_ring::{Member, NodeId, Ring};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to `System` unchanged; only counts allocations.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` above with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn placing_a_key_allocates_nothing() {
    let members: Vec<Member> = (0..12)
        .map(|i| Member::new(NodeId::new(format!("node-{i}")).expect("id"), 1))
        .collect();
    let ring = Ring::new(members, 64).expect("ring");
    let keys: Vec<[u8; 8]> = (0..10_000u64).map(u64::to_be_bytes).collect();
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let mut primaries = 0usize;
    for key in &keys {
        let set = ring.replica_set(key, 3);
        primaries += set.indices()[0] as usize;
        assert_eq!(set.len(), 3);
    }
    let after = ALLOCATIONS.load(Ordering::Relaxed);
    assert_eq!(after - before, 0, "allocations while placing 10 000 keys");
    // The list form allocates (what the set replaces on the request path).
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for key in keys.iter().take(100) {
        std::hint::black_box(ring.replicas(key, 3));
    }
    assert!(ALLOCATIONS.load(Ordering::Relaxed) - before >= 100);
    std::hint::black_box(primaries);
}
