//! The install step and what it makes possible: the README's "Using it" block, run as
//! written, and mount(8) mounting a `fuse.ferryfs` line of /etc/fstab through the helper.
//!
//! Both run in a private mount namespace (unshare(1)): /usr/local and /usr/sbin (where
//! mount(8) finds helpers) are overlays whose changes land in a temp directory, /srv and /mnt
//! are empty tmpfs, and /etc/fstab is a temp file. The machine itself is left as it was.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shell block under "## Using it" in the README.
fn readme_block() -> String {
    let readme = fs::read_to_string(repo().join("README.md")).unwrap();
    let section = &readme[readme.find("## Using it").expect("a Using it section")..];
    let start = section.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let end = section[start..].find("```").expect("the block ends") + start;
    section[start..end].to_string()
}

/// Run `script` with bash -eu in a private mount namespace set up as the module says.
/// Returns (success, combined output).
fn in_sandbox(tmp: &Path, script: &str) -> (bool, String) {
    let setup = format!(
        r#"
set -euo pipefail
T={tmp}
for d in local sbin; do
    mkdir -p "$T/$d.up" "$T/$d.work"
    mount -t overlay overlay -o "lowerdir=/usr/$d,upperdir=$T/$d.up,workdir=$T/$d.work" "/usr/$d"
done
mount -t tmpfs sandbox /srv
mount -t tmpfs sandbox /mnt
touch "$T/fstab"
mount --bind "$T/fstab" /etc/fstab
# Whatever happens, no mount outlives the test (the daemon would keep the namespace).
cleanup() {{
    for m in $(findmnt -rn -t fuse.ferryfs -o TARGET | grep -E '^/(mnt|srv)/'); do umount -l "$m" || true; done
}}
trap cleanup EXIT
set -x
"#,
        tmp = tmp.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "bash", "-c"])
        .arg(format!("{setup}\n{script}"))
        .current_dir(repo())
        .env("FERRYFS_BIN", bin())
        .env("PATH", "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .output()
        .expect("unshare runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn the_readme_using_it_block_runs_as_written() {
    let tmp = tempfile::Builder::new().prefix("ferryfs-readme-").tempdir().unwrap();
    let block = readme_block();
    assert!(block.starts_with("scripts/install.sh\n"), "the block installs first:\n{block}");
    let (ok, out) = in_sandbox(tmp.path(), &block);
    assert!(ok, "the README's Using it block failed:\n{out}");
    // What a reader of the block would look for in its output.
    for want in [
        "added volume VOL002",
        "mounted /srv/ferry at /mnt/ferry",
        "switched to VOL002",
        "plan ",
        "ok retired VOL002",
        "ok reopened VOL001",
        "ferryfs_volume_",
        "unmounted /mnt/ferry",
        "fuse.ferryfs",
    ] {
        assert!(out.contains(want), "the block's output lacks {want:?}:\n{out}");
    }
    assert!(!out.contains("ferryfs: error"), "an error in the block's output:\n{out}");
}

#[test]
fn mount_mounts_fstab_lines_and_fuse_ferryfs_through_the_installed_helper() {
    let tmp = tempfile::Builder::new().prefix("ferryfs-fstab-").tempdir().unwrap();
    let script = r#"
scripts/install.sh
test "$(readlink /sbin/mount.fuse.ferryfs)" = /usr/local/bin/ferryfs
mkdir -p /srv/p /mnt/a /mnt/b
ferryfs init /srv/p
ferryfs volume add /srv/p V1 --size 64M
echo '/srv/p /mnt/a fuse.ferryfs defaults,nofail,_netdev,x-systemd.requires-mounts-for=/srv,threads=2 0 0' >>/etc/fstab
mount /mnt/a
findmnt -rn -t fuse.ferryfs -o TARGET,SOURCE,FSTYPE
echo through-fstab >/mnt/a/f
sync /mnt/a/f
umount /mnt/a
# umount(8) ran the helper, which waited for the daemon: the pool is clean and unlocked.
test ! -e /srv/p/mounted
mount -t fuse.ferryfs /srv/p /mnt/b -o ro
cat /mnt/b/f
if echo x >/mnt/b/g; then echo "WROTE TO A READ-ONLY MOUNT"; exit 1; fi
# Without an fstab line, umount(8) knows the type only as "fuse" and unmounts by itself;
# the daemon writes its catalog and exits right after.
umount /mnt/b
for i in $(seq 600); do [ -e /srv/p/mounted ] || break; sleep 0.1; done
if mount -t fuse.ferryfs /srv/p /mnt/b -o bogus 2>/tmp/err.$$; then echo "MOUNTED WITH BOGUS"; exit 1; fi
cat /tmp/err.$$; rm -f /tmp/err.$$
if findmnt /mnt/b; then echo "STILL MOUNTED"; exit 1; fi
ferryfs fsck /srv/p
"#;
    let (ok, out) = in_sandbox(tmp.path(), script);
    assert!(ok, "mount(8) through the helper failed:\n{out}");
    assert!(out.contains("/mnt/a ferryfs:/srv/p fuse.ferryfs"), "findmnt lists the fstab mount:\n{out}");
    assert!(out.contains("through-fstab"), "the read-only mount reads the data:\n{out}");
    assert!(out.contains("Read-only file system"), "a write to the ro mount is refused:\n{out}");
    assert!(out.contains("unknown mount option bogus"), "the bad option is named:\n{out}");
}

#[test]
fn install_puts_every_piece_in_place_and_uninstall_takes_it_away() {
    let tmp = tempfile::Builder::new().prefix("ferryfs-install-").tempdir().unwrap();
    let dest = tmp.path().join("root");
    let run = |args: &[&str]| {
        let out = Command::new(repo().join("scripts/install.sh"))
            .args(args)
            .env("DESTDIR", &dest)
            .env("FERRYFS_BIN", bin())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "install.sh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[]);
    let at = |p: &str| dest.join(p.trim_start_matches('/'));
    let bin_mode = fs::metadata(at("/usr/local/bin/ferryfs")).unwrap().permissions().mode();
    assert_eq!(bin_mode & 0o777, 0o755);
    for h in ["/sbin/mount.fuse.ferryfs", "/sbin/umount.fuse.ferryfs"] {
        assert_eq!(fs::read_link(at(h)).unwrap(), Path::new("/usr/local/bin/ferryfs"), "{h}");
    }
    let man = fs::read_to_string(at("/usr/local/share/man/man1/ferryfs.1")).unwrap();
    assert!(man.starts_with(".ie") || man.contains(".TH ferryfs"), "a man page: {}", &man[..man.len().min(200)]);
    assert!(at("/usr/local/share/man/man1/ferryfs-migrate.1").exists(), "a page per command");
    let bash = fs::read_to_string(at("/usr/local/share/bash-completion/completions/ferryfs")).unwrap();
    assert!(bash.contains("migrate") && bash.contains("drain"), "bash completions name the commands");
    assert!(fs::read_to_string(at("/usr/local/share/zsh/site-functions/_ferryfs"))
        .unwrap()
        .contains("#compdef ferryfs"));
    assert!(fs::read_to_string(at("/usr/local/share/fish/vendor_completions.d/ferryfs.fish"))
        .unwrap()
        .contains("complete -c ferryfs"));
    let unit = fs::read_to_string(at("/usr/local/lib/systemd/system/ferryfs@.service")).unwrap();
    assert!(unit.contains("Type=notify"));
    assert!(unit.contains("ExecStart=/usr/local/bin/ferryfs mount ${POOL} ${MOUNTPOINT} --foreground"));
    assert!(at("/usr/local/share/doc/ferryfs/cli.md").exists());

    run(&["--uninstall"]);
    let left: Vec<PathBuf> = walk(&dest).into_iter().filter(|p| !p.is_dir()).collect();
    assert!(left.is_empty(), "uninstall left {left:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}
