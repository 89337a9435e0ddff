//! Real programs through a ferryfs mount: sqlite3 (WAL mode), git, tar and rsync.
//!
//! Each test checks what the program produced, not only its exit status: SQLite's own
//! integrity check and the rows, `git fsck` and the checked-out tree, and a byte-for-byte
//! walk of the copied tree (types, modes, sizes, contents, symlink targets, hard-link groups
//! and modification times). A test is skipped, with a message, only when its program is
//! not installed.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{fsck_clean, TestPool};

const TRACK_SIZE: &str = "16K";
/// Volumes of similar size, so the allocator spreads data sets over all of them.
const VOLUMES: &[(&str, &str)] = &[("V1", "48M"), ("V2", "64M"), ("V3", "64M")];

/// Whether `tool` is on PATH; prints why the test is skipped when it is not.
fn have(tool: &str) -> bool {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false);
    if !found {
        eprintln!("SKIPPED: `{tool}` is not installed; this test needs it");
    }
    found
}

/// Runs a command, panics with its output unless it exits 0; returns stdout.
#[track_caller]
fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command with `input` on stdin; panics with its output unless it exits 0.
#[track_caller]
fn run_with_input(cmd: &mut Command, input: &[u8]) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait");
    feeder.join().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------
// Tree snapshots: what a faithful copy must preserve

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(PathBuf),
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: Kind,
    /// Permission bits (symlinks: 0, their mode means nothing).
    mode: u32,
    /// Modification time in whole seconds (symlinks: 0).
    mtime_s: i64,
    /// Link count of a regular file (directories: 0, their count depends on the fs).
    nlink: u64,
}

struct Snapshot {
    entries: BTreeMap<String, Entry>,
    /// Groups of paths that name the same inode (only groups of two or more).
    link_groups: BTreeSet<Vec<String>>,
}

/// Walks `root` (not following symlinks) and records every entry below it.
fn snapshot(root: &Path) -> Snapshot {
    let mut entries = BTreeMap::new();
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let rd = fs::read_dir(&dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()));
        for e in rd {
            let e = e.unwrap_or_else(|err| panic!("readdir {}: {err}", dir.display()));
            let name = e.file_name().to_string_lossy().into_owned();
            let path = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let full = root.join(&path);
            let md = fs::symlink_metadata(&full).unwrap_or_else(|err| panic!("lstat {}: {err}", full.display()));
            let ft = md.file_type();
            let entry = if ft.is_dir() {
                stack.push(path.clone());
                Entry { kind: Kind::Dir, mode: md.mode() & 0o7777, mtime_s: md.mtime(), nlink: 0 }
            } else if ft.is_symlink() {
                let target = fs::read_link(&full).unwrap_or_else(|err| panic!("readlink {}: {err}", full.display()));
                Entry { kind: Kind::Symlink(target), mode: 0, mtime_s: 0, nlink: 0 }
            } else if ft.is_file() {
                let data = fs::read(&full).unwrap_or_else(|err| panic!("read {}: {err}", full.display()));
                assert_eq!(data.len() as u64, md.len(), "{}: stat size differs from the bytes read", full.display());
                by_ino.entry(md.ino()).or_default().push(path.clone());
                Entry { kind: Kind::File(data), mode: md.mode() & 0o7777, mtime_s: md.mtime(), nlink: md.nlink() }
            } else {
                panic!("{}: unexpected file type {ft:?}", full.display());
            };
            entries.insert(path, entry);
        }
    }
    let link_groups = by_ino
        .into_values()
        .filter(|v| v.len() > 1)
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    Snapshot { entries, link_groups }
}

/// Asserts that the tree under `got` is a faithful copy of the tree under `want`.
#[track_caller]
fn assert_same_tree(want: &Path, got: &Path, what: &str) {
    let w = snapshot(want);
    let g = snapshot(got);
    let mut problems = Vec::new();
    for (path, we) in &w.entries {
        match g.entries.get(path) {
            None => problems.push(format!("{path}: missing")),
            Some(ge) => {
                match (&we.kind, &ge.kind) {
                    (Kind::File(a), Kind::File(b)) => {
                        if a.len() != b.len() {
                            problems.push(format!("{path}: size {} != {}", b.len(), a.len()));
                        } else if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
                            problems.push(format!("{path}: contents differ first at byte {i}"));
                        }
                    }
                    (a, b) if a != b => problems.push(format!("{path}: {b:?} != expected {a:?}")),
                    _ => {}
                }
                if we.mode != ge.mode {
                    problems.push(format!("{path}: mode {:o} != {:o}", ge.mode, we.mode));
                }
                if we.mtime_s != ge.mtime_s {
                    problems.push(format!("{path}: mtime {} != {}", ge.mtime_s, we.mtime_s));
                }
                if we.nlink != ge.nlink {
                    problems.push(format!("{path}: nlink {} != {}", ge.nlink, we.nlink));
                }
            }
        }
    }
    for path in g.entries.keys() {
        if !w.entries.contains_key(path) {
            problems.push(format!("{path}: unexpected entry"));
        }
    }
    if w.link_groups != g.link_groups {
        problems.push(format!("hard-link groups differ: got {:?}, expected {:?}", g.link_groups, w.link_groups));
    }
    assert!(problems.is_empty(), "{what}: {} differs from {}:\n{}", got.display(), want.display(), problems.join("\n"));
}

/// Builds a tree outside the mount: nested directories, files from 0 bytes to 3 MiB
/// (track-sized, off by one, and large), executable and private modes, an empty directory,
/// symlinks (to a file, to a directory, dangling, absolute) and hard links within and
/// across directories. About 6 MiB in all.
fn build_tree(root: &Path) {
    fs::create_dir_all(root.join("a/b/c/d")).unwrap();
    fs::create_dir_all(root.join("a/empty")).unwrap();
    fs::create_dir_all(root.join("x/y")).unwrap();
    let sizes: [usize; 10] = [0, 1, 100, 4095, 4096, 16385, 65536, 200_000, 1 << 20, 3 << 20];
    let dirs = ["", "a", "a/b", "a/b/c", "a/b/c/d", "x/y"];
    for (i, size) in sizes.iter().enumerate() {
        let dir = dirs[i % dirs.len()];
        let path = root.join(dir).join(format!("file{i}.bin"));
        fs::write(&path, common::pattern(*size, 1000 + i as u64)).unwrap();
    }
    // Many small files in one directory.
    for i in 0..120 {
        fs::write(
            root.join("x").join(format!("small-{i:03}.txt")),
            format!("small file number {i}\n").repeat(i % 7 + 1),
        )
        .unwrap();
    }
    let exe = root.join("a/run.sh");
    fs::write(&exe, "#!/bin/sh\necho hello\n").unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    let private = root.join("a/b/secret");
    fs::write(&private, "private\n").unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(root.join("x/y"), fs::Permissions::from_mode(0o750)).unwrap();

    symlink("a/file1.bin", root.join("link-to-file")).unwrap();
    symlink("../../x", root.join("a/b/link-to-dir")).unwrap();
    symlink("does/not/exist", root.join("a/dangling")).unwrap();
    symlink("/etc/hostname", root.join("x/absolute")).unwrap();

    // Hard links: a group of three across directories, and a pair in one directory.
    let big = root.join("a/b/file2.bin");
    fs::hard_link(&big, root.join("x/hard-a")).unwrap();
    fs::hard_link(&big, root.join("a/b/c/hard-b")).unwrap();
    fs::hard_link(root.join("x/small-005.txt"), root.join("x/small-005.link")).unwrap();
}

// ---------------------------------------------------------------------------------------
// sqlite3

/// `sqlite3` that waits for a lock held by another connection instead of failing with
/// SQLITE_BUSY (two processes share the database below).
fn sqlite3() -> Command {
    let mut c = Command::new("sqlite3");
    c.args(["-cmd", ".timeout 30000"]);
    c
}

/// The SQL that loads 10^4 rows in WAL mode, in four transactions, then deletes every
/// seventh row and updates every eleventh.
fn sqlite_script() -> String {
    let mut sql = String::from(
        "PRAGMA journal_mode=WAL;\n\
         CREATE TABLE t(id INTEGER PRIMARY KEY, k TEXT NOT NULL, v BLOB NOT NULL);\n\
         CREATE INDEX t_k ON t(k);\n",
    );
    for tx in 0..4 {
        sql.push_str("BEGIN;\n");
        for i in tx * 2500 + 1..=(tx + 1) * 2500 {
            let blob: String = common::pattern(48, i as u64).iter().map(|b| format!("{b:02X}")).collect();
            writeln!(sql, "INSERT INTO t(id, k, v) VALUES({i}, 'key-{i:05}', X'{blob}');").unwrap();
        }
        sql.push_str("COMMIT;\n");
    }
    sql.push_str(
        "BEGIN;\n\
         DELETE FROM t WHERE id % 7 = 0;\n\
         UPDATE t SET k = k || '-u' WHERE id % 11 = 0;\n\
         COMMIT;\n",
    );
    sql
}

/// The answer to `sqlite_check_sql` that the script must produce.
fn sqlite_expected() -> String {
    let ids: Vec<u64> = (1..=10_000).filter(|i| i % 7 != 0).collect();
    let count = ids.len();
    let sum: u64 = ids.iter().sum();
    let updated = ids.iter().filter(|i| *i % 11 == 0).count();
    let blob: String = common::pattern(48, 1234).iter().map(|b| format!("{b:02X}")).collect();
    format!("ok\nwal\n{count}|{sum}\n{updated}\n{blob}\n")
}

const SQLITE_CHECK_SQL: &str = "PRAGMA integrity_check;\n\
     PRAGMA journal_mode;\n\
     SELECT count(*), sum(id) FROM t;\n\
     SELECT count(*) FROM t WHERE k LIKE '%-u';\n\
     SELECT hex(v) FROM t WHERE id = 1234;\n";

#[test]
fn sqlite3_wal_database_survives_remount() {
    if !have("sqlite3") {
        return;
    }
    let tp = TestPool::new(TRACK_SIZE, VOLUMES);
    let m = tp.mount();
    fs::create_dir(m.p("db")).unwrap();
    let db = m.p("db/test.sqlite");
    let out = run_with_input(sqlite3().arg("-bail").arg(&db), sqlite_script().as_bytes());
    assert_eq!(out.trim(), "wal", "journal_mode=WAL was not accepted: {out:?}");
    let check = run_with_input(sqlite3().arg("-bail").arg(&db), SQLITE_CHECK_SQL.as_bytes());
    assert_eq!(check, sqlite_expected(), "database contents right after loading");

    // A reader holding a read transaction while another process commits a transaction
    // (net zero rows), through the WAL and its shared memory.
    let mut reader =
        sqlite3().arg(&db).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut rin = reader.stdin.take().unwrap();
    writeln!(rin, "BEGIN; SELECT count(*) FROM t;").unwrap();
    rin.flush().unwrap();
    run(sqlite3().arg("-bail").arg(&db).arg(
        "BEGIN; INSERT INTO t(id, k, v) VALUES(20000, 'late', X'00'); \
              DELETE FROM t WHERE id = 20000; COMMIT;",
    ));
    writeln!(rin, "SELECT count(*) FROM t; COMMIT;").unwrap();
    drop(rin);
    let rout = reader.wait_with_output().unwrap();
    assert!(rout.status.success(), "reader failed: {}", String::from_utf8_lossy(&rout.stderr));
    let counts = String::from_utf8_lossy(&rout.stdout);
    let want_count = (1..=10_000).filter(|i| i % 7 != 0).count();
    assert_eq!(counts, format!("{want_count}\n{want_count}\n"), "snapshot read in WAL mode");

    m.unmount();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    let check = run_with_input(sqlite3().arg("-bail").arg(m.p("db/test.sqlite")), SQLITE_CHECK_SQL.as_bytes());
    assert_eq!(check, sqlite_expected(), "database contents after a remount");
    m.unmount();
    fsck_clean(&tp.pool);
}

// ---------------------------------------------------------------------------------------
// git

/// `git` with a private, empty configuration, an identity, and every directory trusted.
fn git(home: &Path) -> Command {
    let mut c = Command::new("git");
    c.env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .args(["-c", "safe.directory=*"])
        .args(["-c", "user.name=ferryfs test", "-c", "user.email=test@ferryfs.invalid"])
        .args(["-c", "init.defaultBranch=main", "-c", "core.autocrlf=false"]);
    c
}

#[test]
fn git_init_commit_clone_fsck() {
    if !have("git") {
        return;
    }
    let tp = TestPool::new(TRACK_SIZE, VOLUMES);
    let home = tp.dir().join("home");
    fs::create_dir(&home).unwrap();
    let m = tp.mount();
    let src = m.p("git/src");
    fs::create_dir_all(&src).unwrap();
    run(git(&home).arg("init").arg(&src));

    // First commit: a tree of text and binary files.
    build_tree(&src.join("tree"));
    fs::write(src.join("README"), "ferryfs git test\n").unwrap();
    run(git(&home).arg("-C").arg(&src).args(["add", "-A"]));
    run(git(&home).arg("-C").arg(&src).args(["commit", "-q", "-m", "first"]));
    // Second commit: modify, delete, rename.
    fs::write(src.join("README"), "ferryfs git test, second version\n").unwrap();
    fs::remove_file(src.join("tree/x/small-000.txt")).unwrap();
    run(git(&home).arg("-C").arg(&src).args(["mv", "tree/a/run.sh", "tree/run.sh"]));
    run(git(&home).arg("-C").arg(&src).args(["add", "-A"]));
    run(git(&home).arg("-C").arg(&src).args(["commit", "-q", "-m", "second"]));
    run(git(&home).arg("-C").arg(&src).args(["fsck", "--full", "--strict"]));

    // Clone from the mount to the mount (a local clone hard-links the objects), and one
    // without the local shortcuts (a real pack transfer).
    let clone = m.p("git/clone");
    let clone2 = m.p("git/clone-nolocal");
    run(git(&home).arg("clone").arg("-q").arg(&src).arg(&clone));
    run(git(&home).arg("clone").arg("-q").arg("--no-local").arg(&src).arg(&clone2));
    let head = run(git(&home).arg("-C").arg(&src).args(["rev-parse", "HEAD"]));
    for c in [&clone, &clone2] {
        run(git(&home).arg("-C").arg(c).args(["fsck", "--full", "--strict"]));
        assert_eq!(run(git(&home).arg("-C").arg(c).args(["rev-parse", "HEAD"])), head);
        assert_eq!(
            run(git(&home).arg("-C").arg(c).args(["status", "--porcelain"])),
            "",
            "{}: fresh clone is not clean",
            c.display()
        );
        assert_eq!(run(git(&home).arg("-C").arg(c).args(["rev-list", "--count", "HEAD"])).trim(), "2");
        assert_eq!(
            fs::read(c.join("tree/a/b/c/d/file4.bin")).unwrap(),
            fs::read(src.join("tree/a/b/c/d/file4.bin")).unwrap()
        );
    }
    // Repack (writes packs, renames and unlinks loose objects), then check again.
    run(git(&home).arg("-C").arg(&clone).args(["gc", "-q", "--prune=now"]));
    run(git(&home).arg("-C").arg(&clone).args(["fsck", "--full", "--strict"]));

    m.unmount();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    for c in [m.p("git/src"), m.p("git/clone"), m.p("git/clone-nolocal")] {
        run(git(&home).arg("-C").arg(&c).args(["fsck", "--full", "--strict"]));
        assert_eq!(
            run(git(&home).arg("-C").arg(&c).args(["status", "--porcelain"])),
            "",
            "{}: not clean after a remount",
            c.display()
        );
    }
    m.unmount();
    fsck_clean(&tp.pool);
}

// ---------------------------------------------------------------------------------------
// tar

#[test]
fn tar_pipe_into_mount_is_byte_for_byte() {
    if !have("tar") {
        return;
    }
    let tp = TestPool::new(TRACK_SIZE, VOLUMES);
    let src = tp.dir().join("tree");
    build_tree(&src);
    let m = tp.mount();
    let dst = m.p("untarred");
    fs::create_dir(&dst).unwrap();

    let mut create = Command::new("tar")
        .arg("-C")
        .arg(&src)
        .args(["-cf", "-", "."])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let extract = Command::new("tar")
        .arg("-C")
        .arg(&dst)
        .args(["-xpf", "-"])
        .stdin(create.stdout.take().unwrap())
        .output()
        .unwrap();
    let created = create.wait_with_output().unwrap();
    assert!(created.status.success(), "tar c failed: {}", String::from_utf8_lossy(&created.stderr));
    assert!(
        extract.status.success(),
        "tar x into the mount failed ({}): {}",
        extract.status,
        String::from_utf8_lossy(&extract.stderr)
    );
    assert_same_tree(&src, &dst, "tar c | tar x into the mount");

    // And back out, from the mount.
    let back = tp.dir().join("back");
    fs::create_dir(&back).unwrap();
    let archive = tp.dir().join("out.tar");
    run(Command::new("tar").arg("-C").arg(&dst).arg("-cf").arg(&archive).arg("."));
    run(Command::new("tar").arg("-C").arg(&back).arg("-xpf").arg(&archive));
    assert_same_tree(&src, &back, "tar c from the mount, tar x outside");

    m.unmount();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    assert_same_tree(&src, &m.p("untarred"), "the untarred tree after a remount");
    m.unmount();
    fsck_clean(&tp.pool);
}

// ---------------------------------------------------------------------------------------
// rsync

/// Sets a file's modification time to `secs` after the epoch.
fn set_mtime(path: &Path, secs: u64) {
    let f = fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)).unwrap();
}

#[test]
fn rsync_into_mount_and_back_out() {
    if !have("rsync") {
        return;
    }
    let tp = TestPool::new(TRACK_SIZE, VOLUMES);
    let src = tp.dir().join("tree");
    build_tree(&src);
    let m = tp.mount();
    let dst = m.p("synced");
    let rsync = |from: &Path, to: &Path, extra: &[&str]| {
        let mut c = Command::new("rsync");
        c.args(["-aH", "--delete"]).args(extra);
        c.arg(format!("{}/", from.display())).arg(format!("{}/", to.display()));
        run(&mut c);
    };

    rsync(&src, &dst, &[]);
    assert_same_tree(&src, &dst, "rsync -aH into the mount");

    // Changes: rsync's delta transfer writes a temp file and renames it over the old one;
    // --delete removes; then an in-place update rewrites the middle of a file.
    // Same sizes, so each change also gets a distinct mtime for rsync's quick check.
    let mut big = fs::read(src.join("a/b/c/file9.bin")).unwrap();
    big[1_000_000..1_000_100].copy_from_slice(&[0xEE; 100]);
    fs::write(src.join("a/b/c/file9.bin"), &big).unwrap();
    set_mtime(&src.join("a/b/c/file9.bin"), 1_600_000_000);
    fs::remove_file(src.join("x/small-010.txt")).unwrap();
    fs::write(src.join("a/new-file"), common::pattern(70_000, 77)).unwrap();
    rsync(&src, &dst, &[]);
    assert_same_tree(&src, &dst, "second rsync (changed, deleted, new files)");

    let mut f8 = fs::read(src.join("a/b/file8.bin")).unwrap();
    f8[500_000..500_010].copy_from_slice(b"0123456789");
    f8.extend_from_slice(b"appended tail");
    fs::write(src.join("a/b/file8.bin"), &f8).unwrap();
    set_mtime(&src.join("a/b/file8.bin"), 1_600_000_100);
    rsync(&src, &dst, &["--inplace", "--no-whole-file"]);
    assert_same_tree(&src, &dst, "rsync --inplace");

    let out = tp.dir().join("out");
    rsync(&dst, &out, &[]);
    assert_same_tree(&src, &out, "rsync -aH from the mount back out");

    m.unmount();
    fsck_clean(&tp.pool);
    let m = tp.mount();
    assert_same_tree(&src, &m.p("synced"), "the synced tree after a remount");
    m.unmount();
    fsck_clean(&tp.pool);
}
