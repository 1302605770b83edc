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

/// File system modules an appliance offers, with the types each registers and the
/// character-set modules its names may need.
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
];

/// Character sets for names: loaded with every file system (they are small).
pub const CHARSETS: &[&str] = &["nls_cp437", "nls_iso8859-1", "nls_utf8", "nls_ascii"];

/// The modules to ship: what every boot loads, and what each file system type adds.
#[derive(Debug, Default)]
pub struct ModuleSet {
    /// Every module file, relative to the modules directory, each once.
    pub files: Vec<PathBuf>,
    /// Loaded at every boot (the virtio drivers), dependencies first.
    pub base: Vec<PathBuf>,
    /// For each file system type: the modules to load before mounting it, in order.
    pub per_type: Vec<(String, Vec<PathBuf>)>,
    /// Wanted modules this kernel has neither as a file nor built in.
    pub missing: Vec<String>,
}

impl ModuleSet {
    /// The file system types the appliance's kernel will know.
    pub fn filesystems(&self) -> Vec<String> {
        self.per_type.iter().map(|(t, _)| t.clone()).collect()
    }
}

/// Resolves the modules for kernel `release` under `modules_dir` (…/lib/modules/RELEASE).
pub fn resolve(modules_dir: &Path, release: &str) -> Result<ModuleSet, VmError> {
    let root = modules_root(modules_dir, release)?;
    let closure = |module: &str| closure(&root, modules_dir, release, module);
    let mut set = ModuleSet::default();
    for m in DRIVERS {
        match closure(m)? {
            Some(files) => set.base.extend(files),
            None => set.missing.push(m.to_string()),
        }
    }
    let mut common = Vec::new();
    for m in CRYPTO.iter().chain(CHARSETS) {
        match closure(m)? {
            Some(files) => common.extend(files),
            None => set.missing.push(m.to_string()),
        }
    }
    for (module, types) in FILESYSTEMS {
        let Some(files) = closure(module)? else {
            set.missing.push(module.to_string());
            continue;
        };
        let mut list = common.clone();
        list.extend(files);
        dedup(&mut list);
        for t in *types {
            set.per_type.push((t.to_string(), list.clone()));
        }
    }
    dedup(&mut set.base);
    let mut all = set.base.clone();
    for (_, list) in &set.per_type {
        all.extend(list.iter().cloned());
    }
    dedup(&mut all);
    set.files = all;
    Ok(set)
}

fn dedup(list: &mut Vec<PathBuf>) {
    let mut seen = std::collections::HashSet::new();
    list.retain(|p| seen.insert(p.clone()));
}

/// `module`'s files in load order (dependencies and soft dependencies first), or `None`
/// if this kernel has no such module.
fn closure(
    root: &Path,
    modules_dir: &Path,
    release: &str,
    module: &str,
) -> Result<Option<Vec<PathBuf>>, VmError> {
    let out = Command::new("modprobe")
        .arg("-d")
        .arg(root)
        .args(["-S", release, "--show-depends", module])
        .output()
        .map_err(|source| VmError::Tool {
            tool: "modprobe (Debian package kmod)",
            source,
        })?;
    if !out.status.success() {
        return Ok(None);
    }
    let mut files = Vec::new();
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
        files.push(rel);
    }
    Ok(Some(files))
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
