//! A control link: one `SOCK_SEQPACKET` unix socket carrying one postcard-encoded
//! [`Envelope`] per datagram, optionally with descriptors (`SCM_RIGHTS`).
//!
//! Seqpacket keeps message boundaries, so a truncated or oversized message is detected
//! (`MSG_TRUNC`) rather than silently merged with the next. This module must never
//! interpret a message beyond decoding it.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;

use crate::messages::{Envelope, CONTROL_VERSION};

/// Largest control message.
const MAX_MESSAGE: usize = 64 * 1024;
/// Most descriptors attached to one message (the kernel's SCM_MAX_FD).
pub const MAX_FDS: usize = 253;

#[derive(Debug, Error)]
pub enum LinkError {
    #[error("control socket {op} failed: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("control peer closed the connection")]
    Closed,
    #[error("control message is malformed or from an incompatible fsva version (this is protocol v{CONTROL_VERSION}): {0}")]
    Decode(postcard::Error),
    #[error("control message exceeds {MAX_MESSAGE} bytes or {MAX_FDS} descriptors")]
    TooLarge,
}

fn io(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> LinkError {
    move |e| LinkError::Io {
        op,
        source: e.into(),
    }
}

/// One end of a control connection.
#[derive(Debug)]
pub struct Link {
    fd: OwnedFd,
}

impl AsFd for Link {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Link {
    /// A connected pair (supervisor end, appliance end), close-on-exec.
    pub fn pair() -> Result<(Link, Link), LinkError> {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(io("socketpair"))?;
        Ok((Link { fd: a }, Link { fd: b }))
    }

    pub fn from_fd(fd: OwnedFd) -> Link {
        Link { fd }
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Connects to a listening control socket at `path`.
    pub fn connect(path: &Path) -> Result<Link, LinkError> {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(io("socket"))?;
        let addr = SocketAddrUnix::new(path).map_err(io("address"))?;
        rustix::net::connect(&fd, &addr).map_err(io("connect"))?;
        Ok(Link { fd })
    }

    /// Sends one message with `fds` attached.
    pub fn send<T: Serialize>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), LinkError> {
        if fds.len() > MAX_FDS {
            return Err(LinkError::TooLarge);
        }
        let bytes = postcard::to_stdvec(&Envelope::V1(msg)).map_err(LinkError::Decode)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(LinkError::TooLarge);
        }
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(LinkError::TooLarge);
        }
        rustix::net::sendmsg(
            &self.fd,
            &[IoSlice::new(&bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .map_err(io("send"))?;
        Ok(())
    }

    /// Drops every message already waiting (with its descriptors), without blocking;
    /// returns how many. For a requester whose earlier request timed out: its late
    /// answer must not be taken for the next request's.
    pub fn discard_pending(&self) -> usize {
        let mut buf = [0u8; 64];
        let mut discarded = 0;
        loop {
            let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            match rustix::net::recvmsg(
                &self.fd,
                &mut [IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
            ) {
                Err(rustix::io::Errno::INTR) => continue,
                Ok(got) if got.bytes > 0 || got.flags.contains(ReturnFlags::TRUNC) => {
                    // Descriptors the message carried close here.
                    for msg in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(rights) = msg {
                            rights.for_each(drop);
                        }
                    }
                    discarded += 1;
                }
                _ => return discarded,
            }
        }
    }

    /// Receives one message and the descriptors attached to it.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<(T, Vec<OwnedFd>), LinkError> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = loop {
            match rustix::net::recvmsg(
                &self.fd,
                &mut [IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Err(rustix::io::Errno::INTR) => continue,
                other => break other.map_err(io("receive"))?,
            }
        };
        let mut fds = Vec::new();
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = msg {
                fds.extend(rights);
            }
        }
        if got.flags.contains(ReturnFlags::TRUNC) || got.flags.contains(ReturnFlags::CTRUNC) {
            return Err(LinkError::TooLarge);
        }
        if got.bytes == 0 {
            return Err(LinkError::Closed);
        }
        let Envelope::V1(msg) =
            postcard::from_bytes(&buf[..got.bytes]).map_err(LinkError::Decode)?;
        Ok((msg, fds))
    }
}

/// A listening control socket (one per mount, for `fsva status` and `fsva umount`).
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
}

impl Listener {
    /// Binds at `path`, replacing a stale socket file left by a dead supervisor.
    pub fn bind(path: &Path) -> Result<Listener, LinkError> {
        let _ = std::fs::remove_file(path);
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(io("socket"))?;
        let addr = SocketAddrUnix::new(path).map_err(io("address"))?;
        rustix::net::bind(&fd, &addr).map_err(io("bind"))?;
        rustix::net::listen(&fd, 16).map_err(io("listen"))?;
        Ok(Listener { fd })
    }

    pub fn accept(&self) -> Result<Link, LinkError> {
        let fd = rustix::net::accept_with(&self.fd, SocketFlags::CLOEXEC).map_err(io("accept"))?;
        Ok(Link { fd })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn late_answers_are_discarded_before_the_next_request() {
        let (a, b) = Link::pair().unwrap();
        assert_eq!(b.discard_pending(), 0, "nothing waits on a new link");
        let file = tempfile_in_tmp();
        a.send(&ToSupervisor::CacheBudgetSet, &[file.as_fd()])
            .unwrap();
        a.send(&ToSupervisor::Stats(ApplianceStats::default()), &[])
            .unwrap();
        assert_eq!(b.discard_pending(), 2);
        a.send(&ToSupervisor::ClockSet, &[]).unwrap();
        let (got, _): (ToSupervisor, _) = b.recv().unwrap();
        assert!(matches!(got, ToSupervisor::ClockSet), "{got:?}");
        drop(a);
        assert_eq!(b.discard_pending(), 0, "a closed peer is not a message");
    }

    #[test]
    fn messages_and_descriptors_cross_a_link() {
        let (a, b) = Link::pair().unwrap();
        let mut file = tempfile_in_tmp();
        file.write_all(b"hello").unwrap();
        let msg = ToSupervisor::Ready { pid: 42 };
        a.send(&msg, &[file.as_fd()]).unwrap();
        let (got, fds): (ToSupervisor, _) = b.recv().unwrap();
        assert!(matches!(got, ToSupervisor::Ready { pid: 42 }));
        assert_eq!(fds.len(), 1);
        let mut passed = std::fs::File::from(fds.into_iter().next().unwrap());
        passed.rewind().unwrap();
        let mut s = String::new();
        passed.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
    }

    #[test]
    fn garbage_and_closed_peers_are_errors() {
        let (a, b) = Link::pair().unwrap();
        rustix::net::send(&a.fd, &[0xff, 0xff, 0xff], SendFlags::empty()).unwrap();
        assert!(matches!(
            b.recv::<ToSupervisor>(),
            Err(LinkError::Decode(_))
        ));
        drop(a);
        assert!(matches!(b.recv::<ToSupervisor>(), Err(LinkError::Closed)));
    }

    fn tempfile_in_tmp() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("fsva-link-test-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}
