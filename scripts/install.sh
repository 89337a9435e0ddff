#!/usr/bin/env bash
# Install ferryfs: the binary, the mount helper (so that `mount -t fuse.ferryfs` and fstab
# lines work), the man pages, the shell completions, the systemd unit and the documents.
#
#   scripts/install.sh                  build (release) and install under /usr/local
#   scripts/install.sh --uninstall      remove what an install put in place
#
# Environment: PREFIX (default /usr/local), DESTDIR (a staging root, for packaging; empty by
# default), SBINDIR (where mount(8) looks for helpers: /sbin), FERRYFS_BIN (install this
# binary instead of building one).
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
SBINDIR=${SBINDIR:-/sbin}
BIN=$PREFIX/bin/ferryfs
MAN1=$PREFIX/share/man/man1
BASH_COMP=$PREFIX/share/bash-completion/completions/ferryfs
ZSH_COMP=$PREFIX/share/zsh/site-functions/_ferryfs
FISH_COMP=$PREFIX/share/fish/vendor_completions.d/ferryfs.fish
# systemd reads units from here as well as from /etc/systemd/system and /usr/lib/...
UNIT=$PREFIX/lib/systemd/system/ferryfs@.service
DOC=$PREFIX/share/doc/ferryfs
HELPERS=("$SBINDIR/mount.fuse.ferryfs" "$SBINDIR/umount.fuse.ferryfs")

say() { printf 'install: %s\n' "$*"; }

reload_systemd() {
    if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        systemctl daemon-reload || true
    fi
}

if [ "${1:-}" = "--uninstall" ]; then
    for f in "$BIN" "${HELPERS[@]}" "$BASH_COMP" "$ZSH_COMP" "$FISH_COMP" "$UNIT"; do
        rm -f "$DESTDIR$f"
    done
    rm -f "$DESTDIR$MAN1"/ferryfs.1 "$DESTDIR$MAN1"/ferryfs-*.1
    rm -rf "${DESTDIR:?}$DOC"
    reload_systemd
    say "removed ferryfs from $DESTDIR$PREFIX and its mount helpers from $DESTDIR$SBINDIR"
    exit 0
elif [ $# -gt 0 ]; then
    echo "usage: scripts/install.sh [--uninstall]" >&2
    exit 2
fi

src=${FERRYFS_BIN:-}
if [ -z "$src" ]; then
    cargo build --release --quiet
    src=target/release/ferryfs
fi
[ -x "$src" ] || { echo "install: $src is not an executable" >&2; exit 1; }

install -d -m 0755 "$DESTDIR$PREFIX/bin" "$DESTDIR$SBINDIR" "$DESTDIR$MAN1" "$DESTDIR$DOC" \
    "$(dirname "$DESTDIR$BASH_COMP")" "$(dirname "$DESTDIR$ZSH_COMP")" "$(dirname "$DESTDIR$FISH_COMP")" \
    "$(dirname "$DESTDIR$UNIT")"
install -m 0755 "$src" "$DESTDIR$BIN"
say "$DESTDIR$BIN"
# ferryfs knows by the name it runs as that mount(8) or umount(8) runs it as a helper.
for h in "${HELPERS[@]}"; do
    ln -sfn "$BIN" "$DESTDIR$h"
    say "$DESTDIR$h -> $BIN"
done

# Man pages and completions come from the command line's own definition.
new="$DESTDIR$BIN"
"$new" manpages "$DESTDIR$MAN1" >/dev/null
chmod 0644 "$DESTDIR$MAN1"/ferryfs*.1
say "$DESTDIR$MAN1/ferryfs.1 and a page per command"
"$new" completions bash >"$DESTDIR$BASH_COMP"
"$new" completions zsh >"$DESTDIR$ZSH_COMP"
"$new" completions fish >"$DESTDIR$FISH_COMP"
chmod 0644 "$DESTDIR$BASH_COMP" "$DESTDIR$ZSH_COMP" "$DESTDIR$FISH_COMP"
say "completions for bash, zsh and fish"

sed "s|/usr/local/bin/ferryfs|$BIN|g" mount-examples/ferryfs@.service >"$DESTDIR$UNIT"
chmod 0644 "$DESTDIR$UNIT"
say "$DESTDIR$UNIT"
install -m 0644 README.md docs/cli.md docs/design.md docs/format.md mount-examples/fstab "$DESTDIR$DOC/"
say "$DESTDIR$DOC"
reload_systemd
