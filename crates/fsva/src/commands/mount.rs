//! `fsva mount`: checks the arguments, then either runs the supervisor in the
//! foreground (`-f`) or starts it detached and returns once the mount answers.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::Context as _;
use fsva_control::{ChannelKind, SandboxKind};
use fsva_supervisor::mount::MountOptions;
use fsva_supervisor::{registry, MountRequest};

use clap::ValueEnum;

use crate::cli::{ChannelArg, MountArgs, SandboxArg};

pub fn run(args: MountArgs, log: &str) -> anyhow::Result<ExitCode> {
    let backend = crate::backends::from_args(&args.backend, &args.machine, args.exclusive)?;
    let options = parse_options(&args.options, &backend.to_string())?;
    // Fail fast, in the caller's terminal, on the mistakes users make most.
    let mountpoint = fsva_supervisor::mount::check_mountpoint(&args.mountpoint)?;
    fsva_supervisor::mount::check_device()?;
    // The VM appliance is built (once) and probed here, with progress in the terminal.
    let vm = crate::vm::plan(
        &args.machine,
        &backend,
        args.cache_budget,
        args.workers,
        log,
        args.foreground,
    )?;
    if args.foreground {
        crate::commands::init_logging(log);
        let ready = args.ready_fd.map(|fd| {
            // SAFETY: the descriptor number was passed by our own parent process, which
            // left it open across exec for exactly this purpose; nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // Our children (the appliance) must not hold the pipe open.
            let _ = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC);
            fd
        });
        let request = MountRequest {
            mountpoint,
            backend,
            channel: match args.channel {
                _ if vm.is_some() => ChannelKind::Stream,
                ChannelArg::Fusedev => ChannelKind::Fusedev,
                ChannelArg::Stream => ChannelKind::Stream,
            },
            sandbox: match args.sandbox {
                _ if vm.is_some() => SandboxKind::Vm,
                SandboxArg::Namespaces => SandboxKind::Namespaces,
                SandboxArg::None => SandboxKind::None,
            },
            workers: args.workers.unwrap_or_else(default_workers),
            options,
            exe: match args.appliance_exe {
                Some(exe) => exe,
                None => std::env::current_exe().context("locating the fsva executable")?,
            },
            log_filter: log.to_string(),
            passthrough: !args.no_passthrough,
            recovery: !args.no_recovery,
            cache_budget: args.cache_budget,
            ready,
            vm,
        };
        fsva_supervisor::run(request)?;
        return Ok(ExitCode::SUCCESS);
    }
    daemonize(&args, log, mountpoint, &backend.to_string())
}

/// The arguments of the detached `fsva mount -f` equivalent to `args`.
fn foreground_args(
    args: &MountArgs,
    log: &str,
    mountpoint: &std::path::Path,
) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = vec![
        "--log".into(),
        log.into(),
        "mount".into(),
        "--backend".into(),
        args.backend.clone().into(),
        "--channel".into(),
        args.channel
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
            .into(),
        "--sandbox".into(),
        args.sandbox
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
            .into(),
    ];
    if args.no_passthrough {
        v.push("--no-passthrough".into());
    }
    if args.no_recovery {
        v.push("--no-recovery".into());
    }
    if args.exclusive {
        v.push("--exclusive".into());
    }
    if let (true, Some(image)) = (args.machine.vm, &args.machine.image) {
        v.extend(["--vm".into(), "--image".into(), image.clone().into()]);
        if let Some(t) = &args.machine.fstype {
            v.extend(["--fstype".into(), t.into()]);
        }
        if args.machine.ro {
            v.push("--ro".into());
        }
        if let Some(m) = args.machine.vm_memory {
            v.extend(["--vm-memory".into(), m.to_string().into()]);
        }
        if let Some(c) = args.machine.vm_cpus {
            v.extend(["--vm-cpus".into(), c.to_string().into()]);
        }
        v.extend([
            "--accel".into(),
            args.machine
                .accel
                .to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default()
                .into(),
        ]);
    }
    if let Some(b) = args.cache_budget {
        v.extend(["--cache-budget".into(), b.to_string().into()]);
    }
    if let Some(w) = args.workers {
        v.extend(["--workers".into(), w.to_string().into()]);
    }
    if !args.options.is_empty() {
        v.extend(["-o".into(), args.options.join(",").into()]);
    }
    if let Some(exe) = &args.appliance_exe {
        v.extend(["--appliance-exe".into(), exe.clone().into()]);
    }
    v.push("-f".into());
    v.push(mountpoint.into());
    v
}

pub(crate) fn default_workers() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(2)
        .max(2)
}

fn parse_options(opts: &[String], source: &str) -> anyhow::Result<MountOptions> {
    let mut o = MountOptions {
        source: format!("fsva:{source}"),
        ..Default::default()
    };
    for opt in opts.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        match opt {
            "ro" => o.read_only = true,
            "rw" => o.read_only = false,
            "suid" => o.suid = true,
            "nosuid" => o.suid = false,
            "dev" => o.dev = true,
            "nodev" => o.dev = false,
            "allow_other" => o.allow_other = true,
            "defaults" | "auto" | "noauto" | "user" | "nouser" | "_netdev" | "nofail" => {}
            other => anyhow::bail!(
                "unknown mount option `{other}`: fsva takes ro, rw, suid, nosuid, dev, nodev, allow_other"
            ),
        }
    }
    Ok(o)
}

/// Starts `fsva mount -f ...` detached (own session, output to the mount's log file) and
/// waits for its verdict on a pipe.
fn daemonize(
    args: &MountArgs,
    log_filter: &str,
    mountpoint: PathBuf,
    backend: &str,
) -> anyhow::Result<ExitCode> {
    let entry = registry::Entry::for_mount(&mountpoint);
    if let Some(dir) = entry.log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&entry.log)
        .with_context(|| format!("opening the log {}", entry.log.display()))?;
    let (read_end, write_end) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .context("creating the readiness pipe")?;
    let write_fd = write_end.as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe().context("locating the fsva executable")?);
    cmd.args(foreground_args(args, log_filter, &mountpoint))
        .arg("--ready-fd")
        .arg(write_fd.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: runs in the forked child before exec; setsid and fcntl are
    // async-signal-safe and touch only the child's own state.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::fcntl(write_fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the supervisor")?;
    drop(write_end);
    let mut verdict = String::new();
    std::fs::File::from(read_end)
        .read_to_string(&mut verdict)
        .context("waiting for the supervisor")?;
    let verdict = verdict.trim();
    if verdict == "ok" {
        let mp = mountpoint.display();
        println!(
            "fsva: {backend} mounted at {mp} (supervisor pid {}).",
            child.id()
        );
        println!("      Use it like any directory; `fsva status` shows it; `fsva umount {mp}` removes it.");
        Ok(ExitCode::SUCCESS)
    } else if let Some(err) = verdict.strip_prefix("error: ") {
        anyhow::bail!("{err}")
    } else {
        anyhow::bail!(
            "the supervisor exited before the mount was ready; see {}",
            entry.log.display()
        )
    }
}
