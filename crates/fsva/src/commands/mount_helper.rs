//! `mount.fuse.fsva SOURCE MOUNTPOINT [-o OPTIONS]`: the helper mount(8) runs for
//! `mount -t fuse.fsva` and /etc/fstab lines. SOURCE is a backend spec (`mem`,
//! `passthrough:DIR`); it translates the call into `fsva mount` and returns once the
//! mount is live.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

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
    let mut argv: Vec<OsString> = vec![
        "fsva".into(),
        "mount".into(),
        "--backend".into(),
        source.clone(),
    ];
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
