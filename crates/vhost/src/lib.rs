//! fsva's vhost-user-fs device: any fsva appliance, served to VM guests.
//!
//! In the seed's topology the user's applications run in a VM and the proxy is a small
//! driver in that VM's kernel. Every Linux guest since 5.4 has one: virtiofs. A guest
//! mounts this device with `mount -t virtiofs TAG /mnt`, its kernel puts FUSE requests
//! on virtqueues in its own memory, and this crate (in the supervisor's process, which
//! the VMM shares guest memory with) relays them to the appliance over the same stream
//! channel a host mount's relay uses, so the appliance — sandboxed process or VM with
//! its own kernel — cannot tell a host mount from a guest.
//!
//! - [`config`]: tag, queue count, the virtio-fs configuration space.
//! - [`chain`]: descriptor chains to request frames and back, every guest value checked.
//! - [`relay`]: the link to the appliance (ids, the waiting table, reply checks).
//! - [`device`]: the vhost-user back end: queues, workers, completions, the dirty log.
//! - [`migration`]: the device's state for a guest's migration, through the appliance.
//! - [`state_stream`]: that state as bytes, the files it names carried by value.
//! - [`serve`]: one VMM connection on a socket, served until it goes away.
//!
//! This crate never starts or watches an appliance (the supervisor does) and never
//! interprets a request beyond its header.

pub mod chain;
pub mod config;
pub mod device;
pub mod migration;
pub mod relay;
pub mod state_stream;

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use migration::{DeviceState, Saved};
pub use state_stream::Incoming;

pub use config::DeviceConfig;
pub use device::{FsDevice, Inline};
pub use vhost::vhost_user::Listener;

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("starting the device's reply thread: {0}")]
    Start(#[source] std::io::Error),
    #[error("setting up the vhost-user daemon: {0}")]
    Daemon(String),
    #[error("serving the VMM: {0}")]
    Serve(String),
}

/// A device ready to serve, with the handle that fails its appliance link.
pub struct Server {
    device: Arc<FsDevice>,
    memory: device::Memory,
}

impl Server {
    /// A device relaying to the appliance at the other end of `stream`: the
    /// appliance never sees guest memory, and its death is an EIO for the guest.
    pub fn relayed(
        config: DeviceConfig,
        stream: UnixStream,
        shm: Option<Arc<fsva_channel::shm::ShmRegion>>,
        answers: Option<fsva_relay::Answers>,
        on_failure: relay::OnFailure,
    ) -> Result<Server, VhostError> {
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let device = FsDevice::relayed(config, memory.clone(), stream, shm, answers, on_failure)
            .map_err(VhostError::Start)?;
        Ok(Server { device, memory })
    }

    /// A device answering requests in its queue workers through `inline` (inside the
    /// appliance process).
    pub fn inline(config: DeviceConfig, inline: Arc<dyn device::Inline>) -> Server {
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let device = FsDevice::inline(config, memory.clone(), inline);
        Server { device, memory }
    }

    /// Makes the device migratable (`VHOST_USER_PROTOCOL_F_DEVICE_STATE`): `state`
    /// saves and loads the appliance's state. Without it the VMM refuses to migrate.
    pub fn set_device_state(&self, state: Arc<dyn DeviceState>) {
        self.device.set_device_state(state);
    }

    /// The appliance link of a relayed device, to fail (the appliance died) or close
    /// (service ended).
    pub fn relay(&self) -> Option<Arc<relay::Relay<device::Token>>> {
        self.device.relay()
    }

    /// Serves the first VMM that connects on `listener` and returns when it
    /// disconnects (the guest powered off or the VMM exited).
    pub fn serve(self, mut listener: Listener) -> Result<(), VhostError> {
        let mut daemon = vhost_user_backend::VhostUserDaemon::new(
            "fsva-vhost".into(),
            self.device.clone(),
            self.memory,
        )
        .map_err(|e| VhostError::Daemon(e.to_string()))?;
        let served = daemon.start(&mut listener).and_then(|()| {
            let waited = daemon.wait();
            tracing::info!(
                per_queue = ?self.device.requests_per_queue(),
                "the VMM went away; requests taken from each queue (the first is the high-priority queue)"
            );
            waited
        });
        match self.device.relay() {
            // Closing the link ends requests in flight, so the queue workers the daemon
            // joins when dropped are free to end.
            Some(relay) => relay.close(),
            // An inline worker may be blocked in the file system for good (a FIFO opened
            // by the guest with no writer): leave the workers to the process's exit
            // rather than join them.
            None => std::mem::forget(daemon),
        }
        match served {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => Ok(()),
            Err(e) => Err(VhostError::Serve(e.to_string())),
        }
    }
}
