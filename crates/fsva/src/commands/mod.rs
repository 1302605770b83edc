//! One module per subcommand. Each turns parsed arguments into calls on the library
//! crates and prints short, useful output; long-lived work happens in the libraries.

pub mod appliance;
pub mod cache;
pub mod host;
pub mod migrate;
pub mod mount;
pub mod mount_helper;
pub mod restart;
pub mod serve_vhost;
pub mod status;
pub mod sync;
pub mod umount;
pub mod vm_appliance;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Mount(args) => mount::run(args, &cli.log),
        Command::Umount(args) => umount::run(args),
        Command::Status => status::run(),
        Command::Cache(args) => cache::run(args),
        Command::Sync(args) => sync::run(args),
        Command::Restart(args) => restart::run(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Host(args) => host::run(args, &cli.log),
        Command::ServeVhost(args) => serve_vhost::run(args, &cli.log),
        Command::ApplianceProcess(args) => appliance::run(args),
        Command::Appliance(cmd) => vm_appliance::run(cmd),
    }
}

/// Logs to stderr with the given filter.
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// The admin link to the supervisor of the mount at `mountpoint` (canonicalised),
/// answering within `timeout`.
pub fn supervisor_link(
    mountpoint: &std::path::Path,
    timeout: std::time::Duration,
) -> anyhow::Result<(std::path::PathBuf, fsva_control::Link)> {
    use anyhow::Context as _;
    let mountpoint = mountpoint
        .canonicalize()
        .with_context(|| format!("{} does not exist", mountpoint.display()))?;
    let entry = fsva_supervisor::registry::Entry::for_mount(&mountpoint);
    let link = fsva_control::Link::connect(&entry.socket).with_context(|| {
        format!(
            "{} is not an fsva mount with a running supervisor",
            mountpoint.display()
        )
    })?;
    let _ = rustix::net::sockopt::set_socket_timeout(
        &link,
        rustix::net::sockopt::Timeout::Recv,
        Some(timeout),
    );
    Ok((mountpoint, link))
}
