//! `fsva __appliance`: the appliance process. Started by a supervisor with a control
//! link; receives its configuration and channel descriptors, enters its sandbox, builds
//! the backend and serves until every channel is closed.
//!
//! It must stay single-threaded until the sandbox is entered (namespaces are created
//! with a fork-like clone), and it must never outlive its supervisor.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use fsva_appliance::{Server, SessionConfig};
use fsva_channel::fusedev::FuseDev;
use fsva_channel::stream::StreamChannel;
use fsva_channel::Channel;
use fsva_control::{
    ApplianceStats, BackendSpec, BrokerReply, BrokerRequest, ChannelKind, KeeperMessage, Link,
    SandboxKind, StartConfig, ToAppliance, ToSupervisor,
};
use fsva_sandbox::{RootSpec, SandboxConfig, SeccompMode};
use rustix::fs::{Mode, OFlags};

pub fn run(args: crate::cli::ApplianceArgs) -> anyhow::Result<ExitCode> {
    // SAFETY: the supervisor passed this descriptor number for our exclusive use and
    // left it open across exec; nothing else in this process owns it.
    let link = Link::from_fd(unsafe { OwnedFd::from_raw_fd(args.control_fd) });
    let (msg, fds) = link
        .recv::<ToAppliance>()
        .context("receiving the start message")?;
    let (config, journaled) = match msg {
        ToAppliance::Start(config) => (config, false),
        ToAppliance::StartJournaled(config) => (config, true),
        other => anyhow::bail!("the supervisor did not start with a Start message: {other:?}"),
    };
    super::init_logging(&config.log_filter);
    if config.sandbox == SandboxKind::Vm || matches!(config.backend, BackendSpec::Image { .. }) {
        return Ok(fail_code(
            &link,
            "disk images are served by VM appliances (fsva mount --vm), not appliance processes"
                .into(),
        ));
    }
    let code = match config.sandbox {
        SandboxKind::Vm => unreachable!("refused above"),
        SandboxKind::None => {
            let root = open_export(&config.backend)?;
            serve(&config, journaled, &link, fds, root, None)
        }
        SandboxKind::Namespaces => {
            let sandbox = sandbox_config(&config);
            let result = fsva_sandbox::run_sandboxed(&sandbox, |inside| {
                let root = match open_export_inside(&config.backend) {
                    Ok(r) => r,
                    Err(e) => return fail(&link, format!("{e:#}")),
                };
                serve(&config, journaled, &link, fds, root, inside.proc_self_fd)
            });
            match result {
                Ok(code) => code,
                Err(e) => {
                    return Ok(fail_code(
                        &link,
                        format!("entering the sandbox failed: {e}"),
                    ))
                }
            }
        }
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

fn fail_code(link: &Link, message: String) -> ExitCode {
    ExitCode::from(fail(link, message) as u8)
}

fn fail(link: &Link, message: String) -> i32 {
    tracing::error!("{message}");
    let _ = link.send(&ToSupervisor::Failed { message }, &[]);
    1
}

/// Says the predecessor's state cannot be rebuilt (the supervisor then starts a fresh
/// file system instead of trying another successor).
fn refuse_state(link: &Link, message: String) -> i32 {
    tracing::error!("{message}");
    let _ = link.send(&ToSupervisor::StateRefused { message }, &[]);
    1
}

fn sandbox_config(config: &StartConfig) -> SandboxConfig {
    let (root, caps, proc_fd) = match &config.backend {
        BackendSpec::Mem { .. } | BackendSpec::Image { .. } => (RootSpec::Empty, Vec::new(), false),
        BackendSpec::Passthrough { path, .. } => (
            RootSpec::Export {
                path: path.clone(),
                read_only: false,
            },
            SandboxConfig::file_server_caps(),
            true,
        ),
    };
    let mut c = SandboxConfig::new(root);
    c.keep_caps = caps;
    c.open_proc_self_fd = proc_fd;
    // Every appliance, root's passthrough included, lives in its own user namespace
    // (root's maps every id onto itself, so ownership works as on the host). What needs
    // a capability the host honours — device nodes, backing files — the supervisor's
    // broker does after checking it. File capabilities are never kept: in a namespace
    // whose root is the host's root, an appliance must not mint privileged binaries.
    c.keep_caps
        .retain(|cap| *cap != fsva_sandbox::Capability::Setfcap);
    if let ChannelKind::Vhost { .. } = config.channel {
        // The device accepts its VMM's connection on the listening socket passed in.
        // No socket can be created or bound, so this takes only what the supervisor's
        // socket receives.
        c.extra_syscalls
            .push(fsva_sandbox::Syscall::new("accept4", libc::SYS_accept4));
    }
    c.seccomp = match std::env::var("FSVA_SECCOMP").as_deref() {
        Ok("log") => SeccompMode::Log,
        Ok("off") => SeccompMode::Off,
        _ => SeccompMode::Kill,
    };
    c
}

fn open_dir(path: &std::path::Path) -> anyhow::Result<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening the export {}", path.display()))
}

fn open_export(backend: &BackendSpec) -> anyhow::Result<Option<OwnedFd>> {
    match backend {
        BackendSpec::Passthrough { path, .. } => open_dir(path).map(Some),
        BackendSpec::Mem { .. } | BackendSpec::Image { .. } => Ok(None),
    }
}

/// Inside the sandbox the export is `/`.
fn open_export_inside(backend: &BackendSpec) -> anyhow::Result<Option<OwnedFd>> {
    match backend {
        BackendSpec::Passthrough { .. } => open_dir(std::path::Path::new("/")).map(Some),
        BackendSpec::Mem { .. } | BackendSpec::Image { .. } => Ok(None),
    }
}

/// The appliance's side of the supervisor's privilege broker (`fsva_supervisor::broker`):
/// backing-file registration and device nodes, one request at a time.
struct SupervisorBroker {
    link: std::sync::Mutex<Link>,
}

impl SupervisorBroker {
    fn call(
        &self,
        request: &BrokerRequest,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> std::io::Result<BrokerReply> {
        let link = self.link.lock().unwrap_or_else(|p| p.into_inner());
        link.send(request, fds).map_err(std::io::Error::other)?;
        match link.recv::<BrokerReply>().map_err(std::io::Error::other)? {
            (BrokerReply::Refused { errno, reason }, _) => {
                tracing::debug!(?request, reason, "the supervisor refused");
                Err(std::io::Error::from_raw_os_error(errno))
            }
            (reply, _) => Ok(reply),
        }
    }
}

impl SupervisorBroker {
    /// Sends a request the broker does not answer.
    fn tell(&self, request: &BrokerRequest) {
        let link = self.link.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = link.send(request, &[]) {
            tracing::debug!(?request, error = %e, "the supervisor did not take a message");
        }
    }
}

impl fsva_appliance::BackingFiles for SupervisorBroker {
    fn open(&self, file: std::os::fd::BorrowedFd<'_>) -> std::io::Result<i32> {
        match self.call(&BrokerRequest::OpenBacking, &[file])? {
            BrokerReply::BackingOpened { id } => Ok(id),
            other => Err(std::io::Error::other(format!("unexpected reply {other:?}"))),
        }
    }

    /// One way: the broker answers nothing, and a release need not wait for it.
    fn close(&self, id: i32) {
        self.tell(&BrokerRequest::CloseBacking { id });
    }

    fn open_spares(
        &self,
        files: &[std::os::fd::BorrowedFd<'_>],
        claimed: &[i32],
    ) -> std::io::Result<Vec<std::io::Result<i32>>> {
        let request = BrokerRequest::OpenSpares {
            claimed: claimed.to_vec(),
        };
        match self.call(&request, files)? {
            BrokerReply::SparesOpened { ids } => Ok(ids
                .into_iter()
                .map(|id| match id {
                    id if id >= 0 => Ok(id),
                    errno => Err(std::io::Error::from_raw_os_error(-errno)),
                })
                .collect()),
            other => Err(std::io::Error::other(format!("unexpected reply {other:?}"))),
        }
    }
}

/// The appliance's end of the keeper link (`fsva_supervisor::keeper`): descriptors
/// (mem's memfds, passthrough's open files) and checkpoints handed to the supervisor
/// for a successor, one way.
struct SupervisorKeeper {
    link: std::sync::Mutex<Link>,
    /// Set once a send failed (the supervisor is gone): said once, not per file.
    broken: std::sync::atomic::AtomicBool,
}

impl SupervisorKeeper {
    fn send(
        &self,
        msg: &KeeperMessage,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> std::io::Result<()> {
        let link = self.link.lock().unwrap_or_else(|p| p.into_inner());
        let sent = link.send(msg, fds).map_err(std::io::Error::other);
        if let Err(e) = &sent {
            if !self.broken.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::error!(error = %e, "the supervisor no longer keeps what a successor needs");
            }
        }
        sent
    }
}

impl fsva_appliance::Keeper for SupervisorKeeper {
    fn keep(&self, id: u64, fd: std::os::fd::BorrowedFd<'_>) {
        let _ = self.send(&KeeperMessage::Keep { id }, &[fd]);
    }

    fn release(&self, id: u64) {
        let _ = self.send(&KeeperMessage::Release { id }, &[]);
    }

    fn store_checkpoint(&self, state: &[u8], boundary: u64) -> std::io::Result<()> {
        use std::os::fd::AsFd;
        let blob = fsva_control::blob::seal(state)?;
        self.send(&KeeperMessage::Checkpoint { boundary }, &[blob.as_fd()])
    }
}

impl fsva_backend_passthrough::DeviceNodes for SupervisorBroker {
    fn make_device(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u64,
        gid: u32,
    ) -> std::io::Result<()> {
        let request = BrokerRequest::MakeDevice {
            name: name.to_vec(),
            mode,
            umask,
            rdev,
            gid,
        };
        match self.call(&request, &[dir])? {
            BrokerReply::DeviceMade => Ok(()),
            other => Err(std::io::Error::other(format!("unexpected reply {other:?}"))),
        }
    }
}

/// What a journaled appliance has of its supervisor's safe-keeping.
struct Kept {
    journal: Arc<fsva_appliance::journal::Journal>,
    keeper: Arc<SupervisorKeeper>,
}

fn serve(
    config: &StartConfig,
    journaled: bool,
    link: &Link,
    mut fds: Vec<OwnedFd>,
    root: Option<OwnedFd>,
    proc_self_fd: Option<OwnedFd>,
) -> i32 {
    let kept = if journaled {
        let (Some(journal), Some(keeper)) = (fds.pop(), fds.pop()) else {
            return fail(
                link,
                "the journal and keeper link were announced but not passed".into(),
            );
        };
        match fsva_appliance::journal::Journal::open(journal) {
            Ok(j) => Some(Kept {
                journal: Arc::new(j),
                keeper: Arc::new(SupervisorKeeper {
                    link: std::sync::Mutex::new(Link::from_fd(keeper)),
                    broken: Default::default(),
                }),
            }),
            Err(e) => return fail(link, format!("{e}")),
        }
    } else {
        None
    };
    let broker = if config.broker_link {
        match fds.pop() {
            Some(fd) => Some(Arc::new(SupervisorBroker {
                link: std::sync::Mutex::new(Link::from_fd(fd)),
            })),
            None => return fail(link, "the broker link was announced but not passed".into()),
        }
    } else {
        None
    };
    let backing = broker
        .clone()
        .filter(|_| config.backing_files)
        .map(|b| b as Arc<dyn fsva_appliance::BackingFiles>);
    let device_nodes = broker
        .filter(|_| config.device_nodes)
        .map(|b| b as Arc<dyn fsva_backend_passthrough::DeviceNodes>);
    // What this appliance starts from: nothing, a predecessor's snapshot (restart
    // without a journal), or what a journaled predecessor left.
    let mut runtime_state = None;
    let mut runtime_records = Vec::new();
    let start = match (&kept, config.restore) {
        (None, false) => crate::backends::Start::Fresh,
        (Some(k), false) => crate::backends::Start::Journaled {
            journal: k.journal.clone(),
            keeper: k.keeper.clone(),
            from: crate::backends::Journaled::Empty,
        },
        (None, true) => {
            if link.send(&ToSupervisor::AwaitingState, &[]).is_err() {
                return 1;
            }
            match receive_state(link) {
                Ok((backend, runtime)) => {
                    runtime_state = Some(runtime);
                    crate::backends::Start::Snapshot(backend)
                }
                Err(e) => return fail(link, format!("receiving the predecessor's state: {e:#}")),
            }
        }
        (Some(k), true) => {
            if link.send(&ToSupervisor::AwaitingState, &[]).is_err() {
                return 1;
            }
            match receive_recovery(link, &config.backend, &k.journal) {
                Ok(r) => {
                    runtime_state = r.runtime;
                    runtime_records = r.runtime_records;
                    crate::backends::Start::Journaled {
                        journal: k.journal.clone(),
                        keeper: k.keeper.clone(),
                        from: r.backend,
                    }
                }
                Err(e) => return refuse_state(link, format!("{e:#}")),
            }
        }
    };
    let restarted = config.restore;
    let rebuilding = kept.is_some() && restarted;
    // A vhost-user device may be the destination of a guest's migration: it then
    // builds its backend again, from the state the source sent, with the same export.
    let rebuild = match config.channel {
        ChannelKind::Vhost { .. } => {
            match Rebuild::new(config, &root, &proc_self_fd, &device_nodes) {
                Ok(r) => Some(r),
                Err(e) => return fail(link, format!("{e:#}")),
            }
        }
        _ => None,
    };
    let fs = match crate::backends::build(
        &config.backend,
        root,
        proc_self_fd,
        device_nodes,
        config.host_watched,
        start,
    ) {
        Ok(fs) => fs,
        Err(e) if rebuilding => return refuse_state(link, format!("{e:#}")),
        Err(e) => return fail(link, format!("{e:#}")),
    };
    // mem's new files take memfds registered as backing files ahead, so creating one
    // costs no round trip to the supervisor (see fsva_appliance::spares).
    let backing = match (backing, &config.backend) {
        (Some(b), BackendSpec::Mem { .. }) => match fsva_appliance::SpareBackings::start(b.clone())
        {
            Ok(spares) => {
                fs.take_memfds_from(spares.clone());
                Some(spares as Arc<dyn fsva_appliance::BackingFiles>)
            }
            Err(e) => {
                tracing::warn!(error = %e, "no spare backing files; new files register on first open");
                Some(b)
            }
        },
        (b, _) => b,
    };
    let mut vhost_listener = None;
    let channels: Vec<Arc<dyn Channel>> = match config.channel {
        ChannelKind::Vhost { .. } => {
            let Some(fd) = fds.into_iter().next() else {
                return fail(link, "no vhost-user socket was passed".into());
            };
            vhost_listener = Some(std::os::unix::net::UnixListener::from(fd));
            Vec::new()
        }
        ChannelKind::Fusedev => fds
            .into_iter()
            .map(|fd| Arc::new(FuseDev::new(fd)) as Arc<dyn Channel>)
            .collect(),
        ChannelKind::Stream => {
            let Some(fd) = fds.into_iter().next() else {
                return fail(link, "no stream socket was passed".into());
            };
            match StreamChannel::new(UnixStream::from(fd)) {
                Ok(c) => vec![Arc::new(c) as Arc<dyn Channel>],
                Err(e) => return fail(link, format!("stream channel: {e}")),
            }
        }
    };
    if channels.is_empty() && vhost_listener.is_none() {
        return fail(link, "no channel descriptors were passed".into());
    }
    if let Some(bytes) = config.cache_budget {
        fs.set_cache_budget(bytes);
    }
    let control_fs = fs.clone();
    let journal = kept.as_ref().map(|k| k.journal.clone());
    // A predecessor that died before its first checkpoint left no runtime state, but
    // its runtime records (backing ids its open files hold) still count: without them
    // a new open of such a file would register a second backing file for the inode,
    // which the kernel refuses (EIO).
    let empty_state = (runtime_state.is_none() && !runtime_records.is_empty()).then(|| {
        fsva_appliance::state::StateV2 {
            session: None,
            backing: Vec::new(),
            backend: Vec::new(),
            journal_boundary: 0,
        }
    });
    let server = Arc::new(
        match runtime_state.as_ref().or(empty_state.as_ref()) {
            Some(state) => Server::restored(
                fs,
                SessionConfig::default(),
                backing,
                journal,
                state,
                &runtime_records,
            ),
            None => Server::new(fs, SessionConfig::default(), backing, journal),
        }
        // The supervisor's relay answers the GETATTR after a directory change itself.
        .with_dir_hints(config.dir_hints),
    );
    if let (Some(k), true) = (&kept, restarted) {
        // No checkpoint held the session (the predecessor died before its first one
        // after INIT): the journal's header does.
        match k.journal.session() {
            Some(s) => server.adopt_session(s),
            None if runtime_state.as_ref().is_some_and(|s| s.session.is_some()) => {}
            None => {
                return fail(
                    link,
                    "the predecessor's FUSE session is recorded nowhere: cannot take over".into(),
                )
            }
        }
    }
    let stats = server.stats();
    if link
        .send(
            &ToSupervisor::Ready {
                pid: std::process::id(),
            },
            &[],
        )
        .is_err()
    {
        return 1;
    }
    if restarted {
        // A successor serves only once its predecessor is gone and the kernel has
        // queued again what that one held (see fsva_supervisor's restart).
        match link.recv::<ToAppliance>() {
            Ok((ToAppliance::Resume, _)) => {
                if link.send(&ToSupervisor::Resumed, &[]).is_err() {
                    return 1;
                }
            }
            other => return fail(link, format!("expected the go-ahead, got {other:?}")),
        }
    }
    if let Some(k) = &kept {
        server.start_checkpointer(k.keeper.clone());
    }
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // Answer the supervisor until it goes away.
            while let Ok((request, _)) = link.recv::<ToAppliance>() {
                let reply = match request {
                    ToAppliance::Stats => {
                        let (requests, errors) = stats.snapshot();
                        ToSupervisor::Stats(ApplianceStats {
                            requests,
                            errors,
                            passthrough_files: server.passthrough_files() as u64,
                        })
                    }
                    ToAppliance::SetCacheBudget { bytes } => {
                        control_fs.set_cache_budget(bytes);
                        ToSupervisor::CacheBudgetSet
                    }
                    ToAppliance::HostChanged(changes) => {
                        ToSupervisor::Invalidations(invalidations(&*control_fs, &changes))
                    }
                    ToAppliance::Sync => {
                        match control_fs.syncfs(&fsva_appliance::Context::default()) {
                            Ok(()) => ToSupervisor::Synced,
                            Err(e) => ToSupervisor::Failed {
                                message: format!("syncfs on the export: {e}"),
                            },
                        }
                    }
                    ToAppliance::Checkpoint => match server.checkpoint() {
                        Ok((bytes, fds)) => {
                            // The reply and the descriptors are sent here; nothing more.
                            if let Err(e) = send_state(link, &bytes, &fds) {
                                tracing::error!(error = %e, "sending the checkpoint failed");
                                server.resume();
                            }
                            continue;
                        }
                        Err(e) => ToSupervisor::Failed {
                            message: e.to_string(),
                        },
                    },
                    ToAppliance::CheckpointForTransfer => {
                        match transfer_checkpoint(&server, &config.backend) {
                            Ok((bytes, fds)) => {
                                if let Err(e) = send_state(link, &bytes, &fds) {
                                    tracing::error!(error = %e, "sending the checkpoint failed");
                                    server.resume();
                                }
                                continue;
                            }
                            Err(e) => ToSupervisor::Failed {
                                message: format!("{e:#}"),
                            },
                        }
                    }
                    ToAppliance::CheckpointNow => match &kept {
                        Some(k) => match server.journal_checkpoint(&*k.keeper) {
                            Ok(boundary) => ToSupervisor::CheckpointTaken { boundary },
                            Err(e) => ToSupervisor::Failed {
                                message: e.to_string(),
                            },
                        },
                        None => ToSupervisor::Failed {
                            message: "this appliance keeps no recovery journal".into(),
                        },
                    },
                    ToAppliance::Resume => {
                        server.resume();
                        ToSupervisor::Resumed
                    }
                    ToAppliance::Start(_)
                    | ToAppliance::StartJournaled(_)
                    | ToAppliance::Restore { .. }
                    | ToAppliance::Recover { .. }
                    | ToAppliance::KeptFds { .. }
                    | ToAppliance::Preload { .. }
                    | ToAppliance::StateFds => ToSupervisor::Failed {
                        message: "already started".into(),
                    },
                    ToAppliance::SetClock { .. } => ToSupervisor::Failed {
                        message: "an appliance process shares the host's clock".into(),
                    },
                };
                if link.send(&reply, &[]).is_err() {
                    break;
                }
            }
        });
        let ok = match (vhost_listener, config.channel) {
            (Some(listener), ChannelKind::Vhost { request_queues }) => {
                let inline = Arc::new(InlineServer {
                    server: std::sync::RwLock::new(server.clone()),
                    rebuild: rebuild.expect("made for every vhost channel"),
                });
                serve_vhost(inline, listener, config.vhost_tag.clone(), request_queues)
            }
            _ => {
                let result = server.serve(channels, config.workers_per_channel as usize);
                if let Err(e) = &result {
                    tracing::error!(error = %e, "channel failed");
                }
                result.is_ok()
            }
        };
        // The mount is gone; nothing else will come. Exit without waiting for the
        // control thread, which may be blocked on the supervisor.
        std::process::exit(if ok { 0 } else { 1 });
    })
}

/// The nodes the kernel knows among `changes`; objects it does not know are nobody's
/// concern here.
fn invalidations(
    fs: &dyn fsva_appliance::Filesystem,
    changes: &fsva_control::HostChanges,
) -> fsva_control::Invalidations {
    let entries = changes
        .entries
        .iter()
        .filter_map(|(dev, ino, name)| Some((fs.node_of_host_object(*dev, *ino)?, name.clone())))
        .collect();
    let nodes = changes
        .objects
        .iter()
        .filter_map(|(dev, ino)| fs.node_of_host_object(*dev, *ino))
        .collect();
    fsva_control::Invalidations { entries, nodes }
}

/// What a successor rebuilds from after a journaled predecessor: the runtime's part of
/// the checkpoint and its journal records, and the backend's start.
struct RecoveryInput {
    runtime: Option<fsva_appliance::state::StateV2>,
    runtime_records: Vec<fsva_appliance::backing::RuntimeRecordV1>,
    backend: crate::backends::Journaled,
}

/// A checkpoint's runtime part and its backend part restored ahead of need.
struct Preloaded {
    state: Option<fsva_appliance::state::StateV2>,
    backend: crate::backends::Preloaded,
}

/// Serves `Preload`s (a spare's head start: checkpoint and kept descriptors taken in
/// while the predecessor still serves) until `Recover` comes, then reads the journal
/// records after the checkpoint. Anything that does not hold together is an error: the
/// supervisor then starts a fresh appliance instead.
fn receive_recovery(
    link: &Link,
    spec: &BackendSpec,
    journal: &fsva_appliance::journal::Journal,
) -> anyhow::Result<RecoveryInput> {
    use fsva_appliance::backing::RuntimeRecord;
    use fsva_appliance::journal::{BACKEND, RUNTIME};
    let mut preloaded: Option<Preloaded> = None;
    loop {
        let (msg, mut attached) = link.recv::<ToAppliance>()?;
        let (checkpoint, count, recover) = match msg {
            ToAppliance::Preload { checkpoint, fds } => (checkpoint, fds, false),
            ToAppliance::Recover { fresh: true, .. } => {
                // The state is lost; numbers above anything the old one can have used.
                journal.clear();
                return Ok(RecoveryInput {
                    runtime: None,
                    runtime_records: Vec::new(),
                    backend: crate::backends::Journaled::AfterLoss(1 << 48),
                });
            }
            ToAppliance::Recover {
                checkpoint, fds, ..
            } => (checkpoint, fds, true),
            other => anyhow::bail!("expected the predecessor's state, got {other:?}"),
        };
        let state = if checkpoint {
            let blob = attached
                .pop()
                .context("the checkpoint was announced but not attached")?;
            let bytes = fsva_control::blob::read(blob).context("reading the checkpoint")?;
            Some(
                fsva_appliance::state::ApplianceState::decode(&bytes)
                    .context("the last checkpoint")?
                    .into_latest(),
            )
        } else {
            None
        };
        let fds = receive_kept(link, count)?;
        let backend_part = state.as_ref().map(|s| s.backend.as_slice());
        match &mut preloaded {
            Some(p) => {
                p.backend.add_fds(fds);
                if state.is_some() {
                    p.backend.reload(backend_part)?;
                    p.state = state;
                }
            }
            None => {
                let backend = crate::backends::preload(spec, backend_part, fds)?;
                preloaded = Some(Preloaded { state, backend });
            }
        }
        if !recover {
            link.send(&ToSupervisor::Preloaded, &[])?;
            continue;
        }
        let Some(Preloaded { state, backend }) = preloaded else {
            unreachable!("set just above");
        };
        let boundary = state.as_ref().map_or(0, |s| s.journal_boundary);
        let t0 = std::time::Instant::now();
        let records = journal.recover(boundary)?;
        tracing::debug!(scan_us = t0.elapsed().as_micros() as u64, "journal read");
        let mut runtime_records = Vec::new();
        let mut backend_records = Vec::new();
        for r in records {
            match r.payload.split_first() {
                Some((&RUNTIME, rest)) => runtime_records.push(
                    RuntimeRecord::decode(rest)
                        .with_context(|| format!("journal record {}", r.seq))?,
                ),
                Some((&BACKEND, rest)) => backend_records.push(rest.to_vec()),
                _ => anyhow::bail!("journal record {} has no known tag", r.seq),
            }
        }
        tracing::info!(
            boundary,
            records = backend_records.len() + runtime_records.len(),
            "rebuilding the predecessor's state"
        );
        return Ok(RecoveryInput {
            runtime: state,
            runtime_records,
            backend: crate::backends::Journaled::Recover {
                preloaded: Box::new(backend),
                records: backend_records,
            },
        });
    }
}

/// Receives `count` kept descriptors in `KeptFds` batches, by id.
fn receive_kept(
    link: &Link,
    count: u32,
) -> anyhow::Result<std::collections::HashMap<u64, OwnedFd>> {
    let mut fds = std::collections::HashMap::with_capacity(count as usize);
    let mut got = 0usize;
    while got < count as usize {
        let (m, batch) = link.recv::<ToAppliance>()?;
        let ToAppliance::KeptFds { ids } = m else {
            anyhow::bail!("expected kept descriptors, got {m:?}");
        };
        anyhow::ensure!(
            ids.len() == batch.len() && !batch.is_empty() && got + batch.len() <= count as usize,
            "a batch of {} ids came with {} descriptors",
            ids.len(),
            batch.len()
        );
        got += batch.len();
        fds.extend(ids.into_iter().zip(batch));
    }
    Ok(fds)
}

/// Sends a checkpoint: `Checkpointed` with the sealed state, then its descriptors.
fn send_state(
    link: &Link,
    bytes: &[u8],
    fds: &[fsva_appliance::state::StateFd],
) -> anyhow::Result<()> {
    use std::os::fd::AsFd;
    let blob = fsva_control::blob::seal(bytes).context("sealing the state")?;
    link.send(
        &ToSupervisor::Checkpointed {
            fds: fds.len() as u32,
        },
        &[blob.as_fd()],
    )?;
    for batch in fds.chunks(fsva_control::FDS_PER_MESSAGE) {
        let batch: Vec<_> = batch.iter().map(|f| f.as_fd()).collect();
        link.send(&ToSupervisor::StateFds, &batch)?;
    }
    Ok(())
}

/// Receives a predecessor's state after `Start`: the backend's part (with its
/// descriptors) and the runtime's.
fn receive_state(
    link: &Link,
) -> anyhow::Result<(
    fsva_appliance::state::BackendState,
    fsva_appliance::state::StateV2,
)> {
    let (msg, mut blob) = link.recv::<ToAppliance>()?;
    let ToAppliance::Restore { fds: count } = msg else {
        anyhow::bail!("expected the state, got {msg:?}");
    };
    let blob = blob.pop().context("the state came without its blob")?;
    let bytes = fsva_control::blob::read(blob).context("reading the state")?;
    let state = fsva_appliance::state::ApplianceState::decode(&bytes)?.into_latest();
    let mut fds = Vec::with_capacity(count as usize);
    while fds.len() < count as usize {
        let (m, batch) = link.recv::<ToAppliance>()?;
        anyhow::ensure!(
            matches!(m, ToAppliance::StateFds) && !batch.is_empty(),
            "expected the state's descriptors, got {m:?}"
        );
        fds.extend(batch);
    }
    let backend = fsva_appliance::state::BackendState {
        bytes: state.backend.clone(),
        fds: fds
            .into_iter()
            .map(fsva_appliance::state::StateFd::Owned)
            .collect(),
    };
    Ok((backend, state))
}

/// Pauses the server and takes its state for a transfer that carries bytes only;
/// resumes it if that fails.
fn transfer_checkpoint(
    server: &Server,
    spec: &BackendSpec,
) -> anyhow::Result<(Vec<u8>, Vec<fsva_appliance::state::StateFd>)> {
    // The supervisor refuses this too, but counts a new file's spare backing id only
    // once told of its claim (within a second): the appliance knows at once.
    let open = server.passthrough_files();
    if matches!(spec, BackendSpec::Mem { .. }) && open > 0 {
        anyhow::bail!(
            "{open} file(s) are open through FUSE passthrough, whose data the kernel writes on this host directly: close them, or mount with --no-passthrough to migrate mem"
        );
    }
    let (bytes, fds) = server.checkpoint()?;
    crate::backends::transferable(spec, bytes, fds).inspect_err(|_| server.resume())
}

/// What building the backend again from a received state needs: the spec and
/// duplicates of what the first build consumed.
struct Rebuild {
    spec: BackendSpec,
    root: Option<OwnedFd>,
    proc_self_fd: Option<OwnedFd>,
    device_nodes: Option<Arc<dyn fsva_backend_passthrough::DeviceNodes>>,
    cache_budget: Option<u64>,
}

impl Rebuild {
    fn new(
        config: &StartConfig,
        root: &Option<OwnedFd>,
        proc_self_fd: &Option<OwnedFd>,
        device_nodes: &Option<Arc<dyn fsva_backend_passthrough::DeviceNodes>>,
    ) -> anyhow::Result<Rebuild> {
        let dup = |fd: &Option<OwnedFd>| {
            fd.as_ref()
                .map(|f| f.try_clone())
                .transpose()
                .context("keeping the export for a migration's restore")
        };
        Ok(Rebuild {
            spec: config.backend.clone(),
            root: dup(root)?,
            proc_self_fd: dup(proc_self_fd)?,
            device_nodes: device_nodes.clone(),
            cache_budget: config.cache_budget,
        })
    }

    /// A server restored from `incoming` (the state a migration's source sent).
    fn server(&self, incoming: fsva_vhost::Incoming) -> anyhow::Result<Server> {
        use fsva_appliance::state::{ApplianceState, BackendState, StateFd};
        let state = ApplianceState::decode(&incoming.state)
            .context("the received state")?
            .into_latest();
        let backend = BackendState {
            bytes: state.backend.clone(),
            fds: incoming.files.into_iter().map(StateFd::Owned).collect(),
        };
        let dup = |fd: &Option<OwnedFd>| fd.as_ref().map(|f| f.try_clone()).transpose();
        let fs = crate::backends::build(
            &self.spec,
            dup(&self.root)?,
            dup(&self.proc_self_fd)?,
            self.device_nodes.clone(),
            false,
            crate::backends::Start::Snapshot(backend),
        )?;
        if let Some(bytes) = self.cache_budget {
            fs.set_cache_budget(bytes);
        }
        Ok(Server::restored(
            fs,
            SessionConfig::default(),
            None,
            None,
            &state,
            &[],
        ))
    }
}

/// The appliance's dispatcher as the vhost-user-fs device's inline route, and its side
/// of a guest's migration: the state of the dispatcher (session included) and backend
/// saved into, or replaced by, what the VMM moves.
struct InlineServer {
    server: std::sync::RwLock<Arc<Server>>,
    rebuild: Rebuild,
}

impl InlineServer {
    fn current(&self) -> Arc<Server> {
        self.server
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl fsva_vhost::Inline for InlineServer {
    fn answer<'r>(
        &self,
        frame: &[u8],
        reply: &'r mut fsva_protocol::reply::ReplyBuf,
    ) -> Option<&'r [u8]> {
        self.server
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .answer(frame, reply)
    }
}

impl fsva_vhost::DeviceState for InlineServer {
    fn save(&self) -> Result<fsva_vhost::Saved, String> {
        let (state, fds) = transfer_checkpoint(&self.current(), &self.rebuild.spec)
            .map_err(|e| format!("{e:#}"))?;
        Ok(fsva_vhost::Saved {
            state,
            files: fds
                .into_iter()
                .map(|f| Box::new(f) as Box<dyn std::os::fd::AsFd + Send>)
                .collect(),
        })
    }

    fn resume(&self) {
        self.current().resume();
    }

    fn load(&self, incoming: fsva_vhost::Incoming) -> Result<(), String> {
        let t0 = std::time::Instant::now();
        let restored = self
            .rebuild
            .server(incoming)
            .map_err(|e| format!("{e:#}"))?;
        *self.server.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(restored);
        tracing::info!(
            restore_us = t0.elapsed().as_micros() as u64,
            "took over the migration source's state"
        );
        Ok(())
    }
}

/// Serves one VMM on `listener` as a vhost-user-fs device until it disconnects.
fn serve_vhost(
    inline: Arc<InlineServer>,
    listener: std::os::unix::net::UnixListener,
    tag: Option<String>,
    request_queues: u16,
) -> bool {
    let device = match fsva_vhost::DeviceConfig::new(tag, request_queues) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "bad vhost-user-fs device configuration");
            return false;
        }
    };
    let server = fsva_vhost::Server::inline(device, inline.clone());
    server.set_device_state(inline.clone());
    let served = server.serve(fsva_vhost::Listener::from(listener));
    inline.current().finish();
    match served {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "vhost-user-fs device failed");
            false
        }
    }
}
