//! The system-call policy of an appliance: the allow-list (as data, one reason per group),
//! the argument filters for the few calls that need them, and the compiled BPF programs.
//!
//! Owns: which system calls an appliance may make. Everything not listed here is killed
//! ([`SeccompMode::Kill`], `SECCOMP_RET_KILL_PROCESS`) or logged and allowed
//! ([`SeccompMode::Log`], `SECCOMP_RET_LOG`, visible as `type=1326` audit records in dmesg).
//! Must never: allow creating sockets, tracing or reading other processes, mounting,
//! loading kernel code (modules, BPF, kexec), keyrings, entering or creating namespaces,
//! or executing programs. A backend that needs more adds it explicitly through
//! [`crate::SandboxConfig::extra_syscalls`].
//!
//! Filters are built in the parent before the sandbox child is created (so compile errors
//! are reported as typed errors) and installed in the child as the very last setup step,
//! with `SECCOMP_FILTER_FLAG_TSYNC`.
//!
//! Two filters are stacked (the kernel applies the most restrictive result):
//! 1. `clone3` → `ENOSYS`. Its flags live in a user-memory struct that BPF cannot inspect,
//!    so it is refused in a way glibc and Rust understand: both fall back to `clone`, whose
//!    flags *can* be checked (no namespace flags).
//! 2. The allow-list below; everything else → kill (or log).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What the seccomp filter does with a system call that is not on the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Kill the whole process (`SECCOMP_RET_KILL_PROCESS`). The default.
    #[default]
    Kill,
    /// Allow the call but log it to the kernel audit log (`SECCOMP_RET_LOG`); for finding
    /// out which calls a backend needs (`dmesg | grep type=1326`).
    Log,
    /// Install no filter at all (debugging only).
    Off,
}

/// A system call, by name (for messages) and by number (for the filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syscall {
    /// The kernel's name, e.g. `"io_uring_enter"`.
    pub name: &'static str,
    /// The number on the running architecture, e.g. `libc::SYS_io_uring_enter`.
    pub nr: i64,
}

impl Syscall {
    /// A system call by name and number, e.g. `Syscall::new("sync", libc::SYS_sync)`.
    pub const fn new(name: &'static str, nr: i64) -> Self {
        Syscall { name, nr }
    }
}

macro_rules! sys {
    ($($name:ident),* $(,)?) => {
        &[$(Syscall { name: stringify!($name), nr: paste_nr!($name) },)*]
    };
}
macro_rules! paste_nr {
    ($name:ident) => {
        nr::$name
    };
}

/// System call numbers. Taken from `libc` where it has them; the newest ones (Linux
/// 6.13+ `*xattrat`, 6.7 `futex_wake/wait/requeue`) use the unified numbers that x86_64
/// and aarch64 share from 424 upwards.
#[allow(non_upper_case_globals)]
mod nr {
    pub use libc::{
        SYS_accept4 as accept4,
        SYS_add_key as add_key,
        SYS_bind as bind,
        SYS_bpf as bpf,
        SYS_brk as brk,
        SYS_capget as capget,
        SYS_capset as capset,
        SYS_chdir as chdir,
        SYS_chroot as chroot,
        SYS_clock_getres as clock_getres,
        SYS_clock_gettime as clock_gettime,
        SYS_clock_nanosleep as clock_nanosleep,
        SYS_clone as clone,
        SYS_clone3 as clone3,
        SYS_close as close,
        SYS_close_range as close_range,
        SYS_connect as connect,
        SYS_copy_file_range as copy_file_range,
        SYS_delete_module as delete_module,
        SYS_dup as dup,
        SYS_dup3 as dup3,
        SYS_epoll_create1 as epoll_create1,
        SYS_epoll_ctl as epoll_ctl,
        SYS_epoll_pwait as epoll_pwait,
        SYS_epoll_pwait2 as epoll_pwait2,
        SYS_eventfd2 as eventfd2,
        SYS_execve as execve,
        SYS_execveat as execveat,
        SYS_exit as exit,
        SYS_exit_group as exit_group,
        SYS_faccessat as faccessat,
        SYS_faccessat2 as faccessat2,
        SYS_fadvise64 as fadvise64,
        SYS_fallocate as fallocate,
        SYS_fchdir as fchdir,
        SYS_fchmod as fchmod,
        SYS_fchmodat as fchmodat,
        SYS_fchmodat2 as fchmodat2,
        SYS_fchown as fchown,
        SYS_fchownat as fchownat,
        SYS_fcntl as fcntl,
        SYS_fdatasync as fdatasync,
        SYS_fgetxattr as fgetxattr,
        SYS_finit_module as finit_module,
        SYS_flistxattr as flistxattr,
        SYS_flock as flock,
        SYS_fremovexattr as fremovexattr,
        SYS_fsetxattr as fsetxattr,
        SYS_fsmount as fsmount,
        SYS_fsopen as fsopen,
        SYS_fstatfs as fstatfs,
        SYS_fsync as fsync,
        SYS_ftruncate as ftruncate,
        SYS_futex as futex,
        SYS_futex_waitv as futex_waitv,
        SYS_get_robust_list as get_robust_list,
        SYS_getcpu as getcpu,
        SYS_getcwd as getcwd,
        SYS_getdents64 as getdents64,
        SYS_getegid as getegid,
        SYS_geteuid as geteuid,
        SYS_getgid as getgid,
        SYS_getgroups as getgroups,
        SYS_getpeername as getpeername,
        SYS_getpgid as getpgid,
        SYS_getpid as getpid,
        SYS_getppid as getppid,
        SYS_getrandom as getrandom,
        SYS_getresgid as getresgid,
        SYS_getresuid as getresuid,
        SYS_getrusage as getrusage,
        SYS_getsockname as getsockname,
        SYS_getsockopt as getsockopt,
        SYS_gettid as gettid,
        SYS_gettimeofday as gettimeofday,
        SYS_getuid as getuid,
        SYS_getxattr as getxattr,
        SYS_init_module as init_module,
        SYS_io_uring_setup as io_uring_setup,
        SYS_ioctl as ioctl,
        SYS_kexec_file_load as kexec_file_load,
        SYS_kexec_load as kexec_load,
        SYS_keyctl as keyctl,
        SYS_kill as kill,
        SYS_lgetxattr as lgetxattr,
        SYS_linkat as linkat,
        SYS_listen as listen,
        SYS_listxattr as listxattr,
        SYS_llistxattr as llistxattr,
        SYS_lremovexattr as lremovexattr,
        SYS_lseek as lseek,
        SYS_lsetxattr as lsetxattr,
        SYS_madvise as madvise,
        SYS_membarrier as membarrier,
        SYS_memfd_create as memfd_create,
        SYS_mkdirat as mkdirat,
        SYS_mknodat as mknodat,
        SYS_mmap as mmap,
        SYS_mount as mount,
        SYS_mount_setattr as mount_setattr,
        SYS_move_mount as move_mount,
        SYS_mprotect as mprotect,
        SYS_mremap as mremap,
        SYS_msync as msync,
        SYS_munmap as munmap,
        SYS_name_to_handle_at as name_to_handle_at,
        SYS_nanosleep as nanosleep,
        SYS_newfstatat as newfstatat,
        SYS_open_by_handle_at as open_by_handle_at,
        SYS_open_tree as open_tree,
        SYS_openat as openat,
        SYS_openat2 as openat2,
        SYS_perf_event_open as perf_event_open,
        SYS_personality as personality,
        SYS_pidfd_getfd as pidfd_getfd,
        SYS_pidfd_open as pidfd_open,
        SYS_pipe2 as pipe2,
        SYS_pivot_root as pivot_root,
        SYS_ppoll as ppoll,
        SYS_prctl as prctl,
        SYS_pread64 as pread64,
        SYS_preadv as preadv,
        SYS_preadv2 as preadv2,
        SYS_prlimit64 as prlimit64,
        SYS_process_vm_readv as process_vm_readv,
        SYS_process_vm_writev as process_vm_writev,
        SYS_pselect6 as pselect6,
        SYS_ptrace as ptrace,
        SYS_pwrite64 as pwrite64,
        SYS_pwritev as pwritev,
        SYS_pwritev2 as pwritev2,
        SYS_read as read,
        SYS_readahead as readahead,
        SYS_readlinkat as readlinkat,
        SYS_readv as readv,
        SYS_reboot as reboot,
        SYS_recvfrom as recvfrom,
        SYS_recvmmsg as recvmmsg,
        SYS_recvmsg as recvmsg,
        SYS_removexattr as removexattr,
        SYS_renameat2 as renameat2,
        SYS_request_key as request_key,
        SYS_restart_syscall as restart_syscall,
        SYS_rseq as rseq,
        SYS_rt_sigaction as rt_sigaction,
        SYS_rt_sigprocmask as rt_sigprocmask,
        SYS_rt_sigreturn as rt_sigreturn,
        SYS_rt_sigtimedwait as rt_sigtimedwait,
        SYS_sched_getaffinity as sched_getaffinity,
        SYS_sched_setaffinity as sched_setaffinity,
        SYS_sched_yield as sched_yield,
        SYS_seccomp as seccomp,
        SYS_sendmmsg as sendmmsg,
        SYS_sendmsg as sendmsg,
        SYS_sendto as sendto,
        SYS_set_robust_list as set_robust_list,
        SYS_set_tid_address as set_tid_address,
        SYS_setfsgid as setfsgid,
        SYS_setfsuid as setfsuid,
        SYS_setgid as setgid,
        SYS_setgroups as setgroups,
        SYS_sethostname as sethostname,
        SYS_setns as setns,
        SYS_setregid as setregid,
        SYS_setresgid as setresgid,
        SYS_setresuid as setresuid,
        SYS_setreuid as setreuid,
        SYS_setsockopt as setsockopt,
        SYS_setuid as setuid,
        SYS_setxattr as setxattr,
        SYS_shutdown as shutdown,
        SYS_sigaltstack as sigaltstack,
        // Denied, listed for documentation and for the probe.
        SYS_socket as socket,
        SYS_socketpair as socketpair,
        SYS_splice as splice,
        SYS_statfs as statfs,
        SYS_statx as statx,
        SYS_swapoff as swapoff,
        SYS_swapon as swapon,
        SYS_symlinkat as symlinkat,
        SYS_sync_file_range as sync_file_range,
        SYS_syncfs as syncfs,
        SYS_sysinfo as sysinfo,
        SYS_tee as tee,
        SYS_tgkill as tgkill,
        SYS_timerfd_create as timerfd_create,
        SYS_timerfd_gettime as timerfd_gettime,
        SYS_timerfd_settime as timerfd_settime,
        SYS_umask as umask,
        SYS_umount2 as umount2,
        SYS_uname as uname,
        SYS_unlinkat as unlinkat,
        SYS_unshare as unshare,
        SYS_userfaultfd as userfaultfd,
        SYS_utimensat as utimensat,
        SYS_vmsplice as vmsplice,
        SYS_wait4 as wait4,
        SYS_waitid as waitid,
        SYS_write as write,
        SYS_writev as writev,
    };
    #[cfg(target_arch = "x86_64")]
    pub use libc::{
        SYS_access as access, SYS_arch_prctl as arch_prctl, SYS_chmod as chmod, SYS_chown as chown,
        SYS_creat as creat, SYS_dup2 as dup2, SYS_epoll_wait as epoll_wait, SYS_fstat as fstat,
        SYS_getpgrp as getpgrp, SYS_getrlimit as getrlimit, SYS_lchown as lchown, SYS_link as link,
        SYS_lstat as lstat, SYS_mkdir as mkdir, SYS_mknod as mknod, SYS_open as open,
        SYS_pipe as pipe, SYS_poll as poll, SYS_readlink as readlink, SYS_rename as rename,
        SYS_renameat as renameat, SYS_rmdir as rmdir, SYS_select as select,
        SYS_sendfile as sendfile, SYS_stat as stat, SYS_symlink as symlink, SYS_time as time,
        SYS_truncate as truncate, SYS_unlink as unlink, SYS_utimes as utimes,
    };
    #[cfg(target_arch = "aarch64")]
    pub use libc::{SYS_renameat as renameat, SYS_sendfile as sendfile, SYS_truncate as truncate};

    pub const setxattrat: i64 = 463;
    pub const getxattrat: i64 = 464;
    pub const listxattrat: i64 = 465;
    pub const removexattrat: i64 = 466;
    pub const futex_wake: i64 = 454;
    pub const futex_wait: i64 = 455;
    pub const futex_requeue: i64 = 456;
}

/// A group of unconditionally allowed system calls and why the appliance needs them.
#[derive(Debug)]
pub struct AllowGroup {
    /// One line: why.
    pub reason: &'static str,
    /// The calls.
    pub syscalls: &'static [Syscall],
}

/// The unconditional allow-list. Argument-filtered calls are in [`FILTERED`].
pub const ALLOW: &[AllowGroup] = &[
    AllowGroup {
        reason: "memory allocation (malloc, Rust allocator, thread stacks and guard pages)",
        syscalls: sys![brk, mmap, munmap, mremap, mprotect, madvise, msync, membarrier],
    },
    AllowGroup {
        reason: "threads and their synchronisation (std::thread, std::sync, glibc pthreads)",
        syscalls: sys![
            futex, futex_waitv, futex_wake, futex_wait, futex_requeue, set_robust_list,
            get_robust_list, rseq, set_tid_address, sched_yield, sched_getaffinity,
            sched_setaffinity, getcpu, exit, exit_group, gettid, getpid, getppid, getpgid
        ],
    },
    AllowGroup {
        reason: "reaping helper processes forked inside the sandbox (never exec'd)",
        syscalls: sys![wait4, waitid],
    },
    AllowGroup {
        reason: "signals: handlers, masks, alternate stacks for stack-overflow reports, \
                 raise/abort/pthread_kill within the own pid namespace",
        syscalls: sys![
            rt_sigaction, rt_sigprocmask, rt_sigreturn, rt_sigtimedwait, sigaltstack,
            restart_syscall, tgkill
        ],
    },
    AllowGroup {
        reason: "time, randomness and memory size (Instant, SystemTime, sleep, HashMap seeds, mem's default capacity)",
        syscalls: sys![clock_gettime, clock_getres, gettimeofday, nanosleep, clock_nanosleep, getrandom, sysinfo],
    },
    AllowGroup {
        reason: "credentials: per-request fsuid/fsgid/supplementary groups (bounded by the kept capabilities)",
        syscalls: sys![
            getuid, geteuid, getgid, getegid, getresuid, getresgid, getgroups, setfsuid,
            setfsgid, setgroups, setresuid, setresgid, setuid, setgid, setreuid, setregid,
            capget, capset
        ],
    },
    AllowGroup {
        reason: "process facts: umask, cwd, rlimits of itself, resource usage, uname",
        syscalls: sys![umask, getcwd, chdir, fchdir, getrusage, uname],
    },
    AllowGroup {
        reason: "file data I/O",
        syscalls: sys![
            read, write, pread64, pwrite64, readv, writev, preadv, pwritev, preadv2, pwritev2,
            lseek, copy_file_range, sendfile, splice, tee, vmsplice, readahead, fadvise64
        ],
    },
    AllowGroup {
        reason: "opening, closing and duplicating descriptors",
        syscalls: sys![openat, openat2, close, close_range, dup, dup3, pipe2, memfd_create, fcntl, flock],
    },
    AllowGroup {
        reason: "metadata and directory operations of a file system backend",
        syscalls: sys![
            newfstatat, statx, statfs, fstatfs, getdents64, mkdirat, mknodat, symlinkat,
            linkat, unlinkat, renameat2, readlinkat, fchmod, fchmodat, fchmodat2, fchown,
            fchownat, utimensat, ftruncate, fallocate, fsync, fdatasync, syncfs,
            sync_file_range, faccessat, faccessat2, name_to_handle_at, renameat, truncate
        ],
    },
    AllowGroup {
        reason: "extended attributes (ACLs, security.*, user.*), including 6.13+ *xattrat",
        syscalls: sys![
            getxattr, setxattr, listxattr, removexattr, lgetxattr, lsetxattr, llistxattr,
            lremovexattr, fgetxattr, fsetxattr, flistxattr, fremovexattr, setxattrat,
            getxattrat, listxattrat, removexattrat
        ],
    },
    AllowGroup {
        reason: "messages on already-open sockets (the control channel is passed in; none can be created)",
        syscalls: sys![
            sendmsg, recvmsg, sendmmsg, recvmmsg, sendto, recvfrom, shutdown, getsockopt,
            setsockopt, getsockname, getpeername
        ],
    },
    AllowGroup {
        reason: "waiting for events (poll, epoll, eventfd, timers)",
        syscalls: sys![
            ppoll, pselect6, epoll_create1, epoll_ctl, epoll_pwait, epoll_pwait2, eventfd2,
            timerfd_create, timerfd_settime, timerfd_gettime
        ],
    },
    #[cfg(target_arch = "x86_64")]
    AllowGroup {
        reason: "legacy x86_64 path-based forms used by glibc and std (same checks as the *at forms)",
        syscalls: sys![
            open, creat, stat, lstat, fstat, access, readlink, mkdir, rmdir, mknod, unlink,
            rename, link, symlink, chmod, chown, lchown, utimes, dup2, pipe, poll, select,
            epoll_wait, getrlimit, getpgrp, time, arch_prctl
        ],
    },
];

/// Calls that are denied (not on the allow-list), with the reason; used for documentation
/// and by the probe binary that tests the sandbox. The list is not exhaustive: anything not
/// on [`ALLOW`]/[`FILTERED`] is denied.
pub const NOTABLY_DENIED: &[(&str, &[Syscall])] = &[
    ("no network: sockets cannot be created or connected", sys![socket, socketpair, connect, bind, listen, accept4]),
    ("no access to other processes", sys![ptrace, process_vm_readv, process_vm_writev, pidfd_open, pidfd_getfd, kill]),
    ("no changes to the mount tree after setup", sys![mount, umount2, pivot_root, chroot, fsopen, fsmount, move_mount, open_tree, mount_setattr]),
    ("no kernel code or kernel state", sys![init_module, finit_module, delete_module, kexec_load, kexec_file_load, bpf, perf_event_open, reboot, swapon, swapoff, sethostname, personality]),
    ("no keyrings", sys![keyctl, add_key, request_key]),
    ("no namespace changes (unshare is allowed for CLONE_FS only)", sys![setns]),
    ("escapes the mount namespace via file handles (and needs CAP_DAC_READ_SEARCH in the initial namespace anyway)", sys![open_by_handle_at]),
    ("no new programs, no io_uring (bypasses this filter), no userfaultfd, no new filters", sys![execve, execveat, io_uring_setup, userfaultfd, seccomp]),
];

/// Namespace flags `clone` must not carry (a new user namespace would give back every
/// capability; new pid/mount namespaces would hide processes and mounts from the supervisor).
const CLONE_NS_MASK: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;

// ioctl request numbers not in `libc` (include/uapi/linux/fs.h).
const FS_IOC_GETFLAGS: u64 = 0x8008_6601;
const FS_IOC_SETFLAGS: u64 = 0x4008_6602;
const FS_IOC_FSGETXATTR: u64 = 0x801c_581f;
const FS_IOC_FSSETXATTR: u64 = 0x401c_5820;
const FICLONE: u64 = 0x4004_9409;
const FICLONERANGE: u64 = 0x4020_940d;

/// `ioctl` requests an appliance may issue (any descriptor).
// The casts are no-ops on glibc/x86_64 but not where libc's `Ioctl` type is `c_int`.
#[allow(clippy::unnecessary_cast)]
pub const ALLOWED_IOCTLS: &[(&str, u64)] = &[
    ("FIONREAD", libc::FIONREAD as u64),
    ("FIONBIO", libc::FIONBIO as u64),
    ("FIOCLEX", libc::FIOCLEX as u64),
    ("FIONCLEX", libc::FIONCLEX as u64),
    ("TCGETS (isatty)", libc::TCGETS as u64),
    ("TIOCGWINSZ", libc::TIOCGWINSZ as u64),
    ("FS_IOC_GETFLAGS", FS_IOC_GETFLAGS),
    ("FS_IOC_SETFLAGS", FS_IOC_SETFLAGS),
    ("FS_IOC_FSGETXATTR", FS_IOC_FSGETXATTR),
    ("FS_IOC_FSSETXATTR", FS_IOC_FSSETXATTR),
    ("FICLONE", FICLONE),
    ("FICLONERANGE", FICLONERANGE),
];

/// `prctl` options an appliance may use.
pub const ALLOWED_PRCTLS: &[(&str, i32)] = &[
    ("PR_SET_NAME (thread names)", libc::PR_SET_NAME),
    ("PR_GET_NAME", libc::PR_GET_NAME),
    ("PR_SET_VMA (glibc names anonymous mappings)", 0x5356_4d41),
    ("PR_CAPBSET_READ", libc::PR_CAPBSET_READ),
    ("PR_GET_NO_NEW_PRIVS", libc::PR_GET_NO_NEW_PRIVS),
    ("PR_GET_DUMPABLE", libc::PR_GET_DUMPABLE),
    ("PR_GET_SECCOMP", libc::PR_GET_SECCOMP),
    ("PR_GET_KEEPCAPS", libc::PR_GET_KEEPCAPS),
    (
        "PR_SET_KEEPCAPS (keep caps across setresuid)",
        libc::PR_SET_KEEPCAPS,
    ),
];

/// A call that is allowed only with certain arguments.
#[derive(Debug)]
pub struct FilteredCall {
    /// The call.
    pub syscall: Syscall,
    /// One line: what is allowed and why.
    pub reason: &'static str,
}

/// Allowed with argument filters (built by `rules_for` in this module).
pub const FILTERED: &[FilteredCall] = &[
    FilteredCall {
        syscall: Syscall {
            name: "clone",
            nr: nr::clone,
        },
        reason: "new threads (glibc falls back from clone3) and forks, but no namespace flags",
    },
    FilteredCall {
        syscall: Syscall {
            name: "unshare",
            nr: nr::unshare,
        },
        reason: "CLONE_FS only: a thread may get its own umask/cwd",
    },
    FilteredCall {
        syscall: Syscall {
            name: "prctl",
            nr: nr::prctl,
        },
        reason: "thread names and read-only queries (ALLOWED_PRCTLS, PR_CAP_AMBIENT_IS_SET)",
    },
    FilteredCall {
        syscall: Syscall {
            name: "ioctl",
            nr: nr::ioctl,
        },
        reason: "descriptor flags, isatty, inode flags, reflinks (ALLOWED_IOCTLS)",
    },
    FilteredCall {
        syscall: Syscall {
            name: "prlimit64",
            nr: nr::prlimit64,
        },
        reason: "own process only (pid 0); raising needs CAP_SYS_RESOURCE, normally dropped",
    },
];

fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, len, op, value).expect("argument index < 6")
}

fn rule(conds: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conds).expect("non-empty condition list")
}

/// The argument rules of a filtered call (OR of AND-ed conditions).
fn rules_for(nr: i64) -> Vec<SeccompRule> {
    use SeccompCmpArgLen::{Dword, Qword};
    use SeccompCmpOp::{Eq, MaskedEq};
    match nr {
        n if n == nr::clone => vec![rule(vec![cond(0, Qword, MaskedEq(CLONE_NS_MASK), 0)])],
        n if n == nr::unshare => vec![rule(vec![cond(0, Qword, Eq, libc::CLONE_FS as u64)])],
        n if n == nr::prctl => {
            let mut rules: Vec<SeccompRule> = ALLOWED_PRCTLS
                .iter()
                .map(|(_, opt)| rule(vec![cond(0, Dword, Eq, *opt as u64)]))
                .collect();
            rules.push(rule(vec![
                cond(0, Dword, Eq, libc::PR_CAP_AMBIENT as u64),
                cond(1, Qword, Eq, libc::PR_CAP_AMBIENT_IS_SET as u64),
            ]));
            rules
        }
        n if n == nr::ioctl => ALLOWED_IOCTLS
            .iter()
            .map(|(_, req)| rule(vec![cond(1, Dword, Eq, *req & 0xffff_ffff)]))
            .collect(),
        n if n == nr::prlimit64 => vec![rule(vec![cond(0, Dword, Eq, 0)])],
        _ => Vec::new(),
    }
}

/// Number of distinct system calls the policy allows (unconditionally or filtered), before
/// any extra calls.
pub fn allowed_syscall_count() -> usize {
    allow_map(&[]).len()
}

fn allow_map(extra: &[Syscall]) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for group in ALLOW {
        for sc in group.syscalls {
            map.insert(sc.nr, Vec::new());
        }
    }
    for f in FILTERED {
        map.insert(f.syscall.nr, rules_for(f.syscall.nr));
    }
    // clone3 is "allowed" by this filter so the stacked ENOSYS filter decides.
    map.insert(nr::clone3, Vec::new());
    // An extra call is allowed unconditionally, even if it is a filtered one.
    for sc in extra {
        map.insert(sc.nr, Vec::new());
    }
    map
}

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// The compiled filters, ready to install in the child.
pub(crate) struct CompiledPolicy {
    clone3_enosys: BpfProgram,
    allow_list: BpfProgram,
}

/// Compile the policy for `mode` (`None` for [`SeccompMode::Off`]).
pub(crate) fn compile(
    mode: SeccompMode,
    extra: &[Syscall],
) -> Result<Option<CompiledPolicy>, seccompiler::BackendError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let allow_list: BpfProgram =
        SeccompFilter::new(allow_map(extra), mismatch, SeccompAction::Allow, ARCH)?.try_into()?;
    let mut clone3 = BTreeMap::new();
    if !extra.iter().any(|s| s.nr == nr::clone3) {
        clone3.insert(nr::clone3, Vec::new());
    }
    let clone3_enosys: BpfProgram = SeccompFilter::new(
        clone3,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        ARCH,
    )?
    .try_into()?;
    Ok(Some(CompiledPolicy {
        clone3_enosys,
        allow_list,
    }))
}

/// Install the compiled filters on all threads of the calling process (TSYNC). Sets
/// `PR_SET_NO_NEW_PRIVS` as a side effect.
pub(crate) fn install(policy: &CompiledPolicy) -> Result<(), seccompiler::Error> {
    // The ENOSYS filter first: once the allow-list is in, `seccomp` itself is denied.
    seccompiler::apply_filter_all_threads(&policy.clone3_enosys)?;
    seccompiler::apply_filter_all_threads(&policy.allow_list)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_calls_are_not_allowed() {
        let map = allow_map(&[]);
        for (_, calls) in NOTABLY_DENIED {
            for sc in *calls {
                assert!(
                    !map.contains_key(&sc.nr),
                    "{} is both denied and allowed",
                    sc.name
                );
            }
        }
    }

    #[test]
    fn policy_compiles_in_every_mode() {
        assert!(compile(SeccompMode::Off, &[]).unwrap().is_none());
        let p = compile(SeccompMode::Kill, &[]).unwrap().unwrap();
        assert!(
            p.allow_list.len() < 4096,
            "BPF program too long: {}",
            p.allow_list.len()
        );
        compile(SeccompMode::Log, &[Syscall::new("sync", libc::SYS_sync)])
            .unwrap()
            .unwrap();
        eprintln!(
            "allowed system calls: {}, BPF instructions: {}",
            allowed_syscall_count(),
            p.allow_list.len()
        );
        assert!(allowed_syscall_count() > 150);
    }
}
