//! `fsva sync MOUNTPOINT`: makes everything written through a mount durable. The
//! kernel first writes the mount's dirty pages to the appliance (syncfs(2) on the
//! mount, which for FUSE goes no further), then the supervisor has the appliance sync
//! its own file system: a VM appliance's guest kernel, or the export of a sandboxed
//! one. It never touches data itself.

use std::process::ExitCode;

use anyhow::Context as _;
use fsva_control::{AdminReply, AdminRequest};

pub fn run(args: crate::cli::SyncArgs) -> anyhow::Result<ExitCode> {
    // Dirty pages the host kernel still holds reach the appliance first (before the
    // supervisor is asked: it gives a client a second to speak).
    let dir = std::fs::File::open(&args.mountpoint)
        .with_context(|| format!("opening {}", args.mountpoint.display()))?;
    rustix::fs::syncfs(&dir).with_context(|| {
        format!(
            "writing back the host's dirty pages of {}",
            args.mountpoint.display()
        )
    })?;
    // Longer than the supervisor waits for the appliance, so its answer arrives.
    let wait = fsva_supervisor::appliance::SYNC_TIMEOUT + std::time::Duration::from_secs(10);
    let (mountpoint, link) = super::supervisor_link(&args.mountpoint, wait)?;
    link.send(&AdminRequest::Sync, &[])?;
    match link
        .recv::<AdminReply>()
        .context("waiting for the supervisor")?
    {
        (AdminReply::Synced { micros }, _) => {
            println!(
                "fsva: {} synced (its appliance took {} ms)",
                mountpoint.display(),
                micros.div_ceil(1000)
            );
            Ok(ExitCode::SUCCESS)
        }
        (AdminReply::Error { message }, _) => anyhow::bail!("{message}"),
        (other, _) => anyhow::bail!("unexpected answer from the supervisor: {other:?}"),
    }
}
