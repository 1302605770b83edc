//! Every appliance, root's passthrough included, runs in namespaces of its own — user,
//! mount, pid, net, ipc, uts — and what needs a capability the host honours (device
//! nodes on root's passthrough export) is done for it by the supervisor's broker.

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use fsva_tests::Mount;

/// The pids below `pid` (children, grandchildren, ...).
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

fn ns(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// The sandboxed process of a mount: the descendant of its appliance in another
/// user namespace.
fn sandboxed(m: &Mount) -> u32 {
    let (_, app) = m.pids();
    let app = app.expect("an appliance pid");
    let ours = ns("self", "user");
    let mut candidates = vec![app];
    candidates.extend(descendants(app));
    *candidates
        .iter()
        .find(|p| ns(&p.to_string(), "user") != ours)
        .unwrap_or_else(|| panic!("no process of appliance {app} is in its own user namespace"))
}

#[test]
fn every_appliance_has_its_own_namespaces_and_roots_maps_every_id() {
    for backend in ["mem", "passthrough"] {
        let m = Mount::new(backend, &[]);
        let pid = sandboxed(&m).to_string();
        for kind in ["user", "mnt", "pid", "net", "ipc", "uts"] {
            assert_ne!(
                ns(&pid, kind),
                ns("self", kind),
                "{backend}: {kind} namespace shared"
            );
        }
        let map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
        let fields: Vec<&str> = map.split_whitespace().collect();
        assert_eq!(fields, ["0", "0", "4294967295"], "{backend}: uid_map {map}");
        m.unmount();
    }
}

#[test]
fn device_nodes_on_roots_passthrough_export_are_made_by_the_broker() {
    let m = Mount::new("passthrough", &[]);
    let dir = m.path().join("sg");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, None, Some(4321)).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o2775)).unwrap();
    let node = dir.join("blk");
    let c = std::ffi::CString::new(node.to_str().unwrap()).unwrap();
    // SAFETY: a valid C path; mknod touches no memory of ours.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o640, libc::makedev(7, 9)) };
    assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
    let export = m.export.as_ref().unwrap().path.join("sg/blk");
    for seen in [node.as_path(), export.as_path()] {
        let md = std::fs::symlink_metadata(seen).unwrap();
        assert!(md.file_type().is_block_device(), "{}", seen.display());
        assert_eq!(
            (md.uid(), md.gid(), md.rdev()),
            (0, 4321, libc::makedev(7, 9)),
            "{}: owner root, group inherited from the set-group-id directory",
            seen.display()
        );
    }
    m.unmount();
}
