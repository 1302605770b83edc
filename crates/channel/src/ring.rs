//! A byte ring in shared memory with a sleeping-reader doorbell: the stream of frames
//! one end of a [`crate::shm`] region sends the other, without a trip through the
//! device (a VM's virtio-serial port) that carries the doorbell.
//!
//! Each direction has one ring: `size` bytes (a power of two) and three words, each on
//! a cache line of its own: `head` (bytes ever written, by the producer), `tail`
//! (bytes ever read, by the consumer) and `asleep` (the consumer waits on the stream).
//! Frames are copied in whole, wrapping at the end, and published by moving `head`
//! (release); the consumer copies a frame out and moves `tail`.
//!
//! A consumer with nothing to read polls for a while (frames follow each other within
//! microseconds while an application works), then sets `asleep` and checks once more
//! before it blocks reading the stream. A producer that publishes a frame and then sees
//! `asleep` clears it and writes one byte on the stream. Both sides order their store
//! before their load with a full fence, so either the producer sees `asleep` or the
//! consumer sees the frame: no frame waits for a doorbell that never comes. A byte
//! may arrive when the consumer is already awake; it only costs a spurious wake-up.
//!
//! One producer and one consumer per direction: callers serialize their own senders and
//! receivers (the stream channel and the relays already hold a lock for each). The
//! other end may be hostile: counters are checked against the ring's size, lengths
//! against the buffer and what was published, and a frame is checked only after it was
//! copied out. This module never interprets a frame beyond its length.

use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The three control words of one direction.
pub(crate) struct RingWords<'a> {
    pub head: &'a AtomicU32,
    pub tail: &'a AtomicU32,
    pub asleep: &'a AtomicU32,
}

/// One direction's ring, seen from one end.
pub(crate) struct Ring<'a> {
    pub words: RingWords<'a>,
    /// Start of the ring's bytes.
    pub data: *mut u8,
    /// Its length: a power of two, at most 2^31.
    pub size: u32,
}

/// What a consumer found when it looked.
pub(crate) enum Taken {
    /// A frame of this length is in the buffer.
    Frame(usize),
    /// Nothing published yet.
    Empty,
}

/// Why a ring's contents cannot be right: only a broken or hostile producer does this.
#[derive(Debug)]
pub(crate) struct Corrupt {
    pub len: usize,
}

impl Ring<'_> {
    fn used(&self, head: u32, tail: u32) -> Result<u32, Corrupt> {
        let used = head.wrapping_sub(tail);
        if used > self.size {
            return Err(Corrupt { len: used as usize });
        }
        Ok(used)
    }

    /// Copies `out.len()` bytes starting at counter `at`, wrapping.
    fn copy_out(&self, at: u32, out: &mut [u8]) {
        let off = (at & (self.size - 1)) as usize;
        let first = out.len().min(self.size as usize - off);
        // SAFETY: `data` points at `size` bytes of the mapping; off < size and both
        // pieces stay within it (first <= size - off, rest <= out.len() <= size). The
        // other end may write these bytes concurrently: we only copy them out and check
        // the copy afterwards.
        unsafe {
            std::ptr::copy_nonoverlapping(self.data.add(off), out.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(
                self.data,
                out.as_mut_ptr().add(first),
                out.len() - first,
            );
        }
    }

    pub(crate) fn copy_in(&self, at: u32, bytes: &[u8]) {
        let off = (at & (self.size - 1)) as usize;
        let first = bytes.len().min(self.size as usize - off);
        // SAFETY: as in copy_out; the bytes between tail and tail + size that are not
        // published belong to the producer, which is us (callers serialize producers).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data.add(off), first);
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr().add(first),
                self.data,
                bytes.len() - first,
            );
        }
    }

    /// Appends `frame` if it fits now. Returns whether it did, and whether the consumer
    /// was asleep (the caller then rings the doorbell).
    pub fn try_push(&self, frame: &[u8]) -> Result<Option<bool>, Corrupt> {
        let head = self.words.head.load(Ordering::Relaxed);
        let tail = self.words.tail.load(Ordering::Acquire);
        let used = self.used(head, tail)?;
        if frame.len() > (self.size - used) as usize {
            return Ok(None);
        }
        self.copy_in(head, frame);
        self.words
            .head
            .store(head.wrapping_add(frame.len() as u32), Ordering::Release);
        // Pairs with the consumer's fence between setting `asleep` and looking again.
        fence(Ordering::SeqCst);
        let wake = self.words.asleep.load(Ordering::Relaxed) != 0
            && self
                .words
                .asleep
                .compare_exchange(1, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        Ok(Some(wake))
    }

    /// Copies the next frame into `buf`. Its first four bytes are its length, which
    /// must lie in `min..=buf.len()`; anything else is `Corrupt`.
    pub fn try_pop(&self, buf: &mut [u8], min: usize) -> Result<Taken, Corrupt> {
        let tail = self.words.tail.load(Ordering::Relaxed);
        let head = self.words.head.load(Ordering::Acquire);
        let used = self.used(head, tail)?;
        if used == 0 {
            return Ok(Taken::Empty);
        }
        let mut len = [0u8; 4];
        if used < 4 {
            return Err(Corrupt { len: used as usize });
        }
        self.copy_out(tail, &mut len);
        let len = u32::from_ne_bytes(len) as usize;
        if len < min.max(4) || len > buf.len() || len > used as usize {
            return Err(Corrupt { len });
        }
        self.copy_out(tail, &mut buf[..len]);
        self.words
            .tail
            .store(tail.wrapping_add(len as u32), Ordering::Release);
        if u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize != len {
            return Err(Corrupt { len });
        }
        Ok(Taken::Frame(len))
    }

    /// Whether a frame is published (for the consumer's last look before it sleeps).
    pub fn is_empty(&self) -> bool {
        let tail = self.words.tail.load(Ordering::Relaxed);
        self.words.head.load(Ordering::Acquire) == tail
    }

    /// Declares the consumer asleep; returns false (and stays awake) if a frame came
    /// in the meantime.
    pub fn prepare_to_sleep(&self) -> bool {
        self.words.asleep.store(1, Ordering::Relaxed);
        // Pairs with the producer's fence between publishing and looking at `asleep`.
        fence(Ordering::SeqCst);
        if self.is_empty() {
            return true;
        }
        // Awake after all. If the producer already cleared the word, its doorbell is
        // on the way and will only cause a spurious wake-up later.
        let _ = self
            .words
            .asleep
            .compare_exchange(1, 0, Ordering::Relaxed, Ordering::Relaxed);
        false
    }

    /// After a wake-up: the consumer is awake (whoever woke it).
    pub fn awake(&self) {
        self.words.asleep.store(0, Ordering::Relaxed);
    }

    /// After a wake-up nobody announced: the consumer is awake, and this says whether
    /// it was still marked asleep (no producer claimed the wake-up meanwhile).
    pub fn take_asleep(&self) -> bool {
        self.words.asleep.swap(0, Ordering::SeqCst) == 1
    }
}

/// Polls `ready` for up to `budget`, politely: it spins a little, then yields the CPU
/// between looks, and reads the clock only every few looks. Returns the first `Some`.
pub(crate) fn poll_for<T, E>(
    budget: Duration,
    mut ready: impl FnMut() -> Result<Option<T>, E>,
) -> Result<Option<T>, E> {
    if let Some(t) = ready()? {
        return Ok(Some(t));
    }
    if budget.is_zero() {
        return Ok(None);
    }
    let start = Instant::now();
    let mut looks = 0u32;
    loop {
        for _ in 0..16 {
            std::hint::spin_loop();
        }
        if let Some(t) = ready()? {
            return Ok(Some(t));
        }
        looks += 1;
        if looks.is_multiple_of(8) {
            if start.elapsed() >= budget {
                return Ok(None);
            }
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Owned {
        words: [AtomicU32; 3],
        data: Vec<u8>,
    }

    impl Owned {
        fn new(size: usize) -> Owned {
            Owned {
                words: [AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)],
                data: vec![0; size],
            }
        }
        fn ring(&mut self) -> Ring<'_> {
            Ring {
                words: RingWords {
                    head: &self.words[0],
                    tail: &self.words[1],
                    asleep: &self.words[2],
                },
                data: self.data.as_mut_ptr(),
                size: self.data.len() as u32,
            }
        }
    }

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![fill; len];
        f[..4].copy_from_slice(&(len as u32).to_ne_bytes());
        f
    }

    #[test]
    fn frames_wrap_around_and_keep_their_order() {
        let mut owned = Owned::new(256);
        let ring = owned.ring();
        let mut buf = [0u8; 256];
        // Lengths that are not divisors of 256 make frames straddle the end.
        for round in 0..50u32 {
            let a = frame(40 + (round as usize % 7), round as u8);
            let b = frame(100, !round as u8);
            assert_eq!(ring.try_push(&a).unwrap(), Some(false));
            assert_eq!(ring.try_push(&b).unwrap(), Some(false));
            // No room for a third.
            assert_eq!(ring.try_push(&frame(120, 0)).unwrap(), None);
            for want in [&a, &b] {
                let Taken::Frame(n) = ring.try_pop(&mut buf, 16).unwrap() else {
                    panic!("empty");
                };
                assert_eq!(&buf[..n], &want[..]);
            }
            assert!(matches!(ring.try_pop(&mut buf, 16).unwrap(), Taken::Empty));
        }
    }

    #[test]
    fn a_sleeping_consumer_is_woken_exactly_when_it_must_be() {
        let mut owned = Owned::new(256);
        let ring = owned.ring();
        // Nothing published: the consumer may sleep, and the next push must wake it.
        assert!(ring.prepare_to_sleep());
        assert_eq!(ring.try_push(&frame(32, 1)).unwrap(), Some(true));
        // The doorbell was claimed: a second push does not ring again.
        assert_eq!(ring.try_push(&frame(32, 2)).unwrap(), Some(false));
        // With frames waiting, the consumer stays awake.
        assert!(!ring.prepare_to_sleep());
        assert_eq!(ring.try_push(&frame(32, 3)).unwrap(), Some(false));
    }

    #[test]
    fn hostile_counters_and_lengths_are_refused() {
        let mut owned = Owned::new(256);
        let mut buf = [0u8; 128];
        {
            let ring = owned.ring();
            // head more than a ring ahead of tail.
            ring.words.head.store(1000, Ordering::Relaxed);
            assert!(ring.try_pop(&mut buf, 16).is_err());
            assert!(ring.try_push(&frame(16, 0)).is_err());
            ring.words.head.store(0, Ordering::Relaxed);
            // A length beyond what was published, beyond the buffer, below the minimum,
            // and a frame whose bytes disagree with the length read first is covered by
            // the final check (the same bytes here, so only the first three).
            for (published, len) in [(8u32, 64u32), (200, 200), (8, 8)] {
                ring.words.tail.store(0, Ordering::Relaxed);
                ring.words.head.store(published, Ordering::Relaxed);
                ring.copy_in(0, &len.to_ne_bytes());
                assert!(ring.try_pop(&mut buf, 16).is_err(), "len {len} accepted");
            }
        }
    }

    #[test]
    fn polling_returns_what_arrives_and_gives_up_after_its_budget() {
        let t = Instant::now();
        let none: Option<()> = poll_for(Duration::from_millis(5), || Ok::<_, ()>(None)).unwrap();
        assert!(none.is_none() && t.elapsed() >= Duration::from_millis(5));
        let mut n = 0;
        let got = poll_for(Duration::from_secs(5), || {
            n += 1;
            Ok::<_, ()>((n == 100).then_some(n))
        })
        .unwrap();
        assert_eq!(got, Some(100));
    }
}
