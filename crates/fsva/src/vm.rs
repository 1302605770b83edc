//! Finding, building and choosing how to boot the VM appliance for `fsva mount --vm` and
//! `fsva appliance`: where the cached appliance lives, where the static runtime is, and
//! whether KVM works (remembered per appliance). The machine itself is fsva-vm's; this
//! module only decides and reports progress to the user.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use fsva_vm::bundle::{self, Appliance, BuildOptions};
use fsva_vm::qemu::{self, Accel};

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
