//! Mount options as users set them: `-o ro`, a read-only remount, `suid`/`dev` honoured
//! (off by default, as for every FUSE mount), and `mount -t fuse.fsva` through the
//! installed `mount.fuse.fsva` helper; the read-ahead window fsva gives its mounts.

use std::path::Path;
use std::process::Command;

use fsva_tests::{is_mounted, Mount, Scratch};

/// Field `n` of the mountinfo line of the mount at `path` (2: its device, 5: its options).
fn mountinfo_field(path: &Path, n: usize) -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.to_string_lossy();
    info.lines()
        .find(|l| l.split(' ').nth(4) == Some(&*want))
        .and_then(|l| l.split(' ').nth(n))
        .unwrap_or_default()
        .to_string()
}

fn mount_options(path: &Path) -> String {
    mountinfo_field(path, 5)
}

#[test]
fn read_only_mount_and_remount_refuse_writes_with_erofs() {
    let m = Mount::new("mem", &["-o", "ro"]);
    assert!(mount_options(m.path()).split(',').any(|o| o == "ro"));
    let e = std::fs::write(m.path().join("x"), b"1").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    m.unmount();

    let m = Mount::new("mem", &[]);
    std::fs::write(m.path().join("x"), b"1").unwrap();
    let st = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(m.path())
        .status()
        .unwrap();
    assert!(st.success(), "remount,ro failed");
    let e = std::fs::write(m.path().join("y"), b"1").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    assert_eq!(
        std::fs::read(m.path().join("x")).unwrap(),
        b"1",
        "data survives the remount"
    );
    m.unmount();
}

#[test]
fn suid_and_dev_are_off_by_default_and_honoured_when_asked() {
    let m = Mount::new("mem", &[]);
    let o = mount_options(m.path());
    assert!(o.contains("nosuid") && o.contains("nodev"), "{o}");
    m.unmount();
    let m = Mount::new("mem", &["-o", "suid,dev"]);
    let o = mount_options(m.path());
    assert!(!o.contains("nosuid") && !o.contains("nodev"), "{o}");
    m.unmount();
}

#[test]
fn mount_t_fuse_fsva_uses_the_installed_helper() {
    let helper = Path::new("/usr/sbin/mount.fuse.fsva");
    assert!(
        helper.exists(),
        "{} is missing: scripts/setup.sh installs it (run it as root)",
        helper.display()
    );
    let dir = Scratch::new("mount-t");
    let out = Command::new("mount")
        .args(["-t", "fuse.fsva", "mem"])
        .arg(&dir.path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&dir.path));
    std::fs::write(dir.path.join("f"), b"via mount -t").unwrap();
    assert_eq!(std::fs::read(dir.path.join("f")).unwrap(), b"via mount -t");
    let out = fsva_tests::fsva(&["umount", dir.path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&dir.path));
}

/// `--exclusive` promises that only fsva changes the export, so the kernel keeps
/// attributes for a day: a change made beside the mount stays unseen through it, where
/// a default mount sees it once its one-second timeout passes. Only passthrough takes it.
#[test]
fn exclusive_exports_keep_attributes_cached_and_only_passthrough_takes_it() {
    let refused = fsva_tests::fsva(&["mount", "--backend", "mem", "--exclusive", "/nonexistent"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("--exclusive applies to --backend passthrough"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    for (extra, stays_cached) in [(&["--exclusive"][..], true), (&[][..], false)] {
        let m = Mount::new("passthrough", extra);
        let through = m.path().join("f");
        std::fs::write(&through, b"a").unwrap();
        assert_eq!(std::fs::metadata(&through).unwrap().len(), 1);
        let beside = m.export.as_ref().unwrap().path.join("f");
        std::fs::write(&beside, b"grown beside the mount").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let seen = std::fs::metadata(&through).unwrap().len();
        if stays_cached {
            assert_eq!(seen, 1, "an --exclusive mount asked the appliance again");
        } else {
            assert_eq!(
                seen, 22,
                "a default mount kept a stale size past its timeout"
            );
        }
        m.unmount();
    }
}

/// The kernel starts a FUSE mount at 128 KiB of read-ahead; fsva raises it to 2 MiB
/// once INIT is answered, for mounts whose reads reach the appliance (here: through
/// the stream relay, and through fusedev without FUSE passthrough).
#[test]
fn mounts_read_ahead_in_requests_as_large_as_fuse_allows() {
    for extra in [&["--channel", "stream"][..], &["--cache-budget", "64M"][..]] {
        let m = Mount::new("mem", extra);
        let device = mountinfo_field(m.path(), 2);
        assert!(!device.is_empty(), "the mount is not in mountinfo");
        let knob = Path::new("/sys/class/bdi")
            .join(&device)
            .join("read_ahead_kb");
        let kb: u32 = std::fs::read_to_string(&knob)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            kb >= 2048,
            "{extra:?}: read_ahead_kb of {} is {kb}: sequential reads go in small requests",
            knob.display()
        );
        m.unmount();
    }
}
