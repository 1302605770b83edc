//! Extended attributes of one inode, stored as opaque bytes in any namespace.
//!
//! Owns the name/value table and the Linux error rules for it (XATTR_CREATE/REPLACE,
//! sizes, ERANGE/E2BIG). It must never interpret values (ACL semantics live in `acl`)
//! nor check permissions (the kernel filters namespaces and access).

use std::collections::BTreeMap;

use fsva_appliance::{Errno, Result, Xattr};

/// Longest attribute name (XATTR_NAME_MAX).
pub const NAME_MAX: usize = 255;
/// Largest attribute value (XATTR_SIZE_MAX).
pub const SIZE_MAX: usize = 65536;
/// Most bytes (names and values) one inode's attributes may hold, beyond which a set
/// answers ENOSPC, as a local file system whose attribute space is full does. It keeps
/// every change small enough for one recovery journal record, which carries an inode's
/// attributes whole.
pub const TOTAL_MAX: usize = 1 << 20;

#[derive(Debug, Default, Clone)]
pub struct Xattrs(BTreeMap<Vec<u8>, Vec<u8>>, Changed);

/// Whether the attributes changed since the recovery journal last recorded them.
#[derive(Debug, Default, Clone, Copy)]
struct Changed(bool);

/// Namespaces stored as plain bytes. The kernel's FUSE driver passes every name
/// through, so the namespace rules of local file systems (ext4, tmpfs) are applied here:
/// an unknown or missing namespace is EOPNOTSUPP, an empty suffix EINVAL.
const NAMESPACES: [&[u8]; 3] = [b"user.", b"trusted.", b"security."];
/// The only `system.` names: POSIX ACLs.
const SYSTEM_NAMES: [&[u8]; 2] = [b"system.posix_acl_access", b"system.posix_acl_default"];

fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(Errno(libc::ERANGE));
    }
    if SYSTEM_NAMES.contains(&name) {
        return Ok(());
    }
    match NAMESPACES.iter().find(|p| name.starts_with(p)) {
        Some(p) if name.len() == p.len() => Err(Errno::EINVAL),
        Some(_) => Ok(()),
        None => Err(Errno(libc::EOPNOTSUPP)),
    }
}

/// Answers a size-0 probe with the size, otherwise the data or ERANGE when it does not fit.
fn reply(data: &[u8], size: u32) -> Result<Xattr> {
    if size == 0 {
        Ok(Xattr::Size(data.len() as u32))
    } else if data.len() > size as usize {
        Err(Errno(libc::ERANGE))
    } else {
        Ok(Xattr::Data(data.to_vec()))
    }
}

impl Xattrs {
    /// Every (name, value), for a snapshot.
    pub(crate) fn pairs(&self) -> impl Iterator<Item = (&Vec<u8>, &Vec<u8>)> {
        self.0.iter()
    }

    /// Attributes restored from a snapshot (names were checked when first set).
    pub(crate) fn from_pairs(pairs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) -> Xattrs {
        Xattrs(pairs.into_iter().collect(), Changed(false))
    }

    /// Whether they changed since the last call (the journal records them only then).
    pub(crate) fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.1 .0)
    }

    /// setxattr(2) with `flags` XATTR_CREATE / XATTR_REPLACE.
    pub fn set(&mut self, name: &[u8], value: &[u8], flags: u32) -> Result<()> {
        check_name(name)?;
        if value.len() > SIZE_MAX {
            return Err(Errno(libc::E2BIG));
        }
        let create = flags & libc::XATTR_CREATE as u32 != 0;
        let replace = flags & libc::XATTR_REPLACE as u32 != 0;
        if flags & !(libc::XATTR_CREATE | libc::XATTR_REPLACE) as u32 != 0 {
            return Err(Errno::EINVAL);
        }
        let exists = self.0.contains_key(name);
        if create && exists {
            return Err(Errno(libc::EEXIST));
        }
        if replace && !exists {
            return Err(Errno(libc::ENODATA));
        }
        let old = self.0.get(name).map_or(0, |v| name.len() + v.len());
        if self.total() - old + name.len() + value.len() > TOTAL_MAX {
            return Err(Errno(libc::ENOSPC));
        }
        self.0.insert(name.to_vec(), value.to_vec());
        self.1 = Changed(true);
        Ok(())
    }

    /// Bytes the attributes hold (names and values).
    fn total(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    pub fn get(&self, name: &[u8], size: u32) -> Result<Xattr> {
        check_name(name)?;
        let v = self.0.get(name).ok_or(Errno(libc::ENODATA))?;
        reply(v, size)
    }

    pub fn raw(&self, name: &[u8]) -> Option<&[u8]> {
        self.0.get(name).map(Vec::as_slice)
    }

    /// Stores without flag checks (for values the backend derives itself, e.g. ACLs).
    pub fn put(&mut self, name: &[u8], value: Vec<u8>) {
        self.0.insert(name.to_vec(), value);
        self.1 = Changed(true);
    }

    /// Removes; false when it was not there.
    pub fn take(&mut self, name: &[u8]) -> bool {
        let removed = self.0.remove(name).is_some();
        if removed {
            self.1 = Changed(true);
        }
        removed
    }

    pub fn remove(&mut self, name: &[u8]) -> Result<()> {
        check_name(name)?;
        if self.take(name) {
            Ok(())
        } else {
            Err(Errno(libc::ENODATA))
        }
    }

    /// listxattr(2): NUL-terminated names, concatenated.
    pub fn list(&self, size: u32) -> Result<Xattr> {
        let mut out = Vec::new();
        for k in self.0.keys() {
            out.extend_from_slice(k);
            out.push(0);
        }
        reply(&out, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors() {
        let mut x = Xattrs::default();
        let c = libc::XATTR_CREATE as u32;
        let r = libc::XATTR_REPLACE as u32;
        assert_eq!(x.set(b"user.a", b"1", r), Err(Errno(libc::ENODATA)));
        x.set(b"user.a", b"1", c).unwrap();
        assert_eq!(x.set(b"user.a", b"2", c), Err(Errno(libc::EEXIST)));
        x.set(b"user.a", b"22", r).unwrap();
        assert!(matches!(x.get(b"user.a", 0), Ok(Xattr::Size(2))));
        assert_eq!(x.get(b"user.a", 1).unwrap_err(), Errno(libc::ERANGE));
        assert_eq!(x.get(b"user.b", 10).unwrap_err(), Errno(libc::ENODATA));
        assert_eq!(
            x.set(b"user.big", &vec![0; SIZE_MAX + 1], 0),
            Err(Errno(libc::E2BIG))
        );
        x.set(b"user.max", &vec![0; SIZE_MAX], 0).unwrap();
        let long = vec![b'a'; 256];
        assert_eq!(x.set(&long, b"", 0), Err(Errno(libc::ERANGE)));
        assert_eq!(x.set(b"plain", b"", 0), Err(Errno(libc::EOPNOTSUPP)));
        assert_eq!(x.set(b"system.other", b"", 0), Err(Errno(libc::EOPNOTSUPP)));
        assert_eq!(x.set(b"user.", b"", 0), Err(Errno::EINVAL));
        assert_eq!(x.get(b"bogus.x", 10).unwrap_err(), Errno(libc::EOPNOTSUPP));
        match x.list(100).unwrap() {
            Xattr::Data(d) => assert_eq!(d, b"user.a\0user.max\0"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(x.list(0), Ok(Xattr::Size(16))));
        assert_eq!(x.list(3).unwrap_err(), Errno(libc::ERANGE));
        x.remove(b"user.a").unwrap();
        assert_eq!(x.remove(b"user.a"), Err(Errno(libc::ENODATA)));
        // The inode's attribute space is bounded (ENOSPC), but values can be replaced.
        let mut y = Xattrs::default();
        let value = vec![7u8; SIZE_MAX];
        let mut i = 0;
        let full = loop {
            match y.set(format!("user.{i}").as_bytes(), &value, 0) {
                Ok(()) => i += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(full, Errno(libc::ENOSPC));
        assert!(y.total() <= TOTAL_MAX && i >= 15, "{} attributes fit", i);
        y.set(b"user.0", b"small", 0).unwrap();
    }
}
