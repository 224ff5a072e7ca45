//! The RESP2 request parser: multibulk commands (`*N\r\n$LEN\r\nBYTES\r\n...`, what every
//! client library sends) and inline commands (`GET key\r\n`, what a person types into
//! `telnet`).
//!
//! It parses in place: [`parse`] reads the front of the connection's buffer and returns the
//! argument positions and how many bytes the command took, or that more bytes are needed.
//! Nothing is copied; the caller cuts the command off the buffer and slices its arguments.
//! Every count and length is checked against [`ParseLimits`] as soon as its header is read,
//! before any byte of the body is awaited, so a client cannot make the node buffer more
//! than one maximal command.

use std::ops::Range;

/// Bounds on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLimits {
    /// Most arguments in one command (the name included).
    pub max_args: usize,
    /// Longest single argument (a key or a value), in bytes.
    pub max_arg_bytes: usize,
    /// Longest inline command line, in bytes.
    pub max_inline_bytes: usize,
    /// Largest whole command (all its arguments and framing), in bytes: what one command
    /// may make the node buffer.
    pub max_command_bytes: usize,
}

/// Longest `*N` or `$N` header line we accept (sign, 20 digits, CRLF, with room).
const MAX_HEADER_LINE: usize = 32;

/// A request that breaks the protocol. The connection cannot find the next command after
/// it, so it is answered with this error and closed (as Redis does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub &'static str);

/// What [`parse`] found at the front of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A whole command: its arguments were pushed onto the caller's vector as byte ranges
    /// of the buffer, and it took this many bytes. No arguments: an empty line or `*0`,
    /// which is skipped.
    Command(usize),
    /// The command is not complete; at least this many bytes of buffer are needed in all
    /// (a hint for reserving, exact once the last bulk header is read).
    Incomplete(usize),
}

/// Parses one command from the front of `buf`, pushing its arguments' ranges onto `args`
/// (cleared first). See the module docs.
pub fn parse(
    buf: &[u8],
    limits: &ParseLimits,
    args: &mut Vec<Range<usize>>,
) -> Result<Parsed, ProtocolError> {
    args.clear();
    match buf.first() {
        None => Ok(Parsed::Incomplete(1)),
        Some(b'*') => multibulk(buf, limits, args),
        Some(_) => inline(buf, limits, args),
    }
}

/// Reads a `<prefix><integer>\r\n` header at `at`: the integer and where the next byte is,
/// `None` if the line is not complete yet.
fn header(buf: &[u8], at: usize, bad: &'static str) -> Result<Option<(i64, usize)>, ProtocolError> {
    let rest = &buf[at + 1..];
    let window = &rest[..rest.len().min(MAX_HEADER_LINE)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        if rest.len() >= MAX_HEADER_LINE {
            return Err(ProtocolError(bad));
        }
        return Ok(None);
    };
    if cr + 1 >= rest.len() {
        return Ok(None);
    }
    if rest[cr + 1] != b'\n' {
        return Err(ProtocolError(bad));
    }
    let n = integer(&rest[..cr]).ok_or(ProtocolError(bad))?;
    Ok(Some((n, at + 1 + cr + 2)))
}

/// A decimal integer with an optional `-`, as a RESP header carries it.
fn integer(digits: &[u8]) -> Option<i64> {
    let (negative, digits) = match digits {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: i64 = 0;
    for d in digits {
        n = n.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
    }
    Some(if negative { -n } else { n })
}

fn multibulk(
    buf: &[u8],
    limits: &ParseLimits,
    args: &mut Vec<Range<usize>>,
) -> Result<Parsed, ProtocolError> {
    const BAD_COUNT: &str = "Protocol error: invalid multibulk length";
    const BAD_LEN: &str = "Protocol error: invalid bulk length";
    let Some((count, mut at)) = header(buf, 0, BAD_COUNT)? else {
        return Ok(Parsed::Incomplete(buf.len() + 1));
    };
    if count <= 0 {
        // `*0` and `*-1`: nothing to run (Redis skips them too).
        return Ok(Parsed::Command(at));
    }
    let count = usize::try_from(count).map_err(|_| ProtocolError(BAD_COUNT))?;
    if count > limits.max_args {
        return Err(ProtocolError(BAD_COUNT));
    }
    for _ in 0..count {
        match buf.get(at) {
            None => return Ok(Parsed::Incomplete(at + 1)),
            Some(b'$') => {}
            Some(_) => {
                return Err(ProtocolError(
                    "Protocol error: expected '$', got something else",
                ));
            }
        }
        let Some((len, start)) = header(buf, at, BAD_LEN)? else {
            return Ok(Parsed::Incomplete(buf.len() + 1));
        };
        let len = usize::try_from(len).map_err(|_| ProtocolError(BAD_LEN))?;
        if len > limits.max_arg_bytes {
            return Err(ProtocolError(BAD_LEN));
        }
        let end = start + len;
        if end + 2 > limits.max_command_bytes {
            return Err(ProtocolError(
                "Protocol error: the command is larger than the node accepts",
            ));
        }
        if buf.len() < end + 2 {
            return Ok(Parsed::Incomplete(end + 2));
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtocolError(BAD_LEN));
        }
        args.push(start..end);
        at = end + 2;
    }
    Ok(Parsed::Command(at))
}

fn inline(
    buf: &[u8],
    limits: &ParseLimits,
    args: &mut Vec<Range<usize>>,
) -> Result<Parsed, ProtocolError> {
    const TOO_BIG: &str = "Protocol error: too big inline request";
    let window = &buf[..buf.len().min(limits.max_inline_bytes + 1)];
    let Some(nl) = window.iter().position(|&b| b == b'\n') else {
        if buf.len() > limits.max_inline_bytes {
            return Err(ProtocolError(TOO_BIG));
        }
        return Ok(Parsed::Incomplete(buf.len() + 1));
    };
    let line_end = if nl > 0 && buf[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    let mut i = 0;
    while i < line_end {
        while i < line_end && buf[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line_end {
            break;
        }
        if buf[i] == b'"' || buf[i] == b'\'' {
            // A quoted argument (no escapes): up to the matching quote, which must end
            // the argument.
            let quote = buf[i];
            let start = i + 1;
            let Some(len) = buf[start..line_end].iter().position(|&b| b == quote) else {
                return Err(ProtocolError(
                    "Protocol error: unbalanced quotes in request",
                ));
            };
            let end = start + len;
            if end + 1 < line_end && !buf[end + 1].is_ascii_whitespace() {
                return Err(ProtocolError(
                    "Protocol error: unbalanced quotes in request",
                ));
            }
            args.push(start..end);
            i = end + 1;
        } else {
            let start = i;
            while i < line_end && !buf[i].is_ascii_whitespace() {
                i += 1;
            }
            args.push(start..i);
        }
        if args.len() > limits.max_args {
            return Err(ProtocolError(TOO_BIG));
        }
    }
    Ok(Parsed::Command(nl + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: ParseLimits = ParseLimits {
        max_args: 8,
        max_arg_bytes: 64,
        max_inline_bytes: 128,
        max_command_bytes: 256,
    };

    fn run(buf: &[u8]) -> Result<(Parsed, Vec<Vec<u8>>), ProtocolError> {
        let mut args = Vec::new();
        let parsed = parse(buf, &LIMITS, &mut args)?;
        let args = args.into_iter().map(|r| buf[r].to_vec()).collect();
        Ok((parsed, args))
    }

    fn encode(args: &[&[u8]]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    #[test]
    fn multibulk_commands_parse_whole_and_in_pieces() {
        let full = encode(&[b"SET", b"k\r\n", b""]);
        let (parsed, args) = run(&full).expect("valid");
        assert_eq!(parsed, Parsed::Command(full.len()));
        assert_eq!(args, vec![b"SET".to_vec(), b"k\r\n".to_vec(), Vec::new()]);
        for cut in 0..full.len() {
            assert!(
                matches!(run(&full[..cut]), Ok((Parsed::Incomplete(n), _)) if n > cut),
                "cut at {cut}"
            );
        }
        // Two pipelined commands: the first is parsed, and says where it ends.
        let mut two = encode(&[b"GET", b"a"]);
        let first = two.len();
        two.extend(encode(&[b"GET", b"b"]));
        assert_eq!(run(&two).expect("valid").0, Parsed::Command(first));
    }

    #[test]
    fn inline_commands_split_on_spaces_and_quotes() {
        let (parsed, args) = run(b"set  k \"a b\"\r\nGET").expect("valid");
        assert_eq!(parsed, Parsed::Command(14));
        assert_eq!(args, vec![b"set".to_vec(), b"k".to_vec(), b"a b".to_vec()]);
        assert_eq!(run(b"PING\n").expect("valid").1, vec![b"PING".to_vec()]);
        assert_eq!(run(b"\r\n").expect("valid"), (Parsed::Command(2), vec![]));
        assert!(matches!(run(b"PING"), Ok((Parsed::Incomplete(_), _))));
        assert!(run(b"set k \"open\r\n").is_err());
    }

    #[test]
    fn bad_and_oversized_requests_are_protocol_errors() {
        for bad in [
            &b"*x\r\n"[..],
            b"*1\r\n:3\r\n",
            b"*1\r\n$-1\r\n",
            b"*1\r\n$2\r\nabcd\r\n",
            b"*9\r\n",
            b"*1\r\n$65\r\n",
            b"*99999999999999999999\r\n",
            b"*1\r\n$1\rx",
            &[b'*'; 40],
            &[b'a'; 200],
        ] {
            assert!(run(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        // Each argument within its limit, the whole command over: refused at the header
        // that crosses the limit, before its body arrives.
        let mut big = b"*5\r\n".to_vec();
        for _ in 0..3 {
            big.extend_from_slice(b"$64\r\n");
            big.extend_from_slice(&[b'x'; 64]);
            big.extend_from_slice(b"\r\n");
        }
        big.extend_from_slice(b"$64\r\n");
        assert!(run(&big).is_err());
        assert_eq!(run(b"*0\r\n").expect("valid"), (Parsed::Command(4), vec![]));
        assert_eq!(
            run(b"*-1\r\n").expect("valid"),
            (Parsed::Command(5), vec![])
        );
    }

    proptest! {
        /// Whatever the bytes, the parser answers without panicking, and a command it
        /// accepts lies within the buffer.
        #[test]
        fn arbitrary_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..300)) {
            let mut args = Vec::new();
            if let Ok(Parsed::Command(n)) = parse(&buf, &LIMITS, &mut args) {
                prop_assert!(n <= buf.len());
                prop_assert!(args.iter().all(|r| r.end <= n));
            }
        }

        /// Encoded commands parse back to their arguments.
        #[test]
        fn encoded_commands_round_trip(
            args in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..24), 1..8)
        ) {
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let buf = encode(&refs);
            let (parsed, got) = run(&buf).expect("valid");
            prop_assert_eq!(parsed, Parsed::Command(buf.len()));
            prop_assert_eq!(got, args);
        }
    }
}
