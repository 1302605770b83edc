//! Finding, building and choosing how to boot the VM appliance for `fsva mount --vm` and
//! `fsva appliance`: where the cached appliance lives, where the static runtime is, and
//! whether KVM works (remembered per appliance). The machine itself is fsva-vm's; this
//! module only decides and reports progress to the user.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use fsva_control::BackendSpec;
use fsva_vm::bundle::{self, Appliance, BuildOptions};
use fsva_vm::qemu::{self, Accel};

use crate::cli::VmArgs;

/// Where the appliance is cached.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FSVA_APPLIANCE_DIR") {
        return d.into();
    }
    if rustix::process::geteuid().is_root() {
        return "/var/cache/fsva/appliance".into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| "/tmp".into());
    base.join("fsva/appliance")
}

/// The static appliance runtime (`fsva-vm-init`): `$FSVA_VM_INIT`, the static build in
/// this executable's build tree, or where scripts/setup.sh installs it.
pub fn runtime_path() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("FSVA_VM_INIT") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().context("locating the fsva executable")?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let candidates = [
        dir.join("../x86_64-unknown-linux-gnu/release/fsva-vm-init"),
        PathBuf::from("/usr/local/lib/fsva/fsva-vm-init"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
        .with_context(|| {
            format!(
                "the VM appliance runtime fsva-vm-init is not built (looked in {}): run scripts/setup.sh",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

fn progress(msg: &str) {
    eprintln!("fsva: appliance: {msg}");
}

/// Builds the appliance from `opts` into the cache, unconditionally.
pub fn build(opts: &BuildOptions) -> anyhow::Result<Appliance> {
    let dir = cache_dir();
    // Built beside the cache and swapped in whole, so that a VM starting meanwhile
    // finds either the old kernel and initramfs or the new pair, never a mix.
    let fresh = sibling(&dir, &format!("new-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&fresh);
    bundle::build(opts, &fresh, &mut |m| progress(m))
        .with_context(|| format!("building the VM appliance in {}", fresh.display()))?;
    let old = sibling(&dir, &format!("old-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(&dir, &old).with_context(|| format!("moving {} aside", dir.display()))?;
    }
    std::fs::rename(&fresh, &dir).with_context(|| format!("installing {}", dir.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    // The new appliance's accelerator is probed again on first use (no `accel` memo).
    Appliance::load(&dir).with_context(|| format!("loading {}", dir.display()))
}

/// `dir` with a suffix, in the same parent (so renames between them are atomic).
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    dir.with_file_name(name)
}

/// Holds the cache's lock: one fsva at a time builds or probes the appliance.
pub struct CacheLock(#[allow(dead_code)] std::fs::File);

pub fn lock_cache() -> anyhow::Result<CacheLock> {
    let dir = cache_dir();
    let parent = dir.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    // Beside the cache, not in it: a rebuild replaces the cache directory whole.
    let path = sibling(&dir, "lock");
    let f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(CacheLock(f))
}

/// The cached appliance, built first if missing or made from another runtime/kernel.
/// Call with the cache locked ([`lock_cache`]).
pub fn ensure_built() -> anyhow::Result<Appliance> {
    let opts = BuildOptions {
        kernel: None,
        modules: None,
        init: runtime_path()?,
    };
    match Appliance::load(&cache_dir()) {
        Ok(a) if a.is_current(&opts) => Ok(a),
        Ok(_) => {
            progress("the runtime or kernel changed; rebuilding");
            build(&opts)
        }
        Err(_) => {
            progress("not built yet; building it once");
            build(&opts)
        }
    }
}

/// The accelerator for `appliance` and a note for `fsva status`: KVM if a probe boot
/// succeeded (remembered in the appliance's directory), TCG otherwise.
pub fn choose_accel(appliance: &Appliance, requested: crate::cli::AccelArg) -> (Accel, String) {
    use crate::cli::AccelArg;
    match requested {
        AccelArg::Kvm => return (Accel::Kvm, "KVM (asked for)".into()),
        AccelArg::Tcg => return (Accel::Tcg, "TCG emulation (asked for)".into()),
        AccelArg::Auto => {}
    }
    let memo = appliance.dir.join("accel");
    if let Ok(text) = std::fs::read_to_string(&memo) {
        if let Some(rest) = text.strip_prefix("kvm") {
            let _ = rest;
            return (Accel::Kvm, "KVM".into());
        }
        if let Some(why) = text.strip_prefix("tcg ") {
            return (Accel::Tcg, tcg_note(why.trim()));
        }
    }
    progress("checking whether KVM can boot it (once)");
    let probe = qemu::probe_kvm(appliance, std::time::Duration::from_secs(20));
    let (accel, line) = if probe.works {
        (Accel::Kvm, "kvm\n".to_string())
    } else {
        (Accel::Tcg, format!("tcg {}\n", probe.why))
    };
    let _ = std::fs::write(&memo, &line);
    match accel {
        Accel::Kvm => {
            progress(&format!("KVM works (booted in {:.1?})", probe.took));
            (Accel::Kvm, "KVM".into())
        }
        Accel::Tcg => {
            progress(&format!(
                "KVM cannot boot it ({}); using TCG software emulation, which is several times slower",
                probe.why
            ));
            (Accel::Tcg, tcg_note(&probe.why))
        }
    }
}

fn tcg_note(why: &str) -> String {
    format!("TCG emulation (KVM unusable: {why})")
}

/// The VM appliance to boot for `machine` (`None` without `--vm`): builds the appliance
/// once, probes the accelerator and sizes the guest, with progress in the terminal.
pub fn plan(
    machine: &VmArgs,
    backend: &BackendSpec,
    cache_budget: Option<u64>,
    workers: Option<u32>,
    log: &str,
    foreground: bool,
) -> anyhow::Result<Option<fsva_supervisor::VmPlan>> {
    if !machine.vm {
        return Ok(None);
    }
    {
        fsva_vm::qemu::check_installed()?;
        let lock = lock_cache()?;
        let appliance = ensure_built()?;
        let (accel, accel_note) = choose_accel(&appliance, machine.accel);
        drop(lock);
        if accel == fsva_vm::qemu::Accel::Tcg && !foreground {
            eprintln!("fsva: booting the appliance under TCG emulation (slower than KVM); this takes a few seconds");
        }
        // The guest needs ~128 MiB besides the page cache its budget allows.
        let budget_mib = cache_budget.unwrap_or(0) >> 20;
        let memory_mib = match machine.vm_memory {
            Some(m) if u64::from(m) < budget_mib + 128 => anyhow::bail!(
                "--vm-memory {m} leaves no room for --cache-budget {budget_mib}M: give at least {} MiB",
                budget_mib + 128
            ),
            Some(m) => m,
            None => u32::try_from(budget_mib.saturating_add(192))
                .unwrap_or(u32::MAX)
                .max(256),
        };
        let BackendSpec::Image {
            path,
            fstype,
            read_only,
        } = &backend
        else {
            unreachable!("--vm always serves an image")
        };
        // Under TCG a second vCPU buys throughput (+30% for 1 MiB I/O) but costs every
        // request a cross-thread hand-off: a round trip took 290 µs with two, 165 µs
        // with one (measured here before the shared-memory rings).
        let cpus = machine.vm_cpus.unwrap_or(match accel {
            fsva_vm::qemu::Accel::Tcg => 1,
            fsva_vm::qemu::Accel::Kvm => crate::commands::mount::default_workers().min(4),
        });
        // Under TCG a worker per emulated CPU: a second worker on one vCPU took turns
        // with the first (every request a switch between them) and polled while the
        // first worked. By hand (the fsva half of bench/vm.sh, two rounds each),
        // one worker against two: create+write 852/775 against 1,184/895 µs,
        // mkdir+rmdir 930/959 against 1,467/1,403 µs, extraction 15.0/12.3 against
        // 21.7/13.7 s, cat 3.16/3.03 against 4.82/3.51 s; sequential I/O close. The
        // cost: parallel disk-bound work does not overlap (bench/vm-parallel.sh: four
        // processes' cold random reads 2,500 IOPS with one, 3,400-4,600 with two), so
        // `--workers` stays the knob for that. Under KVM the vCPUs are real and more
        // workers overlap disk waits.
        let default_workers = match accel {
            fsva_vm::qemu::Accel::Tcg => cpus,
            fsva_vm::qemu::Accel::Kvm => crate::commands::mount::default_workers(),
        };
        Ok(Some(fsva_supervisor::VmPlan {
            appliance,
            spec: fsva_vm::qemu::VmSpec {
                image: path.clone(),
                fstype: fstype.clone(),
                read_only: *read_only,
                memory_mib,
                cpus,
                accel,
                workers: workers.unwrap_or(default_workers),
                log_filter: log.to_string(),
                // The supervisor turns them on where its relay answers from them.
                dir_hints: false,
            },
            accel_note,
        }))
    }
}

/// The image a VM appliance serves, checked here so that a typo fails in the terminal.
pub fn image_spec(image: &std::path::Path, machine: &VmArgs) -> anyhow::Result<BackendSpec> {
    let path = image.canonicalize().with_context(|| {
        format!(
            "disk image {} cannot be used (does it exist?)",
            image.display()
        )
    })?;
    let md = std::fs::metadata(&path)?;
    use std::os::unix::fs::FileTypeExt;
    if !(md.is_file() || md.file_type().is_block_device()) {
        anyhow::bail!(
            "{} is not a disk image (a regular file or a block device)",
            path.display()
        );
    }
    if let Some(t) = &machine.fstype {
        if t.is_empty() || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            anyhow::bail!("--fstype {t}: give a kernel file system name such as ext4 or vfat");
        }
    }
    Ok(BackendSpec::Image {
        path,
        fstype: machine.fstype.clone(),
        read_only: machine.ro,
    })
}
