//! POSIX ACLs in their xattr form (`system.posix_acl_access` / `_default`).
//!
//! Owns parsing/validation/encoding of the binary format (header u32 version 2, then
//! `{u16 tag, u16 perm, u32 id}` entries), and the kernel's ACL algebra: the mode an
//! ACL implies, `chmod` on an ACL, and `posix_acl_create` inheritance. It must never
//! store anything or decide permissions (the kernel enforces ACLs itself).

use fsva_appliance::{Errno, Result};

pub const ACCESS: &[u8] = b"system.posix_acl_access";
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
pub const USER_OBJ: u16 = 0x01;
pub const USER: u16 = 0x02;
pub const GROUP_OBJ: u16 = 0x04;
pub const GROUP: u16 = 0x08;
pub const MASK: u16 = 0x10;
pub const OTHER: u16 = 0x20;
const UNDEFINED_ID: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AclEntry {
    pub tag: u16,
    pub perm: u16,
    pub id: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl(pub Vec<AclEntry>);

fn order(tag: u16) -> u8 {
    match tag {
        USER_OBJ => 0,
        USER => 1,
        GROUP_OBJ => 2,
        GROUP => 3,
        MASK => 4,
        _ => 5,
    }
}

impl Acl {
    /// Parses and validates (as `posix_acl_valid`): EINVAL when malformed.
    /// An empty ACL (header only) is valid and has no entries.
    pub fn parse(v: &[u8]) -> Result<Acl> {
        if v.len() < 4 || !(v.len() - 4).is_multiple_of(8) {
            return Err(Errno::EINVAL);
        }
        let version = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
        if version != VERSION {
            return Err(Errno(libc::EOPNOTSUPP));
        }
        let entries: Vec<AclEntry> = v[4..]
            .chunks_exact(8)
            .map(|e| AclEntry {
                tag: u16::from_le_bytes([e[0], e[1]]),
                perm: u16::from_le_bytes([e[2], e[3]]),
                id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            })
            .collect();
        let acl = Acl(entries);
        if !acl.0.is_empty() {
            acl.validate()?;
        }
        Ok(acl)
    }

    fn validate(&self) -> Result<()> {
        let bad = Err(Errno::EINVAL);
        let (mut user_obj, mut group_obj, mut mask, mut other, mut named) = (0, 0, 0, 0, 0);
        let mut last: Option<u8> = None;
        for e in &self.0 {
            if e.perm & !7 != 0 {
                return bad;
            }
            match e.tag {
                USER_OBJ => user_obj += 1,
                GROUP_OBJ => group_obj += 1,
                MASK => mask += 1,
                OTHER => other += 1,
                USER | GROUP => {
                    named += 1;
                    if e.id == UNDEFINED_ID {
                        return bad;
                    }
                }
                _ => return bad,
            }
            // Canonical tag order (as the kernel's posix_acl_valid state machine).
            let key = order(e.tag);
            if let Some(prev) = last {
                if key < prev || (key == prev && !matches!(e.tag, USER | GROUP)) {
                    return bad;
                }
            }
            last = Some(key);
        }
        if user_obj != 1 || group_obj != 1 || other != 1 || mask > 1 || (named > 0 && mask != 1) {
            return bad;
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(4 + 8 * self.0.len());
        v.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.0 {
            v.extend_from_slice(&e.tag.to_le_bytes());
            v.extend_from_slice(&e.perm.to_le_bytes());
            v.extend_from_slice(&e.id.to_le_bytes());
        }
        v
    }

    fn perm_of(&self, tag: u16) -> Option<u16> {
        self.0.iter().find(|e| e.tag == tag).map(|e| e.perm)
    }

    /// Whether the ACL says no more than the nine permission bits do.
    pub fn is_minimal(&self) -> bool {
        self.0
            .iter()
            .all(|e| matches!(e.tag, USER_OBJ | GROUP_OBJ | OTHER))
    }

    /// The 0o777 bits the ACL implies: owner = USER_OBJ, group = MASK (or GROUP_OBJ),
    /// other = OTHER (as `posix_acl_equiv_mode` / `posix_acl_update_mode`).
    pub fn mode_bits(&self) -> u32 {
        let u = self.perm_of(USER_OBJ).unwrap_or(0) as u32;
        let g = self
            .perm_of(MASK)
            .or_else(|| self.perm_of(GROUP_OBJ))
            .unwrap_or(0) as u32;
        let o = self.perm_of(OTHER).unwrap_or(0) as u32;
        (u << 6) | (g << 3) | o
    }

    /// Makes the ACL follow a chmod (`posix_acl_chmod`): USER_OBJ, MASK (or GROUP_OBJ
    /// when there is no mask) and OTHER take the new mode's bits.
    pub fn chmod(&mut self, mode: u32) {
        let has_mask = self.0.iter().any(|e| e.tag == MASK);
        for e in &mut self.0 {
            match e.tag {
                USER_OBJ => e.perm = ((mode >> 6) & 7) as u16,
                MASK => e.perm = ((mode >> 3) & 7) as u16,
                GROUP_OBJ if !has_mask => e.perm = ((mode >> 3) & 7) as u16,
                OTHER => e.perm = (mode & 7) as u16,
                _ => {}
            }
        }
    }

    /// `posix_acl_create_masq`: derives a new object's access ACL from the parent's
    /// default ACL (`self`) and the requested `mode`; returns the new mode (file type and
    /// special bits kept) and the access ACL, or `None` when it is equivalent to the mode.
    pub fn create(&self, mode: u32) -> (u32, Option<Acl>) {
        let mut acl = self.clone();
        let mut mode = mode;
        let mut not_equiv = false;
        let mut group_obj = None;
        let mut mask_obj = None;
        for (i, e) in acl.0.iter_mut().enumerate() {
            match e.tag {
                USER_OBJ => {
                    e.perm &= ((mode >> 6) & 7) as u16;
                    mode &= ((e.perm as u32) << 6) | !0o700;
                }
                USER | GROUP => not_equiv = true,
                GROUP_OBJ => group_obj = Some(i),
                MASK => {
                    mask_obj = Some(i);
                    not_equiv = true;
                }
                OTHER => {
                    e.perm &= (mode & 7) as u16;
                    mode &= (e.perm as u32) | !0o007;
                }
                _ => {}
            }
        }
        let g = mask_obj.or(group_obj);
        if let Some(i) = g {
            let e = &mut acl.0[i];
            e.perm &= ((mode >> 3) & 7) as u16;
            mode &= ((e.perm as u32) << 3) | !0o070;
        }
        (mode, not_equiv.then_some(acl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(e: &[(u16, u16, u32)]) -> Acl {
        Acl(e
            .iter()
            .map(|&(tag, perm, id)| AclEntry { tag, perm, id })
            .collect())
    }

    #[test]
    fn roundtrip_and_validation() {
        let a = acl(&[
            (USER_OBJ, 6, !0),
            (USER, 4, 65534),
            (GROUP_OBJ, 0, !0),
            (MASK, 4, !0),
            (OTHER, 0, !0),
        ]);
        let b = Acl::parse(&a.encode()).unwrap();
        assert_eq!(a, b);
        assert_eq!(b.mode_bits(), 0o640);
        // Missing mask with a named user, bad tag, bad length.
        let bad = acl(&[
            (USER_OBJ, 6, !0),
            (USER, 4, 65534),
            (GROUP_OBJ, 0, !0),
            (OTHER, 0, !0),
        ]);
        assert_eq!(Acl::parse(&bad.encode()), Err(Errno::EINVAL));
        assert_eq!(Acl::parse(&[2, 0, 0, 0, 1]), Err(Errno::EINVAL));
        let bad = acl(&[
            (USER_OBJ, 6, !0),
            (0x40, 4, 1),
            (GROUP_OBJ, 0, !0),
            (OTHER, 0, !0),
        ]);
        assert_eq!(Acl::parse(&bad.encode()), Err(Errno::EINVAL));
    }

    #[test]
    fn chmod_follows_mask() {
        let mut a = acl(&[
            (USER_OBJ, 6, !0),
            (USER, 4, 65534),
            (GROUP_OBJ, 0, !0),
            (MASK, 4, !0),
            (OTHER, 0, !0),
        ]);
        a.chmod(0o670);
        assert_eq!(a.mode_bits(), 0o670);
        assert_eq!(a.perm_of(GROUP_OBJ), Some(0));
        let mut m = acl(&[(USER_OBJ, 6, !0), (GROUP_OBJ, 4, !0), (OTHER, 4, !0)]);
        m.chmod(0o751);
        assert_eq!(m.mode_bits(), 0o751);
        assert!(m.is_minimal());
    }

    #[test]
    fn create_masks_by_mode() {
        let def = acl(&[
            (USER_OBJ, 7, !0),
            (USER, 5, 65534),
            (GROUP_OBJ, 5, !0),
            (MASK, 7, !0),
            (OTHER, 0, !0),
        ]);
        let (mode, a) = def.create(libc::S_IFREG | 0o666);
        assert_eq!(mode, libc::S_IFREG | 0o660);
        let a = a.unwrap();
        assert_eq!(a.mode_bits(), 0o660);
        assert_eq!(a.perm_of(USER), Some(5));
        let minimal = acl(&[(USER_OBJ, 7, !0), (GROUP_OBJ, 5, !0), (OTHER, 5, !0)]);
        let (mode, a) = minimal.create(libc::S_IFDIR | 0o777);
        assert_eq!(mode, libc::S_IFDIR | 0o755);
        assert!(a.is_none());
    }
}
