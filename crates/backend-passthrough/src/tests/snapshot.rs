//! Checkpoint and restore: a round trip through lent descriptors, hostile snapshots
//! refused, and restores by path hint where objects changed behind the backend's back.

use std::os::unix::fs::MetadataExt;

use fsva_appliance::state::{BackendState, StateError, StateFd};

use super::*;
use crate::snapshot::{
    self, HandleKindV1, HandleV1, NodeV1, ObjectV1, PassthroughSnapshot, SnapshotV1,
};

/// One way to spoil a good snapshot.
type Spoil = Box<dyn Fn(&mut SnapshotV1)>;

fn take(fs: &PassthroughFs) -> (SnapshotV1, Vec<StateFd>) {
    let state = fs.checkpoint().unwrap();
    let PassthroughSnapshot::V1(s) = snapshot::decode(&state.bytes).unwrap();
    (s, state.fds)
}

fn state(s: &SnapshotV1, fds: Vec<StateFd>) -> BackendState {
    BackendState {
        bytes: snapshot::encode(&PassthroughSnapshot::V1(s.clone())),
        fds,
    }
}

fn restore_at(dir: &Path, state: BackendState) -> Result<PassthroughFs, StateError> {
    PassthroughFs::restore(PassthroughConfig::for_path(dir).unwrap(), state)
}

fn estale<T: std::fmt::Debug>(r: fsva_appliance::Result<T>) {
    assert_eq!(r.unwrap_err().0, libc::ESTALE);
}

/// One READDIR of at most `limit` bytes from `offset`: (name, next offset).
pub(super) fn read_some(
    fs: &PassthroughFs,
    ino: u64,
    fh: u64,
    offset: u64,
    limit: usize,
) -> Vec<(String, u64)> {
    let mut buf = Vec::new();
    let mut sink = DirSink::new(&mut buf, limit, false);
    fs.readdir(&root(), ino, fh, offset, &mut sink).unwrap();
    parse_dir(&buf, false)
        .into_iter()
        .map(|(n, off, _)| (n, off))
        .collect()
}

/// A tree with a directory, a hard link, a symlink, an open file, an O_DIRECT open
/// and a directory listing in progress.
struct Tree {
    d: u64,
    a: u64,
    l: u64,
    held: u64,
    direct: u64,
    list: u64,
    listed: Vec<String>,
    next: u64,
}

fn tree(dir: &Path, fs: &PassthroughFs) -> Tree {
    fs::create_dir(dir.join("d")).unwrap();
    for i in 0..100 {
        fs::write(dir.join(format!("d/entry-with-a-long-name-{i:03}")), b"").unwrap();
    }
    fs::write(dir.join("d/a"), b"first").unwrap();
    fs::hard_link(dir.join("d/a"), dir.join("a2")).unwrap();
    std::os::unix::fs::symlink("d/a", dir.join("l")).unwrap();
    let d = fs.lookup(&root(), ROOT_ID, os("d")).unwrap().ino;
    let a = fs.lookup(&root(), d, os("a")).unwrap().ino;
    assert_eq!(fs.lookup(&root(), ROOT_ID, os("a2")).unwrap().ino, a);
    let l = fs.lookup(&root(), ROOT_ID, os("l")).unwrap().ino;
    let held = fs.open(&root(), a, libc::O_RDWR as u32, false).unwrap().fh;
    let direct = fs
        .open(&root(), a, (libc::O_RDONLY | libc::O_DIRECT) as u32, false)
        .unwrap()
        .fh;
    let list = fs.opendir(&root(), d, 0).unwrap().fh;
    let first = read_some(fs, d, list, 0, 1000);
    assert!(!first.is_empty() && first.len() < 102, "{}", first.len());
    let next = first.last().unwrap().1;
    Tree {
        d,
        a,
        l,
        held,
        direct,
        list,
        listed: first.into_iter().map(|(n, _)| n).collect(),
        next,
    }
}

/// Lists `t`'s directory on from where the listing stopped, and checks that with what
/// came before it holds every entry exactly once.
fn finish_listing(fs: &PassthroughFs, t: &Tree) {
    let mut names = t.listed.clone();
    let mut offset = t.next;
    loop {
        let got = read_some(fs, t.d, t.list, offset, 1000);
        let Some(last) = got.last() else { break };
        offset = last.1;
        names.extend(got.into_iter().map(|(n, _)| n));
    }
    let total = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), total, "an entry was listed twice");
    assert_eq!(
        names.len(),
        103,
        "every entry once (100, a, dot and dotdot)"
    );
}

#[test]
fn a_snapshot_round_trips_with_lent_descriptors() {
    let (dir, fs) = export();
    let t = tree(dir.path(), &fs);
    let hint = fs.nodes.hint(t.a).unwrap();
    let (s, fds) = take(&fs);
    assert_eq!(
        fds.len(),
        s.nodes.len() + s.handles.len(),
        "one descriptor each"
    );
    let direct = s.handles.iter().find(|h| h.fh == t.direct).unwrap();
    assert!(
        matches!(direct.kind, HandleKindV1::File { flags } if flags as i32 & libc::O_DIRECT != 0)
    );
    let back = restore_at(dir.path(), state(&s, fds)).unwrap();
    let (again, _) = take(&back);
    let sorted = |mut s: SnapshotV1| {
        s.nodes.sort_by_key(|n| n.id);
        s.handles.sort_by_key(|h| h.fh);
        (
            s.nodes
                .into_iter()
                .map(|n| (n.id, n.key, n.kind, n.lookups, n.hint))
                .collect::<Vec<_>>(),
            s.handles
                .into_iter()
                .map(|h| (h.fh, h.node, h.kind))
                .collect::<Vec<_>>(),
            s.next_node,
            s.next_fh,
        )
    };
    assert_eq!(sorted(again), sorted(s), "the same tables again");
    assert_eq!(back.nodes.hint(t.a), Some(hint));
    assert_eq!(back.nodes.lookups(t.a), Some(2));

    // Everything works on: the open file, the O_DIRECT one (no read trail), the
    // listing, the symlink, and new ids do not collide with old ones.
    assert_eq!(
        back.write(&root(), t.a, t.held, 5, b" more", 0, 0).unwrap(),
        5
    );
    let mut out = Vec::new();
    back.read(&root(), t.a, t.held, 0, 100, 0, &mut out)
        .unwrap();
    assert_eq!(out, b"first more");
    assert!(back.handle(t.direct).unwrap().read_trail().is_none());
    assert!(back.handle(t.held).unwrap().read_trail().is_some());
    finish_listing(&back, &t);
    assert_eq!(back.readlink(&root(), t.l).unwrap(), b"d/a");
    fs::write(dir.path().join("new"), b"").unwrap();
    let new = back.lookup(&root(), ROOT_ID, os("new")).unwrap().ino;
    assert!(new > t.l, "fresh ids after the restored ones");
    let o = back
        .open(&root(), new, libc::O_RDONLY as u32, false)
        .unwrap();
    assert!(o.fh > t.list);
    assert_eq!(
        back.lookup(&root(), ROOT_ID, os("a2")).unwrap().ino,
        t.a,
        "links still dedup"
    );
}

#[test]
fn hostile_snapshots_are_refused_whole() {
    let (dir, fs) = export();
    let t = tree(dir.path(), &fs);
    let cases: Vec<(&str, Spoil)> = vec![
        ("no root", Box::new(|s| s.nodes.retain(|n| n.id != ROOT_ID))),
        (
            "root not a directory",
            Box::new(|s| {
                s.nodes.iter_mut().find(|n| n.id == ROOT_ID).unwrap().kind = libc::S_IFREG
            }),
        ),
        (
            "root stale",
            Box::new(|s| {
                s.nodes.iter_mut().find(|n| n.id == ROOT_ID).unwrap().object = ObjectV1::Stale
            }),
        ),
        ("counter wraps", Box::new(|s| s.next_node = u64::MAX)),
        ("handle counter zero", Box::new(|s| s.next_fh = 0)),
        (
            "node beyond the counter",
            Box::new(|s| s.nodes[0].id = s.next_node),
        ),
        (
            "node twice",
            Box::new(|s| {
                let n = s.nodes.iter().find(|n| n.id != ROOT_ID).unwrap().clone();
                s.nodes.push(NodeV1 {
                    object: ObjectV1::Absent,
                    ..n
                })
            }),
        ),
        ("no file type", Box::new(|s| s.nodes[1].kind = 0o777)),
        (
            "handle on a missing node",
            Box::new(|s| s.handles[0].node = 999_999),
        ),
        (
            "handle twice",
            Box::new(|s| {
                let h = s.handles[0].clone();
                s.handles.push(HandleV1 {
                    object: ObjectV1::Absent,
                    ..h
                })
            }),
        ),
        (
            "handle beyond the counter",
            Box::new(|s| s.handles[0].fh = s.next_fh + 1),
        ),
        (
            "file handle on a directory",
            Box::new(move |s| {
                let h = s
                    .handles
                    .iter_mut()
                    .find(|h| h.kind == HandleKindV1::Dir)
                    .unwrap();
                h.kind = HandleKindV1::File { flags: 0 };
            }),
        ),
        (
            "directory handle on a file",
            Box::new(move |s| {
                let h = s.handles.iter_mut().find(|h| h.fh == t.held).unwrap();
                h.kind = HandleKindV1::Dir;
            }),
        ),
        (
            "descriptor out of range",
            Box::new(|s| s.nodes[0].object = ObjectV1::Lent(1 << 20)),
        ),
        (
            "descriptor used twice",
            Box::new(|s| {
                let o = s.nodes[0].object;
                s.handles[0].object = o;
            }),
        ),
        (
            "hint with a slash",
            Box::new(move |s| {
                s.nodes.iter_mut().find(|n| n.id == t.a).unwrap().hint =
                    Some((ROOT_ID, b"d/a".to_vec()))
            }),
        ),
        (
            "hint dotdot",
            Box::new(move |s| {
                s.nodes.iter_mut().find(|n| n.id == t.a).unwrap().hint =
                    Some((ROOT_ID, b"..".to_vec()))
            }),
        ),
        (
            "hint to itself",
            Box::new(move |s| {
                s.nodes.iter_mut().find(|n| n.id == t.d).unwrap().hint = Some((t.d, b"d".to_vec()))
            }),
        ),
        (
            "hint beyond the counter",
            Box::new(move |s| {
                let next = s.next_node;
                s.nodes.iter_mut().find(|n| n.id == t.a).unwrap().hint = Some((next, b"a".to_vec()))
            }),
        ),
        (
            "root with a hint",
            Box::new(move |s| {
                s.nodes.iter_mut().find(|n| n.id == ROOT_ID).unwrap().hint =
                    Some((t.d, b"x".to_vec()))
            }),
        ),
        (
            "root of another export",
            Box::new(|s| {
                s.nodes
                    .iter_mut()
                    .find(|n| n.id == ROOT_ID)
                    .unwrap()
                    .key
                    .ino ^= 1
            }),
        ),
    ];
    for (what, spoil) in cases {
        let (mut s, fds) = take(&fs);
        s.nodes.sort_by_key(|n| n.id);
        s.handles.sort_by_key(|h| h.fh);
        spoil(&mut s);
        let r = restore_at(dir.path(), state(&s, fds));
        assert!(r.is_err(), "{what}: accepted");
        eprintln!("{what}: {}", r.err().unwrap());
    }
    // Bytes that are no snapshot, or a snapshot with something after it.
    for bytes in [vec![], vec![7u8; 40], {
        let mut b = fs.checkpoint().unwrap().bytes;
        b.push(0);
        b
    }] {
        let r = restore_at(
            dir.path(),
            BackendState {
                bytes,
                fds: Vec::new(),
            },
        );
        assert!(matches!(r, Err(StateError::Corrupt(_))), "{:?}", r.err());
    }
    // A snapshot of another export, even without descriptors.
    let other = tempfile::Builder::new()
        .prefix("fsva-pt-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let portable = snapshot::portable(fs.checkpoint().unwrap()).unwrap();
    let r = restore_at(other.path(), portable);
    assert!(
        matches!(r, Err(StateError::Backend(ref m)) if m.contains("another export")),
        "{:?}",
        r.err()
    );
}

#[test]
fn without_descriptors_nodes_are_found_again_by_their_path_hints() {
    let (dir, fs) = export();
    let p = dir.path();
    let t = tree(p, &fs);
    fs::create_dir_all(p.join("gone/sub")).unwrap();
    fs::write(p.join("gone/sub/f"), b"").unwrap();
    fs::write(p.join("replaced"), b"old").unwrap();
    fs::write(p.join("moved"), b"m").unwrap();
    let gone = fs.lookup(&root(), ROOT_ID, os("gone")).unwrap().ino;
    let sub = fs.lookup(&root(), gone, os("sub")).unwrap().ino;
    let deep = fs.lookup(&root(), sub, os("f")).unwrap().ino;
    let replaced = fs.lookup(&root(), ROOT_ID, os("replaced")).unwrap().ino;
    let replaced_fh = fs
        .open(&root(), replaced, libc::O_RDONLY as u32, false)
        .unwrap()
        .fh;
    let moved = fs.lookup(&root(), ROOT_ID, os("moved")).unwrap().ino;
    // A rename through the backend moves the hint along.
    fs.rename(&root(), ROOT_ID, os("moved"), t.d, os("moved-here"), 0)
        .unwrap();
    assert_eq!(fs.nodes.hint(moved).unwrap().name.as_ref(), b"moved-here");
    let portable = snapshot::portable(fs.checkpoint().unwrap()).unwrap();
    assert!(portable.fds.is_empty());
    let (old_replaced_ino, old_a) = (
        fs::metadata(p.join("replaced")).unwrap().ino(),
        fs::metadata(p.join("d/a")).unwrap().ino(),
    );
    drop(fs);

    // Behind the backend's back: a directory deleted, a file replaced by another
    // under the same name.
    fs::remove_dir_all(p.join("gone")).unwrap();
    // (The old object lives on under another name, so the new one cannot reuse its
    // inode number: a recycled (device, inode) is indistinguishable.)
    fs::rename(p.join("replaced"), p.join("elsewhere")).unwrap();
    fs::write(p.join("replaced"), b"new").unwrap();
    assert_ne!(
        fs::metadata(p.join("replaced")).unwrap().ino(),
        old_replaced_ino
    );

    let back = restore_at(p, portable).unwrap();
    for id in [gone, sub, deep, replaced] {
        estale(back.getattr(&root(), id, None));
        estale(back.lookup(&root(), id, os("x")));
        estale(back.open(&root(), id, libc::O_RDONLY as u32, false));
        estale(back.setxattr(&root(), id, os("user.x"), b"1", 0, 0));
    }
    estale(back.read(&root(), replaced, replaced_fh, 0, 10, 0, &mut Vec::new()));
    // Stale nodes go when the kernel forgets them; their handles when released.
    let count = back.node_count();
    back.forget(deep, 1);
    assert_eq!(back.node_count(), count - 1);
    back.release(&root(), replaced, replaced_fh, 0).unwrap();
    assert_eq!(
        back.read(&root(), replaced, replaced_fh, 0, 10, 0, &mut Vec::new())
            .unwrap_err()
            .0,
        libc::EBADF
    );

    // Their siblings carry on: the same objects, open files reopened on them.
    assert_eq!(back.getattr(&root(), t.a, None).unwrap().0.ino, old_a);
    assert_eq!(back.readlink(&root(), t.l).unwrap(), b"d/a");
    assert_eq!(back.getattr(&root(), moved, None).unwrap().0.size, 1);
    assert_eq!(back.write(&root(), t.a, t.held, 5, b"!", 0, 0).unwrap(), 1);
    assert_eq!(fs::read(p.join("a2")).unwrap(), b"first!");
    finish_listing(&back, &t);
    // A fresh lookup of the replaced name is a new node for the new object.
    let fresh = back.lookup(&root(), ROOT_ID, os("replaced")).unwrap();
    assert_ne!(fresh.ino, replaced);
    let o = back
        .open(&root(), fresh.ino, libc::O_RDONLY as u32, false)
        .unwrap();
    let mut out = Vec::new();
    back.read(&root(), fresh.ino, o.fh, 0, 10, 0, &mut out)
        .unwrap();
    assert_eq!(out, b"new");

    // A later snapshot keeps the stale ones stale, even with the object back.
    let (s, _) = take(&back);
    assert!(s
        .nodes
        .iter()
        .any(|n| n.id == gone && n.object == ObjectV1::Stale));
}

#[test]
fn hints_in_a_cycle_or_to_forgotten_parents_leave_nodes_stale_not_hung() {
    let (dir, fs) = export();
    let t = tree(dir.path(), &fs);
    let PassthroughSnapshot::V1(mut s) =
        snapshot::decode(&snapshot::portable(fs.checkpoint().unwrap()).unwrap().bytes).unwrap();
    // d's parent is a, a's parent is d: a cycle no walk may follow forever.
    s.nodes.iter_mut().find(|n| n.id == t.d).unwrap().hint = Some((t.a, b"d".to_vec()));
    s.nodes.iter_mut().find(|n| n.id == t.a).unwrap().hint = Some((t.d, b"a".to_vec()));
    // l's parent was forgotten (an id no node has).
    s.next_node += 1;
    let forgotten = s.next_node - 1;
    s.nodes.iter_mut().find(|n| n.id == t.l).unwrap().hint = Some((forgotten, b"l".to_vec()));
    let back = restore_at(dir.path(), state(&s, Vec::new())).unwrap();
    for id in [t.d, t.a, t.l] {
        estale(back.getattr(&root(), id, None));
    }
    estale(back.read(&root(), t.a, t.held, 0, 1, 0, &mut Vec::new()));
    assert!(back.getattr(&root(), ROOT_ID, None).is_ok());
}
