//! The relay of a stream channel: `/dev/fuse` clones on one side, the appliance's
//! stream on the other.
//!
//! Requests are forwarded as read; each one the kernel expects an answer to is recorded
//! with the clone it came from, because the kernel only accepts a reply on that clone.
//! Replies are validated before they reach the kernel: the frame length, a known
//! `unique`, an error code in range. Anything else means the appliance is broken or
//! hostile: the bridge drops it, answers every pending request with EIO, and from then
//! on answers every new request with EIO itself.
//!
//! Where the mount's [`Tuning`] says the appliance is the only writer of its file
//! system, the bridge also answers two kinds of request itself, from what it has seen
//! pass: the kernel's `security.capability` checks, and the GETATTR of a directory
//! the appliance just changed, from the hint the appliance sent with its reply
//! ([`fsva_relay`]). For those it reads the payloads it needs (attribute names, rename
//! targets, forgotten nodes, entry replies); otherwise it reads none.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use fsva_channel::fusedev::FuseDev;
use fsva_channel::shm::ShmRegion;
use fsva_channel::stream::{receive_frame, send_frame};
use fsva_channel::Channel;
use fsva_protocol::abi::{opcode, OutHeader};
use fsva_protocol::reply::ReplyBuf;
use fsva_protocol::request::decode_header;
use zerocopy::FromBytes;

use crate::fallback::error_reply;
use fsva_relay::{Answers, Decision, Note};

/// Largest frame either way: a 1 MiB payload plus headers.
const MAX_FRAME: usize = (1 << 20) + 8192;
/// Largest `max_write` an appliance may negotiate: the kernel refuses reads into
/// buffers smaller than a request of that size, and ours are `MAX_FRAME`.
const MAX_WRITE: u32 = 1 << 20;
/// More unanswered requests than the kernel can have outstanding means a broken peer.
const MAX_PENDING: usize = 1 << 16;

/// Why the bridge gave up on an appliance.
pub type FailureHook = Box<dyn Fn(&str) + Send + Sync>;

/// What the relay may do beyond relaying, decided by the supervisor from the mount.
#[derive(Debug, Default, Clone)]
pub struct Tuning {
    /// The appliance is the only writer of its file system (a VM's image, `mem`, an
    /// `--exclusive` export): the relay answers the kernel's `security.capability`
    /// queries where it has seen the attribute is absent, and a directory's GETATTR
    /// from the appliance's hint where nothing changed the directory since.
    pub sole_writer: bool,
}

/// A request waiting for its reply.
struct Pending {
    /// The clone that read it: the kernel only takes the reply there.
    dev: usize,
    opcode: u32,
    /// What the relay's own answers need of its hints and reply.
    note: Note,
}

struct Shared {
    devs: Vec<Arc<FuseDev>>,
    /// The shared-memory data path, for a VM appliance that maps the same region.
    shm: Option<Arc<ShmRegion>>,
    to_appliance: Mutex<UnixStream>,
    /// A handle to the same socket for shutting it down without taking the writer's
    /// lock (a writer blocked on a full socket must not keep the bridge from failing).
    shutdown: UnixStream,
    pending: Mutex<HashMap<u64, Pending>>,
    /// What the relay answers itself (a sole writer only).
    answers: Option<Answers>,
    dead: AtomicBool,
    notifications_dropped: AtomicBool,
    on_failure: FailureHook,
}

/// A running relay.
pub struct Bridge {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Bridge {
    /// Starts relaying between `devs` and `stream`. `on_failure` is called once, with
    /// the reason, when the appliance misbehaves or disconnects.
    pub fn start(
        devs: Vec<Arc<FuseDev>>,
        stream: UnixStream,
        shm: Option<Arc<ShmRegion>>,
        tuning: Tuning,
        on_failure: FailureHook,
    ) -> std::io::Result<Bridge> {
        let reader = stream.try_clone()?;
        let shutdown = stream.try_clone()?;
        let shared = Arc::new(Shared {
            devs,
            shm,
            to_appliance: Mutex::new(stream),
            shutdown,
            pending: Mutex::new(HashMap::new()),
            answers: tuning.sole_writer.then(Answers::new),
            dead: AtomicBool::new(false),
            notifications_dropped: AtomicBool::new(false),
            on_failure,
        });
        let mut threads = Vec::new();
        for i in 0..shared.devs.len() {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("fsva-bridge-req-{i}"))
                    .spawn(move || forward_requests(&s, i))?,
            );
        }
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("fsva-bridge-reply".into())
                .spawn(move || forward_replies(&s, reader))?,
        );
        Ok(Bridge { shared, threads })
    }

    /// How many requests the relay answered itself (`None` where it answers none).
    pub fn answered(&self) -> Option<u64> {
        self.shared.answers.as_ref().map(|a| a.answered())
    }

    /// Whether the appliance side has been dropped.
    pub fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::SeqCst)
    }

    /// Drops the appliance side (for example because its process exited).
    pub fn fail(&self, why: &str) {
        fail(&self.shared, why);
    }

    /// The mount is gone: closes the appliance's stream so its workers see the end and
    /// exit (as fusedev workers do on ENODEV). Not a failure.
    pub fn close(&self) {
        self.shared.dead.store(true, Ordering::SeqCst);
        let _ = self.shared.shutdown.shutdown(std::net::Shutdown::Both);
    }

    /// Waits for the relay threads (they end when the mount goes away).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn fail(s: &Shared, why: &str) {
    // `dead` is set under the table's lock, where forward_requests checks it before it
    // records a request: every request is either drained here or answered there.
    let pending: Vec<(u64, Pending)> = {
        let mut table = s.pending.lock().unwrap_or_else(|p| p.into_inner());
        if s.dead.swap(true, Ordering::SeqCst) {
            return;
        }
        table.drain().collect()
    };
    tracing::error!(
        reason = why,
        "dropping the appliance; answering its requests with EIO"
    );
    let _ = s.shutdown.shutdown(std::net::Shutdown::Both);
    let mut reply = ReplyBuf::default();
    for (unique, p) in pending {
        let _ = s.devs[p.dev].send(reply.error(unique, libc::EIO));
    }
    (s.on_failure)(why);
}

fn forward_requests(s: &Shared, index: usize) {
    let dev = &s.devs[index];
    let mut buf = vec![0u8; MAX_FRAME];
    let mut reply = ReplyBuf::default();
    loop {
        let n = match dev.receive(&mut buf) {
            Ok(Some(n)) => n,
            Ok(None) => return,
            Err(e) => {
                // Not an unmount: the kernel refuses our reads (a negotiated max_write
                // larger than our buffer) or the device broke. Nobody can serve now.
                return fail(s, &format!("reading /dev/fuse failed: {e}"));
            }
        };
        let frame = &buf[..n];
        if s.dead.load(Ordering::SeqCst) {
            if let Some(r) = error_reply(frame, libc::EIO, &mut reply) {
                let _ = dev.send(r);
            }
            continue;
        }
        let Ok(h) = decode_header(frame) else {
            continue;
        };
        let note = match s.answers.as_ref().map(|a| a.on_request(&h, frame)) {
            Some(Decision::Answer(local)) => {
                let _ = dev.send(local.encode(&mut reply, h.unique));
                continue;
            }
            Some(Decision::Forward(note)) => note,
            None => Note::default(),
        };
        let one_way = one_way(h.opcode);
        if !one_way {
            let mut pending = s.pending.lock().unwrap_or_else(|p| p.into_inner());
            if s.dead.load(Ordering::SeqCst) {
                drop(pending);
                let _ = dev.send(reply.error(h.unique, libc::EIO));
                continue;
            }
            if pending.len() >= MAX_PENDING || pending.contains_key(&h.unique) {
                drop(pending);
                let _ = dev.send(reply.error(h.unique, libc::EIO));
                fail(s, "too many or duplicate outstanding requests");
                continue;
            }
            pending.insert(
                h.unique,
                Pending {
                    dev: index,
                    opcode: h.opcode,
                    note,
                },
            );
        }
        let sent = {
            let mut stream = s.to_appliance.lock().unwrap_or_else(|p| p.into_inner());
            send_frame(&mut *stream, s.shm.as_deref(), frame)
        };
        if let Err(e) = sent {
            fail(s, &format!("writing to the appliance failed: {e}"));
            // The request may have been drained by `fail` already; answer it if not.
            if !one_way
                && s.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&h.unique)
                    .is_some()
            {
                let _ = dev.send(reply.error(h.unique, libc::EIO));
            }
        }
    }
}

fn forward_replies(s: &Shared, reader: UnixStream) {
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let min = core::mem::size_of::<OutHeader>();
        // A reply is due while a request waits for one.
        let waiting = || {
            !s.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
        };
        let received = receive_frame(
            &reader,
            s.shm.as_deref(),
            &mut buf,
            min,
            "appliance stream",
            waiting,
        );
        let n = match received {
            Ok(Some(n)) => n,
            Ok(None) => return fail(s, "the appliance closed its stream"),
            Err(e) => return fail(s, &format!("malformed reply frame: {e}")),
        };
        if s.dead.load(Ordering::SeqCst) {
            return;
        }
        let frame = &buf[..n];
        let Ok((h, _)) = OutHeader::read_from_prefix(frame) else {
            return fail(s, "reply shorter than its header");
        };
        if fsva_protocol::hint::is_hint(&h) {
            take_hint(s, frame);
            continue;
        }
        if h.unique == 0 {
            // A notification. Writing one can block in the kernel on locks a request
            // waiting for its reply holds, and this thread delivers all replies, so
            // stream appliances may not send them (none of fsva's backends does yet).
            if h.error <= 0 {
                return fail(s, &format!("notification with invalid code {}", h.error));
            }
            if !s.notifications_dropped.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    code = h.error,
                    "dropping notifications from a stream appliance"
                );
            }
            continue;
        }
        if h.error > 0 || h.error < -4095 {
            return fail(
                s,
                &format!("reply to {} carries invalid error {}", h.unique, h.error),
            );
        }
        let Some(Pending {
            dev,
            opcode: op,
            note,
        }) = s
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&h.unique)
        else {
            return fail(s, &format!("reply to unknown request {}", h.unique));
        };
        if let Some(answers) = &s.answers {
            answers.on_reply(note, frame);
        }
        if op == opcode::INIT && h.error == 0 {
            let max_write = fsva_protocol::reply::init_reply_max_write(frame);
            if max_write > MAX_WRITE {
                let mut reply = ReplyBuf::default();
                let _ = s.devs[dev].send(reply.error(h.unique, libc::EIO));
                return fail(
                    s,
                    &format!("INIT asks for max_write {max_write}, above {MAX_WRITE}"),
                );
            }
        }
        if let Err(e) = s.devs[dev].send(frame) {
            // The kernel refused the frame (EINVAL: malformed for its request).
            tracing::warn!(unique = h.unique, error = %e, "kernel rejected a reply");
            let mut reply = ReplyBuf::default();
            let _ = s.devs[dev].send(reply.error(h.unique, libc::EIO));
            return fail(s, &format!("the kernel rejected reply {}: {e}", h.unique));
        }
    }
}

/// Hands a hint to the relay's answers (if it keeps them), with the note of the
/// request it names while that request still waits for its reply.
fn take_hint(s: &Shared, frame: &[u8]) {
    if let Some(answers) = &s.answers {
        answers.on_hint(frame, |unique| {
            let pending = s.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.get(&unique).map(|p| p.note)
        });
    }
}

/// Requests the kernel expects no reply to.
fn one_way(op: u32) -> bool {
    matches!(
        op,
        opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT | opcode::NOTIFY_REPLY
    )
}
