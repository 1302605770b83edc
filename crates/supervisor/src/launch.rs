//! Starting an appliance whose FUSE frames travel over a stream: a sandboxed process
//! with a stream channel, or a VM appliance behind virtio-serial (with its
//! shared-memory data path). The mount's relay ([`crate::bridge`]) and the vhost-user
//! device (`fsva-vhost`) both sit on the stream this returns.
//!
//! This module starts and hands over; it never relays frames and never decides policy
//! (budgets, brokers, sandboxes come in the [`StartConfig`] and [`VmPlan`]).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use fsva_channel::shm::ShmRegion;
use fsva_control::StartConfig;

use crate::appliance::Appliance;
use crate::supervisor::{SupervisorError, VmPlan};

/// How long a VM appliance may take to boot and mount its image (TCG is slow).
pub const VM_START_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a sandboxed appliance may take to start serving.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The VM appliance's shared-memory region for file data, and its slot size: one whole
/// frame (1 MiB payload plus headers), so 31 slots per direction.
const VM_SHM_BYTES: usize = 64 << 20;
const VM_SHM_SLOT: usize = (1 << 20) + 8192;

/// A started appliance and our end of its stream.
pub struct StreamAppliance {
    pub appliance: Appliance,
    pub child: Child,
    pub stream: UnixStream,
    /// The shared-memory data path, when a VM appliance maps it.
    pub shm: Option<Arc<ShmRegion>>,
    /// How data travels, for `fsva status` (VM appliances only).
    pub data_path: Option<String>,
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> SupervisorError {
    move |source| SupervisorError::Io {
        what: what.into(),
        source,
    }
}

/// Starts the appliance `config` describes, on a stream channel (`config.channel` must
/// be `Stream`), with the optional broker link.
pub fn sandboxed(
    exe: &Path,
    config: &StartConfig,
    broker: Option<BorrowedFd<'_>>,
    cgroup_procs: Option<&Path>,
) -> Result<StreamAppliance, SupervisorError> {
    let (ours, theirs) = UnixStream::pair().map_err(io_err("creating the stream channel"))?;
    let mut fds = vec![theirs.as_fd()];
    fds.extend(broker);
    let (appliance, child) = Appliance::start(exe, config, &fds, cgroup_procs, START_TIMEOUT)?;
    Ok(StreamAppliance {
        appliance,
        child,
        stream: ours,
        shm: None,
        data_path: None,
    })
}

/// Boots the VM appliance of `plan` and waits until its guest serves; applies the
/// cache budget and the clock.
pub fn vm(
    plan: &VmPlan,
    cgroup_procs: Option<&Path>,
    cache_budget: Option<u64>,
) -> Result<StreamAppliance, SupervisorError> {
    let (fuse_ours, fuse_theirs) =
        UnixStream::pair().map_err(io_err("creating the FUSE port's socket"))?;
    let (control_ours, control_theirs) =
        UnixStream::pair().map_err(io_err("creating the control port's socket"))?;
    // The shared-memory data path: a region QEMU maps into the guest.
    let (shm_fd, shm) = match ShmRegion::create(VM_SHM_BYTES, VM_SHM_SLOT) {
        Ok((fd, region)) => (Some(fd), Some(Arc::new(region))),
        Err(e) => {
            tracing::warn!(error = %e, "no shared-memory region; data goes through the serial port");
            (None, None)
        }
    };
    let qemu = fsva_vm::qemu::command(
        &plan.appliance,
        &plan.spec,
        fsva_vm::qemu::Ports {
            fuse: fuse_theirs.as_raw_fd(),
            control: control_theirs.as_raw_fd(),
            shm: shm_fd.as_ref().map(|fd| (fd.as_raw_fd(), VM_SHM_BYTES)),
        },
        false,
    );
    let mut give: Vec<OwnedFd> = vec![fuse_theirs.into(), control_theirs.into()];
    give.extend(shm_fd);
    let (appliance, child, ready) =
        Appliance::start_vm(qemu, give, control_ours, cgroup_procs, VM_START_TIMEOUT)?;
    tracing::info!(kernel = %ready.kernel, fstype = %ready.fstype, read_only = ready.read_only, accel = %plan.spec.accel, "VM appliance up");
    let data_path = format!(
        "through a VM appliance (kernel {}, {}{}) over {}; {}",
        ready.kernel,
        ready.fstype,
        if ready.read_only { ", read-only" } else { "" },
        if ready.shared_memory {
            "rings in shared memory (virtio-serial as doorbell)"
        } else {
            "virtio-serial"
        },
        plan.accel_note
    );
    if let Some(bytes) = cache_budget {
        appliance.set_cache_budget(bytes)?;
    }
    appliance.set_clock()?;
    Ok(StreamAppliance {
        appliance,
        child,
        stream: fuse_ours,
        shm: shm.filter(|_| ready.shared_memory),
        data_path: Some(data_path),
    })
}
