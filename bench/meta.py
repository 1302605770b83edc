#!/usr/bin/env python3
"""Metadata micro-workload: prints JSON {op: microseconds per op} for DIR.

Ops (N files, default 2000; mkdir/rmdir pairs M, default 500):
  create_write  open(O_CREAT)+write 4 KiB+close, per file
  stat_warm     os.stat of each file, after one untimed warming pass
  readdir       one full listing of the N-entry directory (median of 5), per listing
  rename        rename each file to a new name in the same directory
  unlink        unlink each file
  mkdir_rmdir   mkdir + rmdir of an empty directory, per pair
"""
import json, os, statistics, sys, time

def timed(fn, count):
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1000 / count

def main():
    root = os.path.join(sys.argv[1], "meta")
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    m = int(sys.argv[3]) if len(sys.argv) > 3 else 500
    os.makedirs(root)
    names = [os.path.join(root, f"f{i:05d}") for i in range(n)]
    renamed = [os.path.join(root, f"g{i:05d}") for i in range(n)]
    block = b"x" * 4096
    res = {}

    def create_write():
        for p in names:
            fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            os.write(fd, block)
            os.close(fd)
    res["create_write"] = timed(create_write, n)

    def stat_all():
        for p in names:
            os.stat(p)
    stat_all()
    res["stat_warm"] = timed(stat_all, n)

    def listing():
        with os.scandir(root) as it:
            c = sum(1 for _ in it)
        assert c == n, c
    res["readdir"] = statistics.median(timed(listing, 1) for _ in range(5))

    def rename_all():
        for a, b in zip(names, renamed):
            os.rename(a, b)
    res["rename"] = timed(rename_all, n)

    def unlink_all():
        for p in renamed:
            os.unlink(p)
    res["unlink"] = timed(unlink_all, n)

    def mkdir_rmdir():
        for i in range(m):
            d = os.path.join(root, f"d{i:04d}")
            os.mkdir(d)
            os.rmdir(d)
    res["mkdir_rmdir"] = timed(mkdir_rmdir, m)

    os.rmdir(root)
    json.dump(res, sys.stdout)
    print()

if __name__ == "__main__":
    main()
