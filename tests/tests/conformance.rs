//! POSIX conformance: the probe's transcript on an fsva mount must equal its transcript
//! on native ext4, line for line, for every backend and channel, as root and as an
//! unprivileged user.

use fsva_tests::{conformance, transcript_diff, Mount, Scratch};

const NOBODY: u32 = 65534;

fn compare(backend: &str, extra: &[&str], uid: Option<u32>) {
    let native = Scratch::new("native");
    native.open_to_all();
    let expected = conformance(&native.path, uid);
    assert!(
        expected.len() > 50,
        "the probe ran too few checks: {}",
        expected.len()
    );

    let mount = Mount::new(backend, extra);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(mount.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod of the mount root");
    }
    let got = conformance(mount.path(), uid);
    let diff = transcript_diff(&expected, &got);
    mount.unmount();
    assert!(
        diff.is_empty(),
        "{} of {} checks differ from native ext4 ({backend} {extra:?}, uid {uid:?}):\n{}",
        diff.len(),
        expected.len(),
        diff.join("\n")
    );
}

#[test]
fn mem_matches_ext4_as_root() {
    compare("mem", &[], None);
}

#[test]
fn mem_matches_ext4_as_unprivileged_user() {
    compare("mem", &[], Some(NOBODY));
}

#[test]
fn mem_over_stream_channel_matches_ext4() {
    compare("mem", &["--channel", "stream"], None);
}

#[test]
fn passthrough_matches_ext4_as_root() {
    compare("passthrough", &[], None);
}

#[test]
fn passthrough_matches_ext4_as_unprivileged_user() {
    compare("passthrough", &[], Some(NOBODY));
}
