//! Watching a shared passthrough export for changes made beside the mount.
//!
//! A `passthrough:DIR` export without `--exclusive` may be changed by anyone on the
//! host. Without a watch the kernel may trust what it cached for a second only, and
//! every warm `stat` past that second is a round trip. With one, the appliance lets it
//! trust entries and attributes for a minute, and this module makes the kernel forget
//! what changed beside the mount as it happens:
//!
//! - [`HostWatch::start`] marks the export's whole file system with fanotify (a
//!   filesystem mark is the only kind that reports names created, removed and renamed;
//!   it needs CAP_SYS_ADMIN in the initial namespaces, which the supervisor holds and
//!   the appliance must not), reporting objects by file handle.
//! - [`spawn`]'s thread reads the events, drops those the appliance itself caused (by
//!   pid: the kernel already knows its changes), resolves the rest to host identities
//!   (device, inode) and asks the supervisor loop, which asks the appliance, for the
//!   node ids the kernel knows them by; then it writes the FUSE invalidations.
//!
//! It never decides what a change means for the file system (the appliance maps host
//! objects to nodes, and objects it does not know are nobody's concern), and it never
//! writes a notification from the supervisor loop: an entry invalidation waits for the
//! directory's lock, which a request in flight may hold until an appliance answers.
//!
//! Not seen: a truncate by path (reported as a modification, which the watch does not
//! ask for: every write through the mount's passthrough files would report one) and
//! changes on file systems mounted below the export. The minute bounds those.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use fsva_channel::Channel;
use fsva_control::{HostChanges, Invalidations};
use fsva_protocol::reply::{self, ReplyBuf};

/// Events asked for on the whole file system: names appearing, going and moving (the
/// directories' too) and attribute changes. Only a filesystem mark reports these.
const ENTRY_AND_ATTRIBUTE_EVENTS: u64 = libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_ATTRIB
    | libc::FAN_ONDIR;

/// Events asked for on the host's mount of the export only: writes and closes after
/// writing. Not on the whole file system, because a FUSE passthrough file's writes are
/// its backing file's, made through the appliance's own mount: asked for there, every
/// write through fsva would pass through the watch's marks (13-15% of a 4 KiB random
/// write's cost by hand), for changes the kernel already knows.
const DATA_EVENTS: u64 = libc::FAN_MODIFY | libc::FAN_CLOSE_WRITE;

/// Most names and objects in one request to the appliance (a control message holds
/// 64 KiB; a name up to 255 bytes).
const CHUNK: usize = 200;

/// Events that change a directory's entries.
const ENTRY_EVENTS: u64 =
    libc::FAN_CREATE | libc::FAN_DELETE | libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO;

/// How long events gather after the first before they are handled together: one
/// file written beside the mount reports several (attributes, close), and the mount's
/// own writes report theirs too (a passthrough file's close is the backing file's);
/// handled one by one they cost a wakeup, a round trip to the appliance and a
/// notification each. Changes beside the mount show through it this much later.
const GATHER: std::time::Duration = std::time::Duration::from_millis(10);

/// Most events handled as one batch (the rest wait for the next).
const BATCH_EVENTS: usize = 20_000;

/// `FANOTIFY_METADATA_VERSION` of the event format parsed here.
const METADATA_VERSION: u8 = 3;

/// Size of `struct fanotify_event_metadata`.
const METADATA_LEN: usize = 24;

/// A fanotify group watching one export's file system.
#[derive(Debug)]
pub struct HostWatch {
    fan: OwnedFd,
    /// The export itself: where file handles are opened (any descriptor on the file
    /// system would do).
    export: OwnedFd,
    /// The appliance's processes now, as the supervisor last said
    /// ([`HostWatch::adopt`]).
    appliance: std::sync::Mutex<Vec<u32>>,
    /// The watch thread ended (an error reading events): changes are no longer seen.
    stopped: std::sync::atomic::AtomicBool,
}

impl HostWatch {
    /// Marks the file system holding `export`. Fails where fanotify cannot report file
    /// handles for it, or without CAP_SYS_ADMIN: the mount then keeps short timeouts.
    pub fn start(export_path: &Path) -> io::Result<HostWatch> {
        let flags = libc::FAN_CLOEXEC
            | libc::FAN_CLASS_NOTIF
            | libc::FAN_UNLIMITED_QUEUE
            | libc::FAN_REPORT_FID
            | libc::FAN_REPORT_DFID_NAME;
        // SAFETY: fanotify_init takes two flag words and returns a new descriptor or -1.
        let fd = unsafe {
            libc::fanotify_init(flags, (libc::O_RDONLY | libc::O_LARGEFILE) as libc::c_uint)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by fanotify_init and is owned by nobody else.
        let fan = unsafe { OwnedFd::from_raw_fd(fd) };
        let export = rustix::fs::open(
            export_path,
            // Not O_PATH: open_by_handle_at refuses one as its mount descriptor.
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        let c_path = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(
            export_path.as_os_str(),
        ))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        for (kind, events) in [
            (libc::FAN_MARK_FILESYSTEM, ENTRY_AND_ATTRIBUTE_EVENTS),
            (libc::FAN_MARK_MOUNT, DATA_EVENTS),
        ] {
            // SAFETY: `fan` is live and `c_path` a NUL-terminated path that outlives
            // the call; the mark covers the file system, or the mount, holding it.
            let rc = unsafe {
                libc::fanotify_mark(
                    fan.as_raw_fd(),
                    libc::FAN_MARK_ADD | kind,
                    events,
                    libc::AT_FDCWD,
                    c_path.as_ptr(),
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(HostWatch {
            fan,
            export,
            appliance: Default::default(),
            stopped: Default::default(),
        })
    }

    /// The appliance serving from now on (at start and after every takeover): the
    /// events its processes cause are dropped.
    pub fn adopt(&self, pids: Vec<u32>) {
        *self.appliance.lock().unwrap_or_else(|p| p.into_inner()) = pids;
    }

    fn own_pids(&self) -> Vec<u32> {
        self.appliance
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the watch has stopped (see the log): changes beside the mount then
    /// show only once the kernel's timeouts pass.
    pub fn stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Blocks until events come, lets more gather for [`GATHER`], and returns them
    /// all parsed (at most [`BATCH_EVENTS`] or so).
    fn read_batch(&self, buf: &mut [u8]) -> io::Result<Vec<RawEvent>> {
        let mut events = self.read(buf)?;
        std::thread::sleep(GATHER);
        while events.len() < BATCH_EVENTS && self.ready()? {
            events.extend(self.read(buf)?);
        }
        Ok(events)
    }

    /// Whether a read would return events now.
    fn ready(&self) -> io::Result<bool> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(&self.fan, PollFlags::IN)];
        Ok(poll(&mut fds, Some(&Timespec::default()))? > 0)
    }

    /// Blocks until events come, and returns them parsed.
    fn read(&self, buf: &mut [u8]) -> io::Result<Vec<RawEvent>> {
        let n = loop {
            match rustix::io::read(&self.fan, &mut *buf) {
                Ok(n) => break n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        parse(&buf[..n])
    }

    /// `(dev, ino)` of the object `handle` names, if it still exists.
    fn resolve(&self, handle: &Handle) -> Option<(u64, u64)> {
        let fd = handle.open(self.export.as_fd()).ok()?;
        let st = rustix::fs::fstat(&fd).ok()?;
        Some((st.st_dev, st.st_ino))
    }
}

/// A file handle as fanotify reports it: `struct file_handle` (its byte count and
/// type, then the bytes), kept 4-byte aligned for open_by_handle_at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Handle {
    words: Vec<u32>,
}

impl Handle {
    fn new(handle_type: i32, bytes: &[u8]) -> Handle {
        let mut words = vec![0u32; 2 + bytes.len().div_ceil(4)];
        words[0] = bytes.len() as u32;
        words[1] = handle_type as u32;
        let body: &mut [u8] = zerocopy::IntoBytes::as_mut_bytes(&mut words[2..]);
        body[..bytes.len()].copy_from_slice(bytes);
        Handle { words }
    }

    /// `O_PATH` descriptor of the object (needs CAP_DAC_READ_SEARCH).
    fn open(&self, mount: BorrowedFd<'_>) -> io::Result<OwnedFd> {
        let mut words = self.words.clone();
        // SAFETY: `words` holds a complete `struct file_handle` (handle_bytes, then
        // handle_type, then handle_bytes bytes), 4-byte aligned as the struct is; the
        // kernel reads it during the call and returns a new descriptor or -1.
        let fd = unsafe {
            libc::open_by_handle_at(
                mount.as_raw_fd(),
                words.as_mut_ptr().cast::<libc::file_handle>(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by open_by_handle_at and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// One event as read: who caused it, what happened, and the objects it names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawEvent {
    pid: i32,
    mask: u64,
    /// The directory and the name in it (for an event on a directory itself, the
    /// directory and ".").
    dir: Option<(Handle, Vec<u8>)>,
    /// The object itself.
    object: Option<Handle>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("fanotify event: {what}"),
    )
}

/// Parses what one read of a fanotify group with FAN_REPORT_FID | FAN_REPORT_DFID_NAME
/// returned.
fn parse(b: &[u8]) -> io::Result<Vec<RawEvent>> {
    let mut events = Vec::new();
    let mut at = 0;
    while at < b.len() {
        let len = u32_at(b, at).ok_or_else(|| bad("truncated header"))? as usize;
        let meta_len = u16_at(b, at + 6).ok_or_else(|| bad("truncated header"))? as usize;
        if b[at + 4] != METADATA_VERSION {
            return Err(bad(&format!(
                "format version {}, not {METADATA_VERSION}",
                b[at + 4]
            )));
        }
        if len < meta_len || meta_len < METADATA_LEN || at + len > b.len() {
            return Err(bad(&format!(
                "lengths {len}/{meta_len} at {at} of {}",
                b.len()
            )));
        }
        let mask = u64_at(b, at + 8).ok_or_else(|| bad("truncated header"))?;
        let pid = u32_at(b, at + 20).ok_or_else(|| bad("truncated header"))? as i32;
        let mut event = RawEvent {
            pid,
            mask,
            dir: None,
            object: None,
        };
        let end = at + len;
        let mut info = at + meta_len;
        while info + 4 <= end {
            let kind = b[info];
            let info_len = u16_at(b, info + 2).ok_or_else(|| bad("truncated record"))? as usize;
            if info_len < 4 || info + info_len > end {
                return Err(bad(&format!("record length {info_len}")));
            }
            let record = &b[info..info + info_len];
            // header (4), fsid (8), handle_bytes (4), handle_type (4), handle, [name]
            if matches!(
                kind,
                libc::FAN_EVENT_INFO_TYPE_FID
                    | libc::FAN_EVENT_INFO_TYPE_DFID
                    | libc::FAN_EVENT_INFO_TYPE_DFID_NAME
            ) {
                let bytes = u32_at(record, 12).ok_or_else(|| bad("short handle"))? as usize;
                let handle_type = u32_at(record, 16).ok_or_else(|| bad("short handle"))? as i32;
                let raw = record
                    .get(20..20 + bytes)
                    .ok_or_else(|| bad("short handle"))?;
                let handle = Handle::new(handle_type, raw);
                if kind == libc::FAN_EVENT_INFO_TYPE_FID {
                    event.object = Some(handle);
                } else {
                    let rest = &record[20 + bytes..];
                    let name = rest.split(|&c| c == 0).next().unwrap_or_default();
                    event.dir = Some((handle, name.to_vec()));
                }
            }
            info += info_len;
        }
        events.push(event);
        at = end;
    }
    Ok(events)
}

/// Turns events into host changes: entries of the directories whose names changed,
/// and every object touched (those directories included). `own` are the appliance's
/// pids, whose events are dropped; a handle that no longer opens is left out (a
/// removed object: its entry, if any, still goes).
fn changes(
    watch: &HostWatch,
    events: &[RawEvent],
    own: &[u32],
    overflowed: &mut bool,
) -> HostChanges {
    let mut entries = HashSet::new();
    let mut objects = HashSet::new();
    // One resolution per handle a batch names (a file written many times is one).
    let mut known: std::collections::HashMap<Handle, Option<(u64, u64)>> = Default::default();
    let mut resolve = |h: &Handle| *known.entry(h.clone()).or_insert_with(|| watch.resolve(h));
    for e in events {
        if e.mask & libc::FAN_Q_OVERFLOW != 0 {
            *overflowed = true;
            continue;
        }
        if own.contains(&(e.pid as u32)) {
            continue;
        }
        tracing::trace!(pid = e.pid, mask = e.mask, "a change beside the mount");
        if let Some((dir, name)) = &e.dir {
            if let Some(d) = resolve(dir) {
                if e.mask & ENTRY_EVENTS != 0 && name.as_slice() != b"." {
                    entries.insert((d.0, d.1, name.clone()));
                    objects.insert(d);
                } else if e.object.is_none() {
                    objects.insert(d);
                }
            }
        }
        if let Some(o) = e.object.as_ref().and_then(&mut resolve) {
            objects.insert(o);
        }
    }
    HostChanges {
        entries: entries.into_iter().collect(),
        objects: objects.into_iter().collect(),
    }
}

/// Starts the thread that turns `watch`'s events into invalidations written on `dev`
/// (a clone of the mount's session), for the appliance whose processes are `appliance`.
/// `ask` hands changes to the supervisor loop and waits for what the kernel must
/// forget; `None` means the mount is gone, and the thread ends.
pub fn spawn(
    watch: std::sync::Arc<HostWatch>,
    dev: std::sync::Arc<fsva_channel::fusedev::FuseDev>,
    appliance: Vec<u32>,
    mut ask: impl FnMut(HostChanges) -> Option<Invalidations> + Send + 'static,
) -> io::Result<()> {
    watch.adopt(appliance);
    std::thread::Builder::new()
        .name("fsva-host-watch".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut out = ReplyBuf::with_capacity(4096);
            loop {
                let events = match watch.read_batch(&mut buf) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(error = %e, "reading changes beside the mount failed; they are seen only once the kernel's timeouts pass");
                        watch
                            .stopped
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                };
                let mut overflowed = false;
                let batch = changes(&watch, &events, &watch.own_pids(), &mut overflowed);
                if overflowed {
                    tracing::warn!("the change queue overflowed: changes beside the mount may go unseen for up to the kernel's timeouts");
                }
                for chunk in chunks(batch) {
                    let Some(invalidations) = ask(chunk) else { return };
                    invalidate(&*dev, &mut out, &invalidations);
                }
            }
        })?;
    Ok(())
}

/// `changes` in requests of at most [`CHUNK`] names and [`CHUNK`] objects.
fn chunks(mut changes: HostChanges) -> Vec<HostChanges> {
    let mut out = Vec::new();
    while !changes.entries.is_empty() || !changes.objects.is_empty() {
        let entries = changes
            .entries
            .split_off(changes.entries.len().saturating_sub(CHUNK));
        let objects = changes
            .objects
            .split_off(changes.objects.len().saturating_sub(CHUNK));
        out.push(HostChanges { entries, objects });
    }
    out
}

/// Writes the invalidations. The kernel answers ENOENT for what it no longer caches:
/// nothing to do then.
fn invalidate(dev: &dyn Channel, out: &mut ReplyBuf, what: &Invalidations) {
    for (parent, name) in &what.entries {
        if let Err(e) = dev.send(reply::notify_inval_entry(out, *parent, name)) {
            tracing::trace!(parent, error = %e, "entry invalidation not taken");
        }
    }
    for node in &what.nodes {
        if let Err(e) = dev.send(reply::notify_inval_inode(out, *node, 0, 0)) {
            tracing::trace!(node, error = %e, "inode invalidation not taken");
        }
    }
    tracing::debug!(
        entries = what.entries.len(),
        nodes = what.nodes.len(),
        "invalidated changes made beside the mount"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One event as the kernel lays it out: metadata, then a DFID_NAME record and a FID
    /// record.
    fn event(pid: i32, mask: u64, dir: &[u8], name: &[u8], object: &[u8]) -> Vec<u8> {
        let record = |kind: u8, handle: &[u8], name: Option<&[u8]>| {
            let mut r = vec![kind, 0, 0, 0];
            r.extend_from_slice(&[7u8; 8]); // fsid
            r.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
            r.extend_from_slice(&1i32.to_ne_bytes());
            r.extend_from_slice(handle);
            if let Some(n) = name {
                r.extend_from_slice(n);
                r.push(0);
            }
            while r.len() % 4 != 0 {
                r.push(0);
            }
            let len = r.len() as u16;
            r[2..4].copy_from_slice(&len.to_ne_bytes());
            r
        };
        let mut info = record(libc::FAN_EVENT_INFO_TYPE_DFID_NAME, dir, Some(name));
        info.extend(record(libc::FAN_EVENT_INFO_TYPE_FID, object, None));
        let mut e = Vec::new();
        e.extend_from_slice(&((METADATA_LEN + info.len()) as u32).to_ne_bytes());
        e.push(METADATA_VERSION);
        e.push(0);
        e.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        e.extend_from_slice(&mask.to_ne_bytes());
        e.extend_from_slice(&(-1i32).to_ne_bytes());
        e.extend_from_slice(&pid.to_ne_bytes());
        e.extend(info);
        e
    }

    #[test]
    fn events_parse_into_directory_name_and_object() {
        let mut b = event(42, libc::FAN_CREATE, b"dirhandle", b"new-file", b"objh");
        b.extend(event(7, libc::FAN_ATTRIB, b"d2", b"x", b"o2"));
        let events = parse(&b).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].pid, 42);
        assert_eq!(events[0].mask, libc::FAN_CREATE);
        let (dir, name) = events[0].dir.clone().unwrap();
        assert_eq!(dir, Handle::new(1, b"dirhandle"));
        assert_eq!(name, b"new-file");
        assert_eq!(events[0].object, Some(Handle::new(1, b"objh")));
        assert_eq!(events[1].dir.as_ref().unwrap().1, b"x");
    }

    #[test]
    fn malformed_events_are_errors_not_panics() {
        let good = event(1, libc::FAN_DELETE, b"h", b"n", b"o");
        // Every truncation, a wrong version, and a record running past its event.
        for cut in 1..good.len() {
            assert!(parse(&good[..cut]).is_err(), "a cut at {cut} parsed");
        }
        let mut version = good.clone();
        version[4] = 2;
        assert!(parse(&version).is_err());
        let mut long_record = good.clone();
        long_record[METADATA_LEN + 2..METADATA_LEN + 4].copy_from_slice(&4000u16.to_ne_bytes());
        assert!(parse(&long_record).is_err());
    }

    #[test]
    fn large_batches_go_in_chunks_that_fit_a_control_message() {
        let changes = HostChanges {
            entries: (0..450).map(|i| (1, i, vec![b'x'; 255])).collect(),
            objects: (0..1000).map(|i| (1, i)).collect(),
        };
        let chunks = chunks(changes.clone());
        assert_eq!(chunks.len(), 5);
        let mut entries: Vec<_> = chunks.iter().flat_map(|c| c.entries.clone()).collect();
        let mut objects: Vec<_> = chunks.iter().flat_map(|c| c.objects.clone()).collect();
        entries.sort();
        objects.sort();
        assert_eq!(entries, changes.entries);
        assert_eq!(objects, changes.objects);
        for c in &chunks {
            let bytes =
                postcard::to_allocvec(&fsva_control::ToAppliance::HostChanged(c.clone())).unwrap();
            assert!(bytes.len() < 64 * 1024, "a chunk of {} bytes", bytes.len());
        }
        assert!(super::chunks(HostChanges::default()).is_empty());
    }

    #[test]
    fn handles_keep_their_bytes_and_type() {
        let h = Handle::new(0x81, &[1, 2, 3, 4, 5]);
        assert_eq!(h.words[0], 5);
        assert_eq!(h.words[1], 0x81);
        let body: &[u8] = zerocopy::IntoBytes::as_bytes(&h.words[2..]);
        assert_eq!(&body[..5], &[1, 2, 3, 4, 5]);
    }
}
