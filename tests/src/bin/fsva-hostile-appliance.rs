//! A deliberately broken appliance for the supervisor's bad-input tests.
//!
//! It speaks the control protocol and serves a stream channel correctly (INIT, an empty
//! root directory) until a LOOKUP of the name `trigger`, which it answers with the
//! malformed reply named by `FSVA_HOSTILE_MODE`:
//! - `short`: a frame whose length field is smaller than a reply header;
//! - `oversized`: a frame claiming 64 MiB;
//! - `unknown`: a well-formed reply to a request that was never sent;
//! - `errno`: a reply with a positive (invalid) error code;
//! - `truncated`: a header announcing more bytes than follow, then exit;
//! - `exit-at-init`: reports ready, then exits without answering INIT.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use fsva_control::{Link, ToAppliance, ToSupervisor};
use fsva_protocol::abi::{self, opcode};
use fsva_protocol::reply::ReplyBuf;
use fsva_protocol::{decode, Negotiated, Operation};

fn main() {
    let fd: i32 = std::env::args()
        .skip_while(|a| a != "--control-fd")
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("--control-fd N");
    // SAFETY: the supervisor passed this descriptor number to us for our exclusive use.
    let link = Link::from_fd(unsafe { OwnedFd::from_raw_fd(fd) });
    let (msg, fds) = link.recv::<ToAppliance>().expect("start message");
    assert!(matches!(msg, ToAppliance::Start(_)));
    let stream = UnixStream::from(fds.into_iter().next().expect("stream socket"));
    link.send(
        &ToSupervisor::Ready {
            pid: std::process::id(),
        },
        &[],
    )
    .unwrap();
    let mode = std::env::var("FSVA_HOSTILE_MODE").unwrap_or_else(|_| "unknown".into());
    if mode == "exit-at-init" {
        std::process::exit(3);
    }
    let mut buf = vec![0u8; 2 << 20];
    let mut reply = ReplyBuf::default();
    let mut out = &stream;
    loop {
        let Ok(Some(n)) = fsva_channel_read(&stream, &mut buf) else {
            return;
        };
        let Ok(req) = decode(&buf[..n], &Negotiated::default()) else {
            continue;
        };
        let u = req.header.unique;
        let frame: Vec<u8> = match req.op {
            Operation::Init(init) => reply
                .value(
                    u,
                    &abi::InitOut {
                        major: 7,
                        minor: init.minor.min(abi::KERNEL_MINOR_VERSION),
                        max_write: 1 << 20,
                        max_readahead: init.max_readahead,
                        ..Default::default()
                    },
                )
                .to_vec(),
            Operation::Getattr(_) => reply
                .value(
                    u,
                    &abi::AttrOut {
                        attr_valid: 0,
                        attr: abi::Attr {
                            ino: 1,
                            mode: libc::S_IFDIR | 0o755,
                            nlink: 2,
                            ..Default::default()
                        },
                        ..Default::default()
                    },
                )
                .to_vec(),
            Operation::Lookup { name } if name == "trigger" => {
                let _ = out.write_all(&hostile(&mode, u));
                if mode == "truncated" {
                    std::process::exit(0);
                }
                continue;
            }
            Operation::Forget(_) | Operation::BatchForget(_) | Operation::Interrupt(_) => continue,
            _ if req.header.opcode == opcode::DESTROY => reply.empty(u).to_vec(),
            Operation::Lookup { .. } => reply.error(u, libc::ENOENT).to_vec(),
            _ => reply.error(u, libc::ENOSYS).to_vec(),
        };
        if out.write_all(&frame).is_err() {
            return;
        }
    }
}

fn hostile(mode: &str, unique: u64) -> Vec<u8> {
    let header = |len: u32, error: i32, unique: u64| {
        let mut v = Vec::new();
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(&error.to_ne_bytes());
        v.extend_from_slice(&unique.to_ne_bytes());
        v
    };
    match mode {
        "short" => header(8, 0, unique),
        "oversized" => header(64 << 20, 0, unique),
        "errno" => header(16, 5, unique),
        "truncated" => header(4096, 0, unique),
        _ => header(16, 0, unique ^ 0xdead_0000),
    }
}

fn fsva_channel_read(mut s: &UnixStream, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    use std::io::Read;
    let mut len = [0u8; 4];
    if s.read_exact(&mut len).is_err() {
        return Ok(None);
    }
    let n = u32::from_ne_bytes(len) as usize;
    if n < 40 || n > buf.len() {
        return Ok(None);
    }
    buf[..4].copy_from_slice(&len);
    s.read_exact(&mut buf[4..n])?;
    Ok(Some(n))
}
