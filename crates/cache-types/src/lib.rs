//! `cache-types`: the words every part of cache-cluster uses, defined once.
//!
//! The node, the cluster core, the SDK, the CLI and the bench all speak of consistency
//! levels, write conditions and member states. Each used to define its own copy; this crate
//! is the one definition, with the parsing and the rules that go with it. It depends on
//! nothing, so the SDK can use it without pulling in the engine or the server.
//!
//! Wire formats (protobuf enums, RESP words) are mapped to these types at the edges; an
//! unknown wire value is an error there, never a silent default.

#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

/// How many replicas must take part in a request before it is answered.
///
/// For writes: how many replicas (the coordinator included) must have applied the write
/// before it is acknowledged. For reads: `One` asks the key's primary; `Quorum` and `All`
/// read that many replicas, return the newest version and repair stale ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Consistency {
    /// The coordinator alone; the other replicas get the write asynchronously.
    One,
    /// A majority of the key's replicas (`n / 2 + 1`).
    Quorum,
    /// Every replica of the key.
    All,
}

impl Consistency {
    /// Replicas that must answer (coordinator included) out of `n` replicas.
    pub fn required(self, n: usize) -> usize {
        match self {
            Consistency::One => 1.min(n),
            Consistency::Quorum => n / 2 + 1,
            Consistency::All => n,
        }
    }

    /// The lower-case name: `one`, `quorum`, `all`.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::One => "one",
            Consistency::Quorum => "quorum",
            Consistency::All => "all",
        }
    }
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that names no value of one of this crate's types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownValue {
    /// What was being parsed (`consistency`, `condition`, `member state`).
    pub what: &'static str,
    /// The word given.
    pub given: String,
    /// The accepted words.
    pub expected: &'static str,
}

impl fmt::Display for UnknownValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown {} {:?}; expected one of {}",
            self.what, self.given, self.expected
        )
    }
}

impl std::error::Error for UnknownValue {}

impl FromStr for Consistency {
    type Err = UnknownValue;

    /// Parses `one`, `quorum`, `all` (any case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "one" => Ok(Consistency::One),
            "quorum" => Ok(Consistency::Quorum),
            "all" => Ok(Consistency::All),
            _ => Err(UnknownValue {
                what: "consistency",
                given: s.to_string(),
                expected: "one, quorum, all",
            }),
        }
    }
}

/// When a write applies, depending on whether the key holds a live value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Condition {
    /// Always (plain `SET`).
    #[default]
    Always,
    /// Only if the key holds no live value (`SET NX`; also "add").
    IfAbsent,
    /// Only if the key holds a live value (`SET XX`; also "replace").
    IfPresent,
}

impl Condition {
    /// The lower-case name: `always`, `if-absent`, `if-present`.
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Always => "always",
            Condition::IfAbsent => "if-absent",
            Condition::IfPresent => "if-present",
        }
    }
}

impl FromStr for Condition {
    type Err = UnknownValue;

    /// Parses `always`, `if-absent` (or `nx`), `if-present` (or `xx`), any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "always" => Ok(Condition::Always),
            "if-absent" | "nx" => Ok(Condition::IfAbsent),
            "if-present" | "xx" => Ok(Condition::IfPresent),
            _ => Err(UnknownValue {
                what: "condition",
                given: s.to_string(),
                expected: "always, if-absent (nx), if-present (xx)",
            }),
        }
    }
}

/// A member's state as one node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberState {
    /// Reachable and serving.
    Alive,
    /// Failed a probe; may be refuted (gossip).
    Suspect,
    /// Declared failed.
    Dead,
    /// Left gracefully.
    Left,
}

impl MemberState {
    /// Lower-case name, as shown in `/status` and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Dead => "dead",
            MemberState::Left => "left",
        }
    }

    /// Whether the member should own keys (alive or merely suspected).
    pub fn owns_keys(self) -> bool {
        matches!(self, MemberState::Alive | MemberState::Suspect)
    }
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MemberState {
    type Err = UnknownValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "alive" => Ok(MemberState::Alive),
            "suspect" => Ok(MemberState::Suspect),
            "dead" => Ok(MemberState::Dead),
            "left" => Ok(MemberState::Left),
            _ => Err(UnknownValue {
                what: "member state",
                given: s.to_string(),
                expected: "alive, suspect, dead, left",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistency_counts_and_parses() {
        assert_eq!(Consistency::One.required(3), 1);
        assert_eq!(Consistency::Quorum.required(3), 2);
        assert_eq!(Consistency::Quorum.required(2), 2);
        assert_eq!(Consistency::Quorum.required(1), 1);
        assert_eq!(Consistency::All.required(3), 3);
        assert_eq!("QUORUM".parse(), Ok(Consistency::Quorum));
        let err = "most".parse::<Consistency>().expect_err("unknown");
        assert!(err.to_string().contains("one, quorum, all"), "{err}");
    }

    #[test]
    fn conditions_and_states_round_trip() {
        for c in [Condition::Always, Condition::IfAbsent, Condition::IfPresent] {
            assert_eq!(c.as_str().parse(), Ok(c));
        }
        assert_eq!("NX".parse(), Ok(Condition::IfAbsent));
        for s in [
            MemberState::Alive,
            MemberState::Suspect,
            MemberState::Dead,
            MemberState::Left,
        ] {
            assert_eq!(s.as_str().parse(), Ok(s));
        }
        assert!(!MemberState::Dead.owns_keys());
    }
}

/// Whether `text` matches the glob `pattern`, with Redis's syntax (`KEYS`, `SCAN MATCH`):
/// `*` any run of bytes, `?` one byte, `[abc]`, `[a-z]` and `[^a]` one byte of (or not of)
/// a set, `\x` the byte `x` itself. An unterminated `[` set ends with the pattern. Bytes,
/// not characters: patterns and keys need not be UTF-8.
///
/// Runs in O(pattern × text) time whatever the pattern (a star backtracks only to the last
/// star), so a client's pattern cannot make a scan exponential.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where to resume after the last `*`: the pattern after it and the text it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if let Some(&c) = pattern.get(p) {
            let step = match c {
                b'*' => {
                    while pattern.get(p) == Some(&b'*') {
                        p += 1;
                    }
                    star = Some((p, t));
                    continue;
                }
                b'?' => Some(1),
                b'[' => {
                    let (matched, len) = glob_class(&pattern[p..], text[t]);
                    matched.then_some(len)
                }
                b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == text[t]).then_some(2),
                c => (c == text[t]).then_some(1),
            };
            if let Some(len) = step {
                p += len;
                t += 1;
                continue;
            }
        }
        // A mismatch: let the last star swallow one more byte, or fail.
        match star {
            Some((sp, st)) => {
                p = sp;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    while pattern.get(p) == Some(&b'*') {
        p += 1;
    }
    p == pattern.len()
}

/// Matches `byte` against the set at the start of `pattern` (which begins with `[`); returns
/// whether it matched and how many pattern bytes the set spans.
fn glob_class(pattern: &[u8], byte: u8) -> (bool, usize) {
    let mut i = 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    while let Some(&c) = pattern.get(i) {
        if c == b']' {
            return (matched != negate, i + 1);
        }
        if c == b'\\' && i + 1 < pattern.len() {
            matched |= pattern[i + 1] == byte;
            i += 2;
        } else if i + 2 < pattern.len() && pattern[i + 1] == b'-' && pattern[i + 2] != b']' {
            let (lo, hi) = (c.min(pattern[i + 2]), c.max(pattern[i + 2]));
            matched |= (lo..=hi).contains(&byte);
            i += 3;
        } else {
            matched |= c == byte;
            i += 1;
        }
    }
    (matched != negate, i)
}

#[cfg(test)]
mod glob_tests {
    use super::glob_match as m;

    #[test]
    fn globs_match_like_redis() {
        assert!(m(b"", b""));
        assert!(!m(b"", b"a"));
        assert!(m(b"*", b""));
        assert!(m(b"*", b"anything"));
        assert!(m(b"user:*", b"user:42"));
        assert!(!m(b"user:*", b"session:42"));
        assert!(m(b"h?llo", b"hello"));
        assert!(!m(b"h?llo", b"hllo"));
        assert!(m(b"h[ae]llo", b"hallo"));
        assert!(!m(b"h[ae]llo", b"hillo"));
        assert!(m(b"h[^e]llo", b"hallo"));
        assert!(!m(b"h[^e]llo", b"hello"));
        assert!(m(b"h[a-b]llo", b"hbllo"));
        assert!(m(b"h[b-a]llo", b"hallo"));
        assert!(!m(b"h[a-b]llo", b"hcllo"));
        assert!(m(b"a\\*b", b"a*b"));
        assert!(!m(b"a\\*b", b"axb"));
        assert!(m(b"[\\]]", b"]"));
        assert!(m(b"*a*b*c", b"xxaxxbxxc"));
        assert!(!m(b"*a*b*c", b"xxaxxbxx"));
        assert!(m(b"k[ab", b"ka"));
        assert!(!m(b"k[ab", b"kc"));
        assert!(m(&[0xff, b'*'], &[0xff, 0, 1]));
    }

    #[test]
    fn a_hostile_pattern_stays_quick() {
        let text = vec![b'a'; 64 << 10];
        let pattern = b"*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b";
        // O(pattern × text): about 2 million steps. A recursive matcher that tries every
        // split would not finish.
        assert!(!m(pattern, &text));
        assert!(m(pattern, &[&text[..], b"b"].concat()));
    }
}
