//! Timestamps and attribute replies.
//!
//! Owns the nanosecond [`Time`] type (CLOCK_REALTIME), the conversion of an inode's
//! metadata into `fuse_attr` / `statx` replies, and the relatime rule. It must never
//! look anything up or take a lock: callers hand it the values to convert.

use fsva_protocol::abi;

/// A point in time with nanosecond precision (seconds may be negative: before 1970).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

impl Time {
    /// The current CLOCK_REALTIME.
    pub fn now() -> Time {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
        Time {
            sec: ts.tv_sec,
            nsec: ts.tv_nsec as u32,
        }
    }

    /// A time as FUSE sends it (`u64` seconds that are really `s64`).
    pub fn from_wire(sec: u64, nsec: u32) -> Time {
        Time {
            sec: sec as i64,
            nsec: nsec.min(999_999_999),
        }
    }

    fn sx(self) -> abi::SxTime {
        abi::SxTime {
            tv_sec: self.sec,
            tv_nsec: self.nsec,
            reserved: 0,
        }
    }
}

/// Everything an attribute reply needs, gathered by the caller.
#[derive(Debug, Clone, Copy, Default)]
pub struct Meta {
    pub ino: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    /// 512-byte blocks.
    pub blocks: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub btime: Time,
}

/// Preferred I/O size reported to applications.
pub const BLKSIZE: u32 = 4096;

impl Meta {
    pub fn to_attr(&self) -> abi::Attr {
        abi::Attr {
            ino: self.ino,
            size: self.size,
            blocks: self.blocks,
            atime: self.atime.sec as u64,
            mtime: self.mtime.sec as u64,
            ctime: self.ctime.sec as u64,
            atimensec: self.atime.nsec,
            mtimensec: self.mtime.nsec,
            ctimensec: self.ctime.nsec,
            mode: self.mode,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: self.rdev,
            blksize: BLKSIZE,
            flags: 0,
        }
    }

    pub fn to_statx(&self) -> abi::Statx {
        abi::Statx {
            mask: libc::STATX_BASIC_STATS | libc::STATX_BTIME,
            blksize: BLKSIZE,
            attributes: 0,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            mode: self.mode as u16,
            ino: self.ino,
            size: self.size,
            blocks: self.blocks,
            attributes_mask: 0,
            atime: self.atime.sx(),
            btime: self.btime.sx(),
            ctime: self.ctime.sx(),
            mtime: self.mtime.sx(),
            rdev_major: libc::major(self.rdev as libc::dev_t),
            rdev_minor: libc::minor(self.rdev as libc::dev_t),
            ..Default::default()
        }
    }
}

/// The relatime rule (as ext4 mounted `relatime`): a read updates atime when atime is
/// not newer than mtime or ctime, or is more than a day old.
pub fn relatime_due(atime: Time, mtime: Time, ctime: Time, now: Time) -> bool {
    atime <= mtime || atime <= ctime || now.sec - atime.sec >= 24 * 3600
}

/// `DT_*` type of a mode, for directory entries.
pub fn dtype(mode: u32) -> u32 {
    (mode & libc::S_IFMT) >> 12
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relatime() {
        let t = |s| Time { sec: s, nsec: 0 };
        assert!(relatime_due(t(10), t(10), t(5), t(11)));
        assert!(!relatime_due(t(11), t(10), t(10), t(12)));
        assert!(relatime_due(t(11), t(10), t(10), t(11 + 86400)));
    }

    #[test]
    fn dtype_of_modes() {
        assert_eq!(dtype(libc::S_IFDIR | 0o755), libc::DT_DIR as u32);
        assert_eq!(dtype(libc::S_IFREG), libc::DT_REG as u32);
        assert_eq!(dtype(libc::S_IFLNK), libc::DT_LNK as u32);
    }
}
