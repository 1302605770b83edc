//! The device-state stream: an appliance's state and the contents of its files, by
//! value, as one self-checking byte stream.
//!
//! A VMM moves a vhost-user device's state as bytes only
//! (`VHOST_USER_PROTOCOL_F_DEVICE_STATE`: a pipe, then the migration stream), so the
//! descriptors an appliance state refers to by index (mem's memfds) cannot travel
//! beside it as they do for a live restart on one host. This stream carries the
//! encoded appliance state (`fsva-appliance`'s format, unchanged) and then the
//! contents of each such file, in the order the state numbers them; the reader makes
//! new memfds of them, so the state restores exactly as if they had been lent.
//!
//! Format version 1, integers little-endian:
//!
//! ```text
//! "FSVAVUFS"  u32 version = 1  u32 flags = 0
//! u64 state length, state bytes
//! u32 file count, then per file:
//!     u64 size, u32 extent count, then per extent: u64 offset, u64 length, bytes
//!     (extents in ascending order, not overlapping, inside the size; holes stay holes)
//! "FSVAVEND"  u64 length of everything before this trailer  u64 CRC-64/XZ of it
//! ```
//!
//! Every count and length is checked against a limit before anything is allocated for
//! it, a stream that ends early or carries bytes after its trailer is refused, and the
//! checksum covers every byte. A reader returns nothing until the whole stream has been
//! read and checked. This module encodes and decodes; it never interprets the state it
//! carries and never restores anything.
//!
//! (The cross-host migration of mem, `fsva migrate`, moves contents in messages of
//! its own protocol; this is a stream format for transports that are one pipe. The two
//! may be unified.)

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

/// First bytes of a device-state stream.
pub const MAGIC: &[u8; 8] = b"FSVAVUFS";
/// First bytes of its trailer.
const TRAILER: &[u8; 8] = b"FSVAVEND";
/// The version this fsva writes and reads.
pub const VERSION: u32 = 1;

/// Largest encoded appliance state accepted (a mem state of a million files is about
/// a tenth of this).
pub const MAX_STATE: u64 = 1 << 30;
/// Most files a stream may carry (mem holds one memfd per file, bounded by the
/// descriptor limit).
pub const MAX_FILES: u32 = 1 << 22;
/// Largest file (sparse: only its extents take memory).
pub const MAX_FILE_SIZE: u64 = 1 << 44;
/// Most extents one file may be sent in (more data runs are sent coalesced).
pub const MAX_EXTENTS: u32 = 1 << 16;
/// Most content bytes a stream may carry in all.
pub const MAX_CONTENT: u64 = 1 << 40;

/// Bytes copied per read or write of file contents.
const CHUNK: usize = 1 << 20;

/// Why a device state could not be written or was refused.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{during}: {source}")]
    Io {
        during: String,
        source: std::io::Error,
    },
    #[error("not an fsva device state (it does not begin with FSVAVUFS): the source device is not fsva's or the stream is corrupt; refusing it")]
    NotFsva,
    #[error("device state format v{found}, this fsva reads v{VERSION}: run the same fsva version on both ends of the migration")]
    Version { found: u32 },
    #[error("the device state ends early (in {0}): the transfer was cut off; refusing it")]
    Truncated(String),
    #[error("{what} of {value} exceeds the limit of {limit}; refusing the device state")]
    TooLarge {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("the device state is malformed ({0}); refusing it")]
    Malformed(String),
    #[error("the device state's checksum does not match (corrupted in transit); refusing it")]
    Checksum,
}

fn io(during: impl Into<String>) -> impl FnOnce(std::io::Error) -> StreamError {
    let during = during.into();
    move |source| StreamError::Io { during, source }
}

fn limit(what: &'static str, value: u64, limit: u64) -> Result<(), StreamError> {
    if value > limit {
        return Err(StreamError::TooLarge { what, value, limit });
    }
    Ok(())
}

/// What a written stream held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Bytes of the whole stream.
    pub bytes: u64,
    pub files: u32,
    /// Bytes of file contents among them.
    pub content: u64,
}

/// A stream read whole and checked: the state and its files, as new memfds in the
/// order the state numbers them.
#[derive(Debug)]
pub struct Incoming {
    pub state: Vec<u8>,
    pub files: Vec<OwnedFd>,
}

/// CRC-64/XZ (ECMA-182 polynomial, reflected), table-driven.
#[derive(Clone, Copy)]
struct Crc64(u64);

const CRC_TABLE: [u64; 256] = {
    const POLY: u64 = 0xC96C_5795_D787_0F42;
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u64;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 == 1 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

impl Crc64 {
    fn new() -> Self {
        Crc64(!0)
    }

    fn update(&mut self, bytes: &[u8]) {
        let mut c = self.0;
        for &b in bytes {
            c = CRC_TABLE[((c ^ u64::from(b)) & 0xff) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }

    fn value(self) -> u64 {
        !self.0
    }
}

/// A writer that counts and checksums what passes through it.
struct Summed<W> {
    inner: W,
    crc: Crc64,
    count: u64,
}

impl<W: Write> Summed<W> {
    fn put(&mut self, bytes: &[u8], during: &str) -> Result<(), StreamError> {
        self.inner.write_all(bytes).map_err(io(during))?;
        self.crc.update(bytes);
        self.count += bytes.len() as u64;
        Ok(())
    }
}

/// The data runs of `file` (`size` bytes), found with SEEK_DATA/SEEK_HOLE; one run
/// of the whole size where the file system cannot say.
fn extents(file: BorrowedFd<'_>, size: u64) -> Result<Vec<(u64, u64)>, StreamError> {
    use rustix::fs::{seek, SeekFrom};
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut at = 0u64;
    while at < size {
        let start = match seek(file, SeekFrom::Data(at)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL) if runs.is_empty() => return Ok(vec![(0, size)]),
            Err(e) => return Err(io("finding a file's data")(e.into())),
        };
        if start >= size {
            break;
        }
        let end = match seek(file, SeekFrom::Hole(start)) {
            Ok(e) => e.min(size),
            Err(e) => return Err(io("finding a file's holes")(e.into())),
        };
        if end <= start {
            break;
        }
        if runs.len() as u32 == MAX_EXTENTS {
            // Too fragmented to send run by run: the rest goes as one run.
            let last = runs.last_mut().expect("MAX_EXTENTS > 0");
            last.1 = size - last.0;
            break;
        }
        runs.push((start, end - start));
        at = end;
    }
    Ok(runs)
}

/// Writes `state` and the contents of `files` (in this order, which is how the state
/// numbers them) as one device-state stream.
pub fn write<W: Write>(
    out: W,
    state: &[u8],
    files: &[BorrowedFd<'_>],
) -> Result<Summary, StreamError> {
    limit(
        "the appliance state's length",
        state.len() as u64,
        MAX_STATE,
    )?;
    limit("the file count", files.len() as u64, u64::from(MAX_FILES))?;
    let mut s = Summed {
        inner: std::io::BufWriter::with_capacity(64 << 10, out),
        crc: Crc64::new(),
        count: 0,
    };
    s.put(MAGIC, "writing the device state's header")?;
    s.put(&VERSION.to_le_bytes(), "writing the device state's header")?;
    s.put(&0u32.to_le_bytes(), "writing the device state's header")?;
    s.put(&(state.len() as u64).to_le_bytes(), "writing the state")?;
    s.put(state, "writing the state")?;
    s.put(
        &(files.len() as u32).to_le_bytes(),
        "writing the file count",
    )?;
    let mut content = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for (i, &fd) in files.iter().enumerate() {
        let during = format!("sending the contents of file {i}");
        let size = rustix::fs::fstat(fd)
            .map_err(|e| io(during.clone())(e.into()))?
            .st_size as u64;
        limit("a file's size", size, MAX_FILE_SIZE)?;
        let runs = extents(fd, size)?;
        s.put(&size.to_le_bytes(), &during)?;
        s.put(&(runs.len() as u32).to_le_bytes(), &during)?;
        let file = std::fs::File::from(fd.try_clone_to_owned().map_err(io(during.clone()))?);
        for (offset, len) in runs {
            content += len;
            limit("the files' contents", content, MAX_CONTENT)?;
            s.put(&offset.to_le_bytes(), &during)?;
            s.put(&len.to_le_bytes(), &during)?;
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK as u64) as usize;
                file.read_exact_at(&mut buf[..n], offset + done)
                    .map_err(io(during.clone()))?;
                s.put(&buf[..n], &during)?;
                done += n as u64;
            }
        }
    }
    let (length, crc) = (s.count, s.crc.value());
    let mut inner = s.inner;
    let mut trailer = TRAILER.to_vec();
    trailer.extend_from_slice(&length.to_le_bytes());
    trailer.extend_from_slice(&crc.to_le_bytes());
    inner
        .write_all(&trailer)
        .and_then(|()| inner.flush())
        .map_err(io("writing the device state's trailer"))?;
    Ok(Summary {
        bytes: length + trailer.len() as u64,
        files: files.len() as u32,
        content,
    })
}

/// A reader that checksums what it reads and calls an early end what it is.
struct Checked<R> {
    inner: R,
    crc: Crc64,
    count: u64,
}

impl<R: Read> Checked<R> {
    /// Reads exactly `buf.len()` bytes, unsummed.
    fn raw(&mut self, buf: &mut [u8], what: &str) -> Result<(), StreamError> {
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                StreamError::Truncated(what.to_string())
            } else {
                io(format!("reading the device state ({what})"))(e)
            }
        })
    }

    fn take(&mut self, buf: &mut [u8], what: &str) -> Result<(), StreamError> {
        self.raw(buf, what)?;
        self.crc.update(buf);
        self.count += buf.len() as u64;
        Ok(())
    }

    fn u32(&mut self, what: &str) -> Result<u32, StreamError> {
        let mut b = [0u8; 4];
        self.take(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: &str) -> Result<u64, StreamError> {
        let mut b = [0u8; 8];
        self.take(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// A new, empty memfd for a received file.
fn new_file() -> Result<std::fs::File, StreamError> {
    rustix::fs::memfd_create(c"fsva-migrated", rustix::fs::MemfdFlags::CLOEXEC)
        .map(std::fs::File::from)
        .map_err(|e| io("creating a memfd for a received file")(e.into()))
}

/// Reads a whole device-state stream and checks it: nothing is returned unless every
/// byte arrived, within the limits, and the checksum matches.
pub fn read<R: Read>(input: R) -> Result<Incoming, StreamError> {
    let mut r = Checked {
        inner: std::io::BufReader::with_capacity(64 << 10, input),
        crc: Crc64::new(),
        count: 0,
    };
    let mut magic = [0u8; 8];
    r.take(&mut magic, "the header")?;
    if &magic != MAGIC {
        return Err(StreamError::NotFsva);
    }
    let version = r.u32("the header")?;
    if version != VERSION {
        return Err(StreamError::Version { found: version });
    }
    let flags = r.u32("the header")?;
    if flags != 0 {
        return Err(StreamError::Malformed(format!(
            "unknown flags {flags:#x} in the header"
        )));
    }
    let state_len = r.u64("the state's length")?;
    limit("the appliance state's length", state_len, MAX_STATE)?;
    // Read in pieces: a length that lies about the stream allocates no more than came.
    let mut state = Vec::new();
    let mut piece = vec![0u8; CHUNK];
    while (state.len() as u64) < state_len {
        let n = (state_len - state.len() as u64).min(CHUNK as u64) as usize;
        r.take(&mut piece[..n], "the state")?;
        state.extend_from_slice(&piece[..n]);
    }
    let count = r.u32("the file count")?;
    limit("the file count", u64::from(count), u64::from(MAX_FILES))?;
    let mut files = Vec::with_capacity((count as usize).min(4096));
    let mut content = 0u64;
    for i in 0..count {
        let what = format!("file {i} of {count}");
        let size = r.u64(&what)?;
        limit("a file's size", size, MAX_FILE_SIZE)?;
        let runs = r.u32(&what)?;
        limit(
            "a file's extent count",
            u64::from(runs),
            u64::from(MAX_EXTENTS),
        )?;
        let file = new_file()?;
        file.set_len(size)
            .map_err(io(format!("sizing received {what}")))?;
        let mut end = 0u64;
        for _ in 0..runs {
            let offset = r.u64(&what)?;
            let len = r.u64(&what)?;
            let stop = offset.checked_add(len).filter(|&e| e <= size);
            let Some(stop) = stop.filter(|_| offset >= end && len > 0) else {
                return Err(StreamError::Malformed(format!(
                    "{what}: extent at {offset} of {len} bytes is empty, out of order or beyond its size {size}"
                )));
            };
            content += len;
            limit("the files' contents", content, MAX_CONTENT)?;
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK as u64) as usize;
                r.take(&mut piece[..n], &what)?;
                file.write_all_at(&piece[..n], offset + done)
                    .map_err(io(format!("storing received {what}")))?;
                done += n as u64;
            }
            end = stop;
        }
        files.push(OwnedFd::from(file));
    }
    let (length, crc) = (r.count, r.crc.value());
    let mut trailer = [0u8; 24];
    r.raw(&mut trailer, "the trailer")?;
    if &trailer[..8] != TRAILER {
        return Err(StreamError::Malformed(
            "no trailer where the stream should end".into(),
        ));
    }
    let said_length = u64::from_le_bytes(trailer[8..16].try_into().expect("8 bytes"));
    let said_crc = u64::from_le_bytes(trailer[16..24].try_into().expect("8 bytes"));
    if said_length != length {
        return Err(StreamError::Malformed(format!(
            "the trailer counts {said_length} bytes, {length} came"
        )));
    }
    if said_crc != crc {
        return Err(StreamError::Checksum);
    }
    let mut extra = [0u8; 1];
    match r.inner.read(&mut extra) {
        Ok(0) => {}
        Ok(_) => {
            return Err(StreamError::Malformed(
                "bytes after the end of the device state".into(),
            ))
        }
        Err(e) => return Err(io("reading past the device state's trailer")(e)),
    }
    Ok(Incoming { state, files })
}

/// The descriptors of `files`, borrowed, for [`write`].
pub fn borrowed<T: AsFd>(files: &[T]) -> Vec<BorrowedFd<'_>> {
    files.iter().map(|f| f.as_fd()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(contents: &[(u64, &[u8])], size: u64) -> OwnedFd {
        let f = new_file().unwrap();
        f.set_len(size).unwrap();
        for (off, bytes) in contents {
            f.write_all_at(bytes, *off).unwrap();
        }
        f.into()
    }

    fn contents(fd: &OwnedFd) -> Vec<u8> {
        let mut f = std::fs::File::from(fd.try_clone().unwrap());
        let mut out = Vec::new();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut out).unwrap();
        out
    }

    fn sample() -> (Vec<u8>, Vec<OwnedFd>) {
        let state = b"an appliance state".repeat(100);
        let files = vec![
            memfd(&[(0, b"hello")], 5),
            memfd(&[], 0),
            // Sparse: data at the start and 8 MiB in, a hole between, size beyond.
            memfd(&[(0, b"head"), (8 << 20, b"tail")], (8 << 20) + 4096),
            memfd(&[(0, &vec![7u8; 3 << 20])], 3 << 20),
        ];
        (state, files)
    }

    /// A small stream (no large file), for tests that read it thousands of times.
    fn encoded() -> Vec<u8> {
        let (state, mut files) = sample();
        files.pop();
        let mut out = Vec::new();
        write(&mut out, &state, &borrowed(&files)).unwrap();
        out
    }

    #[test]
    fn state_and_contents_round_trip_with_holes_kept_small() {
        let (state, files) = sample();
        let mut out = Vec::new();
        let summary = write(&mut out, &state, &borrowed(&files)).unwrap();
        assert_eq!(summary.bytes, out.len() as u64);
        assert_eq!(summary.files, 4);
        // The 8 MiB hole is not sent.
        assert!(out.len() < (4 << 20), "{} bytes", out.len());
        let back = read(&out[..]).unwrap();
        assert_eq!(back.state, state);
        assert_eq!(back.files.len(), files.len());
        for (a, b) in files.iter().zip(&back.files) {
            assert_eq!(contents(a), contents(b));
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let good = encoded();
        for cut in 0..good.len() {
            match read(&good[..cut]) {
                Err(StreamError::Truncated(_)) => {}
                other => panic!("cut at {cut} of {}: {other:?}", good.len()),
            }
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(read(&longer[..]), Err(StreamError::Malformed(_))));
    }

    #[test]
    fn corruption_is_caught() {
        let good = encoded();
        // A flipped bit anywhere: in a length (refused as too large, malformed or cut
        // short), in contents or state (checksum), in the trailer.
        for at in (0..good.len()).step_by(7).chain([good.len() - 1, 30]) {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            assert!(read(&bad[..]).is_err(), "flip at {at} went unnoticed");
        }
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(read(&bad[..]), Err(StreamError::NotFsva)));
        let mut bad = good.clone();
        bad[8] = 2;
        assert!(matches!(
            read(&bad[..]),
            Err(StreamError::Version { found: 2 })
        ));
        // A flipped content byte, lengths intact: only the checksum sees it.
        let mut bad = good;
        let at = bad.len() - 24 - 100;
        bad[at] ^= 1;
        assert!(matches!(read(&bad[..]), Err(StreamError::Checksum)));
    }

    /// A stream built by hand, with a valid trailer, so that only the check under test
    /// can refuse it.
    fn forged(body: &[u8]) -> Vec<u8> {
        let mut crc = Crc64::new();
        crc.update(body);
        let mut out = body.to_vec();
        out.extend_from_slice(TRAILER);
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc.value().to_le_bytes());
        out
    }

    fn header(state: &[u8]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(state.len() as u64).to_le_bytes());
        b.extend_from_slice(state);
        b
    }

    #[test]
    fn hostile_lengths_are_refused_before_allocation() {
        // A state "of" 2^63 bytes, a billion files, a file of 2^60 bytes.
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(1u64 << 63).to_le_bytes());
        assert!(matches!(
            read(&forged(&b)[..]),
            Err(StreamError::TooLarge { .. })
        ));
        let mut b = header(b"s");
        b.extend_from_slice(&1_000_000_000u32.to_le_bytes());
        assert!(matches!(
            read(&forged(&b)[..]),
            Err(StreamError::TooLarge { .. })
        ));
        let mut b = header(b"s");
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(
            read(&forged(&b)[..]),
            Err(StreamError::TooLarge { .. })
        ));
        // A state length within the limit but beyond what came: cut short, and only
        // what came was held.
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(MAX_STATE).to_le_bytes());
        b.extend_from_slice(b"short");
        assert!(matches!(read(&b[..]), Err(StreamError::Truncated(_))));
    }

    #[test]
    fn extents_out_of_order_overlapping_or_outside_are_refused() {
        let file = |runs: &[(u64, u64)], size: u64| {
            let mut b = header(b"s");
            b.extend_from_slice(&1u32.to_le_bytes());
            b.extend_from_slice(&size.to_le_bytes());
            b.extend_from_slice(&(runs.len() as u32).to_le_bytes());
            for &(off, len) in runs {
                b.extend_from_slice(&off.to_le_bytes());
                b.extend_from_slice(&len.to_le_bytes());
                b.extend(std::iter::repeat_n(1u8, len as usize));
            }
            forged(&b)
        };
        assert!(read(&file(&[(0, 4), (8, 4)], 16)[..]).is_ok());
        for (runs, size) in [
            (&[(8u64, 4u64), (0, 4)][..], 16u64), // out of order
            (&[(0, 8), (4, 4)][..], 16),          // overlapping
            (&[(12, 8)][..], 16),                 // beyond the size
            (&[(0, 0)][..], 16),                  // empty
            (&[(u64::MAX - 1, 2)][..], 16),       // wrapping
        ] {
            assert!(
                matches!(read(&file(runs, size)[..]), Err(StreamError::Malformed(_))),
                "{runs:?} in {size}"
            );
        }
    }

    #[test]
    fn nonzero_flags_are_refused() {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            read(&forged(&b)[..]),
            Err(StreamError::Malformed(_))
        ));
    }

    #[test]
    fn crc_is_crc64_xz() {
        let mut c = Crc64::new();
        c.update(b"123456789");
        assert_eq!(c.value(), 0x995D_C9BB_DF19_39FA);
    }
}
