//! What an appliance leaves with its supervisor so that a successor can carry on after
//! it dies: descriptors whose contents are the file system (mem's memfds) and the last
//! checkpoint of its state. Together with the recovery journal ([`crate::journal`]),
//! they are everything a successor needs.
//!
//! This module is the contract only; the appliance entry point implements it over its
//! link to the supervisor. Nothing here decides when to keep or checkpoint.

use std::os::fd::BorrowedFd;

/// The supervisor's safe-keeping, as an appliance sees it.
pub trait Keeper: Send + Sync {
    /// Keep a duplicate of `fd` under `id` (unique within the mount) until
    /// [`Keeper::release`]. Must be durable when it returns: a successor started after
    /// this appliance dies gets it.
    fn keep(&self, id: u64, fd: BorrowedFd<'_>);

    /// The descriptor kept under `id` is no longer part of the file system.
    fn release(&self, id: u64);

    /// Store `state` (an encoded [`crate::state::ApplianceState`]) as the checkpoint a
    /// successor starts from, replacing the previous one. Every journal record up to
    /// `boundary` is in it. Returns once the supervisor holds it.
    fn store_checkpoint(&self, state: &[u8], boundary: u64) -> std::io::Result<()>;
}
