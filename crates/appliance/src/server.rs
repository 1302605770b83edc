//! Worker threads that serve channels, and the counters `fsva status` reports.
//!
//! Each worker owns a reusable request buffer and reply buffer and loops: receive a
//! frame, dispatch it, send the reply. Workers on a fusedev channel each hold their own
//! cloned descriptor (the kernel pairs a reply with the clone that read the request);
//! workers on a stream channel share one. The server ends when every channel reports
//! that its mount or peer is gone. It must never hold a lock across a backend call.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use fsva_channel::Channel;
use fsva_protocol::reply::ReplyBuf;
use zerocopy::FromBytes;

use crate::dispatch::{Dispatcher, Outcome};
use crate::filesystem::Filesystem;
use crate::session::SessionConfig;

/// Request counters, readable while the server runs.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
}

impl ServerStats {
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

/// An appliance's request server.
pub struct Server {
    dispatcher: Arc<Dispatcher>,
    stats: Arc<ServerStats>,
    pause: Arc<Pause>,
    /// Send directory-attribute hints before replies ([`crate::dir_hints`]).
    dir_hints: bool,
}

/// Workers stop taking on requests while a checkpoint is taken. A request a worker
/// read after the pause began is held, not executed: the kernel keeps it as in flight,
/// and if this appliance is replaced, resends it to the successor (FUSE_NOTIFY_RESEND).
#[derive(Debug, Default)]
struct Pause {
    paused: AtomicBool,
    /// Requests being executed right now.
    active: AtomicUsize,
}

/// Journal records between checkpoints: at least
/// [`crate::journal::MIN_RECORDS_BETWEEN_CHECKPOINTS`], and more for a larger state (one
/// per this many bytes of it): replaying a record costs about what encoding a few
/// hundred bytes of state does, so a successor's replay stays about as short as the
/// checkpoint that would have spared it.
const RECORD_PER_STATE_BYTES: u64 = 200;

/// How long a checkpoint waits for requests in execution to finish.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Server {
    /// `backing` registers FUSE passthrough backing files (None: data always goes
    /// through the appliance); `journal` is the recovery journal the supervisor keeps
    /// for this appliance, if any (the backend `fs` must write to the same one).
    pub fn new(
        fs: Arc<dyn Filesystem>,
        config: SessionConfig,
        backing: Option<Arc<dyn crate::BackingFiles>>,
        journal: Option<Arc<crate::journal::Journal>>,
    ) -> Self {
        Self {
            dispatcher: Arc::new(Dispatcher::new(fs, config, backing, journal)),
            stats: Arc::new(ServerStats::default()),
            pause: Arc::default(),
            dir_hints: false,
        }
    }

    /// Sends directory-attribute hints ([`crate::dir_hints`]) on the channels
    /// [`Server::serve`] serves: only for stream channels to a relay that knows this
    /// appliance is the only writer of its file system.
    pub fn with_dir_hints(mut self, on: bool) -> Self {
        self.dir_hints = on;
        self
    }

    /// A server taking over from a predecessor: `state` is what the predecessor's
    /// checkpoint encoded (the backend, built from its part, is `fs`), and `replay` the
    /// runtime's journal records written after it (crash recovery).
    pub fn restored(
        fs: Arc<dyn Filesystem>,
        config: SessionConfig,
        backing: Option<Arc<dyn crate::BackingFiles>>,
        journal: Option<Arc<crate::journal::Journal>>,
        state: &crate::state::StateV2,
        replay: &[crate::backing::RuntimeRecordV1],
    ) -> Self {
        let server = Self::new(fs, config, backing, journal);
        server.dispatcher.adopt(state);
        server.dispatcher.replay(replay);
        server
    }

    /// Takes over a predecessor's session when no checkpoint held it (the journal's
    /// header did).
    pub fn adopt_session(&self, s: crate::state::SessionV1) {
        if self.dispatcher.session().negotiation().is_none() {
            self.dispatcher.adopt_session(s);
        }
    }

    /// Takes a checkpoint for crash recovery while serving (no pause: the backend's
    /// lock gives the cut) and hands it to `keeper`. Returns the journal boundary it
    /// covers.
    pub fn journal_checkpoint(
        &self,
        keeper: &dyn crate::Keeper,
    ) -> std::result::Result<u64, crate::state::StateError> {
        let Some(journal) = self.dispatcher.journal() else {
            return Err(crate::state::StateError::Unsupported(
                "this appliance keeps no recovery journal".into(),
            ));
        };
        let (backend, boundary) = self
            .dispatcher
            .filesystem()
            .journal_checkpoint(&mut || journal.rotate())?;
        // A successor should replay about as long as taking a checkpoint takes: the
        // larger the state, the longer the journal between checkpoints.
        journal.set_record_threshold(
            (backend.len() as u64 / RECORD_PER_STATE_BYTES)
                .max(crate::journal::MIN_RECORDS_BETWEEN_CHECKPOINTS),
        );
        // The runtime's part is read after the rotation: it then holds every change up
        // to the boundary (and perhaps some after it, which replay again harmlessly).
        let state = self.dispatcher.state(backend, boundary).encode();
        keeper.store_checkpoint(&state, boundary).map_err(|e| {
            crate::state::StateError::Backend(format!("storing the checkpoint: {e}"))
        })?;
        journal.covered(boundary);
        Ok(boundary)
    }

    /// Keeps the journal short: a checkpoint whenever the journal says one is due, on
    /// a thread of its own. (None at once: a new appliance's state is empty, and a
    /// successor's is its predecessor's checkpoint and journal, which a spare already
    /// preloads; taking one now would only stall the requests waiting for it.)
    pub fn start_checkpointer(self: &Arc<Self>, keeper: Arc<dyn crate::Keeper>) {
        let server = self.clone();
        let _ = thread::Builder::new()
            .name("fsva-checkpoint".into())
            .spawn(move || {
                let Some(journal) = server.dispatcher.journal().cloned() else {
                    return;
                };
                loop {
                    while !journal.wait_due(std::time::Duration::from_secs(3600)) {}
                    let t0 = std::time::Instant::now();
                    match server.journal_checkpoint(&*keeper) {
                        Ok(boundary) => tracing::debug!(
                            boundary,
                            took_us = t0.elapsed().as_micros() as u64,
                            "checkpoint stored"
                        ),
                        Err(e) => {
                            tracing::error!(error = %e, "checkpoint failed; a successor would replay a longer journal");
                            std::thread::sleep(std::time::Duration::from_secs(1));
                        }
                    }
                }
            });
    }

    /// Pauses the workers, waits for requests in execution, and returns the encoded
    /// state with the descriptors it refers to. On error the workers resume.
    pub fn checkpoint(
        &self,
    ) -> std::result::Result<(Vec<u8>, Vec<crate::state::StateFd>), crate::state::StateError> {
        self.pause.paused.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + DRAIN_LIMIT;
        while self.pause.active.load(Ordering::SeqCst) > 0 {
            if std::time::Instant::now() > deadline {
                self.resume();
                return Err(crate::state::StateError::Backend(
                    "requests still executing after 10 s; not checkpointed".into(),
                ));
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        match self.dispatcher.filesystem().checkpoint() {
            Ok(backend) => Ok((
                self.dispatcher.state(backend.bytes, 0).encode(),
                backend.fds,
            )),
            Err(e) => {
                self.resume();
                Err(e)
            }
        }
    }

    /// Lets the workers go on after a checkpoint that was not used.
    pub fn resume(&self) {
        self.pause.paused.store(false, Ordering::SeqCst);
    }

    pub fn stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }

    /// Inodes open through FUSE passthrough right now (the kernel reads and writes
    /// their files directly).
    pub fn passthrough_files(&self) -> usize {
        self.dispatcher.passthrough_files()
    }

    /// Serves one request frame in the calling thread (for transports that bring their
    /// own threads, such as the vhost-user device's queue workers); the reply frame,
    /// if the request has one.
    pub fn answer<'r>(&self, frame: &[u8], reply: &'r mut ReplyBuf) -> Option<&'r [u8]> {
        answer(&self.dispatcher, &self.stats, frame, reply)
    }

    /// The largest request frame this server accepts.
    pub fn max_frame(&self) -> usize {
        self.dispatcher.max_frame()
    }

    /// Ends the session when a caller-driven transport is done (as `serve` does when
    /// its channels close): releases what the backend still holds.
    pub fn finish(&self) {
        self.dispatcher.destroy();
    }

    /// Serves every channel with `threads_per_channel` workers each, until all of them
    /// are closed. Returns the first fatal channel error, if any.
    pub fn serve(
        &self,
        channels: Vec<Arc<dyn Channel>>,
        threads_per_channel: usize,
    ) -> Result<(), fsva_channel::ChannelError> {
        let mut handles = Vec::new();
        for (ci, chan) in channels.into_iter().enumerate() {
            for ti in 0..threads_per_channel.max(1) {
                let chan = chan.clone();
                let dispatcher = self.dispatcher.clone();
                let stats = self.stats.clone();
                let pause = self.pause.clone();
                let hints = self.dir_hints;
                let handle = thread::Builder::new()
                    .name(format!("fsva-worker-{ci}.{ti}"))
                    .spawn(move || worker(&*chan, &dispatcher, &stats, &pause, hints))
                    .expect("spawning a worker thread");
                handles.push(handle);
            }
        }
        let mut first_error = None;
        let dispatcher = self.dispatcher.clone();
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => tracing::error!("a worker thread panicked"),
            }
        }
        dispatcher.destroy();
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn worker(
    chan: &dyn Channel,
    dispatcher: &Dispatcher,
    stats: &ServerStats,
    pause: &Pause,
    dir_hints: bool,
) -> Result<(), fsva_channel::ChannelError> {
    let mut buf = vec![0u8; dispatcher.max_frame()];
    prefault(&mut buf);
    let mut reply = ReplyBuf::with_capacity(dispatcher.max_frame());
    let mut hint = ReplyBuf::default();
    while let Some(n) = chan.receive(&mut buf)? {
        pause.active.fetch_add(1, Ordering::SeqCst);
        while pause.paused.load(Ordering::SeqCst) {
            // Held, not executed: a successor gets it resent; if the checkpoint is not
            // used, it runs when the pause ends.
            pause.active.fetch_sub(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(1));
            pause.active.fetch_add(1, Ordering::SeqCst);
        }
        let request = &buf[..n];
        let answered = answer(dispatcher, stats, request, &mut reply).map(|f| {
            if dir_hints {
                let fs = &**dispatcher.filesystem();
                crate::dir_hints::send(chan, fs, request, f, &mut hint)?;
            }
            chan.send(f)
        });
        pause.active.fetch_sub(1, Ordering::SeqCst);
        if let Some(sent) = answered {
            sent?;
        }
    }
    Ok(())
}

/// Backs every page of a request buffer with memory now. The kernel copies a request
/// into the buffer of the thread that reads it; a page fault during that copy fails
/// when the process has a fatal signal pending, and the kernel then ends the request
/// with EIO instead of leaving it for a successor to be resent (seen as an mmap
/// write-back lost to a `kill -9`). Resident pages take no fault.
fn prefault(buf: &mut [u8]) {
    for i in (0..buf.len()).step_by(4096) {
        // SAFETY: `i` is within `buf`; a volatile write keeps the compiler from
        // eliding a store of what a fresh zeroed allocation already reads as.
        unsafe { std::ptr::write_volatile(buf.as_mut_ptr().add(i), 0) };
    }
}

/// Serves one request; the reply frame, if the request has one.
fn answer<'r>(
    dispatcher: &Dispatcher,
    stats: &ServerStats,
    frame: &[u8],
    reply: &'r mut ReplyBuf,
) -> Option<&'r [u8]> {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    if dispatcher.handle(frame, reply) != Outcome::Reply {
        return None;
    }
    let out = reply.finish();
    if let Ok((h, _)) = fsva_protocol::abi::OutHeader::read_from_prefix(out) {
        if h.error != 0 {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    Some(out)
}
