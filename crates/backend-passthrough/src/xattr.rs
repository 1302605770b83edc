//! Extended attributes of objects known only by an `O_PATH` descriptor.
//!
//! Preferred: the Linux 6.13+ `*xattrat` system calls. Where the kernel refuses an
//! `O_PATH` descriptor with `AT_EMPTY_PATH` (EBADF), they are aimed at the object's
//! magic link in /proc/self/fd instead (following it lands on the object itself, also
//! for symlinks). Kernels without them (ENOSYS) fall back to the classic path calls on
//! "/proc/self/fd/N". The working method is remembered process-wide.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU8, Ordering};

use fsva_appliance::Xattr;

use crate::sys::{cvt_long, fd_name, EMPTY};

#[cfg(target_arch = "x86_64")]
mod nr {
    pub const SETXATTRAT: libc::c_long = 463;
    pub const GETXATTRAT: libc::c_long = 464;
    pub const LISTXATTRAT: libc::c_long = 465;
    pub const REMOVEXATTRAT: libc::c_long = 466;
}
#[cfg(not(target_arch = "x86_64"))]
mod nr {
    // The generic syscall table (aarch64, riscv64, ...) uses the same numbers.
    pub const SETXATTRAT: libc::c_long = 463;
    pub const GETXATTRAT: libc::c_long = 464;
    pub const LISTXATTRAT: libc::c_long = 465;
    pub const REMOVEXATTRAT: libc::c_long = 466;
}

/// `struct xattr_args` of the `*xattrat` calls.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

const UNKNOWN: u8 = 0;
/// `*xattrat(node_fd, "", AT_EMPTY_PATH)` works.
const DIRECT: u8 = 1;
/// `*xattrat(proc_self_fd, "N", 0)` (O_PATH descriptors refused directly).
const VIA_PROC_AT: u8 = 2;
/// Classic `*xattr("/proc/self/fd/N")`.
const CLASSIC: u8 = 3;

static METHOD: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Where the xattr calls aim: the node's descriptor and the /proc/self/fd directory.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    pub node: BorrowedFd<'a>,
    pub proc_self_fd: BorrowedFd<'a>,
}

enum Call<'a> {
    At {
        dfd: i32,
        path: &'a CStr,
        flags: i32,
    },
    Classic {
        path: &'a CStr,
    },
}

/// Runs `f` with the best known method, falling through to the next one on EBADF/ENOSYS.
fn with_method(t: Target<'_>, mut f: impl FnMut(&Call<'_>) -> io::Result<i64>) -> io::Result<i64> {
    let name = fd_name(t.node.as_raw_fd());
    let classic = CString::new(format!("/proc/self/fd/{}", t.node.as_raw_fd())).unwrap_or_default();
    let mut m = METHOD.load(Ordering::Relaxed);
    if m == UNKNOWN {
        m = DIRECT;
    }
    loop {
        let call = match m {
            DIRECT => Call::At {
                dfd: t.node.as_raw_fd(),
                path: EMPTY,
                flags: libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            },
            VIA_PROC_AT => Call::At {
                dfd: t.proc_self_fd.as_raw_fd(),
                path: &name,
                flags: 0,
            },
            _ => Call::Classic { path: &classic },
        };
        match f(&call) {
            Err(e) if m == DIRECT && e.raw_os_error() == Some(libc::EBADF) => m = VIA_PROC_AT,
            Err(e) if m != CLASSIC && e.raw_os_error() == Some(libc::ENOSYS) => m = CLASSIC,
            r => {
                METHOD.store(m, Ordering::Relaxed);
                return r;
            }
        }
    }
}

/// Reads attribute `name`; `size == 0` asks only for its size.
pub fn get(t: Target<'_>, name: &CStr, size: u32) -> io::Result<Xattr> {
    let mut buf = vec![0u8; size as usize];
    let n = with_method(t, |c| {
        let ptr = if size == 0 {
            std::ptr::null_mut()
        } else {
            buf.as_mut_ptr()
        };
        // SAFETY: `ptr` is writable for `size` bytes (or null with size 0); strings are C strings.
        let r = unsafe {
            match *c {
                Call::At { dfd, path, flags } => {
                    let mut args = XattrArgs {
                        value: ptr as u64,
                        size,
                        flags: 0,
                    };
                    libc::syscall(
                        nr::GETXATTRAT,
                        dfd,
                        path.as_ptr(),
                        flags,
                        name.as_ptr(),
                        &mut args as *mut XattrArgs,
                        std::mem::size_of::<XattrArgs>(),
                    )
                }
                Call::Classic { path } => {
                    libc::getxattr(path.as_ptr(), name.as_ptr(), ptr.cast(), size as usize) as i64
                }
            }
        };
        cvt_long(r)
    })?;
    Ok(finish(buf, size, n))
}

/// Lists attribute names (NUL-separated); `size == 0` asks only for the length.
pub fn list(t: Target<'_>, size: u32) -> io::Result<Xattr> {
    let mut buf = vec![0u8; size as usize];
    let n = with_method(t, |c| {
        let ptr = if size == 0 {
            std::ptr::null_mut()
        } else {
            buf.as_mut_ptr()
        };
        // SAFETY: `ptr` is writable for `size` bytes (or null with size 0).
        let r = unsafe {
            match *c {
                Call::At { dfd, path, flags } => libc::syscall(
                    nr::LISTXATTRAT,
                    dfd,
                    path.as_ptr(),
                    flags,
                    ptr,
                    size as usize,
                ),
                Call::Classic { path } => {
                    libc::listxattr(path.as_ptr(), ptr.cast(), size as usize) as i64
                }
            }
        };
        cvt_long(r)
    })?;
    Ok(finish(buf, size, n))
}

fn finish(mut buf: Vec<u8>, size: u32, n: i64) -> Xattr {
    if size == 0 {
        Xattr::Size(n as u32)
    } else {
        buf.truncate(n as usize);
        Xattr::Data(buf)
    }
}

/// Sets attribute `name` to `value`; `flags` are `XATTR_CREATE` / `XATTR_REPLACE`.
pub fn set(t: Target<'_>, name: &CStr, value: &[u8], flags: u32) -> io::Result<()> {
    with_method(t, |c| {
        // SAFETY: `value` is readable for its length; strings are C strings.
        let r = unsafe {
            match *c {
                Call::At {
                    dfd,
                    path,
                    flags: at,
                } => {
                    let args = XattrArgs {
                        value: value.as_ptr() as u64,
                        size: value.len() as u32,
                        flags,
                    };
                    libc::syscall(
                        nr::SETXATTRAT,
                        dfd,
                        path.as_ptr(),
                        at,
                        name.as_ptr(),
                        &args as *const XattrArgs,
                        std::mem::size_of::<XattrArgs>(),
                    )
                }
                Call::Classic { path } => libc::setxattr(
                    path.as_ptr(),
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    flags as i32,
                ) as i64,
            }
        };
        cvt_long(r)
    })
    .map(drop)
}

/// Removes attribute `name`.
pub fn remove(t: Target<'_>, name: &CStr) -> io::Result<()> {
    with_method(t, |c| {
        // SAFETY: strings are C strings.
        let r = unsafe {
            match *c {
                Call::At { dfd, path, flags } => {
                    libc::syscall(nr::REMOVEXATTRAT, dfd, path.as_ptr(), flags, name.as_ptr())
                }
                Call::Classic { path } => libc::removexattr(path.as_ptr(), name.as_ptr()) as i64,
            }
        };
        cvt_long(r)
    })
    .map(drop)
}
