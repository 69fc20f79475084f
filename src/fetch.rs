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

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::cache::Store;
use crate::error::FsError;
use crate::index::{CacheKey, Package, Verifier};
use crate::remote::{Remote, chain};

/// Counters for `status`.
#[derive(Debug, Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub in_flight: AtomicU64,
    pub failures: AtomicU64,
}

#[derive(Debug, Clone)]
enum State {
    /// Bytes `0..n` are on disk.
    Receiving(u64),
    /// Whole file on disk and verified.
    Complete,
    Failed(Arc<str>),
}

/// The bytes of one package as seen by its readers; shared by every open handle of the file.
pub struct Blob {
    key: CacheKey,
    path: Box<str>,
    size: u64,
    file: File,
    state: watch::Receiver<State>,
    store: Arc<Store>,
}

impl Blob {
    /// Reads `size` bytes at `offset`, waiting only as long as the bytes are not there yet.
    pub async fn read(&self, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        if offset >= self.size {
            return Ok(Vec::new());
        }
        let end = self.size.min(offset + u64::from(size));
        let wants_last_byte = end == self.size;
        let mut rx = self.state.clone();
        let ready = rx
            .wait_for(|s| match s {
                State::Receiving(have) => !wants_last_byte && *have >= end,
                State::Complete | State::Failed(_) => true,
            })
            .await
            .map(|s| s.clone());
        match ready {
            Ok(State::Failed(reason)) => Err(FsError::Fetch {
                path: self.path.to_string(),
                reason: reason.to_string(),
            }),
            Ok(_) => {
                let mut buf = vec![0u8; (end - offset) as usize];
                self.file.read_exact_at(&mut buf, offset)?;
                Ok(buf)
            }
            Err(_) => Err(FsError::Fetch {
                path: self.path.to_string(),
                reason: "transfer ended without a result".into(),
            }),
        }
    }

    fn failed(&self) -> bool {
        matches!(*self.state.borrow(), State::Failed(_))
    }
}

impl Drop for Blob {
    fn drop(&mut self) {
        self.store.unpin(&self.key);
    }
}

pub struct Fetcher {
    remote: Remote,
    store: Arc<Store>,
    /// Transfers in progress, strongly held until they end.
    active: Mutex<HashMap<CacheKey, Arc<Blob>>>,
    pub stats: Stats,
}

impl Fetcher {
    pub fn new(remote: Remote, store: Arc<Store>) -> Fetcher {
        Fetcher {
            remote,
            store,
            active: Mutex::new(HashMap::new()),
            stats: Stats::default(),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The bytes of `pkg`: from the cache, from a transfer already running, or from a new one
    /// started on the current tokio runtime.
    pub fn open(self: &Arc<Self>, pkg: &Package) -> Result<Arc<Blob>, FsError> {
        let key = pkg.cache_key();
        let mut active = self.active.lock().unwrap();
        if let Some(blob) = active.get(&key)
            && !blob.failed()
        {
            return Ok(blob.clone());
        }
        if let Some(file) = self.store.open_object(&key)? {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            let (_, state) = watch::channel(State::Complete);
            return Ok(self.blob(key, pkg, file, state));
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let (partial, file) = self.store.new_partial(&key)?;
        let (tx, state) = watch::channel(State::Receiving(0));
        let blob = self.blob(key.clone(), pkg, file.try_clone()?, state);
        active.insert(key, blob.clone());
        tokio::spawn(
            self.clone()
                .transfer(pkg.clone(), blob.clone(), partial, file, tx),
        );
        Ok(blob)
    }

    fn blob(
        &self,
        key: CacheKey,
        pkg: &Package,
        file: File,
        state: watch::Receiver<State>,
    ) -> Arc<Blob> {
        self.store.pin(&key);
        Arc::new(Blob {
            key,
            path: pkg.path.clone(),
            size: pkg.size,
            file,
            state,
            store: self.store.clone(),
        })
    }

    async fn transfer(
        self: Arc<Self>,
        pkg: Package,
        blob: Arc<Blob>,
        partial: PathBuf,
        file: File,
        tx: watch::Sender<State>,
    ) {
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let file = Arc::new(file);
        let outcome = self.receive(&pkg, file.clone(), &tx).await;
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => {
                // Readers may have the final byte now; keeping the file is a separate matter.
                tx.send_replace(State::Complete);
                let mbps = pkg.size as f64 / 1e6 / secs.max(1e-6);
                info!(path = %pkg.path, bytes = pkg.size, secs = format!("{secs:.2}"), mbps = format!("{mbps:.1}"), "downloaded");
                let store = self.store.clone();
                let key = blob.key.clone();
                let committed = tokio::task::spawn_blocking(move || {
                    let r = store.commit(&key, &partial, &file);
                    if r.is_err() {
                        let _ = std::fs::remove_file(&partial);
                    }
                    r
                })
                .await;
                if let Ok(Err(e)) = committed {
                    warn!(path = %pkg.path, error = %e, "verified download could not be kept in the cache");
                }
            }
            Err(reason) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                warn!(path = %pkg.path, secs = format!("{secs:.2}"), "download failed: {reason}");
                tx.send_replace(State::Failed(reason.into()));
                let _ = std::fs::remove_file(&partial);
            }
        }
        let mut active = self.active.lock().unwrap();
        if active.get(&blob.key).is_some_and(|b| Arc::ptr_eq(b, &blob)) {
            active.remove(&blob.key);
        }
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Receives the body into `file`, publishing progress; `Ok` only for a verified file.
    /// Network reads run here; writing and hashing run on a blocking thread, so a 2-core
    /// machine receives and hashes in parallel.
    async fn receive(
        &self,
        pkg: &Package,
        file: Arc<File>,
        tx: &watch::Sender<State>,
    ) -> Result<(), String> {
        let mut body = self.remote.open(&pkg.path).await.map_err(|e| chain(&e))?;
        if let Some(n) = body.announced_len()
            && n != pkg.size
        {
            return Err(format!(
                "server announces {n} bytes, index SIZE is {}",
                pkg.size
            ));
        }
        let (chunks, mut rx) = mpsc::channel::<Bytes>(16);
        let (size, digests, tx) = (pkg.size, pkg.digests.clone(), tx.clone());
        let writer = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let mut verifier = Verifier::new(&digests);
            let mut have = 0u64;
            while let Some(chunk) = rx.blocking_recv() {
                let len = chunk.len() as u64;
                if have + len > size {
                    return Err(format!("server sent more than SIZE ({size} bytes)"));
                }
                file.write_all_at(&chunk, have)
                    .map_err(|e| format!("writing cache file: {e}"))?;
                verifier.update(&chunk);
                have += len;
                tx.send_replace(State::Receiving(have));
            }
            if have != size {
                return Err(format!("truncated: got {have} of {size} bytes"));
            }
            verifier.finish(&digests)
        });
        let mut net_error = None;
        loop {
            match body.chunk().await {
                Ok(Some(chunk)) => {
                    self.stats
                        .bytes_fetched
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    if chunks.send(chunk).await.is_err() {
                        break; // the writer gave up; its error says why
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    net_error = Some(chain(&e));
                    break;
                }
            }
        }
        drop(chunks);
        let written = writer
            .await
            .map_err(|e| format!("writer task failed: {e}"))?;
        match (net_error, written) {
            (Some(net), Err(_)) => Err(net),
            (_, result) => result,
        }
    }
}
