//! Mode bits and ownership as changed by the caller itself: chmod, chown (root: any
//! owner; unprivileged: EPERM), umask, setuid/setgid bits cleared by chown, by writes and
//! by truncation, and access(2) on the caller's own files.

use crate::check::{check, Check, Ctx};
use crate::proc::{self, NOBODY, OTHER};
use crate::sys::{self, show};

pub const CHECKS: &[Check] = &[
    check("perms.chmod", chmod),
    check("perms.chmod_special_bits", chmod_special_bits),
    check("perms.umask", umask),
    check("perms.chown", chown),
    check("perms.chown_clears_suid", chown_clears_suid),
    check("perms.suid_cleared_on_write", suid_cleared_on_write),
    check("perms.suid_cleared_on_truncate", suid_cleared_on_truncate),
    check("perms.suid_write_by_owner", suid_write_by_owner),
    check("perms.access_own", access_own),
];

fn mode_of(p: impl AsRef<std::path::Path>) -> String {
    sys::stat(p).map_or_else(|e| format!("<{e}>"), |s| sys::perm(&s))
}

fn chmod(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"x");
    let st0 = sys::stat(&p).expect("stat");
    sys::tick();
    let r = sys::chmod(&p, 0o640);
    let st1 = sys::stat(&p).expect("stat");
    let _ = sys::mkdir(c.p("d"), 0o755);
    let d = sys::chmod(c.p("d"), 0o700);
    let _ = sys::symlink("f", c.p("l"));
    let via_link = sys::chmod(c.p("l"), 0o604);
    let missing = sys::chmod(c.p("missing"), 0o644);
    format!(
        "chmod={} mode={} ctime_changed={} mtime_changed={} dir={} dir_mode={} through_symlink={} target_mode={} missing={}",
        show(&r),
        sys::perm(&st1),
        sys::ctime(&st1) != sys::ctime(&st0),
        sys::mtime(&st1) != sys::mtime(&st0),
        show(&d),
        mode_of(c.p("d")),
        show(&via_link),
        mode_of(&p),
        show(&missing)
    )
}

fn chmod_special_bits(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("f"), b"");
    let _ = sys::mkdir(c.p("d"), 0o755);
    let f = sys::chmod(c.p("f"), 0o7777);
    let fm = mode_of(c.p("f"));
    let d = sys::chmod(c.p("d"), 0o3777);
    format!(
        "file={} file_mode={} dir={} dir_mode={}",
        show(&f),
        fm,
        show(&d),
        mode_of(c.p("d"))
    )
}

fn umask(c: &Ctx) -> String {
    let old = sys::umask(0o027);
    let f = sys::open(c.p("f"), libc::O_CREAT | libc::O_WRONLY, 0o666);
    let d = sys::mkdir(c.p("d"), 0o777);
    let _ = sys::mknod(c.p("p"), libc::S_IFIFO | 0o666, 0);
    sys::umask(0o000);
    let _ = sys::open(c.p("g"), libc::O_CREAT | libc::O_WRONLY, 0o777);
    let _ = sys::mkdir(c.p("e"), 0o1777);
    sys::umask(old);
    let chmod_ignores = {
        sys::umask(0o777);
        let r = sys::chmod(c.p("g"), 0o666);
        sys::umask(old);
        r
    };
    format!(
        "file={} file_mode={} dir={} dir_mode={} fifo_mode={} umask0_file={} umask0_dir={} chmod={} chmod_ignores_umask_mode={}",
        show(&f),
        mode_of(c.p("f")),
        show(&d),
        mode_of(c.p("d")),
        mode_of(c.p("p")),
        mode_of(c.p("g")),
        mode_of(c.p("e")),
        show(&chmod_ignores),
        mode_of(c.p("g")),
    )
}

fn owner(p: impl AsRef<std::path::Path>) -> String {
    sys::lstat(p).map_or_else(
        |e| format!("<{e}>"),
        |s| format!("{}:{}", s.st_uid, s.st_gid),
    )
}

fn chown(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"");
    let _ = sys::symlink("f", c.p("l"));
    let noop = sys::chown(&p, u32::MAX, u32::MAX);
    let own_group = sys::chown(&p, u32::MAX, c.gid);
    let other_uid = sys::chown(&p, OTHER, u32::MAX);
    let after_uid = owner(&p);
    let other_gid = sys::chown(&p, u32::MAX, OTHER);
    let after_gid = owner(&p);
    let lchown = sys::lchown(c.p("l"), NOBODY, NOBODY);
    let link_owner = owner(c.p("l"));
    let target_owner = owner(&p);
    format!(
        "noop={} own_group={} other_uid={} owner={} other_gid={} owner={} lchown={} link_owner={} target_owner={}",
        show(&noop),
        show(&own_group),
        show(&other_uid),
        after_uid,
        show(&other_gid),
        after_gid,
        show(&lchown),
        link_owner,
        target_owner
    )
}

fn chown_clears_suid(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"");
    let _ = sys::chmod(&p, 0o6755);
    let before = mode_of(&p);
    let r = sys::chown(&p, u32::MAX, c.gid);
    let after_same = mode_of(&p);
    let _ = sys::chmod(&p, 0o6745);
    let _ = sys::chown(&p, c.uid, u32::MAX);
    let group_noexec = mode_of(&p);
    let _ = sys::mkdir(c.p("d"), 0o755);
    let _ = sys::chmod(c.p("d"), 0o6755);
    let _ = sys::chown(c.p("d"), c.uid, c.gid);
    format!(
        "before={} chown={} after={} sgid_without_group_exec_after={} dir_after={}",
        before,
        show(&r),
        after_same,
        group_noexec,
        mode_of(c.p("d"))
    )
}

/// Prepares a 06777 file; as root it is owned by root and modified by `nobody`,
/// unprivileged it is the caller's own file.
fn suid_file(c: &Ctx, name: &str) -> std::path::PathBuf {
    let _ = sys::chmod(&c.dir, 0o777);
    let p = c.p(name);
    let _ = sys::write_file(&p, b"0123456789");
    let _ = sys::chmod(&p, 0o6777);
    p
}

/// Runs `f` as another user when root, or directly when unprivileged.
fn as_writer(c: &Ctx, f: impl FnOnce() -> String) -> String {
    if c.root {
        proc::as_user(NOBODY, NOBODY, f)
    } else {
        f()
    }
}

fn suid_cleared_on_write(c: &Ctx) -> String {
    let p = suid_file(c, "f");
    let q = p.clone();
    let obs = as_writer(c, move || {
        let fd = sys::open(&q, libc::O_WRONLY, 0);
        let w = fd
            .as_ref()
            .map_err(|e| *e)
            .and_then(|fd| sys::pwrite(fd, b"x", 0));
        format!("write={}", show(&w))
    });
    let g = suid_file(c, "g");
    let _ = sys::chmod(&g, 0o2767);
    let obs2 = as_writer(c, move || {
        let w = sys::open(&g, libc::O_WRONLY, 0).and_then(|fd| sys::pwrite(&fd, b"x", 0));
        format!("write={}", show(&w))
    });
    format!(
        "{} mode={} sgid_no_group_exec: {} mode={}",
        obs,
        mode_of(&p),
        obs2,
        mode_of(c.p("g"))
    )
}

fn suid_cleared_on_truncate(c: &Ctx) -> String {
    let p = suid_file(c, "f");
    let q = p.clone();
    let obs = as_writer(c, move || {
        format!("truncate={}", show(&sys::truncate(&q, 3)))
    });
    let size = sys::stat(&p).map_or(-1, |s| s.st_size);
    let p2 = suid_file(c, "g");
    let q2 = p2.clone();
    let obs2 = as_writer(c, move || {
        let r = sys::open(&q2, libc::O_WRONLY | libc::O_TRUNC, 0);
        format!("open_trunc={}", show(&r))
    });
    format!(
        "{} mode={} size={} {} mode={}",
        obs,
        mode_of(&p),
        size,
        obs2,
        mode_of(&p2)
    )
}

fn suid_write_by_owner(c: &Ctx) -> String {
    let p = suid_file(c, "f");
    let w = sys::open(&p, libc::O_WRONLY, 0).and_then(|fd| sys::pwrite(&fd, b"x", 0));
    format!("write={} mode={}", show(&w), mode_of(&p))
}

fn access_own(c: &Ctx) -> String {
    let modes: [(&str, u32); 3] = [("m0400", 0o400), ("m0200", 0o200), ("m0100", 0o100)];
    let mut out = Vec::new();
    for (name, mode) in modes {
        let p = c.p(name);
        let _ = sys::write_file(&p, b"");
        let _ = sys::chmod(&p, mode);
        out.push(format!(
            "{name}=R:{},W:{},X:{},F:{}",
            show(&sys::access(&p, libc::R_OK)),
            show(&sys::access(&p, libc::W_OK)),
            show(&sys::access(&p, libc::X_OK)),
            show(&sys::access(&p, libc::F_OK)),
        ));
    }
    let _ = sys::mkdir(c.p("d"), 0o600);
    out.push(format!(
        "dir0600_X={}",
        show(&sys::access(c.p("d"), libc::X_OK))
    ));
    out.push(format!(
        "missing={}",
        show(&sys::access(c.p("nope"), libc::F_OK))
    ));
    out.join(" ")
}
