//! Directory streams: a directory opened for reading, listed with `getdents64`, whose
//! entries carry the underlying file system's own `d_off` cookies. READDIR's offset is
//! such a cookie (0 for the start), so each call seeks to it and lists from there; the
//! kernel's position therefore survives concurrent changes exactly as on the host.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;

/// One entry as `getdents64` returned it.
pub struct DirEntry<'a> {
    pub ino: u64,
    /// Cookie of the entry after this one.
    pub next: u64,
    /// `DT_*` type.
    pub typ: u8,
    pub name: &'a OsStr,
}

/// An open directory; listing is serialised per stream (seek + read must pair up).
pub struct DirStream {
    fd: OwnedFd,
    lock: Mutex<()>,
}

/// Bytes read per `getdents64` call.
const BUF_BYTES: usize = 32 * 1024;

impl DirStream {
    pub fn new(fd: OwnedFd) -> Self {
        Self {
            fd,
            lock: Mutex::new(()),
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Calls `f` for each entry after cookie `offset` until it returns false (that entry
    /// is then not consumed) or the directory ends.
    pub fn read_from(
        &self,
        offset: u64,
        mut f: impl FnMut(&DirEntry<'_>) -> bool,
    ) -> io::Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let fd = self.fd.as_raw_fd();
        // SAFETY: plain lseek on our own descriptor.
        if unsafe { libc::lseek64(fd, offset as i64, libc::SEEK_SET) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // u64 elements keep the records 8-byte aligned.
        let mut buf = vec![0u64; BUF_BYTES / 8];
        loop {
            // SAFETY: `buf` is writable for BUF_BYTES bytes.
            let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), BUF_BYTES) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                return Ok(());
            }
            // SAFETY: the kernel initialised the first `n` bytes of `buf`.
            let bytes =
                unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
            let mut pos = 0usize;
            while pos + 19 <= bytes.len() {
                // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
                let rec = &bytes[pos..];
                let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or_default());
                let next = u64::from_ne_bytes(rec[8..16].try_into().unwrap_or_default());
                let reclen =
                    u16::from_ne_bytes(rec[16..18].try_into().unwrap_or_default()) as usize;
                let typ = rec[18];
                if reclen < 19 || pos + reclen > bytes.len() {
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
                let raw = &rec[19..reclen];
                let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                let e = DirEntry {
                    ino,
                    next,
                    typ,
                    name: OsStr::from_bytes(&raw[..len]),
                };
                if !f(&e) {
                    return Ok(());
                }
                pos += reclen;
            }
        }
    }
}
