//! Shared harness for fsva's end-to-end tests: locating the built binaries, mounting and
//! unmounting fsva on temporary directories, and running the conformance probe as a
//! subprocess. It never stands in for the kernel or an appliance: every helper drives
//! the real `fsva` binary against real FUSE mounts. [`guest`] boots user VMs that
//! reach fsva through their own virtiofs driver.

pub mod guest;
pub mod workload;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Directory of the built binaries (`target/<profile>`), found from the test executable.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// A binary built by this workspace; panics with a hint if it was not built.
pub fn binary(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(format!(
        "FSVA_BIN_{}",
        name.replace('-', "_").to_uppercase()
    )) {
        return PathBuf::from(p);
    }
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo build --workspace --bins`)",
        p.display()
    );
    p
}

/// Makes the child `cmd` starts die with the test thread that starts it: a test killed
/// or timed out (no destructors run) must not leave QEMUs or servers running.
pub fn dies_with_test(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Runs `fsva` with `args` and returns its output.
pub fn fsva(args: &[&str]) -> Output {
    Command::new(binary("fsva"))
        .args(args)
        .output()
        .expect("running fsva")
}

/// A scratch directory on the native file system (ext4 here), removed on drop.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let base = std::env::var_os("FSVA_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp/fsva-tests"));
        std::fs::create_dir_all(&base).expect("creating the test base directory");
        let path = tempfile::Builder::new()
            .prefix(&format!("{tag}-"))
            .tempdir_in(&base)
            .expect("creating a scratch directory")
            .keep();
        Scratch { path }
    }

    /// Makes the directory usable by every user (for unprivileged runs).
    pub fn open_to_all(&self) -> &Self {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o777)).unwrap();
        self
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A live fsva mount, unmounted (and checked) on drop.
pub struct Mount {
    pub dir: Scratch,
    pub backend: String,
    /// Keeps a passthrough export alive as long as the mount.
    pub export: Option<Scratch>,
}

impl Mount {
    /// Mounts `backend` (`mem`, or `passthrough` for a fresh export) with extra args.
    pub fn new(backend: &str, extra: &[&str]) -> Mount {
        let export = (backend == "passthrough").then(|| {
            let s = Scratch::new("export");
            s.open_to_all();
            s
        });
        let spec = match &export {
            Some(e) => format!("passthrough:{}", e.path.display()),
            None => backend.to_string(),
        };
        let dir = Scratch::new("mnt");
        let mp = dir.path.to_str().unwrap().to_string();
        let mut args = vec!["mount", "--backend", &spec];
        args.extend_from_slice(extra);
        args.push(&mp);
        let out = fsva(&args);
        assert!(
            out.status.success(),
            "fsva mount {spec} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Mount {
            dir,
            backend: spec,
            export,
        }
    }

    /// Mounts the disk image `image` through a VM appliance (`fsva mount --vm`).
    pub fn vm(image: &Path, extra: &[&str]) -> Mount {
        let dir = Scratch::new("vmmnt");
        let mut args = vec!["mount", "--vm", "--image", image.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.push(dir.path.to_str().unwrap());
        let out = fsva(&args);
        assert!(
            out.status.success(),
            "fsva mount --vm {} failed: {}{}",
            image.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Mount {
            dir,
            backend: format!("image:{}", image.display()),
            export: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir.path
    }

    /// Unmounts through `fsva umount`, asserting it succeeds. A mount the test has let
    /// go of can still be busy for a moment: another test thread's child, between its
    /// fork and its exec, holds copies of every descriptor this process has (until exec
    /// closes them), so EBUSY is retried for a short while.
    pub fn unmount(self) {
        let mp = self.path().to_str().unwrap().to_string();
        let mut out = fsva(&["umount", &mp]);
        let deadline = Instant::now() + Duration::from_secs(3);
        while !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("busy")
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
            out = fsva(&["umount", &mp]);
        }
        assert!(
            out.status.success(),
            "fsva umount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!is_mounted(self.path()), "still mounted after fsva umount");
    }

    /// The lines `fsva status` shows for this mount (its row and the notes under it).
    pub fn status(&self) -> String {
        let out = fsva(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let me = self.path().to_str().unwrap();
        let mut lines = text.lines().skip_while(|l| !l.starts_with(me));
        let Some(row) = lines.next() else {
            panic!("status does not list {me}:\n{text}");
        };
        let notes = lines.take_while(|l| l.starts_with(' '));
        std::iter::once(row)
            .chain(notes)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The REQUESTS column of `fsva status` for this mount: requests the appliance served.
    pub fn requests(&self) -> u64 {
        let status = self.status();
        status.split_whitespace().nth(6).unwrap().parse().unwrap()
    }

    /// How many requests the supervisor's stream relay answered itself, as `fsva
    /// status` says (`None` where it answers none: not a relayed sole writer).
    pub fn relay_answered(&self) -> Option<u64> {
        let status = self.status();
        let (_, after) = status.split_once("the relay answered ")?;
        after.split_whitespace().next()?.parse().ok()
    }

    /// The pids `fsva status` reports for this mount: (supervisor, appliance).
    pub fn pids(&self) -> (u32, Option<u32>) {
        let record = mount_record(self.path()).expect("mount record");
        let sup = record["supervisor_pid"].parse().unwrap();
        let app = record.get("appliance_pid").and_then(|p| p.parse().ok());
        (sup, app)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let mp = self.dir.path.to_str().unwrap().to_string();
        if is_mounted(&self.dir.path) {
            let out = fsva(&["umount", &mp]);
            if !out.status.success() {
                let _ = fsva(&["umount", "--lazy", &mp]);
            }
        }
    }
}

/// Reads the runtime record of the mount at `mountpoint`.
pub fn mount_record(mountpoint: &Path) -> Option<std::collections::BTreeMap<String, String>> {
    record_file(mountpoint).map(|(_, map)| map)
}

/// The runtime record file of the mount at `mountpoint`, and its fields.
fn record_file(mountpoint: &Path) -> Option<(PathBuf, std::collections::BTreeMap<String, String>)> {
    let dir = std::env::var_os("FSVA_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/fsva"));
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        if e.path().extension().is_some_and(|x| x == "mount") {
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            let map: std::collections::BTreeMap<String, String> = text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            if map.get("mountpoint").map(PathBuf::from).as_deref() == Some(mountpoint) {
                return Some((e.path(), map));
            }
        }
    }
    None
}

/// The log of the (detached) supervisor of the mount at `mountpoint`.
pub fn mount_log(mountpoint: &Path) -> String {
    record_file(mountpoint)
        .and_then(|(p, _)| std::fs::read_to_string(p.with_extension("log")).ok())
        .unwrap_or_default()
}

/// Whether /proc/self/mountinfo lists a mount at `path`.
pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = path.to_string_lossy();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|m| m.replace("\\040", " ") == want)
    })
}

/// Runs the conformance probe on `dir`, optionally as `uid`, and returns its transcript.
pub fn conformance(dir: &Path, as_uid: Option<u32>) -> Vec<String> {
    let mut cmd = Command::new(binary("fsva-conformance"));
    cmd.arg("--dir").arg(dir);
    if let Some(uid) = as_uid {
        cmd.args(["--as-uid", &uid.to_string(), "--as-gid", &uid.to_string()]);
    }
    let out = cmd.output().expect("running fsva-conformance");
    assert!(
        out.status.success(),
        "fsva-conformance failed on {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Lines that differ between two transcripts, formatted for a failure message.
pub fn transcript_diff(native: &[String], fsva: &[String]) -> Vec<String> {
    let key = |l: &String| {
        l.split_once(':')
            .map(|(k, _)| k.to_string())
            .unwrap_or_default()
    };
    let n: std::collections::BTreeMap<String, &String> =
        native.iter().map(|l| (key(l), l)).collect();
    let f: std::collections::BTreeMap<String, &String> = fsva.iter().map(|l| (key(l), l)).collect();
    let mut diff = Vec::new();
    for (k, nl) in &n {
        match f.get(k) {
            Some(fl) if fl == nl => {}
            Some(fl) => diff.push(format!("  native: {nl}\n  fsva:   {fl}")),
            None => diff.push(format!("  native: {nl}\n  fsva:   (missing)")),
        }
    }
    for (k, fl) in &f {
        if !n.contains_key(k) {
            diff.push(format!("  native: (missing)\n  fsva:   {fl}"));
        }
    }
    diff
}

/// The first child of process `pid` (an appliance's sandboxed process is the child of
/// the one its supervisor or daemon started; a vhost server's appliance is its child).
pub fn first_child(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs `f` in a thread and fails if it takes longer than `limit` (a hung mount).
pub fn within<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

/// Waits until `cond` holds, up to `limit`.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Runs `e2fsck -fn` on an ext4 image and fails, with its report, if it finds problems.
pub fn assert_ext4_clean(img: &Path, when: &str) {
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(img)
        .output()
        .expect("running e2fsck (e2fsprogs)");
    assert!(
        fsck.status.success(),
        "e2fsck found problems {when}:\n{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// A file's bytes, read from an unmounted ext4 image with debugfs.
pub fn debugfs_cat(img: &Path, path: &str) -> Vec<u8> {
    Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(img)
        .output()
        .expect("running debugfs (e2fsprogs)")
        .stdout
}
