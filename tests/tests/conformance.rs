//! POSIX conformance: the probe's transcript on an fsva mount must equal its transcript
//! on native ext4, line for line, for every backend and channel, as root and as an
//! unprivileged user.

use fsva_tests::{conformance, transcript_diff, Mount, Scratch};

/// (backend, check) pairs listed in tests/expected-differences.txt.
fn expected_differences(backend: &str) -> Vec<String> {
    let text = include_str!("../expected-differences.txt");
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(' '))
        .filter(|(b, _)| *b == backend)
        .map(|(_, check)| check.trim().to_string())
        .collect()
}

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
    let mut diff = transcript_diff(&expected, &got);
    mount.unmount();
    // Differences that are documented (root-only capabilities the sandbox withholds) must
    // still show, and nothing else may.
    if uid.is_none() {
        for check in expected_differences(backend) {
            let before = diff.len();
            diff.retain(|d| !d.contains(&format!("native: {check}:")));
            assert_ne!(
                before,
                diff.len(),
                "{check} is listed in tests/expected-differences.txt but now matches ext4: remove it"
            );
            eprintln!("known difference ({backend}): {check}");
        }
    }
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
