//! The ring past a volume image's tracks: where an fsync keeps the log's unsynced tail, so
//! that it costs one flush (the volume image's, which it needs for the bytes anyway) instead
//! of two (the image's, then the log's).
//!
//! ```text
//! image file   tracks (VolumeRec::size_bytes) | ring: RING_SLOTS slots of SLOT_BYTES
//! fragment     magic "FYLT" | version u16 | length u16 | generation u64 | log_offset u64
//!              | volume u32 | crc32c of the header's first 28 bytes and the payload
//!              | payload: `length` bytes of the log, from byte `log_offset` of its file
//! ```
//!
//! Every catalog change is a frame appended to the log, in the page cache before the op
//! returns (a kill -9 loses nothing). At an fsync, the frames the log does not yet hold on
//! the disk (a create, an allocation, a size, an unlink...) are copied, byte for byte, into
//! *fragments* in the ring of one of the data set's volumes, and the volumes are flushed;
//! the log is not. After a power cut the log keeps a prefix of its frames, at least up to
//! its last sync; the fragments of the log's generation that continue that prefix are laid
//! over the log's bytes (they are the same bytes: the log is append-only within a
//! generation), and replay goes on over them ([`overlay`]). So an fsync makes every earlier
//! catalog change durable, as a sync of the log did.
//!
//! Fragments chain: an fsync copies only what neither a sync of the log nor an earlier
//! fragment whose flush completed made durable, so each is small (a few frames). Each slot
//! is one fragment with its own header and checksum, one sector: a torn write tears one
//! fragment at most, and a torn fragment was never acknowledged (its fsync had not
//! returned). Any set of valid fragments is consistent, whatever subset a cut left: each is
//! a true copy of part of the log. Payload never starts a slot, so nothing an application
//! puts in a frame (a name, an attribute) can pose as a fragment's header.
//!
//! A slot is written again only when its fragment is covered by a durable log: the mount
//! keeps, for each slot, the appended mark its fragment ended at, and an fsync that would
//! overwrite a fragment the log does not hold durably syncs the log instead (once per lap
//! of the ring at most). A writable open that finds a fragment of the log's generation
//! reaching past what the log held on the disk compacts (a new generation), so that no
//! fragment is ever laid over a log that grew again differently after it.
//!
//! Pools written before fragments existed may hold *size records* ("FYSZ": one data set's
//! size, for an fsync whose pending frames were all size raises). They are still read
//! ([`SizeRecord`]).
//!
//! Device volumes have no ring (the device's end holds its label; docs/format.md): the
//! fsyncs of data sets that lie only on devices sync the log.

use std::collections::BTreeSet;
use std::path::Path;

use super::model::{Catalog, Ino, VolumeRec};
use crate::space::VolumeId;
use crate::storage::{Disk, StorageFile};

/// One fragment per sector: a torn sector tears one fragment at most.
pub const SLOT_BYTES: u64 = 512;
pub const RING_SLOTS: u64 = 512;
/// The ring's room past a volume's tracks (256 KiB).
pub const RING_BYTES: u64 = SLOT_BYTES * RING_SLOTS;
const FRAGMENT_MAGIC: &[u8; 4] = b"FYLT";
const FRAGMENT_VERSION: u16 = 1;
pub const FRAGMENT_HEADER_BYTES: usize = 32;
/// The log bytes one slot carries.
pub const FRAGMENT_PAYLOAD_BYTES: usize = SLOT_BYTES as usize - FRAGMENT_HEADER_BYTES;
/// The most slots one fsync's tail may take; a longer tail syncs the log instead (30 KiB).
pub const TAIL_SLOTS_MAX: u64 = 64;
/// The longest tail an fsync copies into a ring.
pub const TAIL_BYTES_MAX: usize = TAIL_SLOTS_MAX as usize * FRAGMENT_PAYLOAD_BYTES;

/// Does volume `v` keep a ring? Image files do (past their tracks); devices do not.
pub fn has_ring(v: &VolumeRec) -> bool {
    !crate::pool::is_device_volume(v)
}

/// Where slot `slot` of volume `v`'s ring lies in its image.
pub fn slot_offset(v: &VolumeRec, slot: u64) -> u64 {
    v.size_bytes + slot * SLOT_BYTES
}

/// Bytes `log_offset..log_offset + bytes.len()` of the log file of `generation`, as kept in
/// one slot of volume `volume`'s ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fragment {
    pub generation: u64,
    pub log_offset: u64,
    pub volume: VolumeId,
    pub bytes: Vec<u8>,
}

impl Fragment {
    pub fn end(&self) -> u64 {
        self.log_offset + self.bytes.len() as u64
    }

    /// The slot image: header, payload, zeros to the slot's end.
    pub fn encode(&self) -> [u8; SLOT_BYTES as usize] {
        assert!(self.bytes.len() <= FRAGMENT_PAYLOAD_BYTES, "a fragment fits its slot");
        let mut b = [0u8; SLOT_BYTES as usize];
        b[0..4].copy_from_slice(FRAGMENT_MAGIC);
        b[4..6].copy_from_slice(&FRAGMENT_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(self.bytes.len() as u16).to_le_bytes());
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16..24].copy_from_slice(&self.log_offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.volume.0.to_le_bytes());
        let end = FRAGMENT_HEADER_BYTES + self.bytes.len();
        b[FRAGMENT_HEADER_BYTES..end].copy_from_slice(&self.bytes);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..28]), &self.bytes);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// A whole, valid fragment, or None (zeros, a torn write, a size record, anything else).
    pub fn decode(b: &[u8]) -> Option<Fragment> {
        let b = b.get(..SLOT_BYTES as usize)?;
        if &b[0..4] != FRAGMENT_MAGIC || b[4..6] != FRAGMENT_VERSION.to_le_bytes() {
            return None;
        }
        let len = u16::from_le_bytes([b[6], b[7]]) as usize;
        if len > FRAGMENT_PAYLOAD_BYTES {
            return None;
        }
        let payload = &b[FRAGMENT_HEADER_BYTES..FRAGMENT_HEADER_BYTES + len];
        let crc = u32::from_le_bytes(b[28..32].try_into().ok()?);
        if crc != crc32c::crc32c_append(crc32c::crc32c(&b[..28]), payload) {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Some(Fragment {
            generation: u64_at(8),
            log_offset: u64_at(16),
            volume: VolumeId(u32::from_le_bytes(b[24..28].try_into().ok()?)),
            bytes: payload.to_vec(),
        })
    }
}

/// An fsync's tail, cut into the fragments of consecutive slots.
pub fn fragments_of(generation: u64, log_offset: u64, volume: VolumeId, tail: &[u8]) -> Vec<Fragment> {
    tail.chunks(FRAGMENT_PAYLOAD_BYTES)
        .enumerate()
        .map(|(i, chunk)| Fragment {
            generation,
            log_offset: log_offset + (i * FRAGMENT_PAYLOAD_BYTES) as u64,
            volume,
            bytes: chunk.to_vec(),
        })
        .collect()
}

/// How many slots a tail of `len` bytes takes.
pub fn slots_for(len: usize) -> u64 {
    len.div_ceil(FRAGMENT_PAYLOAD_BYTES) as u64
}

const SIZE_MAGIC: &[u8; 4] = b"FYSZ";
const SIZE_VERSION: u16 = 1;
const SIZE_RECORD_BYTES: usize = 56;

/// A data set's size and mtime at an fsync, and where the log ended then: what the ring
/// held before fragments (read, no longer written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeRecord {
    pub generation: u64,
    pub log_offset: u64,
    pub volume: VolumeId,
    pub ino: Ino,
    pub size_bytes: u64,
    pub mtime_ns: i64,
}

impl SizeRecord {
    pub fn encode(&self) -> [u8; SIZE_RECORD_BYTES] {
        let mut b = [0u8; SIZE_RECORD_BYTES];
        b[0..4].copy_from_slice(SIZE_MAGIC);
        b[4..6].copy_from_slice(&SIZE_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16..24].copy_from_slice(&self.log_offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.volume.0.to_le_bytes());
        b[28..36].copy_from_slice(&self.ino.to_le_bytes());
        b[36..44].copy_from_slice(&self.size_bytes.to_le_bytes());
        b[44..52].copy_from_slice(&self.mtime_ns.to_le_bytes());
        let crc = crc32c::crc32c(&b[..52]);
        b[52..56].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// A whole, valid record, or None (zeros, a torn write, anything else).
    pub fn decode(b: &[u8]) -> Option<SizeRecord> {
        let b = b.get(..SIZE_RECORD_BYTES)?;
        if &b[0..4] != SIZE_MAGIC || b[4..6] != SIZE_VERSION.to_le_bytes() {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if u32::from_le_bytes(b[52..56].try_into().ok()?) != crc32c::crc32c(&b[..52]) {
            return None;
        }
        Some(SizeRecord {
            generation: u64_at(8),
            log_offset: u64_at(16),
            volume: VolumeId(u32::from_le_bytes(b[24..28].try_into().ok()?)),
            ino: u64_at(28),
            size_bytes: u64_at(36),
            mtime_ns: u64_at(44) as i64,
        })
    }
}

/// What an open found in the rings of a pool's image volumes: every valid fragment and size
/// record of one log generation.
#[derive(Debug, Default)]
pub struct RingScan {
    /// The volumes whose ring was read (or that have none).
    read: BTreeSet<VolumeId>,
    pub fragments: Vec<Fragment>,
    pub sizes: Vec<SizeRecord>,
}

impl RingScan {
    /// Read the ring of every volume of `catalog` not read yet. An image no longer than its
    /// tracks has no ring (a clean stop cut it off); a missing image fails the mount later,
    /// with its name, and its ring went with it.
    pub fn read_new(
        &mut self,
        disk: &dyn Disk,
        catalog: &Catalog,
        generation: u64,
    ) -> Result<(), (String, std::io::Error)> {
        for v in catalog.volumes.values() {
            if !self.read.insert(v.id) {
                continue;
            }
            if !has_ring(v) {
                continue;
            }
            let Ok(io) = disk.open(Path::new(&v.path)) else { continue };
            if io.size_bytes() <= v.size_bytes {
                continue;
            }
            self.read_one(&*io, v, generation).map_err(|e| (v.path.clone(), e))?;
        }
        Ok(())
    }

    /// Is there a volume in `catalog` whose ring was not read?
    pub fn unread(&self, catalog: &Catalog) -> bool {
        catalog.volumes.keys().any(|id| !self.read.contains(id))
    }

    fn read_one(&mut self, io: &dyn StorageFile, v: &VolumeRec, generation: u64) -> std::io::Result<()> {
        let mut ring = vec![0u8; RING_BYTES as usize];
        io.read_at(&mut ring, slot_offset(v, 0))?;
        for slot in ring.chunks(SLOT_BYTES as usize) {
            if let Some(f) = Fragment::decode(slot) {
                if f.volume == v.id && f.generation == generation {
                    self.fragments.push(f);
                }
            } else if let Some(r) = SizeRecord::decode(slot) {
                if r.volume == v.id && r.generation == generation {
                    self.sizes.push(r);
                }
            }
        }
        Ok(())
    }

    /// Does anything read reach past `log_end` of the log: news the log lacks, or (after a
    /// writable open cut a torn tail) a copy of bytes the log will now hold differently?
    pub fn reaches_past(&self, log_end: u64) -> bool {
        self.fragments.iter().any(|f| f.end() > log_end) || self.sizes.iter().any(|r| r.log_offset > log_end)
    }

    /// The size records that say more than a log replayed up to `log_end`: the newest per
    /// data set, oldest first.
    pub fn sizes_past(&self, log_end: u64) -> Vec<SizeRecord> {
        let mut newest: std::collections::BTreeMap<Ino, SizeRecord> = Default::default();
        for r in self.sizes.iter().filter(|r| r.log_offset > log_end) {
            let e = newest.entry(r.ino).or_insert(*r);
            if r.log_offset > e.log_offset {
                *e = *r;
            }
        }
        let mut out: Vec<SizeRecord> = newest.into_values().collect();
        out.sort_by_key(|r| r.log_offset);
        out
    }
}

/// Lay the fragments that continue the log's bytes from `valid_end` (the end of its last
/// good frame) over `log`, for as far as they reach without a gap. Returns where the laid
/// bytes end (`valid_end` if none continues it); the caller walks the frames again.
pub fn overlay(log: &mut Vec<u8>, valid_end: u64, fragments: &[Fragment]) -> u64 {
    let mut sorted: Vec<&Fragment> = fragments.iter().filter(|f| f.end() > valid_end).collect();
    sorted.sort_by_key(|f| f.log_offset);
    let mut reach = valid_end;
    for f in sorted {
        if f.log_offset > reach {
            break;
        }
        if f.end() <= reach {
            continue;
        }
        let (from, to) = (reach as usize, f.end() as usize);
        if log.len() < to {
            log.resize(to, 0);
        }
        let skip = from - f.log_offset as usize;
        log[from..to].copy_from_slice(&f.bytes[skip..]);
        reach = f.end();
    }
    reach
}

/// A mount's view of one volume's ring: the next slot, and the appended mark each slot's
/// fragment ended at (0: none since the mount).
#[derive(Debug)]
pub struct Ring {
    next: u64,
    marks: Vec<u64>,
}

impl Default for Ring {
    fn default() -> Ring {
        Ring { next: 0, marks: vec![0; RING_SLOTS as usize] }
    }
}

impl Ring {
    /// Take the next `n` slots (in ring order, wrapping) for fragments that end at appended
    /// mark `mark`, if every fragment in them is durable in the log (its mark is at or below
    /// `durable`); None: sync the log first. (Fragments an earlier mount left are older than
    /// this mount's log, or were laid over it and compacted.)
    pub fn take(&mut self, n: u64, mark: u64, durable: u64) -> Option<Vec<u64>> {
        if n == 0 || n > RING_SLOTS {
            return None;
        }
        let slots: Vec<u64> = (0..n).map(|i| (self.next + i) % RING_SLOTS).collect();
        if slots.iter().any(|&s| self.marks[s as usize] > durable) {
            return None;
        }
        for &s in &slots {
            self.marks[s as usize] = mark;
        }
        self.next = (self.next + n) % RING_SLOTS;
        Some(slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frag(log_offset: u64, bytes: &[u8]) -> Fragment {
        Fragment { generation: 3, log_offset, volume: VolumeId(1), bytes: bytes.to_vec() }
    }

    fn volume() -> VolumeRec {
        VolumeRec {
            id: VolumeId(1),
            name: "V".into(),
            path: "/v".into(),
            size_bytes: 1 << 20,
            free: crate::space::FreeMap::new(VolumeId(1), 16),
        }
    }

    #[test]
    fn a_fragment_round_trips_and_a_damaged_one_is_refused() {
        let f = frag(4096, b"the log's bytes");
        let b = f.encode();
        assert_eq!(Fragment::decode(&b), Some(f.clone()));
        for i in 0..FRAGMENT_HEADER_BYTES + f.bytes.len() {
            let mut d = b;
            d[i] ^= 0x10;
            assert_eq!(Fragment::decode(&d), None, "byte {i} flipped");
        }
        // A tear at a 512-byte boundary inside a slot cannot happen (a slot is a sector),
        // but a slot half zeroed fails like any other damage.
        let mut torn = b;
        torn[20..].fill(0);
        assert_eq!(Fragment::decode(&torn), None);
        assert_eq!(Fragment::decode(&[0u8; 512]), None);
        let full = frag(0, &[7u8; FRAGMENT_PAYLOAD_BYTES]);
        assert_eq!(Fragment::decode(&full.encode()), Some(full));
    }

    #[test]
    fn a_tail_splits_into_fragments_that_overlay_back_to_it() {
        let tail: Vec<u8> = (0..2000u32).map(|i| (i * 7 % 251) as u8).collect();
        let frags = fragments_of(3, 100, VolumeId(1), &tail);
        assert_eq!(frags.len() as u64, slots_for(tail.len()));
        assert_eq!(frags.len(), 5);
        let mut log = vec![9u8; 130];
        let reach = overlay(&mut log, 100, &frags);
        assert_eq!(reach, 2100);
        assert_eq!(&log[..100], &[9u8; 100][..], "bytes before the valid end are left alone");
        assert_eq!(&log[100..], &tail[..]);
    }

    #[test]
    fn overlay_stops_at_a_gap_and_skips_what_the_log_has() {
        let tail: Vec<u8> = (0..1500u32).map(|i| i as u8).collect();
        let mut frags = fragments_of(3, 100, VolumeId(1), &tail);
        let lost = frags.remove(1);
        let mut log = vec![0u8; 100];
        assert_eq!(overlay(&mut log, 100, &frags), 100 + FRAGMENT_PAYLOAD_BYTES as u64, "stops at the lost slot");
        // A fragment wholly before the valid end changes nothing; one straddling it fills
        // only what lies past it.
        let mut log = vec![1u8; 700];
        frags.insert(1, lost);
        assert_eq!(overlay(&mut log, 700, &frags), 1600);
        assert_eq!(&log[..700], &[1u8; 700][..]);
        assert_eq!(&log[700..], &tail[600..]);
        assert_eq!(overlay(&mut log, 1600, &frags), 1600);
    }

    #[test]
    fn a_scan_keeps_this_generation_and_this_volume_and_old_size_records() {
        let v = volume();
        let io = crate::storage::mem::MemVolume::new((1 << 20) + RING_BYTES);
        let put = |slot: u64, b: &[u8]| io.write_at(b, slot_offset(&v, slot)).unwrap();
        put(0, &frag(100, b"abc").encode());
        put(1, &Fragment { generation: 2, ..frag(103, b"old") }.encode());
        put(2, &Fragment { volume: VolumeId(2), ..frag(103, b"other") }.encode());
        let rec =
            SizeRecord { generation: 3, log_offset: 300, volume: VolumeId(1), ino: 7, size_bytes: 9, mtime_ns: 1 };
        put(3, &rec.encode());
        put(4, &SizeRecord { log_offset: 200, size_bytes: 5, ..rec }.encode());
        put(RING_SLOTS - 1, &frag(103, b"def").encode());
        let mut scan = RingScan::default();
        scan.read_one(&io, &v, 3).unwrap();
        assert_eq!(scan.fragments, vec![frag(100, b"abc"), frag(103, b"def")]);
        assert_eq!(scan.sizes.len(), 2);
        assert_eq!(scan.sizes_past(150), vec![rec], "the newest record of a data set wins");
        assert!(scan.sizes_past(300).is_empty());
        assert!(scan.reaches_past(105) && !scan.reaches_past(300));
    }

    #[test]
    fn a_slot_is_reused_only_once_its_fragment_is_durable() {
        let mut ring = Ring::default();
        for i in 0..RING_SLOTS / 2 {
            assert_eq!(ring.take(2, 10 + i, 0), Some(vec![2 * i, 2 * i + 1]));
        }
        assert_eq!(ring.take(1, 1000, 9), None, "slot 0's fragment (mark 10) is not durable");
        assert_eq!(ring.take(3, 1000, 10), None, "slot 2 holds mark 11");
        assert_eq!(ring.take(2, 1000, 10), Some(vec![0, 1]));
        assert_eq!(ring.take(RING_SLOTS + 1, 1001, u64::MAX), None);
        let mut ring = Ring { next: RING_SLOTS - 1, ..Ring::default() };
        assert_eq!(ring.take(3, 5, 0), Some(vec![RING_SLOTS - 1, 0, 1]), "a tail wraps around the ring");
    }
}
