//! The parent's side of a sandbox: write the child's id maps, release it, learn whether its
//! setup worked, forward SIGTERM/SIGINT to it and wait for its end.
//!
//! Owns: the `/proc/PID/{setgroups,uid_map,gid_map}` writes and the parent's temporary
//! signal handlers (restored before returning).
//! Must never: touch the child's namespaces in any other way, or return before the child
//! has been reaped (no zombie and no orphaned appliance is left behind).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::child::{SetupFailure, STATUS_FAIL, STATUS_OK};
use crate::error::{hint_for, SandboxError};
use crate::sys::{self, ChildEnd};

/// Full identity map: ids 0..=4294967294 inside are the same ids outside, so the caller's
/// real uids/gids are usable for setfsuid inside and files keep their real owners.
pub(crate) const IDENTITY_MAP: &str = "0 0 4294967295\n";

/// Pid the signal forwarder sends to (0 = none).
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(signo: libc::c_int) {
    let pid = FORWARD_TO.load(Ordering::SeqCst);
    if pid > 0 {
        sys::kill_quiet(pid, signo);
    }
}

fn write_proc(pid: i32, file: &'static str, content: &str) -> Result<(), SandboxError> {
    let path = format!("/proc/{pid}/{file}");
    File::options()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(content.as_bytes()))
        .map_err(|source| SandboxError::IdMap {
            file,
            pid,
            content: content.to_string(),
            source,
        })
}

/// Kill and reap a child whose setup we abandon.
fn abandon(pid: i32) {
    sys::kill_quiet(pid, libc::SIGKILL);
    let _ = sys::wait_for_exit(pid);
}

/// Parent side, from just after `clone` to the child's end. Returns the child's exit code
/// (128 + signal number if it was killed by a signal).
pub(crate) fn supervise(
    pid: i32,
    release_tx: OwnedFd,
    status_rx: OwnedFd,
    user_namespace: bool,
) -> Result<i32, SandboxError> {
    // setgroups must be written before gid_map; "allow" keeps setgroups(2) usable inside,
    // which the appliance needs to switch supplementary groups per request.
    let maps = if user_namespace && rustix::process::geteuid().is_root() {
        write_proc(pid, "setgroups", "allow\n")
            .and_then(|_| write_proc(pid, "uid_map", IDENTITY_MAP))
            .and_then(|_| write_proc(pid, "gid_map", IDENTITY_MAP))
    } else if user_namespace {
        // An unprivileged launcher may map only its own ids (and must deny setgroups
        // first): the appliance then serves as, and only as, the user who mounted.
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        write_proc(pid, "setgroups", "deny\n")
            .and_then(|_| write_proc(pid, "uid_map", &format!("{uid} {uid} 1\n")))
            .and_then(|_| write_proc(pid, "gid_map", &format!("{gid} {gid} 1\n")))
    } else {
        Ok(())
    };
    if let Err(e) = maps {
        abandon(pid);
        return Err(e);
    }

    // Forward stop signals from here on, before the child is released (so that nothing
    // the child does can be observed before a SIGTERM to us reaches it); a signal
    // before this point kills the launcher and the child follows (PR_SET_PDEATHSIG).
    FORWARD_TO.store(pid, Ordering::SeqCst);
    let mut saved = Vec::new();
    for signo in [libc::SIGTERM, libc::SIGINT] {
        match sys::set_signal_handler(signo, forward_signal) {
            Ok(s) => saved.push(s),
            Err(source) => {
                saved.into_iter().for_each(sys::restore_signal);
                abandon(pid);
                return Err(SandboxError::Child {
                    what: "installing signal forwarding for",
                    pid,
                    source,
                });
            }
        }
    }
    let mut release = File::from(release_tx);
    if let Err(source) = release.write_all(&[1]) {
        FORWARD_TO.store(0, Ordering::SeqCst);
        saved.into_iter().for_each(sys::restore_signal);
        abandon(pid);
        return Err(SandboxError::Child {
            what: "releasing",
            pid,
            source,
        });
    }
    drop(release);

    let result = wait_setup_then_end(pid, status_rx);
    FORWARD_TO.store(0, Ordering::SeqCst);
    saved.into_iter().for_each(sys::restore_signal);
    result
}

fn wait_setup_then_end(pid: i32, status_rx: OwnedFd) -> Result<i32, SandboxError> {
    let mut status = Vec::new();
    let read = File::from(status_rx).read_to_end(&mut status);
    if let Err(source) = read {
        abandon(pid);
        return Err(SandboxError::Child {
            what: "reading the setup status of",
            pid,
            source,
        });
    }
    let end = || {
        sys::wait_for_exit(pid).map_err(|source| SandboxError::Child {
            what: "waiting for",
            pid,
            source,
        })
    };
    match status.first() {
        Some(&STATUS_OK) => {}
        Some(&STATUS_FAIL) => {
            let _ = end();
            let (step, detail, errno) = SetupFailure::decode(&status[1..]);
            let hint = hint_for(&step);
            return Err(SandboxError::ChildSetup {
                step,
                detail,
                source: std::io::Error::from_raw_os_error(errno),
                hint,
            });
        }
        _ => {
            let how = match end()? {
                ChildEnd::Exited(c) => format!("exited with {c}"),
                ChildEnd::Signaled(s) => format!("killed by signal {s}"),
            };
            return Err(SandboxError::ChildDiedDuringSetup { how });
        }
    }
    Ok(match end()? {
        ChildEnd::Exited(c) => c,
        ChildEnd::Signaled(s) => 128 + s,
    })
}
