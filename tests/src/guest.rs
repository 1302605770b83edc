//! A user VM for tests and benchmarks: Debian's stock kernel (the host's
//! linux-image-amd64) booted under QEMU with a busybox initramfs whose `/init` loads the
//! stock virtio and virtiofs modules, mounts the virtio-fs device with
//! `mount -t virtiofs TAG /mnt`, runs a script and powers off. Nothing of fsva runs in
//! the guest; the script's output comes back on the second serial port.

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

/// The newest stock kernel in /boot and its release.
pub fn stock_kernel() -> (PathBuf, String) {
    let mut kernels: Vec<String> = std::fs::read_dir("/boot")
        .expect("reading /boot")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_prefix("vmlinuz-").map(str::to_string))
        .collect();
    kernels.sort();
    let release = kernels
        .pop()
        .expect("no /boot/vmlinuz-*: scripts/setup.sh installs linux-image-amd64");
    (PathBuf::from(format!("/boot/vmlinuz-{release}")), release)
}

/// A guest initramfs holding busybox, the stock modules virtiofs needs, `binaries`
/// (with the shared libraries they load, at their host paths) and `script`.
pub struct GuestImage {
    _dir: Scratch,
    pub initrd: PathBuf,
    pub kernel: PathBuf,
}

impl GuestImage {
    pub fn build(binaries: &[&Path], script: &str) -> GuestImage {
        let dir = Scratch::new("guest");
        let root = dir.path.join("root");
        for d in ["bin", "proc", "sys", "dev", "mnt", "tmp", "etc", "usr/bin"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        copy_to(&root, Path::new("/bin/busybox"), "bin/busybox");
        let (kernel, release) = stock_kernel();
        let mut order = String::new();
        for module in ["virtio_pci", "virtiofs"] {
            let out = Command::new("modprobe")
                .args(["-S", &release, "--show-depends", module])
                .output()
                .expect("running modprobe (kmod)");
            assert!(
                out.status.success(),
                "modprobe cannot resolve {module} for {release}"
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
            kernel,
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
    /// How long the guest may run before it is killed (and the run fails).
    pub limit: Duration,
}

impl GuestSpec {
    pub fn new(cpus: u32, limit: Duration) -> GuestSpec {
        GuestSpec {
            cpus,
            memory_mib: 512,
            limit,
        }
    }
}

/// Boots `image` under TCG with a vhost-user-fs device on `socket`, mounted by tag
/// `tag`, and waits for it to power off.
pub fn boot(image: &GuestImage, socket: &Path, tag: &str, spec: GuestSpec) -> GuestRun {
    let dir = Scratch::new("guest-run");
    let console = dir.path.join("console");
    let output = dir.path.join("output");
    let GuestSpec {
        cpus,
        memory_mib,
        limit,
    } = spec;
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
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
            "vhost-user-fs-pci,chardev=fs,tag={tag},queue-size=1024"
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
        .stdout(std::process::Stdio::null())
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

/// A running `fsva serve-vhost`, stopped (SIGTERM) when dropped.
pub struct VhostServer {
    child: std::process::Child,
    pub socket: PathBuf,
    _dir: Scratch,
}

impl VhostServer {
    /// Starts `fsva serve-vhost --socket S` with `args` and waits for its socket.
    pub fn start(args: &[&str]) -> VhostServer {
        let dir = Scratch::new("vhost");
        let socket = dir.path.join("fs.sock");
        let child = Command::new(crate::binary("fsva"))
            .arg("serve-vhost")
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("starting fsva serve-vhost");
        let mut server = VhostServer {
            child,
            socket,
            _dir: dir,
        };
        let up = crate::wait_for(Duration::from_secs(240), || {
            server.socket.exists() && server.appliance_pid().is_some()
                || server.child.try_wait().unwrap().is_some()
        });
        assert!(
            up && server.child.try_wait().unwrap().is_none(),
            "fsva serve-vhost {args:?} did not start"
        );
        server
    }

    /// The appliance process (the server's child).
    pub fn appliance_pid(&self) -> Option<u32> {
        let pid = self.child.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
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
