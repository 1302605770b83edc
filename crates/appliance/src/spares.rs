//! Spare backing files: memfds registered as FUSE passthrough backing files before any
//! file needs them, so that creating a file in `mem` costs no round trip to the
//! supervisor.
//!
//! A new file's first open names a backing id in its reply, and registering one takes
//! the supervisor (CAP_SYS_ADMIN in the initial namespace): two cross-process wakeups
//! inside the CREATE, most of its cost on a small machine. [`SpareBackings`] keeps a
//! few memfds created and registered ahead, in batches, by a thread of its own; `mem`
//! takes one as a new file's contents ([`MemfdSource`]), and the file's first
//! registration finds it already done. A spare handed out but not claimed within
//! [`UNCLAIMED_LIMIT`] (a set-id file, which stays off passthrough) is given back.
//!
//! It only tracks which memfd holds which id before a file owns it; which handles hold
//! ids stays [`crate::backing::BackingIds`]'s, and the supervisor still checks every
//! memfd it registers.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::backing::BackingFiles;

/// Hands out memfds for new files' contents.
pub trait MemfdSource: Send + Sync {
    /// A fresh, empty memfd, or `None` (the caller makes its own).
    fn fresh_memfd(&self) -> Option<OwnedFd>;
}

/// Spares registered per batch (one message each way).
const BATCH: usize = 32;

/// A new batch is made when fewer spares than this are left.
const LOW: usize = 8;

/// Whole batches refused in a row after which no more spares are made.
const GIVE_UP_AFTER: u32 = 3;

/// How long a handed-out spare may stay unclaimed before its id is given back.
pub const UNCLAIMED_LIMIT: Duration = Duration::from_secs(2);

/// Identity of a memfd: its inode on the kernel's internal shmem mount.
type MemfdKey = (u64, u64);

fn key_of(fd: BorrowedFd<'_>) -> Option<MemfdKey> {
    let st = rustix::fs::fstat(fd).ok()?;
    Some((st.st_dev, st.st_ino))
}

#[derive(Default)]
struct Pool {
    /// Registered, not handed out.
    ready: Vec<(OwnedFd, i32)>,
    /// Handed out, not yet claimed by a registration: id, our duplicate (so the key
    /// stays unique while we track it), and when.
    handed: HashMap<MemfdKey, (i32, OwnedFd, Instant)>,
    /// A file asked for one: spares are made from then on (not before: the kernel
    /// takes backing files only once the session is set up, and a mount that never
    /// creates a file needs none).
    wanted: bool,
    /// Registration is unsupported: hand out nothing more.
    off: bool,
    /// Spares claimed since the supervisor was last told (with the next batch, or
    /// within a second: it counts them as open files only then).
    claims: Vec<i32>,
}

/// The backing-file registrar with spares in front of it (see the module docs).
pub struct SpareBackings {
    inner: Arc<dyn BackingFiles>,
    pool: Mutex<Pool>,
    low: Condvar,
    /// [`UNCLAIMED_LIMIT`], shorter in tests.
    unclaimed_limit: Duration,
}

impl SpareBackings {
    /// Spares over `inner`, refilled by a thread named `fsva-spares`.
    pub fn start(inner: Arc<dyn BackingFiles>) -> std::io::Result<Arc<SpareBackings>> {
        Self::start_with(inner, UNCLAIMED_LIMIT)
    }

    fn start_with(
        inner: Arc<dyn BackingFiles>,
        unclaimed_limit: Duration,
    ) -> std::io::Result<Arc<SpareBackings>> {
        let spares = Arc::new(SpareBackings {
            inner,
            pool: Mutex::default(),
            low: Condvar::new(),
            unclaimed_limit,
        });
        let filler = spares.clone();
        std::thread::Builder::new()
            .name("fsva-spares".into())
            .spawn(move || filler.refill_forever())?;
        Ok(spares)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refill_forever(&self) {
        let mut refused = 0;
        loop {
            {
                let mut pool = self.lock();
                loop {
                    if pool.off {
                        return;
                    }
                    let now = Instant::now();
                    let stale = pool
                        .handed
                        .values()
                        .any(|(_, _, at)| now.duration_since(*at) >= self.unclaimed_limit);
                    if (pool.wanted && pool.ready.len() < LOW) || stale {
                        break;
                    }
                    // Woken early when spares run low; unclaimed spares and claims not
                    // yet reported are looked at every half limit (a wakeup per second,
                    // not per file).
                    let (p, waited) = self
                        .low
                        .wait_timeout(pool, self.unclaimed_limit / 2)
                        .unwrap_or_else(|p| p.into_inner());
                    pool = p;
                    if waited.timed_out() && !pool.claims.is_empty() {
                        break;
                    }
                }
            }
            self.give_back_unclaimed();
            let wanted = {
                let pool = self.lock();
                pool.wanted && pool.ready.len() < LOW
            };
            if !wanted {
                self.report_claims();
            } else if self.refill() {
                refused = 0;
            } else {
                // Refused (the kernel takes no backing files, descriptors short): files
                // register on first open meanwhile. Try again later, and stop after a
                // few whole batches refused in a row.
                refused += 1;
                if refused >= GIVE_UP_AFTER {
                    tracing::info!("spare backing files refused {refused} times in a row: new files register on first open");
                    self.lock().off = true;
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }

    /// Tells the supervisor which spares back files now, with no new batch.
    fn report_claims(&self) {
        let claims = std::mem::take(&mut self.lock().claims);
        if !claims.is_empty() {
            if let Err(e) = self.inner.open_spares(&[], &claims) {
                tracing::debug!(error = %e, "the supervisor was not told of claimed spares");
            }
        }
    }

    /// Makes and registers one batch; whether any spare came of it.
    fn refill(&self) -> bool {
        let mut made = Vec::with_capacity(BATCH);
        for _ in 0..BATCH {
            // SAFETY: a NUL-terminated name; memfd_create returns a new descriptor or -1.
            // The name is the one `mem` gives its own memfds, which the supervisor's
            // check looks for.
            let fd = unsafe { libc::memfd_create(c"fsva-mem".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                break;
            }
            // SAFETY: `fd` was just created and is owned by nobody else.
            made.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let fds: Vec<BorrowedFd<'_>> = made.iter().map(|f| f.as_fd()).collect();
        if fds.is_empty() {
            return false;
        }
        let claims = std::mem::take(&mut self.lock().claims);
        match self.inner.open_spares(&fds, &claims) {
            Ok(ids) => {
                let mut pool = self.lock();
                let before = pool.ready.len();
                for (fd, id) in made.into_iter().zip(ids) {
                    match id {
                        Ok(id) => pool.ready.push((fd, id)),
                        Err(e) => tracing::debug!(error = %e, "a spare backing file was refused"),
                    }
                }
                pool.ready.len() > before
            }
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                self.lock().off = true;
                false
            }
            Err(e) => {
                tracing::debug!(error = %e, "no spare backing files this time");
                false
            }
        }
    }

    /// Gives back the ids of spares handed out longer than [`UNCLAIMED_LIMIT`] ago.
    fn give_back_unclaimed(&self) {
        let stale: Vec<i32> = {
            let mut pool = self.lock();
            let now = Instant::now();
            let old: Vec<MemfdKey> = pool
                .handed
                .iter()
                .filter(|(_, (_, _, at))| now.duration_since(*at) >= self.unclaimed_limit)
                .map(|(k, _)| *k)
                .collect();
            old.iter()
                .filter_map(|k| pool.handed.remove(k).map(|(id, _, _)| id))
                .collect()
        };
        for id in stale {
            self.inner.close(id);
        }
    }

    /// Spares ready now (for tests and status).
    pub fn ready(&self) -> usize {
        self.lock().ready.len()
    }
}

impl MemfdSource for SpareBackings {
    fn fresh_memfd(&self) -> Option<OwnedFd> {
        let mut pool = self.lock();
        if !pool.wanted {
            pool.wanted = true;
            self.low.notify_one();
        }
        let (fd, id) = pool.ready.pop()?;
        if pool.ready.len() < LOW {
            self.low.notify_one();
        }
        let (Some(key), Ok(ours)) = (key_of(fd.as_fd()), fd.try_clone()) else {
            // Untrackable: give the id back rather than hand out a memfd whose
            // registration could never be found.
            drop(pool);
            self.inner.close(id);
            return None;
        };
        pool.handed.insert(key, (id, ours, Instant::now()));
        Some(fd)
    }
}

impl BackingFiles for SpareBackings {
    fn open(&self, file: BorrowedFd<'_>) -> std::io::Result<i32> {
        if let Some(key) = key_of(file) {
            let claimed = self.lock().handed.remove(&key);
            if let Some((id, _ours, _)) = claimed {
                self.lock().claims.push(id);
                return Ok(id);
            }
        }
        self.inner.open(file)
    }

    fn close(&self, id: i32) {
        self.inner.close(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI32, Ordering};

    /// A registrar that numbers what it registers and records what it is told. (A
    /// stand-in for the supervisor's broker; the kernel side is exercised end to end.)
    #[derive(Default)]
    struct Recorder {
        next: AtomicI32,
        opened: Mutex<Vec<i32>>,
        claimed: Mutex<Vec<i32>>,
        closed: Mutex<Vec<i32>>,
    }

    impl BackingFiles for Recorder {
        fn open(&self, _file: BorrowedFd<'_>) -> std::io::Result<i32> {
            let id = 1000 + self.next.fetch_add(1, Ordering::SeqCst);
            self.opened.lock().unwrap().push(id);
            Ok(id)
        }
        fn close(&self, id: i32) {
            self.closed.lock().unwrap().push(id);
        }
        fn open_spares(
            &self,
            files: &[BorrowedFd<'_>],
            claimed: &[i32],
        ) -> std::io::Result<Vec<std::io::Result<i32>>> {
            self.claimed.lock().unwrap().extend_from_slice(claimed);
            Ok(files
                .iter()
                .map(|_| Ok(self.next.fetch_add(1, Ordering::SeqCst)))
                .collect())
        }
    }

    fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn spares_are_made_on_demand_claimed_without_a_registration_and_given_back_unclaimed() {
        let rec = Arc::new(Recorder::default());
        let spares = SpareBackings::start_with(rec.clone(), Duration::from_millis(100)).unwrap();
        // Nothing is made before a file asks.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(spares.ready(), 0);
        assert!(
            spares.fresh_memfd().is_none(),
            "no spare yet: the caller makes its own"
        );
        assert!(wait_until(|| spares.ready() >= LOW), "no batch was made");

        // A spare's first registration is the spare's id, with no registration made.
        let memfd = spares.fresh_memfd().expect("a spare");
        let id = spares.open(memfd.as_fd()).unwrap();
        assert!(
            id < 1000,
            "registered again instead of using the spare: {id}"
        );
        assert!(rec.opened.lock().unwrap().is_empty());
        // The claim reaches the supervisor within the half limit, batch or not.
        assert!(wait_until(|| *rec.claimed.lock().unwrap() == vec![id]));
        // Its next registration (the spare is used) and any other file's are real.
        let again = spares.open(memfd.as_fd()).unwrap();
        assert!(again >= 1000);

        // A spare handed out and never registered is given back.
        let unclaimed = spares.fresh_memfd().expect("a spare");
        assert!(wait_until(|| rec.closed.lock().unwrap().len() == 1));
        let given_back = rec.closed.lock().unwrap()[0];
        assert_ne!(given_back, id);
        // ...and registering that memfd later is a real registration.
        assert!(spares.open(unclaimed.as_fd()).unwrap() >= 1000);
    }
}
