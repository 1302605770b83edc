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
    let fd = cvt(unsafe { libc::open(cs(p).as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn mkdir(p: impl AsRef<Path>, mode: u32) -> Res<()> {
    cvt(unsafe { libc::mkdir(cs(p).as_ptr(), mode) }).map(drop)
}

pub fn rmdir(p: impl AsRef<Path>) -> Res<()> {
    cvt(unsafe { libc::rmdir(cs(p).as_ptr()) }).map(drop)
}

pub fn unlink(p: impl AsRef<Path>) -> Res<()> {
    cvt(unsafe { libc::unlink(cs(p).as_ptr()) }).map(drop)
}

pub fn rename(a: impl AsRef<Path>, b: impl AsRef<Path>) -> Res<()> {
    cvt(unsafe { libc::rename(cs(a).as_ptr(), cs(b).as_ptr()) }).map(drop)
}

pub fn renameat2(a: impl AsRef<Path>, b: impl AsRef<Path>, flags: u32) -> Res<()> {
    let (a, b) = (cs(a), cs(b));
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
    cvt(unsafe { libc::link(cs(a).as_ptr(), cs(b).as_ptr()) }).map(drop)
}

pub fn symlink(target: &str, p: impl AsRef<Path>) -> Res<()> {
    cvt(unsafe { libc::symlink(cstr(target).as_ptr(), cs(p).as_ptr()) }).map(drop)
}

/// readlink with an explicit buffer size; returns the bytes the kernel filled in.
pub fn readlink_buf(p: impl AsRef<Path>, size: usize) -> Res<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let n =
        cvt_long(unsafe { libc::readlink(cs(p).as_ptr(), buf.as_mut_ptr().cast(), size) as i64 })?;
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn readlink(p: impl AsRef<Path>) -> Res<String> {
    readlink_buf(p, 8192).map(|b| String::from_utf8_lossy(&b).into_owned())
}

pub fn stat(p: impl AsRef<Path>) -> Res<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::stat(cs(p).as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn lstat(p: impl AsRef<Path>) -> Res<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::lstat(cs(p).as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn fstat(fd: &impl AsRawFd) -> Res<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

pub fn chmod(p: impl AsRef<Path>, mode: u32) -> Res<()> {
    cvt(unsafe { libc::chmod(cs(p).as_ptr(), mode) }).map(drop)
}

/// chown; pass `u32::MAX` to leave a field unchanged.
pub fn chown(p: impl AsRef<Path>, uid: u32, gid: u32) -> Res<()> {
    cvt(unsafe { libc::chown(cs(p).as_ptr(), uid, gid) }).map(drop)
}

pub fn lchown(p: impl AsRef<Path>, uid: u32, gid: u32) -> Res<()> {
    cvt(unsafe { libc::lchown(cs(p).as_ptr(), uid, gid) }).map(drop)
}

pub fn truncate(p: impl AsRef<Path>, len: i64) -> Res<()> {
    cvt(unsafe { libc::truncate(cs(p).as_ptr(), len) }).map(drop)
}

pub fn ftruncate(fd: &impl AsRawFd, len: i64) -> Res<()> {
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
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, cs(p).as_ptr(), ptr, flags) }).map(drop)
}

pub fn mknod(p: impl AsRef<Path>, mode: u32, dev: u64) -> Res<()> {
    cvt(unsafe { libc::mknod(cs(p).as_ptr(), mode, dev) }).map(drop)
}

pub fn access(p: impl AsRef<Path>, mode: i32) -> Res<()> {
    cvt(unsafe { libc::access(cs(p).as_ptr(), mode) }).map(drop)
}

pub fn write(fd: &impl AsRawFd, buf: &[u8]) -> Res<usize> {
    cvt_long(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) as i64 })
        .map(|n| n as usize)
}

pub fn pwrite(fd: &impl AsRawFd, buf: &[u8], off: i64) -> Res<usize> {
    cvt_long(unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off) as i64 })
        .map(|n| n as usize)
}

pub fn read(fd: &impl AsRawFd, len: usize) -> Res<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let n = cvt_long(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), len) as i64 })?;
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn pread(fd: &impl AsRawFd, len: usize, off: i64) -> Res<Vec<u8>> {
    let mut buf = vec![0u8; len];
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
    cvt_long(unsafe { libc::lseek(fd.as_raw_fd(), off, whence) })
}

pub fn fsync(fd: &impl AsRawFd) -> Res<()> {
    cvt(unsafe { libc::fsync(fd.as_raw_fd()) }).map(drop)
}

pub fn fdatasync(fd: &impl AsRawFd) -> Res<()> {
    cvt(unsafe { libc::fdatasync(fd.as_raw_fd()) }).map(drop)
}

pub fn fallocate(fd: &impl AsRawFd, mode: i32, off: i64, len: i64) -> Res<()> {
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
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::statfs(cs(p).as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn statvfs(p: impl AsRef<Path>) -> Res<libc::statvfs> {
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::statvfs(cs(p).as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn statx(p: impl AsRef<Path>, flags: i32, mask: u32) -> Res<libc::statx> {
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::statx(libc::AT_FDCWD, cs(p).as_ptr(), flags, mask, &mut st) })?;
    Ok(st)
}

pub fn setxattr(p: impl AsRef<Path>, name: &str, val: &[u8], flags: i32) -> Res<()> {
    let (p, n) = (cs(p), cstr(name));
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
    let r = cvt_long(unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), ptr, size) as i64 })?;
    buf.resize(r as usize, 0);
    Ok(buf)
}

/// All xattr names of `p`, sorted.
pub fn listxattr(p: impl AsRef<Path>) -> Res<Vec<String>> {
    let p = cs(p);
    let mut buf = vec![0u8; 65536];
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
    cvt_long(unsafe { libc::listxattr(p.as_ptr(), ptr, size) as i64 }).map(|n| n as usize)
}

pub fn removexattr(p: impl AsRef<Path>, name: &str) -> Res<()> {
    let (p, n) = (cs(p), cstr(name));
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
    unsafe { libc::geteuid() }
}

pub fn getegid() -> u32 {
    unsafe { libc::getegid() }
}
