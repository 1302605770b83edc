//! VM guests as users: `fsva serve-vhost` serves an appliance as a vhost-user-fs
//! device, and a stock Debian kernel in QEMU (TCG) mounts it with its own virtiofs
//! driver and runs the conformance probe inside the guest. Covers the mem backend with
//! the device in the appliance (the default), the full seed topology (user VM -> fsva
//! -> VM appliance with its own kernel and ext4, relayed by the supervisor), and a
//! relayed appliance killed under a running guest.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use fsva_tests::guest::{boot, GuestImage, GuestKernel, GuestRun, GuestSpec, VhostServer};
use fsva_tests::{assert_ext4_clean, binary, conformance, debugfs_cat, transcript_diff, Scratch};

const NOBODY: u32 = 65534;

/// Runs the probe in the guest on /mnt/root and, as uid 65534, /mnt/user.
const CONFORMANCE: &str = r#"
mkdir -p /mnt/root /mnt/user && chmod 777 /mnt/root /mnt/user
echo @@begin root
fsva-conformance --dir /mnt/root
echo @@end root
echo @@begin user
fsva-conformance --dir /mnt/user --as-uid 65534 --as-gid 65534
echo @@end user
"#;

fn native(uid: Option<u32>) -> Vec<String> {
    let dir = Scratch::new("native");
    dir.open_to_all();
    conformance(&dir.path, uid)
}

/// Checks listed in tests/vhost-differences.txt for `setup`, with their reason.
fn listed(setup: &str) -> Vec<String> {
    include_str!("../vhost-differences.txt")
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter_map(|l| l.split_once(' '))
        .filter(|(s, _)| *s == setup)
        .map(|(_, c)| c.trim().to_string())
        .collect()
}

/// The guest's transcript equals native ext4's but for the listed checks, which must
/// still differ.
fn assert_matches_native(setup: &str, expected: &[String], got: &[String]) {
    assert!(expected.len() > 50, "the probe ran too few checks");
    assert!(
        got.len() > 50,
        "the probe did not run in the guest ({setup}): {got:?}"
    );
    let mut diff = transcript_diff(expected, got);
    for check in listed(setup) {
        let before = diff.len();
        diff.retain(|d| !d.contains(&format!("native: {check}:")));
        assert_ne!(
            before,
            diff.len(),
            "{check} is listed for {setup} in tests/vhost-differences.txt but now matches ext4"
        );
    }
    assert!(
        diff.is_empty(),
        "{} of {} checks differ from native ext4 in the guest ({setup}):\n{}",
        diff.len(),
        expected.len(),
        diff.join("\n")
    );
}

fn probe() -> PathBuf {
    binary("fsva-conformance")
}

/// Boots `image` against `server` and requires its script to succeed.
fn run_ok(image: &GuestImage, server: &VhostServer, cpus: u32, secs: u64) -> GuestRun {
    run_spec_ok(
        image,
        server,
        GuestSpec::new(cpus, Duration::from_secs(secs)),
    )
}

/// As [`run_ok`], for a guest of any shape.
fn run_spec_ok(image: &GuestImage, server: &VhostServer, spec: GuestSpec) -> GuestRun {
    let run = boot(image, &server.socket, "fsva", spec);
    assert_eq!(
        run.exit(),
        Some(0),
        "guest output:\n{}\nconsole:\n{}\nserver log:\n{}",
        run.output,
        run.console,
        server.log()
    );
    run
}

#[test]
fn stock_guest_over_virtiofs_behaves_as_native_ext4() {
    let (root, user) = (native(None), native(Some(NOBODY)));
    let server = VhostServer::start(&["--backend", "mem", "--queues", "2"]);
    let image = GuestImage::build(&[&probe()], CONFORMANCE);
    let run = run_ok(&image, &server, 2, 300);
    assert_matches_native("mem-root", &root, &run.section("root"));
    assert_matches_native("mem-user", &user, &run.section("user"));
}

/// One worker per vCPU, pinned to it: it writes its own 300 files, then reads each back.
const WORKER_PER_CPU: &str = r#"
cat > /tmp/work <<'WORK'
mkdir /mnt/w$1
i=0
while [ $i -lt 300 ]; do echo cpu$1-file-$i > /mnt/w$1/f$i; i=$((i+1)); done
i=0
while [ $i -lt 300 ]; do
  read -r line < /mnt/w$1/f$i
  [ "$line" = "cpu$1-file-$i" ] || { echo "w$1/f$i reads back wrong: $line"; exit 1; }
  i=$((i+1))
done
WORK
taskset 1 sh /tmp/work 1 & one=$!
taskset 2 sh /tmp/work 2 & two=$!
wait $one; a=$?
wait $two; b=$?
[ $a = 0 ] && [ $b = 0 ] || { echo "workers exited $a and $b"; exit 1; }
echo @@cpus $(nproc)
"#;

/// A guest kernel that spreads virtiofs requests over queues by CPU (6.12, from
/// bookworm-backports) and a device with two request queues: with a writer busy on
/// each vCPU, both request queues carry a share of the requests (each queue has its
/// own worker), and every file reads back as written.
#[test]
fn multi_queue_guest_spreads_requests_over_the_request_queues() {
    let mut server = VhostServer::start_logged(&["--backend", "mem", "--queues", "2"]);
    let image = GuestImage::build_on(&GuestKernel::multi_queue(), &[], WORKER_PER_CPU);
    let spec = GuestSpec {
        request_queues: 2,
        ..GuestSpec::new(2, Duration::from_secs(300))
    };
    let run = run_spec_ok(&image, &server, spec);
    assert!(
        run.output.contains("@@cpus 2") && !run.output.contains("reads back wrong"),
        "{}",
        run.output
    );
    // The device logs what it took from each queue when the VMM goes away.
    assert!(
        server.wait_exit(Duration::from_secs(30)).is_some(),
        "serve-vhost did not exit after its guest"
    );
    let log = server.log();
    let per_queue: Vec<u64> = log
        .split_once("per_queue=[")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| {
            list.split(',')
                .map(|n| {
                    n.trim()
                        .parse()
                        .unwrap_or_else(|e| panic!("per-queue count {n:?}: {e}; log:\n{log}"))
                })
                .collect()
        })
        .unwrap_or_else(|| panic!("no per-queue counts in the server's log:\n{log}"));
    assert_eq!(
        per_queue.len(),
        3,
        "high-priority + 2 request queues: {per_queue:?}"
    );
    eprintln!("requests taken per queue (high priority first): {per_queue:?}");
    // Each vCPU made, wrote and read back 300 files (several requests each) through
    // its own queue: each request queue took at least a third of the requests.
    let (a, b) = (per_queue[1], per_queue[2]);
    assert!(
        a.min(b) >= 600 && a.min(b) * 3 >= a + b,
        "the request queues took {a} and {b} requests: not spread over both"
    );
}

/// A host directory served by root's passthrough appliance (device in the appliance,
/// device nodes made by the supervisor's broker).
#[test]
fn stock_guest_over_a_passthrough_export_behaves_as_native_ext4() {
    let (root, user) = (native(None), native(Some(NOBODY)));
    let export = Scratch::new("vhost-pt");
    export.open_to_all();
    let spec = format!("passthrough:{}", export.path.display());
    let server = VhostServer::start(&["--backend", &spec]);
    let image = GuestImage::build(&[&probe()], CONFORMANCE);
    let run = run_ok(&image, &server, 1, 300);
    assert_matches_native("passthrough-root", &root, &run.section("root"));
    assert_matches_native("passthrough-user", &user, &run.section("user"));
}

fn make_ext4(dir: &Scratch) -> PathBuf {
    let img = dir.path.join("ext4.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096"])
        .arg(&img)
        .status()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(st.success());
    img
}

/// The seed's whole topology: the user's applications in a VM, the proxy its virtiofs
/// driver, the file system on the appliance VM's own kernel.
#[test]
fn stock_guest_reaches_ext4_on_a_vm_appliance() {
    let expected = native(None);
    let dir = Scratch::new("vhost-vm");
    let img = make_ext4(&dir);
    let mut server = VhostServer::start(&["--vm", "--image", img.to_str().unwrap()]);
    let script = r#"
mkdir -p /mnt/root && chmod 777 /mnt/root
echo @@begin root
fsva-conformance --dir /mnt/root
echo @@end root
seq 1 20000 > /mnt/kept.txt && sync /mnt/kept.txt
"#;
    let image = GuestImage::build(&[&probe()], script);
    let run = run_ok(&image, &server, 1, 600);
    assert_matches_native("vm-ext4-root", &expected, &run.section("root"));
    // The guest powered off: the server stops the appliance, which unmounts cleanly.
    let status = server.wait_exit(Duration::from_secs(120));
    assert!(
        status.is_some_and(|s| s.success()),
        "serve-vhost: {status:?}"
    );
    assert_ext4_clean(&img, "after the guest and the appliance stopped");
    let want: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    assert!(
        debugfs_cat(&img, "/kept.txt") == want.as_bytes(),
        "the guest's file is not on the image"
    );
}

/// Killing a relayed appliance under a running guest: the guest's next requests fail
/// at once instead of hanging, and the guest shuts down normally. (Without --relay the
/// appliance is the device, and its death stalls the device, as virtiofsd's does.)
#[test]
fn killed_appliance_gives_the_guest_errors_not_a_hang() {
    let export = Scratch::new("vhost-export");
    let spec = format!("passthrough:{}", export.path.display());
    let server = VhostServer::start(&["--backend", &spec, "--relay"]);
    let script = r#"
echo up > /mnt/ready
i=0
while [ $i -lt 600 ]; do
  if ! (echo $i > /mnt/f$i) 2>/tmp/err; then echo "@@failed at $i: $(cat /tmp/err)"; break; fi
  i=$((i+1)); sleep 0.05
done
"#;
    let image = GuestImage::build(&[], script);
    let appliance = server.appliance_pid().expect("the appliance runs");
    let ready = export.path.join("ready");
    let killer = std::thread::spawn(move || {
        if fsva_tests::wait_for(Duration::from_secs(120), || ready.exists()) {
            std::thread::sleep(Duration::from_millis(300));
            let _ = Command::new("kill")
                .arg("-9")
                .arg(appliance.to_string())
                .status();
            true
        } else {
            false
        }
    });
    let run = boot(
        &image,
        &server.socket,
        "fsva",
        GuestSpec::new(1, Duration::from_secs(180)),
    );
    assert!(
        killer.join().unwrap(),
        "the guest never wrote through the mount:\n{}",
        run.output
    );
    let failed = run
        .output
        .lines()
        .find(|l| l.starts_with("@@failed"))
        .unwrap_or_else(|| panic!("writes kept working after the kill:\n{}", run.output));
    assert!(
        failed.contains("I/O error") || failed.contains("Input/output"),
        "{failed}"
    );
    // Writes before the kill reached the export.
    assert!(export.path.join("f0").exists());
}

/// In the guest: files written, one held open for reading and one for writing across
/// the migration; after it (the host sends `go` on /dev/ttyS2), the held files are read
/// and written through the same descriptors, the page cache dropped so that every
/// read reaches the device, checksums compared, more files made and the directory
/// listed.
const MIGRATING: &str = r#"
set -e
mkdir /mnt/d
seq 1 20000 > /mnt/d/numbers
echo hello > /mnt/d/a
head -c 300000 /dev/urandom > /mnt/d/rand
(cd /mnt/d && md5sum numbers rand a > /tmp/sums)
echo before > /mnt/d/held
exec 3>>/mnt/d/held
exec 4</mnt/d/numbers
# Requests in flight while QEMU copies memory: every reply the device writes into
# guest memory must reach the destination (the device logs the pages it dirties).
(
  n=0
  while [ ! -e /tmp/stop ]; do
    cat /mnt/d/rand > /mnt/d/copy
    echo 1 > /proc/sys/vm/drop_caches
    [ "$(md5sum < /mnt/d/copy)" = "$(md5sum < /mnt/d/rand)" ] || echo "@@mismatch in round $n"
    n=$((n+1))
  done
  rm /mnt/d/copy
  echo "busy rounds: $n"
) &
busy=$!
stty -F /dev/ttyS2 raw -echo
echo @@ready
read -r go < /dev/ttyS2
echo "go: $go"
touch /tmp/stop
wait $busy
echo after >&3
exec 3>&-
sync
echo 3 > /proc/sys/vm/drop_caches
echo @@begin held
cat /mnt/d/held
echo @@end held
echo "first line through the held descriptor: $(head -n 1 <&4)"
exec 4<&-
(cd /mnt/d && md5sum -c /tmp/sums)
for i in 1 2 3 4 5; do echo "new $i" > /mnt/d/new$i; done
mkdir /mnt/d/sub && mv /mnt/d/new5 /mnt/d/sub/
rm /mnt/d/new4
echo @@begin list
ls /mnt/d | sort
echo @@end list
"#;

/// Boots a guest on `source`'s device, live-migrates it to a second QEMU whose device is
/// `dest` (serving the same backend), lets the script go on there and returns what it
/// printed after the migration. Both servers must exit on their own when their QEMU
/// goes away.
fn migrate_guest(mut source: VhostServer, mut dest: VhostServer) -> GuestRun {
    use fsva_tests::guest::{LiveGuest, Qemu};
    let qemu = Qemu::for_migration();
    let image = GuestImage::build(&[], MIGRATING);
    let spec = GuestSpec {
        memory_mib: 256,
        ..GuestSpec::new(1, Duration::from_secs(120))
    };
    let t0 = std::time::Instant::now();
    let mut from = LiveGuest::start(&qemu, &image, &source.socket, "fsva", spec, None);
    assert!(
        from.wait_output("@@ready", Duration::from_secs(120)),
        "the guest did not get ready; output:\n{}\nconsole:\n{}",
        from.output(),
        from.console()
    );
    let uri = from.dir().join("migrate.sock");
    let to = LiveGuest::start(&qemu, &image, &dest.socket, "fsva", spec, Some(&uri));
    let took = from.migrate(&uri, Duration::from_secs(120));
    let took = took.unwrap_or_else(|e| {
        panic!(
            "the migration failed: {e}\nsource console:\n{}\ndestination console:\n{}",
            from.console(),
            to.console()
        )
    });
    eprintln!("migrated in {took:?}");
    from.quit();
    let status = source.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "the source's serve-vhost did not end cleanly when its QEMU quit: {status:?}"
    );
    to.send_line("go");
    let run = to.wait_exit(Duration::from_secs(120));
    assert_eq!(
        run.exit(),
        Some(0),
        "guest output after the migration:\n{}\nconsole:\n{}",
        run.output,
        run.console
    );
    let has = |line: &str| run.output.lines().any(|l| l == line);
    assert!(has("go: go"), "{}", run.output);
    let rounds: u32 = run
        .output
        .lines()
        .find_map(|l| l.strip_prefix("busy rounds: ")?.parse().ok())
        .unwrap_or(0);
    assert!(
        rounds > 0,
        "no request ran around the migration:\n{}",
        run.output
    );
    assert!(!run.output.contains("@@mismatch"), "{}", run.output);
    assert_eq!(run.section("held"), ["before", "after"], "{}", run.output);
    for line in [
        "first line through the held descriptor: 1",
        "numbers: OK",
        "rand: OK",
        "a: OK",
    ] {
        assert!(has(line), "{line} missing:\n{}", run.output);
    }
    assert_eq!(
        run.section("list"),
        ["a", "held", "new1", "new2", "new3", "numbers", "rand", "sub"],
        "{}",
        run.output
    );
    let status = dest.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "the destination's serve-vhost: {status:?}"
    );
    eprintln!("whole migration test: {:?}", t0.elapsed());
    run
}

/// A guest migrated by QEMU keeps its open files on mem: the contents travel by value
/// in the device state. The device in the appliance on both ends.
#[test]
fn migrated_guest_keeps_its_open_files_on_mem() {
    let source = VhostServer::start(&["--backend", "mem"]);
    let dest = VhostServer::start(&["--backend", "mem"]);
    migrate_guest(source, dest);
}

/// The same with the device in the supervisor on both ends: the destination starts an
/// appliance restored from the state and moves its relay to it.
#[test]
fn migrated_guest_keeps_its_open_files_on_relayed_mem() {
    let source = VhostServer::start(&["--backend", "mem", "--relay"]);
    let dest = VhostServer::start(&["--backend", "mem", "--relay"]);
    migrate_guest(source, dest);
}

/// A passthrough export both ends serve (shared storage): the state carries no
/// descriptors, the destination finds the nodes again by path. Relayed on the source,
/// in the appliance on the destination: the state is the same either way.
#[test]
fn migrated_guest_keeps_its_open_files_on_passthrough() {
    for (from, to) in [("--relay", "--queues=1"), ("--queues=1", "--relay")] {
        let export = Scratch::new("vhost-migrate");
        export.open_to_all();
        let spec = format!("passthrough:{}", export.path.display());
        let source = VhostServer::start(&["--backend", &spec, from]);
        let dest = VhostServer::start(&["--backend", &spec, to]);
        migrate_guest(source, dest);
        let held = std::fs::read_to_string(export.path.join("d/held")).unwrap();
        assert_eq!(held, "before\nafter\n");
        assert!(export.path.join("d/sub/new5").exists());
        assert!(!export.path.join("d/new4").exists());
    }
}

/// A destination that refuses the state (it serves another backend) fails the
/// migration, and the guest carries on at the source, its files intact.
#[test]
fn a_refused_state_fails_the_migration_and_the_guest_stays() {
    use fsva_tests::guest::{LiveGuest, Qemu};
    let export = Scratch::new("vhost-refuse");
    let spec = format!("passthrough:{}", export.path.display());
    let source = VhostServer::start(&["--backend", "mem"]);
    let mut dest = VhostServer::start(&["--backend", &spec]);
    let qemu = Qemu::for_migration();
    let image = GuestImage::build(&[], MIGRATING);
    let spec = GuestSpec {
        memory_mib: 256,
        ..GuestSpec::new(1, Duration::from_secs(120))
    };
    let mut from = LiveGuest::start(&qemu, &image, &source.socket, "fsva", spec, None);
    assert!(
        from.wait_output("@@ready", Duration::from_secs(120)),
        "{}",
        from.output()
    );
    let uri = from.dir().join("migrate.sock");
    let mut to = LiveGuest::start(&qemu, &image, &dest.socket, "fsva", spec, Some(&uri));
    // The source learns of the destination's failure over the return path.
    let cap = r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"return-path","state":true}]}}"#;
    assert!(from.qmp(cap).contains("return"));
    assert!(to.qmp(cap).contains("return"));
    let failed = from.migrate(&uri, Duration::from_secs(120));
    assert!(failed.is_err(), "the migration went through: {failed:?}");
    drop(to);
    assert!(dest.wait_exit(Duration::from_secs(60)).is_some());
    from.send_line("go");
    let run = from.wait_exit(Duration::from_secs(120));
    assert_eq!(run.exit(), Some(0), "{}\n{}", run.output, run.console);
    assert_eq!(run.section("held"), ["before", "after"], "{}", run.output);
    assert!(!run.output.contains("@@mismatch"), "{}", run.output);
}

/// A VMM's side of a vhost-user connection, far enough for state transfers.
struct FakeVmm(vhost::vhost_user::Frontend);

impl FakeVmm {
    fn connect(socket: &std::path::Path) -> FakeVmm {
        use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
        use vhost::VhostBackend;
        let mut f = Frontend::connect(socket, 2).expect("connecting to the device");
        f.set_owner().unwrap();
        let features = f.get_features().unwrap();
        assert_ne!(
            features & (1 << 26),
            0,
            "the device does not log dirty pages"
        );
        f.set_features(features).unwrap();
        let protocol = f.get_protocol_features().unwrap();
        assert!(
            protocol.contains(
                VhostUserProtocolFeatures::DEVICE_STATE | VhostUserProtocolFeatures::LOG_SHMFD
            ),
            "{protocol:?}"
        );
        f.set_protocol_features(protocol).unwrap();
        FakeVmm(f)
    }

    /// The device's state, as a VMM saves it.
    fn save(&self) -> Result<Vec<u8>, String> {
        use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
        use vhost::vhost_user::VhostUserFrontend;
        let (r, w) = rustix::pipe::pipe().unwrap();
        let reply = self
            .0
            .set_device_state_fd(
                VhostTransferStateDirection::SAVE,
                VhostTransferStatePhase::STOPPED,
                w,
            )
            .map_err(|e| e.to_string())?;
        assert!(reply.is_none(), "the device wants another pipe");
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(r), &mut bytes).unwrap();
        self.0.check_device_state().map_err(|e| e.to_string())?;
        Ok(bytes)
    }

    /// Hands the device `bytes` as a state to load; its verdict.
    fn load(&self, bytes: &[u8]) -> Result<(), String> {
        use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};
        use vhost::vhost_user::VhostUserFrontend;
        let (r, w) = rustix::pipe::pipe().unwrap();
        self.0
            .set_device_state_fd(
                VhostTransferStateDirection::LOAD,
                VhostTransferStatePhase::STOPPED,
                r,
            )
            .map_err(|e| e.to_string())?;
        let bytes = bytes.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = std::io::Write::write_all(&mut std::fs::File::from(w), &bytes);
        });
        writer.join().unwrap();
        self.0.check_device_state().map_err(|e| e.to_string())
    }
}

/// The state of a fresh device of `args`, saved as a VMM would.
fn saved_state(args: &[&str]) -> Vec<u8> {
    let mut server = VhostServer::start(args);
    let vmm = FakeVmm::connect(&server.socket);
    let state = vmm.save().expect("saving a fresh device's state");
    drop(vmm);
    assert!(server.wait_exit(Duration::from_secs(30)).is_some());
    state
}

/// Hostile, truncated or foreign states handed to a device by its VMM are refused with
/// an error the VMM sees, the device (in the appliance or relayed) goes on, and a good
/// state still loads after them.
#[test]
fn hostile_device_states_are_refused_and_the_device_lives_on() {
    let export = Scratch::new("vhost-state");
    let spec = format!("passthrough:{}", export.path.display());
    let good = saved_state(&["--backend", "mem"]);
    let foreign = saved_state(&["--backend", &spec, "--relay"]);
    let mut junk_state = Vec::new();
    fsva_vhost::state_stream::write(&mut junk_state, b"not an appliance state", &[]).unwrap();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let hostile: [(&str, &[u8]); 6] = [
        ("empty", b""),
        ("garbage", b"this is no device state at all"),
        ("truncated", &good[..good.len() - 9]),
        ("corrupted", &flipped),
        ("not an appliance state inside", &junk_state),
        ("another backend's state", &foreign),
    ];
    for args in [
        &["--backend", "mem"][..],
        &["--backend", "mem", "--relay"][..],
    ] {
        let mut server = VhostServer::start(args);
        let pid = server.appliance_pid();
        let vmm = FakeVmm::connect(&server.socket);
        for (what, bytes) in hostile {
            assert!(vmm.load(bytes).is_err(), "{args:?}: {what} was accepted");
            assert!(
                server.wait_exit(Duration::from_millis(1)).is_none(),
                "{args:?}: the server died on {what}"
            );
        }
        // Nothing of that reached the appliance, which still serves.
        assert_eq!(server.appliance_pid(), pid, "{args:?}");
        vmm.load(&good).expect("a good state after hostile ones");
        assert!(vmm.save().is_ok(), "{args:?}: saving after a load");
        drop(vmm);
        let status = server.wait_exit(Duration::from_secs(30));
        assert!(status.is_some_and(|s| s.success()), "{args:?}: {status:?}");
    }
}
