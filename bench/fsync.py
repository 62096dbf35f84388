#!/usr/bin/env python3
"""The disk's floor under a durable reply: the latency of one small append + fdatasync (what the
audit log does per batch), and of an overwrite of pre-written blocks + fdatasync, in DIR.

    python3 bench/fsync.py [DIR] [ROUNDS]
"""
import os
import sys
import tempfile
import time


def measure(fd, rounds, offset=None):
    times = []
    for i in range(rounds):
        t = time.perf_counter()
        if offset is None:
            os.write(fd, b"x" * 200)
        else:
            os.pwrite(fd, b"x" * 200, offset + 200 * i)
        os.fdatasync(fd)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6


def main():
    where = sys.argv[1] if len(sys.argv) > 1 else "."
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    with tempfile.TemporaryDirectory(dir=where) as d:
        fd = os.open(os.path.join(d, "append"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        p50, p99 = measure(fd, rounds)
        print(f"append 200 B + fdatasync: p50 {p50:.0f} us, p99 {p99:.0f} us ({rounds} rounds, {where})")
        os.close(fd)
        fd = os.open(os.path.join(d, "overwrite"), os.O_RDWR | os.O_CREAT, 0o600)
        os.write(fd, b"\0" * (200 * rounds))
        os.fsync(fd)
        p50, p99 = measure(fd, rounds, offset=0)
        print(f"overwrite 200 B of pre-written blocks + fdatasync: p50 {p50:.0f} us, p99 {p99:.0f} us")
        os.close(fd)


if __name__ == "__main__":
    main()
