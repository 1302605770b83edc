//! The QEMU command line of an appliance, and the choice of accelerator.
//!
//! The machine is minimal: q35 without default devices, no network, no display; the
//! kernel and initramfs are loaded directly (no firmware boot menu, no bootloader); the
//! image is a virtio disk; two virtio-serial ports carry FUSE frames (`fsva.fuse`) and
//! control messages (`fsva.control`) over sockets the supervisor made and passed in;
//! the serial console goes to QEMU's stdout (the supervisor's log). The guest powers off
//! when it is done, and `-no-reboot` turns a guest panic (`panic=-1`) into an exit.
//!
//! KVM is used when a boot under it works. A present /dev/kvm is not proof (a nested or
//! paravirtual one may refuse stock kernels), so [`probe_kvm`] boots the appliance once
//! with a deadline. This module starts processes; it never speaks FUSE.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::bundle::Appliance;
use crate::VmError;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// Name of the virtio-serial port carrying FUSE frames.
pub const FUSE_PORT: &str = "fsva.fuse";
/// Name of the virtio-serial port carrying control messages.
pub const CONTROL_PORT: &str = "fsva.control";

/// How QEMU runs the guest's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation (much slower; always available).
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// One appliance VM to start.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub image: PathBuf,
    /// `None`: the appliance detects the type.
    pub fstype: Option<String>,
    pub read_only: bool,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: Accel,
    /// Worker threads serving FUSE frames in the guest.
    pub workers: u32,
    /// The guest runtime's `tracing` filter.
    pub log_filter: String,
    /// The guest sends directory-attribute hints (`fsva_protocol::hint`) to the relay
    /// that answers from them (a host mount's, or a vhost device's link).
    pub dir_hints: bool,
}

/// The kernel command line for `spec`; `probe` asks the runtime to report and power off.
///
/// `init_on_alloc=0`: Debian's kernel zeroes every page it allocates, and the pages a
/// READ brings into the guest's page cache are overwritten by the disk anyway. Under
/// emulation, `bench/vm.sh`'s sequential read by hand ran at 168 MB/s with the zeroing
/// and 200-220 MB/s without (writes 89-91 against 101-121 MB/s). The hardening guards
/// against one kernel object's stale contents reaching another; the guest serves one
/// file system and nothing else, and user pages are still zeroed on fault.
fn append(spec: &VmSpec, probe: bool) -> String {
    let mut a = format!(
        "console=ttyS0 quiet panic=-1 init_on_alloc=0 fsva.workers={} fsva.log={}",
        spec.workers,
        spec.log_filter.replace(' ', "")
    );
    if let Some(t) = &spec.fstype {
        a.push_str(&format!(" fsva.fstype={t}"));
    }
    if spec.read_only {
        a.push_str(" fsva.ro=1");
    }
    if probe {
        a.push_str(" fsva.probe=1");
    }
    if spec.dir_hints {
        a.push_str(" fsva.dirhints=1");
    }
    a
}

/// The kernel command line for `spec`, telling the guest whether a shared-memory
/// region is there.
fn append_for(spec: &VmSpec, ports: &Ports, probe: bool) -> String {
    let mut a = append(spec, probe);
    if ports.shm.is_some() {
        a.push_str(" fsva.shm=1");
    }
    a
}

/// Whether QEMU can open `image` with O_DIRECT (then the host keeps no second cached
/// copy of what the guest's page cache holds).
fn supports_direct_io(image: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(image)
        .is_ok()
}

/// The descriptors a VM appliance's QEMU inherits.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// The FUSE port's socket.
    pub fuse: RawFd,
    /// The control port's socket.
    pub control: RawFd,
    /// The shared-memory region (a memfd) and its size, shown to the guest as an
    /// `ivshmem-plain` device.
    pub shm: Option<(RawFd, usize)>,
}

/// The `-smp` value for `spec`. The guest shares memory with the supervisor, and the
/// rings there (`fsva_channel::shm`) rely on the guest's fences and atomic
/// instructions. Multi-threaded TCG (`thread=multi`, above) translates those for
/// parallel vCPUs only when the machine may have more than one: otherwise its
/// compare-and-swap is a plain load and store (a slot freed meanwhile is taken again
/// for good) and, up to QEMU 8.0 (Debian 12 has 7.2), a guest's `mfence` is dropped,
/// so its store may pass its next load on the host CPU and lose a wake-up. One vCPU
/// under TCG therefore declares room for a second, which never comes online.
fn smp(spec: &VmSpec) -> String {
    match spec.accel {
        Accel::Tcg if spec.cpus < 2 => format!("{},maxcpus=2", spec.cpus.max(1)),
        _ => spec.cpus.to_string(),
    }
}

/// The QEMU command for `appliance` serving `spec` through `ports` (which the caller
/// keeps open across exec).
pub fn command(appliance: &Appliance, spec: &VmSpec, ports: Ports, probe: bool) -> Command {
    let mut cmd = Command::new(QEMU);
    let (accel, cpu) = match spec.accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg => ("tcg,thread=multi", "max"),
    };
    let cache = if supports_direct_io(&spec.image) {
        "none"
    } else {
        "writeback"
    };
    cmd.args(["-machine", "q35", "-accel", accel, "-cpu", cpu])
        .args(["-m", &spec.memory_mib.to_string()])
        .args(["-smp", &smp(spec)])
        // QEMU's own seccomp filter: a guest that escapes into QEMU still cannot gain
        // privileges, start programs or change resource limits.
        .args([
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
        ])
        .args([
            "-chardev",
            "stdio,id=console,signal=off",
            "-serial",
            "chardev:console",
        ])
        .arg("-kernel")
        .arg(appliance.kernel())
        .arg("-initrd")
        .arg(appliance.initrd())
        .args(["-append", &append_for(spec, &ports, probe)])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=disk,format=raw,cache={cache},readonly={}",
            spec.image.display().to_string().replace(',', ",,"),
            if spec.read_only { "on" } else { "off" }
        ))
        .args(["-device", "virtio-blk-pci,drive=disk"])
        .args(["-device", "virtio-serial-pci"])
        .args(["-chardev", &format!("socket,id=fuse,fd={}", ports.fuse)])
        .args([
            "-device",
            &format!("virtserialport,chardev=fuse,name={FUSE_PORT}"),
        ])
        .args([
            "-chardev",
            &format!("socket,id=control,fd={}", ports.control),
        ])
        .args([
            "-device",
            &format!("virtserialport,chardev=control,name={CONTROL_PORT}"),
        ])
        .stdin(Stdio::null());
    if let Some((fd, size)) = ports.shm {
        cmd.args([
            "-object",
            &format!(
                "memory-backend-file,id=fsvashm,mem-path=/proc/self/fd/{fd},size={size},share=on"
            ),
            "-device",
            "ivshmem-plain,memdev=fsvashm",
        ]);
    }
    cmd
}

/// Whether QEMU is installed.
pub fn check_installed() -> Result<(), VmError> {
    match Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        _ => Err(VmError::NoQemu(QEMU.into())),
    }
}

/// The outcome of booting the appliance once under KVM.
#[derive(Debug, Clone)]
pub struct KvmProbe {
    pub works: bool,
    /// Why not, in a few words, when it does not.
    pub why: String,
    pub took: Duration,
}

/// Boots `appliance` under KVM (no disk image: `probe` only loads the modules, reports
/// and powers off) and waits up to `deadline` for its report.
pub fn probe_kvm(appliance: &Appliance, deadline: Duration) -> KvmProbe {
    let start = Instant::now();
    let fail = |why: String| KvmProbe {
        works: false,
        why,
        took: start.elapsed(),
    };
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return fail(format!("/dev/kvm cannot be opened ({e})"));
    }
    let (ours, theirs) = match std::os::unix::net::UnixStream::pair() {
        Ok(p) => p,
        Err(e) => return fail(format!("socketpair: {e}")),
    };
    let (fuse_ours, fuse_theirs) = match std::os::unix::net::UnixStream::pair() {
        Ok(p) => p,
        Err(e) => return fail(format!("socketpair: {e}")),
    };
    let spec = VmSpec {
        image: PathBuf::from("/dev/null"),
        fstype: None,
        read_only: true,
        memory_mib: 128,
        cpus: 1,
        accel: Accel::Kvm,
        workers: 1,
        log_filter: "warn".into(),
        dir_hints: false,
    };
    use std::os::fd::AsRawFd;
    let ports = Ports {
        fuse: fuse_theirs.as_raw_fd(),
        control: theirs.as_raw_fd(),
        shm: None,
    };
    let mut cmd = command(appliance, &spec, ports, true);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let keep = [fuse_theirs.as_raw_fd(), theirs.as_raw_fd()];
    crate::qemu::inherit(&mut cmd, &keep);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("starting {QEMU}: {e}")),
    };
    drop((theirs, fuse_theirs));
    let _ = ours.set_read_timeout(Some(deadline));
    let link = fsva_control::FramedLink::new(ours);
    let verdict = match link.map(|l| l.recv::<fsva_control::ToSupervisor>()) {
        Ok(Ok(fsva_control::ToSupervisor::Ready { .. })) => None,
        Ok(Ok(other)) => Some(format!("the appliance said {other:?}")),
        Ok(Err(e)) => Some(format!("no report from the guest ({e})")),
        Err(e) => Some(format!("{e}")),
    };
    let _ = child.kill();
    let out = child.wait_with_output().ok();
    drop(fuse_ours);
    match verdict {
        None => KvmProbe {
            works: true,
            why: String::new(),
            took: start.elapsed(),
        },
        Some(why) => {
            let qemu_said = out
                .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
                .filter(|s| !s.is_empty())
                .map(|s| format!("; QEMU: {}", s.lines().next().unwrap_or_default()))
                .unwrap_or_default();
            fail(format!("{why}{qemu_said}"))
        }
    }
}

/// Keeps `fds` open across exec in the child `cmd` starts, and makes the child die with
/// its parent.
pub fn inherit(cmd: &mut Command, fds: &[RawFd]) {
    use std::os::unix::process::CommandExt;
    let fds = fds.to_vec();
    // SAFETY: the closure runs in the forked child before exec and only calls the
    // async-signal-safe fcntl and prctl on descriptors it was given.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_tcg_vcpu_is_translated_for_parallel_vcpus() {
        let mut spec = VmSpec {
            image: PathBuf::from("disk.img"),
            fstype: None,
            read_only: false,
            memory_mib: 256,
            cpus: 1,
            accel: Accel::Tcg,
            workers: 2,
            log_filter: "info".into(),
            dir_hints: false,
        };
        assert_eq!(smp(&spec), "1,maxcpus=2");
        spec.cpus = 2;
        assert_eq!(smp(&spec), "2");
        spec.accel = Accel::Kvm;
        spec.cpus = 1;
        assert_eq!(smp(&spec), "1");
    }
}
