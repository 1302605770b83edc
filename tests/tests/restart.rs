//! Live restart (`fsva restart`): a mem or passthrough appliance is replaced by a new
//! process with its state — while files are open and a workload runs — and the
//! applications notice nothing: no error, no lost or doubled write, handles still
//! valid, a directory listing in progress goes on where it was.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fsva_tests::{fsva, wait_for, Mount};

fn restart(m: &Mount) -> String {
    let out = fsva(&["restart", m.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "fsva restart failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Open files, directory listings, links, xattrs and times survive three restarts,
/// with data both through FUSE passthrough (the default) and through the appliance.
#[test]
fn open_files_and_the_whole_tree_survive_restarts() {
    whole_tree_survives_restarts("mem");
}

/// The same for a passthrough export: its open files travel as the open files
/// themselves, so an unlinked one keeps its data too.
#[test]
fn open_files_and_the_whole_tree_survive_restarts_of_passthrough() {
    whole_tree_survives_restarts("passthrough");
}

fn whole_tree_survives_restarts(backend: &str) {
    for extra in [&[][..], &["--no-passthrough"][..]] {
        let m = Mount::new(backend, extra);
        let p = m.path();
        std::fs::create_dir(p.join("d")).unwrap();
        std::fs::write(p.join("d/a"), b"first").unwrap();
        std::fs::hard_link(p.join("d/a"), p.join("d/a2")).unwrap();
        std::os::unix::fs::symlink("a", p.join("d/l")).unwrap();
        let c = std::ffi::CString::new(p.join("d/a").to_str().unwrap()).unwrap();
        // SAFETY: valid NUL-terminated path and value buffers.
        let r =
            unsafe { libc::setxattr(c.as_ptr(), c"user.k".as_ptr(), b"v".as_ptr().cast(), 1, 0) };
        assert_eq!(r, 0, "setxattr");
        let mut held = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(p.join("held"))
            .unwrap();
        held.write_all(b"before ").unwrap();
        // An unlinked file kept open keeps its data.
        let mut orphan = std::fs::File::create(p.join("orphan")).unwrap();
        orphan.write_all(b"orphaned").unwrap();
        std::fs::remove_file(p.join("orphan")).unwrap();
        let before = std::fs::metadata(p.join("d/a")).unwrap();
        let (_, first_pid) = m.pids();

        let mut pids = vec![first_pid];
        for _ in 0..3 {
            let said = restart(&m);
            assert!(said.contains("restarted live"), "{said}");
            pids.push(m.pids().1);
        }
        pids.dedup();
        assert_eq!(
            pids.len(),
            4,
            "each restart brings a new appliance: {pids:?}"
        );

        held.write_all(b"after").unwrap();
        held.seek(SeekFrom::Start(0)).unwrap();
        let mut s = String::new();
        held.read_to_string(&mut s).unwrap();
        assert_eq!(s, "before after", "{extra:?}");
        orphan.seek(SeekFrom::Start(0)).unwrap();
        let mut o = Vec::new();
        std::fs::File::open(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&orphan)
        ))
        .unwrap()
        .read_to_end(&mut o)
        .unwrap();
        assert_eq!(o, b"orphaned");
        assert_eq!(std::fs::read(p.join("d/a2")).unwrap(), b"first");
        assert_eq!(std::fs::read_link(p.join("d/l")).unwrap(), Path::new("a"));
        let after = std::fs::metadata(p.join("d/a")).unwrap();
        assert_eq!(
            (
                after.ino(),
                after.nlink(),
                after.mtime(),
                after.mtime_nsec(),
                after.mode()
            ),
            (
                before.ino(),
                before.nlink(),
                before.mtime(),
                before.mtime_nsec(),
                before.mode()
            )
        );
        let mut v = [0u8; 8];
        // SAFETY: valid path and a writable buffer of the given size.
        let n = unsafe { libc::getxattr(c.as_ptr(), c"user.k".as_ptr(), v.as_mut_ptr().cast(), 8) };
        assert_eq!(&v[..n.max(0) as usize], b"v");
        let mut names: Vec<String> = std::fs::read_dir(p.join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "a2", "l"]);
        let status = String::from_utf8_lossy(&fsva(&["status"]).stdout).into_owned();
        assert!(status.contains("restarted live 3 time(s)"), "{status}");
        drop((held, orphan));
        m.unmount();
    }
}

/// Ten restarts while four writers create, append, rename, fsync and unlink: not one
/// error, and every file ends exactly as each writer's model says.
#[test]
fn a_workload_notices_nothing_across_ten_restarts() {
    workload_across_ten_restarts("mem", &[]);
}

#[test]
fn a_passthrough_workload_notices_nothing_across_ten_restarts() {
    workload_across_ten_restarts("passthrough", &[]);
}

#[test]
fn a_passthrough_workload_without_fuse_passthrough_notices_nothing_across_ten_restarts() {
    workload_across_ten_restarts("passthrough", &["--no-passthrough"]);
}

fn workload_across_ten_restarts(backend: &str, extra: &[&str]) {
    let m = Mount::new(backend, extra);
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let dir = m.path().join(format!("w{w}"));
        std::fs::create_dir(&dir).unwrap();
        let stop = stop.clone();
        workers.push(std::thread::spawn(move || {
            fsva_tests::workload::writer(&dir, w as u64 + 1, &stop).ops
        }));
    }
    for _ in 0..10 {
        std::thread::sleep(std::time::Duration::from_millis(150));
        restart(&m);
    }
    std::thread::sleep(std::time::Duration::from_millis(150));
    stop.store(true, Ordering::SeqCst);
    let mut ops = 0;
    for w in workers {
        ops += w.join().expect("a writer failed");
    }
    assert!(ops > 100, "the workload hardly ran ({ops} operations)");
    eprintln!("{backend} {extra:?}: {ops} operations across 10 restarts, no error");
    m.unmount();
}

#[test]
fn a_restart_that_cannot_be_done_is_refused_and_the_mount_serves_on() {
    let m = Mount::new("passthrough", &["--channel", "stream"]);
    std::fs::write(m.path().join("x"), b"1").unwrap();
    let out = fsva(&["restart", m.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fusedev channel"), "{err}");
    std::fs::write(m.path().join("y"), b"2").unwrap();
    assert_eq!(std::fs::read(m.path().join("x")).unwrap(), b"1");
    m.unmount();
}

/// The successor keeps the cache budget in force, not the one the mount began with.
#[test]
fn a_restart_keeps_the_budget_set_at_run_time() {
    let m = Mount::new("mem", &["--cache-budget", "64M"]);
    let mp = m.path().to_str().unwrap().to_string();
    assert!(fsva(&["cache", &mp, "8M"]).status.success());
    restart(&m);
    let big = vec![7u8; 12 << 20];
    let err = std::fs::write(m.path().join("big"), &big).expect_err("12 MiB fit an 8 MiB budget");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    std::fs::remove_file(m.path().join("big")).unwrap();
    // The kernel releases the closed file asynchronously: its space comes back once the
    // appliance has that RELEASE (and the FORGET), a moment after the unlink.
    assert!(
        wait_for(Duration::from_secs(10), || {
            match std::fs::write(m.path().join("small"), vec![1u8; 1 << 20]) {
                Ok(()) => true,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                    false
                }
            }
        }),
        "the space of a deleted 12 MiB file is still in use 10 s later"
    );
    m.unmount();
}

/// An unlinked file kept open keeps its data across restarts of a passthrough
/// appliance (the open file itself is handed over), on both data paths.
#[test]
fn an_unlinked_open_file_keeps_its_data_across_a_restart() {
    for extra in [&[][..], &["--no-passthrough"][..]] {
        let m = Mount::new("passthrough", extra);
        let path = m.path().join("orphan");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.write_all(b"kept ").unwrap();
        std::fs::remove_file(&path).unwrap();
        restart(&m);
        restart(&m);
        f.write_all(b"alive").unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "kept alive", "{extra:?}");
        assert_eq!(f.metadata().unwrap().nlink(), 0);
        assert!(!path.exists());
        drop(f);
        m.unmount();
    }
}

/// A directory listed a little at a time goes on after a restart where it was:
/// every entry exactly once, none skipped, none repeated.
#[test]
fn a_directory_listing_in_progress_continues_after_a_restart() {
    for backend in ["passthrough", "mem"] {
        let m = Mount::new(backend, &[]);
        let dir = m.path().join("many");
        std::fs::create_dir(&dir).unwrap();
        let mut want: Vec<String> = (0..1500)
            .map(|i| format!("an-entry-with-a-name-long-enough-to-fill-pages-{i:05}"))
            .collect();
        for n in &want {
            std::fs::write(dir.join(n), b"").unwrap();
        }
        want.extend([".".to_string(), "..".to_string()]);
        want.sort();
        let d = std::fs::File::open(&dir).unwrap();
        let mut names = Vec::new();
        for _ in 0..3 {
            names.extend(getdents(&d));
        }
        assert!(!names.is_empty() && names.len() < 200, "{}", names.len());
        restart(&m);
        loop {
            let got = getdents(&d);
            if got.is_empty() {
                break;
            }
            names.extend(got);
        }
        let total = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), total, "{backend}: an entry was listed twice");
        assert_eq!(names, want, "{backend}: every entry once");
        drop(d);
        m.unmount();
    }
}

/// One `getdents64` of at most 2 KiB on `dir`: the names it returned.
fn getdents(dir: &std::fs::File) -> Vec<String> {
    let mut buf = vec![0u64; 256];
    // SAFETY: `buf` is writable for the 2 KiB passed.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            std::os::fd::AsRawFd::as_raw_fd(dir),
            buf.as_mut_ptr(),
            2048usize,
        )
    };
    assert!(n >= 0, "getdents64: {}", std::io::Error::last_os_error());
    // SAFETY: the kernel initialised the first `n` bytes.
    let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize) };
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let reclen = u16::from_ne_bytes([bytes[pos + 16], bytes[pos + 17]]) as usize;
        let name = &bytes[pos + 19..pos + reclen];
        let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        out.push(String::from_utf8(name[..len].to_vec()).unwrap());
        pos += reclen;
    }
    out
}
