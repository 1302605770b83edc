//! `fsva umount`: asks the mount's supervisor to flush, stop its appliance and unmount;
//! when the supervisor is gone (killed), cleans up the mount and its runtime files itself.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use fsva_control::{AdminReply, AdminRequest, Link};
use fsva_supervisor::{mount, registry};

pub fn run(args: crate::cli::UmountArgs) -> anyhow::Result<ExitCode> {
    let mountpoint = absolute(&args.mountpoint)?;
    let entry = registry::Entry::for_mount(&mountpoint);
    if let Ok(link) = Link::connect(&entry.socket) {
        // Unmounting waits for the appliance to flush and exit: a process appliance
        // within 10 s, a VM appliance writing back its page cache under emulation within
        // 10 minutes (the supervisor's bounds); wait a little longer than either.
        let _ = rustix::net::sockopt::set_socket_timeout(
            &link,
            rustix::net::sockopt::Timeout::Recv,
            Some(std::time::Duration::from_secs(11 * 60)),
        );
        link.send(&AdminRequest::Unmount { lazy: args.lazy }, &[])?;
        return match link.recv::<AdminReply>() {
            Ok((AdminReply::Unmounted, _)) => Ok(ExitCode::SUCCESS),
            Ok((AdminReply::Error { message }, _)) => anyhow::bail!("{message}"),
            Ok((other, _)) => anyhow::bail!("unexpected answer from the supervisor: {other:?}"),
            Err(e) => Err(e).context("waiting for the supervisor to unmount"),
        };
    }
    // No supervisor answers: it was killed. Clean up what it left.
    let record = registry::read_record(&entry.record).ok();
    if let Some(pid) = record
        .as_ref()
        .and_then(|r| r.get("appliance_pid"))
        .and_then(|p| p.parse::<i32>().ok())
    {
        kill_if_appliance(pid);
    }
    if !mount::is_fsva_mount(&mountpoint) {
        entry.remove();
        if record.is_some() {
            return Ok(ExitCode::SUCCESS);
        }
        anyhow::bail!("{} is not an fsva mount", mountpoint.display());
    }
    mount::unmount(&mountpoint, args.lazy)?;
    entry.remove();
    Ok(ExitCode::SUCCESS)
}

/// The absolute, canonical path of a mount point, without touching the mount point
/// itself (a dead FUSE mount answers ENOTCONN to lstat).
fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let name = abs
        .file_name()
        .with_context(|| format!("{} is not a mount point", path.display()))?;
    let parent = abs.parent().unwrap_or(Path::new("/"));
    let parent = parent
        .canonicalize()
        .with_context(|| format!("{} does not exist", parent.display()))?;
    Ok(parent.join(name))
}

fn kill_if_appliance(pid: i32) {
    let is_ours = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|b| *b == 0).any(|a| a == b"__appliance"))
        .unwrap_or(false);
    if is_ours {
        if let Some(p) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }
}
