//! Child processes for checks that need a second process or another identity.
//!
//! The probe is single-threaded, so a plain `fork` is safe. The child runs a closure,
//! writes the returned observation into a pipe and `_exit`s; the parent reads it with a
//! watchdog, killing a child that hangs and reporting `HANG` instead of blocking forever.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use crate::check::panic_message;
use crate::sys;

/// How long a child may run before it is reported as `HANG` and killed.
pub const WATCHDOG: Duration = Duration::from_secs(5);

/// The unprivileged identities used by multi-user checks.
pub const NOBODY: u32 = 65534;
pub const OTHER: u32 = 65533;

/// Runs `f` in a forked child and returns its observation (or `HANG` / `CHILD_DIED ...`).
pub fn in_child(f: impl FnOnce() -> String) -> String {
    in_child_with(WATCHDOG, |_| {}, f)
}

/// Like [`in_child`], but calls `after_fork(child_pid)` in the parent right after forking
/// (e.g. to signal the child) before collecting its output.
pub fn in_child_with(
    timeout: Duration,
    after_fork: impl FnOnce(libc::pid_t),
    f: impl FnOnce() -> String,
) -> String {
    let (rd, wr) = match sys::pipe() {
        Ok(ends) => ends,
        Err(e) => return format!("SETUP_FAILED pipe err={e}"),
    };
    // SAFETY: the probe is single-threaded (see the module docs), so the child starts with
    // consistent heap and lock state; it runs `f`, writes to the pipe and `_exit`s without
    // returning into the caller's frames.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return format!("SETUP_FAILED fork err={}", sys::errno());
    }
    if pid == 0 {
        drop(rd);
        let out = match catch_unwind(AssertUnwindSafe(f)) {
            Ok(s) => s,
            Err(p) => format!("PANIC {}", panic_message(&p)),
        };
        let mut done = 0;
        let bytes = out.as_bytes();
        while done < bytes.len() {
            match sys::write(&wr, &bytes[done..]) {
                Ok(n) => done += n,
                Err(_) => break,
            }
        }
        // SAFETY: _exit takes an integer and never returns; skipping atexit handlers and the
        // parent's buffered state is intended in a forked child.
        unsafe { libc::_exit(0) };
    }
    drop(wr);
    after_fork(pid);
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match sys::poll_in(&rd, left.as_millis() as i32) {
            Err(e) if e.0 == libc::EINTR => continue,
            Ok(0) | Err(_) => {
                let _ = sys::kill(pid, libc::SIGKILL);
                let _ = sys::waitpid(pid);
                return "HANG".to_string();
            }
            Ok(_) => {}
        }
        match sys::read(&rd, 4096) {
            Ok(chunk) if chunk.is_empty() => break,
            Ok(chunk) => out.extend_from_slice(&chunk),
            Err(e) if e.0 == libc::EINTR => continue,
            Err(_) => break,
        }
    }
    let status = sys::waitpid(pid).unwrap_or(0);
    if libc::WIFSIGNALED(status) {
        return format!("CHILD_DIED sig={}", libc::WTERMSIG(status));
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Switches the current (child) process to `uid`/`gid` with `gid` as the only
/// supplementary group.
pub fn become_user(uid: u32, gid: u32) -> Result<(), String> {
    sys::setgroups(&[gid]).map_err(|e| format!("setgroups err={e}"))?;
    sys::setresgid(gid, gid, gid).map_err(|e| format!("setgid err={e}"))?;
    sys::setresuid(uid, uid, uid).map_err(|e| format!("setuid err={e}"))?;
    Ok(())
}

/// Runs `f` in a child process as `uid`/`gid` (requires root).
pub fn as_user(uid: u32, gid: u32, f: impl FnOnce() -> String) -> String {
    in_child(|| match become_user(uid, gid) {
        Ok(()) => f(),
        Err(e) => format!("SETUP_FAILED {e}"),
    })
}
