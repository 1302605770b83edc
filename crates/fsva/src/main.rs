//! The `fsva` command: parses the command line and hands each subcommand to its module
//! in [`commands`]. It also answers to the name `mount.fuse.fsva`, so that
//! `mount -t fuse.fsva` and /etc/fstab work. Nothing here does the work itself.

mod backends;
mod cli;
mod commands;
mod vm;

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
            eprintln!("fsva: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out a cause whose text the message
/// before it already includes (typed errors quote their source themselves).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}
