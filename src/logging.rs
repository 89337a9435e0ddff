//! Where the log goes. Under systemd (stderr is the journal's stream) to the journal, with
//! each record's priority; in a daemon started by `ferryfs mount` to POOL/mount.log, which
//! is rotated (a few files of at most [`LOG_FILE_MAX_BYTES`] each); otherwise to stderr.
//! `RUST_LOG` filters all three the same way (default: info).

use std::io::Write;
use std::path::Path;

use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};
use log::{Log, Metadata, Record};

/// The environment variable that sends a daemon's log to a rotated file.
pub const LOG_FILE_ENV: &str = "FERRYFS_LOG_FILE";
/// A log file is rotated once it passes this size.
pub const LOG_FILE_MAX_BYTES: usize = 4 << 20;
/// Rotated files kept besides the live one (mount.log.1 is the newest).
pub const LOG_FILES_KEPT: usize = 3;

fn filter() -> env_logger::Builder {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    b.format_timestamp_micros();
    b
}

/// Records that pass `RUST_LOG`, to the journal.
struct Journal {
    filter: env_logger::Logger,
    journal: systemd_journal_logger::JournalLog,
}

impl Log for Journal {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        self.filter.enabled(m)
    }
    fn log(&self, r: &Record<'_>) {
        if self.filter.matches(r) {
            self.journal.log(r);
        }
    }
    fn flush(&self) {}
}

/// A log file that rotates, private to its owner.
pub fn rotating_file(path: &Path) -> FileRotate<AppendCount> {
    let mut open = std::fs::OpenOptions::new();
    open.create(true).append(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
    FileRotate::new(
        path,
        AppendCount::new(LOG_FILES_KEPT),
        ContentLimit::BytesSurpassed(LOG_FILE_MAX_BYTES),
        Compression::None,
        Some(open),
    )
}

/// Every record reaches the file as it is logged (the rotating file buffers its writes).
struct Flushed<W: Write>(W);

impl<W: Write> Write for Flushed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Install the logger for this process.
pub fn init() {
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(journal) = systemd_journal_logger::JournalLog::new() {
            let filter = filter().build();
            log::set_max_level(filter.filter());
            let journal = journal.with_syslog_identifier("ferryfs".into());
            if log::set_boxed_logger(Box::new(Journal { filter, journal })).is_ok() {
                return;
            }
        }
    }
    let mut b = filter();
    if let Some(path) = std::env::var_os(LOG_FILE_ENV) {
        b.target(env_logger::Target::Pipe(Box::new(Flushed(rotating_file(Path::new(&path))))));
    }
    b.init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_log_file_rotates_and_stays_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mount.log");
        let mut w = Flushed(rotating_file(&path));
        let line = [b'x'; 1023];
        for _ in 0..(LOG_FILE_MAX_BYTES / 1024) * (LOG_FILES_KEPT + 3) {
            w.write_all(&line).unwrap();
            w.write_all(b"\n").unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["mount.log", "mount.log.1", "mount.log.2", "mount.log.3"]);
        for n in names {
            let m = std::fs::metadata(dir.path().join(&n)).unwrap();
            assert!(m.len() <= (LOG_FILE_MAX_BYTES + 1024) as u64, "{n}: {} bytes", m.len());
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{n}");
        }
    }
}
