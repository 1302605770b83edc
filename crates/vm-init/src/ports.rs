//! Finding a virtio-serial port by the name the host gave it. Without udev there are no
//! /dev/virtio-ports/NAME links: the name is in /sys/class/virtio-ports/vportXpY/name
//! and the device node devtmpfs made is /dev/vportXpY. This module only opens ports.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

/// Opens the port named `name`, waiting up to five seconds for it to appear.
pub fn open(name: &str) -> Result<OwnedFd, String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(dev) = find(name) {
            return rustix::fs::open(
                &dev,
                rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| format!("opening the {name} port {dev}: {e}"));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no virtio-serial port named {name}: the VM was started without it"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn find(name: &str) -> Option<String> {
    std::fs::read_dir("/sys/class/virtio-ports")
        .ok()?
        .flatten()
        .find(|e| std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == name))
        .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
}
