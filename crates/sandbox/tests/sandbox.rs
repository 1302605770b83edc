//! Integration tests of `fsva-sandbox`: they run the `fsva-sandbox-probe` helper (which
//! enters a real sandbox; the multithreaded test harness itself must not fork) and check
//! what it could and could not do. They need root (an identity map of all ids).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

const PROBE: &str = env!("CARGO_BIN_EXE_fsva-sandbox-probe");
const INSIDE: &str = "hello from the host\n";

fn is_root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    eprintln!("skipping: the sandbox's identity id map needs root");
    false
}

/// A host directory with `export/` (the sandbox root) and `secret.txt` next to it.
struct Fixture {
    _dir: tempfile::TempDir,
    export: PathBuf,
    secret: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let export = dir.path().join("export");
    std::fs::create_dir(&export).unwrap();
    std::fs::write(export.join("inside.txt"), INSIDE).unwrap();
    // fsuid 1000 must be able to create files in it.
    std::fs::set_permissions(&export, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "host secret\n").unwrap();
    std::os::unix::fs::symlink(&secret, export.join("escape-link")).unwrap();
    Fixture {
        _dir: dir,
        export,
        secret,
    }
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(PROBE)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run probe");
    eprintln!(
        "--- probe {args:?} stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!("--- stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn lines(out: &Output) -> HashMap<String, String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn probe(f: &Fixture, extra: &[&str]) -> HashMap<String, String> {
    let mut args = vec![
        "probe",
        "--export",
        f.export.to_str().unwrap(),
        "--secret",
        f.secret.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = run(&args);
    assert_eq!(out.status.code(), Some(0), "probe failed");
    lines(&out)
}

fn get<'a>(m: &'a HashMap<String, String>, k: &str) -> &'a str {
    m.get(k)
        .unwrap_or_else(|| panic!("probe did not report {k}"))
        .as_str()
}

const KEEP: &[&str] = &[
    "--keep-cap",
    "setuid",
    "--keep-cap",
    "setgid",
    "--keep-cap",
    "chown",
];

#[test]
fn export_is_readable_and_writable_and_writes_reach_the_host() {
    assert!(
        is_root(),
        "the sandbox tests need root (namespaces, id maps, mounts)"
    );
    let f = fixture();
    let m = probe(&f, KEEP);
    assert_eq!(get(&m, "read_export"), INSIDE.trim());
    assert_eq!(get(&m, "write_export"), "ok");
    let written = f.export.join("from-sandbox.txt");
    assert_eq!(
        std::fs::read_to_string(&written).unwrap(),
        "written inside\n"
    );
    // Identity map: uid 0 inside is the real uid outside, and setfsuid(1000) inside
    // creates files owned by 1000 on the host.
    assert_eq!(
        std::fs::metadata(&written).unwrap().uid(),
        rustix::process::getuid().as_raw()
    );
    assert_eq!(get(&m, "write_as_1000"), "ok");
    let meta = std::fs::metadata(f.export.join("owned-by-1000.txt")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    assert_eq!(get(&m, "root_entries"), "escape-link,inside.txt");
}

#[test]
fn host_paths_outside_the_export_cannot_be_opened() {
    assert!(
        is_root(),
        "the sandbox tests need root (namespaces, id maps, mounts)"
    );
    let f = fixture();
    let m = probe(&f, &[]);
    for k in [
        "open_etc_hostname",
        "open_outside_abs",
        "open_outside_dotdot",
        "open_outside_symlink",
        "open_outside_parent_of_root",
    ] {
        let v = get(&m, k);
        assert!(v == "ENOENT" || v == "EACCES", "{k}: {v}");
    }
}

#[test]
fn forbidden_syscalls_kill_the_process() {
    assert!(
        is_root(),
        "the sandbox tests need root (namespaces, id maps, mounts)"
    );
    let f = fixture();
    let m = probe(&f, KEEP);
    for k in [
        "socket_inet",
        "socket_inet6",
        "socket_unix",
        "socketpair_unix",
        "ptrace_traceme",
        "ptrace_attach",
        "mount",
        "umount2",
        "pivot_root",
        "chroot",
        "init_module",
        "finit_module",
        "delete_module",
        "kexec_load",
        "bpf",
        "perf_event_open",
        "keyctl",
        "add_key",
        "process_vm_readv",
        "setns",
        "unshare_user",
        "unshare_mount",
        "clone_newuser",
        "open_by_handle_at",
        "execve",
        "sethostname",
        "reboot",
        "io_uring_setup",
        "kill_init_ns",
        "ioctl_tiocsti",
        "prctl_set_dumpable",
    ] {
        assert_eq!(get(&m, k), "killed by SIGSYS", "{k}");
    }
    // Argument-filtered calls that are allowed, and clone3 refused softly.
    assert_eq!(get(&m, "unshare_fs"), "ok");
    assert_eq!(get(&m, "prctl_set_name"), "ok");
    assert_eq!(get(&m, "thread_spawn"), "ok");
    assert_eq!(get(&m, "clone3"), "ENOSYS");
    assert_eq!(get(&m, "seccomp_mode"), "2");
}

#[test]
fn without_seccomp_the_namespaces_and_dropped_caps_still_deny_mounting() {
    assert!(
        is_root(),
        "the sandbox tests need root (namespaces, id maps, mounts)"
    );
    let f = fixture();
    let m = probe(&f, &["--seccomp", "off"]);
    assert_eq!(get(&m, "seccomp_mode"), "0");
    assert_eq!(get(&m, "mount"), "EPERM");
    assert_eq!(get(&m, "unshare_mount"), "EPERM");
    assert_eq!(get(&m, "open_outside_abs"), "ENOENT");
}

#[test]
fn process_identity_is_isolated() {
    assert!(
        is_root(),
        "the sandbox tests need root (namespaces, id maps, mounts)"
    );
    let f = fixture();
    let m = probe(&f, &[]);
    assert_eq!(get(&m, "pid"), "1");
    assert_eq!(get(&m, "hostname"), "fsva-appliance");
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    assert_ne!(host, "fsva-appliance");
    let uid = rustix::process::getuid().as_raw().to_string();
    assert_eq!(get(&m, "uid"), uid);
    assert_eq!(get(&m, "euid"), uid);
    assert_eq!(get(&m, "no_new_privs"), "true");
    assert_eq!(get(&m, "dumpable"), "0");
    assert_eq!(get(&m, "rlimit_core"), "Some(0)/Some(0)");
}

#[test]
fn only_kept_capabilities_remain() {
    assert!(
        is_root(),
        "the sandbox tests need root (namespaces, id maps, mounts)"
    );
    let f = fixture();
    let m = probe(&f, KEEP);
    let kept = "0xc1"; // CAP_CHOWN(0) | CAP_SETGID(6) | CAP_SETUID(7)
    for k in ["caps_eff", "caps_prm", "caps_bnd"] {
        assert_eq!(get(&m, k), kept, "{k}");
    }
    assert_eq!(get(&m, "caps_inh"), "0x0");
    assert_eq!(get(&m, "caps_amb"), "0x0");
    let none = probe(&f, &[]);
    for k in ["caps_eff", "caps_prm", "caps_bnd", "caps_inh", "caps_amb"] {
        assert_eq!(get(&none, k), "0x0", "{k}");
    }
    // Without CAP_SETUID, setfsuid(1000) is refused and without CAP_DAC_OVERRIDE uid 0 cannot
    // overwrite the 0644 file the first run created as uid 1000.
    assert_eq!(get(&none, "write_as_1000"), "EACCES");
}

#[test]
fn proc_self_fd_works_and_does_not_reach_the_host() {
    assert!(
        is_root(),
        "the sandbox tests need root (namespaces, id maps, mounts)"
    );
    let f = fixture();
    let m = probe(&f, &["--proc-fd"]);
    assert_eq!(get(&m, "proc_reopen"), "ok");
    assert_eq!(get(&m, "proc_escape_sys"), "ENOENT");
    assert_eq!(get(&m, "proc_escape_host_pid"), "ENOENT");
    let without = probe(&f, &[]);
    assert_eq!(get(&without, "proc_self_fd"), "none");
}

#[test]
fn read_only_export_and_empty_root() {
    assert!(
        is_root(),
        "the sandbox tests need root (namespaces, id maps, mounts)"
    );
    let f = fixture();
    let m = probe(&f, &["--ro"]);
    assert_eq!(get(&m, "read_export"), INSIDE.trim());
    assert_eq!(get(&m, "write_export"), "EROFS");
    assert!(!f.export.join("from-sandbox.txt").exists());

    let out = run(&["probe", "--empty"]);
    assert_eq!(out.status.code(), Some(0));
    let e = lines(&out);
    assert_eq!(get(&e, "root_entries"), "");
    assert_eq!(get(&e, "write_export"), "EROFS");
    assert_eq!(get(&e, "pid"), "1");
}

fn threads(mode: &str) {
    assert!(
        is_root(),
        "the sandbox tests need root (namespaces, id maps, mounts)"
    );
    let f = fixture();
    let out = run(&[
        "threads",
        "--export",
        f.export.to_str().unwrap(),
        "--seccomp",
        mode,
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "threads workload failed with seccomp {mode}"
    );
    let m = lines(&out);
    assert!(
        get(&m, "threads").starts_with("ok messages=4 panic_caught=true leftover=0"),
        "{m:?}"
    );
    assert!(!f.export.join("threads").exists());
}

#[test]
fn multithreaded_child_without_seccomp() {
    threads("off");
}

#[test]
fn multithreaded_child_with_seccomp_kill() {
    threads("kill");
}

#[test]
fn exit_code_and_sigterm_are_forwarded() {
    assert!(
        is_root(),
        "the sandbox tests need root (namespaces, id maps, mounts)"
    );
    let out = run(&["exit", "--empty", "--code", "42"]);
    assert_eq!(out.status.code(), Some(42));

    let mut child = Command::new(PROBE)
        .args(["wait-signal", "--empty"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = child.wait().unwrap();
    // The launcher forwards SIGTERM; the sandboxed pid 1 exits with 128 + 15.
    assert_eq!(status.code(), Some(143));
}

#[test]
fn setup_errors_are_reported() {
    assert!(
        is_root(),
        "the sandbox tests need root (namespaces, id maps, mounts)"
    );
    let out = run(&["probe", "--export", "/nonexistent/fsva-export"]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("export directory \"/nonexistent/fsva-export\" cannot be used"),
        "{text}"
    );
}

#[test]
fn refuses_to_fork_a_multithreaded_process() {
    // The test harness runs this on a worker thread, so the process has >= 2 threads.
    let config = fsva_sandbox::SandboxConfig::new(fsva_sandbox::RootSpec::Empty);
    let err = fsva_sandbox::run_sandboxed(&config, |_| 0).unwrap_err();
    assert!(
        matches!(err, fsva_sandbox::SandboxError::NotSingleThreaded { threads } if threads >= 2),
        "{err}"
    );
    assert!(err.to_string().contains("must be single-threaded"));
}

#[test]
fn user_namespace_forbids_device_nodes() {
    let f = fixture();
    let m = probe(&f, &["--keep-cap", "mknod"]);
    assert_eq!(get(&m, "mknod_chr_in_export"), "EPERM");
}

#[test]
fn without_a_user_namespace_device_nodes_work_and_the_walls_stay() {
    let f = fixture();
    let m = probe(&f, &["--no-userns", "--keep-cap", "mknod"]);
    assert_eq!(get(&m, "mknod_chr_in_export"), "ok");
    let open = get(&m, "open_chr_in_export");
    assert!(
        open == "EACCES" || open == "EPERM",
        "device nodes must not open inside: {open}"
    );
    for k in [
        "open_etc_hostname",
        "open_outside_dotdot",
        "open_outside_symlink",
    ] {
        let v = get(&m, k);
        assert!(v == "ENOENT" || v == "EACCES", "{k}: {v}");
    }
    assert_eq!(get(&m, "pid"), "1");
}
