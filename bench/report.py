#!/usr/bin/env python3
"""Turn the raw results of bench/run.sh into tables (stdout + markdown file).

usage: report.py RAWDIR OUT.md "header line" target...
RAWDIR holds <target>-{seqread,seqwrite,randread}.json (fio --output-format=json)
and <target>-meta.json (bench/meta.py).
"""
import json, os, sys

NATIVE, PEER = "native", "bindfs"

def fio_result(path, rw):
    with open(path) as f:
        text = f.read()
    # fio may print warnings before the JSON document
    job = json.loads(text[text.index("{"):])["jobs"][0][rw]
    return {"MB/s": job["bw_bytes"] / 1e6, "IOPS": job["iops"]}

def load(raw, targets):
    data = {}
    for t in targets:
        d = {}
        for wl, rw in (("seqread", "read"), ("seqwrite", "write"), ("randread", "read")):
            p = os.path.join(raw, f"{t}-{wl}.json")
            if os.path.exists(p):
                r = fio_result(p, rw)
                d[wl] = r["MB/s"]
                if wl == "randread":
                    d["randread_kiops"] = r["IOPS"] / 1000
        p = os.path.join(raw, f"{t}-meta.json")
        if os.path.exists(p):
            with open(p) as f:
                d.update(json.load(f))
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
    ("Sequential read, 1 MiB, buffered, cold cache", "MB/s", "seqread", TPUT),
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
