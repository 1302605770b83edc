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

use std::path::PathBuf;
use std::sync::Arc;

use fsva_control::{BackendSpec, ChannelKind, SandboxKind, StartConfig};

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
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> SupervisorError {
    move |source| SupervisorError::Io { what, source }
}

/// Serves until the VMM disconnects or a termination signal arrives.
pub fn serve(req: VhostRequest) -> Result<(), SupervisorError> {
    block_termination_signals();
    if let BackendSpec::Passthrough { path } = &req.backend {
        if !path.is_dir() {
            return Err(SupervisorError::BadBackendPath(path.clone()));
        }
    }
    let socket = req.socket.to_string_lossy().into_owned();
    let listener =
        fsva_vhost::Listener::new(&req.socket, true).map_err(|e| SupervisorError::Io {
            what: format!("listening on {socket} (does its directory exist?)"),
            source: std::io::Error::other(e.to_string()),
        })?;
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
    let started = match &req.vm {
        Some(plan) => launch::vm(plan, procs.as_deref(), req.cache_budget)?,
        None => {
            let config = StartConfig {
                backend: req.backend.clone(),
                channel: ChannelKind::Stream,
                workers_per_channel: req.workers.max(1),
                sandbox: req.sandbox,
                log_filter: req.log_filter.clone(),
                // No /dev/fuse session to register backing files with, and no broker
                // for device nodes yet (root's passthrough answers mknod of devices
                // with EPERM).
                broker_link: false,
                backing_files: false,
                device_nodes: false,
                cache_budget: req.cache_budget,
            };
            launch::sandboxed(&req.exe, &config, None, procs.as_deref())?
        }
    };
    let is_vm = req.vm.is_some();
    let pid = started.appliance.pid;
    let kill = Arc::new(started.appliance.killer());
    let server = {
        let kill = kill.clone();
        fsva_vhost::Server::new(
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
    let relay = server.relay();
    {
        let relay = relay.clone();
        let mut child = started.child;
        std::thread::Builder::new()
            .name("fsva-appliance-waiter".into())
            .spawn(move || {
                let status = child
                    .wait()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string());
                relay.fail(&format!("appliance exited ({status})"));
            })
            .map_err(io_err("spawning the appliance waiter".into()))?;
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
    let tag = req.device.tag().unwrap_or("(given by the VMM)").to_string();
    tracing::info!(socket = %socket, tag = %tag, backend = %req.backend, pid, "vhost-user-fs device ready");
    println!(
        "fsva: serving {} as virtio-fs tag {tag} on {socket}",
        req.backend
    );
    let served = server.serve(listener);
    relay.close();
    stop_appliance(pid, &*kill, is_vm);
    drop(cgroup);
    served.map_err(|e| SupervisorError::Io {
        what: format!("serving the VMM on {socket}"),
        source: std::io::Error::other(e.to_string()),
    })
}
