//! Names a relay knows a directory lacks, so it can answer the LOOKUP the FUSE client
//! sends before every create (open with O_CREAT, mkdir, mknod, symlink, link, a
//! rename's new name) without a round trip to the appliance.
//!
//! The relay knows a directory's names when the appliance said, with its MKDIR's
//! reply, that the new directory is empty and compares names as bytes
//! ([`fsva_protocol::hint::EmptyDirHint`]). From then on every name that enters or
//! leaves it does so through a request the relay forwards: a successful CREATE,
//! MKNOD, MKDIR, SYMLINK or LINK adds one, UNLINK and RMDIR take one away, RENAME
//! moves one (RENAME_EXCHANGE moves none; RENAME_WHITEOUT leaves the old name
//! behind). The table changes when the reply passes, before the client sees it. A
//! change in a directory holds the directory's lock in the client from its request to
//! its reply, so a LOOKUP under that lock cannot overlap it; one that can (a cached
//! entry being checked again) is answered as it was before the change, which is what
//! it would see if it had come first. A create or rename that fails (it may have made
//! its name first), or a change the relay cannot follow (an unknown RENAME flag, an
//! undecodable request), makes it forget the directories involved, or everything; a
//! removal that fails leaves its name held. The reply to an opcode it does not know
//! makes it forget everything, unless that reply is ENOSYS (fsva's appliances answer
//! IOCTL so, and an opcode not served changed nothing).
//!
//! A directory is not held if a request put a name in it while its MKDIR was in flight
//! (only a caller guessing its node id for `open_by_handle_at` could), and `.`, `..`
//! and names longer than `NAME_MAX` are always forwarded (the kernel asks for `..` to
//! reconnect a file handle; the appliance answers ENAMETOOLONG, not ENOENT).
//!
//! Owns that table and those rules, for an appliance that is the only writer of its
//! file system. It answers nothing but ENOENT to a LOOKUP in a directory it holds,
//! holds at most [`MAX_NAME_BYTES`] of names, and never holds a directory the
//! appliance did not vouch for (a file system that folds case or normalises names).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use fsva_protocol::abi::{opcode, EntryOut, InHeader, OutHeader};
use fsva_protocol::hint::EmptyDirHint;
use fsva_protocol::request::Operation;
use zerocopy::FromBytes;

/// Most memory for names held (their bytes and a set entry each) before starting over.
pub const MAX_NAME_BYTES: usize = 32 << 20;
/// What a held name costs beyond its bytes: its box and its set slot.
const NAME_OVERHEAD: usize = 32;
/// Longest name a LOOKUP may be answered for (Linux's `NAME_MAX`).
const NAME_MAX: usize = 255;

/// `renameat2` flags, as Linux defines them.
const RENAME_NOREPLACE: u32 = 1;
const RENAME_EXCHANGE: u32 = 2;
const RENAME_WHITEOUT: u32 = 4;

/// What the relay should do with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Answer ENOENT now; do not forward.
    Absent,
    /// Forward it; hand its reply to [`AbsentNames::on_reply`] with this, if any.
    Forward(Option<Change>),
}

/// A forwarded request that changes names, waiting for its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    id: u64,
}

/// What a change does to the names, recorded when it is forwarded.
#[derive(Debug)]
enum Effect {
    /// `name` enters `dir`; for a MKDIR, `empty` is the new directory the appliance
    /// vouched for (learned from its hint before the reply).
    Add {
        dir: u64,
        name: Box<[u8]>,
        mkdir: bool,
        empty: Option<u64>,
    },
    /// `name` leaves `dir`.
    Remove { dir: u64, name: Box<[u8]> },
    /// `name` leaves `from` (unless `keep`) and `newname` enters `to`.
    Move {
        from: u64,
        name: Box<[u8]>,
        to: u64,
        newname: Box<[u8]>,
        keep: bool,
    },
    /// An opcode not known to leave names alone: anything may change.
    Unknown,
}

#[derive(Default)]
struct Table {
    /// Directories whose every name is known, with those names.
    known: HashMap<u64, HashSet<Box<[u8]>>>,
    /// Names held in all, and what they cost (see [`MAX_NAME_BYTES`]).
    names: usize,
    bytes: usize,
    /// Changes forwarded and not answered yet.
    pending: HashMap<u64, Effect>,
    next_id: u64,
    /// MKDIRs forwarded and not answered yet, and the directories names were put in
    /// meanwhile (kept only while one is in flight).
    mkdirs: usize,
    filled_during_mkdir: HashSet<u64>,
}

fn cost(name: &[u8]) -> usize {
    name.len() + NAME_OVERHEAD
}

impl Table {
    fn forget(&mut self, dir: u64) {
        if let Some(names) = self.known.remove(&dir) {
            self.names -= names.len();
            self.bytes -= names.iter().map(|n| cost(n)).sum::<usize>();
        }
    }

    fn forget_everything(&mut self) {
        self.known.clear();
        self.names = 0;
        self.bytes = 0;
    }

    fn add(&mut self, dir: u64, name: Box<[u8]>) {
        if self.bytes + cost(&name) > MAX_NAME_BYTES {
            self.forget_everything();
        }
        if let Some(names) = self.known.get_mut(&dir) {
            let c = cost(&name);
            if names.insert(name) {
                self.names += 1;
                self.bytes += c;
            }
        }
    }

    fn remove(&mut self, dir: u64, name: &[u8]) {
        if let Some(names) = self.known.get_mut(&dir) {
            if names.remove(name) {
                self.names -= 1;
                self.bytes -= cost(name);
            }
        }
    }

    /// A name is about to be put in `dir`.
    fn filling(&mut self, dir: u64) {
        if self.mkdirs > 0 {
            self.filled_during_mkdir.insert(dir);
        }
    }

    fn expect(&mut self, effect: Effect) -> Verdict {
        match &effect {
            Effect::Add { dir, mkdir, .. } => {
                self.filling(*dir);
                if *mkdir {
                    self.mkdirs += 1;
                }
            }
            Effect::Move { to, .. } => self.filling(*to),
            Effect::Remove { .. } | Effect::Unknown => {}
        }
        self.next_id += 1;
        self.pending.insert(self.next_id, effect);
        Verdict::Forward(Some(Change { id: self.next_id }))
    }
}

/// The table, shared by a relay's request threads and its reply thread.
#[derive(Default)]
pub struct AbsentNames {
    table: Mutex<Table>,
}

/// Requests that never add or remove a name: those that change nothing a directory's
/// attributes show, and those that change a node without naming anything.
fn names_stay(op: u32) -> bool {
    crate::dir_attrs::changes_nothing(op)
        || matches!(
            op,
            opcode::SETATTR
                | opcode::SETXATTR
                | opcode::REMOVEXATTR
                | opcode::FALLOCATE
                | opcode::COPY_FILE_RANGE
                | opcode::COPY_FILE_RANGE_64
                | opcode::TMPFILE
                | opcode::DESTROY
        )
}

fn bytes(name: &std::ffi::OsStr) -> Box<[u8]> {
    name.as_encoded_bytes().into()
}

impl AbsentNames {
    pub fn new() -> Self {
        Self::default()
    }

    /// Looks at a request on its way to the appliance: its header, and its operation
    /// where [`crate::Answers`] decoded it (`None` for an opcode whose payload this
    /// table does not read, or a payload that did not decode).
    pub fn on_request(&self, header: &InHeader, op: Option<&Operation>) -> Verdict {
        if header.opcode != opcode::LOOKUP && names_stay(header.opcode) {
            return Verdict::Forward(None);
        }
        let dir = header.nodeid;
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        match (header.opcode, op) {
            (opcode::LOOKUP, Some(Operation::Lookup { name })) => {
                let name = name.as_encoded_bytes();
                let plain = !matches!(name, b"." | b"..") && name.len() <= NAME_MAX;
                match t.known.get(&dir) {
                    Some(names) if plain && !names.contains(name) => Verdict::Absent,
                    _ => Verdict::Forward(None),
                }
            }
            (opcode::LOOKUP, _) => Verdict::Forward(None),
            (opcode::FORGET, _) => {
                t.forget(dir);
                Verdict::Forward(None)
            }
            (opcode::BATCH_FORGET, Some(Operation::BatchForget(nodes))) => {
                for n in nodes {
                    t.forget(n.nodeid);
                }
                Verdict::Forward(None)
            }
            (
                _,
                Some(
                    Operation::Create { name, .. }
                    | Operation::Mknod { name, .. }
                    | Operation::Symlink { name, .. }
                    | Operation::Link { name, .. },
                ),
            ) => t.expect(Effect::Add {
                dir,
                name: bytes(name),
                mkdir: false,
                empty: None,
            }),
            (_, Some(Operation::Mkdir { name, .. })) => t.expect(Effect::Add {
                dir,
                name: bytes(name),
                mkdir: true,
                empty: None,
            }),
            (_, Some(Operation::Unlink { name } | Operation::Rmdir { name })) => {
                t.expect(Effect::Remove {
                    dir,
                    name: bytes(name),
                })
            }
            (
                _,
                Some(Operation::Rename {
                    newdir,
                    flags,
                    name,
                    newname,
                }),
            ) => {
                let (from, to) = (dir, *newdir);
                match *flags {
                    0 | RENAME_NOREPLACE | RENAME_WHITEOUT => t.expect(Effect::Move {
                        from,
                        name: bytes(name),
                        to,
                        newname: bytes(newname),
                        keep: *flags == RENAME_WHITEOUT,
                    }),
                    RENAME_EXCHANGE => Verdict::Forward(None),
                    _ => {
                        t.forget(from);
                        t.forget(to);
                        Verdict::Forward(None)
                    }
                }
            }
            // A known change whose payload did not decode: it is not followed.
            (
                opcode::CREATE
                | opcode::MKNOD
                | opcode::SYMLINK
                | opcode::LINK
                | opcode::MKDIR
                | opcode::UNLINK
                | opcode::RMDIR
                | opcode::RENAME
                | opcode::RENAME2
                | opcode::BATCH_FORGET,
                _,
            ) => {
                t.forget_everything();
                Verdict::Forward(None)
            }
            // Whatever an unknown opcode changes, nothing held can be trusted once it
            // has run (until then, lookups see the names as they were before it).
            _ => t.expect(Effect::Unknown),
        }
    }

    /// Whether a CREATE (`header`, `op`) makes a new node: its name is one its
    /// directory is known to lack (the client holds the directory's lock from its
    /// LOOKUP to the CREATE's reply, so nothing can make the name in between).
    pub fn makes_new(&self, header: &InHeader, op: Option<&Operation>) -> bool {
        let Some(Operation::Create { name, .. }) = op else {
            return false;
        };
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.known
            .get(&header.nodeid)
            .is_some_and(|names| !names.contains(name.as_encoded_bytes()))
    }

    /// The appliance vouched for the directory a MKDIR waiting for its reply (`change`)
    /// made.
    pub fn on_hint(&self, hint: &EmptyDirHint, change: Change) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Effect::Add {
            mkdir: true, empty, ..
        }) = t.pending.get_mut(&change.id)
        {
            *empty = Some(hint.nodeid);
        }
    }

    /// Looks at the reply (`frame`, header included) to a change, before the client
    /// gets it.
    pub fn on_reply(&self, change: Change, frame: &[u8]) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let Some(effect) = t.pending.remove(&change.id) else {
            return;
        };
        let reply = OutHeader::read_from_prefix(frame).ok();
        let error = reply.as_ref().map_or(-libc::EIO, |(h, _)| h.error);
        let made = reply
            .filter(|_| error == 0)
            .and_then(|(_, body)| EntryOut::read_from_prefix(body).ok())
            .map(|(e, _)| e.nodeid);
        if let Effect::Add { mkdir: true, .. } = effect {
            // Whether a name was put in the new directory while this MKDIR was out.
            let filled = made.is_some_and(|new| t.filled_during_mkdir.contains(&new));
            t.mkdirs -= 1;
            if t.mkdirs == 0 {
                t.filled_during_mkdir.clear();
            }
            if filled {
                t.forget(made.unwrap_or_default());
                return;
            }
        }
        match effect {
            Effect::Unknown if error != -libc::ENOSYS => t.forget_everything(),
            Effect::Unknown => {}
            // A create or rename that failed may have made its name first: stop
            // trusting the directories it touched. A removal that failed leaves its
            // name held, which can only send that name's lookups on.
            Effect::Add { dir, .. } if error != 0 => t.forget(dir),
            Effect::Remove { .. } if error != 0 => {}
            Effect::Move { from, to, .. } if error != 0 => {
                t.forget(from);
                t.forget(to);
            }
            Effect::Add {
                dir,
                name,
                mkdir,
                empty,
            } => {
                t.add(dir, name);
                if let Some(new) = made.filter(|&new| mkdir && empty == Some(new)) {
                    t.forget(new);
                    t.known.insert(new, HashSet::new());
                }
            }
            Effect::Remove { dir, name } => t.remove(dir, &name),
            Effect::Move {
                from,
                name,
                to,
                newname,
                keep,
            } => {
                if !keep {
                    t.remove(from, &name);
                }
                t.add(to, newname);
            }
        }
    }

    /// Directories and names held; for tests.
    pub fn held(&self) -> (usize, usize) {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        (t.known.len(), t.names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fsva_protocol::abi::{CreateIn, MkdirIn};
    use fsva_protocol::reply::ReplyBuf;
    use std::ffi::OsStr;

    fn header(op: u32, node: u64) -> InHeader {
        InHeader {
            opcode: op,
            nodeid: node,
            ..Default::default()
        }
    }

    fn lookup(t: &AbsentNames, dir: u64, name: &str) -> Verdict {
        let op = Operation::Lookup {
            name: OsStr::new(name),
        };
        t.on_request(&header(opcode::LOOKUP, dir), Some(&op))
    }

    fn change(v: Verdict) -> Change {
        match v {
            Verdict::Forward(Some(c)) => c,
            other => panic!("expected a change to follow, got {other:?}"),
        }
    }

    fn entry(node: u64) -> Vec<u8> {
        let e = EntryOut {
            nodeid: node,
            ..Default::default()
        };
        ReplyBuf::default().value(1, &e).to_vec()
    }

    fn ok() -> Vec<u8> {
        ReplyBuf::default().empty(1).to_vec()
    }

    fn err(errno: i32) -> Vec<u8> {
        ReplyBuf::default().error(1, errno).to_vec()
    }

    /// MKDIR of `name` in `parent` making `node`, vouched for by a hint when `vouched`.
    fn mkdir(t: &AbsentNames, parent: u64, name: &str, node: u64, vouched: bool) {
        let op = Operation::Mkdir {
            arg: MkdirIn::default(),
            name: OsStr::new(name),
        };
        let c = change(t.on_request(&header(opcode::MKDIR, parent), Some(&op)));
        if vouched {
            t.on_hint(
                &EmptyDirHint {
                    unique: 1,
                    nodeid: node,
                },
                c,
            );
        }
        t.on_reply(c, &entry(node));
    }

    fn create(t: &AbsentNames, dir: u64, name: &str) -> Change {
        let op = Operation::Create {
            arg: CreateIn::default(),
            name: OsStr::new(name),
        };
        change(t.on_request(&header(opcode::CREATE, dir), Some(&op)))
    }

    fn unlink(t: &AbsentNames, dir: u64, name: &str) -> Change {
        let op = Operation::Unlink {
            name: OsStr::new(name),
        };
        change(t.on_request(&header(opcode::UNLINK, dir), Some(&op)))
    }

    fn rename(
        t: &AbsentNames,
        from: u64,
        name: &str,
        to: u64,
        newname: &str,
        flags: u32,
    ) -> Verdict {
        let op = Operation::Rename {
            newdir: to,
            flags,
            name: OsStr::new(name),
            newname: OsStr::new(newname),
        };
        t.on_request(&header(opcode::RENAME2, from), Some(&op))
    }

    #[test]
    fn a_vouched_new_directory_answers_for_names_it_lacks_as_they_come_and_go() {
        let t = AbsentNames::new();
        mkdir(&t, 1, "d", 10, true);
        assert_eq!(lookup(&t, 10, "a"), Verdict::Absent);
        // Known only from the reply on: while the create is in flight, "a" is absent.
        let c = create(&t, 10, "a");
        assert_eq!(lookup(&t, 10, "a"), Verdict::Absent);
        t.on_reply(c, &entry(11));
        assert_eq!(lookup(&t, 10, "a"), Verdict::Forward(None));
        assert_eq!(lookup(&t, 10, "b"), Verdict::Absent);
        let c = unlink(&t, 10, "a");
        assert_eq!(lookup(&t, 10, "a"), Verdict::Forward(None));
        t.on_reply(c, &ok());
        assert_eq!(lookup(&t, 10, "a"), Verdict::Absent);
        // A subdirectory made inside, vouched for too; its name is held by its parent.
        mkdir(&t, 10, "sub", 12, true);
        assert_eq!(lookup(&t, 10, "sub"), Verdict::Forward(None));
        assert_eq!(lookup(&t, 12, "x"), Verdict::Absent);
        assert_eq!(t.held(), (2, 1));
        // The parent of the first directory was never vouched for: always asked.
        assert_eq!(lookup(&t, 1, "zzz"), Verdict::Forward(None));
    }

    #[test]
    fn directories_not_vouched_for_or_vouched_for_as_another_node_are_not_held() {
        let t = AbsentNames::new();
        mkdir(&t, 1, "d", 10, false);
        assert_eq!(lookup(&t, 10, "a"), Verdict::Forward(None));
        // A hint naming another node than the reply's is not taken.
        let op = Operation::Mkdir {
            arg: MkdirIn::default(),
            name: OsStr::new("e"),
        };
        let c = change(t.on_request(&header(opcode::MKDIR, 1), Some(&op)));
        t.on_hint(
            &EmptyDirHint {
                unique: 1,
                nodeid: 99,
            },
            c,
        );
        t.on_reply(c, &entry(20));
        assert_eq!(lookup(&t, 20, "a"), Verdict::Forward(None));
        assert_eq!(lookup(&t, 99, "a"), Verdict::Forward(None));
        // A failed MKDIR holds nothing either.
        let c = change(t.on_request(&header(opcode::MKDIR, 1), Some(&op)));
        t.on_hint(
            &EmptyDirHint {
                unique: 1,
                nodeid: 21,
            },
            c,
        );
        t.on_reply(c, &err(libc::ENOSPC));
        assert_eq!(lookup(&t, 21, "a"), Verdict::Forward(None));
    }

    #[test]
    fn renames_move_names_and_flags_it_cannot_follow_forget_both_directories() {
        let t = AbsentNames::new();
        mkdir(&t, 1, "x", 10, true);
        mkdir(&t, 1, "y", 11, true);
        t.on_reply(create(&t, 10, "a"), &entry(20));
        let c = change(rename(&t, 10, "a", 11, "b", 0));
        t.on_reply(c, &ok());
        assert_eq!(lookup(&t, 10, "a"), Verdict::Absent);
        assert_eq!(lookup(&t, 11, "b"), Verdict::Forward(None));
        // Exchange: both names still there.
        t.on_reply(create(&t, 10, "c"), &entry(21));
        assert_eq!(
            rename(&t, 10, "c", 11, "b", RENAME_EXCHANGE),
            Verdict::Forward(None)
        );
        assert_eq!(lookup(&t, 10, "c"), Verdict::Forward(None));
        // Whiteout: the old name stays (as a whiteout), the new one appears.
        let c = change(rename(&t, 10, "c", 11, "w", RENAME_WHITEOUT));
        t.on_reply(c, &ok());
        assert_eq!(lookup(&t, 10, "c"), Verdict::Forward(None));
        assert_eq!(lookup(&t, 11, "w"), Verdict::Forward(None));
        // A flag not known: neither directory is held any more.
        assert_eq!(rename(&t, 10, "c", 11, "v", 1 << 7), Verdict::Forward(None));
        assert_eq!(lookup(&t, 10, "zz"), Verdict::Forward(None));
        assert_eq!(lookup(&t, 11, "zz"), Verdict::Forward(None));
    }

    #[test]
    fn dot_dotdot_and_names_too_long_for_the_appliance_are_always_forwarded() {
        let t = AbsentNames::new();
        mkdir(&t, 1, "d", 10, true);
        assert_eq!(lookup(&t, 10, "."), Verdict::Forward(None));
        assert_eq!(lookup(&t, 10, ".."), Verdict::Forward(None));
        assert_eq!(lookup(&t, 10, &"n".repeat(256)), Verdict::Forward(None));
        assert_eq!(lookup(&t, 10, &"n".repeat(255)), Verdict::Absent);
    }

    #[test]
    fn a_directory_filled_while_its_mkdir_was_out_is_not_held() {
        // A caller that guessed the new directory's id created a name in it before
        // the MKDIR's reply passed: the appliance's "empty" is stale by then.
        let t = AbsentNames::new();
        let op = Operation::Mkdir {
            arg: MkdirIn::default(),
            name: OsStr::new("d"),
        };
        let m = change(t.on_request(&header(opcode::MKDIR, 1), Some(&op)));
        t.on_hint(
            &EmptyDirHint {
                unique: 1,
                nodeid: 10,
            },
            m,
        );
        t.on_reply(create(&t, 10, "early"), &entry(11));
        t.on_reply(m, &entry(10));
        assert_eq!(lookup(&t, 10, "early"), Verdict::Forward(None));
        assert_eq!(lookup(&t, 10, "other"), Verdict::Forward(None));
        // With no MKDIR out, names put elsewhere are not remembered for later ones.
        t.on_reply(create(&t, 20, "x"), &entry(12));
        mkdir(&t, 1, "e", 20, true);
        assert_eq!(lookup(&t, 20, "y"), Verdict::Absent);
    }

    #[test]
    fn a_failed_change_an_unknown_opcode_and_forget_drop_what_is_held() {
        let t = AbsentNames::new();
        mkdir(&t, 1, "x", 10, true);
        mkdir(&t, 1, "y", 11, true);
        mkdir(&t, 1, "z", 12, true);
        // A create that failed may have made the file anyway: 10 is not held now.
        t.on_reply(create(&t, 10, "a"), &err(libc::EIO));
        assert_eq!(lookup(&t, 10, "a"), Verdict::Forward(None));
        assert_eq!(lookup(&t, 11, "a"), Verdict::Absent);
        // The kernel forgot 11: its id may name another object later.
        t.on_request(&header(opcode::FORGET, 11), None);
        assert_eq!(lookup(&t, 11, "a"), Verdict::Forward(None));
        // An opcode the table does not know: lookups see the names as before it until
        // its reply; ENOSYS (not served) changed nothing, success may have.
        let c = change(t.on_request(&header(opcode::IOCTL, 12), None));
        assert_eq!(lookup(&t, 12, "a"), Verdict::Absent);
        t.on_reply(c, &err(libc::ENOSYS));
        assert_eq!(lookup(&t, 12, "a"), Verdict::Absent);
        let c = change(t.on_request(&header(opcode::IOCTL, 12), None));
        t.on_reply(c, &ok());
        assert_eq!(lookup(&t, 12, "a"), Verdict::Forward(None));
        assert_eq!(t.held(), (0, 0));
    }
}
