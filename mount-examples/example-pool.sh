#!/usr/bin/env bash
# Build an example pool: three volumes, one of them on another disk, then mount it, write a
# data set, show where its extents live, and unmount.
#
#   mount-examples/example-pool.sh [POOL] [MOUNTPOINT] [OTHER_DISK_DIR]
#
# Defaults: /srv/ferryfs/example, /mnt/ferryfs/example, and the second volume's image in
# /var/lib/ferryfs-images (put it on another disk to spread the pool over two). Volume
# images are sparse: the sizes below cost nothing until data is written.
set -euo pipefail
FERRY=${FERRY:-ferryfs}
POOL=${1:-/srv/ferryfs/example}
MNT=${2:-/mnt/ferryfs/example}
OTHER=${3:-/var/lib/ferryfs-images}

mkdir -p "$(dirname "$POOL")" "$MNT" "$OTHER"
# Track size: the unit of allocation and of dirty tracking during a migration. 64 KiB (the
# default) suits databases and mixed files; larger tracks suit big sequential files.
"$FERRY" init "$POOL" --track-size 64K
"$FERRY" volume add "$POOL" VOL001 --size 16G
"$FERRY" volume add "$POOL" VOL002 --size 16G
# A volume whose image lives elsewhere (any file system; another disk is the usual reason).
"$FERRY" volume add "$POOL" VOL003 --size 64G --path "$OTHER/$(basename "$POOL")-VOL003.img"
"$FERRY" volume list "$POOL"

# Mount (returns once serving), use it like any directory, unmount.
"$FERRY" mount "$POOL" "$MNT"
mkdir -p "$MNT/db"
head -c 8M /dev/urandom >"$MNT/db/base.dat"
"$FERRY" ls "$MNT" /db --extents
"$FERRY" status "$MNT"
"$FERRY" umount "$MNT"
"$FERRY" fsck "$POOL"

cat <<MSG

Pool ready: $POOL
Mount it at boot with the systemd unit (mount-examples/ferryfs@.service):
    mkdir -p /etc/ferryfs
    printf 'POOL=%s\nMOUNTPOINT=%s\n' "$POOL" "$MNT" >/etc/ferryfs/$(basename "$POOL").conf
    systemctl enable --now ferryfs@$(basename "$POOL").service
MSG
