//! The supervisor's safe-keeping for one mount's appliances: everything a successor
//! needs to carry on after an appliance dies — the recovery journal (a memfd this
//! module creates), the last checkpoint, and descriptors: the memfds holding `mem`'s
//! file contents, or a passthrough appliance's open files (so that an open file
//! unlinked meanwhile survives its appliance).
//!
//! The appliance sends descriptors and checkpoints over its keeper link, one way
//! ([`serve`]); a message it has sent is kept even if it dies at once, because the
//! supervisor reads everything queued on the link before it starts a successor
//! ([`LinkEnd::wait`]). What is kept is handed to a successor as it is; this module
//! never reads a checkpoint or the journal, and never trusts the appliance beyond
//! holding what it gave (only what the mount's [`Accept`] allows — memfds, or regular
//! files of the export's device — and no more than [`MAX_KEPT`]).

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fsva_control::{KeeperMessage, Link, LinkError};

/// Most descriptors kept for one mount (a compromised appliance must not exhaust the
/// supervisor's descriptor table).
pub const MAX_KEPT: usize = 1 << 20;

/// Which descriptors a mount's appliances may leave in keeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// Memfds (`mem`'s file contents).
    Memfds,
    /// Regular files on this device (a passthrough export's open files).
    FilesOn(u64),
}

/// What is kept for one mount.
pub struct Kept {
    journal: OwnedFd,
    accept: Accept,
    inner: Mutex<Inner>,
    /// Signalled when a checkpoint is stored.
    stored: Condvar,
}

#[derive(Default)]
struct Inner {
    checkpoint: Option<(OwnedFd, u64)>,
    /// Each kept descriptor with the order it came in (see [`Mark`]).
    fds: HashMap<u64, (OwnedFd, u64)>,
    received: u64,
    refused: u64,
    /// Called when a new checkpoint is stored (a spare may preload it).
    on_checkpoint: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// How much of the keeping a spare successor already has: the checkpoint it preloaded
/// (its boundary) and every descriptor kept up to a point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mark {
    pub boundary: Option<u64>,
    pub received: u64,
}

/// Tells when everything one appliance sent on its keeper link has been read.
///
/// Once the appliance is dead nothing more can come, but its end of the link closes
/// only when the kernel has closed all its descriptors (milliseconds for a mem with
/// many files). So the supervisor keeps a duplicate of that end and, after the death,
/// writes a barrier on it: when the barrier is read, so is everything before it.
#[derive(Clone)]
pub struct LinkEnd {
    state: Arc<(Mutex<EndState>, Condvar)>,
    /// A duplicate of the appliance's end, for the barrier.
    peer: Arc<Mutex<Option<Link>>>,
    nonce: u64,
}

#[derive(Default)]
struct EndState {
    ended: bool,
    barrier: bool,
}

impl LinkEnd {
    /// Once the appliance that held this link is dead: waits at most `limit` until
    /// everything it sent has been read; whether it has.
    pub fn wait(&self, limit: Duration) -> bool {
        if let Some(peer) = self.peer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // If this fails the link is gone anyway: its end then comes as EOF.
            let _ = peer.send(&KeeperMessage::Barrier { nonce: self.nonce }, &[]);
        }
        let (state, cv) = &*self.state;
        let g = state.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = cv
            .wait_timeout_while(g, limit, |s| !s.ended && !s.barrier)
            .unwrap_or_else(|p| p.into_inner());
        g.ended || g.barrier
    }
}

/// What the reading thread updates (it must not hold the duplicate of the peer's end,
/// or the link would never end).
struct Reading {
    state: Arc<(Mutex<EndState>, Condvar)>,
    nonce: u64,
}

impl Reading {
    fn note(&self, f: impl FnOnce(&mut EndState)) {
        let (state, cv) = &*self.state;
        f(&mut state.lock().unwrap_or_else(|p| p.into_inner()));
        cv.notify_all();
    }
}

/// A number nobody else knows (for the barrier).
fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish()
}

/// What a successor gets: borrowed from the keeping (no duplicate, so that a mount
/// with as many files as the descriptor limit allows can still be handed over).
pub struct Handover<'a> {
    pub checkpoint: Option<BorrowedFd<'a>>,
    pub fds: Vec<(u64, BorrowedFd<'a>)>,
    /// What the successor has once it got this.
    pub mark: Mark,
}

impl Kept {
    /// Keeping for a new mount: a fresh journal with two areas of `area` bytes, and
    /// descriptors of the kind `accept` allows.
    pub fn new(area: u64, accept: Accept) -> std::io::Result<Arc<Kept>> {
        Ok(Arc::new(Kept {
            journal: fsva_appliance::journal::create(area)?,
            accept,
            inner: Mutex::default(),
            stored: Condvar::new(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The journal memfd, to pass to an appliance.
    pub fn journal(&self) -> BorrowedFd<'_> {
        self.journal.as_fd()
    }

    /// Starts serving a new appliance's keeper link; returns the appliance's end (to
    /// pass to it and close here) and what tells when it has been read to its end.
    pub fn link(self: &Arc<Self>) -> std::io::Result<(Link, LinkEnd)> {
        let (ours, theirs) = Link::pair().map_err(std::io::Error::other)?;
        let end = LinkEnd {
            state: Arc::default(),
            peer: Arc::new(Mutex::new(Some(Link::from_fd(
                theirs.as_fd().try_clone_to_owned()?,
            )))),
            nonce: nonce(),
        };
        let kept = self.clone();
        let reading = Reading {
            state: end.state.clone(),
            nonce: end.nonce,
        };
        std::thread::Builder::new()
            .name("fsva-keeper".into())
            .spawn(move || {
                serve(ours, &kept, &reading);
                reading.note(|s| s.ended = true);
            })?;
        Ok((theirs, end))
    }

    /// Runs `f` with what a successor that has `since` does not have yet (everything,
    /// for `None`), for handing over (the originals stay here, and nothing changes
    /// them meanwhile): the checkpoint if it is not the one it has, and the
    /// descriptors kept after its mark.
    pub fn handover<R>(&self, since: Option<Mark>, f: impl FnOnce(Handover<'_>) -> R) -> R {
        let g = self.lock();
        let since = since.unwrap_or(Mark {
            boundary: None,
            received: 0,
        });
        let mut fds: Vec<_> = g
            .fds
            .iter()
            .filter(|(_, (_, n))| *n > since.received)
            .map(|(&id, (fd, _))| (id, fd.as_fd()))
            .collect();
        fds.sort_unstable_by_key(|(id, _)| *id);
        let boundary = g.checkpoint.as_ref().map(|(_, b)| *b);
        let checkpoint = g
            .checkpoint
            .as_ref()
            .filter(|_| boundary != since.boundary)
            .map(|(fd, _)| fd.as_fd());
        f(Handover {
            checkpoint,
            fds,
            mark: Mark {
                boundary,
                received: g.received,
            },
        })
    }

    /// Waits at most `limit` until a checkpoint covering `boundary` is kept (the
    /// appliance sent it; the link may not have been read that far yet).
    pub fn wait_checkpoint(&self, boundary: u64, limit: Duration) -> bool {
        let g = self.lock();
        let (g, _) = self
            .stored
            .wait_timeout_while(g, limit, |i| {
                i.checkpoint.as_ref().is_none_or(|(_, b)| *b < boundary)
            })
            .unwrap_or_else(|p| p.into_inner());
        g.checkpoint.as_ref().is_some_and(|(_, b)| *b >= boundary)
    }

    /// Calls `f` whenever a new checkpoint is stored.
    pub fn on_checkpoint(&self, f: impl Fn() + Send + Sync + 'static) {
        self.lock().on_checkpoint = Some(Arc::new(f));
    }

    /// The state is lost (a successor could not rebuild it): forget it all.
    pub fn discard(&self) {
        let mut g = self.lock();
        g.checkpoint = None;
        g.fds.clear();
    }

    /// A duplicate of the last checkpoint, with its boundary (a migration sends it).
    pub fn checkpoint(&self) -> std::io::Result<Option<(OwnedFd, u64)>> {
        let g = self.lock();
        g.checkpoint
            .as_ref()
            .map(|(fd, b)| Ok((fd.try_clone()?, *b)))
            .transpose()
    }

    /// The ids of the memfds kept now, in order.
    pub fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.lock().fds.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Duplicates of the memfds kept under `ids` (those still kept), for reading their
    /// contents without holding the keeping's lock meanwhile.
    pub fn duplicates(&self, ids: &[u64]) -> std::io::Result<Vec<(u64, OwnedFd)>> {
        let g = self.lock();
        ids.iter()
            .filter_map(|id| g.fds.get(id).map(|(fd, _)| Ok((*id, fd.try_clone()?))))
            .collect()
    }

    /// Keeps `fd` under `id` as if an appliance had sent it (a host daemon keeps the
    /// memfds it rebuilt from a migration's contents).
    pub fn insert(&self, id: u64, fd: OwnedFd) {
        let mut g = self.lock();
        g.received += 1;
        let n = g.received;
        g.fds.insert(id, (fd, n));
    }

    /// Stops keeping `id`.
    pub fn remove(&self, id: u64) {
        self.lock().fds.remove(&id);
    }

    /// Stores `blob` (a sealed memfd) as the checkpoint, covering the journal up to
    /// `boundary`, as if an appliance had sent it.
    pub fn set_checkpoint(&self, blob: OwnedFd, boundary: u64) {
        self.lock().checkpoint = Some((blob, boundary));
    }

    /// Memfds kept now, and the boundary of the checkpoint (for status and tests).
    pub fn counts(&self) -> (usize, Option<u64>) {
        let g = self.lock();
        (g.fds.len(), g.checkpoint.as_ref().map(|(_, b)| *b))
    }
}

/// Reads one appliance's keeper link until it closes.
fn serve(link: Link, kept: &Kept, end: &Reading) {
    let mut messages = 0u64;
    loop {
        messages += 1;
        let (msg, mut fds) = match link.recv::<KeeperMessage>() {
            Ok(m) => m,
            Err(LinkError::Closed) => break,
            Err(LinkError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionReset =>
            {
                break
            }
            Err(e) => {
                tracing::warn!(error = %e, "keeper link failed; nothing more is kept from this appliance");
                break;
            }
        };
        if messages == 1 {
            tracing::trace!("keeper link: first message");
        }
        if let KeeperMessage::Barrier { nonce } = msg {
            if nonce == end.nonce {
                end.note(|s| s.barrier = true);
            }
            continue;
        }
        let mut g = kept.lock();
        match msg {
            KeeperMessage::Keep { id } => match fds.pop() {
                Some(fd)
                    if (g.fds.len() < MAX_KEPT || g.fds.contains_key(&id))
                        && acceptable(fd.as_fd(), kept.accept) =>
                {
                    g.received += 1;
                    let n = g.received;
                    g.fds.insert(id, (fd, n));
                }
                _ => {
                    g.refused += 1;
                    if g.refused == 1 {
                        tracing::warn!(
                            id,
                            accept = ?kept.accept,
                            "refused to keep a descriptor of another kind than this mount's, or too many"
                        );
                    }
                }
            },
            KeeperMessage::Release { id } => {
                g.fds.remove(&id);
            }
            KeeperMessage::Checkpoint { boundary }
                if boundary >= fsva_appliance::journal::COUNTER_LIMIT =>
            {
                tracing::warn!(boundary, "refused a checkpoint beyond any journal");
            }
            KeeperMessage::Checkpoint { boundary } => match fds.pop() {
                Some(blob) => {
                    let newer = g.checkpoint.as_ref().is_none_or(|(_, b)| boundary >= *b);
                    if newer {
                        g.checkpoint = Some((blob, boundary));
                        kept.stored.notify_all();
                        if let Some(f) = g.on_checkpoint.clone() {
                            drop(g);
                            f();
                        }
                    }
                }
                None => tracing::warn!("a checkpoint came without its state"),
            },
            KeeperMessage::Barrier { .. } => {}
        }
    }
    tracing::debug!(messages, "keeper link ended");
}

/// Whether `fd` is of the kind `accept` allows.
fn acceptable(fd: BorrowedFd<'_>, accept: Accept) -> bool {
    match accept {
        Accept::Memfds => is_memfd(fd),
        Accept::FilesOn(dev) => rustix::fs::fstat(fd)
            .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_dev == dev),
    }
}

/// Whether `fd` is a memfd (its magic link says `/memfd:`).
fn is_memfd(fd: BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn memfd() -> OwnedFd {
        rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap()
    }

    #[test]
    fn what_a_dead_appliance_sent_is_kept_and_handed_over() {
        let kept = Kept::new(1 << 20, Accept::Memfds).unwrap();
        let (link, end) = kept.link().unwrap();
        let (a, b) = (memfd(), memfd());
        link.send(&KeeperMessage::Keep { id: 1 }, &[a.as_fd()])
            .unwrap();
        link.send(&KeeperMessage::Keep { id: 2 }, &[b.as_fd()])
            .unwrap();
        link.send(&KeeperMessage::Release { id: 1 }, &[]).unwrap();
        let blob = fsva_control::blob::seal(b"state").unwrap();
        link.send(&KeeperMessage::Checkpoint { boundary: 7 }, &[blob.as_fd()])
            .unwrap();
        // Not a memfd: refused.
        let not = std::fs::File::open("/dev/null").unwrap();
        link.send(&KeeperMessage::Keep { id: 3 }, &[not.as_fd()])
            .unwrap();
        drop(link);
        // The appliance is gone; its end stays open here until the barrier is read.
        assert!(end.wait(Duration::from_secs(5)));
        assert_eq!(kept.counts(), (1, Some(7)));
        // What a spare that has everything up to now still needs: nothing.
        let mark = kept.handover(None, |h| h.mark);
        let (ids, checkpoint) = kept.handover(None, |h| {
            (
                h.fds.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
                h.checkpoint.map(|c| c.try_clone_to_owned().unwrap()),
            )
        });
        assert_eq!(ids, [2]);
        let (fds, again) = kept.handover(Some(mark), |h| (h.fds.len(), h.checkpoint.is_some()));
        assert_eq!((fds, again), (0, false));
        assert_eq!(
            fsva_control::blob::read(checkpoint.unwrap()).unwrap(),
            b"state"
        );
        kept.discard();
        assert_eq!(kept.counts(), (0, None));
    }

    #[test]
    fn a_passthrough_mount_keeps_regular_files_of_its_export_only() {
        let dir =
            std::path::PathBuf::from(format!("/var/tmp/fsva-keeper-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dev = std::fs::metadata(&dir).unwrap().dev();
        let kept = Kept::new(1 << 20, Accept::FilesOn(dev)).unwrap();
        let (link, end) = kept.link().unwrap();
        let file = std::fs::File::create(dir.join("f")).unwrap();
        let sub = std::fs::File::open(&dir).unwrap();
        link.send(&KeeperMessage::Keep { id: 1 }, &[file.as_fd()])
            .unwrap();
        link.send(&KeeperMessage::Keep { id: 2 }, &[memfd().as_fd()])
            .unwrap();
        link.send(&KeeperMessage::Keep { id: 3 }, &[sub.as_fd()])
            .unwrap();
        drop(link);
        assert!(end.wait(Duration::from_secs(5)));
        assert_eq!(kept.counts().0, 1, "the file; not a memfd, not a directory");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
