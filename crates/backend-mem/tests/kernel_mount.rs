//! A real kernel mount of `MemFs` without the supervisor or a sandbox, for checking the
//! backend against the kernel's FUSE driver (conformance probe, ACL behaviour).
//!
//! Ignored by default; run as root with
//! `FSVA_MEM_MOUNT=/tmp/m cargo test -p fsva-backend-mem --test kernel_mount -- --ignored`
//! and it serves until the mount point is unmounted (`umount /tmp/m`).

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use fsva_appliance::{Server, SessionConfig};
use fsva_backend_mem::{MemConfig, MemFs};
use fsva_channel::fusedev::{clone_session, open_device, FuseDev};
use fsva_channel::Channel;

#[test]
#[ignore = "mounts a file system; needs root and FSVA_MEM_MOUNT"]
fn serve_mount() {
    let Ok(dir) = std::env::var("FSVA_MEM_MOUNT") else {
        eprintln!("FSVA_MEM_MOUNT not set");
        return;
    };
    let dev: OwnedFd = open_device().expect("/dev/fuse");
    let opts = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other",
        dev.as_raw_fd()
    );
    let src = CString::new("fsva-mem-test").unwrap();
    let target = CString::new(dir.clone()).unwrap();
    let fstype = CString::new("fuse.fsva-mem").unwrap();
    let data = CString::new(opts).unwrap();
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    assert_eq!(rc, 0, "mount: {}", std::io::Error::last_os_error());
    let second = clone_session(std::os::fd::AsFd::as_fd(&dev)).expect("clone");
    let fs = Arc::new(MemFs::new(MemConfig::default()));
    let server = Server::new(fs, SessionConfig::default());
    let chans: Vec<Arc<dyn Channel>> =
        vec![Arc::new(FuseDev::new(dev)), Arc::new(FuseDev::new(second))];
    eprintln!("serving {dir}");
    let _ = server.serve(chans, 2);
}
