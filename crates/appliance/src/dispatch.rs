//! One request frame in, at most one reply frame out.
//!
//! [`Dispatcher::handle`] decodes a frame, calls the matching [`Filesystem`] method and
//! encodes its result. A frame that cannot be decoded is answered with an error when its
//! header is readable (EIO for malformed arguments) and dropped otherwise; an opcode the
//! codec does not know is answered with ENOSYS. This module must never panic on input
//! and never block except inside the backend.

use std::sync::Arc;
use std::time::Duration;

use fsva_protocol::abi::{self, flags, opcode};
use fsva_protocol::reply::ReplyBuf;
use fsva_protocol::request::{decode_header, DecodeError};
use fsva_protocol::{decode, Operation};
use zerocopy::IntoBytes;

use crate::backing::{BackingFiles, BackingIds};
use crate::filesystem::{Context, DirSink, Errno, Filesystem, Opened, Xattr};
use crate::session::{negotiate, InitReply, Session, SessionConfig};

/// What the worker should do after handling a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send the frame now in the reply buffer.
    Reply,
    /// The request takes no reply (FORGET, INTERRUPT) or could not be attributed.
    NoReply,
}

/// Turns frames into backend calls. Shared by all workers of an appliance.
pub struct Dispatcher {
    fs: Arc<dyn Filesystem>,
    session: Session,
    config: SessionConfig,
    /// Registers FUSE passthrough backing files, when the supervisor offers it.
    backing: Option<Arc<dyn BackingFiles>>,
    backing_ids: BackingIds,
    backing_refused: std::sync::atomic::AtomicBool,
    destroyed: std::sync::atomic::AtomicBool,
    /// The recovery journal, when the supervisor keeps one for this appliance.
    journal: Option<Arc<crate::journal::Journal>>,
}

/// Maps a backend result onto the reply buffer.
fn finish<T>(
    reply: &mut ReplyBuf,
    unique: u64,
    r: Result<T, Errno>,
    ok: impl FnOnce(&mut ReplyBuf, T),
) -> Outcome {
    match r {
        Ok(v) => ok(reply, v),
        Err(e) => {
            reply.error(unique, e.0);
        }
    }
    Outcome::Reply
}

fn attr_out(attr: abi::Attr, ttl: Duration) -> abi::AttrOut {
    abi::AttrOut {
        attr_valid: ttl.as_secs(),
        attr_valid_nsec: ttl.subsec_nanos(),
        dummy: 0,
        attr,
    }
}

fn xattr_reply(reply: &mut ReplyBuf, unique: u64, x: Xattr) {
    match x {
        Xattr::Size(size) => {
            reply.value(unique, &abi::GetxattrOut { size, padding: 0 });
        }
        Xattr::Data(d) => {
            reply.bytes(unique, &d);
        }
    }
}

impl Dispatcher {
    /// `journal`: where the runtime records its own changes (backing ids, the
    /// negotiated session) for a successor after a crash.
    pub fn new(
        fs: Arc<dyn Filesystem>,
        config: SessionConfig,
        backing: Option<Arc<dyn BackingFiles>>,
        journal: Option<Arc<crate::journal::Journal>>,
    ) -> Self {
        Self {
            fs,
            session: Session::default(),
            config,
            backing,
            backing_ids: match &journal {
                Some(j) => BackingIds::journaled(j.clone()),
                None => BackingIds::default(),
            },
            backing_refused: Default::default(),
            destroyed: Default::default(),
            journal,
        }
    }

    pub fn journal(&self) -> Option<&Arc<crate::journal::Journal>> {
        self.journal.as_ref()
    }

    /// Tells the backend the mount is gone (once: on DESTROY, or when every channel
    /// closed without one, as a plain FUSE unmount does).
    pub fn destroy(&self) {
        if !self
            .destroyed
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            self.fs.destroy();
        }
    }

    /// Open handles whose data the kernel reads and writes directly (FUSE passthrough).
    pub fn passthrough_files(&self) -> usize {
        self.backing_ids.len()
    }

    /// The OPEN/CREATE reply for `o`, registering its backing file when passthrough is
    /// in force; without it (or if registration fails) data goes through the appliance.
    fn open_out(&self, ino: u64, o: &Opened) -> abi::OpenOut {
        let mut out = abi::OpenOut {
            fh: o.fh,
            open_flags: o.open_flags & !abi::fopen::PASSTHROUGH,
            backing_id: 0,
        };
        let negotiated = self
            .session
            .negotiation()
            .is_some_and(|n| n.has(abi::init_flags::PASSTHROUGH));
        if let (true, Some(backing), Some(file)) = (negotiated, &self.backing, &o.backing) {
            use std::os::fd::AsFd;
            match self
                .backing_ids
                .acquire(ino, o.fh, || backing.open(file.as_fd()))
            {
                Ok(id) => {
                    // The kernel refuses a passthrough open with any other flag than
                    // these (FOPEN_PASSTHROUGH_MASK); KEEP_CACHE and the like make no
                    // sense when the backing file's page cache is the cache.
                    out.open_flags &= abi::fopen::PARALLEL_DIRECT_WRITES | abi::fopen::NOFLUSH;
                    out.open_flags |= abi::fopen::PASSTHROUGH;
                    out.backing_id = id;
                }
                Err(e) => {
                    if !self
                        .backing_refused
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::warn!(error = %e, "backing file not registered; serving data through the appliance");
                    }
                }
            }
        }
        out
    }

    /// The runtime's part of a state, around the backend's snapshot; `boundary` is
    /// the last journal record it holds (0 without a journal).
    pub fn state(&self, backend: Vec<u8>, boundary: u64) -> crate::state::ApplianceState {
        crate::state::ApplianceState::V2(crate::state::StateV2 {
            session: self.session.negotiation().map(|n| n.saved()),
            backing: self.backing_ids.export(),
            backend,
            journal_boundary: boundary,
        })
    }

    /// Takes over a predecessor's session and backing registrations.
    pub fn adopt(&self, state: &crate::state::StateV2) {
        if let Some(s) = state.session {
            self.adopt_session(s);
        }
        self.backing_ids.import(&state.backing);
    }

    /// Takes over a predecessor's negotiated session (the kernel sends no second INIT).
    pub fn adopt_session(&self, s: crate::state::SessionV1) {
        self.session
            .establish(crate::session::Negotiation::restored(s));
    }

    /// Applies the runtime's journal records of a predecessor (crash recovery).
    pub fn replay(&self, records: &[crate::backing::RuntimeRecordV1]) {
        for r in records {
            self.backing_ids.replay(r);
        }
    }

    /// The backend (to checkpoint it).
    pub fn filesystem(&self) -> &Arc<dyn Filesystem> {
        &self.fs
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The largest request frame this session can receive.
    pub fn max_frame(&self) -> usize {
        self.config.max_write as usize + 4096 * 2
    }

    /// Handles one frame. On `Outcome::Reply` the reply is in `reply`.
    pub fn handle(&self, frame: &[u8], reply: &mut ReplyBuf) -> Outcome {
        let req = match decode(frame, &self.session.codec()) {
            Ok(r) => r,
            Err(e) => return self.malformed(frame, e, reply),
        };
        let h = req.header;
        let u = h.unique;
        let ino = h.nodeid;
        tracing::trace!(unique = u, opcode = h.opcode, nodeid = ino, "request");
        let ctx = Context {
            unique: u,
            uid: h.uid,
            gid: h.gid,
            pid: h.pid,
            supp_group: req.supp_group,
        };
        let fs = &*self.fs;
        if u & abi::UNIQUE_RESEND != 0 {
            if let Some(done) = fs.completed(u & !abi::UNIQUE_RESEND) {
                tracing::debug!(
                    unique = u,
                    opcode = h.opcode,
                    "resent request had taken effect; answering with its first result"
                );
                return self.reply_completed(&req, done, reply);
            }
        }
        match req.op {
            Operation::Init(init) => {
                let mut wanted = fs.init(
                    u64::from(init.flags)
                        | if init.flags as u64 & abi::init_flags::INIT_EXT != 0 {
                            u64::from(init.flags2) << 32
                        } else {
                            0
                        },
                );
                if self.backing.is_none() {
                    wanted.flags &= !abi::init_flags::PASSTHROUGH;
                }
                match negotiate(&init, wanted, &self.config) {
                    InitReply::Accept(out, n) => {
                        tracing::info!(
                            minor = n.minor,
                            flags = format_args!("{:#x}", n.flags),
                            max_write = n.max_write,
                            "FUSE session established"
                        );
                        self.session.establish(n);
                        if let Some(j) = &self.journal {
                            j.set_session(n.saved());
                        }
                        reply.value(u, &out);
                    }
                    InitReply::MajorOnly(out) => {
                        reply.bytes(u, &out.as_bytes()[..8]);
                    }
                    InitReply::Refuse(errno) => {
                        tracing::error!(
                            major = init.major,
                            minor = init.minor,
                            "kernel FUSE version too old"
                        );
                        reply.error(u, errno);
                    }
                }
                Outcome::Reply
            }
            Operation::Destroy => {
                self.destroy();
                reply.empty(u);
                Outcome::Reply
            }
            Operation::Forget(f) => {
                fs.forget(ino, f.nlookup);
                Outcome::NoReply
            }
            Operation::BatchForget(nodes) => {
                for n in nodes {
                    fs.forget(n.nodeid, n.nlookup);
                }
                Outcome::NoReply
            }
            // Locks are kept by the kernel (POSIX_LOCKS/FLOCK_LOCKS are not negotiated),
            // so there is never a blocked request here to interrupt.
            Operation::Interrupt(_) => Outcome::NoReply,
            Operation::Lookup { name } => finish(reply, u, fs.lookup(&ctx, ino, name), |r, e| {
                r.value(u, &e.to_abi());
            }),
            Operation::Getattr(a) => {
                let fh = (a.getattr_flags & flags::GETATTR_FH != 0).then_some(a.fh);
                finish(reply, u, fs.getattr(&ctx, ino, fh), |r, (attr, ttl)| {
                    r.value(u, &attr_out(attr, ttl));
                })
            }
            Operation::Setattr(a) => {
                finish(reply, u, fs.setattr(&ctx, ino, &a), |r, (attr, ttl)| {
                    r.value(u, &attr_out(attr, ttl));
                })
            }
            Operation::Readlink => finish(reply, u, fs.readlink(&ctx, ino), |r, t| {
                r.bytes(u, &t);
            }),
            Operation::Symlink { name, target } => {
                finish(reply, u, fs.symlink(&ctx, ino, name, target), |r, e| {
                    r.value(u, &e.to_abi());
                })
            }
            Operation::Mknod { arg, name } => finish(
                reply,
                u,
                fs.mknod(&ctx, ino, name, arg.mode, arg.rdev, arg.umask),
                |r, e| {
                    r.value(u, &e.to_abi());
                },
            ),
            Operation::Mkdir { arg, name } => finish(
                reply,
                u,
                fs.mkdir(&ctx, ino, name, arg.mode, arg.umask),
                |r, e| {
                    r.value(u, &e.to_abi());
                },
            ),
            Operation::Unlink { name } => finish(reply, u, fs.unlink(&ctx, ino, name), |r, ()| {
                r.empty(u);
            }),
            Operation::Rmdir { name } => finish(reply, u, fs.rmdir(&ctx, ino, name), |r, ()| {
                r.empty(u);
            }),
            Operation::Rename {
                newdir,
                flags,
                name,
                newname,
            } => finish(
                reply,
                u,
                fs.rename(&ctx, ino, name, newdir, newname, flags),
                |r, ()| {
                    r.empty(u);
                },
            ),
            Operation::Link { arg, name } => {
                finish(reply, u, fs.link(&ctx, arg.oldnodeid, ino, name), |r, e| {
                    r.value(u, &e.to_abi());
                })
            }
            Operation::Open(a) => {
                let kill = a.open_flags & flags::OPEN_KILL_SUIDGID != 0;
                finish(reply, u, fs.open(&ctx, ino, a.flags, kill), |r, o| {
                    r.value(u, &self.open_out(ino, &o));
                })
            }
            Operation::Read(a) => {
                let size = a.size.min(self.config.max_write);
                let out = reply.start(u);
                match fs.read(&ctx, ino, a.fh, a.offset, size, a.flags, out) {
                    Ok(()) => {
                        reply.finish();
                    }
                    Err(e) => {
                        reply.error(u, e.0);
                    }
                }
                Outcome::Reply
            }
            Operation::Write { arg, data } => finish(
                reply,
                u,
                fs.write(
                    &ctx,
                    ino,
                    arg.fh,
                    arg.offset,
                    data,
                    arg.write_flags,
                    arg.flags,
                ),
                |r, n| {
                    r.value(
                        u,
                        &abi::WriteOut {
                            size: n,
                            padding: 0,
                        },
                    );
                },
            ),
            Operation::Statfs => finish(reply, u, fs.statfs(&ctx, ino), |r, st| {
                r.value(u, &st);
            }),
            Operation::Release(a) => {
                let result = fs.release(&ctx, ino, a.fh, a.flags);
                if let (Some(id), Some(backing)) = (self.backing_ids.release(a.fh), &self.backing) {
                    backing.close(id);
                }
                finish(reply, u, result, |r, ()| {
                    r.empty(u);
                })
            }
            Operation::Fsync(a) => finish(
                reply,
                u,
                fs.fsync(&ctx, ino, a.fh, a.fsync_flags & flags::FSYNC_FDATASYNC != 0),
                |r, ()| {
                    r.empty(u);
                },
            ),
            Operation::Setxattr {
                flags: xflags,
                setxattr_flags,
                name,
                value,
                ..
            } => finish(
                reply,
                u,
                fs.setxattr(&ctx, ino, name, value, xflags, setxattr_flags),
                |r, ()| {
                    r.empty(u);
                },
            ),
            Operation::Getxattr { arg, name } => {
                finish(reply, u, fs.getxattr(&ctx, ino, name, arg.size), |r, x| {
                    xattr_reply(r, u, x)
                })
            }
            Operation::Listxattr(a) => finish(reply, u, fs.listxattr(&ctx, ino, a.size), |r, x| {
                xattr_reply(r, u, x)
            }),
            Operation::Removexattr { name } => {
                finish(reply, u, fs.removexattr(&ctx, ino, name), |r, ()| {
                    r.empty(u);
                })
            }
            Operation::Flush(a) => finish(
                reply,
                u,
                fs.flush(&ctx, ino, a.fh, a.lock_owner),
                |r, ()| {
                    r.empty(u);
                },
            ),
            Operation::Opendir(a) => finish(reply, u, fs.opendir(&ctx, ino, a.flags), |r, o| {
                r.value(u, &self.open_out(ino, &o));
            }),
            Operation::Readdir(a) | Operation::Readdirplus(a) => {
                let plus = h.opcode == opcode::READDIRPLUS;
                let limit = (a.size as usize).min(self.config.max_write as usize);
                let out = reply.start(u);
                let mut sink = DirSink::new(out, limit, plus);
                match fs.readdir(&ctx, ino, a.fh, a.offset, &mut sink) {
                    Ok(()) => {
                        reply.finish();
                    }
                    Err(e) => {
                        reply.error(u, e.0);
                    }
                }
                Outcome::Reply
            }
            Operation::Releasedir(a) => {
                finish(reply, u, fs.releasedir(&ctx, ino, a.fh), |r, ()| {
                    r.empty(u);
                })
            }
            Operation::Fsyncdir(a) => finish(
                reply,
                u,
                fs.fsyncdir(&ctx, ino, a.fh, a.fsync_flags & flags::FSYNC_FDATASYNC != 0),
                |r, ()| {
                    r.empty(u);
                },
            ),
            Operation::Access(a) => finish(reply, u, fs.access(&ctx, ino, a.mask), |r, ()| {
                r.empty(u);
            }),
            Operation::Create { arg, name } => finish(
                reply,
                u,
                fs.create(&ctx, ino, name, arg.mode, arg.umask, arg.flags),
                |r, (e, o)| {
                    let b = r.start(u);
                    b.extend_from_slice(e.to_abi().as_bytes());
                    b.extend_from_slice(self.open_out(e.ino, &o).as_bytes());
                    r.finish();
                },
            ),
            Operation::Tmpfile(arg) => finish(
                reply,
                u,
                fs.tmpfile(&ctx, ino, arg.mode, arg.umask, arg.flags),
                |r, (e, o)| {
                    let b = r.start(u);
                    b.extend_from_slice(e.to_abi().as_bytes());
                    b.extend_from_slice(self.open_out(e.ino, &o).as_bytes());
                    r.finish();
                },
            ),
            Operation::Fallocate(a) => finish(
                reply,
                u,
                fs.fallocate(&ctx, ino, a.fh, a.offset, a.length, a.mode),
                |r, ()| {
                    r.empty(u);
                },
            ),
            Operation::Lseek(a) => finish(
                reply,
                u,
                fs.lseek(&ctx, ino, a.fh, a.offset, a.whence),
                |r, off| {
                    r.value(u, &abi::LseekOut { offset: off });
                },
            ),
            Operation::CopyFileRange(a) | Operation::CopyFileRange64(a) => {
                let wide = h.opcode == opcode::COPY_FILE_RANGE_64;
                let len = if wide {
                    a.len
                } else {
                    a.len.min(u64::from(u32::MAX) & !0xfff)
                };
                finish(
                    reply,
                    u,
                    fs.copy_file_range(
                        &ctx,
                        ino,
                        a.fh_in,
                        a.off_in,
                        a.nodeid_out,
                        a.fh_out,
                        a.off_out,
                        len,
                        a.flags,
                    ),
                    |r, n| {
                        if wide {
                            r.value(u, &abi::CopyFileRangeOut64 { bytes_copied: n });
                        } else {
                            r.value(
                                u,
                                &abi::WriteOut {
                                    size: n as u32,
                                    padding: 0,
                                },
                            );
                        }
                    },
                )
            }
            Operation::Statx(a) => {
                let fh = (a.getattr_flags & flags::GETATTR_FH != 0).then_some(a.fh);
                finish(
                    reply,
                    u,
                    fs.statx(&ctx, ino, fh, a.sx_flags, a.sx_mask),
                    |r, (stat, ttl)| {
                        r.value(
                            u,
                            &abi::StatxOut {
                                attr_valid: ttl.as_secs(),
                                attr_valid_nsec: ttl.subsec_nanos(),
                                flags: 0,
                                spare: [0; 2],
                                stat,
                            },
                        );
                    },
                )
            }
            Operation::Syncfs(_) => finish(reply, u, fs.syncfs(&ctx), |r, ()| {
                r.empty(u);
            }),
            // Locks live in the kernel; these are only sent if a kernel ignores that.
            Operation::Getlk(_) | Operation::Setlk(_) | Operation::Setlkw(_) => {
                reply.error(u, libc::ENOSYS);
                Outcome::Reply
            }
            Operation::Unsupported(op) => {
                tracing::debug!(opcode = op, "unsupported opcode, answering ENOSYS");
                reply.error(u, libc::ENOSYS);
                Outcome::Reply
            }
        }
    }

    /// The reply a resent request gets when its first execution had taken effect.
    fn reply_completed(
        &self,
        req: &fsva_protocol::Request<'_>,
        done: crate::filesystem::Completed,
        reply: &mut ReplyBuf,
    ) -> Outcome {
        use crate::filesystem::Completed as C;
        let h = req.header;
        let u = h.unique;
        match (&req.op, done) {
            (
                Operation::Mkdir { .. }
                | Operation::Mknod { .. }
                | Operation::Symlink { .. }
                | Operation::Link { .. }
                | Operation::Lookup { .. },
                C::Entry(e),
            ) => {
                reply.value(u, &e.to_abi());
            }
            (Operation::Setattr(_), C::Attr(attr, ttl)) => {
                reply.value(u, &attr_out(attr, ttl));
            }
            (Operation::Open(_) | Operation::Opendir(_), C::Opened(o)) => {
                reply.value(u, &self.open_out(h.nodeid, &o));
            }
            (Operation::Create { .. } | Operation::Tmpfile(_), C::Created(e, o)) => {
                let b = reply.start(u);
                b.extend_from_slice(e.to_abi().as_bytes());
                b.extend_from_slice(self.open_out(e.ino, &o).as_bytes());
                reply.finish();
            }
            (Operation::Write { .. }, C::Written(size)) => {
                reply.value(u, &abi::WriteOut { size, padding: 0 });
            }
            (Operation::CopyFileRange(_), C::Copied(n)) => {
                reply.value(
                    u,
                    &abi::WriteOut {
                        size: n as u32,
                        padding: 0,
                    },
                );
            }
            (Operation::CopyFileRange64(_), C::Copied(n)) => {
                reply.value(u, &abi::CopyFileRangeOut64 { bytes_copied: n });
            }
            (Operation::Release(a), C::Done) => {
                if let (Some(id), Some(backing)) = (self.backing_ids.release(a.fh), &self.backing) {
                    backing.close(id);
                }
                reply.empty(u);
            }
            (_, C::Done) => {
                reply.empty(u);
            }
            (_, other) => {
                tracing::error!(unique = u, opcode = h.opcode, result = ?other, "a journal result does not fit the resent request; answering EIO");
                reply.error(u, libc::EIO);
            }
        }
        Outcome::Reply
    }

    fn malformed(&self, frame: &[u8], e: DecodeError, reply: &mut ReplyBuf) -> Outcome {
        tracing::warn!(error = %e, "malformed request frame");
        match decode_header(frame) {
            Ok(h)
                if h.opcode != opcode::FORGET
                    && h.opcode != opcode::BATCH_FORGET
                    && h.opcode != opcode::INTERRUPT =>
            {
                reply.error(h.unique, libc::EIO);
                Outcome::Reply
            }
            _ => Outcome::NoReply,
        }
    }
}
