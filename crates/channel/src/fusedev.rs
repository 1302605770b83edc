//! The fusedev channel: a `/dev/fuse` descriptor bound to one mount.
//!
//! The kernel hands each request to exactly one reader and expects the reply on the
//! same cloned descriptor (each clone has its own processing list). This module owns
//! opening the device, `FUSE_DEV_IOC_CLONE`, and the two backing-file ioctls of FUSE
//! passthrough; it must never decide which process holds which clone (the supervisor
//! does, see DESIGN.md on `fuse_dev_release`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::{Channel, ChannelError};

const FUSE_DEV_IOC_MAGIC: u32 = 229;
const fn ioc(dir: u32, nr: u32, size: u32) -> u32 {
    (dir << 30) | (size << 16) | (FUSE_DEV_IOC_MAGIC << 8) | nr
}
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
/// `_IOR(229, 0, uint32_t)`
const FUSE_DEV_IOC_CLONE: u32 = ioc(IOC_READ, 0, 4);
/// `_IOW(229, 1, struct fuse_backing_map)`
const FUSE_DEV_IOC_BACKING_OPEN: u32 = ioc(IOC_WRITE, 1, 16);
/// `_IOW(229, 2, uint32_t)`
const FUSE_DEV_IOC_BACKING_CLOSE: u32 = ioc(IOC_WRITE, 2, 4);

/// Opens a new, unbound `/dev/fuse` descriptor.
pub fn open_device() -> Result<OwnedFd, ChannelError> {
    rustix::fs::open("/dev/fuse", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| ChannelError::OpenDevice(e.into()))
}

/// Makes a new descriptor that serves the same mount as `session`
/// (`FUSE_DEV_IOC_CLONE`), with its own processing list.
pub fn clone_session(session: BorrowedFd<'_>) -> Result<OwnedFd, ChannelError> {
    let fd = open_device()?;
    let mut src: u32 = session.as_raw_fd() as u32;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the session descriptor number) through
    // the pointer, which points at a live u32 for the duration of the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), FUSE_DEV_IOC_CLONE as _, &mut src) };
    if rc < 0 {
        return Err(ChannelError::Clone(io::Error::last_os_error()));
    }
    Ok(fd)
}

/// Registers `file` as a passthrough backing file on the mount of `dev` and returns
/// its backing id (`FUSE_DEV_IOC_BACKING_OPEN`; needs CAP_SYS_ADMIN in the initial
/// user namespace).
pub fn backing_open(dev: BorrowedFd<'_>, file: BorrowedFd<'_>) -> io::Result<i32> {
    let map = fsva_protocol::abi::BackingMap {
        fd: file.as_raw_fd(),
        flags: 0,
        padding: 0,
    };
    // SAFETY: the ioctl reads a `struct fuse_backing_map`, whose layout `BackingMap`
    // mirrors; the pointer is valid for the call.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_OPEN as _, &map) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Drops a backing id registered with [`backing_open`].
pub fn backing_close(dev: BorrowedFd<'_>, id: i32) -> io::Result<()> {
    let id = id as u32;
    // SAFETY: the ioctl reads one u32 through a pointer valid for the call.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_CLOSE as _, &id) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One `/dev/fuse` descriptor used as a channel.
#[derive(Debug)]
pub struct FuseDev {
    fd: OwnedFd,
}

impl FuseDev {
    pub fn new(fd: OwnedFd) -> Self {
        Self { fd }
    }
}

impl AsFd for FuseDev {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Channel for FuseDev {
    fn receive(&self, buf: &mut [u8]) -> Result<Option<usize>, ChannelError> {
        loop {
            match rustix::io::read(&self.fd, &mut *buf) {
                Ok(n) => return Ok(Some(n)),
                // ENOENT: the request was interrupted before we read it; EINTR: a signal.
                Err(Errno::INTR) | Err(Errno::NOENT) | Err(Errno::AGAIN) => continue,
                // ENODEV: the file system was unmounted or the connection aborted.
                Err(Errno::NODEV) => return Ok(None),
                Err(e) => {
                    return Err(ChannelError::Receive {
                        what: "/dev/fuse",
                        source: e.into(),
                    })
                }
            }
        }
    }

    fn send(&self, frame: &[u8]) -> Result<(), ChannelError> {
        loop {
            match rustix::io::write(&self.fd, frame) {
                Ok(_) => return Ok(()),
                Err(Errno::INTR) => continue,
                // ENOENT: the request was interrupted or aborted meanwhile; nobody waits.
                Err(Errno::NOENT) => return Ok(()),
                Err(Errno::NODEV) => return Ok(()),
                Err(e) => {
                    return Err(ChannelError::Send {
                        what: "/dev/fuse",
                        source: e.into(),
                    })
                }
            }
        }
    }
}
