//! Test helper: enters a sandbox and reports, one `name: result` line per attempt, what the
//! sandboxed process can and cannot do. Used by the integration tests of `fsva-sandbox`
//! (they cannot fork from the multithreaded test harness themselves).
//!
//! Must never be shipped as part of an appliance: it deliberately makes forbidden calls.
//!
//! Usage: `fsva-sandbox-probe <probe|threads|wait-signal|exit|bench> [--export DIR | --empty] [--ro]
//!         [--seccomp kill|log|off] [--keep-cap NAME]... [--secret HOST_PATH] [--proc-fd]
//!         [--code N] [--no-userns]`
//!
//! Forbidden attempts run in their own forked child inside the sandbox, so a seccomp kill
//! shows up as `killed by SIGSYS` instead of ending the probe.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use fsva_sandbox::{run_sandboxed, Capability, RootSpec, SandboxConfig, Sandboxed, SeccompMode};

struct Args {
    command: String,
    config: SandboxConfig,
    secret: Option<PathBuf>,
    code: i32,
}

fn usage(msg: &str) -> ! {
    eprintln!("fsva-sandbox-probe: {msg}");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let command = it.next().unwrap_or_else(|| usage("missing command"));
    let mut config = SandboxConfig::new(RootSpec::Empty);
    let mut secret = None;
    let mut code = 0;
    let mut read_only = false;
    let mut export = None;
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--export" => export = Some(PathBuf::from(value())),
            "--empty" => export = None,
            "--ro" => read_only = true,
            "--seccomp" => {
                config.seccomp = match value().as_str() {
                    "kill" => SeccompMode::Kill,
                    "log" => SeccompMode::Log,
                    "off" => SeccompMode::Off,
                    other => usage(&format!("unknown seccomp mode {other}")),
                }
            }
            "--keep-cap" => {
                let v = value();
                config.keep_caps.push(
                    Capability::from_name(&v)
                        .unwrap_or_else(|| usage(&format!("unknown capability {v}"))),
                )
            }
            "--secret" => secret = Some(PathBuf::from(value())),
            "--proc-fd" => config.open_proc_self_fd = true,
            "--no-userns" => config.user_namespace = false,
            "--code" => {
                code = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--code needs a number"))
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if let Some(path) = export {
        config.root = RootSpec::Export { path, read_only };
    }
    Args {
        command,
        config,
        secret,
        code,
    }
}

fn main() {
    let args = parse_args();
    let command = args.command.clone();
    let secret = args.secret.clone();
    let code = args.code;
    let result = run_sandboxed(&args.config, move |sandboxed| match command.as_str() {
        "probe" => probe(sandboxed, secret),
        "threads" => threads(),
        "wait-signal" => {
            println!("ready");
            std::thread::sleep(std::time::Duration::from_secs(60));
            0
        }
        "exit" => code,
        "bench" => bench(),
        other => {
            eprintln!("unknown command {other}");
            2
        }
    });
    match result {
        Ok(code) => {
            println!("launcher: child exited {code}");
            std::process::exit(code)
        }
        Err(e) => {
            println!("launcher: error: {e}");
            std::process::exit(3)
        }
    }
}

fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::ENOSYS => "ENOSYS",
        libc::EROFS => "EROFS",
        libc::EBADF => "EBADF",
        libc::EFAULT => "EFAULT",
        libc::ESRCH => "ESRCH",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::ENOEXEC => "ENOEXEC",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

fn report(name: &str, value: impl std::fmt::Display) {
    println!("{name}: {value}");
    let _ = std::io::stdout().flush();
}

fn io_result<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => errno_name(e.raw_os_error().unwrap_or(0)),
    }
}

/// Run `attempt` in a forked child; the child exits 0 if the attempt succeeded or with the
/// errno it failed with. Reports `ok`, the errno name, or `killed by SIG...`.
fn forked(name: &str, attempt: impl FnOnce() -> i32) {
    let _ = std::io::stdout().flush();
    // SAFETY: the probe is single-threaded when it calls this (threads() runs separately),
    // so the forked child may run arbitrary code; it ends with _exit without unwinding.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = attempt();
        // SAFETY: ends the forked child without running the parent's atexit handlers.
        unsafe { libc::_exit(code) }
    }
    if pid < 0 {
        report(
            name,
            format!("fork failed: {}", std::io::Error::last_os_error()),
        );
        return;
    }
    let mut status = 0;
    // SAFETY: `status` is a live c_int for the kernel to fill in.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let result = if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        if sig == libc::SIGSYS {
            "killed by SIGSYS".to_string()
        } else {
            format!("killed by signal {sig}")
        }
    } else {
        match libc::WEXITSTATUS(status) {
            0 => "ok".to_string(),
            e => errno_name(e),
        }
    };
    report(name, result);
}

/// The errno of the last failed libc call, for a forked attempt's exit code.
fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(255)
        .clamp(1, 255)
}

fn rc_to_exit(rc: libc::c_long) -> i32 {
    if rc < 0 {
        last_errno()
    } else {
        0
    }
}

fn hex(mask: u64) -> String {
    format!("{mask:#x}")
}

fn probe(sandboxed: Sandboxed, secret: Option<PathBuf>) -> i32 {
    // Identity of the process.
    report("pid", std::process::id());
    report(
        "hostname",
        rustix::system::uname().nodename().to_string_lossy(),
    );
    report("uid", rustix::process::getuid().as_raw());
    report("euid", rustix::process::geteuid().as_raw());
    report("gid", rustix::process::getgid().as_raw());
    let caps = rustix::thread::capabilities(None).expect("capget");
    report("caps_eff", hex(caps.effective.bits()));
    report("caps_prm", hex(caps.permitted.bits()));
    report("caps_inh", hex(caps.inheritable.bits()));
    let mut bnd = 0u64;
    let mut amb = 0u64;
    for cap in 0..64u64 {
        // SAFETY: read-only prctl queries with integer arguments.
        let (b, a) = unsafe {
            (
                libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0),
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_IS_SET as u64,
                    cap,
                    0,
                    0,
                ),
            )
        };
        if b == 1 {
            bnd |= 1 << cap;
        }
        if a == 1 {
            amb |= 1 << cap;
        }
    }
    report("caps_bnd", hex(bnd));
    report("caps_amb", hex(amb));
    report(
        "no_new_privs",
        rustix::thread::no_new_privs()
            .map(|b| b.to_string())
            .unwrap_or_else(|e| e.to_string()),
    );
    // SAFETY: read-only prctl queries.
    let (dumpable, seccomp) = unsafe {
        (
            libc::prctl(libc::PR_GET_DUMPABLE),
            libc::prctl(libc::PR_GET_SECCOMP),
        )
    };
    report("dumpable", dumpable);
    report("seccomp_mode", seccomp);
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    report(
        "rlimit_nofile",
        format!("{:?}/{:?}", nofile.current, nofile.maximum),
    );
    let core = rustix::process::getrlimit(rustix::process::Resource::Core);
    report(
        "rlimit_core",
        format!("{:?}/{:?}", core.current, core.maximum),
    );

    // File-system view.
    let mut names: Vec<String> = std::fs::read_dir("/")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    report("root_entries", names.join(","));
    report(
        "read_export",
        std::fs::read_to_string("/inside.txt")
            .unwrap_or_else(|e| format!("error {e}"))
            .trim(),
    );
    report(
        "write_export",
        io_result(std::fs::write("/from-sandbox.txt", "written inside\n")),
    );
    let as_user = std::thread::spawn(|| {
        // setfsuid/setfsgid are per thread; this thread then acts as uid/gid 1000.
        // SAFETY: plain integer syscalls affecting only this thread's credentials.
        unsafe {
            libc::setfsgid(1000);
            libc::setfsuid(1000);
        }
        io_result(std::fs::write("/owned-by-1000.txt", "fsuid 1000\n"))
    })
    .join()
    .unwrap_or_else(|_| "thread panicked".into());
    report("write_as_1000", as_user);
    report(
        "open_etc_hostname",
        io_result(std::fs::File::open("/etc/hostname")),
    );
    if let Some(secret) = &secret {
        report("open_outside_abs", io_result(std::fs::File::open(secret)));
        let dotdot = PathBuf::from(format!("../../../../../..{}", secret.display()));
        report(
            "open_outside_dotdot",
            io_result(std::fs::File::open(&dotdot)),
        );
        report(
            "open_outside_symlink",
            io_result(std::fs::File::open("/escape-link")),
        );
        let name = secret
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        report(
            "open_outside_parent_of_root",
            io_result(std::fs::File::open(format!("/../{name}"))),
        );
    }
    // A character device node (1:3, like /dev/null) in the export: needs CAP_MKNOD in
    // the initial user namespace.
    let dev = c"/probe-chr";
    // SAFETY: a NUL-terminated path and plain integer arguments.
    let rc = unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
    report(
        "mknod_chr_in_export",
        if rc == 0 {
            "ok".to_string()
        } else {
            errno_name(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        },
    );
    // The export is mounted nodev inside: even a node made here cannot be opened.
    if rc == 0 {
        report(
            "open_chr_in_export",
            io_result(std::fs::File::open("/probe-chr")),
        );
        // SAFETY: a NUL-terminated path.
        unsafe { libc::unlink(dev.as_ptr()) };
    }
    if let Some(fd) = &sandboxed.proc_self_fd {
        proc_checks(fd);
    } else {
        report("proc_self_fd", "none");
    }

    // Allowed calls with filtered arguments.
    forked("unshare_fs", || {
        // SAFETY: integer-only syscall.
        rc_to_exit(unsafe { libc::unshare(libc::CLONE_FS) } as libc::c_long)
    });
    forked("prctl_set_name", || {
        // SAFETY: the name is a NUL-terminated static string.
        rc_to_exit(unsafe { libc::prctl(libc::PR_SET_NAME, c"probe".as_ptr()) } as libc::c_long)
    });
    forked("thread_spawn", || match std::thread::spawn(|| 7).join() {
        Ok(7) => 0,
        _ => 99,
    });
    forked("clone3", || {
        let mut args = [0u64; 11];
        args[4] = libc::SIGCHLD as u64; // exit_signal
                                        // SAFETY: a zeroed clone_args with only exit_signal set is a fork; the child exits at once.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                args.as_mut_ptr(),
                std::mem::size_of_val(&args),
            )
        };
        if rc == 0 {
            // SAFETY: end the grandchild immediately.
            unsafe { libc::_exit(0) }
        }
        rc_to_exit(rc)
    });

    // Forbidden calls.
    // SAFETY (for every block below): each call gets integer arguments or pointers to live
    // static data, and runs in a forked child that is thrown away afterwards.
    forked("socket_inet", || {
        rc_to_exit(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) } as _)
    });
    forked("socket_inet6", || {
        rc_to_exit(unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM, 0) } as _)
    });
    forked("socket_unix", || {
        rc_to_exit(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) } as _)
    });
    forked("socketpair_unix", || {
        let mut fds = [0; 2];
        rc_to_exit(unsafe {
            libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr())
        } as _)
    });
    forked("ptrace_traceme", || {
        rc_to_exit(unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) })
    });
    forked("ptrace_attach", || {
        rc_to_exit(unsafe { libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0) })
    });
    forked("mount", || {
        rc_to_exit(unsafe {
            libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        } as _)
    });
    forked("umount2", || {
        rc_to_exit(unsafe { libc::umount2(c"/".as_ptr(), libc::MNT_DETACH) } as _)
    });
    forked("pivot_root", || {
        rc_to_exit(unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) })
    });
    forked("chroot", || {
        rc_to_exit(unsafe { libc::chroot(c"/".as_ptr()) } as _)
    });
    forked("init_module", || {
        rc_to_exit(unsafe {
            libc::syscall(
                libc::SYS_init_module,
                std::ptr::null::<u8>(),
                0,
                c"".as_ptr(),
            )
        })
    });
    forked("finit_module", || {
        rc_to_exit(unsafe { libc::syscall(libc::SYS_finit_module, 0, c"".as_ptr(), 0) })
    });
    forked("delete_module", || {
        rc_to_exit(unsafe { libc::syscall(libc::SYS_delete_module, c"ext4".as_ptr(), 0) })
    });
    forked("kexec_load", || {
        rc_to_exit(unsafe { libc::syscall(libc::SYS_kexec_load, 0, 0, 0, 0) })
    });
    forked("bpf", || {
        rc_to_exit(unsafe { libc::syscall(libc::SYS_bpf, 0, 0, 0) })
    });
    forked("perf_event_open", || {
        rc_to_exit(unsafe { libc::syscall(libc::SYS_perf_event_open, 0, 0, -1, -1, 0) })
    });
    forked("keyctl", || {
        rc_to_exit(unsafe { libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0) })
    });
    forked("add_key", || {
        rc_to_exit(unsafe { libc::syscall(libc::SYS_add_key, 0, 0, 0, 0, 0) })
    });
    forked("process_vm_readv", || {
        rc_to_exit(unsafe { libc::syscall(libc::SYS_process_vm_readv, 1, 0, 0, 0, 0, 0) })
    });
    forked("setns", || rc_to_exit(unsafe { libc::setns(0, 0) } as _));
    forked("unshare_user", || {
        rc_to_exit(unsafe { libc::unshare(libc::CLONE_NEWUSER) } as _)
    });
    forked("unshare_mount", || {
        rc_to_exit(unsafe { libc::unshare(libc::CLONE_NEWNS) } as _)
    });
    forked("clone_newuser", || {
        let flags = (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong;
        let rc = unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) };
        if rc == 0 {
            unsafe { libc::_exit(0) }
        }
        rc_to_exit(rc)
    });
    forked("open_by_handle_at", || {
        rc_to_exit(unsafe { libc::syscall(libc::SYS_open_by_handle_at, 0, 0, 0) })
    });
    forked("execve", || {
        let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
        rc_to_exit(
            unsafe { libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), std::ptr::null()) } as _,
        )
    });
    forked("sethostname", || {
        rc_to_exit(unsafe { libc::sethostname(c"evil".as_ptr(), 4) } as _)
    });
    forked("reboot", || {
        rc_to_exit(unsafe { libc::syscall(libc::SYS_reboot, 0, 0, 0, 0) })
    });
    forked("io_uring_setup", || {
        rc_to_exit(unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, 0) })
    });
    forked("kill_init_ns", || {
        rc_to_exit(unsafe { libc::kill(1, 0) } as _)
    });
    forked("ioctl_tiocsti", || {
        let c = b'x';
        rc_to_exit(unsafe { libc::ioctl(0, libc::TIOCSTI, &c) } as _)
    });
    forked("prctl_set_dumpable", || {
        rc_to_exit(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1) } as _)
    });
    0
}

fn proc_checks(fd: &OwnedFd) {
    let raw = fd.as_raw_fd();
    let file = std::fs::File::open("/inside.txt").expect("open /inside.txt");
    let name = std::ffi::CString::new(file.as_raw_fd().to_string()).expect("no NUL");
    // SAFETY: `name` is NUL-terminated and `raw` a live descriptor for the whole call.
    let reopened = unsafe { libc::openat(raw, name.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if reopened >= 0 {
        // SAFETY: the kernel just returned this descriptor to us.
        unsafe { libc::close(reopened) };
        report("proc_reopen", "ok");
    } else {
        report("proc_reopen", errno_name(last_errno()));
    }
    for (label, path) in [
        ("proc_escape_sys", c"../../sys/kernel/hostname"),
        ("proc_escape_host_pid", c"../../2/status"),
    ] {
        // SAFETY: as above.
        let rc = unsafe { libc::openat(raw, path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if rc >= 0 {
            // SAFETY: as above.
            unsafe { libc::close(rc) };
            report(label, "ok");
        } else {
            report(label, errno_name(last_errno()));
        }
    }
}

/// A multithreaded workload: threads, locks, channels, allocation, file I/O, a caught panic.
fn threads() -> i32 {
    use std::collections::HashMap;
    use std::sync::{mpsc, Arc, Barrier, Condvar, Mutex};

    let started = std::time::Instant::now();
    let dir = std::path::Path::new("/threads");
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("create {dir:?}: {e}");
        return 10;
    }
    let barrier = Arc::new(Barrier::new(4));
    let counter = Arc::new((Mutex::new(0u64), Condvar::new()));
    let (tx, rx) = mpsc::channel::<(usize, usize)>();
    let mut handles = Vec::new();
    for i in 0..4 {
        let barrier = barrier.clone();
        let counter = counter.clone();
        let tx = tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || -> std::io::Result<()> {
                barrier.wait();
                let big: Vec<u8> = vec![i as u8; 8 << 20];
                let mut map = HashMap::new();
                for j in 0..1000 {
                    map.insert(j, vec![j as u8; 64]);
                }
                for j in 0..20 {
                    let p = dir.join(format!("t{i}-{j}"));
                    std::fs::write(&p, &big[..4096 * (j + 1)])?;
                    let f = std::fs::OpenOptions::new().append(true).open(&p)?;
                    f.sync_all()?;
                    let meta = std::fs::metadata(&p)?;
                    assert_eq!(meta.len() as usize, 4096 * (j + 1));
                    let q = dir.join(format!("r{i}-{j}"));
                    std::fs::rename(&p, &q)?;
                    assert_eq!(std::fs::read(&q)?.len(), 4096 * (j + 1));
                    std::fs::remove_file(&q)?;
                }
                let (lock, cv) = &*counter;
                *lock.lock().unwrap() += 1;
                cv.notify_all();
                std::thread::sleep(std::time::Duration::from_millis(5));
                eprintln!("worker {i} done ({} entries)", map.len());
                tx.send((i, big.len())).unwrap();
                Ok(())
            })
            .expect("spawn");
        handles.push(h);
    }
    drop(tx);
    let (lock, cv) = &*counter;
    let guard = cv.wait_while(lock.lock().unwrap(), |n| *n < 4).unwrap();
    drop(guard);
    let received: Vec<_> = rx.iter().collect();
    for h in handles {
        if let Err(e) = h.join().expect("worker panicked") {
            eprintln!("worker failed: {e}");
            return 11;
        }
    }
    let panicked = std::thread::spawn(|| panic!("deliberate panic in a sandboxed thread"))
        .join()
        .is_err();
    let entries = std::fs::read_dir(dir)
        .map(|d| d.count())
        .unwrap_or(usize::MAX);
    std::fs::remove_dir(dir).ok();
    report(
        "threads",
        format!(
            "ok messages={} panic_caught={panicked} leftover={entries} ms={}",
            received.len(),
            started.elapsed().as_millis()
        ),
    );
    0
}

/// Cost of an allowed system call under the current filter: `getppid` (unconditionally
/// allowed, so the kernel's seccomp action cache can skip the BPF program) and `fcntl`
/// (F_GETFD) vs `ioctl(FIONREAD)` (argument-filtered, always runs the program).
fn bench() -> i32 {
    const N: u32 = 200_000;
    let file = std::fs::File::open("/").expect("open /");
    let fd = file.as_raw_fd();
    let time = |name: &str, f: &dyn Fn()| {
        let t = std::time::Instant::now();
        for _ in 0..N {
            f();
        }
        report(
            name,
            format!("{:.0} ns", t.elapsed().as_nanos() as f64 / N as f64),
        );
    };
    // SAFETY: integer-only system calls on a live descriptor.
    time("getppid", &|| unsafe {
        libc::syscall(libc::SYS_getppid);
    });
    time("fcntl_getfd", &|| unsafe {
        libc::fcntl(fd, libc::F_GETFD);
    });
    let mut n: libc::c_int = 0;
    let p = &mut n as *mut libc::c_int;
    time("ioctl_fionread", &|| unsafe {
        libc::ioctl(fd, libc::FIONREAD, p);
    });
    0
}
