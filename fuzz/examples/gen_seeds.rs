//! Writes the seed corpus for `decode_request` (a few valid frames) into
//! `fuzz/seeds/decode_request/` (or the directory given as the first argument).
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds
//!
//! The generated files are checked in; rerun this only when the ABI changes.

use std::path::PathBuf;

use fsva_protocol::abi::*;
use fsva_protocol::{decode, Negotiated};
use zerocopy::IntoBytes;

fn frame(opcode: u32, args: &[u8]) -> Vec<u8> {
    let header = InHeader {
        len: (core::mem::size_of::<InHeader>() + args.len()) as u32,
        opcode,
        unique: 2,
        nodeid: ROOT_ID,
        uid: 1000,
        gid: 1000,
        pid: 4242,
        ..Default::default()
    };
    let mut v = header.as_bytes().to_vec();
    v.extend_from_slice(args);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds/decode_request"));
    std::fs::create_dir_all(&dir).unwrap();

    // MKDIR with a supplementary-group extension (total_extlen = 2 * 8 bytes).
    let mut mkdir_args = cat(&[
        MkdirIn {
            mode: 0o755,
            umask: 0o22,
        }
        .as_bytes(),
        b"d\0",
    ]);
    mkdir_args.resize(mkdir_args.len().next_multiple_of(8), 0);
    mkdir_args.extend_from_slice(
        ExtHeader {
            size: 16,
            typ: ext::GROUPS,
        }
        .as_bytes(),
    );
    mkdir_args.extend_from_slice(&1u32.to_ne_bytes());
    mkdir_args.extend_from_slice(&100u32.to_ne_bytes());
    let mut mkdir = frame(opcode::MKDIR, &mkdir_args);
    mkdir[36..38].copy_from_slice(&2u16.to_ne_bytes());

    let seeds: Vec<(&str, Vec<u8>, Negotiated)> = vec![
        (
            "lookup",
            frame(opcode::LOOKUP, b"hello.txt\0"),
            Negotiated::default(),
        ),
        (
            "write",
            frame(
                opcode::WRITE,
                &cat(&[
                    WriteIn {
                        fh: 3,
                        offset: 4096,
                        size: 5,
                        ..Default::default()
                    }
                    .as_bytes(),
                    b"data\n",
                ]),
            ),
            Negotiated::default(),
        ),
        (
            "rename2",
            frame(
                opcode::RENAME2,
                &cat(&[
                    Rename2In {
                        newdir: 1,
                        flags: 1,
                        padding: 0,
                    }
                    .as_bytes(),
                    b"old\0new\0",
                ]),
            ),
            Negotiated::default(),
        ),
        (
            "setxattr_compat",
            frame(
                opcode::SETXATTR,
                &cat(&[
                    SetxattrInCompat { size: 3, flags: 0 }.as_bytes(),
                    b"user.k\0abc",
                ]),
            ),
            Negotiated {
                setxattr_ext: false,
            },
        ),
        (
            "setxattr_ext",
            frame(
                opcode::SETXATTR,
                &cat(&[
                    SetxattrIn {
                        size: 3,
                        flags: 1,
                        setxattr_flags: 1,
                        padding: 0,
                    }
                    .as_bytes(),
                    b"user.k\0abc",
                ]),
            ),
            Negotiated { setxattr_ext: true },
        ),
        (
            "batch_forget",
            frame(
                opcode::BATCH_FORGET,
                &cat(&[
                    BatchForgetIn { count: 2, dummy: 0 }.as_bytes(),
                    ForgetOne {
                        nodeid: 2,
                        nlookup: 1,
                    }
                    .as_bytes(),
                    ForgetOne {
                        nodeid: 3,
                        nlookup: 7,
                    }
                    .as_bytes(),
                ]),
            ),
            Negotiated::default(),
        ),
        ("mkdir_suppgroup", mkdir, Negotiated::default()),
    ];

    for (name, bytes, negotiated) in seeds {
        // Every seed must be a frame the decoder accepts.
        if let Err(e) = decode(&bytes, &negotiated) {
            panic!("seed {name} does not decode: {e}");
        }
        let path = dir.join(name);
        std::fs::write(&path, &bytes).unwrap();
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
}
