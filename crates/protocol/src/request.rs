//! Decoding of request frames into typed [`Request`]s.
//!
//! A frame is one FUSE request exactly as read from `/dev/fuse` (or received from a
//! stream channel): an [`InHeader`], the opcode's argument struct, trailing names or
//! data, and optional extensions (`total_extlen`). Decoding borrows names and payloads
//! from the frame; it never copies data and never panics, whatever the bytes.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use thiserror::Error;
use zerocopy::FromBytes;

use crate::abi::*;

/// Why a frame could not be decoded. The frame must then be answered with an error
/// (when its header was readable) and must never be acted on.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame of {0} bytes is shorter than a FUSE request header")]
    ShortHeader(usize),
    #[error("header says the frame is {header} bytes but {actual} bytes were received")]
    LengthMismatch { header: u32, actual: usize },
    #[error("opcode {opcode}: argument truncated (needed {needed} more bytes)")]
    Truncated { opcode: u32, needed: usize },
    #[error("opcode {opcode}: name is not NUL-terminated")]
    UnterminatedName { opcode: u32 },
    #[error("opcode {opcode}: payload length {declared} does not match the {actual} bytes sent")]
    PayloadMismatch {
        opcode: u32,
        declared: usize,
        actual: usize,
    },
    #[error("extension area of {0} bytes is malformed")]
    BadExtension(usize),
}

/// Options negotiated at INIT that change how later frames are laid out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// `SETXATTR_EXT`: `fuse_setxattr_in` carries `setxattr_flags`.
    pub setxattr_ext: bool,
}

/// A decoded request: its header, operation and extensions.
#[derive(Debug)]
pub struct Request<'a> {
    pub header: InHeader,
    pub op: Operation<'a>,
    /// Supplementary group sent with creating requests (`CREATE_SUPP_GROUP`).
    pub supp_group: Option<u32>,
}

/// A name as carried on the wire (without its terminating NUL).
pub type Name<'a> = &'a OsStr;

/// One FUSE operation with its arguments.
#[derive(Debug)]
pub enum Operation<'a> {
    Init(InitIn),
    Destroy,
    Lookup {
        name: Name<'a>,
    },
    Forget(ForgetIn),
    BatchForget(Vec<ForgetOne>),
    Getattr(GetattrIn),
    Setattr(SetattrIn),
    Readlink,
    Symlink {
        name: Name<'a>,
        target: &'a [u8],
    },
    Mknod {
        arg: MknodIn,
        name: Name<'a>,
    },
    Mkdir {
        arg: MkdirIn,
        name: Name<'a>,
    },
    Unlink {
        name: Name<'a>,
    },
    Rmdir {
        name: Name<'a>,
    },
    /// RENAME and RENAME2 (`flags` is 0 for RENAME).
    Rename {
        newdir: u64,
        flags: u32,
        name: Name<'a>,
        newname: Name<'a>,
    },
    Link {
        arg: LinkIn,
        name: Name<'a>,
    },
    Open(OpenIn),
    Read(ReadIn),
    Write {
        arg: WriteIn,
        data: &'a [u8],
    },
    Statfs,
    Release(ReleaseIn),
    Fsync(FsyncIn),
    Setxattr {
        size: u32,
        flags: u32,
        setxattr_flags: u32,
        name: Name<'a>,
        value: &'a [u8],
    },
    Getxattr {
        arg: GetxattrIn,
        name: Name<'a>,
    },
    Listxattr(GetxattrIn),
    Removexattr {
        name: Name<'a>,
    },
    Flush(FlushIn),
    Opendir(OpenIn),
    Readdir(ReadIn),
    Readdirplus(ReadIn),
    Releasedir(ReleaseIn),
    Fsyncdir(FsyncIn),
    Getlk(LkIn),
    Setlk(LkIn),
    Setlkw(LkIn),
    Access(AccessIn),
    Create {
        arg: CreateIn,
        name: Name<'a>,
    },
    Interrupt(InterruptIn),
    Fallocate(FallocateIn),
    Lseek(LseekIn),
    CopyFileRange(CopyFileRangeIn),
    /// COPY_FILE_RANGE_64: same arguments, 64-bit result.
    CopyFileRange64(CopyFileRangeIn),
    Tmpfile(CreateIn),
    Statx(StatxIn),
    Syncfs(SyncfsIn),
    /// An opcode this codec does not implement (BMAP, IOCTL, POLL, DAX mappings,
    /// NOTIFY_REPLY, CUSE, or one newer than 7.45). Answered with ENOSYS.
    Unsupported(u32),
}

impl Operation<'_> {
    /// Whether the kernel expects no reply to this operation.
    pub fn is_one_way(&self) -> bool {
        matches!(
            self,
            Operation::Forget(_) | Operation::BatchForget(_) | Operation::Interrupt(_)
        )
    }
}

/// A bounds-checked reader over a frame's argument bytes.
struct Cursor<'a> {
    opcode: u32,
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn arg<T: FromBytes>(&mut self) -> Result<T, DecodeError> {
        match T::read_from_prefix(self.rest) {
            Ok((value, rest)) => {
                self.rest = rest;
                Ok(value)
            }
            Err(_) => Err(DecodeError::Truncated {
                opcode: self.opcode,
                needed: core::mem::size_of::<T>() - self.rest.len(),
            }),
        }
    }

    fn name(&mut self) -> Result<Name<'a>, DecodeError> {
        let bytes = self.cstr()?;
        Ok(OsStr::from_bytes(bytes))
    }

    fn cstr(&mut self) -> Result<&'a [u8], DecodeError> {
        let nul = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::UnterminatedName {
                opcode: self.opcode,
            })?;
        let (s, rest) = self.rest.split_at(nul);
        self.rest = &rest[1..];
        Ok(s)
    }

    fn bytes(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < len {
            return Err(DecodeError::PayloadMismatch {
                opcode: self.opcode,
                declared: len,
                actual: self.rest.len(),
            });
        }
        let (b, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(b)
    }
}

/// Decodes one request frame. `frame` must be exactly the bytes of one request.
pub fn decode<'a>(frame: &'a [u8], negotiated: &Negotiated) -> Result<Request<'a>, DecodeError> {
    let header = decode_header(frame)?;
    let ext_len = usize::from(header.total_extlen) * 8;
    let body = &frame[core::mem::size_of::<InHeader>()..];
    if ext_len > body.len() {
        return Err(DecodeError::BadExtension(ext_len));
    }
    let (args, ext) = body.split_at(body.len() - ext_len);
    let supp_group = decode_extensions(ext)?;
    let op = decode_operation(header.opcode, args, negotiated)?;
    Ok(Request {
        header,
        op,
        supp_group,
    })
}

/// Reads and validates just the header of a frame: enough to answer it with an error.
pub fn decode_header(frame: &[u8]) -> Result<InHeader, DecodeError> {
    let (header, _) =
        InHeader::read_from_prefix(frame).map_err(|_| DecodeError::ShortHeader(frame.len()))?;
    if header.len as usize != frame.len() {
        return Err(DecodeError::LengthMismatch {
            header: header.len,
            actual: frame.len(),
        });
    }
    Ok(header)
}

fn decode_extensions(mut ext: &[u8]) -> Result<Option<u32>, DecodeError> {
    let total = ext.len();
    let mut group = None;
    while !ext.is_empty() {
        let (h, _) =
            ExtHeader::read_from_prefix(ext).map_err(|_| DecodeError::BadExtension(total))?;
        let size = h.size as usize;
        if size < core::mem::size_of::<ExtHeader>() || size > ext.len() || !size.is_multiple_of(8) {
            return Err(DecodeError::BadExtension(total));
        }
        let payload = &ext[core::mem::size_of::<ExtHeader>()..size];
        if h.typ == ext::GROUPS {
            // struct fuse_supp_groups { u32 nr_groups; u32 groups[]; }
            let (nr, groups) =
                u32::read_from_prefix(payload).map_err(|_| DecodeError::BadExtension(total))?;
            if nr >= 1 {
                let (g, _) =
                    u32::read_from_prefix(groups).map_err(|_| DecodeError::BadExtension(total))?;
                group = Some(g);
            }
        }
        ext = &ext[size..];
    }
    Ok(group)
}

fn decode_operation<'a>(
    opcode: u32,
    args: &'a [u8],
    negotiated: &Negotiated,
) -> Result<Operation<'a>, DecodeError> {
    let mut c = Cursor { opcode, rest: args };
    use crate::abi::opcode as op;
    Ok(match opcode {
        op::INIT => {
            // Older kernels send only the first four fields.
            let mut init = InitIn::default();
            let n = c.rest.len().min(core::mem::size_of::<InitIn>());
            if n < INIT_IN_COMPAT_SIZE {
                return Err(DecodeError::Truncated {
                    opcode,
                    needed: INIT_IN_COMPAT_SIZE - n,
                });
            }
            let mut buf = [0u8; core::mem::size_of::<InitIn>()];
            buf[..n].copy_from_slice(&c.rest[..n]);
            if let Ok(v) = InitIn::read_from_bytes(&buf[..]) {
                init = v;
            }
            Operation::Init(init)
        }
        op::DESTROY => Operation::Destroy,
        op::LOOKUP => Operation::Lookup { name: c.name()? },
        op::FORGET => Operation::Forget(c.arg()?),
        op::BATCH_FORGET => {
            let head: BatchForgetIn = c.arg()?;
            let count = head.count as usize;
            let needed = count.saturating_mul(core::mem::size_of::<ForgetOne>());
            if c.rest.len() < needed {
                return Err(DecodeError::Truncated {
                    opcode,
                    needed: needed - c.rest.len(),
                });
            }
            let mut nodes = Vec::with_capacity(count);
            for _ in 0..count {
                nodes.push(c.arg::<ForgetOne>()?);
            }
            Operation::BatchForget(nodes)
        }
        op::GETATTR => Operation::Getattr(c.arg()?),
        op::SETATTR => Operation::Setattr(c.arg()?),
        op::READLINK => Operation::Readlink,
        op::SYMLINK => {
            let name = c.name()?;
            let target = c.cstr()?;
            Operation::Symlink { name, target }
        }
        op::MKNOD => Operation::Mknod {
            arg: c.arg()?,
            name: c.name()?,
        },
        op::MKDIR => Operation::Mkdir {
            arg: c.arg()?,
            name: c.name()?,
        },
        op::UNLINK => Operation::Unlink { name: c.name()? },
        op::RMDIR => Operation::Rmdir { name: c.name()? },
        op::RENAME => {
            let arg: RenameIn = c.arg()?;
            Operation::Rename {
                newdir: arg.newdir,
                flags: 0,
                name: c.name()?,
                newname: c.name()?,
            }
        }
        op::RENAME2 => {
            let arg: Rename2In = c.arg()?;
            Operation::Rename {
                newdir: arg.newdir,
                flags: arg.flags,
                name: c.name()?,
                newname: c.name()?,
            }
        }
        op::LINK => Operation::Link {
            arg: c.arg()?,
            name: c.name()?,
        },
        op::OPEN => Operation::Open(c.arg()?),
        op::READ => Operation::Read(c.arg()?),
        op::WRITE => {
            let arg: WriteIn = c.arg()?;
            let data = c.bytes(arg.size as usize)?;
            Operation::Write { arg, data }
        }
        op::STATFS => Operation::Statfs,
        op::RELEASE => Operation::Release(c.arg()?),
        op::FSYNC => Operation::Fsync(c.arg()?),
        op::SETXATTR => {
            let (size, flags, setxattr_flags) = if negotiated.setxattr_ext {
                let a: SetxattrIn = c.arg()?;
                (a.size, a.flags, a.setxattr_flags)
            } else {
                let a: SetxattrInCompat = c.arg()?;
                (a.size, a.flags, 0)
            };
            let name = c.name()?;
            let value = c.bytes(size as usize)?;
            Operation::Setxattr {
                size,
                flags,
                setxattr_flags,
                name,
                value,
            }
        }
        op::GETXATTR => Operation::Getxattr {
            arg: c.arg()?,
            name: c.name()?,
        },
        op::LISTXATTR => Operation::Listxattr(c.arg()?),
        op::REMOVEXATTR => Operation::Removexattr { name: c.name()? },
        op::FLUSH => Operation::Flush(c.arg()?),
        op::OPENDIR => Operation::Opendir(c.arg()?),
        op::READDIR => Operation::Readdir(c.arg()?),
        op::READDIRPLUS => Operation::Readdirplus(c.arg()?),
        op::RELEASEDIR => Operation::Releasedir(c.arg()?),
        op::FSYNCDIR => Operation::Fsyncdir(c.arg()?),
        op::GETLK => Operation::Getlk(c.arg()?),
        op::SETLK => Operation::Setlk(c.arg()?),
        op::SETLKW => Operation::Setlkw(c.arg()?),
        op::ACCESS => Operation::Access(c.arg()?),
        op::CREATE => Operation::Create {
            arg: c.arg()?,
            name: c.name()?,
        },
        op::INTERRUPT => Operation::Interrupt(c.arg()?),
        op::FALLOCATE => Operation::Fallocate(c.arg()?),
        op::LSEEK => Operation::Lseek(c.arg()?),
        op::COPY_FILE_RANGE => Operation::CopyFileRange(c.arg()?),
        op::COPY_FILE_RANGE_64 => Operation::CopyFileRange64(c.arg()?),
        op::TMPFILE => Operation::Tmpfile(c.arg()?),
        op::STATX => Operation::Statx(c.arg()?),
        op::SYNCFS => Operation::Syncfs(c.arg()?),
        other => Operation::Unsupported(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    fn frame(opcode: u32, args: &[u8]) -> Vec<u8> {
        let header = InHeader {
            len: (40 + args.len()) as u32,
            opcode,
            unique: 7,
            nodeid: 1,
            ..Default::default()
        };
        let mut v = header.as_bytes().to_vec();
        v.extend_from_slice(args);
        v
    }

    #[test]
    fn decodes_lookup_name() {
        let f = frame(opcode::LOOKUP, b"hello\0");
        let r = decode(&f, &Negotiated::default()).unwrap();
        match r.op {
            Operation::Lookup { name } => assert_eq!(name, "hello"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn rejects_unterminated_name() {
        let f = frame(opcode::LOOKUP, b"hello");
        assert_eq!(
            decode(&f, &Negotiated::default()).unwrap_err(),
            DecodeError::UnterminatedName {
                opcode: opcode::LOOKUP
            }
        );
    }

    #[test]
    fn rejects_length_mismatch_and_short_frames() {
        let mut f = frame(opcode::GETATTR, &[0u8; 16]);
        f.push(0);
        assert!(matches!(
            decode(&f, &Negotiated::default()),
            Err(DecodeError::LengthMismatch { .. })
        ));
        assert!(matches!(
            decode(&f[..10], &Negotiated::default()),
            Err(DecodeError::ShortHeader(10))
        ));
    }

    #[test]
    fn rejects_write_with_short_payload() {
        let arg = WriteIn {
            size: 100,
            ..Default::default()
        };
        let mut args = arg.as_bytes().to_vec();
        args.extend_from_slice(&[1u8; 10]);
        let f = frame(opcode::WRITE, &args);
        assert!(matches!(
            decode(&f, &Negotiated::default()),
            Err(DecodeError::PayloadMismatch { .. })
        ));
    }

    #[test]
    fn decodes_rename2_names_and_flags() {
        let arg = Rename2In {
            newdir: 9,
            flags: 1,
            padding: 0,
        };
        let mut args = arg.as_bytes().to_vec();
        args.extend_from_slice(b"a\0b\0");
        let f = frame(opcode::RENAME2, &args);
        match decode(&f, &Negotiated::default()).unwrap().op {
            Operation::Rename {
                newdir,
                flags,
                name,
                newname,
            } => {
                assert_eq!((newdir, flags), (9, 1));
                assert_eq!((name, newname), (OsStr::new("a"), OsStr::new("b")));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn setxattr_layout_follows_negotiation() {
        let mut compat = SetxattrInCompat { size: 3, flags: 0 }.as_bytes().to_vec();
        compat.extend_from_slice(b"user.x\0abc");
        let f = frame(opcode::SETXATTR, &compat);
        match decode(&f, &Negotiated::default()).unwrap().op {
            Operation::Setxattr { name, value, .. } => {
                assert_eq!(name, "user.x");
                assert_eq!(value, b"abc");
            }
            other => panic!("unexpected {other:?}"),
        }
        // The same bytes under SETXATTR_EXT are one struct field short.
        let ext = Negotiated { setxattr_ext: true };
        assert!(decode(&f, &ext).is_err());
    }

    #[test]
    fn unknown_opcode_is_unsupported_not_error() {
        let f = frame(9999, &[]);
        assert!(matches!(
            decode(&f, &Negotiated::default()).unwrap().op,
            Operation::Unsupported(9999)
        ));
    }

    #[test]
    fn batch_forget_count_is_bounded_by_frame() {
        let head = BatchForgetIn {
            count: u32::MAX,
            dummy: 0,
        };
        let f = frame(opcode::BATCH_FORGET, head.as_bytes());
        assert!(matches!(
            decode(&f, &Negotiated::default()),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn reads_supplementary_group_extension() {
        let mut args = MkdirIn {
            mode: 0o755,
            umask: 0o22,
        }
        .as_bytes()
        .to_vec();
        args.extend_from_slice(b"d\0");
        // pad arguments to 8 bytes as the kernel does before extensions
        while !args.len().is_multiple_of(8) {
            args.push(0);
        }
        let ext = [
            ExtHeader {
                size: 16,
                typ: ext::GROUPS,
            }
            .as_bytes(),
            &1u32.to_ne_bytes(),
            &1234u32.to_ne_bytes(),
        ]
        .concat();
        args.extend_from_slice(&ext);
        let mut f = frame(opcode::MKDIR, &args);
        f[36..38].copy_from_slice(&2u16.to_ne_bytes()); // total_extlen = 16 bytes
        let r = decode(&f, &Negotiated::default()).unwrap();
        assert_eq!(r.supp_group, Some(1234));
    }
}
