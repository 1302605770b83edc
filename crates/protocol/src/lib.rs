//! The FUSE wire protocol, as the Linux kernel speaks it over `/dev/fuse` and virtio-fs.
//!
//! This crate owns the byte-level format and nothing else: the ABI structures
//! ([`abi`]), turning a request frame into a typed [`Request`] ([`request`]), and
//! building reply and notification frames ([`reply`]). Every fsva channel (fusedev,
//! stream, vhost-user) moves frames that this crate decodes and encodes. It also owns
//! the one frame fsva adds on its own stream channels, never seen by a kernel
//! ([`hint`]).
//!
//! It must never perform I/O, allocate per byte of payload where a borrow will do, or
//! panic on any input: a frame from a kernel, a guest or a hostile appliance is decoded
//! into a value or a [`DecodeError`].

pub mod abi;
pub mod hint;
pub mod reply;
pub mod request;

pub use request::{decode, DecodeError, Negotiated, Operation, Request};
