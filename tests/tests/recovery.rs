//! Crash recovery: the appliance is killed with SIGKILL at random moments while
//! several writers and fsx work on the mount, and nobody notices — no error, no file
//! that differs from its writer's model, no append lost or written twice, fsx's own
//! model intact. Each kill is a real `kill -9` of the real sandboxed appliance; the
//! supervisor replaces it with a successor that rebuilds the state.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fsva_tests::workload::{self, Rng};
use fsva_tests::{fsva, wait_for, Mount};

/// fsx (the crates.io File System eXerciser the external suites run), installed by
/// `scripts/setup.sh --test-tools`.
fn fsx() -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin")));
    for dir in candidates {
        let p = dir.join("fsx");
        if p.is_file() {
            return p;
        }
    }
    panic!("fsx is not installed: run scripts/setup.sh --test-tools (cargo install fsx)");
}

/// The operations and weights the external fsx suite runs with.
const FSX_CONFIG: &str = include_str!("../../scripts/suites/fsx.toml");

/// Runs fsx rounds of `ops` operations on a file in `dir` until `stop`; panics with
/// fsx's report if a round fails. Returns the rounds completed.
fn fsx_rounds(dir: &Path, ops: u32, seed: u64, stop: &AtomicBool) -> u32 {
    let conf = dir.join("fsx.toml");
    std::fs::write(&conf, FSX_CONFIG).unwrap();
    let artifacts = tempfile::tempdir().unwrap();
    let mut rounds = 0;
    while !stop.load(Ordering::SeqCst) {
        let file = dir.join(format!("fsx{rounds}"));
        let out = Command::new(fsx())
            .arg("-f")
            .arg(&conf)
            .args([
                "-N",
                &ops.to_string(),
                "-S",
                &(seed + u64::from(rounds)).to_string(),
            ])
            .arg("-P")
            .arg(artifacts.path())
            .arg(&file)
            .env("NO_COLOR", "1")
            .output()
            .expect("running fsx");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("All operations completed A-OK"),
            "fsx round {rounds} (seed {}) failed:\n{}",
            seed + u64::from(rounds),
            text.lines().rev().take(40).collect::<Vec<_>>().join("\n")
        );
        let _ = std::fs::remove_file(&file);
        rounds += 1;
    }
    rounds
}

/// Kills the appliance of a `backend` mount `kills` times at random moments (each
/// time once its successor serves), with four writers and fsx at work, and checks that
/// nothing is noticed.
fn kill_storm(backend: &str, extra: &[&str], kills: usize) {
    let m = Mount::new(backend, extra);
    let mut rng = Rng::from_clock();
    let seed = rng.next_u64() % 1_000_000;
    eprintln!("kill storm {backend} {extra:?}: seed {seed}");
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let dir = m.path().join(format!("w{w}"));
        std::fs::create_dir(&dir).unwrap();
        let stop = stop.clone();
        writers.push(std::thread::spawn(move || {
            workload::writer(&dir, seed * 10 + w, &stop)
        }));
    }
    let fsx_dir = m.path().join("fsx");
    std::fs::create_dir(&fsx_dir).unwrap();
    let fsx = {
        let stop = stop.clone();
        std::thread::spawn(move || fsx_rounds(&fsx_dir, 3000, seed, &stop))
    };

    let started = Instant::now();
    let (_, first) = m.pids();
    let mut last = first.expect("an appliance serves the mount");
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.range(30, 200)));
        let pid = last;
        assert!(
            kill_appliance(pid),
            "kill {k}: appliance {pid} was not there to kill"
        );
        // The next kill waits for the successor.
        assert!(
            wait_for(Duration::from_secs(20), || m
                .pids()
                .1
                .is_some_and(|p| p != pid)),
            "kill {k}: no successor took over from appliance {pid}"
        );
        last = m.pids().1.unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let mut total = workload::Done::default();
    for w in writers {
        let d = w.join().expect("a writer saw an error or a mismatch");
        total.ops += d.ops;
        total.appends += d.appends;
        total.fsyncs += d.fsyncs;
    }
    let rounds = fsx.join().expect("fsx failed");
    let status = String::from_utf8_lossy(&fsva(&["status"]).stdout).into_owned();
    eprintln!(
        "{kills} kills in {:.1} s: {} writer operations ({} appends, {} fsync'd), {rounds} fsx rounds of 3000 operations, no error\n{status}",
        started.elapsed().as_secs_f64(),
        total.ops,
        total.appends,
        total.fsyncs
    );
    assert!(
        total.ops > 1000,
        "the workload hardly ran ({} operations)",
        total.ops
    );
    assert!(rounds >= 1, "fsx did not complete a round");
    assert!(
        status.contains(&format!("recovered after {kills} appliance crash(es)")),
        "fsva status does not count {kills} recoveries:\n{status}"
    );
    m.unmount();
}

/// SIGKILL to `pid`; whether it existed.
fn kill_appliance(pid: u32) -> bool {
    rustix::process::Pid::from_raw(pid as i32)
        .is_some_and(|p| rustix::process::kill_process(p, rustix::process::Signal::KILL).is_ok())
}

/// One hundred kills with FUSE passthrough: data goes to the memfds directly, metadata
/// and namespace changes through the appliance.
#[test]
fn a_hundred_kills_under_load_lose_nothing_and_repeat_nothing() {
    kill_storm("mem", &[], 100);
}

/// One hundred kills with every byte through the appliance: writes, appends and
/// truncations are resent and must land exactly once.
#[test]
fn a_hundred_kills_with_data_through_the_appliance_lose_nothing() {
    kill_storm("mem", &["--no-passthrough"], 100);
}

/// The same for a passthrough export: its namespace changes are durable, so a resent
/// create, rename, unlink or append must be recognised as done from its intent.
#[test]
fn a_hundred_kills_of_passthrough_under_load_lose_nothing_and_repeat_nothing() {
    kill_storm("passthrough", &[], 100);
}

/// Passthrough with every byte through the appliance (appends decided by their intent).
#[test]
fn a_hundred_kills_of_passthrough_with_data_through_the_appliance_lose_nothing() {
    kill_storm("passthrough", &["--no-passthrough"], 100);
}

/// A journal damaged behind the appliance's back (bytes of its records overwritten
/// through the supervisor's own descriptor) cannot be replayed: the successor says
/// why, the mount goes on with an empty file system, the files it held answer ESTALE
/// and new ones work — never an old state passed off as the current one.
#[test]
fn a_damaged_journal_gives_a_fresh_file_system_and_estale_not_a_wrong_state() {
    damaged_journal("mem");
}

/// The same for passthrough: the node table is lost (held files answer ESTALE), the
/// export's files are not (they are found again by name).
#[test]
fn a_damaged_passthrough_journal_gives_fresh_nodes_and_estale_not_a_wrong_state() {
    damaged_journal("passthrough");
}

fn damaged_journal(backend: &str) {
    use std::io::{Seek, SeekFrom, Write};
    let m = Mount::new(backend, &["--no-passthrough"]);
    let mut held = std::fs::File::create(m.path().join("held")).unwrap();
    held.write_all(b"acknowledged").unwrap();
    for i in 0..20 {
        std::fs::write(m.path().join(format!("f{i}")), b"data").unwrap();
    }
    let (supervisor, appliance) = m.pids();
    let journal = std::fs::read_dir(format!("/proc/{supervisor}/fd"))
        .unwrap()
        .flatten()
        .find(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:fsva-journal"))
        })
        .expect("the supervisor keeps the journal memfd");
    let mut j = std::fs::OpenOptions::new()
        .write(true)
        .open(journal.path())
        .unwrap();
    // The first record of each area, just past the 4 KiB header and the area header.
    let area = (j.metadata().unwrap().len() - 4096) / 2;
    for base in [4096, 4096 + area] {
        j.seek(SeekFrom::Start(base + 64 + 16)).unwrap();
        j.write_all(&[0xa5; 32]).unwrap();
    }
    assert!(kill_appliance(appliance.unwrap()));
    assert!(
        wait_for(Duration::from_secs(20), || m
            .pids()
            .1
            .is_some_and(|p| Some(p) != appliance)),
        "no successor took over"
    );
    let err = held
        .write_all(b" more")
        .and_then(|()| held.sync_all())
        .expect_err("a handle of the lost state still worked");
    assert_eq!(err.raw_os_error(), Some(libc::ESTALE), "{err}");
    std::fs::write(m.path().join("new"), b"after").unwrap();
    assert_eq!(std::fs::read(m.path().join("new")).unwrap(), b"after");
    if backend == "passthrough" {
        // Past the entry timeout (1 s): the kernel looks the names up again.
        std::thread::sleep(Duration::from_millis(1200));
        assert_eq!(std::fs::read(m.path().join("f3")).unwrap(), b"data");
    }
    let status = String::from_utf8_lossy(&fsva(&["status"]).stdout).into_owned();
    assert!(
        status.contains("with a fresh file system (state lost)"),
        "{status}"
    );
    let log = fsva_tests::mount_log(m.path());
    assert!(
        log.contains("could not rebuild the state") && log.contains("journal"),
        "the log does not say why the state was lost:\n{log}"
    );
    drop(held);
    m.unmount();
}
