#!/usr/bin/env python3
"""Resident memory of the program that qemu-user emulates, without qemu's own.

Under qemu-user the guest program's memory is part of the qemu process, next to qemu's own
(its translated-code cache, its heap, its libraries), so the process's VmRSS/VmHWM overstate
the guest's. qemu started with `-d page -D LOG` logs the guest's page layout (guest address
ranges) after every change of it; with a guest base of 0 (qemu-user's default for a 64- or 32-bit
guest on a 64-bit host: the log says "Locating guest address space @ 0x0") guest addresses are
host addresses, so the guest's resident memory is the sum of `Rss` over the host mappings
(/proc/PID/smaps) that lie in the guest's ranges: its heap, stacks, anonymous mappings, and the
pages of its binary and shared libraries, as on a real gateway.

    qemu-guest-rss.py PID LOG                      # current guest RSS in KiB
    qemu-guest-rss.py PID LOG --watch 0.2 --out F  # sample until PID exits; F: "peak current"
"""

import argparse
import os
import re
import sys
import time

RANGE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) [0-9a-f]+ \S+$")
MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")


def guest_base(log_path):
    with open(log_path, errors="replace") as f:
        head = f.read(1 << 14)
    m = re.search(r"^Locating guest address space @ (0x[0-9a-f]+)$", head, re.M)
    if not m:
        raise ValueError(f"{log_path}: no guest base (was qemu started with -d page -D?)")
    return int(m[1], 16)


def guest_ranges(log_path, base):
    """The guest's host address ranges from the last page-layout dump in qemu's log."""
    with open(log_path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        # The last dump is near the end; read more if it is longer than the tail read. (The log
        # starts with qemu's own lines, never with a dump's header.)
        tail = 1 << 16
        while True:
            f.seek(max(0, size - tail))
            text = f.read().decode(errors="replace")
            header = text.rfind("\nstart ")
            if header >= 0 or tail >= size:
                break
            tail *= 4
    if header < 0:
        raise ValueError(f"{log_path}: no page layout (was qemu started with -d page -D?)")
    ranges = []
    for line in text[header + 1 :].splitlines()[1:]:
        m = RANGE.match(line.strip())
        if not m:
            break
        ranges.append((base + int(m[1], 16), base + int(m[2], 16)))
    if not ranges:
        raise ValueError(f"{log_path}: the last page layout is empty or incomplete")
    return ranges


def guest_rss_kib(pid, log_path, base):
    ranges = guest_ranges(log_path, base)
    total = 0
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = MAPPING.match(line)
            if m:
                start = int(m[1], 16)
                inside = any(a <= start < b for a, b in ranges)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pid", type=int)
    p.add_argument("log")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="sample until PID exits")
    p.add_argument("--out", help="with --watch: file rewritten with 'peak current' (KiB)")
    a = p.parse_args()
    if a.watch is None:
        print(guest_rss_kib(a.pid, a.log, guest_base(a.log)))
        return 0
    base = None  # read once: qemu logs it when it starts
    peak = 0
    while True:
        now = None
        try:
            if base is None:
                base = guest_base(a.log)
            now = guest_rss_kib(a.pid, a.log, base)
        except FileNotFoundError:  # the process ended (or its log is not there yet)
            if not os.path.exists(f"/proc/{a.pid}"):
                return 0
        except ProcessLookupError:
            return 0
        except ValueError as e:  # qemu has not logged its base or layout yet
            print(f"qemu-guest-rss: {e}", file=sys.stderr)
        if now is not None:
            peak = max(peak, now)
            if a.out:
                tmp = a.out + ".tmp"
                with open(tmp, "w") as f:
                    f.write(f"{peak} {now}\n")
                os.replace(tmp, a.out)
        time.sleep(a.watch)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        print(f"qemu-guest-rss: {e}", file=sys.stderr)
        sys.exit(2)
