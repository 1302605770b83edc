//! Assembling an appliance and finding it again.
//!
//! An appliance is a directory: `vmlinuz` (a copy of the kernel), `initrd.cpio` (an
//! uncompressed `newc` archive: `/init` is the static `fsva-vm-init`, then the modules,
//! the drivers every boot loads in `/etc/fsva/modules.load`, and for each file system
//! type the modules to load before mounting it in `/etc/fsva/fs/TYPE`) and `manifest` (`key=value` lines:
//! what it holds and what it was built from, so a changed runtime or kernel is noticed).
//! The archive is left uncompressed: under TCG, decompressing costs more boot time than
//! QEMU copying a few more megabytes. This module never boots anything.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::cpio::CpioWriter;
use crate::{modules, VmError};

/// Bumped when the layout of an appliance changes.
const BUNDLE_FORMAT: &str = "2";

/// What to build an appliance from.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The kernel; `None` picks the newest /boot/vmlinuz-*.
    pub kernel: Option<PathBuf>,
    /// Its modules directory (…/lib/modules/RELEASE); `None` derives it from the kernel.
    pub modules: Option<PathBuf>,
    /// The static appliance runtime to run as `/init`.
    pub init: PathBuf,
}

/// What an appliance holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub kernel_release: String,
    pub kernel_source: PathBuf,
    pub init_source: PathBuf,
    /// Size and modification time of the runtime it was built from.
    pub init_id: String,
    pub filesystems: Vec<String>,
    pub modules: usize,
    pub initrd_bytes: u64,
}

/// A built appliance.
#[derive(Debug, Clone)]
pub struct Appliance {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Appliance {
    /// The kernel QEMU loads: the uncompressed ELF `vmlinux` (booted through its PVH
    /// entry point, skipping the decompressor, which is slow under TCG) when it could be
    /// extracted, the compressed `vmlinuz` otherwise.
    pub fn kernel(&self) -> PathBuf {
        let elf = self.dir.join("vmlinux");
        if elf.is_file() {
            elf
        } else {
            self.dir.join("vmlinuz")
        }
    }

    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.cpio")
    }

    /// Loads the appliance cached in `dir`.
    pub fn load(dir: &Path) -> Result<Appliance, VmError> {
        let text = std::fs::read_to_string(dir.join("manifest"))
            .map_err(|_| VmError::BadBundle(dir.to_path_buf()))?;
        let manifest =
            Manifest::parse(&text).ok_or_else(|| VmError::BadBundle(dir.to_path_buf()))?;
        let a = Appliance {
            dir: dir.to_path_buf(),
            manifest,
        };
        if !a.kernel().is_file() || !a.initrd().is_file() {
            return Err(VmError::BadBundle(dir.to_path_buf()));
        }
        Ok(a)
    }

    /// Whether this appliance was built from `opts` as they are now.
    pub fn is_current(&self, opts: &BuildOptions) -> bool {
        let kernel = match &opts.kernel {
            Some(k) => k.clone(),
            None => match newest_kernel() {
                Ok(k) => k,
                Err(_) => return false,
            },
        };
        self.manifest.kernel_source == kernel
            && self.manifest.init_source == opts.init
            && init_id(&opts.init).ok().as_deref() == Some(&*self.manifest.init_id)
    }
}

impl Manifest {
    fn render(&self) -> String {
        format!(
            "format={BUNDLE_FORMAT}\nkernel_release={}\nkernel_source={}\ninit_source={}\ninit_id={}\nfilesystems={}\nmodules={}\ninitrd_bytes={}\n",
            self.kernel_release,
            self.kernel_source.display(),
            self.init_source.display(),
            self.init_id,
            self.filesystems.join(","),
            self.modules,
            self.initrd_bytes
        )
    }

    fn parse(text: &str) -> Option<Manifest> {
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_string)
        };
        if get("format")? != BUNDLE_FORMAT {
            return None;
        }
        Some(Manifest {
            kernel_release: get("kernel_release")?,
            kernel_source: get("kernel_source")?.into(),
            init_source: get("init_source")?.into(),
            init_id: get("init_id")?,
            filesystems: get("filesystems")?
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            modules: get("modules")?.parse().ok()?,
            initrd_bytes: get("initrd_bytes")?.parse().ok()?,
        })
    }
}

/// The newest Debian kernel in /boot.
pub fn newest_kernel() -> Result<PathBuf, VmError> {
    let mut found: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir("/boot")
        .map_err(|_| VmError::NoKernel)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let release = name.strip_prefix("vmlinuz-")?;
            let key = release
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse().ok())
                .collect();
            Some((key, e.path()))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).ok_or(VmError::NoKernel)
}

fn init_id(init: &Path) -> Result<String, VmError> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(init).map_err(|e| VmError::Init {
        path: init.to_path_buf(),
        why: format!("cannot be read ({e})"),
    })?;
    Ok(format!("{}-{}.{}", md.size(), md.mtime(), md.mtime_nsec()))
}

/// Whether `bytes` is an x86-64 ELF executable without a program interpreter (static).
fn check_static_elf(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return Err("is not a 64-bit little-endian ELF file".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[o..o + 8]);
        u64::from_le_bytes(b) as usize
    };
    if u16_at(18) != 62 {
        return Err("is not an x86-64 executable".into());
    }
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > bytes.len() {
            return Err("has truncated program headers".into());
        }
        if u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) == 3 {
            return Err("is dynamically linked (it has a program interpreter)".into());
        }
    }
    Ok(())
}

/// Extracts the ELF kernel from a bzImage compressed with xz or zstd, with the
/// decompressors Debian ships (xz-utils, zstd), keeping it only if it is an ELF file.
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<(), String> {
    let image = std::fs::read(bzimage).map_err(|e| e.to_string())?;
    let find = |magic: &[u8]| image.windows(magic.len()).position(|w| w == magic);
    let (tool, args, start): (&str, &[&str], usize) = if let Some(at) = find(b"\xfd7zXZ\x00") {
        ("xz", &["-dc", "--single-stream"], at)
    } else if let Some(at) = find(b"\x28\xb5\x2f\xfd") {
        ("zstd", &["-dcq"], at)
    } else {
        return Err("no xz or zstd payload in the kernel image".into());
    };
    let file = std::fs::File::create(out).map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(tool)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("{tool}: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let payload = image[start..].to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        // The tool may stop reading at the end of its stream: a broken pipe is fine.
        let _ = stdin.write_all(&payload);
    });
    let status = child.wait().map_err(|e| e.to_string())?;
    let _ = writer.join();
    let mut head = [0u8; 4];
    let elf = std::fs::File::open(out)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && head == *b"\x7fELF";
    if elf && (status.success() || tool == "zstd") {
        Ok(())
    } else {
        Err(format!("{tool} did not produce an ELF kernel"))
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, VmError> {
    let mut data = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(VmError::file(what, path))?;
    Ok(data)
}

/// Builds an appliance from `opts` into `dir` (replacing what was there), reporting each
/// step to `progress`.
pub fn build(
    opts: &BuildOptions,
    dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Appliance, VmError> {
    let kernel = match &opts.kernel {
        Some(k) => k.clone(),
        None => newest_kernel()?,
    };
    if let Err(e) = std::fs::metadata(&kernel) {
        return Err(VmError::File {
            what: "reading the appliance kernel",
            path: kernel,
            source: e,
        });
    }
    let release = match &opts.modules {
        Some(m) => m.file_name().and_then(|n| n.to_str()).map(str::to_string),
        None => kernel
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .map(str::to_string),
    }
    .ok_or_else(|| VmError::KernelRelease(kernel.clone()))?;
    let modules_dir = opts
        .modules
        .clone()
        .unwrap_or_else(|| PathBuf::from("/lib/modules").join(&release));

    progress(&format!("checking the runtime {}", opts.init.display()));
    let init = read_file("reading the appliance runtime", &opts.init)?;
    check_static_elf(&init).map_err(|why| VmError::Init {
        path: opts.init.clone(),
        why,
    })?;

    progress(&format!("resolving kernel modules for {release}"));
    let set = modules::resolve(&modules_dir, &release)?;
    if !set.missing.is_empty() {
        tracing::info!(missing = ?set.missing, "modules this kernel does not have");
    }

    std::fs::create_dir_all(dir).map_err(VmError::file("creating", dir))?;
    let tmp = dir.join("initrd.cpio.tmp");
    let out = std::fs::File::create(&tmp).map_err(VmError::file("creating", &tmp))?;
    let mut cpio = CpioWriter::new(std::io::BufWriter::new(out));
    let write_err = VmError::file("writing", &tmp);
    let result = (|| -> std::io::Result<()> {
        for d in [
            "dev",
            "proc",
            "sys",
            "export",
            "etc",
            "etc/fsva",
            "lib",
            "lib/modules",
        ] {
            cpio.dir(d, 0o755)?;
        }
        cpio.file("init", 0o755, &init)?;
        let mut made = std::collections::BTreeSet::new();
        let in_initrd = |rel: &Path| Path::new("lib/modules").join(&release).join(rel);
        for (i, rel) in set.files.iter().enumerate() {
            if i % 10 == 0 {
                progress(&format!("adding modules {}/{}", i, set.files.len()));
            }
            let target = in_initrd(rel);
            let parents: Vec<&Path> = target.ancestors().skip(1).collect();
            for anc in parents.into_iter().rev() {
                if anc.components().count() > 2 && made.insert(anc.to_path_buf()) {
                    cpio.dir(&anc.to_string_lossy(), 0o755)?;
                }
            }
            let data = std::fs::read(modules_dir.join(rel))?;
            cpio.file(&target.to_string_lossy(), 0o644, &data)?;
        }
        let list = |files: &[PathBuf]| {
            files
                .iter()
                .map(|rel| format!("/{}\n", in_initrd(rel).display()))
                .collect::<String>()
        };
        cpio.file("etc/fsva/modules.load", 0o644, list(&set.base).as_bytes())?;
        cpio.dir("etc/fsva/fs", 0o755)?;
        for (fstype, files) in &set.per_type {
            cpio.file(
                &format!("etc/fsva/fs/{fstype}"),
                0o644,
                list(files).as_bytes(),
            )?;
        }
        cpio.finish()?;
        Ok(())
    })();
    result.map_err(write_err)?;
    std::fs::rename(&tmp, dir.join("initrd.cpio")).map_err(VmError::file("renaming", &tmp))?;
    progress("copying the kernel");
    std::fs::copy(&kernel, dir.join("vmlinuz"))
        .map_err(VmError::file("copying the kernel", &kernel))?;
    let _ = std::fs::remove_file(dir.join("vmlinux"));
    match extract_vmlinux(&dir.join("vmlinuz"), &dir.join("vmlinux")) {
        Ok(()) => progress("extracted the uncompressed kernel (boots without decompressing)"),
        Err(why) => {
            let _ = std::fs::remove_file(dir.join("vmlinux"));
            tracing::info!(%why, "booting the compressed kernel");
        }
    }
    let initrd_bytes = std::fs::metadata(dir.join("initrd.cpio"))
        .map(|m| m.len())
        .unwrap_or(0);
    let manifest = Manifest {
        kernel_release: release,
        kernel_source: kernel,
        init_source: opts.init.clone(),
        init_id: init_id(&opts.init)?,
        filesystems: set.filesystems(),
        modules: set.files.len(),
        initrd_bytes,
    };
    let path = dir.join("manifest");
    std::fs::write(&path, manifest.render()).map_err(VmError::file("writing", &path))?;
    Ok(Appliance {
        dir: dir.to_path_buf(),
        manifest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_round_trip_and_other_formats_are_refused() {
        let m = Manifest {
            kernel_release: "6.1.0-56-amd64".into(),
            kernel_source: "/boot/vmlinuz-6.1.0-56-amd64".into(),
            init_source: "/usr/local/lib/fsva/fsva-vm-init".into(),
            init_id: "1-2.3".into(),
            filesystems: vec!["ext4".into(), "vfat".into()],
            modules: 40,
            initrd_bytes: 123,
        };
        assert_eq!(Manifest::parse(&m.render()), Some(m.clone()));
        assert_eq!(
            Manifest::parse(&m.render().replace("format=2", "format=1")),
            None
        );
        assert_eq!(Manifest::parse("kernel_release=x\n"), None);
    }

    #[test]
    fn only_static_x86_64_executables_are_accepted_as_the_runtime() {
        let dynamic = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let e = check_static_elf(&dynamic).unwrap_err();
        assert!(e.contains("dynamically linked"), "{e}");
        assert!(check_static_elf(b"#!/bin/sh\n").is_err());
        assert!(check_static_elf(&dynamic[..40]).is_err());
    }
}
