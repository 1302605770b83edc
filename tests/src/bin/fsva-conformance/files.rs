//! Regular files: open/create flags (O_CREAT|O_EXCL, O_TRUNC, O_APPEND, O_TMPFILE,
//! O_DIRECTORY), open errors, read/write basics, open-but-unlinked files, name length
//! limits, flush on close, fsync/fdatasync.

use libc::{O_APPEND, O_CREAT, O_DIRECTORY, O_EXCL, O_RDONLY, O_RDWR, O_TRUNC, O_WRONLY};

use crate::check::{check, Check, Ctx};
use crate::sys::{self, show};

pub const CHECKS: &[Check] = &[
    check("files.create_excl", create_excl),
    check("files.excl_dangling_symlink", excl_dangling_symlink),
    check("files.open_errors", open_errors),
    check("files.o_trunc", o_trunc),
    check("files.o_append", o_append),
    check("files.read_write", read_write),
    check("files.bad_fd_mode", bad_fd_mode),
    check("files.unlinked_open", unlinked_open),
    check("files.renamed_over_open", renamed_over_open),
    check("files.tmpfile", tmpfile),
    check("files.tmpfile_excl", tmpfile_excl),
    check("files.name_max", name_max),
    check("files.flush_on_close", flush_on_close),
    check("files.fsync", fsync),
];

fn create_excl(c: &Ctx) -> String {
    let p = c.p("f");
    let first = sys::open(&p, O_CREAT | O_EXCL | O_WRONLY, 0o640);
    let st = sys::stat(&p);
    let again = sys::open(&p, O_CREAT | O_EXCL | O_WRONLY, 0o640);
    let plain = sys::open(&p, O_CREAT | O_WRONLY, 0o600);
    let st2 = sys::stat(&p);
    format!(
        "create={} mode={} size={} excl_again={} creat_existing={} mode_unchanged={}",
        show(&first),
        st.as_ref().map_or("?".into(), sys::perm),
        st.as_ref().map_or(-1, |s| s.st_size),
        show(&again),
        show(&plain),
        st.ok()
            .zip(st2.ok())
            .is_some_and(|(a, b)| a.st_mode == b.st_mode)
    )
}

fn excl_dangling_symlink(c: &Ctx) -> String {
    let _ = sys::symlink("target", c.p("link"));
    let excl = sys::open(c.p("link"), O_CREAT | O_EXCL | O_WRONLY, 0o644);
    let target_after_excl = sys::lstat(c.p("target")).is_ok();
    let creat = sys::open(c.p("link"), O_CREAT | O_WRONLY, 0o644);
    let target_after_creat = sys::lstat(c.p("target")).is_ok();
    format!(
        "excl={} target_created={} creat_through_link={} target_created={}",
        show(&excl),
        target_after_excl,
        show(&creat),
        target_after_creat
    )
}

fn open_errors(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("file"), b"x");
    let _ = sys::mkdir(c.p("dir"), 0o755);
    let cases: [(&str, &str, i32); 8] = [
        ("missing", "missing", O_RDONLY),
        ("missing_creat_no_parent", "nodir/f", O_CREAT | O_WRONLY),
        ("through_file", "file/x", O_RDONLY),
        ("dir_wronly", "dir", O_WRONLY),
        ("dir_rdwr", "dir", O_RDWR),
        ("directory_flag_on_file", "file", O_RDONLY | O_DIRECTORY),
        ("creat_trailing_slash", "new/", O_CREAT | O_WRONLY),
        ("dir_rdonly", "dir", O_RDONLY),
    ];
    cases
        .iter()
        .map(|(label, rel, flags)| format!("{label}={}", show(&sys::open(c.p(rel), *flags, 0o644))))
        .collect::<Vec<_>>()
        .join(" ")
}

fn o_trunc(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, &[7u8; 100]);
    let w = sys::open(&p, O_WRONLY | O_TRUNC, 0);
    let size_w = sys::stat(&p).map_or(-1, |s| s.st_size);
    let w = show(&w);
    let _ = sys::write_file(&p, &[7u8; 100]);
    let r = sys::open(&p, O_RDONLY | O_TRUNC, 0);
    let size_r = sys::stat(&p).map_or(-1, |s| s.st_size);
    format!(
        "wronly={} size={} rdonly={} size={}",
        w,
        size_w,
        show(&r),
        size_r
    )
}

fn o_append(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"start:");
    let (Ok(a), Ok(b)) = (
        sys::open(&p, O_WRONLY | O_APPEND, 0),
        sys::open(&p, O_WRONLY | O_APPEND, 0),
    ) else {
        return "open failed".into();
    };
    for i in 0..4 {
        let _ = sys::write(&a, format!("A{i};").as_bytes());
        let _ = sys::write(&b, format!("B{i};").as_bytes());
    }
    // pwrite on an O_APPEND fd appends on Linux as well.
    let _ = sys::pwrite(&a, b"P;", 0);
    let pos = sys::lseek(&a, 0, libc::SEEK_CUR);
    let data = sys::read_file(&p).unwrap_or_default();
    format!(
        "content={} size={} offset_after={}",
        String::from_utf8_lossy(&data),
        data.len(),
        pos.map_or("?".into(), |p| p.to_string())
    )
}

fn read_write(c: &Ctx) -> String {
    let p = c.p("f");
    let data = sys::pattern(10000, 3);
    let Ok(fd) = sys::open(&p, O_RDWR | O_CREAT, 0o644) else {
        return "open failed".into();
    };
    let w = sys::write(&fd, &data);
    let pos = sys::lseek(&fd, 0, libc::SEEK_CUR).unwrap_or(-1);
    let mid = sys::pread(&fd, 100, 5000).unwrap_or_default();
    let eof = sys::pread(&fd, 100, 10000).map(|v| v.len());
    let tail = sys::pread(&fd, 100, 9950).map(|v| v.len());
    let overwrite = sys::pwrite(&fd, b"XYZ", 10);
    let all = sys::read_file(&p).unwrap_or_default();
    let mut expect = data.clone();
    expect[10..13].copy_from_slice(b"XYZ");
    format!(
        "write={} offset={} mid_ok={} read_at_eof={} short_tail={} overwrite={} content_ok={}",
        sys::val(&w),
        pos,
        mid == data[5000..5100],
        sys::val(&eof),
        sys::val(&tail),
        sys::val(&overwrite),
        all == expect
    )
}

fn bad_fd_mode(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"hello");
    let r = sys::open(&p, O_RDONLY, 0).expect("open rdonly");
    let w = sys::open(&p, O_WRONLY, 0).expect("open wronly");
    format!(
        "write_on_rdonly={} read_on_wronly={} ftruncate_on_rdonly={}",
        show(&sys::write(&r, b"x")),
        show(&sys::read(&w, 5)),
        show(&sys::ftruncate(&r, 0))
    )
}

fn unlinked_open(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"before");
    let fd = sys::open(&p, O_RDWR, 0).expect("open");
    let unl = sys::unlink(&p);
    let gone = sys::stat(&p)
        .err()
        .map(|e| e.to_string())
        .unwrap_or("exists".into());
    let nlink = sys::fstat(&fd).map_or(-1, |s| s.st_nlink as i64);
    let w = sys::pwrite(&fd, b"-after", 6);
    let back = sys::pread(&fd, 100, 0).unwrap_or_default();
    let tr = sys::ftruncate(&fd, 3);
    let size = sys::fstat(&fd).map_or(-1, |s| s.st_size);
    let recreate = sys::write_file(&p, b"new");
    let old = sys::pread(&fd, 100, 0).unwrap_or_default();
    format!(
        "unlink={} stat={} fstat_nlink={} write={} read={} ftruncate={} size={} recreate={} old_fd_reads={}",
        show(&unl),
        gone,
        nlink,
        show(&w),
        String::from_utf8_lossy(&back),
        show(&tr),
        size,
        show(&recreate),
        String::from_utf8_lossy(&old)
    )
}

fn renamed_over_open(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("a"), b"old");
    let _ = sys::write_file(c.p("b"), b"new");
    let fd = sys::open(c.p("a"), O_RDONLY, 0).expect("open");
    let r = sys::rename(c.p("b"), c.p("a"));
    let via_fd = sys::pread(&fd, 10, 0).unwrap_or_default();
    let via_path = sys::read_file(c.p("a")).unwrap_or_default();
    let nlink = sys::fstat(&fd).map_or(-1, |s| s.st_nlink as i64);
    format!(
        "rename={} fd_reads={} path_reads={} old_nlink={}",
        show(&r),
        String::from_utf8_lossy(&via_fd),
        String::from_utf8_lossy(&via_path),
        nlink
    )
}

fn tmpfile(c: &Ctx) -> String {
    let fd = match sys::open(&c.dir, libc::O_TMPFILE | O_RDWR, 0o600) {
        Ok(fd) => fd,
        Err(e) => return format!("open err={e}"),
    };
    let st = sys::fstat(&fd).ok();
    let w = sys::write(&fd, b"tmpdata");
    let listed = std::fs::read_dir(&c.dir).map_or(0, |d| d.count());
    let proc_path = format!("/proc/self/fd/{}", sys::raw(&fd));
    let name = c.p("linked");
    let l = sys::linkat(&proc_path, &name, libc::AT_SYMLINK_FOLLOW);
    let st2 = sys::stat(&name).ok();
    let content = sys::read_file(&name).unwrap_or_default();
    format!(
        "open=ok nlink={} mode={} type={} write={} dir_entries={} linkat={} nlink_after={} content={}",
        st.map_or(-1, |s| s.st_nlink as i64),
        st.as_ref().map_or("?".into(), sys::perm),
        st.map_or("?", |s| sys::ftype(s.st_mode)),
        show(&w),
        listed,
        show(&l),
        st2.map_or(-1, |s| s.st_nlink as i64),
        String::from_utf8_lossy(&content)
    )
}

fn tmpfile_excl(c: &Ctx) -> String {
    let fd = match sys::open(&c.dir, libc::O_TMPFILE | O_EXCL | O_RDWR, 0o600) {
        Ok(fd) => fd,
        Err(e) => return format!("open err={e}"),
    };
    let proc_path = format!("/proc/self/fd/{}", sys::raw(&fd));
    let l = sys::linkat(&proc_path, c.p("linked"), libc::AT_SYMLINK_FOLLOW);
    format!("open=ok linkat={}", show(&l))
}

fn name_max(c: &Ctx) -> String {
    let n255 = "a".repeat(255);
    let n256 = "b".repeat(256);
    let create255 = sys::open(c.p(&n255), O_CREAT | O_WRONLY, 0o644);
    let stat255 = sys::stat(c.p(&n255));
    let create256 = sys::open(c.p(&n256), O_CREAT | O_WRONLY, 0o644);
    let stat256 = sys::stat(c.p(&n256));
    let mkdir256 = sys::mkdir(c.p(&n256), 0o755);
    let link256 = sys::symlink("x", c.p(&n256));
    let rename256 = sys::rename(c.p(&n255), c.p(&n256));
    let dir255 = sys::mkdir(c.p(&"d".repeat(255)), 0o755);
    format!(
        "create255={} stat255={} create256={} stat256={} mkdir256={} symlink256={} rename_to256={} mkdir255={}",
        show(&create255),
        show(&stat255),
        show(&create256),
        show(&stat256),
        show(&mkdir256),
        show(&link256),
        show(&rename256),
        show(&dir255)
    )
}

fn flush_on_close(c: &Ctx) -> String {
    let p = c.p("f");
    let reader = sys::open(&p, O_RDONLY | O_CREAT, 0o644).expect("create");
    let w = sys::open(&p, O_WRONLY, 0).expect("open");
    let dup = sys::dup(&w);
    let _ = sys::write(&w, b"written-then-closed");
    // A failed dup leaves nothing to close: report EBADF, which is what close(-1) gives.
    let close_dup = dup.map_or(Err(sys::Errno(libc::EBADF)), sys::close);
    let still = sys::write(&w, b"+more");
    let close = sys::close(w);
    let seen = sys::pread(&reader, 100, 0).unwrap_or_default();
    let fresh = sys::read_file(&p).unwrap_or_default();
    format!(
        "close_dup={} write_after_dup_close={} close={} earlier_fd_sees={} fresh_open_sees={}",
        show(&close_dup),
        show(&still),
        show(&close),
        String::from_utf8_lossy(&seen),
        String::from_utf8_lossy(&fresh)
    )
}

fn fsync(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"data");
    let rw = sys::open(&p, O_RDWR, 0).expect("open");
    let _ = sys::write(&rw, b"more");
    let ro = sys::open(&p, O_RDONLY, 0).expect("open");
    let dir = sys::open(&c.dir, O_RDONLY | O_DIRECTORY, 0).expect("open dir");
    format!(
        "fsync={} fdatasync={} fsync_rdonly={} fsyncdir={} fdatasyncdir={}",
        show(&sys::fsync(&rw)),
        show(&sys::fdatasync(&rw)),
        show(&sys::fsync(&ro)),
        show(&sys::fsync(&dir)),
        show(&sys::fdatasync(&dir))
    )
}
