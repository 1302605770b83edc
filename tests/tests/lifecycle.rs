//! The life of a mount as a user sees it: mount, status, unmount, signals, a killed
//! supervisor, a killed appliance, and the one-line errors for bad arguments.

use std::io::{Read, Write};
use std::time::Duration;

use fsva_tests::{fsva, is_mounted, mount_record, wait_for, within, Mount, Scratch};

fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid and signal number has no memory effects.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[test]
fn mount_serves_status_reports_and_umount_removes() {
    let m = Mount::new("mem", &[]);
    let file = m.path().join("hello.txt");
    std::fs::write(&file, b"hello fsva").unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), b"hello fsva");

    let out = fsva(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with(m.path().to_str().unwrap()))
        .unwrap_or_else(|| panic!("status does not list the mount:\n{text}"));
    let (_, appliance) = m.pids();
    assert!(
        line.contains("mem") && line.contains("fusedev") && line.contains("namespaces"),
        "{line}"
    );
    assert!(line.contains(&appliance.unwrap().to_string()), "{line}");
    assert!(line.contains("serving"), "{line}");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let requests: u64 = fields[6].parse().unwrap();
    assert!(
        requests >= 4,
        "requests served should count our operations: {line}"
    );

    let path = m.path().to_path_buf();
    m.unmount();
    assert!(!is_mounted(&path));
    assert!(mount_record(&path).is_none(), "runtime record left behind");
}

#[test]
fn fsva_sync_syncs_through_the_appliance_of_either_backend() {
    for backend in ["mem", "passthrough"] {
        let m = Mount::new(backend, &[]);
        std::fs::write(m.path().join("f"), b"durable").unwrap();
        let out = fsva(&["sync", m.path().to_str().unwrap()]);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("synced"),
            "fsva sync on {backend}: {out:?}"
        );
        m.unmount();
    }
}

#[test]
fn sigterm_to_supervisor_unmounts_cleanly() {
    let m = Mount::new("mem", &[]);
    let (sup, app) = m.pids();
    kill(sup, libc::SIGTERM);
    assert!(
        wait_for(Duration::from_secs(5), || !is_mounted(m.path())),
        "still mounted after SIGTERM"
    );
    assert!(
        wait_for(Duration::from_secs(5), || !alive(app.unwrap())),
        "appliance outlived the unmount"
    );
    assert!(wait_for(Duration::from_secs(5), || !alive(sup)));
}

#[test]
fn killed_supervisor_leaves_a_mount_fsva_umount_removes() {
    let m = Mount::new("mem", &[]);
    let (sup, app) = m.pids();
    kill(sup, libc::SIGKILL);
    assert!(
        wait_for(Duration::from_secs(5), || !alive(app.unwrap())),
        "appliance outlived its supervisor"
    );
    // Once the last /dev/fuse descriptor is gone the kernel fails every request.
    let p = m.path().join("new-file");
    let failing = wait_for(Duration::from_secs(3), || {
        let p = p.clone();
        matches!(
            within(Duration::from_secs(1), move || std::fs::File::create(&p)
                .map(|_| ())),
            Some(Err(_))
        )
    });
    assert!(
        failing,
        "the mount still serves after its supervisor and appliance died"
    );
    let out = fsva(&["umount", m.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(m.path()));
}

/// Where no successor can take over (no recovery journal, or a stream channel), a
/// killed appliance costs errors at once, never a hang.
#[test]
fn killed_appliance_turns_into_errors_within_a_second() {
    for channel in ["fusedev", "stream"] {
        let m = Mount::new("mem", &["--channel", channel, "--no-recovery"]);
        let mut f = std::fs::File::create(m.path().join("f")).unwrap();
        f.write_all(b"data").unwrap();
        let (_, app) = m.pids();
        kill(app.unwrap(), libc::SIGKILL);
        let p = m.path().join("f");
        let r = within(Duration::from_secs(1), move || {
            // Let the supervisor notice, then every access must fail, not hang.
            std::thread::sleep(Duration::from_millis(200));
            let mut s = String::new();
            std::fs::File::open(&p).and_then(|mut f| f.read_to_string(&mut s))
        });
        assert!(
            matches!(r, Some(Err(_))),
            "{channel}: expected an error within 1 s, got {r:?}"
        );
        let out = fsva(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("appliance gone"),
            "{channel}: status should say so:\n{text}"
        );
        drop(f);
        m.unmount();
    }
}

fn one_line_error(args: &[&str], needle: &str) {
    let out = fsva(args);
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim().lines().count(),
        1,
        "{args:?}: expected one line, got:\n{err}"
    );
    assert!(err.contains(needle), "{args:?}: {err}");
}

#[test]
fn bad_arguments_get_one_line_errors_that_say_what_to_do() {
    let s = Scratch::new("args");
    let missing = s.path.join("missing");
    one_line_error(&["mount", missing.to_str().unwrap()], "mkdir -p");
    std::fs::create_dir(s.path.join("full")).unwrap();
    std::fs::write(s.path.join("full/x"), b"").unwrap();
    one_line_error(
        &["mount", s.path.join("full").to_str().unwrap()],
        "not empty",
    );
    std::fs::create_dir(s.path.join("mp")).unwrap();
    let mp = s.path.join("mp");
    one_line_error(
        &[
            "mount",
            "--backend",
            "passthrough:/nonexistent/dir",
            mp.to_str().unwrap(),
        ],
        "does it exist",
    );
    one_line_error(
        &["mount", "--backend", "zfs", mp.to_str().unwrap()],
        "unknown backend",
    );
    one_line_error(
        &["mount", "-o", "bogus", mp.to_str().unwrap()],
        "unknown mount option",
    );
    one_line_error(&["sync", mp.to_str().unwrap()], "not an fsva mount");
    assert!(!is_mounted(&mp));
}

#[test]
fn mount_fuse_fsva_helper_mounts_like_mount_t() {
    let s = Scratch::new("helper");
    let helper = s.path.join("mount.fuse.fsva");
    std::os::unix::fs::symlink(fsva_tests::binary("fsva"), &helper).unwrap();
    let mp = s.path.join("mp");
    std::fs::create_dir(&mp).unwrap();
    let out = std::process::Command::new(&helper)
        .args(["mem", mp.to_str().unwrap(), "-o", "rw,nosuid"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&mp));
    std::fs::write(mp.join("x"), b"1").unwrap();
    let out = fsva(&["umount", mp.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(!is_mounted(&mp));
}

#[test]
fn missing_dev_fuse_gets_a_one_line_error() {
    // A private mount namespace whose /dev lacks the fuse device.
    let s = Scratch::new("nofuse");
    let mp = s.path.join("mp");
    std::fs::create_dir(&mp).unwrap();
    let script = format!(
        "mount -t tmpfs none /dev && exec {} mount {}",
        fsva_tests::binary("fsva").display(),
        mp.display()
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("/dev/fuse is missing"), "{err}");
}

#[test]
fn a_plain_umount_ends_the_supervisor_and_its_records() {
    for channel in ["fusedev", "stream"] {
        let m = Mount::new("mem", &["--channel", channel]);
        let (sup, app) = m.pids();
        let st = std::process::Command::new("umount")
            .arg(m.path())
            .status()
            .unwrap();
        assert!(st.success());
        assert!(
            wait_for(Duration::from_secs(5), || !alive(sup)
                && !alive(app.unwrap())),
            "{channel}: supervisor or appliance still running after umount"
        );
        assert!(
            mount_record(m.path()).is_none(),
            "{channel}: runtime record left behind"
        );
    }
}

#[test]
fn a_lazy_unmount_keeps_serving_open_files_until_they_close() {
    let m = Mount::new("mem", &[]);
    let (sup, _) = m.pids();
    let mut f = std::fs::File::create(m.path().join("open")).unwrap();
    let out = fsva(&["umount", "--lazy", m.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(m.path()));
    // The detached file system still serves the open file.
    std::thread::sleep(Duration::from_millis(300));
    f.write_all(b"still served").unwrap();
    f.sync_all().unwrap();
    assert!(
        alive(sup),
        "the supervisor left while a file was still open"
    );
    drop(f);
    assert!(
        wait_for(Duration::from_secs(5), || !alive(sup)),
        "the supervisor did not end after the last file closed"
    );
}
