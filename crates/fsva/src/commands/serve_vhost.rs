//! `fsva serve-vhost`: checks the arguments, builds the VM appliance if one is asked
//! for, and runs the vhost-user-fs device in the foreground (as virtiofsd does).

use std::process::ExitCode;

use anyhow::Context as _;
use fsva_control::SandboxKind;
use fsva_supervisor::vhost::VhostRequest;

use crate::cli::{SandboxArg, ServeVhostArgs};

pub fn run(args: ServeVhostArgs, log: &str) -> anyhow::Result<ExitCode> {
    let backend = crate::backends::from_args(&args.backend, &args.machine, args.exclusive)?;
    let device = fsva_vhost::DeviceConfig::new(args.tag.clone(), args.queues)?;
    if let Some(dir) = args.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        anyhow::ensure!(
            dir.is_dir(),
            "the socket's directory {} does not exist: create it or choose another --socket",
            dir.display()
        );
    }
    let vm = crate::vm::plan(
        &args.machine,
        &backend,
        args.cache_budget,
        args.workers,
        log,
        true,
    )?;
    crate::commands::init_logging(log);
    fsva_supervisor::vhost::serve(VhostRequest {
        socket: args.socket,
        device,
        backend,
        sandbox: match args.sandbox {
            _ if vm.is_some() => SandboxKind::Vm,
            SandboxArg::Namespaces => SandboxKind::Namespaces,
            SandboxArg::None => SandboxKind::None,
        },
        workers: args
            .workers
            .unwrap_or_else(crate::commands::mount::default_workers),
        exe: match args.appliance_exe {
            Some(exe) => exe,
            None => std::env::current_exe().context("locating the fsva executable")?,
        },
        log_filter: log.to_string(),
        cache_budget: args.cache_budget,
        vm,
        relay: args.relay,
    })?;
    Ok(ExitCode::SUCCESS)
}
