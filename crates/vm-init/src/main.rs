//! `fsva-vm-init`: PID 1 of a VM appliance.
//!
//! It brings up just enough of the guest (proc, sysfs, devtmpfs, the drivers listed in
//! `/etc/fsva/modules.load`), recognises the disk's file system and loads only its
//! modules (`/etc/fsva/fs/TYPE`), mounts the disk with the guest kernel's own driver, and serves that mount with the same appliance runtime and `passthrough`
//! backend as a sandboxed appliance, over the `fsva.fuse` virtio-serial port; it reports
//! and answers control messages on `fsva.control`. When the host closes the FUSE port
//! (the mount is gone) it syncs, unmounts the disk and powers the machine off.
//!
//! Its settings come from the kernel command line (`fsva.fstype=`, `fsva.ro=1`,
//! `fsva.workers=`, `fsva.log=`, `fsva.probe=1`). It must never exit without powering
//! off (PID 1 exiting panics the guest), and never leave the disk mounted when it can
//! unmount it.

mod detect;
mod guest;
mod ports;
mod shared_memory;

use std::sync::Arc;

use fsva_appliance::{Server, SessionConfig};
use fsva_channel::{stream::StreamChannel, Channel};
use fsva_control::{ApplianceStats, FramedLink, ToAppliance, ToSupervisor};

/// Settings read from the kernel command line.
#[derive(Debug, Default)]
struct Settings {
    fstype: Option<String>,
    read_only: bool,
    workers: usize,
    log: String,
    probe: bool,
    /// The host offers a shared-memory region for file data.
    shm: bool,
    /// The host's relay takes directory-attribute hints.
    dir_hints: bool,
    /// How long a worker polls the shared-memory ring before it sleeps on the port
    /// (`None`: the channel's default).
    poll_us: Option<u64>,
}

fn settings(cmdline: &str) -> Settings {
    let mut s = Settings {
        workers: 2,
        log: "info".into(),
        ..Default::default()
    };
    for word in cmdline.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "fsva.fstype" if !value.is_empty() => s.fstype = Some(value.into()),
            "fsva.ro" => s.read_only = value == "1",
            "fsva.workers" => s.workers = value.parse().unwrap_or(2).clamp(1, 64),
            "fsva.log" => s.log = value.into(),
            "fsva.probe" => s.probe = value == "1",
            "fsva.shm" => s.shm = value == "1",
            "fsva.dirhints" => s.dir_hints = value == "1",
            "fsva.poll_us" => s.poll_us = value.parse().ok(),
            _ => {}
        }
    }
    s
}

fn main() {
    if std::process::id() != 1 {
        eprintln!("fsva-vm-init is the init of a VM appliance; `fsva mount --vm` boots it");
        std::process::exit(2);
    }
    let outcome = run();
    if let Err(message) = &outcome {
        tracing::error!("{message}");
    }
    guest::power_off();
}

fn run() -> Result<(), String> {
    guest::mount_pseudo_filesystems()?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let s = settings(&cmdline);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&s.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .init();
    guest::raise_open_file_limit();
    guest::load_base_modules();
    let control = ports::open(fsva_vm_ports::CONTROL)?;
    let control = FramedLink::new(control).map_err(|e| format!("control port: {e}"))?;
    if s.probe {
        let _ = control.send(&ToSupervisor::Ready { pid: 1 });
        return Ok(());
    }
    match serve(&s, &control) {
        Ok(()) => Ok(()),
        Err(message) => {
            let _ = control.send(&ToSupervisor::Failed {
                message: message.clone(),
            });
            Err(message)
        }
    }
}

/// The disk's read-ahead: twice the largest READ the host sends (1 MiB).
const DISK_READAHEAD_KB: u32 = 2048;

/// Entry and attribute timeout for a disk only this appliance changes.
const EXCLUSIVE_TTL: std::time::Duration = std::time::Duration::from_secs(86400);

/// Port names shared with the host side (`fsva_vm::qemu`).
mod fsva_vm_ports {
    pub const FUSE: &str = "fsva.fuse";
    pub const CONTROL: &str = "fsva.control";
}

fn serve(s: &Settings, control: &FramedLink) -> Result<(), String> {
    let disk = guest::wait_for_disk()?;
    let fstype = guest::mount_disk(&disk, s.fstype.as_deref(), s.read_only)?;
    guest::raise_disk_readahead(&disk, DISK_READAHEAD_KB);
    let fuse = ports::open(fsva_vm_ports::FUSE)?;
    let root = fsva_backend_passthrough::open_dir_path(std::path::Path::new(guest::EXPORT))
        .map_err(|e| format!("opening {}: {e}", guest::EXPORT))?;
    // The image is this VM's alone (QEMU locks it), so nothing changes the file system
    // behind the host kernel's back: it may trust names and attributes as long as it
    // likes, as for mem.
    let mut config = fsva_backend_passthrough::PassthroughConfig::new(root);
    config.entry_ttl = EXCLUSIVE_TTL;
    config.attr_ttl = EXCLUSIVE_TTL;
    config.exclusive_local = true;
    // An open costs a round trip to this VM (hundreds of µs under emulation) and tells
    // the appliance nothing it needs: files are opened without OPEN.
    config.no_open = true;
    // The guest's page cache is bounded by its memory and the cache budget's watcher;
    // what a READ finds cached was mostly written through this appliance and may not
    // be written back yet (the host's sync never reaches the guest), and dropping it
    // would write it back inside the READ: about 300 µs a small file under emulation.
    config.drop_only_read_in = true;
    let fs = fsva_backend_passthrough::PassthroughFs::new(config)
        .map_err(|e| format!("serving {}: {e}", guest::EXPORT))?;
    let shm = if s.shm {
        match shared_memory::map() {
            Ok(region) => {
                let region = match s.poll_us {
                    Some(us) => region.with_poll(std::time::Duration::from_micros(us)),
                    None => region,
                };
                tracing::info!(slots = region.slots(), "frames through shared memory");
                Some(Arc::new(region))
            }
            Err(why) => {
                tracing::warn!(%why, "no shared memory; file data goes through the port");
                None
            }
        }
    } else {
        None
    };
    let shared_memory = shm.is_some();
    let channel: Arc<dyn Channel> =
        Arc::new(StreamChannel::with_shm(fuse, shm).map_err(|e| format!("FUSE port: {e}"))?);
    // The image is this VM's alone: the relay may trust what it is told about
    // directories until a request it forwards changes them.
    let server =
        Server::new(Arc::new(fs), SessionConfig::default(), None, None).with_dir_hints(s.dir_hints);
    let stats = server.stats();
    let kernel = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    tracing::info!(%kernel, %fstype, read_only = s.read_only, "serving {}", disk.display());
    control
        .send(&ToSupervisor::VmReady {
            kernel,
            fstype,
            read_only: s.read_only,
            shared_memory,
        })
        .map_err(|e| format!("reporting ready: {e}"))?;
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while let Ok(request) = control.recv::<ToAppliance>() {
                let reply = match request {
                    ToAppliance::Stats => {
                        let (requests, errors) = stats.snapshot();
                        ToSupervisor::Stats(ApplianceStats {
                            requests,
                            errors,
                            passthrough_files: 0,
                        })
                    }
                    ToAppliance::SetCacheBudget { bytes } => {
                        guest::set_cache_budget(bytes);
                        ToSupervisor::CacheBudgetSet
                    }
                    ToAppliance::SetClock { secs, nanos } => match guest::set_clock(secs, nanos) {
                        Ok(()) => ToSupervisor::ClockSet,
                        Err(e) => ToSupervisor::Failed {
                            message: format!("setting the guest clock: {e}"),
                        },
                    },
                    ToAppliance::Start(_) | ToAppliance::StartJournaled(_) => {
                        ToSupervisor::Failed {
                            message: "a VM appliance is configured by its kernel command line"
                                .into(),
                        }
                    }
                    ToAppliance::Checkpoint
                    | ToAppliance::CheckpointForTransfer
                    | ToAppliance::CheckpointNow
                    | ToAppliance::Preload { .. }
                    | ToAppliance::Restore { .. }
                    | ToAppliance::Recover { .. }
                    | ToAppliance::KeptFds { .. }
                    | ToAppliance::StateFds
                    | ToAppliance::Resume => ToSupervisor::Failed {
                        message: "a VM appliance cannot be restarted live yet".into(),
                    },
                    ToAppliance::Sync => match guest::sync_disk() {
                        Ok(()) => ToSupervisor::Synced,
                        Err(e) => ToSupervisor::Failed {
                            message: format!("syncing the disk's file system: {e}"),
                        },
                    },
                    // Only this appliance changes its disk: nothing changes beside it.
                    ToAppliance::HostChanged(_) => ToSupervisor::Invalidations(Default::default()),
                };
                if control.send(&reply).is_err() {
                    break;
                }
            }
        });
        let result = server.serve(vec![channel], s.workers);
        if let Err(e) = &result {
            tracing::error!(error = %e, "FUSE port failed");
        }
        // Close every descriptor the backend holds on the disk, so it can be unmounted.
        drop(server);
        // The mount is gone: make the disk consistent and stop the machine without
        // waiting for the control thread.
        guest::unmount_disk();
        guest::power_off();
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_kernel_command_line() {
        let s = settings(
            "console=ttyS0 quiet fsva.fstype=vfat fsva.ro=1 fsva.workers=3 fsva.log=debug fsva.dirhints=1",
        );
        assert_eq!(s.fstype.as_deref(), Some("vfat"));
        assert!(s.read_only && !s.probe && s.dir_hints);
        assert_eq!((s.workers, s.log.as_str()), (3, "debug"));
        let s = settings("fsva.workers=0 fsva.probe=1 fsva.poll_us=50");
        assert_eq!((s.workers, s.probe, s.fstype), (1, true, None));
        assert!(!s.dir_hints);
        assert_eq!(s.poll_us, Some(50));
        assert_eq!(settings("fsva.poll_us=soon").poll_us, None);
    }
}
