//! Shared, verified transfers: how a package's bytes get from the remote into the cache.
//!
//! `Fetcher::open` hands out a `Blob` for a package: a complete cache entry if there is one,
//! otherwise a transfer that every opener of the same file shares (an install opens each package
//! about 19 times; it must cross the network once). The transfer keeps running when all readers
//! close, so those reopens find it.
//!
//! Invariants:
//! * a read is answered as soon as the bytes it asks for are on disk, except a read that would
//!   deliver the file's final byte: that one waits until the whole file has been checked against
//!   SIZE and every digest in the index. A file that disagrees fails with `EIO`, so no reader can
//!   complete a wrong file, and Portage's own digest check never sees one;
//! * a server that sends more than SIZE, less than SIZE, or a different length in its headers is
//!   cut off at once;
//! * only checked files are committed to the cache; a failed transfer's partial is deleted and
//!   the next open starts afresh.
//!
//! The stages, one file each: `blob` (one package as its readers see it: when a read may be
//! answered), this module (the registry of open blobs and lingering sparse ones), `transfer`
//! (one whole transfer and its retries), `checks` (what an answer may be, as pure functions),
//! `split` and `segment` (parallel ranged parts), `writer` (writing, hashing, publishing), and
//! `sparse` (ranged reads of a package nobody reads whole).

mod blob;
#[cfg(test)]
mod blocking_tests;
mod checks;
mod segment;
mod sparse;
mod split;
mod transfer;
mod writer;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use tokio::sync::watch;
use tracing::debug;

use crate::cache::Store;
use crate::error::FsError;
use crate::index::{CacheKey, Package};
use crate::remote::{Endpoint, ErrorKind, RETRY};
use crate::verify::VerifyMode;

use blob::State;
pub use blob::{Blob, PageEvent, PageEvents};
use sparse::Sparse;
pub(crate) use writer::write_making_room;

/// Counters for `status`.
#[derive(Debug, Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub in_flight: AtomicU64,
    pub failures: AtomicU64,
}

/// Files up to this size are fetched whole on first open: ranged reads would save little.
const WHOLE_BELOW: u64 = 2 << 20;
/// A sparse file is promoted to a whole transfer once readers hold its first this-many bytes
/// without a gap. That is the pattern of Portage's digest pass and of every whole-file reader;
/// a metadata scan reads the first header, the metadata member (a few KiB) and the tail, so it
/// stays ranged.
const PROMOTE_AFTER: u64 = 1 << 20;

pub struct Fetcher {
    /// One per binhost; a package is fetched from `endpoints[pkg.origin.binhost]`.
    endpoints: Vec<Arc<Endpoint>>,
    store: Arc<Store>,
    /// Blobs with open handles or a running transfer (which holds a strong reference).
    active: Mutex<HashMap<CacheKey, Weak<Blob>>>,
    /// The last sparse blobs opened, kept alive after their last close: Portage opens a
    /// package several times during one scan, and an install reopens it right after, so the
    /// ranged blocks must outlive a single open. Bounded by `LINGER` (each holds at most about
    /// `PROMOTE_AFTER` bytes of side file before it is promoted).
    recent: Mutex<VecDeque<Arc<Blob>>>,
    /// Connections one large whole transfer may use (see `segment`).
    streams: usize,
    /// Which digests a download is checked against.
    verify: VerifyMode,
    /// A head slower than this (bytes per second spent waiting) is split; `split::SPLIT_BELOW`
    /// unless a test sets another (`with_split_below`).
    split_below: f64,
    pub stats: Stats,
}

/// How many sparse blobs outlive their last close (see `Fetcher::recent`).
const LINGER: usize = 32;

impl Fetcher {
    pub fn new(endpoint: Arc<Endpoint>, store: Arc<Store>) -> Fetcher {
        Self::with_binhosts(vec![endpoint], store)
    }

    /// A fetcher for a mount that merges several binhosts (`index::merge`): each package
    /// comes from its own binhost's endpoint, by its PATH there.
    pub fn with_binhosts(endpoints: Vec<Arc<Endpoint>>, store: Arc<Store>) -> Fetcher {
        assert!(!endpoints.is_empty(), "a fetcher needs a binhost");
        Fetcher {
            endpoints,
            store,
            active: Mutex::new(HashMap::new()),
            recent: Mutex::default(),
            streams: 1,
            verify: VerifyMode::default(),
            split_below: split::SPLIT_BELOW,
            stats: Stats::default(),
        }
    }

    /// Lets a large whole transfer use up to `n` connections as parallel ranges.
    /// Sets the rate under which a lone head is split (bytes per second spent waiting for the
    /// network): the seam a test uses to make the decision independent of machine speed.
    pub fn with_split_below(mut self, bytes_per_sec: f64) -> Self {
        self.split_below = bytes_per_sec;
        self
    }

    pub fn with_streams(mut self, n: usize) -> Self {
        self.streams = n.max(1);
        self
    }

    /// Checks downloads against `mode`'s digests.
    pub fn with_verify(mut self, mode: VerifyMode) -> Self {
        self.verify = mode;
        self
    }

    pub fn verify_mode(&self) -> VerifyMode {
        self.verify
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The endpoint that serves `pkg`.
    pub(crate) fn endpoint(&self, pkg: &Package) -> &Endpoint {
        self.endpoints
            .get(pkg.origin.binhost as usize)
            .unwrap_or(&self.endpoints[0])
    }

    /// One ranged read for a sparse file, with the same breaker and retries as transfers.
    /// `Ok(None)`: the server does not do ranges.
    pub(crate) async fn read_range(
        &self,
        pkg: &Package,
        from: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, String> {
        let path = pkg.remote_path();
        let endpoint = self.endpoint(pkg);
        let mut admission = Some(endpoint.admit().await?);
        let mut attempt = 0;
        loop {
            let result = endpoint.transport().read_range(path, from, len).await;
            // The server answered (or did not): a probe's waiters may go on.
            let probe = admission.take();
            match result {
                Ok(data) => {
                    endpoint.answered();
                    if data.is_some() {
                        self.stats.bytes_fetched.fetch_add(len, Ordering::Relaxed);
                    }
                    return Ok(data);
                }
                Err(e) if e.is_offline() => {
                    let started = probe.unwrap_or_else(|| endpoint.admitted());
                    return Err(endpoint.went_offline(&started, &e));
                }
                Err(e) => {
                    endpoint.answered();
                    if e.kind == ErrorKind::NotFound {
                        endpoint.not_found(path);
                    }
                    match transfer::Failure::from_transport(e) {
                        transfer::Failure::Retry(reason) => {
                            attempt += 1;
                            let Some(backoff) = RETRY.backoff(attempt) else {
                                return Err(reason);
                            };
                            tokio::time::sleep(backoff).await;
                            debug!(
                                path,
                                "ranged read retry {attempt}/{}: {reason}", RETRY.retries
                            );
                        }
                        transfer::Failure::Fatal(reason) => return Err(reason),
                        transfer::Failure::WriterGone => return Err("writer stopped".into()),
                    }
                }
            }
        }
    }

    /// Fetches `pkg` whole into the cache (or finds it there), sharing a transfer a reader may
    /// already have started. For prefetching: `Ok` once the file is verified and readable.
    pub async fn fetch_whole(self: &Arc<Self>, pkg: &Package) -> Result<(), FsError> {
        // `open` touches the cache disk: not on a runtime worker.
        let (me, p) = (self.clone(), pkg.clone());
        let blob = tokio::task::spawn_blocking(move || me.open(&p))
            .await
            .map_err(|e| FsError::Fetch {
                path: pkg.path.to_string(),
                reason: format!("open: {e}"),
            })??;
        blob.wait_complete().await
    }

    /// The bytes of `pkg`: from the cache, from a blob other handles already share, or a new
    /// one: sparse for a large file, else with its whole transfer started on the current tokio
    /// runtime.
    ///
    /// The registry lock is never held across disk I/O (a slow cache disk must not stall every
    /// other open): the cache is looked up and a sparse side file created without it, and the
    /// registry is checked again before a new blob is entered. An opener that lost that race
    /// uses the winner's blob (its unused side file is removed as it is dropped).
    pub fn open(self: &Arc<Self>, pkg: &Package) -> Result<Arc<Blob>, FsError> {
        let key = pkg.cache_key();
        if let Some(blob) = self.shared(&key) {
            return Ok(blob);
        }
        if let Some(file) = self.store.open_object(&key, pkg.size)? {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            let (_, state) = watch::channel(State::Complete);
            let blob = self.blob(key, pkg, None, state, None);
            let _ = blob.file.set(Arc::new(file));
            return Ok(blob);
        }
        let sparse = if pkg.size > WHOLE_BELOW {
            let (path, file) = self.store.new_partial(&key)?;
            Some(Sparse::new(file, path))
        } else {
            None
        };
        let mut active = self.active.lock().unwrap();
        if let Some(blob) = active.get(&key).and_then(Weak::upgrade)
            && !blob.failed()
        {
            return Ok(blob);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let (tx, state) = watch::channel(State::Sparse);
        let is_sparse = sparse.is_some();
        let blob = self.blob(key.clone(), pkg, Some(tx), state, sparse);
        active.retain(|_, b| b.strong_count() > 0);
        active.insert(key, Arc::downgrade(&blob));
        drop(active);
        if is_sparse {
            let mut recent = self.recent.lock().unwrap();
            recent.push_back(blob.clone());
            if recent.len() > LINGER {
                recent.pop_front();
            }
        } else {
            blob.promote()?;
        }
        Ok(blob)
    }

    /// The blob other handles of `key` already share, if it has not failed.
    fn shared(&self, key: &CacheKey) -> Option<Arc<Blob>> {
        let active = self.active.lock().unwrap();
        active
            .get(key)
            .and_then(Weak::upgrade)
            .filter(|b| !b.failed())
    }

    fn blob(
        self: &Arc<Self>,
        key: CacheKey,
        pkg: &Package,
        tx: Option<watch::Sender<State>>,
        state: watch::Receiver<State>,
        sparse: Option<Sparse>,
    ) -> Arc<Blob> {
        self.store.pin(&key);
        Arc::new(Blob {
            key,
            pkg: pkg.clone(),
            fetcher: Arc::downgrade(self),
            file: OnceLock::new(),
            state,
            tx: Mutex::new(tx),
            sparse,
            adopted: AtomicU64::new(0),
            last_warning: Mutex::new(None),
            store: self.store.clone(),
        })
    }
}
