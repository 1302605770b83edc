//! Multi-user behaviour, observed from child processes running as other uids (needs
//! root; unprivileged runs report `skip=needs_root`): ownership of new objects (fsuid /
//! fsgid), setgid directory inheritance, sticky directories, permission denial, access(2)
//! for another user, and chmod/chown/utimes of someone else's file.

use crate::check::{check, Check, Ctx, NEEDS_ROOT};
use crate::proc::{self, NOBODY, OTHER};
use crate::sys::{self, show};

pub const CHECKS: &[Check] = &[
    check("owner.new_object_owner", new_object_owner),
    check("owner.fsuid_owner", fsuid_owner),
    check("owner.setgid_dir", setgid_dir),
    check("owner.setgid_dir_nonmember", setgid_dir_nonmember),
    check("owner.sticky_dir", sticky_dir),
    check("owner.denied", denied),
    check("owner.access_other_user", access_other_user),
    check("owner.foreign_file_attrs", foreign_file_attrs),
];

fn owner(p: impl AsRef<std::path::Path>) -> String {
    sys::lstat(p).map_or_else(
        |e| format!("<{e}>"),
        |s| format!("{}:{}", s.st_uid, s.st_gid),
    )
}

fn mode_of(p: impl AsRef<std::path::Path>) -> String {
    sys::stat(p).map_or_else(|e| format!("<{e}>"), |s| sys::perm(&s))
}

fn new_object_owner(c: &Ctx) -> String {
    if !c.root {
        return NEEDS_ROOT.into();
    }
    let _ = sys::chmod(&c.dir, 0o777);
    let d = c.dir.clone();
    let obs = proc::as_user(NOBODY, NOBODY, move || {
        let f = sys::write_file(d.join("f"), b"");
        let m = sys::mkdir(d.join("d"), 0o755);
        let s = sys::symlink("f", d.join("l"));
        let n = sys::mknod(d.join("p"), libc::S_IFIFO | 0o644, 0);
        format!(
            "file={} dir={} symlink={} fifo={}",
            show(&f),
            show(&m),
            show(&s),
            show(&n)
        )
    });
    format!(
        "{obs} owners={},{},{},{}",
        owner(c.p("f")),
        owner(c.p("d")),
        owner(c.p("l")),
        owner(c.p("p"))
    )
}

fn fsuid_owner(c: &Ctx) -> String {
    if !c.root {
        return NEEDS_ROOT.into();
    }
    let _ = sys::chmod(&c.dir, 0o777);
    let d = c.dir.clone();
    let obs = proc::in_child(move || {
        sys::setfsgid(OTHER);
        sys::setfsuid(OTHER);
        let f = sys::write_file(d.join("f"), b"");
        let m = sys::mkdir(d.join("d"), 0o755);
        format!("file={} dir={}", show(&f), show(&m))
    });
    format!("{obs} owners={},{}", owner(c.p("f")), owner(c.p("d")))
}

fn setgid_dir(c: &Ctx) -> String {
    let group = if c.root { NOBODY } else { c.gid };
    let d = c.p("sgid");
    let _ = sys::mkdir(&d, 0o777);
    let _ = sys::chown(&d, u32::MAX, group);
    let _ = sys::chmod(&d, 0o2777);
    let f = sys::write_file(d.join("f"), b"");
    let sub = sys::mkdir(d.join("sub"), 0o755);
    let deeper = sys::mkdir(d.join("sub/deeper"), 0o755);
    let gid_ok = |p: &str| sys::lstat(d.join(p)).is_ok_and(|s| s.st_gid == group);
    format!(
        "dir_mode={} file={} file_group_inherited={} subdir={} subdir_group_inherited={} subdir_mode={} deeper={} deeper_mode={} file_mode={}",
        mode_of(&d),
        show(&f),
        gid_ok("f"),
        show(&sub),
        gid_ok("sub"),
        mode_of(d.join("sub")),
        show(&deeper),
        mode_of(d.join("sub/deeper")),
        mode_of(d.join("f")),
    )
}

fn setgid_dir_nonmember(c: &Ctx) -> String {
    if !c.root {
        return NEEDS_ROOT.into();
    }
    let d = c.p("sgid");
    let _ = sys::mkdir(&d, 0o777);
    let _ = sys::chown(&d, u32::MAX, OTHER);
    let _ = sys::chmod(&d, 0o2777);
    let dd = d.clone();
    let obs = proc::as_user(NOBODY, NOBODY, move || {
        let f = sys::open(dd.join("f"), libc::O_CREAT | libc::O_WRONLY, 0o2755);
        let m = sys::mkdir(dd.join("sub"), 0o2755);
        format!("create={} mkdir={}", show(&f), show(&m))
    });
    format!(
        "{obs} file_owner={} file_mode={} dir_owner={} dir_mode={}",
        owner(d.join("f")),
        mode_of(d.join("f")),
        owner(d.join("sub")),
        mode_of(d.join("sub"))
    )
}

fn sticky_dir(c: &Ctx) -> String {
    if !c.root {
        return NEEDS_ROOT.into();
    }
    let d = c.p("tmp");
    let _ = sys::mkdir(&d, 0o777);
    let _ = sys::chmod(&d, 0o1777);
    let dd = d.clone();
    let mine = proc::as_user(NOBODY, NOBODY, move || {
        let a = sys::write_file(dd.join("mine"), b"x");
        let b = sys::write_file(dd.join("mine2"), b"x");
        let _ = sys::chmod(dd.join("mine"), 0o666);
        let _ = sys::chmod(dd.join("mine2"), 0o666);
        format!("create={}/{}", show(&a), show(&b))
    });
    let dd = d.clone();
    let other = proc::as_user(OTHER, OTHER, move || {
        format!(
            "other_unlink={} other_rename_away={} other_rename_over={} other_write={}",
            show(&sys::unlink(dd.join("mine"))),
            show(&sys::rename(dd.join("mine"), dd.join("stolen"))),
            show(
                &sys::write_file(dd.join("theirs"), b"t")
                    .and_then(|_| sys::rename(dd.join("theirs"), dd.join("mine")))
            ),
            show(&sys::open(dd.join("mine"), libc::O_WRONLY, 0)),
        )
    });
    let dd = d.clone();
    let owner_del = proc::as_user(NOBODY, NOBODY, move || {
        format!("owner_unlink={}", show(&sys::unlink(dd.join("mine"))))
    });
    let root_del = sys::unlink(d.join("mine2"));
    format!("{mine} {other} {owner_del} root_unlink={}", show(&root_del))
}

fn denied(c: &Ctx) -> String {
    if !c.root {
        return NEEDS_ROOT.into();
    }
    let _ = sys::write_file(c.p("secret"), b"s");
    let _ = sys::chmod(c.p("secret"), 0o600);
    let _ = sys::mkdir(c.p("closed"), 0o700);
    let _ = sys::write_file(c.p("closed/f"), b"");
    let _ = sys::mkdir(c.p("xonly"), 0o711);
    let _ = sys::write_file(c.p("xonly/f"), b"visible");
    let _ = sys::chmod(c.p("xonly/f"), 0o644);
    let _ = sys::write_file(c.p("ro"), b"r");
    let d = c.dir.clone();
    proc::as_user(NOBODY, NOBODY, move || {
        let p = |s: &str| d.join(s);
        format!(
            "create_in_0755={} unlink_in_0755={} mkdir_in_0755={} read_0600={} write_0644={} traverse_0700={} readdir_0711={} lookup_0711={} read_via_0711={} rename_in_0755={}",
            show(&sys::open(p("new"), libc::O_CREAT | libc::O_WRONLY, 0o644)),
            show(&sys::unlink(p("ro"))),
            show(&sys::mkdir(p("nd"), 0o755)),
            show(&sys::open(p("secret"), libc::O_RDONLY, 0)),
            show(&sys::open(p("ro"), libc::O_WRONLY, 0)),
            show(&sys::stat(p("closed/f"))),
            show(&sys::open(p("xonly"), libc::O_RDONLY | libc::O_DIRECTORY, 0).and_then(|fd| sys::read_fd_all(&fd).map(drop)).or_else(|e| if e.0 == libc::EISDIR { Ok(()) } else { Err(e) })),
            show(&sys::stat(p("xonly/f"))),
            show(&sys::read_file(p("xonly/f"))),
            show(&sys::rename(p("ro"), p("ro2"))),
        )
    })
}

fn access_other_user(c: &Ctx) -> String {
    if !c.root {
        return NEEDS_ROOT.into();
    }
    let specs: [(&str, u32, u32); 4] = [
        ("other_r", 0o754, 0),
        ("group_rwx", 0o070, NOBODY),
        ("group_none", 0o707, NOBODY),
        ("none", 0o000, 0),
    ];
    for (name, mode, gid) in specs {
        let _ = sys::write_file(c.p(name), b"");
        let _ = sys::chown(c.p(name), 0, gid);
        let _ = sys::chmod(c.p(name), mode);
    }
    let d = c.dir.clone();
    let as_nobody = proc::as_user(NOBODY, NOBODY, move || {
        specs
            .iter()
            .map(|(name, _, _)| {
                let p = d.join(name);
                format!(
                    "{name}=R:{},W:{},X:{}",
                    show(&sys::access(&p, libc::R_OK)),
                    show(&sys::access(&p, libc::W_OK)),
                    show(&sys::access(&p, libc::X_OK))
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    });
    let p = c.p("none");
    format!(
        "{as_nobody} root_none=R:{},W:{},X:{}",
        show(&sys::access(&p, libc::R_OK)),
        show(&sys::access(&p, libc::W_OK)),
        show(&sys::access(&p, libc::X_OK))
    )
}

fn foreign_file_attrs(c: &Ctx) -> String {
    if !c.root {
        return NEEDS_ROOT.into();
    }
    let _ = sys::write_file(c.p("f"), b"");
    let _ = sys::chmod(c.p("f"), 0o666);
    let _ = sys::write_file(c.p("ro"), b"");
    let d = c.dir.clone();
    proc::as_user(NOBODY, NOBODY, move || {
        let f = d.join("f");
        let ro = d.join("ro");
        format!(
            "chmod={} chown_to_self={} chgrp={} utimes_explicit={} utimes_now_writable={} utimes_now_readonly={} truncate_writable={}",
            show(&sys::chmod(&f, 0o777)),
            show(&sys::chown(&f, NOBODY, u32::MAX)),
            show(&sys::chown(&f, u32::MAX, NOBODY)),
            show(&sys::utimensat(&f, Some([sys::ts(1, 0), sys::ts(1, 0)]), 0)),
            show(&sys::utimensat(&f, None, 0)),
            show(&sys::utimensat(&ro, None, 0)),
            show(&sys::truncate(&f, 0)),
        )
    })
}
