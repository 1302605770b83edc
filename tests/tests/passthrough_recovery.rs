//! Crash recovery of passthrough appliances: the appliance is killed with SIGKILL at
//! random moments while several threads create, rename, unlink and append (with and
//! without fsync), on both data paths; the applications see no error, every file ends
//! as each writer's model says, and no append is lost or written twice. An object
//! deleted in the export behind the appliance's back answers ESTALE after a crash,
//! and the other files carry on.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fsva_tests::{fsva, wait_for, Mount};

/// Kills the mount's appliance with SIGKILL and waits until a successor serves.
fn crash(m: &Mount) -> u32 {
    let (_, pid) = m.pids();
    let pid = pid.expect("an appliance serves the mount");
    // SAFETY: plain kill(2) of the appliance process the mount's record names.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    assert!(
        wait_for(Duration::from_secs(30), || m
            .pids()
            .1
            .is_some_and(|p| p != pid)),
        "no successor took over from appliance {pid}"
    );
    pid
}

/// A small xorshift generator: random enough for kill moments and choices.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Rng(t | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Thirty-odd kills at random moments under four writers, with FUSE passthrough.
#[test]
fn a_workload_notices_nothing_across_thirty_crashes() {
    workload_across_crashes(&[], 32);
}

/// The same with every byte going through the appliance (appends included).
#[test]
fn a_workload_without_fuse_passthrough_notices_nothing_across_thirty_crashes() {
    workload_across_crashes(&["--no-passthrough"], 32);
}

fn workload_across_crashes(extra: &[&str], kills: usize) {
    let m = Mount::new("passthrough", extra);
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let dir = m.path().join(format!("w{w}"));
        std::fs::create_dir(&dir).unwrap();
        let stop = stop.clone();
        workers.push(std::thread::spawn(move || writer(&dir, w, &stop)));
    }
    let mut rng = Rng::seeded();
    let t0 = Instant::now();
    let mut killed = Vec::new();
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(30 + rng.below(170)));
        killed.push(crash(&m));
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let mut ops = 0;
    for w in workers {
        ops += w.join().expect("a writer saw an error or a mismatch");
    }
    killed.dedup();
    assert_eq!(killed.len(), kills, "each kill hit a new appliance");
    assert!(ops > 200, "the workload hardly ran ({ops} operations)");
    let status = String::from_utf8_lossy(&fsva(&["status"]).stdout).into_owned();
    let line = status
        .lines()
        .skip_while(|l| !l.starts_with(m.path().to_str().unwrap()))
        .take(3)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        line.contains(&format!("recovered after {kills} appliance crash(es)")),
        "{line}"
    );
    assert!(!line.contains("state was lost"), "{line}");
    eprintln!(
        "passthrough {extra:?}: {ops} operations across {kills} crashes in {:.1} s, no error",
        t0.elapsed().as_secs_f64()
    );
    m.unmount();
}

/// One writer's loop; panics on the first error or mismatch. Returns operations done.
///
/// It keeps one file open for appending the whole time (an open file survives every
/// crash), and otherwise creates files exclusively, appends to them (fsync'd every
/// third time), renames, unlinks, makes and removes directories, and reads back.
fn writer(dir: &Path, w: usize, stop: &AtomicBool) -> usize {
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let journal_path = dir.join("journal");
    let mut journal = std::fs::OpenOptions::new()
        .append(true)
        .create_new(true)
        .read(true)
        .open(&journal_path)
        .unwrap_or_else(|e| panic!("w{w}: create journal: {e}"));
    let mut journal_model = Vec::new();
    let mut ops = 0usize;
    let mut i = 0u64;
    let mut serial = 0u64;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let name = format!("f{}", i % 12);
        let path = dir.join(&name);
        let line = format!("w{w} op {i}\n");
        match i % 8 {
            0 | 1 => {
                // Append to a file, creating it if need be.
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&path)
                    .unwrap_or_else(|e| panic!("w{w}: open {name}: {e}"));
                f.write_all(line.as_bytes())
                    .unwrap_or_else(|e| panic!("w{w}: append {name}: {e}"));
                if i.is_multiple_of(3) {
                    f.sync_all()
                        .unwrap_or_else(|e| panic!("w{w}: fsync {name}: {e}"));
                }
                model.entry(name).or_default().extend(line.as_bytes());
            }
            2 => {
                // An exclusive create must succeed exactly once.
                serial += 1;
                let fresh = format!("n{serial}");
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o640)
                    .open(dir.join(&fresh))
                    .unwrap_or_else(|e| panic!("w{w}: create {fresh}: {e}"));
                f.write_all(line.as_bytes())
                    .unwrap_or_else(|e| panic!("w{w}: write {fresh}: {e}"));
                model.insert(fresh.clone(), line.clone().into_bytes());
                let to = format!("f{}", (i + 5) % 12);
                std::fs::rename(dir.join(&fresh), dir.join(&to))
                    .unwrap_or_else(|e| panic!("w{w}: rename {fresh} to {to}: {e}"));
                let data = model.remove(&fresh).unwrap();
                model.insert(to, data);
            }
            3 => {
                let to = format!("f{}", (i + 7) % 12);
                if let Some(data) = model.remove(&name) {
                    std::fs::rename(&path, dir.join(&to))
                        .unwrap_or_else(|e| panic!("w{w}: rename {name}: {e}"));
                    model.insert(to, data);
                }
            }
            4 => {
                if model.remove(&name).is_some() {
                    std::fs::remove_file(&path)
                        .unwrap_or_else(|e| panic!("w{w}: unlink {name}: {e}"));
                }
            }
            5 => {
                let d = dir.join(format!("d{i}"));
                std::fs::create_dir(&d).unwrap_or_else(|e| panic!("w{w}: mkdir d{i}: {e}"));
                std::fs::remove_dir(&d).unwrap_or_else(|e| panic!("w{w}: rmdir d{i}: {e}"));
            }
            6 => {
                journal
                    .write_all(line.as_bytes())
                    .unwrap_or_else(|e| panic!("w{w}: append to the journal: {e}"));
                journal_model.extend(line.as_bytes());
                if i.is_multiple_of(5) {
                    journal
                        .sync_data()
                        .unwrap_or_else(|e| panic!("w{w}: fdatasync the journal: {e}"));
                }
            }
            _ => {
                let want = model.get(&name).cloned();
                match (std::fs::read(&path), want) {
                    (Ok(got), Some(want)) => assert_eq!(
                        String::from_utf8_lossy(&got),
                        String::from_utf8_lossy(&want),
                        "w{w}: {name} differs from the model"
                    ),
                    (Err(e), None) if e.kind() == std::io::ErrorKind::NotFound => {}
                    (got, want) => panic!("w{w}: {name}: read {got:?}, model {want:?}"),
                }
            }
        }
        ops += 1;
    }
    // The journal through the handle held all along, and through a fresh open.
    let mut through_handle = Vec::new();
    std::fs::File::open(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&journal)
    ))
    .unwrap()
    .read_to_end(&mut through_handle)
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&through_handle),
        String::from_utf8_lossy(&journal_model),
        "w{w}: the journal lost or repeated an append"
    );
    drop(journal);
    model.insert("journal".into(), journal_model);
    let mut on_disk: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    on_disk.sort();
    assert_eq!(
        on_disk,
        model.keys().cloned().collect::<Vec<_>>(),
        "w{w}: the directory differs from the model"
    );
    for (name, data) in &model {
        assert_eq!(
            String::from_utf8_lossy(&std::fs::read(dir.join(name)).unwrap()),
            String::from_utf8_lossy(data),
            "w{w}: {name}"
        );
    }
    ops
}

/// A file deleted in the export behind the appliance's back while the kernel holds it
/// (here through an O_PATH descriptor, which opens nothing in the appliance) cannot be
/// found again by a successor: its users get ESTALE, and every other file carries on —
/// including an open file deleted behind the appliance's back, whose open file the
/// supervisor kept.
#[test]
fn an_object_deleted_behind_the_appliance_is_stale_after_a_crash_and_the_rest_carries_on() {
    for extra in [&[][..], &["--no-passthrough"][..]] {
        let m = Mount::new("passthrough", extra);
        let export = m.export.as_ref().unwrap().path.clone();
        let p = m.path();
        std::fs::create_dir(p.join("d")).unwrap();
        std::fs::write(p.join("d/doomed"), b"gone soon").unwrap();
        std::fs::write(p.join("d/fine"), b"fine").unwrap();
        std::fs::write(p.join("held"), b"held open").unwrap();
        let doomed = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(p.join("d/doomed"))
            .unwrap();
        let mut held = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p.join("held"))
            .unwrap();
        let mut fine = std::fs::File::open(p.join("d/fine")).unwrap();
        std::fs::remove_file(export.join("d/doomed")).unwrap();
        std::fs::remove_file(export.join("held")).unwrap();
        crash(&m);
        // Past the attribute timeout (1 s), so that the kernel asks the appliance.
        std::thread::sleep(Duration::from_millis(1200));
        let err = fstat(&doomed).expect_err("a lost object is stale");
        assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{extra:?}: {err}");
        let mut s = String::new();
        fine.read_to_string(&mut s).unwrap();
        assert_eq!(s, "fine");
        let mut h = String::new();
        std::io::Seek::seek(&mut held, std::io::SeekFrom::Start(0)).unwrap();
        held.read_to_string(&mut h).unwrap();
        assert_eq!(h, "held open", "{extra:?}: the kept open file");
        held.write_all(b", still").unwrap();
        assert!(fstat(&held).is_ok());
        // New work goes on; the name of the lost file can be used again.
        std::fs::write(p.join("d/doomed"), b"new").unwrap();
        assert_eq!(std::fs::read(p.join("d/doomed")).unwrap(), b"new");
        let mut names: Vec<_> = std::fs::read_dir(p.join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["doomed", "fine"]);
        drop((doomed, held, fine));
        m.unmount();
    }
}

fn fstat(f: &std::fs::File) -> std::io::Result<()> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is writable memory for one stat structure.
    let r = unsafe { libc::fstat(std::os::fd::AsRawFd::as_raw_fd(f), st.as_mut_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A file held open across a crash can be opened again (by name and through the held
/// descriptor), also before the first checkpoint: with FUSE passthrough the new open
/// must name the backing file the held one uses.
#[test]
fn a_file_held_open_across_a_crash_opens_again() {
    for extra in [&[][..], &["--no-passthrough"][..]] {
        let m = Mount::new("passthrough", extra);
        let path = m.path().join("held");
        let mut held = std::fs::OpenOptions::new()
            .append(true)
            .read(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        held.write_all(b"before\n").unwrap();
        crash(&m);
        held.write_all(b"after\n").unwrap();
        let again = std::fs::read(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&held)
        ))
        .unwrap_or_else(|e| panic!("{extra:?}: reopening the held file: {e}"));
        assert_eq!(again, b"before\nafter\n");
        assert_eq!(std::fs::read(&path).unwrap(), b"before\nafter\n");
        drop(held);
        m.unmount();
    }
}

/// A mount with `--no-recovery` keeps no journal: its appliance's death leaves EIO.
#[test]
fn without_recovery_a_dead_appliance_leaves_errors() {
    let m = Mount::new("passthrough", &["--no-recovery"]);
    std::fs::write(m.path().join("x"), b"1").unwrap();
    let (_, pid) = m.pids();
    // SAFETY: plain kill(2) of the mount's own appliance.
    assert_eq!(unsafe { libc::kill(pid.unwrap() as i32, libc::SIGKILL) }, 0);
    assert!(wait_for(Duration::from_secs(10), || {
        std::fs::read_dir(m.path()).is_err()
    }));
}
