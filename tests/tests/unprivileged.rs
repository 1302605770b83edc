//! Mounting without privileges: `fsva mount` as an ordinary user goes through
//! fusermount3, the appliance's sandbox maps only that user's ids, and the mount
//! behaves as native ext4 does for that user.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use fsva_tests::{binary, is_mounted, transcript_diff, Scratch};

const USER: u32 = 65534;

/// Runs `program args` as the unprivileged user.
fn as_user(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .uid(USER)
        .gid(USER)
        .current_dir("/")
        .output()
        .expect("running as the unprivileged user")
}

fn owned_by_user(tag: &str) -> Scratch {
    let s = Scratch::new(tag);
    std::os::unix::fs::chown(&s.path, Some(USER), Some(USER)).unwrap();
    s
}

fn check_dev_fuse_is_usable() {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata("/dev/fuse").unwrap().permissions().mode();
    assert_eq!(
        mode & 0o666,
        0o666,
        "/dev/fuse is not usable by ordinary users (mode {mode:o}): scripts/setup.sh opens it as Debian's udev rules do"
    );
}

fn mount_as_user(spec: &str, mp: &Path) {
    let out = as_user(
        &binary("fsva"),
        &["mount", "--backend", spec, mp.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "unprivileged fsva mount {spec} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(mp));
}

fn umount_as_user(mp: &Path) {
    let out = as_user(&binary("fsva"), &["umount", mp.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(mp));
}

fn probe(dir: &Path) -> Vec<String> {
    let out = as_user(
        &binary("fsva-conformance"),
        &["--dir", dir.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn an_ordinary_user_mounts_mem_and_it_behaves_as_ext4() {
    check_dev_fuse_is_usable();
    let native = owned_by_user("unpriv-native");
    let expected = probe(&native.path);
    let mp = owned_by_user("unpriv-mem");
    mount_as_user("mem", &mp.path);
    let status = as_user(&binary("fsva"), &["status"]);
    let text = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(
        text.contains(mp.path.to_str().unwrap()) && text.contains("serving"),
        "{text}"
    );
    let got = probe(&mp.path);
    umount_as_user(&mp.path);
    let diff = transcript_diff(&expected, &got);
    assert!(
        diff.is_empty(),
        "unprivileged mem differs from ext4:\n{}",
        diff.join("\n")
    );
}

#[test]
fn an_ordinary_user_mounts_their_own_directory_with_passthrough() {
    check_dev_fuse_is_usable();
    let export = owned_by_user("unpriv-export");
    std::fs::write(export.path.join("existing"), b"from the host").unwrap();
    std::os::unix::fs::chown(export.path.join("existing"), Some(USER), Some(USER)).unwrap();
    let mp = owned_by_user("unpriv-pt");
    mount_as_user(&format!("passthrough:{}", export.path.display()), &mp.path);
    let out = as_user(
        Path::new("/bin/sh"),
        &[
            "-c",
            &format!(
                "cat {mp}/existing && echo new > {mp}/created && mkdir {mp}/d && ls -n {mp}",
                mp = mp.path.display()
            ),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("from the host"), "{text}");
    umount_as_user(&mp.path);
    use std::os::unix::fs::MetadataExt;
    let created = std::fs::metadata(export.path.join("created")).unwrap();
    assert_eq!(
        (created.uid(), created.gid()),
        (USER, USER),
        "new files belong to the user"
    );
    assert_eq!(
        std::fs::read(export.path.join("created")).unwrap(),
        b"new\n"
    );
}
