//! Hard links, symlinks and unlink: link counts, ctime changes, readlink, symlink loops
//! (ELOOP), O_NOFOLLOW, dangling links, long targets and the usual error cases.

use crate::check::{check, Check, Ctx};
use crate::sys::{self, show};

pub const CHECKS: &[Check] = &[
    check("links.hardlink_nlink", hardlink_nlink),
    check("links.link_errors", link_errors),
    check("links.unlink_errors", unlink_errors),
    check("links.symlink_readlink", symlink_readlink),
    check("links.symlink_errors", symlink_errors),
    check("links.symlink_loop", symlink_loop),
    check("links.nofollow", nofollow),
    check("links.dangling", dangling),
    check("links.long_target", long_target),
    check("links.dir_symlink_traversal", dir_symlink_traversal),
];

fn nlink(p: impl AsRef<std::path::Path>) -> i64 {
    sys::stat(p).map_or(-1, |s| s.st_nlink as i64)
}

fn hardlink_nlink(c: &Ctx) -> String {
    let (a, b) = (c.p("a"), c.p("b"));
    let _ = sys::write_file(&a, b"content");
    let st0 = sys::stat(&a).expect("stat");
    sys::tick();
    let l = sys::link(&a, &b);
    let st1 = sys::stat(&a).expect("stat");
    let stb = sys::stat(&b).expect("stat");
    sys::tick();
    let _ = sys::link(&a, c.p("c"));
    let after_second = nlink(&a);
    sys::tick();
    let u = sys::unlink(&b);
    let st2 = sys::stat(&a).expect("stat");
    let _ = sys::unlink(c.p("c"));
    format!(
        "link={} nlink={} same_inode={} b_content={} link_ctime_changed={} link_mtime_changed={} after_second={} unlink={} nlink_after_unlink={} unlink_ctime_changed={} final={}",
        show(&l),
        st1.st_nlink,
        st1.st_ino == stb.st_ino,
        String::from_utf8_lossy(&sys::read_file(&b).unwrap_or_default()),
        sys::ctime(&st1) != sys::ctime(&st0),
        sys::mtime(&st1) != sys::mtime(&st0),
        after_second,
        show(&u),
        st2.st_nlink,
        sys::ctime(&st2) != sys::ctime(&st1),
        nlink(&a)
    )
}

fn link_errors(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("f"), b"");
    let _ = sys::write_file(c.p("g"), b"");
    let _ = sys::mkdir(c.p("d"), 0o755);
    let _ = sys::symlink("f", c.p("s"));
    let link_to_symlink = sys::link(c.p("s"), c.p("s2"));
    format!(
        "target_exists={} dir={} missing={} into_missing_dir={} through_file={} to_symlink={} s2_type={}",
        show(&sys::link(c.p("f"), c.p("g"))),
        show(&sys::link(c.p("d"), c.p("d2"))),
        show(&sys::link(c.p("nope"), c.p("x"))),
        show(&sys::link(c.p("f"), c.p("nodir/x"))),
        show(&sys::link(c.p("f/x"), c.p("y"))),
        show(&link_to_symlink),
        sys::lstat(c.p("s2")).map_or("none", |s| sys::ftype(s.st_mode)),
    )
}

fn unlink_errors(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("f"), b"");
    let _ = sys::mkdir(c.p("d"), 0o755);
    let _ = sys::symlink("d", c.p("l"));
    format!(
        "missing={} through_file={} dir={} trailing_slash_file={} symlink_to_dir={} target_kept={}",
        show(&sys::unlink(c.p("missing"))),
        show(&sys::unlink(c.p("f/x"))),
        show(&sys::unlink(c.p("d"))),
        show(&sys::unlink(c.p("f/"))),
        show(&sys::unlink(c.p("l"))),
        sys::stat(c.p("d")).is_ok()
    )
}

fn symlink_readlink(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("target"), b"12345");
    let s = sys::symlink("target", c.p("l"));
    let lst = sys::lstat(c.p("l"));
    let st = sys::stat(c.p("l"));
    let short = sys::readlink_buf(c.p("l"), 3);
    let rel = sys::symlink("../weird//path/./x", c.p("w"));
    format!(
        "symlink={} readlink={} lstat_type={} lstat_size={} lstat_perm={} stat_type={} stat_size={} short_buffer={} odd_target={} readback={}",
        show(&s),
        sys::readlink(c.p("l")).unwrap_or_else(|e| format!("err={e}")),
        lst.as_ref().map_or("?", |s| sys::ftype(s.st_mode)),
        lst.as_ref().map_or(-1, |s| s.st_size),
        lst.as_ref().map_or("?".into(), sys::perm),
        st.as_ref().map_or("?", |s| sys::ftype(s.st_mode)),
        st.as_ref().map_or(-1, |s| s.st_size),
        short.map_or_else(|e| format!("err={e}"), |b| String::from_utf8_lossy(&b).into_owned()),
        show(&rel),
        sys::readlink(c.p("w")).unwrap_or_else(|e| format!("err={e}")),
    )
}

fn symlink_errors(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("f"), b"");
    let _ = sys::symlink("f", c.p("l"));
    format!(
        "over_file={} over_symlink={} missing_dir={} empty_target={} readlink_regular={} readlink_missing={} readlink_dir={}",
        show(&sys::symlink("x", c.p("f"))),
        show(&sys::symlink("x", c.p("l"))),
        show(&sys::symlink("x", c.p("nodir/l"))),
        show(&sys::symlink("", c.p("e"))),
        show(&sys::readlink(c.p("f"))),
        show(&sys::readlink(c.p("missing"))),
        show(&sys::readlink(&c.dir)),
    )
}

fn symlink_loop(c: &Ctx) -> String {
    let _ = sys::symlink("b", c.p("a"));
    let _ = sys::symlink("a", c.p("b"));
    let _ = sys::symlink("self", c.p("self"));
    format!(
        "open={} stat={} lstat={} self_open={} through_loop={} creat={}",
        show(&sys::open(c.p("a"), libc::O_RDONLY, 0)),
        show(&sys::stat(c.p("a"))),
        show(&sys::lstat(c.p("a"))),
        show(&sys::open(c.p("self"), libc::O_RDONLY, 0)),
        show(&sys::stat(c.p("a/x"))),
        show(&sys::open(c.p("a"), libc::O_CREAT | libc::O_WRONLY, 0o644)),
    )
}

fn nofollow(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("f"), b"x");
    let _ = sys::symlink("f", c.p("l"));
    let _ = sys::mkdir(c.p("d"), 0o755);
    let _ = sys::symlink("d", c.p("ld"));
    let path_fd = sys::open(c.p("l"), libc::O_PATH | libc::O_NOFOLLOW, 0);
    let path_type = path_fd
        .as_ref()
        .ok()
        .and_then(|fd| sys::fstat(fd).ok())
        .map_or("?", |s| sys::ftype(s.st_mode));
    format!(
        "open_symlink={} open_file={} path_fd={} path_fd_type={} directory_nofollow={} nofollow_in_middle={}",
        show(&sys::open(c.p("l"), libc::O_RDONLY | libc::O_NOFOLLOW, 0)),
        show(&sys::open(c.p("f"), libc::O_RDONLY | libc::O_NOFOLLOW, 0)),
        show(&path_fd),
        path_type,
        show(&sys::open(c.p("ld"), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)),
        show(&sys::stat(c.p("ld/."))),
    )
}

fn dangling(c: &Ctx) -> String {
    let _ = sys::symlink("nowhere", c.p("l"));
    format!(
        "stat={} lstat={} open={} readlink={} unlink={}",
        show(&sys::stat(c.p("l"))),
        show(&sys::lstat(c.p("l"))),
        show(&sys::open(c.p("l"), libc::O_RDONLY, 0)),
        sys::readlink(c.p("l")).unwrap_or_else(|e| format!("err={e}")),
        show(&sys::unlink(c.p("l"))),
    )
}

fn long_target(c: &Ctx) -> String {
    let t4095 = "x/".repeat(2047) + "y";
    let t4096 = "z".repeat(4096);
    let ok = sys::symlink(&t4095, c.p("long"));
    let back = sys::readlink(c.p("long")).map(|s| s == t4095);
    format!(
        "len4095={} readback_equal={:?} len4096={}",
        show(&ok),
        back.unwrap_or(false),
        show(&sys::symlink(&t4096, c.p("toolong"))),
    )
}

fn dir_symlink_traversal(c: &Ctx) -> String {
    let _ = sys::mkdir(c.p("d"), 0o755);
    let _ = sys::symlink("d", c.p("l"));
    let _ = sys::symlink("../d/f", c.p("d/up"));
    let w = sys::write_file(c.p("l/f"), b"via link");
    format!(
        "create_through={} real_content={} relative_up_link={}",
        show(&w),
        String::from_utf8_lossy(&sys::read_file(c.p("d/f")).unwrap_or_default()),
        String::from_utf8_lossy(&sys::read_file(c.p("l/up")).unwrap_or_default()),
    )
}
