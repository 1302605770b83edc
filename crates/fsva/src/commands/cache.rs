//! `fsva cache MOUNTPOINT SIZE`: changes a mount's cache budget at run time. The
//! supervisor lowers the appliance's cgroup limit (the kernel reclaims at once) and
//! tells the appliance, which for `mem` is its capacity.

use std::process::ExitCode;

use anyhow::Context as _;
use fsva_control::{AdminReply, AdminRequest};

pub fn run(args: crate::cli::CacheArgs) -> anyhow::Result<ExitCode> {
    let (mountpoint, link) =
        super::supervisor_link(&args.mountpoint, std::time::Duration::from_secs(10))?;
    link.send(&AdminRequest::SetCacheBudget { bytes: args.size }, &[])?;
    match link
        .recv::<AdminReply>()
        .context("waiting for the supervisor")?
    {
        (AdminReply::CacheBudgetSet, _) => {
            println!(
                "fsva: cache budget of {} is now {} bytes",
                mountpoint.display(),
                args.size
            );
            Ok(ExitCode::SUCCESS)
        }
        (AdminReply::Error { message }, _) => anyhow::bail!("{message}"),
        (other, _) => anyhow::bail!("unexpected answer from the supervisor: {other:?}"),
    }
}
