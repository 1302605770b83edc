//! Thin, errno-preserving wrappers around the system calls the checks use.
//!
//! Every wrapper returns `Res<T>`, whose error is the raw errno rendered by name
//! (`EEXIST`, `ENOENT`, ...), so that observations can be printed as `err=EEXIST`.
//! Nothing here interprets results; that is the job of the checks.

use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

/// An errno value, displayed (also in `{:?}`) by its symbolic name.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Result of a system call wrapper.
pub type Res<T> = Result<T, Errno>;

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match errno_name(self.0) {
            Some(name) => f.write_str(name),
            None => write!(f, "E#{}", self.0),
        }
    }
}

fn errno_name(e: i32) -> Option<&'static str> {
    use libc::*;
    Some(match e {
        EPERM => "EPERM",
        ENOENT => "ENOENT",
        ESRCH => "ESRCH",
        EINTR => "EINTR",
        EIO => "EIO",
        ENXIO => "ENXIO",
        E2BIG => "E2BIG",
        EBADF => "EBADF",
        EAGAIN => "EAGAIN",
        ENOMEM => "ENOMEM",
        EACCES => "EACCES",
        EFAULT => "EFAULT",
        EBUSY => "EBUSY",
        EEXIST => "EEXIST",
        EXDEV => "EXDEV",
        ENODEV => "ENODEV",
        ENOTDIR => "ENOTDIR",
        EISDIR => "EISDIR",
        EINVAL => "EINVAL",
        ENFILE => "ENFILE",
        EMFILE => "EMFILE",
        ETXTBSY => "ETXTBSY",
        EFBIG => "EFBIG",
        ENOSPC => "ENOSPC",
        ESPIPE => "ESPIPE",
        EROFS => "EROFS",
        EMLINK => "EMLINK",
        ERANGE => "ERANGE",
        EDEADLK => "EDEADLK",
        ENAMETOOLONG => "ENAMETOOLONG",
        ENOLCK => "ENOLCK",
        ENOSYS => "ENOSYS",
        ENOTEMPTY => "ENOTEMPTY",
        ELOOP => "ELOOP",
        ENODATA => "ENODATA",
        EOVERFLOW => "EOVERFLOW",
        EOPNOTSUPP => "EOPNOTSUPP",
        ENOTTY => "ENOTTY",
        EDQUOT => "EDQUOT",
        ESTALE => "ESTALE",
        ECHILD => "ECHILD",
        _ => return None,
    })
}

/// The calling thread's current errno.
pub fn errno() -> Errno {
    Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// Converts a C-style `int` return (negative = error) into a `Res`.
pub fn cvt(ret: libc::c_int) -> Res<libc::c_int> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

/// Converts a C-style `ssize_t` / `long` return (negative = error) into a `Res`.
pub fn cvt_long(ret: i64) -> Res<i64> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

/// `ok` or `err=ENAME`.
pub fn show<T>(r: &Res<T>) -> String {
    match r {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("err={e}"),
    }
}

/// The value (via Display) or `err=ENAME`.
pub fn val<T: fmt::Display>(r: &Res<T>) -> String {
    match r {
        Ok(v) => v.to_string(),
        Err(e) => format!("err={e}"),
    }
}

/// Path to C string.
pub fn cs(p: impl AsRef<Path>) -> CString {
    CString::new(p.as_ref().as_os_str().as_bytes()).expect("path contains NUL")
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("string contains NUL")
}

/// Short sleep that makes a timestamp change visible (coarse kernel clocks tick every few ms).
pub fn tick() {
    std::thread::sleep(Duration::from_millis(25));
}

pub fn open(p: impl AsRef<Path>, flags: i32, mode: u32) -> Res<OwnedFd> {
    // SAFETY: the path is a NUL-terminated `CString` temporary alive until the end of the
    // statement; open does not retain the pointer.
    let fd = cvt(unsafe { libc::open(cs(p).as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: `fd` was just returned by a successful open, so it is a valid descriptor that
    // nothing else owns; the `OwnedFd` takes over closing it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn mkdir(p: impl AsRef<Path>, mode: u32) -> Res<()> {
    // SAFETY: the path is a NUL-terminated `CString` temporary alive for the whole call.
    cvt(unsafe { libc::mkdir(cs(p).as_ptr(), mode) }).map(drop)
}

pub fn rmdir(p: impl AsRef<Path>) -> Res<()> {
    // SAFETY: the path is a NUL-terminated `CString` temporary alive for the whole call.
    cvt(unsafe { libc::rmdir(cs(p).as_ptr()) }).map(drop)
}

pub fn unlink(p: impl AsRef<Path>) -> Res<()> {
    // SAFETY: the path is a NUL-terminated `CString` temporary alive for the whole call.
    cvt(unsafe { libc::unlink(cs(p).as_ptr()) }).map(drop)
}

pub fn rename(a: impl AsRef<Path>, b: impl AsRef<Path>) -> Res<()> {
    // SAFETY: both paths are NUL-terminated `CString` temporaries alive for the whole call.
    cvt(unsafe { libc::rename(cs(a).as_ptr(), cs(b).as_ptr()) }).map(drop)
}

pub fn renameat2(a: impl AsRef<Path>, b: impl AsRef<Path>, flags: u32) -> Res<()> {
    let (a, b) = (cs(a), cs(b));
    // SAFETY: `a` and `b` are NUL-terminated `CString`s that outlive the call; AT_FDCWD is
    // always a valid dirfd.
    cvt(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

pub fn link(a: impl AsRef<Path>, b: impl AsRef<Path>) -> Res<()> {
    // SAFETY: both paths are NUL-terminated `CString` temporaries alive for the whole call.
    cvt(unsafe { libc::link(cs(a).as_ptr(), cs(b).as_ptr()) }).map(drop)
}

pub fn symlink(target: &str, p: impl AsRef<Path>) -> Res<()> {
    // SAFETY: target and path are NUL-terminated `CString` temporaries alive for the call.
    cvt(unsafe { libc::symlink(cstr(target).as_ptr(), cs(p).as_ptr()) }).map(drop)
}

/// readlink with an explicit buffer size; returns the bytes the kernel filled in.
pub fn readlink_buf(p: impl AsRef<Path>, size: usize) -> Res<Vec<u8>> {
    let mut buf = vec![0u8; size];
    // SAFETY: the path is a NUL-terminated `CString` temporary alive for the call; `buf` is a
    // writable buffer of exactly `size` bytes and readlink writes at most `size` bytes.
    let n =
        cvt_long(unsafe { libc::readlink(cs(p).as_ptr(), buf.as_mut_ptr().cast(), size) as i64 })?;
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn readlink(p: impl AsRef<Path>) -> Res<String> {
    readlink_buf(p, 8192).map(|b| String::from_utf8_lossy(&b).into_owned())
}

pub fn stat(p: impl AsRef<Path>) -> Res<libc::stat> {
    // SAFETY: `libc::stat` is a plain C struct of integers, so all-zero bytes are a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a NUL-terminated `CString` alive for the call; `st` is a valid,
    // exclusively borrowed `stat` for the kernel to fill in.
    cvt(unsafe { libc::stat(cs(p).as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn lstat(p: impl AsRef<Path>) -> Res<libc::stat> {
    // SAFETY: `libc::stat` is a plain C struct of integers, so all-zero bytes are a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a NUL-terminated `CString` alive for the call; `st` is a valid,
    // exclusively borrowed `stat` for the kernel to fill in.
    cvt(unsafe { libc::lstat(cs(p).as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn fstat(fd: &impl AsRawFd) -> Res<libc::stat> {
    // SAFETY: `libc::stat` is a plain C struct of integers, so all-zero bytes are a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is a borrowed, open descriptor; `st` is a valid, exclusively
    // borrowed `stat` for the kernel to fill in.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

pub fn chmod(p: impl AsRef<Path>, mode: u32) -> Res<()> {
    // SAFETY: the path is a NUL-terminated `CString` temporary alive for the whole call.
    cvt(unsafe { libc::chmod(cs(p).as_ptr(), mode) }).map(drop)
}

/// chown; pass `u32::MAX` to leave a field unchanged.
pub fn chown(p: impl AsRef<Path>, uid: u32, gid: u32) -> Res<()> {
    // SAFETY: the path is a NUL-terminated `CString` temporary alive for the whole call.
    cvt(unsafe { libc::chown(cs(p).as_ptr(), uid, gid) }).map(drop)
}

pub fn lchown(p: impl AsRef<Path>, uid: u32, gid: u32) -> Res<()> {
    // SAFETY: the path is a NUL-terminated `CString` temporary alive for the whole call.
    cvt(unsafe { libc::lchown(cs(p).as_ptr(), uid, gid) }).map(drop)
}

pub fn truncate(p: impl AsRef<Path>, len: i64) -> Res<()> {
    // SAFETY: the path is a NUL-terminated `CString` temporary alive for the whole call.
    cvt(unsafe { libc::truncate(cs(p).as_ptr(), len) }).map(drop)
}

pub fn ftruncate(fd: &impl AsRawFd, len: i64) -> Res<()> {
    // SAFETY: plain integer arguments, no pointers involved.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(drop)
}

/// A timespec helper for utimensat.
pub fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

pub fn utimensat(p: impl AsRef<Path>, times: Option<[libc::timespec; 2]>, flags: i32) -> Res<()> {
    let ptr = times.as_ref().map_or(std::ptr::null(), |t| t.as_ptr());
    // SAFETY: the path is a NUL-terminated `CString` temporary alive for the call; `ptr` is
    // null or points to `times`, an array of two timespecs that outlives the call.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, cs(p).as_ptr(), ptr, flags) }).map(drop)
}

pub fn mknod(p: impl AsRef<Path>, mode: u32, dev: u64) -> Res<()> {
    // SAFETY: the path is a NUL-terminated `CString` temporary alive for the whole call.
    cvt(unsafe { libc::mknod(cs(p).as_ptr(), mode, dev) }).map(drop)
}

pub fn access(p: impl AsRef<Path>, mode: i32) -> Res<()> {
    // SAFETY: the path is a NUL-terminated `CString` temporary alive for the whole call.
    cvt(unsafe { libc::access(cs(p).as_ptr(), mode) }).map(drop)
}

pub fn write(fd: &impl AsRawFd, buf: &[u8]) -> Res<usize> {
    // SAFETY: `buf` is a live slice, readable for `buf.len()` bytes during the call.
    cvt_long(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) as i64 })
        .map(|n| n as usize)
}

pub fn pwrite(fd: &impl AsRawFd, buf: &[u8], off: i64) -> Res<usize> {
    // SAFETY: `buf` is a live slice, readable for `buf.len()` bytes during the call.
    cvt_long(unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off) as i64 })
        .map(|n| n as usize)
}

pub fn read(fd: &impl AsRawFd, len: usize) -> Res<Vec<u8>> {
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` is an owned, writable buffer of exactly `len` bytes.
    let n = cvt_long(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), len) as i64 })?;
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn pread(fd: &impl AsRawFd, len: usize, off: i64) -> Res<Vec<u8>> {
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` is an owned, writable buffer of exactly `len` bytes.
    let n =
        cvt_long(unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), len, off) as i64 })?;
    buf.truncate(n as usize);
    Ok(buf)
}

/// Creates/truncates `p` (mode 0644 before umask) and writes `data`.
pub fn write_file(p: impl AsRef<Path>, data: &[u8]) -> Res<()> {
    let fd = open(p, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o644)?;
    let mut done = 0;
    while done < data.len() {
        done += write(&fd, &data[done..])?;
    }
    Ok(())
}

/// Reads the whole file at `p`.
pub fn read_file(p: impl AsRef<Path>) -> Res<Vec<u8>> {
    let fd = open(p, libc::O_RDONLY, 0)?;
    read_fd_all(&fd)
}

/// Reads from the current offset of `fd` to EOF.
pub fn read_fd_all(fd: &impl AsRawFd) -> Res<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let chunk = read(fd, 65536)?;
        if chunk.is_empty() {
            return Ok(out);
        }
        out.extend_from_slice(&chunk);
    }
}

pub fn lseek(fd: &impl AsRawFd, off: i64, whence: i32) -> Res<i64> {
    // SAFETY: plain integer arguments, no pointers involved.
    cvt_long(unsafe { libc::lseek(fd.as_raw_fd(), off, whence) })
}

pub fn fsync(fd: &impl AsRawFd) -> Res<()> {
    // SAFETY: plain integer argument, no pointers involved.
    cvt(unsafe { libc::fsync(fd.as_raw_fd()) }).map(drop)
}

pub fn fdatasync(fd: &impl AsRawFd) -> Res<()> {
    // SAFETY: plain integer argument, no pointers involved.
    cvt(unsafe { libc::fdatasync(fd.as_raw_fd()) }).map(drop)
}

pub fn fallocate(fd: &impl AsRawFd, mode: i32, off: i64, len: i64) -> Res<()> {
    // SAFETY: plain integer arguments, no pointers involved.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off, len) }).map(drop)
}

/// copy_file_range with explicit offsets.
pub fn copy_file_range(
    src: &impl AsRawFd,
    src_off: i64,
    dst: &impl AsRawFd,
    dst_off: i64,
    len: usize,
) -> Res<usize> {
    let (mut so, mut d) = (src_off, dst_off);
    // SAFETY: `so` and `d` are live local i64s the kernel may update; the remaining arguments
    // are integers and flags=0, matching the copy_file_range(2) signature.
    let r = unsafe {
        libc::syscall(
            libc::SYS_copy_file_range,
            src.as_raw_fd(),
            &mut so as *mut i64,
            dst.as_raw_fd(),
            &mut d as *mut i64,
            len,
            0u32,
        )
    };
    cvt_long(r).map(|n| n as usize)
}

pub fn statfs(p: impl AsRef<Path>) -> Res<libc::statfs> {
    // SAFETY: `libc::statfs` is a plain C struct of integers, so all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a NUL-terminated `CString` alive for the call; `st` is a valid,
    // exclusively borrowed `statfs` for the kernel to fill in.
    cvt(unsafe { libc::statfs(cs(p).as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn statvfs(p: impl AsRef<Path>) -> Res<libc::statvfs> {
    // SAFETY: `libc::statvfs` is a plain C struct of integers, so all-zero bytes are a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a NUL-terminated `CString` alive for the call; `st` is a valid,
    // exclusively borrowed `statvfs` for the kernel to fill in.
    cvt(unsafe { libc::statvfs(cs(p).as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn statx(p: impl AsRef<Path>, flags: i32, mask: u32) -> Res<libc::statx> {
    // SAFETY: `libc::statx` is a plain C struct of integers, so all-zero bytes are a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a NUL-terminated `CString` alive for the call; `st` is a valid,
    // exclusively borrowed `statx` for the kernel to fill in.
    cvt(unsafe { libc::statx(libc::AT_FDCWD, cs(p).as_ptr(), flags, mask, &mut st) })?;
    Ok(st)
}

pub fn setxattr(p: impl AsRef<Path>, name: &str, val: &[u8], flags: i32) -> Res<()> {
    let (p, n) = (cs(p), cstr(name));
    // SAFETY: `p` and `n` are NUL-terminated `CString`s alive for the call; `val` is a live
    // slice readable for `val.len()` bytes.
    cvt(unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            val.as_ptr().cast(),
            val.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn lsetxattr(p: impl AsRef<Path>, name: &str, val: &[u8], flags: i32) -> Res<()> {
    let (p, n) = (cs(p), cstr(name));
    // SAFETY: `p` and `n` are NUL-terminated `CString`s alive for the call; `val` is a live
    // slice readable for `val.len()` bytes.
    cvt(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            val.as_ptr().cast(),
            val.len(),
            flags,
        )
    })
    .map(drop)
}

/// getxattr into a buffer of `size` bytes (0 = size query); returns the bytes (or, for a
/// size query, a vector whose length is the reported size, filled with zeros).
pub fn getxattr(p: impl AsRef<Path>, name: &str, size: usize) -> Res<Vec<u8>> {
    let (p, n) = (cs(p), cstr(name));
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    // SAFETY: `p` and `n` are NUL-terminated `CString`s alive for the call; `ptr` is null with
    // size 0 (size query) or points to `buf`, which is writable for exactly `size` bytes.
    let r = cvt_long(unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), ptr, size) as i64 })?;
    buf.resize(r as usize, 0);
    Ok(buf)
}

/// All xattr names of `p`, sorted.
pub fn listxattr(p: impl AsRef<Path>) -> Res<Vec<String>> {
    let p = cs(p);
    let mut buf = vec![0u8; 65536];
    // SAFETY: `p` is a NUL-terminated `CString` alive for the call; `buf` is writable for
    // `buf.len()` bytes, the size passed.
    let r = cvt_long(unsafe {
        libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) as i64
    })?;
    buf.truncate(r as usize);
    let mut names: Vec<String> = buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// listxattr with a caller-chosen buffer size; returns the size the kernel reported.
pub fn listxattr_size(p: impl AsRef<Path>, size: usize) -> Res<usize> {
    let p = cs(p);
    let mut buf = vec![0u8; size.max(1)];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    // SAFETY: `p` is a NUL-terminated `CString` alive for the call; `ptr` is null with size 0
    // or points to `buf`, which holds `size.max(1)` >= `size` writable bytes.
    cvt_long(unsafe { libc::listxattr(p.as_ptr(), ptr, size) as i64 }).map(|n| n as usize)
}

pub fn removexattr(p: impl AsRef<Path>, name: &str) -> Res<()> {
    let (p, n) = (cs(p), cstr(name));
    // SAFETY: `p` and `n` are NUL-terminated `CString`s alive for the call.
    cvt(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) }).map(drop)
}

/// Raw fd number helper for `/proc/self/fd/N` paths.
pub fn raw(fd: &impl AsRawFd) -> RawFd {
    fd.as_raw_fd()
}

/// Permission bits (including setuid/setgid/sticky) of a stat, in octal.
pub fn perm(st: &libc::stat) -> String {
    format!("{:04o}", st.st_mode & 0o7777)
}

/// One-letter file type of a stat mode.
pub fn ftype(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "reg",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "lnk",
        libc::S_IFIFO => "fifo",
        libc::S_IFCHR => "chr",
        libc::S_IFBLK => "blk",
        libc::S_IFSOCK => "sock",
        _ => "unknown",
    }
}

/// (sec, nsec) of a stat's ctime / mtime / atime.
pub fn ctime(st: &libc::stat) -> (i64, i64) {
    (st.st_ctime, st.st_ctime_nsec)
}
pub fn mtime(st: &libc::stat) -> (i64, i64) {
    (st.st_mtime, st.st_mtime_nsec)
}
pub fn atime(st: &libc::stat) -> (i64, i64) {
    (st.st_atime, st.st_atime_nsec)
}

/// Deterministic byte pattern for data checks.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed as u32) as u8)
        .collect()
}

pub fn geteuid() -> u32 {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

pub fn getegid() -> u32 {
    // SAFETY: getegid takes no arguments and cannot fail.
    unsafe { libc::getegid() }
}

/// Sets the process umask; returns the previous one.
pub fn umask(mask: u32) -> u32 {
    // SAFETY: umask takes an integer, cannot fail and touches no memory of ours.
    unsafe { libc::umask(mask) }
}

pub fn getpid() -> libc::pid_t {
    // SAFETY: getpid takes no arguments and cannot fail.
    unsafe { libc::getpid() }
}

pub fn mkfifo(p: impl AsRef<Path>, mode: u32) -> Res<()> {
    // SAFETY: the path is a NUL-terminated `CString` temporary that lives until the end of the
    // statement.
    cvt(unsafe { libc::mkfifo(cs(p).as_ptr(), mode) }).map(drop)
}

/// linkat with both paths relative to the current directory.
pub fn linkat(a: impl AsRef<Path>, b: impl AsRef<Path>, flags: i32) -> Res<()> {
    // SAFETY: both paths are NUL-terminated `CString` temporaries alive for the whole call;
    // AT_FDCWD is always a valid dirfd.
    cvt(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            cs(a).as_ptr(),
            libc::AT_FDCWD,
            cs(b).as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// dup(2): a second, independently owned descriptor for the same open file.
pub fn dup(fd: &impl AsRawFd) -> Res<OwnedFd> {
    // SAFETY: plain integer argument; `fd` is borrowed, so it stays open during the call.
    let new = cvt(unsafe { libc::dup(fd.as_raw_fd()) })?;
    // SAFETY: `new` was just returned by a successful dup, so it is a valid descriptor that
    // nothing else owns; the `OwnedFd` takes over closing it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Closes `fd` explicitly and reports close(2)'s result (dropping an `OwnedFd` ignores it).
pub fn close(fd: OwnedFd) -> Res<()> {
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    // SAFETY: `raw` came from an `OwnedFd` we consumed, so we are its sole owner and it is
    // closed exactly once.
    cvt(unsafe { libc::close(raw) }).map(drop)
}

/// getdents64(2) into `buf`; returns the number of bytes filled in (0 = end of directory).
pub fn getdents64(fd: &impl AsRawFd, buf: &mut [u8]) -> Res<usize> {
    // SAFETY: `buf` is an exclusively borrowed buffer writable for `buf.len()` bytes, the size
    // passed to the kernel.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    })
    .map(|n| n as usize)
}

/// A `struct flock` describing `kind` (F_RDLCK/F_WRLCK/F_UNLCK) on `start..start+len`.
pub fn lock_range(kind: i32, start: i64, len: i64) -> libc::flock {
    // SAFETY: `libc::flock` is a plain C struct of integers, so all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

/// fcntl(2) with a record-lock command (F_GETLK, F_SETLK, F_SETLKW or their OFD variants).
pub fn fcntl_lock(fd: &impl AsRawFd, cmd: i32, fl: &mut libc::flock) -> Res<()> {
    assert!(matches!(
        cmd,
        libc::F_GETLK
            | libc::F_SETLK
            | libc::F_SETLKW
            | libc::F_OFD_GETLK
            | libc::F_OFD_SETLK
            | libc::F_OFD_SETLKW
    ));
    // SAFETY: `cmd` is a lock command (asserted above), whose third argument is a pointer to a
    // `struct flock`; `fl` is a valid, exclusively borrowed one the kernel may read or fill in.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), cmd, fl as *mut libc::flock) }).map(drop)
}

/// flock(2).
pub fn flock(fd: &impl AsRawFd, op: i32) -> Res<()> {
    // SAFETY: plain integer arguments, no pointers involved.
    cvt(unsafe { libc::flock(fd.as_raw_fd(), op) }).map(drop)
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Installs a handler that does nothing for `sig`, without SA_RESTART, so that the signal
/// interrupts blocking system calls with EINTR instead of killing the process.
pub fn interrupt_on(sig: i32) -> Res<()> {
    // SAFETY: `libc::sigaction` is a plain C struct, so all-zero bytes are a valid value.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = ignore_signal as *const () as usize;
    sa.sa_flags = 0;
    // SAFETY: `sa.sa_mask` is a valid, exclusively borrowed sigset_t.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: `sa` is a fully initialised sigaction that outlives the call; the old action is
    // not requested (null). The handler is empty, hence trivially async-signal-safe.
    cvt(unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) }).map(drop)
}

/// Arms the one-shot real-time interval timer (SIGALRM) to fire after `usec` microseconds.
pub fn alarm_after_usec(usec: i64) -> Res<()> {
    let t = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        it_value: libc::timeval {
            tv_sec: 0,
            tv_usec: usec,
        },
    };
    // SAFETY: `t` is a valid itimerval that outlives the call; the old value is not requested.
    cvt(unsafe { libc::setitimer(libc::ITIMER_REAL, &t, std::ptr::null_mut()) }).map(drop)
}

/// setfsuid(2); returns the previous filesystem uid.
pub fn setfsuid(uid: u32) -> i32 {
    // SAFETY: plain integer argument; it only changes this process's credentials.
    unsafe { libc::setfsuid(uid) }
}

/// setfsgid(2); returns the previous filesystem gid.
pub fn setfsgid(gid: u32) -> i32 {
    // SAFETY: plain integer argument; it only changes this process's credentials.
    unsafe { libc::setfsgid(gid) }
}

pub fn setgroups(groups: &[u32]) -> Res<()> {
    // SAFETY: `groups` is a live slice of `groups.len()` gid_t values.
    cvt(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) }).map(drop)
}

pub fn setresgid(r: u32, e: u32, s: u32) -> Res<()> {
    // SAFETY: plain integer arguments, no pointers involved.
    cvt(unsafe { libc::setresgid(r, e, s) }).map(drop)
}

pub fn setresuid(r: u32, e: u32, s: u32) -> Res<()> {
    // SAFETY: plain integer arguments, no pointers involved.
    cvt(unsafe { libc::setresuid(r, e, s) }).map(drop)
}

/// clock_gettime(2); on failure the result stays zero.
pub fn clock_gettime(clock: libc::clockid_t) -> libc::timespec {
    let mut t = ts(0, 0);
    // SAFETY: `t` is a valid, exclusively borrowed timespec for the kernel to fill in.
    unsafe { libc::clock_gettime(clock, &mut t) };
    t
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> Res<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a writable array of two c_ints, as pipe2 requires.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both entries are fresh descriptors that nothing else owns;
    // each `OwnedFd` takes over closing one of them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// poll(2) for readability of one descriptor; returns the number of ready descriptors.
pub fn poll_in(fd: &impl AsRawFd, timeout_ms: i32) -> Res<i32> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid, exclusively borrowed array of exactly one pollfd.
    cvt(unsafe { libc::poll(&mut pfd, 1, timeout_ms) })
}

pub fn kill(pid: libc::pid_t, sig: i32) -> Res<()> {
    // SAFETY: plain integer arguments, no pointers involved.
    cvt(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// waitpid(2) without options; returns the wait status.
pub fn waitpid(pid: libc::pid_t) -> Res<i32> {
    let mut status = 0;
    // SAFETY: `status` is a valid, exclusively borrowed c_int for the kernel to fill in.
    cvt(unsafe { libc::waitpid(pid, &mut status, 0) })?;
    Ok(status)
}
