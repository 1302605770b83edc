//! Special nodes and file-system-wide facts: mknod of FIFOs (and, as root, character
//! devices; unprivileged: EPERM), FIFO round trip, and the statfs/statvfs fields that are
//! stable across file systems.

use crate::check::{check, Check, Ctx};
use crate::sys::{self, show};

pub const CHECKS: &[Check] = &[
    check("nodes.mknod_fifo", mknod_fifo),
    check("nodes.fifo_io", fifo_io),
    check("nodes.mknod_chr", mknod_chr),
    check("nodes.mknod_errors", mknod_errors),
    check("nodes.statfs", statfs),
];

fn mknod_fifo(c: &Ctx) -> String {
    let r = sys::mknod(c.p("p"), libc::S_IFIFO | 0o640, 0);
    let st = sys::lstat(c.p("p"));
    let mk = sys::mkfifo(c.p("q"), 0o600);
    format!(
        "mknod={} type={} mode={} size={} mkfifo={} type={}",
        show(&r),
        st.as_ref().map_or("?", |s| sys::ftype(s.st_mode)),
        st.as_ref().map_or("?".into(), sys::perm),
        st.as_ref().map_or(-1, |s| s.st_size),
        show(&mk),
        sys::lstat(c.p("q")).map_or("?", |s| sys::ftype(s.st_mode)),
    )
}

fn fifo_io(c: &Ctx) -> String {
    let p = c.p("p");
    let _ = sys::mknod(&p, libc::S_IFIFO | 0o600, 0);
    let r = sys::open(&p, libc::O_RDONLY | libc::O_NONBLOCK, 0);
    let w = sys::open(&p, libc::O_WRONLY | libc::O_NONBLOCK, 0);
    let wrote = w
        .as_ref()
        .map_err(|e| *e)
        .and_then(|w| sys::write(w, b"through fifo"));
    let got = r.as_ref().map_err(|e| *e).and_then(|r| sys::read(r, 100));
    let size = sys::stat(&p).map_or(-1, |s| s.st_size);
    drop(r);
    let w_no_reader = sys::open(&p, libc::O_WRONLY | libc::O_NONBLOCK, 0);
    format!(
        "open_reader={} open_writer={} write={} read={} size={} writer_without_reader={}",
        show(&sys::open(&p, libc::O_RDONLY | libc::O_NONBLOCK, 0)),
        show(&w),
        show(&wrote),
        got.map_or_else(
            |e| format!("err={e}"),
            |b| String::from_utf8_lossy(&b).into_owned()
        ),
        size,
        show(&w_no_reader),
    )
}

fn mknod_chr(c: &Ctx) -> String {
    let dev = libc::makedev(1, 3);
    let r = sys::mknod(c.p("null"), libc::S_IFCHR | 0o666, dev);
    let st = sys::lstat(c.p("null"));
    let b = sys::mknod(c.p("blk"), libc::S_IFBLK | 0o600, libc::makedev(7, 0));
    let sb = sys::lstat(c.p("blk"));
    let rdev = |s: &libc::stat| format!("{}:{}", libc::major(s.st_rdev), libc::minor(s.st_rdev));
    format!(
        "chr={} type={} rdev={} blk={} type={} rdev={}",
        show(&r),
        st.as_ref().map_or("-", |s| sys::ftype(s.st_mode)),
        st.as_ref().map_or("-".into(), rdev),
        show(&b),
        sb.as_ref().map_or("-", |s| sys::ftype(s.st_mode)),
        sb.as_ref().map_or("-".into(), rdev),
    )
}

fn mknod_errors(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("f"), b"");
    format!(
        "existing={} missing_dir={} regular_via_mknod={} type={} bad_type={}",
        show(&sys::mknod(c.p("f"), libc::S_IFIFO | 0o644, 0)),
        show(&sys::mknod(c.p("nodir/p"), libc::S_IFIFO | 0o644, 0)),
        show(&sys::mknod(c.p("r"), libc::S_IFREG | 0o644, 0)),
        sys::lstat(c.p("r")).map_or("-", |s| sys::ftype(s.st_mode)),
        show(&sys::mknod(c.p("x"), libc::S_IFDIR | 0o755, 0)),
    )
}

fn statfs(c: &Ctx) -> String {
    let s = match sys::statfs(&c.dir) {
        Ok(s) => s,
        Err(e) => return format!("statfs err={e}"),
    };
    let v = sys::statvfs(&c.dir);
    let _ = sys::write_file(c.p("f"), b"");
    let via_file = sys::statfs(c.p("f"));
    format!(
        "namelen={} bsize_positive={} blocks_positive={} bfree_le_blocks={} bavail_le_bfree={} ffree_le_files={} statvfs={} namemax={} rdonly={} via_file={} missing={}",
        s.f_namelen,
        s.f_bsize > 0,
        s.f_blocks > 0,
        s.f_bfree <= s.f_blocks,
        s.f_bavail <= s.f_bfree,
        s.f_ffree <= s.f_files,
        show(&v),
        v.as_ref().map_or(0, |v| v.f_namemax),
        v.as_ref().is_ok_and(|v| v.f_flag & libc::ST_RDONLY != 0),
        show(&via_file),
        show(&sys::statfs(c.p("missing"))),
    )
}
