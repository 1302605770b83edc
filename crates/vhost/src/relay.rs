//! The device's link to its appliance: FUSE frames over the appliance's stream channel.
//!
//! Requests from every virtqueue go out on one stream, each under a `unique` of ours:
//! the guest's ids are not trusted to be unique, and the appliance must never see two
//! outstanding requests with the same id. What the reply needs to find its way back
//! (the queue, the chain head, the guest's own id) waits in a table until the reply
//! comes. Replies are checked as the supervisor's bridge checks them: frame length, a
//! known id, an error code in range, INIT's `max_write`. An appliance that breaks one
//! of these, closes its stream or dies fails the link: every waiting request is
//! completed with EIO, and every later one at once.
//!
//! A link may be moved to a new appliance while nothing waits ([`Relay::reattach`]: a
//! migration's destination replaces the fresh appliance it started by one restored
//! from the source's state); the old stream's end is then no failure.
//!
//! For an appliance that is the only writer of its file system, the link answers the
//! guest's `security.capability` checks and the GETATTR of a directory the appliance
//! just changed itself ([`fsva_relay::Answers`]), reading only the payloads those
//! need. Otherwise it reads no payload. It never touches guest memory: completing a
//! request (writing the reply into the chain) is the caller's `complete` callback.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fsva_channel::shm::ShmRegion;
use fsva_channel::stream::{receive_frame, send_frame};
use fsva_protocol::abi::{opcode, OutHeader};
use fsva_protocol::reply::ReplyBuf;
use fsva_protocol::request::decode_header;
use zerocopy::FromBytes;

use crate::chain::MAX_REQUEST;

/// Largest `max_write` an appliance may negotiate: requests are read into buffers of
/// [`MAX_REQUEST`] bytes.
const MAX_WRITE: u32 = 1 << 20;
/// More waiting requests than this means a broken peer: no guest queue set-up allows it.
const MAX_PENDING: usize = 1 << 16;
/// Where the `unique` field sits in both FUSE headers.
const UNIQUE: std::ops::Range<usize> = 8..16;

/// Delivers a finished reply (or an error reply made here) for a request's token.
pub type Complete<T> = Box<dyn Fn(T, &[u8]) + Send + Sync>;
/// Told once, with the reason, when the link fails.
pub type OnFailure = Box<dyn Fn(&str) + Send + Sync>;

/// What became of a request handed to [`Relay::forward`].
#[derive(Debug)]
pub enum Forwarded<T> {
    /// Sent; its reply will come through `complete`.
    Sent,
    /// Needs no reply (FORGET and friends): the chain is done, with nothing written.
    NoReply(T),
    /// Not sent: answer the guest with this errno.
    Refused(T, i32),
    /// Answered here, without the appliance: complete the chain with this reply.
    Answered(T, Vec<u8>),
}

struct Waiting<T> {
    token: T,
    guest_unique: u64,
    opcode: u32,
    /// What the link's own answers need of the hints and the reply.
    note: fsva_relay::Note,
}

/// The link to one appliance.
pub struct Relay<T> {
    to_appliance: Mutex<UnixStream>,
    /// The same socket, to shut down without the writer's lock (held only to swap or
    /// shut it, never across a blocking call).
    shutdown: Mutex<UnixStream>,
    /// Which stream is current: a reply reader of an earlier one ends silently.
    generation: AtomicU64,
    shm: Option<Arc<ShmRegion>>,
    waiting: Mutex<HashMap<u64, Waiting<T>>>,
    /// What the link answers itself (an appliance that is the only writer).
    answers: Option<fsva_relay::Answers>,
    next_unique: AtomicU64,
    dead: AtomicBool,
    complete: Complete<T>,
    on_failure: OnFailure,
}

impl<T: Send + 'static> Relay<T> {
    /// A relay over `stream` (and `shm`, when the appliance is a VM mapping the same
    /// region), answering what `answers` can where the appliance is the only writer.
    /// Returns the relay and the reading end for [`Relay::run_replies`].
    pub fn new(
        stream: UnixStream,
        shm: Option<Arc<ShmRegion>>,
        answers: Option<fsva_relay::Answers>,
        complete: Complete<T>,
        on_failure: OnFailure,
    ) -> std::io::Result<(Arc<Self>, UnixStream)> {
        let reader = stream.try_clone()?;
        let shutdown = stream.try_clone()?;
        let relay = Arc::new(Relay {
            to_appliance: Mutex::new(stream),
            shutdown: Mutex::new(shutdown),
            generation: AtomicU64::new(0),
            shm,
            waiting: Mutex::new(HashMap::new()),
            answers,
            next_unique: AtomicU64::new(1),
            dead: AtomicBool::new(false),
            complete,
            on_failure,
        });
        Ok((relay, reader))
    }

    /// Whether the link has failed.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Sends one request frame (as the guest wrote it; its `unique` is replaced).
    pub fn forward(&self, frame: &mut [u8], token: T) -> Forwarded<T> {
        let header = match decode_header(frame) {
            Ok(h) => h,
            Err(_) => return Forwarded::Refused(token, libc::EINVAL),
        };
        match header.opcode {
            // Both name requests by the guest's ids, which the appliance never saw;
            // neither needs an answer.
            opcode::INTERRUPT | opcode::NOTIFY_REPLY => return Forwarded::NoReply(token),
            _ => {}
        }
        // A failed link answers nothing itself either: every request gets EIO at once
        // (the tables may hold what a lost reply would have corrected).
        if self.is_dead() {
            return Forwarded::Refused(token, libc::EIO);
        }
        let note = match self.answers.as_ref().map(|a| a.on_request(&header, frame)) {
            Some(fsva_relay::Decision::Answer(local)) => {
                let mut reply = ReplyBuf::default();
                let reply = local.encode(&mut reply, header.unique).to_vec();
                return Forwarded::Answered(token, reply);
            }
            Some(fsva_relay::Decision::Forward(note)) => note,
            None => fsva_relay::Note::default(),
        };
        let one_way = matches!(header.opcode, opcode::FORGET | opcode::BATCH_FORGET);
        let ours = self.next_unique.fetch_add(1, Ordering::Relaxed);
        let mut token = Some(token);
        {
            // Checked under the table's lock, which `fail` holds while it sets `dead`
            // and drains the table: a request is either drained by it or refused here.
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            if self.is_dead() {
                return Forwarded::Refused(token.take().expect("token unused"), libc::EIO);
            }
            if !one_way {
                if waiting.len() >= MAX_PENDING {
                    drop(waiting);
                    self.fail("more requests waiting than any queue set-up allows");
                    return Forwarded::Refused(token.take().expect("token unused"), libc::EIO);
                }
                waiting.insert(
                    ours,
                    Waiting {
                        token: token.take().expect("token unused"),
                        guest_unique: header.unique,
                        opcode: header.opcode,
                        note,
                    },
                );
            }
        }
        frame[UNIQUE].copy_from_slice(&ours.to_ne_bytes());
        let sent = {
            let mut stream = self.to_appliance.lock().unwrap_or_else(|p| p.into_inner());
            send_frame(&mut *stream, self.shm.as_deref(), frame)
        };
        if let Err(e) = sent {
            self.fail(&format!("writing to the appliance failed: {e}"));
        }
        match token {
            Some(token) => Forwarded::NoReply(token),
            None => Forwarded::Sent,
        }
    }

    /// Delivers the appliance's replies until the link fails.
    pub fn run_replies(&self, reader: UnixStream) {
        self.replies_of(reader, 0)
    }

    /// Whether any request was sent to an appliance over this link.
    pub fn has_forwarded(&self) -> bool {
        self.next_unique.load(Ordering::Relaxed) > 1
    }

    /// Moves the link to a new appliance's `stream` (a process appliance's: no shared
    /// memory) and starts delivering its replies. Only while no request waits: the
    /// old appliance's stream is shut and its end is not a failure.
    pub fn reattach(self: &Arc<Self>, stream: UnixStream) -> std::io::Result<()> {
        if self.shm.is_some() {
            return Err(std::io::Error::other(
                "a link with a shared-memory data path cannot move to another appliance",
            ));
        }
        let reader = stream.try_clone()?;
        let shutdown = stream.try_clone()?;
        let generation = {
            let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            if self.is_dead() {
                return Err(std::io::Error::other("the appliance link has failed"));
            }
            if !waiting.is_empty() {
                return Err(std::io::Error::other(format!(
                    "{} requests wait at the appliance; the link cannot move",
                    waiting.len()
                )));
            }
            let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
            let old = std::mem::replace(
                &mut *self.shutdown.lock().unwrap_or_else(|p| p.into_inner()),
                shutdown,
            );
            *self.to_appliance.lock().unwrap_or_else(|p| p.into_inner()) = stream;
            let _ = old.shutdown(std::net::Shutdown::Both);
            generation
        };
        let relay = self.clone();
        std::thread::Builder::new()
            .name("fsva-vhost-reply".into())
            .spawn(move || relay.replies_of(reader, generation))
            .map(|_| ())
    }

    /// Delivers the replies on stream `generation` until it ends: a failure of the
    /// link if it is still the current one.
    fn replies_of(&self, reader: UnixStream, generation: u64) {
        let current = || self.generation.load(Ordering::SeqCst) == generation;
        let fail = |why: &str| {
            if current() {
                self.fail(why);
            }
        };
        let mut buf = vec![0u8; MAX_REQUEST];
        let min = core::mem::size_of::<OutHeader>();
        loop {
            let received = receive_frame(
                &reader,
                self.shm.as_deref(),
                &mut buf,
                min,
                "appliance stream",
                // A reply is due while a request waits for one.
                || {
                    !self
                        .waiting
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_empty()
                },
            );
            let n = match received {
                Ok(Some(n)) => n,
                Ok(None) => return fail("the appliance closed its stream"),
                Err(e) => return fail(&format!("malformed reply frame: {e}")),
            };
            if self.is_dead() || !current() {
                return;
            }
            if let Err(why) = self.deliver(&mut buf[..n]) {
                return fail(&why);
            }
        }
    }

    fn deliver(&self, frame: &mut [u8]) -> Result<(), String> {
        let (h, _) = OutHeader::read_from_prefix(frame)
            .map_err(|_| "reply shorter than its header".to_string())?;
        if fsva_protocol::hint::is_hint(&h) {
            if let Some(answers) = &self.answers {
                answers.on_hint(frame, |unique| {
                    let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
                    waiting.get(&unique).map(|w| w.note)
                });
            }
            return Ok(());
        }
        if h.unique == 0 {
            // A notification: Linux's virtiofs has no notification queue. Dropped.
            if h.error <= 0 {
                return Err(format!("notification with invalid code {}", h.error));
            }
            tracing::debug!(
                code = h.error,
                "dropping a notification: virtiofs has no queue for it"
            );
            return Ok(());
        }
        if h.error > 0 || h.error < -4095 {
            return Err(format!(
                "reply to {} carries invalid error {}",
                h.unique, h.error
            ));
        }
        let w = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&h.unique)
            .ok_or_else(|| format!("reply to unknown request {}", h.unique))?;
        if w.opcode == opcode::INIT && h.error == 0 {
            let max_write = fsva_protocol::reply::init_reply_max_write(frame);
            if max_write > MAX_WRITE {
                let mut reply = ReplyBuf::default();
                (self.complete)(w.token, reply.error(w.guest_unique, libc::EIO));
                return Err(format!(
                    "INIT asks for max_write {max_write}, above {MAX_WRITE}"
                ));
            }
        }
        if let Some(answers) = &self.answers {
            answers.on_reply(w.note, frame);
        }
        frame[UNIQUE].copy_from_slice(&w.guest_unique.to_ne_bytes());
        (self.complete)(w.token, frame);
        Ok(())
    }

    /// Fails the link: completes every waiting request with EIO and shuts the stream.
    pub fn fail(&self, why: &str) {
        let waiting: Vec<Waiting<T>> = {
            let mut table = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            if self.dead.swap(true, Ordering::SeqCst) {
                return;
            }
            table.drain().map(|(_, w)| w).collect()
        };
        tracing::error!(
            reason = why,
            "dropping the appliance; answering the guest with EIO"
        );
        self.shut();
        let mut reply = ReplyBuf::default();
        for w in waiting {
            (self.complete)(w.token, reply.error(w.guest_unique, libc::EIO));
        }
        (self.on_failure)(why);
    }

    /// Closes the link at the end of service (not a failure).
    pub fn close(&self) {
        self.dead.store(true, Ordering::SeqCst);
        self.shut();
    }

    fn shut(&self) {
        let _ = self
            .shutdown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fsva_protocol::abi::InHeader;
    use std::io::Write;
    use std::sync::mpsc;
    use zerocopy::IntoBytes;

    fn request(op: u32, unique: u64) -> Vec<u8> {
        let h = InHeader {
            len: 40,
            opcode: op,
            unique,
            nodeid: 1,
            uid: 0,
            gid: 0,
            pid: 0,
            total_extlen: 0,
            padding: 0,
        };
        h.as_bytes().to_vec()
    }

    type Done = mpsc::Receiver<(u32, Vec<u8>)>;

    fn relay() -> (Arc<Relay<u32>>, UnixStream, UnixStream, Done) {
        relay_answering(None)
    }

    fn relay_answering(
        answers: Option<fsva_relay::Answers>,
    ) -> (Arc<Relay<u32>>, UnixStream, UnixStream, Done) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let (relay, reader) = Relay::new(
            ours,
            None,
            answers,
            Box::new(move |token, frame: &[u8]| {
                let _ = tx.lock().unwrap().send((token, frame.to_vec()));
            }),
            Box::new(|_| {}),
        )
        .unwrap();
        (relay, reader, theirs, rx)
    }

    #[test]
    fn guest_ids_are_replaced_and_restored() {
        let (relay, reader, mut appliance, done) = relay();
        let r = relay.clone();
        let t = std::thread::spawn(move || r.run_replies(reader));
        // Two requests with the same guest id: the appliance sees two different ids.
        let mut a = request(opcode::GETATTR, 7);
        let mut b = request(opcode::GETATTR, 7);
        assert!(matches!(relay.forward(&mut a, 1), Forwarded::Sent));
        assert!(matches!(relay.forward(&mut b, 2), Forwarded::Sent));
        let mut got = [0u8; 80];
        std::io::Read::read_exact(&mut appliance, &mut got).unwrap();
        let (ua, ub) = (
            u64::from_ne_bytes(got[8..16].try_into().unwrap()),
            u64::from_ne_bytes(got[48..56].try_into().unwrap()),
        );
        assert_ne!(ua, ub);
        let mut reply = ReplyBuf::default();
        appliance.write_all(reply.error(ub, libc::ENOENT)).unwrap();
        let (token, frame) = done.recv().unwrap();
        assert_eq!(token, 2);
        let (h, _) = OutHeader::read_from_prefix(&frame[..]).unwrap();
        assert_eq!((h.unique, h.error), (7, -libc::ENOENT));
        // A reply to an id never sent fails the link; the waiting request gets EIO.
        appliance.write_all(reply.error(999, libc::ENOENT)).unwrap();
        let (token, frame) = done.recv().unwrap();
        assert_eq!(token, 1);
        let (h, _) = OutHeader::read_from_prefix(&frame[..]).unwrap();
        assert_eq!((h.unique, h.error), (7, -libc::EIO));
        t.join().unwrap();
        assert!(relay.is_dead());
        assert!(matches!(
            relay.forward(&mut request(opcode::GETATTR, 8), 3),
            Forwarded::Refused(3, libc::EIO)
        ));
    }

    #[test]
    fn a_link_moves_to_a_new_appliance_and_the_old_ones_end_is_no_failure() {
        let (relay, reader, _first, done) = relay();
        let r = relay.clone();
        let t = std::thread::spawn(move || r.run_replies(reader));
        let (ours, mut second) = UnixStream::pair().unwrap();
        relay.reattach(ours).unwrap();
        // The old stream was shut: its reader ends, the link lives.
        t.join().unwrap();
        assert!(!relay.is_dead());
        let mut a = request(opcode::GETATTR, 5);
        assert!(matches!(relay.forward(&mut a, 1), Forwarded::Sent));
        let mut got = [0u8; 40];
        std::io::Read::read_exact(&mut second, &mut got).unwrap();
        let ours = u64::from_ne_bytes(got[8..16].try_into().unwrap());
        let mut reply = ReplyBuf::default();
        second.write_all(reply.error(ours, libc::ENOENT)).unwrap();
        let (token, frame) = done.recv().unwrap();
        assert_eq!(token, 1);
        let (h, _) = OutHeader::read_from_prefix(&frame[..]).unwrap();
        assert_eq!((h.unique, h.error), (5, -libc::ENOENT));
        // With a request waiting, the link does not move.
        assert!(matches!(
            relay.forward(&mut request(opcode::GETATTR, 6), 2),
            Forwarded::Sent
        ));
        assert!(relay.reattach(UnixStream::pair().unwrap().0).is_err());
        // The new appliance's end is a failure as before.
        drop(second);
        let (token, frame) = done.recv().unwrap();
        assert_eq!(token, 2);
        let (h, _) = OutHeader::read_from_prefix(&frame[..]).unwrap();
        assert_eq!(h.error, -libc::EIO);
        assert!(relay.is_dead());
    }

    #[test]
    fn frames_whose_length_lies_are_refused_before_the_appliance_sees_them() {
        let (relay, _reader, _appliance, _done) = relay();
        let mut short = request(opcode::GETATTR, 1);
        short[0] = 200; // claims 200 bytes, holds 40
        assert!(matches!(
            relay.forward(&mut short, 1),
            Forwarded::Refused(1, libc::EINVAL)
        ));
        assert!(matches!(
            relay.forward(&mut [0u8; 12], 2),
            Forwarded::Refused(2, libc::EINVAL)
        ));
        assert!(matches!(
            relay.forward(&mut request(opcode::FORGET, 3), 3),
            Forwarded::NoReply(3)
        ));
        assert!(!relay.is_dead());
    }

    /// A request frame with a 16-byte body of zeros (GETATTR's arguments, or enough
    /// for the opcodes the link only reads headers of).
    fn request_with_body(op: u32, unique: u64, node: u64) -> Vec<u8> {
        let h = InHeader {
            len: 56,
            opcode: op,
            unique,
            nodeid: node,
            ..Default::default()
        };
        let mut f = h.as_bytes().to_vec();
        f.extend_from_slice(&[0; 16]);
        f
    }

    #[test]
    fn a_sole_writers_directory_getattr_is_answered_from_the_hint_under_the_guests_id() {
        let (relay, reader, mut appliance, done) =
            relay_answering(Some(fsva_relay::Answers::new()));
        let r = relay.clone();
        let t = std::thread::spawn(move || r.run_replies(reader));
        let mut unlink = request_with_body(opcode::UNLINK, 7, 2);
        assert!(matches!(relay.forward(&mut unlink, 1), Forwarded::Sent));
        let mut got = [0u8; 56];
        std::io::Read::read_exact(&mut appliance, &mut got).unwrap();
        let ours = u64::from_ne_bytes(got[8..16].try_into().unwrap());
        let mut hint = fsva_protocol::hint::DirAttrHint {
            unique: ours,
            nodeid: 2,
            ..Default::default()
        };
        hint.attr.attr.mode = 0o040755;
        hint.attr.attr.nlink = 5;
        let mut buf = ReplyBuf::default();
        appliance
            .write_all(fsva_protocol::hint::dir_attr(&mut buf, &hint))
            .unwrap();
        appliance.write_all(buf.empty(ours)).unwrap();
        let (token, frame) = done.recv().unwrap();
        assert_eq!(token, 1);
        assert_eq!(OutHeader::read_from_prefix(&frame[..]).unwrap().0.unique, 7);

        let mut getattr = request_with_body(opcode::GETATTR, 9, 2);
        let Forwarded::Answered(token, reply) = relay.forward(&mut getattr, 2) else {
            panic!("the directory's GETATTR is answered by the link");
        };
        assert_eq!(token, 2);
        let (h, body) = OutHeader::read_from_prefix(&reply[..]).unwrap();
        assert_eq!((h.unique, h.error), (9, 0));
        let attr = fsva_protocol::abi::AttrOut::read_from_bytes(body).unwrap();
        assert_eq!(attr.attr.nlink, 5);
        // Another directory goes to the appliance.
        let mut other = request_with_body(opcode::GETATTR, 10, 3);
        assert!(matches!(relay.forward(&mut other, 3), Forwarded::Sent));
        // Once the link has failed, what the tables hold answers nothing.
        relay.fail("test");
        let mut again = request_with_body(opcode::GETATTR, 11, 2);
        assert!(matches!(
            relay.forward(&mut again, 4),
            Forwarded::Refused(4, libc::EIO)
        ));
        drop(appliance);
        t.join().unwrap();
    }
}
