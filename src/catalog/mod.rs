//! The catalog: what maps every path to its data set and every data set to its extents,
//! plus each volume's free space. `model` is the state and its one mutation function,
//! `store` makes it durable, `check` verifies every invariant (fsck).

pub mod acl;
pub mod check;
mod legacy;
pub mod model;
pub mod ring;
pub mod store;

pub use model::{Body, Catalog, Ino, Inode, Meta, NewKind, Op, VolumeRec, ROOT_INO};
pub use store::{Store, StoreError};
