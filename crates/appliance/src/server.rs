//! Worker threads that serve channels, and the counters `fsva status` reports.
//!
//! Each worker owns a reusable request buffer and reply buffer and loops: receive a
//! frame, dispatch it, send the reply. Workers on a fusedev channel each hold their own
//! cloned descriptor (the kernel pairs a reply with the clone that read the request);
//! workers on a stream channel share one. The server ends when every channel reports
//! that its mount or peer is gone. It must never hold a lock across a backend call.

use std::sync::atomic::{AtomicU64, Ordering};
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
}

impl Server {
    /// `backing` registers FUSE passthrough backing files (None: data always goes
    /// through the appliance).
    pub fn new(
        fs: Arc<dyn Filesystem>,
        config: SessionConfig,
        backing: Option<Arc<dyn crate::BackingFiles>>,
    ) -> Self {
        Self {
            dispatcher: Arc::new(Dispatcher::new(fs, config, backing)),
            stats: Arc::new(ServerStats::default()),
        }
    }

    pub fn stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
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
                let handle = thread::Builder::new()
                    .name(format!("fsva-worker-{ci}.{ti}"))
                    .spawn(move || worker(&*chan, &dispatcher, &stats))
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
) -> Result<(), fsva_channel::ChannelError> {
    let mut buf = vec![0u8; dispatcher.max_frame()];
    let mut reply = ReplyBuf::with_capacity(dispatcher.max_frame());
    while let Some(n) = chan.receive(&mut buf)? {
        if let Some(frame) = answer(dispatcher, stats, &buf[..n], &mut reply) {
            chan.send(frame)?;
        }
    }
    Ok(())
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
