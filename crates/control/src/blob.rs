//! Large byte blobs beside control messages: a sealed memfd, attached as a descriptor
//! (a datagram could not hold an appliance's state). The receiver reads it whole; the
//! seals guarantee the sender can no longer change or grow it underneath.
//!
//! This module moves bytes; it never interprets them.

use std::io::{Read, Seek, Write};
use std::os::fd::OwnedFd;

use rustix::fs::{MemfdFlags, SealFlags};

/// Largest blob accepted (a sanity bound against a hostile peer).
pub const MAX_BLOB: u64 = 1 << 30;

/// A sealed memfd holding `bytes`.
pub fn seal(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(
        "fsva-state",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let mut f = std::fs::File::from(fd);
    f.write_all(bytes)?;
    rustix::fs::fcntl_add_seals(
        &f,
        SealFlags::SEAL | SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE,
    )?;
    Ok(f.into())
}

/// The bytes of a blob received as `fd` (at most [`MAX_BLOB`]).
pub fn read(fd: OwnedFd) -> std::io::Result<Vec<u8>> {
    let seals = rustix::fs::fcntl_get_seals(&fd)?;
    if !seals.contains(SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW) {
        return Err(std::io::Error::other(
            "the blob is not sealed against changes: refusing it",
        ));
    }
    let mut f = std::fs::File::from(fd);
    let len = f.metadata()?.len();
    if len > MAX_BLOB {
        return Err(std::io::Error::other(format!(
            "a blob of {len} bytes is above the {MAX_BLOB}-byte limit"
        )));
    }
    f.rewind()?;
    let mut out = Vec::with_capacity(len as usize);
    f.take(len).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_blobs_round_trip_and_cannot_be_changed() {
        let fd = seal(b"state bytes").unwrap();
        let copy = fd.try_clone().unwrap();
        assert!(
            std::fs::File::from(copy).write_all(b"x").is_err(),
            "sealed against writes"
        );
        assert_eq!(read(fd).unwrap(), b"state bytes");
        let unsealed = rustix::fs::memfd_create("x", MemfdFlags::CLOEXEC).unwrap();
        assert!(
            read(unsealed).is_err(),
            "an unsealed blob could change under the reader"
        );
    }
}
