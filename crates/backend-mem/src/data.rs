//! File contents: one memfd per regular file, and the space accounting for all of them.
//!
//! Every data operation is the matching system call on the memfd (pread, pwrite,
//! ftruncate, fallocate, lseek, copy_file_range, fstat), so the memfd can later be handed
//! to the kernel as a FUSE passthrough backing file or moved to another process as is.
//!
//! Space is accounted by what the memfds really allocate (`st_blocks`), refreshed after
//! every operation that can change it. Before a write the allocation it can cause is
//! estimated (the holes in the written range, whole pages); a write that does not fit
//! is shortened, and fails with ENOSPC when not even one page fits. Concurrent writers
//! to different files may overshoot the capacity by at most their in-flight sizes.
//! Metadata (directories, names, xattrs, symlinks) is not charged.
//!
//! This module must never touch inode metadata (times, modes, names) or take the
//! metadata lock: the caller drops that lock before calling in here.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use fsva_appliance::{Errno, Keeper, Result};

use crate::attr::Time;

const PAGE: u64 = 4096;

fn cvt(r: libc::c_long) -> Result<u64> {
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r as u64)
    }
}

/// Most a single restored file may claim to occupy (far above any memfd's size, far
/// below what would make the sum of 2^20 files wrap).
const MAX_CHARGE: u64 = 1 << 40;

/// Capacity and usage shared by all files of one file system, and where their memfds
/// are kept for a successor.
pub struct Space {
    /// Bytes the file system may hold; changed at run time by the cache budget.
    capacity: AtomicU64,
    used: AtomicU64,
    /// The supervisor's safe-keeping: every memfd is given to it when made, so file
    /// contents outlive this appliance (crash recovery). Set once a rebuilt state is
    /// complete, so that nothing dropped while rebuilding is given back.
    keeper: std::sync::OnceLock<Arc<dyn Keeper>>,
    /// Id of the next memfd (unique in the mount, across successors).
    next_id: AtomicU64,
    /// Where new files' memfds come from when not made here: memfds the runtime
    /// registered as backing files ahead (see `fsva_appliance::spares`).
    memfds: std::sync::OnceLock<Arc<dyn fsva_appliance::MemfdSource>>,
}

impl std::fmt::Debug for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Space")
            .field("capacity", &self.capacity)
            .field("used", &self.used)
            .field("kept", &self.keeper.get().is_some())
            .finish()
    }
}

impl Space {
    pub fn new(capacity: u64) -> Arc<Space> {
        Self::kept(capacity, None, 1)
    }

    /// A space whose memfds go to `keeper` as they are made, numbered from `first_id`.
    pub fn kept(capacity: u64, keeper: Option<Arc<dyn Keeper>>, first_id: u64) -> Arc<Space> {
        let cell = std::sync::OnceLock::new();
        if let Some(k) = keeper {
            let _ = cell.set(k);
        }
        Arc::new(Space {
            capacity: AtomicU64::new(capacity),
            used: AtomicU64::new(0),
            keeper: cell,
            next_id: AtomicU64::new(first_id.max(1)),
            memfds: std::sync::OnceLock::new(),
        })
    }

    /// From now on memfds go to `keeper` (after a state was rebuilt).
    pub(crate) fn attach_keeper(&self, keeper: Arc<dyn Keeper>) {
        let _ = self.keeper.set(keeper);
    }

    /// New files' memfds come from `source` when it has one.
    pub(crate) fn take_memfds_from(&self, source: Arc<dyn fsva_appliance::MemfdSource>) {
        let _ = self.memfds.set(source);
    }

    /// Whether memfds are kept by the supervisor.
    pub fn is_kept(&self) -> bool {
        self.keeper.get().is_some()
    }

    fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The id the next memfd will get.
    pub(crate) fn peek_next_id(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed)
    }

    /// Moves the id counter past `id` (after a restore); never back.
    pub(crate) fn ids_after(&self, id: u64) {
        self.next_id
            .fetch_max(id.saturating_add(1), Ordering::Relaxed);
    }

    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Sets a new capacity; below what is used, new writes get ENOSPC until files shrink.
    pub fn set_capacity(&self, bytes: u64) {
        self.capacity.store(bytes, Ordering::Relaxed);
    }

    /// Bytes allocated by file data.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn free(&self) -> u64 {
        self.capacity().saturating_sub(self.used())
    }
}

/// The contents of one regular file.
#[derive(Debug)]
pub struct FileData {
    /// Names the memfd to the supervisor's keeper and in checkpoints and the journal.
    id: u64,
    fd: OwnedFd,
    /// Shared by plain writes; exclusive for O_APPEND writes and size changes, so an
    /// append lands at the true end of file atomically with respect to other writes.
    io: RwLock<()>,
    /// Bytes this file has charged to `space` (its last seen `st_blocks * 512`).
    charged: Mutex<u64>,
    space: Arc<Space>,
}

impl Drop for FileData {
    fn drop(&mut self) {
        let c = *self.charged.lock().unwrap_or_else(|e| e.into_inner());
        self.space.used.fetch_sub(c, Ordering::Relaxed);
        if let Some(k) = self.space.keeper.get() {
            k.release(self.id);
        }
    }
}

impl AsFd for FileData {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl FileData {
    pub fn new(space: Arc<Space>) -> Result<FileData> {
        let fd = match space.memfds.get().and_then(|s| s.fresh_memfd()) {
            Some(fd) => fd,
            None => Self::make_memfd()?,
        };
        let id = space.new_id();
        if let Some(k) = space.keeper.get() {
            k.keep(id, fd.as_fd());
        }
        Ok(FileData {
            id,
            fd,
            io: RwLock::new(()),
            charged: Mutex::new(0),
            space,
        })
    }

    fn make_memfd() -> Result<OwnedFd> {
        // SAFETY: a NUL-terminated name; memfd_create returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"fsva-mem".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            let e = Errno::last();
            if e.0 == libc::EMFILE || e.0 == libc::ENFILE {
                // Every file's contents are a memfd: the descriptor limit is the file
                // system's file limit. Say so, and answer as a full file system does.
                tracing::warn!(
                    "mem is out of descriptors for file contents (RLIMIT_NOFILE); \
                     refusing new files with ENOSPC"
                );
                return Err(Errno(libc::ENOSPC));
            }
            return Err(e);
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// File data restored from a snapshot: the predecessor's memfd `id` (kept by the
    /// supervisor already), with what it had charged to the space (bounded, so a lying
    /// predecessor cannot wrap the count; no system call per file, which would cost the
    /// restart 8 ms per 10,000 files).
    pub(crate) fn restored(id: u64, fd: OwnedFd, charged: u64, space: Arc<Space>) -> FileData {
        let charged = charged.min(MAX_CHARGE);
        space.used.fetch_add(charged, Ordering::Relaxed);
        FileData {
            id,
            fd,
            io: RwLock::new(()),
            charged: Mutex::new(charged),
            space,
        }
    }

    /// An empty stand-in for memfd `id`, which the supervisor no longer keeps (its file
    /// was removed), while a journal is replayed; never given to the keeper.
    pub(crate) fn placeholder(id: u64, space: Arc<Space>) -> std::io::Result<FileData> {
        // SAFETY: a NUL-terminated name; memfd_create returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"fsva-lost".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self::restored(id, fd, 0, space))
    }

    /// File data taken over from a predecessor that kept no journal (its memfd came
    /// with its state): a new id, and given to the keeper like a new file's.
    pub(crate) fn adopted(fd: OwnedFd, charged: u64, space: Arc<Space>) -> FileData {
        let id = space.new_id();
        if let Some(k) = space.keeper.get() {
            k.keep(id, fd.as_fd());
        }
        Self::restored(id, fd, charged, space)
    }

    /// Sets what this file has charged to the space (replay of a journal record),
    /// bounded as for a restore.
    pub(crate) fn set_charged(&self, charged: u64) {
        let charged = charged.min(MAX_CHARGE);
        let mut c = self.charged.lock().unwrap_or_else(|e| e.into_inner());
        self.space.used.fetch_add(charged, Ordering::Relaxed);
        self.space.used.fetch_sub(*c, Ordering::Relaxed);
        *c = charged;
    }

    /// The id that names this memfd to the keeper.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Bytes this file has charged to the space.
    pub(crate) fn charged(&self) -> u64 {
        *self.charged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The memfd itself (to duplicate as a passthrough backing file).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// `(st_size, st_blocks)` of the memfd.
    pub fn stat(&self) -> Result<(u64, u64)> {
        self.fstat()
            .map(|st| (st.st_size as u64, st.st_blocks as u64))
    }

    fn fstat(&self) -> Result<libc::stat> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `st` is a writable stat buffer; fstat fills it on success.
        if unsafe { libc::fstat(self.raw(), st.as_mut_ptr()) } < 0 {
            return Err(Errno::last());
        }
        // SAFETY: fstat succeeded.
        Ok(unsafe { st.assume_init() })
    }

    /// The memfd's own (mtime, ctime). With FUSE passthrough the kernel writes the
    /// memfd directly, and only these times know about it.
    pub fn times(&self) -> Option<(Time, Time)> {
        let st = self.fstat().ok()?;
        Some((
            Time {
                sec: st.st_mtime,
                nsec: st.st_mtime_nsec as u32,
            },
            Time {
                sec: st.st_ctime,
                nsec: st.st_ctime_nsec as u32,
            },
        ))
    }

    /// Sets the memfd's mtime to the file's, so that the later of the two is always the
    /// file's real mtime (see [`FileData::times`]).
    pub fn set_mtime(&self, t: Time) {
        let times = [
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            libc::timespec {
                tv_sec: t.sec,
                tv_nsec: i64::from(t.nsec),
            },
        ];
        // SAFETY: a valid descriptor and a pointer to two initialised timespecs.
        unsafe { libc::futimens(self.raw(), times.as_ptr()) };
    }

    pub fn size(&self) -> Result<u64> {
        Ok(self.stat()?.0)
    }

    /// Re-reads st_blocks and moves the difference into the shared usage.
    fn recharge(&self) {
        let mut c = self.charged.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok((_, blocks)) = self.stat() {
            let now = blocks * 512;
            if now >= *c {
                self.space.used.fetch_add(now - *c, Ordering::Relaxed);
            } else {
                self.space.used.fetch_sub(*c - now, Ordering::Relaxed);
            }
            *c = now;
        }
    }

    /// Bytes in `[off, off+len)` not yet backed by memory, rounded out to pages.
    fn unallocated(&self, off: u64, len: u64) -> u64 {
        let start = off / PAGE * PAGE;
        let end = (off + len).div_ceil(PAGE) * PAGE;
        let mut holes = 0;
        let mut pos = start;
        while pos < end {
            let hole = match self.lseek(pos, libc::SEEK_HOLE as u32) {
                Ok(h) => h,
                // Past EOF: everything from here is a hole.
                Err(_) => pos,
            };
            if hole >= end {
                break;
            }
            let data = self
                .lseek(hole, libc::SEEK_DATA as u32)
                .unwrap_or(end)
                .min(end);
            holes += data - hole;
            pos = data;
        }
        holes
    }

    /// How many of `len` bytes at `off` may be written without exceeding the capacity.
    fn allowance(&self, off: u64, len: u64) -> Result<u64> {
        let free = self.space.free();
        if len.div_ceil(PAGE) * PAGE + PAGE <= free {
            return Ok(len);
        }
        let need = self.unallocated(off, len);
        if need <= free {
            return Ok(len);
        }
        // Write what fits: the allocated prefix plus as many new pages as are free.
        let fit = (free / PAGE * PAGE).saturating_sub(off % PAGE);
        if fit == 0 {
            return Err(Errno(libc::ENOSPC));
        }
        Ok(fit.min(len))
    }

    /// Appends up to `size` bytes from `off` to `out`, straight into its spare capacity.
    pub fn read_into(&self, off: u64, size: u32, out: &mut Vec<u8>) -> Result<()> {
        fsva_appliance::fileio::read_at_into(self.fd.as_fd(), off, size as usize, out)
    }

    fn pwrite_all(&self, off: u64, data: &[u8]) -> Result<u64> {
        fsva_appliance::fileio::write_all_at(self.fd.as_fd(), off, data)
    }

    /// Writes `data` at `off`, or at the end of file when `append`; returns the count.
    pub fn write(&self, off: u64, data: &[u8], append: bool) -> Result<u32> {
        if data.is_empty() {
            return Ok(0);
        }
        let n = if append {
            let _g = self.io.write().unwrap_or_else(|e| e.into_inner());
            let end = self.size()?;
            let len = self.allowance(end, data.len() as u64)?;
            self.pwrite_all(end, &data[..len as usize])?
        } else {
            let _g = self.io.read().unwrap_or_else(|e| e.into_inner());
            let len = self.allowance(off, data.len() as u64)?;
            self.pwrite_all(off, &data[..len as usize])?
        };
        self.recharge();
        Ok(n as u32)
    }

    /// Whether the file holds exactly `data` at `off` (and nothing is missing there).
    pub fn holds_at(&self, off: u64, data: &[u8]) -> bool {
        if self.size().map_or(true, |s| s < off + data.len() as u64) {
            return false;
        }
        let mut got = Vec::with_capacity(data.len());
        self.read_into(off, data.len() as u32, &mut got).is_ok() && got == data
    }

    pub fn truncate(&self, size: u64) -> Result<()> {
        let _g = self.io.write().unwrap_or_else(|e| e.into_inner());
        // SAFETY: plain syscall on an owned descriptor.
        let r = unsafe { libc::ftruncate(self.raw(), size as libc::off_t) };
        cvt(r as libc::c_long)?;
        drop(_g);
        self.recharge();
        Ok(())
    }

    /// fallocate(2) with modes 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE(|KEEP_SIZE).
    pub fn fallocate(&self, off: u64, len: u64, mode: i32) -> Result<()> {
        const ALLOWED: [i32; 5] = [
            0,
            libc::FALLOC_FL_KEEP_SIZE,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            libc::FALLOC_FL_ZERO_RANGE,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        ];
        if !ALLOWED.contains(&mode) {
            return Err(Errno(libc::EOPNOTSUPP));
        }
        let off_i = i64::try_from(off).map_err(|_| Errno::EINVAL)?;
        let len_i = i64::try_from(len).map_err(|_| Errno::EINVAL)?;
        if off_i.checked_add(len_i).is_none() {
            return Err(Errno(libc::EFBIG));
        }
        let _g = self.io.write().unwrap_or_else(|e| e.into_inner());
        if mode & libc::FALLOC_FL_PUNCH_HOLE == 0 && self.unallocated(off, len) > self.space.free()
        {
            return Err(Errno(libc::ENOSPC));
        }
        // SAFETY: plain syscall on an owned descriptor.
        let r = unsafe { libc::fallocate(self.raw(), mode, off_i, len_i) };
        cvt(r as libc::c_long)?;
        drop(_g);
        self.recharge();
        Ok(())
    }

    /// lseek(2) with SEEK_DATA / SEEK_HOLE (also SEEK_SET/SEEK_END for completeness).
    pub fn lseek(&self, off: u64, whence: u32) -> Result<u64> {
        let off = i64::try_from(off).map_err(|_| Errno(libc::ENXIO))?;
        // SAFETY: plain syscall on an owned descriptor; only its file offset changes,
        // which no other operation here uses.
        let r = unsafe { libc::lseek(self.raw(), off, whence as i32) };
        cvt(r as libc::c_long)
    }

    /// copy_file_range from this file to `dst`; returns the bytes copied.
    pub fn copy_to(&self, off_in: u64, dst: &FileData, off_out: u64, len: u64) -> Result<u64> {
        let len = dst.allowance(off_out, len)?;
        let _g = dst.io.read().unwrap_or_else(|e| e.into_inner());
        let mut oi = off_in as libc::loff_t;
        let mut oo = off_out as libc::loff_t;
        let done = fsva_appliance::fileio::complete_io(len as usize, |done| {
            let chunk = (len as usize - done).min(1 << 30);
            // SAFETY: both descriptors are owned and the offsets point to live locals.
            unsafe { libc::copy_file_range(self.raw(), &mut oi, dst.raw(), &mut oo, chunk, 0) }
        })? as u64;
        drop(_g);
        dst.recharge();
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_and_seek() {
        let space = Space::new(1 << 30);
        let f = FileData::new(space.clone()).unwrap();
        f.write(1 << 20, b"hello", false).unwrap();
        assert_eq!(f.size().unwrap(), (1 << 20) + 5);
        assert_eq!(f.lseek(0, libc::SEEK_DATA as u32).unwrap(), 1 << 20);
        assert_eq!(f.lseek(0, libc::SEEK_HOLE as u32).unwrap(), 0);
        assert!(space.used() <= 8192, "sparse: {}", space.used());
        let mut out = vec![9u8];
        f.read_into((1 << 20) - 2, 100, &mut out).unwrap();
        assert_eq!(out, b"\x09\0\0hello");
        f.fallocate(
            0,
            4096,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        )
        .unwrap();
        assert_eq!(
            f.fallocate(0, 1, 0x40).unwrap_err(),
            Errno(libc::EOPNOTSUPP)
        );
        drop(f);
        assert_eq!(space.used(), 0);
    }

    #[test]
    fn enospc_at_capacity() {
        let space = Space::new(64 * 1024);
        let f = FileData::new(space.clone()).unwrap();
        let buf = vec![1u8; 48 * 1024];
        assert_eq!(f.write(0, &buf, false).unwrap(), 48 * 1024);
        // Overwriting allocated data still works when the file system is nearly full.
        assert_eq!(f.write(0, &buf, false).unwrap(), 48 * 1024);
        let n = f.write(48 * 1024, &buf, true).unwrap();
        assert_eq!(n, 16 * 1024, "short write up to the capacity");
        assert_eq!(f.write(0, b"x", true).unwrap_err(), Errno(libc::ENOSPC));
        assert_eq!(
            f.fallocate(1 << 20, 8192, 0).unwrap_err(),
            Errno(libc::ENOSPC)
        );
        f.truncate(0).unwrap();
        assert_eq!(space.used(), 0);
        assert_eq!(f.write(0, b"x", true).unwrap(), 1);
    }
}
