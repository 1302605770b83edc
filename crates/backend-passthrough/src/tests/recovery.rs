//! Crash recovery: records round trip, a successor rebuilds the tables from a
//! checkpoint and the records after it, resent requests are answered exactly once from
//! their intents, and hostile journal contents are refused with a reason.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use fsva_appliance::journal::{self as jnl, Journal, BACKEND};
use fsva_appliance::state::StateError;
use fsva_appliance::{Completed, Keeper};

use super::snapshot::read_some;
use super::*;
use crate::journal::{
    decide, decode_checkpoint, decode_record, encode_checkpoint, encode_record, CheckpointV1,
    IntentV1, OpV1, OutcomeV1, PassthroughCheckpoint, Present, ProbeV1, RecordV1, Trace, Verdict,
};
use crate::snapshot::{HandleKindV1, KeyV1, NodeV1, ObjectV1, SnapshotV1};
use crate::Recovery;

/// The supervisor's keeping, in memory.
#[derive(Default)]
struct TestKeeper {
    fds: Mutex<HashMap<u64, OwnedFd>>,
    checkpoint: Mutex<Option<(Vec<u8>, u64)>>,
}

impl Keeper for TestKeeper {
    fn keep(&self, id: u64, fd: BorrowedFd<'_>) {
        let fd = fd.try_clone_to_owned().unwrap();
        self.fds.lock().unwrap().insert(id, fd);
    }

    fn release(&self, id: u64) {
        self.fds.lock().unwrap().remove(&id);
    }

    fn store_checkpoint(&self, state: &[u8], boundary: u64) -> std::io::Result<()> {
        *self.checkpoint.lock().unwrap() = Some((state.to_vec(), boundary));
        Ok(())
    }
}

/// A journaled backend on a scratch export, with the journal memfd and the keeper a
/// successor gets after it dies.
struct Crashable {
    dir: tempfile::TempDir,
    journal: OwnedFd,
    /// The journal as the appliance serving now has it open.
    current: Mutex<Arc<Journal>>,
    keeper: Arc<TestKeeper>,
}

impl Crashable {
    fn new() -> (Crashable, PassthroughFs) {
        let dir = tempfile::Builder::new()
            .prefix("fsva-ptr-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let journal = jnl::create(1 << 20).unwrap();
        let keeper = Arc::new(TestKeeper::default());
        let current = Mutex::new(Arc::new(
            Journal::open(journal.try_clone().unwrap()).unwrap(),
        ));
        let c = Crashable {
            dir,
            journal,
            current,
            keeper,
        };
        let j = c.current.lock().unwrap().clone();
        let fs = PassthroughFs::journaled(c.config(), j, c.keeper.clone()).unwrap();
        (c, fs)
    }

    fn config(&self) -> PassthroughConfig {
        PassthroughConfig::for_path(self.dir.path()).unwrap()
    }

    fn open_journal(&self) -> Arc<Journal> {
        Arc::new(Journal::open(self.journal.try_clone().unwrap()).unwrap())
    }

    fn path(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join(rel)
    }

    /// Stores a checkpoint as the appliance's checkpointer does.
    fn checkpoint(&self, fs: &PassthroughFs) {
        let j = self.current.lock().unwrap().clone();
        let (bytes, boundary) = fs.journal_checkpoint(&mut || j.rotate()).unwrap();
        self.keeper.store_checkpoint(&bytes, boundary).unwrap();
        j.covered(boundary);
    }

    /// What a successor gets after `fs` died; the journal is then positioned for the
    /// successor (see `current`).
    fn left(&self, fs: PassthroughFs) -> Recovery {
        drop(fs);
        let j = self.open_journal();
        let (checkpoint, boundary) = match self.keeper.checkpoint.lock().unwrap().clone() {
            Some((b, n)) => (Some(b), n),
            None => (None, 0),
        };
        let records = j
            .recover(boundary)
            .unwrap()
            .into_iter()
            .map(|r| {
                assert_eq!(r.payload[0], BACKEND);
                r.payload[1..].to_vec()
            })
            .collect();
        let fds = self
            .keeper
            .fds
            .lock()
            .unwrap()
            .iter()
            .map(|(&id, fd)| (id, fd.try_clone().unwrap()))
            .collect();
        *self.current.lock().unwrap() = j;
        Recovery {
            checkpoint,
            records,
            fds,
        }
    }

    /// The successor of `fs`.
    fn successor(&self, fs: PassthroughFs) -> Result<PassthroughFs, StateError> {
        let left = self.left(fs);
        let j = self.current.lock().unwrap().clone();
        PassthroughFs::recover(self.config(), j, self.keeper.clone(), left)
    }
}

fn at(unique: u64) -> Context {
    Context {
        unique,
        ..Default::default()
    }
}

fn resent(unique: u64) -> Context {
    at(unique | abi::UNIQUE_RESEND)
}

/// Every live node's (id, lookups) and every handle, sorted.
fn tables(fs: &PassthroughFs) -> (Vec<(u64, u64)>, Vec<u64>, u64, u64) {
    let n = fs.nodes.parts();
    let h = fs.handles.parts();
    let mut nodes: Vec<_> = n.live.iter().map(|l| (l.node.id, l.lookups)).collect();
    nodes.sort_unstable();
    let mut handles: Vec<_> = h.live.iter().map(|(fh, _)| *fh).collect();
    handles.sort_unstable();
    (nodes, handles, n.next_id, h.next)
}

#[test]
fn records_and_checkpoints_round_trip() {
    let key = KeyV1 {
        dev: 1,
        ino: 2,
        mnt_id: 3,
    };
    let ops = vec![
        OpV1::NodeNew {
            id: 2,
            key,
            kind: libc::S_IFREG,
            hint: Some((1, b"a".to_vec())),
        },
        OpV1::NodeRef { id: 2, hint: None },
        OpV1::Forget { id: 2, n: 1 },
        OpV1::Rehint { id: 2, hint: None },
        OpV1::Opened {
            fh: 1,
            node: 2,
            kind: HandleKindV1::File { flags: 2 },
        },
        OpV1::Closed { fh: 1 },
        OpV1::Intent(IntentV1::Rename {
            parent: 1,
            name: b"a".to_vec(),
            newparent: 1,
            newname: b"b".to_vec(),
            flags: 0,
            src: ProbeV1::Present(key),
            dst: ProbeV1::Absent,
        }),
        OpV1::Intent(IntentV1::Append { fh: 1, size: 9 }),
        OpV1::Outcome(OutcomeV1::Created { node: 2, fh: 1 }),
    ];
    let rec = RecordV1 { unique: 42, ops };
    let bytes = encode_record(&rec);
    assert_eq!(bytes[0], BACKEND);
    assert_eq!(decode_record(0, &bytes[1..]).unwrap(), rec);

    let c = PassthroughCheckpoint::V1(CheckpointV1 {
        snapshot: SnapshotV1 {
            next_node: 3,
            next_fh: 2,
            nodes: vec![],
            handles: vec![],
        },
        stale_below: 0,
        recent: vec![rec.clone()],
        pending: vec![(43, IntentV1::Append { fh: 1, size: 0 })],
        carried: vec![(44, Trace::default())],
    });
    assert_eq!(decode_checkpoint(&encode_checkpoint(&c)).unwrap(), c);
}

#[test]
fn a_successor_rebuilds_the_tables_from_the_checkpoint_and_the_records_after_it() {
    let (c, fs) = Crashable::new();
    fs::create_dir(c.path("d")).unwrap();
    fs::write(c.path("d/f"), b"data").unwrap();
    let d = fs.lookup(&at(1), ROOT_ID, os("d")).unwrap().ino;
    let f = fs.lookup(&at(2), d, os("f")).unwrap().ino;
    fs.lookup(&at(3), d, os("f")).unwrap();
    let held = fs.open(&at(4), f, libc::O_RDWR as u32, false).unwrap().fh;
    c.checkpoint(&fs);
    // After the checkpoint: a create, a rename, a forget, a directory handle, an
    // unlinked open file, a closed handle.
    let (e, o) = fs
        .create(&at(5), d, os("new"), 0o644, 0, libc::O_RDWR as u32)
        .unwrap();
    fs.rename(&at(6), d, os("new"), ROOT_ID, os("moved"), 0)
        .unwrap();
    fs.forget(f, 1);
    let list = fs.opendir(&at(7), d, 0).unwrap().fh;
    let (gone, go) = fs
        .create(&at(8), d, os("gone"), 0o644, 0, libc::O_RDWR as u32)
        .unwrap();
    fs.write(&at(9), gone.ino, go.fh, 0, b"still here", 0, 0)
        .unwrap();
    fs.unlink(&at(10), d, os("gone")).unwrap();
    let closed = fs
        .open(&at(11), f, libc::O_RDONLY as u32, false)
        .unwrap()
        .fh;
    fs.release(&at(12), f, closed, 0).unwrap();
    let before = tables(&fs);

    let s = c.successor(fs).unwrap();
    assert_eq!(
        tables(&s),
        before,
        "the same nodes, lookups, handles and counters"
    );
    assert_eq!(s.nodes.hint(e.ino).unwrap().parent, ROOT_ID, "renamed");
    // Every handle works on its object.
    let mut out = Vec::new();
    s.read(&root(), f, held, 0, 100, 0, &mut out).unwrap();
    assert_eq!(out, b"data");
    assert_eq!(s.write(&root(), e.ino, o.fh, 0, b"x", 0, 0).unwrap(), 1);
    assert_eq!(fs::read(c.path("moved")).unwrap(), b"x");
    // The unlinked open file survives through the file the supervisor kept.
    out.clear();
    s.read(&root(), gone.ino, go.fh, 0, 100, 0, &mut out)
        .unwrap();
    assert_eq!(out, b"still here");
    assert!(s.getattr(&root(), gone.ino, None).is_ok());
    assert_eq!(read_some(&s, d, list, 0, 4096).len(), 3, "., .. and f");
    assert_eq!(
        s.read(&root(), f, closed, 0, 1, 0, &mut out).unwrap_err().0,
        libc::EBADF
    );
    // Closing hands the kept file back.
    s.release(&at(13), gone.ino, go.fh, 0).unwrap();
    assert!(!c.keeper.fds.lock().unwrap().contains_key(&go.fh));
    assert!(c.keeper.fds.lock().unwrap().contains_key(&held));

    // And its successor again, without a new checkpoint.
    let t = c.successor(s).unwrap();
    assert_eq!(t.handle_count(), before.1.len() - 1);
}

#[test]
fn without_a_checkpoint_the_records_alone_rebuild_the_tables() {
    let (c, fs) = Crashable::new();
    fs.mkdir(&at(1), ROOT_ID, os("d"), 0o755, 0).unwrap();
    let f = fs
        .create(&at(2), ROOT_ID, os("f"), 0o644, 0, libc::O_WRONLY as u32)
        .unwrap();
    let before = tables(&fs);
    let s = c.successor(fs).unwrap();
    assert_eq!(tables(&s), before);
    assert!(s.getattr(&root(), f.0.ino, Some(f.1.fh)).is_ok());
}

#[test]
fn an_object_deleted_behind_the_backs_of_both_appliances_is_stale_and_the_rest_carries_on() {
    let (c, fs) = Crashable::new();
    fs::write(c.path("doomed"), b"1").unwrap();
    fs::write(c.path("fine"), b"2").unwrap();
    let doomed = fs.lookup(&at(1), ROOT_ID, os("doomed")).unwrap().ino;
    let fine = fs.lookup(&at(2), ROOT_ID, os("fine")).unwrap().ino;
    c.checkpoint(&fs);
    fs::remove_file(c.path("doomed")).unwrap();
    let s = c.successor(fs).unwrap();
    assert_eq!(
        s.getattr(&root(), doomed, None).unwrap_err().0,
        libc::ESTALE
    );
    assert!(s.getattr(&root(), fine, None).is_ok());
    s.forget(doomed, 1);
    assert_eq!(s.nodes.lookups(doomed), None, "forgotten at last");
}

#[test]
fn a_node_a_successor_lost_stays_lost_for_the_next_one() {
    let (c, fs) = Crashable::new();
    fs::write(c.path("f"), b"1").unwrap();
    let f = fs.lookup(&at(1), ROOT_ID, os("f")).unwrap().ino;
    // Gone from under its hint when the first successor looks...
    fs::rename(c.path("f"), c.path("away")).unwrap();
    let s = c.successor(fs).unwrap();
    assert_eq!(s.getattr(&root(), f, None).unwrap_err().0, libc::ESTALE);
    // ... and back (as a new object with a recycled inode number would be) before the
    // next one: the node must not come back to life.
    fs::rename(c.path("away"), c.path("f")).unwrap();
    let t = c.successor(s).unwrap();
    assert_eq!(t.getattr(&root(), f, None).unwrap_err().0, libc::ESTALE);
    let again = t.lookup(&at(2), ROOT_ID, os("f")).unwrap().ino;
    assert_ne!(again, f, "a new node for what the name holds now");
    t.forget(f, 1);
    let u = c.successor(t).unwrap();
    assert!(u.getattr(&root(), again, None).is_ok());
    assert_eq!(u.nodes.lookups(f), None, "forgotten for good");
}

#[test]
fn intents_decide_whether_a_change_took_effect() {
    struct Now(HashMap<(u64, Vec<u8>), ProbeV1>, Option<bool>);
    impl Present for Now {
        fn name(&self, parent: u64, name: &[u8]) -> ProbeV1 {
            *self
                .0
                .get(&(parent, name.to_vec()))
                .unwrap_or(&ProbeV1::Absent)
        }
        fn has_xattr(&self, _: u64, _: &[u8]) -> Option<bool> {
            self.1
        }
    }
    let k = |ino| KeyV1 {
        dev: 8,
        ino,
        mnt_id: 1,
    };
    // The same object reached through another mount is the same object.
    let other_mount = |ino| KeyV1 {
        dev: 8,
        ino,
        mnt_id: 99,
    };
    let now = |names: &[(&str, ProbeV1)]| {
        Now(
            names
                .iter()
                .map(|(n, p)| ((1, n.as_bytes().to_vec()), *p))
                .collect(),
            None,
        )
    };
    let make = |before| IntentV1::Make {
        parent: 1,
        name: b"a".to_vec(),
        before,
        open: None,
    };
    use Verdict::{Again, Done};
    assert_eq!(
        decide(
            &make(ProbeV1::Absent),
            &now(&[("a", ProbeV1::Present(k(5)))])
        ),
        Done
    );
    assert_eq!(decide(&make(ProbeV1::Absent), &now(&[])), Again);
    assert_eq!(
        decide(
            &make(ProbeV1::Present(k(5))),
            &now(&[("a", ProbeV1::Present(k(5)))])
        ),
        Again,
        "it existed before: the first run failed with EEXIST, and so does the next"
    );
    let remove = |before| IntentV1::Remove {
        parent: 1,
        name: b"a".to_vec(),
        before,
    };
    assert_eq!(decide(&remove(ProbeV1::Present(k(5))), &now(&[])), Done);
    assert_eq!(
        decide(
            &remove(ProbeV1::Present(k(5))),
            &now(&[("a", ProbeV1::Present(k(6)))])
        ),
        Done,
        "another object took the name since"
    );
    assert_eq!(
        decide(
            &remove(ProbeV1::Present(k(5))),
            &now(&[("a", ProbeV1::Present(other_mount(5)))])
        ),
        Again
    );
    assert_eq!(
        decide(
            &remove(ProbeV1::Present(k(5))),
            &now(&[("a", ProbeV1::Unknown)])
        ),
        Again
    );
    let rename = |flags, dst| IntentV1::Rename {
        parent: 1,
        name: b"a".to_vec(),
        newparent: 1,
        newname: b"b".to_vec(),
        flags,
        src: ProbeV1::Present(k(5)),
        dst,
    };
    assert_eq!(
        decide(
            &rename(0, ProbeV1::Present(k(6))),
            &now(&[("b", ProbeV1::Present(k(5)))])
        ),
        Done
    );
    assert_eq!(
        decide(
            &rename(0, ProbeV1::Absent),
            &now(&[("a", ProbeV1::Present(k(5)))])
        ),
        Again
    );
    assert_eq!(
        decide(
            &rename(0, ProbeV1::Present(k(5))),
            &now(&[("a", ProbeV1::Present(k(5))), ("b", ProbeV1::Present(k(5)))])
        ),
        Again,
        "two links of one file: a rename that does nothing runs again"
    );
    let exchange = rename(libc::RENAME_EXCHANGE, ProbeV1::Present(k(6)));
    assert_eq!(
        decide(
            &exchange,
            &now(&[("a", ProbeV1::Present(k(6))), ("b", ProbeV1::Present(k(5)))])
        ),
        Done
    );
    assert_eq!(
        decide(
            &exchange,
            &now(&[("a", ProbeV1::Present(k(5))), ("b", ProbeV1::Present(k(6)))])
        ),
        Again
    );
    let link = IntentV1::Link {
        node: 7,
        key: k(5),
        newparent: 1,
        newname: b"l".to_vec(),
        before: ProbeV1::Absent,
    };
    assert_eq!(decide(&link, &now(&[("l", ProbeV1::Present(k(5)))])), Done);
    assert_eq!(decide(&link, &now(&[("l", ProbeV1::Present(k(6)))])), Again);
    let xattr = |present, remove| IntentV1::Xattr {
        node: 1,
        name: b"user.x".to_vec(),
        present,
        remove,
    };
    let has = |h| Now(HashMap::new(), h);
    assert_eq!(decide(&xattr(false, false), &has(Some(true))), Done);
    assert_eq!(decide(&xattr(false, false), &has(Some(false))), Again);
    assert_eq!(decide(&xattr(true, true), &has(Some(false))), Done);
    assert_eq!(decide(&xattr(true, true), &has(None)), Again);
}

/// Writes an intent of request `u` the way `fs` would before a system call.
fn intent(fs: &PassthroughFs, u: u64, i: IntentV1) {
    fs.recovery
        .as_ref()
        .unwrap()
        .recorder
        .record(u, vec![OpV1::Intent(i)]);
}

fn probe_of(c: &Crashable, rel: &str) -> ProbeV1 {
    match fs::symlink_metadata(c.path(rel)) {
        Ok(m) => ProbeV1::Present(KeyV1 {
            dev: m.dev(),
            ino: m.ino(),
            mnt_id: 0,
        }),
        Err(_) => ProbeV1::Absent,
    }
}

#[test]
fn a_change_made_before_the_crash_is_answered_once_and_one_that_was_not_runs() {
    let (c, fs) = Crashable::new();
    let d = fs.mkdir(&at(1), ROOT_ID, os("d"), 0o755, 0).unwrap().ino;
    fs::write(c.path("d/victim"), b"v").unwrap();
    fs::write(c.path("d/src"), b"s").unwrap();
    // Killed after each system call, before its outcome was recorded:
    let mk = |name: &str, open| IntentV1::Make {
        parent: d,
        name: name.as_bytes().to_vec(),
        before: ProbeV1::Absent,
        open,
    };
    intent(&fs, 10, mk("made", None));
    fs::create_dir(c.path("d/made")).unwrap();
    intent(
        &fs,
        11,
        mk("created", Some(libc::O_RDWR as u32 | libc::O_EXCL as u32)),
    );
    fs::write(c.path("d/created"), b"").unwrap();
    intent(
        &fs,
        12,
        IntentV1::Remove {
            parent: d,
            name: b"victim".to_vec(),
            before: probe_of(&c, "d/victim"),
        },
    );
    fs::remove_file(c.path("d/victim")).unwrap();
    intent(
        &fs,
        13,
        IntentV1::Rename {
            parent: d,
            name: b"src".to_vec(),
            newparent: d,
            newname: b"dst".to_vec(),
            flags: 0,
            src: probe_of(&c, "d/src"),
            dst: ProbeV1::Absent,
        },
    );
    fs::rename(c.path("d/src"), c.path("d/dst")).unwrap();
    // ... and killed before these system calls:
    intent(&fs, 14, mk("never", None));
    // A lookup counted but never answered.
    fs::write(c.path("d/looked"), b"").unwrap();
    let looked = fs.lookup(&at(15), d, os("looked")).unwrap().ino;

    let s = c.successor(fs).unwrap();
    let Some(Completed::Entry(made)) = s.completed(10) else {
        panic!("mkdir had taken effect")
    };
    assert_eq!(made.attr.ino, fs::metadata(c.path("d/made")).unwrap().ino());
    assert_eq!(s.nodes.lookups(made.ino), Some(1), "counted once");
    let Some(Completed::Created(e, o)) = s.completed(11) else {
        panic!("create had taken effect")
    };
    assert_eq!(s.write(&root(), e.ino, o.fh, 0, b"ok", 0, 0).unwrap(), 2);
    assert_eq!(fs::read(c.path("d/created")).unwrap(), b"ok");
    assert!(matches!(s.completed(12), Some(Completed::Done)));
    assert!(matches!(s.completed(13), Some(Completed::Done)));
    assert!(s.completed(14).is_none(), "mkdir never ran: run it");
    assert!(s.completed(15).is_none(), "a lookup runs again...");
    assert_eq!(s.nodes.lookups(looked), None, "...its count given back");
    assert!(s.completed(10).is_none(), "answered once only");
    assert!(s.completed(999).is_none(), "no record, no answer");

    // A successor of the successor answers what it answered the same way.
    let t = c.successor(s).unwrap();
    assert!(matches!(t.completed(10), Some(Completed::Entry(_))));
    assert!(matches!(t.completed(12), Some(Completed::Done)));
}

#[test]
fn a_rename_done_before_its_new_hint_was_recorded_loses_nothing() {
    let (c, fs) = Crashable::new();
    fs::create_dir_all(c.path("a/sub")).unwrap();
    fs::write(c.path("a/sub/f"), b"deep").unwrap();
    let a = fs.lookup(&at(1), ROOT_ID, os("a")).unwrap().ino;
    let sub = fs.lookup(&at(2), a, os("sub")).unwrap().ino;
    let f = fs.lookup(&at(3), sub, os("f")).unwrap().ino;
    // Killed after renameat2, before the new hint and the outcome were recorded.
    intent(
        &fs,
        4,
        IntentV1::Rename {
            parent: ROOT_ID,
            name: b"a".to_vec(),
            newparent: ROOT_ID,
            newname: b"b".to_vec(),
            flags: 0,
            src: probe_of(&c, "a"),
            dst: ProbeV1::Absent,
        },
    );
    fs::rename(c.path("a"), c.path("b")).unwrap();
    let s = c.successor(fs).unwrap();
    for n in [a, sub, f] {
        assert!(s.getattr(&root(), n, None).is_ok(), "node {n} found again");
    }
    assert!(matches!(s.completed(4), Some(Completed::Done)));
    assert_eq!(s.nodes.hint(a).unwrap().name.as_ref(), b"b");
    // And the next successor finds them by their hints alone.
    let t = c.successor(s).unwrap();
    assert!(t.getattr(&root(), f, None).is_ok());
}

#[test]
fn a_resent_append_that_had_taken_effect_is_not_written_twice() {
    let (c, fs) = Crashable::new();
    let (e, o) = fs
        .create(
            &at(1),
            ROOT_ID,
            os("log"),
            0o644,
            0,
            (libc::O_WRONLY | libc::O_APPEND) as u32,
        )
        .unwrap();
    assert_eq!(fs.write(&at(2), e.ino, o.fh, 0, b"one\n", 0, 0).unwrap(), 4);
    // Appended, then killed before the outcome; then one cut short; then one that
    // never ran.
    intent(&fs, 3, IntentV1::Append { fh: o.fh, size: 4 });
    std::fs::OpenOptions::new()
        .append(true)
        .open(c.path("log"))
        .unwrap()
        .write_all(b"two\n")
        .unwrap();
    let s = c.successor(fs).unwrap();
    assert!(
        s.completed(3).is_none(),
        "the write decides, with the bytes"
    );
    assert_eq!(
        s.write(&resent(3), e.ino, o.fh, 4, b"two\n", 0, 0).unwrap(),
        4
    );
    assert_eq!(fs::read(c.path("log")).unwrap(), b"one\ntwo\n");

    intent(&s, 4, IntentV1::Append { fh: o.fh, size: 8 });
    std::fs::OpenOptions::new()
        .append(true)
        .open(c.path("log"))
        .unwrap()
        .write_all(b"th")
        .unwrap();
    intent(&s, 5, IntentV1::Append { fh: o.fh, size: 14 });
    let t = c.successor(s).unwrap();
    assert!(t.completed(4).is_none());
    assert_eq!(
        t.write(&resent(4), e.ino, o.fh, 8, b"three\n", 0, 0)
            .unwrap(),
        6
    );
    assert!(t.completed(5).is_none());
    assert_eq!(
        t.write(&resent(5), e.ino, o.fh, 14, b"four\n", 0, 0)
            .unwrap(),
        5
    );
    assert_eq!(fs::read(c.path("log")).unwrap(), b"one\ntwo\nthree\nfour\n");
    // An append recorded whole is answered from its outcome.
    let n = t.write(&at(6), e.ino, o.fh, 19, b"five\n", 0, 0).unwrap();
    let u = c.successor(t).unwrap();
    assert!(matches!(u.completed(6), Some(Completed::Written(w)) if w == n));
    assert_eq!(
        fs::read(c.path("log")).unwrap(),
        b"one\ntwo\nthree\nfour\nfive\n"
    );
}

#[test]
fn a_request_recorded_just_before_a_checkpoint_is_still_answered() {
    let (c, fs) = Crashable::new();
    fs.mkdir(&at(1), ROOT_ID, os("d"), 0o755, 0).unwrap();
    c.checkpoint(&fs);
    let s = c.successor(fs).unwrap();
    assert!(
        matches!(s.completed(1), Some(Completed::Entry(_))),
        "from the checkpoint's last records"
    );
}

/// A checkpoint and records a successor is given, spoiled one way each.
#[test]
fn hostile_journal_contents_are_refused_with_a_reason() {
    let (c, fs) = Crashable::new();
    fs::write(c.path("f"), b"").unwrap();
    fs::create_dir(c.path("d")).unwrap();
    let f = fs.lookup(&at(1), ROOT_ID, os("f")).unwrap().ino;
    let d = fs.lookup(&at(2), ROOT_ID, os("d")).unwrap().ino;
    let good = c.left(fs);
    let recover = |records: Vec<Vec<u8>>, checkpoint: Option<Vec<u8>>| {
        PassthroughFs::recover(
            c.config(),
            c.open_journal(),
            c.keeper.clone(),
            Recovery {
                checkpoint,
                records,
                fds: HashMap::new(),
            },
        )
    };
    assert!(recover(good.records.clone(), None).is_ok());
    let rec = |ops: Vec<OpV1>| encode_record(&RecordV1 { unique: 9, ops })[1..].to_vec();
    let with = |extra: Vec<OpV1>| {
        let mut r = good.records.clone();
        r.push(rec(extra));
        r
    };
    let key = KeyV1 {
        dev: 1,
        ino: 1,
        mnt_id: 1,
    };
    let cases: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        ("garbage", vec![b"\xff\xff\xff".to_vec()], "record 0"),
        (
            "trailing bytes",
            {
                let mut r = good.records.clone();
                r[0].push(0);
                r
            },
            "after its end",
        ),
        (
            "a node created twice",
            with(vec![OpV1::NodeNew {
                id: f,
                key,
                kind: libc::S_IFREG,
                hint: None,
            }]),
            "created twice",
        ),
        (
            "a lookup of a node nobody holds",
            with(vec![OpV1::NodeRef { id: 77, hint: None }]),
            "not held",
        ),
        (
            "a forget of a node nobody holds",
            with(vec![OpV1::Forget { id: 77, n: 1 }]),
            "not held",
        ),
        (
            "the root numbered as a new node",
            with(vec![OpV1::NodeNew {
                id: 1,
                key,
                kind: libc::S_IFDIR,
                hint: None,
            }]),
            "out of range",
        ),
        (
            "a node of no file type",
            with(vec![OpV1::NodeNew {
                id: 50,
                key,
                kind: 0o7777,
                hint: None,
            }]),
            "no file type",
        ),
        (
            "a hint with a slash",
            with(vec![OpV1::Rehint {
                id: f,
                hint: Some((d, b"a/b".to_vec())),
            }]),
            "no plain name",
        ),
        (
            "a hint to itself",
            with(vec![OpV1::Rehint {
                id: f,
                hint: Some((f, b"a".to_vec())),
            }]),
            "hint to node",
        ),
        (
            "a file handle on a directory",
            with(vec![OpV1::Opened {
                fh: 5,
                node: d,
                kind: HandleKindV1::File { flags: 0 },
            }]),
            "of type",
        ),
        (
            "a handle on a missing node",
            with(vec![OpV1::Opened {
                fh: 5,
                node: 77,
                kind: HandleKindV1::Dir,
            }]),
            "not held",
        ),
        (
            "a handle numbered 0",
            with(vec![OpV1::Opened {
                fh: 0,
                node: d,
                kind: HandleKindV1::Dir,
            }]),
            "out of range",
        ),
        (
            "a handle closed that was never open",
            with(vec![OpV1::Closed { fh: 5 }]),
            "was not open",
        ),
    ];
    for (what, records, says) in cases {
        let err = recover(records, None)
            .err()
            .unwrap_or_else(|| panic!("{what} was accepted"));
        assert!(err.to_string().contains(says), "{what}: {err}");
    }
    // Spoiled checkpoints.
    let snap = SnapshotV1 {
        next_node: 3,
        next_fh: 1,
        nodes: vec![NodeV1 {
            id: 1,
            key,
            kind: libc::S_IFDIR,
            lookups: 1,
            setid: false,
            hint: None,
            object: ObjectV1::Lent(0),
        }],
        handles: vec![],
    };
    let checkpoint = |snapshot| {
        encode_checkpoint(&PassthroughCheckpoint::V1(CheckpointV1 {
            snapshot,
            stale_below: 0,
            recent: vec![],
            pending: vec![],
            carried: vec![],
        }))
    };
    let err = recover(vec![], Some(checkpoint(snap.clone())))
        .err()
        .unwrap();
    assert!(err.to_string().contains("descriptor"), "{err}");
    let err = recover(vec![], Some(b"FSVAPTJ1\x00\x07".to_vec()))
        .err()
        .unwrap();
    assert!(matches!(err, StateError::Corrupt(_)), "{err}");
    let err = recover(vec![], Some(vec![0; 40])).err().unwrap();
    assert!(err.to_string().contains("magic"), "{err}");
    let mut no_root = snap;
    no_root.nodes.clear();
    let err = recover(vec![], Some(checkpoint(no_root))).err().unwrap();
    assert!(err.to_string().contains("root"), "{err}");
}

#[test]
fn after_a_lost_state_old_nodes_and_handles_are_stale_and_new_ones_work() {
    let dir = tempfile::Builder::new()
        .prefix("fsva-ptr-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let journal = Arc::new(Journal::open(jnl::create(1 << 20).unwrap()).unwrap());
    let fs = PassthroughFs::after_loss(
        PassthroughConfig::for_path(dir.path()).unwrap(),
        journal,
        Arc::new(TestKeeper::default()),
        1 << 48,
    )
    .unwrap();
    assert_eq!(fs.getattr(&root(), 5, None).unwrap_err().0, libc::ESTALE);
    assert_eq!(
        fs.read(&root(), 5, 3, 0, 1, 0, &mut Vec::new())
            .unwrap_err()
            .0,
        libc::ESTALE
    );
    assert!(fs.getattr(&root(), ROOT_ID, None).is_ok());
    let e = fs.mkdir(&at(1), ROOT_ID, os("d"), 0o755, 0).unwrap();
    assert!(e.ino >= 1 << 48);
}
