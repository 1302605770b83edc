//! FUSE passthrough: the kernel reads and writes the export's files (passthrough
//! backend) or mem's memfds itself, so file data no longer crosses to the appliance;
//! with `--no-passthrough` every read is a request the appliance serves.

use std::io::{Read, Write};

use fsva_tests::{fsva, Mount};

/// Writes 32 MiB through the mount, drops the page cache, reads it back and returns
/// how many requests the appliance served for the read.
fn requests_for_a_32mib_read(m: &Mount) -> u64 {
    let data: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let path = m.path().join("big");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::write("/proc/sys/vm/drop_caches", b"3").unwrap();
    let before = m.requests();
    let mut back = Vec::new();
    std::fs::File::open(&path)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    let served = m.requests() - before;
    assert!(back == data, "data read back differs from what was written");
    // A passthrough export holds the same bytes.
    if let Some(export) = &m.export {
        assert!(
            std::fs::read(export.path.join("big")).unwrap() == data,
            "export differs"
        );
    }
    served
}

#[test]
fn reads_bypass_the_appliance_with_passthrough() {
    let m = Mount::new("passthrough", &[]);
    let served = requests_for_a_32mib_read(&m);
    // open, flush, release, a getattr or two: never one request per chunk of data.
    assert!(
        served < 16,
        "{served} requests for a 32 MiB read: data went through the appliance"
    );
    let status = String::from_utf8_lossy(&fsva(&["status"]).stdout).to_string();
    assert!(status.contains("FUSE passthrough"), "{status}");
    m.unmount();
}

#[test]
fn reads_go_through_the_appliance_without_passthrough() {
    let m = Mount::new("passthrough", &["--no-passthrough"]);
    let served = requests_for_a_32mib_read(&m);
    assert!(
        served >= 32,
        "only {served} requests for 32 MiB without passthrough"
    );
    m.unmount();
}

#[test]
fn mem_reads_come_straight_from_its_memfds() {
    let m = Mount::new("mem", &[]);
    let served = requests_for_a_32mib_read(&m);
    assert!(
        served < 16,
        "{served} requests for a 32 MiB read: data went through the appliance"
    );
    m.unmount();
}

#[test]
fn mem_without_passthrough_serves_reads_itself() {
    let m = Mount::new("mem", &["--no-passthrough"]);
    let served = requests_for_a_32mib_read(&m);
    assert!(
        served >= 32,
        "only {served} requests for 32 MiB without passthrough"
    );
    m.unmount();
}

/// Bytes of `path` resident in the page cache (util-linux fincore).
fn resident_bytes(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "-o", "RES"])
        .arg(path)
        .output()
        .expect("fincore (util-linux)");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn without_passthrough_the_appliance_keeps_no_second_copy() {
    let m = Mount::new("passthrough", &["--no-passthrough"]);
    let path = m.path().join("big");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&vec![7u8; 32 << 20]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    std::fs::write("/proc/sys/vm/drop_caches", b"3").unwrap();
    let mut back = Vec::new();
    std::fs::File::open(&path)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back.len(), 32 << 20);
    // The data was just read through the appliance: the user side caches it, the
    // export's own file must not hold a second copy.
    let export_file = m.export.as_ref().unwrap().path.join("big");
    let resident = resident_bytes(&export_file);
    assert!(
        resident < 4 << 20,
        "the appliance kept {resident} bytes of a 32 MiB file cached: double caching"
    );
    m.unmount();
}
