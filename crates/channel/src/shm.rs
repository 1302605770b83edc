//! The shared-memory path of a stream channel: every frame travels through a memory
//! region both ends map, and the stream is left as a doorbell for a reader that sleeps.
//!
//! A VM appliance's stream is a virtio-serial port: each frame through it costs QEMU's
//! main loop, an interrupt and a wake-up in the guest, a few hundred microseconds under
//! emulation. A memory region QEMU shares between the host and the guest (an
//! `ivshmem-plain` BAR backed by the supervisor's memfd) moves frames at memory speed,
//! and a reader that polls it while frames keep coming needs no interrupt at all.
//! Layout of the region (all integers little-endian, counters native):
//!
//! ```text
//! 0      magic "FSVASHM2" | u32 slot size | u32 slots per direction | u32 ring size
//! 64     ring words, each on its own 64-byte line: direction 0 head, tail, asleep,
//!        then direction 1 (see module `ring`)
//! 1024   u32 state per slot, direction 0 (supervisor → appliance), then direction 1
//! 4096   direction 0 slots, then direction 1 slots, each `slot size` bytes
//! ...    direction 0 ring, then direction 1 ring, each `ring size` bytes
//! ```
//!
//! Small frames go through the direction's ring (module `ring`). A large one is
//! copied into a free slot (state 0 → 1, compare-and-swap), and a 24-byte descriptor
//! frame goes through the ring in its place: `len = 24`, then the marker `0xffff_ffff`
//! where a request has its opcode and a reply its error (no real frame has either), the
//! slot and the frame's length. The receiver copies the frame out, checks it, and frees
//! the slot (state → 0). The ring keeps frames in order. A sender that finds no room
//! (the other end stopped reading) waits, and gives up when the stream is shut.
//!
//! The region is shared with the other side, which may be hostile: nothing read from it
//! is trusted beyond a bounds-checked copy, and a frame is validated only after it was
//! copied out.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::ring::{poll_for, Corrupt, Ring, RingWords, Taken};
use crate::ChannelError;

const MAGIC: &[u8; 8] = b"FSVASHM2";
const HEADER: usize = 4096;
const RING_WORDS: usize = 64;
const STATES: usize = 1024;
/// Most slots per direction (the state words must fit before the slots).
const MAX_SLOTS: usize = (HEADER - STATES) / 4 / 2;
/// Bytes of each direction's ring: room for hundreds of small frames, far more than
/// the kernel keeps outstanding.
const RING_BYTES: usize = 256 << 10;
/// Frames at least this long go through a slot.
pub const THRESHOLD: usize = 2048;
/// Length of a descriptor frame.
const DESCRIPTOR: usize = 24;
const MARKER: u32 = 0xffff_ffff;
/// How long the supervisor polls for a reply before it sleeps on the stream, by
/// default: long enough for most operations of an emulated guest (tens to hundreds of
/// microseconds). It polls only while a request waits, when the application that sent
/// it waits too; the guest's vCPU threads share the host's CPUs with it (it yields
/// between looks).
pub const SUPERVISOR_POLL: Duration = Duration::from_millis(1);
/// How long the appliance polls for the next request, by default: long enough for an
/// application's next system call to follow the reply to its last one.
pub const APPLIANCE_POLL: Duration = Duration::from_micros(200);
/// How long a sender with no room polls before it sleeps between looks.
const FULL_POLL: Duration = Duration::from_micros(200);
/// The longest a sender with no room sleeps between looks.
const FULL_NAP: Duration = Duration::from_millis(50);

/// Which end of the region this is: it sends in one direction and receives in the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The supervisor: sends requests (direction 0), receives replies (direction 1).
    Supervisor,
    /// The appliance: the other way round.
    Appliance,
}

/// How a sleeping receiver was woken.
enum Woken {
    Up,
    /// The stream ended.
    End,
    /// Nothing came within [`RECHECK`].
    TimedOut,
}

/// How long a receiver sleeps, while a frame is due, before it looks at its ring again
/// without a doorbell.
const RECHECK: Duration = Duration::from_millis(100);

/// The supervisor's own wake-up for its receiver: the appliance's replies are due only
/// after the supervisor sent requests, so its receiver sleeps while none waits and a
/// send wakes it here, without a trip through the device.
#[derive(Debug)]
struct LocalWake {
    /// The receiver sleeps and wants to hear of the next send.
    asleep: AtomicBool,
    /// An eventfd the sender counts up.
    fd: OwnedFd,
}

/// A mapped region.
#[derive(Debug)]
pub struct ShmRegion {
    ptr: *mut u8,
    len: usize,
    slot_size: usize,
    slots: usize,
    ring_size: usize,
    end: End,
    poll: Duration,
    /// At the supervisor's end only.
    local: Option<LocalWake>,
    /// Wake-ups by the recheck that found a frame nobody rang for.
    missed: AtomicU64,
}

// SAFETY: the region is plain shared memory; every access goes through atomics (slot
// states, ring words) or through copies into and out of bytes a thread owns by its
// claim (a slot) or by the ring's protocol (callers serialize each end's senders and
// receivers).
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

/// Bytes a region with `slots` slots per direction needs, if that is representable.
fn needed(slots: usize, slot_size: usize, ring_size: usize) -> Option<usize> {
    slots
        .checked_mul(2)?
        .checked_mul(slot_size)?
        .checked_add(HEADER)?
        .checked_add(ring_size.checked_mul(2)?)
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
        let slots = (len.saturating_sub(HEADER + 2 * RING_BYTES) / slot_size / 2).min(MAX_SLOTS);
        if slots == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "region too small for its rings and one slot per direction",
            ));
        }
        let ptr = map(&fd, len)?;
        let region = ShmRegion {
            ptr,
            len,
            slot_size,
            slots,
            ring_size: RING_BYTES,
            end: End::Supervisor,
            poll: SUPERVISOR_POLL,
            local: Some(LocalWake {
                asleep: AtomicBool::new(false),
                fd: rustix::event::eventfd(
                    0,
                    rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
                )?,
            }),
            missed: AtomicU64::new(0),
        };
        // SAFETY: the header lies within the mapping, which nobody else uses yet.
        unsafe {
            std::ptr::copy_nonoverlapping(MAGIC.as_ptr(), ptr, 8);
            std::ptr::write_unaligned(ptr.add(8).cast::<u32>(), (slot_size as u32).to_le());
            std::ptr::write_unaligned(ptr.add(12).cast::<u32>(), (slots as u32).to_le());
            std::ptr::write_unaligned(ptr.add(16).cast::<u32>(), (RING_BYTES as u32).to_le());
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
        let mut head = [0u8; 20];
        // SAFETY: 20 bytes within the mapping.
        unsafe { std::ptr::copy_nonoverlapping(ptr, head.as_mut_ptr(), head.len()) };
        let word = |o: usize| u32::from_le_bytes([head[o], head[o + 1], head[o + 2], head[o + 3]]);
        let (slot_size, slots, ring_size) =
            (word(8) as usize, word(12) as usize, word(16) as usize);
        let region = ShmRegion {
            ptr,
            len,
            slot_size,
            slots,
            ring_size,
            end,
            poll: match end {
                End::Supervisor => SUPERVISOR_POLL,
                End::Appliance => APPLIANCE_POLL,
            },
            local: None,
            missed: AtomicU64::new(0),
        };
        let fits = needed(slots, slot_size, ring_size).is_some_and(|n| n <= len);
        let ring_ok = ring_size.is_power_of_two() && (4096..=1 << 30).contains(&ring_size);
        if &head[..8] != MAGIC
            || slots == 0
            || slots > MAX_SLOTS
            || slot_size < 4096
            || !ring_ok
            || !fits
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not an fsva shared-memory region of this version (bad header)",
            ));
        }
        Ok(region)
    }

    /// Sets how long a receiver polls its ring before it sleeps on the stream: longer
    /// answers faster while requests keep coming, at the cost of a busy CPU meanwhile.
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
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

    /// The word at `offset` of the header.
    fn word(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset + 4 <= HEADER && offset.is_multiple_of(4));
        // SAFETY: offset + 4 <= HEADER <= len, 4-aligned (the mapping is page-aligned);
        // AtomicU32 has u32's layout and the word is only ever accessed atomically.
        unsafe { &*(self.ptr.add(offset).cast::<AtomicU32>()) }
    }

    fn state(&self, dir: usize, slot: usize) -> &AtomicU32 {
        debug_assert!(slot < self.slots);
        self.word(STATES + 4 * (dir * MAX_SLOTS + slot))
    }

    fn slot_ptr(&self, dir: usize, slot: usize) -> *mut u8 {
        // SAFETY: open/create checked needed(..) <= len.
        unsafe {
            self.ptr
                .add(HEADER + (dir * self.slots + slot) * self.slot_size)
        }
    }

    fn ring(&self, dir: usize) -> Ring<'_> {
        let words = |k: usize| self.word(RING_WORDS + 64 * (3 * dir + k));
        Ring {
            words: RingWords {
                head: words(0),
                tail: words(1),
                asleep: words(2),
            },
            // SAFETY: open/create checked needed(..) <= len: both rings follow the slots.
            data: unsafe {
                self.ptr
                    .add(HEADER + 2 * self.slots * self.slot_size + dir * self.ring_size)
            },
            size: self.ring_size as u32,
        }
    }

    /// Sends `frame`: through the ring, or through a slot with a descriptor in the ring
    /// when it is large. Rings the doorbell on `stream` when the receiver sleeps; waits
    /// while there is no room, until `stream` is shut.
    pub fn send<S: Write + AsFd>(&self, mut stream: S, frame: &[u8]) -> io::Result<()> {
        if frame.len() > self.slot_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame larger than a shared-memory slot",
            ));
        }
        let dir = self.direction(true);
        let mut descriptor = [0u8; DESCRIPTOR];
        let mut slot = None;
        let bytes = if frame.len() < THRESHOLD {
            frame
        } else {
            let claimed = wait_while_open(&stream, || {
                Ok((0..self.slots).find(|&i| {
                    self.state(dir, i)
                        .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                }))
            })?;
            // SAFETY: we own the slot (claimed above) and frame fits in it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    frame.as_ptr(),
                    self.slot_ptr(dir, claimed),
                    frame.len(),
                )
            };
            slot = Some(claimed);
            descriptor[0..4].copy_from_slice(&(DESCRIPTOR as u32).to_ne_bytes());
            descriptor[4..8].copy_from_slice(&MARKER.to_ne_bytes());
            descriptor[8..12].copy_from_slice(&(claimed as u32).to_ne_bytes());
            descriptor[12..16].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
            &descriptor[..]
        };
        let ring = self.ring(dir);
        let pushed = wait_while_open(&stream, || {
            ring.try_push(bytes).map_err(|c| corrupt_ring(c.len))
        });
        let wake = match pushed {
            Ok(wake) => wake,
            Err(e) => {
                if let Some(s) = slot {
                    self.state(dir, s).store(0, Ordering::Release);
                }
                return Err(e);
            }
        };
        if wake {
            stream.write_all(&[1])?;
        }
        // The push's fence orders the frame before this look (see `receive`).
        if let Some(local) = &self.local {
            if local.asleep.load(Ordering::SeqCst) && local.asleep.swap(false, Ordering::SeqCst) {
                // The receiver will look at its ring once woken: the other side need not
                // ring for the reply that may beat it there. (Should the write fail, the
                // error fails the link, whose shutdown wakes the receiver.)
                self.ring(self.direction(false)).awake();
                rustix::io::write(&local.fd, &1u64.to_ne_bytes())?;
            }
        }
        Ok(())
    }

    /// Receives one frame into `buf`; `None` once the stream has ended and the ring is
    /// empty. A frame or descriptor whose length lies outside `min..=buf.len()`, a slot
    /// that does not exist or counters that cannot be right are errors.
    ///
    /// `expecting` says whether a frame is due (the supervisor: a request waits for its
    /// reply). Only then does the receiver poll; otherwise it sleeps at once, and at the
    /// supervisor's end a frame sent from this process wakes it to poll again, so that
    /// it neither burns a CPU while the application works nor needs the other side's
    /// doorbell for the reply to the next request.
    pub fn receive<S: Read + AsFd>(
        &self,
        mut stream: S,
        buf: &mut [u8],
        min: usize,
        what: &'static str,
        expecting: impl Fn() -> bool,
    ) -> Result<Option<usize>, ChannelError> {
        let ring = self.ring(self.direction(false));
        let max = buf.len();
        let bad = |len| ChannelError::BadFrameLength {
            what,
            len,
            min,
            max,
        };
        // Descriptors are shorter than some headers; their own check follows.
        let pop = |buf: &mut [u8]| match ring.try_pop(buf, min.min(DESCRIPTOR)) {
            Ok(Taken::Frame(n)) => Ok(Some(n)),
            Ok(Taken::Empty) => Ok(None),
            Err(Corrupt { len }) => Err(len),
        };
        let mut ended = false;
        let mut rechecking = false;
        loop {
            let due = !ended && expecting();
            // After a recheck that found nothing, one look, not a whole poll.
            let budget = if due && !rechecking {
                self.poll
            } else {
                Duration::ZERO
            };
            rechecking = false;
            if let Some(n) = poll_for(budget, || pop(buf)).map_err(bad)? {
                return self.unwrap_descriptor(buf, n, min, what).map(Some);
            }
            if ended {
                return Ok(None);
            }
            if !ring.prepare_to_sleep() {
                continue;
            }
            if let Some(local) = &self.local {
                local.asleep.store(true, Ordering::SeqCst);
                // Pairs with the fence in the sender's push: a frame sent after
                // `expecting` was read either sees `asleep` or is seen here.
                fence(Ordering::SeqCst);
                if !due && expecting() {
                    local.asleep.store(false, Ordering::SeqCst);
                    ring.awake();
                    continue;
                }
            }
            let woke = self.sleep(&mut stream, due);
            if let Ok(Woken::TimedOut) = woke {
                // Missed only if a frame is there and nobody claimed the wake-up (a
                // producer that did rings, or the supervisor's sender woke us).
                let had = !ring.is_empty();
                if !ring.take_asleep() || !had {
                    rechecking = true;
                    continue;
                }
                if self.missed.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        what,
                        "a frame came without its doorbell: the two ends' memory ordering \
                         is broken (found by the {} ms recheck; counted from now on)",
                        RECHECK.as_millis()
                    );
                }
                continue;
            }
            ring.awake();
            match woke {
                // Frames published before the end are still delivered.
                Ok(Woken::End) => ended = true,
                Ok(Woken::Up) | Ok(Woken::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(ChannelError::Receive { what, source }),
            }
        }
    }

    /// Blocks until the other side rings the doorbell on `stream` (or ends it), or, at
    /// the supervisor's end, until this process sends a frame. While a frame is `due`
    /// (always, at the appliance's end) it wakes after [`RECHECK`] anyway, so that a
    /// doorbell lost despite the protocol costs a delay, never a hang.
    fn sleep<S: Read + AsFd>(&self, stream: &mut S, due: bool) -> io::Result<Woken> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let recheck = Timespec {
            tv_sec: RECHECK.as_secs() as _,
            tv_nsec: RECHECK.subsec_nanos() as _,
        };
        let timeout = (due || self.local.is_none()).then_some(&recheck);
        let (rang, sent) = {
            let local = self.local.as_ref();
            let other = local.map_or(stream.as_fd(), |l| l.fd.as_fd());
            let mut fds = [
                PollFd::new(&*stream, PollFlags::IN),
                PollFd::from_borrowed_fd(other, PollFlags::IN),
            ];
            let n = if local.is_some() { 2 } else { 1 };
            let polled = poll(&mut fds[..n], timeout);
            if let Some(l) = local {
                l.asleep.store(false, Ordering::SeqCst);
            }
            match polled {
                Ok(0) => return Ok(Woken::TimedOut),
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => return Ok(Woken::Up),
                Err(e) => return Err(e.into()),
            }
            (
                !fds[0].revents().is_empty(),
                n == 2 && !fds[1].revents().is_empty(),
            )
        };
        if sent {
            let mut count = [0u8; 8];
            // Resets the counter; EAGAIN (someone read it already) does not matter.
            if let Some(l) = &self.local {
                let _ = rustix::io::read(&l.fd, &mut count);
            }
        }
        if !rang {
            return Ok(Woken::Up);
        }
        let mut bell = [0u8; 64];
        match stream.read(&mut bell)? {
            0 => Ok(Woken::End),
            _ => Ok(Woken::Up),
        }
    }

    /// How many times a receiver's recheck found a frame whose producer never saw it
    /// asleep: zero unless the two sides' ordering is broken (see `fsva_vm`'s `-smp`
    /// choice).
    pub fn missed_doorbells(&self) -> u64 {
        self.missed.load(Ordering::Relaxed)
    }

    /// `buf[..n]` came through the ring: the frame itself, or a descriptor naming the
    /// slot that holds it, which is copied over it.
    fn unwrap_descriptor(
        &self,
        buf: &mut [u8],
        n: usize,
        min: usize,
        what: &'static str,
    ) -> Result<usize, ChannelError> {
        let word = |b: &[u8], o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let max = buf.len().min(self.slot_size);
        let bad = |len| ChannelError::BadFrameLength {
            what,
            len,
            min,
            max,
        };
        if n != DESCRIPTOR || word(buf, 4) != MARKER {
            if n < min {
                return Err(bad(n));
            }
            return Ok(n);
        }
        let (slot, len) = (word(buf, 8) as usize, word(buf, 12) as usize);
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
        Ok(len)
    }
}

fn corrupt_ring(len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the shared-memory ring's counters are corrupt ({len} bytes in use)"),
    )
}

/// Waits until `ready` gives something, as long as `stream` is not shut: a sender
/// waiting for room must not outlive the link. It polls briefly (room usually comes
/// within microseconds), then sleeps between looks, 1 ms at first and up to 50 ms, so
/// a peer that stops reading costs a thread that waits, not a CPU.
fn wait_while_open<T>(
    stream: impl AsFd,
    mut ready: impl FnMut() -> io::Result<Option<T>>,
) -> io::Result<T> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    if let Some(t) = poll_for(FULL_POLL, &mut ready)? {
        return Ok(t);
    }
    let mut nap = Duration::from_millis(1);
    loop {
        // No events asked: poll reports only a shut or broken stream, or times out.
        let mut fds = [PollFd::new(&stream, PollFlags::empty())];
        let timeout = Timespec {
            tv_sec: 0,
            tv_nsec: nap.as_nanos() as _,
        };
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        if fds[0]
            .revents()
            .intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL)
        {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the other end stopped reading the shared-memory ring and the stream is shut",
            ));
        }
        if let Some(t) = ready()? {
            return Ok(t);
        }
        nap = (nap * 2).min(FULL_NAP);
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

    fn pair() -> (ShmRegion, ShmRegion) {
        let (fd, sup) = ShmRegion::create(8 << 20, (1 << 20) + 8192).unwrap();
        let app = ShmRegion::open(&fd, 8 << 20, End::Appliance).unwrap();
        (sup, app)
    }

    #[test]
    fn small_and_large_frames_cross_both_ways_in_order() {
        let (sup, app) = pair();
        assert_eq!(sup.slots(), 3);
        let (a, b) = UnixStream::pair().unwrap();
        let mut buf = vec![0u8; (1 << 20) + 8192];
        let lens = [40, 4096, 100, 1 << 20, 64, (1 << 20) + 8192];
        for len in lens {
            sup.send(&a, &frame(len, (len % 251) as u8)).unwrap();
        }
        for len in lens {
            let n = app
                .receive(&b, &mut buf, 40, "test", || true)
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..n], &frame(len, (len % 251) as u8)[..]);
            app.send(&b, &frame(len, 7)).unwrap();
            let n = sup
                .receive(&a, &mut buf, 16, "test", || true)
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..n], &frame(len, 7)[..]);
        }
        // Frames published before the stream ended are still delivered, then the end.
        app.send(&b, &frame(64, 3)).unwrap();
        drop(b);
        assert_eq!(
            sup.receive(&a, &mut buf, 16, "t", || true).unwrap(),
            Some(64)
        );
        assert_eq!(sup.receive(&a, &mut buf, 16, "t", || true).unwrap(), None);
    }

    #[test]
    fn a_sleeping_receiver_is_woken_by_the_doorbell() {
        let (sup, app) = pair();
        let app = app.with_poll(Duration::ZERO);
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::scope(|scope| {
            let receiver = scope.spawn(|| {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                for _ in 0..20 {
                    got.push(app.receive(&b, &mut buf, 40, "t", || true).unwrap());
                }
                got
            });
            for i in 0..20 {
                // Give the receiver time to fall asleep before some of the frames.
                if i % 4 == 0 {
                    std::thread::sleep(Duration::from_millis(20));
                }
                sup.send(&a, &frame(48 + i, 1)).unwrap();
            }
            let got = receiver.join().unwrap();
            assert_eq!(got, (0..20).map(|i| Some(48 + i)).collect::<Vec<_>>());
        });
    }

    #[test]
    fn the_supervisor_sleeps_while_nothing_is_due_and_its_own_send_wakes_it() {
        use std::sync::atomic::AtomicUsize;
        let (sup, app) = pair();
        let (a, _a_peer) = UnixStream::pair().unwrap();
        // The appliance rings its doorbells into a socket nobody reads: the supervisor
        // must get its replies without them.
        let (bells, bells_peer) = UnixStream::pair().unwrap();
        let due = AtomicUsize::new(0);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut buf = vec![0u8; 4096];
                for _ in 0..3 {
                    let got = sup.receive(&a, &mut buf, 16, "t", || due.load(Ordering::SeqCst) > 0);
                    due.fetch_sub(1, Ordering::SeqCst);
                    tx.send(got.unwrap()).unwrap();
                }
            });
            let mut buf = vec![0u8; 4096];
            for i in 0..3 {
                // Long enough for the receiver to fall asleep with nothing due.
                std::thread::sleep(Duration::from_millis(30));
                due.fetch_add(1, Ordering::SeqCst);
                sup.send(&a, &frame(48, i)).unwrap();
                assert_eq!(
                    app.receive(&_a_peer, &mut buf, 40, "t", || true).unwrap(),
                    Some(48)
                );
                app.send(&bells, &frame(32 + i as usize, i)).unwrap();
                let Ok(got) = rx.recv_timeout(Duration::from_secs(5)) else {
                    // Let the receiver see the end, so the test fails instead of hanging.
                    a.shutdown(std::net::Shutdown::Both).unwrap();
                    panic!("reply {i} not delivered without a doorbell");
                };
                assert_eq!(got, Some(32 + i as usize));
            }
        });
        bells_peer.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 8];
        assert_eq!(
            (&bells_peer).read(&mut byte).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "the appliance rang a doorbell"
        );
    }

    #[test]
    fn a_frame_whose_doorbell_was_lost_still_arrives_after_the_recheck() {
        let (sup, app) = pair();
        let app = app.with_poll(Duration::ZERO);
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut buf = vec![0u8; 4096];
                let t = std::time::Instant::now();
                let got = app.receive(&b, &mut buf, 40, "t", || true).unwrap();
                tx.send((got, t.elapsed())).unwrap();
            });
            // Once the receiver sleeps, publish as a broken peer would: the frame and
            // `head`, without looking at `asleep`.
            let ring = sup.ring(0);
            while ring.words.asleep.load(Ordering::SeqCst) == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            ring.copy_in(0, &frame(48, 1));
            ring.words.head.store(48, Ordering::Release);
            let (got, took) = rx.recv_timeout(RECHECK * 10).unwrap_or_else(|_| {
                // No recheck: end the stream so the receiver returns and the test fails.
                a.shutdown(std::net::Shutdown::Both).unwrap();
                rx.recv().unwrap()
            });
            assert_eq!(got, Some(48));
            assert!(took < RECHECK * 3, "took {took:?}");
        });
        assert_eq!(app.missed_doorbells(), 1);
        drop(a);
    }

    #[test]
    fn a_sender_without_room_gives_up_when_the_stream_is_shut() {
        let (sup, _app) = pair();
        let (a, _b) = UnixStream::pair().unwrap();
        // Nobody receives: the three slots fill, and the fourth large frame waits.
        for _ in 0..3 {
            sup.send(&a, &frame(8192, 1)).unwrap();
        }
        a.shutdown(std::net::Shutdown::Both).unwrap();
        let err = sup.send(&a, &frame(8192, 1)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    /// CPU time this thread has used.
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec, which we own.
        assert_eq!(
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) },
            0
        );
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    #[test]
    fn a_sender_waiting_for_room_sleeps_instead_of_burning_a_cpu() {
        let (sup, app) = pair();
        let (a, b) = UnixStream::pair().unwrap();
        for _ in 0..3 {
            sup.send(&a, &frame(8192, 1)).unwrap();
        }
        std::thread::scope(|scope| {
            let sender = scope.spawn(|| {
                let cpu = thread_cpu();
                sup.send(&a, &frame(8192, 2)).unwrap();
                thread_cpu() - cpu
            });
            // The appliance takes its time; then one slot comes free.
            std::thread::sleep(Duration::from_millis(400));
            let mut buf = vec![0u8; 1 << 16];
            assert_eq!(
                app.receive(&b, &mut buf, 40, "t", || true).unwrap(),
                Some(8192)
            );
            let cpu = sender.join().unwrap();
            assert!(
                cpu < Duration::from_millis(100),
                "waiting took {cpu:?} of CPU"
            );
        });
    }

    #[test]
    fn hostile_descriptors_and_headers_are_refused() {
        let (fd, sup) = ShmRegion::create(8 << 20, (1 << 20) + 8192).unwrap();
        let app = ShmRegion::open(&fd, 8 << 20, End::Appliance).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let desc = |slot: u32, len: u32| {
            let mut d = [0u8; DESCRIPTOR];
            d[0..4].copy_from_slice(&24u32.to_ne_bytes());
            d[4..8].copy_from_slice(&MARKER.to_ne_bytes());
            d[8..12].copy_from_slice(&slot.to_ne_bytes());
            d[12..16].copy_from_slice(&len.to_ne_bytes());
            d
        };
        // A descriptor is a small frame: the appliance can put any it likes in the ring.
        for (slot, len) in [(3, 4096), (u32::MAX, 4096), (0, 1 << 20), (0, 3)] {
            app.send(&b, &desc(slot, len)).unwrap();
            assert!(
                sup.receive(&a, &mut buf, 16, "t", || true).is_err(),
                "slot {slot} len {len} accepted"
            );
        }
        // A slot whose frame claims another length than the descriptor.
        let mut f = frame(4096, 1);
        app.send(&b, &f).unwrap();
        assert!(sup.receive(&a, &mut buf, 16, "t", || true).is_ok());
        f[..4].copy_from_slice(&100u32.to_ne_bytes());
        app.send(&b, &f).unwrap();
        assert!(sup.receive(&a, &mut buf, 16, "t", || true).is_err());
        // A reply ring whose counters cannot be right.
        app.ring(1)
            .words
            .head
            .store(u32::MAX / 2, Ordering::Relaxed);
        assert!(matches!(
            sup.receive(&a, &mut buf, 16, "t", || true),
            Err(ChannelError::BadFrameLength { .. })
        ));
        // Bad headers are refused at open, and so is a region of the previous version.
        let junk = rustix::fs::memfd_create("junk", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&junk, 1 << 20).unwrap();
        assert!(ShmRegion::open(&junk, 1 << 20, End::Appliance).is_err());
        let old = map(&fd, 8 << 20).unwrap();
        // SAFETY: the first 8 bytes of a fresh mapping of the test's own region.
        unsafe { std::ptr::copy_nonoverlapping(b"FSVASHM1".as_ptr(), old, 8) };
        assert!(ShmRegion::open(&fd, 8 << 20, End::Appliance).is_err());
        // SAFETY: old is the mapping made above, of that length, no longer used.
        unsafe { rustix::mm::munmap(old.cast(), 8 << 20).unwrap() };
    }
}
