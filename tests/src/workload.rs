//! Workloads that check themselves, for tests that replace or kill appliances under
//! load: each writer owns a directory, keeps a model of what it must hold, and panics
//! with the operation and the difference at the first error or mismatch. This module
//! only drives the mount through ordinary system calls; it never talks to fsva.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// A small, seedable generator (xorshift64*): enough to vary operations and sizes.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Seeded from the clock (tests print it, so a failure can be replayed).
    pub fn from_clock() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng::new(t)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }
}

/// What one writer did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Done {
    pub ops: usize,
    /// Appends acknowledged (each a unique line), of which fsync'd.
    pub appends: usize,
    pub fsyncs: usize,
}

/// One writer's loop in `dir` until `stop`: appends (some fsync'd), whole-file
/// rewrites, renames over other files, unlinks, directory creation and removal, and
/// reads checked against the model. At the end the directory must equal the model.
/// Panics at the first error or mismatch.
pub fn writer(dir: &Path, seed: u64, stop: &AtomicBool) -> Done {
    let mut rng = Rng::new(seed);
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut dirs: BTreeSet<String> = BTreeSet::new();
    let mut done = Done::default();
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let name = format!("f{}", rng.range(0, 16));
        let path = dir.join(&name);
        match rng.range(0, 10) {
            0..=2 => {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&path)
                    .unwrap_or_else(|e| panic!("open {name} to append: {e}"));
                // Unique, so a duplicated or lost append shows in the content.
                let line = format!("{seed}:{i}\n");
                f.write_all(line.as_bytes())
                    .unwrap_or_else(|e| panic!("append to {name}: {e}"));
                if i.is_multiple_of(3) {
                    f.sync_all().unwrap_or_else(|e| panic!("fsync {name}: {e}"));
                    done.fsyncs += 1;
                }
                files.entry(name).or_default().extend(line.as_bytes());
                done.appends += 1;
            }
            3 => {
                let len = rng.range(0, 9000) as usize;
                let data: Vec<u8> = (0..len).map(|k| (k as u64 ^ i) as u8).collect();
                std::fs::write(&path, &data).unwrap_or_else(|e| panic!("rewrite {name}: {e}"));
                files.insert(name, data);
            }
            4 => {
                let to = format!("f{}", rng.range(0, 16));
                if to != name {
                    if let Some(data) = files.remove(&name) {
                        std::fs::rename(&path, dir.join(&to))
                            .unwrap_or_else(|e| panic!("rename {name} -> {to}: {e}"));
                        files.insert(to, data);
                    }
                }
            }
            5 => {
                if files.remove(&name).is_some() {
                    std::fs::remove_file(&path).unwrap_or_else(|e| panic!("unlink {name}: {e}"));
                }
            }
            6 => {
                let d = format!("d{}", rng.range(0, 4));
                if dirs.remove(&d) {
                    std::fs::remove_dir(dir.join(&d)).unwrap_or_else(|e| panic!("rmdir {d}: {e}"));
                } else {
                    std::fs::create_dir(dir.join(&d)).unwrap_or_else(|e| panic!("mkdir {d}: {e}"));
                    dirs.insert(d);
                }
            }
            _ => match (std::fs::read(&path), files.get(&name)) {
                (Ok(got), Some(want)) => {
                    assert!(
                        got == *want,
                        "{name} differs from the model ({} bytes read, {} expected)",
                        got.len(),
                        want.len()
                    )
                }
                (Err(e), None) if e.kind() == std::io::ErrorKind::NotFound => {}
                (got, want) => panic!(
                    "{name}: read {:?}, model {:?}",
                    got.map(|g| g.len()),
                    want.map(Vec::len)
                ),
            },
        }
        done.ops += 1;
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    on_disk.sort();
    let mut want: Vec<String> = files.keys().chain(dirs.iter()).cloned().collect();
    want.sort();
    assert_eq!(on_disk, want, "the directory differs from the model");
    for (name, data) in &files {
        let got = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"));
        assert!(got == *data, "{name} differs from the model at the end");
    }
    done
}
