//! `fsva serve-vhost`: one appliance served to a VM guest as a vhost-user-fs device.
//!
//! The same appliance as for a host mount (sandboxed process or VM appliance, any
//! backend) is started on a stream channel; the device (`fsva-vhost`) relays the
//! guest's virtqueues to it. The socket listens before the appliance starts, so a VMM
//! may connect at once. Service ends when the VMM disconnects (the guest powered off)
//! or on SIGINT/SIGTERM/SIGHUP; either way the appliance's stream is closed so it
//! syncs and exits (a VM appliance unmounts its disk and powers off).
//!
//! A device served for a process appliance can be migrated with its guest
//! (`VHOST_USER_PROTOCOL_F_DEVICE_STATE`): the VMM reads the appliance's state from
//! the source device and hands it to the destination's, started the same way on the
//! destination host. With the device in the appliance, the appliance does both
//! itself. Relayed, this module asks the appliance for its state over the control
//! link, and on the destination starts a successor restored from the received state
//! (as a live restart does), moves the relay to it and stops the fresh appliance it
//! replaces. A VM appliance's state cannot be moved yet: its device offers no device
//! state, so the VMM refuses to migrate the guest.
//!
//! This module wires parts together; it never relays a frame itself and never
//! interprets an appliance's state.

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use std::os::unix::net::UnixStream;

use fsva_control::{BackendSpec, ChannelKind, SandboxKind, StartConfig};

use crate::appliance::Appliance;
use crate::supervisor::{
    block_termination_signals, stop_appliance, wait_termination_signal, SupervisorError, VmPlan,
};
use crate::{launch, registry};

/// Everything `fsva serve-vhost` asks for.
#[derive(Debug)]
pub struct VhostRequest {
    /// The vhost-user socket the VMM connects to.
    pub socket: PathBuf,
    pub device: fsva_vhost::DeviceConfig,
    pub backend: BackendSpec,
    pub sandbox: SandboxKind,
    /// Worker threads in the appliance.
    pub workers: u32,
    pub exe: PathBuf,
    pub log_filter: String,
    pub cache_budget: Option<u64>,
    pub vm: Option<VmPlan>,
    /// Keep the device in the supervisor and relay to the appliance (always so for VM
    /// appliances): guest memory stays out of the appliance.
    pub relay: bool,
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> SupervisorError {
    move |source| SupervisorError::Io { what, source }
}

/// Serves until the VMM disconnects or a termination signal arrives.
pub fn serve(mut req: VhostRequest) -> Result<(), SupervisorError> {
    // A VM appliance is always relayed, and the link answers from its hints.
    if let Some(plan) = req.vm.as_mut() {
        plan.spec.dir_hints = true;
    }
    block_termination_signals();
    if let BackendSpec::Passthrough { path, .. } = &req.backend {
        if !path.is_dir() {
            return Err(SupervisorError::BadBackendPath(path.clone()));
        }
    }
    let socket = req.socket.to_string_lossy().into_owned();
    // Listening before the appliance starts: a VMM may connect at once.
    let _ = std::fs::remove_file(&req.socket);
    let listener = UnixListener::bind(&req.socket).map_err(io_err(format!(
        "listening on {socket} (does its directory exist?)"
    )))?;
    let cgroup = match req.cache_budget {
        Some(bytes) => {
            let cg = crate::cgroup::MemoryCgroup::create(&format!(
                "vhost-{}",
                registry::mount_id(&req.socket)
            ))
            .map_err(io_err("creating the appliance's memory cgroup".into()))?;
            let limit = match &req.vm {
                Some(plan) => {
                    (u64::from(plan.spec.memory_mib) << 20) + crate::supervisor::VM_QEMU_OVERHEAD
                }
                None => bytes + crate::supervisor::CGROUP_HEADROOM,
            };
            cg.set_limit(limit)
                .map_err(io_err(format!("limiting {}", cg.path().display())))?;
            Some(cg)
        }
        None => None,
    };
    let procs = cgroup.as_ref().map(|c| c.procs_file());
    let tag = req.device.tag().unwrap_or("(given by the VMM)").to_string();
    let result = if req.vm.is_some() || req.relay {
        relayed(&req, listener, procs.as_deref(), &socket, &tag)
    } else {
        inline(&req, listener, procs.as_deref(), &socket, &tag)
    };
    drop(cgroup);
    result
}

/// The appliance's configuration, and its broker link when it needs device nodes made
/// for it (root's passthrough appliance, as for a mount; no /dev/fuse session here to
/// register backing files with).
fn start_config(
    req: &VhostRequest,
    channel: ChannelKind,
) -> Result<(StartConfig, Option<fsva_control::Link>), SupervisorError> {
    let broker = device_broker(req)?;
    let config = StartConfig {
        backend: req.backend.clone(),
        channel,
        workers_per_channel: req.workers.max(1),
        sandbox: req.sandbox,
        log_filter: req.log_filter.clone(),
        broker_link: broker.is_some(),
        backing_files: false,
        device_nodes: broker.is_some(),
        cache_budget: req.cache_budget,
        vhost_tag: req.device.tag().map(str::to_string),
        restore: false,
        // A guest's virtiofs driver takes no invalidations: nothing to watch for.
        host_watched: false,
        // The device's link to a relayed appliance answers from them.
        dir_hints: channel == ChannelKind::Stream && req.backend.is_only_writer(),
    };
    Ok((config, broker))
}

/// The broker link for a process appliance that needs device nodes made for it.
fn device_broker(req: &VhostRequest) -> Result<Option<fsva_control::Link>, SupervisorError> {
    if req.vm.is_some() {
        return Ok(None);
    }
    broker_for(&req.backend, req.sandbox)
}

/// The broker link for a process appliance of `backend` in `sandbox`, if it needs one.
fn broker_for(
    backend: &BackendSpec,
    sandbox: SandboxKind,
) -> Result<Option<fsva_control::Link>, SupervisorError> {
    if !crate::supervisor::needs_device_broker(backend, sandbox) {
        return Ok(None);
    }
    let scope = crate::broker::BrokerScope {
        backing: None,
        devices_in: crate::supervisor::open_export(backend)?,
        live_backing: Arc::new(std::sync::atomic::AtomicU64::new(0)),
    };
    crate::broker::start(scope)
        .map(Some)
        .map_err(io_err("starting the broker".into()))
}

fn ready(req: &VhostRequest, socket: &str, tag: &str, pid: u32, how: &str) {
    tracing::info!(socket = %socket, tag = %tag, backend = %req.backend, pid, how, "vhost-user-fs device ready");
    println!(
        "fsva: serving {} as virtio-fs tag {tag} on {socket} ({how})",
        req.backend
    );
}

/// The appliance process is the device: it answers the guest's queues in its own
/// workers (as virtiofsd does), and maps guest memory to do so.
fn inline(
    req: &VhostRequest,
    listener: UnixListener,
    procs: Option<&std::path::Path>,
    socket: &str,
    tag: &str,
) -> Result<(), SupervisorError> {
    let (config, broker) = start_config(
        req,
        ChannelKind::Vhost {
            request_queues: req.device.request_queues(),
        },
    )?;
    let mut fds = vec![listener.as_fd()];
    fds.extend(broker.as_ref().map(|l| l.as_fd()));
    let (appliance, mut child) =
        Appliance::start(&req.exe, &config, &fds, procs, launch::START_TIMEOUT)?;
    // Only the appliance holds these now (the broker thread ends when it exits).
    drop((listener, broker));
    let pid = appliance.pid;
    let kill = appliance.killer();
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stopped = stopped.clone();
        std::thread::Builder::new()
            .name("fsva-signals".into())
            .spawn(move || {
                let sig = wait_termination_signal();
                tracing::info!(signal = sig, "stopping the appliance");
                stopped.store(true, std::sync::atomic::Ordering::SeqCst);
                kill();
            })
            .map_err(io_err("spawning the signal thread".into()))?;
    }
    ready(req, socket, tag, pid, "device in the appliance");
    let status = child
        .wait()
        .map_err(io_err("waiting for the appliance".into()))?;
    tracing::info!(%status, "appliance exited");
    if status.success() || stopped.load(std::sync::atomic::Ordering::SeqCst) {
        Ok(())
    } else {
        Err(SupervisorError::Io {
            what: "the appliance serving the device failed (its log is above)".into(),
            source: std::io::Error::other(status.to_string()),
        })
    }
}

/// The appliance a relayed device forwards to now. A migration's destination replaces
/// it by one restored from the source's state.
struct Current {
    appliance: Appliance,
    pid: u32,
}

/// What the waiters, the signal thread and the end of service share: the appliance of
/// the moment.
#[derive(Clone)]
struct Shared {
    current: Arc<std::sync::Mutex<Current>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pid(&self) -> u32 {
        self.lock().pid
    }

    fn kill(&self) {
        self.lock().appliance.kill();
    }

    /// Stops the current appliance once its channel is closed (killing it if it
    /// lingers).
    fn stop(&self, vm: bool) {
        let (pid, kill) = {
            let c = self.lock();
            (c.pid, c.appliance.killer())
        };
        stop_appliance(pid, kill, vm);
    }
}

/// Fails the relay when the appliance `pid` exits, if it is still the current one
/// (the fresh appliance a migration's destination replaces exits as planned).
fn watch(
    child: std::process::Child,
    relay: Arc<fsva_vhost::relay::Relay<fsva_vhost::device::Token>>,
    shared: Shared,
) -> Result<(), SupervisorError> {
    crate::supervisor::on_exit(child, move |pid, status| {
        if shared.pid() == pid {
            relay.fail(&format!("appliance exited ({status})"));
        }
    })
}

/// A thread that lives as long as the process and starts appliances for threads that
/// do not: an appliance dies with the thread that started it (`PR_SET_PDEATHSIG`
/// fires when the parent *thread* exits), and a device state transfer runs on a
/// thread of its own that ends when the transfer does.
struct Spawner(std::sync::Mutex<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>>);

impl Spawner {
    fn start() -> Result<Spawner, SupervisorError> {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new()
            .name("fsva-spawner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
                // Every sender is gone: the process is ending. Stay, so that what was
                // started here lives until then.
                loop {
                    std::thread::park();
                }
            })
            .map_err(io_err("spawning the appliance starter thread".into()))?;
        Ok(Spawner(std::sync::Mutex::new(tx)))
    }

    /// Runs `job` on the spawner's thread and returns its result.
    fn run<R: Send + 'static>(&self, job: impl FnOnce() -> R + Send + 'static) -> Option<R> {
        let (tx, rx) = std::sync::mpsc::channel();
        let sent = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Box::new(move || {
                let _ = tx.send(job());
            }));
        sent.ok()?;
        rx.recv().ok()
    }
}

/// A relayed process appliance's side of a guest's migration.
struct RelayedState {
    spawner: Spawner,
    exe: PathBuf,
    /// The appliance's configuration (a successor's is the same, restoring).
    config: StartConfig,
    procs: Option<PathBuf>,
    relay: Arc<fsva_vhost::relay::Relay<fsva_vhost::device::Token>>,
    shared: Shared,
}

impl fsva_vhost::DeviceState for RelayedState {
    fn save(&self) -> Result<fsva_vhost::Saved, String> {
        let saved = self
            .shared
            .lock()
            .appliance
            .checkpoint_for_transfer()
            .map_err(|e| e.to_string())?;
        let state = fsva_control::blob::read(saved.blob)
            .map_err(|e| format!("reading the appliance's state: {e}"))?;
        Ok(fsva_vhost::Saved {
            state,
            files: saved
                .fds
                .into_iter()
                .map(|f| Box::new(f) as Box<dyn std::os::fd::AsFd + Send>)
                .collect(),
        })
    }

    fn resume(&self) {
        if let Err(e) = self.shared.lock().appliance.resume() {
            tracing::error!(error = %e, "the appliance did not resume after its state was taken");
        }
    }

    fn load(&self, incoming: fsva_vhost::Incoming) -> Result<(), String> {
        if self.relay.has_forwarded() {
            return Err("the appliance has served requests already".into());
        }
        let t0 = std::time::Instant::now();
        let saved = crate::appliance::SavedState {
            blob: fsva_control::blob::seal(&incoming.state)
                .map_err(|e| format!("sealing the received state: {e}"))?,
            fds: incoming.files,
        };
        let config = StartConfig {
            restore: true,
            ..self.config.clone()
        };
        let broker = broker_for(&config.backend, config.sandbox).map_err(|e| e.to_string())?;
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| format!("creating the stream channel: {e}"))?;
        let (exe, procs) = (self.exe.clone(), self.procs.clone());
        let starting = self
            .spawner
            .run(move || {
                let mut fds = vec![theirs.as_fd()];
                fds.extend(broker.as_ref().map(|l| l.as_fd()));
                Appliance::spawn(
                    &exe,
                    &config,
                    &fds,
                    false,
                    procs.as_deref(),
                    launch::START_TIMEOUT,
                )
                .map_err(|e| e.to_string())
            })
            .ok_or("the appliance starter thread is gone")??;
        if let Err(e) = starting.await_state_request() {
            starting.abandon();
            return Err(e.to_string());
        }
        let (appliance, child) = starting
            .serve(Some(&saved))
            .map_err(|e| format!("the appliance could not restore the state: {e}"))?;
        drop(saved);
        let pid = appliance.pid;
        if let Err(e) = appliance.resume().and_then(|()| {
            self.relay
                .reattach(ours)
                .map_err(|e| crate::appliance::ApplianceError::Failed(e.to_string()))
        }) {
            appliance.kill();
            return Err(format!("switching to the restored appliance: {e}"));
        }
        let fresh = std::mem::replace(&mut *self.shared.lock(), Current { appliance, pid });
        watch(child, self.relay.clone(), self.shared.clone()).map_err(|e| e.to_string())?;
        // The fresh appliance never served; its stream is closed: it exits.
        fresh.appliance.kill();
        tracing::info!(
            pid,
            replaced = fresh.pid,
            restore_ms = t0.elapsed().as_millis() as u64,
            "serving the migrated guest from a restored appliance"
        );
        Ok(())
    }
}

/// The supervisor is the device and relays requests to the appliance over a stream:
/// the appliance never sees guest memory, and its death is an error for the guest, not
/// a hang. VM appliances are always served this way.
fn relayed(
    req: &VhostRequest,
    listener: UnixListener,
    procs: Option<&std::path::Path>,
    socket: &str,
    tag: &str,
) -> Result<(), SupervisorError> {
    let (started, config) = match &req.vm {
        Some(plan) => (launch::vm(plan, procs, req.cache_budget)?, None),
        None => {
            let (config, broker) = start_config(req, ChannelKind::Stream)?;
            let started =
                launch::sandboxed(&req.exe, &config, broker.as_ref().map(|l| l.as_fd()), procs)?;
            (started, Some(config))
        }
    };
    let is_vm = req.vm.is_some();
    let pid = started.appliance.pid;
    let shared = Shared {
        current: Arc::new(std::sync::Mutex::new(Current {
            appliance: started.appliance,
            pid,
        })),
    };
    let server = {
        let shared = shared.clone();
        fsva_vhost::Server::relayed(
            req.device.clone(),
            started.stream,
            started.shm,
            req.backend.is_only_writer().then(fsva_relay::Answers::new),
            Box::new(move |why| {
                tracing::error!(reason = why, "appliance dropped; the guest gets EIO");
                shared.kill();
            }),
        )
        .map_err(|e| SupervisorError::Io {
            what: "starting the vhost-user-fs device".into(),
            source: std::io::Error::other(e.to_string()),
        })?
    };
    let relay = server.relay().expect("a relayed device has a relay");
    watch(started.child, relay.clone(), shared.clone())?;
    if let Some(config) = config {
        server.set_device_state(Arc::new(RelayedState {
            spawner: Spawner::start()?,
            exe: req.exe.clone(),
            config,
            procs: procs.map(|p| p.to_path_buf()),
            relay: relay.clone(),
            shared: shared.clone(),
        }));
    }
    {
        let relay = relay.clone();
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("fsva-signals".into())
            .spawn(move || {
                let sig = wait_termination_signal();
                tracing::info!(signal = sig, "stopping: closing the appliance's channel");
                relay.close();
                shared.stop(is_vm);
                std::process::exit(0);
            })
            .map_err(io_err("spawning the signal thread".into()))?;
    }
    ready(req, socket, tag, pid, "relayed by the supervisor");
    let served = server.serve(fsva_vhost::Listener::from(listener));
    relay.close();
    shared.stop(is_vm);
    served.map_err(|e| SupervisorError::Io {
        what: format!("serving the VMM on {socket}"),
        source: std::io::Error::other(e.to_string()),
    })
}
