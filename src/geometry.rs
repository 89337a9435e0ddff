//! Track geometry: the byte/track arithmetic of a pool, as types.
//!
//! A pool has one track size, a power of two. Everything that counts tracks uses
//! [`TrackNo`] / track counts (`u64` named `*_tracks`); everything that counts bytes is named
//! `*_bytes` or `*_offset`. The two meet only here.

use serde::{Deserialize, Serialize};

/// Smallest track size: one page, the unit the kernel caches.
pub const TRACK_SIZE_MIN_BYTES: u64 = 4 * 1024;
/// Largest track size: a track is the unit a migration re-copies, so a huge track makes
/// every dirty bit expensive.
pub const TRACK_SIZE_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default track size, as in the design card.
pub const TRACK_SIZE_DEFAULT_BYTES: u64 = 64 * 1024;

/// A track index, either on a volume (physical) or inside a data set (logical).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TrackNo(pub u64);

/// The track size of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    track_shift: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GeometryError {
    #[error("track size {size_bytes} is not a power of two")]
    NotPowerOfTwo { size_bytes: u64 },
    #[error("track size {size_bytes} is outside {min}..={max} bytes", min = TRACK_SIZE_MIN_BYTES, max = TRACK_SIZE_MAX_BYTES)]
    OutOfRange { size_bytes: u64 },
}

impl Geometry {
    pub fn new(track_size_bytes: u64) -> Result<Self, GeometryError> {
        if !track_size_bytes.is_power_of_two() {
            return Err(GeometryError::NotPowerOfTwo { size_bytes: track_size_bytes });
        }
        if !(TRACK_SIZE_MIN_BYTES..=TRACK_SIZE_MAX_BYTES).contains(&track_size_bytes) {
            return Err(GeometryError::OutOfRange { size_bytes: track_size_bytes });
        }
        Ok(Geometry { track_shift: track_size_bytes.trailing_zeros() })
    }

    pub fn track_size_bytes(&self) -> u64 {
        1u64 << self.track_shift
    }

    /// The track holding byte `offset`.
    pub fn track_of(&self, offset: u64) -> TrackNo {
        TrackNo(offset >> self.track_shift)
    }

    /// Tracks needed to hold `size_bytes` bytes (rounded up).
    pub fn tracks_for(&self, size_bytes: u64) -> u64 {
        size_bytes.div_ceil(self.track_size_bytes())
    }

    /// Whole tracks that fit in `size_bytes` (rounded down).
    pub fn whole_tracks_in(&self, size_bytes: u64) -> u64 {
        size_bytes >> self.track_shift
    }

    pub fn track_offset(&self, track: TrackNo) -> u64 {
        track.0 << self.track_shift
    }

    pub fn bytes_of(&self, tracks: u64) -> u64 {
        tracks << self.track_shift
    }

    /// Offset of `offset` inside its track.
    pub fn offset_in_track(&self, offset: u64) -> u64 {
        offset & (self.track_size_bytes() - 1)
    }
}

/// How sizes are read everywhere (flags and control lines): binary units, so `K`, `KB`,
/// `KiB` and `Ki` all mean 1024, case-insensitive; the `B` is optional.
const SIZE_SYNTAX: parse_size::Config = parse_size::Config::new().with_binary();

/// Parse a size such as `64K`, `10M`, `1.5G`, `4096`, `2GiB`: a number (decimals and
/// exponents allowed; `_` and blanks inside it are ignored) and an optional unit B, K, M, G,
/// T, P or E, powers of 1024. A fraction of a byte rounds to the nearest byte. The parsing
/// is the `parse-size` crate's; the messages are ours.
pub fn parse_size(text: &str) -> Result<u64, String> {
    if text.trim().is_empty() {
        return Err("empty size".into());
    }
    SIZE_SYNTAX.parse_size(text.trim()).map_err(|e| match e {
        parse_size::Error::Empty => format!("size {text:?} has a unit but no number"),
        parse_size::Error::PosOverflow => format!("size {text:?} is too large"),
        _ => format!("size {text:?} is not a number with an optional unit K, M, G, T, P or E"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn track_arithmetic() {
        let g = Geometry::new(64 * 1024).unwrap();
        assert_eq!(g.track_of(0), TrackNo(0));
        assert_eq!(g.track_of(65535), TrackNo(0));
        assert_eq!(g.track_of(65536), TrackNo(1));
        assert_eq!(g.tracks_for(0), 0);
        assert_eq!(g.tracks_for(1), 1);
        assert_eq!(g.tracks_for(65537), 2);
        assert_eq!(g.whole_tracks_in(65537), 1);
        assert_eq!(g.offset_in_track(65537), 1);
        assert_eq!(g.track_offset(TrackNo(3)), 3 * 65536);
    }

    #[test]
    fn geometry_refuses_bad_sizes() {
        assert!(matches!(Geometry::new(3000), Err(GeometryError::NotPowerOfTwo { .. })));
        assert!(matches!(Geometry::new(1024), Err(GeometryError::OutOfRange { .. })));
        assert!(matches!(Geometry::new(1 << 30), Err(GeometryError::OutOfRange { .. })));
        assert!(Geometry::new(4096).is_ok());
    }

    /// The syntax docs/cli.md promises, spelling by spelling.
    #[test]
    fn sizes_parse() {
        for (text, bytes) in [
            ("4096", 4096u64),
            ("0", 0),
            ("64K", 65536),
            ("64k", 65536),
            ("64KB", 65536),
            ("64KiB", 65536),
            ("64Ki", 65536),
            ("2MiB", 2 << 20),
            ("2mb", 2 << 20),
            ("1G", 1 << 30),
            ("3T", 3 << 40),
            ("1P", 1 << 50),
            ("1E", 1 << 60),
            ("100B", 100),
            ("1.5M", 3 << 19),
            ("0.5K", 512),
            ("1e3", 1000),
            ("2.5e1K", 25 << 10),
            ("1_048_576", 1 << 20),
            ("4 K", 4096),
            (" 8M ", 8 << 20),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text:?}");
        }
        for (text, why) in [
            ("", "empty"),
            ("   ", "empty"),
            ("12X", "not a number"),
            ("K", "no number"),
            ("M1", "not a number"),
            ("-1", "not a number"),
            ("1..5M", "not a number"),
            ("99999999999999999999T", "too large"),
            ("20000000T", "too large"),
            ("16E", "too large"),
        ] {
            let e = parse_size(text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }
}
