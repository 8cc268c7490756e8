//! The primary's view of its root: the notify driver that turns kernel
//! events into [`ferry_core::Change`]s, the exclude rules, and the scanner
//! that reads entries' state when a batch is sealed or a peer resyncs.
//!
//! Layer: I/O (filesystem reads only; this crate never writes the root).
//! Start at [`Watcher`] and [`Translator`], then [`scan`].
#![forbid(unsafe_code)]

pub mod exclude;
pub mod scan;
pub mod watcher;

pub use exclude::{ExcludeError, Excludes, TEMP_PREFIX};
pub use scan::{lstat_entry, scan_tree, Scanned, Skip, SkipReason};
pub use watcher::{RawEvent, Translator, WatchError, Watcher};
