//! The stream channel: FUSE frames over a connected byte stream.
//!
//! FUSE frames are self-delimiting (both headers start with the frame's total length),
//! so the stream carries them back to back with no extra framing. Several worker
//! threads share one stream: whole frames are read and written under a lock, so frames
//! never interleave. This module must never trust a length it reads: every frame is
//! bounds-checked before its body is read.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use crate::shm::ShmRegion;

use crate::{Channel, ChannelError};

/// Reads one whole frame whose first four bytes give its length (as in both FUSE
/// headers) into `buf`. `min` is the size of the header the frame must at least hold;
/// the frame may not be longer than `buf`. Returns `None` on a clean end of stream
/// between frames.
pub fn read_frame(
    mut stream: impl Read,
    buf: &mut [u8],
    min: usize,
    what: &'static str,
) -> Result<Option<usize>, ChannelError> {
    let rx = |source| ChannelError::Receive { what, source };
    let mut len_bytes = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match stream.read(&mut len_bytes[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(rx(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(rx(e)),
        }
    }
    let len = u32::from_ne_bytes(len_bytes) as usize;
    if len < min.max(4) || len > buf.len() {
        return Err(ChannelError::BadFrameLength {
            what,
            len,
            min,
            max: buf.len(),
        });
    }
    buf[..4].copy_from_slice(&len_bytes);
    stream.read_exact(&mut buf[4..len]).map_err(rx)?;
    Ok(Some(len))
}

/// Writes one whole frame to `stream`, through the shared-memory region when one is in
/// use (see [`crate::shm`]).
pub fn send_frame(
    stream: impl Write + AsFd,
    shm: Option<&ShmRegion>,
    frame: &[u8],
) -> io::Result<()> {
    match shm {
        Some(shm) => shm.send(stream, frame),
        None => {
            let mut stream = stream;
            stream.write_all(frame)
        }
    }
}

/// Reads one whole frame from `stream` (as [`read_frame`]), through the shared-memory
/// region when one is in use; `expecting` says whether a frame is due (see
/// [`ShmRegion::receive`]).
pub fn receive_frame<S: Read + AsFd>(
    stream: S,
    shm: Option<&ShmRegion>,
    buf: &mut [u8],
    min: usize,
    what: &'static str,
    expecting: impl Fn() -> bool,
) -> Result<Option<usize>, ChannelError> {
    match shm {
        Some(shm) => shm.receive(stream, buf, min, what, expecting),
        None => read_frame(stream, buf, min, what),
    }
}

/// The appliance's end of a stream channel: a connected unix socket, or a character
/// device that moves bytes the same way (a VM's virtio-serial port).
#[derive(Debug)]
pub struct StreamChannel {
    reader: Mutex<File>,
    writer: Mutex<File>,
    /// Frames go through this region when the supervisor offered one.
    shm: Option<Arc<ShmRegion>>,
}

impl StreamChannel {
    pub fn new(stream: impl Into<OwnedFd>) -> io::Result<Self> {
        Self::with_shm(stream, None)
    }

    /// A stream whose frames travel through `shm` (see [`crate::shm`]), the stream only
    /// ringing for a sleeping reader.
    pub fn with_shm(stream: impl Into<OwnedFd>, shm: Option<Arc<ShmRegion>>) -> io::Result<Self> {
        let reader = File::from(stream.into());
        Ok(Self {
            writer: Mutex::new(reader.try_clone()?),
            reader: Mutex::new(reader),
            shm,
        })
    }
}

const REQUEST_HEADER: usize = core::mem::size_of::<fsva_protocol::abi::InHeader>();

impl Channel for StreamChannel {
    fn receive(&self, buf: &mut [u8]) -> Result<Option<usize>, ChannelError> {
        let reader = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        receive_frame(
            &*reader,
            self.shm.as_deref(),
            buf,
            REQUEST_HEADER,
            "stream channel",
            // Requests come when the application makes them: always worth a look.
            || true,
        )
    }

    fn send(&self, frame: &[u8]) -> Result<(), ChannelError> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        send_frame(&mut *writer, self.shm.as_deref(), frame).map_err(|source| ChannelError::Send {
            what: "stream channel",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn frames_round_trip_and_bad_lengths_are_rejected() {
        let (a, b) = UnixStream::pair().unwrap();
        let chan = StreamChannel::new(b).unwrap();
        let mut frame = vec![0u8; 48];
        frame[..4].copy_from_slice(&48u32.to_ne_bytes());
        frame[47] = 9;
        (&a).write_all(&frame).unwrap();
        let mut buf = vec![0u8; 4096];
        assert_eq!(chan.receive(&mut buf).unwrap(), Some(48));
        assert_eq!(buf[47], 9);

        // A length shorter than a header.
        (&a).write_all(&8u32.to_ne_bytes()).unwrap();
        assert!(matches!(
            chan.receive(&mut buf),
            Err(ChannelError::BadFrameLength { len: 8, .. })
        ));
        // A length longer than the buffer.
        (&a).write_all(&100_000u32.to_ne_bytes()).unwrap();
        assert!(matches!(
            chan.receive(&mut buf),
            Err(ChannelError::BadFrameLength { len: 100_000, .. })
        ));
        drop(a);
        assert_eq!(chan.receive(&mut buf).unwrap(), None);
    }
}
