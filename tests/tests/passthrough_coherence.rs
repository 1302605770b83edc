//! A passthrough export changed beside the mount (by a process on the host, not through
//! fsva): the kernel caches listings, attributes and data, and must still see the
//! change once the attribute timeout (1 s) has passed.

use std::time::Duration;

use fsva_tests::{wait_for, Mount};

#[test]
fn changes_made_beside_the_mount_show_through_it() {
    let m = Mount::new("passthrough", &[]);
    let export = m.export.as_ref().unwrap().path.clone();
    let d = m.path().join("d");
    std::fs::create_dir(&d).unwrap();
    for i in 0..50 {
        std::fs::write(d.join(format!("f{i}")), b"old").unwrap();
    }
    let list = || {
        let mut v: Vec<String> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(list().len(), 50);
    assert_eq!(std::fs::read(d.join("f1")).unwrap(), b"old");
    // Beside the mount: a new file, a removed one, new contents of a third.
    std::fs::write(export.join("d/outside"), b"x").unwrap();
    std::fs::remove_file(export.join("d/f0")).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(export.join("d/f1"), b"new contents").unwrap();
    let seen = wait_for(Duration::from_secs(5), || {
        let l = list();
        l.contains(&"outside".to_string())
            && !l.contains(&"f0".to_string())
            && std::fs::read(d.join("f1")).ok().as_deref() == Some(&b"new contents"[..])
    });
    assert!(
        seen,
        "changes beside the mount not visible within 5 s: {:?}",
        list()
    );
    m.unmount();
}

/// A shared export is watched: the kernel keeps what it cached past the old one-second
/// timeout (warm stats ask the appliance nothing), yet a change made beside the mount
/// shows through it at once, far inside the minute the kernel may otherwise trust it:
/// the supervisor sees the change and has the kernel forget what it cached.
#[test]
fn a_watched_export_keeps_its_cache_and_still_sees_changes_beside_it() {
    use std::os::unix::fs::PermissionsExt;
    let m = Mount::new("passthrough", &[]);
    let status = m.status();
    assert!(
        status.contains("changes beside the mount are watched"),
        "{status}"
    );
    let export = m.export.as_ref().unwrap().path.clone();
    let names: Vec<String> = (0..40).map(|i| format!("f{i}")).collect();
    for n in &names {
        std::fs::write(m.path().join(n), b"old").unwrap();
    }
    std::fs::create_dir(m.path().join("d")).unwrap();
    let stat_all = || {
        for n in &names {
            std::fs::metadata(m.path().join(n)).unwrap();
        }
    };
    stat_all();
    std::thread::sleep(Duration::from_millis(1500));
    let before = m.requests();
    stat_all();
    assert_eq!(
        m.requests(),
        before,
        "warm stats 1.5 s later went to the appliance: the kernel's cache expired"
    );

    // Beside the mount: a mode, new contents, a new name, a removed one, a rename,
    // a new name in a subdirectory, and a write to a file kept open.
    let f0 = m.path().join("f0");
    let meta = |p: &std::path::Path| std::fs::metadata(p).ok();
    assert_eq!(meta(&f0).unwrap().permissions().mode() & 0o777, 0o644);
    std::fs::set_permissions(export.join("f0"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(export.join("f1"), b"longer contents").unwrap();
    std::fs::write(export.join("outside"), b"x").unwrap();
    std::fs::remove_file(export.join("f2")).unwrap();
    std::fs::rename(export.join("f3"), export.join("f3-renamed")).unwrap();
    std::fs::write(export.join("d/inner"), b"y").unwrap();
    // A writer that keeps its file open (a log): its writes count, not only its close.
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(export.join("f4"))
        .unwrap();
    std::io::Write::write_all(&mut log, b" and more").unwrap();
    let seen = wait_for(Duration::from_secs(5), || {
        meta(&f0).map(|s| s.permissions().mode() & 0o777) == Some(0o600)
            && meta(&m.path().join("f1")).map(|s| s.len()) == Some(15)
            && meta(&m.path().join("outside")).is_some()
            && meta(&m.path().join("f2")).is_none()
            && meta(&m.path().join("f3")).is_none()
            && meta(&m.path().join("f3-renamed")).is_some()
            && meta(&m.path().join("d/inner")).is_some()
            && meta(&m.path().join("f4")).map(|s| s.len()) == Some(12)
    });
    assert!(
        seen,
        "changes beside a watched mount not seen within 5 s: f0 {:?}, f1 {:?}, outside {}, f2 {}, f3 {}, d/inner {}, f4 {:?}",
        meta(&f0).map(|s| s.permissions().mode() & 0o777),
        meta(&m.path().join("f1")).map(|s| s.len()),
        meta(&m.path().join("outside")).is_some(),
        meta(&m.path().join("f2")).is_some(),
        meta(&m.path().join("f3")).is_some(),
        meta(&m.path().join("d/inner")).is_some(),
        meta(&m.path().join("f4")).map(|s| s.len()),
    );
    drop(log);
    assert_eq!(
        std::fs::read(m.path().join("f1")).unwrap(),
        b"longer contents"
    );
    m.unmount();
}
