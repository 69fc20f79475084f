//! Prefetching: getting packages into the cache before anyone reads them.
//!
//! Three ways in, all ending in the same shared, verified transfers of `fetch`:
//! * `mergelist` (in the daemon): watches emerge's `mtimedb` (through `watcher`, inotify) and
//!   fetches the binary packages of a merge that has just started, in merge order;
//! * `updates` (in the daemon, `-o prefetch=updates`): after a refresh brings newer builds of
//!   installed packages, fetches them in the background, yielding to a merge;
//! * `command` (`binpkgfs prefetch`): a separate process that names packages (or asks for
//!   world updates) and reads them through the mount.
//!
//! `world` is the world-updates rule both `updates` and `command` use (versions compared
//! with `version`).

mod command;
mod mergelist;
mod updates;
mod version;
mod watcher;
mod world;

pub use command::run;
pub use mergelist::watch;
pub use updates::Updates;
