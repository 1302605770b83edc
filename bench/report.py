#!/usr/bin/env python3
"""Turn the raw results of bench/run.sh into tables (stdout + markdown file).

usage: report.py RAWDIR OUT.md "header line" FOOT_MIB MACRO_FILES target...
RAWDIR holds <target>-{seqread,seqwrite,randread}.json (fio --output-format=json),
<target>-meta*.json (fsva-meta), <target>-macro-*.json (source-tree macro
workload, seconds) and <target>-footprint.txt (MiB); repeated runs are reduced
to the median. Every figure is printed as a ratio to native and to the best
peer of its row: the fastest (or, for the footprint, smallest) of bindfs,
passthrough_ll and passthrough_hp that ran.
"""
import glob, json, os, statistics, sys

NATIVE = "native"
PEERS = ("bindfs", "passthrough_ll", "passthrough_hp")

def fio_result(path, rw):
    with open(path) as f:
        text = f.read()
    # fio may print warnings before the JSON document
    job = json.loads(text[text.index("{"):])["jobs"][0][rw]
    return {"MB/s": job["bw_bytes"] / 1e6, "IOPS": job["iops"]}

def median_of(paths, read):
    vals = [read(p) for p in paths]
    return {k: statistics.median(v[k] for v in vals) for k in vals[0]} if vals else {}

def load(raw, targets):
    data = {}
    for t in targets:
        d = {}
        for wl, rw in (("seqread", "read"), ("seqwrite", "write"), ("randread", "read"),
                       ("randwrite", "write"), ("dseqread", "read"), ("dseqwrite", "write"),
                       ("drandread-qd1", "read"), ("drandread-qd16", "read"),
                       ("drandwrite-qd1", "write"), ("drandwrite-qd16", "write")):
            # seqread-1.json, seqread-2.json, ... (not the -warmup pass)
            paths = [p for p in glob.glob(os.path.join(raw, f"{t}-{wl}.json"))
                     + glob.glob(os.path.join(raw, f"{t}-{wl}-[0-9]*.json"))]
            r = median_of(paths, lambda p: fio_result(p, rw))
            if r:
                d[wl] = r["MB/s"]
                if wl.startswith("rand") or wl.startswith("drand"):
                    d[wl + "_kiops"] = r["IOPS"] / 1000
        def meta(p):
            with open(p) as f:
                return json.load(f)
        d.update(median_of(glob.glob(os.path.join(raw, f"{t}-meta*.json")), meta))
        macros = [meta(p) for p in glob.glob(os.path.join(raw, f"{t}-macro-*.json"))]
        if macros:
            d["macro_error"] = macros[0].get("error", "")
            d["macro_files"] = macros[0].get("files")
            for k in ("extract", "find", "du", "cat"):
                d[f"macro_{k}"] = statistics.median(m[k] for m in macros)
        fp = os.path.join(raw, f"{t}-footprint.txt")
        if os.path.exists(fp):
            with open(fp) as f:
                d["footprint"] = float(f.read().strip())
        data[t] = d
    return data

def ratio(v, base):
    return f"{v / base:.2f}" if v is not None and base else "–"

def best_peer(key, data, targets, higher):
    vals = [(data[p][key], p) for p in PEERS if p in targets and data[p].get(key) is not None]
    if not vals:
        return None, None
    v, p = (max if higher else min)(vals)
    return p, v

def table(title, unit, key, data, targets, note, fmt="{:,.1f}", invalid=None):
    higher = note.startswith("Higher")
    peer, pv = best_peer(key, data, targets, higher)
    lines = [f"### {title}", "", note + (f" Best peer: {peer}." if peer else ""), "",
             f"| target | {unit} | × native | × best peer |", "|---|---:|---:|---:|"]
    nat = data.get(NATIVE, {}).get(key)
    for t in targets:
        v = data[t].get(key)
        bad = invalid(t) if invalid else None
        if bad:
            lines.append(f"| {t} | {bad} | – | – |")
            continue
        s = fmt.format(v) if v is not None else "–"
        lines.append(f"| {t} | {s} | {ratio(v, nat)} | {ratio(v, pv)} |")
    return "\n".join(lines) + "\n"

TPUT = "Higher is better; ratios = target / reference."
LAT = "Lower is better; ratios = target / reference."
TABLES = [
    ("Sequential read, 1 MiB, buffered, cold page cache (median)", "MB/s", "seqread", TPUT),
    ("Sequential write, 1 MiB, buffered, end_fsync=1", "MB/s", "seqwrite", TPUT),
    ("Random read, 4 KiB, buffered (cache warm from the sequential read)", "MB/s", "randread", TPUT),
    ("Random read, 4 KiB, buffered — IOPS", "kIOPS", "randread_kiops", TPUT),
    ("Random write, 4 KiB, buffered, warm — IOPS", "kIOPS", "randwrite_kiops", TPUT),
    ("Sequential read, 1 MiB, O_DIRECT", "MB/s", "dseqread", TPUT),
    ("Sequential write, 1 MiB, O_DIRECT", "MB/s", "dseqwrite", TPUT),
    ("Random read, 4 KiB, O_DIRECT, queue depth 1 — IOPS", "kIOPS", "drandread-qd1_kiops", TPUT),
    ("Random read, 4 KiB, O_DIRECT, queue depth 16 (libaio) — IOPS", "kIOPS", "drandread-qd16_kiops", TPUT),
    ("Random write, 4 KiB, O_DIRECT, queue depth 1 — IOPS", "kIOPS", "drandwrite-qd1_kiops", TPUT),
    ("Random write, 4 KiB, O_DIRECT, queue depth 16 (libaio) — IOPS", "kIOPS", "drandwrite-qd16_kiops", TPUT),
    ("Metadata: create + write 4 KiB + close", "µs/op", "create_write", LAT),
    ("Metadata: stat (warm)", "µs/op", "stat_warm", LAT),
    ("Metadata: getxattr of an absent attribute (FUSE: one round trip to the server, none where it answered ENOSYS)", "µs/op", "xattr_miss", LAT),
    ("Metadata: readdir of the whole directory (median of 5 listings)", "µs/listing", "readdir", LAT),
    ("Metadata: rename", "µs/op", "rename", LAT),
    ("Metadata: unlink", "µs/op", "unlink", LAT),
    ("Metadata: mkdir + rmdir", "µs/pair", "mkdir_rmdir", LAT),
]

def main():
    raw, out, header = sys.argv[1], sys.argv[2], sys.argv[3]
    foot_mib, macro_files, targets = sys.argv[4], int(sys.argv[5]), sys.argv[6:]
    data = load(raw, targets)
    doc = header + "\n\n" + "\n".join(table(*t[:3], data, targets, t[3]) for t in TABLES)
    doc += "\n" + table(
        f"Page-cache footprint: growth of Cached after reading a {foot_mib} MiB file twice",
        "MiB", "footprint", data, targets,
        f"Lower is better: one copy of the data is {foot_mib} MiB; two copies (FUSE page cache "
        "plus the server's) about twice that. mem's data lives in memfds, which a cache drop "
        "does not evict, so it shows only what reading adds.", fmt="{:,.0f}")

    def invalid(t):  # a target that could not extract the whole tree gets no number
        d = data[t]
        if d.get("macro_error"):
            return f"failed: {d['macro_error']}"
        if d.get("macro_files") is not None and d["macro_files"] != macro_files:
            return f"incomplete: {d['macro_files']} of {macro_files} files"
        return None
    for key, title in (
            ("extract", "extract the tree (tar -x of an uncompressed tar, tarball in page cache, no sync)"),
            ("find", "`find | wc -l`, cold caches"),
            ("du", "`du -s`, cold caches"),
            ("cat", "`find -type f -exec cat {} +`, cold caches")):
        doc += "\n" + table(f"Macro, {macro_files} files: {title}", "s", f"macro_{key}",
                             data, targets, LAT, fmt="{:,.3f}", invalid=invalid)
    print(doc)
    with open(out, "w") as f:
        f.write(doc)

if __name__ == "__main__":
    main()
