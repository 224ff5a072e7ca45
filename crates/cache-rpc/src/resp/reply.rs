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

/// `:n` integer reply.
pub(super) fn int(out: &mut Vec<u8>, n: i64) {
    // Writing into a Vec cannot fail.
    let _ = write!(out, ":{n}\r\n");
}

/// `$len` bulk string reply.
pub(super) fn bulk(out: &mut Vec<u8>, b: &[u8]) {
    let _ = write!(out, "${}\r\n", b.len());
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

/// The null bulk string (`$-1`): a miss.
pub(super) fn nil(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

/// A bulk string, or the null bulk string.
pub(super) fn bulk_or_nil(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        Some(b) => bulk(out, b),
        None => nil(out),
    }
}

/// The header of an array of `n` replies (which the caller writes next).
pub(super) fn array(out: &mut Vec<u8>, n: usize) {
    let _ = write!(out, "*{n}\r\n");
}
