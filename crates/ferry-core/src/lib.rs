//! ferry's rules, as plain state machines with no I/O: how changes coalesce
//! into batches, when a batch is sealed, what a manifest diff sends, and
//! which primary a replica accepts.
//!
//! Layer: above `ferry-proto`, below every driver. Nothing here reads a
//! clock, touches a file or opens a socket: callers pass `now` and the
//! results of their own I/O in, and get decisions back. Start at
//! [`coalesce::Coalescer`], then [`timer::BatchTimer`] and [`diff`].
#![forbid(unsafe_code)]

pub mod chunk;
pub mod coalesce;
pub mod diff;
pub mod fence;
pub mod timer;

pub use coalesce::{Change, Coalescer, Pending};
pub use ferry_proto::{Entry, EntryKind, Mtime, RelPath};
pub use timer::BatchTimer;
