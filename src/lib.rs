//! ferryfs: a FUSE-backed virtual volume layer. Files ("data sets") live in extents on
//! volume image files; applications use them through a FUSE mount, unmodified.
//!
//! Data flows one way: `fs` -> (`catalog`, `extent_map`, `monitor`) -> `volume`.

pub mod catalog;
pub mod cli;
pub mod client;
pub mod extent_map;
pub mod failpoint;
pub mod fs;
pub mod geometry;
pub mod migrate;
pub mod monitor;
pub mod mount;
pub mod pool;
pub mod report;
pub mod space;
pub mod storage;

