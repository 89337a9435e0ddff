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

/// Parse a size such as `64K`, `10M`, `1G`, `4096`, `2GiB`. Suffixes are powers of 1024.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty size".into());
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!("size {text:?} does not start with a number"));
    }
    let n: u64 = num.parse().map_err(|_| format!("size {text:?} is too large"))?;
    let mult: u64 = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(format!("size {text:?} has an unknown suffix {suffix:?} (use K, M, G or T)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {text:?} is too large"))
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

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("K").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
        assert!(parse_size("20000000T").is_err());
    }
}
