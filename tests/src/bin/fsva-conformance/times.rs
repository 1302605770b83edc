//! Timestamps: which operations advance mtime/ctime (write, truncate, chmod, directory
//! entry changes), utimensat with exact nanoseconds, UTIME_NOW and UTIME_OMIT, and
//! statx basic fields. Only relative facts ("changed") are reported, never times.

use crate::check::{check, Check, Ctx};
use crate::sys::{self, show};

pub const CHECKS: &[Check] = &[
    check("times.write", write),
    check("times.truncate", truncate),
    check("times.chmod_chown", chmod_chown),
    check("times.dir_entries", dir_entries),
    check("times.utimens_exact", utimens_exact),
    check("times.utime_now", utime_now),
    check("times.utime_omit", utime_omit),
    check("times.utimens_symlink", utimens_symlink),
    check("times.statx", statx),
];

/// "m=<changed> c=<changed>" comparing two stats.
fn mc(a: &libc::stat, b: &libc::stat) -> String {
    format!(
        "m:{} c:{}",
        sys::mtime(a) != sys::mtime(b),
        sys::ctime(a) != sys::ctime(b)
    )
}

fn write(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"x");
    let fd = sys::open(&p, libc::O_WRONLY, 0).expect("open");
    let s0 = sys::stat(&p).expect("stat");
    sys::tick();
    let _ = sys::pwrite(&fd, b"y", 0);
    let s1 = sys::stat(&p).expect("stat");
    sys::tick();
    let _ = sys::pwrite(&fd, b"", 0);
    let s2 = sys::stat(&p).expect("stat");
    let a_unchanged = sys::atime(&s1) == sys::atime(&s0);
    format!(
        "write={} atime_unchanged={} zero_length_write={}",
        mc(&s1, &s0),
        a_unchanged,
        mc(&s2, &s1)
    )
}

fn truncate(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"0123456789");
    let s0 = sys::stat(&p).expect("stat");
    sys::tick();
    let _ = sys::truncate(&p, 4);
    let s1 = sys::stat(&p).expect("stat");
    sys::tick();
    let _ = sys::truncate(&p, 4);
    let s2 = sys::stat(&p).expect("stat");
    let fd = sys::open(&p, libc::O_WRONLY, 0).expect("open");
    sys::tick();
    let _ = sys::ftruncate(&fd, 100);
    let s3 = sys::stat(&p).expect("stat");
    sys::tick();
    drop(sys::open(&p, libc::O_WRONLY | libc::O_TRUNC, 0));
    let s4 = sys::stat(&p).expect("stat");
    sys::tick();
    drop(sys::open(&p, libc::O_WRONLY | libc::O_TRUNC, 0));
    let s5 = sys::stat(&p).expect("stat");
    format!(
        "shrink=[{}] size={} same_size=[{}] ftruncate_grow=[{}] size={} o_trunc=[{}] o_trunc_empty=[{}]",
        mc(&s1, &s0),
        s1.st_size,
        mc(&s2, &s1),
        mc(&s3, &s2),
        s3.st_size,
        mc(&s4, &s3),
        mc(&s5, &s4)
    )
}

fn chmod_chown(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"x");
    let s0 = sys::stat(&p).expect("stat");
    sys::tick();
    let _ = sys::chmod(&p, 0o600);
    let s1 = sys::stat(&p).expect("stat");
    sys::tick();
    let _ = sys::chown(&p, u32::MAX, u32::MAX);
    let s2 = sys::stat(&p).expect("stat");
    sys::tick();
    let _ = sys::chown(&p, c.uid, c.gid);
    let s3 = sys::stat(&p).expect("stat");
    format!(
        "chmod=[{}] chown_noop_minus1=[{}] chown_same_ids=[{}]",
        mc(&s1, &s0),
        mc(&s2, &s1),
        mc(&s3, &s2)
    )
}

fn dir_entries(c: &Ctx) -> String {
    let d = c.p("d");
    let _ = sys::mkdir(&d, 0o755);
    let st = || sys::stat(&d).expect("stat");
    let mut out = Vec::new();
    let ops: [(&str, &dyn Fn() -> sys::Res<()>); 6] = [
        ("create", &|| sys::write_file(d.join("f"), b"")),
        ("write_child", &|| sys::write_file(d.join("f"), b"data")),
        ("mkdir", &|| sys::mkdir(d.join("sub"), 0o755)),
        ("rename_within", &|| sys::rename(d.join("f"), d.join("g"))),
        ("unlink", &|| sys::unlink(d.join("g"))),
        ("rmdir", &|| sys::rmdir(d.join("sub"))),
    ];
    for (name, op) in ops {
        let before = st();
        sys::tick();
        let r = op();
        out.push(format!("{name}={}[{}]", show(&r), mc(&st(), &before)));
    }
    out.join(" ")
}

fn utimens_exact(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"");
    let at = sys::ts(1_000_000_000, 123_456_789);
    let mt = sys::ts(1_500_000_000, 987_654_321);
    let s0 = sys::stat(&p).expect("stat");
    sys::tick();
    let r = sys::utimensat(&p, Some([at, mt]), 0);
    let s = sys::stat(&p).expect("stat");
    let old = sys::utimensat(&p, Some([sys::ts(0, 0), sys::ts(-1, 5)]), 0);
    let s2 = sys::stat(&p).expect("stat");
    let bad_nsec = sys::utimensat(&p, Some([sys::ts(0, 1_000_000_000), mt]), 0);
    format!(
        "utimensat={} atime_exact={} mtime_exact={} ctime_changed={} epoch_and_negative={} atime_zero={} mtime_negative={} bad_nsec={}",
        show(&r),
        sys::atime(&s) == (at.tv_sec, at.tv_nsec),
        sys::mtime(&s) == (mt.tv_sec, mt.tv_nsec),
        sys::ctime(&s) != sys::ctime(&s0),
        show(&old),
        sys::atime(&s2) == (0, 0),
        sys::mtime(&s2) == (-1, 5),
        show(&bad_nsec),
    )
}

fn now() -> (i64, i64) {
    let t = sys::clock_gettime(libc::CLOCK_REALTIME);
    (t.tv_sec, t.tv_nsec)
}

fn utime_now(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"");
    let old = sys::ts(1_000_000_000, 0);
    let _ = sys::utimensat(&p, Some([old, old]), 0);
    let t0 = now();
    let r = sys::utimensat(
        &p,
        Some([sys::ts(0, libc::UTIME_NOW), sys::ts(0, libc::UTIME_NOW)]),
        0,
    );
    let s = sys::stat(&p).expect("stat");
    let _ = sys::utimensat(&p, Some([old, old]), 0);
    let null = sys::utimensat(&p, None, 0);
    let s2 = sys::stat(&p).expect("stat");
    // Allow for coarse-grained kernel clocks: "recent" means within 1 s before t0.
    let recent = |t: (i64, i64)| t.0 >= t0.0 - 1;
    format!(
        "utime_now={} atime_recent={} mtime_recent={} null_times={} atime_recent={} mtime_recent={} a_equals_m={}",
        show(&r),
        recent(sys::atime(&s)),
        recent(sys::mtime(&s)),
        show(&null),
        recent(sys::atime(&s2)),
        recent(sys::mtime(&s2)),
        sys::atime(&s2) == sys::mtime(&s2)
    )
}

fn utime_omit(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"");
    let a = sys::ts(1_100_000_000, 111);
    let m = sys::ts(1_200_000_000, 222);
    let _ = sys::utimensat(&p, Some([a, m]), 0);
    let s0 = sys::stat(&p).expect("stat");
    sys::tick();
    let omit = sys::ts(0, libc::UTIME_OMIT);
    let r1 = sys::utimensat(&p, Some([omit, sys::ts(1_300_000_000, 333)]), 0);
    let s1 = sys::stat(&p).expect("stat");
    let r2 = sys::utimensat(&p, Some([sys::ts(1_400_000_000, 444), omit]), 0);
    let s2 = sys::stat(&p).expect("stat");
    sys::tick();
    let r3 = sys::utimensat(&p, Some([omit, omit]), 0);
    let s3 = sys::stat(&p).expect("stat");
    format!(
        "omit_atime={} atime_kept={} mtime_set={} ctime_changed={} omit_mtime={} mtime_kept={} atime_set={} omit_both={} ctime_changed={}",
        show(&r1),
        sys::atime(&s1) == sys::atime(&s0),
        sys::mtime(&s1) == (1_300_000_000, 333),
        sys::ctime(&s1) != sys::ctime(&s0),
        show(&r2),
        sys::mtime(&s2) == sys::mtime(&s1),
        sys::atime(&s2) == (1_400_000_000, 444),
        show(&r3),
        sys::ctime(&s3) != sys::ctime(&s2),
    )
}

fn utimens_symlink(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("f"), b"");
    let _ = sys::symlink("f", c.p("l"));
    let t = sys::ts(1_234_567_890, 5);
    let r = sys::utimensat(c.p("l"), Some([t, t]), libc::AT_SYMLINK_NOFOLLOW);
    let l = sys::lstat(c.p("l")).expect("lstat");
    let f = sys::stat(c.p("f")).expect("stat");
    format!(
        "nofollow={} link_mtime_set={} target_mtime_untouched={}",
        show(&r),
        sys::mtime(&l) == (t.tv_sec, t.tv_nsec),
        sys::mtime(&f) != (t.tv_sec, t.tv_nsec)
    )
}

fn statx(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, &[1u8; 5000]);
    let _ = sys::chmod(&p, 0o640);
    let sx = match sys::statx(&p, 0, libc::STATX_BASIC_STATS) {
        Ok(s) => s,
        Err(e) => return format!("statx err={e}"),
    };
    let st = sys::stat(&p).expect("stat");
    let basic = sx.stx_mask & libc::STATX_BASIC_STATS == libc::STATX_BASIC_STATS;
    let lnk = sys::symlink("f", c.p("l"));
    let sl = sys::statx(c.p("l"), libc::AT_SYMLINK_NOFOLLOW, libc::STATX_BASIC_STATS);
    format!(
        "basic_mask={} type={} perm={:04o} nlink={} size={} uid_match={} gid_match={} ino_match={} mtime_match={} ctime_match={} blocks_positive={} blksize_positive={} symlink={} symlink_type={} missing={}",
        basic,
        sys::ftype(sx.stx_mode as u32),
        sx.stx_mode & 0o7777,
        sx.stx_nlink,
        sx.stx_size,
        sx.stx_uid == st.st_uid,
        sx.stx_gid == st.st_gid,
        sx.stx_ino == st.st_ino,
        (sx.stx_mtime.tv_sec, sx.stx_mtime.tv_nsec as i64) == sys::mtime(&st),
        (sx.stx_ctime.tv_sec, sx.stx_ctime.tv_nsec as i64) == sys::ctime(&st),
        sx.stx_blocks > 0,
        sx.stx_blksize > 0,
        show(&lnk),
        sl.as_ref().map_or("?", |s| sys::ftype(s.stx_mode as u32)),
        show(&sys::statx(c.p("missing"), 0, libc::STATX_BASIC_STATS)),
    )
}
