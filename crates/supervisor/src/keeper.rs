//! The supervisor's safe-keeping for one mount's appliances: everything a successor
//! needs to carry on after an appliance dies — the recovery journal (a memfd this
//! module creates), the last checkpoint, and the memfds holding `mem`'s file contents.
//!
//! The appliance sends memfds and checkpoints over its keeper link, one way
//! ([`serve`]); a message it has sent is kept even if it dies at once, because the
//! supervisor reads everything queued on the link before it starts a successor
//! ([`LinkEnd::wait`]). What is kept is handed to a successor as it is; this module
//! never reads a checkpoint or the journal, and never trusts the appliance beyond
//! holding what it gave (a memfd it may not pass off as anything else: only memfds are
//! kept, and no more than [`MAX_KEPT`]).

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fsva_control::{KeeperMessage, Link, LinkError};

/// Most descriptors kept for one mount (a compromised appliance must not exhaust the
/// supervisor's descriptor table).
pub const MAX_KEPT: usize = 1 << 20;

/// What is kept for one mount.
pub struct Kept {
    journal: OwnedFd,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    checkpoint: Option<(OwnedFd, u64)>,
    fds: HashMap<u64, OwnedFd>,
    refused: u64,
}

/// Tells when one appliance's keeper link has been read to its end: everything that
/// appliance sent is kept.
#[derive(Clone, Default)]
pub struct LinkEnd(Arc<(Mutex<bool>, Condvar)>);

impl LinkEnd {
    /// Waits at most `limit`; whether the link was read to its end.
    pub fn wait(&self, limit: Duration) -> bool {
        let (done, cv) = &*self.0;
        let g = done.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = cv
            .wait_timeout_while(g, limit, |d| !*d)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }

    fn reached(&self) {
        let (done, cv) = &*self.0;
        *done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }
}

/// What a successor gets: borrowed from the keeping (no duplicate, so that a mount
/// with as many files as the descriptor limit allows can still be handed over).
pub struct Handover<'a> {
    pub checkpoint: Option<BorrowedFd<'a>>,
    pub fds: Vec<(u64, BorrowedFd<'a>)>,
}

impl Kept {
    /// Keeping for a new mount: a fresh journal with two areas of `area` bytes.
    pub fn new(area: u64) -> std::io::Result<Arc<Kept>> {
        Ok(Arc::new(Kept {
            journal: fsva_appliance::journal::create(area)?,
            inner: Mutex::default(),
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
        let end = LinkEnd::default();
        let (kept, done) = (self.clone(), end.clone());
        std::thread::Builder::new()
            .name("fsva-keeper".into())
            .spawn(move || {
                serve(ours, &kept);
                done.reached();
            })?;
        Ok((theirs, end))
    }

    /// Runs `f` with everything kept, for handing to a successor (the originals stay
    /// here, and nothing changes them meanwhile).
    pub fn handover<R>(&self, f: impl FnOnce(Handover<'_>) -> R) -> R {
        let g = self.lock();
        let mut fds: Vec<_> = g.fds.iter().map(|(&id, fd)| (id, fd.as_fd())).collect();
        fds.sort_unstable_by_key(|(id, _)| *id);
        f(Handover {
            checkpoint: g.checkpoint.as_ref().map(|(fd, _)| fd.as_fd()),
            fds,
        })
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
            .filter_map(|id| g.fds.get(id).map(|fd| Ok((*id, fd.try_clone()?))))
            .collect()
    }

    /// Keeps `fd` under `id` as if an appliance had sent it (a host daemon keeps the
    /// memfds it rebuilt from a migration's contents).
    pub fn insert(&self, id: u64, fd: OwnedFd) {
        self.lock().fds.insert(id, fd);
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
fn serve(link: Link, kept: &Kept) {
    loop {
        let (msg, mut fds) = match link.recv::<KeeperMessage>() {
            Ok(m) => m,
            Err(LinkError::Closed) => break,
            Err(e) => {
                tracing::warn!(error = %e, "keeper link failed; nothing more is kept from this appliance");
                break;
            }
        };
        let mut g = kept.lock();
        match msg {
            KeeperMessage::Keep { id } => match fds.pop() {
                Some(fd) if g.fds.len() < MAX_KEPT && is_memfd(fd.as_fd()) => {
                    g.fds.insert(id, fd);
                }
                _ => {
                    g.refused += 1;
                    if g.refused == 1 {
                        tracing::warn!(
                            id,
                            "refused to keep a descriptor that is no memfd, or too many"
                        );
                    }
                }
            },
            KeeperMessage::Release { id } => {
                g.fds.remove(&id);
            }
            KeeperMessage::Checkpoint { boundary } => match fds.pop() {
                Some(blob) => {
                    let newer = g.checkpoint.as_ref().is_none_or(|(_, b)| boundary >= *b);
                    if newer {
                        g.checkpoint = Some((blob, boundary));
                    }
                }
                None => tracing::warn!("a checkpoint came without its state"),
            },
        }
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

    fn memfd() -> OwnedFd {
        rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap()
    }

    #[test]
    fn what_a_dead_appliance_sent_is_kept_and_handed_over() {
        let kept = Kept::new(1 << 20).unwrap();
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
        assert!(end.wait(Duration::from_secs(5)));
        assert_eq!(kept.counts(), (1, Some(7)));
        let (ids, checkpoint) = kept.handover(|h| {
            (
                h.fds.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
                h.checkpoint.map(|c| c.try_clone_to_owned().unwrap()),
            )
        });
        assert_eq!(ids, [2]);
        assert_eq!(
            fsva_control::blob::read(checkpoint.unwrap()).unwrap(),
            b"state"
        );
        kept.discard();
        assert_eq!(kept.counts(), (0, None));
    }
}
