//! Moving a mount's appliance to another host (`fsva migrate MOUNTPOINT --to
//! HOST:PORT`): the mount stays here, with the applications; an appliance the host
//! daemon there (`fsva host`) starts serves it from then on, its FUSE frames crossing
//! TCP through the stream relay ([`crate::bridge`]) on the same `/dev/fuse` clones.
//!
//! Two connections go to the daemon, each opened with the shared-key handshake of
//! [`fsva_control::host`]: a control connection (state, go-ahead, counters; the daemon
//! stops the appliance when it closes) and a data connection, which the remote
//! appliance reads and writes itself as its `stream` channel.
//!
//! - `mem` moves by content, in two rounds. While the local appliance serves, it
//!   stores a fresh checkpoint; the checkpoint and the contents of every memfd it kept
//!   with this supervisor are sent (pre-copy), and again those the journal names as
//!   changed since, for a few rounds while they add up to much. Then it is killed and
//!   its keeper link read to the end; the journal records after the checkpoint follow,
//!   and the contents of the memfds that changed after the last round
//!   (stop-and-copy). Without FUSE
//!   passthrough every change of a file's contents goes through the appliance and is
//!   journaled with the file's memfd id, so the daemon finds the changed files in
//!   those records (it knows mem's format; this module does not); a file kept after
//!   the pre-copy is new and comes too. A mount with FUSE passthrough files open is
//!   refused: the kernel writes their memfds directly, here, past the journal.
//! - `passthrough` moves by path, over storage both hosts see: the appliance is paused
//!   and its state sent without descriptors; the remote appliance finds every node
//!   again by its path hint (ESTALE for one it cannot find). The kernel files that use
//!   FUSE passthrough keep their backing files (files of the shared storage, opened
//!   here) until they are closed, and the remote appliance names their backing ids
//!   when their inodes are opened again (the kernel requires it); other files' data
//!   goes through the remote appliance. Those ids stay registered until the unmount
//!   (the remote appliance cannot close an id of this kernel).
//!
//! The switch: the remote appliance has rebuilt the state and says Ready; the local
//! one is gone (all its threads); the kernel is asked to queue again what it held
//! (FUSE_NOTIFY_RESEND) — before the relay reads anything, so that no request is
//! handed out twice — then the relay starts on the clones, and only then is the remote
//! appliance told to serve. Requests waited from the stop of the local appliance
//! until the remote one serves: that is the downtime reported.
//!
//! A failure before the local appliance stopped leaves it serving; after (mem), the
//! mount recovers locally from what this supervisor kept, as after a crash. This
//! module moves bytes and descriptors; it never interprets a state, and never decides
//! whether a mount may move beyond what it can carry correctly.

use std::collections::HashSet;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fsva_channel::fusedev::FuseDev;
use fsva_control::host::{
    self, FilePart, FromHost, HostError, HostKey, JournalRecord, StateKind, ToHost, FILES_BATCH,
};
use fsva_control::{ApplianceStats, BackendSpec, ChannelKind, FramedLink, LinkError, StartConfig};
use thiserror::Error;

use crate::bridge::{Bridge, Tuning};
use crate::keeper::Kept;
use crate::takeover::Current;

/// How long connecting to the daemon may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the daemon may take to answer a step of the migration (setting up a
/// sandbox, rebuilding a state of many files).
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a counters request to a remote appliance may take.
const STATS_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the local appliance may take to exit after SIGKILL, and its keeper link
/// to be read to the end.
const EXIT_LIMIT: Duration = Duration::from_secs(5);
/// Most bytes of state or journal records in one message.
const STATE_BATCH: usize = 4 << 20;
/// Most pre-copy rounds after the first, and the size of a round small enough to stop
/// at, in bytes and in files (what changes meanwhile goes in the stop-and-copy).
const MAX_ROUNDS: u32 = 4;
const ROUND_ENOUGH: u64 = 256 << 10;
const ROUND_FILES: usize = 64;
/// Most bytes of journal records gathered for naming changed files; past it, every
/// file is sent again instead.
const MAX_TAIL: usize = 32 << 20;

/// Why a migration did not happen.
#[derive(Debug, Error)]
pub enum MigrateError {
    /// The mount cannot move (as it is mounted, or what it holds now).
    #[error("{0}")]
    Refused(String),
    #[error("cannot reach the host daemon at {addr}: {source} (is `fsva host --listen {addr}` running there?)")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{source} (host daemon {addr})")]
    Handshake { addr: String, source: HostError },
    #[error("the host daemon at {addr} failed: {message}")]
    Remote { addr: String, message: String },
    #[error("the connection to the host daemon at {addr} failed while {during}: {source}")]
    Link {
        addr: String,
        during: &'static str,
        source: LinkError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// A migration that did not happen, and whether the local appliance was stopped
/// before it failed (then the mount recovers locally, as after a crash).
#[derive(Debug)]
pub struct Failure {
    pub error: MigrateError,
    pub stopped: bool,
}

impl Failure {
    fn before(error: MigrateError) -> Failure {
        Failure {
            error,
            stopped: false,
        }
    }

    fn after(error: MigrateError) -> Failure {
        Failure {
            error,
            stopped: true,
        }
    }
}

/// What the mount is and holds, for moving its appliance.
pub(crate) struct Source<'a> {
    pub backend: &'a BackendSpec,
    pub channel: ChannelKind,
    pub vm: bool,
    pub config: &'a StartConfig,
    pub devs: &'a [Arc<FuseDev>],
    pub mountpoint: &'a Path,
    pub backing_files: &'a AtomicU64,
    pub kept: Option<&'a Arc<Kept>>,
}

/// A mount's appliance on another host, as the supervisor sees it.
pub struct Remote {
    /// The daemon's address, as given to `fsva migrate`.
    pub host: String,
    /// The appliance's pid on that host.
    pub pid: u32,
    control: FramedLink,
    /// Set once a counters request failed: it is not asked again (a late answer would
    /// be taken for the next one's, and the event loop must never wait on it).
    broken: AtomicBool,
    /// Why the relay dropped the remote appliance, once it did.
    gone: Arc<Mutex<Option<String>>>,
}

impl Remote {
    /// The remote appliance's counters, if it answers at once.
    pub fn stats(&self) -> Option<ApplianceStats> {
        if self.broken.load(Ordering::Relaxed) || self.gone().is_some() {
            return None;
        }
        let answer = self
            .control
            .send(&ToHost::Stats)
            .and_then(|()| self.control.recv_within::<FromHost>(STATS_TIMEOUT));
        match answer {
            Ok(FromHost::Stats(s)) => Some(s),
            _ => {
                self.broken.store(true, Ordering::Relaxed);
                None
            }
        }
    }

    /// Why the remote appliance is gone, if it is.
    pub fn gone(&self) -> Option<String> {
        self.gone.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// What `fsva status` says about it.
    pub fn state(&self) -> String {
        match self.gone() {
            Some(why) => format!(
                "the appliance on {} is gone ({why}); answering EIO",
                self.host
            ),
            None => format!(
                "serving from {} (appliance pid {} there)",
                self.host, self.pid
            ),
        }
    }
}

/// A migration that happened: the relay now serving the mount, and the remote end.
pub struct Migrated {
    pub remote: Remote,
    pub bridge: Bridge,
    /// From the stop of the local appliance until the remote one served.
    pub downtime: Duration,
    /// The remote appliance did not confirm that it serves (the relay is in place, so
    /// the mount is served from there or answers EIO): what went wrong.
    pub problem: Option<String>,
}

/// Moves the appliance of `src` (now `current`) to the host daemon at `to`.
pub(crate) fn migrate(
    src: &Source<'_>,
    current: &Current,
    to: &str,
    key: &HostKey,
) -> Result<Migrated, Failure> {
    let kind = check(src).map_err(Failure::before)?;
    let t_start = Instant::now();
    let daemon = Daemon::connect(to, key).map_err(Failure::before)?;
    let config = StartConfig {
        channel: ChannelKind::Stream,
        workers_per_channel: src.devs.len().max(1) as u32,
        broker_link: false,
        backing_files: false,
        device_nodes: false,
        vhost_tag: None,
        restore: true,
        // The export over there changes beside nobody's watch.
        host_watched: false,
        dir_hints: false,
        ..src.config.clone()
    };
    let session = match daemon
        .ask(
            &ToHost::Prepare {
                config,
                kind,
                mountpoint: src.mountpoint.to_path_buf(),
            },
            "preparing the appliance",
        )
        .map_err(Failure::before)?
    {
        FromHost::Prepared { session } => session,
        other => return Err(Failure::before(daemon.unexpected(other))),
    };
    let data = daemon.attach(key, session).map_err(Failure::before)?;
    let (remote_pid, remote_host) = match daemon
        .answer("starting the appliance")
        .map_err(Failure::before)?
    {
        FromHost::Waiting { pid, host } => (pid, host),
        other => return Err(Failure::before(daemon.unexpected(other))),
    };
    tracing::info!(
        to,
        remote_host,
        remote_pid,
        ?kind,
        "remote appliance waits for the state"
    );
    let t0 = match kind {
        StateKind::Mem => move_mem(src, current, &daemon)?,
        StateKind::Passthrough => move_passthrough(current, &daemon)?,
    };
    // The remote appliance has the state and waits; the local one is gone.
    let stopped = |e| Failure::after(e);
    if let Err(e) = crate::fallback::resend_held(src.devs) {
        tracing::error!(error = %e, "FUSE_NOTIFY_RESEND failed; aborting the connection");
        if let Err(e) = crate::mount::abort_connection(src.mountpoint) {
            tracing::error!(error = %e, "could not abort the FUSE connection");
        }
    }
    let gone = Arc::new(Mutex::new(None::<String>));
    let hook_gone = gone.clone();
    let hook_host = to.to_string();
    // The relay reads and writes any connected stream socket through this type.
    let stream = UnixStream::from(OwnedFd::from(data));
    let tuning = Tuning {
        sole_writer: src.backend.is_only_writer(),
    };
    let bridge = Bridge::start(
        src.devs.to_vec(),
        stream,
        None,
        tuning,
        Box::new(move |why| {
            tracing::error!(host = %hook_host, reason = why, "the remote appliance is gone; the mount answers EIO");
            *hook_gone.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_string());
        }),
    )
    .map_err(|e| {
        stopped(MigrateError::Io {
            what: "starting the relay to the remote appliance".into(),
            source: e,
        })
    })?;
    // From here the relay serves the mount whatever happens: a remote appliance that
    // does not serve costs EIO (as a dead local one), never a second server.
    let problem = match daemon.ask(&ToHost::Resume, "starting to serve") {
        Ok(FromHost::Resumed) => None,
        Ok(other) => Some(daemon.unexpected(other).to_string()),
        Err(e) => Some(e.to_string()),
    };
    let downtime = t0.elapsed();
    if let Some(p) = &problem {
        bridge.fail(p);
    }
    tracing::info!(
        to,
        remote_pid,
        downtime_us = downtime.as_micros() as u64,
        total_ms = t_start.elapsed().as_millis() as u64,
        "appliance migrated"
    );
    Ok(Migrated {
        remote: Remote {
            host: to.to_string(),
            pid: remote_pid,
            control: daemon.link,
            broken: AtomicBool::new(false),
            gone,
        },
        bridge,
        downtime,
        problem,
    })
}

/// What kind of state the mount moves with, or why it cannot move.
fn check(src: &Source<'_>) -> Result<StateKind, MigrateError> {
    let refuse = |why: String| Err(MigrateError::Refused(why));
    if src.vm {
        return refuse("VM appliances cannot migrate yet".into());
    }
    if src.channel != ChannelKind::Fusedev {
        return refuse(format!(
            "{} is mounted with --channel {}: only mounts on the fusedev channel (the default) can migrate so far",
            src.mountpoint.display(),
            src.channel
        ));
    }
    match src.backend {
        BackendSpec::Mem { .. } => {
            if src.kept.is_none() {
                return refuse(format!(
                    "{} keeps no recovery journal (FSVA_NO_JOURNAL was set): mem migrates with it; remount without FSVA_NO_JOURNAL",
                    src.mountpoint.display()
                ));
            }
            no_passthrough_files(src)?;
            Ok(StateKind::Mem)
        }
        BackendSpec::Passthrough { .. } => Ok(StateKind::Passthrough),
        BackendSpec::Image { .. } => refuse("disk images cannot migrate yet".into()),
    }
}

/// mem with files open through FUSE passthrough cannot move: the kernel writes their
/// memfds here directly, and would go on writing these copies after the move.
fn no_passthrough_files(src: &Source<'_>) -> Result<(), MigrateError> {
    let open = src.backing_files.load(Ordering::SeqCst);
    if open > 0 {
        return Err(MigrateError::Refused(format!(
            "{} has {open} file(s) open through FUSE passthrough, whose data the kernel writes on this host directly: close them, or mount with --no-passthrough to migrate mem",
            src.mountpoint.display()
        )));
    }
    Ok(())
}

/// Sends a mem appliance's state (pre-copy rounds, then the stop-and-copy; see the
/// module's documentation) and has the remote appliance rebuild it. Returns when the
/// local appliance stopped.
fn move_mem(src: &Source<'_>, current: &Current, daemon: &Daemon) -> Result<Instant, Failure> {
    let kept = src.kept.expect("checked: mem migrates with its journal");
    let boundary = current.appliance.checkpoint_now().map_err(|e| {
        Failure::before(MigrateError::Refused(format!(
            "the appliance did not take a checkpoint: {e}"
        )))
    })?;
    // The checkpoint reaches the keeping on the keeper link, after the answer.
    let (blob, boundary) = wait_for_checkpoint(kept, boundary).map_err(Failure::before)?;
    send_state(daemon, blob.as_fd(), boundary).map_err(Failure::before)?;
    let mut sent_state = boundary;
    let journal = fsva_appliance::journal::Journal::open(
        kept.journal()
            .try_clone_to_owned()
            .map_err(|e| Failure::before(io_err("duplicating the journal")(e)))?,
    )
    .map_err(|e| Failure::before(MigrateError::Refused(e.to_string())))?;
    let mut tail = Tail::new(&journal, boundary);
    // Pre-copy: every file's contents, while the appliance serves.
    let t_pre = Instant::now();
    let ids = kept.ids();
    let sent = send_files(daemon, kept, &ids, &mut tail).map_err(Failure::before)?;
    sync(daemon).map_err(Failure::before)?;
    // More rounds while it serves: the files the journal named since they were read
    // go again, until little changes; a newer checkpoint goes too, so that the remote
    // appliance preloads it and the stop-and-copy has a short journal to replay.
    let mut rounds = 0;
    while rounds < MAX_ROUNDS {
        tail.poll(false);
        let need = if tail.lost {
            // Records were lost to the journal's rotation before they were read: from
            // the newest checkpoint on they are tracked again, and every file goes.
            let from = kept.counts().1.unwrap_or(boundary);
            tail = Tail::new(&journal, from);
            kept.ids()
        } else {
            let records = tail.take();
            if records.is_empty() {
                break;
            }
            name_changed(daemon, records, kept).map_err(Failure::before)?
        };
        let bytes = send_files(daemon, kept, &need, &mut tail).map_err(Failure::before)?;
        if let Some((blob, newer)) = kept
            .checkpoint()
            .map_err(|e| Failure::before(io_err("reading the last checkpoint")(e)))?
            .filter(|(_, b)| *b > sent_state)
        {
            send_state(daemon, blob.as_fd(), newer).map_err(Failure::before)?;
            sent_state = newer;
        }
        sync(daemon).map_err(Failure::before)?;
        rounds += 1;
        tracing::debug!(rounds, files = need.len(), bytes, "pre-copy round");
        if bytes < ROUND_ENOUGH && need.len() < ROUND_FILES {
            break;
        }
    }
    tracing::info!(
        files = ids.len(),
        bytes = sent,
        rounds,
        ms = t_pre.elapsed().as_millis() as u64,
        "pre-copy done"
    );
    no_passthrough_files(src).map_err(Failure::before)?;
    // The broker counts a new file's spare backing file only once told of its claim;
    // the appliance knows at once.
    if let Ok(stats) = current.appliance.stats() {
        if stats.passthrough_files > 0 {
            return Err(Failure::before(MigrateError::Refused(format!(
                "{} has {} file(s) open through FUSE passthrough, whose data the kernel writes on this host directly: close them, or mount with --no-passthrough to migrate mem",
                src.mountpoint.display(),
                stats.passthrough_files
            ))));
        }
    }

    // Stop-and-copy.
    let t0 = Instant::now();
    current.appliance.kill();
    if !current.appliance.wait_exit(EXIT_LIMIT) {
        return Err(Failure::after(MigrateError::Refused(
            "the local appliance did not exit within 5 s of SIGKILL".into(),
        )));
    }
    if let Some(end) = &current.keeper {
        if !end.wait(EXIT_LIMIT) {
            return Err(Failure::after(MigrateError::Refused(
                "the local appliance's keeper link did not end".into(),
            )));
        }
    }
    no_passthrough_files(src).map_err(Failure::after)?;
    // What changed since it was sent: named by the records not seen yet.
    tail.poll(true);
    let all_changed = tail.lost;
    let mut again = 0;
    let mut bytes = 0;
    if all_changed {
        tracing::warn!("journal records were lost before they were read; every file goes again");
    } else {
        let records = tail.take();
        if !records.is_empty() {
            let need = name_changed(daemon, records, kept).map_err(Failure::after)?;
            again += need.len();
            bytes += send_files(daemon, kept, &need, &mut tail).map_err(Failure::after)?;
        }
    }
    // The state to rebuild: the newest checkpoint (every record after it is in the
    // journal), and those records.
    if let Some((blob, newer)) = kept
        .checkpoint()
        .map_err(|e| Failure::after(io_err("reading the last checkpoint")(e)))?
        .filter(|(_, b)| *b > sent_state)
    {
        send_state(daemon, blob.as_fd(), newer).map_err(Failure::after)?;
        sent_state = newer;
    }
    let records = journal
        .read_after(sent_state)
        .map_err(|e| Failure::after(MigrateError::Refused(e.to_string())))?;
    let record_count = records.len();
    send_records(daemon, records).map_err(Failure::after)?;
    let now_kept = kept.ids();
    let need = match daemon
        .ask(
            &ToHost::Stopped {
                kept: now_kept.clone(),
                all_changed,
            },
            "finding what changed",
        )
        .map_err(Failure::after)?
    {
        FromHost::Need { ids } => ids,
        other => return Err(Failure::after(daemon.unexpected(other))),
    };
    check_need(daemon, &need, &now_kept).map_err(Failure::after)?;
    again += need.len();
    bytes += send_files(daemon, kept, &need, &mut tail).map_err(Failure::after)?;
    tracing::info!(
        records = record_count,
        files = again,
        bytes,
        ms = t0.elapsed().as_millis() as u64,
        "stop-and-copy sent"
    );
    match daemon
        .ask(&ToHost::Build, "rebuilding the state")
        .map_err(Failure::after)?
    {
        FromHost::Ready { .. } => Ok(t0),
        other => Err(Failure::after(daemon.unexpected(other))),
    }
}

/// The journal records after a point, read as they come (so that a checkpoint's
/// rotation cannot drop them before they are looked at), for finding the files that
/// changed after their contents were read.
struct Tail<'j> {
    journal: &'j fsva_appliance::journal::Journal,
    /// The last record read.
    last: u64,
    records: Vec<fsva_appliance::journal::Record>,
    bytes: usize,
    /// Records after `last` were gone before they were read.
    lost: bool,
}

impl<'j> Tail<'j> {
    fn new(journal: &'j fsva_appliance::journal::Journal, from: u64) -> Tail<'j> {
        Tail {
            journal,
            last: from,
            records: Vec::new(),
            bytes: 0,
            lost: false,
        }
    }

    /// Reads what came since; `stopped`: the appliance is gone (a record written but
    /// unreadable is then damage, not one being written).
    fn poll(&mut self, stopped: bool) {
        if self.lost {
            return;
        }
        let read = if stopped {
            self.journal.read_after(self.last)
        } else {
            self.journal.read_live(self.last)
        };
        match read {
            Ok(records) => {
                for r in records {
                    self.last = r.seq;
                    self.bytes += r.payload.len();
                    self.records.push(r);
                }
                if self.bytes > MAX_TAIL {
                    // Too much to name: every file goes instead.
                    self.lost = true;
                    self.records.clear();
                }
            }
            Err(_) => self.lost = true,
        }
    }

    fn take(&mut self) -> Vec<fsva_appliance::journal::Record> {
        self.bytes = 0;
        std::mem::take(&mut self.records)
    }
}

/// Has the daemon name the files `records` changed (it knows mem's format); returns
/// the ids whose contents must go again.
fn name_changed(
    daemon: &Daemon,
    records: Vec<fsva_appliance::journal::Record>,
    kept: &Kept,
) -> Result<Vec<u64>, MigrateError> {
    let ids = kept.ids();
    let mut need = Vec::new();
    let mut batch = Vec::new();
    let mut size = 0;
    let mut records = records.into_iter().peekable();
    while let Some(r) = records.next() {
        size += r.payload.len() + 16;
        batch.push(JournalRecord {
            seq: r.seq,
            payload: r.payload,
        });
        let full = records
            .peek()
            .is_some_and(|n| size + n.payload.len() + 16 > STATE_BATCH);
        if full || records.peek().is_none() {
            let round = ToHost::Round {
                records: std::mem::take(&mut batch),
                kept: ids.clone(),
            };
            size = 0;
            match daemon.ask(&round, "finding what changed")? {
                FromHost::Need { ids: more } => need.extend(more),
                other => return Err(daemon.unexpected(other)),
            }
        }
    }
    need.sort_unstable();
    need.dedup();
    check_need(daemon, &need, &ids)?;
    Ok(need)
}

/// The daemon may ask only for files this mount holds.
fn check_need(daemon: &Daemon, need: &[u64], kept: &[u64]) -> Result<(), MigrateError> {
    let known: HashSet<u64> = kept.iter().copied().collect();
    match need.iter().find(|id| !known.contains(id)) {
        Some(id) => Err(MigrateError::Remote {
            addr: daemon.addr.clone(),
            message: format!("it asked for file {id}, which this mount does not hold"),
        }),
        None => Ok(()),
    }
}

/// Pauses a passthrough appliance, sends its state (the daemon drops its descriptors
/// and finds every node again by path) and has the remote appliance rebuild it; stops
/// the local appliance once the remote one is ready, or lets it go on if not.
fn move_passthrough(current: &Current, daemon: &Daemon) -> Result<Instant, Failure> {
    let t0 = Instant::now();
    let saved = current.appliance.checkpoint().map_err(|e| {
        if current.appliance.resume().is_err() {
            current.appliance.kill();
        }
        Failure::before(MigrateError::Refused(format!(
            "the appliance did not take a checkpoint: {e}"
        )))
    })?;
    let built = send_state(daemon, saved.blob.as_fd(), 0).and_then(|()| {
        match daemon.ask(&ToHost::Build, "rebuilding the state")? {
            FromHost::Ready { .. } => Ok(()),
            other => Err(daemon.unexpected(other)),
        }
    });
    if let Err(e) = built {
        if let Err(r) = current.appliance.resume() {
            tracing::error!(error = %r, "the paused appliance did not resume; stopping it");
            current.appliance.kill();
            return Err(Failure::after(e));
        }
        return Err(Failure::before(e));
    }
    current.appliance.kill();
    if !current.appliance.wait_exit(EXIT_LIMIT) {
        tracing::error!(
            pid = current.appliance.pid,
            "the old appliance did not exit within 5 s of SIGKILL"
        );
    }
    drop(saved);
    Ok(t0)
}

/// Ends a round of file contents: the daemon has applied them (and the remote
/// appliance preloaded them) before the local appliance stops, not during its downtime.
fn sync(daemon: &Daemon) -> Result<(), MigrateError> {
    match daemon.ask(&ToHost::Sync, "pre-copying file contents")? {
        FromHost::Synced { .. } => Ok(()),
        other => Err(daemon.unexpected(other)),
    }
}

/// Waits until the keeping holds a checkpoint at `boundary` or later; returns it.
fn wait_for_checkpoint(kept: &Kept, boundary: u64) -> Result<(OwnedFd, u64), MigrateError> {
    if !kept.wait_checkpoint(boundary, EXIT_LIMIT) {
        return Err(MigrateError::Refused(
            "the appliance's checkpoint did not reach the supervisor".into(),
        ));
    }
    kept.checkpoint()
        .map_err(io_err("reading the checkpoint"))?
        .ok_or_else(|| MigrateError::Refused("no checkpoint is kept".into()))
}

/// Sends the state in `blob` (a sealed memfd) as covering the journal up to `boundary`.
fn send_state(daemon: &Daemon, blob: BorrowedFd<'_>, boundary: u64) -> Result<(), MigrateError> {
    let bytes = fsva_control::blob::read(
        blob.try_clone_to_owned()
            .map_err(io_err("duplicating the state"))?,
    )
    .map_err(io_err("reading the state"))?;
    for chunk in bytes.chunks(STATE_BATCH) {
        daemon.send(
            &ToHost::State {
                bytes: chunk.to_vec(),
            },
            "sending the state",
        )?;
    }
    daemon.send(&ToHost::StateEnd { boundary }, "sending the state")
}

/// Sends journal records in batches.
fn send_records(
    daemon: &Daemon,
    records: Vec<fsva_appliance::journal::Record>,
) -> Result<(), MigrateError> {
    let mut batch = Vec::new();
    let mut size = 0;
    for r in records {
        let len = r.payload.len() + 16;
        if !batch.is_empty() && size + len > STATE_BATCH {
            let records = std::mem::take(&mut batch);
            daemon.send(&ToHost::Records { records }, "sending journal records")?;
            size = 0;
        }
        size += len;
        batch.push(JournalRecord {
            seq: r.seq,
            payload: r.payload,
        });
    }
    if !batch.is_empty() {
        daemon.send(
            &ToHost::Records { records: batch },
            "sending journal records",
        )?;
    }
    Ok(())
}

/// Sends the contents of the memfds kept under `ids` (those still kept); returns the
/// bytes sent. Holes are not sent.
fn send_files(
    daemon: &Daemon,
    kept: &Kept,
    ids: &[u64],
    tail: &mut Tail<'_>,
) -> Result<u64, MigrateError> {
    let mut out = Batch {
        daemon,
        parts: Vec::new(),
        size: 0,
        total: 0,
    };
    // A few hundred at a time: each is duplicated while the keeping's lock is held.
    // Between groups, the journal is read on, before a rotation can drop records.
    for group in ids.chunks(256) {
        let fds = kept
            .duplicates(group)
            .map_err(io_err("duplicating kept memfds"))?;
        for (id, fd) in fds {
            send_file(&mut out, id, fd.as_fd())?;
        }
        tail.poll(false);
    }
    out.flush()?;
    Ok(out.total)
}

/// File parts gathered into messages of about [`FILES_BATCH`] bytes.
struct Batch<'a> {
    daemon: &'a Daemon,
    parts: Vec<FilePart>,
    size: usize,
    total: u64,
}

impl Batch<'_> {
    fn push(&mut self, part: FilePart) -> Result<(), MigrateError> {
        self.size += part.bytes.len() + 32;
        self.total += part.bytes.len() as u64;
        self.parts.push(part);
        if self.size >= FILES_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), MigrateError> {
        if self.parts.is_empty() {
            return Ok(());
        }
        let parts = std::mem::take(&mut self.parts);
        self.size = 0;
        self.daemon
            .send(&ToHost::Files { parts }, "sending file contents")
    }
}

/// Sends one memfd's contents: its size, and the data between its holes. It is read
/// through an open file of its own (its offset is the appliance's business).
fn send_file(out: &mut Batch<'_>, id: u64, memfd: BorrowedFd<'_>) -> Result<(), MigrateError> {
    use rustix::fs::{Mode, OFlags, SeekFrom};
    let what = |e: rustix::io::Errno| io_err(format!("reading kept file {id}"))(e.into());
    let fd = rustix::fs::open(
        format!("/proc/self/fd/{}", memfd.as_raw_fd()),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(what)?;
    let size = rustix::fs::fstat(&fd).map_err(what)?.st_size.max(0) as u64;
    let mut start = Some(size);
    let mut at = 0u64;
    while at < size {
        let data = match rustix::fs::seek(&fd, SeekFrom::Data(at)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(what(e)),
        };
        if data >= size {
            break;
        }
        let hole = rustix::fs::seek(&fd, SeekFrom::Hole(data))
            .unwrap_or(size)
            .min(size);
        let mut pos = data;
        while pos < hole {
            let want = ((hole - pos) as usize).min(FILES_BATCH);
            let mut buf = vec![0u8; want];
            let mut got = 0;
            while got < want {
                match rustix::io::pread(&fd, &mut buf[got..], pos + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(what(e)),
                }
            }
            buf.truncate(got);
            if got == 0 {
                // It shrank meanwhile; what it is now comes in the stop-and-copy.
                break;
            }
            out.push(FilePart {
                id,
                start: start.take(),
                offset: pos,
                bytes: buf,
            })?;
            pos += got as u64;
        }
        at = hole.max(pos);
    }
    if let Some(size) = start {
        out.push(FilePart {
            id,
            start: Some(size),
            offset: 0,
            bytes: Vec::new(),
        })?;
    }
    Ok(())
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrateError {
    let what = what.into();
    move |source| MigrateError::Io { what, source }
}

/// The control connection to a host daemon.
struct Daemon {
    addr: String,
    link: FramedLink,
}

impl Daemon {
    /// Connects to `addr` and proves the key.
    fn connect(addr: &str, key: &HostKey) -> Result<Daemon, MigrateError> {
        let stream = open(addr, key)?;
        let link = host::framed(stream).map_err(io_err("setting up the control connection"))?;
        Ok(Daemon {
            addr: addr.to_string(),
            link,
        })
    }

    /// Opens the data connection of `session`.
    fn attach(&self, key: &HostKey, session: u64) -> Result<TcpStream, MigrateError> {
        let stream = open(&self.addr, key)?;
        let link = host::framed(
            stream
                .try_clone()
                .map_err(io_err("duplicating the data connection"))?,
        )
        .map_err(io_err("setting up the data connection"))?;
        let link_err = |during, source| MigrateError::Link {
            addr: self.addr.clone(),
            during,
            source,
        };
        link.send(&ToHost::Attach { session })
            .map_err(|e| link_err("attaching the data connection", e))?;
        match link
            .recv_within::<FromHost>(STEP_TIMEOUT)
            .map_err(|e| link_err("attaching the data connection", e))?
        {
            FromHost::Attached => Ok(stream),
            other => Err(self.unexpected(other)),
        }
    }

    fn send(&self, msg: &ToHost, during: &'static str) -> Result<(), MigrateError> {
        self.link.send(msg).map_err(|source| MigrateError::Link {
            addr: self.addr.clone(),
            during,
            source,
        })
    }

    /// The daemon's next message (a `Failed` one as an error).
    fn answer(&self, during: &'static str) -> Result<FromHost, MigrateError> {
        match self.link.recv_within::<FromHost>(STEP_TIMEOUT) {
            Ok(FromHost::Failed { message }) => Err(MigrateError::Remote {
                addr: self.addr.clone(),
                message,
            }),
            Ok(m) => Ok(m),
            Err(source) => Err(MigrateError::Link {
                addr: self.addr.clone(),
                during,
                source,
            }),
        }
    }

    fn ask(&self, msg: &ToHost, during: &'static str) -> Result<FromHost, MigrateError> {
        self.send(msg, during)?;
        self.answer(during)
    }

    fn unexpected(&self, m: FromHost) -> MigrateError {
        MigrateError::Remote {
            addr: self.addr.clone(),
            message: format!("unexpected answer {m:?}"),
        }
    }
}

/// A connection to the daemon at `addr`, tuned, with the handshake done.
fn open(addr: &str, key: &HostKey) -> Result<TcpStream, MigrateError> {
    let connect_err = |source| MigrateError::Connect {
        addr: addr.to_string(),
        source,
    };
    let targets: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| {
            connect_err(std::io::Error::new(
                e.kind(),
                format!("{e} (give the daemon as HOST:PORT)"),
            ))
        })?
        .collect();
    let mut last = None;
    let mut stream = None;
    for t in targets {
        match TcpStream::connect_timeout(&t, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut stream = stream.ok_or_else(|| {
        connect_err(last.unwrap_or_else(|| std::io::Error::other("the name has no address")))
    })?;
    host::tune(&stream).map_err(io_err("setting up the connection"))?;
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(io_err("setting up the connection"))?;
    host::handshake_client(&mut stream, key).map_err(|source| MigrateError::Handshake {
        addr: addr.to_string(),
        source,
    })?;
    stream
        .set_read_timeout(None)
        .map_err(io_err("setting up the connection"))?;
    Ok(stream)
}
