//! Other local users: what they can read of a pool and of a mount's control files, tried as
//! user nobody (setpriv). Runs as root (the test harness mounts as root).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{ferry_ok, s, TestPool};

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
