//! Recognising a disk's file system from its superblock, so that only that file
//! system's modules are loaded (loading all of them costs seconds under emulation).
//! It only reads the first 80 KiB of the disk; a `None` means "unknown here", and the
//! caller then tries every driver the kernel has.

use std::io::Read;
use std::path::Path;

/// How far into the disk the signatures below reach.
const PROBE_BYTES: usize = 80 * 1024;

/// The kernel's name for the file system on `disk`, if its signature is known.
pub fn fstype(disk: &Path) -> Option<&'static str> {
    let mut head = vec![0u8; PROBE_BYTES];
    let mut f = std::fs::File::open(disk).ok()?;
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => return None,
        }
    }
    head.truncate(got);
    from_bytes(&head)
}

fn from_bytes(b: &[u8]) -> Option<&'static str> {
    let at = |off: usize, sig: &[u8]| b.get(off..off + sig.len()) == Some(sig);
    let le16 = |off: usize| {
        b.get(off..off + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]))
    };
    let le32 = |off: usize| {
        b.get(off..off + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    if le16(1080) == Some(0xef53) {
        return Some("ext4");
    }
    if at(0, b"XFSB") {
        return Some("xfs");
    }
    if at(0x10040, b"_BHRfS_M") {
        return Some("btrfs");
    }
    if le32(1024) == Some(0xf2f5_2010) {
        return Some("f2fs");
    }
    if at(32768, b"JFS1") {
        return Some("jfs");
    }
    if at(1024, b"H+") || at(1024, b"HX") {
        return Some("hfsplus");
    }
    if at(0, b"hsqs") {
        return Some("squashfs");
    }
    if le32(1024) == Some(0xe0f5_e1e2) {
        return Some("erofs");
    }
    if at(3, b"EXFAT   ") {
        return Some("exfat");
    }
    // UDF media often carry an ISO 9660 descriptor too: UDF first.
    if (0..8).any(|i| {
        let off = 32769 + i * 2048;
        at(off, b"NSR02") || at(off, b"NSR03")
    }) {
        return Some("udf");
    }
    if at(32769, b"CD001") {
        return Some("iso9660");
    }
    let boot_sig = le16(510) == Some(0xaa55);
    if boot_sig && (at(54, b"FAT") || at(82, b"FAT32")) {
        return Some("vfat");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_recognised_and_garbage_is_not() {
        let mut ext = vec![0u8; PROBE_BYTES];
        ext[1080..1082].copy_from_slice(&0xef53u16.to_le_bytes());
        assert_eq!(from_bytes(&ext), Some("ext4"));
        let mut fat = vec![0u8; 4096];
        fat[510..512].copy_from_slice(&0xaa55u16.to_le_bytes());
        fat[82..87].copy_from_slice(b"FAT32");
        assert_eq!(from_bytes(&fat), Some("vfat"));
        let mut iso = vec![0u8; PROBE_BYTES];
        iso[32769..32774].copy_from_slice(b"CD001");
        assert_eq!(from_bytes(&iso), Some("iso9660"));
        iso[32769 + 2048..32774 + 2048].copy_from_slice(b"NSR02");
        assert_eq!(from_bytes(&iso), Some("udf"));
        assert_eq!(from_bytes(&vec![0x5a; PROBE_BYTES]), None);
        assert_eq!(from_bytes(&[]), None);
    }
}
