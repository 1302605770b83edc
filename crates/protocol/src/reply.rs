//! Encoding of reply and notification frames.
//!
//! A [`ReplyBuf`] is a reusable buffer that one worker fills with one frame at a time:
//! an [`OutHeader`] followed by the operation's reply body. Directory listings are packed
//! with [`DirentPacker`], which respects the size the kernel asked for. This module
//! decides nothing about file system semantics; it only lays bytes out.

use zerocopy::{Immutable, IntoBytes};

use crate::abi::*;

const HEADER: usize = core::mem::size_of::<OutHeader>();

/// A reusable buffer holding one outgoing frame.
#[derive(Debug, Default)]
pub struct ReplyBuf {
    buf: Vec<u8>,
}

impl ReplyBuf {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Vec::with_capacity(capacity),
        }
    }

    /// Starts a successful reply to `unique`; the body is appended by the caller.
    pub fn start(&mut self, unique: u64) -> &mut Vec<u8> {
        self.start_header(unique, 0)
    }

    fn start_header(&mut self, unique: u64, error: i32) -> &mut Vec<u8> {
        self.buf.clear();
        let h = OutHeader {
            len: 0,
            error,
            unique,
        };
        self.buf.extend_from_slice(h.as_bytes());
        &mut self.buf
    }

    /// A reply carrying only an error (`errno` is positive, as in `libc::ENOENT`).
    pub fn error(&mut self, unique: u64, errno: i32) -> &[u8] {
        self.start_header(unique, -errno.abs());
        self.finish()
    }

    /// A successful reply with no body.
    pub fn empty(&mut self, unique: u64) -> &[u8] {
        self.start(unique);
        self.finish()
    }

    /// A successful reply whose body is one ABI struct.
    pub fn value<T: IntoBytes + Immutable>(&mut self, unique: u64, body: &T) -> &[u8] {
        self.start(unique).extend_from_slice(body.as_bytes());
        self.finish()
    }

    /// A successful reply whose body is raw bytes (READ, READLINK, GETXATTR data).
    pub fn bytes(&mut self, unique: u64, body: &[u8]) -> &[u8] {
        self.start(unique).extend_from_slice(body);
        self.finish()
    }

    /// A notification frame (`unique == 0`, `error` holds the code).
    pub fn notification(&mut self, code: i32, parts: &[&[u8]]) -> &[u8] {
        let b = self.start_header(0, code);
        for p in parts {
            b.extend_from_slice(p);
        }
        self.finish()
    }

    /// Fixes the header's length field and returns the finished frame.
    pub fn finish(&mut self) -> &[u8] {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        &self.buf
    }

    /// The body written so far (after the header).
    pub fn body_len(&self) -> usize {
        self.buf.len().saturating_sub(HEADER)
    }
}

/// Packs `fuse_dirent` / `fuse_direntplus` records into a reply body of bounded size.
pub struct DirentPacker<'b> {
    out: &'b mut Vec<u8>,
    start: usize,
    limit: usize,
}

impl<'b> DirentPacker<'b> {
    /// Packs into `out` (after whatever it already holds) at most `limit` bytes.
    pub fn new(out: &'b mut Vec<u8>, limit: usize) -> Self {
        let start = out.len();
        Self { out, start, limit }
    }

    fn fits(&self, record: usize) -> bool {
        self.out.len() - self.start + record <= self.limit
    }

    /// Adds a READDIR entry; returns false (and adds nothing) when it does not fit.
    /// `off` is the cookie the kernel passes back to continue after this entry.
    pub fn push(&mut self, ino: u64, off: u64, typ: u32, name: &[u8]) -> bool {
        let record = dirent_size(name.len());
        if !self.fits(record) {
            return false;
        }
        self.put_dirent(ino, off, typ, name, record);
        true
    }

    /// Adds a READDIRPLUS entry with its lookup reply; false when it does not fit.
    pub fn push_plus(&mut self, entry: &EntryOut, off: u64, typ: u32, name: &[u8]) -> bool {
        let record = core::mem::size_of::<EntryOut>() + dirent_size(name.len());
        if !self.fits(record) {
            return false;
        }
        self.out.extend_from_slice(entry.as_bytes());
        self.put_dirent(
            entry.attr.ino,
            off,
            typ,
            name,
            record - core::mem::size_of::<EntryOut>(),
        );
        true
    }

    fn put_dirent(&mut self, ino: u64, off: u64, typ: u32, name: &[u8], record: usize) {
        let d = Dirent {
            ino,
            off,
            namelen: name.len() as u32,
            typ,
        };
        let before = self.out.len();
        self.out.extend_from_slice(d.as_bytes());
        self.out.extend_from_slice(name);
        self.out.resize(before + record, 0);
    }

    /// Bytes still free in this reply.
    pub fn room(&self) -> usize {
        self.limit.saturating_sub(self.out.len() - self.start)
    }

    /// Whether nothing has been packed yet.
    pub fn is_empty(&self) -> bool {
        self.out.len() == self.start
    }
}

/// The `max_write` an INIT reply frame asks for (0 if the frame is too short to hold
/// one): `fuse_init_out.max_write` sits 20 bytes into the body.
pub fn init_reply_max_write(frame: &[u8]) -> u32 {
    frame
        .get(36..40)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
}

/// Size of a `fuse_dirent` with a name of `namelen` bytes, padded to 8.
pub fn dirent_size(namelen: usize) -> usize {
    (core::mem::size_of::<Dirent>() + namelen + 7) & !7
}

/// Frame of a `FUSE_NOTIFY_INVAL_ENTRY` notification.
pub fn notify_inval_entry<'a>(buf: &'a mut ReplyBuf, parent: u64, name: &[u8]) -> &'a [u8] {
    let arg = NotifyInvalEntryOut {
        parent,
        namelen: name.len() as u32,
        flags: 0,
    };
    buf.notification(notify::INVAL_ENTRY, &[arg.as_bytes(), name, &[0]])
}

/// Frame of a `FUSE_NOTIFY_INVAL_INODE` notification (`len == 0`: attributes only;
/// negative: all data).
pub fn notify_inval_inode(buf: &mut ReplyBuf, ino: u64, off: i64, len: i64) -> &[u8] {
    let arg = NotifyInvalInodeOut { ino, off, len };
    buf.notification(notify::INVAL_INODE, &[arg.as_bytes()])
}

/// Frame of a `FUSE_NOTIFY_RESEND` notification: the kernel requeues every request that
/// was read but not answered, marking them with [`UNIQUE_RESEND`].
pub fn notify_resend(buf: &mut ReplyBuf) -> &[u8] {
    buf.notification(notify::RESEND, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromBytes;

    #[test]
    fn init_reply_max_write_is_read_where_the_kernel_reads_it() {
        let mut b = ReplyBuf::default();
        let out = crate::abi::InitOut {
            max_write: 123_456,
            ..Default::default()
        };
        assert_eq!(init_reply_max_write(b.value(1, &out)), 123_456);
        assert_eq!(init_reply_max_write(&[0u8; 20]), 0);
    }

    #[test]
    fn error_reply_has_negative_errno_and_length() {
        let mut b = ReplyBuf::default();
        let f = b.error(42, libc_enoent());
        let (h, rest) = OutHeader::read_from_prefix(f).unwrap();
        assert_eq!(h.len as usize, f.len());
        assert_eq!(h.error, -2);
        assert_eq!(h.unique, 42);
        assert!(rest.is_empty());
    }

    fn libc_enoent() -> i32 {
        2
    }

    #[test]
    fn dirents_are_padded_and_bounded() {
        let mut out = Vec::new();
        let mut p = DirentPacker::new(&mut out, 64);
        assert!(p.push(5, 1, 8, b"abc"));
        assert!(!p.push(6, 2, 8, b"defghijkl"));
        // 32 + 40 = 72 > 64: the second did not fit.
        assert_eq!(out.len(), 32);
        let mut out = Vec::new();
        let mut p = DirentPacker::new(&mut out, 4096);
        assert!(p.push(5, 1, 8, b"abc"));
        assert!(p.push(6, 2, 8, b"defghijkl"));
        assert_eq!(out.len(), 32 + 40);
        let (d, _) = Dirent::read_from_prefix(&out[32..]).unwrap();
        assert_eq!((d.ino, d.off, d.namelen), (6, 2, 9));
    }
}
