//! `fsva-sandbox`: run an appliance's code in a namespaced, capability-reduced,
//! seccomp-filtered child process whose `/` is the export.
//!
//! Owns: entering the sandbox ([`run_sandboxed`]) and its policy types ([`SandboxConfig`],
//! [`RootSpec`], [`Capability`], [`SeccompMode`], [`Syscall`]).
//! Must never: interpret file-system semantics, create or accept sockets on the appliance's
//! behalf, or be entered from a multithreaded process.
//!
//! # What the sandbox enforces
//! * New user, mount, pid, net, ipc and uts namespaces, created by one fork-like `clone`.
//! * The user namespace maps all ids to themselves (`0 0 4294967295`), so uid 0 inside is the
//!   launcher's root outside and `setfsuid(1000)` inside creates files owned by 1000 on the
//!   host. Capabilities inside are those of the *new* user namespace only.
//! * `/` is the export (bind mount, `nosuid,nodev`, optionally read-only) or an empty
//!   read-only tmpfs; the host's root is detached, so no host path can be reached (`..`
//!   and absolute symlinks resolve against the new root).
//! * No network: the net namespace has only a down loopback, and `socket`/`socketpair` are
//!   not allowed by seccomp. Sockets passed in (the control channel) keep working.
//! * Hostname `fsva-appliance`; pid 1 in its own pid namespace (everything it forks dies
//!   with it); dies with the launcher (`PR_SET_PDEATHSIG`).
//! * `RLIMIT_CORE=0`, `RLIMIT_NOFILE` as configured, `no_new_privs`, not dumpable,
//!   capabilities reduced to [`SandboxConfig::keep_caps`] in every set (bounding, ambient,
//!   effective, permitted; inheritable empty).
//! * A seccomp allow-list ([`seccomp`]), installed last, for all threads (TSYNC).
//!
//! # Launcher behaviour
//! The calling process becomes a small reaper: it forwards SIGTERM/SIGINT to the child
//! (which, as pid 1, exits with 128+signal unless `child_main` installed its own handlers)
//! and returns the child's exit code once it has ended.

mod caps;
mod child;
mod error;
mod mounts;
mod reaper;
pub mod seccomp;
mod sys;

use std::os::fd::OwnedFd;
use std::path::PathBuf;

pub use caps::Capability;
pub use child::SANDBOX_HOSTNAME;
pub use error::SandboxError;
pub use seccomp::{SeccompMode, Syscall};

/// What becomes `/` inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSpec {
    /// A host directory, bind-mounted (recursively) and made the root with `pivot_root`.
    Export {
        /// The directory on the host.
        path: PathBuf,
        /// Mount the whole export tree read-only.
        read_only: bool,
    },
    /// An empty, read-only tmpfs (for backends that keep everything in memory).
    Empty,
}

/// How to build a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// What becomes `/` inside.
    pub root: RootSpec,
    /// Capabilities kept (in the sandbox's own user namespace); every other one is dropped
    /// from all sets, including bounding and ambient.
    pub keep_caps: Vec<Capability>,
    /// What seccomp does with calls that are not on the allow-list.
    pub seccomp: SeccompMode,
    /// Calls a backend needs beyond [`seccomp::ALLOW`]; allowed without argument filters.
    pub extra_syscalls: Vec<Syscall>,
    /// Mount a private procfs (own pid namespace only, `subset=pid`) before switching the
    /// root, open its `self/fd` as `O_PATH|O_DIRECTORY` and hand it to `child_main` (for
    /// re-opening `O_PATH` descriptors via `/proc/self/fd/N`).
    pub open_proc_self_fd: bool,
    /// `RLIMIT_NOFILE` (soft and hard) inside; the hard limit is raised in the launcher
    /// before entering if needed (that needs privileges in the initial namespace). 0 keeps
    /// the inherited limit.
    pub rlimit_nofile: u64,
    /// Enter a new user namespace (identity-mapped). Without one (root only), the kept
    /// capabilities are those of the initial namespace: what a file server needs to
    /// behave as root does on a native file system (device nodes with CAP_MKNOD), at the
    /// price that a compromised appliance holds them for real, within its export.
    pub user_namespace: bool,
}

impl SandboxConfig {
    /// A configuration with the defaults: kill on disallowed calls, no extra calls, no proc
    /// handle, no capabilities, `RLIMIT_NOFILE` 65536 or the current hard limit if that is
    /// lower (raising it needs `CAP_SYS_RESOURCE`, which containers often lack).
    pub fn new(root: RootSpec) -> Self {
        let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .maximum
            .unwrap_or(u64::MAX);
        SandboxConfig {
            root,
            keep_caps: Vec::new(),
            seccomp: SeccompMode::Kill,
            extra_syscalls: Vec::new(),
            open_proc_self_fd: false,
            rlimit_nofile: hard.min(65536),
            user_namespace: true,
        }
    }

    /// The capabilities a file-system backend serving many users typically needs: switch
    /// fsuid/fsgid/groups, chown, bypass DAC for its own bookkeeping, keep set-id bits.
    pub fn file_server_caps() -> Vec<Capability> {
        vec![
            Capability::Chown,
            Capability::DacOverride,
            Capability::DacReadSearch,
            Capability::Fowner,
            Capability::Fsetid,
            Capability::Setgid,
            Capability::Setuid,
            Capability::Mknod,
            Capability::Setfcap,
            Capability::LinuxImmutable,
        ]
    }
}

/// What `child_main` receives inside the sandbox.
#[derive(Debug)]
pub struct Sandboxed {
    /// `/proc/self/fd` of the private procfs, if [`SandboxConfig::open_proc_self_fd`].
    pub proc_self_fd: Option<OwnedFd>,
}

/// Count the threads of this process.
fn thread_count() -> Result<usize, SandboxError> {
    let dir = std::fs::read_dir("/proc/self/task")
        .map_err(|source| SandboxError::ThreadCount { source })?;
    Ok(dir.count())
}

fn raise_nofile_hard_limit(wanted: u64) -> Result<(), SandboxError> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let cur = getrlimit(Resource::Nofile);
    let hard = cur.maximum.unwrap_or(u64::MAX);
    if wanted == 0 || hard >= wanted {
        return Ok(());
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: cur.current,
            maximum: Some(wanted),
        },
    )
    .map_err(|e| SandboxError::RaiseNofile {
        wanted,
        soft: cur.current.unwrap_or(u64::MAX),
        hard,
        source: e.into(),
    })
}

fn canonical_export(config: &SandboxConfig) -> Result<Option<PathBuf>, SandboxError> {
    let RootSpec::Export { path, .. } = &config.root else {
        return Ok(None);
    };
    let canon = std::fs::canonicalize(path).map_err(|e| SandboxError::Export {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if !canon.is_dir() {
        return Err(SandboxError::Export {
            path: path.clone(),
            reason: "not a directory".into(),
        });
    }
    if canon == std::path::Path::new("/") {
        return Err(SandboxError::Export {
            path: path.clone(),
            reason: "the host root would give the appliance the whole host".into(),
        });
    }
    Ok(Some(canon))
}

/// Run `child_main` inside a new sandbox as pid 1 of a new pid namespace and return its
/// exit code (128 + signal number if it was killed, e.g. 159 for a seccomp kill) after it
/// ended.
///
/// Must be called while the process is single-threaded (checked: an error otherwise). The
/// calling process stays outside as a reaper that forwards SIGTERM/SIGINT to the child;
/// when it dies, the child is killed. `child_main` runs after every restriction is in place;
/// a panic in it becomes exit code 101.
///
/// Descriptors of the caller are inherited by the child (that is how the control socket is
/// passed in); close what the appliance must not have before calling.
pub fn run_sandboxed(
    config: &SandboxConfig,
    child_main: impl FnOnce(Sandboxed) -> i32,
) -> Result<i32, SandboxError> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(SandboxError::NotSingleThreaded { threads });
    }
    let export = canonical_export(config)?;
    raise_nofile_hard_limit(config.rlimit_nofile)?;
    let policy = seccomp::compile(config.seccomp, &config.extra_syscalls)?;
    let last_cap = caps::last_cap();

    let pipe = || {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| SandboxError::Pipe(e.into()))
    };
    let (release_rx, release_tx) = pipe()?;
    let (status_rx, status_tx) = pipe()?;

    tracing::debug!(root = ?config.root, seccomp = ?config.seccomp, "entering sandbox");
    let flags = if config.user_namespace {
        sys::CLONE_NAMESPACES
    } else {
        sys::CLONE_NAMESPACES & !libc::CLONE_NEWUSER
    };
    match sys::clone_into_namespaces(flags).map_err(SandboxError::Clone)? {
        sys::Forked::Child => {
            drop(release_tx);
            drop(status_rx);
            let plan = child::ChildPlan {
                config,
                export,
                policy,
                last_cap,
                release_rx,
                status_tx,
            };
            child::run(plan, child_main)
        }
        sys::Forked::Parent(pid) => {
            drop(release_rx);
            drop(status_tx);
            drop(policy);
            tracing::debug!(pid, "sandbox child created");
            reaper::supervise(pid, release_tx, status_rx, config.user_namespace)
        }
    }
}
