//! Descriptor chains as FUSE frames.
//!
//! A virtio-fs request is one descriptor chain: its device-readable descriptors hold
//! the FUSE request (header, arguments, write payload) back to back; its device-writable
//! descriptors, which must all come after the readable ones, are where the reply goes.
//! This module gathers the request into a buffer of ours and later scatters the reply
//! into the guest's writable space.
//!
//! Everything here comes from the guest and is checked before use: every address range
//! against guest memory, the order of readable and writable descriptors, the request's
//! total size. (Chain length and loops are bounded by virtio-queue's walk, which stops
//! after as many descriptors as the table holds.) A bad chain is an error for that
//! request only. This module must never panic on guest input and never read or write
//! outside guest memory.

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

/// Largest request we accept: a 1 MiB write payload plus headers. (The appliance's
/// INIT reply caps `max_write` at 1 MiB, so a well-behaved guest never sends more.)
pub const MAX_REQUEST: usize = (1 << 20) + 8192;
/// Most descriptors a chain may have (a 1 MiB request in 4 KiB pages, both ways, with
/// headers, needs about 520; indirect tables allow 65,535).
pub const MAX_DESCRIPTORS: usize = 1024;

/// What is wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the request is larger than {MAX_REQUEST} bytes")]
    RequestTooLarge,
    #[error("descriptor at {addr:#x} of {len} bytes lies outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("the reply of {need} bytes does not fit the {have} writable bytes of the chain")]
    ReplyTooLarge { need: usize, have: usize },
    #[error("the chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("head {0} was posted again while its request is in flight")]
    HeadInFlight(u16),
}

/// The writable part of a chain: where its reply goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplySpace {
    regions: Vec<(GuestAddress, u32)>,
    total: usize,
}

impl ReplySpace {
    /// Writable bytes in all.
    pub fn capacity(&self) -> usize {
        self.total
    }
}

/// One descriptor as the chain walk yields it: address, length, device-writable.
pub trait Segment {
    fn segment(&self) -> (GuestAddress, u32, bool);
}

impl Segment for virtio_queue::desc::split::Descriptor {
    fn segment(&self) -> (GuestAddress, u32, bool) {
        (self.addr(), self.len(), self.is_write_only())
    }
}

/// Copies the readable part of a chain into `frame` (cleared first) and returns its
/// writable part.
pub fn read_request<M, I>(
    mem: &M,
    descriptors: I,
    frame: &mut Vec<u8>,
) -> Result<ReplySpace, ChainError>
where
    M: GuestMemory + ?Sized,
    I: IntoIterator,
    I::Item: Segment,
{
    frame.clear();
    let mut space = ReplySpace::default();
    for (i, d) in descriptors.into_iter().enumerate() {
        if i >= MAX_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        let (addr, len, writable) = d.segment();
        if len == 0 {
            continue;
        }
        let outside = ChainError::OutsideMemory { addr: addr.0, len };
        if writable {
            if !mem.check_range(addr, len as usize, Permissions::Write) {
                return Err(outside);
            }
            space.total = space.total.saturating_add(len as usize);
            space.regions.push((addr, len));
            continue;
        }
        if !space.regions.is_empty() {
            return Err(ChainError::ReadableAfterWritable);
        }
        let start = frame.len();
        let end = start
            .checked_add(len as usize)
            .filter(|&e| e <= MAX_REQUEST)
            .ok_or(ChainError::RequestTooLarge)?;
        frame.resize(end, 0);
        if mem.read_slice(&mut frame[start..end], addr).is_err() {
            frame.truncate(start);
            return Err(outside);
        }
    }
    Ok(space)
}

/// Scatters `reply` over `space` in order and returns the bytes written (the used
/// length the guest is told).
pub fn write_reply<M>(mem: &M, space: &ReplySpace, reply: &[u8]) -> Result<u32, ChainError>
where
    M: GuestMemory + ?Sized,
{
    if reply.len() > space.total || u32::try_from(reply.len()).is_err() {
        return Err(ChainError::ReplyTooLarge {
            need: reply.len(),
            have: space.total,
        });
    }
    let mut done = 0usize;
    for &(addr, len) in &space.regions {
        if done == reply.len() {
            break;
        }
        let n = (len as usize).min(reply.len() - done);
        mem.write_slice(&reply[done..done + n], addr)
            .map_err(|_| ChainError::OutsideMemory { addr: addr.0, len })?;
        done += n;
    }
    Ok(done as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    struct D(u64, u32, bool);
    impl Segment for D {
        fn segment(&self) -> (GuestAddress, u32, bool) {
            (GuestAddress(self.0), self.1, self.2)
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000), 0x10000)]).unwrap()
    }

    #[test]
    fn readable_parts_are_gathered_and_the_reply_scattered() {
        let mem = memory();
        mem.write_slice(b"hello ", GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"world", GuestAddress(0x3000)).unwrap();
        let mut frame = Vec::new();
        let space = read_request(
            &mem,
            [
                D(0x1000, 6, false),
                D(0x3000, 5, false),
                D(0x5000, 4, true),
                D(0x7000, 100, true),
            ],
            &mut frame,
        )
        .unwrap();
        assert_eq!(frame, b"hello world");
        assert_eq!(space.capacity(), 104);
        assert_eq!(write_reply(&mem, &space, b"abcdefgh").unwrap(), 8);
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(0x5000)).unwrap();
        assert_eq!(&got, b"abcd");
        mem.read_slice(&mut got, GuestAddress(0x7000)).unwrap();
        assert_eq!(&got, b"efgh");
    }

    #[test]
    fn hostile_chains_are_refused() {
        let mem = memory();
        let mut frame = Vec::new();
        // Outside guest memory, below, above and straddling the end.
        for d in [
            D(0, 16, false),
            D(0x20000, 16, false),
            D(0x10ff8, 16, false),
        ] {
            assert!(matches!(
                read_request(&mem, [d], &mut frame),
                Err(ChainError::OutsideMemory { .. })
            ));
        }
        assert!(matches!(
            read_request(&mem, [D(u64::MAX - 4, 16, true)], &mut frame),
            Err(ChainError::OutsideMemory { .. })
        ));
        assert_eq!(
            read_request(&mem, [D(0x1000, 8, true), D(0x2000, 8, false)], &mut frame),
            Err(ChainError::ReadableAfterWritable)
        );
        // More descriptors than any request needs (empty ones count too).
        let many = (0..2000).map(|_| D(0x1000, 0, true));
        assert_eq!(
            read_request(&mem, many, &mut frame),
            Err(ChainError::TooManyDescriptors)
        );
        // Many descriptors that each pass but add up to too much.
        let many = (0..200).map(|_| D(0x1000, 0x8000, false));
        assert_eq!(
            read_request(&mem, many, &mut frame),
            Err(ChainError::RequestTooLarge)
        );
        assert!(frame.len() <= MAX_REQUEST);
        // A reply larger than the space the guest gave.
        let space = read_request(&mem, [D(0x1000, 4, true)], &mut frame).unwrap();
        assert_eq!(
            write_reply(&mem, &space, b"12345"),
            Err(ChainError::ReplyTooLarge { need: 5, have: 4 })
        );
    }
}
