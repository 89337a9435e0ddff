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
//! One entry is an interval, not a pause: `checkpoint-interval` makes the copiers checkpoint
//! that often instead of every 2 s (migrate/job.rs), so that a crash test's kills, which
//! mostly land in a job's first second, find checkpoints to resume from.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable the mount reads.
pub const ENV: &str = "FERRYFS_PAUSE";

/// The names a pause can be set for.
pub const POINTS: &[&str] = &["close-window", "live-hold", "live-switch", "checkpoint-interval"];

static PAUSES: OnceLock<HashMap<String, Duration>> = OnceLock::new();

/// Parses a `FERRYFS_PAUSE` value. A bad value is an error (a test that asked for a pause
/// and silently got none would pass for the wrong reason).
pub fn parse(text: &str) -> Result<HashMap<String, Duration>, String> {
    let mut out = HashMap::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, dur) = item
            .split_once('=')
            .ok_or_else(|| format!("{ENV}: `{item}` is not POINT=DURATION (e.g. close-window=300ms)"))?;
        let name = name.trim();
        if !POINTS.contains(&name) {
            return Err(format!("{ENV}: unknown pause point `{name}` (known: {})", POINTS.join(", ")));
        }
        out.insert(name.to_string(), parse_duration(dur.trim()).ok_or_else(|| format!("{ENV}: bad duration `{dur}`"))?);
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
    let map = match std::env::var(ENV) {
        Ok(v) => parse(&v)?,
        Err(_) => HashMap::new(),
    };
    if !map.is_empty() {
        log::warn!("{ENV} is set: migrations pause at {map:?}");
    }
    let _ = PAUSES.set(map);
    Ok(())
}

/// How long to pause at `point`, if a pause was asked for.
pub fn pause_at(point: &str) -> Option<Duration> {
    debug_assert!(POINTS.contains(&point), "undeclared pause point {point}");
    PAUSES.get().and_then(|m| m.get(point)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_points_and_refuses_bad_ones() {
        let m = parse("close-window=300ms, live-hold=2s").unwrap();
        assert_eq!(m["close-window"], Duration::from_millis(300));
        assert_eq!(m["live-hold"], Duration::from_secs(2));
        assert!(parse("").unwrap().is_empty());
        assert!(parse("close-window").unwrap_err().contains("POINT=DURATION"));
        assert!(parse("nowhere=1ms").unwrap_err().contains("unknown pause point"));
        assert!(parse("close-window=1h").unwrap_err().contains("bad duration"));
        assert!(parse("close-window=ms").unwrap_err().contains("bad duration"));
    }
}
