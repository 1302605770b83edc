//! fsva's own frames on a stream channel: what an appliance tells the supervisor's
//! relay beyond FUSE. The kernel never sees them.
//!
//! A hint is framed like a FUSE notification (`unique == 0`) with a code far above any
//! the kernel defines, so a relay that does not know it can tell it from a kernel
//! notification. Today there is one: the attributes of a directory just changed by a
//! request, sent just before that request's reply, so the relay can answer the
//! GETATTR the kernel sends for the directory next (it drops a directory's
//! attributes whenever its entries change).
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

/// Encodes a directory-attributes hint into `buf`.
pub fn dir_attr<'a>(buf: &'a mut ReplyBuf, hint: &DirAttrHint) -> &'a [u8] {
    buf.notification(DIR_ATTR, &[hint.as_bytes()])
}

/// Whether a frame from an appliance is a hint (rather than a reply or a kernel
/// notification).
pub fn is_hint(header: &OutHeader) -> bool {
    header.unique == 0 && header.error == DIR_ATTR
}

/// Decodes a directory-attributes hint frame (header included); `None` if its length
/// is not exactly a hint's or its attributes are not a directory's.
pub fn decode_dir_attr(frame: &[u8]) -> Option<DirAttrHint> {
    let body = frame.get(core::mem::size_of::<OutHeader>()..)?;
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
