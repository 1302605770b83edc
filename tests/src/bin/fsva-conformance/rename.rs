//! rename(2) and renameat2(2): replacing files and directories, type mismatches
//! (EISDIR/ENOTDIR), ENOTEMPTY, EINVAL for moving a directory into itself,
//! RENAME_NOREPLACE, RENAME_EXCHANGE, link counts and ctime after a rename.

use crate::check::{check, Check, Ctx};
use crate::sys::{self, show};

pub const CHECKS: &[Check] = &[
    check("rename.file_over_file", file_over_file),
    check("rename.type_mismatch", type_mismatch),
    check("rename.dir_over_dir", dir_over_dir),
    check("rename.into_own_subdir", into_own_subdir),
    check("rename.same_inode", same_inode),
    check("rename.missing", missing),
    check("rename.dir_between_parents", dir_between_parents),
    check("rename.times", times),
    check("rename.noreplace", noreplace),
    check("rename.exchange_files", exchange_files),
    check("rename.exchange_file_dir", exchange_file_dir),
    check("rename.exchange_errors", exchange_errors),
];

fn content(p: impl AsRef<std::path::Path>) -> String {
    sys::read_file(p).map_or_else(
        |e| format!("<{e}>"),
        |b| String::from_utf8_lossy(&b).into_owned(),
    )
}

fn file_over_file(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("a"), b"AAA");
    let _ = sys::write_file(c.p("b"), b"BB");
    let _ = sys::link(c.p("b"), c.p("b2"));
    let r = sys::rename(c.p("a"), c.p("b"));
    format!(
        "rename={} b={} a_exists={} old_b_nlink={} new_b_nlink={}",
        show(&r),
        content(c.p("b")),
        sys::lstat(c.p("a")).is_ok(),
        sys::stat(c.p("b2")).map_or(-1, |s| s.st_nlink as i64),
        sys::stat(c.p("b")).map_or(-1, |s| s.st_nlink as i64),
    )
}

fn type_mismatch(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("f"), b"");
    let _ = sys::mkdir(c.p("d"), 0o755);
    let _ = sys::mkdir(c.p("full"), 0o755);
    let _ = sys::write_file(c.p("full/x"), b"");
    format!(
        "file_over_empty_dir={} file_over_full_dir={} dir_over_file={} file_trailing_slash={} through_file={}",
        show(&sys::rename(c.p("f"), c.p("d"))),
        show(&sys::rename(c.p("f"), c.p("full"))),
        show(&sys::rename(c.p("d"), c.p("f"))),
        show(&sys::rename(c.p("f/"), c.p("g"))),
        show(&sys::rename(c.p("f/x"), c.p("g"))),
    )
}

fn dir_over_dir(c: &Ctx) -> String {
    for d in ["src", "empty", "full"] {
        let _ = sys::mkdir(c.p(d), 0o755);
    }
    let _ = sys::write_file(c.p("src/inner"), b"in");
    let _ = sys::write_file(c.p("full/x"), b"");
    let full = sys::rename(c.p("src"), c.p("full"));
    let empty = sys::rename(c.p("src"), c.p("empty"));
    format!(
        "over_nonempty={} over_empty={} moved_content={} src_exists={} parent_nlink={}",
        show(&full),
        show(&empty),
        content(c.p("empty/inner")),
        sys::lstat(c.p("src")).is_ok(),
        sys::stat(&c.dir).map_or(-1, |s| s.st_nlink as i64),
    )
}

fn into_own_subdir(c: &Ctx) -> String {
    let _ = sys::mkdir(c.p("a"), 0o755);
    let _ = sys::mkdir(c.p("a/b"), 0o755);
    format!(
        "into_child={} onto_itself={} dot={} dotdot={} onto_parent={}",
        show(&sys::rename(c.p("a"), c.p("a/b/c"))),
        show(&sys::rename(c.p("a"), c.p("a"))),
        show(&sys::rename(c.p("a/."), c.p("x"))),
        show(&sys::rename(c.p("a/b/.."), c.p("y"))),
        show(&sys::rename(c.p("a/b"), c.p("a"))),
    )
}

fn same_inode(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("a"), b"x");
    let _ = sys::link(c.p("a"), c.p("b"));
    let r = sys::rename(c.p("a"), c.p("b"));
    format!(
        "rename={} a_exists={} b_exists={} nlink={}",
        show(&r),
        sys::lstat(c.p("a")).is_ok(),
        sys::lstat(c.p("b")).is_ok(),
        sys::stat(c.p("b")).map_or(-1, |s| s.st_nlink as i64)
    )
}

fn missing(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("f"), b"");
    format!(
        "missing_source={} missing_target_dir={} target_under_file={}",
        show(&sys::rename(c.p("nope"), c.p("x"))),
        show(&sys::rename(c.p("f"), c.p("nodir/x"))),
        show(&sys::rename(c.p("f"), c.p("f/x"))),
    )
}

fn dir_between_parents(c: &Ctx) -> String {
    let nl = |p: &str| sys::stat(c.p(p)).map_or(-1, |s| s.st_nlink as i64);
    let _ = sys::mkdir(c.p("p1"), 0o755);
    let _ = sys::mkdir(c.p("p2"), 0o755);
    let _ = sys::mkdir(c.p("p1/child"), 0o755);
    let before = (nl("p1"), nl("p2"));
    let r = sys::rename(c.p("p1/child"), c.p("p2/child"));
    let dotdot_is_p2 = sys::stat(c.p("p2/child/.."))
        .ok()
        .zip(sys::stat(c.p("p2")).ok())
        .is_some_and(|(a, b)| a.st_ino == b.st_ino);
    format!(
        "before={}/{} rename={} after={}/{} dotdot_is_new_parent={}",
        before.0,
        before.1,
        show(&r),
        nl("p1"),
        nl("p2"),
        dotdot_is_p2
    )
}

fn times(c: &Ctx) -> String {
    let _ = sys::mkdir(c.p("d1"), 0o755);
    let _ = sys::mkdir(c.p("d2"), 0o755);
    let _ = sys::write_file(c.p("d1/f"), b"x");
    let f0 = sys::stat(c.p("d1/f")).expect("stat");
    let d10 = sys::stat(c.p("d1")).expect("stat");
    let d20 = sys::stat(c.p("d2")).expect("stat");
    sys::tick();
    let r = sys::rename(c.p("d1/f"), c.p("d2/f"));
    let f1 = sys::stat(c.p("d2/f")).expect("stat");
    let d11 = sys::stat(c.p("d1")).expect("stat");
    let d21 = sys::stat(c.p("d2")).expect("stat");
    format!(
        "rename={} file_ctime_changed={} file_mtime_changed={} old_parent_mtime_changed={} new_parent_mtime_changed={} new_parent_ctime_changed={}",
        show(&r),
        sys::ctime(&f1) != sys::ctime(&f0),
        sys::mtime(&f1) != sys::mtime(&f0),
        sys::mtime(&d11) != sys::mtime(&d10),
        sys::mtime(&d21) != sys::mtime(&d20),
        sys::ctime(&d21) != sys::ctime(&d20),
    )
}

fn noreplace(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("a"), b"A");
    let _ = sys::write_file(c.p("b"), b"B");
    let _ = sys::mkdir(c.p("d"), 0o755);
    let existing = sys::renameat2(c.p("a"), c.p("b"), libc::RENAME_NOREPLACE);
    let over_dir = sys::renameat2(c.p("a"), c.p("d"), libc::RENAME_NOREPLACE);
    let fresh = sys::renameat2(c.p("a"), c.p("c"), libc::RENAME_NOREPLACE);
    format!(
        "existing={} b={} over_dir={} new_name={} c={} a_exists={}",
        show(&existing),
        content(c.p("b")),
        show(&over_dir),
        show(&fresh),
        content(c.p("c")),
        sys::lstat(c.p("a")).is_ok()
    )
}

fn exchange_files(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("a"), b"AAA");
    let _ = sys::write_file(c.p("b"), b"B");
    let a0 = sys::stat(c.p("a")).expect("stat");
    let r = sys::renameat2(c.p("a"), c.p("b"), libc::RENAME_EXCHANGE);
    let b1 = sys::stat(c.p("b")).expect("stat");
    format!(
        "exchange={} a={} b={} inode_moved={} b_size={}",
        show(&r),
        content(c.p("a")),
        content(c.p("b")),
        a0.st_ino == b1.st_ino,
        b1.st_size
    )
}

fn exchange_file_dir(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("f"), b"file");
    let _ = sys::mkdir(c.p("d"), 0o755);
    let _ = sys::write_file(c.p("d/inner"), b"in");
    let r = sys::renameat2(c.p("f"), c.p("d"), libc::RENAME_EXCHANGE);
    format!(
        "exchange={} f_type={} d_type={} f_inner={} d_content={}",
        show(&r),
        sys::lstat(c.p("f")).map_or("none", |s| sys::ftype(s.st_mode)),
        sys::lstat(c.p("d")).map_or("none", |s| sys::ftype(s.st_mode)),
        content(c.p("f/inner")),
        content(c.p("d")),
    )
}

fn exchange_errors(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("a"), b"A");
    let _ = sys::mkdir(c.p("d"), 0o755);
    let _ = sys::mkdir(c.p("d/sub"), 0o755);
    format!(
        "missing_target={} missing_source={} with_noreplace={} into_own_subdir={}",
        show(&sys::renameat2(
            c.p("a"),
            c.p("nope"),
            libc::RENAME_EXCHANGE
        )),
        show(&sys::renameat2(
            c.p("nope"),
            c.p("a"),
            libc::RENAME_EXCHANGE
        )),
        show(&sys::renameat2(
            c.p("a"),
            c.p("d"),
            libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE
        )),
        show(&sys::renameat2(
            c.p("d"),
            c.p("d/sub"),
            libc::RENAME_EXCHANGE
        )),
    )
}
