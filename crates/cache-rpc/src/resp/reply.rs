//! RESP2 reply encoding into the connection's output buffer (written once per batch of
//! pipelined commands).

use std::io::Write;

/// `+OK`-style status reply. `s` must not contain CR or LF.
pub(super) fn simple(out: &mut Vec<u8>, s: &str) {
    out.push(b'+');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `-ERR ...` error reply; `msg` starts with the error code (`ERR`, `NOAUTH`, ...). CR and
/// LF, which would break the stream, become spaces.
pub(super) fn error(out: &mut Vec<u8>, msg: &str) {
    out.push(b'-');
    out.extend(
        msg.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

/// A `<prefix><n>\r\n` line (`:n`, `$len`, `*n`), formatted without `fmt`'s machinery: it
/// heads every reply on the hot path.
fn line(out: &mut Vec<u8>, prefix: u8, n: impl itoa::Integer) {
    out.push(prefix);
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `:n` integer reply.
pub(super) fn int(out: &mut Vec<u8>, n: i64) {
    line(out, b':', n);
}

/// `$len` bulk string reply.
pub(super) fn bulk(out: &mut Vec<u8>, b: &[u8]) {
    out.reserve(b.len() + 16);
    line(out, b'$', b.len());
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

/// Null: a miss. RESP2's null bulk string (`$-1`), or RESP3's null (`_`).
pub(super) fn nil(out: &mut Vec<u8>, resp3: bool) {
    out.extend_from_slice(if resp3 { b"_\r\n" } else { b"$-1\r\n" });
}

/// A bulk string, or null.
pub(super) fn bulk_or_nil(out: &mut Vec<u8>, b: Option<&[u8]>, resp3: bool) {
    match b {
        Some(b) => bulk(out, b),
        None => nil(out, resp3),
    }
}

/// The header of a map of `n` pairs (which the caller writes next, key then value): RESP3's
/// map (`%n`), or a flat RESP2 array of `2n` items.
pub(super) fn map(out: &mut Vec<u8>, n: usize, resp3: bool) {
    if resp3 {
        let _ = write!(out, "%{n}\r\n");
    } else {
        array(out, 2 * n);
    }
}

/// The header of an array of `n` replies (which the caller writes next).
pub(super) fn array(out: &mut Vec<u8>, n: usize) {
    line(out, b'*', n);
}
