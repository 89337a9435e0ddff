//! `.ferry/metrics` and `ferryfs metrics MNT`: what a user checks of them, read back with a
//! real parser of the Prometheus text format (openmetrics-parser, which rejects a family
//! whose samples differ in label names, a histogram without `+Inf` or not cumulative, and
//! a label value that is not escaped). No assertion depends on timing: counters are compared
//! with the operations the test did (at least that many; the kernel may split a request,
//! never merge two syscalls into one), space with `ferryfs volume list`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ferry, ferry_ok, s, TestPool};
use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::{MetricsExposition, PrometheusType, PrometheusValue};

type Exposition = MetricsExposition<PrometheusType, PrometheusValue>;

const TRACK: u64 = 64 * 1024;
/// A data set directory and two data sets in it whose names need escaping as label values.
const ODD_DIR: &str = "/q\"d\\";
const ODD_X: &str = "/q\"d\\/x\"y\\z";
const ODD_NL: &str = "/q\"d\\/line\nbreak";

fn parse(text: &str) -> Exposition {
    parse_prometheus(text).unwrap_or_else(|e| panic!("not the Prometheus text format ({e:?}):\n{text}"))
}

fn read_metrics(mnt: &Path) -> (String, Exposition) {
    let text = fs::read_to_string(mnt.join(".ferry/metrics")).expect("read .ferry/metrics");
    let x = parse(&text);
    (text, x)
}

fn labels_of(s: &openmetrics_parser::Sample<PrometheusValue>) -> BTreeMap<String, String> {
    let set = s.get_labelset().expect("labels");
    set.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The value of the one sample of `family` whose labels include `want`.
fn value(x: &Exposition, family: &str, want: &[(&str, &str)]) -> f64 {
    let fam = x.families.get(family).unwrap_or_else(|| panic!("no family {family}"));
    let hits: Vec<f64> = fam
        .iter_samples()
        .filter(|s| {
            let l = labels_of(s);
            want.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| match &s.value {
            PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => n.as_f64(),
            PrometheusValue::Counter(c) => c.value.as_f64(),
            v => panic!("{family}: not a counter or a gauge: {v:?}"),
        })
        .collect();
    assert_eq!(hits.len(), 1, "{family} with labels {want:?}: {} samples", hits.len());
    hits[0]
}

/// `(count, buckets as (upper bound, cumulative count))` of the app latency histogram of `op`.
fn latency(x: &Exposition, op: &str) -> (u64, Vec<(f64, f64)>) {
    let fam = &x.families["ferryfs_app_op_duration_seconds"];
    let s = fam.iter_samples().find(|s| labels_of(s).get("op").map(String::as_str) == Some(op)).expect("op");
    let PrometheusValue::Histogram(h) = &s.value else { panic!("not a histogram") };
    (h.count.expect("_count"), h.buckets.iter().map(|b| (b.upper_bound, b.count.as_f64())).collect())
}

/// What holds of any metrics text of this mount, whatever it did: every family has its help
/// and type and the `ferryfs_` prefix, counters and only counters end in `_total`, every
/// series names the pool, and every histogram is cumulative up to `+Inf`, which is its count.
fn assert_well_formed(x: &Exposition, pool: &str) {
    assert!(x.families.len() > 20, "too few families: {:?}", x.families.keys());
    for (name, fam) in &x.families {
        assert!(name.starts_with("ferryfs_"), "{name}");
        assert!(!fam.help.is_empty(), "{name} has no HELP");
        assert_ne!(fam.family_type, PrometheusType::Unknown, "{name} has no TYPE");
        assert_eq!(fam.family_type == PrometheusType::Counter, name.ends_with("_total"), "{name}");
        for smp in fam.iter_samples() {
            assert_eq!(labels_of(smp).get("pool").map(String::as_str), Some(pool), "{name}");
            if let PrometheusValue::Histogram(h) = &smp.value {
                let b = &h.buckets;
                assert!(b.len() > 10, "{name}: {} buckets", b.len());
                assert!(b.windows(2).all(|w| w[0].upper_bound < w[1].upper_bound), "{name}: bounds rise");
                assert!(b.windows(2).all(|w| w[0].count.as_f64() <= w[1].count.as_f64()), "{name}: cumulative");
                let last = b.last().unwrap();
                assert_eq!(last.upper_bound, f64::INFINITY, "{name}: ends at +Inf");
                assert_eq!(last.count.as_f64(), h.count.expect("_count") as f64, "{name}: +Inf is the count");
                assert!(h.sum.expect("_sum").as_f64() >= 0.0);
            }
        }
    }
}

/// Bytes of each volume that hold the data sets' bytes (inside their sizes), from
/// `ferryfs ls --extents --json`.
fn bytes_on_volumes(mnt: &Path) -> BTreeMap<String, u64> {
    let ls = common::ls_json_at(mnt, "/");
    let mut on: BTreeMap<String, u64> = BTreeMap::new();
    for d in ls["data_sets"].as_array().unwrap() {
        let size = d["size_bytes"].as_u64().unwrap();
        let mut at = 0u64;
        for e in d["extents"].as_array().unwrap() {
            let len = e["track_count"].as_u64().unwrap() * TRACK;
            let inside = len.min(size.saturating_sub(at));
            *on.entry(e["volume"].as_str().unwrap().to_string()).or_default() += inside;
            at += len;
        }
    }
    on
}

/// Write `chunks` pieces of `chunk` bytes through a write-only handle, each followed by an
/// fsync; then `fdatasyncs` fdatasyncs.
fn write_synced(path: &Path, chunk: usize, chunks: usize, fdatasyncs: usize) {
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(path).unwrap();
    for i in 0..chunks {
        f.write_all(&common::pattern(chunk, i as u64 + 1)).unwrap();
        f.sync_all().unwrap();
    }
    for _ in 0..fdatasyncs {
        f.sync_data().unwrap();
    }
}

#[test]
fn metrics_tell_what_the_mount_did() {
    // V1 the larger, so that every new data set starts there (the most free tracks).
    let tp = TestPool::new("64K", &[("V1", "64M"), ("V2", "32M")]);
    let m = tp.mount();
    let pool = fs::canonicalize(&tp.pool).unwrap();
    let pool = s(&pool).to_string();
    let (_, before) = read_metrics(&m.mnt);
    assert_well_formed(&before, &pool);
    assert!(value(&before, "ferryfs_catalog_compactions_total", &[]) >= 1.0, "the mount compacts once");
    assert!(value(&before, "ferryfs_catalog_log_size_bytes", &[]) > 0.0);

    // Writes, fsyncs and fdatasyncs: 8 x 128 KiB with an fsync each, then 3 fdatasyncs (1 MiB,
    // 16 tracks, allocated exactly: each growth doubles the allocation).
    const CHUNK: usize = 128 * 1024;
    write_synced(&m.p("a"), CHUNK, 8, 3);
    fs::create_dir(m.p(ODD_DIR)).unwrap();
    write_synced(&m.p(ODD_X), CHUNK, 2, 0);
    write_synced(&m.p(ODD_NL), CHUNK, 1, 0);
    let written = 11 * CHUNK as u64;
    let (_, after_writes) = read_metrics(&m.mnt);
    assert_well_formed(&after_writes, &pool);
    let grew = |x: &Exposition, y: &Exposition, fam: &str, l: &[(&str, &str)]| value(y, fam, l) - value(x, fam, l);
    assert!(grew(&before, &after_writes, "ferryfs_app_written_bytes_total", &[]) >= written as f64);
    let ops = |x: &Exposition, op: &str| latency(x, op).0;
    assert!(ops(&after_writes, "write") - ops(&before, "write") >= 11, "11 writes");
    assert!(ops(&after_writes, "fsync") - ops(&before, "fsync") >= 11, "11 fsyncs");
    assert!(ops(&after_writes, "fdatasync") - ops(&before, "fdatasync") >= 3, "3 fdatasyncs");
    // Every byte written went to the volume that holds it.
    let on = bytes_on_volumes(&m.mnt);
    assert_eq!(on.values().sum::<u64>(), written, "{on:?}");
    assert_eq!(on.keys().collect::<Vec<_>>(), ["V1"], "every new data set starts on V1: {on:?}");
    for (vol, bytes) in &on {
        let w = grew(&before, &after_writes, "ferryfs_volume_written_bytes_total", &[("volume", vol)]);
        assert!(w >= *bytes as f64, "{vol}: {w} bytes written, {bytes} held");
        assert!(grew(&before, &after_writes, "ferryfs_volume_writes_total", &[("volume", vol)]) >= 1.0);
        assert!(grew(&before, &after_writes, "ferryfs_volume_flushes_total", &[("volume", vol)]) >= 1.0);
    }

    // Reads: the pages were never cached (write-only handles bypass the page cache), so the
    // whole data set comes through the mount.
    assert_eq!(fs::read(m.p("a")).unwrap().len(), 8 * CHUNK);
    let (_, after_reads) = read_metrics(&m.mnt);
    assert!(ops(&after_reads, "read") > ops(&after_writes, "read"));
    assert!(grew(&after_writes, &after_reads, "ferryfs_app_read_bytes_total", &[]) >= (8 * CHUNK) as f64);
    assert!(
        grew(&after_writes, &after_reads, "ferryfs_volume_read_bytes_total", &[("volume", "V1")]) >= (8 * CHUNK) as f64
    );

    // A migration of all three to V2, live, to the end.
    ferry_ok(&["migrate", s(&m.mnt), "/a", ODD_DIR, "--to", "V2", "--wait"]);
    let (text, x) = read_metrics(&m.mnt);
    assert_well_formed(&x, &pool);
    let migrated = on["V1"] as f64;
    assert!(grew(&after_reads, &x, "ferryfs_volume_written_bytes_total", &[("volume", "V2")]) >= migrated);
    assert!(grew(&after_reads, &x, "ferryfs_volume_read_bytes_total", &[("volume", "V1")]) >= migrated);

    // Space: what `volume list` says.
    let list = common::volume_list_json(&m.mnt);
    for v in list["volumes"].as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let l = [("volume", name)];
        assert_eq!(value(&x, "ferryfs_volume_used_tracks", &l), v["tracks_used"].as_u64().unwrap() as f64, "{name}");
        assert_eq!(value(&x, "ferryfs_volume_free_tracks", &l), v["tracks_free"].as_u64().unwrap() as f64, "{name}");
        assert_eq!(value(&x, "ferryfs_volume_data_sets", &l), v["data_sets"].as_u64().unwrap() as f64, "{name}");
        assert_eq!(value(&x, "ferryfs_volume_closed", &l), 0.0);
        for op in ["read", "write", "flush", "punch", "writeback"] {
            assert_eq!(value(&x, "ferryfs_volume_io_errors_total", &[("volume", name), ("op", op)]), 0.0);
        }
    }
    assert_eq!(value(&x, "ferryfs_volume_used_tracks", &[("volume", "V1")]), 0.0, "V1 was emptied");
    assert_eq!(value(&x, "ferryfs_pool_data_sets", &[]), 3.0);

    // The jobs: switched, each having copied its whole data set, once.
    assert_eq!(value(&x, "ferryfs_jobs", &[("phase", "switched")]), 3.0);
    for (path, size) in [("/a", 8 * CHUNK), (ODD_X, 2 * CHUNK), (ODD_NL, CHUNK)] {
        let l = [("path", path)];
        assert_eq!(value(&x, "ferryfs_job_phase", &[("path", path), ("phase", "switched")]), 1.0, "{path:?}");
        assert_eq!(value(&x, "ferryfs_job_copied_bytes", &l), size as f64, "{path:?}");
        assert_eq!(value(&x, "ferryfs_job_size_bytes", &l), size as f64, "{path:?}");
        assert_eq!(value(&x, "ferryfs_job_dirty_tracks", &l), 0.0, "{path:?}");
        assert_eq!(value(&x, "ferryfs_job_mirrored_writes_total", &l), 0.0, "{path:?}: no writer ran");
        assert!(value(&x, "ferryfs_job_stall_seconds", &l) >= 0.0, "a live cutover reports its stall");
        assert!(value(&x, "ferryfs_job_end_time_seconds", &l) >= value(&x, "ferryfs_job_start_time_seconds", &l));
        let info = [("path", path), ("cutover", "live"), ("targets", "V2"), ("plan_id", "")];
        assert_eq!(value(&x, "ferryfs_job_info", &info), 1.0, "{path:?}");
    }
    // The names that need escaping came out escaped and parsed back the same.
    let paths: BTreeSet<String> =
        x.families["ferryfs_job_phase"].iter_samples().map(|s| labels_of(s)["path"].clone()).collect();
    assert_eq!(paths, BTreeSet::from(["/a".to_string(), ODD_X.to_string(), ODD_NL.to_string()]));
    assert!(text.contains(r#"path="/q\"d\\/x\"y\\z""#), "escaped in the text");
    assert!(text.contains(r#"path="/q\"d\\/line\nbreak""#), "escaped in the text");
    assert!(!text.lines().any(|l| l.starts_with("break")), "a line feed in a label value breaks no line");

    // The command prints the same file.
    let out = ferry_ok(&["metrics", s(&m.mnt)]);
    let y = parse(&out);
    assert_well_formed(&y, &pool);
    assert_eq!(y.families.keys().collect::<BTreeSet<_>>(), x.families.keys().collect::<BTreeSet<_>>());
    assert_eq!(value(&y, "ferryfs_job_phase", &[("path", ODD_NL), ("phase", "switched")]), 1.0);
    assert_eq!(
        value(&y, "ferryfs_volume_used_tracks", &[("volume", "V2")]),
        value(&x, "ferryfs_volume_used_tracks", &[("volume", "V2")])
    );
    let mount_info = [("mountpoint", s(&fs::canonicalize(&m.mnt).unwrap()).to_string())];
    let mount_info: Vec<(&str, &str)> = mount_info.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(value(&y, "ferryfs_mount_info", &mount_info), 1.0);
    m.unmount();
}

/// Run `argv` as user and group nobody, with no supplementary groups.
fn as_nobody(argv: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(argv)
        .output()
        .expect("run setpriv")
}

#[test]
fn metrics_are_the_mount_owners_alone() {
    if !Command::new("setpriv").arg("--version").output().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: setpriv is not installed");
        return;
    }
    let tp = TestPool::new("64K", &[("V1", "16M")]);
    // Open the test's directory to everyone: only ferryfs's own rules refuse.
    fs::set_permissions(tp.dir(), fs::Permissions::from_mode(0o755)).unwrap();
    // A copy of the binary that user nobody can run wherever the build lives.
    let exe = tp.dir().join("ferryfs");
    fs::copy(common::bin(), &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    let m = tp.mount();
    fs::write(m.p("data"), b"some bytes").unwrap();
    let metrics = m.p(".ferry/metrics");
    assert_eq!(fs::metadata(&metrics).unwrap().permissions().mode() & 0o777, 0o400);

    let out = as_nobody(&["cat", s(&metrics)]);
    assert!(!out.status.success(), "nobody read .ferry/metrics:\n{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "EACCES: {out:?}");
    assert!(out.stdout.is_empty());
    let out = as_nobody(&[s(&exe), "metrics", s(&m.mnt)]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    common::assert_one_clear_line(&err, "another user");
    assert!(err.contains("only the mount's owner may use it"), "{err}");

    // The owner reads it; a directory that is no mount says so.
    assert!(ferry_ok(&["metrics", s(&m.mnt)]).contains("ferryfs_volume_used_tracks{"));
    let out = ferry(["metrics", s(tp.dir())]);
    assert!(!out.status.success());
    common::assert_one_clear_line(&String::from_utf8_lossy(&out.stderr), "not a ferryfs mount");
    m.unmount();
}

/// One 16 MiB write(2) from a read-write handle reaches the mount as requests of up to 4 MiB
/// (the mount raises the kernel's `fs.fuse.max_pages_limit`; without it a request carries at
/// most 1 MiB), and its bytes read back. On a kernel without that limit (before 6.13), or
/// when not root, requests of 1 MiB are the most to expect.
#[test]
fn large_writes_arrive_in_few_requests() {
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let m = tp.mount();
    let limit = fs::read_to_string("/proc/sys/fs/fuse/max_pages_limit").ok();
    // SAFETY: geteuid can't fail.
    let root = unsafe { libc::geteuid() } == 0;
    let request_max = match &limit {
        Some(l) if root => {
            let pages: u64 = l.trim().parse().unwrap();
            assert!(pages >= 1024, "a mount by root raises max_pages_limit to 1024 pages, found {pages}");
            4 << 20
        }
        _ => 1 << 20,
    };
    const LEN: usize = 16 << 20;
    let bytes = common::pattern(LEN, 7);
    let (_, before) = read_metrics(&m.mnt);
    let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.p("big")).unwrap();
    f.write_all(&bytes).unwrap();
    drop(f);
    let (_, after) = read_metrics(&m.mnt);
    let writes = latency(&after, "write").0 - latency(&before, "write").0;
    assert!(
        writes >= 1 && writes as usize <= LEN.div_ceil(request_max),
        "{writes} write requests for one 16 MiB write"
    );
    common::assert_bytes_eq(&fs::read(m.p("big")).unwrap(), &bytes, "the 16 MiB written in one call");
}

/// A journal's writer (create, append a record, fdatasync, again) pays one flush per
/// record: the catalog's changes (the create, the allocation, each size) go into the ring
/// of the volume image, flushed with the bytes, not into a sync of the catalog's log
/// (docs/format.md, "The ring: the log's tail"). Then a kill -9, and the log cut back to
/// what the mount made durable (what a power cut would leave of it: every frame of the
/// journal gone): the next mount replays them from the ring, and every record reads back. A
/// clean unmount cuts the ring off the image.
#[test]
fn a_journal_writer_fdatasyncs_by_the_ring() {
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let image = PathBuf::from(common::volume_json(&tp.pool, "V1")["path"].as_str().unwrap());
    let m = tp.mount();
    let log = tp.pool.join("catalog.log");
    let synced_log = fs::metadata(&log).unwrap().len();
    let (_, before) = read_metrics(&m.mnt);
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(m.p("journal")).unwrap();
    f.write_all(b"head").unwrap();
    f.sync_all().unwrap();
    let mut want = b"head".to_vec();
    for i in 0..50 {
        let rec = common::pattern(100, i + 1);
        f.write_all(&rec).unwrap();
        f.sync_data().unwrap();
        want.extend_from_slice(&rec);
    }
    let (_, after) = read_metrics(&m.mnt);
    let family = "ferryfs_catalog_tail_records_total";
    let records = value(&after, family, &[]) - value(&before, family, &[]);
    assert!(records >= 45.0, "{records} of 51 fsyncs went by the ring");
    drop(f);
    assert!(fs::metadata(&image).unwrap().len() > 64 << 20, "no ring past the tracks");
    m.kill9();
    assert!(fs::metadata(&log).unwrap().len() > synced_log, "the journal's changes were not logged");
    OpenOptions::new().write(true).open(&log).unwrap().set_len(synced_log).unwrap();
    let out = common::ferry(["fsck", tp.pool.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fsck of the pool the ring completes: {said}");
    assert!(said.contains("kept in the volumes' rings"), "fsck says nothing of the ring: {said}");
    let m = tp.mount();
    common::assert_bytes_eq(&fs::read(m.p("journal")).unwrap(), &want, "the journal after the lost log frames");
    let said = fs::read_to_string(tp.pool.join("mount.log")).unwrap();
    assert!(said.contains("from the log's tail kept in the volume images"), "{said}");
    m.unmount();
    assert_eq!(fs::metadata(&image).unwrap().len(), 64 << 20, "the clean unmount left the ring");
}

/// A data set that grows by synced appends gets zeros written ahead of its end, so that the
/// appends after them overwrite blocks the host has allocated; the volume's write counter
/// shows them. A data set written once and synced once gets none.
#[test]
fn synced_appends_get_zeros_written_ahead() {
    let tp = TestPool::new("64K", &[("V1", "64M")]);
    let m = tp.mount();
    const APPENDS: usize = 64;
    let written = |x: &Exposition| value(x, "ferryfs_volume_written_bytes_total", &[("volume", "V1")]);
    let (_, before) = read_metrics(&m.mnt);
    // Written once and synced once: the bytes, and the log's tail in the volume's ring.
    let mut once = OpenOptions::new().create(true).append(true).open(m.p("once")).unwrap();
    once.write_all(&common::pattern(APPENDS * 4096, 1)).unwrap();
    once.sync_data().unwrap();
    let (_, after_once) = read_metrics(&m.mnt);
    let once_extra = written(&after_once) - written(&before) - (APPENDS * 4096) as f64;
    assert!(once_extra < 16384.0, "one write and one fdatasync wrote {once_extra} bytes more than the data");
    // Appended 4 KiB at a time, each synced.
    let want = common::pattern(APPENDS * 4096, 2);
    let mut log = OpenOptions::new().create(true).append(true).open(m.p("log")).unwrap();
    for rec in want.chunks(4096) {
        log.write_all(rec).unwrap();
        log.sync_data().unwrap();
    }
    let (_, after_log) = read_metrics(&m.mnt);
    // Each fdatasync also writes the log's tail (a 512-byte slot) into the ring.
    let extra = written(&after_log) - written(&after_once) - (APPENDS * 4096 + APPENDS * 512) as f64;
    if ferryfs::storage::file::prezero_pays_at(&tp.pool) {
        assert!(extra >= 128.0 * 1024.0, "synced appends of {} KiB wrote only {extra} bytes more", APPENDS * 4);
    } else {
        eprintln!("the pool's file system is copy-on-write or in memory: no zeros go ahead there");
        assert!(extra < 16384.0, "{extra} bytes written past the appends where no zeros go ahead");
    }
    common::assert_bytes_eq(&fs::read(m.p("log")).unwrap(), &want, "the appended data set");
    // What lies past the end reads as zeros.
    log.set_len((APPENDS as u64 + 64) * 4096).unwrap();
    let tail = fs::read(m.p("log")).unwrap();
    assert!(tail[APPENDS * 4096..].iter().all(|&b| b == 0), "past the appends: zeros");
    drop((once, log));
    m.unmount();
}
