//! `fsva __appliance`: the appliance process. Started by a supervisor with a control
//! link; receives its configuration and channel descriptors, enters its sandbox, builds
//! the backend and serves until every channel is closed.
//!
//! It must stay single-threaded until the sandbox is entered (namespaces are created
//! with a fork-like clone), and it must never outlive its supervisor.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use fsva_appliance::{Server, SessionConfig};
use fsva_channel::fusedev::FuseDev;
use fsva_channel::stream::StreamChannel;
use fsva_channel::Channel;
use fsva_control::{
    ApplianceStats, BackendSpec, BackingReply, BackingRequest, ChannelKind, Link, SandboxKind,
    StartConfig, ToAppliance, ToSupervisor,
};
use fsva_sandbox::{RootSpec, SandboxConfig, SeccompMode};
use rustix::fs::{Mode, OFlags};

pub fn run(args: crate::cli::ApplianceArgs) -> anyhow::Result<ExitCode> {
    // SAFETY: the supervisor passed this descriptor number for our exclusive use and
    // left it open across exec; nothing else in this process owns it.
    let link = Link::from_fd(unsafe { OwnedFd::from_raw_fd(args.control_fd) });
    let (msg, fds) = link
        .recv::<ToAppliance>()
        .context("receiving the start message")?;
    let ToAppliance::Start(config) = msg else {
        anyhow::bail!("the supervisor did not start with a Start message");
    };
    super::init_logging(&config.log_filter);
    let code = match config.sandbox {
        SandboxKind::None => {
            let root = open_export(&config.backend)?;
            serve(&config, &link, fds, root, None)
        }
        SandboxKind::Namespaces => {
            let sandbox = sandbox_config(&config.backend);
            let result = fsva_sandbox::run_sandboxed(&sandbox, |inside| {
                let root = match open_export_inside(&config.backend) {
                    Ok(r) => r,
                    Err(e) => return fail(&link, format!("{e:#}")),
                };
                serve(&config, &link, fds, root, inside.proc_self_fd)
            });
            match result {
                Ok(code) => code,
                Err(e) => {
                    return Ok(fail_code(
                        &link,
                        format!("entering the sandbox failed: {e}"),
                    ))
                }
            }
        }
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

fn fail_code(link: &Link, message: String) -> ExitCode {
    ExitCode::from(fail(link, message) as u8)
}

fn fail(link: &Link, message: String) -> i32 {
    tracing::error!("{message}");
    let _ = link.send(&ToSupervisor::Failed { message }, &[]);
    1
}

fn sandbox_config(backend: &BackendSpec) -> SandboxConfig {
    let (root, caps, proc_fd) = match backend {
        BackendSpec::Mem { .. } => (RootSpec::Empty, Vec::new(), false),
        BackendSpec::Passthrough { path } => (
            RootSpec::Export {
                path: path.clone(),
                read_only: false,
            },
            SandboxConfig::file_server_caps(),
            true,
        ),
    };
    let mut c = SandboxConfig::new(root);
    c.keep_caps = caps;
    c.open_proc_self_fd = proc_fd;
    if matches!(backend, BackendSpec::Passthrough { .. }) && rustix::process::geteuid().is_root() {
        // A root user's passthrough mount behaves as the native file system does for
        // root only if the appliance holds the file-server capabilities in the initial
        // user namespace (device nodes need CAP_MKNOD there), as virtiofsd does when run
        // as root. The walls stay: mount, pid, net, ipc and uts namespaces, the export as
        // `/` mounted nodev inside, seccomp (no mount, no open_by_handle_at, no sockets).
        // File capabilities are not kept: an appliance must not mint privileged binaries.
        c.user_namespace = false;
        c.keep_caps
            .retain(|cap| *cap != fsva_sandbox::Capability::Setfcap);
    }
    c.seccomp = match std::env::var("FSVA_SECCOMP").as_deref() {
        Ok("log") => SeccompMode::Log,
        Ok("off") => SeccompMode::Off,
        _ => SeccompMode::Kill,
    };
    c
}

fn open_dir(path: &std::path::Path) -> anyhow::Result<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening the export {}", path.display()))
}

fn open_export(backend: &BackendSpec) -> anyhow::Result<Option<OwnedFd>> {
    match backend {
        BackendSpec::Passthrough { path } => open_dir(path).map(Some),
        BackendSpec::Mem { .. } => Ok(None),
    }
}

/// Inside the sandbox the export is `/`.
fn open_export_inside(backend: &BackendSpec) -> anyhow::Result<Option<OwnedFd>> {
    match backend {
        BackendSpec::Passthrough { .. } => open_dir(std::path::Path::new("/")).map(Some),
        BackendSpec::Mem { .. } => Ok(None),
    }
}

/// Backing-file registration through the supervisor (see `fsva_supervisor::backing`).
struct SupervisorBacking {
    link: std::sync::Mutex<Link>,
}

impl fsva_appliance::BackingFiles for SupervisorBacking {
    fn open(&self, file: std::os::fd::BorrowedFd<'_>) -> std::io::Result<i32> {
        let link = self.link.lock().unwrap_or_else(|p| p.into_inner());
        link.send(&BackingRequest::Open, &[file])
            .map_err(std::io::Error::other)?;
        match link.recv::<BackingReply>().map_err(std::io::Error::other)? {
            (BackingReply::Opened { id }, _) => Ok(id),
            (BackingReply::Refused { errno, reason }, _) => Err(std::io::Error::new(
                std::io::Error::from_raw_os_error(errno).kind(),
                reason,
            )),
            (other, _) => Err(std::io::Error::other(format!("unexpected reply {other:?}"))),
        }
    }

    fn close(&self, id: i32) {
        let link = self.link.lock().unwrap_or_else(|p| p.into_inner());
        if link.send(&BackingRequest::Close { id }, &[]).is_ok() {
            let _ = link.recv::<BackingReply>();
        }
    }
}

fn serve(
    config: &StartConfig,
    link: &Link,
    mut fds: Vec<OwnedFd>,
    root: Option<OwnedFd>,
    proc_self_fd: Option<OwnedFd>,
) -> i32 {
    let backing: Option<Arc<dyn fsva_appliance::BackingFiles>> = if config.backing_link {
        match fds.pop() {
            Some(fd) => Some(Arc::new(SupervisorBacking {
                link: std::sync::Mutex::new(Link::from_fd(fd)),
            })),
            None => return fail(link, "the backing link was announced but not passed".into()),
        }
    } else {
        None
    };
    let fs = match crate::backends::build(&config.backend, root, proc_self_fd) {
        Ok(fs) => fs,
        Err(e) => return fail(link, format!("{e:#}")),
    };
    let channels: Vec<Arc<dyn Channel>> = match config.channel {
        ChannelKind::Fusedev => fds
            .into_iter()
            .map(|fd| Arc::new(FuseDev::new(fd)) as Arc<dyn Channel>)
            .collect(),
        ChannelKind::Stream => {
            let Some(fd) = fds.into_iter().next() else {
                return fail(link, "no stream socket was passed".into());
            };
            match StreamChannel::new(UnixStream::from(fd)) {
                Ok(c) => vec![Arc::new(c) as Arc<dyn Channel>],
                Err(e) => return fail(link, format!("stream channel: {e}")),
            }
        }
    };
    if channels.is_empty() {
        return fail(link, "no channel descriptors were passed".into());
    }
    if let Some(bytes) = config.cache_budget {
        fs.set_cache_budget(bytes);
    }
    let control_fs = fs.clone();
    let server = Server::new(fs, SessionConfig::default(), backing);
    let stats = server.stats();
    if link
        .send(
            &ToSupervisor::Ready {
                pid: std::process::id(),
            },
            &[],
        )
        .is_err()
    {
        return 1;
    }
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // Answer the supervisor until it goes away.
            while let Ok((request, _)) = link.recv::<ToAppliance>() {
                let reply = match request {
                    ToAppliance::Stats => {
                        let (requests, errors) = stats.snapshot();
                        ToSupervisor::Stats(ApplianceStats { requests, errors })
                    }
                    ToAppliance::SetCacheBudget { bytes } => {
                        control_fs.set_cache_budget(bytes);
                        ToSupervisor::CacheBudgetSet
                    }
                    ToAppliance::Start(_) => ToSupervisor::Failed {
                        message: "already started".into(),
                    },
                };
                if link.send(&reply, &[]).is_err() {
                    break;
                }
            }
        });
        let result = server.serve(channels, config.workers_per_channel as usize);
        if let Err(e) = &result {
            tracing::error!(error = %e, "channel failed");
        }
        // The mount is gone; nothing else will come. Exit without waiting for the
        // control thread, which may be blocked on the supervisor.
        std::process::exit(if result.is_ok() { 0 } else { 1 });
    })
}
