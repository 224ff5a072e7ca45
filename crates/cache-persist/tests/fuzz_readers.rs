//! The fuzz targets' body (`cache_persist::fuzz_read`, see `fuzz/`) on a bounded set of
//! inputs, so CI exercises it on stable: random bytes behind a valid header, and real logs
//! and snapshots with bytes flipped, inserted, removed and cut.

use bytes::Bytes;
use cache_persist::{FileKind, LogLimits, LogWriter, fuzz_read};
use cluster_core::{Mutation, MutationOp};
use proptest::prelude::*;

const LIMITS: LogLimits = LogLimits {
    max_key_bytes: 1024,
    max_value_bytes: 64 * 1024,
};

fn file(kind: FileKind, n: usize) -> Vec<u8> {
    let mut w = LogWriter::create_kind(Vec::new(), kind).expect("header");
    for i in 0..n {
        let m = Mutation {
            key: Bytes::from(format!("key-{i}")),
            version: 1 + i as u64,
            op: if i % 4 == 3 {
                MutationOp::Delete
            } else {
                MutationOp::Put {
                    value: Bytes::from(vec![b'v'; i * 7 % 300]),
                    expires_at: (i % 2 == 0).then_some(1_700_000_000_000 + i as u64),
                }
            },
        };
        w.append(&m).expect("append");
    }
    if kind == FileKind::Snapshot {
        w.finish_snapshot(n as u64).expect("end");
    }
    w.into_inner()
}

/// An edit to a valid file.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    Cut(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, x)| Edit::Flip(at, x)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, b)| Edit::Insert(at, b)),
        (any::<usize>(), 1usize..64).prop_map(|(at, n)| Edit::Remove(at, n)),
        any::<usize>().prop_map(Edit::Cut),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let len = bytes.len().max(1);
        match e {
            Edit::Flip(at, x) => {
                let i = at % len;
                if let Some(b) = bytes.get_mut(i) {
                    *b ^= x;
                }
            }
            Edit::Insert(at, b) => {
                let i = at % (bytes.len() + 1);
                bytes.splice(i..i, b.iter().copied());
            }
            Edit::Remove(at, n) => {
                let i = at % len;
                let end = (i + n).min(bytes.len());
                if i < end {
                    bytes.drain(i..end);
                }
            }
            Edit::Cut(at) => bytes.truncate(at % len),
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn damaged_logs_never_panic(edits in prop::collection::vec(edit(), 1..4), n in 1usize..40) {
        let bytes = apply(file(FileKind::Log, n), &edits);
        prop_assert!(fuzz_read(&bytes, FileKind::Log, LIMITS) <= n + 4);
    }

    #[test]
    fn damaged_snapshots_never_panic(edits in prop::collection::vec(edit(), 1..4), n in 1usize..40) {
        let bytes = apply(file(FileKind::Snapshot, n), &edits);
        fuzz_read(&bytes, FileKind::Snapshot, LIMITS);
    }

    #[test]
    fn garbage_behind_a_header_never_panics(tail in prop::collection::vec(any::<u8>(), 0..600)) {
        for (magic, kind) in [(&b"CCAOF\0\0\x01"[..], FileKind::Log), (&b"CCSNP\0\0\x01"[..], FileKind::Snapshot)] {
            let mut bytes = magic.to_vec();
            bytes.extend_from_slice(&tail);
            fuzz_read(&bytes, kind, LIMITS);
        }
    }
}
