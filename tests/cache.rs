//! Page-cache coherence. Read-write handles keep the kernel's page cache (FOPEN_KEEP_CACHE);
//! write-only handles write around it (FOPEN_DIRECT_IO). A reader that cached a data set
//! must still see every byte written through a write-only handle, through read() and mmap.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;

use common::*;

#[test]
fn write_only_handles_invalidate_what_readers_cached() {
    let tp = TestPool::new("64K", &[("V1", "16M")]);
    let m = tp.mount();
    let p = m.p("f");
    fs::write(&p, vec![b'A'; 300_000]).unwrap();
    let reader = OpenOptions::new().read(true).open(&p).unwrap();
    let mut cached = vec![0u8; 300_000];
    reader.read_exact_at(&mut cached, 0).unwrap(); // now in the page cache
                                                   // SAFETY: a read-only shared mapping of a file this test owns; nothing truncates it
                                                   // while mapped.
    let map = unsafe {
        let len = 300_000;
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&reader),
            0,
        );
        assert_ne!(ptr, libc::MAP_FAILED);
        std::slice::from_raw_parts(ptr as *const u8, len)
    };
    assert_eq!(map[1000], b'A');

    let writer = OpenOptions::new().write(true).open(&p).unwrap();
    writer.write_all_at(&vec![b'B'; 5000], 4096).unwrap();
    writer.write_all_at(b"tail", 299_998).unwrap(); // extends the data set by 2 bytes

    let mut want = vec![b'A'; 300_002];
    want[4096..9096].fill(b'B');
    want[299_998..].copy_from_slice(b"tail");
    let mut got = vec![0u8; 300_002];
    reader.read_exact_at(&mut got, 0).unwrap();
    assert_bytes_eq(&got, &want, "read() after a write-only handle wrote");
    assert_eq!(&map[4090..4100], &want[4090..4100], "mmap after a write-only handle wrote");
    assert_eq!(fs::metadata(&p).unwrap().len(), 300_002);
    // SAFETY: unmapping the mapping made above; `map` is not used after this.
    unsafe { libc::munmap(map.as_ptr() as *mut libc::c_void, 300_000) };
    drop((reader, writer));
    m.unmount();
    fsck_clean(&tp.pool);
}
