//! The sandbox child's side of entering: everything between the namespaced `clone` and
//! the call of `child_main`, in a fixed order.
//!
//! Owns: the setup sequence inside the new namespaces (death signal, wait for the id maps,
//! private mounts and new root, hostname, rlimits, no_new_privs, capabilities, dumpable,
//! seccomp last) and reporting a failed step to the parent through the status pipe.
//! Must never: return into the caller's code path (the child always ends with an exit),
//! allocate large structures or spawn threads before the seccomp filter is in place, or
//! talk to the parent through anything but the two pipes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use rustix::process::{Resource, Rlimit, Signal};

use crate::seccomp::CompiledPolicy;
use crate::{caps, mounts, sys, RootSpec, SandboxConfig, Sandboxed};

/// The hostname inside every sandbox.
pub const SANDBOX_HOSTNAME: &str = "fsva-appliance";

/// Byte the child writes to the status pipe when setup succeeded.
pub(crate) const STATUS_OK: u8 = b'+';
/// Byte that starts a failure report: `-step\ndetail\nerrno`.
pub(crate) const STATUS_FAIL: u8 = b'-';

/// A failed setup step, as the child reports it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct SetupFailure {
    pub(crate) step: &'static str,
    pub(crate) detail: String,
    pub(crate) errno: i32,
}

impl SetupFailure {
    pub(crate) fn new(step: &'static str, detail: impl Into<String>, errno: i32) -> Self {
        SetupFailure {
            step,
            detail: detail.into(),
            errno,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let detail = self.detail.replace('\n', " ");
        format!(
            "{}{}\n{}\n{}",
            STATUS_FAIL as char, self.step, detail, self.errno
        )
        .into_bytes()
    }

    /// Parse what [`SetupFailure::encode`] wrote (without the leading byte).
    pub(crate) fn decode(body: &[u8]) -> (String, String, i32) {
        let text = String::from_utf8_lossy(body);
        let mut parts = text.splitn(3, '\n');
        let step = parts.next().unwrap_or("unknown").to_string();
        let detail = parts.next().unwrap_or("").to_string();
        let errno = parts
            .next()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(libc::EIO);
        (step, detail, errno)
    }
}

/// Everything the child needs, prepared by the parent before `clone`.
pub(crate) struct ChildPlan<'a> {
    pub(crate) config: &'a SandboxConfig,
    /// Canonical export path (for [`RootSpec::Export`]).
    pub(crate) export: Option<std::path::PathBuf>,
    pub(crate) policy: Option<CompiledPolicy>,
    pub(crate) last_cap: u32,
    /// Read end: the parent writes one byte after the id maps are in place.
    pub(crate) release_rx: OwnedFd,
    /// Write end: setup result for the parent.
    pub(crate) status_tx: OwnedFd,
}

extern "C" fn exit_on_signal(signo: libc::c_int) {
    sys::exit_now(128 + signo);
}

/// Run in the freshly cloned child. Never returns.
pub(crate) fn run(plan: ChildPlan<'_>, child_main: impl FnOnce(Sandboxed) -> i32) -> ! {
    let ChildPlan {
        config,
        export,
        policy,
        last_cap,
        release_rx,
        status_tx,
    } = plan;
    let mut status = File::from(status_tx);
    match setup(
        config,
        export.as_deref(),
        policy.as_ref(),
        last_cap,
        release_rx,
    ) {
        Ok(sandboxed) => {
            // Free the filter programs before handing over (no more allocations needed here).
            drop(policy);
            if status.write_all(&[STATUS_OK]).is_err() {
                sys::exit_now(127);
            }
            drop(status);
            // A panic has already been reported by the panic hook; exit like Rust's main does.
            let code =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| child_main(sandboxed)))
                    .unwrap_or(101);
            std::process::exit(code)
        }
        Err(failure) => {
            let _ = status.write_all(&failure.encode());
            sys::exit_now(127)
        }
    }
}

fn setup(
    config: &SandboxConfig,
    export: Option<&std::path::Path>,
    policy: Option<&CompiledPolicy>,
    last_cap: u32,
    release_rx: OwnedFd,
) -> Result<Sandboxed, SetupFailure> {
    // Die with the reaper. If it is already gone, its end of the release pipe is closed and
    // the read below sees EOF (getppid() is 0 across a pid namespace, so it cannot tell).
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
        .map_err(|e| SetupFailure::new("PR_SET_PDEATHSIG", "SIGKILL", e.raw_os_error()))?;
    let mut byte = [0u8; 1];
    let mut release = File::from(release_rx);
    match release.read(&mut byte) {
        Ok(1) => {}
        Ok(_) => {
            return Err(SetupFailure::new(
                "wait for parent",
                "release pipe closed without go-ahead",
                libc::EPIPE,
            ))
        }
        Err(e) => {
            return Err(SetupFailure::new(
                "wait for parent",
                "release pipe",
                e.raw_os_error().unwrap_or(libc::EIO),
            ))
        }
    }
    drop(release);

    // As pid 1 of the namespace, signals without a handler are ignored; keep SIGTERM/SIGINT
    // meaning "stop" until child_main installs its own handlers.
    for signo in [libc::SIGTERM, libc::SIGINT] {
        sys::set_signal_handler(signo, exit_on_signal).map_err(|e| {
            SetupFailure::new(
                "install pid-1 signal handlers",
                "SIGTERM/SIGINT",
                e.raw_os_error().unwrap_or(libc::EIO),
            )
        })?;
    }

    mounts::make_all_private()?;
    let proc_self_fd = if config.open_proc_self_fd {
        Some(mounts::open_private_proc_self_fd()?)
    } else {
        None
    };
    match (&config.root, export) {
        (RootSpec::Export { read_only, .. }, Some(path)) => mounts::enter_export(path, *read_only)?,
        _ => mounts::enter_empty()?,
    }

    rustix::system::sethostname(SANDBOX_HOSTNAME.as_bytes())
        .map_err(|e| SetupFailure::new("sethostname", SANDBOX_HOSTNAME, e.raw_os_error()))?;
    let _ = rustix::system::setdomainname(SANDBOX_HOSTNAME.as_bytes());

    rustix::process::setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(|e| SetupFailure::new("setrlimit", "RLIMIT_CORE=0", e.raw_os_error()))?;
    if config.rlimit_nofile > 0 {
        let n = Some(config.rlimit_nofile);
        rustix::process::setrlimit(
            Resource::Nofile,
            Rlimit {
                current: n,
                maximum: n,
            },
        )
        .map_err(|e| {
            SetupFailure::new(
                "setrlimit",
                format!("RLIMIT_NOFILE={}", config.rlimit_nofile),
                e.raw_os_error(),
            )
        })?;
    }

    rustix::thread::set_no_new_privs(true)
        .map_err(|e| SetupFailure::new("PR_SET_NO_NEW_PRIVS", "1", e.raw_os_error()))?;
    caps::drop_to(&config.keep_caps, last_cap).map_err(|e| {
        let kept: Vec<&str> = config.keep_caps.iter().map(|c| c.name()).collect();
        SetupFailure::new(
            e.step,
            format!("keeping [{}]", kept.join(",")),
            e.source.raw_os_error().unwrap_or(libc::EIO),
        )
    })?;
    // Not dumpable: no core dumps, and no ptrace/proc access from host processes with the same
    // uid. Our own /proc/self entries become owned by root, which is us (identity map); the
    // kernel always lets a thread group open its own /proc/self/fd entries.
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| SetupFailure::new("PR_SET_DUMPABLE", "0", e.raw_os_error()))?;

    if let Some(policy) = policy {
        crate::seccomp::install(policy).map_err(|e| {
            let errno = match &e {
                seccompiler::Error::Prctl(io) | seccompiler::Error::Seccomp(io) => {
                    io.raw_os_error().unwrap_or(libc::EIO)
                }
                _ => libc::EINVAL,
            };
            SetupFailure::new("install seccomp filter", e.to_string(), errno)
        })?;
    }
    Ok(Sandboxed { proc_self_fd })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_failure_round_trips_through_the_status_pipe_encoding() {
        let f = SetupFailure::new(
            "bind-mount export",
            "/srv/export\nwith newline",
            libc::EPERM,
        );
        let bytes = f.encode();
        assert_eq!(bytes[0], STATUS_FAIL);
        let (step, detail, errno) = SetupFailure::decode(&bytes[1..]);
        assert_eq!(step, "bind-mount export");
        assert_eq!(detail, "/srv/export with newline");
        assert_eq!(errno, libc::EPERM);
        assert!(crate::error::hint_for(&step).contains("mount"));
    }
}
