//! Directory attributes a relay holds from the appliance's hints, so it can answer the
//! GETATTR the FUSE client (the host kernel, or a guest's virtiofs driver) sends after
//! every change of a directory's entries.
//!
//! The appliance sends a directory's attributes just before the reply to a request
//! that changed it ([`fsva_protocol::hint`], `fsva_appliance::dir_hints`). A hint is
//! true when the appliance computed it; it stays true while no request that could
//! change the directory has been forwarded since. So the relay numbers every
//! forwarded request that may change something, remembers for each directory the
//! number of the last one that named it, and takes a hint only if that last one is
//! the hint's own request. A request naming a directory drops what is held for it.
//! Some changes do not name the directory they change: a rename or rmdir changes the
//! moved or removed directory (its ctime, its link count), which appears in no header,
//! so both drop everything held, and hints from requests forwarded before them. An
//! opcode the relay does not know is treated the same way. The kernel does not lock a
//! directory moved by a rename, so a change inside it, forwarded after the rename, may
//! run before it and send a hint with the old ctime: while a rename (or an unknown
//! request) is in flight no other request's hint is taken, and when its reply comes
//! back everything held is dropped but what its own hints said of its two parents
//! (their locks keep every other change of them out), with every hint of a request
//! forwarded until then.
//!
//! Owns that table and those rules, for an appliance that is the only writer of its
//! file system (nothing else can change a directory behind the relay's back). It
//! never answers for anything but a plain GETATTR of a directory it holds, and holds
//! at most [`MAX_HELD`] directories. Access times are not tracked: the kernel is told
//! to trust a directory's attributes for as long as the appliance says anyway.

use std::collections::HashMap;
use std::sync::Mutex;

use fsva_protocol::abi::{opcode, AttrOut, InHeader};
use fsva_protocol::hint::DirAttrHint;
use fsva_protocol::request::Operation;

/// Most directories held (and directories remembered as changed) before starting over.
pub const MAX_HELD: usize = 1 << 16;

/// What the relay should do with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Answer with these attributes; do not forward.
    Answer(AttrOut),
    /// Forward it, keeping this ticket with it for its hints and its reply. `None`:
    /// the request changes nothing.
    Forward(Option<Ticket>),
}

/// A forwarded changing request, as the table knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// Its number among changing requests.
    pub number: u64,
    /// It may change a directory no header names (rename, or an opcode not known):
    /// its reply must be handed to [`DirAttrs::on_reply`].
    pub wide: bool,
}

#[derive(Default)]
struct Table {
    held: HashMap<u64, AttrOut>,
    /// Directory (or any node named as a request's target) → the number of the last
    /// changing request that named it.
    named: HashMap<u64, u64>,
    /// The number of the last changing request forwarded.
    last: u64,
    /// Hints from requests numbered below this are not taken.
    floor: u64,
    /// Wide requests forwarded and not answered yet, by number.
    wide: std::collections::BTreeSet<u64>,
}

impl Table {
    fn drop_everything(&mut self, from: u64) {
        self.held.clear();
        self.named.clear();
        self.floor = from;
    }

    fn name(&mut self, node: u64, number: u64) {
        self.held.remove(&node);
        if self.named.len() >= MAX_HELD && !self.named.contains_key(&node) {
            self.drop_everything(number);
        }
        self.named.insert(node, number);
    }
}

/// The table, shared by a relay's request threads and its reply thread.
#[derive(Default)]
pub struct DirAttrs {
    table: Mutex<Table>,
}

/// Requests that change nothing on the file system (or only a file's data and times,
/// which no directory's attributes include).
pub(crate) fn changes_nothing(op: u32) -> bool {
    matches!(
        op,
        opcode::LOOKUP
            | opcode::GETATTR
            | opcode::READLINK
            | opcode::OPEN
            | opcode::READ
            | opcode::WRITE
            | opcode::STATFS
            | opcode::RELEASE
            | opcode::FSYNC
            | opcode::GETXATTR
            | opcode::LISTXATTR
            | opcode::FLUSH
            | opcode::INIT
            | opcode::OPENDIR
            | opcode::READDIR
            | opcode::READDIRPLUS
            | opcode::RELEASEDIR
            | opcode::FSYNCDIR
            | opcode::GETLK
            | opcode::SETLK
            | opcode::SETLKW
            | opcode::ACCESS
            | opcode::INTERRUPT
            | opcode::LSEEK
            | opcode::STATX
            | opcode::SYNCFS
            | opcode::NOTIFY_REPLY
    )
}

impl DirAttrs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Looks at a request on its way to the appliance (`frame` is the whole request,
    /// `header` its decoded header).
    pub fn on_request(&self, header: &InHeader, op: Option<&Operation>) -> Verdict {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        match header.opcode {
            opcode::GETATTR => {
                let plain = matches!(op, Some(Operation::Getattr(a))
                    if a.getattr_flags & fsva_protocol::abi::flags::GETATTR_FH == 0);
                match t.held.get(&header.nodeid) {
                    Some(attr) if plain => Verdict::Answer(*attr),
                    _ => Verdict::Forward(None),
                }
            }
            code if changes_nothing(code) => Verdict::Forward(None),
            opcode::FORGET => {
                t.held.remove(&header.nodeid);
                t.named.remove(&header.nodeid);
                Verdict::Forward(None)
            }
            opcode::BATCH_FORGET => {
                if let Some(Operation::BatchForget(nodes)) = op {
                    for n in nodes {
                        t.held.remove(&n.nodeid);
                        t.named.remove(&n.nodeid);
                    }
                }
                Verdict::Forward(None)
            }
            code => {
                t.last += 1;
                let number = t.last;
                let mut wide = false;
                match code {
                    opcode::CREATE
                    | opcode::MKNOD
                    | opcode::MKDIR
                    | opcode::SYMLINK
                    | opcode::UNLINK
                    | opcode::LINK
                    | opcode::SETATTR
                    | opcode::SETXATTR
                    | opcode::REMOVEXATTR
                    | opcode::FALLOCATE
                    | opcode::COPY_FILE_RANGE
                    | opcode::COPY_FILE_RANGE_64
                    | opcode::TMPFILE => t.name(header.nodeid, number),
                    opcode::RENAME | opcode::RENAME2 => {
                        wide = true;
                        t.drop_everything(number);
                        t.name(header.nodeid, number);
                        if let Some(Operation::Rename { newdir, .. }) = op {
                            t.name(*newdir, number);
                        }
                    }
                    opcode::RMDIR => {
                        t.drop_everything(number);
                        t.name(header.nodeid, number);
                    }
                    // Not known to change only what it names.
                    _ => {
                        wide = true;
                        t.drop_everything(number + 1);
                    }
                }
                if wide {
                    t.wide.insert(number);
                }
                Verdict::Forward(Some(Ticket { number, wide }))
            }
        }
    }

    /// Takes a hint that came with the reply to the request forwarded as `number`.
    pub fn on_hint(&self, hint: &DirAttrHint, number: u64) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let no_wide_besides = t.wide.iter().all(|w| *w == number);
        let current =
            number >= t.floor && no_wide_besides && t.named.get(&hint.nodeid) == Some(&number);
        if current && (t.held.len() < MAX_HELD || t.held.contains_key(&hint.nodeid)) {
            t.held.insert(hint.nodeid, hint.attr);
        }
    }

    /// Hands over the reply to a request forwarded with `ticket` (before the kernel
    /// gets it). After a wide request, everything held is dropped but what its own
    /// hints said, and every hint of a request forwarded so far is refused.
    pub fn on_reply(&self, ticket: Ticket) {
        if !ticket.wide {
            return;
        }
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.wide.remove(&ticket.number);
        let Table { held, named, .. } = &mut *t;
        held.retain(|node, _| named.get(node) == Some(&ticket.number));
        t.floor = t.last + 1;
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .held
            .len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_frames;
    use fsva_protocol::abi::{GetattrIn, RenameIn};
    use fsva_protocol::request::{decode, Negotiated};
    use zerocopy::IntoBytes;

    fn ask(d: &DirAttrs, op: u32, node: u64, body: &[u8]) -> Verdict {
        let (h, f) = test_frames::request(op, node, 1, body);
        let request = decode(&f, &Negotiated::default()).ok();
        d.on_request(&h, request.as_ref().map(|r| &r.op))
    }

    fn getattr(d: &DirAttrs, node: u64) -> Verdict {
        ask(d, opcode::GETATTR, node, GetattrIn::default().as_bytes())
    }

    fn hint(node: u64, size: u64) -> DirAttrHint {
        let mut h = DirAttrHint {
            unique: 1,
            nodeid: node,
            ..Default::default()
        };
        h.attr.attr.mode = 0o040755;
        h.attr.attr.size = size;
        h
    }

    /// Forwards a changing request on `node` and takes its hint.
    fn change(d: &DirAttrs, op: u32, node: u64, size: u64) -> u64 {
        let t = forward(d, op, node, b"x\0");
        d.on_hint(&hint(node, size), t.number);
        d.on_reply(t);
        t.number
    }

    #[test]
    fn the_getattr_after_a_change_is_answered_with_the_hint() {
        let d = DirAttrs::new();
        assert_eq!(getattr(&d, 2), Verdict::Forward(None));
        change(&d, opcode::UNLINK, 2, 4096);
        assert_eq!(getattr(&d, 2), Verdict::Answer(hint(2, 4096).attr));
        // A GETATTR through an open file handle is forwarded.
        let with_fh = GetattrIn {
            getattr_flags: fsva_protocol::abi::flags::GETATTR_FH,
            ..Default::default()
        };
        assert_eq!(
            ask(&d, opcode::GETATTR, 2, with_fh.as_bytes()),
            Verdict::Forward(None)
        );
        // Reads change nothing.
        ask(&d, opcode::READDIRPLUS, 2, &[0; 40]);
        ask(&d, opcode::LOOKUP, 2, b"x\0");
        assert!(matches!(getattr(&d, 2), Verdict::Answer(_)));
    }

    #[test]
    fn a_hint_overtaken_by_another_change_of_its_directory_is_not_taken() {
        let d = DirAttrs::new();
        let first = forward(&d, opcode::CREATE, 2, b"a\0").number;
        let second = forward(&d, opcode::UNLINK, 2, b"b\0").number;
        d.on_hint(&hint(2, 1), first);
        assert_eq!(getattr(&d, 2), Verdict::Forward(None));
        d.on_hint(&hint(2, 2), second);
        assert_eq!(getattr(&d, 2), Verdict::Answer(hint(2, 2).attr));
        // A change of another directory in between does not matter.
        let third = forward(&d, opcode::MKDIR, 2, b"c\0").number;
        change(&d, opcode::MKDIR, 3, 7);
        d.on_hint(&hint(2, 3), third);
        assert_eq!(getattr(&d, 2), Verdict::Answer(hint(2, 3).attr));
    }

    #[test]
    fn a_request_naming_the_directory_drops_it() {
        let d = DirAttrs::new();
        for op in [opcode::SETATTR, opcode::SETXATTR, opcode::REMOVEXATTR] {
            change(&d, opcode::CREATE, 2, 1);
            assert!(matches!(getattr(&d, 2), Verdict::Answer(_)));
            ask(&d, op, 2, &[0; 96]);
            assert_eq!(getattr(&d, 2), Verdict::Forward(None), "opcode {op}");
        }
        change(&d, opcode::CREATE, 2, 1);
        ask(&d, opcode::FORGET, 2, &1u64.to_ne_bytes());
        assert_eq!(getattr(&d, 2), Verdict::Forward(None));
    }

    fn forward(d: &DirAttrs, op: u32, node: u64, body: &[u8]) -> Ticket {
        match ask(d, op, node, body) {
            Verdict::Forward(Some(t)) => t,
            other => panic!("opcode {op} must be forwarded with a ticket, got {other:?}"),
        }
    }

    fn rename(d: &DirAttrs, from: u64, to: u64) -> Ticket {
        let mut body = RenameIn { newdir: to }.as_bytes().to_vec();
        body.extend_from_slice(b"a\0b\0");
        forward(d, opcode::RENAME, from, &body)
    }

    #[test]
    fn rename_and_rmdir_drop_everything_held_and_older_hints() {
        for op in [opcode::RENAME, opcode::RMDIR] {
            let d = DirAttrs::new();
            change(&d, opcode::MKDIR, 5, 1);
            let pending = forward(&d, opcode::CREATE, 6, b"f\0").number;
            let mut body = RenameIn { newdir: 8 }.as_bytes().to_vec();
            body.extend_from_slice(b"a\0b\0");
            let t = forward(&d, op, 7, &body);
            assert_eq!(t.wide, op == opcode::RENAME);
            assert_eq!(getattr(&d, 5), Verdict::Forward(None), "opcode {op}");
            d.on_hint(&hint(6, 1), pending);
            assert_eq!(getattr(&d, 6), Verdict::Forward(None), "opcode {op}");
            // Its own hints are taken, and kept past its reply.
            d.on_hint(&hint(7, 1), t.number);
            d.on_reply(t);
            assert!(matches!(getattr(&d, 7), Verdict::Answer(_)), "opcode {op}");
        }
        let d = DirAttrs::new();
        let t = rename(&d, 7, 8);
        d.on_hint(&hint(8, 1), t.number);
        d.on_reply(t);
        assert!(matches!(getattr(&d, 8), Verdict::Answer(_)));
    }

    /// The kernel does not lock the directory a rename moves: a create inside it,
    /// forwarded after the rename, may run before it and report the old ctime.
    #[test]
    fn no_other_hint_is_taken_while_a_rename_is_in_flight_nor_after_from_before_its_reply() {
        let d = DirAttrs::new();
        let r = rename(&d, 7, 8);
        let inside = forward(&d, opcode::CREATE, 9, b"f\0");
        d.on_hint(&hint(9, 1), inside.number);
        assert_eq!(getattr(&d, 9), Verdict::Forward(None));

        let late = forward(&d, opcode::CREATE, 10, b"f\0");
        d.on_hint(&hint(7, 1), r.number);
        d.on_reply(r);
        // Forwarded before the rename's reply: its hint may predate the rename.
        d.on_hint(&hint(10, 1), late.number);
        assert_eq!(getattr(&d, 10), Verdict::Forward(None));
        assert!(matches!(getattr(&d, 7), Verdict::Answer(_)));
        // After the reply, hints are taken again.
        change(&d, opcode::CREATE, 10, 2);
        assert_eq!(getattr(&d, 10), Verdict::Answer(hint(10, 2).attr));
    }

    #[test]
    fn an_unknown_opcode_drops_everything_and_every_hint_in_flight() {
        let d = DirAttrs::new();
        change(&d, opcode::CREATE, 2, 1);
        let pending = forward(&d, opcode::CREATE, 3, b"f\0");
        let unknown = forward(&d, 9999, 4, &[]);
        assert!(unknown.wide);
        assert_eq!(getattr(&d, 2), Verdict::Forward(None));
        d.on_hint(&hint(3, 1), pending.number);
        d.on_hint(&hint(4, 1), unknown.number);
        d.on_reply(unknown);
        assert!(d.is_empty());
    }
}
