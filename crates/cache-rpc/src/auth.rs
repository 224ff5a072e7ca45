//! Client authentication: named tokens with a role, stored as SHA-256 digests.
//!
//! The token file (`--auth-file`) has one token per line — `NAME ROLE SHA256-HEX` — blank
//! lines and `#` comments allowed. The node never sees or stores a token in the clear: it
//! hashes what a client presents (`authorization: Bearer TOKEN` metadata) and compares the
//! digest with **every** stored digest in constant time, so neither the comparison nor the
//! number of entries examined depends on which bytes matched. `cache-node hash-token` prints
//! the line for a new token.
//!
//! Roles are ordered: `read` (Get, MultiGet, Stats, ClusterInfo, WatchCluster) < `write`
//! (also Set, Delete, Touch, MultiSet) < `admin` (also Snapshot, and `POST /snapshot` on the
//! admin port). Failures are counted by reason and logged at most once per 10 s, naming the
//! token's *name* when it is known, never the token.

use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// What a token may do. Ordered: each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads, stats and the cluster view.
    Read,
    /// Reads and writes.
    Write,
    /// Everything, snapshots included.
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Self::Read),
            "write" => Ok(Self::Write),
            "admin" => Ok(Self::Admin),
            other => Err(format!("unknown role {other:?} (read, write or admin)")),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
        })
    }
}

/// One named token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    /// A name for logs (never the token).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the token.
    pub digest: [u8; 32],
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No `authorization: Bearer ...` metadata.
    Missing,
    /// A token that matches no entry.
    Unknown,
    /// A known token whose role is below what the call needs.
    Forbidden {
        /// The token's name.
        name: String,
        /// Its role.
        role: Role,
        /// What the call needs.
        need: Role,
    },
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => f.write_str(
                "this node requires a token: send `authorization: Bearer TOKEN` (cache-cli --token, ClientBuilder::token)",
            ),
            Self::Unknown => f.write_str("unknown token"),
            Self::Forbidden { name, role, need } => write!(
                f,
                "token {name:?} has role {role}; this call needs {need}"
            ),
        }
    }
}

/// SHA-256 of `token`, in lower-case hex (what the token file stores).
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Parses a token file (see the module docs). Errors name the line.
pub fn parse_tokens(text: &str) -> Result<Vec<TokenEntry>, String> {
    let mut out: Vec<TokenEntry> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, role, hex] = fields[..] else {
            return Err(format!(
                "line {}: expected `NAME ROLE SHA256-HEX`, got {} fields",
                n + 1,
                fields.len()
            ));
        };
        let role: Role = role.parse().map_err(|e| format!("line {}: {e}", n + 1))?;
        let digest = parse_hex(hex).ok_or_else(|| {
            format!(
                "line {}: the digest must be 64 hex digits (the SHA-256 of the token; `cache-node hash-token` prints it)",
                n + 1
            )
        })?;
        if out.iter().any(|e| e.name == name) {
            return Err(format!("line {}: the name {name:?} is used twice", n + 1));
        }
        out.push(TokenEntry {
            name: name.to_string(),
            role,
            digest,
        });
    }
    if out.is_empty() {
        return Err("no token in the file: every request would be refused".into());
    }
    Ok(out)
}

fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Equality of two digests in time independent of where they differ.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// The node's token table and failure counters.
#[derive(Debug)]
pub struct Auth {
    tokens: Vec<TokenEntry>,
    /// Refusals: missing, unknown, forbidden.
    pub failures: [AtomicU64; 3],
    log: cluster_core::LogThrottle,
}

impl Auth {
    /// A table of `tokens`.
    pub fn new(tokens: Vec<TokenEntry>) -> Self {
        Self {
            tokens,
            failures: Default::default(),
            log: cluster_core::LogThrottle::default(),
        }
    }

    /// Checks an `authorization` metadata value for a call that needs `need`; returns the
    /// token's name. Refusals are counted and logged (rate-limited).
    pub fn check(&self, header: Option<&[u8]>, need: Role) -> Result<&str, AuthError> {
        let (name, role) = self.identify(header)?;
        if role < need {
            let e = AuthError::Forbidden {
                name: name.to_string(),
                role,
                need,
            };
            self.refused(&e);
            return Err(e);
        }
        Ok(name)
    }

    /// The name and role of the token in an `authorization: Bearer TOKEN` value (RESP's
    /// `AUTH` builds one), without a role check; a missing or unknown token is counted and
    /// logged like any refusal. Front ends that check roles per command with the role
    /// found here report a refusal with [`Auth::refused`].
    pub fn identify(&self, header: Option<&[u8]>) -> Result<(&str, Role), AuthError> {
        let result = self.lookup(header);
        if let Err(e) = &result {
            self.refused(e);
        }
        result
    }

    /// Counts a refusal by its reason and logs it (at most once per 10 s).
    pub fn refused(&self, e: &AuthError) {
        let i = match e {
            AuthError::Missing => 0,
            AuthError::Unknown => 1,
            AuthError::Forbidden { .. } => 2,
        };
        self.failures[i].fetch_add(1, Ordering::Relaxed);
        self.log.run(|held_back| {
            tracing::warn!(reason = %e, held_back, "request refused: authentication (logged at most every 10 s; see cache_auth_failures_total)");
        });
    }

    fn lookup(&self, header: Option<&[u8]>) -> Result<(&str, Role), AuthError> {
        let token = header
            .and_then(|h| h.strip_prefix(b"Bearer "))
            .ok_or(AuthError::Missing)?;
        let digest: [u8; 32] = Sha256::digest(token).into();
        // Compare with every entry, whatever matched, without branching on the bytes.
        let mut found: Option<&TokenEntry> = None;
        for entry in &self.tokens {
            if ct_eq(&entry.digest, &digest) {
                found = Some(entry);
            }
        }
        let entry = found.ok_or(AuthError::Unknown)?;
        Ok((&entry.name, entry.role))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Auth {
        let text = format!(
            "# tokens\nreader read {}\nwriter write {}\n\nops admin {}\n",
            hash_token("r-secret"),
            hash_token("w-secret"),
            hash_token("a-secret")
        );
        Auth::new(parse_tokens(&text).expect("valid file"))
    }

    #[test]
    fn roles_include_the_ones_below() {
        let a = table();
        assert_eq!(a.check(Some(b"Bearer r-secret"), Role::Read), Ok("reader"));
        assert!(matches!(
            a.check(Some(b"Bearer r-secret"), Role::Write),
            Err(AuthError::Forbidden { .. })
        ));
        assert_eq!(a.check(Some(b"Bearer w-secret"), Role::Write), Ok("writer"));
        assert!(a.check(Some(b"Bearer w-secret"), Role::Admin).is_err());
        assert_eq!(a.check(Some(b"Bearer a-secret"), Role::Admin), Ok("ops"));
        assert_eq!(
            a.check(Some(b"Bearer nope"), Role::Read),
            Err(AuthError::Unknown)
        );
        assert_eq!(a.check(None, Role::Read), Err(AuthError::Missing));
        assert_eq!(
            a.check(Some(b"r-secret"), Role::Read),
            Err(AuthError::Missing)
        );
        let counted: u64 = a.failures.iter().map(|f| f.load(Ordering::Relaxed)).sum();
        assert_eq!(counted, 5);
    }

    #[test]
    fn bad_files_name_the_line() {
        for (text, expect) in [
            ("a read\n", "line 1"),
            ("a superuser 00\n", "unknown role"),
            ("a read abc\n", "64 hex digits"),
            ("", "no token"),
        ] {
            let e = parse_tokens(text).expect_err(text);
            assert!(e.contains(expect), "{text:?}: {e}");
        }
        let h = hash_token("x");
        let e = parse_tokens(&format!("a read {h}\na write {h}\n")).expect_err("twice");
        assert!(e.contains("line 2") && e.contains("twice"), "{e}");
    }
}
