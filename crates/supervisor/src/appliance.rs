//! Starting and talking to one appliance process.
//!
//! The supervisor starts the appliance by re-executing the fsva binary (`fsva
//! __appliance`) with one end of a control [`Link`]; the `Start` message carries the
//! configuration and the channel descriptors. The appliance dies with its supervisor
//! (`PR_SET_PDEATHSIG`), so a killed supervisor never leaves an orphan serving a mount.
//! A VM appliance is a QEMU process instead ([`Appliance::start_vm`]); it is configured
//! by its kernel command line and talks over a framed control port.
//! This module does not decide what happens when an appliance dies; the supervisor does.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fsva_control::{
    ApplianceStats, FramedLink, Link, LinkError, StartConfig, ToAppliance, ToSupervisor,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ApplianceError {
    #[error("starting the appliance process {exe} failed: {source}")]
    Spawn { exe: String, source: std::io::Error },
    #[error("talking to the appliance failed: {0}")]
    Link(#[from] LinkError),
    #[error("the appliance failed to start: {0}")]
    Failed(String),
    #[error("the successor refused its predecessor's state: {0}")]
    StateRefused(String),
    #[error("{0}")]
    Checkpoint(String),
    #[error("the appliance sent an unexpected message during start-up: {0}")]
    Unexpected(String),
}

/// How the supervisor talks to a running appliance.
#[derive(Debug)]
enum Control {
    /// A local appliance process: a seqpacket link.
    Local(Link),
    /// A VM appliance: framed messages over its control port. A guest that answered
    /// late or wrongly once is not asked again (`broken`): its late answer would be
    /// taken for the next one's, and the event loop must never wait on it.
    Vm {
        link: FramedLink,
        broken: std::sync::atomic::AtomicBool,
    },
}

/// How long a VM appliance has to answer a control request, the whole message.
const VM_CONTROL_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a sandboxed appliance has to answer a control request (its link's receive
/// timeout, set once it serves).
const LOCAL_CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long an appliance may take to write its file system back (`fsva sync`): a
/// guest's dirty cache written to an emulated disk takes seconds, a host's gigabytes
/// longer. The supervisor's event loop waits for it, as for a checkpoint.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `f` with `long` as `link`'s receive timeout, then puts the usual one back.
fn with_recv_timeout<T>(link: &Link, long: Duration, f: impl FnOnce() -> T) -> T {
    let set = |t| {
        rustix::net::sockopt::set_socket_timeout(link, rustix::net::sockopt::Timeout::Recv, Some(t))
            .ok()
    };
    set(long);
    let result = f();
    set(LOCAL_CONTROL_TIMEOUT);
    result
}

impl Control {
    fn request(&self, msg: &ToAppliance) -> Result<ToSupervisor, ApplianceError> {
        self.request_within(msg, None)
    }

    /// `request`, with `long` in place of the usual deadline for the answer.
    fn request_within(
        &self,
        msg: &ToAppliance,
        long: Option<Duration>,
    ) -> Result<ToSupervisor, ApplianceError> {
        match self {
            Control::Local(link) => {
                if let Some(t) = long {
                    return with_recv_timeout(link, t, || self.request_within(msg, None));
                }
                // An answer that came after its request timed out is not this one's.
                let stale = link.discard_pending();
                if stale > 0 {
                    tracing::warn!(
                        stale,
                        "dropped late answers of the appliance's control link"
                    );
                }
                link.send(msg, &[])?;
                Ok(link.recv::<ToSupervisor>()?.0)
            }
            Control::Vm { link, broken } => {
                use std::sync::atomic::Ordering;
                if broken.load(Ordering::Relaxed) {
                    return Err(ApplianceError::Failed(
                        "the VM appliance stopped answering control requests".into(),
                    ));
                }
                let answer = link.send(msg).and_then(|()| {
                    link.recv_within::<ToSupervisor>(long.unwrap_or(VM_CONTROL_TIMEOUT))
                });
                if answer.is_err() {
                    broken.store(true, Ordering::Relaxed);
                }
                Ok(answer?)
            }
        }
    }
}

/// An appliance process that got its configuration and is not serving yet.
pub struct Starting {
    pid: u32,
    pidfd: std::sync::Arc<std::os::fd::OwnedFd>,
    child: Child,
    link: Link,
    timeout: Duration,
}

impl Starting {
    /// The appliance's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Hands over `state` (for a successor) and waits until the appliance serves.
    pub fn serve(self, state: Option<&SavedState>) -> Result<(Appliance, Child), ApplianceError> {
        if let Some(state) = state {
            if let Err(e) = state.send(&self.link) {
                self.abandon();
                return Err(e.into());
            }
        }
        match self.link.recv::<ToSupervisor>().map(|(m, _)| m) {
            Ok(ToSupervisor::Ready { .. }) => {}
            other => {
                let (e, _) = not_ready(other, "it exited", "it", self.timeout);
                self.abandon();
                return Err(e);
            }
        }
        rustix::net::sockopt::set_socket_timeout(
            &self.link,
            rustix::net::sockopt::Timeout::Recv,
            Some(LOCAL_CONTROL_TIMEOUT),
        )
        .ok();
        Ok((
            Appliance {
                pid: self.pid,
                sandboxed: sandboxed_child(self.pid),
                sandboxed_pid: first_child(self.pid),
                pidfd: self.pidfd,
                control: Control::Local(self.link),
            },
            self.child,
        ))
    }

    /// Hands a journaled successor what its predecessor left (`fresh`: that state is
    /// lost; start empty) and waits until it serves.
    /// `since`: what a preload gave it already.
    pub fn recover(
        self,
        kept: &crate::keeper::Kept,
        since: Option<crate::keeper::Mark>,
        fresh: bool,
    ) -> Result<(Appliance, Child), ApplianceError> {
        let sent = kept.handover(since, |h| {
            let msg = ToAppliance::Recover {
                checkpoint: h.checkpoint.is_some() && !fresh,
                fds: if fresh { 0 } else { h.fds.len() as u32 },
                fresh,
            };
            send_handover(&self.link, msg, &h, fresh)
        });
        if let Err(e) = sent {
            self.abandon();
            return Err(e.into());
        }
        self.serve(None)
    }

    /// Gives a spare successor a head start: the checkpoint and descriptors it does not
    /// have yet (`since`), which it restores while its predecessor serves on. Returns
    /// what it has then.
    pub fn preload(
        &self,
        kept: &crate::keeper::Kept,
        since: Option<crate::keeper::Mark>,
    ) -> Result<crate::keeper::Mark, ApplianceError> {
        let mark = kept.handover(since, |h| {
            let msg = ToAppliance::Preload {
                checkpoint: h.checkpoint.is_some(),
                fds: h.fds.len() as u32,
            };
            send_handover(&self.link, msg, &h, false).map(|()| h.mark)
        })?;
        match self.link.recv::<ToSupervisor>().map(|(m, _)| m) {
            Ok(ToSupervisor::Preloaded) => Ok(mark),
            other => Err(not_ready(other, "it exited", "it", self.timeout).0),
        }
    }

    /// Waits until a successor has set itself up and waits for its state (so that its
    /// start-up does not compete with the handover for CPU).
    pub fn await_state_request(&self) -> Result<(), ApplianceError> {
        match self.link.recv::<ToSupervisor>().map(|(m, _)| m) {
            Ok(ToSupervisor::AwaitingState) => Ok(()),
            other => Err(not_ready(other, "it exited", "it", self.timeout).0),
        }
    }

    /// Gives up on the appliance (it is killed and reaped).
    pub fn abandon(mut self) {
        let _ = rustix::process::pidfd_send_signal(&*self.pidfd, rustix::process::Signal::KILL);
        let _ = self.child.wait();
    }
}

/// Sends `msg` (`Preload` or `Recover`) with the checkpoint, then the descriptors
/// in batches (none when `fresh`).
fn send_handover(
    link: &Link,
    msg: ToAppliance,
    kept: &crate::keeper::Handover,
    fresh: bool,
) -> Result<(), LinkError> {
    let (checkpoint, fds) = if fresh {
        (None, &[][..])
    } else {
        (kept.checkpoint, &kept.fds[..])
    };
    let attached: Vec<_> = checkpoint.into_iter().collect();
    link.send(&msg, &attached)?;
    for batch in fds.chunks(fsva_control::FDS_PER_MESSAGE) {
        let ids = batch.iter().map(|(id, _)| *id).collect();
        let fds: Vec<_> = batch.iter().map(|(_, f)| *f).collect();
        link.send(&ToAppliance::KeptFds { ids }, &fds)?;
    }
    Ok(())
}

/// Most descriptors a state may come with (the appliance's own descriptor limit).
const MAX_STATE_FDS: usize = 1 << 16;

/// How long an appliance may take to pause and hand over its state.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(30);

/// A paused appliance's state: the encoded state (a sealed memfd) and the descriptors
/// it refers to.
#[derive(Debug)]
pub struct SavedState {
    pub blob: std::os::fd::OwnedFd,
    pub fds: Vec<std::os::fd::OwnedFd>,
}

impl SavedState {
    /// Hands the state to a successor on its control link.
    fn send(&self, link: &Link) -> Result<(), fsva_control::LinkError> {
        use std::os::fd::AsFd;
        link.send(
            &ToAppliance::Restore {
                fds: self.fds.len() as u32,
            },
            &[self.blob.as_fd()],
        )?;
        for batch in self.fds.chunks(fsva_control::FDS_PER_MESSAGE) {
            let fds: Vec<_> = batch.iter().map(|f| f.as_fd()).collect();
            link.send(&ToAppliance::StateFds, &fds)?;
        }
        Ok(())
    }
}

/// A running appliance as the supervisor sees it.
#[derive(Debug)]
pub struct Appliance {
    /// Host pid of the appliance process (QEMU, for a VM appliance).
    pub pid: u32,
    /// A pidfd of the appliance: signals through it never reach a recycled pid.
    pidfd: std::sync::Arc<std::os::fd::OwnedFd>,
    /// A pidfd of the process that serves inside the sandbox, where `pid` only waits for
    /// it (the first process of a new PID namespace, whose death takes the namespace
    /// with it). The appliance is gone only when this one is: `pid` may die first, and
    /// the sandboxed process then lives on until its parent-death signal arrives, still
    /// reading requests.
    sandboxed: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// The sandboxed process's pid, as this supervisor sees it (what file system events
    /// name as the process that caused them).
    sandboxed_pid: Option<u32>,
    control: Control,
}

/// The first child of `pid` (the process an appliance made for its sandbox).
fn first_child(pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// A pidfd of the child `pid` made for its sandbox, if it has one (read while that
/// child is alive: it has just reported ready, so the pid is not a recycled one).
fn sandboxed_child(pid: u32) -> Option<std::sync::Arc<std::os::fd::OwnedFd>> {
    let child = rustix::process::Pid::from_raw(first_child(pid)? as i32)?;
    rustix::process::pidfd_open(child, rustix::process::PidfdFlags::empty())
        .ok()
        .map(std::sync::Arc::new)
}

/// What a VM appliance reported when it came up.
#[derive(Debug, Clone)]
pub struct VmReady {
    pub kernel: String,
    pub fstype: String,
    pub read_only: bool,
    /// The guest mapped the shared-memory region and sends large frames through it.
    pub shared_memory: bool,
}

/// Prepares `cmd` so that the child keeps `keep` open across exec, dies with the
/// supervisor, and enters the memory cgroup `cgroup_procs` before anything is charged.
fn prepare_child(
    cmd: &mut Command,
    keep: Vec<i32>,
    cgroup_procs: Option<&Path>,
) -> Result<(), ApplianceError> {
    let cgroup_procs = cgroup_procs
        .map(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes().to_vec()))
        .transpose()
        .map_err(|e| ApplianceError::Failed(format!("cgroup path: {e}")))?;
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (fcntl, prctl, open, write, close) on values it owns.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Die with the supervisor: a mount is never served by an orphan.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(procs) = &cgroup_procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            Ok(())
        });
    }
    Ok(())
}

/// Why an appliance did not come up, from what its control link said instead of
/// "ready"; `true` when the process is still there and must be killed.
fn not_ready(
    said: Result<ToSupervisor, LinkError>,
    ended: &str,
    who: &str,
    timeout: Duration,
) -> (ApplianceError, bool) {
    match said {
        Ok(ToSupervisor::Failed { message }) => (ApplianceError::Failed(message), true),
        Ok(ToSupervisor::StateRefused { message }) => (ApplianceError::StateRefused(message), true),
        Ok(other) => (ApplianceError::Unexpected(format!("{other:?}")), true),
        Err(LinkError::Closed) => (
            ApplianceError::Failed(format!("{ended} before it was ready (see the log for why)")),
            false,
        ),
        Err(LinkError::Io { source, .. }) if source.kind() == std::io::ErrorKind::WouldBlock => (
            ApplianceError::Failed(format!(
                "{who} did not report ready within {timeout:?}; it was stopped"
            )),
            true,
        ),
        Err(e) => (e.into(), true),
    }
}

fn pidfd_of(pid: u32) -> Result<std::sync::Arc<std::os::fd::OwnedFd>, ApplianceError> {
    rustix::process::Pid::from_raw(pid as i32)
        .ok_or_else(|| ApplianceError::Failed("the kernel reported pid 0".into()))
        .and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())
                .map_err(|e| ApplianceError::Failed(format!("pidfd_open: {e}")))
        })
        .map(std::sync::Arc::new)
}

impl Appliance {
    /// Spawns `exe __appliance`, hands it `config` and `fds`, and waits until it serves.
    /// Returns the appliance and its `Child` (for the caller's waiter thread).
    pub fn start(
        exe: &Path,
        config: &StartConfig,
        fds: &[BorrowedFd<'_>],
        cgroup_procs: Option<&Path>,
        timeout: Duration,
    ) -> Result<(Appliance, Child), ApplianceError> {
        Self::spawn(exe, config, fds, false, cgroup_procs, timeout)?.serve(None)
    }

    /// Spawns `exe __appliance` and hands it `config` and `fds`; the returned
    /// [`Starting`] waits for it to serve. A successor (`config.restore`) sets up its
    /// sandbox meanwhile and waits for its predecessor's state. `journaled`: the last
    /// two of `fds` are its keeper link and the recovery journal.
    pub fn spawn(
        exe: &Path,
        config: &StartConfig,
        fds: &[BorrowedFd<'_>],
        journaled: bool,
        cgroup_procs: Option<&Path>,
        timeout: Duration,
    ) -> Result<Starting, ApplianceError> {
        let (ours, theirs) = Link::pair()?;
        let their_fd = theirs.as_fd().as_raw_fd();
        let mut cmd = Command::new(exe);
        cmd.arg("__appliance")
            .arg("--control-fd")
            .arg(their_fd.to_string())
            .stdin(Stdio::null());
        prepare_child(&mut cmd, vec![their_fd], cgroup_procs)?;
        let child = cmd.spawn().map_err(|source| ApplianceError::Spawn {
            exe: exe.display().to_string(),
            source,
        })?;
        drop(theirs);
        let pid = child.id();
        let starting = Starting {
            pidfd: pidfd_of(pid)?,
            pid,
            child,
            link: ours,
            timeout,
        };
        rustix::net::sockopt::set_socket_timeout(
            &starting.link,
            rustix::net::sockopt::Timeout::Recv,
            Some(timeout),
        )
        .ok();
        let start = if journaled {
            ToAppliance::StartJournaled(config.clone())
        } else {
            ToAppliance::Start(config.clone())
        };
        if let Err(e) = starting.link.send(&start, fds) {
            starting.abandon();
            return Err(e.into());
        }
        Ok(starting)
    }

    /// Starts a VM appliance with `qemu` (its command line refers to the sockets in
    /// `keep`) and waits until the guest reports it serves.
    /// `give` are the descriptors QEMU inherits; they are closed here as soon as QEMU
    /// runs, so that a QEMU that dies before the guest is ready shows as end-of-file on
    /// the control socket at once, not as a time-out.
    pub fn start_vm(
        mut qemu: Command,
        give: Vec<std::os::fd::OwnedFd>,
        control: std::os::unix::net::UnixStream,
        cgroup_procs: Option<&Path>,
        timeout: Duration,
    ) -> Result<(Appliance, Child, VmReady), ApplianceError> {
        prepare_child(
            &mut qemu,
            give.iter().map(|fd| fd.as_raw_fd()).collect(),
            cgroup_procs,
        )?;
        // The guest's console goes to our log.
        if let Ok(log) = std::io::stderr().as_fd().try_clone_to_owned() {
            qemu.stdout(Stdio::from(log));
        }
        let child = qemu.spawn().map_err(|source| ApplianceError::Spawn {
            exe: fsva_vm::qemu::QEMU.into(),
            source,
        })?;
        drop(give);
        let pid = child.id();
        let pidfd = pidfd_of(pid)?;
        let kill_on_error = |e: ApplianceError| {
            let _ = rustix::process::pidfd_send_signal(&*pidfd, rustix::process::Signal::KILL);
            e
        };
        let link = FramedLink::new(control)
            .map_err(|e| kill_on_error(ApplianceError::Failed(format!("control socket: {e}"))))?;
        let ready = match link.recv_within::<ToSupervisor>(timeout) {
            Ok(ToSupervisor::VmReady {
                kernel,
                fstype,
                read_only,
                shared_memory,
            }) => VmReady {
                kernel,
                fstype,
                read_only,
                shared_memory,
            },
            other => {
                return Err(
                    match not_ready(other, "the VM stopped", "the VM", timeout) {
                        (e, true) => kill_on_error(e),
                        (e, false) => e,
                    },
                )
            }
        };
        Ok((
            Appliance {
                pid,
                pidfd,
                sandboxed: None,
                sandboxed_pid: None,
                control: Control::Vm {
                    link,
                    broken: std::sync::atomic::AtomicBool::new(false),
                },
            },
            child,
            ready,
        ))
    }

    /// Tells the appliance its new cache budget.
    /// Pauses a process appliance and takes its state (live restart). It stays paused
    /// until the caller replaces it; a checkpoint that fails resumes it on its side.
    pub fn checkpoint(&self) -> Result<SavedState, ApplianceError> {
        self.take_state(&ToAppliance::Checkpoint)
    }

    /// Pauses a process appliance and takes its state for a transfer that carries
    /// bytes only (a vhost-user device's state): its descriptors are files whose
    /// contents are to travel by value. It stays paused until [`Appliance::resume`].
    pub fn checkpoint_for_transfer(&self) -> Result<SavedState, ApplianceError> {
        self.take_state(&ToAppliance::CheckpointForTransfer)
    }

    /// Sends `ask` (a checkpoint request) and receives the state it is answered with.
    fn take_state(&self, ask: &ToAppliance) -> Result<SavedState, ApplianceError> {
        let Control::Local(link) = &self.control else {
            return Err(ApplianceError::Checkpoint(
                "a VM appliance cannot be restarted live yet".into(),
            ));
        };
        with_recv_timeout(link, CHECKPOINT_TIMEOUT, || {
            link.send(ask, &[])?;
            let (reply, mut blob) = link.recv::<ToSupervisor>()?;
            let count = match reply {
                ToSupervisor::Checkpointed { fds } => fds as usize,
                ToSupervisor::Failed { message } => {
                    return Err(ApplianceError::Checkpoint(message))
                }
                other => {
                    return Err(ApplianceError::Checkpoint(format!(
                        "unexpected answer: {other:?}"
                    )))
                }
            };
            let blob = blob
                .pop()
                .ok_or_else(|| ApplianceError::Checkpoint("it came without its state".into()))?;
            if count > MAX_STATE_FDS {
                return Err(ApplianceError::Checkpoint(format!(
                    "it announced {count} descriptors, more than any appliance may hold"
                )));
            }
            let mut fds = Vec::with_capacity(count.min(4096));
            while fds.len() < count {
                let (m, batch) = link.recv::<ToSupervisor>().map_err(|e| {
                    ApplianceError::Checkpoint(format!(
                        "receiving the state's descriptors ({} of {count}): {e}",
                        fds.len()
                    ))
                })?;
                if !matches!(m, ToSupervisor::StateFds) || batch.is_empty() {
                    return Err(ApplianceError::Checkpoint(format!(
                        "expected the state's descriptors, got {m:?}"
                    )));
                }
                fds.extend(batch);
            }
            Ok(SavedState { blob, fds })
        })
    }

    /// Has a journaled appliance store a checkpoint now (before it is replaced, so
    /// that its successor has little journal to replay).
    pub fn checkpoint_now(&self) -> Result<u64, ApplianceError> {
        match self.control.request(&ToAppliance::CheckpointNow)? {
            ToSupervisor::CheckpointTaken { boundary } => Ok(boundary),
            ToSupervisor::Failed { message } => Err(ApplianceError::Checkpoint(message)),
            other => Err(ApplianceError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Lets a paused appliance go on (its successor did not start).
    pub fn resume(&self) -> Result<(), ApplianceError> {
        match self.control.request(&ToAppliance::Resume)? {
            ToSupervisor::Resumed => Ok(()),
            other => Err(ApplianceError::Failed(format!(
                "unexpected answer to resume: {other:?}"
            ))),
        }
    }

    pub fn set_cache_budget(&self, bytes: u64) -> Result<(), ApplianceError> {
        match self
            .control
            .request(&ToAppliance::SetCacheBudget { bytes })?
        {
            ToSupervisor::CacheBudgetSet => Ok(()),
            other => Err(ApplianceError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Has the appliance write its file system back to storage.
    pub fn sync(&self) -> Result<(), ApplianceError> {
        match self
            .control
            .request_within(&ToAppliance::Sync, Some(SYNC_TIMEOUT))?
        {
            ToSupervisor::Synced => Ok(()),
            ToSupervisor::Failed { message } => Err(ApplianceError::Failed(message)),
            other => Err(ApplianceError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sets a VM appliance's clock to this host's.
    pub fn set_clock(&self) -> Result<(), ApplianceError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let msg = ToAppliance::SetClock {
            secs: now.as_secs() as i64,
            nanos: now.subsec_nanos(),
        };
        match self.control.request(&msg)? {
            ToSupervisor::ClockSet => Ok(()),
            other => Err(ApplianceError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Asks the appliance for its counters.
    pub fn stats(&self) -> Result<ApplianceStats, ApplianceError> {
        match self.control.request(&ToAppliance::Stats)? {
            ToSupervisor::Stats(s) => Ok(s),
            other => Err(ApplianceError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends SIGKILL to the appliance, the sandboxed process first (never to a later
    /// process with either pid).
    pub fn kill(&self) {
        self.killer()();
    }

    /// The pids of the appliance's processes (QEMU's alone for a VM appliance): who
    /// file system events caused by the appliance itself name.
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(self.pid)
            .chain(self.sandboxed_pid)
            .collect()
    }

    /// The objects known to the kernel among `changes`, made beside the mount.
    pub fn host_changed(
        &self,
        changes: fsva_control::HostChanges,
    ) -> Result<fsva_control::Invalidations, ApplianceError> {
        match self.control.request(&ToAppliance::HostChanged(changes))? {
            ToSupervisor::Invalidations(i) => Ok(i),
            other => Err(ApplianceError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The pidfds of every process of the appliance, the sandboxed one first.
    fn pidfds(&self) -> Vec<std::sync::Arc<std::os::fd::OwnedFd>> {
        self.sandboxed
            .iter()
            .chain(std::iter::once(&self.pidfd))
            .cloned()
            .collect()
    }

    /// Waits (at most `limit`) until every thread of every process of the appliance
    /// has exited (their pidfds turn readable); whether they did.
    pub fn wait_exit(&self, limit: Duration) -> bool {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let deadline = std::time::Instant::now() + limit;
        self.pidfds().iter().all(|pidfd| {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let timeout = Timespec::try_from(left).unwrap_or_default();
            let mut fds = [PollFd::new(&**pidfd, PollFlags::IN)];
            matches!(poll(&mut fds, Some(&timeout)), Ok(n) if n > 0)
        })
    }

    /// A function that kills the appliance, for threads that outlive this borrow.
    pub fn killer(&self) -> impl Fn() + Send + Sync + 'static {
        let pidfds = self.pidfds();
        move || {
            for pidfd in &pidfds {
                let _ = rustix::process::pidfd_send_signal(&**pidfd, rustix::process::Signal::KILL);
            }
        }
    }
}
