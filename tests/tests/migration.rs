//! Migration across hosts (`fsva migrate --to`, `fsva host`): the second host is a
//! network namespace on a veth pair made here, running the real host daemon; the mount
//! stays in this namespace, and its supervisor reaches the daemon over TCP. Files,
//! open handles and a running writer survive the move with no error; a wrong key, a
//! dead daemon or a mount that cannot move leave it serving here; a remote appliance
//! that dies costs EIO at once, never a hang. Needs root (namespaces, mounts).

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fsva_tests::{binary, first_child, fsva, mount_record, wait_for, within, Mount, Scratch};

const PORT: u16 = 7420;

/// Another "host": a network namespace joined to this one by a veth pair, with a key
/// file and (once started) the host daemon in it. Everything is removed on drop, also
/// when the test failed.
struct OtherHost {
    ns: String,
    veth: String,
    /// This namespace's address on the pair, and the other host's.
    here: String,
    there: String,
    dir: Scratch,
    daemon: Option<Child>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl OtherHost {
    fn new() -> OtherHost {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{n}", pid % 100_000);
        // A /30 of its own per test: 10.P.Q.(4n+1) here, (4n+2) there.
        let (p, q) = ((pid >> 8) & 0xff, pid & 0xff);
        let here = format!("10.{p}.{q}.{}", 4 * (n % 60) + 1);
        let there = format!("10.{p}.{q}.{}", 4 * (n % 60) + 2);
        let host = OtherHost {
            ns: format!("fsvamig{tag}"),
            veth: format!("fm{tag}"),
            here,
            there,
            dir: Scratch::new("otherhost"),
            daemon: None,
        };
        let peer = format!("{}p", host.veth);
        ip(&["netns", "add", &host.ns]);
        ip(&[
            "link", "add", &host.veth, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &host.ns]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", host.here),
            "dev",
            &host.veth,
        ]);
        ip(&["link", "set", &host.veth, "up"]);
        let inside = |args: &[&str]| {
            let mut a = vec!["netns", "exec", &host.ns, "ip"];
            a.extend_from_slice(args);
            ip(&a);
        };
        inside(&["addr", "add", &format!("{}/30", host.there), "dev", &peer]);
        inside(&["link", "set", &peer, "up"]);
        inside(&["link", "set", "lo", "up"]);
        host.write_key("key", "fsva-migration-test-key-0123456789");
        host.write_key("wrong", "another-key-entirely-9876543210");
        host
    }

    fn write_key(&self, name: &str, text: &str) {
        let p = self.dir.path.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn key(&self, name: &str) -> PathBuf {
        self.dir.path.join(name)
    }

    fn addr(&self) -> String {
        format!("{}:{PORT}", self.there)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path.join("daemon.log")).unwrap_or_default()
    }

    /// Starts `fsva host` in the namespace (passthrough may serve `exports`) and waits
    /// until it listens.
    fn start_daemon(&mut self, exports: &[&Path]) {
        let log = std::fs::File::create(self.dir.path.join("daemon.log")).unwrap();
        // Only the network namespace: `ip netns exec` would also give the daemon a
        // mount namespace of its own, a copy holding every FUSE mount there is now,
        // whose unmount (here or in a parallel test) could then not end its
        // connection while the daemon lives.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns))
            .arg(binary("fsva"))
            .args(["host", "--listen", &self.addr(), "--key-file"])
            .arg(self.key("key"));
        for e in exports {
            cmd.arg("--export").arg(e);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting fsva host");
        self.daemon = Some(child);
        assert!(
            wait_for(Duration::from_secs(30), || self
                .log()
                .contains("ready for migrations")),
            "the host daemon did not start: {}",
            self.log()
        );
    }

    fn stop_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

impl Drop for OtherHost {
    fn drop(&mut self) {
        self.stop_daemon();
        // Deleting the namespace takes its end of the pair, and with it ours.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .stderr(Stdio::null())
            .output();
    }
}

/// `fsva migrate` of `m` to `host` with the key file `key`: (success, what it said).
fn migrate(m: &Mount, host: &OtherHost, key: &str) -> (bool, String) {
    let out = fsva(&[
        "migrate",
        m.path().to_str().unwrap(),
        "--to",
        &host.addr(),
        "--key-file",
        host.key(key).to_str().unwrap(),
    ]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

fn status_of(m: &Mount) -> String {
    let out = fsva(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mp = m.path().to_str().unwrap().to_string();
    let mut lines = text.lines().skip_while(|l| !l.starts_with(&mp));
    let mut block: Vec<&str> = lines.next().into_iter().collect();
    block.extend(lines.take_while(|l| l.starts_with(' ')));
    block.join("\n")
}

fn remote_pid(m: &Mount) -> u32 {
    mount_record(m.path()).expect("mount record")["remote_pid"]
        .parse()
        .expect("a remote pid")
}

/// Appends numbered lines to `path` until told to stop; returns how many and the
/// errors seen.
fn writer(path: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u32, Vec<String>)> {
    std::thread::spawn(move || {
        let mut errors = Vec::new();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .unwrap();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Err(e) = f.write_all(format!("line {n}\n").as_bytes()) {
                errors.push(format!("append {n}: {e}"));
                break;
            }
            let other = path.with_file_name(format!("w{}", n % 20));
            if let Err(e) = std::fs::write(&other, n.to_string()) {
                errors.push(format!("rewrite {}: {e}", other.display()));
                break;
            }
            n += 1;
        }
        (n, errors)
    })
}

#[test]
fn mem_moves_with_its_files_open_handles_and_a_running_writer() {
    let mut host = OtherHost::new();
    host.start_daemon(&[]);
    let m = Mount::new("mem", &["--no-passthrough"]);
    let p = m.path().to_path_buf();
    std::fs::create_dir(p.join("d")).unwrap();
    for i in 0..200 {
        std::fs::write(
            p.join(format!("d/f{i}")),
            format!("file {i}\n").repeat(i + 1),
        )
        .unwrap();
    }
    std::fs::hard_link(p.join("d/f1"), p.join("d/link")).unwrap();
    std::os::unix::fs::symlink("f2", p.join("d/sym")).unwrap();
    // A sparse file: its hole stays a hole.
    let sparse = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(p.join("sparse"))
        .unwrap();
    sparse.set_len(1 << 30).unwrap();
    (&sparse).seek(SeekFrom::Start(1 << 29)).unwrap();
    (&sparse).write_all(b"middle").unwrap();
    let mut held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(p.join("held"))
        .unwrap();
    held.write_all(b"before ").unwrap();
    let mut reader = std::fs::File::open(p.join("d/f150")).unwrap();
    let mut first = [0u8; 5];
    reader.read_exact(&mut first).unwrap();
    let (_, local_pid) = m.pids();

    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(p.join("log"), stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let (ok, said) = migrate(&m, &host, "key");
    assert!(ok, "fsva migrate failed: {said}\ndaemon: {}", host.log());
    assert!(said.contains("migrated to"), "{said}");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (lines, errors) = w.join().unwrap();
    assert!(errors.is_empty(), "the writer saw errors: {errors:?}");
    assert!(lines > 0);

    // The local appliance is gone; one on the other host serves.
    let local = local_pid.expect("a local appliance before");
    assert!(
        wait_for(Duration::from_secs(5), || !Path::new(&format!(
            "/proc/{local}"
        ))
        .exists()),
        "the local appliance still runs"
    );
    let remote = remote_pid(&m);
    assert!(Path::new(&format!("/proc/{remote}")).exists());
    let status = status_of(&m);
    assert!(
        status.contains(&format!("serving from {}", host.addr())),
        "{status}"
    );
    assert!(status.contains("migrated 1 time(s)"), "{status}");

    // Everything written is there, in order, once.
    let log = std::fs::read_to_string(p.join("log")).unwrap();
    let want: String = (0..lines).map(|n| format!("line {n}\n")).collect();
    assert!(
        log == want,
        "the log differs after the move ({} lines)",
        log.lines().count()
    );
    for i in (0..200).step_by(37) {
        assert_eq!(
            std::fs::read_to_string(p.join(format!("d/f{i}"))).unwrap(),
            format!("file {i}\n").repeat(i + 1)
        );
    }
    assert_eq!(
        std::fs::read_to_string(p.join("d/link")).unwrap(),
        "file 1\nfile 1\n"
    );
    assert_eq!(
        std::fs::read_link(p.join("d/sym")).unwrap(),
        Path::new("f2")
    );
    let meta = std::fs::metadata(p.join("sparse")).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&meta) < 1024,
        "the hole was filled on the way"
    );
    let mut mid = [0u8; 6];
    std::os::unix::fs::FileExt::read_exact_at(&sparse, &mut mid, 1 << 29).unwrap();
    assert_eq!(&mid, b"middle");
    // Handles opened before the move read and write on.
    held.write_all(b"after").unwrap();
    held.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    held.read_to_string(&mut s).unwrap();
    assert_eq!(s, "before after");
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert_eq!(
        format!("{}{rest}", String::from_utf8_lossy(&first)),
        "file 150\n".repeat(151)
    );
    // New files land there.
    std::fs::write(p.join("new"), b"made after the move").unwrap();
    assert_eq!(
        std::fs::read(p.join("new")).unwrap(),
        b"made after the move"
    );
    drop((held, reader, sparse));

    m.unmount();
    assert!(
        wait_for(Duration::from_secs(10), || !Path::new(&format!(
            "/proc/{remote}"
        ))
        .exists()),
        "the remote appliance outlived the mount"
    );
}

#[test]
fn passthrough_moves_over_storage_both_hosts_see() {
    let mut host = OtherHost::new();
    let m = Mount::new("passthrough", &[]);
    let export = m.export.as_ref().unwrap().path.clone();
    host.start_daemon(&[&export]);
    let p = m.path().to_path_buf();
    std::fs::create_dir(p.join("d")).unwrap();
    for i in 0..20 {
        std::fs::write(p.join(format!("d/f{i}")), format!("{i}")).unwrap();
    }
    // Open through FUSE passthrough (root mounts use it): the kernel keeps these files.
    let mut held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p.join("d/f3"))
        .unwrap();
    let (ok, said) = migrate(&m, &host, "key");
    assert!(ok, "fsva migrate failed: {said}\ndaemon: {}", host.log());
    held.seek(SeekFrom::End(0)).unwrap();
    held.write_all(b" and more").unwrap();
    // Opened again, through the other host's appliance.
    assert_eq!(
        std::fs::read_to_string(p.join("d/f3")).unwrap(),
        "3 and more"
    );
    assert_eq!(
        std::fs::read_to_string(export.join("d/f3")).unwrap(),
        "3 and more"
    );
    std::fs::write(p.join("d/new"), b"written there").unwrap();
    assert_eq!(
        std::fs::read(export.join("d/new")).unwrap(),
        b"written there"
    );
    let names = std::fs::read_dir(p.join("d")).unwrap().count();
    assert_eq!(names, 21);
    std::fs::rename(p.join("d/f4"), p.join("f4")).unwrap();
    assert!(export.join("f4").exists());
    assert!(status_of(&m).contains("serving from"));
    drop(held);
    m.unmount();
}

#[test]
fn a_wrong_key_a_dead_daemon_or_open_passthrough_files_leave_the_mount_here() {
    let mut host = OtherHost::new();
    host.start_daemon(&[]);
    // mem with files open through FUSE passthrough cannot move.
    let pt = Mount::new("mem", &[]);
    std::fs::write(pt.path().join("a"), b"x").unwrap();
    let open = std::fs::File::open(pt.path().join("a")).unwrap();
    let status = status_of(&pt);
    assert!(
        status.contains("1 backing files open"),
        "the file is not open through FUSE passthrough: {status}"
    );
    let (ok, said) = migrate(&pt, &host, "key");
    assert!(!ok, "mem moved with a FUSE passthrough file open: {said}");
    assert!(said.contains("--no-passthrough"), "{said}");
    assert_eq!(std::fs::read(pt.path().join("a")).unwrap(), b"x");
    drop(open);
    pt.unmount();

    let m = Mount::new("mem", &["--no-passthrough"]);
    std::fs::write(m.path().join("f"), b"stays here").unwrap();
    let (ok, said) = migrate(&m, &host, "wrong");
    assert!(!ok, "migrated with a wrong key: {said}");
    assert!(said.contains("refused the key"), "{said}");
    assert!(said.contains("serves on here"), "{said}");
    assert!(
        wait_for(Duration::from_secs(5), || host
            .log()
            .contains("did not prove the key")),
        "the daemon does not say why it refused: {}",
        host.log()
    );
    assert_eq!(std::fs::read(m.path().join("f")).unwrap(), b"stays here");

    host.stop_daemon();
    let (ok, said) = migrate(&m, &host, "key");
    assert!(!ok, "migrated to a dead daemon: {said}");
    assert!(said.contains("cannot reach the host daemon"), "{said}");
    std::fs::write(m.path().join("g"), b"still served").unwrap();
    assert_eq!(std::fs::read(m.path().join("g")).unwrap(), b"still served");
    let status = status_of(&m);
    assert!(status.contains("serving"), "{status}");
    assert!(!status.contains("migrated"), "{status}");
    m.unmount();
}

#[test]
fn a_remote_appliance_that_dies_costs_eio_at_once() {
    let mut host = OtherHost::new();
    host.start_daemon(&[]);
    let m = Mount::new("mem", &["--no-passthrough"]);
    std::fs::write(m.path().join("f"), b"data").unwrap();
    let held = std::fs::File::open(m.path().join("f")).unwrap();
    let (ok, said) = migrate(&m, &host, "key");
    assert!(ok, "fsva migrate failed: {said}\ndaemon: {}", host.log());
    // The appliance dies as in a crash: the sandboxed process that serves (the child
    // of the one the daemon started), and nothing serves any more once it is gone.
    let pid = remote_pid(&m);
    let serving = first_child(pid).unwrap_or(pid);
    // SAFETY: kill(2) on a pid this test started (through the daemon) and checked.
    assert_eq!(unsafe { libc::kill(serving as i32, libc::SIGKILL) }, 0);
    assert!(
        wait_for(Duration::from_secs(5), || {
            std::fs::read_to_string(format!("/proc/{serving}/stat")).map_or(true, |s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        }),
        "the remote appliance did not die within 5 s of SIGKILL"
    );
    let path = m.path().to_path_buf();
    let answered = within(Duration::from_secs(10), move || {
        let t = std::time::Instant::now();
        let e = std::fs::read(path.join("f")).unwrap_err();
        (e.raw_os_error(), t.elapsed())
    })
    .expect("a request hung after the remote appliance died");
    assert_eq!(answered.0, Some(libc::EIO));
    assert!(
        answered.1 < Duration::from_secs(2),
        "EIO took {:?}",
        answered.1
    );
    let mut buf = [0u8; 4];
    let e = (&held).read(&mut buf).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert!(status_of(&m).contains("is gone"), "{}", status_of(&m));
    drop(held);
    m.unmount();
}
