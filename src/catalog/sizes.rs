//! Size records: the size of a data set kept with its bytes, so that an fdatasync that grew
//! it costs one flush (the volume image's) instead of two (the image's, then the log's).
//!
//! ```text
//! image file   tracks (VolumeRec::size_bytes) | size ring: RING_SLOTS slots of SLOT_BYTES
//! record       magic "FYSZ" | version u16 | 0u16 | generation u64 | log_offset u64
//!              | volume u32 | ino u64 | size_bytes u64 | mtime_ns i64 | crc32c   (56 bytes)
//! ```
//!
//! A write that grows a data set commits its `SetSize` frame to the log, as before: the
//! frame is in the page cache, so a kill -9 loses nothing. At an fsync, if every frame of
//! the log not yet durable is such a size raise (of any data set), the mount writes a record
//! (the data set's size and mtime, and where the log ends now) into the ring of one of the
//! data set's volumes and flushes only the volumes. Anything else pending in the log (a
//! create, an allocation, a truncate, a job's step) makes the fsync sync the log as before.
//!
//! After a power cut the log keeps a prefix of its frames, at least up to its last sync. A
//! record of the log's generation whose `log_offset` lies past the end of what replayed
//! says more than the log: every frame it left behind was a size raise, so the catalog is
//! the one of the record's moment with some raises missing, and the record's size (higher
//! than the replayed one) is restored. A record at or before the replayed end is older
//! than the catalog and means nothing. A writable open of the store restores the sizes
//! first thing and then compacts (a new generation), so that no record is ever read
//! against a log that grew again after it.
//!
//! A slot is written again only when the record in it is covered by a durable log: the
//! mount keeps, for each slot, the appended mark its record was written at, and an fsync
//! that would overwrite a record the log does not hold durably syncs the log instead. A
//! record is written whole into its own 512-byte sector, so a torn write tears no other
//! record; a torn or half-written record fails its checksum and is ignored (it was never
//! acknowledged: its fsync had not returned).
//!
//! Device volumes have no ring (the device's end holds its label; docs/format.md): their
//! data sets' fsyncs always sync the log.

use std::collections::BTreeMap;

use super::model::{Ino, VolumeRec};
use crate::space::VolumeId;
use crate::storage::StorageFile;

const MAGIC: &[u8; 4] = b"FYSZ";
const VERSION: u16 = 1;
/// One record per sector: a torn sector tears one record at most.
pub const SLOT_BYTES: u64 = 512;
pub const RING_SLOTS: u64 = 512;
/// The ring's room past a volume's tracks (256 KiB).
pub const RING_BYTES: u64 = SLOT_BYTES * RING_SLOTS;
const RECORD_BYTES: usize = 4 + 2 + 2 + 8 + 8 + 4 + 8 + 8 + 8 + 4;

/// A data set's size and mtime at an fsync, and where the log ended then.
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
    pub fn encode(&self) -> [u8; RECORD_BYTES] {
        let mut b = [0u8; RECORD_BYTES];
        b[0..4].copy_from_slice(MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
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
        let b = b.get(..RECORD_BYTES)?;
        if &b[0..4] != MAGIC || b[4..6] != VERSION.to_le_bytes() {
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

/// Does volume `v` keep a size ring? Image files do (past their tracks); devices do not.
pub fn has_ring(v: &VolumeRec) -> bool {
    !crate::pool::is_device_volume(v)
}

/// Where slot `slot` of volume `v`'s ring lies in its image.
pub fn slot_offset(v: &VolumeRec, slot: u64) -> u64 {
    v.size_bytes + slot * SLOT_BYTES
}

/// The valid records in the ring of volume `v` (opened as `io`) that say more than a log of
/// `generation` replayed up to `log_end`: the newest per data set.
pub fn newer_records(
    io: &dyn StorageFile,
    v: &VolumeRec,
    generation: u64,
    log_end: u64,
) -> std::io::Result<BTreeMap<Ino, SizeRecord>> {
    let mut ring = vec![0u8; RING_BYTES as usize];
    io.read_at(&mut ring, slot_offset(v, 0))?;
    let mut out: BTreeMap<Ino, SizeRecord> = BTreeMap::new();
    for slot in ring.chunks(SLOT_BYTES as usize) {
        let Some(r) = SizeRecord::decode(slot) else { continue };
        if r.volume != v.id || r.generation != generation || r.log_offset <= log_end {
            continue;
        }
        let e = out.entry(r.ino).or_insert(r);
        if r.log_offset > e.log_offset {
            *e = r;
        }
    }
    Ok(out)
}

/// A mount's view of one volume's ring: the next slot, and the appended mark each slot's
/// record was written at (0: none since the mount).
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
    /// Take the next slot for a record written at appended mark `mark`, if the record in it
    /// is durable in the log (its mark is at or below `durable`); None: sync the log first.
    /// (Records left by an earlier mount are older than that mount's compaction.)
    pub fn take(&mut self, mark: u64, durable: u64) -> Option<u64> {
        let slot = self.next;
        if self.marks[slot as usize] > durable {
            return None;
        }
        self.marks[slot as usize] = mark;
        self.next = (slot + 1) % RING_SLOTS;
        Some(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(log_offset: u64, size_bytes: u64) -> SizeRecord {
        SizeRecord { generation: 3, log_offset, volume: VolumeId(1), ino: 7, size_bytes, mtime_ns: -5 }
    }

    #[test]
    fn a_record_round_trips_and_a_damaged_one_is_refused() {
        let r = rec(100, 4096);
        let b = r.encode();
        assert_eq!(SizeRecord::decode(&b), Some(r));
        for i in 0..RECORD_BYTES {
            let mut d = b;
            d[i] ^= 0x10;
            assert_eq!(SizeRecord::decode(&d), None, "byte {i} flipped");
        }
        assert_eq!(SizeRecord::decode(&[0u8; 512]), None);
        assert_eq!(SizeRecord::decode(&b[..40]), None);
    }

    #[test]
    fn only_records_past_the_replayed_log_count_and_the_newest_wins() {
        let io = crate::storage::mem::MemVolume::new((1 << 20) + RING_BYTES);
        let v = VolumeRec {
            id: VolumeId(1),
            name: "V".into(),
            path: "/v".into(),
            size_bytes: 1 << 20,
            free: crate::space::FreeMap::new(VolumeId(1), 16),
        };
        let put = |slot: u64, r: SizeRecord| io.write_at(&r.encode(), slot_offset(&v, slot)).unwrap();
        put(0, rec(100, 4096));
        put(1, rec(300, 12288));
        put(2, rec(250, 8192));
        put(3, SizeRecord { generation: 2, ..rec(900, 1 << 30) });
        put(4, SizeRecord { volume: VolumeId(2), ..rec(900, 1 << 30) });
        put(RING_SLOTS - 1, SizeRecord { ino: 8, ..rec(201, 1) });
        let got = newer_records(&io, &v, 3, 200).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[&7].size_bytes, 12288, "the newest record of a data set wins");
        assert_eq!(got[&8].size_bytes, 1);
        assert!(newer_records(&io, &v, 3, 300).unwrap().is_empty(), "all at or before the log's end");
    }

    #[test]
    fn a_slot_is_reused_only_once_its_record_is_durable() {
        let mut ring = Ring::default();
        for i in 0..RING_SLOTS {
            assert_eq!(ring.take(10 + i, 0), Some(i));
        }
        assert_eq!(ring.take(1000, 9), None, "slot 0's record (mark 10) is not durable");
        assert_eq!(ring.take(1000, 10), Some(0));
        assert_eq!(ring.take(1001, 10), None, "slot 1 holds mark 11");
    }
}
