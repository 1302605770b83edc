//! Unit tests of the `Filesystem` implementation, calling the trait methods directly.

use super::*;
use fsva_protocol::abi::init_flags as f;

fn root() -> Context {
    Context {
        uid: 0,
        gid: 0,
        ..Default::default()
    }
}

fn user() -> Context {
    Context {
        uid: 1000,
        gid: 1000,
        ..Default::default()
    }
}

fn fs() -> MemFs {
    MemFs::new(test_config())
}

fn n(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn err<T: std::fmt::Debug>(r: Result<T>) -> i32 {
    r.unwrap_err().0
}

fn mode_of(fs: &MemFs, ino: u64) -> u32 {
    fs.getattr(&root(), ino, None).unwrap().0.mode
}

fn attr(fs: &MemFs, ino: u64) -> abi::Attr {
    fs.getattr(&root(), ino, None).unwrap().0
}

fn create(fs: &MemFs, ctx: &Context, parent: u64, name: &str, mode: u32) -> (u64, u64) {
    let (e, o) = fs
        .create(
            ctx,
            parent,
            n(name),
            mode,
            0o022,
            libc::O_CREAT as u32 | libc::O_RDWR as u32,
        )
        .unwrap();
    (e.ino, o.fh)
}

fn read_all(fs: &MemFs, ino: u64, fh: u64) -> Vec<u8> {
    let mut out = Vec::new();
    fs.read(&root(), ino, fh, 0, 1 << 20, 0, &mut out).unwrap();
    out
}

fn acl_bytes(e: &[(u16, u16, u32)]) -> Vec<u8> {
    Acl(e
        .iter()
        .map(|&(tag, perm, id)| acl::AclEntry { tag, perm, id })
        .collect())
    .encode()
}

#[test]
fn init_flags_leave_out_kernel_owned_features() {
    let r = fs().init(u64::MAX);
    assert_eq!(r.max_write, 1 << 20);
    for bad in [
        f::POSIX_LOCKS,
        f::FLOCK_LOCKS,
        f::HANDLE_KILLPRIV,
        f::WRITEBACK_CACHE,
        f::ATOMIC_O_TRUNC,
    ] {
        assert_eq!(r.flags & bad, 0);
    }
    assert_ne!(r.flags & f::POSIX_ACL, 0);
    // Set-id clearing is applied here, for the caller the kernel names.
    assert_ne!(r.flags & f::HANDLE_KILLPRIV_V2, 0);
}

#[test]
fn create_lookup_forget_lifetime() {
    let fs = fs();
    let (ino, fh) = create(&fs, &root(), ROOT, "f", 0o644);
    assert!(ino > ROOT);
    let e = fs.lookup(&root(), ROOT, n("f")).unwrap();
    assert_eq!(e.ino, ino);
    assert_eq!(e.generation, 0);
    // "." finds any node again by its id (export support); it counts as a lookup.
    assert_eq!(fs.lookup(&root(), ino, n(".")).unwrap().ino, ino);
    fs.forget(ino, 1);
    assert_eq!(fs.lookup(&root(), ROOT, n("..")).unwrap().ino, ROOT);
    assert_eq!(fs.lookup(&root(), ROOT, n("x")).unwrap_err(), Errno::ENOENT);
    assert_eq!(
        err(fs.lookup(&root(), ROOT, OsStr::new(&"a".repeat(256)))),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        err(fs.mkdir(&root(), ROOT, OsStr::new(&"a".repeat(256)), 0o755, 0)),
        libc::ENAMETOOLONG
    );
    fs.mkdir(&root(), ROOT, OsStr::new(&"a".repeat(255)), 0o755, 0)
        .unwrap();

    assert_eq!(fs.write(&root(), ino, fh, 0, b"hello", 0, 0).unwrap(), 5);
    // Unlinked while open: still readable and writable.
    fs.unlink(&root(), ROOT, n("f")).unwrap();
    assert_eq!(attr(&fs, ino).nlink, 0);
    // ... but no longer found again by its id: a handle to it is stale.
    assert_eq!(err(fs.lookup(&root(), ino, n("."))), libc::ESTALE);
    fs.write(&root(), ino, fh, 5, b"!", 0, 0).unwrap();
    assert_eq!(read_all(&fs, ino, fh), b"hello!");
    fs.forget(ino, 2);
    assert!(
        fs.getattr(&root(), ino, None).is_ok(),
        "open handle keeps it"
    );
    fs.release(&root(), ino, fh, 0).unwrap();
    assert_eq!(fs.getattr(&root(), ino, None).unwrap_err(), Errno::ENOENT);
    assert_eq!(err(fs.release(&root(), ino, fh, 0)), libc::EBADF);
    let mut out = Vec::new();
    assert_eq!(
        err(fs.read(&root(), ino, fh, 0, 10, 0, &mut out)),
        libc::EBADF
    );
    // Numbers are never reused.
    let (ino2, _) = create(&fs, &root(), ROOT, "g", 0o644);
    assert!(ino2 > ino);
    // A lookup reference alone keeps an unlinked inode.
    let (ino3, fh3) = create(&fs, &root(), ROOT, "h", 0o644);
    fs.release(&root(), ino3, fh3, 0).unwrap();
    fs.unlink(&root(), ROOT, n("h")).unwrap();
    assert!(fs.getattr(&root(), ino3, None).is_ok());
    fs.forget(ino3, 1);
    assert!(fs.getattr(&root(), ino3, None).is_err());
}

#[test]
fn hard_links_and_dir_nlink() {
    let fs = fs();
    let (ino, fh) = create(&fs, &root(), ROOT, "a", 0o644);
    let c0 = attr(&fs, ino);
    let e = fs.link(&root(), ino, ROOT, n("b")).unwrap();
    assert_eq!(e.attr.nlink, 2);
    assert!((e.attr.ctime, e.attr.ctimensec) >= (c0.ctime, c0.ctimensec));
    assert_eq!(err(fs.link(&root(), ino, ROOT, n("b"))), libc::EEXIST);
    fs.unlink(&root(), ROOT, n("a")).unwrap();
    assert_eq!(attr(&fs, ino).nlink, 1);
    fs.release(&root(), ino, fh, 0).unwrap();
    assert_eq!(fs.lookup(&root(), ROOT, n("b")).unwrap().ino, ino);

    assert_eq!(attr(&fs, ROOT).nlink, 2);
    let d = fs.mkdir(&root(), ROOT, n("d"), 0o755, 0).unwrap();
    assert_eq!(d.attr.nlink, 2);
    assert_eq!(d.attr.mode, libc::S_IFDIR | 0o755);
    assert_eq!(attr(&fs, ROOT).nlink, 3);
    assert_eq!(err(fs.link(&root(), d.ino, ROOT, n("dl"))), libc::EPERM);
    fs.mkdir(&root(), d.ino, n("sub"), 0o755, 0).unwrap();
    assert_eq!(attr(&fs, d.ino).nlink, 3);
    assert_eq!(err(fs.rmdir(&root(), ROOT, n("d"))), libc::ENOTEMPTY);
    assert_eq!(err(fs.unlink(&root(), ROOT, n("d"))), libc::EISDIR);
    assert_eq!(err(fs.rmdir(&root(), ROOT, n("b"))), libc::ENOTDIR);
    assert_eq!(err(fs.mkdir(&root(), ROOT, n("d"), 0o755, 0)), libc::EEXIST);
    fs.rmdir(&root(), d.ino, n("sub")).unwrap();
    assert_eq!(attr(&fs, d.ino).nlink, 2);
    fs.rmdir(&root(), ROOT, n("d")).unwrap();
    assert_eq!(attr(&fs, ROOT).nlink, 2);
    assert_eq!(attr(&fs, d.ino).nlink, 0);
    // A removed directory cannot get new entries.
    assert_eq!(
        err(fs.mkdir(&root(), d.ino, n("x"), 0o755, 0)),
        libc::ENOENT
    );
}

#[test]
fn rename_cases() {
    let fs = fs();
    let c = root();
    let (a, _) = create(&fs, &c, ROOT, "a", 0o644);
    let (b, _) = create(&fs, &c, ROOT, "b", 0o644);
    let d1 = fs.mkdir(&c, ROOT, n("d1"), 0o755, 0).unwrap().ino;
    let d2 = fs.mkdir(&c, ROOT, n("d2"), 0o755, 0).unwrap().ino;
    let (inner, _) = create(&fs, &c, d2, "inner", 0o644);
    let _ = inner;
    // file over file
    fs.rename(&c, ROOT, n("a"), ROOT, n("b"), 0).unwrap();
    assert_eq!(fs.lookup(&c, ROOT, n("b")).unwrap().ino, a);
    assert_eq!(attr(&fs, b).nlink, 0);
    // type mismatches
    assert_eq!(
        err(fs.rename(&c, ROOT, n("b"), ROOT, n("d1"), 0)),
        libc::EISDIR
    );
    assert_eq!(
        err(fs.rename(&c, ROOT, n("d1"), ROOT, n("b"), 0)),
        libc::ENOTDIR
    );
    assert_eq!(
        err(fs.rename(&c, ROOT, n("d1"), ROOT, n("d2"), 0)),
        libc::ENOTEMPTY
    );
    assert_eq!(
        err(fs.rename(&c, ROOT, n("nope"), ROOT, n("x"), 0)),
        libc::ENOENT
    );
    // flags
    assert_eq!(
        err(fs.rename(&c, ROOT, n("b"), ROOT, n("d1"), libc::RENAME_NOREPLACE)),
        libc::EEXIST
    );
    assert_eq!(
        err(fs.rename(&c, ROOT, n("b"), ROOT, n("z"), libc::RENAME_WHITEOUT)),
        libc::EINVAL
    );
    assert_eq!(
        err(fs.rename(&c, ROOT, n("b"), ROOT, n("z"), libc::RENAME_EXCHANGE)),
        libc::ENOENT
    );
    // same inode: no-op
    fs.link(&c, a, ROOT, n("a2")).unwrap();
    fs.rename(&c, ROOT, n("b"), ROOT, n("a2"), 0).unwrap();
    assert_eq!(attr(&fs, a).nlink, 2);
    assert!(fs.lookup(&c, ROOT, n("b")).is_ok());
    // into own subtree
    let sub = fs.mkdir(&c, d1, n("sub"), 0o755, 0).unwrap().ino;
    assert_eq!(
        err(fs.rename(&c, ROOT, n("d1"), sub, n("x"), 0)),
        libc::EINVAL
    );
    assert_eq!(
        err(fs.rename(&c, ROOT, n("d1"), d1, n("x"), 0)),
        libc::EINVAL
    );
    // dir between parents: nlink and ".."
    assert_eq!(attr(&fs, d1).nlink, 3);
    fs.rename(&c, d1, n("sub"), d2, n("moved"), 0).unwrap();
    assert_eq!(attr(&fs, d1).nlink, 2);
    assert_eq!(attr(&fs, d2).nlink, 3);
    assert_eq!(fs.lookup(&c, sub, n("..")).unwrap().ino, d2);
    // dir over empty dir
    let e = fs.mkdir(&c, ROOT, n("empty"), 0o755, 0).unwrap().ino;
    let root_links = attr(&fs, ROOT).nlink;
    fs.rename(&c, ROOT, n("d1"), ROOT, n("empty"), 0).unwrap();
    assert_eq!(attr(&fs, ROOT).nlink, root_links - 1);
    assert_eq!(attr(&fs, e).nlink, 0);
    // exchange file and dir across parents
    fs.rename(&c, ROOT, n("b"), d2, n("moved"), libc::RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(fs.lookup(&c, ROOT, n("b")).unwrap().ino, sub);
    assert_eq!(fs.lookup(&c, d2, n("moved")).unwrap().ino, a);
    assert_eq!(fs.lookup(&c, sub, n("..")).unwrap().ino, ROOT);
    assert_eq!(attr(&fs, d2).nlink, 2);
}

/// Parses a READDIR reply: (ino, next offset, name).
fn parse_dirents(buf: &[u8], plus: bool) -> Vec<(u64, u64, String)> {
    let mut out = Vec::new();
    let mut p = 0;
    let skip = if plus {
        std::mem::size_of::<abi::EntryOut>()
    } else {
        0
    };
    while p < buf.len() {
        p += skip;
        let ino = u64::from_le_bytes(buf[p..p + 8].try_into().unwrap());
        let off = u64::from_le_bytes(buf[p + 8..p + 16].try_into().unwrap());
        let len = u32::from_le_bytes(buf[p + 16..p + 20].try_into().unwrap()) as usize;
        let name = String::from_utf8(buf[p + 24..p + 24 + len].to_vec()).unwrap();
        out.push((ino, off, name));
        p += (24 + len).div_ceil(8) * 8;
    }
    out
}

fn readdir_page(fs: &MemFs, dir: u64, fh: u64, off: u64, plus: bool) -> Vec<(u64, u64, String)> {
    let mut buf = Vec::new();
    let mut sink = DirSink::new(&mut buf, 300, plus);
    fs.readdir(&root(), dir, fh, off, &mut sink).unwrap();
    parse_dirents(&buf, plus)
}

#[test]
fn readdir_cookies_under_mutation() {
    for plus in [false, true] {
        let fs = fs();
        let d = fs.mkdir(&root(), ROOT, n("d"), 0o755, 0).unwrap().ino;
        for i in 0..40 {
            create(&fs, &root(), d, &format!("f{i:02}"), 0o644);
        }
        let fh = fs.opendir(&root(), d, 0).unwrap().fh;
        let mut seen = Vec::new();
        let mut off = 0;
        let mut round = 0;
        loop {
            let page = readdir_page(&fs, d, fh, off, plus);
            if page.is_empty() {
                break;
            }
            assert!(page.len() < 30, "pages are limited");
            for (_, next, name) in &page {
                seen.push(name.clone());
                off = *next;
            }
            // Mutate between pages: remove odd files, add new ones, rename one.
            round += 1;
            for i in (1..40).step_by(2) {
                let _ = fs.unlink(&root(), d, n(&format!("f{i:02}")));
            }
            if round <= 5 {
                create(&fs, &root(), d, &format!("new{round}"), 0o644);
            }
        }
        assert_eq!(&seen[..2], &[".".to_string(), "..".to_string()]);
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), seen.len(), "no duplicates: {seen:?}");
        for i in (0..40).step_by(2) {
            assert!(
                seen.contains(&format!("f{i:02}")),
                "f{i:02} existed throughout"
            );
        }
        fs.releasedir(&root(), d, fh).unwrap();
        assert_eq!(err(fs.releasedir(&root(), d, fh)), libc::EBADF);
    }
}

#[test]
fn readdirplus_counts_lookups_but_not_for_dots() {
    let fs = fs();
    let (ino, fh) = create(&fs, &root(), ROOT, "f", 0o644);
    fs.release(&root(), ino, fh, 0).unwrap();
    fs.forget(ino, 1);
    let dfh = fs.opendir(&root(), ROOT, 0).unwrap().fh;
    let mut buf = Vec::new();
    let mut sink = DirSink::new(&mut buf, 4096, true);
    fs.readdir(&root(), ROOT, dfh, 0, &mut sink).unwrap();
    let ents = parse_dirents(&buf, true);
    assert_eq!(ents.len(), 3);
    // The entry has one lookup: unlinking and one forget frees it.
    fs.unlink(&root(), ROOT, n("f")).unwrap();
    assert!(fs.getattr(&root(), ino, None).is_ok());
    fs.forget(ino, 1);
    assert!(fs.getattr(&root(), ino, None).is_err());
    // Dots carry nodeid 0 in the entry part.
    let nodeid = u64::from_le_bytes(buf[0..8].try_into().unwrap());
    assert_eq!(nodeid, 0);
}

#[test]
fn sparse_files_and_seek() {
    let fs = fs();
    let (ino, fh) = create(&fs, &root(), ROOT, "s", 0o644);
    fs.write(&root(), ino, fh, 1 << 20, b"data", 0, 0).unwrap();
    let a = attr(&fs, ino);
    assert_eq!(a.size, (1 << 20) + 4);
    assert!(a.blocks <= 16, "sparse: {} blocks", a.blocks);
    assert_eq!(
        fs.lseek(&root(), ino, fh, 0, libc::SEEK_DATA as u32)
            .unwrap(),
        1 << 20
    );
    assert_eq!(
        fs.lseek(&root(), ino, fh, 0, libc::SEEK_HOLE as u32)
            .unwrap(),
        0
    );
    assert_eq!(
        fs.lseek(&root(), ino, fh, 1 << 20, libc::SEEK_HOLE as u32)
            .unwrap(),
        (1 << 20) + 4
    );
    assert_eq!(
        err(fs.lseek(&root(), ino, fh, 2 << 20, libc::SEEK_DATA as u32)),
        libc::ENXIO
    );
    // O_APPEND writes go to the end whatever the offset.
    fs.write(&root(), ino, fh, 0, b"!", 0, libc::O_APPEND as u32)
        .unwrap();
    assert_eq!(attr(&fs, ino).size, (1 << 20) + 5);
    // fallocate, punch, copy_file_range
    fs.fallocate(&root(), ino, fh, 0, 8192, 0).unwrap();
    assert!(attr(&fs, ino).blocks >= 16);
    fs.fallocate(
        &root(),
        ino,
        fh,
        0,
        8192,
        (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u32,
    )
    .unwrap();
    let (ino2, fh2) = create(&fs, &root(), ROOT, "t", 0o644);
    let n = fs
        .copy_file_range(&root(), ino, fh, 1 << 20, ino2, fh2, 10, 100, 0)
        .unwrap();
    assert_eq!(n, 5);
    let data = read_all(&fs, ino2, fh2);
    assert_eq!(&data[10..], b"data!");
    // setattr size truncates and updates mtime.
    let before = attr(&fs, ino);
    std::thread::sleep(Duration::from_millis(2));
    let set = abi::SetattrIn {
        valid: fattr::SIZE,
        size: 3,
        ..Default::default()
    };
    let (a, _) = fs.setattr(&root(), ino, &set).unwrap();
    assert_eq!(a.size, 3);
    assert!((a.mtime, a.mtimensec) > (before.mtime, before.mtimensec));
    assert!((a.ctime, a.ctimensec) > (before.ctime, before.ctimensec));
}

#[test]
fn xattr_errors() {
    let fs = fs();
    let (ino, _) = create(&fs, &root(), ROOT, "x", 0o644);
    let c = root();
    let cr = libc::XATTR_CREATE as u32;
    let rp = libc::XATTR_REPLACE as u32;
    assert_eq!(
        err(fs.setxattr(&c, ino, n("user.a"), b"1", rp, 0)),
        libc::ENODATA
    );
    fs.setxattr(&c, ino, n("user.a"), b"1", cr, 0).unwrap();
    assert_eq!(
        err(fs.setxattr(&c, ino, n("user.a"), b"1", cr, 0)),
        libc::EEXIST
    );
    assert!(matches!(
        fs.getxattr(&c, ino, n("user.a"), 0),
        Ok(Xattr::Size(1))
    ));
    assert!(matches!(fs.getxattr(&c, ino, n("user.a"), 1), Ok(Xattr::Data(d)) if d == b"1"));
    fs.setxattr(&c, ino, n("user.a"), b"12", 0, 0).unwrap();
    assert_eq!(err(fs.getxattr(&c, ino, n("user.a"), 1)), libc::ERANGE);
    assert_eq!(err(fs.getxattr(&c, ino, n("user.zz"), 10)), libc::ENODATA);
    assert_eq!(
        err(fs.setxattr(&c, ino, n("user.big"), &vec![0; 65537], 0, 0)),
        libc::E2BIG
    );
    assert_eq!(
        err(fs.setxattr(&c, ino, OsStr::new(&"u".repeat(256)), b"", 0, 0)),
        libc::ERANGE
    );
    fs.setxattr(&c, ino, n("trusted.t"), b"", 0, 0).unwrap();
    assert!(matches!(fs.listxattr(&c, ino, 0), Ok(Xattr::Size(17))));
    assert!(
        matches!(fs.listxattr(&c, ino, 100), Ok(Xattr::Data(d)) if d == b"trusted.t\0user.a\0")
    );
    assert_eq!(err(fs.listxattr(&c, ino, 5)), libc::ERANGE);
    fs.removexattr(&c, ino, n("user.a")).unwrap();
    assert_eq!(err(fs.removexattr(&c, ino, n("user.a"))), libc::ENODATA);
    assert_eq!(err(fs.getxattr(&c, 999, n("user.a"), 0)), libc::ENOENT);
}

#[test]
fn owner_and_setgid_inheritance() {
    let fs = fs();
    let (f, _) = create(&fs, &user(), ROOT, "mine", 0o2755);
    let a = attr(&fs, f);
    assert_eq!((a.uid, a.gid), (1000, 1000));
    assert_eq!(
        a.mode & 0o7777,
        0o2755 & !0o022,
        "creator in group keeps S_ISGID"
    );

    let d = fs.mkdir(&root(), ROOT, n("sg"), 0o777, 0).unwrap().ino;
    let set = abi::SetattrIn {
        valid: fattr::MODE | fattr::GID,
        mode: 0o2777,
        gid: 50,
        ..Default::default()
    };
    fs.setattr(&root(), d, &set).unwrap();
    let (f, _) = create(&fs, &user(), d, "f", 0o2775);
    let a = attr(&fs, f);
    assert_eq!(a.gid, 50, "group inherited from S_ISGID parent");
    assert_eq!(
        a.mode & 0o7777,
        0o755,
        "S_ISGID stripped: creator not in group 50"
    );
    let member = Context {
        supp_group: Some(50),
        ..user()
    };
    let (f, _) = create(&fs, &member, d, "g", 0o2775);
    assert_eq!(
        mode_of(&fs, f) & 0o7777,
        0o2755,
        "supplementary member keeps it"
    );
    let sub = fs.mkdir(&user(), d, n("sub"), 0o755, 0o022).unwrap();
    assert_eq!(sub.attr.gid, 50);
    assert_eq!(
        sub.attr.mode & 0o7777,
        0o2755,
        "directories inherit S_ISGID"
    );
    let sym = fs.symlink(&user(), d, n("l"), b"target").unwrap();
    assert_eq!(sym.attr.mode, libc::S_IFLNK | 0o777);
    assert_eq!(sym.attr.size, 6);
    assert_eq!(fs.readlink(&root(), sym.ino).unwrap(), b"target");
    assert_eq!(
        err(fs.symlink(&user(), d, n("long"), &[b'a'; 4096])),
        libc::ENAMETOOLONG
    );
    let fifo = fs
        .mknod(&user(), d, n("p"), libc::S_IFIFO | 0o666, 0, 0o022)
        .unwrap();
    assert_eq!(fifo.attr.mode, libc::S_IFIFO | 0o644);
    let chr = fs
        .mknod(&root(), d, n("c"), libc::S_IFCHR | 0o600, 0x0103, 0)
        .unwrap();
    assert_eq!(chr.attr.rdev, 0x0103);
    assert_eq!(
        err(fs.mknod(&root(), d, n("bad"), 0o170000 | 0o600, 0, 0)),
        libc::EINVAL
    );
}

#[test]
fn acl_inheritance_and_mode_sync() {
    let fs = fs();
    let d = fs.mkdir(&root(), ROOT, n("d"), 0o755, 0).unwrap().ino;
    let def = acl_bytes(&[
        (acl::USER_OBJ, 7, !0),
        (acl::USER, 5, 65534),
        (acl::GROUP_OBJ, 5, !0),
        (acl::MASK, 7, !0),
        (acl::OTHER, 0, !0),
    ]);
    fs.setxattr(&root(), d, n("system.posix_acl_default"), &def, 0, 0)
        .unwrap();
    // A file: umask ignored, mode masked by the default ACL.
    let (f, _) = create(&fs, &root(), d, "f", 0o666);
    assert_eq!(mode_of(&fs, f) & 0o777, 0o660);
    let Xattr::Data(a) = fs
        .getxattr(&root(), f, n("system.posix_acl_access"), 4096)
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(Acl::parse(&a).unwrap().mode_bits(), 0o660);
    assert!(fs
        .getxattr(&root(), f, n("system.posix_acl_default"), 4096)
        .is_err());
    // A directory inherits the default ACL too.
    let sub = fs.mkdir(&root(), d, n("sub"), 0o777, 0o077).unwrap();
    assert_eq!(sub.attr.mode & 0o777, 0o770);
    assert!(fs
        .getxattr(&root(), sub.ino, n("system.posix_acl_default"), 4096)
        .is_ok());
    // Without a default ACL the umask applies.
    let plain = fs.mkdir(&root(), ROOT, n("plain"), 0o777, 0o027).unwrap();
    assert_eq!(plain.attr.mode & 0o777, 0o750);
    // Default ACLs only on directories.
    assert_eq!(
        err(fs.setxattr(&root(), f, n("system.posix_acl_default"), &def, 0, 0)),
        libc::EACCES
    );
    // chmod moves the ACL's mask.
    let set = abi::SetattrIn {
        valid: fattr::MODE,
        mode: 0o640,
        ..Default::default()
    };
    fs.setattr(&root(), f, &set).unwrap();
    let Xattr::Data(a) = fs
        .getxattr(&root(), f, n("system.posix_acl_access"), 4096)
        .unwrap()
    else {
        panic!()
    };
    let a = Acl::parse(&a).unwrap();
    assert_eq!(a.mode_bits(), 0o640);
    assert!(
        a.0.iter().any(|e| e.tag == acl::USER && e.perm == 5),
        "named entries kept"
    );
    // Setting an access ACL sets the mode; a minimal one is not stored.
    let (g, _) = create(&fs, &root(), ROOT, "g", 0o2775);
    let acc = acl_bytes(&[
        (acl::USER_OBJ, 6, !0),
        (acl::USER, 4, 65534),
        (acl::GROUP_OBJ, 0, !0),
        (acl::MASK, 4, !0),
        (acl::OTHER, 0, !0),
    ]);
    fs.setxattr(
        &root(),
        g,
        n("system.posix_acl_access"),
        &acc,
        0,
        wflags::SETXATTR_ACL_KILL_SGID,
    )
    .unwrap();
    assert_eq!(
        mode_of(&fs, g) & 0o7777,
        0o640,
        "mode from ACL, S_ISGID killed"
    );
    let minimal = acl_bytes(&[
        (acl::USER_OBJ, 7, !0),
        (acl::GROUP_OBJ, 5, !0),
        (acl::OTHER, 1, !0),
    ]);
    fs.setxattr(&root(), g, n("system.posix_acl_access"), &minimal, 0, 0)
        .unwrap();
    assert_eq!(mode_of(&fs, g) & 0o777, 0o751);
    assert_eq!(
        err(fs.getxattr(&root(), g, n("system.posix_acl_access"), 4096)),
        libc::ENODATA
    );
    assert_eq!(
        err(fs.setxattr(
            &root(),
            g,
            n("system.posix_acl_access"),
            b"\x02\0\0\0\x01",
            0,
            0
        )),
        libc::EINVAL
    );
}

#[test]
fn enospc_at_capacity() {
    let fs = MemFs::new(MemConfig {
        capacity_bytes: 1 << 20,
        max_inodes: 8,
        ..Default::default()
    });
    let (ino, fh) = create(&fs, &root(), ROOT, "big", 0o644);
    let chunk = vec![7u8; 256 * 1024];
    let mut total = 0u64;
    let e = loop {
        match fs.write(&root(), ino, fh, total, &chunk, 0, 0) {
            Ok(n) => total += n as u64,
            Err(e) => break e,
        }
        assert!(total <= 1 << 20);
    };
    assert_eq!(e.0, libc::ENOSPC);
    assert!(total >= 1000 * 1024, "wrote {total}");
    let st = fs.statfs(&root(), ROOT).unwrap();
    assert_eq!(st.blocks, 256);
    assert_eq!(st.bfree, 0);
    assert_eq!(st.namelen, 255);
    // Freeing the file frees the space.
    fs.unlink(&root(), ROOT, n("big")).unwrap();
    fs.release(&root(), ino, fh, 0).unwrap();
    fs.forget(ino, 1);
    assert_eq!(fs.statfs(&root(), ROOT).unwrap().bfree, 256);
    // Inode limit.
    for i in 0..7 {
        fs.mknod(
            &root(),
            ROOT,
            n(&format!("n{i}")),
            libc::S_IFREG | 0o644,
            0,
            0,
        )
        .unwrap();
    }
    assert_eq!(
        err(fs.mknod(&root(), ROOT, n("over"), libc::S_IFREG | 0o644, 0, 0)),
        libc::ENOSPC
    );
    assert_eq!(fs.statfs(&root(), ROOT).unwrap().ffree, 0);
}

#[test]
fn setattr_times_and_ctime() {
    let fs = fs();
    let (ino, _) = create(&fs, &root(), ROOT, "t", 0o644);
    let set = abi::SetattrIn {
        valid: fattr::ATIME | fattr::MTIME,
        atime: 1000,
        atimensec: 123456789,
        mtime: 2000,
        mtimensec: 987654321,
        ..Default::default()
    };
    let (a, _) = fs.setattr(&root(), ino, &set).unwrap();
    assert_eq!(
        (a.atime, a.atimensec, a.mtime, a.mtimensec),
        (1000, 123456789, 2000, 987654321)
    );
    assert!(a.ctime > 2000);
    let set = abi::SetattrIn {
        valid: fattr::CTIME | fattr::UID,
        ctime: 5,
        ctimensec: 6,
        uid: 42,
        ..Default::default()
    };
    let (a, _) = fs.setattr(&root(), ino, &set).unwrap();
    assert_eq!((a.ctime, a.ctimensec, a.uid), (5, 6, 42));
    let set = abi::SetattrIn {
        valid: fattr::ATIME | fattr::ATIME_NOW,
        ..Default::default()
    };
    let (a, _) = fs.setattr(&root(), ino, &set).unwrap();
    assert!(a.atime > 2000 && a.mtime == 2000);
    let (sx, _) = fs.statx(&root(), ino, None, 0, 0).unwrap();
    assert_ne!(sx.mask & libc::STATX_BTIME, 0);
    assert!(sx.btime.tv_sec > 2000);
    // Parent times move on create.
    let p0 = attr(&fs, ROOT);
    std::thread::sleep(Duration::from_millis(2));
    fs.mkdir(&root(), ROOT, n("later"), 0o755, 0).unwrap();
    let p1 = attr(&fs, ROOT);
    assert!((p1.mtime, p1.mtimensec) > (p0.mtime, p0.mtimensec));
}

#[test]
fn tmpfile_then_link() {
    let fs = fs();
    let (e, o) = fs
        .tmpfile(&user(), ROOT, 0o600, 0, libc::O_RDWR as u32)
        .unwrap();
    assert_eq!(e.attr.nlink, 0);
    assert_eq!(e.attr.uid, 1000);
    fs.write(&user(), e.ino, o.fh, 0, b"tmp", 0, 0).unwrap();
    let l = fs.link(&user(), e.ino, ROOT, n("named")).unwrap();
    assert_eq!(l.attr.nlink, 1);
    fs.release(&user(), e.ino, o.fh, 0).unwrap();
    fs.forget(e.ino, 2);
    let again = fs.lookup(&root(), ROOT, n("named")).unwrap();
    let o = fs
        .open(&root(), again.ino, libc::O_RDONLY as u32, false)
        .unwrap();
    assert_eq!(read_all(&fs, again.ino, o.fh), b"tmp");
}

#[test]
fn open_flags_and_killpriv() {
    let fs = fs();
    let (ino, fh) = create(&fs, &root(), ROOT, "k", 0o6775);
    fs.write(&root(), ino, fh, 0, b"abc", 0, 0).unwrap();
    let o = fs
        .open(&root(), ino, (libc::O_WRONLY | libc::O_TRUNC) as u32, true)
        .unwrap();
    let a = attr(&fs, ino);
    assert_eq!(a.size, 0);
    assert_eq!(a.mode & 0o7777, 0o755);
    assert_eq!(err(fs.open(&root(), ROOT, 0, false)), libc::EISDIR);
    assert_eq!(err(fs.opendir(&root(), ino, 0)), libc::ENOTDIR);
    fs.release(&root(), ino, o.fh, 0).unwrap();
    // Unknown nodes.
    assert_eq!(err(fs.open(&root(), 12345, 0, false)), libc::ENOENT);
    assert_eq!(err(fs.getattr(&root(), 12345, None)), libc::ENOENT);
    fs.forget(12345, 1);
}

#[test]
fn concurrent_appends_are_atomic() {
    let fs = Arc::new(fs());
    let (ino, fh) = create(&fs, &root(), ROOT, "log", 0o644);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let fs = fs.clone();
            std::thread::spawn(move || {
                let rec = vec![b'a' + t as u8; 100];
                for _ in 0..50 {
                    fs.write(&root(), ino, fh, 0, &rec, 0, libc::O_APPEND as u32)
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let data = read_all(&fs, ino, fh);
    assert_eq!(data.len(), 4 * 50 * 100);
    for rec in data.chunks(100) {
        assert!(rec.iter().all(|&b| b == rec[0]), "records never interleave");
    }
}

#[test]
fn a_restored_snapshot_is_the_same_file_system_with_the_same_handles() {
    let a = fs();
    let dir = a.mkdir(&root(), ROOT, n("d"), 0o755, 0o022).unwrap().ino;
    let (file, fh) = create(&a, &root(), dir, "f", 0o644);
    a.write(&root(), file, fh, 0, b"hello, successor", 0, 0)
        .unwrap();
    a.symlink(&root(), dir, n("l"), b"f").unwrap();
    a.setxattr(&root(), file, n("user.k"), b"v", 0, 0).unwrap();
    // An unlinked file still open keeps its data.
    let (gone, gone_fh) = create(&a, &root(), ROOT, "gone", 0o600);
    a.write(&root(), gone, gone_fh, 0, b"still here", 0, 0)
        .unwrap();
    a.unlink(&root(), ROOT, n("gone")).unwrap();
    let dh = a.opendir(&root(), dir, 0).unwrap().fh;
    let listing = readdir_page(&a, dir, dh, 0, false);
    let before = attr(&a, file);
    let used = a.space.used();

    let state = a.checkpoint().unwrap();
    assert_eq!(state.fds.len(), 2, "one memfd per file with data");
    let b = MemFs::restore(
        MemConfig {
            capacity_bytes: 64 << 20,
            ..Default::default()
        },
        state,
    )
    .unwrap();
    assert_eq!(b.lookup(&root(), dir, n("f")).unwrap().ino, file);
    assert_eq!(read_all(&b, file, fh), b"hello, successor");
    assert_eq!(read_all(&b, gone, gone_fh), b"still here");
    assert_eq!(
        b.readlink(&root(), b.lookup(&root(), dir, n("l")).unwrap().ino)
            .unwrap(),
        b"f"
    );
    assert!(matches!(
        b.getxattr(&root(), file, n("user.k"), 64).unwrap(),
        Xattr::Data(v) if v == b"v"
    ));
    let after = attr(&b, file);
    assert_eq!(
        (after.size, after.mode, after.mtime, after.mtimensec),
        (before.size, before.mode, before.mtime, before.mtimensec)
    );
    assert_eq!(
        readdir_page(&b, dir, dh, 0, false),
        listing,
        "cookies and order kept"
    );
    assert_eq!(b.space.used(), used, "space accounting restored");
    // New objects get fresh numbers; writes through old handles land in the same data.
    let (newer, _) = create(&b, &root(), ROOT, "new", 0o644);
    assert!(newer > gone);
    b.write(&root(), file, fh, 0, b"HELLO", 0, 0).unwrap();
    assert_eq!(read_all(&b, file, fh), b"HELLO, successor");
}

#[test]
fn a_snapshot_that_does_not_hold_together_is_refused() {
    let a = fs();
    let (_, _) = create(&a, &root(), ROOT, "f", 0o644);
    let mut state = a.checkpoint().unwrap();
    assert!(!state.fds.is_empty());
    // The memfd the snapshot refers to did not come with it.
    state.fds.clear();
    assert!(state.fds.is_empty());
    assert!(matches!(
        MemFs::restore(MemConfig::default(), state),
        Err(fsva_appliance::state::StateError::MissingDescriptor { .. })
    ));
    let garbage = fsva_appliance::state::BackendState {
        bytes: vec![0, 9, 9, 9],
        fds: Vec::new(),
    };
    assert!(MemFs::restore(MemConfig::default(), garbage).is_err());
}

/// The supervisor's keeping, in-process: memfds by id and the last checkpoint.
#[derive(Default)]
struct TestKeeper {
    fds: std::sync::Mutex<HashMap<u64, OwnedFd>>,
    checkpoint: std::sync::Mutex<Option<(Vec<u8>, u64)>>,
}

impl Keeper for TestKeeper {
    fn keep(&self, id: u64, fd: std::os::fd::BorrowedFd<'_>) {
        let dup = fd.try_clone_to_owned().unwrap();
        self.fds.lock().unwrap().insert(id, dup);
    }
    fn release(&self, id: u64) {
        self.fds.lock().unwrap().remove(&id);
    }
    fn store_checkpoint(&self, state: &[u8], boundary: u64) -> std::io::Result<()> {
        *self.checkpoint.lock().unwrap() = Some((state.to_vec(), boundary));
        Ok(())
    }
}

fn test_config() -> MemConfig {
    MemConfig {
        capacity_bytes: 64 << 20,
        root_mode: 0o777,
        ..Default::default()
    }
}

fn journaled() -> (MemFs, Arc<TestKeeper>, OwnedFd) {
    let fd = fsva_appliance::journal::create(4 << 20).unwrap();
    let journal = Arc::new(Journal::open(fd.try_clone().unwrap()).unwrap());
    let keeper = Arc::new(TestKeeper::default());
    let fs = MemFs::journaled(test_config(), journal, keeper.clone());
    (fs, keeper, fd)
}

/// What the checkpointer thread does: a checkpoint of `fs`, stored with `keeper`.
fn store_checkpoint(fs: &MemFs, keeper: &TestKeeper) {
    let journal = fs.journal.clone().unwrap();
    let (bytes, boundary) = fs.journal_checkpoint(&mut || journal.rotate()).unwrap();
    let state = fsva_appliance::state::ApplianceState::V2(fsva_appliance::state::StateV2 {
        session: None,
        backing: Vec::new(),
        backend: bytes,
        journal_boundary: boundary,
    });
    keeper.store_checkpoint(&state.encode(), boundary).unwrap();
    journal.covered(boundary);
}

/// What a successor rebuilds from what `keeper` and the journal in `fd` hold.
fn recovered(
    keeper: &Arc<TestKeeper>,
    fd: &OwnedFd,
) -> std::result::Result<MemFs, fsva_appliance::state::StateError> {
    let journal = Arc::new(Journal::open(fd.try_clone().unwrap()).unwrap());
    let (checkpoint, boundary) = match keeper.checkpoint.lock().unwrap().clone() {
        Some((bytes, b)) => {
            let s = fsva_appliance::state::ApplianceState::decode(&bytes)
                .unwrap()
                .into_latest();
            (Some(s.backend), b)
        }
        None => (None, 0),
    };
    let records = journal
        .recover(boundary)
        .map_err(|e| fsva_appliance::state::StateError::Corrupt(e.to_string()))?
        .into_iter()
        .filter_map(|r| match r.payload.split_first() {
            Some((&fsva_appliance::journal::BACKEND, rest)) => Some(rest.to_vec()),
            _ => None,
        })
        .collect();
    let fds = keeper
        .fds
        .lock()
        .unwrap()
        .iter()
        .map(|(&id, fd)| (id, fd.try_clone().unwrap()))
        .collect();
    MemFs::recover(
        test_config(),
        journal,
        keeper.clone(),
        Recovery {
            checkpoint,
            records,
            fds,
        },
    )
}

/// Everything observable of a file system: every inode's metadata (lookups and opens
/// included), directory entries with their cookies, file contents, xattrs, handles.
fn everything(fs: &MemFs) -> Vec<String> {
    let st = fs.rlock();
    let (next, all) = st.inodes.parts();
    let mut out = vec![format!("next ino {next}")];
    for (&ino, i) in all {
        let kind = match &i.kind {
            Kind::File(Some(d)) => {
                let mut data = Vec::new();
                d.read_into(0, 1 << 20, &mut data).unwrap();
                format!("file {data:?}")
            }
            Kind::File(None) => "file -".into(),
            Kind::Dir(d) => format!(
                "dir parent {} entries {:?}",
                d.parent,
                d.iter_from(0)
                    .map(|(c, n, i)| (c, n.to_owned(), i))
                    .collect::<Vec<_>>()
            ),
            Kind::Symlink(t) => format!("symlink {t:?}"),
            Kind::Special => "special".into(),
        };
        out.push(format!(
            "{ino}: mode {:o} uid {} gid {} nlink {} rdev {} times {:?} lookups {} opens {} xattrs {:?} {kind}",
            i.mode,
            i.uid,
            i.gid,
            i.nlink,
            i.rdev,
            [i.atime, i.mtime, i.ctime, i.btime],
            i.lookups.load(Ordering::Relaxed),
            i.opens,
            i.xattrs.pairs().collect::<Vec<_>>(),
        ));
    }
    let (last, hs) = st.handles.parts();
    out.push(format!("last fh {last}"));
    for (fh, h) in hs {
        out.push(format!(
            "handle {fh}: ino {} flags {:o} data {}",
            h.ino,
            h.flags,
            h.data.is_some()
        ));
    }
    out.sort();
    out
}

/// A random workload on `fs` with request uniques; returns ops done.
fn churn(fs: &MemFs, seed: u64, ops: usize, mut after_each: impl FnMut(&MemFs, usize)) {
    let mut x = seed | 1;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut open: Vec<(u64, u64)> = Vec::new();
    for op in 0..ops {
        let unique = 101 + op as u64;
        let ctx = Context { unique, ..root() };
        let name = format!("n{}", rnd(12));
        let dir = if rnd(3) == 0 {
            fs.lookup(&ctx, ROOT, n("sub"))
                .map(|e| e.ino)
                .or_else(|_| fs.mkdir(&ctx, ROOT, n("sub"), 0o755, 0o022).map(|e| e.ino))
                .unwrap_or(ROOT)
        } else {
            ROOT
        };
        match rnd(12) {
            0 | 1 => {
                if let Ok((e, o)) = fs.create(
                    &ctx,
                    dir,
                    n(&name),
                    0o644,
                    0o022,
                    libc::O_CREAT as u32 | libc::O_RDWR as u32,
                ) {
                    open.push((e.ino, o.fh));
                }
            }
            2 | 3 => {
                if let Some(&(ino, fh)) = open.get(rnd(open.len().max(1) as u64) as usize) {
                    let data = vec![op as u8; rnd(5000) as usize];
                    let _ = fs.write(&ctx, ino, fh, rnd(3000), &data, 0, 0);
                }
            }
            4 => {
                if !open.is_empty() {
                    let (ino, fh) = open.swap_remove(rnd(open.len() as u64) as usize);
                    fs.release(&ctx, ino, fh, 0).unwrap();
                }
            }
            5 => {
                let _ = fs.unlink(&ctx, dir, n(&name));
            }
            6 => {
                let _ = fs.rename(&ctx, dir, n(&name), ROOT, n(&format!("n{}", rnd(12))), 0);
            }
            7 => {
                if let Ok(e) = fs.lookup(&ctx, dir, n(&name)) {
                    let _ = fs.link(&ctx, e.ino, ROOT, n(&format!("l{}", rnd(6))));
                    if rnd(2) == 0 {
                        fs.forget(e.ino, 1);
                    }
                }
            }
            8 => {
                if let Ok(e) = fs.lookup(&ctx, dir, n(&name)) {
                    let _ = fs.setxattr(&ctx, e.ino, n("user.x"), &[op as u8; 3], 0, 0);
                    let set = abi::SetattrIn {
                        valid: fattr::MODE | fattr::SIZE,
                        mode: 0o600,
                        size: rnd(100),
                        ..Default::default()
                    };
                    let _ = fs.setattr(&ctx, e.ino, &set);
                }
            }
            9 => {
                let _ = fs.symlink(&ctx, dir, n(&format!("s{}", rnd(4))), b"target");
                let _ = fs.rmdir(&ctx, ROOT, n("empty"));
                let _ = fs.mkdir(&ctx, ROOT, n("empty"), 0o700, 0o022);
            }
            10 => {
                if let Ok(o) = fs.opendir(&ctx, dir, 0) {
                    let mut out = Vec::new();
                    let mut sink = DirSink::new(&mut out, 4096, true);
                    let _ = fs.readdir(&ctx, dir, o.fh, 0, &mut sink);
                    fs.releasedir(&ctx, dir, o.fh).unwrap();
                }
            }
            _ => {
                if let Ok((e, o)) = fs.tmpfile(&ctx, dir, 0o600, 0o022, libc::O_RDWR as u32) {
                    let _ = fs.write(&ctx, e.ino, o.fh, 0, b"tmp", 0, 0);
                    open.push((e.ino, o.fh));
                }
            }
        }
        after_each(fs, op);
    }
}

#[test]
fn a_successor_rebuilds_exactly_the_file_system_from_the_journal() {
    for seed in [1, 7, 42, 1234] {
        let (a, keeper, fd) = journaled();
        churn(&a, seed, 600, |_, _| {});
        let want = everything(&a);
        // A killed appliance runs no destructor (it gives nothing back to the keeper).
        std::mem::forget(a);
        let b = recovered(&keeper, &fd).unwrap();
        assert_eq!(everything(&b), want, "seed {seed}: replay from the start");
        // Again with checkpoints taken on the way: the checkpoint plus the records after it.
        let (a, keeper, fd) = journaled();
        churn(&a, seed, 600, |fs, op| {
            if op % 150 == 75 {
                store_checkpoint(fs, &keeper);
            }
        });
        let want = everything(&a);
        std::mem::forget(a);
        let b = recovered(&keeper, &fd).unwrap();
        assert_eq!(everything(&b), want, "seed {seed}: checkpoint and replay");
        // The successor goes on journaling: a third generation sees its changes too.
        let ctx = Context {
            unique: 99_999,
            ..root()
        };
        b.mkdir(&ctx, ROOT, n("by-the-successor"), 0o755, 0o022)
            .unwrap();
        let want = everything(&b);
        std::mem::forget(b);
        let c = recovered(&keeper, &fd).unwrap();
        assert_eq!(everything(&c), want, "seed {seed}: a successor's successor");
    }
}

#[test]
fn resent_requests_that_took_effect_are_answered_from_the_journal() {
    let (a, keeper, fd) = journaled();
    let ctx = |u| Context {
        unique: u,
        ..root()
    };
    let d = a.mkdir(&ctx(10), ROOT, n("d"), 0o755, 0o022).unwrap();
    let (e, o) = a
        .create(
            &ctx(11),
            d.ino,
            n("f"),
            0o644,
            0o022,
            libc::O_CREAT as u32 | libc::O_RDWR as u32,
        )
        .unwrap();
    a.write(&ctx(12), e.ino, o.fh, 0, b"once", 0, 0).unwrap();
    a.rename(&ctx(13), d.ino, n("f"), ROOT, n("g"), 0).unwrap();
    a.lookup(&ctx(14), ROOT, n("g")).unwrap();
    let lookups = a
        .rlock()
        .inodes
        .get(e.ino)
        .unwrap()
        .lookups
        .load(Ordering::Relaxed);
    let b = recovered(&keeper, &fd).unwrap();
    // Each of them, resent, gets its first result; nothing runs again.
    assert!(matches!(b.completed(10), Some(Completed::Entry(x)) if x.ino == d.ino));
    assert!(
        matches!(b.completed(11), Some(Completed::Created(x, y)) if x.ino == e.ino && y.fh == o.fh)
    );
    assert!(matches!(b.completed(12), Some(Completed::Written(4))));
    assert!(matches!(b.completed(13), Some(Completed::Done)));
    // A resent LOOKUP gives back the count it took and runs again.
    assert!(b.completed(14).is_none());
    assert_eq!(
        b.rlock()
            .inodes
            .get(e.ino)
            .unwrap()
            .lookups
            .load(Ordering::Relaxed),
        lookups - 1
    );
    // Answered once: a second resend of the same request is executed as new.
    assert!(b.completed(13).is_none());
    assert!(b.completed(999).is_none(), "unknown requests run");
}

#[test]
fn a_journal_that_does_not_hold_together_is_refused() {
    let (a, keeper, fd) = journaled();
    let (_, fh) = create(
        &a,
        &Context {
            unique: 5,
            ..root()
        },
        ROOT,
        "f",
        0o644,
    );
    let _ = fh;
    // The memfd of a live file was not kept: refused, never a file with other contents.
    keeper.fds.lock().unwrap().clear();
    let e = recovered(&keeper, &fd)
        .err()
        .expect("a live file without its memfd");
    assert!(e.to_string().contains("were not kept"), "{e}");
    // Garbage in a record's payload (a record that checks out but decodes to nonsense).
    let fd2 = fsva_appliance::journal::create(1 << 20).unwrap();
    let j = Journal::open(fd2.try_clone().unwrap()).unwrap();
    j.append(&[fsva_appliance::journal::BACKEND, 0xff, 0xff, 0x01])
        .unwrap();
    let k2 = Arc::new(TestKeeper::default());
    assert!(recovered(&k2, &fd2).is_err());
    // A record naming a directory entry in an inode that is no directory.
    let fd3 = fsva_appliance::journal::create(1 << 20).unwrap();
    let j3 = Journal::open(fd3.try_clone().unwrap()).unwrap();
    let rec = journal::RecordV1 {
        dir_ops: vec![(7, vec![dir::DirOp::Insert(b"x".to_vec(), 1)])],
        ..Default::default()
    };
    j3.append(&journal::encode_for_tests(rec)).unwrap();
    let e = recovered(&k2, &fd3)
        .err()
        .expect("an entry in a missing directory");
    assert!(e.to_string().contains("no directory"), "{e}");
}

#[test]
fn a_preloaded_spare_brought_up_to_date_rebuilds_the_same_file_system() {
    let (a, keeper, fd) = journaled();
    let journal = a.journal.clone().unwrap();
    let checkpoint = |fs: &MemFs| {
        let (bytes, boundary) = fs.journal_checkpoint(&mut || journal.rotate()).unwrap();
        journal.covered(boundary);
        (bytes, boundary)
    };
    let kept_now = || -> HashMap<u64, OwnedFd> {
        keeper
            .fds
            .lock()
            .unwrap()
            .iter()
            .map(|(&id, f)| (id, f.try_clone().unwrap()))
            .collect()
    };
    churn(&a, 5, 300, |_, _| {});
    let ctx = Context {
        unique: 5000,
        ..root()
    };
    let (doomed, dfh) = create(&a, &ctx, ROOT, "doomed", 0o644);
    a.write(&ctx, doomed, dfh, 0, b"gone soon", 0, 0).unwrap();
    let (first, _) = checkpoint(&a);
    // A file of that checkpoint is removed (its memfd given back) before the spare
    // gets it: the journal's tail removes it, so the preload must not refuse it.
    a.release(&ctx, doomed, dfh, 0).unwrap();
    a.unlink(&ctx, ROOT, n("doomed")).unwrap();
    a.forget(doomed, 1);
    assert!(a.rlock().inodes.get(doomed).is_err(), "freed");
    let early: HashMap<u64, OwnedFd> = kept_now();
    let early_ids: std::collections::HashSet<u64> = early.keys().copied().collect();
    // The spare restores the first checkpoint while the appliance goes on.
    let mut spare = MemFs::preload(test_config(), Some(&first), early).unwrap();
    churn(&a, 6, 300, |_, _| {});
    let (second, boundary) = checkpoint(&a);
    churn(&a, 7, 200, |_, _| {});
    let want = everything(&a);
    std::mem::forget(a);
    // At the takeover: the memfds kept since, the newer checkpoint, the journal's tail.
    let late: HashMap<u64, OwnedFd> = kept_now()
        .into_iter()
        .filter(|(id, _)| !early_ids.contains(id))
        .collect();
    spare.add_fds(late);
    spare.reload(Some(&second)).unwrap();
    let journal = Arc::new(Journal::open(fd.try_clone().unwrap()).unwrap());
    let records = journal
        .recover(boundary)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.payload.split_first() {
            Some((&fsva_appliance::journal::BACKEND, rest)) => Some(rest.to_vec()),
            _ => None,
        })
        .collect();
    let b = MemFs::finish_recovery(spare, journal, keeper.clone(), records).unwrap();
    assert_eq!(everything(&b), want);
    // Memfds of files removed meanwhile were given back; live ones stay kept.
    let kept: std::collections::HashSet<u64> = keeper.fds.lock().unwrap().keys().copied().collect();
    let st = b.rlock();
    let (_, all) = st.inodes.parts();
    let live: std::collections::HashSet<u64> =
        all.filter_map(|(_, i)| i.data().map(|d| d.id())).collect();
    assert_eq!(kept, live);
}

// Found by review: each of these failed before its fix.

#[test]
fn requests_that_failed_are_not_answered_as_successes_after_a_crash() {
    let (a, keeper, fd) = journaled();
    let ctx = |u| Context {
        unique: u,
        ..root()
    };
    let (f, _) = create(&a, &ctx(10), ROOT, "f", 0o644);
    let (g, _) = create(&a, &ctx(11), ROOT, "g", 0o644);
    // LINK f -> "g" fails: the name exists.
    assert_eq!(err(a.link(&ctx(20), f, ROOT, n("g"))), libc::EEXIST);
    // SETXATTR with XATTR_REPLACE on a missing attribute fails.
    assert_eq!(
        err(a.setxattr(
            &ctx(21),
            f,
            n("user.x"),
            b"v",
            libc::XATTR_REPLACE as u32,
            0
        )),
        libc::ENODATA
    );
    // REMOVEXATTR of a missing attribute fails.
    assert_eq!(err(a.removexattr(&ctx(22), f, n("user.y"))), libc::ENODATA);
    std::mem::forget(a);
    let b = recovered(&keeper, &fd).unwrap();
    let link = b.completed(20);
    let set = b.completed(21);
    let rm = b.completed(22);
    eprintln!("resent LINK -> {link:?}\nresent SETXATTR -> {set:?}\nresent REMOVEXATTR -> {rm:?}");
    let _ = g;
    assert!(
        link.is_none(),
        "a LINK that failed with EEXIST is answered {link:?}"
    );
    assert!(
        set.is_none(),
        "a SETXATTR that failed with ENODATA is answered {set:?}"
    );
    assert!(rm.is_none(), "a REMOVEXATTR that failed is answered {rm:?}");
}

#[test]
fn attributes_fill_up_with_enospc_and_every_acknowledged_change_survives_a_crash() {
    let fd = fsva_appliance::journal::create(64 << 20).unwrap();
    let journal = Arc::new(Journal::open(fd.try_clone().unwrap()).unwrap());
    let keeper = Arc::new(TestKeeper::default());
    let a = MemFs::journaled(test_config(), journal.clone(), keeper.clone());
    let ctx = |u| Context {
        unique: u,
        ..root()
    };
    let (f, _) = create(&a, &ctx(10), ROOT, "f", 0o644);
    let v = vec![7u8; 65536];
    let mut set = 0;
    for i in 0..70u64 {
        match a.setxattr(&ctx(100 + i), f, n(&format!("user.a{i}")), &v, 0, 0) {
            Ok(()) => set += 1,
            Err(e) => {
                assert_eq!(e.0, libc::ENOSPC);
                break;
            }
        }
    }
    assert!((15..70).contains(&set), "{set} attributes of 64 KiB fit");
    // Room again once one goes.
    a.removexattr(&ctx(400), f, n("user.a0")).unwrap();
    a.setxattr(&ctx(500), f, n("user.last"), b"acknowledged", 0, 0)
        .unwrap();
    let want = everything(&a);
    std::mem::forget(a);
    let b = recovered(&keeper, &fd).unwrap();
    assert!(
        everything(&b) == want,
        "the successor's attributes differ from the acknowledged ones"
    );
}

#[test]
fn a_resent_lookups_count_is_given_back_once_across_two_crashes() {
    let (a, keeper, fd) = journaled();
    let ctx = |u| Context {
        unique: u,
        ..root()
    };
    let d = a.mkdir(&ctx(10), ROOT, n("d"), 0o755, 0o022).unwrap(); // kernel: 1 lookup
    a.lookup(&ctx(14), ROOT, n("d")).unwrap(); // counted; reply lost in the crash
    std::mem::forget(a);
    let b = recovered(&keeper, &fd).unwrap();
    assert!(b.completed(14).is_none()); // undo: back to 1
                                        // b dies before running the LOOKUP again.
    std::mem::forget(b);
    let c = recovered(&keeper, &fd).unwrap();
    assert!(c.completed(14).is_none()); // undone a second time
    let now = c
        .rlock()
        .inodes
        .get(d.ino)
        .unwrap()
        .lookups
        .load(Ordering::Relaxed);
    assert_eq!(
        now, 1,
        "the kernel still holds 1 lookup of d from MKDIR; mem counts {now}"
    );
}

#[test]
fn a_spare_closes_the_memfds_of_files_a_newer_checkpoint_no_longer_has() {
    use std::os::fd::AsRawFd;
    let (a, keeper, _fd) = journaled();
    let journal = a.journal.clone().unwrap();
    let ctx = |u| Context {
        unique: u,
        ..root()
    };
    let (f, fh) = create(&a, &ctx(10), ROOT, "big", 0o644);
    a.write(&ctx(11), f, fh, 0, &vec![1u8; 1 << 20], 0, 0)
        .unwrap();
    let st_ino = {
        let st = a.rlock();
        let d = st.inodes.get(f).unwrap().data().unwrap().clone();
        let mut s: libc::stat = unsafe { std::mem::zeroed() };
        unsafe { libc::fstat(d.fd().as_raw_fd(), &mut s) };
        s.st_ino
    };
    let (first, _) = a.journal_checkpoint(&mut || journal.rotate()).unwrap();
    let kept: HashMap<u64, OwnedFd> = keeper
        .fds
        .lock()
        .unwrap()
        .iter()
        .map(|(&id, f)| (id, f.try_clone().unwrap()))
        .collect();
    let mut spare = MemFs::preload(test_config(), Some(&first), kept).unwrap();
    // The file goes away; the appliance and the supervisor let go of its memfd.
    a.release(&ctx(12), f, fh, 0).unwrap();
    a.unlink(&ctx(13), ROOT, n("big")).unwrap();
    a.forget(f, 1);
    assert!(keeper.fds.lock().unwrap().is_empty());
    let (second, _) = a.journal_checkpoint(&mut || journal.rotate()).unwrap();
    spare.reload(Some(&second)).unwrap();
    let open_here = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .any(|e| {
            std::fs::metadata(e.path())
                .is_ok_and(|m| std::os::linux::fs::MetadataExt::st_ino(&m) == st_ino)
        });
    assert!(!open_here, "the spare still holds the removed file's 1 MiB memfd after preloading a checkpoint without it");
    drop(spare);
}

#[test]
fn a_hostile_journal_with_a_directory_cycle_is_refused() {
    let (a, keeper, fd) = journaled();
    let ctx = |u| Context {
        unique: u,
        ..root()
    };
    let x = a.mkdir(&ctx(1), ROOT, n("x"), 0o755, 0o022).unwrap().ino;
    let y = a.mkdir(&ctx(2), x, n("y"), 0o755, 0o022).unwrap().ino;
    let z = a.mkdir(&ctx(3), ROOT, n("z"), 0o755, 0o022).unwrap().ino;
    // The compromised appliance appends one record: x's parent is y (y's is x).
    let forged = {
        let mut st = a.wlock();
        let m = journal::forge_parent(x, st.inodes.get_untracked(x).unwrap(), y);
        journal::RecordV1 {
            inodes: vec![m],
            ..Default::default()
        }
    };
    a.journal
        .as_ref()
        .unwrap()
        .append(&journal::encode_for_tests(forged))
        .unwrap();
    std::mem::forget(a);
    let e = recovered(&keeper, &fd)
        .err()
        .expect("a successor accepted directories that lead nowhere");
    assert!(
        e.to_string().contains("does not lead up to the root"),
        "{e}"
    );
    let _ = z;
}

#[test]
fn a_checkpoint_soon_after_a_recovery_keeps_the_answers_for_resends() {
    let (a, keeper, fd) = journaled();
    let ctx = |u| Context {
        unique: u,
        ..root()
    };
    a.mkdir(&ctx(10), ROOT, n("d"), 0o755, 0o022).unwrap(); // reply lost in the crash
    std::mem::forget(a);
    let b = recovered(&keeper, &fd).unwrap();
    // b's checkpointer runs before the kernel's resend of request 10 reaches a worker.
    store_checkpoint(&b, &keeper);
    std::mem::forget(b); // b dies too
    let c = recovered(&keeper, &fd).unwrap();
    let answer = c.completed(10);
    let again = c.mkdir(
        &Context {
            unique: 10 | abi::UNIQUE_RESEND,
            ..root()
        },
        ROOT,
        n("d"),
        0o755,
        0o022,
    );
    assert!(
        answer.is_some(),
        "MKDIR 10 took effect, yet its resend runs again: {:?}",
        again.map(|e| e.ino)
    );
}

#[test]
fn records_name_the_memfds_whose_contents_changed() {
    let fd = fsva_appliance::journal::create(1 << 20).unwrap();
    let journal = Arc::new(Journal::open(fd.try_clone().unwrap()).unwrap());
    let fs = MemFs::journaled(
        MemConfig {
            capacity_bytes: 64 << 20,
            root_mode: 0o777,
            ..Default::default()
        },
        journal.clone(),
        Arc::new(TestKeeper::default()),
    );
    let (a, fa) = create(&fs, &root(), ROOT, "a", 0o644);
    let (b, fb) = create(&fs, &root(), ROOT, "b", 0o644);
    let id_of = |ino: u64| {
        fs.rlock()
            .inodes
            .get(ino)
            .unwrap()
            .data()
            .expect("a file with data")
            .id()
    };
    fs.write(&root(), a, fa, 0, b"x", 0, libc::O_RDWR as u32)
        .unwrap();
    let (id_a, id_b) = (id_of(a), id_of(b));
    assert_ne!(id_a, id_b);
    let from = journal.rotate();
    // After this point: b is written, then a is truncated; a lookup names no file.
    fs.write(&root(), b, fb, 0, b"yy", 0, libc::O_RDWR as u32)
        .unwrap();
    let set = abi::SetattrIn {
        valid: fattr::SIZE,
        size: 0,
        ..Default::default()
    };
    fs.setattr(&root(), a, &set).unwrap();
    fs.lookup(&root(), ROOT, n("a")).unwrap();
    let mut named = Vec::new();
    for r in journal.read_after(from).unwrap() {
        let (&tag, payload) = r.payload.split_first().unwrap();
        assert_eq!(tag, fsva_appliance::journal::BACKEND);
        named.extend(memfd_ids(payload).unwrap());
    }
    named.sort_unstable();
    named.dedup();
    let mut want = vec![id_a, id_b];
    want.sort_unstable();
    assert_eq!(named, want);
    assert!(memfd_ids(b"\xff\xff garbage").is_err());
}
