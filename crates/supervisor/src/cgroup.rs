//! The appliance's memory cgroup: where its cache budget is enforced by the kernel.
//!
//! One cgroup per mount, created beside the supervisor's own memory cgroup (cgroup v2
//! when its memory controller is available, the v1 memory hierarchy otherwise), holding
//! only the appliance. This module creates, limits, reads and removes it; it never
//! decides the budget.

use std::io;
use std::path::{Path, PathBuf};

/// A memory cgroup for one appliance.
#[derive(Debug)]
pub struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    /// Creates `fsva-<name>` next to this process's memory cgroup.
    pub fn create(name: &str) -> io::Result<MemoryCgroup> {
        let (base, v2) = own_memory_cgroup()?;
        let dir = base.join(format!("fsva-{name}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        Ok(MemoryCgroup { dir, v2 })
    }

    /// The file a process writes "0" to, to move itself in.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Sets the memory limit. The kernel reclaims down to it at once (page cache first)
    /// and fails the write if it cannot.
    pub fn set_limit(&self, bytes: u64) -> io::Result<()> {
        let file = if self.v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        std::fs::write(self.dir.join(file), bytes.to_string())
    }

    /// Memory charged to the cgroup now.
    pub fn usage(&self) -> io::Result<u64> {
        let file = if self.v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        std::fs::read_to_string(self.dir.join(file))?
            .trim()
            .parse()
            .map_err(io::Error::other)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Fails while a process is still inside; the appliance has exited by now.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// This process's memory cgroup directory and whether it is cgroup v2.
fn own_memory_cgroup() -> io::Result<(PathBuf, bool)> {
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    // v2 with the memory controller enabled at the root.
    let root_v2 = Path::new("/sys/fs/cgroup");
    if std::fs::read_to_string(root_v2.join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
    {
        if let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) {
            return Ok((root_v2.join(path.trim_start_matches('/')), true));
        }
    }
    // v1: the line whose controller list names memory.
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        if controllers.is_some_and(|c| c.split(',').any(|x| x == "memory")) {
            let base = Path::new("/sys/fs/cgroup/memory")
                .join(path.unwrap_or("/").trim_start_matches('/'));
            return Ok((base, false));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no memory cgroup controller is mounted (cgroup v2 memory or v1 memory hierarchy)",
    ))
}
