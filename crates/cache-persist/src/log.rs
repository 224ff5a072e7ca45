//! The append-only log format.
//!
//! ```text
//! file    := header record*
//! header  := "CCAOF\0" version:u16be            (8 bytes; version 1)
//! record  := len:u32le crc:u32le payload        (crc = CRC32C of payload; len = its size)
//! payload := op:u8 flags:u8 version:u64le key_len:u32le key
//!            [expires_at:u64le]                 (if flags & 1; op = PUT only)
//!            [value_len:u32le value]            (op = PUT only)
//! op      := 1 (PUT) | 2 (DELETE) | 3 (END: snapshots only; payload op flags count:u64le)
//! ```
//!
//! A snapshot uses the same framing with the magic `"CCSNP\0"` and ends with an END record
//! holding its entry count: a snapshot without it is incomplete and never loaded (snapshots
//! are written to a temporary name and renamed only once complete, so a missing end means
//! damage, not a crash).
//!
//! Little-endian lengths, one CRC per record (CRC32C: hardware-accelerated, the checksum of
//! iSCSI, ext4 and RocksDB). A record is self-delimiting, so a reader can tell where a crash
//! cut the file:
//!
//! - a record whose frame runs past the end of the file, or the **last** record failing its
//!   checksum, is a **torn tail** — what a crash mid-append leaves; recovery cuts it off;
//! - a record failing its checksum (or malformed) with more bytes after it is **corruption**;
//!   recovery refuses to start and names the offset.
//!
//! Every length is checked against [`LogLimits`] before anything is allocated for it.

use std::io::{self, Read, Write};

use bytes::Bytes;
use cluster_core::{Mutation, MutationOp};

/// The file's first bytes.
pub const MAGIC: &[u8; 6] = b"CCAOF\0";
/// A snapshot's first bytes.
pub const SNAPSHOT_MAGIC: &[u8; 6] = b"CCSNP\0";

/// Which of the two files using this framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// An append-only log segment.
    Log,
    /// A snapshot (ends with an END record).
    Snapshot,
}

impl FileKind {
    fn magic(self) -> &'static [u8; 6] {
        match self {
            FileKind::Log => MAGIC,
            FileKind::Snapshot => SNAPSHOT_MAGIC,
        }
    }
}
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes of the file header.
pub const HEADER_LEN: u64 = 8;
/// Bytes of a record's frame (length and checksum) before its payload.
pub const FRAME_LEN: u64 = 8;

const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;
const OP_END: u8 = 3;
const FLAG_EXPIRES: u8 = 1;

/// The largest key and value a reader accepts: the node's own limits, so a record it could
/// not have written is refused before anything is allocated for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Largest key, in bytes.
    pub max_key_bytes: usize,
    /// Largest value, in bytes.
    pub max_value_bytes: usize,
}

impl LogLimits {
    /// The largest payload a record can have under these limits.
    pub fn max_payload(&self) -> u64 {
        // op, flags, version, key_len, expires_at, value_len
        (1 + 1 + 8 + 4 + 8 + 4) as u64 + self.max_key_bytes as u64 + self.max_value_bytes as u64
    }
}

/// Why a log could not be read (past a point).
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The file does not start with this format's header: not a log, or a newer version.
    #[error("not a cache-cluster log (bad header): {0}")]
    Header(String),
    /// A record at `offset` fails its checksum or is malformed, and more data follows it.
    #[error("corrupt record at byte {offset}: {detail}")]
    Corrupt {
        /// Where the bad record starts.
        offset: u64,
        /// What is wrong with it.
        detail: String,
    },
    /// The underlying read failed.
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

/// Appends records to a log. Buffering and syncing are the caller's (the writer only encodes
/// and writes whole records with one `write_all` each).
#[derive(Debug)]
pub struct LogWriter<W: Write> {
    out: W,
    buf: Vec<u8>,
    written: u64,
}

impl<W: Write> LogWriter<W> {
    /// Starts a new log on `out`: writes the header.
    pub fn create(out: W) -> io::Result<Self> {
        Self::create_kind(out, FileKind::Log)
    }

    /// Starts a new file of `kind` on `out`: writes the header.
    pub fn create_kind(mut out: W, kind: FileKind) -> io::Result<Self> {
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(kind.magic());
        header.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.write_all(&header)?;
        Ok(Self {
            out,
            buf: Vec::new(),
            written: HEADER_LEN,
        })
    }

    /// Continues a log whose valid part is `len` bytes long (after [`scan`]); `out` must be
    /// positioned at its end.
    pub fn append_to(out: W, len: u64) -> Self {
        Self {
            out,
            buf: Vec::new(),
            written: len,
        }
    }

    /// Appends one mutation as one record.
    pub fn append(&mut self, m: &Mutation) -> io::Result<()> {
        self.buf.clear();
        encode_record(m, &mut self.buf)?;
        self.out.write_all(&self.buf)?;
        self.written += self.buf.len() as u64;
        Ok(())
    }

    /// Ends a snapshot: the END record with its entry count.
    pub fn finish_snapshot(&mut self, count: u64) -> io::Result<()> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0; FRAME_LEN as usize]);
        self.buf.extend_from_slice(&[OP_END, 0]);
        self.buf.extend_from_slice(&count.to_le_bytes());
        seal(&mut self.buf, 0)?;
        self.out.write_all(&self.buf)?;
        self.written += self.buf.len() as u64;
        Ok(())
    }

    /// Bytes in the log so far, header included.
    pub fn len(&self) -> u64 {
        self.written
    }

    /// Whether only the header has been written.
    pub fn is_empty(&self) -> bool {
        self.written <= HEADER_LEN
    }

    /// The underlying writer, given back.
    pub fn into_inner(self) -> W {
        self.out
    }

    /// The underlying writer (to flush or sync it).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }
}

/// Appends `m` as one framed record (frame + payload) to `out`.
pub fn encode_record(m: &Mutation, out: &mut Vec<u8>) -> io::Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_LEN as usize]);
    encode_payload(m, out);
    seal(out, start)
}

/// Fills in the frame (length and CRC) of the record that starts at `start` in `buf`.
fn seal(buf: &mut [u8], start: usize) -> io::Result<()> {
    let body = start + FRAME_LEN as usize;
    let len = u32::try_from(buf.len() - body)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record over 4 GiB"))?;
    let crc = crc32c::crc32c(&buf[body..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn encode_payload(m: &Mutation, out: &mut Vec<u8>) {
    let key_len = u32::try_from(m.key.len()).unwrap_or(u32::MAX);
    match &m.op {
        MutationOp::Put { value, expires_at } => {
            out.push(OP_PUT);
            out.push(if expires_at.is_some() {
                FLAG_EXPIRES
            } else {
                0
            });
            out.extend_from_slice(&m.version.to_le_bytes());
            out.extend_from_slice(&key_len.to_le_bytes());
            out.extend_from_slice(&m.key);
            if let Some(at) = expires_at {
                out.extend_from_slice(&at.to_le_bytes());
            }
            let value_len = u32::try_from(value.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&value_len.to_le_bytes());
            out.extend_from_slice(value);
        }
        MutationOp::Delete => {
            out.push(OP_DELETE);
            out.push(0);
            out.extend_from_slice(&m.version.to_le_bytes());
            out.extend_from_slice(&key_len.to_le_bytes());
            out.extend_from_slice(&m.key);
        }
    }
}

/// A cursor over a payload that refuses to read past its end.
struct Payload<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Payload<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("field of {n} bytes runs past the record"))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

/// A decoded record.
enum Decoded {
    Mutation(Mutation),
    /// A snapshot's END record.
    End(u64),
}

fn decode_payload(bytes: &[u8], limits: &LogLimits, kind: FileKind) -> Result<Decoded, String> {
    let mut p = Payload { bytes, at: 0 };
    let op = p.u8()?;
    let flags = p.u8()?;
    if op == OP_END {
        if kind != FileKind::Snapshot || flags != 0 || bytes.len() != 10 {
            return Err("an END record out of place".into());
        }
        return Ok(Decoded::End(p.u64()?));
    }
    let version = p.u64()?;
    if version == 0 {
        return Err("version 0".into());
    }
    let key_len = p.u32()? as usize;
    if key_len == 0 || key_len > limits.max_key_bytes {
        return Err(format!("key of {key_len} bytes"));
    }
    let key = Bytes::copy_from_slice(p.take(key_len)?);
    let op = match op {
        OP_PUT => {
            if flags & !FLAG_EXPIRES != 0 {
                return Err(format!("unknown flags {flags:#04x}"));
            }
            let expires_at = if flags & FLAG_EXPIRES != 0 {
                Some(p.u64()?)
            } else {
                None
            };
            let value_len = p.u32()? as usize;
            if value_len > limits.max_value_bytes {
                return Err(format!("value of {value_len} bytes"));
            }
            let value = Bytes::copy_from_slice(p.take(value_len)?);
            MutationOp::Put { value, expires_at }
        }
        OP_DELETE => {
            if flags != 0 {
                return Err(format!("unknown flags {flags:#04x}"));
            }
            MutationOp::Delete
        }
        other => return Err(format!("unknown operation {other}")),
    };
    if p.at != bytes.len() {
        return Err(format!("{} bytes after the fields", bytes.len() - p.at));
    }
    Ok(Decoded::Mutation(Mutation { key, version, op }))
}

/// What reading one record found.
#[derive(Debug)]
enum Next {
    Record(Mutation, u64),
    /// A snapshot's END record (its count) and where it ends.
    EndMarker(u64, u64),
    End,
    /// The frame runs past the end of the input, or the checksum or fields are bad:
    /// `(offset, detail, the record's bytes read)`.
    Torn(u64, String, Vec<u8>),
}

/// Reads a log's records in order from a seekable-or-not source (the whole file is not held
/// in memory: one record at a time, bounded by [`LogLimits::max_payload`]).
#[derive(Debug)]
pub struct LogReader<R: Read> {
    input: R,
    limits: LogLimits,
    kind: FileKind,
    offset: u64,
    /// A snapshot's END record was read: its entry count.
    end_count: Option<u64>,
    /// A bad record read ahead: whether it is a torn tail depends on whether anything
    /// follows it.
    suspect: Option<(u64, String)>,
}

impl<R: Read> LogReader<R> {
    /// Checks the header of a log.
    pub fn open(input: R, limits: LogLimits) -> Result<Self, LogError> {
        Self::open_kind(input, FileKind::Log, limits)
    }

    /// Checks the header of a file of `kind`.
    pub fn open_kind(mut input: R, kind: FileKind, limits: LogLimits) -> Result<Self, LogError> {
        let mut header = [0u8; HEADER_LEN as usize];
        let n = read_full(&mut input, &mut header)?;
        if n < header.len() || &header[..6] != kind.magic() {
            return Err(LogError::Header("missing or wrong magic".into()));
        }
        let version = u16::from_be_bytes([header[6], header[7]]);
        if version != FORMAT_VERSION {
            return Err(LogError::Header(format!(
                "format version {version}, this build reads {FORMAT_VERSION}"
            )));
        }
        Ok(Self {
            input,
            limits,
            kind,
            offset: HEADER_LEN,
            end_count: None,
            suspect: None,
        })
    }

    /// Byte offset of the next record (the end of the valid part once reading stopped).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn read_one(&mut self) -> Result<Next, LogError> {
        let start = self.offset;
        let mut frame = [0u8; FRAME_LEN as usize];
        let n = read_full(&mut self.input, &mut frame)?;
        if n == 0 {
            return Ok(Next::End);
        }
        if n < frame.len() {
            return Ok(Next::Torn(
                start,
                "the record's frame is cut".into(),
                frame[..n].to_vec(),
            ));
        }
        let len = u64::from(u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]));
        let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        if len > self.limits.max_payload() {
            // Never allocated. A length no writer under these limits produces (decided by
            // the caller like any bad record).
            return Ok(Next::Torn(
                start,
                format!("a record length of {len} bytes, over the limit"),
                frame.to_vec(),
            ));
        }
        let len_usize = usize::try_from(len).map_err(|_| LogError::Corrupt {
            offset: start,
            detail: "length does not fit in memory".into(),
        })?;
        let mut record = Vec::with_capacity(FRAME_LEN as usize + len_usize);
        record.extend_from_slice(&frame);
        record.resize(FRAME_LEN as usize + len_usize, 0);
        let got = read_full(&mut self.input, &mut record[FRAME_LEN as usize..])?;
        if got < len_usize {
            record.truncate(FRAME_LEN as usize + got);
            return Ok(Next::Torn(
                start,
                "the record's payload is cut".into(),
                record,
            ));
        }
        let end = start + FRAME_LEN + len;
        let payload = &record[FRAME_LEN as usize..];
        if crc32c::crc32c(payload) != crc {
            return Ok(Next::Torn(start, "checksum mismatch".into(), record));
        }
        match decode_payload(payload, &self.limits, self.kind) {
            Ok(Decoded::Mutation(m)) => Ok(Next::Record(m, end)),
            Ok(Decoded::End(count)) => Ok(Next::EndMarker(count, end)),
            Err(e) => Ok(Next::Torn(start, format!("malformed record: {e}"), record)),
        }
    }

    /// The next record; `Ok(None)` at the clean end or at a torn tail (see
    /// [`LogReader::torn_tail`]); `Err(Corrupt)` when a bad record is followed by data that
    /// a crash cannot leave (see `LogReader::is_torn_tail`).
    pub fn next_record(&mut self) -> Result<Option<Mutation>, LogError> {
        if self.suspect.is_some() || self.end_count.is_some() {
            return Ok(None);
        }
        match self.read_one()? {
            Next::Record(m, end) => {
                self.offset = end;
                Ok(Some(m))
            }
            Next::EndMarker(count, end) => {
                if drain(&mut self.input)? > 0 {
                    return Err(LogError::Corrupt {
                        offset: end,
                        detail: "data after the snapshot's end".into(),
                    });
                }
                self.offset = end;
                self.end_count = Some(count);
                Ok(None)
            }
            Next::End => Ok(None),
            Next::Torn(offset, detail, mut seen) => {
                if !self.is_torn_tail(&mut seen)? {
                    return Err(LogError::Corrupt { offset, detail });
                }
                self.suspect = Some((offset, detail));
                Ok(None)
            }
        }
    }

    /// Whether a bad record (whose bytes read so far are `seen`) is a torn tail rather than
    /// corruption. A crash mid-append cuts only the last record: the records before it were
    /// written whole. So what follows the start of a torn record is at most one record long
    /// and holds no valid record; anything longer, or a valid record anywhere in it (found
    /// by trying every offset), means the damage is in the middle of the file. The tail is
    /// read into memory up to one record's maximum size, never more.
    fn is_torn_tail(&mut self, seen: &mut Vec<u8>) -> Result<bool, LogError> {
        let window = usize::try_from(FRAME_LEN + self.limits.max_payload()).unwrap_or(usize::MAX);
        if seen.len() < window {
            let room = (window - seen.len()) as u64;
            (&mut self.input).take(room).read_to_end(seen)?;
        }
        if drain(&mut self.input)? > 0 {
            return Ok(false);
        }
        Ok(!holds_record(
            &seen[1.min(seen.len())..],
            &self.limits,
            self.kind,
        ))
    }

    /// After [`LogReader::next_record`] returned `None` on a snapshot: the entry count of
    /// its END record (`None`: the snapshot is incomplete).
    pub fn end_count(&self) -> Option<u64> {
        self.end_count
    }

    /// After [`LogReader::next_record`] returned `None`: the torn tail it stopped at, if any
    /// (its offset, where the valid part ends, and what was wrong).
    pub fn torn_tail(&self) -> Option<(u64, &str)> {
        self.suspect.as_ref().map(|(o, d)| (*o, d.as_str()))
    }
}

/// Whether a valid record (frame, checksum and fields) starts at any offset of `bytes`.
fn holds_record(bytes: &[u8], limits: &LogLimits, kind: FileKind) -> bool {
    let frame = FRAME_LEN as usize;
    (0..bytes.len().saturating_sub(frame)).any(|at| {
        let f = &bytes[at..at + frame];
        let len = u32::from_le_bytes([f[0], f[1], f[2], f[3]]) as usize;
        let body = at + frame;
        // Cheap checks first: the length fits and the operation byte is one we write.
        if len < 2 || body + len > bytes.len() || !(1..=3).contains(&bytes[body]) {
            return false;
        }
        let crc = u32::from_le_bytes([f[4], f[5], f[6], f[7]]);
        let payload = &bytes[body..body + len];
        crc32c::crc32c(payload) == crc && decode_payload(payload, limits, kind).is_ok()
    })
}

/// The body of the fuzz targets (`fuzz/`) and of the bounded fuzz test run in CI: reads
/// `data` as a file of `kind` to the end, record by record, and checks what any input must
/// satisfy — no panic, the reader's offset never past the input, every record within
/// `limits`, and [`scan`] agreeing with the record-by-record read. Returns the records read.
#[doc(hidden)]
pub fn fuzz_read(data: &[u8], kind: FileKind, limits: LogLimits) -> usize {
    let Ok(mut reader) = LogReader::open_kind(data, kind, limits) else {
        return 0;
    };
    let mut n = 0;
    let mut outcome = Ok(());
    loop {
        match reader.next_record() {
            Ok(Some(m)) => {
                assert!(m.key.len() <= limits.max_key_bytes && m.version != 0);
                if let MutationOp::Put { value, .. } = &m.op {
                    assert!(value.len() <= limits.max_value_bytes);
                }
                n += 1;
            }
            Ok(None) => break,
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
        assert!(reader.offset() <= data.len() as u64);
    }
    if kind == FileKind::Log {
        match (scan(data, limits), outcome) {
            (Ok(report), Ok(())) => {
                assert_eq!(report.records.len(), n);
                assert!(report.valid_len <= data.len() as u64);
            }
            (
                Err(LogError::Corrupt { offset: a, .. }),
                Err(LogError::Corrupt { offset: b, .. }),
            ) => {
                assert_eq!(a, b);
            }
            (a, b) => panic!("scan and the reader disagree: {a:?} vs {b:?}"),
        }
    }
    n
}

/// Reads until `buf` is full or the input ends; returns how many bytes were read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads and counts whatever is left.
fn drain(input: &mut impl Read) -> io::Result<u64> {
    io::copy(input, &mut io::sink())
}

/// What [`scan`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanOutcome {
    /// Every byte is a valid record.
    Clean,
    /// The last record is cut or bad at this offset; the valid part ends there.
    TornTail {
        /// Where the torn record starts.
        offset: u64,
    },
}

/// A whole log checked: its valid records and where they end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanReport {
    /// The valid records, in order.
    pub records: Vec<Mutation>,
    /// Bytes of the valid part (header included): where appending resumes, and where
    /// `check-data --repair` truncates.
    pub valid_len: u64,
    /// Whether it ended cleanly or at a torn tail.
    pub outcome: ScanOutcome,
}

/// Reads a whole log: `Err(Corrupt)` for corruption in the middle, otherwise its records
/// and where the valid part ends.
pub fn scan(input: impl Read, limits: LogLimits) -> Result<ScanReport, LogError> {
    let mut reader = LogReader::open(input, limits)?;
    let mut records = Vec::new();
    while let Some(m) = reader.next_record()? {
        records.push(m);
    }
    let outcome = match reader.torn_tail() {
        Some((offset, _)) => ScanOutcome::TornTail { offset },
        None => ScanOutcome::Clean,
    };
    Ok(ScanReport {
        records,
        valid_len: reader.offset(),
        outcome,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: LogLimits = LogLimits {
        max_key_bytes: 256,
        max_value_bytes: 4096,
    };

    fn put(key: &str, value: &str, version: u64, expires_at: Option<u64>) -> Mutation {
        Mutation {
            key: Bytes::copy_from_slice(key.as_bytes()),
            version,
            op: MutationOp::Put {
                value: Bytes::copy_from_slice(value.as_bytes()),
                expires_at,
            },
        }
    }

    fn del(key: &str, version: u64) -> Mutation {
        Mutation {
            key: Bytes::copy_from_slice(key.as_bytes()),
            version,
            op: MutationOp::Delete,
        }
    }

    /// A log of `ms` and the offset where each record starts (plus the end).
    fn write(ms: &[Mutation]) -> (Vec<u8>, Vec<u64>) {
        let mut w = LogWriter::create(Vec::new()).expect("vec");
        let mut starts = vec![w.len()];
        for m in ms {
            w.append(m).expect("vec");
            starts.push(w.len());
        }
        (w.get_mut().clone(), starts)
    }

    fn sample() -> Vec<Mutation> {
        vec![
            put("a", "1", 10, None),
            put("b", "two", 11, Some(1_700_000_000_000)),
            del("a", 12),
            put("c", "", 13, None),
        ]
    }

    #[test]
    fn records_round_trip() {
        let ms = sample();
        let (bytes, starts) = write(&ms);
        let report = scan(&bytes[..], LIMITS).expect("clean");
        assert_eq!(report.records, ms);
        assert_eq!(report.outcome, ScanOutcome::Clean);
        assert_eq!(report.valid_len, *starts.last().expect("end"));
        assert_eq!(report.valid_len, bytes.len() as u64);
    }

    #[test]
    fn a_foreign_or_newer_file_is_refused() {
        assert!(matches!(
            scan(&b"hello world"[..], LIMITS),
            Err(LogError::Header(_))
        ));
        let (mut bytes, _) = write(&sample());
        bytes[7] = 2;
        assert!(matches!(scan(&bytes[..], LIMITS), Err(LogError::Header(_))));
        assert!(matches!(scan(&b""[..], LIMITS), Err(LogError::Header(_))));
    }

    #[test]
    fn a_flipped_bit_in_the_middle_is_corruption_at_that_record() {
        let ms = sample();
        let (mut bytes, starts) = write(&ms);
        // A bit of the second record's value.
        let at = (starts[2] - 2) as usize;
        bytes[at] ^= 0x10;
        match scan(&bytes[..], LIMITS) {
            Err(LogError::Corrupt { offset, .. }) => assert_eq!(offset, starts[1]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bad_last_record_is_a_torn_tail() {
        let ms = sample();
        let (mut bytes, starts) = write(&ms);
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let report = scan(&bytes[..], LIMITS).expect("torn, not corrupt");
        assert_eq!(report.records, ms[..3]);
        assert_eq!(report.outcome, ScanOutcome::TornTail { offset: starts[3] });
        assert_eq!(report.valid_len, starts[3]);
    }

    #[test]
    fn a_huge_length_allocates_nothing_and_is_reported() {
        let (mut bytes, starts) = write(&sample()[..1]);
        // A frame claiming 4 GiB, at the end: a torn tail.
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        let report = scan(&bytes[..], LIMITS).expect("torn");
        assert_eq!(report.outcome, ScanOutcome::TornTail { offset: starts[1] });
        // The same with valid-looking data after it: corruption.
        let (more, _) = write(&sample());
        bytes.extend_from_slice(&more[HEADER_LEN as usize..]);
        assert!(matches!(
            scan(&bytes[..], LIMITS),
            Err(LogError::Corrupt { .. })
        ));
    }

    #[test]
    fn records_over_the_limits_are_refused() {
        let big = "x".repeat(LIMITS.max_value_bytes + 1);
        let (bytes, _) = write(&[put("k", &big, 1, None), put("k", "v", 2, None)]);
        assert!(matches!(
            scan(&bytes[..], LIMITS),
            Err(LogError::Corrupt { .. })
        ));
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        (
            proptest::collection::vec(any::<u8>(), 1..40),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
            1u64..u64::MAX,
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(key, value, version, expires_at)| Mutation {
                key: Bytes::from(key),
                version,
                op: match value {
                    Some(v) => MutationOp::Put {
                        value: Bytes::from(v),
                        expires_at,
                    },
                    None => MutationOp::Delete,
                },
            })
    }

    proptest! {
        /// A log cut anywhere (a crash mid-append) reads as exactly the records wholly before
        /// the cut, and the cut is reported unless it falls on a record boundary.
        #[test]
        fn a_cut_anywhere_keeps_exactly_the_whole_records(
            ms in proptest::collection::vec(mutation(), 1..30),
            cut in any::<proptest::sample::Index>(),
        ) {
            let (bytes, starts) = write(&ms);
            let cut = HEADER_LEN as usize + cut.index(bytes.len() - HEADER_LEN as usize + 1);
            let report = scan(&bytes[..cut], LIMITS).expect("a cut is never corruption");
            let whole = starts.iter().filter(|&&s| s <= cut as u64).count() - 1;
            prop_assert_eq!(&report.records[..], &ms[..whole]);
            prop_assert_eq!(report.valid_len, starts[whole]);
            if starts.contains(&(cut as u64)) {
                prop_assert_eq!(report.outcome, ScanOutcome::Clean);
            } else {
                prop_assert_eq!(report.outcome, ScanOutcome::TornTail { offset: starts[whole] });
            }
        }

        /// Any bytes after a valid header: the reader returns, never panics, and never
        /// allocates more than one record's limit.
        #[test]
        fn garbage_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut bytes = Vec::from(&MAGIC[..]);
            bytes.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
            bytes.extend_from_slice(&tail);
            let _ = scan(&bytes[..], LIMITS);
        }
    }
}
