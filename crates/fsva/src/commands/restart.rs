//! `fsva restart MOUNTPOINT`: replaces a mount's appliance by a new process with the
//! same state, live: open files stay open, nothing is answered with an error.

use std::process::ExitCode;

use anyhow::Context as _;
use fsva_control::{AdminReply, AdminRequest};

pub fn run(args: crate::cli::RestartArgs) -> anyhow::Result<ExitCode> {
    let (mountpoint, link) =
        super::supervisor_link(&args.mountpoint, std::time::Duration::from_secs(60))?;
    link.send(&AdminRequest::Restart, &[])?;
    match link
        .recv::<AdminReply>()
        .context("waiting for the supervisor")?
    {
        (AdminReply::Restarted { downtime_us, pid }, _) => {
            println!(
                "fsva: {} restarted live (appliance pid {pid}); requests waited {:.1} ms",
                mountpoint.display(),
                downtime_us as f64 / 1000.0
            );
            Ok(ExitCode::SUCCESS)
        }
        (AdminReply::Error { message }, _) => anyhow::bail!("{message}"),
        (other, _) => anyhow::bail!("unexpected answer from the supervisor: {other:?}"),
    }
}
