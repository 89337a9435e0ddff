//! `.ferry/metrics` and `ferryfs metrics MNT`: the mount's numbers in the Prometheus text
//! exposition format (version 0.0.4), for a scrape or node_exporter's textfile collector.
//! docs/cli.md ("Metrics") lists every family.
//!
//! Where the numbers come from, and what they cost where they are counted:
//!
//! - volumes' I/O: `storage::counted::Counted`, around every image the engine opens; two
//!   relaxed atomic adds per call;
//! - applications' latency: [`AppIo`], fed by the FUSE adapter around each read, write,
//!   fsync and fdatasync of a data set; one relaxed add to a bucket and one to the sum;
//! - jobs and plans: their reports (`report::JobReport`, the same as `.ferry/status`);
//! - volumes' space and the catalog: the catalog, under its lock, as `.ferry/status` reads
//!   it; the store's counters change only under that lock.
//!
//! The file is generated when it is opened, so one read sees one snapshot, and nothing is
//! computed for it between opens. Every series carries the label `pool` (the pool
//! directory), so the files of several mounts on one host can sit side by side in a textfile
//! collector's directory. A job's id is the label `job_id`: `job` is the label a Prometheus
//! server gives every scraped series (its scrape job), and it would rename ours.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::engine::Engine;
use crate::migrate::{Migrations, Phase};
use crate::report;
use crate::storage::counted::IoOp;

/// Upper bounds of the latency buckets, nanoseconds: 1-2.5-5 steps from 1 us to 10 s. An
/// application op faster than a microsecond never reaches us (the kernel round trip alone
/// costs more); one slower than ten seconds is counted in `+Inf` and in the sum.
pub const BUCKET_BOUNDS_NS: [u64; 22] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];
const BUCKETS: usize = BUCKET_BOUNDS_NS.len() + 1;

/// A latency histogram with fixed buckets: lock-free, one relaxed add to a bucket and one to
/// the sum per observation. Buckets are kept apart (not cumulative) so that an observation
/// touches one of them; they are summed when read, and the count is their total, so the
/// `+Inf` bucket and `_count` always agree.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

/// A histogram read at one moment: per-bucket counts (not cumulative, the last one past
/// every bound) and the sum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub counts: [u64; BUCKETS],
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

impl Histogram {
    pub fn observe_ns(&self, ns: u64) {
        let i = BUCKET_BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// The application operations whose latency is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppOp {
    Read,
    Write,
    Fsync,
    Fdatasync,
}

impl AppOp {
    pub const ALL: [AppOp; 4] = [AppOp::Read, AppOp::Write, AppOp::Fsync, AppOp::Fdatasync];

    pub fn name(self) -> &'static str {
        match self {
            AppOp::Read => "read",
            AppOp::Write => "write",
            AppOp::Fsync => "fsync",
            AppOp::Fdatasync => "fdatasync",
        }
    }
}

/// What applications asked of the mount's data sets: the latency of each read, write,
/// fsync and fdatasync (whether it succeeded or not: the application waited either way), and
/// the bytes read and written. A write through an O_SYNC/O_DSYNC handle is one write, its
/// flush included.
#[derive(Debug, Default)]
pub struct AppIo {
    latency: [Histogram; AppOp::ALL.len()],
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
}

impl AppIo {
    /// An `op` that started at `started` ended now, having moved `bytes` (0 for a sync or a
    /// failure).
    pub fn record(&self, op: AppOp, started: Instant, bytes: usize) {
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.latency[op as usize].observe_ns(ns);
        match op {
            AppOp::Read => self.read_bytes.fetch_add(bytes as u64, Ordering::Relaxed),
            AppOp::Write => self.written_bytes.fetch_add(bytes as u64, Ordering::Relaxed),
            AppOp::Fsync | AppOp::Fdatasync => 0,
        };
    }

    pub fn latency(&self, op: AppOp) -> HistogramSnapshot {
        self.latency[op as usize].snapshot()
    }
}

/// The kinds of metric the exposition uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A sample's value: integers print as integers, floats in the shortest form that reads
/// back the same.
#[derive(Clone, Copy, Debug)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Int(v)
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Value {
        Value::Int(v as u64)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::Int(v as u64)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Int(v as u64)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Float(v)
    }
}

fn write_float(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v == f64::INFINITY {
        out.push_str("+Inf");
    } else if v == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        let _ = write!(out, "{v}");
    }
}

fn write_value(out: &mut String, v: Value) {
    match v {
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Float(f) => write_float(out, f),
    }
}

/// Append `v` as a label value: backslash, double quote and line feed escaped.
pub fn escape_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Append `v` as help text: backslash and line feed escaped.
fn escape_help(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn is_metric_name(n: &str) -> bool {
    let mut cs = n.chars();
    cs.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(n: &str) -> bool {
    let mut cs = n.chars();
    !n.starts_with("__")
        && cs.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A document in the text exposition format, written family by family. Every family gets its
/// `# HELP` and `# TYPE` lines with its first sample; one that gets no sample is left out
/// (a job's families before any job exists).
pub struct Exposition {
    text: String,
    /// Labels every series carries, first.
    common: Vec<(&'static str, String)>,
    seen: std::collections::BTreeSet<&'static str>,
}

impl Exposition {
    pub fn new(common: Vec<(&'static str, String)>) -> Exposition {
        assert!(common.iter().all(|(k, _)| is_label_name(k)));
        Exposition { text: String::new(), common, seen: Default::default() }
    }

    /// Start a family. Its name is a valid metric name starting `ferryfs_`, a counter's and
    /// only a counter's ends in `_total`, and a family appears once: names are constants, so
    /// the first render in a test catches a slip.
    pub fn family(&mut self, name: &'static str, kind: Kind, help: &'static str) -> Family<'_> {
        assert!(is_metric_name(name) && name.starts_with("ferryfs_"), "{name}");
        assert_eq!(kind == Kind::Counter, name.ends_with("_total"), "{name}: only counters end in _total");
        assert!(self.seen.insert(name), "family {name} written twice");
        Family { exp: self, name, kind, help, started: false }
    }

    pub fn finish(self) -> String {
        self.text
    }

    /// `name{common,labels,extra} value`.
    fn line(&mut self, name: &str, suffix: &str, labels: &[(&str, &str)], extra: Option<(&str, &str)>, v: Value) {
        let out = &mut self.text;
        out.push_str(name);
        out.push_str(suffix);
        let all = self.common.iter().map(|(k, v)| (*k, v.as_str())).chain(labels.iter().copied()).chain(extra);
        let mut first = true;
        for (k, val) in all {
            assert!(is_label_name(k), "{k}");
            out.push_str(if first { "{" } else { "," });
            first = false;
            out.push_str(k);
            out.push_str("=\"");
            escape_label_value(out, val);
            out.push('"');
        }
        if !first {
            out.push('}');
        }
        out.push(' ');
        write_value(out, v);
        out.push('\n');
    }
}

/// One family being written.
pub struct Family<'a> {
    exp: &'a mut Exposition,
    name: &'static str,
    kind: Kind,
    help: &'static str,
    started: bool,
}

impl Family<'_> {
    fn header(&mut self) {
        if !self.started {
            self.started = true;
            let out = &mut self.exp.text;
            let _ = write!(out, "# HELP {} ", self.name);
            escape_help(out, self.help);
            let _ = writeln!(out, "\n# TYPE {} {}", self.name, self.kind.name());
        }
    }

    /// A counter's or a gauge's sample.
    pub fn sample(&mut self, labels: &[(&str, &str)], v: impl Into<Value>) {
        assert_ne!(self.kind, Kind::Histogram);
        self.header();
        self.exp.line(self.name, "", labels, None, v.into());
    }

    /// A histogram's samples: cumulative buckets up to `+Inf`, the sum (seconds) and the count.
    pub fn histogram(&mut self, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        assert_eq!(self.kind, Kind::Histogram);
        self.header();
        let mut cumulative = 0u64;
        let mut le = String::new();
        for (i, &bound_ns) in BUCKET_BOUNDS_NS.iter().enumerate() {
            cumulative += h.counts[i];
            le.clear();
            write_float(&mut le, bound_ns as f64 / 1e9);
            self.exp.line(self.name, "_bucket", labels, Some(("le", &le)), cumulative.into());
        }
        let count = h.count();
        self.exp.line(self.name, "_bucket", labels, Some(("le", "+Inf")), count.into());
        self.exp.line(self.name, "_sum", labels, None, (h.sum_ns as f64 / 1e9).into());
        self.exp.line(self.name, "_count", labels, None, count.into());
    }
}

/// What the metrics of one mount are read from.
pub struct Mount<'a> {
    pub engine: &'a Engine,
    pub migrations: &'a Migrations,
    pub app: &'a AppIo,
    pub mountpoint: &'a Path,
    /// When the mount started serving (Unix nanoseconds).
    pub started_ns: i64,
}

fn secs(ns: i64) -> f64 {
    ns as f64 / 1e9
}

/// The whole of `.ferry/metrics`, now.
pub fn render(m: &Mount<'_>) -> String {
    let engine = m.engine;
    // The jobs' reports take the migrations' lock, then the catalog's: before ours.
    let (jobs, plans) = m.migrations.reports();
    let volume_io = engine.volume_io();
    let pool = engine.pool_dir.to_string_lossy().into_owned();
    let mut x = Exposition::new(vec![("pool", pool)]);

    {
        let cat = engine.catalog.lock();
        let c = &cat.catalog;
        let mountpoint = m.mountpoint.to_string_lossy();
        x.family(
            "ferryfs_mount_info",
            Kind::Gauge,
            "The mount: its mountpoint and the ferryfs version serving it (always 1).",
        )
        .sample(&[("mountpoint", &mountpoint), ("version", env!("CARGO_PKG_VERSION"))], 1u64);
        x.family("ferryfs_mount_start_time_seconds", Kind::Gauge, "When the mount started serving, in Unix seconds.")
            .sample(&[], secs(m.started_ns));
        x.family(
            "ferryfs_pool_track_size_bytes",
            Kind::Gauge,
            "The pool's track size: the unit of allocation and of dirty tracking.",
        )
        .sample(&[], c.geometry.track_size_bytes());
        let data_sets = c.data_set_count();
        x.family("ferryfs_pool_data_sets", Kind::Gauge, "Data sets (regular files) in the pool.")
            .sample(&[], data_sets);
        x.family("ferryfs_pool_max_jobs", Kind::Gauge, "Migration jobs that may copy at once.")
            .sample(&[], m.migrations.max_jobs());
        x.family(
            "ferryfs_pool_copy_rate_limit_bytes_per_second",
            Kind::Gauge,
            "Pool-wide cap on the copy rate of migrations, bytes per second (0: none).",
        )
        .sample(&[], m.migrations.copy_rate.rate());

        let volumes = report::volumes_by_id(c);
        let io: Vec<_> = volumes.iter().map(|(id, _)| volume_io.get(id).copied().unwrap_or_default()).collect();
        let each = |x: &mut Exposition,
                    name: &'static str,
                    kind: Kind,
                    help: &'static str,
                    f: &dyn Fn(usize, &report::VolumeReport) -> Value| {
            let mut fam = x.family(name, kind, help);
            for (i, (_, v)) in volumes.iter().enumerate() {
                fam.sample(&[("volume", &v.name)], f(i, v));
            }
        };
        {
            let mut fam =
                x.family("ferryfs_volume_info", Kind::Gauge, "A volume and the path of its image (always 1).");
            for (_, v) in &volumes {
                fam.sample(&[("volume", &v.name), ("path", &v.path)], 1u64);
            }
        }
        each(&mut x, "ferryfs_volume_size_bytes", Kind::Gauge, "Size of the volume's image.", &|_, v| {
            v.size_bytes.into()
        });
        each(
            &mut x,
            "ferryfs_volume_used_tracks",
            Kind::Gauge,
            "Tracks of the volume that data sets or jobs hold.",
            &|_, v| v.tracks_used.into(),
        );
        each(
            &mut x,
            "ferryfs_volume_free_tracks",
            Kind::Gauge,
            "Tracks of the volume free for allocation.",
            &|_, v| v.tracks_free.into(),
        );
        each(
            &mut x,
            "ferryfs_volume_data_sets",
            Kind::Gauge,
            "Data sets with at least one extent on the volume.",
            &|_, v| v.data_sets.into(),
        );
        each(
            &mut x,
            "ferryfs_volume_closed",
            Kind::Gauge,
            "1 if the volume takes no new allocation (the source of a merge or drain), else 0.",
            &|i, _| c.closed_volumes.contains(&volumes[i].0).into(),
        );
        each(
            &mut x,
            "ferryfs_volume_reads_total",
            Kind::Counter,
            "Reads from the volume's image that succeeded.",
            &|i, _| io[i].reads.into(),
        );
        each(
            &mut x,
            "ferryfs_volume_read_bytes_total",
            Kind::Counter,
            "Bytes read from the volume's image.",
            &|i, _| io[i].read_bytes.into(),
        );
        each(
            &mut x,
            "ferryfs_volume_writes_total",
            Kind::Counter,
            "Writes to the volume's image that succeeded.",
            &|i, _| io[i].writes.into(),
        );
        each(
            &mut x,
            "ferryfs_volume_written_bytes_total",
            Kind::Counter,
            "Bytes written to the volume's image.",
            &|i, _| io[i].written_bytes.into(),
        );
        each(
            &mut x,
            "ferryfs_volume_flushes_total",
            Kind::Counter,
            "Flushes (fdatasync) of the volume's image that succeeded.",
            &|i, _| io[i].flushes.into(),
        );
        each(
            &mut x,
            "ferryfs_volume_punches_total",
            Kind::Counter,
            "Ranges of the volume zeroed (hole punches) that succeeded.",
            &|i, _| io[i].punches.into(),
        );
        each(
            &mut x,
            "ferryfs_volume_punched_bytes_total",
            Kind::Counter,
            "Bytes of the volume zeroed by hole punches.",
            &|i, _| io[i].punched_bytes.into(),
        );
        {
            let mut fam = x.family(
                "ferryfs_volume_io_errors_total",
                Kind::Counter,
                "Calls on the volume's image that failed, by kind (read, write, flush, punch, writeback).",
            );
            for (i, (_, v)) in volumes.iter().enumerate() {
                for op in IoOp::ALL {
                    fam.sample(&[("volume", &v.name), ("op", op.name())], io[i].errors_of(op));
                }
            }
        }

        let st = cat.stats();
        x.family("ferryfs_catalog_log_size_bytes", Kind::Gauge, "Length of the catalog's log file now.")
            .sample(&[], st.log_size_bytes);
        x.family("ferryfs_catalog_snapshot_size_bytes", Kind::Gauge, "Length of the catalog's last snapshot.")
            .sample(&[], st.snapshot_size_bytes);
        x.family(
            "ferryfs_catalog_log_appended_bytes_total",
            Kind::Counter,
            "Bytes appended to the catalog's log since the mount.",
        )
        .sample(&[], st.appended_bytes);
        x.family(
            "ferryfs_catalog_ops_total",
            Kind::Counter,
            "Catalog ops committed (one log frame each) since the mount.",
        )
        .sample(&[], st.ops_committed);
        x.family(
            "ferryfs_catalog_compactions_total",
            Kind::Counter,
            "Compactions of the catalog (log folded into a new snapshot) since the mount, the one at mount included.",
        )
        .sample(&[], st.compactions);
        x.family("ferryfs_catalog_compaction_failures_total", Kind::Counter, "Compactions of the catalog that failed.")
            .sample(&[], st.compaction_failures);
        x.family(
            "ferryfs_catalog_tail_records_total",
            Kind::Counter,
            "Fsyncs and fdatasyncs that made the catalog's unsynced changes durable by copying the log's tail into a volume image's ring, flushed with the data set's bytes, instead of a sync of the catalog's log.",
        )
        .sample(&[], st.tail_records);
    }

    {
        let mut fam = x.family(
            "ferryfs_app_op_duration_seconds",
            Kind::Histogram,
            "Time applications waited for reads, writes, fsyncs and fdatasyncs of data sets, in the mount.",
        );
        for op in AppOp::ALL {
            fam.histogram(&[("op", op.name())], &m.app.latency(op));
        }
    }
    x.family("ferryfs_app_read_bytes_total", Kind::Counter, "Bytes applications read from data sets.")
        .sample(&[], m.app.read_bytes.load(Ordering::Relaxed));
    x.family("ferryfs_app_written_bytes_total", Kind::Counter, "Bytes applications wrote to data sets.")
        .sample(&[], m.app.written_bytes.load(Ordering::Relaxed));

    {
        let mut fam = x.family("ferryfs_jobs", Kind::Gauge, "Migration jobs of this mount, by phase.");
        for p in Phase::ALL {
            fam.sample(&[("phase", p.name())], jobs.iter().filter(|j| j.phase == p.name()).count());
        }
    }
    let ids: Vec<String> = jobs.iter().map(|j| j.id.to_string()).collect();
    let job = |i: usize| [("job_id", ids[i].as_str()), ("path", jobs[i].path.as_str())];
    {
        let mut fam = x.family(
            "ferryfs_job_info",
            Kind::Gauge,
            "A migration job: its plan (empty if none), cutover mode and target volumes (always 1).",
        );
        for (i, j) in jobs.iter().enumerate() {
            let plan = j.plan.map(|p| p.to_string()).unwrap_or_default();
            let targets = j.targets.join(",");
            let [a, b] = job(i);
            fam.sample(&[a, b, ("plan_id", &plan), ("cutover", &j.cutover), ("targets", &targets)], 1u64);
        }
    }
    {
        let mut fam = x.family("ferryfs_job_phase", Kind::Gauge, "A job's phase now (always 1, one series per job).");
        for (i, j) in jobs.iter().enumerate() {
            let [a, b] = job(i);
            fam.sample(&[a, b, ("phase", &j.phase)], 1u64);
        }
    }
    type JobValue = fn(&report::JobReport) -> Option<Value>;
    let per_job: [(&'static str, Kind, &'static str, JobValue); 14] = [
        ("ferryfs_job_copied_bytes", Kind::Gauge, "Bytes of the data set the first pass has copied.", |j| {
            Some(j.bytes_copied.into())
        }),
        (
            "ferryfs_job_size_bytes",
            Kind::Gauge,
            "Bytes the job moves: the data set's allocation (it follows growth).",
            |j| Some(j.bytes_total.into()),
        ),
        ("ferryfs_job_resynced_bytes_total", Kind::Counter, "Bytes copied again by re-sync passes.", |j| {
            Some(j.bytes_resynced.into())
        }),
        ("ferryfs_job_dirty_tracks", Kind::Gauge, "Tracks written since they were copied, still to copy again.", |j| {
            Some(j.dirty_tracks.into())
        }),
        (
            "ferryfs_job_resync_passes_total",
            Kind::Counter,
            "Re-sync passes the job has made over its dirty tracks.",
            |j| Some(j.passes.into()),
        ),
        ("ferryfs_job_mirroring", Kind::Gauge, "1 once the job mirrors writes to source and target, else 0.", |j| {
            Some(j.mirrored.into())
        }),
        (
            "ferryfs_job_mirrored_writes_total",
            Kind::Counter,
            "Application writes the job mirrored to source and target.",
            |j| Some(j.mirrored_writes.into()),
        ),
        ("ferryfs_job_copy_rate_bytes_per_second", Kind::Gauge, "The job's recent copy rate.", |j| {
            Some(j.copy_rate_bytes_per_s.into())
        }),
        ("ferryfs_job_start_time_seconds", Kind::Gauge, "When the job was created, in Unix seconds.", |j| {
            Some(secs(j.started_ns).into())
        }),
        ("ferryfs_job_end_time_seconds", Kind::Gauge, "When the job ended, in Unix seconds (ended jobs only).", |j| {
            j.ended_ns.map(|t| secs(t).into())
        }),
        ("ferryfs_job_stall_seconds", Kind::Gauge, "Live cutover: how long the data set's writes were held.", |j| {
            j.stall_us.map(|us| (us as f64 / 1e6).into())
        }),
        (
            "ferryfs_job_window_seconds",
            Kind::Gauge,
            "Close cutover: how long opens of the data set were held (the downtime window).",
            |j| j.window_us.map(|us| (us as f64 / 1e6).into()),
        ),
        (
            "ferryfs_job_verified_tracks",
            Kind::Gauge,
            "verify=yes: tracks whose checksums were compared before the switch (up to a mismatch).",
            |j| j.verified_tracks.map(Value::from),
        ),
        (
            "ferryfs_job_verify_seconds",
            Kind::Gauge,
            "verify=yes: how long the comparison took, inside the stall or the window.",
            |j| j.verify_us.map(|us| (us as f64 / 1e6).into()),
        ),
    ];
    for (name, kind, help, value) in per_job {
        let mut fam = x.family(name, kind, help);
        for (i, j) in jobs.iter().enumerate() {
            if let Some(v) = value(j) {
                fam.sample(&job(i), v);
            }
        }
    }
    {
        let mut fam =
            x.family("ferryfs_plan_phase", Kind::Gauge, "A merge or drain plan and its phase now (always 1).");
        for p in &plans {
            let id = p.id.to_string();
            fam.sample(&[("plan_id", &id), ("kind", &p.kind), ("phase", &p.phase)], 1u64);
        }
    }
    {
        let mut fam = x.family("ferryfs_plan_jobs", Kind::Gauge, "Jobs a plan has started.");
        for p in &plans {
            fam.sample(&[("plan_id", &p.id.to_string())], p.jobs.len());
        }
    }
    x.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut x = Exposition::new(vec![("pool", "/p\\o\"ol".into())]);
        x.family("ferryfs_test_total", Kind::Counter, "a \\ help\nline").sample(&[("path", "a\"b\\c\nd")], 3u64);
        let text = x.finish();
        assert_eq!(
            text,
            "# HELP ferryfs_test_total a \\\\ help\\nline\n# TYPE ferryfs_test_total counter\n\
             ferryfs_test_total{pool=\"/p\\\\o\\\"ol\",path=\"a\\\"b\\\\c\\nd\"} 3\n"
        );
    }

    #[test]
    fn a_family_without_samples_is_left_out() {
        let mut x = Exposition::new(vec![]);
        x.family("ferryfs_empty", Kind::Gauge, "nothing");
        x.family("ferryfs_one", Kind::Gauge, "one").sample(&[], 0.5);
        assert_eq!(x.finish(), "# HELP ferryfs_one one\n# TYPE ferryfs_one gauge\nferryfs_one 0.5\n");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_inf() {
        let h = Histogram::default();
        for ns in [500, 1_000, 1_001, 3_000_000, 20_000_000_000] {
            h.observe_ns(ns);
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 5);
        assert_eq!(s.counts[0], 2, "le is inclusive: 500 ns and 1 us fall in the first bucket");
        assert_eq!(s.counts[1], 1);
        assert_eq!(s.counts[BUCKETS - 1], 1, "past 10 s: only +Inf");
        let mut x = Exposition::new(vec![]);
        x.family("ferryfs_lat_seconds", Kind::Histogram, "h").histogram(&[("op", "read")], &s);
        let text = x.finish();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[2], "ferryfs_lat_seconds_bucket{op=\"read\",le=\"0.000001\"} 2");
        assert_eq!(lines[3], "ferryfs_lat_seconds_bucket{op=\"read\",le=\"0.0000025\"} 3");
        assert!(lines.contains(&"ferryfs_lat_seconds_bucket{op=\"read\",le=\"0.005\"} 4"));
        assert!(lines.contains(&"ferryfs_lat_seconds_bucket{op=\"read\",le=\"10\"} 4"));
        assert!(lines.contains(&"ferryfs_lat_seconds_bucket{op=\"read\",le=\"+Inf\"} 5"));
        assert!(lines.contains(&"ferryfs_lat_seconds_count{op=\"read\"} 5"));
        assert!(lines.contains(&"ferryfs_lat_seconds_sum{op=\"read\"} 20.003002501"));
        assert_eq!(lines.len(), 2 + BUCKETS + 2);
    }

    #[test]
    fn bounds_rise() {
        assert!(BUCKET_BOUNDS_NS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn names_are_checked() {
        assert!(is_metric_name("ferryfs_a_b:c"));
        assert!(!is_metric_name("9a") && !is_metric_name("a-b") && !is_metric_name(""));
        assert!(is_label_name("job_id") && !is_label_name("__x") && !is_label_name("a.b"));
    }
}
