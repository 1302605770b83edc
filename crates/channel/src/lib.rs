//! Channels: how FUSE frames move between the kernel and an appliance.
//!
//! A [`Channel`] hands out whole request frames and takes whole reply frames; it never
//! looks inside them beyond the length needed to delimit a frame. Two kinds exist:
//!
//! - [`fusedev`]: a descriptor of `/dev/fuse` (a clone of the mount's session, made by
//!   the supervisor). The appliance reads requests from the kernel directly: no hop.
//! - [`stream`]: frames over a connected byte stream (a unix socket today; vsock or
//!   virtio-serial for VM appliances), relayed by the supervisor.
//! - [`shm`]: the shared-memory path a stream can use: frames through a region both
//!   ends map (a VM appliance's ivshmem BAR), in a polled ring per direction (module `ring`), with
//!   the stream left as the doorbell of a sleeping reader.
//!
//! Decoding and policy live elsewhere: this crate must never interpret an operation.

pub mod fusedev;
mod ring;
pub mod shm;
pub mod stream;

use thiserror::Error;

/// What can go wrong while moving a frame.
#[derive(Debug, Error)]
pub enum ChannelError {
    #[error("reading a FUSE frame from {what} failed: {source}")]
    Receive {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("writing a FUSE frame to {what} failed: {source}")]
    Send {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("frame on {what} declares {len} bytes, outside the allowed {min}..={max}")]
    BadFrameLength {
        what: &'static str,
        len: usize,
        min: usize,
        max: usize,
    },
    #[error("opening /dev/fuse failed: {0} (is the fuse module loaded and /dev/fuse present?)")]
    OpenDevice(std::io::Error),
    #[error("cloning the /dev/fuse session failed: {0}")]
    Clone(std::io::Error),
}

/// A bidirectional frame transport, shared by several worker threads.
pub trait Channel: Send + Sync {
    /// Receives one request frame into `buf`, returning its length, or `None` once the
    /// other end is gone for good (unmounted, or the peer closed the stream).
    fn receive(&self, buf: &mut [u8]) -> Result<Option<usize>, ChannelError>;

    /// Sends one complete reply or notification frame.
    fn send(&self, frame: &[u8]) -> Result<(), ChannelError>;
}
