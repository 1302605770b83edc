//! Per-thread credential switching for creating operations.
//!
//! New objects must get the caller's owner and group (and setgid-directory inheritance
//! must happen in the real file system), so MKNOD/MKDIR/SYMLINK/CREATE/TMPFILE run with
//! the caller's fsuid, fsgid, supplementary group and umask. All four are per thread:
//! `setfsuid`/`setfsgid`/`setgroups` are issued as raw system calls (glibc would
//! broadcast them to every thread), and the umask becomes thread-private after the
//! thread's first `unshare(CLONE_FS)`. A non-zero fsuid also drops the thread's file
//! system capabilities (CAP_DAC_OVERRIDE, CAP_FOWNER, ...), so the real file system
//! applies the caller's permissions. [`CredGuard`] restores everything on drop.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once `setgroups` was refused (a user namespace with /proc/self/setgroups = deny):
/// creating operations then run with the appliance's own supplementary groups.
static SETGROUPS_DENIED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Whether this thread has its own fs_struct (so `umask` affects only it).
    static FS_PRIVATE: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Makes the calling thread's umask private; false when `unshare(CLONE_FS)` is refused.
fn ensure_private_fs() -> bool {
    FS_PRIVATE.with(|c| {
        if let Some(v) = c.get() {
            return v;
        }
        // SAFETY: plain system call; affects only the calling thread's fs_struct.
        let ok = unsafe { libc::unshare(libc::CLONE_FS) } == 0;
        if !ok {
            tracing::warn!(error = %io::Error::last_os_error(),
                "unshare(CLONE_FS) refused: applying the umask to the mode instead (default ACLs then see a masked mode)");
        }
        c.set(Some(ok));
        ok
    })
}

fn raw_setfsuid(uid: u32) -> u32 {
    // SAFETY: raw system call with a scalar argument; per-thread effect.
    unsafe { libc::syscall(libc::SYS_setfsuid, uid as libc::c_long) as u32 }
}

fn raw_setfsgid(gid: u32) -> u32 {
    // SAFETY: raw system call with a scalar argument; per-thread effect.
    unsafe { libc::syscall(libc::SYS_setfsgid, gid as libc::c_long) as u32 }
}

fn raw_setgroups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: `groups` is a valid array of `len` gids; per-thread effect (raw call).
    let r = unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            groups.len() as libc::c_long,
            groups.as_ptr(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The calling thread's supplementary groups (read once at start-up to restore to).
pub fn current_groups() -> Vec<libc::gid_t> {
    // SAFETY: a size query followed by a fill of a buffer of that size.
    unsafe {
        let n = libc::getgroups(0, std::ptr::null_mut());
        if n <= 0 {
            return Vec::new();
        }
        let mut v = vec![0; n as usize];
        let n = libc::getgroups(n, v.as_mut_ptr());
        v.truncate(n.max(0) as usize);
        v
    }
}

/// Who a creating request runs as.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub supp_group: Option<u32>,
    /// The request's umask, `None` for operations that take none (symlink, link).
    pub umask: Option<u32>,
}

/// While alive, the calling thread acts as the caller; dropping it restores the thread.
pub struct CredGuard<'a> {
    old_uid: u32,
    old_gid: u32,
    base_groups: &'a [libc::gid_t],
    groups_changed: bool,
    old_umask: Option<libc::mode_t>,
    /// Set when the umask could not be made thread-private: the mode must be masked by hand.
    pub manual_umask: Option<u32>,
}

impl<'a> CredGuard<'a> {
    /// Switches the calling thread to `caller`. `base_groups` is what to restore the
    /// supplementary groups to. Fails with EPERM when the ids are not mapped here.
    pub fn switch(caller: Caller, base_groups: &'a [libc::gid_t]) -> io::Result<CredGuard<'a>> {
        let mut g = CredGuard {
            old_uid: u32::MAX,
            old_gid: u32::MAX,
            base_groups,
            groups_changed: false,
            old_umask: None,
            manual_umask: None,
        };
        let groups: &[libc::gid_t] = match &caller.supp_group {
            Some(s) => std::slice::from_ref(s),
            None => &[],
        };
        if groups != base_groups && !SETGROUPS_DENIED.load(Ordering::Relaxed) {
            match raw_setgroups(groups) {
                Ok(()) => g.groups_changed = true,
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    if !SETGROUPS_DENIED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "setgroups is denied in this namespace: creating requests run without the caller's \
                             supplementary group (allow setgroups in the appliance's user namespace to fix)"
                        );
                    }
                }
                Err(e) => return Err(e),
            }
        }
        g.old_gid = raw_setfsgid(caller.gid);
        if raw_setfsgid(u32::MAX) != caller.gid {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        g.old_uid = raw_setfsuid(caller.uid);
        if raw_setfsuid(u32::MAX) != caller.uid {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        if let Some(mask) = caller.umask {
            if ensure_private_fs() {
                // SAFETY: umask only changes this thread's private fs_struct.
                g.old_umask = Some(unsafe { libc::umask((mask & 0o777) as libc::mode_t) });
            } else {
                g.manual_umask = Some(mask & 0o777);
            }
        }
        Ok(g)
    }

    /// `mode` as it must be passed to the creating call.
    pub fn mode(&self, mode: u32) -> u32 {
        match self.manual_umask {
            Some(m) => mode & !m,
            None => mode,
        }
    }
}

impl Drop for CredGuard<'_> {
    fn drop(&mut self) {
        if let Some(m) = self.old_umask {
            // SAFETY: restores this thread's umask.
            unsafe { libc::umask(m) };
        }
        if self.old_uid != u32::MAX {
            raw_setfsuid(self.old_uid);
        }
        if self.old_gid != u32::MAX {
            raw_setfsgid(self.old_gid);
        }
        if self.groups_changed {
            if let Err(e) = raw_setgroups(self.base_groups) {
                tracing::error!(error = %e, "could not restore the supplementary groups of a worker thread");
            }
        }
    }
}
