//! Which host pages to drop after a read, so that file data is cached once.
//!
//! When reads reach the appliance (FUSE passthrough off, or a virtio-fs guest), the
//! kernel client caches what it read; the appliance's host page cache would hold a
//! second copy. The backend therefore drops, after each buffered read, exactly the
//! pages it returned — and drops them once more a few reads later, because pages that
//! were still on a per-CPU LRU batch escape the first DONTNEED. Sequential readers get
//! a trailing window instead (the same pages, fewer calls). Pages the host read ahead
//! but did not return are kept: the client does not hold them, so they are no second
//! copy, and a later request finds them cached. Reads the client does not cache
//! (O_DIRECT opens) drop nothing. Where the backend is told to
//! (a VM appliance), a read that found its pages already cached — written through the
//! appliance and maybe not yet written back — leaves them, unless it continues a run of
//! reads whose read-ahead brought them in.
//!
//! This module only decides ranges; it never touches a descriptor.

use std::sync::Mutex;

/// Reads remembered for their second drop.
const DEPTH: usize = 8;
/// How far back a sequential reader's window reaches.
const SEQUENTIAL_LAG: u64 = 8 << 20;

/// A byte range `[start, end)` to drop.
pub type Range = (u64, u64);

/// The recent reads of one open file.
#[derive(Debug, Default)]
pub struct ReadTrail {
    inner: Mutex<Trail>,
}

#[derive(Debug, Default)]
struct Trail {
    /// Recent runs of reads; a read adjacent to one extends it (the kernel's readahead
    /// requests arrive out of order across workers, so either side may join).
    recent: [Option<Run>; DEPTH],
    /// Index of the newest entry.
    newest: usize,
}

/// A run of adjacent reads `[start, end)`; dropping it on its own (a read alone, now
/// and when it leaves the trail) starts at `drop_from`, above the part that was cached
/// before the read came. A run that others join is dropped whole, by its window, if
/// one of its reads brought pages in (then the rest is its read-ahead); a run that
/// found everything cached (a file written through the appliance, read back) is not.
#[derive(Debug, Clone, Copy)]
struct Run {
    start: u64,
    end: u64,
    drop_from: u64,
    brought_in: bool,
}

impl Run {
    fn to_drop(self) -> Option<Range> {
        (self.drop_from < self.end).then_some((self.drop_from, self.end))
    }
}

impl ReadTrail {
    /// Records a read of `[start, end)` and returns the ranges to drop now.
    pub fn record(&self, start: u64, end: u64) -> [Option<Range>; 2] {
        self.record_dropping_from(start, start, end)
    }

    fn record_dropping_from(&self, start: u64, drop_from: u64, end: u64) -> [Option<Range>; 2] {
        if end <= start {
            // Nothing returned, nothing to drop (and fadvise would read a zero length
            // as "to the end of the file").
            return [None, None];
        }
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let left = t
            .recent
            .iter()
            .position(|r| r.is_some_and(|r| r.end == start));
        let right = t
            .recent
            .iter()
            .position(|r| r.is_some_and(|r| r.start == end));
        let brought_in = drop_from < end;
        if left.is_none() && right.is_none() {
            // A read on its own: dropped now, and again when it leaves the trail.
            let slot = (t.newest + 1) % DEPTH;
            let second = t.recent[slot].take().and_then(Run::to_drop);
            let run = Run {
                start,
                end,
                drop_from,
                brought_in,
            };
            t.recent[slot] = Some(run);
            t.newest = slot;
            return [run.to_drop(), second];
        }
        // Part of a run: one window over this read, the run's reads just before it
        // (never before the run began) and a part after it that arrived first.
        let joined = |i: Option<usize>| i.and_then(|i| t.recent[i]);
        let lo = joined(left).map_or(start, |r| r.start);
        let hi = joined(right).map_or(end, |r| r.end);
        let brought_in = brought_in
            || joined(left).is_some_and(|r| r.brought_in)
            || joined(right).is_some_and(|r| r.brought_in);
        if let (Some(_), Some(j)) = (left, right) {
            t.recent[j] = None;
        }
        let slot = left.or(right).expect("one side joined");
        let kept = lo.max(hi.saturating_sub(SEQUENTIAL_LAG));
        t.recent[slot] = Some(Run {
            start: kept,
            end: hi,
            drop_from: if brought_in { kept } else { hi },
            brought_in,
        });
        t.newest = slot;
        let window = (lo.max(start.saturating_sub(SEQUENTIAL_LAG)), hi);
        [brought_in.then_some(window), None]
    }

    /// Records a read of `[start, end)` whose first part, up to `resident_until`, the
    /// page cache held before it, and returns the ranges to drop now. Those resident
    /// pages were left by someone else (a write through the appliance, another reader)
    /// and are not this read's to drop, unless the read joins a run of this file's
    /// reads of which one brought pages in: then they are that run's read-ahead, and
    /// its window drops them as [`ReadTrail::record`] does. A run that found
    /// everything cached drops nothing.
    ///
    /// The read is remembered whole either way, so that a run whose reads arrive out
    /// of order (the later one first, found read ahead) still joins up.
    pub fn record_after_resident(
        &self,
        start: u64,
        resident_until: u64,
        end: u64,
    ) -> [Option<Range>; 2] {
        self.record_dropping_from(start, resident_until.clamp(start, end), end)
    }

    /// The ranges still waiting for their second drop (dropped when the file closes).
    pub fn pending(&self) -> Vec<Range> {
        let t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        t.recent
            .iter()
            .flatten()
            .filter_map(|r| r.to_drop())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_reads_drop_their_own_pages_twice_and_nothing_else() {
        let t = ReadTrail::default();
        let offsets: Vec<u64> = (0..20).map(|i| (i * 7919 % 101) * 4096 * 3).collect();
        let mut dropped: Vec<Range> = Vec::new();
        for &o in &offsets {
            for r in t.record(o, o + 4096).into_iter().flatten() {
                dropped.push(r);
            }
        }
        // Every range dropped is a range that was read: no readahead is thrown away.
        for r in &dropped {
            assert!(offsets.iter().any(|&o| *r == (o, o + 4096)), "{r:?}");
        }
        // Each read is dropped at once; all but the last DEPTH a second time.
        for (i, &o) in offsets.iter().enumerate() {
            let times = dropped.iter().filter(|r| **r == (o, o + 4096)).count();
            assert_eq!(
                times,
                if i + DEPTH < offsets.len() { 2 } else { 1 },
                "read {i}"
            );
        }
    }

    #[test]
    fn resident_pages_are_left_unless_a_run_read_them_ahead() {
        let t = ReadTrail::default();
        let kb = 1024u64;
        // Wholly resident, on its own: nothing to drop, now or later.
        assert_eq!(t.record_after_resident(0, 8 * kb, 8 * kb), [None, None]);
        assert!(t.pending().is_empty());
        // (start, resident until, end) of each read in turn, and what it drops at once.
        let steps: [((u64, u64, u64), Option<Range>); 7] = [
            // A file written through the appliance, read back: the run found it all
            // cached and drops none of it.
            ((8, 16, 16), None),
            ((16, 24, 24), None),
            // Partly resident: only what the read brought in.
            ((100, 104, 228), Some((104, 228))),
            // The run's next read found its pages read ahead: the run's window drops
            // them, the resident start of the run's first read included.
            ((228, 356, 356), Some((100, 356))),
            // Read ahead and arriving before the read it follows: left for now...
            ((1024, 1152, 1152), None),
            // ...then dropped with the run once that read joins it.
            ((896, 896, 1024), Some((896, 1152))),
            ((1152, 1280, 1280), Some((896, 1280))),
        ];
        for ((start, resident, end), now) in steps {
            assert_eq!(
                t.record_after_resident(start * kb, resident * kb, end * kb),
                [now.map(|(a, b)| (a * kb, b * kb)), None],
                "read {start}..{end} KiB"
            );
        }
        // What waits for a second drop never includes the resident run's pages.
        assert!(t.pending().iter().all(|r| r.0 >= 24 * kb));
    }

    #[test]
    fn sequential_reads_drop_a_trailing_window() {
        let t = ReadTrail::default();
        assert_eq!(t.record(0, 1 << 20), [Some((0, 1 << 20)), None]);
        let mb = 1u64 << 20;
        assert_eq!(t.record(mb, 2 * mb), [Some((0, 2 * mb)), None]);
        // A new run at 20 MiB: its window never reaches below where it began.
        assert_eq!(t.record(20 * mb, 21 * mb)[0], Some((20 * mb, 21 * mb)));
        assert_eq!(t.record(21 * mb, 22 * mb), [Some((20 * mb, 22 * mb)), None]);
        for i in 22..40 {
            let [first, _] = t.record(i * mb, (i + 1) * mb);
            assert_eq!(
                first,
                Some((
                    (i * mb).saturating_sub(SEQUENTIAL_LAG).max(20 * mb),
                    (i + 1) * mb
                ))
            );
        }
        // An empty read drops nothing.
        assert_eq!(t.record(5 * mb, 5 * mb), [None, None]);
    }

    #[test]
    fn out_of_order_sequential_reads_are_each_dropped_twice_by_close() {
        let t = ReadTrail::default();
        let mb = 1u64 << 20;
        // Readahead pairs arriving swapped: 1 before 0, 3 before 2, ...
        let order: Vec<u64> = (0..32).map(|i| i ^ 1).collect();
        let mut dropped: Vec<Range> = Vec::new();
        for &i in &order {
            dropped.extend(t.record(i * mb, (i + 1) * mb).into_iter().flatten());
        }
        dropped.extend(t.pending());
        for i in 0..32 {
            let times = dropped
                .iter()
                .filter(|r| r.0 <= i * mb && (i + 1) * mb <= r.1)
                .count();
            assert!(times >= 2, "MiB {i} dropped {times} time(s): {dropped:?}");
        }
        // Nothing outside what was read.
        assert!(dropped.iter().all(|r| r.1 <= 32 * mb));
    }
}
