//! Model-based test: a random script of file operations runs through a real mount and
//! against an in-memory oracle (path -> inode -> bytes, plus handles held open across
//! steps, which follow renames and keep unlinked files alive). After every step the mount must hold
//! exactly the oracle's files, sizes and bytes, and every operation must succeed or fail
//! exactly as the oracle says. Remounts are steps of the script, and a final remount
//! compares everything once more, together with `ls --json` and `ferryfs fsck`.
//!
//! Small tracks (4 KiB or 16 KiB) and small first volumes make files span many extents
//! and spill from one volume to the next.
//!
//! Migrations are steps of the script too: a data set moves to a volume through
//! `.ferry/control`, and the script waits for it, lets it run while the next steps go on
//! (remounts included: the next mount starts it again), or cancels it. Moving data never
//! changes what the oracle says. At the end every job must have switched or been
//! cancelled, or failed for a reason that is legitimate (the target filled up, the data set
//! was removed); those and the refusals are printed. No volume may then hold a track that
//! no data set holds.
//!
//! Data sets are sparse: punches (fallocate PUNCH_HOLE) and truncates make holes, and
//! every `ls --json` check asserts that each track holding data is mapped.
//!
//! Special files and extended attributes are steps too: fifos and device nodes come and go
//! at their own paths (they hold no bytes, and no migration touches them), and `user.*`
//! attributes are set (plain, create-only, replace-only) and removed on the data sets. The
//! oracle keeps the attributes with the inode, so they follow renames and links, survive
//! an O_TRUNC and a remount, and go with the file.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use common::jobs::{self, control, events, is_final, reply_jobs, status, JOB_LIMIT};
use common::{fsck_clean, ls_json, ls_json_at, volume_list_json, Mounted, TestPool};

/// The paths the script works on; `d` and `d/e` exist from the start.
const NAMES: [&str; 6] = ["a", "b", "c", "d/x", "d/y", "d/e/z"];
const DIRS: [&str; 2] = ["d", "d/e"];
/// The paths of special files: apart from the data sets', so that no step opens a fifo.
const SPECIALS: [&str; 2] = ["p", "d/s"];
/// The attribute names the script sets on data sets.
const XATTR_KEYS: [&str; 3] = ["user.k0", "user.k1", "user.a-longer-name"];
const XATTR_LEN_MAX_BYTES: usize = 3000;
/// Largest write offset and length: files stay below ~300 KiB.
const WRITE_OFFSET_MAX_BYTES: u64 = 256 * 1024;
const WRITE_LEN_MAX_BYTES: usize = 48 * 1024;
const TRUNCATE_MAX_BYTES: u64 = 300 * 1024;
/// Volumes: small enough that the files (at most 6 x 304 KiB) need all three, so data sets
/// spill across volumes.
const VOLUMES: &[(&str, &str)] = &[("V1", "256K"), ("V2", "1M"), ("V3", "1M")];

/// Slots for handles held open across steps.
const HELD_SLOTS: usize = 2;

#[derive(Debug, Clone)]
enum Op {
    /// open(O_CREAT|O_EXCL)
    Create(usize),
    /// pwrite of `len` pattern bytes at `offset` into an existing file (open, write, close)
    Write {
        name: usize,
        offset: u64,
        len: usize,
        seed: u64,
    },
    /// ftruncate to `size_bytes` (up or down)
    Truncate {
        name: usize,
        size_bytes: u64,
    },
    /// fallocate(PUNCH_HOLE|KEEP_SIZE) of `len` bytes at `offset`: they read as zeros, the
    /// size stays, and whole tracks among them become a hole
    Punch {
        name: usize,
        offset: u64,
        len: u64,
    },
    /// open(O_WRONLY|O_APPEND) and one write of `len` bytes
    Append {
        name: usize,
        len: usize,
        seed: u64,
    },
    /// open(O_WRONLY|O_CREAT|O_TRUNC), as a shell's `>` does, and one write of `len` bytes
    Overwrite {
        name: usize,
        len: usize,
        seed: u64,
    },
    /// rename, replacing the target if it exists
    Rename {
        from: usize,
        to: usize,
    },
    /// link(from, to): a second name for the same data set
    Link {
        from: usize,
        to: usize,
    },
    Unlink(usize),
    /// open, fsync, close
    Fsync(usize),
    /// open a path read-write and keep the handle in a slot (closing what the slot held);
    /// the handle follows its file through renames and keeps it alive after an unlink
    Hold {
        slot: usize,
        name: usize,
    },
    /// pwrite through a held handle
    HeldWrite {
        slot: usize,
        offset: u64,
        len: usize,
        seed: u64,
    },
    /// ftruncate through a held handle
    HeldTruncate {
        slot: usize,
        size_bytes: u64,
    },
    /// close a held handle
    Release(usize),
    /// close every handle, clean unmount, mount again
    Remount,
    /// mkfifo (or, `device`, mknod of /dev/null's twin) at a special-file path
    Mknod {
        special: usize,
        device: bool,
    },
    /// unlink of a special-file path
    UnlinkSpecial(usize),
    /// setxattr of `XATTR_KEYS[key]` on a data set's path, with `flags` 0, XATTR_CREATE or
    /// XATTR_REPLACE
    SetXattr {
        name: usize,
        key: usize,
        len: usize,
        seed: u64,
        flags: i32,
    },
    RemoveXattr {
        name: usize,
        key: usize,
    },
    /// `migrate /PATH to VOL cutover=.. rate=..` through `.ferry/control`, PATH an existing
    /// data set picked by `name`; the data the oracle knows does not change
    Migrate {
        name: usize,
        to: usize,
        close: bool,
        rate_kib: u64,
        after: After,
    },
}

/// What the script does with a migration it started.
#[derive(Debug, Clone, Copy)]
enum After {
    /// Wait for it to end (unless it waits in close mode for a handle the script holds).
    Wait,
    /// Let it run while the next steps go on.
    Background,
    /// Cancel it after a while, then wait for it to end.
    Cancel { after_ms: u64 },
}

fn offset_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        // Offsets at and just before 4 KiB boundaries, and anywhere in the range.
        (0u64..8).prop_map(|k| k * 4096 - k.min(1)),
        0..=WRITE_OFFSET_MAX_BYTES,
    ]
}

fn len_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![1usize..64, 1..=WRITE_LEN_MAX_BYTES]
}

fn size_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..5000, 0..=TRUNCATE_MAX_BYTES]
}

fn after_strategy() -> impl Strategy<Value = After> {
    prop_oneof![Just(After::Wait), Just(After::Background), (0u64..40).prop_map(|after_ms| After::Cancel { after_ms }),]
}

fn migrate_strategy() -> impl Strategy<Value = Op> {
    (0..NAMES.len(), 0..VOLUMES.len(), any::<bool>(), prop_oneof![Just(0u64), 128u64..1024], after_strategy())
        .prop_map(|(name, to, close, rate_kib, after)| Op::Migrate { name, to, close, rate_kib, after })
}

/// Scripts that start with every file written, and move data sets more often.
fn migrating_script_strategy() -> impl Strategy<Value = Vec<Op>> {
    let setup = prop::collection::vec((len_strategy(), any::<u64>()), NAMES.len()).prop_map(|files| {
        files
            .into_iter()
            .enumerate()
            .flat_map(|(name, (len, seed))| [Op::Create(name), Op::Write { name, offset: 0, len, seed }])
            .collect::<Vec<Op>>()
    });
    let ops = prop::collection::vec(prop_oneof![1 => migrate_strategy(), 3 => op_strategy()], 1..40);
    (setup, ops).prop_map(|(mut setup, ops)| {
        setup.extend(ops);
        setup
    })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let name = 0..NAMES.len();
    let slot = 0..HELD_SLOTS;
    prop_oneof![
        2 => name.clone().prop_map(Op::Create),
        5 => (name.clone(), offset_strategy(), len_strategy(), any::<u64>())
            .prop_map(|(name, offset, len, seed)| Op::Write { name, offset, len, seed }),
        2 => (name.clone(), size_strategy()).prop_map(|(name, size_bytes)| Op::Truncate { name, size_bytes }),
        2 => (name.clone(), offset_strategy(), size_strategy())
            .prop_map(|(name, offset, len)| Op::Punch { name, offset, len: len.max(1) }),
        1 => (name.clone(), len_strategy(), any::<u64>())
            .prop_map(|(name, len, seed)| Op::Append { name, len, seed }),
        1 => (name.clone(), prop_oneof![0usize..1, len_strategy()], any::<u64>())
            .prop_map(|(name, len, seed)| Op::Overwrite { name, len, seed }),
        2 => (name.clone(), name.clone()).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => (name.clone(), name.clone()).prop_map(|(from, to)| Op::Link { from, to }),
        1 => name.clone().prop_map(Op::Unlink),
        1 => name.clone().prop_map(Op::Fsync),
        3 => migrate_strategy(),
        2 => (slot.clone(), name.clone()).prop_map(|(slot, name)| Op::Hold { slot, name }),
        3 => (slot.clone(), offset_strategy(), len_strategy(), any::<u64>())
            .prop_map(|(slot, offset, len, seed)| Op::HeldWrite { slot, offset, len, seed }),
        1 => (slot.clone(), size_strategy()).prop_map(|(slot, size_bytes)| Op::HeldTruncate { slot, size_bytes }),
        1 => slot.prop_map(Op::Release),
        1 => Just(Op::Remount),
        1 => (0..SPECIALS.len(), any::<bool>()).prop_map(|(special, device)| Op::Mknod { special, device }),
        1 => (0..SPECIALS.len()).prop_map(Op::UnlinkSpecial),
        3 => (name.clone(), 0..XATTR_KEYS.len(), 0..XATTR_LEN_MAX_BYTES, any::<u64>(),
              prop_oneof![Just(0), Just(libc::XATTR_CREATE), Just(libc::XATTR_REPLACE)])
            .prop_map(|(name, key, len, seed, flags)| Op::SetXattr { name, key, len, seed, flags }),
        1 => (name, 0..XATTR_KEYS.len()).prop_map(|(name, key)| Op::RemoveXattr { name, key }),
    ]
}

/// The oracle: names point at inodes, inodes own bytes. An inode lives while a name or a
/// held handle refers to it.
#[derive(Default)]
struct Oracle {
    names: BTreeMap<String, u64>,
    data: BTreeMap<u64, Vec<u8>>,
    held: [Option<u64>; HELD_SLOTS],
    next_ino: u64,
    /// Special-file path -> is it a device (else a fifo).
    specials: BTreeMap<String, bool>,
    /// Inode -> its attributes.
    xattrs: BTreeMap<u64, BTreeMap<String, Vec<u8>>>,
}

impl Oracle {
    /// Path -> bytes of every file reachable by a name.
    fn files(&self) -> BTreeMap<String, &Vec<u8>> {
        self.names.iter().map(|(n, ino)| (n.clone(), &self.data[ino])).collect()
    }

    /// Drops inodes that no name and no handle refers to.
    fn collect(&mut self) {
        let live: BTreeSet<u64> = self.names.values().copied().chain(self.held.iter().flatten().copied()).collect();
        self.data.retain(|ino, _| live.contains(ino));
        self.xattrs.retain(|ino, x| live.contains(ino) && !x.is_empty());
    }

    fn ino(&self, i: &usize) -> Result<u64, i32> {
        self.names.get(NAMES[*i]).copied().ok_or(libc::ENOENT)
    }

    /// What an operation returns (Ok, or the errno it fails with), applied to the oracle.
    fn apply(&mut self, op: &Op) -> Result<(), i32> {
        let n = |i: &usize| NAMES[*i].to_string();
        let r = match op {
            Op::Create(i) => {
                if self.names.contains_key(&n(i)) {
                    return Err(libc::EEXIST);
                }
                self.next_ino += 1;
                self.names.insert(n(i), self.next_ino);
                self.data.insert(self.next_ino, Vec::new());
                Ok(())
            }
            Op::Write { name, offset, len, seed } => {
                let ino = self.ino(name)?;
                write_model(self.data.get_mut(&ino).unwrap(), *offset, *len, *seed);
                Ok(())
            }
            Op::Append { name, len, seed } => {
                let ino = self.ino(name)?;
                self.data.get_mut(&ino).unwrap().extend_from_slice(&common::pattern(*len, *seed));
                Ok(())
            }
            Op::Overwrite { name, len, seed } => {
                let ino = match self.ino(name) {
                    Ok(ino) => ino,
                    Err(_) => {
                        self.next_ino += 1;
                        self.names.insert(n(name), self.next_ino);
                        self.next_ino
                    }
                };
                self.data.insert(ino, common::pattern(*len, *seed));
                Ok(())
            }
            Op::Truncate { name, size_bytes } => {
                let ino = self.ino(name)?;
                self.data.get_mut(&ino).unwrap().resize(*size_bytes as usize, 0);
                Ok(())
            }
            Op::Punch { name, offset, len } => {
                let ino = self.ino(name)?;
                let d = self.data.get_mut(&ino).unwrap();
                let end = (offset + len).min(d.len() as u64) as usize;
                if end > *offset as usize {
                    d[*offset as usize..end].fill(0);
                }
                Ok(())
            }
            Op::Rename { from, to } => {
                let ino = self.ino(from)?;
                // rename of two names of the same file does nothing (POSIX)
                if self.names.get(&n(to)) != Some(&ino) {
                    self.names.remove(&n(from));
                    self.names.insert(n(to), ino);
                }
                Ok(())
            }
            Op::Link { from, to } => {
                let ino = self.ino(from)?;
                if self.names.contains_key(&n(to)) {
                    return Err(libc::EEXIST);
                }
                self.names.insert(n(to), ino);
                Ok(())
            }
            Op::Unlink(i) => {
                self.names.remove(&n(i)).ok_or(libc::ENOENT)?;
                Ok(())
            }
            Op::Fsync(i) => self.ino(i).map(drop),
            Op::Hold { slot, name } => {
                self.held[*slot] = None;
                let ino = self.ino(name)?;
                self.held[*slot] = Some(ino);
                Ok(())
            }
            Op::HeldWrite { slot, offset, len, seed } => {
                if let Some(ino) = self.held[*slot] {
                    write_model(self.data.get_mut(&ino).unwrap(), *offset, *len, *seed);
                }
                Ok(())
            }
            Op::HeldTruncate { slot, size_bytes } => {
                if let Some(ino) = self.held[*slot] {
                    self.data.get_mut(&ino).unwrap().resize(*size_bytes as usize, 0);
                }
                Ok(())
            }
            Op::Release(slot) => {
                self.held[*slot] = None;
                Ok(())
            }
            Op::Remount => {
                self.held = [None; HELD_SLOTS];
                Ok(())
            }
            // Moving a data set changes where its bytes are, not what they are.
            Op::Migrate { .. } => Ok(()),
            Op::Mknod { special, device } => {
                if self.specials.contains_key(SPECIALS[*special]) {
                    return Err(libc::EEXIST);
                }
                self.specials.insert(SPECIALS[*special].to_string(), *device);
                Ok(())
            }
            Op::UnlinkSpecial(i) => self.specials.remove(SPECIALS[*i]).map(drop).ok_or(libc::ENOENT),
            Op::SetXattr { name, key, len, seed, flags } => {
                let ino = self.ino(name)?;
                let x = self.xattrs.entry(ino).or_default();
                match (x.contains_key(XATTR_KEYS[*key]), *flags) {
                    (true, libc::XATTR_CREATE) => Err(libc::EEXIST),
                    (false, libc::XATTR_REPLACE) => Err(libc::ENODATA),
                    _ => {
                        x.insert(XATTR_KEYS[*key].to_string(), common::pattern(*len, *seed));
                        Ok(())
                    }
                }
            }
            Op::RemoveXattr { name, key } => {
                let ino = self.ino(name)?;
                let x = self.xattrs.entry(ino).or_default();
                x.remove(XATTR_KEYS[*key]).map(drop).ok_or(libc::ENODATA)
            }
        };
        self.collect();
        r
    }
}

fn write_model(f: &mut Vec<u8>, offset: u64, len: usize, seed: u64) {
    let end = offset as usize + len;
    if f.len() < end {
        f.resize(end, 0);
    }
    f[offset as usize..end].copy_from_slice(&common::pattern(len, seed));
}

fn errno_of(r: io::Result<()>) -> Result<(), i32> {
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// Runs one operation (other than Remount) through the mount.
fn apply_mount(m: &Mounted, held: &mut [Option<fs::File>; HELD_SLOTS], op: &Op) -> Result<(), i32> {
    let p = |i: &usize| m.p(NAMES[*i]);
    let rw = || OpenOptions::new().read(true).write(true).to_owned();
    errno_of(match op {
        Op::Create(i) => OpenOptions::new().write(true).create_new(true).open(p(i)).map(drop),
        Op::Write { name, offset, len, seed } => {
            rw().open(p(name)).and_then(|f| f.write_all_at(&common::pattern(*len, *seed), *offset))
        }
        Op::Truncate { name, size_bytes } => rw().open(p(name)).and_then(|f| f.set_len(*size_bytes)),
        Op::Punch { name, offset, len } => rw().open(p(name)).and_then(|f| {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: fallocate on a descriptor this test owns.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, *offset as libc::off_t, *len as libc::off_t) };
            if r == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }),
        Op::Append { name, len, seed } => {
            OpenOptions::new().append(true).open(p(name)).and_then(|mut f| f.write_all(&common::pattern(*len, *seed)))
        }
        Op::Overwrite { name, len, seed } => OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(p(name))
            .and_then(|mut f| f.write_all(&common::pattern(*len, *seed))),
        Op::Rename { from, to } => fs::rename(p(from), p(to)),
        Op::Link { from, to } => fs::hard_link(p(from), p(to)),
        Op::Unlink(i) => fs::remove_file(p(i)),
        Op::Fsync(i) => rw().open(p(i)).and_then(|f| f.sync_all()),
        Op::Hold { slot, name } => {
            held[*slot] = None;
            rw().open(p(name)).map(|f| held[*slot] = Some(f))
        }
        Op::HeldWrite { slot, offset, len, seed } => match &held[*slot] {
            Some(f) => f.write_all_at(&common::pattern(*len, *seed), *offset),
            None => Ok(()),
        },
        Op::HeldTruncate { slot, size_bytes } => match &held[*slot] {
            Some(f) => f.set_len(*size_bytes),
            None => Ok(()),
        },
        Op::Release(slot) => {
            held[*slot] = None;
            Ok(())
        }
        Op::Remount | Op::Migrate { .. } => unreachable!("remount and migrate are handled by the runner"),
        Op::Mknod { special, device } => {
            let c = cpath(&m.p(SPECIALS[*special]));
            let (mode, dev) =
                if *device { (libc::S_IFCHR | 0o644, libc::makedev(1, 3)) } else { (libc::S_IFIFO | 0o644, 0) };
            // SAFETY: a valid C string.
            last_os_error_if(unsafe { libc::mknod(c.as_ptr(), mode, dev) } != 0)
        }
        Op::UnlinkSpecial(i) => fs::remove_file(m.p(SPECIALS[*i])),
        Op::SetXattr { name, key, len, seed, flags } => {
            let (c, k, v) = (cpath(&p(name)), CString::new(XATTR_KEYS[*key]).unwrap(), common::pattern(*len, *seed));
            // SAFETY: valid C strings and a buffer of the length passed.
            last_os_error_if(unsafe { libc::setxattr(c.as_ptr(), k.as_ptr(), v.as_ptr().cast(), v.len(), *flags) } != 0)
        }
        Op::RemoveXattr { name, key } => {
            let (c, k) = (cpath(&p(name)), CString::new(XATTR_KEYS[*key]).unwrap());
            // SAFETY: valid C strings.
            last_os_error_if(unsafe { libc::removexattr(c.as_ptr(), k.as_ptr()) } != 0)
        }
    })
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn last_os_error_if(failed: bool) -> io::Result<()> {
    if failed {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A data set's `user.*` attributes, read back through listxattr and getxattr.
fn read_xattrs(p: &Path) -> io::Result<BTreeMap<String, Vec<u8>>> {
    let c = cpath(p);
    let mut names = vec![0u8; 65536];
    // SAFETY: a valid C string and a buffer of the length passed.
    let n = unsafe { libc::listxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    names.truncate(n as usize);
    let mut out = BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| n.starts_with(b"user.")) {
        let k = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: valid C strings and a buffer of the length passed.
        let n = unsafe { libc::getxattr(c.as_ptr(), k.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        v.truncate(n as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    Ok(out)
}

/// Reads a held file through its handle: fstat size and every byte.
fn read_held(f: &fs::File) -> io::Result<(u64, Vec<u8>)> {
    let size = f.metadata()?.len();
    let mut buf = vec![0u8; size as usize + 4096];
    let mut done = 0;
    loop {
        let n = f.read_at(&mut buf[done..], done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
        if done == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
    }
    buf.truncate(done);
    Ok((size, buf))
}

/// Compares what the held handles see with the oracle's inodes.
fn compare_held(held: &[Option<fs::File>; HELD_SLOTS], o: &Oracle, when: &str) -> Result<(), TestCaseError> {
    for (slot, (real, model)) in held.iter().zip(&o.held).enumerate() {
        prop_assert_eq!(real.is_some(), model.is_some(), "{}: slot {} open state", when, slot);
        if let (Some(f), Some(ino)) = (real, model) {
            let (size, got) =
                read_held(f).map_err(|e| TestCaseError::fail(format!("{when}: read held slot {slot}: {e}")))?;
            let want = &o.data[ino];
            prop_assert_eq!(size, want.len() as u64, "{}: fstat size through held slot {}", when, slot);
            check_bytes(&got, want, &format!("{when}: held slot {slot}"))?;
        }
    }
    Ok(())
}

fn check_bytes(got: &[u8], want: &[u8], what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len(), "{}: number of bytes read", what);
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        return Err(TestCaseError::fail(format!(
            "{what}: differs from the oracle first at byte {i} (got {:#04x}, expected {:#04x}; size {})",
            got[i],
            want[i],
            want.len()
        )));
    }
    Ok(())
}

/// Every regular file under `root` (relative paths), skipping the `.ferry` control tree.
fn list_files(root: &Path) -> io::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(root.join(&rel))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if rel.is_empty() && name == ".ferry" {
                continue;
            }
            let path = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            if e.file_type()?.is_dir() {
                stack.push(path);
            } else {
                out.insert(path);
            }
        }
    }
    Ok(out)
}

/// Compares the whole mount with the oracle: names, sizes, bytes, and which names share
/// an inode.
fn compare(m: &Mounted, o: &Oracle, when: &str) -> Result<(), TestCaseError> {
    for d in DIRS {
        prop_assert!(m.p(d).is_dir(), "{when}: directory {d} is missing");
    }
    let names = list_files(&m.mnt).map_err(|e| TestCaseError::fail(format!("{when}: walk: {e}")))?;
    let want: BTreeSet<String> = o.names.keys().chain(o.specials.keys()).cloned().collect();
    prop_assert_eq!(&names, &want, "{}: file names differ from the oracle", when);
    for (name, &device) in &o.specials {
        let md =
            fs::symlink_metadata(m.p(name)).map_err(|e| TestCaseError::fail(format!("{when}: stat {name}: {e}")))?;
        let ft = md.file_type();
        prop_assert!(if device { ft.is_char_device() } else { ft.is_fifo() }, "{}: {} is a {:?}", when, name, ft);
        prop_assert_eq!(md.rdev(), if device { libc::makedev(1, 3) } else { 0 }, "{}: rdev of {}", when, name);
        prop_assert_eq!((md.len(), md.blocks()), (0, 0), "{}: {} holds nothing", when, name);
    }
    let mut ino_of_oracle_ino: BTreeMap<u64, u64> = BTreeMap::new();
    for (name, data) in o.files() {
        let md = fs::metadata(m.p(&name)).map_err(|e| TestCaseError::fail(format!("{when}: stat {name}: {e}")))?;
        prop_assert_eq!(md.len(), data.len() as u64, "{}: stat size of {}", when, name);
        let links = o.names.values().filter(|i| **i == o.names[&name]).count() as u64;
        prop_assert_eq!(md.nlink(), links, "{}: link count of {}", when, name);
        // Names of one oracle inode share one real inode, and different ones do not.
        let real = *ino_of_oracle_ino.entry(o.names[&name]).or_insert(md.ino());
        prop_assert_eq!(real, md.ino(), "{}: {} is not the same file as its other names", when, name);
        let got = fs::read(m.p(&name)).map_err(|e| TestCaseError::fail(format!("{when}: read {name}: {e}")))?;
        check_bytes(&got, data, &format!("{when}: {name}"))?;
        let got =
            read_xattrs(&m.p(&name)).map_err(|e| TestCaseError::fail(format!("{when}: xattrs of {name}: {e}")))?;
        let want = o.xattrs.get(&o.names[&name]).cloned().unwrap_or_default();
        prop_assert_eq!(got, want, "{}: the attributes of {}", when, name);
    }
    let distinct: BTreeSet<u64> = ino_of_oracle_ino.values().copied().collect();
    prop_assert_eq!(distinct.len(), ino_of_oracle_ino.len(), "{}: different files share an inode number", when);
    Ok(())
}

/// The documented invariants of one `ls --json` entry: the extents add up to the allocated
/// tracks, they lie in logical order without overlapping, every track that holds a byte
/// other than zero (`content`, the oracle's bytes) is mapped, and `volumes` lists each
/// extent's volume once, in the order of first appearance.
fn check_extents(
    d: &serde_json::Value,
    content: &[u8],
    track_size_bytes: u64,
    trimmed: bool,
    what: &str,
) -> Result<(), TestCaseError> {
    let extents = d["extents"].as_array().expect("extents array");
    let tracks: u64 = extents.iter().map(|e| e["track_count"].as_u64().expect("track_count")).sum();
    let allocated = d["allocated_tracks"].as_u64().expect("allocated_tracks");
    let size = d["size_bytes"].as_u64().expect("size_bytes");
    prop_assert_eq!(tracks, allocated, "{}: extents do not add up to allocated_tracks: {}", what, d);
    let runs: Vec<(u64, u64)> = extents
        .iter()
        .map(|e| {
            let at = e["logical_track"].as_u64().expect("logical_track");
            (at, at + e["track_count"].as_u64().expect("track_count"))
        })
        .collect();
    prop_assert!(runs.windows(2).all(|w| w[0].1 <= w[1].0), "{}: extents overlap or are out of order: {}", what, d);
    for (t, bytes) in content.chunks(track_size_bytes as usize).enumerate() {
        let t = t as u64;
        if bytes.iter().any(|&b| b != 0) {
            prop_assert!(
                runs.iter().any(|&(a, b)| a <= t && t < b),
                "{}: track {} holds data but is a hole: {}",
                what,
                t,
                d
            );
        }
    }
    prop_assert_eq!(extents.len() as u64, d["extent_count"].as_u64().expect("extent_count"), "{}: extent_count", what);
    let mut order: Vec<&str> = Vec::new();
    for e in extents {
        let vol = e["volume"].as_str().expect("volume");
        if !order.contains(&vol) {
            order.push(vol);
        }
    }
    let listed: Vec<&str> = d["volumes"].as_array().expect("volumes").iter().map(|v| v.as_str().unwrap()).collect();
    prop_assert_eq!(listed, order, "{}: volumes must list the extents' volumes in order: {}", what, d);
    if trimmed {
        // docs/design.md: the over-provisioned surplus is taken back at clean unmount.
        let end = runs.last().map_or(0, |r| r.1);
        prop_assert!(
            end <= size.div_ceil(track_size_bytes),
            "{}: after a clean unmount no track past the size is mapped: {}",
            what,
            d
        );
    }
    Ok(())
}

/// `ls --json` reports one data set per oracle path, with the oracle's size; `trimmed`:
/// right after a clean unmount and a mount, when no surplus tracks may be left.
fn compare_ls(m: &Mounted, o: &Oracle, trimmed: bool, when: &str) -> Result<(), TestCaseError> {
    let v = ls_json(&m.mnt);
    let mut got = BTreeMap::new();
    let track_size_bytes = v["track_size_bytes"].as_u64().expect("track_size_bytes");
    let files = o.files();
    for d in v["data_sets"].as_array().expect("data_sets array") {
        let path = d["path"].as_str().expect("path").trim_start_matches('/').to_string();
        let content = files.get(&path).map(|c| &c[..]).unwrap_or_default();
        check_extents(d, content, track_size_bytes, trimmed, &format!("{when}: ls --json entry of {path}"))?;
        got.insert(path, d["size_bytes"].as_u64().expect("size_bytes"));
    }
    let want: BTreeMap<String, u64> = files.into_iter().map(|(k, v)| (k, v.len() as u64)).collect();
    prop_assert_eq!(got, want, "{}: ls --json paths and sizes differ from the oracle", when);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Migrations

/// The migrations of one script: what happened to them, for the report at the end.
#[derive(Default)]
struct Migrations {
    /// Mounts so far; a job is named by mount and id (one stopped by an unmount comes back
    /// on the next mount as a new job).
    mount_no: u32,
    /// Jobs already judged, as (mount, id).
    judged: BTreeSet<(u32, u64)>,
    /// Refusals, cancels and legitimate failures, one line each.
    notes: Vec<String>,
    accepted: usize,
    switched: usize,
}

/// Job failures that are not bugs: the target (or the pool) filled up, or the data set was
/// removed before the job could start.
fn legitimate_failure(why: &str) -> bool {
    why.contains("target full") || why.contains("grew past the pool")
}

/// Judges a job that has ended: switched and cancelled are fine, a failure must be
/// legitimate, and nothing else may be final while the mount runs.
fn judge(mig: &mut Migrations, j: &serde_json::Value, when: &str) -> Result<(), TestCaseError> {
    let id = j["id"].as_u64().unwrap_or(0);
    if !mig.judged.insert((mig.mount_no, id)) {
        return Ok(());
    }
    let phase = j["phase"].as_str().unwrap_or("");
    let what = format!("mount {} job {id} ({} to {})", mig.mount_no, j["path"], j["targets"]);
    match phase {
        "switched" => mig.switched += 1,
        "cancelled" => mig.notes.push(format!("{when}: {what} cancelled")),
        "gone" => mig.notes.push(format!("{when}: {what} gone (the data set was deleted)")),
        "failed" => {
            let why = j["error"].as_str().unwrap_or("");
            prop_assert!(legitimate_failure(why), "{}: {} failed for no good reason: {}", when, what, j);
            mig.notes.push(format!("{when}: {what} failed: {why}"));
        }
        _ => return Err(TestCaseError::fail(format!("{when}: {what} ended {phase}: {j}"))),
    }
    Ok(())
}

/// Polls a job until it ends; with `may_stall`, also returns when it waits in close mode
/// (a handle the script holds may be what it waits for).
fn wait_job(m: &Mounted, id: u64, may_stall: bool, when: &str) -> Result<serde_json::Value, TestCaseError> {
    let start = std::time::Instant::now();
    loop {
        let st = status(&m.mnt);
        let j = st["jobs"].as_array().unwrap().iter().find(|j| j["id"] == id).cloned().unwrap_or_default();
        let phase = j["phase"].as_str().unwrap_or("");
        if is_final(phase) || (may_stall && phase == "awaiting-close") {
            return Ok(j);
        }
        if start.elapsed() > JOB_LIMIT {
            return Err(TestCaseError::fail(format!(
                "{when}: job {id} did not end:\n{st:#}\nevents:\n{}",
                events(&m.mnt)
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Waits for every job of the mount to end and judges them, and the jobs the mount could
/// not start again.
fn settle_jobs(m: &Mounted, mig: &mut Migrations, when: &str) -> Result<(), TestCaseError> {
    let ids: Vec<u64> = status(&m.mnt)["jobs"].as_array().unwrap().iter().filter_map(|j| j["id"].as_u64()).collect();
    for id in ids {
        let j = wait_job(m, id, false, when)?;
        judge(mig, &j, when)?;
    }
    check_not_resumed(m, mig, when)
}

/// The jobs this mount did not start again (from the previous mount) must be those whose
/// data set is gone.
fn check_not_resumed(m: &Mounted, mig: &mut Migrations, when: &str) -> Result<(), TestCaseError> {
    for line in events(&m.mnt).lines().filter(|l| l.contains("not resumed")) {
        prop_assert!(line.contains("the data set is gone"), "{}: a job was not started again: {}", when, line);
        mig.notes.push(format!("{when}: {line}"));
    }
    Ok(())
}

/// One migrate step: the request, then waiting, cancelling or nothing, as the step says.
fn migrate_step(
    m: &Mounted,
    o: &Oracle,
    holding: bool,
    op: &Op,
    mig: &mut Migrations,
    when: &str,
) -> Result<(), TestCaseError> {
    let Op::Migrate { name, to, close, rate_kib, after } = op else { unreachable!() };
    // An existing data set (NAME picks among them), or, when there is none, NAME itself.
    let existing: Vec<&String> = o.names.keys().collect();
    let rel = if existing.is_empty() { NAMES[*name] } else { existing[*name % existing.len()].as_str() };
    let path = format!("/{rel}");
    let vol = VOLUMES[*to].0;
    // Waited-for jobs copy at full speed; the others are slowed so that they span steps.
    let rate = match after {
        After::Wait => 0,
        _ => rate_kib * 1024,
    };
    let line = format!("migrate {path} to {vol} cutover={} rate={rate}", if *close { "close" } else { "live" });
    let exists = o.names.contains_key(rel);
    let id = match control(&m.mnt, &line) {
        Err(why) => {
            let fine = if exists {
                why.contains("already being migrated") || why.contains("target full") || why.contains("nothing to move")
            } else {
                why.contains("no such path")
            };
            prop_assert!(fine, "{}: `{}` refused: {}", when, line, why);
            mig.notes.push(format!("{when}: refused: {why}"));
            return Ok(());
        }
        Ok(reply) => {
            prop_assert!(exists, "{}: `{}` accepted for a path that does not exist: {}", when, line, reply);
            let ids = reply_jobs(&reply);
            prop_assert_eq!(ids.len(), 1, "{}: `{}`: {}", when, line, reply);
            ids[0]
        }
    };
    mig.accepted += 1;
    match after {
        After::Background => return Ok(()),
        After::Wait => {}
        After::Cancel { after_ms } => {
            std::thread::sleep(std::time::Duration::from_millis(*after_ms));
            if let Err(why) = control(&m.mnt, &format!("cancel {id}")) {
                prop_assert!(
                    why.contains("already switched") || why.contains("already ended") || why.contains("too late"),
                    "{}: cancel {} refused: {}",
                    when,
                    id,
                    why
                );
            }
        }
    }
    let j = wait_job(m, id, holding, when)?;
    if j["phase"] == "awaiting-close" {
        return Ok(());
    }
    judge(mig, &j, when)?;
    if j["phase"] == "switched" {
        // Nothing else ran meanwhile: the data set is whole on the target.
        let d = ls_json_at(&m.mnt, &path);
        let d = &d["data_sets"][0];
        let vols: Vec<&str> = d["volumes"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        prop_assert!(
            vols.iter().all(|v| *v == vol),
            "{}: job {} switched but {} is on {:?}: {}",
            when,
            id,
            path,
            vols,
            d
        );
    }
    Ok(())
}

/// No reservation leaks (with no job running): each volume's used tracks are the tracks of
/// the data sets' extents on it, each data set counted once.
fn check_no_leak(target: &Path, when: &str) -> Result<(), TestCaseError> {
    let (held, ls) = jobs::held_tracks(target);
    let vols = volume_list_json(target);
    for v in vols["volumes"].as_array().expect("volumes") {
        let name = v["name"].as_str().unwrap();
        let used = v["tracks_used"].as_u64().unwrap();
        let h = held.get(name).copied().unwrap_or(0);
        prop_assert_eq!(
            used,
            h,
            "{}: volume {} uses {} tracks, its data sets hold {}: {}\n{}",
            when,
            name,
            used,
            h,
            vols,
            ls
        );
    }
    Ok(())
}

fn run_script(track_size: &str, ops: &[Op]) -> Result<(), TestCaseError> {
    let tp = TestPool::new(track_size, VOLUMES);
    let mut m = Some(tp.mount());
    for d in DIRS {
        fs::create_dir(m.as_ref().unwrap().p(d)).expect("mkdir");
    }
    let mut oracle = Oracle::default();
    let mut mig = Migrations::default();
    // Declared after the mount, so the handles are closed before the mount is dropped.
    let mut held: [Option<fs::File>; HELD_SLOTS] = Default::default();
    for (step, op) in ops.iter().enumerate() {
        let when = format!("step {step} ({op:?})");
        let want = oracle.apply(op);
        match op {
            Op::Remount => {
                held = Default::default();
                // Jobs that ended on this mount are judged now; the others stop at the
                // unmount, and the next mount starts them again.
                let mnt = m.take().unwrap();
                for j in status(&mnt.mnt)["jobs"].as_array().unwrap() {
                    if j["phase"].as_str().is_some_and(is_final) {
                        judge(&mut mig, j, &when)?;
                    }
                }
                check_not_resumed(&mnt, &mut mig, &when)?;
                mnt.unmount();
                fsck_clean(&tp.pool);
                m = Some(tp.mount());
                mig.mount_no += 1;
                compare_ls(m.as_ref().unwrap(), &oracle, true, &when)?;
            }
            Op::Migrate { .. } => {
                let holding = held.iter().any(Option::is_some);
                migrate_step(m.as_ref().unwrap(), &oracle, holding, op, &mut mig, &when)?;
            }
            _ => {
                let got = apply_mount(m.as_ref().unwrap(), &mut held, op);
                prop_assert_eq!(got, want, "{}: result (Err = errno) differs from the oracle", when);
            }
        }
        compare(m.as_ref().unwrap(), &oracle, &when)?;
        compare_held(&held, &oracle, &when)?;
    }
    drop(held);
    let mnt = m.take().unwrap();
    // Every job ends, and well; then no volume holds a track no data set holds.
    settle_jobs(&mnt, &mut mig, "end of script")?;
    compare(&mnt, &oracle, "end of script, once the jobs ended")?;
    check_no_leak(&mnt.mnt, "end of script, once the jobs ended")?;
    compare_ls(&mnt, &oracle, false, "end of script")?;
    mnt.unmount();
    fsck_clean(&tp.pool);
    oracle.apply(&Op::Remount).unwrap();
    let mnt = tp.mount();
    let st = status(&mnt.mnt);
    prop_assert!(
        st["jobs"].as_array().unwrap().is_empty(),
        "after the final remount: no job may be left to start again: {:#}",
        st
    );
    compare(&mnt, &oracle, "after the final remount")?;
    compare_ls(&mnt, &oracle, true, "after the final remount")?;
    check_no_leak(&mnt.mnt, "after the final remount")?;
    mnt.unmount();
    fsck_clean(&tp.pool);
    if mig.accepted > 0 || !mig.notes.is_empty() {
        eprintln!(
            "migrations: {} accepted, {} switched; refusals, cancels and legitimate failures:\n  {}",
            mig.accepted,
            mig.switched,
            if mig.notes.is_empty() { "(none)".to_string() } else { mig.notes.join("\n  ") }
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 16,
        max_shrink_iters: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn mount_matches_in_memory_oracle(
        track_size in prop_oneof![Just("4K"), Just("16K")],
        ops in prop::collection::vec(op_strategy(), 1..40),
    ) {
        run_script(track_size, &ops)?;
    }

    /// The same, from a pool where every file exists, with data sets moving more often.
    #[test]
    fn mount_matches_oracle_while_data_sets_move(
        track_size in prop_oneof![Just("4K"), Just("16K")],
        ops in migrating_script_strategy(),
    ) {
        run_script(track_size, &ops)?;
    }
}
