//! Linux capabilities: the [`Capability`] type and the code that reduces the sandboxed
//! process to the capabilities the caller asked to keep.
//!
//! Owns: dropping from the bounding set (`PR_CAPBSET_DROP`), clearing the ambient set, and
//! setting effective/permitted (and emptying inheritable) with `capset`.
//! Must never: add a capability, or touch securebits (the appliance switches credentials
//! per request with `setfsuid`/`setfsgid`, and the kernel's usual "drop file-system
//! capabilities when fsuid leaves 0" rule is exactly the permission-check behaviour it needs).
//!
//! Capabilities here are those of the sandbox's *own* user namespace: even `CAP_SYS_ADMIN`
//! kept here is powerless over the host's namespaces.

use std::fmt;
use std::io;

macro_rules! capabilities {
    ($($variant:ident = $num:expr, $name:literal;)*) => {
        /// A Linux capability (see capabilities(7)). The discriminant is the kernel's number.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        #[allow(missing_docs)]
        pub enum Capability { $($variant = $num,)* }

        impl Capability {
            /// Every capability this crate knows, in kernel order.
            pub const ALL: &'static [Capability] = &[$(Capability::$variant,)*];

            /// The kernel's name, e.g. `"CAP_CHOWN"`.
            pub fn name(self) -> &'static str {
                match self { $(Capability::$variant => $name,)* }
            }
        }
    };
}

capabilities! {
    Chown = 0, "CAP_CHOWN";
    DacOverride = 1, "CAP_DAC_OVERRIDE";
    DacReadSearch = 2, "CAP_DAC_READ_SEARCH";
    Fowner = 3, "CAP_FOWNER";
    Fsetid = 4, "CAP_FSETID";
    Kill = 5, "CAP_KILL";
    Setgid = 6, "CAP_SETGID";
    Setuid = 7, "CAP_SETUID";
    Setpcap = 8, "CAP_SETPCAP";
    LinuxImmutable = 9, "CAP_LINUX_IMMUTABLE";
    NetBindService = 10, "CAP_NET_BIND_SERVICE";
    NetBroadcast = 11, "CAP_NET_BROADCAST";
    NetAdmin = 12, "CAP_NET_ADMIN";
    NetRaw = 13, "CAP_NET_RAW";
    IpcLock = 14, "CAP_IPC_LOCK";
    IpcOwner = 15, "CAP_IPC_OWNER";
    SysModule = 16, "CAP_SYS_MODULE";
    SysRawio = 17, "CAP_SYS_RAWIO";
    SysChroot = 18, "CAP_SYS_CHROOT";
    SysPtrace = 19, "CAP_SYS_PTRACE";
    SysPacct = 20, "CAP_SYS_PACCT";
    SysAdmin = 21, "CAP_SYS_ADMIN";
    SysBoot = 22, "CAP_SYS_BOOT";
    SysNice = 23, "CAP_SYS_NICE";
    SysResource = 24, "CAP_SYS_RESOURCE";
    SysTime = 25, "CAP_SYS_TIME";
    SysTtyConfig = 26, "CAP_SYS_TTY_CONFIG";
    Mknod = 27, "CAP_MKNOD";
    Lease = 28, "CAP_LEASE";
    AuditWrite = 29, "CAP_AUDIT_WRITE";
    AuditControl = 30, "CAP_AUDIT_CONTROL";
    Setfcap = 31, "CAP_SETFCAP";
    MacOverride = 32, "CAP_MAC_OVERRIDE";
    MacAdmin = 33, "CAP_MAC_ADMIN";
    Syslog = 34, "CAP_SYSLOG";
    WakeAlarm = 35, "CAP_WAKE_ALARM";
    BlockSuspend = 36, "CAP_BLOCK_SUSPEND";
    AuditRead = 37, "CAP_AUDIT_READ";
    Perfmon = 38, "CAP_PERFMON";
    Bpf = 39, "CAP_BPF";
    CheckpointRestore = 40, "CAP_CHECKPOINT_RESTORE";
}

impl Capability {
    /// The kernel's capability number.
    pub fn number(self) -> u32 {
        self as u32
    }

    /// The bit of this capability in a 64-bit capability mask.
    pub fn mask(self) -> u64 {
        1u64 << self.number()
    }

    /// Parse `"CAP_CHOWN"`, `"chown"` or `"cap_chown"`.
    pub fn from_name(name: &str) -> Option<Capability> {
        let upper = name.to_ascii_uppercase();
        let full = if upper.starts_with("CAP_") {
            upper
        } else {
            format!("CAP_{upper}")
        };
        Capability::ALL.iter().copied().find(|c| c.name() == full)
    }

    /// Mask with the bits of all `caps`.
    pub fn mask_of(caps: &[Capability]) -> u64 {
        caps.iter().fold(0, |m, c| m | c.mask())
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Highest capability number the running kernel knows: reads
/// `/proc/sys/kernel/cap_last_cap` (call before the root is switched), falling back to
/// probing `PR_CAPBSET_READ`.
pub(crate) fn last_cap() -> u32 {
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap") {
        if let Ok(n) = s.trim().parse::<u32>() {
            return n;
        }
    }
    let mut n = 0;
    while n < 63 && crate::sys::capbset_read(n + 1).is_ok() {
        n += 1;
    }
    n
}

/// Which step of dropping capabilities failed.
#[derive(Debug)]
pub(crate) struct CapDropError {
    pub(crate) step: &'static str,
    pub(crate) source: io::Error,
}

/// Reduce the calling thread (the sandbox child is still single-threaded here) to `keep`:
/// bounding set, ambient set, then effective/permitted/inheritable.
pub(crate) fn drop_to(keep: &[Capability], last_cap: u32) -> Result<(), CapDropError> {
    let keep_mask = Capability::mask_of(keep);
    for cap in 0..=last_cap.min(63) {
        if keep_mask & (1u64 << cap) != 0 {
            continue;
        }
        match crate::sys::capbset_drop(cap) {
            Ok(()) => {}
            // A number the kernel does not know is not in any set.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(source) => {
                return Err(CapDropError {
                    step: "PR_CAPBSET_DROP",
                    source,
                })
            }
        }
    }
    rustix::thread::clear_ambient_capability_set().map_err(|e| CapDropError {
        step: "PR_CAP_AMBIENT_CLEAR_ALL",
        source: e.into(),
    })?;
    let set = rustix::thread::CapabilitySet::from_bits_retain(keep_mask);
    let sets = rustix::thread::CapabilitySets {
        effective: set,
        permitted: set,
        inheritable: rustix::thread::CapabilitySet::empty(),
    };
    rustix::thread::set_capabilities(None, sets).map_err(|e| CapDropError {
        step: "capset",
        source: e.into(),
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for c in Capability::ALL {
            assert_eq!(Capability::from_name(c.name()), Some(*c));
        }
        assert_eq!(Capability::from_name("chown"), Some(Capability::Chown));
        assert_eq!(
            Capability::from_name("cap_sys_admin"),
            Some(Capability::SysAdmin)
        );
        assert_eq!(Capability::from_name("nope"), None);
        assert_eq!(Capability::ALL.len(), 41);
        for (i, c) in Capability::ALL.iter().enumerate() {
            assert_eq!(c.number() as usize, i);
        }
    }
}
