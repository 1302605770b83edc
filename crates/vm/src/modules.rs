//! Which kernel modules an appliance needs, in load order. The dependency closure is
//! the kernel's own (`modprobe --show-depends`, from kmod), so soft dependencies and
//! aliases resolve exactly as on a booted system. This module only reads the module
//! tree; it never loads anything into the running kernel.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::VmError;

/// Drivers every appliance needs: the PCI transport, the disk and the serial ports.
pub const DRIVERS: &[&str] = &["virtio_pci", "virtio_blk", "virtio_console"];

/// Checksum and hash algorithms file systems ask for by alias at mount time.
pub const CRYPTO: &[&str] = &[
    "crypto-crc32c",
    "crypto-crc32",
    "crypto-sha256",
    "crypto-xxhash64",
    "crypto-blake2b-256",
];

/// File system modules an appliance offers, with the types each registers.
pub const FILESYSTEMS: &[(&str, &[&str])] = &[
    ("ext4", &["ext4", "ext3", "ext2"]),
    ("vfat", &["vfat"]),
    ("msdos", &["msdos"]),
    ("exfat", &["exfat"]),
    ("isofs", &["iso9660"]),
    ("udf", &["udf"]),
    ("ntfs3", &["ntfs3"]),
    ("f2fs", &["f2fs"]),
    ("jfs", &["jfs"]),
    ("hfsplus", &["hfsplus"]),
    ("hfs", &["hfs"]),
    ("btrfs", &["btrfs"]),
    ("xfs", &["xfs"]),
    ("nilfs2", &["nilfs2"]),
    ("minix", &["minix"]),
    ("squashfs", &["squashfs"]),
    ("erofs", &["erofs"]),
    ("nls_cp437", &[]),
    ("nls_iso8859-1", &[]),
    ("nls_utf8", &[]),
    ("nls_ascii", &[]),
];

/// The modules to ship, in load order, and the file system types they make available.
#[derive(Debug, Default)]
pub struct ModuleSet {
    /// Module files, relative to the modules directory, dependencies first.
    pub files: Vec<PathBuf>,
    /// File system types the appliance's kernel will know.
    pub filesystems: Vec<String>,
    /// Wanted modules this kernel has neither as a file nor built in.
    pub missing: Vec<String>,
}

/// Resolves the modules for kernel `release` under `modules_dir` (…/lib/modules/RELEASE).
pub fn resolve(modules_dir: &Path, release: &str) -> Result<ModuleSet, VmError> {
    let root = modules_root(modules_dir, release)?;
    let mut set = ModuleSet::default();
    let wanted = DRIVERS
        .iter()
        .map(|m| (*m, &[][..]))
        .chain(CRYPTO.iter().map(|m| (*m, &[][..])))
        .chain(FILESYSTEMS.iter().copied());
    for (module, types) in wanted {
        let out = Command::new("modprobe")
            .arg("-d")
            .arg(&root)
            .args(["-S", release, "--show-depends", module])
            .output()
            .map_err(|source| VmError::Tool {
                tool: "modprobe (Debian package kmod)",
                source,
            })?;
        if !out.status.success() {
            set.missing.push(module.to_string());
            continue;
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("insmod") {
                continue; // "builtin NAME": nothing to ship
            }
            let Some(path) = words.next() else { continue };
            let rel = Path::new(path)
                .strip_prefix(modules_dir)
                .map(Path::to_path_buf)
                .map_err(|_| VmError::Modules {
                    dir: modules_dir.to_path_buf(),
                    why: format!("modprobe named {path}, outside the modules directory"),
                })?;
            if !set.files.contains(&rel) {
                set.files.push(rel);
            }
        }
        set.filesystems.extend(types.iter().map(|t| t.to_string()));
    }
    Ok(set)
}

/// The directory `modprobe -d` wants: the one holding `lib/modules/RELEASE`.
fn modules_root(modules_dir: &Path, release: &str) -> Result<PathBuf, VmError> {
    let bad = |why: &str| VmError::Modules {
        dir: modules_dir.to_path_buf(),
        why: why.into(),
    };
    if modules_dir.file_name().and_then(|n| n.to_str()) != Some(release) {
        return Err(bad(&format!(
            "the modules directory must be named after the kernel release {release}"
        )));
    }
    if !modules_dir.join("modules.dep").is_file() {
        return Err(bad("no modules.dep in it (run depmod for that kernel)"));
    }
    let lib_modules = modules_dir.parent().ok_or_else(|| bad("no parent"))?;
    if !lib_modules.ends_with("lib/modules") {
        return Err(bad("it must be a …/lib/modules/RELEASE directory"));
    }
    Ok(lib_modules
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| bad("no root above lib/modules"))?
        .to_path_buf())
}
