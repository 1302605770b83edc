//! A broken or hostile appliance must cost the application an error, never a hung
//! mount or a crashed supervisor: the supervisor drops it and answers EIO.

use std::time::Duration;

use fsva_tests::{binary, fsva, is_mounted, within, Scratch};

fn hostile_mount(mode: &str) {
    let dir = Scratch::new(&format!("hostile-{mode}"));
    let mp = dir.path.to_str().unwrap().to_string();
    let out = std::process::Command::new(binary("fsva"))
        .args(["mount", "--channel", "stream", "--sandbox", "none", &mp])
        .env("FSVA_APPLIANCE_EXE", binary("fsva-hostile-appliance"))
        .env("FSVA_HOSTILE_MODE", mode)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{mode}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trigger = dir.path.join("trigger");
    let r = within(Duration::from_secs(2), move || {
        std::fs::metadata(&trigger).map(|_| ())
    });
    match r {
        Some(Err(e)) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{mode}: {e}"),
        other => panic!("{mode}: expected EIO within 2 s, got {other:?}"),
    }
    // Later requests fail at once too, and the supervisor is still there to report it.
    let p = dir.path.join("other");
    let r = within(Duration::from_secs(1), move || {
        std::fs::metadata(&p).map(|_| ())
    });
    assert!(
        matches!(r, Some(Err(_))),
        "{mode}: later requests must fail fast: {r:?}"
    );
    let status = String::from_utf8_lossy(&fsva(&["status"]).stdout).to_string();
    assert!(status.contains("appliance gone"), "{mode}: {status}");
    let out = fsva(&["umount", &mp]);
    assert!(
        out.status.success(),
        "{mode}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&dir.path));
}

#[test]
fn reply_shorter_than_a_header_drops_the_appliance() {
    hostile_mount("short");
}

#[test]
fn oversized_reply_drops_the_appliance() {
    hostile_mount("oversized");
}

#[test]
fn reply_to_an_unknown_request_drops_the_appliance() {
    hostile_mount("unknown");
}

#[test]
fn invalid_error_code_drops_the_appliance() {
    hostile_mount("errno");
}

#[test]
fn truncated_reply_then_exit_drops_the_appliance() {
    hostile_mount("truncated");
}

#[test]
fn an_appliance_that_dies_before_answering_fails_the_mount_at_once() {
    let dir = Scratch::new("hostile-exit");
    let mp = dir.path.to_str().unwrap().to_string();
    let start = std::time::Instant::now();
    let out = std::process::Command::new(binary("fsva"))
        .args(["mount", "--channel", "stream", "--sandbox", "none", &mp])
        .env("FSVA_APPLIANCE_EXE", binary("fsva-hostile-appliance"))
        .env("FSVA_HOSTILE_MODE", "exit-at-init")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exited") && err.contains("before the mount answered"),
        "{err}"
    );
    assert!(
        !is_mounted(&dir.path),
        "a failed mount must not be left behind"
    );
}
