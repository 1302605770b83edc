//! Answering for an appliance that is gone.
//!
//! When an appliance dies the supervisor still holds every `/dev/fuse` clone, so the
//! kernel keeps the requests the appliance had read but not answered. A
//! `FUSE_NOTIFY_RESEND` puts them back in the queue, and the fallback readers answer
//! them, and every later request, with an error: the application sees EIO at once
//! instead of a hung mount. This module never forwards a request anywhere.

use std::sync::Arc;
use std::thread::JoinHandle;

use fsva_channel::fusedev::FuseDev;
use fsva_channel::Channel;
use fsva_protocol::abi::opcode;
use fsva_protocol::reply::{notify_resend, ReplyBuf};
use fsva_protocol::request::decode_header;

/// The error reply for a request frame, or `None` if it takes no reply.
pub fn error_reply<'a>(frame: &[u8], errno: i32, reply: &'a mut ReplyBuf) -> Option<&'a [u8]> {
    let h = decode_header(frame).ok()?;
    match h.opcode {
        opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT | opcode::NOTIFY_REPLY => None,
        // Let an unmount complete cleanly.
        opcode::DESTROY => Some(reply.empty(h.unique)),
        _ => Some(reply.error(h.unique, errno)),
    }
}

/// Asks the kernel to queue again every request read and not answered on the
/// connection of `devs` (what a gone appliance held), FUSE_NOTIFY_RESEND (Linux 6.9+).
pub fn resend_held(devs: &[Arc<FuseDev>]) -> Result<(), fsva_channel::ChannelError> {
    match devs.first() {
        Some(first) => first.send(notify_resend(&mut ReplyBuf::default())),
        None => Ok(()),
    }
}

/// Starts answering every request on `devs` with `errno`, after asking the kernel to
/// resend what the dead appliance had taken. The threads end when the mount goes away.
/// When that is impossible — a kernel without FUSE_NOTIFY_RESEND (before 6.9), or reads
/// the kernel refuses — `abort` is called, so applications get an error, not a hang.
pub fn answer_with_errors(
    devs: &[Arc<FuseDev>],
    errno: i32,
    abort: impl Fn() + Send + Sync + 'static,
) -> Vec<JoinHandle<()>> {
    let abort = Arc::new(abort);
    if let Err(e) = resend_held(devs) {
        tracing::warn!(error = %e, "FUSE_NOTIFY_RESEND failed; aborting the connection instead");
        abort();
        return Vec::new();
    }
    devs.iter()
        .cloned()
        .map(|dev| {
            let abort = abort.clone();
            std::thread::Builder::new()
                .name("fsva-fallback".into())
                .spawn(move || serve_errors(&dev, errno, &*abort))
                .expect("spawning a fallback thread")
        })
        .collect()
}

fn serve_errors(dev: &FuseDev, errno: i32, abort: &dyn Fn()) {
    let mut buf = vec![0u8; (1 << 20) + 8192];
    let mut reply = ReplyBuf::default();
    loop {
        match dev.receive(&mut buf) {
            Ok(Some(n)) => {
                if let Some(frame) = error_reply(&buf[..n], errno, &mut reply) {
                    let _ = dev.send(frame);
                }
            }
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, "cannot read requests to answer them; aborting the connection");
                abort();
                return;
            }
        }
    }
}
