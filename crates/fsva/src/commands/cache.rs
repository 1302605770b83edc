//! `fsva cache MOUNTPOINT SIZE`: changes a mount's cache budget at run time. The
//! supervisor lowers the appliance's cgroup limit (the kernel reclaims at once) and
//! tells the appliance, which for `mem` is its capacity.

use std::process::ExitCode;

use anyhow::Context as _;
use fsva_control::{AdminReply, AdminRequest, Link};
use fsva_supervisor::registry;

pub fn run(args: crate::cli::CacheArgs) -> anyhow::Result<ExitCode> {
    let mountpoint = args
        .mountpoint
        .canonicalize()
        .with_context(|| format!("{} does not exist", args.mountpoint.display()))?;
    let entry = registry::Entry::for_mount(&mountpoint);
    let link = Link::connect(&entry.socket).with_context(|| {
        format!(
            "{} is not an fsva mount with a running supervisor",
            mountpoint.display()
        )
    })?;
    let _ = rustix::net::sockopt::set_socket_timeout(
        &link,
        rustix::net::sockopt::Timeout::Recv,
        Some(std::time::Duration::from_secs(10)),
    );
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
