//! File data: truncate up (zeros) and down, sparse files and SEEK_DATA/SEEK_HOLE,
//! fallocate (mode 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE), copy_file_range and large
//! multi-chunk writes read back intact.

use crate::check::{check, Check, Ctx};
use crate::sys::{self, show};

pub const CHECKS: &[Check] = &[
    check("data.truncate", truncate),
    check("data.write_past_eof", write_past_eof),
    check("data.sparse", sparse),
    check("data.seek_data_hole", seek_data_hole),
    check("data.fallocate", fallocate),
    check("data.punch_hole", punch_hole),
    check("data.copy_file_range", copy_file_range),
    check("data.large_write", large_write),
];

const MIB: i64 = 1 << 20;

fn size(p: impl AsRef<std::path::Path>) -> i64 {
    sys::stat(p).map_or(-1, |s| s.st_size)
}

fn truncate(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, b"0123456789");
    let up = sys::truncate(&p, 5000);
    let size_up = size(&p);
    let data = sys::read_file(&p).unwrap_or_default();
    let zeros =
        data.len() == 5000 && data[10..].iter().all(|b| *b == 0) && &data[..10] == b"0123456789";
    let down = sys::truncate(&p, 3);
    let size_down = size(&p);
    let content = sys::read_file(&p).unwrap_or_default();
    let regrow = sys::truncate(&p, 8);
    let regrown = sys::read_file(&p).unwrap_or_default();
    let _ = sys::mkdir(c.p("d"), 0o755);
    format!(
        "up={} size={} zero_filled={} down={} size={} content={} regrow_zeros={} negative={} dir={} missing={}",
        show(&up),
        size_up,
        zeros,
        show(&down),
        size_down,
        String::from_utf8_lossy(&content),
        regrown == b"012\0\0\0\0\0",
        show(&regrow.and_then(|_| sys::truncate(&p, -1))),
        show(&sys::truncate(c.p("d"), 0)),
        show(&sys::truncate(c.p("missing"), 0)),
    )
}

fn write_past_eof(c: &Ctx) -> String {
    let p = c.p("f");
    let fd = sys::open(&p, libc::O_RDWR | libc::O_CREAT, 0o644).expect("create");
    let _ = sys::write(&fd, b"head");
    let w = sys::pwrite(&fd, b"tail", 10000);
    let data = sys::read_file(&p).unwrap_or_default();
    format!(
        "pwrite={} size={} gap_zero={} tail_ok={}",
        show(&w),
        data.len(),
        data[4..10000].iter().all(|b| *b == 0),
        &data[10000..] == b"tail"
    )
}

fn sparse(c: &Ctx) -> String {
    let p = c.p("f");
    let fd = sys::open(&p, libc::O_RDWR | libc::O_CREAT, 0o644).expect("create");
    let w = sys::pwrite(&fd, b"x", MIB);
    let _ = sys::fsync(&fd);
    let st = sys::fstat(&fd).expect("fstat");
    let hole = sys::pread(&fd, 65536, 4096).unwrap_or_default();
    let end = sys::pread(&fd, 10, MIB - 2).unwrap_or_default();
    format!(
        "write={} size={} blocks_positive={} blocks_less_than_size={} hole_zeros={} hole_len={} tail={:?}",
        show(&w),
        st.st_size,
        st.st_blocks > 0,
        st.st_blocks * 512 < st.st_size,
        hole.iter().all(|b| *b == 0),
        hole.len(),
        end
    )
}

fn seek_data_hole(c: &Ctx) -> String {
    let p = c.p("f");
    let fd = sys::open(&p, libc::O_RDWR | libc::O_CREAT, 0o644).expect("create");
    let _ = sys::pwrite(&fd, &[9u8; 4096], MIB);
    let _ = sys::pwrite(&fd, &[9u8; 4096], 3 * MIB);
    let _ = sys::ftruncate(&fd, 4 * MIB);
    let _ = sys::fsync(&fd);
    let seek = |off: i64, whence: i32| {
        sys::lseek(&fd, off, whence).map_or_else(|e| format!("err={e}"), |v| v.to_string())
    };
    let empty = sys::open(c.p("empty"), libc::O_RDWR | libc::O_CREAT, 0o644).expect("create");
    format!(
        "data_from_0={} hole_from_0={} hole_from_data={} data_from_hole={} data_past_last={} hole_at_eof={} data_at_eof={} hole_past_eof={} empty_data={} empty_hole={}",
        seek(0, libc::SEEK_DATA),
        seek(0, libc::SEEK_HOLE),
        seek(MIB, libc::SEEK_HOLE),
        seek(MIB + 4096, libc::SEEK_DATA),
        seek(3 * MIB + 4096, libc::SEEK_DATA),
        seek(3 * MIB + 4096, libc::SEEK_HOLE),
        seek(4 * MIB, libc::SEEK_DATA),
        seek(4 * MIB + 1, libc::SEEK_HOLE),
        sys::lseek(&empty, 0, libc::SEEK_DATA).map_or_else(|e| format!("err={e}"), |v| v.to_string()),
        sys::lseek(&empty, 0, libc::SEEK_HOLE).map_or_else(|e| format!("err={e}"), |v| v.to_string()),
    )
}

fn fallocate(c: &Ctx) -> String {
    let p = c.p("f");
    let fd = sys::open(&p, libc::O_RDWR | libc::O_CREAT, 0o644).expect("create");
    let r0 = sys::fallocate(&fd, 0, 0, 65536);
    let st0 = sys::fstat(&fd).expect("fstat");
    let zeros =
        sys::pread(&fd, 65536, 0).is_ok_and(|v| v.len() == 65536 && v.iter().all(|b| *b == 0));
    let r1 = sys::fallocate(&fd, libc::FALLOC_FL_KEEP_SIZE, 65536, 65536);
    let st1 = sys::fstat(&fd).expect("fstat");
    let bad = sys::fallocate(&fd, 0, 0, 0);
    let ro = sys::open(&p, libc::O_RDONLY, 0).expect("open");
    let on_ro = sys::fallocate(&ro, 0, 0, 4096);
    format!(
        "mode0={} size={} blocks_cover={} reads_zero={} keep_size={} size={} blocks_grew={} zero_len={} on_rdonly={}",
        show(&r0),
        st0.st_size,
        st0.st_blocks * 512 >= 65536,
        zeros,
        show(&r1),
        st1.st_size,
        st1.st_blocks > st0.st_blocks,
        show(&bad),
        show(&on_ro)
    )
}

fn punch_hole(c: &Ctx) -> String {
    let p = c.p("f");
    let _ = sys::write_file(&p, &sys::pattern(256 * 1024, 1));
    let fd = sys::open(&p, libc::O_RDWR, 0).expect("open");
    let _ = sys::fsync(&fd);
    let st0 = sys::fstat(&fd).expect("fstat");
    let r = sys::fallocate(
        &fd,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        64 * 1024,
        64 * 1024,
    );
    let st1 = sys::fstat(&fd).expect("fstat");
    let data = sys::pread(&fd, 256 * 1024, 0).unwrap_or_default();
    let expect = sys::pattern(256 * 1024, 1);
    let hole_zero =
        data.len() == expect.len() && data[64 * 1024..128 * 1024].iter().all(|b| *b == 0);
    let rest_ok = data.len() == expect.len()
        && data[..64 * 1024] == expect[..64 * 1024]
        && data[128 * 1024..] == expect[128 * 1024..];
    let no_keep = sys::fallocate(&fd, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096);
    format!(
        "punch={} size={} blocks_shrank={} hole_zeros={} rest_intact={} without_keep_size={} seek_hole={}",
        show(&r),
        st1.st_size,
        st1.st_blocks < st0.st_blocks,
        hole_zero,
        rest_ok,
        show(&no_keep),
        sys::lseek(&fd, 0, libc::SEEK_HOLE).map_or_else(|e| format!("err={e}"), |v| v.to_string()),
    )
}

fn copy_file_range(c: &Ctx) -> String {
    let src_data = sys::pattern(10000, 7);
    let _ = sys::write_file(c.p("src"), &src_data);
    let src = sys::open(c.p("src"), libc::O_RDONLY, 0).expect("open");
    let dst = sys::open(c.p("dst"), libc::O_RDWR | libc::O_CREAT, 0o644).expect("create");
    let n = sys::copy_file_range(&src, 100, &dst, 0, 5000);
    let got = sys::read_file(c.p("dst")).unwrap_or_default();
    let past_eof = sys::copy_file_range(&src, 20000, &dst, 0, 100);
    let short = sys::copy_file_range(&src, 9000, &dst, 6000, 5000);
    let size = sys::fstat(&dst).map_or(-1, |s| s.st_size);
    let rw = sys::open(c.p("src"), libc::O_RDWR, 0).expect("open");
    let overlap = sys::copy_file_range(&rw, 0, &rw, 100, 1000);
    let to_rdonly = sys::copy_file_range(&src, 0, &src, 5000, 10);
    format!(
        "copy={} content_ok={} past_eof={} short={} dst_size={} same_file_overlap={} to_rdonly={}",
        sys::val(&n),
        got == src_data[100..5100],
        sys::val(&past_eof),
        sys::val(&short),
        size,
        show(&overlap),
        show(&to_rdonly),
    )
}

fn large_write(c: &Ctx) -> String {
    let p = c.p("f");
    let data = sys::pattern(3 * MIB as usize + 12345, 11);
    let fd = sys::open(&p, libc::O_RDWR | libc::O_CREAT, 0o644).expect("create");
    let mut off = 0;
    let mut chunk = 1000;
    while off < data.len() {
        let end = (off + chunk).min(data.len());
        match sys::write(&fd, &data[off..end]) {
            Ok(n) => off += n,
            Err(e) => return format!("write err={e}"),
        }
        chunk = chunk * 3 % 200_003 + 1;
    }
    let back = sys::read_file(&p).unwrap_or_default();
    format!("size={} content_ok={}", size(&p), back == data)
}
