//! One migration arriving at this host, from `Prepare` until the appliance it started
//! exits or the supervisor goes away.
//!
//! The appliance is started at once (it sets up its sandbox while the state comes)
//! and waits for its predecessor's state, as a successor on a supervisor's host does:
//! - `mem`: journaled, with this daemon as its keeper. The memfds are rebuilt here from
//!   their contents (holes stay holes) under the ids mem's state names them by; the
//!   journal records after the checkpoint are written into the appliance's new journal
//!   ([`fsva_appliance::journal::Journal::seed`]); then the appliance recovers exactly
//!   as after a crash. At the stop-and-copy, the files to send again are those the
//!   records after the checkpoint name (every change of contents is journaled with its
//!   file's memfd id when no FUSE passthrough is in use, which the supervisor
//!   checked), and those that were not sent before. The appliance preloads the
//!   checkpoint and the pre-copied memfds while the source still serves (the end of
//!   the pre-copy, `Sync`); a changed file's contents are then rewritten in place, in
//!   the memfd it already holds, so that the stop-and-copy hands it only new files,
//!   the records and the go-ahead.
//! - `passthrough`: the state loses its descriptors (a portable snapshot: nodes found
//!   again by path on the storage both hosts see, ESTALE where not). It keeps its FUSE
//!   passthrough backing ids: they are registered in the other host's kernel, for
//!   files of the shared storage that kernel holds open, and every later open of those
//!   inodes must name them; new registrations are refused here (the appliance serves
//!   such files' data itself).
//!
//! This module checks everything it is sent against bounds before acting on it, and
//! never lets a state or a record reach the appliance unchecked by the appliance's own
//! restore (which refuses what does not hold together).

use std::collections::{HashMap, HashSet};
use std::net::TcpStream;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use fsva_control::host::{FilePart, FromHost, JournalRecord, StateKind, ToHost};
use fsva_control::{BackendSpec, ChannelKind, FramedLink, SandboxKind, StartConfig};
use fsva_supervisor::appliance::{Appliance, SavedState, Starting};
use fsva_supervisor::keeper::Kept;

use crate::Shared;

/// How long the data connection may take to come after `Prepared`.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a sandboxed appliance may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Most worker threads a migrated appliance gets.
const MAX_WORKERS: u32 = 16;
/// Most bytes of journal records one migration may send (both areas of a journal).
const MAX_RECORD_BYTES: usize = 2 * fsva_appliance::journal::DEFAULT_AREA as usize;
/// Largest memfd accepted (sparse: only what is written takes memory).
const MAX_FILE: u64 = 1 << 44;

/// A migration's control connection after `Prepare`.
pub(crate) struct Start {
    pub shared: Arc<Shared>,
    pub link: FramedLink,
    /// The socket itself, to end the connection when the appliance exits.
    pub control: TcpStream,
    pub config: StartConfig,
    pub kind: StateKind,
    pub peer: String,
}

/// Serves one migration to its end.
pub(crate) fn run(start: Start) {
    let Start {
        shared,
        link,
        control,
        config,
        kind,
        peer,
    } = start;
    let config = match admit(&shared, config, kind) {
        Ok(c) => c,
        Err(message) => {
            tracing::warn!(peer, message, "migration refused");
            let _ = link.send(&FromHost::Failed { message });
            return;
        }
    };
    let session = random_id();
    let (tx, rx) = mpsc::channel();
    shared
        .waiting
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(session, tx);
    let data = match link
        .send(&FromHost::Prepared { session })
        .map_err(|e| e.to_string())
        .and_then(|()| {
            rx.recv_timeout(ATTACH_TIMEOUT)
                .map_err(|_| format!("the data connection did not come within {ATTACH_TIMEOUT:?}"))
        }) {
        Ok(d) => d,
        Err(message) => {
            shared
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&session);
            tracing::warn!(peer, message, "migration abandoned");
            let _ = link.send(&FromHost::Failed { message });
            return;
        }
    };
    let mut m = match Migration::start(&shared, &config, kind, data) {
        Ok(m) => m,
        Err(message) => {
            tracing::warn!(peer, message, "the appliance did not start");
            let _ = link.send(&FromHost::Failed { message });
            return;
        }
    };
    if link
        .send(&FromHost::Waiting {
            pid: m.pid,
            host: shared.hostname.clone(),
        })
        .is_err()
    {
        m.abandon();
        return;
    }
    tracing::info!(peer, pid = m.pid, "appliance waits for the state");
    loop {
        let msg = match link.recv::<ToHost>() {
            Ok(msg) => msg,
            Err(e) => {
                tracing::info!(peer, reason = %e, "the supervisor's connection ended; stopping the appliance");
                break;
            }
        };
        let reply = match m.handle(msg, &control) {
            Ok(Some(reply)) => reply,
            Ok(None) => continue,
            Err(message) => {
                tracing::error!(peer, message, "migration failed");
                let _ = link.send(&FromHost::Failed { message });
                break;
            }
        };
        if link.send(&reply).is_err() {
            break;
        }
    }
    m.abandon();
}

/// Checks what the supervisor asks for and fills in what this host decides.
fn admit(shared: &Shared, mut config: StartConfig, kind: StateKind) -> Result<StartConfig, String> {
    match (&config.backend, kind) {
        (BackendSpec::Mem { .. }, StateKind::Mem) => {
            config.broker_link = false;
            config.device_nodes = false;
            config.backing_files = false;
        }
        (BackendSpec::Passthrough { path, exclusive }, StateKind::Passthrough) => {
            let canonical = path
                .canonicalize()
                .map_err(|e| format!("{} cannot be served here: {e}", path.display()))?;
            if !canonical.is_dir() {
                return Err(format!("{} is not a directory here", path.display()));
            }
            if !shared.exports.iter().any(|e| canonical.starts_with(e)) {
                return Err(format!(
                    "{} is not under a directory this daemon may serve: start `fsva host` with --export DIR for storage both hosts share",
                    path.display()
                ));
            }
            // A root user's passthrough appliance has its device nodes made by a broker.
            // The same broker refuses every new FUSE passthrough registration (the
            // session belongs to the other host's kernel), so the appliance serves new
            // opens' data itself while reusing the ids of files the kernel holds open
            // with passthrough there: the kernel wants every open of such an inode to
            // name the inode's backing id.
            let root = rustix::process::geteuid().is_root();
            config.backend = BackendSpec::Passthrough {
                path: canonical,
                exclusive: *exclusive,
            };
            config.broker_link = root;
            config.device_nodes = root;
            config.backing_files = root;
        }
        (backend, kind) => {
            return Err(format!(
                "a {backend} appliance cannot be moved with a {kind:?} state"
            ))
        }
    }
    if config.sandbox != SandboxKind::Namespaces {
        return Err(format!(
            "this host runs appliances in the namespace sandbox only, not `{}`",
            config.sandbox
        ));
    }
    if config.log_filter.len() > 256 {
        config.log_filter = "info".into();
    }
    config.channel = ChannelKind::Stream;
    config.workers_per_channel = config.workers_per_channel.clamp(1, MAX_WORKERS);
    config.vhost_tag = None;
    config.restore = true;
    Ok(config)
}

fn random_id() -> u64 {
    let mut b = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty());
    u64::from_le_bytes(b) | 1
}

/// The appliance of one migration and the state it is being sent.
struct Migration {
    kind: StateKind,
    pid: u32,
    /// Until the state is built: the appliance waiting for it.
    starting: Option<Starting>,
    /// Once built: the appliance serving, and its process until a thread waits for it.
    appliance: Option<Appliance>,
    child: Option<std::process::Child>,
    /// mem: what this daemon keeps for the appliance.
    kept: Option<Arc<Kept>>,
    state: Vec<u8>,
    /// passthrough: the complete state, with the journal boundary it covers.
    checkpoint: Option<(Vec<u8>, u64)>,
    /// mem: the boundary of the checkpoint in the keeping.
    boundary: Option<u64>,
    /// mem: the memfds rebuilt here and not handed to the keeping yet, by id.
    files: HashMap<u64, OwnedFd>,
    /// mem: the ids of those the keeping holds (the appliance preloaded them: contents
    /// rewritten in them reach it).
    kept_ids: HashSet<u64>,
    /// mem: what the appliance has preloaded of the keeping.
    preloaded: Option<fsva_supervisor::keeper::Mark>,
    records: Vec<JournalRecord>,
    record_bytes: usize,
}

impl Migration {
    fn start(
        shared: &Shared,
        config: &StartConfig,
        kind: StateKind,
        data: TcpStream,
    ) -> Result<Migration, String> {
        let mut fds = vec![data.as_fd()];
        let broker = if config.broker_link {
            let BackendSpec::Passthrough { path, .. } = &config.backend else {
                return Err("a broker is for passthrough appliances".into());
            };
            let export = rustix::fs::open(
                path,
                rustix::fs::OFlags::PATH
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
            let scope = fsva_supervisor::broker::BrokerScope {
                backing: None,
                devices_in: Some(export),
                live_backing: Arc::new(AtomicU64::new(0)),
            };
            Some(
                fsva_supervisor::broker::start(scope)
                    .map_err(|e| format!("starting the broker: {e}"))?,
            )
        } else {
            None
        };
        fds.extend(broker.as_ref().map(|l| l.as_fd()));
        let (kept, keeper) = match kind {
            StateKind::Mem => {
                let kept = Kept::new(
                    fsva_appliance::journal::DEFAULT_AREA,
                    fsva_supervisor::keeper::Accept::Memfds,
                )
                .map_err(|e| format!("creating the recovery journal: {e}"))?;
                let (link, end) = kept
                    .link()
                    .map_err(|e| format!("starting the keeper link: {e}"))?;
                drop(end);
                (Some(kept), Some(link))
            }
            StateKind::Passthrough => (None, None),
        };
        if let (Some(link), Some(kept)) = (&keeper, &kept) {
            fds.push(link.as_fd());
            fds.push(kept.journal());
        }
        let starting = Appliance::spawn(
            &shared.exe,
            config,
            &fds,
            kept.is_some(),
            None,
            START_TIMEOUT,
        )
        .map_err(|e| format!("the appliance did not start: {e}"))?;
        // Only the appliance holds these now: its stream, broker and keeper ends.
        drop(fds);
        drop((broker, keeper, data));
        if let Err(e) = starting.await_state_request() {
            starting.abandon();
            return Err(format!("the appliance did not start: {e}"));
        }
        Ok(Migration {
            kind,
            pid: starting.pid(),
            starting: Some(starting),
            appliance: None,
            child: None,
            kept,
            state: Vec::new(),
            checkpoint: None,
            boundary: None,
            files: HashMap::new(),
            kept_ids: HashSet::new(),
            preloaded: None,
            records: Vec::new(),
            record_bytes: 0,
        })
    }

    /// Acts on one message; the answer to send, if it takes one.
    fn handle(&mut self, msg: ToHost, control: &TcpStream) -> Result<Option<FromHost>, String> {
        match msg {
            ToHost::State { bytes } => {
                if self.state.len() + bytes.len() > fsva_control::blob::MAX_BLOB as usize {
                    return Err("the state is larger than any appliance's".into());
                }
                self.state.extend_from_slice(&bytes);
                Ok(None)
            }
            ToHost::StateEnd { boundary } => {
                let state = std::mem::take(&mut self.state);
                match &self.kept {
                    Some(kept) => {
                        let blob = fsva_control::blob::seal(&state)
                            .map_err(|e| format!("sealing the state: {e}"))?;
                        kept.set_checkpoint(blob, boundary);
                        self.boundary = Some(boundary);
                    }
                    None => self.checkpoint = Some((state, boundary)),
                }
                Ok(None)
            }
            ToHost::Files { parts } => {
                self.mem_only("file contents")?;
                for p in parts {
                    self.file_part(p)?;
                }
                Ok(None)
            }
            ToHost::Records { records } => {
                self.mem_only("journal records")?;
                self.record_bytes += records.iter().map(|r| r.payload.len()).sum::<usize>();
                if self.record_bytes > MAX_RECORD_BYTES {
                    return Err("more journal records than a journal holds".into());
                }
                self.records.extend(records);
                Ok(None)
            }
            ToHost::Stopped { kept, all_changed } => {
                self.mem_only("a stop-and-copy")?;
                let nothing = HashSet::new();
                let ids = self.changed(&kept, (!all_changed).then_some(&nothing))?;
                tracing::info!(
                    records = self.records.len(),
                    files = kept.len(),
                    again = ids.len(),
                    "stop-and-copy"
                );
                Ok(Some(FromHost::Need { ids }))
            }
            ToHost::Round { records, kept } => {
                self.mem_only("a pre-copy round")?;
                let named = named(records.iter())?;
                let ids = self.changed(&kept, Some(&named))?;
                tracing::debug!(
                    records = records.len(),
                    again = ids.len(),
                    "files named as changed"
                );
                Ok(Some(FromHost::Need { ids }))
            }
            ToHost::Build => {
                let pid = self.build()?;
                self.watch(control)?;
                Ok(Some(FromHost::Ready { pid }))
            }
            ToHost::Resume => {
                let a = self
                    .appliance
                    .as_ref()
                    .ok_or("the state was not built yet")?;
                a.resume().map_err(|e| e.to_string())?;
                tracing::info!(pid = a.pid, "migrated appliance serves");
                Ok(Some(FromHost::Resumed))
            }
            ToHost::Stats => {
                let a = self
                    .appliance
                    .as_ref()
                    .ok_or("the appliance does not serve yet")?;
                let stats = a.stats().map_err(|e| e.to_string())?;
                Ok(Some(FromHost::Stats(stats)))
            }
            ToHost::Sync => {
                if self.kind == StateKind::Mem {
                    self.preload()?;
                }
                Ok(Some(FromHost::Synced {
                    files: (self.files.len() + self.kept_ids.len()) as u64,
                }))
            }
            ToHost::Prepare { .. } | ToHost::Attach { .. } => {
                Err("the migration is prepared already".into())
            }
        }
    }

    fn mem_only(&self, what: &str) -> Result<(), String> {
        if self.kind == StateKind::Mem {
            Ok(())
        } else {
            Err(format!("{what} came for a {:?} migration", self.kind))
        }
    }

    /// Writes one part of a memfd's contents. A part that starts a file makes a new
    /// memfd, or empties the one of that id (its contents come again, and the
    /// appliance holds the same file: it sees them).
    fn file_part(&mut self, p: FilePart) -> Result<(), String> {
        if let Some(size) = p.start {
            if size > MAX_FILE {
                return Err(format!("file {} of {size} bytes is too large", p.id));
            }
            let sized = |fd: &OwnedFd| {
                rustix::fs::ftruncate(fd, 0)
                    .and_then(|()| rustix::fs::ftruncate(fd, size))
                    .map_err(|e| format!("sizing a memfd: {e}"))
            };
            match self.fd_of(p.id)? {
                Some(fd) => sized(&fd)?,
                None => {
                    if self.files.len() + self.kept_ids.len() >= fsva_supervisor::keeper::MAX_KEPT {
                        return Err("more files than any appliance may hold".into());
                    }
                    let fd = rustix::fs::memfd_create("fsva-mem", rustix::fs::MemfdFlags::CLOEXEC)
                        .map_err(|e| format!("creating a memfd: {e}"))?;
                    sized(&fd)?;
                    self.files.insert(p.id, fd);
                }
            }
        }
        let fd = self
            .fd_of(p.id)?
            .ok_or_else(|| format!("contents of file {} came before its start", p.id))?;
        let fd = &fd;
        let size = rustix::fs::fstat(fd)
            .map_err(|e| format!("inspecting a memfd: {e}"))?
            .st_size as u64;
        let end = p.offset.checked_add(p.bytes.len() as u64);
        if end.is_none_or(|e| e > size) {
            return Err(format!("contents of file {} beyond its size", p.id));
        }
        let mut done = 0;
        while done < p.bytes.len() {
            match rustix::io::pwrite(fd, &p.bytes[done..], p.offset + done as u64) {
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(format!("writing file {}: {e} (out of memory?)", p.id)),
            }
        }
        Ok(())
    }

    /// A descriptor of the memfd of `id`: a duplicate of the one kept here or by the
    /// keeping (holding a second descriptor of each would double this daemon's count).
    fn fd_of(&self, id: u64) -> Result<Option<OwnedFd>, String> {
        let dup = |e: std::io::Error| format!("duplicating a memfd: {e}");
        if let Some(fd) = self.files.get(&id) {
            return fd.try_clone().map(Some).map_err(dup);
        }
        match (&self.kept, self.kept_ids.contains(&id)) {
            (Some(kept), true) => Ok(kept.duplicates(&[id]).map_err(dup)?.pop().map(|(_, fd)| fd)),
            _ => Ok(None),
        }
    }

    /// Drops the files the source no longer holds and says which contents must come
    /// (again): those `named` (all, for `None`) and those never sent.
    fn changed(&mut self, kept: &[u64], named: Option<&HashSet<u64>>) -> Result<Vec<u64>, String> {
        let wanted: HashSet<u64> = kept.iter().copied().collect();
        self.files.retain(|id, _| wanted.contains(id));
        let keeping = self.kept.clone();
        self.kept_ids.retain(|id| {
            let stays = wanted.contains(id);
            if let (false, Some(k)) = (stays, &keeping) {
                k.remove(*id);
            }
            stays
        });
        let have = |id: &u64| self.files.contains_key(id) || self.kept_ids.contains(id);
        Ok(kept
            .iter()
            .copied()
            .filter(|id| named.is_none_or(|n| n.contains(id)) || !have(id))
            .collect())
    }

    /// Hands the keeping to the waiting appliance, which restores the checkpoint with
    /// the memfds while the source still serves; the stop-and-copy then has only the
    /// changes left (contents rewritten in those memfds reach it).
    fn preload(&mut self) -> Result<(), String> {
        let (Some(kept), true) = (&self.kept, self.starting.is_some()) else {
            return Ok(());
        };
        if self.boundary.is_none() {
            return Err("file contents came before the state".into());
        }
        let kept = kept.clone();
        let t0 = std::time::Instant::now();
        self.keep_new_files();
        let Some(starting) = &self.starting else {
            return Ok(());
        };
        let mark = starting
            .preload(&kept, self.preloaded)
            .map_err(|e| format!("the appliance could not preload the state: {e}"))?;
        self.preloaded = Some(mark);
        tracing::info!(
            files = self.kept_ids.len(),
            ms = t0.elapsed().as_millis() as u64,
            "the appliance preloaded the state"
        );
        Ok(())
    }

    /// Hands the memfds rebuilt here to the keeping.
    fn keep_new_files(&mut self) {
        let Some(kept) = &self.kept else {
            return;
        };
        for (id, fd) in self.files.drain() {
            kept.insert(id, fd);
            self.kept_ids.insert(id);
        }
    }

    /// Rebuilds the state in the waiting appliance; returns its pid once it is ready.
    fn build(&mut self) -> Result<u32, String> {
        let starting = self.starting.take().ok_or("the state was built already")?;
        let built = match (self.kind, self.boundary, self.checkpoint.take()) {
            (StateKind::Mem, Some(boundary), _) => self.build_mem(starting, boundary),
            (StateKind::Passthrough, _, Some((state, _))) => build_passthrough(starting, &state),
            _ => {
                starting.abandon();
                return Err("no state came".into());
            }
        };
        let (appliance, child) = built?;
        let pid = appliance.pid;
        self.appliance = Some(appliance);
        self.child = Some(child);
        Ok(pid)
    }

    fn build_mem(
        &mut self,
        starting: Starting,
        boundary: u64,
    ) -> Result<(Appliance, std::process::Child), String> {
        let kept = self.kept.clone().ok_or("no keeping for a mem migration")?;
        let fail = |starting: Starting, e: String| {
            starting.abandon();
            Err(e)
        };
        self.keep_new_files();
        let records: Vec<_> = std::mem::take(&mut self.records)
            .into_iter()
            .map(|r| fsva_appliance::journal::Record {
                seq: r.seq,
                payload: r.payload,
            })
            .collect();
        let seeded = kept
            .journal()
            .try_clone_to_owned()
            .map_err(|e| e.to_string())
            .and_then(|fd| fsva_appliance::journal::Journal::open(fd).map_err(|e| e.to_string()))
            .and_then(|j| j.seed(boundary, &records).map_err(|e| e.to_string()));
        if let Err(e) = seeded {
            return fail(starting, format!("writing the journal records: {e}"));
        }
        let t0 = std::time::Instant::now();
        let ready = starting
            .recover(&kept, self.preloaded, false)
            .map_err(|e| format!("the appliance could not rebuild the state: {e}"))?;
        tracing::info!(
            files = kept.counts().0,
            records = records.len(),
            ms = t0.elapsed().as_millis() as u64,
            "the appliance rebuilt the state"
        );
        Ok(ready)
    }

    /// Ends the control connection when the appliance exits, so that the supervisor
    /// knows at once (its relay also sees the data connection end).
    fn watch(&mut self, control: &TcpStream) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let control = control.try_clone().map_err(|e| e.to_string())?;
        let pid = child.id();
        // The process we started may die before the sandboxed one it waits for: that
        // one must not serve on after the supervisor was told the appliance is gone.
        let kill_all = self.appliance.as_ref().map(|a| a.killer());
        std::thread::Builder::new()
            .name("fsva-host-waiter".into())
            .spawn(move || {
                let status = child.wait();
                tracing::info!(pid, ?status, "migrated appliance exited");
                if let Some(kill_all) = &kill_all {
                    kill_all();
                }
                let _ = control.shutdown(std::net::Shutdown::Both);
            })
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Stops the appliance (the migration failed or the supervisor went away).
    fn abandon(&mut self) {
        if let Some(s) = self.starting.take() {
            s.abandon();
        }
        if let Some(a) = &self.appliance {
            a.kill();
        }
    }
}

/// The memfds `records` name (every change of a file's contents is journaled with
/// its memfd id, see [`fsva_backend_mem::memfd_ids`]).
fn named<'a>(records: impl Iterator<Item = &'a JournalRecord>) -> Result<HashSet<u64>, String> {
    let mut ids = HashSet::new();
    for r in records {
        match r.payload.split_first() {
            Some((&fsva_appliance::journal::BACKEND, payload)) => ids.extend(
                fsva_backend_mem::memfd_ids(payload)
                    .map_err(|e| format!("journal record {}: {e}", r.seq))?,
            ),
            Some((&fsva_appliance::journal::RUNTIME, _)) => {}
            _ => return Err(format!("journal record {} has no known tag", r.seq)),
        }
    }
    Ok(ids)
}

/// Restores a passthrough appliance from the supervisor's state, without descriptors.
/// The backing ids stay: the kernel files that hold them (opened with FUSE passthrough
/// on the supervisor's host, of the storage both hosts share) keep using them, and
/// every later open of their inodes must name them.
fn build_passthrough(
    starting: Starting,
    state: &[u8],
) -> Result<(Appliance, std::process::Child), String> {
    use fsva_appliance::state::{ApplianceState, BackendState};
    let portable = ApplianceState::decode(state)
        .map_err(|e| e.to_string())
        .and_then(|s| {
            let mut s = s.into_latest();
            let backend = fsva_backend_passthrough::snapshot::portable(BackendState {
                bytes: std::mem::take(&mut s.backend),
                fds: Vec::new(),
            })
            .map_err(|e| e.to_string())?;
            s.backend = backend.bytes;
            Ok(ApplianceState::V2(s).encode())
        });
    let bytes = match portable {
        Ok(b) => b,
        Err(e) => {
            starting.abandon();
            return Err(format!("the state cannot be used here: {e}"));
        }
    };
    let blob = match fsva_control::blob::seal(&bytes) {
        Ok(b) => b,
        Err(e) => {
            starting.abandon();
            return Err(format!("sealing the state: {e}"));
        }
    };
    let saved = SavedState {
        blob,
        fds: Vec::new(),
    };
    starting
        .serve(Some(&saved))
        .map_err(|e| format!("the appliance could not restore the state: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(exports: Vec<std::path::PathBuf>) -> Shared {
        Shared {
            key: fsva_control::host::HostKey::from_bytes(b"0123456789abcdef".to_vec()).unwrap(),
            exe: "/bin/false".into(),
            exports,
            waiting: Default::default(),
            hostname: "test".into(),
        }
    }

    fn config(backend: BackendSpec) -> StartConfig {
        StartConfig {
            backend,
            channel: ChannelKind::Fusedev,
            workers_per_channel: 1000,
            sandbox: SandboxKind::Namespaces,
            log_filter: "info".into(),
            broker_link: true,
            backing_files: true,
            device_nodes: true,
            cache_budget: None,
            vhost_tag: Some("x".into()),
            restore: false,
            host_watched: false,
            dir_hints: false,
        }
    }

    #[test]
    fn only_what_this_host_allows_is_admitted() {
        let base = std::env::temp_dir().join(format!("fsva-admit-{}", std::process::id()));
        let inside = base.join("shared/sub");
        let outside = base.join("private");
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let s = shared(vec![base.join("shared").canonicalize().unwrap()]);
        let mem = BackendSpec::Mem { capacity: 0 };

        let c = admit(&s, config(mem.clone()), StateKind::Mem).unwrap();
        assert_eq!(c.channel, ChannelKind::Stream);
        assert_eq!(c.workers_per_channel, MAX_WORKERS);
        assert!(c.restore && !c.backing_files && !c.broker_link && c.vhost_tag.is_none());

        let pt = |path: &std::path::Path| BackendSpec::Passthrough {
            path: path.to_path_buf(),
            exclusive: false,
        };
        let c = admit(&s, config(pt(&inside)), StateKind::Passthrough).unwrap();
        assert!(
            matches!(c.backend, BackendSpec::Passthrough { path, .. } if path == inside.canonicalize().unwrap())
        );
        let refused = admit(&s, config(pt(&outside)), StateKind::Passthrough).unwrap_err();
        assert!(refused.contains("--export"), "{refused}");
        let escape = inside.join("../../private");
        assert!(admit(&s, config(pt(&escape)), StateKind::Passthrough).is_err());
        assert!(admit(&s, config(mem.clone()), StateKind::Passthrough).is_err());
        assert!(admit(&s, config(pt(&inside)), StateKind::Mem).is_err());
        let mut unsandboxed = config(mem);
        unsandboxed.sandbox = SandboxKind::None;
        let refused = admit(&s, unsandboxed, StateKind::Mem).unwrap_err();
        assert!(refused.contains("sandbox"), "{refused}");
        let image = BackendSpec::Image {
            path: "/x.img".into(),
            fstype: None,
            read_only: true,
        };
        assert!(admit(&s, config(image), StateKind::Mem).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }

    fn migration() -> Migration {
        Migration {
            kind: StateKind::Mem,
            pid: 0,
            starting: None,
            appliance: None,
            child: None,
            kept: None,
            state: Vec::new(),
            checkpoint: None,
            boundary: None,
            files: HashMap::new(),
            kept_ids: HashSet::new(),
            preloaded: None,
            records: Vec::new(),
            record_bytes: 0,
        }
    }

    fn part(id: u64, start: Option<u64>, offset: u64, bytes: &[u8]) -> FilePart {
        FilePart {
            id,
            start,
            offset,
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn contents_are_rebuilt_within_bounds_and_the_unsent_are_asked_for() {
        let mut m = migration();
        m.file_part(part(1, Some(1 << 20), 4096, b"data")).unwrap();
        m.file_part(part(1, None, 8192, b"more")).unwrap();
        m.file_part(part(2, Some(3), 0, b"abc")).unwrap();
        let mut got = [0u8; 4];
        rustix::io::pread(&m.files[&1], &mut got, 8192).unwrap();
        assert_eq!(&got, b"more");
        assert_eq!(rustix::fs::fstat(&m.files[&1]).unwrap().st_size, 1 << 20);
        assert!(
            m.file_part(part(2, None, 2, b"xy")).is_err(),
            "beyond its size"
        );
        assert!(
            m.file_part(part(3, None, 0, b"x")).is_err(),
            "before its start"
        );
        assert!(m.file_part(part(4, Some(u64::MAX), 0, b"")).is_err());

        // A file that starts again is emptied in place: whoever holds it sees that.
        let held = m.files[&1].try_clone().unwrap();
        m.file_part(part(1, Some(8), 0, b"new")).unwrap();
        assert_eq!(rustix::fs::fstat(&held).unwrap().st_size, 8);
        let mut got = [0u8; 8];
        rustix::io::pread(&held, &mut got, 0).unwrap();
        assert_eq!(&got, b"new\0\0\0\0\0");

        // 2 is gone, 5 is new, nothing changed: only 5 comes.
        let none = HashSet::new();
        assert_eq!(m.changed(&[1, 5], Some(&none)).unwrap(), [5]);
        assert!(!m.files.contains_key(&2));
        assert_eq!(m.changed(&[1, 5], None).unwrap(), [1, 5]);
        let bad = JournalRecord {
            seq: 1,
            payload: vec![9, 1, 2],
        };
        assert!(named([bad].iter()).is_err(), "a record with no known tag");
    }
}
