//! The shared-memory data path of a stream channel: large frames travel through a
//! memory region both ends map, and only a small descriptor crosses the stream.
//!
//! A VM appliance's stream is a virtio-serial port, which moves bytes in page-sized
//! buffers through an emulated device; a memory region QEMU shares between the host and
//! the guest (an `ivshmem-plain` BAR backed by the supervisor's memfd) moves them at
//! memory speed. Layout of the region (all integers little-endian):
//!
//! ```text
//! 0     magic "FSVASHM1" | u32 slot size | u32 slots per direction
//! 256   u32 state per slot, direction 0 (supervisor → appliance), then direction 1
//! 4096  direction 0 slots, then direction 1 slots, each `slot size` bytes
//! ```
//!
//! A sender claims a free slot (state 0 → 1, compare-and-swap), copies the whole frame
//! into it and writes a 24-byte descriptor frame on the stream — `len = 24`, then the
//! marker `0xffff_ffff` where a request has its opcode and a reply its error (no real
//! frame has either), the slot and the frame's length. The receiver copies the frame
//! out, checks it, and frees the slot (state → 0). The stream stays the only doorbell,
//! so frames keep their order. With no free slot, or a small frame, the frame goes
//! inline as before. The region is shared with the other side, which may be hostile:
//! nothing read from it is trusted beyond a bounds-checked copy, and a frame is
//! validated only after it was copied out.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::stream::read_frame;
use crate::ChannelError;

const MAGIC: &[u8; 8] = b"FSVASHM1";
const HEADER: usize = 4096;
const STATES: usize = 256;
/// Most slots per direction (the state words must fit before the slots).
const MAX_SLOTS: usize = (HEADER - STATES) / 4 / 2;
/// Frames at least this long go through the region.
pub const THRESHOLD: usize = 2048;
/// Length of a descriptor frame.
const DESCRIPTOR: usize = 24;
const MARKER: u32 = 0xffff_ffff;

/// Which end of the region this is: it sends in one direction and receives in the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The supervisor: sends requests (direction 0), receives replies (direction 1).
    Supervisor,
    /// The appliance: the other way round.
    Appliance,
}

/// A mapped region.
#[derive(Debug)]
pub struct ShmRegion {
    ptr: *mut u8,
    len: usize,
    slot_size: usize,
    slots: usize,
    end: End,
}

// SAFETY: the region is plain shared memory; every access goes through atomics (slot
// states) or through copies into and out of slots a thread owns by its claim.
unsafe impl Send for ShmRegion {}
// SAFETY: as above; concurrent senders claim distinct slots by compare-and-swap.
unsafe impl Sync for ShmRegion {}

impl Drop for ShmRegion {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; no reference outlives self.
        let _ = unsafe { rustix::mm::munmap(self.ptr.cast(), self.len) };
    }
}

fn map(fd: impl AsFd, len: usize) -> io::Result<*mut u8> {
    use rustix::mm::{mmap, MapFlags, ProtFlags};
    // SAFETY: a fresh shared mapping of `len` bytes of `fd`; nothing else is mapped at
    // the returned address, and it is unmapped only by Drop.
    let p = unsafe {
        mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED,
            fd,
            0,
        )
    }?;
    Ok(p.cast())
}

impl ShmRegion {
    /// Creates a region of `len` bytes (a memfd, laid out for frames of up to
    /// `slot_size` bytes) for the supervisor; the memfd is for the other side.
    pub fn create(len: usize, slot_size: usize) -> io::Result<(OwnedFd, ShmRegion)> {
        if slot_size < 4096 || slot_size > u32::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "slot size out of range",
            ));
        }
        let fd = rustix::fs::memfd_create(
            "fsva-shm",
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        // The other side (QEMU) gets this descriptor: it must not be able to shrink the
        // region under our mapping (a SIGBUS here) or grow it.
        rustix::fs::fcntl_add_seals(
            &fd,
            rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW,
        )?;
        let slots = ((len.saturating_sub(HEADER)) / slot_size / 2).min(MAX_SLOTS);
        if slots == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "region too small for one slot per direction",
            ));
        }
        let ptr = map(&fd, len)?;
        let region = ShmRegion {
            ptr,
            len,
            slot_size,
            slots,
            end: End::Supervisor,
        };
        // SAFETY: the header lies within the mapping, which nobody else uses yet.
        unsafe {
            std::ptr::copy_nonoverlapping(MAGIC.as_ptr(), ptr, 8);
            std::ptr::write_unaligned(ptr.add(8).cast::<u32>(), (slot_size as u32).to_le());
            std::ptr::write_unaligned(ptr.add(12).cast::<u32>(), (slots as u32).to_le());
        }
        Ok((fd, region))
    }

    /// Maps an existing region (the appliance's side), checking its header.
    pub fn open(fd: impl AsFd, len: usize, end: End) -> io::Result<ShmRegion> {
        if len < HEADER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "region too small",
            ));
        }
        let ptr = map(fd, len)?;
        let mut head = [0u8; 16];
        // SAFETY: 16 bytes within the mapping.
        unsafe { std::ptr::copy_nonoverlapping(ptr, head.as_mut_ptr(), 16) };
        let slot_size = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
        let slots = u32::from_le_bytes([head[12], head[13], head[14], head[15]]) as usize;
        let region = ShmRegion {
            ptr,
            len,
            slot_size,
            slots,
            end,
        };
        let fits = slots
            .checked_mul(2)
            .and_then(|n| n.checked_mul(slot_size))
            .and_then(|n| n.checked_add(HEADER))
            .is_some_and(|n| n <= len);
        if &head[..8] != MAGIC || slots == 0 || slots > MAX_SLOTS || slot_size < 4096 || !fits {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not an fsva shared-memory region (bad header)",
            ));
        }
        Ok(region)
    }

    /// Slots per direction.
    pub fn slots(&self) -> usize {
        self.slots
    }

    fn direction(&self, sending: bool) -> usize {
        match (self.end, sending) {
            (End::Supervisor, true) | (End::Appliance, false) => 0,
            _ => 1,
        }
    }

    fn state(&self, dir: usize, slot: usize) -> &AtomicU32 {
        debug_assert!(slot < self.slots);
        // SAFETY: STATES + 4 * (dir * MAX_SLOTS + slot) < HEADER <= len, 4-aligned
        // (the mapping is page-aligned); AtomicU32 has u32's layout and the word is
        // only ever accessed atomically.
        unsafe {
            &*(self
                .ptr
                .add(STATES + 4 * (dir * MAX_SLOTS + slot))
                .cast::<AtomicU32>())
        }
    }

    fn slot_ptr(&self, dir: usize, slot: usize) -> *mut u8 {
        // SAFETY: open/create checked HEADER + 2 * slots * slot_size <= len.
        unsafe {
            self.ptr
                .add(HEADER + (dir * self.slots + slot) * self.slot_size)
        }
    }

    /// Sends `frame` on `stream`: through a slot when it is large and one is free,
    /// inline otherwise.
    pub fn send(&self, mut stream: impl Write, frame: &[u8]) -> io::Result<()> {
        if frame.len() < THRESHOLD || frame.len() > self.slot_size {
            return stream.write_all(frame);
        }
        let dir = self.direction(true);
        let Some(slot) = (0..self.slots).find(|&i| {
            self.state(dir, i)
                .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        }) else {
            return stream.write_all(frame);
        };
        // SAFETY: we own the slot (claimed above) and frame fits in it.
        unsafe {
            std::ptr::copy_nonoverlapping(frame.as_ptr(), self.slot_ptr(dir, slot), frame.len())
        };
        let mut d = [0u8; DESCRIPTOR];
        d[0..4].copy_from_slice(&(DESCRIPTOR as u32).to_ne_bytes());
        d[4..8].copy_from_slice(&MARKER.to_ne_bytes());
        d[8..12].copy_from_slice(&(slot as u32).to_ne_bytes());
        d[12..16].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        let sent = stream.write_all(&d);
        if sent.is_err() {
            self.state(dir, slot).store(0, Ordering::Release);
        }
        sent
    }

    /// Receives one frame into `buf` (whatever way it came); `None` at a clean end of
    /// stream. A descriptor naming a slot that does not exist, a length outside
    /// `min..=buf.len()` or a frame whose own length disagrees is an error.
    pub fn receive(
        &self,
        stream: impl Read,
        buf: &mut [u8],
        min: usize,
        what: &'static str,
    ) -> Result<Option<usize>, ChannelError> {
        let Some(n) = read_frame(stream, buf, min.min(DESCRIPTOR), what)? else {
            return Ok(None);
        };
        let word = |b: &[u8], o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        if n != DESCRIPTOR || word(buf, 4) != MARKER {
            if n < min {
                return Err(ChannelError::BadFrameLength {
                    what,
                    len: n,
                    min,
                    max: buf.len(),
                });
            }
            return Ok(Some(n));
        }
        let (slot, len) = (word(buf, 8) as usize, word(buf, 12) as usize);
        let max = buf.len().min(self.slot_size);
        let bad = |len| ChannelError::BadFrameLength {
            what,
            len,
            min,
            max,
        };
        if slot >= self.slots {
            return Err(bad(slot));
        }
        if len < min.max(4) || len > buf.len() || len > self.slot_size {
            return Err(bad(len));
        }
        let dir = self.direction(false);
        // SAFETY: the slot lies within the mapping and len <= slot_size, len <= buf.len().
        // The other side may still write to it: we only copy bytes out.
        unsafe { std::ptr::copy_nonoverlapping(self.slot_ptr(dir, slot), buf.as_mut_ptr(), len) };
        self.state(dir, slot).store(0, Ordering::Release);
        let declared = word(buf, 0) as usize;
        if declared != len {
            return Err(bad(declared));
        }
        Ok(Some(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![fill; len];
        f[..4].copy_from_slice(&(len as u32).to_ne_bytes());
        f
    }

    #[test]
    fn large_frames_cross_the_region_and_small_ones_stay_inline() {
        let (fd, sup) = ShmRegion::create(8 << 20, (1 << 20) + 8192).unwrap();
        let app = ShmRegion::open(&fd, 8 << 20, End::Appliance).unwrap();
        assert_eq!(sup.slots(), 3);
        let (a, b) = UnixStream::pair().unwrap();
        let mut buf = vec![0u8; (1 << 20) + 8192];
        for len in [40, 4096, 1 << 20, (1 << 20) + 8192] {
            let f = frame(len, (len % 251) as u8);
            sup.send(&a, &f).unwrap();
            let n = app.receive(&b, &mut buf, 40, "test").unwrap().unwrap();
            assert_eq!(&buf[..n], &f[..]);
            let f = frame(len, 7);
            app.send(&b, &f).unwrap();
            let n = sup.receive(&a, &mut buf, 16, "test").unwrap().unwrap();
            assert_eq!(&buf[..n], &f[..]);
        }
        // All slots busy (nobody receives): frames still go, inline.
        for _ in 0..5 {
            sup.send(&a, &frame(8192, 1)).unwrap();
        }
        for _ in 0..5 {
            assert_eq!(app.receive(&b, &mut buf, 40, "t").unwrap(), Some(8192));
        }
    }

    #[test]
    fn hostile_descriptors_and_headers_are_refused() {
        let (fd, sup) = ShmRegion::create(8 << 20, (1 << 20) + 8192).unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let desc = |slot: u32, len: u32| {
            let mut d = [0u8; DESCRIPTOR];
            d[0..4].copy_from_slice(&24u32.to_ne_bytes());
            d[4..8].copy_from_slice(&MARKER.to_ne_bytes());
            d[8..12].copy_from_slice(&slot.to_ne_bytes());
            d[12..16].copy_from_slice(&len.to_ne_bytes());
            d
        };
        for (slot, len) in [(3, 4096), (u32::MAX, 4096), (0, 1 << 20), (0, 3)] {
            a.write_all(&desc(slot, len)).unwrap();
            assert!(
                sup.receive(&b, &mut buf, 16, "t").is_err(),
                "slot {slot} len {len} accepted"
            );
        }
        // A slot whose frame claims another length than the descriptor.
        let app = ShmRegion::open(&fd, 8 << 20, End::Appliance).unwrap();
        let mut f = frame(4096, 1);
        app.send(&a, &f).unwrap();
        assert!(sup.receive(&b, &mut buf, 16, "t").is_ok());
        f[..4].copy_from_slice(&100u32.to_ne_bytes());
        app.send(&a, &f).unwrap();
        assert!(sup.receive(&b, &mut buf, 16, "t").is_err());
        // Bad headers are refused at open.
        let junk = rustix::fs::memfd_create("junk", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&junk, 1 << 20).unwrap();
        assert!(ShmRegion::open(&junk, 1 << 20, End::Appliance).is_err());
    }
}
