//! Directory-attribute hints: after a request changes a directory's entries, the
//! directory's new attributes go to the supervisor's relay just before the reply.
//!
//! The kernel drops a directory's cached attributes whenever its entries change, and
//! with `default_permissions` it must have them again before the next lookup in it: a
//! GETATTR round trip after every create, unlink, mkdir, rmdir, rename and link. To a
//! VM appliance under emulation that round trip costs as much as the change itself.
//! With the attributes sent ahead, the relay answers that GETATTR on its own
//! ([`fsva_protocol::hint`]; the relay decides whether the hint is still true).
//!
//! A MKDIR also says, when the backend compares the new directory's names byte for
//! byte, that the directory is empty: a relay that then sees every name enter and
//! leave it can answer the LOOKUP the kernel sends before each create in it.
//!
//! Owns which requests produce hints and how they are sent. Only for stream channels
//! to a relay that knows the appliance is the only writer (the server is told); it
//! never sends a hint for a request that failed, nor for anything but a directory.

use fsva_channel::{Channel, ChannelError};
use fsva_protocol::abi::{opcode, AttrOut, EntryOut, InHeader, OutHeader};
use fsva_protocol::hint::{self, DirAttrHint, EmptyDirHint};
use fsva_protocol::reply::ReplyBuf;
use fsva_protocol::request::{decode, Negotiated, Operation};
use zerocopy::FromBytes;

use crate::filesystem::{Context, Filesystem};

/// The directories whose entries `request` changed, given that it succeeded: its
/// parent, and for a rename the new parent too (once if they are the same).
pub fn changed_dirs(request: &[u8]) -> Vec<u64> {
    let Ok((h, _)) = InHeader::read_from_prefix(request) else {
        return Vec::new();
    };
    match h.opcode {
        opcode::CREATE
        | opcode::MKNOD
        | opcode::MKDIR
        | opcode::SYMLINK
        | opcode::UNLINK
        | opcode::RMDIR
        | opcode::LINK => vec![h.nodeid],
        opcode::RENAME | opcode::RENAME2 => {
            // The layout of RENAME's arguments does not depend on INIT.
            match decode(request, &Negotiated::default()).map(|r| r.op) {
                Ok(Operation::Rename { newdir, .. }) if newdir != h.nodeid => {
                    vec![h.nodeid, newdir]
                }
                _ => vec![h.nodeid],
            }
        }
        _ => Vec::new(),
    }
}

/// Sends the hints for `request` (answered by `reply`) on `chan`, before the reply.
pub fn send(
    chan: &dyn Channel,
    fs: &dyn Filesystem,
    request: &[u8],
    reply: &[u8],
    buf: &mut ReplyBuf,
) -> Result<(), ChannelError> {
    let body = match OutHeader::read_from_prefix(reply) {
        Ok((h, body)) if h.error == 0 => body,
        _ => return Ok(()),
    };
    let Ok((h, _)) = InHeader::read_from_prefix(request) else {
        return Ok(());
    };
    if h.opcode == opcode::MKDIR {
        if let Ok((entry, _)) = EntryOut::read_from_prefix(body) {
            if fs.names_exact(entry.nodeid) {
                let empty = EmptyDirHint {
                    unique: h.unique,
                    nodeid: entry.nodeid,
                };
                chan.send(hint::empty_dir(buf, &empty))?;
            }
        }
    }
    let ctx = Context {
        unique: h.unique,
        uid: h.uid,
        gid: h.gid,
        pid: h.pid,
        supp_group: None,
    };
    for dir in changed_dirs(request) {
        // A directory that cannot be read now gets no hint: the kernel will ask.
        let Ok((attr, ttl)) = fs.getattr(&ctx, dir, None) else {
            continue;
        };
        if attr.mode & libc::S_IFMT != libc::S_IFDIR {
            continue;
        }
        let hint = DirAttrHint {
            unique: h.unique,
            nodeid: dir,
            attr: AttrOut {
                attr_valid: ttl.as_secs(),
                attr_valid_nsec: ttl.subsec_nanos(),
                dummy: 0,
                attr,
            },
        };
        chan.send(hint::dir_attr(buf, &hint))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fsva_protocol::abi::RenameIn;
    use zerocopy::IntoBytes;

    fn frame(op: u32, node: u64, body: &[u8]) -> Vec<u8> {
        let header = InHeader {
            len: (core::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode: op,
            unique: 2,
            nodeid: node,
            ..Default::default()
        };
        let mut f = header.as_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn namespace_changes_name_their_directories_and_nothing_else_does() {
        assert_eq!(changed_dirs(&frame(opcode::UNLINK, 7, b"a\0")), vec![7]);
        assert_eq!(changed_dirs(&frame(opcode::MKDIR, 7, &[0; 12])), vec![7]);
        assert!(changed_dirs(&frame(opcode::GETATTR, 7, &[0; 16])).is_empty());
        assert!(changed_dirs(&frame(opcode::WRITE, 7, &[0; 40])).is_empty());
        assert!(changed_dirs(&frame(opcode::SETATTR, 7, &[0; 88])).is_empty());

        let mut body = RenameIn { newdir: 9 }.as_bytes().to_vec();
        body.extend_from_slice(b"a\0b\0");
        assert_eq!(changed_dirs(&frame(opcode::RENAME, 7, &body)), vec![7, 9]);
        let mut body = RenameIn { newdir: 7 }.as_bytes().to_vec();
        body.extend_from_slice(b"a\0b\0");
        assert_eq!(changed_dirs(&frame(opcode::RENAME, 7, &body)), vec![7]);
    }
}
