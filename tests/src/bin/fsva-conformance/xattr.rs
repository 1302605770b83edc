//! Extended attributes: user.* set/get/list/remove, XATTR_CREATE / XATTR_REPLACE errors,
//! size queries and ERANGE, ENODATA, xattrs on directories and symlinks, name/namespace
//! errors, and trusted.* (root only; unprivileged callers observe EPERM).

use crate::check::{check, Check, Ctx};
use crate::sys::{self, show};

pub const CHECKS: &[Check] = &[
    check("xattr.user_roundtrip", user_roundtrip),
    check("xattr.flags", flags),
    check("xattr.sizes", sizes),
    check("xattr.missing", missing),
    check("xattr.dir_and_symlink", dir_and_symlink),
    check("xattr.names", names),
    check("xattr.ctime", ctime),
    check("xattr.trusted", trusted),
];

fn value(r: sys::Res<Vec<u8>>) -> String {
    r.map_or_else(
        |e| format!("err={e}"),
        |v| String::from_utf8_lossy(&v).into_owned(),
    )
}

/// The user.* / trusted.* names of `p` (other namespaces, e.g. security.*, are
/// file-system policy and ignored).
fn names_of(p: impl AsRef<std::path::Path>) -> String {
    sys::listxattr(p).map_or_else(
        |e| format!("err={e}"),
        |v| {
            v.into_iter()
                .filter(|n| n.starts_with("user.") || n.starts_with("trusted."))
                .collect::<Vec<_>>()
                .join(",")
        },
    )
}

fn user_roundtrip(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"");
    let s1 = sys::setxattr(&p, "user.b", b"value-b", 0);
    let s2 = sys::setxattr(&p, "user.a", b"", 0);
    let s3 = sys::setxattr(&p, "user.bin", &[0, 1, 2, 255], 0);
    let big = sys::setxattr(&p, "user.big", &sys::pattern(3000, 5), 0);
    let list = names_of(&p);
    let get_b = value(sys::getxattr(&p, "user.b", 100));
    let get_a = sys::getxattr(&p, "user.a", 100).map(|v| v.len());
    let bin = sys::getxattr(&p, "user.bin", 100);
    let big_back = sys::getxattr(&p, "user.big", 5000).is_ok_and(|v| v == sys::pattern(3000, 5));
    let rm = sys::removexattr(&p, "user.b");
    format!(
        "set={}/{}/{}/{} list={} get={} empty_len={} binary={:?} big_roundtrip={} remove={} list_after={}",
        show(&s1),
        show(&s2),
        show(&s3),
        show(&big),
        list,
        get_b,
        sys::val(&get_a),
        bin,
        big_back,
        show(&rm),
        names_of(&p)
    )
}

fn flags(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"");
    let create_new = sys::setxattr(&p, "user.x", b"1", libc::XATTR_CREATE);
    let create_existing = sys::setxattr(&p, "user.x", b"2", libc::XATTR_CREATE);
    let replace_existing = sys::setxattr(&p, "user.x", b"3", libc::XATTR_REPLACE);
    let replace_missing = sys::setxattr(&p, "user.y", b"4", libc::XATTR_REPLACE);
    let both = sys::setxattr(&p, "user.x", b"5", libc::XATTR_CREATE | libc::XATTR_REPLACE);
    format!(
        "create_new={} create_existing={} replace_existing={} replace_missing={} both_flags={} value={} y_exists={}",
        show(&create_new),
        show(&create_existing),
        show(&replace_existing),
        show(&replace_missing),
        show(&both),
        value(sys::getxattr(&p, "user.x", 10)),
        sys::getxattr(&p, "user.y", 10).is_ok()
    )
}

fn sizes(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"");
    let _ = sys::setxattr(&p, "user.key", b"0123456789", 0);
    let list_len = sys::listxattr_size(&p, 0);
    let user_only = names_of(&p);
    format!(
        "get_size_query={} get_exact={} get_small={} list_size_query_ok={} list_small={} names={}",
        sys::val(&sys::getxattr(&p, "user.key", 0).map(|v| v.len())),
        value(sys::getxattr(&p, "user.key", 10)),
        value(sys::getxattr(&p, "user.key", 4)),
        list_len.is_ok_and(|n| n >= "user.key\0".len()),
        show(&sys::listxattr_size(&p, 3)),
        user_only
    )
}

fn missing(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"");
    format!(
        "get={} remove={} list={} get_on_missing_file={} set_on_missing_file={}",
        value(sys::getxattr(&p, "user.nope", 100)),
        show(&sys::removexattr(&p, "user.nope")),
        names_of(&p),
        value(sys::getxattr(c.p("nofile"), "user.x", 100)),
        show(&sys::setxattr(c.p("nofile"), "user.x", b"1", 0)),
    )
}

fn dir_and_symlink(c: &Ctx) -> String {
    let _ = sys::mkdir(c.p("d"), 0o755);
    let _ = sys::write_file(c.p("f"), b"");
    let _ = sys::symlink("f", c.p("l"));
    let _ = sys::mknod(c.p("p"), libc::S_IFIFO | 0o644, 0);
    let dir = sys::setxattr(c.p("d"), "user.d", b"dv", 0);
    let via_link = sys::setxattr(c.p("l"), "user.t", b"tv", 0);
    let on_link = sys::lsetxattr(c.p("l"), "user.l", b"lv", 0);
    let on_fifo = sys::setxattr(c.p("p"), "user.p", b"pv", 0);
    format!(
        "dir={} dir_get={} through_symlink={} target_get={} on_symlink_itself={} on_fifo={}",
        show(&dir),
        value(sys::getxattr(c.p("d"), "user.d", 10)),
        show(&via_link),
        value(sys::getxattr(c.p("f"), "user.t", 10)),
        show(&on_link),
        show(&on_fifo),
    )
}

fn names(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"");
    let long_ok = format!("user.{}", "n".repeat(250));
    let too_long = format!("user.{}", "n".repeat(251));
    format!(
        "name255={} name256={} no_namespace={} unknown_namespace={} empty_suffix={} value_too_big={}",
        show(&sys::setxattr(&p, &long_ok, b"v", 0)),
        show(&sys::setxattr(&p, &too_long, b"v", 0)),
        show(&sys::setxattr(&p, "plain", b"v", 0)),
        show(&sys::setxattr(&p, "bogus.x", b"v", 0)),
        show(&sys::setxattr(&p, "user.", b"v", 0)),
        show(&sys::setxattr(&p, "user.big2", &vec![1u8; 65537], 0)),
    )
}

fn ctime(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"");
    let s0 = sys::stat(&p).expect("stat");
    sys::tick();
    let _ = sys::setxattr(&p, "user.x", b"1", 0);
    let s1 = sys::stat(&p).expect("stat");
    sys::tick();
    let _ = sys::removexattr(&p, "user.x");
    let s2 = sys::stat(&p).expect("stat");
    format!(
        "set_ctime_changed={} set_mtime_changed={} remove_ctime_changed={}",
        sys::ctime(&s1) != sys::ctime(&s0),
        sys::mtime(&s1) != sys::mtime(&s0),
        sys::ctime(&s2) != sys::ctime(&s1)
    )
}

fn trusted(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"");
    let set = sys::setxattr(&p, "trusted.t", b"tv", 0);
    format!(
        "set={} get={} list={} remove={}",
        show(&set),
        value(sys::getxattr(&p, "trusted.t", 10)),
        names_of(&p),
        show(&sys::removexattr(&p, "trusted.t")),
    )
}
