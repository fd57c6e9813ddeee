#!/usr/bin/env python3
"""Re-collapses QEMU's guest RAM into transparent huge pages: process_madvise(MADV_COLLAPSE) on
the largest anonymous read-write mapping of PID (Linux >= 6.1, x86_64). Prints bytes advised and
whether the kernel accepted it. Used by bench/take/attribution.ts --collapse (an experiment)."""
import ctypes, os, sys

SYS_pidfd_open, SYS_process_madvise, MADV_COLLAPSE = 434, 440, 25
pid = int(sys.argv[1])
best = (0, 0)
with open(f"/proc/{pid}/maps") as f:
    for line in f:
        parts = line.split()
        if len(parts) < 5 or not parts[1].startswith("rw") or len(parts) > 5 and parts[5].strip():
            continue
        a, b = (int(x, 16) for x in parts[0].split("-"))
        if b - a > best[1] - best[0]:
            best = (a, b)
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
pidfd = libc.syscall(SYS_pidfd_open, pid, 0)
if pidfd < 0:
    sys.exit(f"pidfd_open: {os.strerror(ctypes.get_errno())}")
class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
start = (best[0] + (1 << 21) - 1) & ~((1 << 21) - 1)
iov = IoVec(start, (best[1] - start) & ~((1 << 21) - 1))
r = libc.syscall(SYS_process_madvise, pidfd, ctypes.byref(iov), 1, MADV_COLLAPSE, 0)
err = ctypes.get_errno()
print(f"{iov.len} {'ok' if r >= 0 else os.strerror(err)}")
