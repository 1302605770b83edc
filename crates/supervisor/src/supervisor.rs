//! One mount's supervisor, from mount to unmount.
//!
//! [`run`] checks the request, mounts, starts the appliance on its channel, waits until
//! the mount answers, reports readiness, and then serves admin requests (`status`,
//! `umount`) and reacts to the appliance's death and to SIGINT/SIGTERM until the mount
//! is gone. Whatever fails after the mount exists, the mount is removed again: a user
//! never inherits a half-made mount. It holds every `/dev/fuse` clone for the life of
//! the mount so that in-flight requests survive an appliance's death.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fsva_channel::fusedev::{clone_session, FuseDev};
use fsva_control::link::Listener;
use fsva_control::{
    AdminReply, AdminRequest, BackendSpec, ChannelKind, Link, MountStatus, SandboxKind, StartConfig,
};
use thiserror::Error;

use crate::appliance::{Appliance, ApplianceError};
use crate::bridge::{Bridge, Tuning};
use crate::launch;
use crate::mount::{self, MountError, MountOptions};
use crate::registry;
use fsva_channel::shm::ShmRegion;

#[derive(Debug, Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Appliance(#[from] ApplianceError),
    #[error("backend directory {0} does not exist or is not a directory: pass an existing directory to --backend passthrough:DIR")]
    BadBackendPath(PathBuf),
    #[error(
        "the mount at {0} did not answer within {1:?} after the appliance started (see the log)"
    )]
    NotAnswering(PathBuf, Duration),
    #[error("the appliance exited ({0}) before the mount answered (see the log for why)")]
    ApplianceExited(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Link(#[from] fsva_control::LinkError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SupervisorError {
    let what = what.into();
    move |source| SupervisorError::Io { what, source }
}

/// Everything `fsva mount` asks for.
#[derive(Debug)]
pub struct MountRequest {
    pub mountpoint: PathBuf,
    pub backend: BackendSpec,
    pub channel: ChannelKind,
    pub sandbox: SandboxKind,
    /// Channel endpoints (each one worker thread in the appliance).
    pub workers: u32,
    pub options: MountOptions,
    /// The fsva executable to run appliances with.
    pub exe: PathBuf,
    pub log_filter: String,
    /// Offer FUSE passthrough (the kernel reads and writes the backend's files directly).
    pub passthrough: bool,
    /// Keep a recovery journal where the backend allows it, so that a successor takes
    /// over after an appliance dies.
    pub recovery: bool,
    /// Most bytes of file data the appliance may keep in memory (`--cache-budget`).
    pub cache_budget: Option<u64>,
    /// Written "ok\n" once the mount answers, or "error: ...\n"; then closed.
    pub ready: Option<OwnedFd>,
    /// For a VM appliance (`sandbox` is `Vm`): the machine to boot.
    pub vm: Option<VmPlan>,
}

/// A VM appliance to boot: the built appliance, the machine, and how the accelerator
/// was chosen (shown by `fsva status`).
#[derive(Debug)]
pub struct VmPlan {
    pub appliance: fsva_vm::bundle::Appliance,
    pub spec: fsva_vm::qemu::VmSpec,
    pub accel_note: String,
}

pub(crate) enum Event {
    Admin(Link),
    /// The appliance with this pid exited (or was dropped), with why, seen at that
    /// moment.
    ApplianceExited(u32, String, std::time::Instant),
    Signal(i32),
    /// The FUSE connection is gone: unmounted (by us or anyone) or aborted.
    Disconnected,
    /// The appliance stored a new checkpoint (the spare may preload it).
    CheckpointStored,
    /// Changes made beside a watched export ([`crate::host_watch`]); the answer goes
    /// back on the sender.
    HostChanged(
        fsva_control::HostChanges,
        mpsc::Sender<fsva_control::Invalidations>,
    ),
}

/// Mounts, serves until unmounted, and cleans up.
pub fn run(mut req: MountRequest) -> Result<(), SupervisorError> {
    let mut ready = req.ready.take();
    let result = run_inner(req, &mut ready);
    if let (Err(e), Some(fd)) = (&result, ready.take()) {
        let _ = writeln!(std::fs::File::from(fd), "error: {e}");
    }
    result
}

fn run_inner(mut req: MountRequest, ready: &mut Option<OwnedFd>) -> Result<(), SupervisorError> {
    // This mount's relay takes the guest's directory-attribute hints.
    if let Some(plan) = req.vm.as_mut() {
        plan.spec.dir_hints = true;
    }
    block_termination_signals();
    raise_open_file_limit();
    let mountpoint = mount::check_mountpoint(&req.mountpoint)?;
    if let BackendSpec::Passthrough { path, .. } = &req.backend {
        if !path.is_dir() {
            return Err(SupervisorError::BadBackendPath(path.clone()));
        }
    }
    let entry = registry::Entry::for_mount(&mountpoint);
    if let Some(dir) = entry.socket.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    }
    let listener = Listener::bind(&entry.socket)?;
    // The runtime files go with this supervisor, whichever way it ends (short of SIGKILL).
    let _runtime_files = RuntimeFiles(entry.clone());

    let session = mount::mount(&mountpoint, &req.options)?;
    let mounted = MountGuard {
        path: mountpoint.clone(),
        armed: true,
    };

    let workers = req.workers.max(1) as usize;
    let mut devs = Vec::with_capacity(workers);
    for _ in 0..workers {
        devs.push(Arc::new(FuseDev::new(
            clone_session(session.as_fd()).map_err(MountError::from)?,
        )));
    }

    let (events_tx, events) = mpsc::channel::<Event>();
    let host_watch = watch_export(&req).map(Arc::new);
    let config = StartConfig {
        backend: req.backend.clone(),
        channel: req.channel,
        workers_per_channel: if req.channel == ChannelKind::Stream {
            workers as u32
        } else {
            1
        },
        sandbox: req.sandbox,
        log_filter: req.log_filter.clone(),
        broker_link: needs_broker(&req),
        backing_files: offers_backing_files(&req),
        device_nodes: brokers_device_nodes(&req),
        cache_budget: req.cache_budget,
        vhost_tag: None,
        restore: false,
        host_watched: host_watch.is_some(),
        dir_hints: req.channel == ChannelKind::Stream && req.backend.is_only_writer(),
    };
    // The budget is enforced by the kernel on the appliance's memory cgroup, with room
    // for the appliance's own code, heap and request buffers on top.
    // A VM appliance's memory is its guest RAM (fixed at boot) plus QEMU's own: the
    // guest keeps its page cache within the budget itself.
    let limit_for = vm_memory_limit(&req);
    let mut cache_budget = req.cache_budget;
    let cgroup = match cache_budget {
        Some(bytes) => {
            let cg = crate::cgroup::MemoryCgroup::create(&registry::mount_id(&mountpoint))
                .map_err(io_err("creating the appliance's memory cgroup"))?;
            cg.set_limit(limit_for.unwrap_or(bytes + CGROUP_HEADROOM))
                .map_err(io_err(format!("limiting {}", cg.path().display())))?;
            Some(cg)
        }
        None => None,
    };
    let cgroup_procs = cgroup.as_ref().map(|c| c.procs_file());
    let backing_files = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let data_path = data_path(&req, host_watch.is_some());
    let broker_link = if needs_broker(&req) {
        let scope = broker_scope(&req, session.as_fd(), backing_files.clone())?;
        Some(crate::broker::start(scope).map_err(io_err("starting the broker"))?)
    } else {
        None
    };
    // What a successor needs if the appliance dies: its journal, checkpoints, memfds
    // or open files.
    let kept = if journals(&req) {
        Some(
            crate::keeper::Kept::new(fsva_appliance::journal::DEFAULT_AREA, kept_kind(&req)?)
                .map_err(io_err("creating the recovery journal"))?,
        )
    } else {
        None
    };
    let mut keeper_end = None;

    let mut bridge = None;
    let mut data_path = data_path;
    let (appliance, child) = match (&req.vm, req.channel) {
        (None, ChannelKind::Fusedev) => {
            let mut fds: Vec<_> = devs.iter().map(|d| d.as_fd()).collect();
            fds.extend(broker_link.as_ref().map(|l| l.as_fd()));
            let keeper_link = match &kept {
                Some(k) => {
                    let (link, end) = k.link().map_err(io_err("starting the keeper link"))?;
                    keeper_end = Some(end);
                    Some(link)
                }
                None => None,
            };
            if let (Some(link), Some(k)) = (&keeper_link, &kept) {
                fds.push(link.as_fd());
                fds.push(k.journal());
            }
            let started = Appliance::spawn(
                &req.exe,
                &config,
                &fds,
                kept.is_some(),
                cgroup_procs.as_deref(),
                launch::START_TIMEOUT,
            )?
            .serve(None)?;
            drop(keeper_link);
            started
        }
        (plan, _) => {
            let started = match plan {
                Some(plan) => launch::vm(plan, cgroup_procs.as_deref(), req.cache_budget)?,
                None => launch::sandboxed(
                    &req.exe,
                    &config,
                    broker_link.as_ref().map(|l| l.as_fd()),
                    cgroup_procs.as_deref(),
                )?,
            };
            if let Some(path) = started.data_path {
                data_path = path;
            }
            let tuning = Tuning {
                sole_writer: req.backend.is_only_writer(),
            };
            bridge = Some(relay(
                &devs,
                started.stream,
                started.shm,
                tuning,
                &started.appliance,
                &events_tx,
            )?);
            (started.appliance, started.child)
        }
    };
    // Only the appliance holds its end now: when it dies the broker thread sees EOF.
    drop(broker_link);
    tracing::info!(pid = appliance.pid, backend = %req.backend, channel = %req.channel, sandbox = %req.sandbox, "appliance serving");

    let exited = Arc::new(std::sync::Mutex::new(None::<String>));
    watch_appliance(child, &events_tx, Some(exited.clone()))?;
    {
        let tx = events_tx.clone();
        let session = session
            .try_clone()
            .map_err(io_err("duplicating the session descriptor"))?;
        std::thread::Builder::new()
            .name("fsva-mount-watch".into())
            .spawn(move || {
                mount::wait_until_disconnected(session.as_fd());
                let _ = tx.send(Event::Disconnected);
            })
            .map_err(io_err("spawning the mount watcher"))?;
    }
    {
        let tx = events_tx.clone();
        std::thread::Builder::new()
            .name("fsva-admin".into())
            .spawn(move || {
                while let Ok(link) = listener.accept() {
                    if tx.send(Event::Admin(link)).is_err() {
                        break;
                    }
                }
            })
            .map_err(io_err("spawning the admin listener"))?;
    }
    {
        let tx = events_tx.clone();
        std::thread::Builder::new()
            .name("fsva-signals".into())
            .spawn(move || loop {
                let sig = wait_termination_signal();
                if tx.send(Event::Signal(sig)).is_err() {
                    break;
                }
            })
            .map_err(io_err("spawning the signal thread"))?;
    }

    if let Some(watch) = &host_watch {
        let tx = events_tx.clone();
        let ask = move |changes| {
            let (answer_tx, answer) = mpsc::channel();
            tx.send(Event::HostChanged(changes, answer_tx)).ok()?;
            answer.recv().ok()
        };
        crate::host_watch::spawn(watch.clone(), devs[0].clone(), appliance.pids(), ask)
            .map_err(io_err("spawning the export watcher"))?;
    }

    wait_until_answering(&mountpoint, Duration::from_secs(30), &exited)?;
    // INIT has been answered (the stat above waited for it), so the kernel will not
    // lower the window again.
    match mount::fsva_mount_device(&mountpoint) {
        Some(device) => {
            if let Err(e) = mount::raise_readahead(&device, mount::READ_AHEAD) {
                tracing::info!(%device, error = %e, "could not raise the mount's read-ahead; sequential reads that reach the appliance go in 128 KiB requests");
            }
        }
        None => tracing::info!("the new mount is not in mountinfo; read-ahead left as it is"),
    }
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    entry
        .write_record(&[
            ("mountpoint", mountpoint.display().to_string()),
            ("supervisor_pid", std::process::id().to_string()),
            ("appliance_pid", appliance.pid.to_string()),
            ("backend", req.backend.to_string()),
        ])
        .map_err(io_err(format!("writing {}", entry.record.display())))?;
    if let Some(fd) = ready.take() {
        // Closing the pipe after the verdict lets `fsva mount` return.
        let _ = std::fs::File::from(fd).write_all(b"ok\n");
    }

    let mut state = String::from("serving");
    let mut restarts = 0u32;
    let mut last_downtime_us = None;
    let mut recovery = fsva_control::RecoveryStatus {
        journaled: kept.is_some(),
        ..Default::default()
    };
    // The appliance on another host serving the mount since a migration, if any.
    let mut remote: Option<crate::migrate::Remote> = None;
    let mut migration = fsva_control::MigrationStatus::default();
    let mut current = crate::takeover::Current {
        appliance,
        keeper: keeper_end,
    };
    let successors = crate::takeover::Successors {
        req: &req,
        config: &config,
        mountpoint: &mountpoint,
        devs: &devs,
        session: session.as_fd(),
        backing_files: &backing_files,
        cgroup_procs: cgroup_procs.as_deref(),
        events: &events_tx,
        kept: kept.as_ref(),
    };
    // A successor waiting in the wings, preloaded with the last checkpoint, so that a
    // crash costs only the journal's tail.
    if let Some(k) = &kept {
        let tx = events_tx.clone();
        k.on_checkpoint(move || {
            let _ = tx.send(Event::CheckpointStored);
        });
    }
    let new_spare = |budget: Option<u64>| {
        let kept = kept.as_ref()?;
        match successors.spare(budget) {
            Ok(s) => s.preload(kept).or_else(|| {
                // The spare refused the checkpoint or died: one without a preload then.
                successors.spare(budget).ok()
            }),
            Err(e) => {
                tracing::warn!(error = %e, "no spare successor; a crash will start one then");
                None
            }
        }
    };
    let mut spare = new_spare(cache_budget);
    let mut crashes = CrashLoop::default();
    let mut alive = true;
    let mut mounted = mounted;
    // Who asked for the unmount, answered once the connection is really gone.
    let mut unmount_waiter: Option<Link> = None;
    let record = |pid: u32| {
        let _ = entry.write_record(&[
            ("mountpoint", mountpoint.display().to_string()),
            ("supervisor_pid", std::process::id().to_string()),
            ("appliance_pid", pid.to_string()),
            ("backend", req.backend.to_string()),
        ]);
    };
    loop {
        let Ok(event) = events.recv() else { break };
        match event {
            Event::Disconnected => {
                tracing::info!("the mount is gone; stopping the appliance");
                mounted.armed = false;
                if let Some(b) = &bridge {
                    b.close();
                }
                if let Some(s) = spare.take() {
                    s.discard();
                }
                finish_appliance(&current.appliance, alive, req.vm.is_some());
                entry.remove();
                if let Some(link) = unmount_waiter.take() {
                    let _ = link.send(&AdminReply::Unmounted, &[]);
                }
                return Ok(());
            }
            Event::ApplianceExited(pid, status, died) => {
                if !alive || pid != current.appliance.pid {
                    // Not the current appliance: one replaced by a takeover.
                    continue;
                }
                if unmount_waiter.is_some() || !mount::is_fsva_mount(&mountpoint) {
                    // The appliance ended because the mount went away.
                    alive = false;
                    continue;
                }
                if kept.is_some() && !crashes.died() {
                    tracing::warn!(status = %status, "appliance died; a successor takes over with its state");
                    match successors.recover(&current, spare.take(), cache_budget, died) {
                        Ok(taken) => {
                            current = taken.current;
                            let us = taken.downtime.as_micros() as u64;
                            if taken.fresh {
                                recovery.fresh_starts += 1;
                                state = "serving; a fresh file system replaced one whose state was lost (old files: ESTALE)".into();
                            } else {
                                recovery.recoveries += 1;
                            }
                            recovery.last_downtime_us = Some(us);
                            recovery.last_event = Some(now_secs());
                            tracing::info!(
                                pid = current.appliance.pid,
                                downtime_us = us,
                                fresh = taken.fresh,
                                "appliance replaced after it died"
                            );
                            crashes.took_over();
                            record(current.appliance.pid);
                            if let Some(w) = &host_watch {
                                w.adopt(current.appliance.pids());
                            }
                            spare = new_spare(cache_budget);
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "no successor could take over");
                        }
                    }
                }
                alive = false;
                // All of it: a sandboxed process that outlived the one we started would
                // still take requests that the readers below should answer.
                current.appliance.kill();
                current.appliance.wait_exit(Duration::from_secs(5));
                state = format!("appliance gone ({status}); answering EIO");
                tracing::error!(status = %status, "appliance exited; the mount now answers EIO");
                if let Some(s) = spare.take() {
                    s.discard();
                }
                match &bridge {
                    Some(b) => b.fail(&format!("appliance exited ({status})")),
                    None => {
                        let abort_path = mountpoint.clone();
                        crate::fallback::answer_with_errors(&devs, libc::EIO, move || {
                            if let Err(e) = mount::abort_connection(&abort_path) {
                                tracing::error!(error = %e, "could not abort the FUSE connection");
                            }
                        });
                    }
                }
            }
            Event::HostChanged(changes, answer) => {
                // An appliance elsewhere (migrated) serves another host's export.
                let invalidations = match (&remote, alive) {
                    (None, true) => current.appliance.host_changed(changes).unwrap_or_else(|e| {
                        tracing::debug!(error = %e, "the appliance did not map changes made beside the mount");
                        Default::default()
                    }),
                    _ => Default::default(),
                };
                let _ = answer.send(invalidations);
            }
            Event::CheckpointStored => {
                if let (Some(s), Some(k), true) = (spare.take(), &kept, alive) {
                    spare = s.preload(k);
                    if spare.is_none() {
                        spare = new_spare(cache_budget);
                    }
                }
            }
            Event::Signal(sig) => {
                tracing::info!(signal = sig, "unmounting on signal");
                match mount::unmount(&mountpoint, false) {
                    Ok(()) => {}
                    Err(MountError::Busy { .. }) => {
                        tracing::warn!(
                            "mount busy; detaching it now, serving its open files until they close"
                        );
                        mount::unmount(&mountpoint, true)?;
                    }
                    Err(e) => return Err(e.into()),
                }
                mounted.armed = false;
            }
            Event::Admin(link) => {
                // A client that connects and says nothing must not stall the supervisor.
                let _ = rustix::net::sockopt::set_socket_timeout(
                    &link,
                    rustix::net::sockopt::Timeout::Recv,
                    Some(Duration::from_secs(1)),
                );
                let Ok((request, _)) = link.recv::<AdminRequest>() else {
                    continue;
                };
                match request {
                    AdminRequest::Status
                    | AdminRequest::StatusFull
                    | AdminRequest::StatusMigration => {
                        let stats = match &remote {
                            Some(r) => r.stats(),
                            None if alive => current.appliance.stats().ok(),
                            None => None,
                        };
                        let status = MountStatus {
                            mountpoint: mountpoint.clone(),
                            backend: req.backend.to_string(),
                            channel: match &remote {
                                Some(_) => "tcp".into(),
                                None => req.channel.to_string(),
                            },
                            sandbox: req.sandbox.to_string(),
                            supervisor_pid: std::process::id(),
                            appliance_pid: alive.then_some(current.appliance.pid),
                            started,
                            requests: stats.map(|s| s.requests).unwrap_or(0),
                            errors: stats.map(|s| s.errors).unwrap_or(0),
                            state: remote.as_ref().map_or_else(|| state.clone(), |r| r.state()),
                            data_path: match (&host_watch, bridge.as_ref().and_then(Bridge::answered)) {
                                (Some(w), _) if w.stopped() => format!(
                                    "{data_path} (but the watch stopped, see the log: changes beside the mount show within 60 s)"
                                ),
                                (_, Some(n)) => format!(
                                    "{data_path}; the relay answered {n} requests itself (capability checks, directory attributes, lookups of absent names, ioctls)"
                                ),
                                _ => data_path.clone(),
                            },
                            // The appliance knows at once; the broker within a second.
                            backing_files: stats.map(|s| s.passthrough_files).unwrap_or_else(
                                || backing_files.load(std::sync::atomic::Ordering::Relaxed),
                            ),
                            cache_budget,
                            memory_used: cgroup.as_ref().and_then(|c| c.usage().ok()),
                            restarts,
                            last_downtime_us,
                        };
                        let reply = match request {
                            AdminRequest::StatusFull => {
                                AdminReply::StatusFull(Box::new(status), recovery.clone())
                            }
                            AdminRequest::StatusMigration => AdminReply::StatusMigration(
                                Box::new(status),
                                recovery.clone(),
                                migration.clone(),
                            ),
                            _ => AdminReply::Status(Box::new(status)),
                        };
                        let _ = link.send(&reply, &[]);
                    }
                    AdminRequest::Restart => {
                        let reply = if let Some(r) = &remote {
                            AdminReply::Error {
                                message: format!(
                                    "{} is served from {}: restart restarts local appliances only",
                                    mountpoint.display(),
                                    r.host
                                ),
                            }
                        } else if !alive {
                            AdminReply::Error {
                                message: "the appliance is gone; remount to get a new one".into(),
                            }
                        } else {
                            let taken = if kept.is_some() {
                                successors.restart_journaled(&current, spare.take(), cache_budget)
                            } else {
                                successors.restart_paused(&current, cache_budget)
                            };
                            match taken {
                                Ok(taken) => {
                                    current = taken.current;
                                    restarts += 1;
                                    let us = taken.downtime.as_micros() as u64;
                                    last_downtime_us = Some(us);
                                    recovery.last_downtime_us = Some(us);
                                    recovery.last_event = Some(now_secs());
                                    if taken.fresh {
                                        recovery.fresh_starts += 1;
                                        state = "serving; a fresh file system replaced one whose state was lost (old files: ESTALE)".into();
                                    }
                                    tracing::info!(
                                        pid = current.appliance.pid,
                                        downtime_us = us,
                                        "appliance restarted live"
                                    );
                                    crashes.took_over();
                                    record(current.appliance.pid);
                                    if let Some(w) = &host_watch {
                                        w.adopt(current.appliance.pids());
                                    }
                                    if kept.is_some() && spare.is_none() {
                                        spare = new_spare(cache_budget);
                                    }
                                    AdminReply::Restarted {
                                        downtime_us: us,
                                        pid: current.appliance.pid,
                                    }
                                }
                                Err(message) => {
                                    if kept.is_some() && spare.is_none() {
                                        spare = new_spare(cache_budget);
                                    }
                                    AdminReply::Error { message }
                                }
                            }
                        };
                        let _ = link.send(&reply, &[]);
                    }
                    AdminRequest::SetCacheBudget { .. } if remote.is_some() => {
                        let message = format!(
                            "{} is served from another host: its cache budget cannot change at run time yet",
                            mountpoint.display()
                        );
                        let _ = link.send(&AdminReply::Error { message }, &[]);
                    }
                    AdminRequest::Migrate { to, key } => {
                        let reply = match (&remote, alive) {
                            (Some(r), _) => AdminReply::Error {
                                message: format!(
                                    "{} is already served from {}: migrating it again is not built yet",
                                    mountpoint.display(),
                                    r.host
                                ),
                            },
                            (None, false) => AdminReply::Error {
                                message: "the appliance is gone; remount to get a new one".into(),
                            },
                            (None, true) => {
                                let source = crate::migrate::Source {
                                    backend: &req.backend,
                                    channel: req.channel,
                                    vm: req.vm.is_some(),
                                    config: &config,
                                    devs: &devs,
                                    mountpoint: &mountpoint,
                                    backing_files: &backing_files,
                                    kept: kept.as_ref(),
                                };
                                let moved = fsva_control::host::HostKey::from_bytes(key)
                                    .map_err(|e| e.to_string())
                                    .and_then(|key| {
                                        crate::migrate::migrate(&source, &current, &to, &key)
                                            .map_err(|f| migration_failed(&f, kept.is_some()))
                                    });
                                match moved {
                                    Ok(m) => {
                                        // The local appliance is gone; the relay serves.
                                        alive = false;
                                        if let Some(s) = spare.take() {
                                            s.discard();
                                        }
                                        if let Some(k) = &kept {
                                            k.discard();
                                        }
                                        let us = m.downtime.as_micros() as u64;
                                        migration.migrations += 1;
                                        migration.host = Some(to.clone());
                                        migration.remote_pid = Some(m.remote.pid);
                                        migration.last_downtime_us = Some(us);
                                        migration.last_event = Some(now_secs());
                                        data_path = format!(
                                            "through the appliance on {to}, over TCP (relayed here)"
                                        );
                                        let _ = entry.write_record(&[
                                            ("mountpoint", mountpoint.display().to_string()),
                                            ("supervisor_pid", std::process::id().to_string()),
                                            ("backend", req.backend.to_string()),
                                            ("host", to.clone()),
                                            ("remote_pid", m.remote.pid.to_string()),
                                        ]);
                                        bridge = Some(m.bridge);
                                        let reply = match &m.problem {
                                            None => AdminReply::Migrated {
                                                downtime_us: us,
                                                host: to.clone(),
                                                pid: m.remote.pid,
                                            },
                                            Some(p) => AdminReply::Error {
                                                message: format!("the appliance moved to {to} but did not begin serving ({p}); the mount answers EIO"),
                                            },
                                        };
                                        remote = Some(m.remote);
                                        reply
                                    }
                                    Err(message) => AdminReply::Error { message },
                                }
                            }
                        };
                        let _ = link.send(&reply, &[]);
                    }
                    AdminRequest::SetCacheBudget { bytes } => {
                        let reply = match set_cache_budget(
                            &current.appliance,
                            alive,
                            &cgroup,
                            &mountpoint,
                            bytes,
                            limit_for,
                        ) {
                            Ok(()) => {
                                cache_budget = Some(bytes);
                                AdminReply::CacheBudgetSet
                            }
                            Err(message) => AdminReply::Error { message },
                        };
                        let _ = link.send(&reply, &[]);
                    }
                    AdminRequest::Sync => {
                        let started = std::time::Instant::now();
                        let reply = if remote.is_some() {
                            AdminReply::Error {
                                message: format!(
                                    "{} is served from another host: syncing it from here is not built yet; its appliance syncs when it is unmounted",
                                    mountpoint.display()
                                ),
                            }
                        } else if !alive {
                            AdminReply::Error {
                                message: format!(
                                    "{}: the appliance is not running ({state}), so nothing can be synced and what it had not written back is lost; remount (fsva umount, then fsva mount)",
                                    mountpoint.display()
                                ),
                            }
                        } else {
                            match current.appliance.sync() {
                                Ok(()) => AdminReply::Synced {
                                    micros: started.elapsed().as_micros() as u64,
                                },
                                Err(e) => AdminReply::Error {
                                    message: format!(
                                        "syncing the appliance of {} did not complete ({e}): what was written may not be durable yet; run fsva sync again, or fsva umount, which syncs",
                                        mountpoint.display()
                                    ),
                                },
                            }
                        };
                        let _ = link.send(&reply, &[]);
                    }
                    AdminRequest::Unmount { lazy } => match mount::unmount(&mountpoint, lazy) {
                        Ok(()) => {
                            mounted.armed = false;
                            if lazy {
                                // Detached: open files keep it alive; serve them until the
                                // kernel lets go (Disconnected), then stop.
                                state = "detached; serving files still open".into();
                                let _ = link.send(&AdminReply::Unmounted, &[]);
                            } else {
                                unmount_waiter = Some(link);
                            }
                        }
                        Err(e) => {
                            let _ = link.send(
                                &AdminReply::Error {
                                    message: e.to_string(),
                                },
                                &[],
                            );
                        }
                    },
                }
            }
        }
    }
    if let Some(s) = spare.take() {
        s.discard();
    }
    finish_appliance(&current.appliance, alive, req.vm.is_some());
    entry.remove();
    drop(session);
    Ok(())
}

/// What `fsva migrate` says when a migration did not happen.
fn migration_failed(f: &crate::migrate::Failure, journaled: bool) -> String {
    match (f.stopped, journaled) {
        (false, _) => format!("{}; the mount serves on here", f.error),
        (true, true) => format!(
            "{}; the local appliance had stopped: a successor takes over here with the state this supervisor kept",
            f.error
        ),
        (true, false) => format!(
            "{}; the local appliance had stopped and the mount now answers EIO",
            f.error
        ),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Tells an appliance that dies again and again from one that is killed now and then.
/// An appliance that dies on every start, or on a request the kernel resends to each
/// successor, dies soon after taking over; after [`CRASH_LOOP_LIMIT`] such deaths in a
/// row the supervisor stops replacing it (the mount then answers EIO), so that callers
/// do not wait forever.
struct CrashLoop {
    serving_since: std::time::Instant,
    quick_deaths: u32,
}

/// An appliance that dies within this time of taking over died quickly (one that
/// dies on a resent request does so within milliseconds).
const QUICK_DEATH: Duration = Duration::from_millis(50);
const CRASH_LOOP_LIMIT: u32 = 10;

impl Default for CrashLoop {
    fn default() -> Self {
        CrashLoop {
            serving_since: std::time::Instant::now(),
            quick_deaths: 0,
        }
    }
}

impl CrashLoop {
    /// The appliance died; whether it is one death too many.
    fn died(&mut self) -> bool {
        if self.serving_since.elapsed() < QUICK_DEATH {
            self.quick_deaths += 1;
        } else {
            self.quick_deaths = 0;
        }
        if self.quick_deaths >= CRASH_LOOP_LIMIT {
            tracing::error!(
                deaths = self.quick_deaths,
                "appliances keep dying as soon as they take over; no more successors"
            );
            return true;
        }
        false
    }

    /// A successor serves from now.
    fn took_over(&mut self) {
        self.serving_since = std::time::Instant::now();
    }
}

/// Whether this mount's appliances keep a recovery journal, so that one that dies is
/// replaced with its state: `mem` or `passthrough` served by a process appliance on
/// `/dev/fuse` (VM appliances and stream channels are not recovered yet), unless
/// `--no-recovery` said otherwise.
fn journals(req: &MountRequest) -> bool {
    req.recovery
        && matches!(
            req.backend,
            BackendSpec::Mem { .. } | BackendSpec::Passthrough { .. }
        )
        && req.vm.is_none()
        && req.channel == ChannelKind::Fusedev
}

/// What a journaled mount's appliances leave in the supervisor's keeping: mem's
/// memfds, or a passthrough appliance's open files (regular files of its export).
fn kept_kind(req: &MountRequest) -> Result<crate::keeper::Accept, SupervisorError> {
    Ok(match open_export(&req.backend)? {
        Some(dir) => crate::keeper::Accept::FilesOn(
            rustix::fs::fstat(&dir)
                .map_err(|e| SupervisorError::Io {
                    what: "inspecting the export".into(),
                    source: e.into(),
                })?
                .st_dev,
        ),
        None => crate::keeper::Accept::Memfds,
    })
}

/// A live restart holds every file of a mem appliance (one memfd each) between the two
/// appliances: the supervisor may need as many descriptors as they do.
/// The descriptor table is grown to its final size now, while this process has one
/// thread: growing the table of a multithreaded process waits for an RCU grace period
/// per doubling, which made the first restart of a 10,000-file mount 70 ms slower.
/// A root supervisor raises the hard limit too (up to the kernel's `nr_open`, at most
/// 2^20): it keeps a copy of every memfd of a journaled mem, and its appliances inherit
/// the limit, which bounds how many files mem can hold.
pub fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if rustix::process::geteuid().is_root() {
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(1 << 20)
            .min(1 << 20);
        if limit.maximum.is_some_and(|m| m < nr_open) {
            limit.maximum = Some(nr_open);
            limit.current = Some(nr_open);
            let _ = setrlimit(Resource::Nofile, limit);
        }
        limit = getrlimit(Resource::Nofile);
    }
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
    let current = getrlimit(Resource::Nofile).current.unwrap_or(1024);
    let top = current.clamp(1024, 1 << 16) - 1;
    if let Ok(probe) = rustix::io::fcntl_dupfd_cloexec(std::io::stderr(), top as i32) {
        drop(probe);
    }
}

/// Runs `then(pid, status)` on a thread of its own once `child` has exited.
pub(crate) fn on_exit(
    mut child: std::process::Child,
    then: impl FnOnce(u32, String) + Send + 'static,
) -> Result<(), SupervisorError> {
    let pid = child.id();
    std::thread::Builder::new()
        .name("fsva-appliance-waiter".into())
        .spawn(move || {
            let status = child
                .wait()
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            then(pid, status);
        })
        .map(|_| ())
        .map_err(io_err("spawning the appliance waiter"))
}

/// Reports the exit of `child` as an event (and in `exited`, for start-up).
pub(crate) fn watch_appliance(
    child: std::process::Child,
    events: &mpsc::Sender<Event>,
    exited: Option<Arc<std::sync::Mutex<Option<String>>>>,
) -> Result<(), SupervisorError> {
    let tx = events.clone();
    on_exit(child, move |pid, status| {
        if let Some(exited) = exited {
            *exited.lock().unwrap_or_else(|p| p.into_inner()) = Some(status.clone());
        }
        let _ = tx.send(Event::ApplianceExited(
            pid,
            status,
            std::time::Instant::now(),
        ));
    })
}

/// Starts the stream relay between the mount's clones and an appliance's stream. A
/// misbehaving appliance is stopped; its exit is then reported by the waiter thread.
fn relay(
    devs: &[Arc<FuseDev>],
    stream: UnixStream,
    shm: Option<Arc<ShmRegion>>,
    tuning: Tuning,
    appliance: &Appliance,
    events: &mpsc::Sender<Event>,
) -> Result<Bridge, SupervisorError> {
    let tx = events.clone();
    let kill = appliance.killer();
    let pid = appliance.pid;
    Bridge::start(
        devs.to_vec(),
        stream,
        shm,
        tuning,
        Box::new(move |why| {
            kill();
            tracing::error!(reason = why, "appliance dropped by the stream relay");
            let _ = tx.send(Event::ApplianceExited(
                pid,
                format!("dropped: {why}"),
                std::time::Instant::now(),
            ));
        }),
    )
    .map_err(io_err("starting the stream relay"))
}

/// How long a VM appliance may take to sync, unmount and power off: writing back a
/// large guest page cache to an emulated disk takes minutes, and killing QEMU before
/// would lose data the applications closed (without fsync) before the unmount.
const VM_STOP_GRACE: Duration = Duration::from_secs(600);

/// What QEMU itself needs beside its guest's RAM (code, TCG translation cache, devices).
pub(crate) const VM_QEMU_OVERHEAD: u64 = 256 << 20;
/// What a VM appliance's guest needs beside its page cache (kernel, runtime).
const VM_GUEST_BASE: u64 = 128 << 20;

/// The memory limit of a VM appliance's cgroup: its guest RAM plus QEMU's own.
fn vm_memory_limit(req: &MountRequest) -> Option<u64> {
    req.vm
        .as_ref()
        .map(|plan| (u64::from(plan.spec.memory_mib) << 20) + VM_QEMU_OVERHEAD)
}

/// Memory an appliance needs beyond its cache budget: code, heap, request buffers.
pub(crate) const CGROUP_HEADROOM: u64 = 64 << 20;

/// Applies a new cache budget: the cgroup limit first (the kernel reclaims down to it
/// at once), then the appliance's own accounting.
fn set_cache_budget(
    appliance: &Appliance,
    alive: bool,
    cgroup: &Option<crate::cgroup::MemoryCgroup>,
    mountpoint: &Path,
    bytes: u64,
    vm_limit: Option<u64>,
) -> Result<(), String> {
    let Some(cg) = cgroup else {
        return Err(format!(
            "{} was mounted without --cache-budget; remount with one to change it at run time",
            mountpoint.display()
        ));
    };
    if let Some(limit) = vm_limit {
        // The guest's RAM cannot shrink or grow under it: it keeps its cache within the
        // new budget itself, inside the RAM it booted with.
        let guest_ram = limit.saturating_sub(VM_QEMU_OVERHEAD);
        let most = guest_ram.saturating_sub(VM_GUEST_BASE);
        if bytes > most {
            return Err(format!(
                "{} is a VM appliance with {} MiB of memory: budgets above {} MiB need a remount with a larger --cache-budget or --vm-memory",
                mountpoint.display(),
                guest_ram >> 20,
                most >> 20
            ));
        }
        if alive {
            appliance
                .set_cache_budget(bytes)
                .map_err(|e| e.to_string())?;
        }
        return Ok(());
    }
    if let Err(e) = cg.set_limit(bytes + CGROUP_HEADROOM) {
        // Memory that cannot be reclaimed (mem's file data) is above the new budget:
        // hold the limit where it is used now; the appliance refuses growth (ENOSPC).
        let used = cg.usage().unwrap_or(0);
        cg.set_limit(used.max(bytes) + CGROUP_HEADROOM)
            .map_err(|_| {
                format!("the kernel refused a limit of {bytes} bytes for the appliance: {e}")
            })?;
        tracing::info!(
            bytes,
            used,
            "budget below unreclaimable use; limit held at current use"
        );
    }
    if alive {
        appliance
            .set_cache_budget(bytes)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Whether this mount's appliance gets a broker link (see [`crate::broker`]).
pub(crate) fn needs_broker(req: &MountRequest) -> bool {
    offers_backing_files(req) || brokers_device_nodes(req)
}

/// A root user's passthrough appliance has its device nodes made by the broker: in its
/// user namespace CAP_MKNOD does not reach the host's file system.
fn brokers_device_nodes(req: &MountRequest) -> bool {
    needs_device_broker(&req.backend, req.sandbox)
}

/// Whether an appliance serving `backend` in `sandbox` needs the broker to make device
/// nodes (a root user's passthrough appliance in its own user namespace).
pub(crate) fn needs_device_broker(backend: &BackendSpec, sandbox: SandboxKind) -> bool {
    matches!(backend, BackendSpec::Passthrough { .. })
        && sandbox == SandboxKind::Namespaces
        && rustix::process::geteuid().is_root()
}

/// The export directory of a passthrough backend, as an `O_PATH` descriptor.
pub(crate) fn open_export(backend: &BackendSpec) -> Result<Option<OwnedFd>, SupervisorError> {
    let BackendSpec::Passthrough { path, .. } = backend else {
        return Ok(None);
    };
    rustix::fs::open(
        path,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map(Some)
    .map_err(|e| SupervisorError::Io {
        what: format!("opening the export {}", path.display()),
        source: e.into(),
    })
}

/// What this mount's broker may do for its appliance.
pub(crate) fn broker_scope(
    req: &MountRequest,
    session: BorrowedFd<'_>,
    live_backing: Arc<std::sync::atomic::AtomicU64>,
) -> Result<crate::broker::BrokerScope, SupervisorError> {
    let export = open_export(&req.backend)?;
    let backing = if offers_backing_files(req) {
        let allowed = match &export {
            Some(dir) => crate::backing::Allowed::ExportDevice(
                rustix::fs::fstat(dir)
                    .map_err(|e| SupervisorError::Io {
                        what: "inspecting the export".into(),
                        source: e.into(),
                    })?
                    .st_dev,
            ),
            None => crate::backing::Allowed::Memfd,
        };
        let session = rustix::io::fcntl_dupfd_cloexec(session, 0)
            .map_err(|e| io_err("duplicating the session descriptor")(e.into()))?;
        Some((session, allowed))
    } else {
        None
    };
    let devices_in = if brokers_device_nodes(req) {
        export
    } else {
        None
    };
    Ok(crate::broker::BrokerScope {
        backing,
        devices_in,
        live_backing,
    })
}

/// Whether this mount's appliance gets a backing link for FUSE passthrough.
/// Registering backing files needs CAP_SYS_ADMIN, so only a root supervisor offers it.
/// A `mem` appliance with a cache budget gets none: writes through passthrough would
/// grow its memfds past the budget without asking it.
fn offers_backing_files(req: &MountRequest) -> bool {
    matches!(
        req.backend,
        BackendSpec::Mem { .. } | BackendSpec::Passthrough { .. }
    ) && req.passthrough
        && rustix::process::geteuid().is_root()
        && !(matches!(req.backend, BackendSpec::Mem { .. }) && req.cache_budget.is_some())
}

/// The watch of a shared passthrough export, where one can be set up (`None` for
/// any other backend, an `--exclusive` export, a VM appliance, or where fanotify
/// refuses: the appliance then keeps the kernel's timeouts short).
fn watch_export(req: &MountRequest) -> Option<crate::host_watch::HostWatch> {
    let BackendSpec::Passthrough {
        path,
        exclusive: false,
    } = &req.backend
    else {
        return None;
    };
    if req.vm.is_some() {
        return None;
    }
    match crate::host_watch::HostWatch::start(path) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::info!(export = %path.display(), error = %e, "changes made beside the mount are not watched; the kernel trusts what it caches for 1 s");
            None
        }
    }
}

/// How file data moves, and how long the kernel trusts what it caches, as `fsva
/// status` says it.
fn data_path(req: &MountRequest, watched: bool) -> String {
    let path = data_path_alone(req);
    match &req.backend {
        BackendSpec::Passthrough {
            exclusive: false, ..
        } if watched => format!(
            "{path}; changes beside the mount are watched, so entries and attributes are cached 60 s"
        ),
        BackendSpec::Passthrough {
            exclusive: false, ..
        } => format!("{path}; changes beside the mount are not watched: entries and attributes are cached 1 s"),
        _ => path,
    }
}

fn data_path_alone(req: &MountRequest) -> String {
    if offers_backing_files(req) {
        match req.backend {
            BackendSpec::Passthrough { .. } => {
                "FUSE passthrough: the kernel reads and writes the export's files directly".into()
            }
            BackendSpec::Mem { .. } => {
                "FUSE passthrough: the kernel reads and writes mem's memfds directly".into()
            }
            BackendSpec::Image { .. } => "through the VM appliance".into(),
        }
    } else if req.vm.is_some() {
        "through the VM appliance".into()
    } else if !req.passthrough {
        "through the appliance (passthrough turned off)".into()
    } else if req.cache_budget.is_some() {
        "through the appliance (mem with a cache budget accounts every write itself)".into()
    } else if !rustix::process::geteuid().is_root() {
        "through the appliance (FUSE passthrough needs a root supervisor)".into()
    } else {
        "through the appliance".into()
    }
}

/// After unmount the appliance sees ENODEV on every channel and exits on its own;
/// give it a moment to flush, then make sure.
fn finish_appliance(appliance: &Appliance, alive: bool, vm: bool) {
    if alive {
        stop_appliance(appliance.pid, appliance.killer(), vm);
    }
}

/// Waits for an appliance whose channel has closed to exit (a VM appliance syncs,
/// unmounts its disk and powers off first, which under emulation takes a while), and
/// kills it if it does not.
pub(crate) fn stop_appliance(pid: u32, kill: impl Fn(), vm: bool) {
    let grace = if vm {
        VM_STOP_GRACE
    } else {
        Duration::from_secs(10)
    };
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::warn!(
        pid,
        "appliance did not exit after its channel closed; killing it"
    );
    kill();
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Removes a mount's runtime files when the supervisor ends.
struct RuntimeFiles(registry::Entry);

impl Drop for RuntimeFiles {
    fn drop(&mut self) {
        self.0.remove();
    }
}

/// Removes the mount if set-up fails half way.
struct MountGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = mount::unmount(&self.path, true) {
                tracing::error!(error = %e, "could not remove the mount after a failure");
            }
        }
    }
}

/// Waits until the new mount answers a stat, or the appliance exits, or `timeout`.
fn wait_until_answering(
    path: &Path,
    timeout: Duration,
    exited: &std::sync::Mutex<Option<String>>,
) -> Result<(), SupervisorError> {
    let (tx, rx) = mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::metadata(&p));
    });
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => {
                // Most often the appliance died and INIT failed: say so if it did.
                let until = std::time::Instant::now() + Duration::from_secs(1);
                while std::time::Instant::now() < until {
                    if let Some(status) = exited.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                        return Err(SupervisorError::ApplianceExited(status));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                return Err(io_err(format!("checking the new mount {}", path.display()))(e));
            }
            Err(_) => {
                if let Some(status) = exited.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                    return Err(SupervisorError::ApplianceExited(status));
                }
                if std::time::Instant::now() >= deadline {
                    return Err(SupervisorError::NotAnswering(path.to_path_buf(), timeout));
                }
            }
        }
    }
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this thread and every thread it starts later, so
/// that only the signal thread receives them (via sigwait).
pub(crate) fn block_termination_signals() {
    let set = termination_set();
    // SAFETY: pthread_sigmask reads a valid, initialised sigset_t.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

pub(crate) fn wait_termination_signal() -> i32 {
    let set = termination_set();
    let mut sig = 0;
    // SAFETY: sigwait reads a valid sigset_t and writes one int.
    unsafe {
        libc::sigwait(&set, &mut sig);
    }
    sig
}
