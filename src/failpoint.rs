//! Named pauses at chosen moments of a migration, for the crash tests.
//!
//! A kill -9 must be testable at every moment of a job, including the ones that last a tenth
//! of a millisecond (the close-mode downtime window). A test cannot hit those by polling, so
//! the mount reads `FERRYFS_PAUSE` once: a comma-separated list of `POINT=DURATION`
//! (`close-window=300ms`, `live-hold=1s`). At a listed point the job sleeps that long, still
//! holding whatever it holds there, and writes a `pause` event so that a test knows it is
//! in. Without the variable a pause point costs one load of an initialised `OnceLock`.
//!
//! The points: `close-window` (the downtime window is open, opens wait, nothing copied yet),
//! `live-hold` (live mode, writes held, nothing copied yet; a cancel now still wins) and
//! `live-switch` (just after: the switch is decided, a cancel now is refused as too late).
//!
//! The same variable names fault points, which do something wrong on purpose so that a test
//! can see the code catch it: `verify-corrupt-target` (or `verify-corrupt-target=TRACK`)
//! flips one byte of the target at logical track TRACK (0 unless given; the last track if
//! the data set is shorter) after the final re-sync and before the verification
//! (`verify=yes`), which must then fail the job.
//! One entry is an interval, not a pause: `checkpoint-interval` makes the copiers checkpoint
//! that often instead of every 2 s (migrate/job.rs), so that a crash test's kills, which
//! mostly land in a job's first second, find checkpoints to resume from.
//! One pause is not a migration's: at `fsync`, every flush an application waits for (an
//! fsync, an fsyncdir, the sync of an O_SYNC write) waits that long before it starts (and
//! the mount's log says so), so that a test can see what the mount serves meanwhile.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable the mount reads.
pub const ENV: &str = "FERRYFS_PAUSE";

/// The names a pause can be set for.
pub const POINTS: &[&str] = &["close-window", "live-hold", "live-switch", "checkpoint-interval", "fsync"];
/// The names of the fault points; each takes an optional number (a track).
pub const FAULTS: &[&str] = &["verify-corrupt-target"];

/// What `FERRYFS_PAUSE` asks for.
#[derive(Debug, Default)]
pub struct Points {
    pub pauses: HashMap<String, Duration>,
    pub faults: HashMap<String, u64>,
}

static POINTS_SET: OnceLock<Points> = OnceLock::new();

/// Parses a `FERRYFS_PAUSE` value. A bad value is an error (a test that asked for a pause
/// and silently got none would pass for the wrong reason).
pub fn parse(text: &str) -> Result<Points, String> {
    let mut out = Points::default();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, value) = match item.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (item, None),
        };
        if FAULTS.contains(&name) {
            let n = match value {
                None => 0,
                Some(v) => v.parse().map_err(|_| format!("{ENV}: `{item}`: {name} takes a track number"))?,
            };
            out.faults.insert(name.to_string(), n);
            continue;
        }
        let dur = value.ok_or_else(|| format!("{ENV}: `{item}` is not POINT=DURATION (e.g. close-window=300ms)"))?;
        if !POINTS.contains(&name) {
            return Err(format!(
                "{ENV}: unknown pause point `{name}` (known: {}; faults: {})",
                POINTS.join(", "),
                FAULTS.join(", ")
            ));
        }
        out.pauses.insert(name.to_string(), parse_duration(dur).ok_or_else(|| format!("{ENV}: bad duration `{dur}`"))?);
    }
    Ok(out)
}

fn parse_duration(s: &str) -> Option<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    match unit {
        "us" => Some(Duration::from_micros(n)),
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        _ => None,
    }
}

/// Reads `FERRYFS_PAUSE` (once, at mount). An unset variable means no pauses.
pub fn init_from_env() -> Result<(), String> {
    let points = match std::env::var(ENV) {
        Ok(v) => parse(&v)?,
        Err(_) => Points::default(),
    };
    if !points.pauses.is_empty() {
        log::warn!("{ENV} is set: migrations pause at {:?}", points.pauses);
    }
    if !points.faults.is_empty() {
        log::warn!("{ENV} is set: migrations do wrong on purpose at {:?}", points.faults);
    }
    let _ = POINTS_SET.set(points);
    Ok(())
}

/// How long to pause at `point`, if a pause was asked for.
pub fn pause_at(point: &str) -> Option<Duration> {
    debug_assert!(POINTS.contains(&point), "undeclared pause point {point}");
    POINTS_SET.get().and_then(|p| p.pauses.get(point)).copied()
}

/// The number given to fault point `point`, if the fault was asked for.
pub fn fault_at(point: &str) -> Option<u64> {
    debug_assert!(FAULTS.contains(&point), "undeclared fault point {point}");
    POINTS_SET.get().and_then(|p| p.faults.get(point)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_points_and_refuses_bad_ones() {
        let m = parse("close-window=300ms, live-hold=2s").unwrap().pauses;
        assert_eq!(m["close-window"], Duration::from_millis(300));
        assert_eq!(m["live-hold"], Duration::from_secs(2));
        assert!(parse("").unwrap().pauses.is_empty());
        let p = parse("verify-corrupt-target, live-hold=1s").unwrap();
        assert_eq!(p.faults["verify-corrupt-target"], 0);
        assert_eq!(p.pauses["live-hold"], Duration::from_secs(1));
        assert_eq!(parse("verify-corrupt-target=7").unwrap().faults["verify-corrupt-target"], 7);
        assert!(parse("verify-corrupt-target=x").unwrap_err().contains("takes a track number"));
        assert!(parse("close-window").unwrap_err().contains("POINT=DURATION"));
        assert!(parse("nowhere=1ms").unwrap_err().contains("unknown pause point"));
        assert!(parse("close-window=1h").unwrap_err().contains("bad duration"));
        assert!(parse("close-window=ms").unwrap_err().contains("bad duration"));
    }
}
