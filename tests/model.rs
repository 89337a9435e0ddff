//! Model-based test: a random script of file operations runs through a real mount and
//! against an in-memory oracle (path -> bytes). After every step the mount must hold
//! exactly the oracle's files, sizes and bytes, and every operation must succeed or fail
//! exactly as the oracle says. Remounts are steps of the script, and a final remount
//! compares everything once more, together with `ls --json` and `ferryfs fsck`.
//!
//! Small tracks (4 KiB or 16 KiB) and small first volumes make files span many extents
//! and spill from one volume to the next.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use common::{fsck_clean, ls_json, Mounted, TestPool};

/// The paths the script works on; `d` and `d/e` exist from the start.
const NAMES: [&str; 6] = ["a", "b", "c", "d/x", "d/y", "d/e/z"];
const DIRS: [&str; 2] = ["d", "d/e"];
/// Largest write offset and length: files stay below ~300 KiB.
const WRITE_OFFSET_MAX_BYTES: u64 = 256 * 1024;
const WRITE_LEN_MAX_BYTES: usize = 48 * 1024;
const TRUNCATE_MAX_BYTES: u64 = 300 * 1024;
/// Volumes: two small ones that fill up early, one large.
const VOLUMES: &[(&str, &str)] = &[("V1", "96K"), ("V2", "320K"), ("V3", "16M")];

#[derive(Debug, Clone)]
enum Op {
    /// open(O_CREAT|O_EXCL)
    Create(usize),
    /// pwrite of `len` pattern bytes at `offset` into an existing file
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
    /// rename, replacing the target if it exists
    Rename {
        from: usize,
        to: usize,
    },
    Unlink(usize),
    /// open, write nothing, fsync
    Fsync(usize),
    /// clean unmount and mount again
    Remount,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let name = 0..NAMES.len();
    prop_oneof![
        2 => name.clone().prop_map(Op::Create),
        6 => (
            name.clone(),
            prop_oneof![
                // Small offsets near track boundaries, and anywhere in the range.
                (0u64..8).prop_map(|k| k * 4096 - (k.min(1))),
                0..=WRITE_OFFSET_MAX_BYTES,
            ],
            prop_oneof![1usize..64, 1..=WRITE_LEN_MAX_BYTES],
            any::<u64>()
        )
            .prop_map(|(name, offset, len, seed)| Op::Write { name, offset, len, seed }),
        2 => (name.clone(), prop_oneof![0u64..5000, 0..=TRUNCATE_MAX_BYTES])
            .prop_map(|(name, size_bytes)| Op::Truncate { name, size_bytes }),
        2 => (name.clone(), name.clone()).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => name.clone().prop_map(Op::Unlink),
        1 => name.prop_map(Op::Fsync),
        1 => Just(Op::Remount),
    ]
}

type Oracle = BTreeMap<String, Vec<u8>>;

/// What the oracle says an operation returns: Ok, or the errno it fails with.
fn apply_oracle(o: &mut Oracle, op: &Op) -> Result<(), i32> {
    let n = |i: &usize| NAMES[*i].to_string();
    match op {
        Op::Create(i) => {
            if o.contains_key(&n(i)) {
                return Err(libc::EEXIST);
            }
            o.insert(n(i), Vec::new());
        }
        Op::Write { name, offset, len, seed } => {
            let f = o.get_mut(&n(name)).ok_or(libc::ENOENT)?;
            let end = *offset as usize + len;
            if f.len() < end {
                f.resize(end, 0);
            }
            f[*offset as usize..end].copy_from_slice(&common::pattern(*len, *seed));
        }
        Op::Truncate { name, size_bytes } => {
            let f = o.get_mut(&n(name)).ok_or(libc::ENOENT)?;
            f.resize(*size_bytes as usize, 0);
        }
        Op::Rename { from, to } => {
            let data = o.remove(&n(from)).ok_or(libc::ENOENT)?;
            o.insert(n(to), data);
        }
        Op::Unlink(i) => {
            o.remove(&n(i)).ok_or(libc::ENOENT)?;
        }
        Op::Fsync(i) => {
            o.get(&n(i)).ok_or(libc::ENOENT)?;
        }
        Op::Remount => {}
    }
    Ok(())
}

fn errno_of(r: io::Result<()>) -> Result<(), i32> {
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

/// Runs one operation (other than Remount) through the mount.
fn apply_mount(m: &Mounted, op: &Op) -> Result<(), i32> {
    let p = |i: &usize| m.p(NAMES[*i]);
    errno_of(match op {
        Op::Create(i) => OpenOptions::new().write(true).create_new(true).open(p(i)).map(drop),
        Op::Write { name, offset, len, seed } => OpenOptions::new()
            .write(true)
            .open(p(name))
            .and_then(|f| f.write_all_at(&common::pattern(*len, *seed), *offset)),
        Op::Truncate { name, size_bytes } => {
            OpenOptions::new().write(true).open(p(name)).and_then(|f| f.set_len(*size_bytes))
        }
        Op::Rename { from, to } => fs::rename(p(from), p(to)),
        Op::Unlink(i) => fs::remove_file(p(i)),
        Op::Fsync(i) => OpenOptions::new().write(true).open(p(i)).and_then(|f| f.sync_all()),
        Op::Remount => unreachable!("remount is handled by the runner"),
    })
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

/// Compares the whole mount with the oracle.
fn compare(m: &Mounted, o: &Oracle, when: &str) -> Result<(), TestCaseError> {
    for d in DIRS {
        prop_assert!(m.p(d).is_dir(), "{when}: directory {d} is missing");
    }
    let names = list_files(&m.mnt).map_err(|e| TestCaseError::fail(format!("{when}: walk: {e}")))?;
    let want: BTreeSet<String> = o.keys().cloned().collect();
    prop_assert_eq!(&names, &want, "{}: file names differ from the oracle", when);
    for (name, data) in o {
        let md = fs::metadata(m.p(name)).map_err(|e| TestCaseError::fail(format!("{when}: stat {name}: {e}")))?;
        prop_assert_eq!(md.len(), data.len() as u64, "{}: stat size of {}", when, name);
        let got = fs::read(m.p(name)).map_err(|e| TestCaseError::fail(format!("{when}: read {name}: {e}")))?;
        prop_assert_eq!(got.len(), data.len(), "{}: bytes read from {}", when, name);
        if let Some(i) = got.iter().zip(data).position(|(a, b)| a != b) {
            return Err(TestCaseError::fail(format!(
                "{when}: {name} differs from the oracle first at byte {i} (got {:#04x}, \
                 expected {:#04x}; size {})",
                got[i],
                data[i],
                data.len()
            )));
        }
    }
    Ok(())
}

/// `ls --json` reports one data set per oracle path, with the oracle's size.
fn compare_ls(m: &Mounted, o: &Oracle, when: &str) -> Result<(), TestCaseError> {
    let v = ls_json(&m.mnt);
    let mut got = BTreeMap::new();
    for d in v["data_sets"].as_array().expect("data_sets array") {
        let path = d["path"].as_str().expect("path").trim_start_matches('/').to_string();
        got.insert(path, d["size_bytes"].as_u64().expect("size_bytes"));
    }
    let want: BTreeMap<String, u64> = o.iter().map(|(k, v)| (k.clone(), v.len() as u64)).collect();
    prop_assert_eq!(got, want, "{}: ls --json paths and sizes differ from the oracle", when);
    Ok(())
}

fn run_script(track_size: &str, ops: &[Op]) -> Result<(), TestCaseError> {
    let tp = TestPool::new(track_size, VOLUMES);
    let mut m = Some(tp.mount());
    for d in DIRS {
        fs::create_dir(m.as_ref().unwrap().p(d)).expect("mkdir");
    }
    let mut oracle = Oracle::new();
    for (step, op) in ops.iter().enumerate() {
        let when = format!("step {step} ({op:?})");
        if let Op::Remount = op {
            m.take().unwrap().unmount();
            fsck_clean(&tp.pool);
            m = Some(tp.mount());
            compare_ls(m.as_ref().unwrap(), &oracle, &when)?;
        } else {
            let want = apply_oracle(&mut oracle, op);
            let got = apply_mount(m.as_ref().unwrap(), op);
            prop_assert_eq!(got, want, "{}: result (Err = errno) differs from the oracle", when);
        }
        compare(m.as_ref().unwrap(), &oracle, &when)?;
    }
    let mnt = m.take().unwrap();
    compare_ls(&mnt, &oracle, "end of script")?;
    mnt.unmount();
    fsck_clean(&tp.pool);
    let mnt = tp.mount();
    compare(&mnt, &oracle, "after the final remount")?;
    compare_ls(&mnt, &oracle, "after the final remount")?;
    mnt.unmount();
    fsck_clean(&tp.pool);
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
}
