//! Export support: a file handle taken with name_to_handle_at on an fsva mount opens the
//! same file again with open_by_handle_at, also after the kernel has forgotten the
//! inode (page and dentry caches dropped), where the backend can find it again.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use fsva_tests::{wait_for, Mount};

/// `struct file_handle` with room for any handle.
#[repr(C)]
struct Handle {
    bytes: u32,
    kind: i32,
    data: [u8; 128],
}

fn handle_of(path: &Path) -> Handle {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut h = Handle {
        bytes: 128,
        kind: 0,
        data: [0; 128],
    };
    let mut mount_id = 0;
    // SAFETY: `h` is a file_handle with `bytes` of room after its header; the other
    // pointers are valid for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            c.as_ptr(),
            &mut h as *mut Handle,
            &mut mount_id as *mut i32,
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "name_to_handle_at: {}",
        std::io::Error::last_os_error()
    );
    h
}

fn open_by_handle(mount_root: &Path, h: &mut Handle) -> std::io::Result<std::fs::File> {
    let root = std::fs::File::open(mount_root)?;
    // SAFETY: `h` is a valid file_handle; the result is a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            root.as_raw_fd(),
            h as *mut Handle,
            libc::O_RDONLY,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(std::fs::File::from(unsafe {
        OwnedFd::from_raw_fd(fd as i32)
    }))
}

fn forget_everything() {
    std::fs::write("/proc/sys/vm/drop_caches", b"3").unwrap();
}

#[test]
fn mem_file_handles_survive_the_kernel_forgetting_the_inode() {
    let m = Mount::new("mem", &[]);
    let f = m.path().join("kept");
    std::fs::write(&f, b"found again").unwrap();
    let mut h = handle_of(&f);
    forget_everything();
    let mut s = String::new();
    open_by_handle(m.path(), &mut h)
        .expect("open_by_handle_at after the inode was forgotten")
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "found again");
    // A deleted file's handle is stale, as on any file system, once nothing holds the
    // inode any more. The kernel releases a FUSE file asynchronously and keeps the inode
    // until the appliance has answered that RELEASE, so under load the inode may still
    // be cached, and found by its handle, just after the unlink: wait for that to end.
    std::fs::remove_file(&f).unwrap();
    let mut refused = None;
    assert!(
        wait_for(Duration::from_secs(10), || {
            forget_everything();
            refused = open_by_handle(m.path(), &mut h).err();
            refused.is_some()
        }),
        "the handle of a deleted file still opens it 10 s after the unlink"
    );
    let e = refused.unwrap();
    assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}");
    m.unmount();
}

#[test]
fn passthrough_file_handles_work_while_the_inode_is_known() {
    let m = Mount::new("passthrough", &[]);
    let f = m.path().join("kept");
    std::fs::write(&f, b"still here").unwrap();
    let open = std::fs::File::open(&f).unwrap(); // keeps the inode referenced
    let mut h = handle_of(&f);
    forget_everything();
    let mut s = String::new();
    open_by_handle(m.path(), &mut h)
        .expect("open_by_handle_at of a referenced inode")
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "still here");
    drop(open);
    m.unmount();
}
