//! fsva's control protocol: the small, versioned message set the supervisor, its
//! appliances and the CLI exchange beside the FUSE frames.
//!
//! - [`messages`]: what is said (appliance start-up configuration, readiness, counters,
//!   status and unmount requests), each wrapped in a versioned envelope;
//! - [`link`]: how it is carried: one message per `SOCK_SEQPACKET` datagram, encoded with
//!   postcard, with descriptors attached as `SCM_RIGHTS`;
//! - [`framed`]: the same messages length-framed over a byte stream, for VM appliances
//!   reached through a virtio-serial port;
//! - [`host`]: what a supervisor and a host daemon say over TCP when a mount's
//!   appliance migrates to another host, and the shared-key handshake before it.
//!
//! This crate must never carry FUSE traffic and never act on a message: it only encodes,
//! decodes and moves them.

pub mod blob;
pub mod framed;
pub mod host;
pub mod link;
pub mod messages;

pub use framed::FramedLink;
pub use link::{Link, LinkError};
pub use messages::*;
