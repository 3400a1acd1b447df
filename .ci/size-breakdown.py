#!/usr/bin/env python3
"""Where the bytes of an (unstripped) agent binary go: section sizes, then symbol sizes summed by
crate (or C library), largest first.

    python3 .ci/size-breakdown.py BINARY [--nm aarch64-linux-gnu-nm] [--top 25]

Build unstripped first, e.g. `CARGO_PROFILE_GATEWAY_STRIP=none cargo build --profile gateway ...`.
Attribution is by symbol name after LTO inlining, so it is approximate: code inlined into a
caller counts for the caller's crate, and generic code counts for the crate of the first
non-std type in its name. Symbols without a Rust path are grouped by prefix (sqlite3_*, ring_*,
tract-linalg's assembly kernels, ...).
"""

import argparse
import collections
import re
import subprocess
import sys

STD = {"core", "alloc", "std", "hashbrown", "compiler_builtins", "std_detect", "rustc_demangle"}
C_PREFIXES = [
    ("sqlite3", "libsqlite3 (C)"),
    ("ring_core", "ring (C/asm)"),
    ("GFp", "ring (C/asm)"),
    ("arm64", "tract-linalg (asm kernels)"),
    ("armv7", "tract-linalg (asm kernels)"),
    ("armv8", "tract-linalg (asm kernels)"),
]
PATH = re.compile(r"(?<![A-Za-z0-9_:])([a-z_][a-z0-9_]*)::")


def crate_of(name: str) -> str:
    crates = [c for c in PATH.findall(name)]
    for c in crates:
        if c not in STD:
            return c
    if crates:
        return crates[0]
    for prefix, label in C_PREFIXES:
        if name.startswith(prefix):
            return label
    return "(other C / runtime)"


def sections(binary: str, objdump: str) -> list[tuple[str, int]]:
    out = subprocess.run([objdump, "-h", binary], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 7 and f[0].isdigit():
            rows.append((f[1], int(f[2], 16)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--nm", default="nm")
    ap.add_argument("--objdump", default="objdump")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()

    print("sections (bytes):")
    for name, size in sorted(sections(a.binary, a.objdump), key=lambda r: -r[1])[:12]:
        print(f"  {name:<24} {size:>12,}")

    out = subprocess.run(
        [a.nm, "--size-sort", "-C", "-S", a.binary], capture_output=True, text=True, check=True
    ).stdout
    by_crate: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.splitlines():
        f = line.split(maxsplit=3)
        if len(f) < 4:
            continue
        size = int(f[1], 16)
        total += size
        by_crate[crate_of(f[3])] += size
    if total == 0:
        print("no symbols: build the binary unstripped", file=sys.stderr)
        return 1
    print(f"symbols by crate ({total:,} bytes in sized symbols):")
    for crate, size in by_crate.most_common(a.top):
        print(f"  {crate:<32} {size:>12,}  {100 * size / total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
