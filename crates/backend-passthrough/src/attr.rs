//! Conversion of host attributes (`statx`, `statfs`) into the FUSE wire structures.

use fsva_protocol::abi;

/// `new_encode_dev`: the 32-bit device number encoding FUSE carries in `rdev`.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// The host `dev_t` (glibc `makedev`) of a FUSE 32-bit device number.
pub fn decode_dev(rdev: u32) -> libc::dev_t {
    let major = (rdev & 0xfff00) >> 8;
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
    libc::makedev(major, minor)
}

/// Host identity (device, inode) of a statx result.
pub fn dev_of(stx: &libc::statx) -> u64 {
    libc::makedev(stx.stx_dev_major, stx.stx_dev_minor)
}

pub fn to_attr(stx: &libc::statx) -> abi::Attr {
    abi::Attr {
        ino: stx.stx_ino,
        size: stx.stx_size,
        blocks: stx.stx_blocks,
        atime: stx.stx_atime.tv_sec as u64,
        mtime: stx.stx_mtime.tv_sec as u64,
        ctime: stx.stx_ctime.tv_sec as u64,
        atimensec: stx.stx_atime.tv_nsec,
        mtimensec: stx.stx_mtime.tv_nsec,
        ctimensec: stx.stx_ctime.tv_nsec,
        mode: u32::from(stx.stx_mode),
        nlink: stx.stx_nlink,
        uid: stx.stx_uid,
        gid: stx.stx_gid,
        rdev: encode_dev(stx.stx_rdev_major, stx.stx_rdev_minor),
        blksize: stx.stx_blksize,
        flags: 0,
    }
}

fn sx_time(t: &libc::statx_timestamp) -> abi::SxTime {
    abi::SxTime {
        tv_sec: t.tv_sec,
        tv_nsec: t.tv_nsec,
        reserved: 0,
    }
}

pub fn to_statx(stx: &libc::statx) -> abi::Statx {
    abi::Statx {
        mask: stx.stx_mask,
        blksize: stx.stx_blksize,
        attributes: stx.stx_attributes,
        nlink: stx.stx_nlink,
        uid: stx.stx_uid,
        gid: stx.stx_gid,
        mode: stx.stx_mode,
        ino: stx.stx_ino,
        size: stx.stx_size,
        blocks: stx.stx_blocks,
        attributes_mask: stx.stx_attributes_mask,
        atime: sx_time(&stx.stx_atime),
        btime: sx_time(&stx.stx_btime),
        ctime: sx_time(&stx.stx_ctime),
        mtime: sx_time(&stx.stx_mtime),
        rdev_major: stx.stx_rdev_major,
        rdev_minor: stx.stx_rdev_minor,
        dev_major: stx.stx_dev_major,
        dev_minor: stx.stx_dev_minor,
        ..Default::default()
    }
}

pub fn to_kstatfs(st: &libc::statfs64) -> abi::Kstatfs {
    abi::Kstatfs {
        blocks: st.f_blocks,
        bfree: st.f_bfree,
        bavail: st.f_bavail,
        files: st.f_files,
        ffree: st.f_ffree,
        bsize: st.f_bsize as u32,
        namelen: st.f_namelen as u32,
        frsize: st.f_frsize as u32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_round_trip() {
        for (maj, min) in [(0u32, 0u32), (8, 1), (259, 3), (4095, 0xfffff)] {
            let enc = encode_dev(maj, min);
            let dev = decode_dev(enc);
            assert_eq!((libc::major(dev), libc::minor(dev)), (maj, min));
        }
    }
}
