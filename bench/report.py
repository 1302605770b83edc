#!/usr/bin/env python3
"""Turn the raw results of bench/run.sh into tables (stdout + markdown file).

usage: report.py RAWDIR OUT.md "header line" target...
RAWDIR holds <target>-{seqread,seqwrite,randread}.json (fio --output-format=json)
and <target>-meta*.json (bench/meta.py); repeated runs are reduced to the median.
"""
import glob, json, os, statistics, sys

NATIVE, PEER = "native", "bindfs"

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
        for wl, rw in (("seqread", "read"), ("seqwrite", "write"), ("randread", "read")):
            # seqread-1.json, seqread-2.json, ... (not the -warmup pass)
            paths = [p for p in glob.glob(os.path.join(raw, f"{t}-{wl}*.json")) if "warmup" not in p]
            r = median_of(paths, lambda p: fio_result(p, rw))
            if r:
                d[wl] = r["MB/s"]
                if wl == "randread":
                    d["randread_kiops"] = r["IOPS"] / 1000
        def meta(p):
            with open(p) as f:
                return json.load(f)
        d.update(median_of(glob.glob(os.path.join(raw, f"{t}-meta*.json")), meta))
        data[t] = d
    return data

def ratio(v, base):
    return f"{v / base:.2f}" if v is not None and base else "–"

def table(title, unit, key, data, targets, note):
    lines = [f"### {title}", "", note, "",
             f"| target | {unit} | × native | × bindfs |", "|---|---:|---:|---:|"]
    nat, peer = data.get(NATIVE, {}).get(key), data.get(PEER, {}).get(key)
    for t in targets:
        v = data[t].get(key)
        fmt = f"{v:,.1f}" if v is not None else "–"
        lines.append(f"| {t} | {fmt} | {ratio(v, nat)} | {ratio(v, peer)} |")
    return "\n".join(lines) + "\n"

TPUT = "Higher is better; ratios = target / reference."
LAT = "Lower is better; ratios = target / reference."
TABLES = [
    ("Sequential read, 1 MiB, buffered, cold page cache (median)", "MB/s", "seqread", TPUT),
    ("Sequential write, 1 MiB, buffered, end_fsync=1", "MB/s", "seqwrite", TPUT),
    ("Random read, 4 KiB, buffered (cache warm from the sequential read)", "MB/s", "randread", TPUT),
    ("Random read, 4 KiB, buffered — IOPS", "kIOPS", "randread_kiops", TPUT),
    ("Metadata: create + write 4 KiB + close", "µs/op", "create_write", LAT),
    ("Metadata: stat (warm)", "µs/op", "stat_warm", LAT),
    ("Metadata: readdir of the whole directory (median of 5 listings)", "µs/listing", "readdir", LAT),
    ("Metadata: rename", "µs/op", "rename", LAT),
    ("Metadata: unlink", "µs/op", "unlink", LAT),
    ("Metadata: mkdir + rmdir", "µs/pair", "mkdir_rmdir", LAT),
]

def main():
    raw, out, header, targets = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    data = load(raw, targets)
    doc = header + "\n\n" + "\n".join(table(*t[:3], data, targets, t[3]) for t in TABLES)
    print(doc)
    with open(out, "w") as f:
        f.write(doc)

if __name__ == "__main__":
    main()
