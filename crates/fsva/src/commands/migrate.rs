//! `fsva migrate MOUNTPOINT --to HOST:PORT --key-file KEY`: moves a mount's appliance
//! to the host daemon at HOST:PORT, live; the mount stays here. The key is read here,
//! with the caller's rights, and handed to the supervisor, which proves it to the
//! daemon.

use std::process::ExitCode;

use anyhow::Context as _;
use fsva_control::host::HostKey;
use fsva_control::{AdminReply, AdminRequest};

pub fn run(args: crate::cli::MigrateArgs) -> anyhow::Result<ExitCode> {
    let key = HostKey::read(&args.key_file)?;
    // Moving many files' contents takes a while before the switch itself.
    let (mountpoint, link) =
        super::supervisor_link(&args.mountpoint, std::time::Duration::from_secs(900))?;
    link.send(
        &AdminRequest::Migrate {
            to: args.to.clone(),
            key: key.bytes().to_vec(),
        },
        &[],
    )?;
    match link
        .recv::<AdminReply>()
        .context("waiting for the supervisor")?
    {
        (
            AdminReply::Migrated {
                downtime_us,
                host,
                pid,
            },
            _,
        ) => {
            println!(
                "fsva: {} migrated to {host} (appliance pid {pid} there); requests waited {:.1} ms",
                mountpoint.display(),
                downtime_us as f64 / 1000.0
            );
            Ok(ExitCode::SUCCESS)
        }
        (AdminReply::Error { message }, _) => anyhow::bail!("{message}"),
        (other, _) => anyhow::bail!(
            "unexpected answer from the supervisor (another fsva version?): {other:?}"
        ),
    }
}
