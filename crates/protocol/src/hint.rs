//! fsva's own frames on a stream channel: what an appliance tells the supervisor's
//! relay beyond FUSE. The kernel never sees them.
//!
//! A hint is framed like a FUSE notification (`unique == 0`) with a code far above any
//! the kernel defines, so a relay that does not know it can tell it from a kernel
//! notification. Each is sent just before the reply to the request it speaks of:
//! - the attributes of a directory the request just changed, so the relay can answer
//!   the GETATTR the kernel sends for the directory next (it drops a directory's
//!   attributes whenever its entries change);
//! - that the directory a MKDIR just made is empty and compares names byte for byte,
//!   so the relay, seeing every name that enters or leaves it after, can answer the
//!   LOOKUP of a name it does not hold (the kernel looks a name up before creating it).
//!
//! Owns the layout and its encoding and decoding; never decides when a hint may be
//! trusted (that is the relay's job).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::abi::{AttrOut, OutHeader};
use crate::reply::ReplyBuf;

/// The `error` field of a directory-attributes hint ("FS" and 1).
pub const DIR_ATTR: i32 = 0x4653_0001;

/// The body of a directory-attributes hint.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct DirAttrHint {
    /// The request whose effect these attributes include.
    pub unique: u64,
    /// The directory.
    pub nodeid: u64,
    /// What a GETATTR of the directory would have answered.
    pub attr: AttrOut,
}

/// The `error` field of an empty-directory hint ("FS" and 2).
pub const EMPTY_DIR: i32 = 0x4653_0002;

/// The body of an empty-directory hint.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
pub struct EmptyDirHint {
    /// The MKDIR that made the directory.
    pub unique: u64,
    /// The new directory: empty, and two names in it are the same name only if their
    /// bytes are (no case folding, no Unicode normalisation).
    pub nodeid: u64,
}

/// Encodes a directory-attributes hint into `buf`.
pub fn dir_attr<'a>(buf: &'a mut ReplyBuf, hint: &DirAttrHint) -> &'a [u8] {
    buf.notification(DIR_ATTR, &[hint.as_bytes()])
}

/// Encodes an empty-directory hint into `buf`.
pub fn empty_dir<'a>(buf: &'a mut ReplyBuf, hint: &EmptyDirHint) -> &'a [u8] {
    buf.notification(EMPTY_DIR, &[hint.as_bytes()])
}

/// Whether a frame from an appliance is a hint (rather than a reply or a kernel
/// notification).
pub fn is_hint(header: &OutHeader) -> bool {
    header.unique == 0 && matches!(header.error, DIR_ATTR | EMPTY_DIR)
}

/// Decodes an empty-directory hint frame (header included); `None` if it is another
/// frame or its length is not exactly a hint's.
pub fn decode_empty_dir(frame: &[u8]) -> Option<EmptyDirHint> {
    let (header, body) = OutHeader::read_from_prefix(frame).ok()?;
    if header.error != EMPTY_DIR {
        return None;
    }
    EmptyDirHint::read_from_bytes(body).ok()
}

/// Decodes a directory-attributes hint frame (header included); `None` if its length
/// is not exactly a hint's or its attributes are not a directory's.
pub fn decode_dir_attr(frame: &[u8]) -> Option<DirAttrHint> {
    let (header, body) = OutHeader::read_from_prefix(frame).ok()?;
    if header.error != DIR_ATTR {
        return None;
    }
    let hint = DirAttrHint::read_from_bytes(body).ok()?;
    (hint.attr.attr.mode & S_IFMT == S_IFDIR).then_some(hint)
}

/// The file type bits of a mode, and a directory's type, as Linux defines them.
const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(mode: u32) -> DirAttrHint {
        let mut h = DirAttrHint {
            unique: 9,
            nodeid: 4,
            ..Default::default()
        };
        h.attr.attr.mode = mode;
        h.attr.attr_valid = 60;
        h
    }

    #[test]
    fn a_hint_round_trips_and_is_told_from_replies_and_kernel_notifications() {
        let mut buf = ReplyBuf::default();
        let frame = dir_attr(&mut buf, &hint(0o040755)).to_vec();
        let (header, _) = OutHeader::read_from_prefix(&frame).unwrap();
        assert!(is_hint(&header));
        assert_eq!(decode_dir_attr(&frame), Some(hint(0o040755)));

        let reply = OutHeader {
            len: 16,
            error: DIR_ATTR,
            unique: 3,
        };
        assert!(!is_hint(&reply));
        let inval = OutHeader {
            len: 16,
            error: crate::abi::notify::INVAL_INODE,
            unique: 0,
        };
        assert!(!is_hint(&inval));
    }

    #[test]
    fn an_empty_directory_hint_round_trips_and_is_not_taken_for_the_other_kind() {
        let mut buf = ReplyBuf::default();
        let empty = EmptyDirHint {
            unique: 7,
            nodeid: 12,
        };
        let frame = empty_dir(&mut buf, &empty).to_vec();
        let (header, _) = OutHeader::read_from_prefix(&frame).unwrap();
        assert!(is_hint(&header));
        assert_eq!(decode_empty_dir(&frame), Some(empty));
        assert_eq!(decode_dir_attr(&frame), None);
        assert_eq!(decode_empty_dir(&frame[..frame.len() - 1]), None);
        let attrs = dir_attr(&mut buf, &hint(0o040755)).to_vec();
        assert_eq!(decode_empty_dir(&attrs), None);
    }

    #[test]
    fn a_hint_for_a_file_or_of_the_wrong_length_is_refused() {
        let mut buf = ReplyBuf::default();
        let frame = dir_attr(&mut buf, &hint(0o100644)).to_vec();
        assert_eq!(decode_dir_attr(&frame), None);
        let frame = dir_attr(&mut buf, &hint(0o040755)).to_vec();
        assert_eq!(decode_dir_attr(&frame[..frame.len() - 1]), None);
        let mut longer = frame.clone();
        longer.push(0);
        assert_eq!(decode_dir_attr(&longer), None);
    }
}
