//! Prefetching: getting packages into the cache before anyone reads them.
//!
//! Two ways in, both ending in the same shared, verified transfers of `fetch`:
//! * `mergelist` (in the daemon): watches emerge's `mtimedb` (through `watcher`, inotify) and
//!   fetches the binary packages of a merge that has just started, in merge order;
//! * `command` (`binpkgfs prefetch`): a separate process that names packages (or asks for
//!   world updates, by the rule in `world`) and reads them through the mount.

mod command;
mod mergelist;
mod version;
mod watcher;
mod world;

pub use command::run;
pub use mergelist::watch;
