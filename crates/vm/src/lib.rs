//! VM appliances: the file system runs on a kernel of its own, in a QEMU virtual machine.
//!
//! - [`bundle`]: assembles an appliance once and caches it — a kernel and an initramfs
//!   holding the statically linked `fsva-vm-init` (the appliance runtime as PID 1), the
//!   kernel modules of the drivers and file systems, and nothing else;
//! - [`cpio`]: the initramfs archive writer;
//! - [`modules`]: which modules to ship, resolved by the kernel's own dependency data;
//! - [`qemu`]: the QEMU command line of an appliance (minimal q35 machine, the image as a
//!   virtio disk, two virtio-serial ports: FUSE frames and control) and the choice of
//!   accelerator: KVM when a boot under it succeeds, TCG otherwise.
//!
//! The FUSE frames travel over the same `stream` channel as sandboxed appliances'; the
//! supervisor relays them. This crate never interprets FUSE and never touches the
//! mount: it builds and starts machines.

pub mod bundle;
pub mod cpio;
pub mod modules;
pub mod qemu;

use std::path::PathBuf;

/// What went wrong building or starting a VM appliance.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("no appliance kernel found: install Debian's linux-image-amd64 (scripts/setup.sh does) or pass --kernel PATH")]
    NoKernel,
    #[error("cannot tell the release of kernel {0}: name it vmlinuz-RELEASE or pass --modules …/lib/modules/RELEASE")]
    KernelRelease(PathBuf),
    #[error("kernel modules in {dir}: {why}")]
    Modules { dir: PathBuf, why: String },
    #[error("the appliance runtime {path} {why}; build it with scripts/setup.sh (a static fsva-vm-init) or pass its path in FSVA_VM_INIT")]
    Init { path: PathBuf, why: String },
    #[error("running {tool} failed: {source}; install it")]
    Tool {
        tool: &'static str,
        source: std::io::Error,
    },
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the appliance in {0} is incomplete or from another fsva version: run `fsva appliance build`")]
    BadBundle(PathBuf),
    #[error(
        "QEMU ({0}) is not installed: apt-get install qemu-system-x86 (scripts/setup.sh does)"
    )]
    NoQemu(String),
}

impl VmError {
    pub(crate) fn file(
        what: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> VmError {
        let path = path.to_path_buf();
        move |source| VmError::File { what, path, source }
    }
}
