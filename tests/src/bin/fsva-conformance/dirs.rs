//! Directories: mkdir/rmdir and their errors, directory link counts, readdir/getdents
//! listings (sorted, with d_type), small-buffer iteration, iteration while entries
//! change, rewind, and fsyncdir.

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;

use crate::check::{check, Check, Ctx};
use crate::sys::{self, show};

pub const CHECKS: &[Check] = &[
    check("dirs.mkdir", mkdir),
    check("dirs.mkdir_errors", mkdir_errors),
    check("dirs.rmdir_errors", rmdir_errors),
    check("dirs.nlink", nlink),
    check("dirs.readdir_types", readdir_types),
    check("dirs.readdir_empty", readdir_empty),
    check("dirs.getdents_small_buffer", getdents_small_buffer),
    check("dirs.readdir_while_changing", readdir_while_changing),
    check("dirs.rewind", rewind),
    check("dirs.fsyncdir", fsyncdir),
];

/// One raw directory entry.
struct Dirent {
    name: String,
    dtype: u8,
}

fn open_dir(p: impl AsRef<std::path::Path>) -> sys::Res<OwnedFd> {
    sys::open(p, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// One getdents64 call with a `buf_size` buffer; empty vector = end of directory.
fn getdents(fd: &OwnedFd, buf_size: usize) -> sys::Res<Vec<Dirent>> {
    let mut buf = vec![0u8; buf_size];
    let n = sys::getdents64(fd, &mut buf)?;
    let mut out = Vec::new();
    let mut off = 0;
    while off < n {
        // struct linux_dirent64 { u64 ino; i64 off; u16 reclen; u8 type; char name[]; }
        let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
        let dtype = buf[off + 18];
        let name_bytes = &buf[off + 19..off + reclen];
        let end = name_bytes
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(name_bytes.len());
        out.push(Dirent {
            name: String::from_utf8_lossy(&name_bytes[..end]).into_owned(),
            dtype,
        });
        off += reclen;
    }
    Ok(out)
}

/// Reads the whole directory with `buf_size` getdents64 calls.
fn list_all(fd: &OwnedFd, buf_size: usize) -> sys::Res<Vec<Dirent>> {
    let mut all = Vec::new();
    loop {
        let batch = getdents(fd, buf_size)?;
        if batch.is_empty() {
            return Ok(all);
        }
        all.extend(batch);
    }
}

fn dtype_name(t: u8) -> &'static str {
    match t {
        libc::DT_REG => "reg",
        libc::DT_DIR => "dir",
        libc::DT_LNK => "lnk",
        libc::DT_FIFO => "fifo",
        libc::DT_CHR => "chr",
        libc::DT_SOCK => "sock",
        libc::DT_UNKNOWN => "unknown",
        _ => "other",
    }
}

fn nlink_of(p: impl AsRef<std::path::Path>) -> i64 {
    sys::stat(p).map_or(-1, |s| s.st_nlink as i64)
}

fn mkdir(c: &Ctx) -> String {
    let r = sys::mkdir(c.p("d"), 0o751);
    let st = sys::stat(c.p("d"));
    format!(
        "mkdir={} type={} mode={} nlink={} uid_is_caller={} gid_is_caller={}",
        show(&r),
        st.as_ref().map_or("?", |s| sys::ftype(s.st_mode)),
        st.as_ref().map_or("?".into(), sys::perm),
        st.as_ref().map_or(-1, |s| s.st_nlink as i64),
        st.as_ref().is_ok_and(|s| s.st_uid == c.uid),
        st.as_ref().is_ok_and(|s| s.st_gid == c.gid),
    )
}

fn mkdir_errors(c: &Ctx) -> String {
    let _ = sys::mkdir(c.p("d"), 0o755);
    let _ = sys::write_file(c.p("f"), b"");
    let _ = sys::symlink("dangling", c.p("l"));
    format!(
        "existing_dir={} existing_file={} missing_parent={} under_file={} dangling_symlink={} trailing_slash={}",
        show(&sys::mkdir(c.p("d"), 0o755)),
        show(&sys::mkdir(c.p("f"), 0o755)),
        show(&sys::mkdir(c.p("nope/x"), 0o755)),
        show(&sys::mkdir(c.p("f/x"), 0o755)),
        show(&sys::mkdir(c.p("l"), 0o755)),
        show(&sys::mkdir(c.p("t/"), 0o755)),
    )
}

fn rmdir_errors(c: &Ctx) -> String {
    let _ = sys::mkdir(c.p("full"), 0o755);
    let _ = sys::write_file(c.p("full/x"), b"");
    let _ = sys::mkdir(c.p("empty"), 0o755);
    let _ = sys::write_file(c.p("f"), b"");
    let _ = sys::symlink("empty", c.p("l"));
    format!(
        "nonempty={} file={} missing={} dot={} dotdot={} symlink_to_dir={} unlink_dir={} empty={} gone={}",
        show(&sys::rmdir(c.p("full"))),
        show(&sys::rmdir(c.p("f"))),
        show(&sys::rmdir(c.p("missing"))),
        show(&sys::rmdir(c.p("empty/."))),
        show(&sys::rmdir(c.p("full/.."))),
        show(&sys::rmdir(c.p("l"))),
        show(&sys::unlink(c.p("empty"))),
        show(&sys::rmdir(c.p("empty"))),
        sys::stat(c.p("empty")).err().map_or("exists".into(), |e| e.to_string()),
    )
}

fn nlink(c: &Ctx) -> String {
    let start = nlink_of(&c.dir);
    let _ = sys::mkdir(c.p("a"), 0o755);
    let after_mkdir = nlink_of(&c.dir);
    let _ = sys::mkdir(c.p("b"), 0o755);
    let _ = sys::write_file(c.p("file"), b"");
    let after_file = nlink_of(&c.dir);
    let _ = sys::rmdir(c.p("a"));
    let after_rmdir = nlink_of(&c.dir);
    format!(
        "empty={start} after_mkdir={after_mkdir} after_mkdir_and_file={after_file} after_rmdir={after_rmdir} child={}",
        nlink_of(c.p("b"))
    )
}

fn readdir_types(c: &Ctx) -> String {
    let _ = sys::write_file(c.p("reg"), b"x");
    let _ = sys::mkdir(c.p("dir"), 0o755);
    let _ = sys::symlink("reg", c.p("lnk"));
    let _ = sys::mknod(c.p("fifo"), libc::S_IFIFO | 0o644, 0);
    let _ = sys::write_file(c.p("name with space"), b"");
    let _ = sys::write_file(c.p("ünïcode"), b"");
    let fd = open_dir(&c.dir).expect("opendir");
    let mut entries: Vec<String> = list_all(&fd, 4096)
        .expect("getdents")
        .into_iter()
        .map(|e| format!("{}/{}", e.name, dtype_name(e.dtype)))
        .collect();
    entries.sort();
    format!("entries={}", entries.join(","))
}

fn readdir_empty(c: &Ctx) -> String {
    let fd = open_dir(&c.dir).expect("opendir");
    let mut names: Vec<String> = list_all(&fd, 4096)
        .expect("getdents")
        .into_iter()
        .map(|e| e.name)
        .collect();
    names.sort();
    let again = getdents(&fd, 4096).map(|v| v.len());
    let file = sys::write_file(c.p("f"), b"");
    let not_dir =
        sys::open(c.p("f"), libc::O_RDONLY, 0).and_then(|f| getdents(&f, 4096).map(|v| v.len()));
    format!(
        "names={} at_end={} getdents_on_file={} {}",
        names.join(","),
        sys::val(&again),
        show(&not_dir),
        show(&file)
    )
}

fn make_files(c: &Ctx, n: usize) {
    for i in 0..n {
        let _ = sys::write_file(c.p(&format!("f{i:03}")), b"");
    }
}

fn getdents_small_buffer(c: &Ctx) -> String {
    make_files(c, 100);
    let fd = open_dir(&c.dir).expect("opendir");
    let tiny = getdents(&fd, 8).map(|v| v.len());
    let all = list_all(&fd, 256).expect("getdents");
    let set: BTreeSet<&str> = all.iter().map(|e| e.name.as_str()).collect();
    let expected: BTreeSet<String> = (0..100).map(|i| format!("f{i:03}")).collect();
    format!(
        "too_small_buffer={} returned={} unique={} all_files_present={} has_dot={} has_dotdot={}",
        show(&tiny),
        all.len(),
        set.len(),
        expected.iter().all(|n| set.contains(n.as_str())),
        set.contains("."),
        set.contains(".."),
    )
}

fn readdir_while_changing(c: &Ctx) -> String {
    make_files(c, 100);
    let fd = open_dir(&c.dir).expect("opendir");
    let mut seen: Vec<String> = getdents(&fd, 512)
        .expect("getdents")
        .into_iter()
        .map(|e| e.name)
        .collect();
    let first_batch = seen.len();
    // Remove every 7th file and add 20 new ones while the iteration is in progress.
    let removed: BTreeSet<String> = (0..100).step_by(7).map(|i| format!("f{i:03}")).collect();
    for name in &removed {
        let _ = sys::unlink(c.p(name));
    }
    for i in 0..20 {
        let _ = sys::write_file(c.p(&format!("g{i:03}")), b"");
    }
    seen.extend(
        list_all(&fd, 512)
            .expect("getdents")
            .into_iter()
            .map(|e| e.name),
    );
    let set: BTreeSet<&str> = seen.iter().map(String::as_str).collect();
    let survivors_seen = (0..100)
        .map(|i| format!("f{i:03}"))
        .filter(|n| !removed.contains(n))
        .all(|n| set.contains(n.as_str()));
    format!(
        "first_batch_partial={} no_duplicates={} all_survivors_returned={} dot_entries={}",
        first_batch < 102,
        set.len() == seen.len(),
        survivors_seen,
        seen.iter().filter(|n| *n == "." || *n == "..").count()
    )
}

fn rewind(c: &Ctx) -> String {
    make_files(c, 5);
    let fd = open_dir(&c.dir).expect("opendir");
    let first = list_all(&fd, 4096).expect("getdents").len();
    let _ = sys::write_file(c.p("late"), b"");
    let seek = sys::lseek(&fd, 0, libc::SEEK_SET);
    let second: Vec<String> = list_all(&fd, 4096)
        .expect("getdents")
        .into_iter()
        .map(|e| e.name)
        .collect();
    format!(
        "first={} seek={} second={} late_seen={}",
        first,
        show(&seek),
        second.len(),
        second.iter().any(|n| n == "late")
    )
}

fn fsyncdir(c: &Ctx) -> String {
    let _ = sys::mkdir(c.p("d"), 0o755);
    let _ = sys::write_file(c.p("d/f"), b"x");
    let fd = open_dir(c.p("d")).expect("opendir");
    format!(
        "fsync={} fdatasync={}",
        show(&sys::fsync(&fd)),
        show(&sys::fdatasync(&fd))
    )
}
