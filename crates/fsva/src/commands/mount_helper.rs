//! `mount.fuse.fsva SOURCE MOUNTPOINT [-o OPTIONS]`: the helper mount(8) runs for
//! `mount -t fuse.fsva` and /etc/fstab lines. SOURCE is a backend spec (`mem`,
//! `passthrough:DIR`); it translates the call into `fsva mount` and returns once the
//! mount is live.

use std::ffi::OsString;
use std::process::ExitCode;

use std::path::Path;

use anyhow::Context as _;
use clap::Parser;
use rustix::mount::MountFlags;

use crate::cli::Cli;

pub fn run(args: Vec<OsString>) -> anyhow::Result<ExitCode> {
    let mut positional = Vec::new();
    let mut options: Vec<String> = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "-o" {
            let o = it
                .next()
                .ok_or_else(|| anyhow::anyhow!("-o needs a value"))?;
            options.extend(o.to_string_lossy().split(',').map(str::to_string));
        } else if a.to_string_lossy().starts_with('-') {
            // -n (no mtab), -s (sloppy), -v: accepted and ignored, as mount.fuse does.
        } else {
            positional.push(a);
        }
    }
    let [source, mountpoint] = positional.as_slice() else {
        anyhow::bail!("usage: mount.fuse.fsva SOURCE MOUNTPOINT [-o OPTIONS] (SOURCE: mem or passthrough:DIR)");
    };
    if options.iter().any(|o| o == "remount") {
        return remount(Path::new(mountpoint), &options);
    }
    // `fsva:mem` is how /proc/mounts shows the source; accept it back.
    let source = source
        .to_str()
        .and_then(|s| s.strip_prefix("fsva:"))
        .map(OsString::from)
        .unwrap_or_else(|| source.clone());
    let mut argv: Vec<OsString> = vec!["fsva".into(), "mount".into(), "--backend".into(), source];
    let mut known = Vec::new();
    for o in options {
        match o.split_once('=') {
            Some(("channel", v)) => argv.extend(["--channel".into(), v.into()]),
            Some(("sandbox", v)) => argv.extend(["--sandbox".into(), v.into()]),
            Some(("workers", v)) => argv.extend(["--workers".into(), v.into()]),
            _ => known.push(o),
        }
    }
    if !known.is_empty() {
        argv.push("-o".into());
        argv.push(known.join(",").into());
    }
    argv.push(mountpoint.clone());
    let cli = Cli::parse_from(argv);
    crate::commands::run(cli)
}

/// `mount -o remount,...`: changes the mount's flags in place (the appliance keeps
/// serving; a read-only remount makes the kernel refuse writes with EROFS).
fn remount(mountpoint: &Path, options: &[String]) -> anyhow::Result<ExitCode> {
    let mut flags = MountFlags::NOSUID | MountFlags::NODEV;
    for o in options {
        match o.as_str() {
            "ro" => flags |= MountFlags::RDONLY,
            "rw" => flags.remove(MountFlags::RDONLY),
            "suid" => flags.remove(MountFlags::NOSUID),
            "dev" => flags.remove(MountFlags::NODEV),
            _ => {}
        }
    }
    rustix::mount::mount_remount(mountpoint, flags, "")
        .with_context(|| format!("remounting {}", mountpoint.display()))?;
    Ok(ExitCode::SUCCESS)
}
