//! Positioned reads and writes on a backend's descriptors, shared by every backend.
//!
//! A READ reply is built by reading straight into the reply buffer's spare capacity (no
//! intermediate copy), optionally first without waiting for I/O, to learn what the page
//! cache already held; a WRITE is retried until complete or until an error after some
//! progress, which is then reported as a short write, as the kernel expects. This
//! module owns the only `unsafe` those need; it knows nothing of FUSE semantics.

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::filesystem::{Errno, Result};

/// Repeats `step(done)` — one system call that moves at most `total - done` bytes and
/// returns how many it moved, or -1 with errno — until `total` bytes have moved, the
/// call moves none (end of file), or it fails. EINTR is retried; an error after some
/// progress ends the loop with that progress (a short count, as the kernel expects),
/// an error before any is returned. Returns the bytes moved.
pub fn complete_io(total: usize, mut step: impl FnMut(usize) -> isize) -> Result<usize> {
    let mut done = 0usize;
    while done < total {
        let n = step(done);
        if n < 0 {
            let e = Errno::last();
            if e.0 == libc::EINTR {
                continue;
            }
            if done > 0 {
                break;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    Ok(done)
}

/// Appends up to `size` bytes read at `offset` to `out` (fewer at end of file).
pub fn read_at_into(fd: BorrowedFd<'_>, offset: u64, size: usize, out: &mut Vec<u8>) -> Result<()> {
    out.reserve(size);
    let start = out.len();
    let read = complete_io(size, |done| {
        let spare = out.spare_capacity_mut();
        // SAFETY: `spare` has at least `size - done` writable bytes (reserved above,
        // and `out`'s length grows only by what was read); pread writes at most that
        // many and returns how many.
        let n = unsafe {
            libc::pread64(
                fd.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                size - done,
                (offset + done as u64) as libc::off64_t,
            )
        };
        if n > 0 {
            // SAFETY: pread initialised `n` bytes right after the current length.
            unsafe { out.set_len(out.len() + n as usize) };
        }
        n
    })?;
    debug_assert_eq!(out.len(), start + read);
    Ok(())
}

/// Like [`read_at_into`], but first takes what the page cache already holds without
/// waiting for I/O (`preadv2` with `RWF_NOWAIT`), then reads the rest as usual. Returns
/// how many leading bytes were resident before this read: the caller may then tell the
/// pages it brought in from those another writer or reader left. `None`: the file
/// system cannot read without waiting (EOPNOTSUPP; the read was done as usual), so the
/// caller need not ask again. An error after the resident part is a short read.
pub fn read_at_into_noting_resident(
    fd: BorrowedFd<'_>,
    offset: u64,
    size: usize,
    out: &mut Vec<u8>,
) -> Result<Option<usize>> {
    out.reserve(size);
    let spare = out.spare_capacity_mut();
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: size,
    };
    // SAFETY: `iov` points at `size` writable bytes of `out`'s spare capacity (reserved
    // above); preadv2 writes at most that many and returns how many.
    let n = unsafe {
        libc::preadv2(
            fd.as_raw_fd(),
            &iov,
            1,
            offset as libc::off64_t,
            libc::RWF_NOWAIT,
        )
    };
    // EAGAIN (not cached), EINTR, EOPNOTSUPP (no such reads here) or a real error,
    // which the ordinary read below meets and reports: nothing counted as resident.
    let unsupported = n < 0 && Errno::last().0 == libc::EOPNOTSUPP;
    let resident = usize::try_from(n).unwrap_or(0).min(size);
    // SAFETY: preadv2 initialised `resident` bytes right after the current length.
    unsafe { out.set_len(out.len() + resident) };
    if resident < size {
        if let Err(e) = read_at_into(fd, offset + resident as u64, size - resident, out) {
            if resident == 0 {
                return Err(e);
            }
        }
    }
    Ok((!unsupported).then_some(resident))
}

/// Writes all of `data` at `offset`; returns how much was written (short only when an
/// error followed some progress).
pub fn write_all_at(fd: BorrowedFd<'_>, offset: u64, data: &[u8]) -> Result<u64> {
    complete_io(data.len(), |done| {
        let rest = &data[done..];
        // SAFETY: `rest` is readable for its whole length.
        unsafe {
            libc::pwrite64(
                fd.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                (offset + done as u64) as libc::off64_t,
            )
        }
    })
    .map(|n| n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn reads_append_and_stop_at_end_of_file() {
        let f = tempfile_with(b"hello world");
        let mut out = b"x".to_vec();
        read_at_into(f.as_fd(), 6, 100, &mut out).unwrap();
        assert_eq!(out, b"xworld");
        assert_eq!(write_all_at(f.as_fd(), 0, b"HELLO").unwrap(), 5);
        let mut out = Vec::new();
        read_at_into(f.as_fd(), 0, 5, &mut out).unwrap();
        assert_eq!(out, b"HELLO");
    }

    #[test]
    fn resident_reads_tell_cached_pages_from_pages_read_in() {
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        let f = tempfile_with(&data);
        f.sync_all().unwrap();
        // Just written: every page is cached.
        let mut out = Vec::new();
        let resident = read_at_into_noting_resident(f.as_fd(), 0, 1 << 20, &mut out).unwrap();
        assert_eq!((resident, out.len()), (Some(data.len()), data.len()));
        assert!(out == data);
        // Dropped (clean after the sync): the read brings the pages in again.
        // SAFETY: plain call on a descriptor the test owns.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
        let mut out = b"x".to_vec();
        let resident = read_at_into_noting_resident(f.as_fd(), 4096, 1 << 20, &mut out)
            .unwrap()
            .expect("ext4 reads without waiting");
        assert!(
            resident < data.len() - 4096,
            "{resident} bytes still resident"
        );
        assert!(out[1..] == data[4096..]);
        // At end of file nothing is read and nothing is resident.
        let mut out = Vec::new();
        let resident =
            read_at_into_noting_resident(f.as_fd(), data.len() as u64, 100, &mut out).unwrap();
        assert_eq!((resident, out.len()), (Some(0), 0));
    }

    fn tempfile_with(data: &[u8]) -> std::fs::File {
        // Tests run on parallel threads of one process: a name each. Beside the crate,
        // on the disk the checkout is on (a tmpfs /tmp has no page cache to drop).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!(".fsva-fileio-{}-{n}", std::process::id()));
        std::fs::write(&path, data).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}
