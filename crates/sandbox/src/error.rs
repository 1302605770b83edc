//! The error type of this crate.
//!
//! Owns: [`SandboxError`] — every way entering a sandbox can fail, each saying what failed,
//! on what, and what to do about it.
//! Must never: carry errors from the sandboxed `child_main` itself (those are the child's
//! business and come back as its exit code).

use std::io;
use std::path::PathBuf;

/// Why a sandbox could not be entered.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The process has more than one thread; a fork-like `clone` would copy only the
    /// calling one and could leave locks held forever in the child.
    #[error(
        "cannot enter the sandbox: the process has {threads} threads but must be single-threaded \
         (a fork-like clone copies only the calling thread); call run_sandboxed before spawning \
         any thread, including runtime or logging threads"
    )]
    NotSingleThreaded {
        /// Entries found in `/proc/self/task`.
        threads: usize,
    },

    /// `/proc/self/task` could not be read.
    #[error(
        "cannot count this process's threads in /proc/self/task: {source}; mount /proc in the \
         launcher's mount namespace"
    )]
    ThreadCount {
        /// The I/O error.
        source: io::Error,
    },

    /// The export directory is unusable.
    #[error("export directory {path:?} cannot be used as the sandbox root: {reason}; pass an existing directory")]
    Export {
        /// As configured.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// `RLIMIT_NOFILE` could not be raised before entering.
    #[error(
        "cannot raise RLIMIT_NOFILE to {wanted} (current soft {soft}, hard {hard}): {source}; \
         run the launcher as root (CAP_SYS_RESOURCE), or lower rlimit_nofile to at most \
         /proc/sys/fs/nr_open"
    )]
    RaiseNofile {
        /// Requested limit.
        wanted: u64,
        /// Soft limit before.
        soft: u64,
        /// Hard limit before.
        hard: u64,
        /// The error of setrlimit.
        source: io::Error,
    },

    /// The seccomp filter could not be compiled.
    #[error("cannot compile the seccomp filter: {0}; check SandboxConfig::extra_syscalls")]
    SeccompCompile(#[from] seccompiler::BackendError),

    /// A pipe between parent and child could not be created.
    #[error(
        "cannot create the parent/child synchronisation pipe: {0}; check the descriptor limit"
    )]
    Pipe(#[source] io::Error),

    /// The namespaced `clone` failed.
    #[error(
        "clone(CLONE_NEWUSER|NEWNS|NEWPID|NEWNET|NEWIPC|NEWUTS) failed: {0}; check that user \
         namespaces are enabled (sysctl user.max_user_namespaces > 0, \
         kernel.unprivileged_userns_clone, AppArmor's restrict_unprivileged_userns) and that the \
         launcher is not chrooted"
    )]
    Clone(#[source] io::Error),

    /// The parent could not write the child's uid/gid map.
    #[error(
        "cannot write {file} for sandbox child {pid} (content {content:?}): {source}; check that \
         unprivileged user namespaces are enabled (kernel.unprivileged_userns_clone) or run the \
         launcher as root"
    )]
    IdMap {
        /// `uid_map`, `gid_map` or `setgroups`.
        file: &'static str,
        /// Child pid.
        pid: i32,
        /// What was written.
        content: String,
        /// The error.
        source: io::Error,
    },

    /// A setup step inside the child failed; the child has exited.
    #[error("sandbox setup failed inside the child at step `{step}` ({detail}): {source}; {hint}")]
    ChildSetup {
        /// Which step.
        step: String,
        /// On what (path, capability, ...).
        detail: String,
        /// The OS error.
        source: io::Error,
        /// What to do.
        hint: &'static str,
    },

    /// The child died before it reported the end of its setup.
    #[error(
        "the sandbox child died during setup ({how}) without reporting an error; if it was \
         SIGSYS, a setup step ran after the seccomp filter — run with SeccompMode::Log and read \
         dmesg"
    )]
    ChildDiedDuringSetup {
        /// E.g. "killed by signal 31".
        how: String,
    },

    /// Talking to or waiting for the child failed.
    #[error("{what} sandbox child {pid} failed: {source}")]
    Child {
        /// What was being done.
        what: &'static str,
        /// Child pid.
        pid: i32,
        /// The error.
        source: io::Error,
    },
}

/// Advice for a failed child setup step (see [`SandboxError::ChildSetup`]).
pub(crate) fn hint_for(step: &str) -> &'static str {
    match step {
        "wait for parent" => "the launcher died or failed while writing the id maps",
        "make mounts private" | "bind-mount export" | "pivot_root" | "detach old root" => {
            "the kernel refused to change the private mount namespace; check that the export is \
             a directory on a mounted file system and that user namespaces may mount"
        }
        "make export read-only" | "restrict export mount flags" | "make root read-only" => {
            "mount_setattr (Linux 5.12+) is needed to change flags of the export mount tree"
        }
        "mount tmpfs root" => "tmpfs must be available and /tmp must exist on the host",
        "mount proc" | "open /proc/self/fd" => {
            "a private procfs (subset=pid) could not be mounted; the host's /proc must be fully \
             visible (not partly over-mounted) for a user namespace to mount procfs"
        }
        "capset" | "PR_CAPBSET_DROP" | "PR_CAP_AMBIENT_CLEAR_ALL" => {
            "capabilities could not be dropped; this should not happen in a fresh user namespace"
        }
        "install seccomp filter" => {
            "the kernel needs CONFIG_SECCOMP_FILTER; use SeccompMode::Off only for debugging"
        }
        _ => "see the step and the OS error",
    }
}
