//! binpkgfs: a Gentoo binhost as a lazy, verified, read-only PKGDIR over FUSE.
//!
//! The pipeline, in order; a module uses only the ones above it:
//!
//! * `verify` — digests and the streaming check of a file against them;
//! * `index` — parse `Packages` into an immutable index (PATH checks, cache keys);
//! * `namespace` — the tree of one index: inodes and attributes;
//! * `snapshot` — the current tree, shared; the swap at a refresh;
//! * `credentials` — binhost URLs split into what may be shown and the secret;
//! * `remote` — transports (HTTP(S), `file://`) behind one trait, and per-server state;
//! * `cache` — the on-disk store of verified packages and the saved index;
//! * `fetch` — shared, verified, resumable transfers from a remote into the cache;
//! * `lifecycle` — first index load, refresh, swap, offline fallback;
//! * `vfs` — what an open, read or readdir means, as plain decisions;
//! * `fs` — the FUSE adapter: translation only;
//! * `union` — several binhosts in one PKGDIR: each one's index life, and their merge;
//! * `prefetch` — fetching ahead of emerge (its merge list, or the `prefetch` command);
//! * `binrepos` — Portage's `binrepos.conf`: which binhosts, in which order;
//! * `config`, `daemon`, `logging`, `status`, `demo` — the process around it.

pub mod binrepos;
pub mod cache;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod demo;
pub mod error;
pub mod fetch;
pub mod fs;
pub mod index;
pub mod lifecycle;
pub mod logging;
pub mod namespace;
pub mod prefetch;
pub mod remote;
pub mod snapshot;
pub mod status;
pub mod union;
pub mod verify;
pub mod vfs;
