//! Opcodes the appliance does not serve, which the FUSE client asks about again and
//! again: the relay answers ENOSYS for them itself once the appliance has.
//!
//! The kernel remembers ENOSYS for most operations (FLUSH, FSYNC, GETXATTR, ...) and
//! stops sending them. Not for IOCTL: it turns the answer into ENOTTY for the caller
//! and sends the next one anyway. Python's `open` asks `isatty` of every file it opens
//! (an ioctl that FUSE forwards), so each open of a file costs a round trip that can
//! only end in ENOSYS when the appliance serves no ioctl at all, as fsva's do.
//!
//! Owns that knowledge for one relay. An appliance that answered ENOSYS to an opcode
//! serves it for no argument (one that served some ioctls would answer ENOTTY to the
//! rest), so the answer holds for the appliance's life. It never answers an opcode
//! before the appliance has, nor anything but IOCTL.

use std::sync::atomic::{AtomicBool, Ordering};

use fsva_protocol::abi::{opcode, InHeader, OutHeader};
use zerocopy::FromBytes;

/// What the relay should do with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Answer ENOSYS now; do not forward.
    Unserved,
    /// Forward it; `true`: hand its reply to [`Unserved::learn`].
    Forward(bool),
}

/// What one relay knows the appliance does not serve.
#[derive(Default)]
pub struct Unserved {
    ioctl: AtomicBool,
}

impl Unserved {
    pub fn new() -> Self {
        Self::default()
    }

    /// Looks at a request on its way to the appliance.
    pub fn on_request(&self, header: &InHeader) -> Verdict {
        match header.opcode {
            opcode::IOCTL if self.ioctl.load(Ordering::Relaxed) => Verdict::Unserved,
            opcode::IOCTL => Verdict::Forward(true),
            _ => Verdict::Forward(false),
        }
    }

    /// Learns from the reply (`frame`, header included) to an IOCTL.
    pub fn learn(&self, frame: &[u8]) {
        if let Ok((h, _)) = OutHeader::read_from_prefix(frame) {
            if h.error == -libc::ENOSYS {
                self.ioctl.store(true, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fsva_protocol::reply::ReplyBuf;

    fn header(op: u32) -> InHeader {
        InHeader {
            opcode: op,
            nodeid: 5,
            ..Default::default()
        }
    }

    #[test]
    fn ioctl_is_answered_here_only_after_the_appliance_said_enosys() {
        let u = Unserved::new();
        assert_eq!(
            u.on_request(&header(opcode::GETATTR)),
            Verdict::Forward(false)
        );
        assert_eq!(u.on_request(&header(opcode::IOCTL)), Verdict::Forward(true));
        // Another answer (an ioctl it serves, or ENOTTY for one it does not) teaches
        // nothing.
        u.learn(ReplyBuf::default().error(3, libc::ENOTTY));
        u.learn(ReplyBuf::default().empty(3));
        assert_eq!(u.on_request(&header(opcode::IOCTL)), Verdict::Forward(true));
        u.learn(ReplyBuf::default().error(3, libc::ENOSYS));
        assert_eq!(u.on_request(&header(opcode::IOCTL)), Verdict::Unserved);
        assert_eq!(
            u.on_request(&header(opcode::GETATTR)),
            Verdict::Forward(false)
        );
    }
}
