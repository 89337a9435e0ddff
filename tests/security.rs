//! Other local users: what they can read of a pool and of a mount's control files, tried as
//! user nobody (setpriv). Runs as root (the test harness mounts as root).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{assert_one_clear_line, bin, ferry_ok, s, TestPool};

/// Run `argv` as user and group nobody, with no supplementary groups.
fn as_nobody(argv: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(argv)
        .output()
        .expect("run setpriv")
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn have_setpriv() -> bool {
    Command::new("setpriv").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// The story: the pool directory was 0755 and its files took the umask (0644), so any local
/// user could `grep -a SECRET POOL/volumes/VOL1.img` and read a 0600 file of a 0700
/// directory of the mount, bypassing the mount's permissions; `.ferry/status` and
/// `.ferry/events`, which name every path and job, were world-readable.
#[test]
fn other_users_read_nothing_of_the_pool_or_the_control_files() {
    if !have_setpriv() {
        eprintln!("SKIPPED: setpriv is not installed");
        return;
    }
    let tp = TestPool::new("64K", &[("V1", "16M")]);
    // Open the test's temp directory to everyone: only ferryfs's own modes protect the pool.
    fs::set_permissions(tp.dir(), fs::Permissions::from_mode(0o755)).unwrap();
    let m = tp.mount();
    fs::create_dir(m.p("private")).unwrap();
    fs::set_permissions(m.p("private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(m.p("private/secret"), b"SECRET-7f3a9c").unwrap();
    fs::set_permissions(m.p("private/secret"), fs::Permissions::from_mode(0o600)).unwrap();
    {
        let f = fs::File::open(m.p("private/secret")).unwrap();
        f.sync_all().unwrap();
    }
    let pool = tp.pool.clone();
    let image = pool.join("volumes/V1.img");

    // Through the mount, nobody is refused, as the modes say.
    let out = as_nobody(&["cat", s(&m.p("private/secret"))]);
    assert!(!out.status.success(), "nobody read the secret through the mount");
    // Nor around it: the pool and its images are the owner's alone.
    for argv in [vec!["cat", s(&image)], vec!["ls", s(&pool)], vec!["cat", s(&pool.join("catalog.log"))]] {
        let out = as_nobody(&argv);
        assert!(!out.status.success(), "nobody ran {argv:?}: {}", String::from_utf8_lossy(&out.stdout));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("SECRET"));
    }
    // The control files name every path and job: the mount's owner's only.
    for name in ["status", "events", "control", "metrics"] {
        let out = as_nobody(&["cat", s(&m.p(&format!(".ferry/{name}")))]);
        assert!(!out.status.success(), "nobody read .ferry/{name}");
    }
    let out = as_nobody(&["ls", s(&m.p(".ferry"))]);
    assert!(!out.status.success(), "nobody listed .ferry");
    // ferryfs's own views of the catalog name paths nobody may not see: refused, clearly.
    let ferry_bin = bin();
    let fb = s(&ferry_bin);
    for argv in [
        vec![fb, "ls", s(tp.mnt())],
        vec![fb, "ls", s(tp.mnt()), "/private", "--extents", "--json"],
        vec![fb, "volume", "list", s(tp.mnt())],
        vec![fb, "status", s(tp.mnt())],
    ] {
        let out = as_nobody(&argv);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "nobody ran {argv:?}: {stdout}");
        assert!(!stdout.contains("secret") && !stderr.contains("secret"), "{argv:?} named the secret");
        assert_one_clear_line(&stderr, "only the mount's owner may use it");
    }
    for argv in [vec![fb, "ls", s(&pool)], vec![fb, "volume", "list", s(&pool)]] {
        let out = as_nobody(&argv);
        assert!(!out.status.success(), "nobody ran {argv:?}");
        assert_one_clear_line(&String::from_utf8_lossy(&out.stderr), "permission denied");
    }
    // The owner (root here) still reads them.
    assert!(fs::read_to_string(m.p(".ferry/status")).unwrap().contains("\"volumes\""));

    // Every file ferryfs made is 0600, every directory 0700.
    assert_eq!(mode(&pool), 0o700, "the pool directory");
    assert_eq!(mode(&pool.join("volumes")), 0o700, "the volumes directory");
    for entry in fs::read_dir(&pool).unwrap().chain(fs::read_dir(pool.join("volumes")).unwrap()) {
        let p = entry.unwrap().path();
        if p.is_file() {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
    m.unmount();

    // fsck says nothing of exposure on a private pool, and warns about one others can read.
    let out = ferry_ok(&["fsck", s(&pool)]);
    assert!(!out.contains("warning"), "{out}");
    fs::set_permissions(&image, fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(&pool, fs::Permissions::from_mode(0o755)).unwrap();
    let out = ferry_ok(&["fsck", s(&pool)]);
    assert!(out.contains("warning: the pool directory") && out.contains("mode 0755"), "{out}");
    assert!(out.contains("warning: volume V1's image") && out.contains("chmod go-rwx"), "{out}");
}

/// An empty directory made by the admin with a loose mode becomes the owner's at `init`.
#[test]
fn init_makes_an_existing_empty_directory_private() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    fs::create_dir(&pool).unwrap();
    fs::set_permissions(&pool, fs::Permissions::from_mode(0o777)).unwrap();
    ferry_ok(&["init", s(&pool)]);
    assert_eq!(mode(&pool), 0o700);
    assert_eq!(mode(&pool.join("catalog.snap")), 0o600);
    assert_eq!(mode(&pool.join("catalog.log")), 0o600);
}

/// The story: `volume add MNT SELF --path MNT/self.img` was accepted and hung the mount for
/// good (the pool would have stored a volume inside itself); umount, fusermount3 -u and
/// SIGTERM could not recover it. Such a path is refused now, by the CLI and by the control
/// verb alike, and the mount carries on.
#[test]
fn an_image_inside_the_pools_own_mount_is_refused() {
    let tp = TestPool::new("64K", &[("V1", "16M")]);
    let m = tp.mount();
    let inside = m.p("sub/self.img");
    fs::create_dir(m.p("sub")).unwrap();
    let out_file = tp.dir().join("add.out");
    let mut child = Command::new(common::bin())
        .args(["volume", "add", s(&m.mnt), "SELF", "--size", "1M", "--path", s(&inside)])
        .stdin(std::process::Stdio::null())
        .stdout(fs::File::create(&out_file).unwrap())
        .stderr(fs::File::create(tp.dir().join("add.err")).unwrap())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            panic!("volume add with an image inside the mount hung");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let err = fs::read_to_string(tp.dir().join("add.err")).unwrap();
    assert!(!status.success());
    common::assert_one_clear_line(&err, "inside");
    assert!(err.contains("a mount of this pool"), "{err}");
    assert!(!inside.exists(), "no image was made");
    // The control verb too (an absolute path, as the protocol wants).
    let r = common::jobs::control(&m.mnt, &format!("add SELF2 size=1M path={}", s(&m.p("self2.img"))));
    assert!(r.as_ref().is_err_and(|e| e.contains("inside")), "{r:?}");
    // The mount carries on.
    fs::write(m.p("after"), b"still serving").unwrap();
    assert_eq!(fs::read(m.p("after")).unwrap(), b"still serving");
    assert_eq!(common::volume_list_json(&m.mnt)["volumes"].as_array().unwrap().len(), 1);
    m.unmount();
}

/// A mount made by an unprivileged user (through fusermount3), with every point of the
/// shared-machine story tried by that user, and by a second unprivileged user (`daemon`).
///
/// This machine's /dev/fuse may be root's only (0600), where Debian makes it 0666; the test
/// runs in a private mount namespace with a 0666 node bound over /dev/fuse, so the machine
/// is left as it was.
#[test]
fn an_unprivileged_users_mount_keeps_every_promise() {
    if !have_setpriv() || !Path::new("/usr/bin/fusermount3").exists() {
        eprintln!("SKIPPED: setpriv or fusermount3 is not installed");
        return;
    }
    let tmp = tempfile::Builder::new().prefix("ferryfs-nobody-").tempdir().unwrap();
    let d = tmp.path();
    fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    let work = d.join("nobody");
    fs::create_dir(&work).unwrap();
    let chown = Command::new("chown").args(["nobody:nogroup", s(&work)]).status().unwrap();
    assert!(chown.success());
    let b = bin();
    let script = format!(
        r#"
set -eu
F={bin}
W={work}
cd /
$F init $W/pool
$F volume add $W/pool V1 --size 16M
$F volume add $W/pool V2 --size 16M
mkdir $W/mnt
$F mount $W/pool $W/mnt
echo "modes: $(stat -c %a $W/pool $W/pool/volumes $W/pool/catalog.snap $W/pool/volumes/V1.img $W/pool/mount.log | tr '\n' ' ')"
findmnt -n -o FSTYPE $W/mnt
mkdir "$W/mnt/a=b"
head -c 200000 /dev/urandom >"$W/mnt/a=b/x=1"
$F migrate $W/mnt "/a=b/x=1" --to V2 --wait >/dev/null
echo "volumes of x=1: $($F ls $W/mnt '/a=b/x=1' --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["data_sets"][0]["volumes"])')"
if $F volume add $W/mnt SELF --size 1M --path $W/mnt/self.img 2>$W/err; then echo "IMAGE INSIDE ITS OWN MOUNT ACCEPTED"; fi
echo "self: $(cat $W/err)"
python3 - $W/mnt/.ferry <<'PY'
import json, os, sys
ferry = sys.argv[1]
def status():
    return json.load(open(ferry + "/status"))
fd = os.open(ferry + "/control", os.O_RDWR)
os.write(fd, b"set max-jobs=1")       # a command in two writes runs whole
os.write(fd, b"2\n")
print("split:", status()["max_jobs"])
try:
    os.write(fd, b"bogus verb\nset max-jobs=3\n")
    print("refusal: write succeeded")
except OSError as e:
    print("refusal: errno", e.errno)
print("after refusal:", status()["max_jobs"])
try:
    # The kernel splits it into many writes; the one with the newline is refused.
    print("overlong: wrote", os.write(fd, b"x" * (5 << 20) + b"\n"), "of", (5 << 20) + 1)
except OSError as e:
    print("overlong: errno", e.errno)
replies = b""
while True:
    chunk = os.read(fd, 1 << 16)
    if not chunk:
        break
    replies += chunk
os.close(fd)
for line in replies.decode().splitlines():
    print("reply:", line[:200])
print("events bytes:", len(open(ferry + "/events").read()))
PY
"#,
        bin = s(&b),
        work = s(&work)
    );
    let other = format!(
        r#"
F={bin}
W={work}
cd /
for argv in "cat $W/mnt/a=b/x=1" "ls $W/mnt" "$F ls $W/mnt" "$F status $W/mnt" "$F ls $W/pool" "cat $W/pool/volumes/V2.img"; do
    if out=$($argv 2>&1); then echo "OTHER USER RAN: $argv"; else echo "refused: $argv: $out"; fi
done
"#,
        bin = s(&b),
        work = s(&work)
    );
    // One namespace for both users, so that the second sees the first one's mount.
    let outer = format!(
        r#"
set -eu
dev=$(mktemp -d /run/ferryfs-dev-XXXXXX)
mount -t tmpfs -o mode=0755 devfuse "$dev"
mknod -m 0666 "$dev/fuse" c 10 229
mount --bind "$dev/fuse" /dev/fuse
cat >{work}/other.sh <<'OTHER'
{other}
OTHER
chmod 0755 {work}/other.sh
cat >{work}/nobody.sh <<'NOBODY'
{script}
NOBODY
trap 'umount -l {work}/mnt 2>/dev/null || true' EXIT
setpriv --reuid=nobody --regid=nogroup --clear-groups sh {work}/nobody.sh
setpriv --reuid=daemon --regid=daemon --clear-groups sh {work}/other.sh
setpriv --reuid=nobody --regid=nogroup --clear-groups {bin} umount {work}/mnt
"#,
        bin = s(&b),
        work = s(&work),
        other = other,
        script = script
    );
    let out =
        Command::new("unshare").args(["--mount", "--propagation", "private", "bash", "-c", &outer]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the unprivileged user's session failed:\n{text}");
    let want = [
        "modes: 700 700 600 600 600 ",
        "fuse.ferryfs",
        "volumes of x=1: ['V2']",
        "split: 12",
        "refusal: errno 22",
        "after refusal: 3",
        "reply: error: unknown verb \"bogus\"",
        "reply: error: a command line holds at most 4096 bytes",
        "reply: ok max-jobs=12",
        "reply: ok max-jobs=3",
    ];
    for w in want {
        assert!(text.contains(w), "missing {w:?} in:\n{text}");
    }
    assert!(text.contains("self: ferryfs: error:") && text.contains("inside"), "image inside its mount:\n{text}");
    assert!(!text.contains("ACCEPTED") && !text.contains("OTHER USER RAN"), "{text}");
    assert!(
        text.contains(&format!("refused: {} ls", s(&b))) && text.contains("only the mount's owner may use it"),
        "{text}"
    );
    let events: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("events bytes: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("events size");
    assert!(events < 64 << 10, "a 5 MB line was not echoed into the events ({events} bytes)");
}
