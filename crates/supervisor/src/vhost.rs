//! `fsva serve-vhost`: one appliance served to a VM guest as a vhost-user-fs device.
//!
//! The same appliance as for a host mount (sandboxed process or VM appliance, any
//! backend) is started on a stream channel; the device (`fsva-vhost`) relays the
//! guest's virtqueues to it. The socket listens before the appliance starts, so a VMM
//! may connect at once. Service ends when the VMM disconnects (the guest powered off)
//! or on SIGINT/SIGTERM/SIGHUP; either way the appliance's stream is closed so it
//! syncs and exits (a VM appliance unmounts its disk and powers off).
//!
//! This module wires parts together; it never relays a frame itself.

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

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
pub fn serve(req: VhostRequest) -> Result<(), SupervisorError> {
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
    };
    Ok((config, broker))
}

/// The broker link for a process appliance that needs device nodes made for it.
fn device_broker(req: &VhostRequest) -> Result<Option<fsva_control::Link>, SupervisorError> {
    if req.vm.is_some() || !crate::supervisor::needs_device_broker(&req.backend, req.sandbox) {
        return Ok(None);
    }
    let scope = crate::broker::BrokerScope {
        backing: None,
        devices_in: crate::supervisor::open_export(&req.backend)?,
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
    let started = match &req.vm {
        Some(plan) => launch::vm(plan, procs, req.cache_budget)?,
        None => {
            let (config, broker) = start_config(req, ChannelKind::Stream)?;
            launch::sandboxed(&req.exe, &config, broker.as_ref().map(|l| l.as_fd()), procs)?
        }
    };
    let is_vm = req.vm.is_some();
    let pid = started.appliance.pid;
    let kill = Arc::new(started.appliance.killer());
    let server = {
        let kill = kill.clone();
        fsva_vhost::Server::relayed(
            req.device.clone(),
            started.stream,
            started.shm,
            Box::new(move |why| {
                tracing::error!(reason = why, "appliance dropped; the guest gets EIO");
                kill();
            }),
        )
        .map_err(|e| SupervisorError::Io {
            what: "starting the vhost-user-fs device".into(),
            source: std::io::Error::other(e.to_string()),
        })?
    };
    let relay = server.relay().expect("a relayed device has a relay");
    {
        let relay = relay.clone();
        crate::supervisor::on_exit(started.child, move |_, status| {
            relay.fail(&format!("appliance exited ({status})"));
        })?;
    }
    {
        let relay = relay.clone();
        let kill = kill.clone();
        std::thread::Builder::new()
            .name("fsva-signals".into())
            .spawn(move || {
                let sig = wait_termination_signal();
                tracing::info!(signal = sig, "stopping: closing the appliance's channel");
                relay.close();
                stop_appliance(pid, &*kill, is_vm);
                std::process::exit(0);
            })
            .map_err(io_err("spawning the signal thread".into()))?;
    }
    ready(req, socket, tag, pid, "relayed by the supervisor");
    let served = server.serve(fsva_vhost::Listener::from(listener));
    relay.close();
    stop_appliance(pid, &*kill, is_vm);
    served.map_err(|e| SupervisorError::Io {
        what: format!("serving the VMM on {socket}"),
        source: std::io::Error::other(e.to_string()),
    })
}
