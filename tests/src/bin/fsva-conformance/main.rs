//! `fsva-conformance`: a POSIX conformance probe.
//!
//! It runs a fixed list of checks against a directory and prints a canonical,
//! deterministic transcript of the observed behaviour, one `name: observation` line per
//! check. Running it on native ext4 and on an fsva FUSE mount and diffing the two
//! transcripts shows where fsva deviates. Observations never contain absolute times,
//! inode/device numbers, exact block counts or directory order.
//!
//! Usage: `fsva-conformance --dir DIR [--as-uid UID --as-gid GID] [--only PREFIX] [--list]`

mod acl;
mod check;
mod data;
mod dirs;
mod files;
mod links;
mod locks;
mod mmap;
mod nodes;
mod owner;
mod perms;
mod proc;
mod rename;
mod sys;
mod times;
mod xattr;

use std::path::PathBuf;
use std::process::exit;

use check::Check;

const USAGE: &str =
    "usage: fsva-conformance --dir DIR [--as-uid UID --as-gid GID] [--only PREFIX] [--list]";

/// All check tables, in transcript order.
fn all_checks() -> Vec<&'static Check> {
    [
        files::CHECKS,
        dirs::CHECKS,
        links::CHECKS,
        rename::CHECKS,
        perms::CHECKS,
        owner::CHECKS,
        times::CHECKS,
        data::CHECKS,
        nodes::CHECKS,
        xattr::CHECKS,
        acl::CHECKS,
        locks::CHECKS,
        mmap::CHECKS,
    ]
    .into_iter()
    .flatten()
    .collect()
}

struct Args {
    dir: Option<PathBuf>,
    uid: Option<u32>,
    gid: Option<u32>,
    only: Option<String>,
    list: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        dir: None,
        uid: None,
        gid: None,
        only: None,
        list: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |what: &str| it.next().ok_or_else(|| format!("{what} needs a value"));
        match arg.as_str() {
            "--dir" => a.dir = Some(PathBuf::from(value("--dir")?)),
            "--as-uid" => a.uid = Some(value("--as-uid")?.parse().map_err(|_| "bad --as-uid")?),
            "--as-gid" => a.gid = Some(value("--as-gid")?.parse().map_err(|_| "bad --as-gid")?),
            "--only" => a.only = Some(value("--only")?),
            "--list" => a.list = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.uid.is_some() != a.gid.is_some() {
        return Err("--as-uid and --as-gid go together".to_string());
    }
    if a.dir.is_none() && !a.list {
        return Err("--dir is required".to_string());
    }
    Ok(a)
}

fn fail(msg: &str) -> ! {
    eprintln!("fsva-conformance: {msg}");
    exit(2);
}

/// Verifies that `dir` is a directory the (possibly dropped) identity can write into.
fn check_target(dir: &std::path::Path) -> Result<(), String> {
    let st = sys::stat(dir).map_err(|e| format!("cannot stat {}: {e}", dir.display()))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let probe = dir.join(".fsva-conformance-probe");
    check::remove_tree(&probe);
    sys::mkdir(&probe, 0o700).map_err(|e| {
        format!(
            "{} is not writable by uid {} gid {}: mkdir {e}",
            dir.display(),
            sys::geteuid(),
            sys::getegid()
        )
    })?;
    check::remove_tree(&probe);
    Ok(())
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| fail(&format!("{e}\n{USAGE}")));
    let mut checks = all_checks();
    if let Some(prefix) = &args.only {
        checks.retain(|c| c.name.starts_with(prefix.as_str()));
    }
    if args.list {
        for c in &checks {
            println!("{}", c.name);
        }
        return;
    }
    let dir = args.dir.expect("checked by parse_args");
    if let (Some(uid), Some(gid)) = (args.uid, args.gid) {
        proc::become_user(uid, gid)
            .unwrap_or_else(|e| fail(&format!("cannot drop privileges to {uid}:{gid}: {e}")));
    }
    check_target(&dir).unwrap_or_else(|e| fail(&e));
    check::install_panic_hook();
    check::run_all(&dir, &checks);
}
