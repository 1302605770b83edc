//! Fuzzes `fsva_protocol::reply::DirentPacker`: arbitrary limits, a non-empty prefix
//! in the output buffer, and a sequence of READDIR / READDIRPLUS entries with arbitrary
//! names. The packed body must never exceed the limit, every record must start on an
//! 8-byte boundary (relative to the body start), be zero-padded, and decode back to
//! exactly the entry that was pushed; a rejected entry must leave the buffer untouched.
#![no_main]

use fsva_protocol::abi::{Attr, Dirent, EntryOut};
use fsva_protocol::reply::{dirent_size, DirentPacker};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use zerocopy::FromBytes;

const DIRENT: usize = core::mem::size_of::<Dirent>();
const ENTRY: usize = core::mem::size_of::<EntryOut>();

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

struct Pushed {
    at: usize,
    plus: Option<EntryOut>,
    ino: u64,
    off: u64,
    typ: u32,
    name: Vec<u8>,
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    // Limit: mostly small (so entries get rejected), sometimes huge.
    let limit = match u.int_in_range(0u8..=3)? {
        0 => u.int_in_range(0usize..=64)?,
        1 => u.int_in_range(0usize..=4096)?,
        2 => u.int_in_range(0usize..=1 << 20)?,
        _ => usize::MAX - u.int_in_range(0usize..=4096)?,
    };
    let prefix_len = u.int_in_range(0usize..=17)?;
    let prefix: Vec<u8> = u.bytes(prefix_len)?.to_vec();
    let mut out = prefix.clone();
    let start = out.len();
    let mut pushed = Vec::new();
    {
        let mut p = DirentPacker::new(&mut out, limit);
        assert!(p.is_empty());
        let mut used = 0usize;
        while !u.is_empty() && pushed.len() < 256 {
            let plus = u.arbitrary::<bool>()?;
            let ino = u.arbitrary::<u64>()?;
            let off = u.arbitrary::<u64>()?;
            let typ = u.arbitrary::<u32>()?;
            let len = u.int_in_range(0usize..=300)?;
            let len = len.min(u.len());
            let name = u.bytes(len)?.to_vec();
            let record = dirent_size(name.len()) + if plus { ENTRY } else { 0 };
            let fits = used.checked_add(record).is_some_and(|t| t <= limit);
            let (ok, entry) = if plus {
                let e = EntryOut {
                    nodeid: ino ^ 0x5a5a,
                    generation: off,
                    attr: Attr {
                        ino,
                        ..Attr::default()
                    },
                    ..EntryOut::default()
                };
                (p.push_plus(&e, off, typ, &name), Some(e))
            } else {
                (p.push(ino, off, typ, &name), None)
            };
            assert_eq!(
                ok, fits,
                "push returned {ok} but used={used} record={record} limit={limit}"
            );
            if ok {
                pushed.push(Pushed {
                    at: used,
                    plus: entry,
                    ino,
                    off,
                    typ,
                    name,
                });
                used += record;
            }
            assert!(used <= limit, "packed {used} bytes over limit {limit}");
            assert_eq!(p.room(), limit - used, "room() is wrong");
            assert_eq!(p.is_empty(), used == 0);
        }
    }
    assert_eq!(&out[..start], &prefix[..], "prefix was modified");
    let body = &out[start..];
    assert!(body.len() <= limit, "body {} > limit {limit}", body.len());
    let mut at = 0;
    for e in &pushed {
        assert_eq!(e.at, at);
        assert_eq!(
            at % 8,
            0,
            "record at body offset {at} is not 8-byte aligned"
        );
        let mut rec = &body[at..];
        if let Some(entry) = &e.plus {
            let (got, rest) = EntryOut::read_from_prefix(rec).expect("entry_out truncated");
            assert_eq!(&got, entry, "entry_out mismatch");
            rec = rest;
            at += ENTRY;
        }
        let (d, rest) = Dirent::read_from_prefix(rec).expect("dirent truncated");
        assert_eq!(
            (d.ino, d.off, d.typ),
            (e.ino, e.off, e.typ),
            "dirent fields mismatch"
        );
        assert_eq!(d.namelen as usize, e.name.len(), "namelen mismatch");
        let size = dirent_size(e.name.len());
        assert_eq!(size % 8, 0);
        assert_eq!(&rest[..e.name.len()], &e.name[..], "name mismatch");
        assert!(
            rest[e.name.len()..size - DIRENT].iter().all(|&b| b == 0),
            "padding not zeroed"
        );
        at += size;
    }
    assert_eq!(at, body.len(), "trailing bytes after the last record");
    Ok(())
}
