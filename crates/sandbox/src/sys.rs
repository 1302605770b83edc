//! Thin wrappers around the raw system calls the sandbox needs and that neither `std` nor
//! `rustix` expose safely (fork-like `clone` with namespace flags, `mount_setattr`,
//! `PR_CAPBSET_DROP` by number, signal dispositions, `waitpid`).
//!
//! Owns: every `unsafe` block of this crate. Each wrapper is small, takes only plain values
//! or borrowed Rust data, and carries a `// SAFETY:` comment.
//! Must never: hold or hand out raw pointers, or contain policy (what to mount, which
//! capabilities to keep) — callers decide that.

use std::ffi::CStr;
use std::io;

/// Namespaces the sandbox child is created in.
pub(crate) const CLONE_NAMESPACES: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS;

/// Result of a fork-like clone as seen by the caller.
pub(crate) enum Forked {
    /// We are the new child process.
    Child,
    /// We are the original process; the child has this pid (in our pid namespace).
    Parent(libc::pid_t),
}

/// `clone(flags | SIGCHLD)` with a null stack: fork semantics (the child continues on a
/// copy-on-write copy of the caller's stack) plus new namespaces.
///
/// Only sound while the calling process is single-threaded: the child gets a copy of the
/// whole address space but only the calling thread, so any lock held by another thread
/// (malloc arenas, stdio, Rust `Mutex`es) would stay locked forever in the child. The caller
/// (`run_sandboxed`) checks `/proc/self/task` before calling this.
pub(crate) fn clone_into_namespaces(ns_flags: libc::c_int) -> io::Result<Forked> {
    let flags = (ns_flags | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: raw clone with a null stack, null ptid/ctid and tls 0 behaves like fork(2):
    // no memory is shared and no pointer is passed. The single-threaded precondition that
    // makes a fork-style child safe is checked by the only caller (see above).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    match rc {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid as libc::pid_t)),
    }
}

/// `prctl(PR_CAPBSET_DROP, cap)`. `EINVAL` means the kernel does not know `cap`.
pub(crate) fn capbset_drop(cap: u32) -> io::Result<()> {
    // SAFETY: PR_CAPBSET_DROP takes an integer capability number; no pointers are involved.
    let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `prctl(PR_CAPBSET_READ, cap)`: `Ok(true)` if `cap` is in the bounding set.
pub(crate) fn capbset_read(cap: u32) -> io::Result<bool> {
    // SAFETY: PR_CAPBSET_READ takes an integer capability number; no pointers are involved.
    let rc = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc == 1)
}

/// `struct mount_attr` of `mount_setattr(2)` (not in the `libc` crate yet).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

pub(crate) const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
pub(crate) const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
pub(crate) const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// `mount_setattr(AT_FDCWD, path, AT_RECURSIVE, {attr_set})`: add mount attributes to the
/// mount at `path` and every mount below it (Linux 5.12+). Unlike a `MS_REMOUNT`, this keeps
/// all other (possibly locked) flags as they are.
pub(crate) fn mount_setattr_recursive(path: &CStr, attr_set: u64) -> io::Result<()> {
    let attr = MountAttr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `path` is a valid NUL-terminated string and `attr` a properly laid out
    // `struct mount_attr` that lives across the call; the kernel only reads both.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A saved signal disposition, restored with [`restore_signal`].
pub(crate) struct SavedSignal {
    signo: libc::c_int,
    old: libc::sigaction,
}

/// Install `handler` for `signo` (with `SA_RESTART`, empty mask) and return the previous
/// disposition. `handler` must be async-signal-safe.
pub(crate) fn set_signal_handler(
    signo: libc::c_int,
    handler: extern "C" fn(libc::c_int),
) -> io::Result<SavedSignal> {
    // SAFETY: an all-zero `sigaction` is a valid initial value (SIG_DFL, empty mask, no flags).
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = handler as usize;
    new.sa_flags = libc::SA_RESTART;
    // SAFETY: as above; `old` is only written by the kernel.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers refer to live, properly aligned `sigaction` values and the
    // handler is an `extern "C" fn(c_int)`, the signature the kernel will call.
    let rc = unsafe {
        libc::sigemptyset(&mut new.sa_mask);
        libc::sigaction(signo, &new, &mut old)
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(SavedSignal { signo, old })
}

/// Put back a disposition saved by [`set_signal_handler`].
pub(crate) fn restore_signal(saved: SavedSignal) {
    // SAFETY: `saved.old` was filled in by the kernel for this very signal number.
    unsafe {
        libc::sigaction(saved.signo, &saved.old, std::ptr::null_mut());
    }
}

/// `kill(pid, signo)`; async-signal-safe, errors are ignored (used from signal handlers).
pub(crate) fn kill_quiet(pid: libc::pid_t, signo: libc::c_int) {
    // SAFETY: kill takes plain integers.
    unsafe {
        libc::kill(pid, signo);
    }
}

/// `_exit(code)`: end the process without running atexit handlers or unwinding.
/// Async-signal-safe.
pub(crate) fn exit_now(code: libc::c_int) -> ! {
    // SAFETY: _exit never returns and takes a plain integer.
    unsafe { libc::_exit(code) }
}

/// How a waited-for child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChildEnd {
    Exited(i32),
    Signaled(i32),
}

/// `waitpid(pid, 0)`, retrying on `EINTR`, until `pid` has exited or was killed.
pub(crate) fn wait_for_exit(pid: libc::pid_t) -> io::Result<ChildEnd> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a live c_int the kernel writes the wait status into.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == -1 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(err);
        }
        if libc::WIFEXITED(status) {
            return Ok(ChildEnd::Exited(libc::WEXITSTATUS(status)));
        }
        if libc::WIFSIGNALED(status) {
            return Ok(ChildEnd::Signaled(libc::WTERMSIG(status)));
        }
        // Stopped/continued: keep waiting for the real end.
    }
}
