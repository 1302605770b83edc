//! `fsva host --listen HOST:PORT --key-file KEY [--export DIR]...`: the host daemon
//! that receives migrating appliances (`fsva-host`), in the foreground, logging to
//! stderr.

use std::process::ExitCode;

use anyhow::Context as _;
use fsva_control::host::HostKey;

pub fn run(args: crate::cli::HostArgs, log: &str) -> anyhow::Result<ExitCode> {
    super::init_logging(log);
    let key = HostKey::read(&args.key_file)?;
    let exe = match args.appliance_exe {
        Some(exe) => exe,
        None => std::env::current_exe().context("locating the fsva executable")?,
    };
    fsva_host::run(fsva_host::HostConfig {
        listen: args.listen,
        key,
        exe,
        exports: args.exports,
    })?;
    Ok(ExitCode::SUCCESS)
}
