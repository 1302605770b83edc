//! VM appliances: a disk image mounted by the appliance's own kernel in QEMU (TCG where
//! KVM cannot boot it), served to the host mount. Each test boots real VMs, so there are
//! few: ext4 read-write against native ext4 and fsck-clean afterwards; file systems this
//! host's kernel lacks (f2fs, jfs, vfat; iso9660 read-only); a killed QEMU (and what
//! `fsva sync` made durable before it); bad images; a cache budget.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fsva_tests::{
    assert_ext4_clean, conformance, debugfs_cat, fsva, is_mounted, transcript_diff, within, Mount,
    Scratch,
};

/// A fresh image of `size_mib` made by `mkfs` (program and arguments; the image path is
/// appended).
fn make_image(dir: &Scratch, name: &str, size_mib: u64, mkfs: &[&str]) -> PathBuf {
    let img = dir.path.join(name);
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(size_mib << 20).unwrap();
    let st = Command::new(mkfs[0])
        .args(&mkfs[1..])
        .arg(&img)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (scripts/setup.sh --test-tools installs it)",
                mkfs[0]
            )
        });
    assert!(st.success(), "{mkfs:?} failed");
    img
}

fn status_line(m: &Mount) -> String {
    let out = fsva(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mp = m.path().to_string_lossy().into_owned();
    let mut lines = text.lines().skip_while(|l| !l.starts_with(&mp));
    format!(
        "{} {}",
        lines.next().unwrap_or_default(),
        lines.next().unwrap_or_default()
    )
}

fn native_transcript() -> Vec<String> {
    let native = Scratch::new("native");
    native.open_to_all();
    conformance(&native.path, None)
}

fn open_to_all(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
}

#[test]
fn ext4_image_behaves_as_native_ext4_and_is_clean_with_its_data_after_umount() {
    let dir = Scratch::new("vm-ext4");
    let img = make_image(
        &dir,
        "ext4.img",
        256,
        &["mkfs.ext4", "-q", "-F", "-b", "4096"],
    );
    let expected = native_transcript();
    let m = Mount::vm(&img, &[]);
    let status = status_line(&m);
    assert!(
        status.contains("vm") && status.contains("ext4") && status.contains("kernel"),
        "{status}"
    );
    // Every frame (the 1 MiB writes below too) crosses the shared-memory rings.
    assert!(status.contains("rings in shared memory"), "{status}");
    open_to_all(m.path());
    let got = conformance(m.path(), None);
    let diff = transcript_diff(&expected, &got);
    assert!(
        diff.is_empty(),
        "{} checks differ from native ext4:\n{}",
        diff.len(),
        diff.join("\n")
    );
    // The conformance run wrote, chowned and changed directories: the relay answered
    // some of it without the VM (capability checks, directories' attributes).
    let answered = m.relay_answered().unwrap_or(0);
    assert!(
        answered > 0,
        "the relay answered {answered} requests itself"
    );
    // Files are opened without OPEN (FUSE's no-open mode): once a file's pages are
    // cached, opening, reading and closing it again reaches the VM not at all.
    let cached = m.path().join("cached");
    std::fs::write(&cached, b"cached once").unwrap();
    assert_eq!(std::fs::read(&cached).unwrap(), b"cached once");
    let before = m.requests();
    for _ in 0..50 {
        assert_eq!(std::fs::read(&cached).unwrap(), b"cached once");
    }
    let reached = m.requests() - before;
    assert!(
        reached < 5,
        "50 opens and reads of a cached file reached the VM {reached} times"
    );
    // Data written and fsync'd through the mount is on the image after unmount.
    let data: Vec<u8> = (0..(3 << 20) + 123).map(|i| (i * 7 % 251) as u8).collect();
    {
        use std::io::Write;
        let mut f = std::fs::File::create(m.path().join("kept.bin")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    // The guest's clock is the host's (its RTC alone is whole seconds off): a file made
    // now has a modification time of now, give or take the kernel's coarse clock.
    let before = std::time::SystemTime::now();
    std::fs::write(m.path().join("now"), b"").unwrap();
    let after = std::time::SystemTime::now();
    let mtime = std::fs::metadata(m.path().join("now"))
        .unwrap()
        .modified()
        .unwrap();
    let slack = Duration::from_millis(200);
    assert!(
        mtime + slack >= before && mtime <= after + slack,
        "mtime {mtime:?} outside [{before:?}, {after:?}] ± {slack:?}"
    );
    // More nodes than PID 1's default open-file limit (1024): the guest raises it.
    let many = m.path().join("many");
    std::fs::create_dir(&many).unwrap();
    for i in 0..1100 {
        std::fs::write(many.join(format!("f{i}")), b"").unwrap();
    }
    assert_eq!(std::fs::read_dir(&many).unwrap().count(), 1100);
    m.unmount();
    assert_ext4_clean(&img, "after fsva umount");
    assert!(
        debugfs_cat(&img, "/kept.bin") == data,
        "the data written is not on the image"
    );
}

/// Runs `debugfs -w -R request` on `img`.
fn debugfs_write(img: &Path, request: &str) {
    let st = Command::new("debugfs")
        .args(["-w", "-R", request])
        .arg(img)
        .output()
        .expect("running debugfs (e2fsprogs)");
    assert!(st.status.success(), "debugfs {request}: {st:?}");
}

#[test]
fn names_in_a_case_folding_directory_are_never_answered_absent_by_the_relay() {
    // The relay answers a LOOKUP of a name a directory lacks only where the appliance
    // vouched that names compare as bytes. ext4 can fold case per directory, and a new
    // directory inherits that from its parent: the host kernel here cannot even mount
    // such a file system, the appliance's kernel can.
    let dir = Scratch::new("vm-casefold");
    let img = make_image(
        &dir,
        "casefold.img",
        64,
        &["mkfs.ext4", "-q", "-F", "-O", "casefold"],
    );
    debugfs_write(&img, "mkdir folded");
    // EXT4_CASEFOLD_FL | EXT4_EXTENTS_FL on the empty directory.
    debugfs_write(&img, "set_inode_field folded flags 0x40080000");
    let m = Mount::vm(&img, &[]);
    let (folded, plain) = (m.path().join("folded/sub"), m.path().join("plain"));
    std::fs::create_dir(&folded).unwrap();
    std::fs::create_dir(&plain).unwrap();
    for d in [&folded, &plain] {
        assert!(!d.join("name").exists());
        std::fs::write(d.join("Name"), b"x").unwrap();
    }
    assert_eq!(
        std::fs::read(folded.join("name")).unwrap(),
        b"x",
        "a case-folding directory's other spelling of a name was answered absent"
    );
    assert!(!plain.join("name").exists());
    // In the plain directory, lookups of names it lacks never reach the VM.
    let before = m.requests();
    for i in 0..20 {
        assert!(!plain.join(format!("absent{i}")).exists());
    }
    let reached = m.requests() - before;
    m.unmount();
    assert!(
        reached < 5,
        "20 lookups of absent names reached the VM {reached} times"
    );
}

#[test]
fn ext4_image_behaves_as_native_ext4_for_an_unprivileged_user() {
    let dir = Scratch::new("vm-ext4-user");
    let img = make_image(
        &dir,
        "ext4.img",
        256,
        &["mkfs.ext4", "-q", "-F", "-b", "4096"],
    );
    let native = Scratch::new("native-user");
    native.open_to_all();
    let expected = conformance(&native.path, Some(65534));
    let m = Mount::vm(&img, &[]);
    open_to_all(m.path());
    let got = conformance(m.path(), Some(65534));
    m.unmount();
    let diff = transcript_diff(&expected, &got);
    assert!(
        diff.is_empty(),
        "{} checks differ from native ext4 for uid 65534:\n{}",
        diff.len(),
        diff.join("\n")
    );
}

/// (check or prefix, fstype) entries of tests/vm-filesystem-differences.txt for `fstype`.
fn listed_differences(fstype: &str) -> Vec<String> {
    include_str!("../vm-filesystem-differences.txt")
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter_map(|l| l.split_once(' '))
        .filter(|(t, _)| *t == fstype)
        .map(|(_, c)| c.trim().to_string())
        .collect()
}

fn covers(entry: &str, check: &str) -> bool {
    match entry.strip_suffix('*') {
        Some(prefix) => check.starts_with(prefix),
        None => check == entry,
    }
}

#[test]
fn file_systems_the_host_kernel_lacks_pass_the_checks_they_support() {
    let expected = native_transcript();
    let host_has = std::fs::read_to_string("/proc/filesystems").unwrap();
    let dir = Scratch::new("vm-foreign");
    // (type, mkfs, read-only fsck)
    let cases: [(&str, &[&str], &[&str]); 3] = [
        (
            "f2fs",
            &["mkfs.f2fs", "-q"],
            &["fsck.f2fs", "--dry-run", "-f"],
        ),
        ("jfs", &["mkfs.jfs", "-q"], &["fsck.jfs", "-n", "-f"]),
        ("vfat", &["mkfs.vfat"], &["fsck.vfat", "-n"]),
    ];
    let mut failures = Vec::new();
    for (fstype, mkfs, fsck) in cases {
        eprintln!(
            "{fstype}: this host's kernel {} it",
            if host_has.split_whitespace().any(|t| t == fstype) {
                "could mount"
            } else {
                "cannot mount"
            }
        );
        let img = make_image(&dir, &format!("{fstype}.img"), 512, mkfs);
        // No --fstype: the appliance detects it.
        let m = Mount::vm(&img, &[]);
        let status = status_line(&m);
        assert!(
            status.contains(&format!(", {fstype}")),
            "{fstype}: {status}"
        );
        open_to_all(m.path());
        let got = conformance(m.path(), None);
        m.unmount();
        let listed = listed_differences(fstype);
        let differing: Vec<String> = transcript_diff(&expected, &got);
        let check_of = |d: &String| {
            d.trim_start()
                .trim_start_matches("native: ")
                .split(':')
                .next()
                .unwrap_or_default()
                .to_string()
        };
        for d in &differing {
            if !listed.iter().any(|e| covers(e, &check_of(d))) {
                failures.push(format!("{fstype}: unexpected difference\n{d}"));
            }
        }
        for e in &listed {
            if !differing.iter().any(|d| covers(e, &check_of(d))) {
                failures.push(format!(
                    "{fstype}: {e} is listed in tests/vm-filesystem-differences.txt but matches ext4 now"
                ));
            }
        }
        let out = Command::new(fsck[0])
            .args(&fsck[1..])
            .arg(&img)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || said.contains("[Fail]") {
            failures.push(format!("{fsck:?} found problems after fsva umount: {said}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn iso9660_image_is_served_read_only_with_its_content() {
    let dir = Scratch::new("vm-iso");
    let src = dir.path.join("src");
    std::fs::create_dir_all(src.join("docs/deep")).unwrap();
    let big: Vec<u8> = (0..(1 << 20) + 5).map(|i| (i % 253) as u8).collect();
    std::fs::write(src.join("docs/deep/big.bin"), &big).unwrap();
    std::fs::write(
        src.join("readme.txt"),
        b"served by the appliance's kernel\n",
    )
    .unwrap();
    let img = dir.path.join("cd.iso");
    let st = Command::new("genisoimage")
        .args(["-quiet", "-R", "-J", "-o"])
        .arg(&img)
        .arg(&src)
        .status()
        .expect("genisoimage (scripts/setup.sh --test-tools installs it)");
    assert!(st.success());
    let m = Mount::vm(&img, &["--ro"]);
    assert!(status_line(&m).contains(", iso9660, read-only"));
    assert_eq!(
        std::fs::read(m.path().join("docs/deep/big.bin")).unwrap(),
        big
    );
    assert_eq!(
        std::fs::read(m.path().join("readme.txt")).unwrap(),
        b"served by the appliance's kernel\n"
    );
    let e = std::fs::write(m.path().join("new"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    m.unmount();
}

#[test]
fn a_killed_qemu_turns_into_errors_within_seconds_and_keeps_what_fsva_sync_made_durable() {
    let dir = Scratch::new("vm-kill");
    let img = make_image(&dir, "ext4.img", 64, &["mkfs.ext4", "-q", "-F"]);
    let m = Mount::vm(&img, &[]);
    // Written without fsync: the host's sync would not reach the guest's page cache,
    // `fsva sync` must.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(m.path().join("synced.bin"), &data).unwrap();
    let out = fsva(&["sync", &m.path().to_string_lossy()]);
    assert!(out.status.success(), "fsva sync: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("synced"),
        "{out:?}"
    );
    let (_, qemu) = m.pids();
    let qemu = qemu.expect("the VM's pid");
    assert!(std::fs::read_to_string(format!("/proc/{qemu}/cmdline"))
        .unwrap()
        .contains("qemu-system"));
    // SAFETY: kill(2) on a pid we just read; no memory is involved.
    assert_eq!(unsafe { libc::kill(qemu as i32, libc::SIGKILL) }, 0);
    let p = m.path().join("g");
    let r = within(Duration::from_secs(10), move || std::fs::write(&p, b"2"))
        .expect("a write after QEMU died hung");
    assert!(r.is_err(), "a write after QEMU died succeeded");
    m.unmount();
    // What a mount of the image would see: its journal replayed first.
    let fsck = Command::new("e2fsck")
        .args(["-fy"])
        .arg(&img)
        .output()
        .expect("running e2fsck (e2fsprogs)");
    assert!(fsck.status.code().is_some_and(|c| c <= 1), "{fsck:?}");
    assert!(
        debugfs_cat(&img, "/synced.bin") == data,
        "data `fsva sync` reported on storage is not on the image after QEMU was killed"
    );
}

#[test]
fn bad_images_and_types_fail_the_mount_with_a_clear_error() {
    let dir = Scratch::new("vm-bad");
    let mnt = Scratch::new("vm-bad-mnt");
    let mp = mnt.path.to_str().unwrap();
    let missing = dir.path.join("nope.img");
    let out = fsva(&["mount", "--vm", "--image", missing.to_str().unwrap(), mp]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does it exist"));

    let garbage = dir.path.join("garbage.img");
    std::fs::write(&garbage, vec![0x5a; 4 << 20]).unwrap();
    let g = garbage.to_str().unwrap();
    let out = fsva(&["mount", "--vm", "--image", g, mp]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no file system this appliance knows recognised the image"),
        "{err}"
    );
    assert!(!is_mounted(&mnt.path), "a failed mount left a mount behind");

    let out = fsva(&["mount", "--vm", "--image", g, "--fstype", "reiser5", mp]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("has no reiser5 driver"), "{err}");
    assert!(!is_mounted(&mnt.path));

    // An image another VM holds: QEMU refuses it (image lock) and exits before the
    // guest runs; the mount fails at once instead of waiting out the boot time-out.
    let img = make_image(&dir, "held.img", 64, &["mkfs.ext4", "-q", "-F"]);
    let held = Mount::vm(&img, &[]);
    let t0 = std::time::Instant::now();
    let out = fsva(&["mount", "--vm", "--image", img.to_str().unwrap(), mp]);
    assert!(!out.status.success(), "the same image mounted twice");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "a QEMU that exits at start-up took {:?} to notice",
        t0.elapsed()
    );
    assert!(!is_mounted(&mnt.path));
    held.unmount();
}

#[test]
fn a_cache_budget_bounds_the_vm_without_starving_it() {
    let dir = Scratch::new("vm-budget");
    let img = make_image(
        &dir,
        "ext4.img",
        1024,
        &["mkfs.ext4", "-q", "-F", "-b", "4096"],
    );
    let m = Mount::vm(&img, &["--cache-budget", "64M"]);
    // More data than the VM has memory (256 MiB): the guest's page cache must give way
    // and QEMU, whose cgroup also holds the guest's RAM, must not be killed.
    let chunk: Vec<u8> = (0..(1 << 20)).map(|i| (i * 13 % 256) as u8).collect();
    {
        use std::io::Write;
        let mut f = std::fs::File::create(m.path().join("big")).unwrap();
        for _ in 0..320 {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let status = status_line(&m);
    assert!(status.contains("serving"), "{status}");
    {
        use std::io::Read;
        let mut f = std::fs::File::open(m.path().join("big")).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for i in 0..320 {
            f.read_exact(&mut buf).unwrap();
            assert!(buf == chunk, "MiB {i} differs");
        }
    }
    // Within the VM's memory a budget changes at run time; beyond it, a clear error.
    let mp = m.path().to_str().unwrap().to_string();
    assert!(fsva(&["cache", &mp, "100M"]).status.success());
    let out = fsva(&["cache", &mp, "1G"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vm-memory"));
    m.unmount();
}

#[test]
fn appliance_info_says_what_it_serves_and_how_it_boots() {
    // Any mount builds and probes the appliance first.
    let dir = Scratch::new("vm-info");
    let img = make_image(&dir, "ext4.img", 64, &["mkfs.ext4", "-q", "-F"]);
    Mount::vm(&img, &[]).unmount();
    let out = fsva(&["appliance", "info"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for fs in [
        "ext4", "vfat", "f2fs", "jfs", "iso9660", "udf", "btrfs", "xfs",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("file systems:") && l.split_whitespace().any(|w| w == fs)),
            "{fs} missing:\n{text}"
        );
    }
    let accel = text
        .lines()
        .find(|l| l.starts_with("accelerator:"))
        .unwrap_or_default();
    assert!(
        accel.contains("KVM") || (accel.contains("TCG (") && accel.len() > 20),
        "the accelerator and, for TCG, why: {accel}"
    );
    let out = fsva(&["appliance", "build", "--kernel", "/nonexistent/vmlinuz-9.9"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("/nonexistent"), "{err}");
}
