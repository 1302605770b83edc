//! A user VM for tests and benchmarks: Debian's stock kernel (the host's
//! linux-image-amd64) booted under QEMU with a busybox initramfs whose `/init` loads the
//! stock virtio and virtiofs modules, mounts the virtio-fs device with
//! `mount -t virtiofs TAG /mnt`, runs a script and powers off. Nothing of fsva runs in
//! the guest; the script's output comes back on the second serial port. A second
//! kernel, bookworm-backports' 6.12 ([`GuestKernel::multi_queue`]), spreads virtiofs
//! requests over several request queues, which Debian 12's 6.1 does not.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::Scratch;

/// Where the guest's /init writes the script's output, then `@@exit N`.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in $(cat /etc/modules.order); do insmod "$m" || echo "insmod $m failed" > /dev/ttyS1; done
tag=$(sed -n 's/.*fsva.tag=\([^ ]*\).*/\1/p' /proc/cmdline)
if mount -t virtiofs "$tag" /mnt; then
  sh /script > /dev/ttyS1 2>&1
  echo "@@exit $?" > /dev/ttyS1
  umount /mnt || echo "@@umount failed" > /dev/ttyS1
else
  echo "@@mount failed" > /dev/ttyS1
fi
sync
poweroff -f
"#;

/// Where `scripts/setup.sh --test-tools` unpacks a guest kernel whose virtiofs driver
/// spreads requests over several request queues (Linux 6.11 and later; Debian 12's own
/// is 6.1): bookworm-backports' linux-image, unpacked, not installed.
pub const MULTI_QUEUE_KERNEL_DIR: &str = "/var/cache/fsva/guest-kernel-mq";

/// A kernel to boot user VMs with, and where its modules are.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    /// The kernel image QEMU boots (`boot/vmlinuz-RELEASE` under `root`).
    pub image: PathBuf,
    /// Its release string, as `uname -r` prints it and `lib/modules/` names it.
    pub release: String,
    /// The root its `boot/` and `lib/modules/` are under: `/` for the system's.
    pub root: PathBuf,
}

impl GuestKernel {
    /// The newest stock kernel in /boot.
    pub fn stock() -> GuestKernel {
        GuestKernel::newest_under(Path::new("/"))
            .expect("no /boot/vmlinuz-*: scripts/setup.sh installs linux-image-amd64")
    }

    /// The multi-queue guest kernel: `FSVA_MQ_GUEST_KERNEL` (a directory as `dpkg -x`
    /// unpacks a linux-image package, with a modules.dep) or [`MULTI_QUEUE_KERNEL_DIR`].
    pub fn multi_queue() -> GuestKernel {
        let root = std::env::var_os("FSVA_MQ_GUEST_KERNEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(MULTI_QUEUE_KERNEL_DIR));
        GuestKernel::newest_under(&root).unwrap_or_else(|| {
            panic!(
                "no kernel under {}: the multi-queue guests need Linux 6.11 or later \
                 (Debian 12's is 6.1); `scripts/setup.sh --test-tools` unpacks \
                 bookworm-backports' there",
                root.display()
            )
        })
    }

    /// The kernel under `root/boot` with the highest version (6.10 is newer than 6.9).
    fn newest_under(root: &Path) -> Option<GuestKernel> {
        let release = std::fs::read_dir(root.join("boot"))
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_prefix("vmlinuz-").map(str::to_string))
            .max_by_key(|r| version_key(r))?;
        Some(GuestKernel {
            image: root.join(format!("boot/vmlinuz-{release}")),
            release,
            root: root.to_path_buf(),
        })
    }
}

/// The numbers in a kernel release, in order, to compare releases as versions:
/// "6.12.9+bpo-amd64" gives [6, 12, 9].
fn version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// A guest initramfs holding busybox, the stock modules virtiofs needs, `binaries`
/// (with the shared libraries they load, at their host paths) and `script`.
pub struct GuestImage {
    _dir: Scratch,
    pub initrd: PathBuf,
    pub kernel: PathBuf,
}

impl GuestImage {
    /// An image around the stock kernel.
    pub fn build(binaries: &[&Path], script: &str) -> GuestImage {
        GuestImage::build_on(&GuestKernel::stock(), binaries, script)
    }

    /// An image around `kernel`, with the modules it needs for virtiofs (none where
    /// they are built in).
    pub fn build_on(kernel: &GuestKernel, binaries: &[&Path], script: &str) -> GuestImage {
        let dir = Scratch::new("guest");
        let root = dir.path.join("root");
        for d in ["bin", "proc", "sys", "dev", "mnt", "tmp", "etc", "usr/bin"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        copy_to(&root, Path::new("/bin/busybox"), "bin/busybox");
        let mut order = String::new();
        for module in ["virtio_pci", "virtiofs"] {
            let out = Command::new("modprobe")
                .arg("-d")
                .arg(&kernel.root)
                .args(["-S", &kernel.release, "--show-depends", module])
                .output()
                .expect("running modprobe (kmod)");
            assert!(
                out.status.success(),
                "modprobe cannot resolve {module} for {}",
                kernel.release
            );
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let Some(path) = line.strip_prefix("insmod ").map(str::trim) else {
                    continue; // built in
                };
                if !order.contains(path) {
                    copy_to(&root, Path::new(path), path.trim_start_matches('/'));
                    order.push_str(path);
                    order.push('\n');
                }
            }
        }
        std::fs::write(root.join("etc/modules.order"), order).unwrap();
        for b in binaries {
            let name = b.file_name().unwrap().to_string_lossy().into_owned();
            copy_to(&root, b, &format!("usr/bin/{name}"));
            for lib in shared_libraries(b) {
                copy_to(&root, &lib, lib.to_str().unwrap().trim_start_matches('/'));
            }
        }
        write_exec(&root.join("init"), INIT);
        write_exec(&root.join("script"), script);
        let initrd = dir.path.join("initrd.cpio");
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd {} && find . | cpio -o -H newc --quiet > {}",
                root.display(),
                initrd.display()
            ))
            .status()
            .expect("running cpio");
        assert!(status.success(), "cpio failed");
        GuestImage {
            _dir: dir,
            initrd,
            kernel: kernel.image.clone(),
        }
    }
}

fn write_exec(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn copy_to(root: &Path, from: &Path, rel: &str) {
    let to = root.join(rel);
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
}

/// The shared libraries `binary` loads, as `ldd` resolves them (none if static).
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .expect("running ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// What a guest run printed.
#[derive(Debug)]
pub struct GuestRun {
    /// The script's output (second serial port).
    pub output: String,
    /// The kernel console (first serial port), for failure messages.
    pub console: String,
    pub elapsed: Duration,
}

impl GuestRun {
    /// The script's exit status, if it ran.
    pub fn exit(&self) -> Option<i32> {
        self.output
            .lines()
            .find_map(|l| l.strip_prefix("@@exit ")?.trim().parse().ok())
    }

    /// The lines between `@@begin NAME` and `@@end NAME` in the output.
    pub fn section(&self, name: &str) -> Vec<String> {
        self.output
            .lines()
            .skip_while(|l| *l != format!("@@begin {name}"))
            .skip(1)
            .take_while(|l| *l != format!("@@end {name}"))
            .map(str::to_string)
            .collect()
    }
}

/// The user VM's size and patience.
#[derive(Debug, Clone, Copy)]
pub struct GuestSpec {
    pub cpus: u32,
    pub memory_mib: u32,
    /// Request queues of the virtio-fs device (the device must offer as many).
    pub request_queues: u32,
    /// How long the guest may run before it is killed (and the run fails).
    pub limit: Duration,
}

impl GuestSpec {
    pub fn new(cpus: u32, limit: Duration) -> GuestSpec {
        GuestSpec {
            cpus,
            memory_mib: 512,
            request_queues: 1,
            limit,
        }
    }
}

/// A QEMU to boot user VMs with.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub binary: PathBuf,
    /// Firmware and option ROM directories (`-L`), searched in order.
    pub data_dirs: Vec<PathBuf>,
}

/// Where `scripts/setup.sh --test-tools` unpacks a QEMU that can migrate a guest with a
/// vhost-user-fs device (device state: QEMU 8.2 and later; Debian 12's is 7.2). It is
/// bookworm-backports' qemu-system-x86, unpacked beside the system QEMU, not installed.
pub const MIGRATION_QEMU_DIR: &str = "/var/cache/fsva/qemu-migration";

impl Qemu {
    /// The system's `qemu-system-x86_64`.
    pub fn system() -> Qemu {
        Qemu {
            binary: PathBuf::from("qemu-system-x86_64"),
            data_dirs: Vec::new(),
        }
    }

    /// The QEMU for migration tests: `FSVA_MIGRATION_QEMU` (a directory holding
    /// `usr/bin/qemu-system-x86_64`, as `dpkg -x` unpacks it) or
    /// [`MIGRATION_QEMU_DIR`].
    pub fn for_migration() -> Qemu {
        let root = std::env::var_os("FSVA_MIGRATION_QEMU")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(MIGRATION_QEMU_DIR));
        let binary = root.join("usr/bin/qemu-system-x86_64");
        assert!(
            binary.exists(),
            "{} is missing: the migration tests need QEMU 8.2 or later (Debian 12's is 7.2); \
             `scripts/setup.sh --test-tools` unpacks bookworm-backports' QEMU there",
            binary.display()
        );
        Qemu {
            binary,
            // Its own ROMs first, then the system's SeaBIOS (the backport's wants a
            // newer seabios package; the BIOS itself is the same interface).
            data_dirs: vec![
                root.join("usr/share/qemu"),
                PathBuf::from("/usr/share/seabios"),
            ],
        }
    }

    /// A user VM's command line: `image` under TCG with a vhost-user-fs device on
    /// `socket` mounted by tag `tag`; the kernel console on the first serial port
    /// (`console`), the script's output on the second (`output`).
    fn command(
        &self,
        image: &GuestImage,
        socket: &Path,
        tag: &str,
        spec: &GuestSpec,
        console: &Path,
        output: &Path,
    ) -> Command {
        let GuestSpec {
            cpus,
            memory_mib,
            request_queues,
            ..
        } = *spec;
        let mut cmd = Command::new(&self.binary);
        crate::dies_with_test(&mut cmd);
        for dir in &self.data_dirs {
            cmd.arg("-L").arg(dir);
        }
        cmd.args([
            "-machine",
            "q35,accel=tcg",
            "-cpu",
            "max",
            "-nodefaults",
            "-no-reboot",
        ])
        .args(["-display", "none", "-smp", &cpus.to_string(), "-m"])
        .arg(memory_mib.to_string())
        // vhost-user needs the guest's RAM in memory the device process can map.
        .arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=mem,size={memory_mib}M,share=on"
        ))
        .args(["-numa", "node,memdev=mem", "-chardev"])
        .arg(format!("socket,id=fs,path={}", socket.display()))
        .arg("-device")
        .arg(format!(
            "vhost-user-fs-pci,chardev=fs,tag={tag},queue-size=1024,num-request-queues={request_queues}"
        ))
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 fsva.tag={tag}"))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", output.display()))
        .stdout(std::process::Stdio::null());
        cmd
    }
}

/// Boots `image` under TCG with a vhost-user-fs device on `socket`, mounted by tag
/// `tag`, and waits for it to power off.
pub fn boot(image: &GuestImage, socket: &Path, tag: &str, spec: GuestSpec) -> GuestRun {
    let dir = Scratch::new("guest-run");
    let console = dir.path.join("console");
    let output = dir.path.join("output");
    let limit = spec.limit;
    let started = Instant::now();
    let mut child = Qemu::system()
        .command(image, socket, tag, &spec, &console, &output)
        .spawn()
        .expect("starting qemu-system-x86_64 (scripts/setup.sh installs it)");
    let mut timed_out = false;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let run = GuestRun {
        output: std::fs::read_to_string(&output).unwrap_or_default(),
        console: std::fs::read_to_string(&console).unwrap_or_default(),
        elapsed: started.elapsed(),
    };
    assert!(
        !timed_out,
        "the guest did not power off within {limit:?}; output:\n{}\nconsole:\n{}",
        run.output, run.console
    );
    run
}

/// A user VM that runs while the test acts on it: it can be sent lines (its
/// `/dev/ttyS2`) and migrated to another QEMU over QMP. Killed when dropped.
pub struct LiveGuest {
    child: std::process::Child,
    qmp: std::io::BufReader<std::os::unix::net::UnixStream>,
    console: PathBuf,
    output: PathBuf,
    control: PathBuf,
    started: Instant,
    dir: Scratch,
}

impl LiveGuest {
    /// Starts `image` on `qemu` against the device on `socket`. `incoming`: this QEMU
    /// waits for a migration on that unix socket instead of booting.
    pub fn start(
        qemu: &Qemu,
        image: &GuestImage,
        socket: &Path,
        tag: &str,
        spec: GuestSpec,
        incoming: Option<&Path>,
    ) -> LiveGuest {
        let dir = Scratch::new("live-guest");
        let console = dir.path.join("console");
        let output = dir.path.join("output");
        let control = dir.path.join("control.sock");
        let qmp = dir.path.join("qmp.sock");
        let mut cmd = qemu.command(image, socket, tag, &spec, &console, &output);
        cmd.arg("-serial")
            .arg(format!("unix:{},server=on,wait=off", control.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if let Some(path) = incoming {
            cmd.arg("-incoming").arg(format!("unix:{}", path.display()));
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", qemu.binary.display()));
        // QEMU binds the QMP socket before it listens on it: wait for a connection,
        // not for the file, or a connect in between is refused.
        let mut stream = None;
        let up = crate::wait_for(Duration::from_secs(30), || {
            stream = std::os::unix::net::UnixStream::connect(&qmp).ok();
            stream.is_some() || child.try_wait().unwrap().is_some()
        });
        let stream = match stream {
            Some(s) if up && child.try_wait().unwrap().is_none() => s,
            _ => panic!(
                "QEMU did not start; console:\n{}",
                std::fs::read_to_string(&console).unwrap_or_default()
            ),
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut guest = LiveGuest {
            child,
            qmp: std::io::BufReader::new(stream),
            console,
            output,
            control,
            started: Instant::now(),
            dir,
        };
        guest.qmp_line(); // the greeting
        guest.qmp("{\"execute\":\"qmp_capabilities\"}");
        guest
    }

    /// The next QMP line that is not an event.
    fn qmp_line(&mut self) -> String {
        use std::io::BufRead;
        loop {
            let mut line = String::new();
            let n = self.qmp.read_line(&mut line).expect("reading QMP");
            assert!(n > 0, "QMP closed; console:\n{}", self.console());
            if !line.contains("\"event\"") {
                return line;
            }
        }
    }

    /// Sends one QMP command; its answer (a `return` or an `error` line).
    pub fn qmp(&mut self, command: &str) -> String {
        use std::io::Write;
        self.qmp
            .get_mut()
            .write_all(format!("{command}\n").as_bytes())
            .expect("writing to QMP");
        self.qmp_line()
    }

    /// What the guest's script printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// The kernel console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits until the script printed `line`; false after `limit` or if QEMU exited.
    pub fn wait_output(&mut self, line: &str, limit: Duration) -> bool {
        crate::wait_for(limit, || {
            self.output().lines().any(|l| l == line) || self.child.try_wait().unwrap().is_some()
        }) && self.output().lines().any(|l| l == line)
    }

    /// Writes `line` to the guest's `/dev/ttyS2`.
    pub fn send_line(&self, line: &str) {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&self.control)
            .expect("connecting to the guest's control port");
        s.write_all(format!("{line}\n").as_bytes())
            .expect("writing to the guest's control port");
    }

    /// Live-migrates this guest to `to` (a QEMU started with `incoming` = `uri_path`)
    /// and returns how long it took, or QEMU's error.
    pub fn migrate(&mut self, uri_path: &Path, limit: Duration) -> Result<Duration, String> {
        let t0 = Instant::now();
        let answer = self.qmp(&format!(
            "{{\"execute\":\"migrate\",\"arguments\":{{\"uri\":\"unix:{}\"}}}}",
            uri_path.display()
        ));
        if answer.contains("\"error\"") {
            return Err(answer);
        }
        loop {
            let status = self.qmp("{\"execute\":\"query-migrate\"}");
            if status.contains("\"status\": \"completed\"") {
                return Ok(t0.elapsed());
            }
            if status.contains("\"status\": \"failed\"")
                || status.contains("\"status\": \"cancelled\"")
            {
                return Err(status);
            }
            if t0.elapsed() > limit {
                return Err(format!("not done within {limit:?}: {status}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ends this QEMU (a migration's source, once the guest runs elsewhere).
    pub fn quit(mut self) {
        let _ = self.qmp("{\"execute\":\"quit\"}");
        let _ = crate::wait_for(Duration::from_secs(30), || {
            self.child.try_wait().unwrap().is_some()
        });
    }

    /// Waits for the guest to power off; what it printed (on this QEMU).
    pub fn wait_exit(mut self, limit: Duration) -> GuestRun {
        let exited = crate::wait_for(limit, || self.child.try_wait().unwrap().is_some());
        let run = GuestRun {
            output: self.output(),
            console: self.console(),
            elapsed: self.started.elapsed(),
        };
        assert!(
            exited,
            "the guest did not power off within {limit:?}; output:\n{}\nconsole:\n{}",
            run.output, run.console
        );
        run
    }

    /// A scratch directory that lives as long as this guest (for migration sockets).
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }
}

impl Drop for LiveGuest {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running `fsva serve-vhost`, stopped (SIGTERM) when dropped.
pub struct VhostServer {
    child: std::process::Child,
    pub socket: PathBuf,
    /// Where its log goes, if not to the test's stderr.
    log: Option<PathBuf>,
    _dir: Scratch,
}

impl VhostServer {
    /// Starts `fsva serve-vhost --socket S` with `args` and waits for its socket; its
    /// log goes to the test's stderr.
    pub fn start(args: &[&str]) -> VhostServer {
        VhostServer::spawn(args, false)
    }

    /// As [`VhostServer::start`], with the log kept for [`VhostServer::log`].
    pub fn start_logged(args: &[&str]) -> VhostServer {
        VhostServer::spawn(args, true)
    }

    fn spawn(args: &[&str], logged: bool) -> VhostServer {
        let dir = Scratch::new("vhost");
        let socket = dir.path.join("fs.sock");
        let log = logged.then(|| dir.path.join("serve-vhost.log"));
        let mut cmd = Command::new(crate::binary("fsva"));
        crate::dies_with_test(&mut cmd)
            .arg("serve-vhost")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdout(std::process::Stdio::null());
        if let Some(path) = &log {
            // Info level whatever FSVA_LOG says: callers read the per-queue counts.
            cmd.args(["--log", "info"])
                .stderr(std::fs::File::create(path).expect("creating the server's log"));
        }
        let child = cmd.spawn().expect("starting fsva serve-vhost");
        let mut server = VhostServer {
            child,
            socket,
            log,
            _dir: dir,
        };
        let up = crate::wait_for(Duration::from_secs(240), || {
            server.socket.exists() && server.appliance_pid().is_some()
                || server.child.try_wait().unwrap().is_some()
        });
        assert!(
            up && server.child.try_wait().unwrap().is_none(),
            "fsva serve-vhost {args:?} did not start; its log:\n{}",
            server.log()
        );
        server
    }

    /// What the server (and the appliance, whose stderr is the server's) logged so far;
    /// empty unless started with [`VhostServer::start_logged`].
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The appliance process (the server's child).
    pub fn appliance_pid(&self) -> Option<u32> {
        crate::first_child(self.child.id())
    }

    /// Waits (at most `limit`) for the server to exit on its own, as it does when its
    /// VMM disconnects; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for VhostServer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(self.child.id() as i32).unwrap(),
                rustix::process::Signal::TERM,
            );
            if self.wait_exit(Duration::from_secs(60)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}
