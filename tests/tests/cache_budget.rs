//! The cache budget the user side sets: `fsva mount --cache-budget` and `fsva cache` at
//! run time. For mem it is all the file data it may hold (ENOSPC beyond); for every
//! appliance the kernel enforces it on the appliance's memory cgroup.

use std::io::Write;
use std::time::{Duration, Instant};

use fsva_tests::{fsva, Mount};

fn write_mib(path: &std::path::Path, mib: usize) -> std::io::Result<usize> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..mib {
        if let Err(e) = f.write_all(&chunk) {
            return if i == 0 { Err(e) } else { Ok(i) };
        }
    }
    Ok(mib)
}

fn status_line(m: &Mount, key: &str) -> String {
    let text = String::from_utf8_lossy(&fsva(&["status"]).stdout).to_string();
    let mut lines = text
        .lines()
        .skip_while(|l| !l.starts_with(m.path().to_str().unwrap()));
    lines
        .find(|l| l.contains(key))
        .unwrap_or_else(|| panic!("no `{key}` line for {} in:\n{text}", m.path().display()))
        .to_string()
}

/// "appliance memory in use: N MiB" from `fsva status`.
fn memory_in_use_mib(m: &Mount) -> u64 {
    let line = status_line(m, "cache budget:");
    line.rsplit("in use: ")
        .next()
        .and_then(|s| s.trim_end_matches(" MiB").trim().parse().ok())
        .unwrap_or_else(|| panic!("unparsable: {line}"))
}

#[test]
fn mem_holds_no_more_than_its_budget_and_follows_changes_at_run_time() {
    let m = Mount::new("mem", &["--cache-budget", "32M"]);
    let written = write_mib(&m.path().join("a"), 64).unwrap();
    assert!(
        (31..=32).contains(&written),
        "wrote {written} MiB into a 32 MiB budget"
    );
    let e = write_mib(&m.path().join("b"), 1).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    let line = status_line(&m, "cache budget:");
    assert!(line.contains("cache budget: 32 MiB"), "{line}");

    // Raise it: room again.
    let out = fsva(&["cache", m.path().to_str().unwrap(), "64M"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(write_mib(&m.path().join("b"), 16).unwrap(), 16);

    // Shrink below what is held: nothing is lost, growth is refused at once.
    let out = fsva(&["cache", m.path().to_str().unwrap(), "8M"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = write_mib(&m.path().join("c"), 1).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    assert_eq!(
        std::fs::metadata(m.path().join("b")).unwrap().len(),
        16 << 20
    );
    m.unmount();
}

#[test]
fn an_appliance_caching_more_than_its_budget_stays_within_it() {
    // Data through the appliance, whose writes fill its page cache: 128 MiB through a
    // 16 MiB budget (plus the appliance's own 64 MiB headroom).
    let m = Mount::new(
        "passthrough",
        &["--no-passthrough", "--cache-budget", "16M"],
    );
    assert_eq!(write_mib(&m.path().join("big"), 128).unwrap(), 128);
    let used = memory_in_use_mib(&m);
    assert!(
        used >= 1,
        "the appliance is not charged to its cgroup ({used} MiB)"
    );
    assert!(
        used <= 16 + 64,
        "appliance uses {used} MiB with a 16 MiB budget"
    );

    // Shrinking takes effect within a second.
    let out = fsva(&["cache", m.path().to_str().unwrap(), "4M"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = Instant::now();
    while memory_in_use_mib(&m) > 4 + 64 {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "shrink not in force after 1 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        std::fs::metadata(m.path().join("big")).unwrap().len(),
        128 << 20
    );
    m.unmount();
}

#[test]
fn changing_the_budget_of_a_mount_without_one_says_what_to_do() {
    let m = Mount::new("mem", &[]);
    let out = fsva(&["cache", m.path().to_str().unwrap(), "8M"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cache-budget"), "{err}");
    m.unmount();
}
