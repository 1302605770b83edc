//! Finding and mapping the shared-memory region the host offers: an `ivshmem-plain`
//! PCI device (vendor 0x1af4, device 0x1110) whose BAR 2 is the supervisor's memfd.
//! Without a driver, the BAR is mapped through sysfs (`resource2`) after enabling the
//! device. This module only maps; `fsva_channel::shm` decides what goes through it.

use std::path::PathBuf;

use fsva_channel::shm::{End, ShmRegion};

/// The region, or why there is none (the stream then carries everything inline).
pub fn map() -> Result<ShmRegion, String> {
    let dev = find().ok_or("no ivshmem device")?;
    std::fs::write(dev.join("enable"), "1")
        .map_err(|e| format!("enabling {}: {e}", dev.display()))?;
    let resource = dev.join("resource2");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&resource)
        .map_err(|e| format!("opening {}: {e}", resource.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("sizing {}: {e}", resource.display()))?
        .len() as usize;
    ShmRegion::open(&file, len, End::Appliance).map_err(|e| format!("mapping the region: {e}"))
}

fn find() -> Option<PathBuf> {
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    std::fs::read_dir("/sys/bus/pci/devices")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            read(p.join("vendor")).trim() == "0x1af4" && read(p.join("device")).trim() == "0x1110"
        })
}
