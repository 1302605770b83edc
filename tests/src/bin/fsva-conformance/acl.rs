//! POSIX ACLs through the `system.posix_acl_access` / `system.posix_acl_default` xattrs
//! (the same binary format `setfacl` writes): round trip, mode/mask interaction,
//! enforcement for a named user (child process as that uid, root only), default ACL
//! inheritance by new files and directories, and rejection of malformed ACLs.

use crate::check::{check, Check, Ctx};
use crate::proc::{self, NOBODY, OTHER};
use crate::sys::{self, show};

pub const CHECKS: &[Check] = &[
    check("acl.access_roundtrip", access_roundtrip),
    check("acl.named_user_enforced", named_user_enforced),
    check("acl.chmod_sets_mask", chmod_sets_mask),
    check("acl.default_inherited", default_inherited),
    check("acl.invalid", invalid),
];

const ACCESS: &str = "system.posix_acl_access";
const DEFAULT: &str = "system.posix_acl_default";
const UNDEFINED_ID: u32 = u32::MAX;

const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER_TAG: u16 = 0x20;

/// Encodes `(tag, perm, id)` entries (already in canonical order) as an xattr value.
fn encode(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// Decodes an ACL xattr to `getfacl`-like short text, e.g. `u::rw-,u:65534:r--,g::---,m::r--,o::---`.
fn decode(v: &[u8]) -> String {
    if v.len() < 4 || !v[4..].chunks_exact(8).remainder().is_empty() {
        return format!("<malformed len={}>", v.len());
    }
    let perm = |p: u16| {
        format!(
            "{}{}{}",
            if p & 4 != 0 { 'r' } else { '-' },
            if p & 2 != 0 { 'w' } else { '-' },
            if p & 1 != 0 { 'x' } else { '-' }
        )
    };
    v[4..]
        .chunks(8)
        .map(|e| {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let p = u16::from_le_bytes([e[2], e[3]]);
            let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            let (t, named) = match tag {
                USER_OBJ => ("u", false),
                USER => ("u", true),
                GROUP_OBJ => ("g", false),
                GROUP => ("g", true),
                MASK => ("m", false),
                OTHER_TAG => ("o", false),
                _ => ("?", true),
            };
            let id = if named { id.to_string() } else { String::new() };
            format!("{t}:{id}:{}", perm(p))
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn read_acl(p: impl AsRef<std::path::Path>, name: &str) -> String {
    sys::getxattr(p, name, 4096).map_or_else(|e| format!("err={e}"), |v| decode(&v))
}

fn mode_of(p: impl AsRef<std::path::Path>) -> String {
    sys::stat(p).map_or_else(|e| format!("<{e}>"), |s| sys::perm(&s))
}

/// u::rw-, u:NOBODY:r--, g::---, m::r--, o::---
fn named_user_acl() -> Vec<u8> {
    encode(&[
        (USER_OBJ, 6, UNDEFINED_ID),
        (USER, 4, NOBODY),
        (GROUP_OBJ, 0, UNDEFINED_ID),
        (MASK, 4, UNDEFINED_ID),
        (OTHER_TAG, 0, UNDEFINED_ID),
    ])
}

fn access_roundtrip(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"secret");
    let _ = sys::chmod(&p, 0o600);
    let r = sys::setxattr(&p, ACCESS, &named_user_acl(), 0);
    let mode = mode_of(&p);
    let back = read_acl(&p, ACCESS);
    let rm = sys::removexattr(&p, ACCESS);
    format!(
        "set={} mode={} acl={} remove={} mode_after_remove={} acl_after_remove={}",
        show(&r),
        mode,
        back,
        show(&rm),
        mode_of(&p),
        read_acl(&p, ACCESS)
    )
}

fn named_user_enforced(c: &Ctx) -> String {
    if !c.root {
        return crate::check::NEEDS_ROOT.into();
    }
    let p = c.p("f");
    let _ = sys::write_file(&p, b"secret");
    let _ = sys::chmod(&p, 0o600);
    let r = sys::setxattr(&p, ACCESS, &named_user_acl(), 0);
    let q = p.clone();
    let named = proc::as_user(NOBODY, NOBODY, move || {
        format!(
            "read={} write={}",
            show(&sys::open(&q, libc::O_RDONLY, 0)),
            show(&sys::open(&q, libc::O_WRONLY, 0))
        )
    });
    let q = p.clone();
    let other = proc::as_user(OTHER, OTHER, move || {
        format!("read={}", show(&sys::open(&q, libc::O_RDONLY, 0)))
    });
    format!("set={} named_user: {named} other_user: {other}", show(&r))
}

fn chmod_sets_mask(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"");
    let _ = sys::setxattr(&p, ACCESS, &named_user_acl(), 0);
    let _ = sys::chmod(&p, 0o670);
    let after_chmod = read_acl(&p, ACCESS);
    let _ = sys::chmod(&p, 0o600);
    format!(
        "after_chmod_0670={} after_chmod_0600={} mode={}",
        after_chmod,
        read_acl(&p, ACCESS),
        mode_of(&p)
    )
}

fn default_inherited(c: &Ctx) -> String {
    let d = c.p("d");
    let _ = sys::mkdir(&d, 0o755);
    let def = encode(&[
        (USER_OBJ, 7, UNDEFINED_ID),
        (USER, 5, NOBODY),
        (GROUP_OBJ, 5, UNDEFINED_ID),
        (MASK, 5, UNDEFINED_ID),
        (OTHER_TAG, 0, UNDEFINED_ID),
    ]);
    let r = sys::setxattr(&d, DEFAULT, &def, 0);
    sys::umask(0o077);
    let f = sys::open(d.join("f"), libc::O_CREAT | libc::O_WRONLY, 0o666);
    let sub = sys::mkdir(d.join("sub"), 0o777);
    sys::umask(0o022);
    let _ = sys::write_file(d.join("f"), b"inherited");
    let reader = if c.root {
        let q = d.join("f");
        proc::as_user(NOBODY, NOBODY, move || {
            format!("named_user_read={}", show(&sys::read_file(&q)))
        })
    } else {
        crate::check::NEEDS_ROOT.into()
    };
    format!(
        "set_default={} dir_default={} create={} file_mode={} file_acl={} mkdir={} sub_mode={} sub_acl={} sub_default={} {}",
        show(&r),
        read_acl(&d, DEFAULT),
        show(&f),
        mode_of(d.join("f")),
        read_acl(d.join("f"), ACCESS),
        show(&sub),
        mode_of(d.join("sub")),
        read_acl(d.join("sub"), ACCESS),
        read_acl(d.join("sub"), DEFAULT),
        reader
    )
}

fn invalid(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"");
    let no_other = encode(&[(USER_OBJ, 6, UNDEFINED_ID), (GROUP_OBJ, 4, UNDEFINED_ID)]);
    let named_without_mask = encode(&[
        (USER_OBJ, 6, UNDEFINED_ID),
        (USER, 4, NOBODY),
        (GROUP_OBJ, 4, UNDEFINED_ID),
        (OTHER_TAG, 0, UNDEFINED_ID),
    ]);
    let mut bad_version = named_user_acl();
    bad_version[0] = 9;
    format!(
        "missing_other={} named_without_mask={} bad_version={} truncated={} default_on_file={}",
        show(&sys::setxattr(&p, ACCESS, &no_other, 0)),
        show(&sys::setxattr(&p, ACCESS, &named_without_mask, 0)),
        show(&sys::setxattr(&p, ACCESS, &bad_version, 0)),
        show(&sys::setxattr(&p, ACCESS, &named_user_acl()[..10], 0)),
        show(&sys::setxattr(&p, DEFAULT, &named_user_acl(), 0)),
    )
}
