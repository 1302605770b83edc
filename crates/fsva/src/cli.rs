//! The command-line grammar (clap). Parsing only: no side effects.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "fsva",
    version,
    about = "Run file systems in isolated appliances, mounted through FUSE."
)]
pub struct Cli {
    /// Log filter (tracing syntax), e.g. `info` or `fsva_supervisor=debug`.
    #[arg(long, global = true, env = "FSVA_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount a file system served by a new appliance; returns once the mount answers.
    Mount(MountArgs),
    /// Flush, stop the appliance and unmount.
    #[command(alias = "unmount")]
    Umount(UmountArgs),
    /// List fsva mounts with their appliance, uptime and request counters.
    Status,
    /// Change a mount's cache budget at run time (it must have been mounted with one).
    Cache(CacheArgs),
    /// Write everything written through a mount back to the appliance's storage. The
    /// host's sync(1) never reaches a FUSE server: for a VM appliance, whose disk has
    /// its own page cache, this (or fsync, or `fsva umount`) is what makes data durable.
    Sync(SyncArgs),
    /// Replace a mount's appliance by a new process with the same state, live (mem on
    /// the fusedev channel so far): open files stay open, no request fails.
    Restart(RestartArgs),
    /// Serve an appliance to a VM guest as a vhost-user-fs device: the guest mounts it
    /// with `mount -t virtiofs TAG DIR`. Runs in the foreground until the VM goes away.
    ServeVhost(ServeVhostArgs),
    /// Build or inspect the VM appliance (a kernel and a small initramfs with the fsva
    /// runtime) that `fsva mount --vm` boots.
    #[command(subcommand)]
    Appliance(VmApplianceCommand),
    /// Move a mount's appliance to the host daemon on another host, live: the mount
    /// stays here, its requests are served there over TCP (mem and passthrough on the
    /// fusedev channel).
    Migrate(MigrateArgs),
    /// Run the host daemon that receives migrating appliances (in the foreground).
    Host(HostArgs),
    /// Internal: the appliance process (started by the supervisor).
    #[command(name = "__appliance", hide = true)]
    ApplianceProcess(ApplianceArgs),
}

#[derive(Debug, Subcommand)]
pub enum VmApplianceCommand {
    /// Assemble the appliance and cache it (done on first use too), then check which
    /// accelerator boots it.
    Build(VmBuildArgs),
    /// Show what the cached appliance contains: kernel, file systems, size, accelerator.
    Info,
}

#[derive(Debug, clap::Args)]
pub struct VmBuildArgs {
    /// The appliance's kernel (default: the newest /boot/vmlinuz-*, from Debian's
    /// linux-image-amd64).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// The kernel's modules directory, …/lib/modules/RELEASE (default: derived from the
    /// kernel's name).
    #[arg(long)]
    pub modules: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelArg {
    /// KVM if a probe boot under it works, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ChannelArg {
    /// The appliance reads cloned /dev/fuse descriptors directly (no extra hop).
    Fusedev,
    /// FUSE frames over a unix socket, relayed and checked by the supervisor.
    Stream,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SandboxArg {
    /// User, mount, pid, net, ipc and uts namespaces, pivot_root, seccomp, dropped capabilities.
    Namespaces,
    /// No isolation (debugging only).
    None,
}

#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// What to serve: `mem` (in memory) or `passthrough:DIR`.
    #[arg(long, short = 'b', default_value = "mem")]
    pub backend: String,
    /// How FUSE frames reach the appliance.
    #[arg(long, value_enum, default_value = "fusedev")]
    pub channel: ChannelArg,
    /// Isolation of the appliance.
    #[arg(long, value_enum, default_value = "namespaces")]
    pub sandbox: SandboxArg,
    /// The export (passthrough:DIR) is changed only through fsva: the kernel keeps
    /// entries and attributes cached for a day instead of a second (stat and lookups
    /// answered without the appliance). Changes made beside fsva may stay unseen.
    #[arg(long)]
    pub exclusive: bool,
    /// Serve file data through the appliance instead of FUSE passthrough (where the
    /// kernel reads and writes the backend's files directly, with one page cache).
    #[arg(long)]
    pub no_passthrough: bool,
    /// Keep no recovery journal (mem, passthrough): an appliance that dies then leaves
    /// the mount answering EIO instead of a successor taking over with its state.
    #[arg(long)]
    pub no_recovery: bool,
    /// Most file data the appliance may keep in memory, e.g. 256M or 2G (for mem: all it
    /// may hold before writes get ENOSPC). Enforced by the appliance's memory cgroup.
    #[arg(long, value_parser = parse_size)]
    pub cache_budget: Option<u64>,
    /// Appliance worker threads (default: one per CPU, at least 2; a VM appliance under
    /// TCG emulation: one per vCPU).
    #[arg(long)]
    pub workers: Option<u32>,
    /// Mount options: ro, rw, suid, nosuid, dev, nodev, allow_other.
    #[arg(short = 'o', value_delimiter = ',')]
    pub options: Vec<String>,
    /// Stay in the foreground (logs to stderr) instead of returning once mounted.
    #[arg(short = 'f', long)]
    pub foreground: bool,
    /// The executable to run appliances with (default: this fsva binary). Lets a new
    /// fsva version, or a test's deliberately broken appliance, serve the mount.
    #[arg(long, hide = true, env = "FSVA_APPLIANCE_EXE")]
    pub appliance_exe: Option<PathBuf>,
    #[command(flatten)]
    pub machine: VmArgs,
    /// Internal: descriptor to report readiness on (used when daemonizing).
    #[arg(long, hide = true)]
    pub ready_fd: Option<i32>,
    /// Where to mount: an existing, empty directory.
    pub mountpoint: PathBuf,
}

/// The VM appliance options, shared by `mount` and `serve-vhost`.
#[derive(Debug, clap::Args)]
pub struct VmArgs {
    /// Serve a disk image from a VM appliance: its own kernel mounts the image (see
    /// `fsva appliance`). Needs --image.
    #[arg(long, requires = "image")]
    pub vm: bool,
    /// The disk image a VM appliance mounts.
    #[arg(long, requires = "vm")]
    pub image: Option<PathBuf>,
    /// The image's file system type as the appliance's kernel names it (default:
    /// detected).
    #[arg(long, requires = "vm")]
    pub fstype: Option<String>,
    /// Mount the image read-only (the disk is attached read-only, too).
    #[arg(long, requires = "vm")]
    pub ro: bool,
    /// Memory of the VM appliance in MiB (default 256, more with --cache-budget).
    #[arg(long, requires = "vm", value_parser = clap::value_parser!(u32).range(128..=1_048_576))]
    pub vm_memory: Option<u32>,
    /// vCPUs of the VM appliance (default: 1 under TCG, where it answers requests
    /// fastest; up to 4 under KVM).
    #[arg(long, requires = "vm", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vm_cpus: Option<u32>,
    /// How QEMU runs the VM appliance.
    #[arg(long, value_enum, default_value = "auto", requires = "vm")]
    pub accel: AccelArg,
}

#[derive(Debug, clap::Args)]
pub struct ServeVhostArgs {
    /// The vhost-user socket to create; QEMU connects with
    /// `-chardev socket,id=fs,path=PATH -device vhost-user-fs-pci,chardev=fs,tag=TAG`.
    #[arg(long)]
    pub socket: PathBuf,
    /// The tag the guest mounts, offered to VMMs that read it from the device (QEMU's
    /// vhost-user-fs-pci takes it from its own `tag=`).
    #[arg(long)]
    pub tag: Option<String>,
    /// Request queues (each has its own worker; Linux guests since 6.12 use one per
    /// CPU up to this many).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Keep guest memory out of the appliance: the supervisor is the device and relays
    /// each request to it (one more hop per request), and the appliance's death is an
    /// error for the guest instead of a stalled device. Always so with --vm. Without
    /// it, a process appliance is the device itself, as virtiofsd is.
    #[arg(long)]
    pub relay: bool,
    /// What to serve: `mem` (in memory) or `passthrough:DIR`.
    #[arg(long, short = 'b', default_value = "mem")]
    pub backend: String,
    /// Isolation of the appliance.
    #[arg(long, value_enum, default_value = "namespaces")]
    pub sandbox: SandboxArg,
    /// The export (passthrough:DIR) is changed only through fsva: the kernel keeps
    /// entries and attributes cached for a day instead of a second (stat and lookups
    /// answered without the appliance). Changes made beside fsva may stay unseen.
    #[arg(long)]
    pub exclusive: bool,
    /// Most file data the appliance may keep in memory, e.g. 256M.
    #[arg(long, value_parser = parse_size)]
    pub cache_budget: Option<u64>,
    /// Appliance worker threads (default: one per CPU, at least 2; a VM appliance under
    /// TCG emulation: one per vCPU).
    #[arg(long)]
    pub workers: Option<u32>,
    /// The executable to run appliances with (default: this fsva binary).
    #[arg(long, hide = true, env = "FSVA_APPLIANCE_EXE")]
    pub appliance_exe: Option<PathBuf>,
    #[command(flatten)]
    pub machine: VmArgs,
}

#[derive(Debug, clap::Args)]
pub struct UmountArgs {
    /// Detach the mount even if files are open on it.
    #[arg(long, short = 'l')]
    pub lazy: bool,
    pub mountpoint: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ApplianceArgs {
    /// The control socket inherited from the supervisor.
    #[arg(long)]
    pub control_fd: i32,
}

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    pub mountpoint: PathBuf,
    /// The host daemon (`fsva host`) to move to, as HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub to: String,
    /// The shared secret the daemon was started with (a file only its owner may read).
    #[arg(long, value_name = "FILE")]
    pub key_file: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// Address to listen on, as HOST:PORT (e.g. 0.0.0.0:7420).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// The shared secret supervisors must prove they hold (a file only its owner may
    /// read, at least 16 bytes).
    #[arg(long, value_name = "FILE")]
    pub key_file: PathBuf,
    /// A directory (on storage the supervisors' hosts share) that migrating
    /// passthrough appliances may serve, with everything below it; repeatable.
    /// Without one, only mem appliances are accepted.
    #[arg(long = "export", value_name = "DIR")]
    pub exports: Vec<PathBuf>,
    /// The fsva executable to run appliances with (default: this one).
    #[arg(long, hide = true)]
    pub appliance_exe: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct RestartArgs {
    pub mountpoint: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    pub mountpoint: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct CacheArgs {
    pub mountpoint: PathBuf,
    /// The new budget, e.g. 128M.
    #[arg(value_parser = parse_size)]
    pub size: u64,
}

/// Parses `4096`, `64K`, `256M`, `2G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size: use a number with an optional K, M or G"))?;
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("unknown size unit in `{s}`: use K, M, G or T")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
    }
}
