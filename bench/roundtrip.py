#!/usr/bin/env python3
"""The cost of one request round trip through a mount: getxattr of an attribute that
does not exist, which the kernel never caches and every backend answers at once.

    bench/roundtrip.py MOUNTPOINT [N] [LABEL]

Prints the median and the minimum of five rounds of N (default 3000) calls, in µs.
"""
import os
import sys
import time

d = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
label = sys.argv[3] if len(sys.argv) > 3 else d
p = os.path.join(d, "roundtrip-probe")
open(p, "w").close()
rounds = []
for _ in range(5):
    t = time.perf_counter()
    for _ in range(n):
        try:
            os.getxattr(p, "user.absent")
        except OSError:
            pass
    rounds.append((time.perf_counter() - t) / n * 1e6)
os.unlink(p)
print(f"{label}: median {sorted(rounds)[2]:.1f} us, min {min(rounds):.1f}")
