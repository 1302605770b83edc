//! `fsva-meta DIR [N] [M]`: the metadata micro-workload of the benchmarks, as one
//! small program that runs anywhere (on the host, and inside user VMs that have no
//! Python). Prints `{"op": microseconds per op, ...}` on one line.
//!
//! Ops (N files, default 2000; M mkdir/rmdir pairs, default 500):
//! - `create_write`: open(O_CREAT) + write 4 KiB + close, per file
//! - `stat_warm`: stat of each file, after one untimed warming pass
//! - `xattr_miss`: getxattr of an attribute no file has, once per file. FUSE caches
//!   no extended attributes, so on a FUSE target each call is one request to the
//!   server and back: this row is the per-request round-trip cost. Not so where the
//!   server once answered ENOSYS (it has no getxattr, as libfuse's passthrough_ll):
//!   the kernel then answers ENOTSUP itself and the row times the system call alone
//! - `readdir`: one full listing of the N-entry directory (median of 5), per listing
//! - `rename`: rename each file to a new name in the same directory
//! - `unlink`: unlink each file
//! - `mkdir_rmdir`: mkdir + rmdir of an empty directory, per pair

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn timed(count: usize, f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e6 / count as f64
}

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .map(|s| s.parse().expect("N and M are numbers"))
        .unwrap_or(default)
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: fsva-meta DIR [N] [M]");
    let (n, m) = (arg(2, 2000), arg(3, 500));
    let root = Path::new(&dir).join("meta");
    std::fs::create_dir(&root).expect("creating DIR/meta");
    let names: Vec<PathBuf> = (0..n).map(|i| root.join(format!("f{i:05}"))).collect();
    let renamed: Vec<PathBuf> = (0..n).map(|i| root.join(format!("g{i:05}"))).collect();
    let block = [b'x'; 4096];
    let mut res: Vec<(&str, f64)> = Vec::new();

    res.push((
        "create_write",
        timed(n, || {
            for p in &names {
                let mut f = std::fs::File::create(p).unwrap();
                f.write_all(&block).unwrap();
            }
        }),
    ));
    let stat_all = || {
        for p in &names {
            std::fs::metadata(p).unwrap();
        }
    };
    stat_all();
    res.push(("stat_warm", timed(n, stat_all)));
    res.push((
        "xattr_miss",
        timed(n, || {
            let mut buf = [0u8; 64];
            for p in &names {
                let r = rustix::fs::getxattr(p, "user.fsva-meta-absent", &mut buf[..]);
                // ENODATA is the answer; a file system without user xattrs says ENOTSUP
                // (the kernel itself, after a server answered ENOSYS once).
                assert!(
                    matches!(
                        r,
                        Err(rustix::io::Errno::NODATA | rustix::io::Errno::NOTSUP)
                    ),
                    "getxattr of an absent attribute on {}: {r:?}",
                    p.display()
                );
            }
        }),
    ));
    let mut listings: Vec<f64> = (0..5)
        .map(|_| {
            timed(1, || {
                let c = std::fs::read_dir(&root).unwrap().count();
                assert_eq!(c, n);
            })
        })
        .collect();
    listings.sort_by(f64::total_cmp);
    res.push(("readdir", listings[2]));
    res.push((
        "rename",
        timed(n, || {
            for (a, b) in names.iter().zip(&renamed) {
                std::fs::rename(a, b).unwrap();
            }
        }),
    ));
    res.push((
        "unlink",
        timed(n, || {
            for p in &renamed {
                std::fs::remove_file(p).unwrap();
            }
        }),
    ));
    res.push((
        "mkdir_rmdir",
        timed(m, || {
            for i in 0..m {
                let d = root.join(format!("d{i:04}"));
                std::fs::create_dir(&d).unwrap();
                std::fs::remove_dir(&d).unwrap();
            }
        }),
    ));
    std::fs::remove_dir(&root).unwrap();
    let body: Vec<String> = res
        .iter()
        .map(|(k, v)| format!("\"{k}\": {v:.3}"))
        .collect();
    println!("{{{}}}", body.join(", "));
}
