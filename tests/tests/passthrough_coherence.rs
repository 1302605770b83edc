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
