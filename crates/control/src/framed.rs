//! A control link over a byte stream: one postcard-encoded [`Envelope`] per frame, each
//! frame a little-endian u32 length and that many bytes.
//!
//! VM appliances talk to their supervisor over a virtio-serial port, which keeps no
//! message boundaries and carries no descriptors; this is the [`crate::Link`] of that
//! case. A length above [`MAX_FRAME`] is refused before anything is allocated. This
//! module must never interpret a message beyond decoding it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{de::DeserializeOwned, Serialize};

use crate::link::LinkError;
use crate::messages::Envelope;

/// Largest control frame.
pub const MAX_FRAME: usize = 64 * 1024;

/// One end of a framed control connection. Sends and receives may come from different
/// threads; each direction is serialised by its own lock.
#[derive(Debug)]
pub struct FramedLink {
    reader: Mutex<File>,
    writer: Mutex<File>,
    /// Largest frame sent or accepted ([`MAX_FRAME`] unless [`FramedLink::with_max_frame`]).
    max: usize,
}

impl FramedLink {
    /// Wraps a connected stream (a socket or a character device).
    pub fn new(stream: impl Into<OwnedFd>) -> std::io::Result<Self> {
        Self::with_max_frame(stream, MAX_FRAME)
    }

    /// As [`FramedLink::new`], with frames of up to `max` bytes (a link that carries
    /// bulk data in its messages, such as a migration's; still refused before anything
    /// is allocated when a peer announces more).
    pub fn with_max_frame(stream: impl Into<OwnedFd>, max: usize) -> std::io::Result<Self> {
        let reader = File::from(stream.into());
        Ok(Self {
            writer: Mutex::new(reader.try_clone()?),
            reader: Mutex::new(reader),
            max,
        })
    }

    /// Sends one message.
    pub fn send<T: Serialize>(&self, msg: &T) -> Result<(), LinkError> {
        let body = postcard::to_stdvec(&Envelope::V1(msg)).map_err(LinkError::Decode)?;
        if body.len() > self.max {
            return Err(LinkError::TooLarge);
        }
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.write_all(&frame).map_err(|source| LinkError::Io {
            op: "write",
            source,
        })
    }

    /// Receives one message; [`LinkError::Closed`] at a clean end of stream.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<T, LinkError> {
        self.recv_until(None)
    }

    /// Receives one message whole within `timeout` (not per read: a peer trickling bytes
    /// cannot stretch it); a late message is an `Io` error of kind `WouldBlock`.
    pub fn recv_within<T: DeserializeOwned>(&self, timeout: Duration) -> Result<T, LinkError> {
        self.recv_until(Some(Instant::now() + timeout))
    }

    fn recv_until<T: DeserializeOwned>(&self, deadline: Option<Instant>) -> Result<T, LinkError> {
        let mut r = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let r = &mut Deadlined {
            file: &mut r,
            deadline,
        };
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match r.read(&mut len[got..]) {
                Ok(0) if got == 0 => return Err(LinkError::Closed),
                Ok(0) => {
                    return Err(LinkError::Io {
                        op: "read",
                        source: std::io::ErrorKind::UnexpectedEof.into(),
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(LinkError::Io { op: "read", source }),
            }
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > self.max {
            return Err(LinkError::TooLarge);
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)
            .map_err(|source| LinkError::Io { op: "read", source })?;
        match postcard::from_bytes::<Envelope<T>>(&body).map_err(LinkError::Decode)? {
            Envelope::V1(m) => Ok(m),
        }
    }
}

/// A reader that waits for data only until `deadline`.
struct Deadlined<'a> {
    file: &'a mut File,
    deadline: Option<Instant>,
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(deadline) = self.deadline {
            use rustix::event::{poll, PollFd, PollFlags, Timespec};
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: left.subsec_nanos() as i64,
            };
            let mut fds = [PollFd::new(&*self.file, PollFlags::IN)];
            if poll(&mut fds, Some(&timeout))? == 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
        }
        self.file.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::ToSupervisor;
    use std::os::unix::net::UnixStream;

    #[test]
    fn messages_round_trip_and_hostile_lengths_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a2, mut raw) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let (a, b) = (FramedLink::new(a).unwrap(), FramedLink::new(b).unwrap());
        a.send(&ToSupervisor::Failed {
            message: "x".into(),
        })
        .unwrap();
        assert!(matches!(
            b.recv::<ToSupervisor>().unwrap(),
            ToSupervisor::Failed { message } if message == "x"
        ));
        raw.write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(a.recv::<ToSupervisor>(), Err(LinkError::TooLarge)));
        raw.write_all(&3u32.to_le_bytes()).unwrap();
        raw.write_all(&[9, 9, 9]).unwrap();
        assert!(matches!(
            a.recv::<ToSupervisor>(),
            Err(LinkError::Decode(_))
        ));
        // A peer trickling a message does not stretch the deadline past it.
        raw.write_all(&100u32.to_le_bytes()).unwrap();
        raw.write_all(&[0]).unwrap();
        let t0 = Instant::now();
        let r = a.recv_within::<ToSupervisor>(Duration::from_millis(200));
        assert!(
            matches!(&r, Err(LinkError::Io { source, .. }) if source.kind() == std::io::ErrorKind::WouldBlock),
            "{r:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(2));
        drop((raw, b));
        drop(a2);
        assert!(a.recv::<ToSupervisor>().is_err());
    }
}
