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

/// Entry and attribute timeout for a shared export whose changes the supervisor
/// watches and invalidates. Not a day: a change can slip past the watch (a lookup
/// answered just before the change lands after its invalidation, or a truncate by path,
/// which reports no event the watch asks for), and this bounds how long it stays unseen.
const WATCHED_TTL: std::time::Duration = std::time::Duration::from_secs(60);

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

/// How a backend begins its life in a new appliance.
pub enum Start {
    /// Empty (a new mount), with no recovery journal.
    Fresh,
    /// A predecessor's snapshot, descriptors lent beside it (live restart of an
    /// appliance that kept no journal).
    Snapshot(fsva_appliance::state::BackendState),
    /// Recording every change in a recovery journal the supervisor keeps, and giving
    /// it what must outlive the appliance (mem's memfds, passthrough's open files):
    /// empty, rebuilt from what a dead predecessor left, or empty after that state was
    /// lost.
    Journaled {
        journal: Arc<fsva_appliance::journal::Journal>,
        keeper: Arc<dyn fsva_appliance::Keeper>,
        from: Journaled,
    },
}

/// Where a journaled backend starts.
pub enum Journaled {
    Empty,
    /// A predecessor's checkpoint (preloaded) and the journal records after it.
    Recover {
        preloaded: Box<Preloaded>,
        records: Vec<Vec<u8>>,
    },
    /// The predecessor's state is lost: empty, its nodes stale below this number.
    AfterLoss(u64),
}

/// mem's settings for `spec`: capacity, and a root owned by whoever runs the appliance
/// (root, or the user who mounted without privileges).
fn mem_config(capacity: u64) -> fsva_backend_mem::MemConfig {
    let mut config = fsva_backend_mem::MemConfig {
        root_uid: rustix::process::getuid().as_raw(),
        root_gid: rustix::process::getgid().as_raw(),
        ..Default::default()
    };
    if capacity > 0 {
        config.capacity_bytes = capacity;
    }
    config
}

/// A journaled backend's recovery, half done ahead of need.
pub enum Preloaded {
    Mem(Box<fsva_backend_mem::Preloaded>),
    Passthrough(fsva_backend_passthrough::Preloaded),
}

impl Preloaded {
    /// Descriptors kept after the preload.
    pub fn add_fds(&mut self, fds: std::collections::HashMap<u64, OwnedFd>) {
        match self {
            Preloaded::Mem(p) => p.add_fds(fds),
            Preloaded::Passthrough(p) => p.add_fds(fds),
        }
    }

    /// Takes a newer checkpoint (the backend's part).
    pub fn reload(&mut self, checkpoint: Option<&[u8]>) -> anyhow::Result<()> {
        match self {
            Preloaded::Mem(p) => p.reload(checkpoint).context("restoring mem's checkpoint"),
            Preloaded::Passthrough(p) => p
                .reload(checkpoint)
                .context("reading passthrough's checkpoint"),
        }
    }
}

/// The first half of a journaled recovery, ahead of need: a checkpoint's backend part
/// restored (mem) or checked (passthrough, whose export changes until the predecessor
/// dies) with the descriptors kept so far.
pub fn preload(
    spec: &BackendSpec,
    checkpoint: Option<&[u8]>,
    fds: std::collections::HashMap<u64, OwnedFd>,
) -> anyhow::Result<Preloaded> {
    match spec {
        BackendSpec::Mem { capacity } => Ok(Preloaded::Mem(Box::new(
            fsva_backend_mem::MemFs::preload(mem_config(*capacity), checkpoint, fds)
                .context("restoring mem's checkpoint")?,
        ))),
        BackendSpec::Passthrough { .. } => Ok(Preloaded::Passthrough(
            fsva_backend_passthrough::PassthroughFs::preload(checkpoint, fds)
                .context("reading passthrough's checkpoint")?,
        )),
        other => anyhow::bail!("{other} keeps no recovery journal"),
    }
}

/// Instantiates the backend inside the appliance. `root` is the export opened before
/// (or after) entering the sandbox; `proc_self_fd` the appliance's /proc/self/fd;
/// `device_nodes` who makes device nodes for a passthrough backend that cannot;
/// `host_watched`: the supervisor invalidates what changes beside a shared export.
pub fn build(
    spec: &BackendSpec,
    root: Option<OwnedFd>,
    proc_self_fd: Option<OwnedFd>,
    device_nodes: Option<Arc<dyn fsva_backend_passthrough::DeviceNodes>>,
    host_watched: bool,
    start: Start,
) -> anyhow::Result<Arc<dyn Filesystem>> {
    if let (Start::Snapshot(_) | Start::Journaled { .. }, BackendSpec::Image { .. }) =
        (&start, spec)
    {
        anyhow::bail!("a disk image's VM appliance cannot be restored from a state yet")
    }
    match spec {
        BackendSpec::Mem { capacity } => {
            let config = mem_config(*capacity);
            use fsva_backend_mem::MemFs;
            Ok(match start {
                Start::Fresh => Arc::new(MemFs::new(config)),
                Start::Snapshot(state) => Arc::new(
                    MemFs::restore(config, state)
                        .context("restoring mem from its predecessor's state")?,
                ),
                Start::Journaled {
                    journal,
                    keeper,
                    from,
                } => match from {
                    Journaled::Empty => Arc::new(MemFs::journaled(config, journal, keeper)),
                    Journaled::Recover { preloaded, records } => {
                        let Preloaded::Mem(preloaded) = *preloaded else {
                            anyhow::bail!("another backend's preloaded state came to mem");
                        };
                        Arc::new(
                            MemFs::finish_recovery(*preloaded, journal, keeper, records)
                                .context("rebuilding mem from its checkpoint and journal")?,
                        )
                    }
                    Journaled::AfterLoss(base) => {
                        Arc::new(MemFs::after_loss(config, journal, keeper, base))
                    }
                },
            })
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
            } else if host_watched {
                config.entry_ttl = WATCHED_TTL;
                config.attr_ttl = WATCHED_TTL;
            }
            use fsva_backend_passthrough::PassthroughFs;
            let serving = || format!("serving {}", path.display());
            Ok(match start {
                Start::Snapshot(state) => {
                    Arc::new(PassthroughFs::restore(config, state).with_context(|| {
                        format!("restoring {} from its predecessor's state", path.display())
                    })?)
                }
                Start::Fresh => Arc::new(PassthroughFs::new(config).with_context(serving)?),
                Start::Journaled {
                    journal,
                    keeper,
                    from,
                } => match from {
                    Journaled::Empty => Arc::new(
                        PassthroughFs::journaled(config, journal, keeper).with_context(serving)?,
                    ),
                    Journaled::Recover { preloaded, records } => {
                        let Preloaded::Passthrough(preloaded) = *preloaded else {
                            anyhow::bail!("another backend's preloaded state came to passthrough");
                        };
                        Arc::new(
                            PassthroughFs::finish_recovery(
                                config, preloaded, journal, keeper, records,
                            )
                            .with_context(|| {
                                format!(
                                    "rebuilding {} from its checkpoint and journal",
                                    path.display()
                                )
                            })?,
                        )
                    }
                    Journaled::AfterLoss(base) => Arc::new(
                        PassthroughFs::after_loss(config, journal, keeper, base)
                            .with_context(serving)?,
                    ),
                },
            })
        }
        BackendSpec::Image { path, .. } => anyhow::bail!(
            "{} is a disk image: it is served by a VM appliance (fsva mount --vm), not here",
            path.display()
        ),
    }
}

/// A checkpoint made fit for a transfer that carries bytes only (a vhost-user device's
/// state for a guest's migration): mem keeps its memfds, whose contents then travel by
/// value; passthrough drops its descriptors, its nodes and handles to be found again
/// by path on the same export (ESTALE for what is gone).
pub fn transferable(
    spec: &BackendSpec,
    state: Vec<u8>,
    fds: Vec<fsva_appliance::state::StateFd>,
) -> anyhow::Result<(Vec<u8>, Vec<fsva_appliance::state::StateFd>)> {
    use fsva_appliance::state::{ApplianceState, BackendState};
    match spec {
        BackendSpec::Mem { .. } => Ok((state, fds)),
        BackendSpec::Passthrough { .. } => {
            drop(fds);
            let mut s = ApplianceState::decode(&state)?.into_latest();
            let backend = fsva_backend_passthrough::snapshot::portable(BackendState {
                bytes: std::mem::take(&mut s.backend),
                fds: Vec::new(),
            })
            .context("making the passthrough state portable")?;
            s.backend = backend.bytes;
            Ok((ApplianceState::V2(s).encode(), Vec::new()))
        }
        BackendSpec::Image { .. } => {
            anyhow::bail!("a disk image's VM appliance cannot hand over its state yet")
        }
    }
}
