//! Building a backend from its spec. The one place that knows every backend crate; it
//! must never hold file system logic itself.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use fsva_appliance::Filesystem;
use fsva_control::BackendSpec;

/// Parses `--backend`: `mem` or `passthrough:DIR`.
pub fn parse_spec(s: &str) -> anyhow::Result<BackendSpec> {
    if s == "mem" {
        return Ok(BackendSpec::Mem { capacity: 0 });
    }
    if let Some(dir) = s.strip_prefix("passthrough:") {
        if dir.is_empty() {
            anyhow::bail!("--backend passthrough:DIR needs a directory after the colon");
        }
        let path = Path::new(dir);
        let canonical = path
            .canonicalize()
            .with_context(|| format!("backend directory {dir} cannot be used (does it exist?)"))?;
        if !canonical.is_dir() {
            anyhow::bail!(
                "backend path {dir} is not a directory: pass passthrough:DIR with a directory"
            );
        }
        return Ok(BackendSpec::Passthrough {
            path: canonical,
            exclusive: false,
        });
    }
    anyhow::bail!("unknown backend `{s}`: use `mem` or `passthrough:DIR`")
}

/// Entry and attribute timeout for an export only its appliance changes (`--exclusive`).
const EXCLUSIVE_TTL: std::time::Duration = std::time::Duration::from_secs(86400);

/// The backend `mount` and `serve-vhost` were asked for: the image of `--vm --image`,
/// else `--backend`, marked exclusive if `--exclusive` was given.
pub fn from_args(
    backend: &str,
    machine: &crate::cli::VmArgs,
    exclusive: bool,
) -> anyhow::Result<BackendSpec> {
    let spec = match (&machine.image, machine.vm) {
        (Some(image), true) => crate::vm::image_spec(image, machine)?,
        _ => parse_spec(backend)?,
    };
    if exclusive {
        make_exclusive(spec)
    } else {
        Ok(spec)
    }
}

/// Marks a passthrough spec exclusive (`--exclusive`); any other backend is an error.
fn make_exclusive(spec: BackendSpec) -> anyhow::Result<BackendSpec> {
    match spec {
        BackendSpec::Passthrough { path, .. } => Ok(BackendSpec::Passthrough {
            path,
            exclusive: true,
        }),
        other => {
            anyhow::bail!("--exclusive applies to --backend passthrough:DIR only, not to {other}")
        }
    }
}

/// Instantiates the backend inside the appliance. `root` is the export opened before
/// (or after) entering the sandbox; `proc_self_fd` the appliance's /proc/self/fd;
/// `device_nodes` who makes device nodes for a passthrough backend that cannot.
/// `restored` is a predecessor's snapshot (live restart).
pub fn build(
    spec: &BackendSpec,
    root: Option<OwnedFd>,
    proc_self_fd: Option<OwnedFd>,
    device_nodes: Option<Arc<dyn fsva_backend_passthrough::DeviceNodes>>,
    restored: Option<fsva_appliance::state::BackendState>,
) -> anyhow::Result<Arc<dyn Filesystem>> {
    if let (Some(_), BackendSpec::Image { .. }) = (&restored, spec) {
        anyhow::bail!("a disk image's VM appliance cannot be restored from a state yet");
    }
    match spec {
        BackendSpec::Mem { capacity } => {
            // The root directory belongs to whoever runs the appliance: root, or the
            // user who mounted without privileges.
            let mut config = fsva_backend_mem::MemConfig {
                root_uid: rustix::process::getuid().as_raw(),
                root_gid: rustix::process::getgid().as_raw(),
                ..Default::default()
            };
            if *capacity > 0 {
                config.capacity_bytes = *capacity;
            }
            match restored {
                Some(state) => Ok(Arc::new(
                    fsva_backend_mem::MemFs::restore(config, state)
                        .context("restoring mem from its predecessor's state")?,
                )),
                None => Ok(Arc::new(fsva_backend_mem::MemFs::new(config))),
            }
        }
        BackendSpec::Passthrough { path, exclusive } => {
            let root = root.with_context(|| format!("opening the export {}", path.display()))?;
            let mut config = fsva_backend_passthrough::PassthroughConfig {
                proc_self_fd,
                device_nodes,
                ..fsva_backend_passthrough::PassthroughConfig::new(root)
            };
            if *exclusive {
                // Only this appliance changes the export: what the kernel cached stays
                // true until the appliance itself changes it (and the kernel knows).
                config.entry_ttl = EXCLUSIVE_TTL;
                config.attr_ttl = EXCLUSIVE_TTL;
            }
            match restored {
                Some(state) => Ok(Arc::new(
                    fsva_backend_passthrough::PassthroughFs::restore(config, state).with_context(
                        || format!("restoring {} from its predecessor's state", path.display()),
                    )?,
                )),
                None => Ok(Arc::new(
                    fsva_backend_passthrough::PassthroughFs::new(config)
                        .with_context(|| format!("serving {}", path.display()))?,
                )),
            }
        }
        BackendSpec::Image { path, .. } => anyhow::bail!(
            "{} is a disk image: it is served by a VM appliance (fsva mount --vm), not here",
            path.display()
        ),
    }
}
