#!/usr/bin/env bash
# Install what ferryfs and its tests need on a Debian machine (as root), if missing:
# fuse3 (the kernel side is in every Debian kernel), and the real clients the tests drive.
set -euo pipefail
# bsdutils: `script` (a terminal for the CLI tests); util-linux and mount: losetup, blkid,
# findmnt, unshare, setpriv; e2fsprogs: mkfs.ext4 (device tests); attr, acl, libcap2-bin:
# getfattr, setfacl, setcap (attribute tests).
want=(fuse3 sqlite3 git rsync tar bsdutils util-linux mount e2fsprogs python3 attr acl libcap2-bin)
if [[ "${1:-}" == "--bench" ]]; then want+=(fio bindfs); fi
if [[ "${1:-}" == "--postgres" ]]; then want+=(postgresql-15); fi
missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "ferryfs: please install: ${missing[*]}" >&2
        exit 1
    fi
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[[ -e /dev/fuse ]] || modprobe fuse 2>/dev/null || { echo "ferryfs: /dev/fuse is missing" >&2; exit 1; }
