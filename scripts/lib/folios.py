#!/usr/bin/env python3
"""folios.py FILE [MIB]: how many page-cache folios of which size cache FILE's first MIB MiB.

Maps the file read-only, touches each page (only cached pages are then mapped without
reading: run it after the file was read), and looks each page's frame up in
/proc/self/pagemap and /proc/kpageflags (root only). A page whose frame is a compound head
starts a large folio; the tail pages that follow it count toward that folio's size.
Prints one line: "folios N, pages per folio: SIZE xCOUNT ...".
"""

import collections
import mmap
import os
import struct
import sys

KPF_COMPOUND_HEAD = 1 << 15
KPF_COMPOUND_TAIL = 1 << 16
PAGE = os.sysconf("SC_PAGE_SIZE")


def main():
    path = sys.argv[1]
    mib = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    fd = os.open(path, os.O_RDONLY)
    length = min(mib << 20, os.fstat(fd).st_size) // PAGE * PAGE
    if length == 0:
        sys.exit(f"folios.py: {path} is empty")
    m = mmap.mmap(fd, length, prot=mmap.PROT_READ)
    for off in range(0, length, PAGE):
        m[off]  # map the (cached) page
    # The mapping's address: the one mapping of `path` of exactly this length.
    name = os.path.realpath(path)
    addr = None
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == name:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if hi - lo == length:
                    addr = lo
    if addr is None:
        sys.exit(f"folios.py: no mapping of {name} found in /proc/self/maps")
    sizes = collections.Counter()
    current = 0  # pages of the folio being counted
    absent = 0
    with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
        for i in range(length // PAGE):
            pm.seek(((addr // PAGE) + i) * 8)
            entry = struct.unpack("Q", pm.read(8))[0]
            if not entry >> 63 & 1:
                absent += 1
                continue
            pfn = entry & ((1 << 55) - 1)
            if pfn == 0:
                sys.exit("folios.py: page frame numbers are hidden (run as root)")
            kf.seek(pfn * 8)
            flags = struct.unpack("Q", kf.read(8))[0]
            if flags & KPF_COMPOUND_TAIL and current:
                current += 1
                continue
            if current:
                sizes[current] += 1
            current = 1
        if current:
            sizes[current] += 1
    total = sum(sizes.values())
    parts = " ".join(f"{s}x{n}" for s, n in sorted(sizes.items()))
    print(f"folios {total}, pages per folio: {parts}" + (f", {absent} pages not present" if absent else ""))


if __name__ == "__main__":
    main()
