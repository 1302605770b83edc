//! The tiny check framework: a check is a name plus a function from a fresh, private
//! working directory to a one-line observation. The runner gives every check its own
//! subdirectory, catches panics (`name: PANIC <msg>`), prints `name: observation` and
//! removes whatever the check left behind.

use std::any::Any;
use std::cell::RefCell;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use crate::sys;

/// A check: `run` returns the observation line (without the name).
pub struct Check {
    pub name: &'static str,
    pub run: fn(&Ctx) -> String,
}

/// Shorthand constructor used by the check tables.
pub const fn check(name: &'static str, run: fn(&Ctx) -> String) -> Check {
    Check { name, run }
}

/// What a check gets to work with.
pub struct Ctx {
    /// Fresh, empty directory owned by the caller, mode 0755.
    pub dir: PathBuf,
    /// Whether the probe runs with euid 0 (multi-user checks need it).
    pub root: bool,
    /// Effective uid/gid of the probe.
    pub uid: u32,
    pub gid: u32,
}

impl Ctx {
    /// Path of `rel` inside the check's directory.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

/// Observation of a check that needs root when the probe is unprivileged.
pub const NEEDS_ROOT: &str = "skip=needs_root";

thread_local! {
    static PANIC_LOCATION: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Installs a quiet panic hook that only remembers where the panic happened.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let loc = info
            .location()
            .map(|l| {
                format!(
                    " at {}:{}",
                    l.file().rsplit('/').next().unwrap_or(""),
                    l.line()
                )
            })
            .unwrap_or_default();
        PANIC_LOCATION.with(|p| *p.borrow_mut() = loc);
    }));
}

/// Message of a caught panic payload, with the location recorded by the hook.
pub fn panic_message(payload: &Box<dyn Any + Send>) -> String {
    let msg = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string panic>".to_string()
    };
    let loc = PANIC_LOCATION.with(|p| p.borrow().clone());
    format!("{}{}", msg.replace('\n', " "), loc)
}

/// Runs `checks` one after another under `target`, printing one line each.
pub fn run_all(target: &Path, checks: &[&Check]) {
    let (uid, gid) = (sys::geteuid(), sys::getegid());
    let stdout = std::io::stdout();
    for c in checks {
        let dir = target.join(c.name);
        remove_tree(&dir);
        sys::umask(0o022);
        let obs = match sys::mkdir(&dir, 0o755) {
            Err(e) => format!("SETUP_FAILED mkdir err={e}"),
            Ok(()) => {
                let ctx = Ctx {
                    dir: dir.clone(),
                    root: uid == 0,
                    uid,
                    gid,
                };
                match catch_unwind(AssertUnwindSafe(|| (c.run)(&ctx))) {
                    Ok(s) => s,
                    Err(p) => format!("PANIC {}", panic_message(&p)),
                }
            }
        };
        sys::umask(0o022);
        let mut out = stdout.lock();
        let _ = writeln!(out, "{}: {}", c.name, obs);
        let _ = out.flush();
        drop(out);
        remove_tree(&dir);
    }
}

/// Best-effort recursive removal that first makes directories writable/searchable.
pub fn remove_tree(p: &Path) {
    let Ok(st) = sys::lstat(p) else { return };
    if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        let _ = sys::chmod(p, 0o700);
        if let Ok(entries) = std::fs::read_dir(p) {
            for e in entries.flatten() {
                remove_tree(&e.path());
            }
        }
        let _ = sys::rmdir(p);
    } else {
        let _ = sys::unlink(p);
    }
}
