//! ferryfs: a FUSE-backed virtual volume layer. Files ("data sets") live in extents on
//! volume image files; applications use them through a FUSE mount, unmodified, and ferryfs
//! moves them between volumes while they keep writing.
//!
//! The layers, top down; each module uses only those below it:
//!
//! ```text
//! cli, client, mount        the commands, the daemon, the CLI's side of .ferry/control
//! fs                        the FUSE adapter and the .ferry control files
//! migrate                   jobs (copier, re-sync, cutover), merge/drain plans, control verbs
//! engine                    data sets, extent I/O, commit, sync, recovery
//! monitor                   the dirty-track bitmap and a job's hooks in the write path
//! catalog, extent_map,      the durable model and its log; logical -> volume mapping;
//!   space, geometry           free space and allocation; track arithmetic
//! storage                   the seam under everything that persists (files, simulated disk)
//! ```
//!
//! `pool` (the pool directory, its lock, volume creation), `mounts` (the kernel's mount
//! table), `report` (the views of a catalog) and `metrics` (`.ferry/metrics` and the
//! latency histograms it reads) serve the upper layers; `failpoint` is a test hook of
//! `migrate`.

// Upper layers.
pub mod cli;
pub mod client;
pub mod fs;
pub mod helper;
pub mod logging;
pub mod metrics;
pub mod mount;
pub mod mounts;
pub mod pool;
pub mod report;

// The engines.
pub mod engine;
pub mod failpoint;
pub mod migrate;
pub mod monitor;

// The model and the seam.
pub mod catalog;
pub mod device;
pub mod extent_map;
pub mod geometry;
pub mod layout;
pub mod space;
pub mod storage;
