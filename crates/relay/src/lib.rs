//! What a relay between a FUSE client (the host kernel, or a VM guest's virtiofs
//! driver) and an appliance may answer itself, from what it saw pass.
//!
//! Two relays use it: the supervisor's stream bridge (host mounts over a stream
//! channel, VM appliances) and the vhost-user device's link to a relayed appliance.
//! Both answer the same four kinds of request without a round trip, and only for an
//! appliance that is the only writer of its file system:
//! - a `security.capability` check on a node known to have none ([`absent_caps`]);
//! - the GETATTR of a directory the appliance just changed, from the hint it sent with
//!   its reply ([`dir_attrs`], [`fsva_protocol::hint`]);
//! - the LOOKUP of a name a directory is known to lack: one the appliance said was
//!   made empty, whose every change since passed through the relay ([`absent_names`]);
//! - an IOCTL, once the appliance has said it serves none ([`unserved`]).
//!
//! [`Answers`] is the front both relays call: one look at each request on its way
//! out, one at each reply and hint on its way back. It owns no I/O and no FUSE
//! session; it never answers anything else, and never for a file system that can
//! change beside the relay.

pub mod absent_caps;
pub mod absent_names;
pub mod dir_attrs;
pub mod unserved;

use fsva_protocol::abi::{opcode, AttrOut, InHeader};
use fsva_protocol::reply::ReplyBuf;
use fsva_protocol::request::{decode, Negotiated};

/// A reply the relay gives itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// ENODATA to a `security.capability` check.
    NoCapability,
    /// A directory's attributes.
    Attributes(AttrOut),
    /// ENOENT to a LOOKUP.
    NoEntry,
    /// ENOSYS to an opcode the appliance does not serve.
    Unserved,
}

impl Local {
    /// The reply frame for the request `unique`.
    pub fn encode<'a>(&self, reply: &'a mut ReplyBuf, unique: u64) -> &'a [u8] {
        match self {
            Local::NoCapability => reply.error(unique, libc::ENODATA),
            Local::Attributes(attr) => reply.value(unique, attr),
            Local::NoEntry => reply.error(unique, libc::ENOENT),
            Local::Unserved => reply.error(unique, libc::ENOSYS),
        }
    }
}

/// What a relay keeps with a forwarded request until its reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Note {
    lesson: Option<absent_caps::Lesson>,
    ticket: Option<dir_attrs::Ticket>,
    change: Option<absent_names::Change>,
    /// An IOCTL: its reply may say the appliance serves none.
    ioctl: bool,
}

/// What to do with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Reply with this; do not forward.
    Answer(Local),
    /// Forward it and keep this note with it.
    Forward(Note),
}

/// The tables of one relay.
#[derive(Default)]
pub struct Answers {
    caps: absent_caps::AbsentCaps,
    dirs: dir_attrs::DirAttrs,
    names: absent_names::AbsentNames,
    unserved: unserved::Unserved,
    /// Requests answered here so far (for `fsva status`).
    answered: std::sync::atomic::AtomicU64,
}

impl Answers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Looks at a request on its way to the appliance (`frame` is the whole request,
    /// `header` its decoded header).
    pub fn on_request(&self, header: &InHeader, frame: &[u8]) -> Decision {
        // First: an opcode answered here never reaches the other tables, and the names
        // table would take an unknown one as a change.
        let ioctl = match self.unserved.on_request(header) {
            unserved::Verdict::Unserved => return self.answer(Local::Unserved),
            unserved::Verdict::Forward(ioctl) => ioctl,
        };
        // Decoded once, and only where a table reads the payload: the layouts of these
        // operations do not depend on what INIT negotiated.
        let reads_payload = matches!(
            header.opcode,
            opcode::GETXATTR
                | opcode::CREATE
                | opcode::MKNOD
                | opcode::SYMLINK
                | opcode::BATCH_FORGET
                | opcode::GETATTR
                | opcode::RENAME
                | opcode::RENAME2
                | opcode::LOOKUP
                | opcode::MKDIR
                | opcode::LINK
                | opcode::UNLINK
                | opcode::RMDIR
        );
        let request = reads_payload
            .then(|| decode(frame, &Negotiated::default()).ok())
            .flatten();
        let op = request.as_ref().map(|r| &r.op);
        let fresh = header.opcode == opcode::CREATE && self.names.makes_new(header, op);
        let local = match self.caps.on_request(header, op, fresh) {
            absent_caps::Verdict::Absent => Local::NoCapability,
            absent_caps::Verdict::Forward(lesson) => match self.dirs.on_request(header, op) {
                dir_attrs::Verdict::Answer(attr) => Local::Attributes(attr),
                dir_attrs::Verdict::Forward(ticket) => match self.names.on_request(header, op) {
                    absent_names::Verdict::Absent => Local::NoEntry,
                    absent_names::Verdict::Forward(change) => {
                        return Decision::Forward(Note {
                            lesson,
                            ticket,
                            change,
                            ioctl,
                        })
                    }
                },
            },
        };
        self.answer(local)
    }

    fn answer(&self, local: Local) -> Decision {
        self.answered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Decision::Answer(local)
    }

    /// How many requests were answered here so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Looks at the reply (`frame`, header included) to a request forwarded with
    /// `note`, before the client gets it.
    pub fn on_reply(&self, note: Note, frame: &[u8]) {
        if let Some(lesson) = note.lesson {
            self.caps.learn(lesson, frame);
        }
        if let Some(ticket) = note.ticket {
            self.dirs.on_reply(ticket);
        }
        if let Some(change) = note.change {
            self.names.on_reply(change, frame);
        }
        if note.ioctl {
            self.unserved.learn(frame);
        }
    }

    /// Takes a hint frame from the appliance. `note_of` finds the note of the request
    /// it names, if that request still waits for its reply (a hint comes just before).
    pub fn on_hint(&self, frame: &[u8], note_of: impl FnOnce(u64) -> Option<Note>) {
        if let Some(hint) = fsva_protocol::hint::decode_dir_attr(frame) {
            if let Some(ticket) = note_of(hint.unique).and_then(|n| n.ticket) {
                self.dirs.on_hint(&hint, ticket.number);
            }
        } else if let Some(hint) = fsva_protocol::hint::decode_empty_dir(frame) {
            if let Some(change) = note_of(hint.unique).and_then(|n| n.change) {
                self.names.on_hint(&hint, change);
            }
        }
    }
}

/// Request frames for the tables' unit tests.
#[cfg(test)]
pub(crate) mod test_frames {
    use fsva_protocol::abi::InHeader;
    use zerocopy::IntoBytes;

    /// A request frame of opcode `op` on `node` with `body`, and its header.
    pub fn request(op: u32, node: u64, unique: u64, body: &[u8]) -> (InHeader, Vec<u8>) {
        let header = InHeader {
            len: (core::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode: op,
            unique,
            nodeid: node,
            ..Default::default()
        };
        let mut f = header.as_bytes().to_vec();
        f.extend_from_slice(body);
        (header, f)
    }
}

#[cfg(test)]
mod tests {
    use super::test_frames::request;
    use super::*;
    use fsva_protocol::abi::{opcode, GetattrIn, OutHeader};
    use fsva_protocol::hint::DirAttrHint;
    use zerocopy::{FromBytes, IntoBytes};

    #[test]
    fn a_hint_then_its_reply_let_the_next_getattr_be_answered_here() {
        let answers = Answers::new();
        let (h, f) = request(opcode::UNLINK, 2, 40, b"x\0");
        let Decision::Forward(note) = answers.on_request(&h, &f) else {
            panic!("an unlink is forwarded");
        };
        let mut hint = DirAttrHint {
            unique: 40,
            nodeid: 2,
            ..Default::default()
        };
        hint.attr.attr.mode = 0o040755;
        hint.attr.attr.nlink = 3;
        let mut buf = ReplyBuf::default();
        let frame = fsva_protocol::hint::dir_attr(&mut buf, &hint).to_vec();
        answers.on_hint(&frame, |unique| (unique == 40).then_some(note));
        answers.on_reply(note, ReplyBuf::default().empty(40));

        let (h, f) = request(opcode::GETATTR, 2, 41, GetattrIn::default().as_bytes());
        let Decision::Answer(local) = answers.on_request(&h, &f) else {
            panic!("the GETATTR is answered here");
        };
        assert_eq!(answers.answered(), 1);
        let mut reply = ReplyBuf::default();
        let out = local.encode(&mut reply, 41);
        let (header, body) = OutHeader::read_from_prefix(out).unwrap();
        assert_eq!((header.unique, header.error), (41, 0));
        assert_eq!(AttrOut::read_from_bytes(body).unwrap().attr.nlink, 3);
    }

    #[test]
    fn a_hint_for_a_request_no_longer_waiting_is_ignored() {
        let answers = Answers::new();
        let (h, f) = request(opcode::MKDIR, 2, 50, &[0; 12]);
        let Decision::Forward(note) = answers.on_request(&h, &f) else {
            panic!()
        };
        answers.on_reply(note, ReplyBuf::default().empty(50));
        let mut hint = DirAttrHint {
            unique: 50,
            nodeid: 2,
            ..Default::default()
        };
        hint.attr.attr.mode = 0o040755;
        let frame = fsva_protocol::hint::dir_attr(&mut ReplyBuf::default(), &hint).to_vec();
        answers.on_hint(&frame, |_| None);
        let (h, f) = request(opcode::GETATTR, 2, 51, GetattrIn::default().as_bytes());
        assert!(matches!(answers.on_request(&h, &f), Decision::Forward(_)));
    }

    #[test]
    fn a_lookup_in_a_directory_vouched_empty_is_answered_enoent_here() {
        let answers = Answers::new();
        let mut body = fsva_protocol::abi::MkdirIn::default().as_bytes().to_vec();
        body.extend_from_slice(b"d\0");
        let (h, f) = request(opcode::MKDIR, 1, 60, &body);
        let Decision::Forward(note) = answers.on_request(&h, &f) else {
            panic!("a mkdir is forwarded");
        };
        let empty = fsva_protocol::hint::EmptyDirHint {
            unique: 60,
            nodeid: 9,
        };
        let frame = fsva_protocol::hint::empty_dir(&mut ReplyBuf::default(), &empty).to_vec();
        answers.on_hint(&frame, |unique| (unique == 60).then_some(note));
        let made = fsva_protocol::abi::EntryOut {
            nodeid: 9,
            ..Default::default()
        };
        answers.on_reply(note, ReplyBuf::default().value(60, &made));

        let (h, f) = request(opcode::LOOKUP, 9, 61, b"new\0");
        let Decision::Answer(local) = answers.on_request(&h, &f) else {
            panic!("the lookup is answered here");
        };
        let mut reply = ReplyBuf::default();
        let (header, _) = OutHeader::read_from_prefix(local.encode(&mut reply, 61)).unwrap();
        assert_eq!((header.unique, header.error), (61, -libc::ENOENT));
        // Its parent was not vouched for.
        let (h, f) = request(opcode::LOOKUP, 1, 62, b"other\0");
        assert!(matches!(answers.on_request(&h, &f), Decision::Forward(_)));
    }

    fn getxattr_capability(node: u64, unique: u64) -> (InHeader, Vec<u8>) {
        let mut body = fsva_protocol::abi::GetxattrIn::default()
            .as_bytes()
            .to_vec();
        body.extend_from_slice(b"security.capability\0");
        request(opcode::GETXATTR, node, unique, &body)
    }

    #[test]
    fn a_create_of_a_name_its_directory_lacks_makes_a_node_without_a_capability() {
        let answers = Answers::new();
        // The appliance serves extended attributes (one miss seen).
        let (h, f) = getxattr_capability(1, 70);
        let Decision::Forward(note) = answers.on_request(&h, &f) else {
            panic!()
        };
        answers.on_reply(note, ReplyBuf::default().error(70, libc::ENODATA));
        // A directory vouched empty, and a create in it without O_EXCL.
        let mut body = fsva_protocol::abi::MkdirIn::default().as_bytes().to_vec();
        body.extend_from_slice(b"d\0");
        let (h, f) = request(opcode::MKDIR, 1, 71, &body);
        let Decision::Forward(note) = answers.on_request(&h, &f) else {
            panic!()
        };
        let empty = fsva_protocol::hint::EmptyDirHint {
            unique: 71,
            nodeid: 9,
        };
        let frame = fsva_protocol::hint::empty_dir(&mut ReplyBuf::default(), &empty).to_vec();
        answers.on_hint(&frame, |_| Some(note));
        let entry = |node| fsva_protocol::abi::EntryOut {
            nodeid: node,
            ..Default::default()
        };
        answers.on_reply(note, ReplyBuf::default().value(71, &entry(9)));
        let create = |unique| {
            let arg = fsva_protocol::abi::CreateIn {
                flags: (libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC) as u32,
                ..Default::default()
            };
            let mut body = arg.as_bytes().to_vec();
            body.extend_from_slice(b"f\0");
            request(opcode::CREATE, 9, unique, &body)
        };
        let (h, f) = create(72);
        let Decision::Forward(note) = answers.on_request(&h, &f) else {
            panic!()
        };
        answers.on_reply(note, ReplyBuf::default().value(72, &entry(30)));
        let (h, f) = getxattr_capability(30, 73);
        assert_eq!(
            answers.on_request(&h, &f),
            Decision::Answer(Local::NoCapability)
        );
        // The same create again opens the existing file: nothing is learned of it.
        let (h, f) = create(74);
        let Decision::Forward(note) = answers.on_request(&h, &f) else {
            panic!()
        };
        answers.on_reply(note, ReplyBuf::default().value(74, &entry(31)));
        let (h, f) = getxattr_capability(31, 75);
        assert!(matches!(answers.on_request(&h, &f), Decision::Forward(_)));
    }
}
