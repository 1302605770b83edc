//! Fuzzes the FUSE request decoder (`fsva_protocol::decode` / `decode_header`).
//!
//! Every input is decoded four times: as is and with its first four bytes patched to
//! the real frame length (so mutations get past the length check), each under both
//! `Negotiated { setxattr_ext }` values. The decoder must never panic, and an `Ok`
//! request must only borrow bytes from inside the frame, with names free of NUL and
//! payload lengths matching what their headers declare.
#![no_main]

use std::os::unix::ffi::OsStrExt;

use fsva_protocol::abi::InHeader;
use fsva_protocol::request::decode_header;
use fsva_protocol::{decode, DecodeError, Negotiated, Operation};
use libfuzzer_sys::fuzz_target;

const HEADER: usize = core::mem::size_of::<InHeader>();

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= 4 {
        let mut patched = data.to_vec();
        patched[..4].copy_from_slice(&(data.len() as u32).to_ne_bytes());
        check(&patched);
    }
});

fn check(frame: &[u8]) {
    let header = decode_header(frame);
    for setxattr_ext in [false, true] {
        let negotiated = Negotiated { setxattr_ext };
        match decode(frame, &negotiated) {
            Ok(req) => {
                let h = header.as_ref().expect("decode Ok but decode_header failed");
                assert_eq!(
                    req.header, *h,
                    "decode and decode_header disagree on the header"
                );
                assert_eq!(req.header.len as usize, frame.len());
                let _ = req.op.is_one_way();
                check_op(frame, &req.op, setxattr_ext);
            }
            Err(e) => {
                match (&e, &header) {
                    (DecodeError::ShortHeader(n), Err(DecodeError::ShortHeader(m))) => {
                        assert_eq!(*n, frame.len());
                        assert_eq!(n, m);
                    }
                    (DecodeError::LengthMismatch { .. }, Err(he)) => assert_eq!(&e, he),
                    (DecodeError::ShortHeader(_) | DecodeError::LengthMismatch { .. }, _) => {
                        panic!("decode failed with {e:?} but decode_header gave {header:?}")
                    }
                    (_, Ok(_)) => {}
                    (_, Err(he)) => panic!("decode failed late with {e:?}, header error {he:?}"),
                }
                if let DecodeError::Truncated { needed, .. } = e {
                    assert!(needed > 0, "Truncated with needed == 0");
                }
                if let DecodeError::PayloadMismatch {
                    declared, actual, ..
                } = e
                {
                    assert!(declared > actual, "PayloadMismatch {declared} <= {actual}");
                }
                // Display must not panic either (frames end up in logs).
                let _ = e.to_string();
            }
        }
    }
}

/// Asserts that `part` is a sub-slice of the frame's argument area.
fn within(frame: &[u8], part: &[u8], what: &str) {
    let lo = frame.as_ptr() as usize + HEADER;
    let hi = frame.as_ptr() as usize + frame.len();
    let p = part.as_ptr() as usize;
    assert!(
        p >= lo && p + part.len() <= hi,
        "{what} ({} bytes at offset {}) lies outside the frame's {} argument bytes",
        part.len(),
        p.wrapping_sub(frame.as_ptr() as usize),
        frame.len() - HEADER,
    );
}

fn name(frame: &[u8], n: &std::ffi::OsStr, what: &str) {
    let b = n.as_bytes();
    within(frame, b, what);
    assert!(!b.contains(&0), "{what} contains a NUL byte");
    // The terminating NUL must itself be inside the frame.
    let end = b.as_ptr() as usize + b.len() - frame.as_ptr() as usize;
    assert!(
        end < frame.len() && frame[end] == 0,
        "{what} is not NUL-terminated in the frame"
    );
}

fn check_op(frame: &[u8], op: &Operation<'_>, setxattr_ext: bool) {
    match op {
        Operation::Lookup { name: n }
        | Operation::Unlink { name: n }
        | Operation::Rmdir { name: n }
        | Operation::Removexattr { name: n }
        | Operation::Mknod { name: n, .. }
        | Operation::Mkdir { name: n, .. }
        | Operation::Link { name: n, .. }
        | Operation::Getxattr { name: n, .. }
        | Operation::Create { name: n, .. } => name(frame, n, "name"),
        Operation::Symlink { name: n, target } => {
            name(frame, n, "symlink name");
            within(frame, target, "symlink target");
            assert!(!target.contains(&0), "symlink target contains NUL");
            assert!(
                n.as_bytes().as_ptr() as usize + n.len() < target.as_ptr() as usize,
                "symlink target overlaps its name"
            );
        }
        Operation::Rename {
            name: n, newname, ..
        } => {
            name(frame, n, "rename name");
            name(frame, newname, "rename newname");
            assert!(
                n.as_bytes().as_ptr() as usize + n.len() < newname.as_bytes().as_ptr() as usize,
                "rename newname overlaps name"
            );
        }
        Operation::Write { arg, data } => {
            within(frame, data, "write data");
            assert_eq!(data.len(), arg.size as usize, "write data length != size");
        }
        Operation::Setxattr {
            size,
            setxattr_flags,
            name: n,
            value,
            ..
        } => {
            name(frame, n, "xattr name");
            within(frame, value, "xattr value");
            assert_eq!(value.len(), *size as usize, "xattr value length != size");
            if !setxattr_ext {
                assert_eq!(*setxattr_flags, 0, "setxattr_flags without SETXATTR_EXT");
            }
        }
        Operation::BatchForget(nodes) => {
            let count = u32::from_ne_bytes(frame[HEADER..HEADER + 4].try_into().unwrap());
            assert_eq!(nodes.len(), count as usize, "BATCH_FORGET count mismatch");
            assert!(
                nodes.len() * 16 + 8 <= frame.len() - HEADER,
                "BATCH_FORGET decoded {} entries from {} argument bytes",
                nodes.len(),
                frame.len() - HEADER
            );
        }
        _ => {}
    }
}
