//! INIT negotiation: which protocol version and which capabilities a mount runs with.
//!
//! The kernel offers a version and capability flags; the backend says what it can serve
//! ([`crate::InitRequest`]); the runtime adds what it implements itself (large writes,
//! extended INIT, extended setxattr) and answers with the intersection. The outcome is
//! fixed for the life of the connection. Nothing here performs I/O.

use std::sync::OnceLock;

use fsva_protocol::abi::{self, init_flags as f};
use fsva_protocol::Negotiated;

use crate::filesystem::InitRequest;

/// Knobs the supervisor sets for one appliance session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Upper bound for WRITE payloads (and READ sizes); the backend may ask for less.
    pub max_write: u32,
    /// Capability bits the supervisor forbids (for example `POSIX_ACL` when the user
    /// mounted with `-o noacl`).
    pub deny_flags: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_write: 1 << 20,
            deny_flags: 0,
        }
    }
}

/// Flags the runtime itself implements, independent of the backend.
/// ASYNC_DIO: the runtime serves requests concurrently, so the kernel may split one
/// direct I/O into parallel requests.
const RUNTIME_FLAGS: u64 =
    f::BIG_WRITES | f::MAX_PAGES | f::INIT_EXT | f::SETXATTR_EXT | f::ASYNC_DIO;

/// What INIT settled.
#[derive(Debug, Clone, Copy)]
pub struct Negotiation {
    pub minor: u32,
    /// Capabilities in force (kernel offer ∩ what we asked).
    pub flags: u64,
    pub max_write: u32,
    pub codec: Negotiated,
}

impl Negotiation {
    pub fn has(&self, flag: u64) -> bool {
        self.flags & flag != 0
    }

    /// A predecessor's negotiation (live restart), as saved in its state.
    pub fn restored(s: crate::state::SessionV1) -> Negotiation {
        Negotiation {
            minor: s.minor,
            flags: s.flags,
            max_write: s.max_write,
            codec: Negotiated {
                setxattr_ext: s.flags & f::SETXATTR_EXT != 0,
            },
        }
    }

    /// What a successor needs to know of this negotiation.
    pub fn saved(&self) -> crate::state::SessionV1 {
        crate::state::SessionV1 {
            minor: self.minor,
            flags: self.flags,
            max_write: self.max_write,
        }
    }
}

/// The outcome of one INIT request.
pub enum InitReply {
    /// Send this reply; the session is established.
    Accept(abi::InitOut, Negotiation),
    /// The kernel speaks a newer major version: answer with ours only and wait for a new INIT.
    MajorOnly(abi::InitOut),
    /// Incompatible: answer with this errno.
    Refuse(i32),
}

/// Computes the INIT reply for `init`, given the backend's request.
pub fn negotiate(init: &abi::InitIn, backend: InitRequest, config: &SessionConfig) -> InitReply {
    if init.major > abi::KERNEL_VERSION {
        return InitReply::MajorOnly(abi::InitOut {
            major: abi::KERNEL_VERSION,
            minor: abi::KERNEL_MINOR_VERSION,
            ..Default::default()
        });
    }
    if init.major < abi::KERNEL_VERSION || init.minor < abi::MIN_KERNEL_MINOR_VERSION {
        return InitReply::Refuse(libc::EPROTO);
    }
    let minor = init.minor.min(abi::KERNEL_MINOR_VERSION);
    let mut offered = u64::from(init.flags);
    if offered & f::INIT_EXT != 0 {
        offered |= u64::from(init.flags2) << 32;
    }
    let wanted = (backend.flags | RUNTIME_FLAGS) & !config.deny_flags;
    let flags = offered & wanted;
    let max_write = backend.max_write.min(config.max_write).max(4096);
    let out = abi::InitOut {
        major: abi::KERNEL_VERSION,
        minor,
        max_readahead: init.max_readahead,
        flags: flags as u32,
        flags2: (flags >> 32) as u32,
        max_background: 64,
        congestion_threshold: 48,
        max_write,
        time_gran: 1,
        max_pages: max_write.div_ceil(page_size()) as u16,
        max_stack_depth: if flags & f::PASSTHROUGH != 0 { 1 } else { 0 },
        ..Default::default()
    };
    InitReply::Accept(
        out,
        Negotiation {
            minor,
            flags,
            max_write,
            codec: Negotiated {
                setxattr_ext: flags & f::SETXATTR_EXT != 0,
            },
        },
    )
}

/// The kernel's page size: `max_pages` counts pages of this size.
fn page_size() -> u32 {
    // sysconf answers from the auxiliary vector libc read at start-up: no system call
    // (rustix asks prctl(PR_GET_AUXV), which the appliance's seccomp policy refuses).
    // SAFETY: sysconf has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u32
    } else {
        4096
    }
}

/// The per-connection state shared by all workers.
#[derive(Debug, Default)]
pub struct Session {
    negotiation: OnceLock<Negotiation>,
}

impl Session {
    pub fn negotiation(&self) -> Option<&Negotiation> {
        self.negotiation.get()
    }

    pub fn establish(&self, n: Negotiation) {
        let _ = self.negotiation.set(n);
    }

    pub fn codec(&self) -> Negotiated {
        self.negotiation.get().map(|n| n.codec).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(major: u32, minor: u32, flags: u64) -> abi::InitIn {
        abi::InitIn {
            major,
            minor,
            max_readahead: 131072,
            flags: flags as u32,
            flags2: (flags >> 32) as u32,
            ..Default::default()
        }
    }

    const BACKEND: InitRequest = InitRequest {
        flags: f::ASYNC_READ | f::POSIX_ACL | f::PASSTHROUGH,
        max_write: 1 << 20,
    };

    #[test]
    fn accepts_the_intersection_of_offer_and_request() {
        let offer =
            f::ASYNC_READ | f::BIG_WRITES | f::INIT_EXT | f::WRITEBACK_CACHE | f::PASSTHROUGH;
        let InitReply::Accept(out, n) =
            negotiate(&init(7, 45, offer), BACKEND, &SessionConfig::default())
        else {
            panic!("refused")
        };
        assert_eq!(n.minor, 45);
        assert!(n.has(f::ASYNC_READ) && n.has(f::PASSTHROUGH) && n.has(f::BIG_WRITES));
        assert!(!n.has(f::WRITEBACK_CACHE), "not asked for");
        assert!(!n.has(f::POSIX_ACL), "not offered");
        assert_eq!(out.flags2, (f::PASSTHROUGH >> 32) as u32);
        assert_eq!(out.max_stack_depth, 1);
        assert_eq!(out.max_pages, 256);
    }

    #[test]
    fn high_flags_ignored_without_init_ext() {
        let InitReply::Accept(_, n) = negotiate(
            &init(7, 45, f::ASYNC_READ | f::PASSTHROUGH),
            BACKEND,
            &SessionConfig::default(),
        ) else {
            panic!("refused")
        };
        assert!(!n.has(f::PASSTHROUGH));
    }

    #[test]
    fn older_minor_is_used_and_ancient_refused() {
        let InitReply::Accept(out, _) =
            negotiate(&init(7, 38, 0), BACKEND, &SessionConfig::default())
        else {
            panic!("refused")
        };
        assert_eq!(out.minor, 38);
        assert!(matches!(
            negotiate(&init(7, 20, 0), BACKEND, &SessionConfig::default()),
            InitReply::Refuse(_)
        ));
        assert!(matches!(
            negotiate(&init(8, 0, 0), BACKEND, &SessionConfig::default()),
            InitReply::MajorOnly(_)
        ));
    }

    #[test]
    fn denied_flags_are_not_negotiated() {
        let cfg = SessionConfig {
            deny_flags: f::POSIX_ACL,
            ..Default::default()
        };
        let InitReply::Accept(_, n) =
            negotiate(&init(7, 45, f::POSIX_ACL | f::INIT_EXT), BACKEND, &cfg)
        else {
            panic!("refused")
        };
        assert!(!n.has(f::POSIX_ACL));
    }
}
