//! The `fsva` command: parses the command line and hands each subcommand to its module
//! in [`commands`]. It also answers to the name `mount.fuse.fsva`, so that
//! `mount -t fuse.fsva` and /etc/fstab work. Nothing here does the work itself.

mod backends;
mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let result = if argv0.to_string_lossy().ends_with("mount.fuse.fsva") {
        commands::mount_helper::run(std::env::args_os().skip(1).collect())
    } else {
        let cli = cli::Cli::parse();
        commands::run(cli)
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fsva: {e:#}");
            ExitCode::FAILURE
        }
    }
}
