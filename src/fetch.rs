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
use crate::remote::{Remote, RemoteError, chain};
use reqwest::StatusCode;

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
    ///
    /// A transfer that fails for a reason a retry can fix (network error, stall, truncation,
    /// 5xx, 404 while the binhost publishes) is resumed from the bytes already on disk, after a
    /// backoff, at most `RETRIES` times. Resuming (never restarting) matters: readers may
    /// already hold the first bytes, and the digest check must cover exactly the bytes they got.
    async fn receive(
        &self,
        pkg: &Package,
        file: Arc<File>,
        tx: &watch::Sender<State>,
    ) -> Result<(), String> {
        let (chunks, rx) = mpsc::channel::<Bytes>(16);
        let writer = {
            let (size, digests, tx, store) = (
                pkg.size,
                pkg.digests.clone(),
                tx.clone(),
                self.store.clone(),
            );
            tokio::task::spawn_blocking(move || {
                write_and_verify(rx, &file, size, &digests, &tx, &store)
            })
        };
        let mut have = 0u64;
        let mut attempt = 0;
        let failure = loop {
            match self.attempt(pkg, &chunks, &mut have).await {
                Ok(()) | Err(Failure::WriterGone) => break None,
                Err(Failure::Fatal(e)) => break Some(e),
                Err(Failure::Retry(e)) if attempt >= RETRIES => break Some(e),
                Err(Failure::Retry(e)) => {
                    attempt += 1;
                    let backoff = BACKOFF * 2u32.pow(attempt - 1);
                    warn!(path = %pkg.path, have, "transfer interrupted ({e}); retry {attempt}/{RETRIES} in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                }
            }
        };
        drop(chunks);
        let written = writer
            .await
            .map_err(|e| format!("writer task failed: {e}"))?;
        // Without a network-side failure, the writer's verdict (too many bytes, disk full,
        // digests) is the answer.
        match failure {
            Some(f) => Err(f),
            None => written,
        }
    }

    /// One request, from byte `have` on; `Ok` when the body ended with the whole file sent.
    async fn attempt(
        &self,
        pkg: &Package,
        chunks: &mpsc::Sender<Bytes>,
        have: &mut u64,
    ) -> Result<(), Failure> {
        let mut body = self
            .remote
            .open(&pkg.path, *have)
            .await
            .map_err(Failure::from_remote)?;
        if let Some(n) = body.announced_len()
            && n != pkg.size - *have
        {
            return Err(Failure::Fatal(format!(
                "server announces {} bytes, index SIZE is {}",
                n + *have,
                pkg.size
            )));
        }
        loop {
            match body.chunk().await {
                Ok(Some(chunk)) => {
                    let len = chunk.len() as u64;
                    self.stats.bytes_fetched.fetch_add(len, Ordering::Relaxed);
                    if chunks.send(chunk).await.is_err() {
                        return Err(Failure::WriterGone);
                    }
                    *have += len;
                }
                Ok(None) if *have < pkg.size => {
                    return Err(Failure::Retry(format!(
                        "truncated at {} of {} bytes",
                        *have, pkg.size
                    )));
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(Failure::Retry(chain(&e))),
            }
        }
    }
}

/// How many times a transfer is resumed after a transient failure, and the first backoff
/// (doubling each time): at most 0.5 + 1 + 2 s of waiting.
const RETRIES: u32 = 3;
const BACKOFF: std::time::Duration = std::time::Duration::from_millis(500);

enum Failure {
    /// The binhost may do better next time.
    Retry(String),
    /// The binhost is wrong about this file: retrying cannot help.
    Fatal(String),
    /// The writer refused more bytes; its own error says why.
    WriterGone,
}

impl Failure {
    fn from_remote(e: RemoteError) -> Failure {
        let retry = match &e {
            RemoteError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::NOT_FOUND
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            RemoteError::Http { .. } | RemoteError::Io { .. } => true,
            RemoteError::BadUrl(_)
            | RemoteError::BadRange { .. }
            | RemoteError::IndexTooLarge(_) => false,
        };
        if retry {
            Failure::Retry(chain(&e))
        } else {
            Failure::Fatal(chain(&e))
        }
    }
}

/// The blocking half of a transfer: appends chunks, hashes them, publishes progress, and at
/// the end checks SIZE and every digest. Runs across all attempts of one transfer.
fn write_and_verify(
    mut rx: mpsc::Receiver<Bytes>,
    file: &File,
    size: u64,
    digests: &crate::index::Digests,
    tx: &watch::Sender<State>,
    store: &Store,
) -> Result<(), String> {
    let mut verifier = Verifier::new(digests);
    let mut have = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        let len = chunk.len() as u64;
        if have + len > size {
            return Err(format!("server sent more than SIZE ({size} bytes)"));
        }
        write_making_room(file, &chunk, have, store)?;
        verifier.update(&chunk);
        have += len;
        tx.send_replace(State::Receiving(have));
    }
    if have != size {
        return Err(format!("truncated: got {have} of {size} bytes"));
    }
    verifier.finish(digests)
}

/// Writes at `offset`; when the cache's disk is full, evicts unpinned entries one by one and
/// tries again, and only gives up when nothing is left to evict.
fn write_making_room(file: &File, data: &[u8], offset: u64, store: &Store) -> Result<(), String> {
    loop {
        match file.write_all_at(data, offset) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                if !store.evict_one() {
                    return Err("cache disk full and nothing left to evict".into());
                }
            }
            Err(e) => return Err(format!("writing cache file: {e}")),
        }
    }
}
