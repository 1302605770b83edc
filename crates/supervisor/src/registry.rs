//! Per-mount runtime files: where a mount's supervisor listens and what `fsva status`
//! and `fsva umount` can learn about a mount whose supervisor is gone.
//!
//! Layout: `$FSVA_RUNTIME_DIR` (default `/run/fsva` for root, `$XDG_RUNTIME_DIR/fsva`
//! otherwise) holds, per mount, `<id>.sock` (the admin socket) and `<id>.mount` (the
//! mount point and process ids, one `key=value` per line). `<id>` is derived from the
//! canonical mount point. This module only names and reads/writes those files.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The directory holding all mounts' runtime files.
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FSVA_RUNTIME_DIR") {
        return PathBuf::from(dir);
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/run/fsva");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("fsva"),
        None => std::env::temp_dir().join(format!("fsva-{}", rustix::process::geteuid().as_raw())),
    }
}

/// A stable identifier for a mount point (FNV-1a of its canonical path).
pub fn mount_id(mountpoint: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut h: u64 = 0xcbf29ce484222325;
    for b in mountpoint.as_os_str().as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// The runtime files of one mount.
#[derive(Debug, Clone)]
pub struct Entry {
    pub socket: PathBuf,
    pub record: PathBuf,
    pub log: PathBuf,
}

impl Entry {
    pub fn for_mount(mountpoint: &Path) -> Entry {
        let dir = runtime_dir();
        let id = mount_id(mountpoint);
        Entry {
            socket: dir.join(format!("{id}.sock")),
            record: dir.join(format!("{id}.mount")),
            log: dir.join(format!("{id}.log")),
        }
    }

    /// Writes the record atomically.
    pub fn write_record(&self, fields: &[(&str, String)]) -> io::Result<()> {
        if let Some(dir) = self.record.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut text = String::new();
        for (k, v) in fields {
            text.push_str(k);
            text.push('=');
            text.push_str(v);
            text.push('\n');
        }
        let tmp = self.record.with_extension("mount.tmp");
        fs::write(&tmp, text)?;
        fs::rename(tmp, &self.record)
    }

    pub fn remove(&self) {
        let _ = fs::remove_file(&self.socket);
        let _ = fs::remove_file(&self.record);
    }
}

/// Reads a record written by [`Entry::write_record`].
pub fn read_record(path: &Path) -> io::Result<BTreeMap<String, String>> {
    let text = fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// Every mount record in the runtime directory.
pub fn all_records() -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(runtime_dir()) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "mount"))
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_ids_differ() {
        let dir = std::env::temp_dir().join(format!("fsva-reg-{}", std::process::id()));
        std::env::set_var("FSVA_RUNTIME_DIR", &dir);
        let e = Entry::for_mount(Path::new("/mnt/a"));
        e.write_record(&[("mountpoint", "/mnt/a".into()), ("pid", "7".into())])
            .unwrap();
        let r = read_record(&e.record).unwrap();
        assert_eq!(r["mountpoint"], "/mnt/a");
        assert_eq!(r["pid"], "7");
        assert_ne!(mount_id(Path::new("/mnt/a")), mount_id(Path::new("/mnt/b")));
        assert_eq!(all_records(), vec![e.record.clone()]);
        e.remove();
        let _ = fs::remove_dir_all(dir);
    }
}
