//! Memory mappings versus read(2)/write(2): stores through a shared writable mapping
//! seen by pread with and without msync, pwrite seen through an existing mapping,
//! MAP_PRIVATE isolation, and data persisting after munmap/close.

use std::os::fd::OwnedFd;

use crate::check::{check, Check, Ctx};
use crate::sys::{self, show};

pub const CHECKS: &[Check] = &[
    check("mmap.shared_store_visible", shared_store_visible),
    check("mmap.write_visible_in_map", write_visible_in_map),
    check("mmap.private_isolated", private_isolated),
    check("mmap.persist_after_unmap", persist_after_unmap),
];

const LEN: usize = 8192;

/// A mapping that is unmapped on drop.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(fd: &OwnedFd, len: usize, prot: i32, flags: i32) -> sys::Res<Map> {
        // SAFETY: a null address hint without MAP_FIXED (callers pass only MAP_SHARED or
        // MAP_PRIVATE) lets the kernel pick fresh pages, so no existing memory is replaced.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, sys::raw(fd), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(sys::errno());
        }
        Ok(Map {
            ptr: ptr.cast(),
            len,
        })
    }

    fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        // SAFETY: `off + data.len() <= len` (asserted), so the destination lies inside the live
        // mapping, which callers create with PROT_WRITE; a kernel mapping never overlaps `data`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
    }

    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.len);
        let mut v = vec![0u8; len];
        // SAFETY: `off + len <= self.len` (asserted), so the source lies inside the live, readable
        // mapping; `v` is a fresh buffer of `len` bytes that cannot overlap it.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), v.as_mut_ptr(), len) };
        v
    }

    fn msync(&self) -> sys::Res<()> {
        // SAFETY: `ptr`/`len` are exactly the page-aligned range returned by mmap, still mapped.
        sys::cvt(unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) }).map(drop)
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the range this `Map` mapped; no reference into it
        // outlives `self`, and drop runs once, so it is unmapped exactly once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn setup(c: &Ctx) -> OwnedFd {
    let p = c.p("f");
    let _ = sys::write_file(&p, &[b'.'; LEN]);
    sys::open(&p, libc::O_RDWR, 0).expect("open")
}

const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

fn shared_store_visible(c: &Ctx) -> String {
    let fd = setup(c);
    let map = match Map::new(&fd, LEN, RW, libc::MAP_SHARED) {
        Ok(m) => m,
        Err(e) => return format!("mmap err={e}"),
    };
    map.write(10, b"nosync");
    let other_fd = sys::open(c.p("f"), libc::O_RDONLY, 0).expect("open");
    let before_sync = sys::pread(&other_fd, 6, 10).unwrap_or_default();
    map.write(5000, b"synced");
    let s = map.msync();
    let after_sync = sys::pread(&other_fd, 6, 5000).unwrap_or_default();
    let size = sys::fstat(&fd).map_or(-1, |s| s.st_size);
    format!(
        "without_msync_visible={} msync={} with_msync_visible={} size={}",
        before_sync == b"nosync",
        show(&s),
        after_sync == b"synced",
        size
    )
}

fn write_visible_in_map(c: &Ctx) -> String {
    let fd = setup(c);
    let map = match Map::new(&fd, LEN, libc::PROT_READ, libc::MAP_SHARED) {
        Ok(m) => m,
        Err(e) => return format!("mmap err={e}"),
    };
    let _ = map.read(0, 1);
    let w = sys::pwrite(&fd, b"written", 100);
    let other = sys::open(c.p("f"), libc::O_WRONLY, 0).expect("open");
    let w2 = sys::pwrite(&other, b"second", 6000);
    format!(
        "pwrite={} visible={} other_fd_write={} visible={}",
        show(&w),
        map.read(100, 7) == b"written",
        show(&w2),
        map.read(6000, 6) == b"second"
    )
}

fn private_isolated(c: &Ctx) -> String {
    let fd = setup(c);
    let map = match Map::new(&fd, LEN, RW, libc::MAP_PRIVATE) {
        Ok(m) => m,
        Err(e) => return format!("mmap err={e}"),
    };
    map.write(0, b"private");
    let file = sys::pread(&fd, 7, 0).unwrap_or_default();
    let ro = sys::open(c.p("f"), libc::O_RDONLY, 0).expect("open");
    let shared_on_ro = Map::new(&ro, LEN, RW, libc::MAP_SHARED).map(drop);
    format!(
        "file_unchanged={} map_has_private={} shared_writable_on_rdonly_fd={}",
        file == b".......",
        map.read(0, 7) == b"private",
        show(&shared_on_ro)
    )
}

fn persist_after_unmap(c: &Ctx) -> String {
    let fd = setup(c);
    {
        let map = match Map::new(&fd, LEN, RW, libc::MAP_SHARED) {
            Ok(m) => m,
            Err(e) => return format!("mmap err={e}"),
        };
        map.write(4096, b"persist");
    }
    drop(fd);
    let data = sys::read_file(c.p("f")).unwrap_or_default();
    format!(
        "size={} content_persisted={}",
        data.len(),
        data.get(4096..4103) == Some(b"persist")
    )
}
