//! Device state for migration (`VHOST_USER_PROTOCOL_F_DEVICE_STATE`): what the device
//! does when the VMM hands it a pipe to save its state into or load it from.
//!
//! The VMM stops every vring first (so no request is in flight: `stop_vring` waits for
//! them), then sends `SET_DEVICE_STATE_FD` and reads (save) or writes (load) the pipe
//! until it is closed, then asks `CHECK_DEVICE_STATE` for the verdict. The transfer
//! runs on a thread of its own, because the pipe fills up until the VMM reads it, and
//! the VMM reads only once `SET_DEVICE_STATE_FD` is answered.
//!
//! What the state is belongs to the appliance, behind [`DeviceState`]: the appliance's
//! own state format (`fsva-appliance::state`) with the files it names carried by value
//! ([`crate::state_stream`]). A received state is read whole and checked before the
//! appliance sees any of it, and is taken only by a device that has not served a
//! request yet (the destination of a migration); anything else is refused with an
//! error the VMM fails the migration on. This module never panics on what it receives
//! and never interprets the state.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::state_stream::{self, Incoming, StreamError, Summary};

/// An appliance's state, taken for a transfer: its encoded bytes, and the files whose
/// contents travel with it, in the order the state numbers them.
pub struct Saved {
    pub state: Vec<u8>,
    pub files: Vec<Box<dyn AsFd + Send>>,
}

/// The appliance behind the device, as far as migration is concerned.
pub trait DeviceState: Send + Sync {
    /// Takes the appliance's state (the vrings are stopped and nothing is in flight).
    /// The appliance stays paused until [`DeviceState::resume`].
    fn save(&self) -> Result<Saved, String>;
    /// Called after every `save`, whether it succeeded, the state was sent or the
    /// transfer failed: the appliance goes on, as the VMM may resume the guest here if
    /// the migration does not complete. Harmless on an appliance that is not paused.
    fn resume(&self);
    /// Makes a received state the appliance's. Called only before the device served
    /// any request.
    fn load(&self, incoming: Incoming) -> Result<(), String>;
}

/// Why a state transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("the appliance could not give its state: {0}")]
    Save(String),
    #[error("the appliance could not take the received state: {0}")]
    Load(String),
    #[error("refusing to load a device state: {0}")]
    Refused(&'static str),
    #[error("requests were still in flight when the VMM asked for the device state; not saved (retry the migration)")]
    InFlight,
}

/// The transfer in progress, if any, and what the device knows about its past.
#[derive(Default)]
pub(crate) struct Transfers {
    running: Mutex<Option<JoinHandle<Result<(), TransferError>>>>,
    /// Set once any request reached the appliance: such a device never loads a state.
    pub(crate) served: AtomicBool,
}

/// Which way a transfer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Save,
    Load,
}

impl Transfers {
    /// Starts a transfer over `pipe` on a thread of its own; `quiesced` waits until no
    /// request is in flight (false: some still are).
    pub(crate) fn start(
        self: &Arc<Self>,
        state: Arc<dyn DeviceState>,
        direction: Direction,
        pipe: File,
        quiesced: impl FnOnce() -> bool + Send + 'static,
    ) -> std::io::Result<()> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(previous) = running.take() {
            if !previous.is_finished() {
                *running = Some(previous);
                return Err(std::io::Error::other(
                    "a device state transfer is already running",
                ));
            }
            // Never checked by the VMM: its verdict goes to the log.
            if let Ok(Err(e)) = previous.join() {
                tracing::warn!(error = %e, "an earlier device state transfer failed");
            }
        }
        let transfers = self.clone();
        let handle = std::thread::Builder::new()
            .name("fsva-vhost-state".into())
            .spawn(move || match direction {
                Direction::Save => {
                    if !quiesced() {
                        return Err(TransferError::InFlight);
                    }
                    save(&*state, pipe).map(|s| {
                        tracing::info!(
                            bytes = s.bytes,
                            files = s.files,
                            content = s.content,
                            "device state saved"
                        );
                    })
                }
                Direction::Load => load(&*state, pipe, &transfers.served),
            })?;
        *running = Some(handle);
        Ok(())
    }

    /// The verdict of the last transfer (the VMM asks once the pipe is closed).
    pub(crate) fn check(&self) -> std::io::Result<()> {
        let handle = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| std::io::Error::other("no device state transfer was started"))?;
        let result = handle
            .join()
            .unwrap_or_else(|_| Err(TransferError::Save("the transfer thread panicked".into())));
        result.map_err(|e| {
            // The VMM learns only that it failed; the reason is here.
            tracing::error!(error = %e, "device state transfer failed");
            std::io::Error::other(e.to_string())
        })
    }
}

/// Takes the appliance's state and writes it into `out`, then lets the appliance go on.
/// `out` is closed on return, which tells the VMM the state is complete.
fn save(state: &dyn DeviceState, out: File) -> Result<Summary, TransferError> {
    let written = state.save().map_err(TransferError::Save).and_then(|saved| {
        let files: Vec<BorrowedFd<'_>> = saved.files.iter().map(|f| f.as_fd()).collect();
        Ok(state_stream::write(&out, &saved.state, &files)?)
    });
    state.resume();
    written
}

/// Reads a whole state from `input`, checks it, and hands it to the appliance.
fn load(state: &dyn DeviceState, input: File, served: &AtomicBool) -> Result<(), TransferError> {
    if served.load(Ordering::SeqCst) {
        // Drain the pipe so the VMM is not left blocked writing into it.
        let _ = std::io::copy(&mut &input, &mut std::io::sink());
        return Err(TransferError::Refused(
            "this device has served a guest already; a state is loaded only into a fresh device (the destination of a migration)",
        ));
    }
    let incoming = state_stream::read(&input)?;
    let (bytes, files) = (incoming.state.len(), incoming.files.len());
    if served.load(Ordering::SeqCst) {
        return Err(TransferError::Refused(
            "the guest sent requests while the state was arriving",
        ));
    }
    state.load(incoming).map_err(TransferError::Load)?;
    tracing::info!(bytes, files, "device state loaded");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// An appliance whose state is a byte string and one file.
    #[derive(Default)]
    struct Fake {
        loaded: Mutex<Option<(Vec<u8>, usize)>>,
        resumed: AtomicBool,
        fail_save: bool,
    }

    impl DeviceState for Fake {
        fn save(&self) -> Result<Saved, String> {
            if self.fail_save {
                return Err("no state today".into());
            }
            let f = rustix::fs::memfd_create(c"t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
            rustix::io::write(&f, b"contents").unwrap();
            Ok(Saved {
                state: b"state".to_vec(),
                files: vec![Box::new(f)],
            })
        }
        fn resume(&self) {
            self.resumed.store(true, Ordering::SeqCst);
        }
        fn load(&self, incoming: Incoming) -> Result<(), String> {
            *self.loaded.lock().unwrap() = Some((incoming.state, incoming.files.len()));
            Ok(())
        }
    }

    fn pipe() -> (File, File) {
        let (r, w) = rustix::pipe::pipe().unwrap();
        (File::from(r), File::from(w))
    }

    fn saved_bytes(fake: &Arc<Fake>) -> Result<Vec<u8>, std::io::Error> {
        let transfers = Arc::new(Transfers::default());
        let (r, w) = pipe();
        transfers.start(fake.clone(), Direction::Save, w, || true)?;
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut &r, &mut out)?;
        transfers.check().map(|()| out)
    }

    #[test]
    fn a_saved_state_loads_into_a_fresh_device() {
        let source = Arc::new(Fake::default());
        let bytes = saved_bytes(&source).unwrap();
        assert!(source.resumed.load(Ordering::SeqCst));
        let dest = Arc::new(Fake::default());
        let transfers = Arc::new(Transfers::default());
        let (r, mut w) = pipe();
        transfers
            .start(dest.clone(), Direction::Load, r, || true)
            .unwrap();
        w.write_all(&bytes).unwrap();
        drop(w);
        transfers.check().unwrap();
        assert_eq!(
            dest.loaded.lock().unwrap().clone(),
            Some((b"state".to_vec(), 1))
        );
    }

    #[test]
    fn refusals_are_errors_the_vmm_sees() {
        // The appliance cannot save: an error, and it goes on serving.
        let failing = Arc::new(Fake {
            fail_save: true,
            ..Fake::default()
        });
        assert!(saved_bytes(&failing).is_err());
        assert!(failing.resumed.load(Ordering::SeqCst));
        // A truncated state: refused, the appliance never sees it.
        let bytes = saved_bytes(&Arc::new(Fake::default())).unwrap();
        let dest = Arc::new(Fake::default());
        let transfers = Arc::new(Transfers::default());
        let (r, mut w) = pipe();
        transfers
            .start(dest.clone(), Direction::Load, r, || true)
            .unwrap();
        w.write_all(&bytes[..bytes.len() / 2]).unwrap();
        drop(w);
        let e = transfers.check().unwrap_err();
        assert!(e.to_string().contains("ends early"), "{e}");
        assert!(dest.loaded.lock().unwrap().is_none());
        // A device that served a guest refuses any state, and drains the pipe.
        transfers.served.store(true, Ordering::SeqCst);
        let (r, mut w) = pipe();
        transfers
            .start(dest.clone(), Direction::Load, r, || true)
            .unwrap();
        w.write_all(&bytes).unwrap();
        drop(w);
        assert!(transfers.check().is_err());
        assert!(dest.loaded.lock().unwrap().is_none());
        // Requests in flight: nothing saved.
        let t = Arc::new(Transfers::default());
        let (_r, w) = pipe();
        t.start(Arc::new(Fake::default()), Direction::Save, w, || false)
            .unwrap();
        assert!(t.check().is_err());
        // No transfer to check.
        assert!(t.check().is_err());
    }
}
