//! The nodes a relay knows carry no `security.capability`, so it can answer the FUSE
//! client's question about that attribute without a round trip to the appliance.
//!
//! The kernel asks for `security.capability` before a write that may have to drop
//! privileges and before every chown of a non-directory
//! (`security_inode_need_killpriv`), and FUSE never caches the answer: that is two
//! round trips for every file `tar` extracts, and a round trip to a VM appliance costs
//! hundreds of microseconds under emulation. Where the appliance is the only writer of
//! its file system, nothing can give a node that attribute except a SETXATTR passing
//! through the relay. So the relay remembers absence it has seen (an ENODATA answer,
//! or a node it saw created: CREATE with `O_EXCL` or of a name the directory is known
//! to lack ([`crate::absent_names`]), MKNOD, SYMLINK), forgets a node
//! when the kernel forgets it (its id may be reused), and forgets everything it was
//! about to learn whenever a SETXATTR passes, both when it is forwarded and when its
//! reply comes back: the appliance's workers run requests in parallel, so a query sent
//! after a SETXATTR may still be answered before the SETXATTR takes effect. It answers
//! nothing until the appliance has shown it serves extended attributes at all (a file
//! system without them says EOPNOTSUPP, not ENODATA).
//!
//! Owns that set and its rules. It never caches a value, only absence; it must never
//! be used for a file system others change (a shared `passthrough` export), where a
//! capability can appear beside the mount.

use std::collections::HashSet;
use std::sync::Mutex;

use fsva_protocol::abi::{opcode, EntryOut, InHeader, OutHeader};
use fsva_protocol::request::Operation;
use zerocopy::FromBytes;

/// The one attribute answered here.
const CAPABILITY: &[u8] = b"security.capability";
/// More nodes than this and the set starts over (an 8-byte id each, plus the table).
const MAX_NODES: usize = 1 << 20;

/// What the relay should do with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Answer ENODATA now; do not forward.
    Absent,
    /// Forward it; hand the reply to [`AbsentCaps::learn`] with this.
    Forward(Option<Lesson>),
}

/// What a reply can teach, recorded when its request was forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lesson {
    kind: LessonKind,
    /// The SETXATTR count when the request left: a reply from before a SETXATTR that
    /// arrives after it teaches nothing.
    epoch: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LessonKind {
    /// A `security.capability` query on this node: ENODATA means absent.
    Query(u64),
    /// A request creating a new node: its entry reply names a node with no attributes.
    Created,
    /// A SETXATTR on this node: whatever its reply, forget the node and what was about
    /// to be learned, again.
    Set(u64),
}

#[derive(Default)]
struct Known {
    absent: HashSet<u64>,
    /// Bumped when a SETXATTR is forwarded and when its reply comes back.
    setxattrs: u64,
    /// Whether the appliance serves extended attributes: unknown until a GETXATTR is
    /// answered with something other than EOPNOTSUPP (or with it).
    xattrs_served: Option<bool>,
}

impl Known {
    fn forget(&mut self, node: u64) {
        self.setxattrs += 1;
        self.absent.remove(&node);
    }
}

/// The set, shared by a relay's request threads and its reply thread.
#[derive(Default)]
pub struct AbsentCaps {
    known: Mutex<Known>,
}

impl AbsentCaps {
    pub fn new() -> Self {
        Self::default()
    }

    /// Looks at a request on its way to the appliance: its header, and its operation
    /// where [`crate::Answers`] decoded it (`None` for an opcode whose payload this
    /// table does not read, or a payload that did not decode). `fresh`: a CREATE whose
    /// name its directory is known to lack, so it makes a new node.
    pub fn on_request(&self, header: &InHeader, op: Option<&Operation>, fresh: bool) -> Verdict {
        if !matches!(
            header.opcode,
            opcode::GETXATTR
                | opcode::SETXATTR
                | opcode::CREATE
                | opcode::MKNOD
                | opcode::SYMLINK
                | opcode::FORGET
                | opcode::BATCH_FORGET
        ) {
            return Verdict::Forward(None);
        }
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let epoch = known.setxattrs;
        let lesson = |kind| Verdict::Forward(Some(Lesson { kind, epoch }));
        match (header.opcode, op) {
            // Whatever the name: forgetting too much only costs a round trip.
            (opcode::SETXATTR, _) => {
                known.forget(header.nodeid);
                lesson(LessonKind::Set(header.nodeid))
            }
            (opcode::FORGET, _) => {
                known.absent.remove(&header.nodeid);
                Verdict::Forward(None)
            }
            (_, Some(Operation::Getxattr { name, .. }))
                if name.as_encoded_bytes() == CAPABILITY =>
            {
                if known.xattrs_served == Some(true) && known.absent.contains(&header.nodeid) {
                    Verdict::Absent
                } else {
                    lesson(LessonKind::Query(header.nodeid))
                }
            }
            (_, Some(Operation::Create { arg, .. }))
                if fresh || arg.flags & libc::O_EXCL as u32 != 0 =>
            {
                lesson(LessonKind::Created)
            }
            (_, Some(Operation::Mknod { .. } | Operation::Symlink { .. })) => {
                lesson(LessonKind::Created)
            }
            (_, Some(Operation::BatchForget(nodes))) => {
                for node in nodes {
                    known.absent.remove(&node.nodeid);
                }
                Verdict::Forward(None)
            }
            _ => Verdict::Forward(None),
        }
    }

    /// Learns from the reply (`frame`, header included) to a request that was
    /// forwarded with `lesson`.
    pub fn learn(&self, lesson: Lesson, frame: &[u8]) {
        let Ok((header, body)) = OutHeader::read_from_prefix(frame) else {
            return;
        };
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let node = match lesson.kind {
            LessonKind::Set(node) => return known.forget(node),
            LessonKind::Query(node) => {
                if header.error == -libc::EOPNOTSUPP {
                    // Once is enough never to answer for this file system.
                    known.xattrs_served = Some(false);
                    return;
                }
                known.xattrs_served.get_or_insert(true);
                if header.error != -libc::ENODATA {
                    return;
                }
                node
            }
            LessonKind::Created if header.error == 0 => match EntryOut::read_from_prefix(body) {
                Ok((entry, _)) if entry.nodeid != 0 => entry.nodeid,
                _ => return,
            },
            _ => return,
        };
        if known.setxattrs != lesson.epoch {
            return;
        }
        if known.absent.len() >= MAX_NODES {
            known.absent.clear();
        }
        known.absent.insert(node);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .absent
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
    use crate::test_frames::request;
    use fsva_protocol::abi::{CreateIn, GetxattrIn};
    use fsva_protocol::request::{decode, Negotiated};
    use zerocopy::IntoBytes;

    /// The table's look at a request frame, decoded as [`crate::Answers`] does.
    fn look(caps: &AbsentCaps, h: &InHeader, f: &[u8]) -> Verdict {
        let request = decode(f, &Negotiated::default()).ok();
        caps.on_request(h, request.as_ref().map(|r| &r.op), false)
    }

    fn getxattr(node: u64, name: &[u8]) -> (InHeader, Vec<u8>) {
        let mut body = GetxattrIn {
            size: 0,
            padding: 0,
        }
        .as_bytes()
        .to_vec();
        body.extend_from_slice(name);
        body.push(0);
        request(opcode::GETXATTR, node, 7, &body)
    }

    fn create(parent: u64, flags: i32) -> (InHeader, Vec<u8>) {
        let arg = CreateIn {
            flags: flags as u32,
            mode: 0o100644,
            umask: 0o022,
            open_flags: 0,
        };
        let mut body = arg.as_bytes().to_vec();
        body.extend_from_slice(b"new\0");
        request(opcode::CREATE, parent, 8, &body)
    }

    fn reply(unique: u64, error: i32, body: &[u8]) -> Vec<u8> {
        let header = OutHeader {
            len: (core::mem::size_of::<OutHeader>() + body.len()) as u32,
            error,
            unique,
        };
        let mut frame = header.as_bytes().to_vec();
        frame.extend_from_slice(body);
        frame
    }

    fn entry(node: u64) -> Vec<u8> {
        EntryOut {
            nodeid: node,
            ..Default::default()
        }
        .as_bytes()
        .to_vec()
    }

    fn ask(caps: &AbsentCaps, node: u64) -> Verdict {
        let (h, f) = getxattr(node, CAPABILITY);
        look(caps, &h, &f)
    }

    fn forwarded(v: Verdict) -> Lesson {
        match v {
            Verdict::Forward(Some(l)) => l,
            other => panic!("expected a forwarded request with a lesson, got {other:?}"),
        }
    }

    fn setxattr(caps: &AbsentCaps, node: u64) -> Lesson {
        let (h, f) = request(opcode::SETXATTR, node, 9, b"");
        forwarded(look(caps, &h, &f))
    }

    #[test]
    fn a_miss_once_seen_is_answered_here_until_a_setxattr() {
        let caps = AbsentCaps::new();
        let lesson = forwarded(ask(&caps, 5));
        caps.learn(lesson, &reply(7, -libc::ENODATA, &[]));
        assert_eq!(ask(&caps, 5), Verdict::Absent);
        assert!(matches!(ask(&caps, 6), Verdict::Forward(Some(_))));

        setxattr(&caps, 5);
        assert!(matches!(ask(&caps, 5), Verdict::Forward(Some(_))));
    }

    #[test]
    fn a_miss_answered_while_a_setxattr_was_in_flight_is_undone_by_its_reply() {
        let caps = AbsentCaps::new();
        let teach = forwarded(ask(&caps, 6));
        caps.learn(teach, &reply(7, -libc::ENODATA, &[]));
        // The SETXATTR leaves first; a query leaves after it, and another worker
        // answers it before the attribute is set.
        let set = setxattr(&caps, 5);
        let query = forwarded(ask(&caps, 5));
        caps.learn(query, &reply(7, -libc::ENODATA, &[]));
        caps.learn(set, &reply(9, 0, &[]));
        assert!(matches!(ask(&caps, 5), Verdict::Forward(Some(_))));
        // The other way round the late miss teaches nothing either.
        let set = setxattr(&caps, 5);
        let query = forwarded(ask(&caps, 5));
        caps.learn(set, &reply(9, 0, &[]));
        caps.learn(query, &reply(7, -libc::ENODATA, &[]));
        assert!(matches!(ask(&caps, 5), Verdict::Forward(Some(_))));
        assert_eq!(ask(&caps, 6), Verdict::Absent);
    }

    #[test]
    fn nothing_is_answered_for_a_file_system_without_extended_attributes() {
        let caps = AbsentCaps::new();
        let (h, f) = create(1, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY);
        let lesson = forwarded(look(&caps, &h, &f));
        caps.learn(lesson, &reply(8, 0, &entry(42)));
        // Not known yet whether it serves them: asked.
        let query = forwarded(ask(&caps, 42));
        caps.learn(query, &reply(7, -libc::EOPNOTSUPP, &[]));
        assert!(matches!(ask(&caps, 42), Verdict::Forward(Some(_))));
        let query = forwarded(ask(&caps, 43));
        caps.learn(query, &reply(7, -libc::ENODATA, &[]));
        assert!(matches!(ask(&caps, 43), Verdict::Forward(Some(_))));
    }

    #[test]
    fn a_value_or_another_error_teaches_nothing() {
        let caps = AbsentCaps::new();
        let lesson = forwarded(ask(&caps, 5));
        caps.learn(lesson, &reply(7, 0, &20u32.to_ne_bytes()));
        caps.learn(lesson, &reply(7, -libc::EIO, &[]));
        caps.learn(lesson, &reply(7, -libc::ENOSYS, &[]));
        assert!(caps.is_empty());
    }

    #[test]
    fn other_attributes_are_always_forwarded_untouched() {
        let caps = AbsentCaps::new();
        let (h, f) = getxattr(5, b"user.note");
        assert_eq!(look(&caps, &h, &f), Verdict::Forward(None));
        let (h, f) = getxattr(5, b"security.capabilityx");
        assert_eq!(look(&caps, &h, &f), Verdict::Forward(None));
    }

    #[test]
    fn a_miss_answered_before_a_setxattr_that_overtook_it_is_not_learned() {
        let caps = AbsentCaps::new();
        let lesson = forwarded(ask(&caps, 5));
        setxattr(&caps, 5);
        caps.learn(lesson, &reply(7, -libc::ENODATA, &[]));
        assert!(caps.is_empty());
    }

    #[test]
    fn only_exclusive_creates_teach_their_new_node() {
        let caps = AbsentCaps::new();
        let (h, f) = create(1, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY);
        let lesson = forwarded(look(&caps, &h, &f));
        caps.learn(lesson, &reply(8, 0, &entry(42)));
        // Asked once: the appliance serves extended attributes.
        let query = forwarded(ask(&caps, 42));
        caps.learn(query, &reply(7, -libc::ENODATA, &[]));
        assert_eq!(ask(&caps, 42), Verdict::Absent);

        // Without O_EXCL the name may have existed: the node may be an old one.
        let (h, f) = create(1, libc::O_CREAT | libc::O_WRONLY);
        assert_eq!(look(&caps, &h, &f), Verdict::Forward(None));
    }

    #[test]
    fn a_forgotten_node_is_asked_again() {
        let caps = AbsentCaps::new();
        for node in [5, 6, 7] {
            let lesson = forwarded(ask(&caps, node));
            caps.learn(lesson, &reply(7, -libc::ENODATA, &[]));
        }
        let (h, f) = request(opcode::FORGET, 5, 0, &1u64.to_ne_bytes());
        look(&caps, &h, &f);
        assert!(matches!(ask(&caps, 5), Verdict::Forward(Some(_))));

        let mut body = Vec::new();
        body.extend_from_slice(&1u32.to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        body.extend_from_slice(&6u64.to_ne_bytes());
        body.extend_from_slice(&1u64.to_ne_bytes());
        let (h, f) = request(opcode::BATCH_FORGET, 0, 0, &body);
        look(&caps, &h, &f);
        assert!(matches!(ask(&caps, 6), Verdict::Forward(Some(_))));
        assert_eq!(ask(&caps, 7), Verdict::Absent);
    }
}
