//! Thin, safe wrappers over the raw system calls the backend issues: each one converts
//! its arguments to C form, makes exactly one call and maps failure to an `io::Error`
//! carrying the host errno. No policy lives here.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// Result of a libc call that returns -1 on failure.
pub fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Result of a libc call that returns a negative `ssize_t`/`long` on failure.
pub fn cvt_long(r: i64) -> io::Result<i64> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A name from the kernel as a C string; names with NUL bytes cannot exist (EINVAL).
pub fn cname(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The decimal name of `fd` inside /proc/self/fd.
pub fn fd_name(fd: RawFd) -> CString {
    // A decimal number never contains NUL.
    CString::new(fd.to_string()).unwrap_or_default()
}

/// The empty path used with `AT_EMPTY_PATH`.
pub const EMPTY: &CStr = c"";

pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid C string; the returned fd is fresh and owned by us.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode,
        )
    })?;
    // SAFETY: `fd` was just returned by openat.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn fstatfs(fd: BorrowedFd<'_>) -> io::Result<libc::statfs64> {
    let mut st = MaybeUninit::<libc::statfs64>::zeroed();
    // SAFETY: `st` is writable memory of the right size.
    cvt(unsafe { libc::fstatfs64(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatfs succeeded.
    Ok(unsafe { st.assume_init() })
}

/// `fdatasync(fd)` when `datasync`, else `fsync(fd)`.
pub fn sync(fd: BorrowedFd<'_>, datasync: bool) -> io::Result<()> {
    // SAFETY: plain calls on a descriptor the caller holds.
    cvt(unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })?;
    Ok(())
}

/// The inode flag of a directory whose names compare without case (`FS_CASEFOLD_FL`).
pub const FS_CASEFOLD_FL: u32 = 0x4000_0000;
/// The inode flag of an encrypted file or directory (`FS_ENCRYPT_FL`).
pub const FS_ENCRYPT_FL: u32 = 0x0000_0800;

/// The inode flags (`FS_IOC_GETFLAGS`) of the object open as `fd` (not `O_PATH`).
pub fn inode_flags(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // The kernel writes an int, though the request's size says long: room for both.
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes at most a long into `flags`, which we own.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) })?;
    Ok(flags as u32)
}

/// `dup(fd)` as an owned descriptor (with close-on-exec).
pub fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

/// `statx(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)` with the basic fields and the mount id.
pub fn statx_fd(fd: BorrowedFd<'_>, mask: u32, sync_flags: i32) -> io::Result<libc::statx> {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `stx` is writable memory of the right size.
    cvt(unsafe {
        libc::statx(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW | sync_flags,
            mask,
            stx.as_mut_ptr(),
        )
    })?;
    // SAFETY: statx succeeded and filled `stx`.
    Ok(unsafe { stx.assume_init() })
}

/// `statx(dir, name, AT_SYMLINK_NOFOLLOW)`: the object `name` names in `dir` itself.
pub fn statx_at(dir: BorrowedFd<'_>, name: &CStr, mask: u32) -> io::Result<libc::statx> {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `name` is a valid C string and `stx` writable memory of the right size.
    cvt(unsafe {
        libc::statx(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            mask,
            stx.as_mut_ptr(),
        )
    })?;
    // SAFETY: statx succeeded and filled `stx`.
    Ok(unsafe { stx.assume_init() })
}
