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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::cache::Store;
use crate::error::FsError;
use crate::index::{CacheKey, Package};
use crate::remote::{Remote, RemoteError, chain};
use crate::segment::{PartGuard, Segments};
use crate::sparse::Sparse;
use crate::verify::Verifier;
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
    /// No whole transfer yet: reads are served by ranged fetches (large files only).
    Sparse,
    /// Bytes `0..n` are on disk.
    Receiving(u64),
    /// Whole file on disk and verified.
    Complete,
    Failed(Arc<str>),
}

/// Files up to this size are fetched whole on first open: ranged reads would save little.
const WHOLE_BELOW: u64 = 2 << 20;
/// A sparse file is promoted to a whole transfer once readers hold its first this-many bytes
/// without a gap. That is the pattern of Portage's digest pass and of every whole-file reader;
/// a metadata scan reads the first header, the metadata member (a few KiB) and the tail, so it
/// stays ranged.
const PROMOTE_AFTER: u64 = 1 << 20;

/// The bytes of one package as seen by its readers; shared by every open handle of the file.
pub struct Blob {
    key: CacheKey,
    pkg: Package,
    fetcher: Weak<Fetcher>,
    /// The whole file: the partial being received, then the verified object. Unset while the
    /// blob is sparse.
    file: OnceLock<Arc<File>>,
    state: watch::Receiver<State>,
    /// Held until promotion hands it to the whole transfer.
    tx: Mutex<Option<watch::Sender<State>>>,
    sparse: Option<Sparse>,
    /// A sparse read delivered the file's final byte (unchecked, as a metadata scan may).
    tail_served: AtomicBool,
    /// The prefix the whole transfer adopted from the sparse file.
    adopted: AtomicU64,
    /// Pages the kernel cached from sparse reads must be dropped (set on promotion).
    needs_inval: AtomicBool,
    /// The last ranged-read failure logged, so a failing file is logged once, not per read.
    last_warning: Mutex<Option<String>>,
    store: Arc<Store>,
}

impl Blob {
    /// Reads `size` bytes at `offset`, waiting only as long as the bytes are not there yet.
    pub async fn read(self: &Arc<Self>, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        if offset >= self.pkg.size {
            return Ok(Vec::new());
        }
        let end = self.pkg.size.min(offset + u64::from(size));
        if let Some(data) = self.read_sparse(offset, end).await? {
            return Ok(data);
        }
        // The read that delivers the final byte waits for the check. If a sparse read already
        // delivered the tail, every byte past the adopted prefix waits instead: otherwise a
        // reader could collect the whole file without any read having waited.
        let must_be_checked = end == self.pkg.size
            || (self.tail_served.load(Ordering::Acquire)
                && end > self.adopted.load(Ordering::Acquire));
        let mut rx = self.state.clone();
        let ready = rx
            .wait_for(|s| match s {
                State::Receiving(have) => !must_be_checked && *have >= end,
                State::Complete | State::Failed(_) => true,
                State::Sparse => false,
            })
            .await
            .map(|s| s.clone());
        match ready {
            Ok(State::Failed(reason)) => Err(self.error(&reason)),
            Ok(_) => {
                let file = self.file.get().expect("set before any byte is published");
                let mut buf = vec![0u8; (end - offset) as usize];
                file.read_exact_at(&mut buf, offset)?;
                Ok(buf)
            }
            Err(_) => Err(self.error("transfer ended without a result")),
        }
    }

    /// Serves a read by ranged fetches while the blob is sparse; `None` once it is (or has to
    /// become) a whole transfer.
    async fn read_sparse(
        self: &Arc<Self>,
        offset: u64,
        end: u64,
    ) -> Result<Option<Vec<u8>>, FsError> {
        let Some(sparse) = &self.sparse else {
            return Ok(None);
        };
        if !self.is_sparse() {
            return Ok(None);
        }
        let Some(fetcher) = self.fetcher.upgrade() else {
            return Err(self.error("shutting down"));
        };
        if end == self.pkg.size {
            // Said before the request, not after: a whole reader deciding whether to wait
            // must never miss an unchecked tail that is already on its way to a reader.
            self.tail_served.store(true, Ordering::Release);
        }
        let data = match sparse.read(&fetcher, &self.pkg, (offset, end)).await {
            Ok(data) => data,
            Err(reason) => {
                let mut last = self.last_warning.lock().unwrap();
                if last.as_deref() != Some(reason.as_str()) {
                    warn!(path = %self.pkg.path, "ranged read failed: {reason}");
                    *last = Some(reason.clone());
                }
                return Err(self.error(&reason));
            }
        };
        if data.is_none() || sparse.held() >= PROMOTE_AFTER {
            // A whole-file reader, in whatever order (or a server without ranges): fetch it
            // all, verified. This read, if it has data, is still a ranged one.
            self.promote()?;
        }
        if !self.is_sparse() && self.adopted.load(Ordering::Acquire) < end {
            // Promoted meanwhile (by this read or another): bytes past the adopted prefix must
            // come from the verified stream, not from the range.
            return Ok(None);
        }
        Ok(data)
    }

    fn is_sparse(&self) -> bool {
        matches!(*self.state.borrow(), State::Sparse)
    }

    /// True once after promotion of a sparse blob: the caller must drop the kernel's cached
    /// pages of this file, which came from unchecked ranged reads.
    pub fn take_needs_inval(&self) -> bool {
        self.needs_inval.swap(false, Ordering::AcqRel)
    }

    /// Starts the whole, verified transfer of this file, once; it adopts the gap-free prefix
    /// the sparse reads already hold and resumes after it.
    pub fn promote(self: &Arc<Self>) -> Result<(), FsError> {
        let Some(tx) = self.tx.lock().unwrap().take() else {
            return Ok(());
        };
        let Some(fetcher) = self.fetcher.upgrade() else {
            return Err(self.error("shutting down"));
        };
        let (partial, file) = match self.store.new_partial(&self.key) {
            Ok(p) => p,
            Err(e) => {
                tx.send_replace(State::Failed(format!("cache: {e}").into()));
                return Err(e.into());
            }
        };
        let file = Arc::new(file);
        let _ = self.file.set(file.clone());
        if let Some(sparse) = &self.sparse {
            self.adopted.store(sparse.prefix_len(), Ordering::Release);
            self.needs_inval.store(true, Ordering::Release);
            // Lingering is for ranged blocks; a promoted blob must not keep its cache entry
            // pinned (and unevictable) after its readers are gone.
            fetcher
                .recent
                .lock()
                .unwrap()
                .retain(|b| !std::ptr::eq(Arc::as_ptr(b), Arc::as_ptr(self)));
        }
        tx.send_replace(State::Receiving(0));
        tokio::spawn(fetcher.transfer(self.clone(), partial, file, tx));
        Ok(())
    }

    fn error(&self, reason: &str) -> FsError {
        FsError::Fetch {
            path: self.pkg.path.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Fetches the whole file if that has not started, and waits until it is verified.
    pub async fn wait_complete(self: &Arc<Self>) -> Result<(), FsError> {
        self.promote()?;
        let mut rx = self.state.clone();
        let done = rx
            .wait_for(|s| matches!(s, State::Complete | State::Failed(_)))
            .await
            .map(|s| s.clone());
        match done {
            Ok(State::Failed(reason)) => Err(self.error(&reason)),
            Ok(_) => Ok(()),
            Err(_) => Err(self.error("transfer ended without a result")),
        }
    }

    /// Whole file on disk and verified: it may be handed to the kernel for passthrough.
    pub fn is_complete(&self) -> bool {
        matches!(*self.state.borrow(), State::Complete)
    }

    /// The whole file, once there is one (for passthrough of a complete blob).
    pub fn file(&self) -> Option<&File> {
        self.file.get().map(|f| &**f)
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
    /// Blobs with open handles or a running transfer (which holds a strong reference).
    active: Mutex<HashMap<CacheKey, Weak<Blob>>>,
    /// The last sparse blobs opened, kept alive after their last close: Portage opens a
    /// package several times during one scan, and an install reopens it right after, so the
    /// ranged blocks must outlive a single open. Bounded by `LINGER` (each holds at most about
    /// `PROMOTE_AFTER` bytes of side file before it is promoted).
    recent: Mutex<std::collections::VecDeque<Arc<Blob>>>,
    /// Set when the binhost could not be connected to: until then, transfers fail at once
    /// instead of each waiting out connect timeouts (offline reads fail fast, logged once).
    offline: Mutex<Option<(Instant, String)>>,
    /// Connections one large whole transfer may use (see `segment`).
    streams: usize,
    /// The server answered a part's range request with the whole file, or a range request
    /// with another range: later transfers stay one stream (such answers are still used).
    /// (A whole-file answer to a head's request just makes that transfer one stream.)
    no_split: AtomicBool,
    pub stats: Stats,
}

/// The window over which a head's rate is measured while a split is pending: long enough that
/// a time slice lost to a busy CPU (which shows as waiting, since the connection task was not
/// run) does not make a fast stream look slow (at the threshold a window may wait 15 ms),
/// short enough to decide early in a head of at least 4 MiB.
const PROBE: u64 = 1 << 20;

/// A head whose every `PROBE` window came at this rate or faster stays one stream. Above it one
/// connection already does what parts are for (a LAN binhost, loopback), while hashing every
/// byte for every digest is the bound on small machines, and parts only add connections to a
/// shared binhost and CPU for reading them back. Below it (a capped connection, a long round
/// trip, a slow link) parts fill what one stream cannot.
const SPLIT_BELOW: f64 = 64.0 * 1024.0 * 1024.0;

/// How many sparse blobs outlive their last close (see `Fetcher::recent`).
const LINGER: usize = 32;

/// How long a connect failure makes further transfers fail at once. After it, one transfer
/// tries again, so reads recover without a remount when the binhost is back.
const OFFLINE_HOLD: Duration = Duration::from_secs(10);

impl Fetcher {
    pub fn new(remote: Remote, store: Arc<Store>) -> Fetcher {
        Fetcher {
            remote,
            store,
            active: Mutex::new(HashMap::new()),
            recent: Mutex::default(),
            offline: Mutex::new(None),
            streams: 1,
            no_split: AtomicBool::new(false),
            stats: Stats::default(),
        }
    }

    /// Lets a large whole transfer use up to `n` connections as parallel ranges.
    pub fn with_streams(mut self, n: usize) -> Self {
        self.streams = n.max(1);
        self
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// `Err` with the reason while the offline breaker holds.
    fn check_online(&self) -> Result<(), String> {
        match &*self.offline.lock().unwrap() {
            Some((until, reason)) if Instant::now() < *until => {
                Err(format!("binhost offline: {reason}"))
            }
            _ => Ok(()),
        }
    }

    /// Trips the breaker after a connect failure; returns the reason.
    fn went_offline(&self, e: &RemoteError) -> String {
        let reason = chain(e);
        *self.offline.lock().unwrap() = Some((Instant::now() + OFFLINE_HOLD, reason.clone()));
        format!("binhost offline: {reason}")
    }

    /// One ranged read for a sparse file, with the same breaker and retries as transfers.
    /// `Ok(None)`: the server does not do ranges.
    pub(crate) async fn read_range(
        &self,
        path: &str,
        from: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, String> {
        self.check_online()?;
        let mut attempt = 0;
        loop {
            match self.remote.read_range(path, from, len).await {
                Ok(data) => {
                    *self.offline.lock().unwrap() = None;
                    if data.is_some() {
                        self.stats.bytes_fetched.fetch_add(len, Ordering::Relaxed);
                    }
                    return Ok(data);
                }
                Err(e) if e.is_connect() => return Err(self.went_offline(&e)),
                Err(e) => match Failure::from_remote(e) {
                    Failure::Retry(reason) if attempt < RETRIES => {
                        attempt += 1;
                        tokio::time::sleep(BACKOFF * 2u32.pow(attempt - 1)).await;
                        debug!(path, "ranged read retry {attempt}/{RETRIES}: {reason}");
                    }
                    Failure::Retry(reason) | Failure::Fatal(reason) => return Err(reason),
                    Failure::WriterGone => return Err("writer stopped".into()),
                },
            }
        }
    }

    /// Fetches `pkg` whole into the cache (or finds it there), sharing a transfer a reader may
    /// already have started. For prefetching: `Ok` once the file is verified and readable.
    pub async fn fetch_whole(self: &Arc<Self>, pkg: &Package) -> Result<(), FsError> {
        let blob = self.open(pkg)?;
        blob.wait_complete().await
    }

    /// The bytes of `pkg`: from the cache, from a blob other handles already share, or a new
    /// one: sparse for a large file, else with its whole transfer started on the current tokio
    /// runtime.
    pub fn open(self: &Arc<Self>, pkg: &Package) -> Result<Arc<Blob>, FsError> {
        let key = pkg.cache_key();
        let mut active = self.active.lock().unwrap();
        if let Some(blob) = active.get(&key).and_then(Weak::upgrade)
            && !blob.failed()
        {
            return Ok(blob);
        }
        if let Some(file) = self.store.open_object(&key)? {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            let (_, state) = watch::channel(State::Complete);
            let blob = self.blob(key, pkg, None, state, None);
            let _ = blob.file.set(Arc::new(file));
            return Ok(blob);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let (tx, state) = watch::channel(State::Sparse);
        let sparse = if pkg.size > WHOLE_BELOW {
            let (path, file) = self.store.new_partial(&key)?;
            Some(Sparse::new(file, path))
        } else {
            None
        };
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
            tail_served: AtomicBool::new(false),
            adopted: AtomicU64::new(0),
            needs_inval: AtomicBool::new(false),
            last_warning: Mutex::new(None),
            store: self.store.clone(),
        })
    }

    async fn transfer(
        self: Arc<Self>,
        blob: Arc<Blob>,
        partial: PathBuf,
        file: Arc<File>,
        tx: watch::Sender<State>,
    ) {
        let in_flight = InFlight::new(&self.stats.in_flight);
        let started = Instant::now();
        let pkg = &blob.pkg;
        let adopted = blob.adopted.load(Ordering::Acquire);
        let prefix = blob
            .sparse
            .as_ref()
            .map(|s| (s.file(), adopted))
            .filter(|(_, n)| *n > 0);
        let outcome = self.receive(pkg, file.clone(), &tx, prefix).await;
        // The network part is over: a transfer starting now runs alone (see `plan`).
        drop(in_flight);
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
    }

    /// Receives the body into `file`, publishing progress; `Ok` only for a verified file.
    /// Network reads run here; writing and hashing run on a blocking thread, so a 2-core
    /// machine receives and hashes in parallel.
    ///
    /// A transfer that fails for a reason a retry can fix (network error, stall, truncation,
    /// 5xx, 404 while the binhost publishes) is resumed from the bytes already on disk, after a
    /// backoff, at most `RETRIES` times. Resuming (never restarting) matters: readers may
    /// already hold the first bytes, and the digest check must cover exactly the bytes they got.
    ///
    /// `prefix` is a sparse file whose first bytes readers already hold: they are fed to the
    /// writer first (hashed and checked like the rest), and the network resumes after them.
    ///
    /// A large file from a server that does ranges is split (see `segment`): this stream
    /// fetches the head, part fetchers the rest, and the writer hashes the parts in order.
    async fn receive(
        self: &Arc<Self>,
        pkg: &Package,
        file: Arc<File>,
        tx: &watch::Sender<State>,
        prefix: Option<(&File, u64)>,
    ) -> Result<(), String> {
        let (chunks, rx) = mpsc::channel::<Bytes>(16);
        let parts = Arc::new(OnceLock::new());
        let mut split = Split {
            parts: parts.clone(),
            file: file.clone(),
            tasks: Vec::new(),
            decided: false,
        };
        let writer = {
            let (size, digests, tx, store) = (
                pkg.size,
                pkg.digests.clone(),
                tx.clone(),
                self.store.clone(),
            );
            tokio::task::spawn_blocking(move || {
                write_and_verify(rx, &file, size, &digests, &tx, &store, &parts)
            })
        };
        let mut have = 0u64;
        if let Some((sparse, len)) = prefix {
            while have < len {
                let mut buf = vec![0u8; (len - have).min(1 << 20) as usize];
                sparse
                    .read_exact_at(&mut buf, have)
                    .map_err(|e| format!("reading sparse cache file: {e}"))?;
                have += buf.len() as u64;
                if chunks.send(buf.into()).await.is_err() {
                    break;
                }
            }
        }
        let mut attempt = 0;
        let failure = loop {
            match self
                .attempt(pkg, &chunks, &mut have, attempt > 0, &mut split)
                .await
            {
                Ok(true) | Err(Failure::WriterGone) => break None,
                // A server that caps its ranges: ask for the rest, no backoff.
                Ok(false) => {}
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
        if failure.is_some() {
            // The writer must not wait for parts of a transfer that has already failed.
            split.cancel();
        }
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

    /// One request, from byte `have` on: `Ok(true)` when the whole file is sent (or the whole
    /// head, once the transfer is split); `Ok(false)` when the server sent a shorter range
    /// than asked for, completely: progress, and the caller asks for the rest.
    async fn attempt(
        self: &Arc<Self>,
        pkg: &Package,
        chunks: &mpsc::Sender<Bytes>,
        have: &mut u64,
        retrying: bool,
        split: &mut Split,
    ) -> Result<bool, Failure> {
        // The breaker only stops new transfers: one already under way (or resuming) keeps its
        // bytes and its retries, since a binhost restart is exactly when connects fail.
        let fresh = *have == 0 && !retrying;
        if fresh {
            self.check_online().map_err(Failure::Fatal)?;
        }
        // Split on the first answer: ask for the head only; a 206 for exactly that range says
        // the server does ranges, and the parts are started if this one stream turns out slow.
        let plan = match split.parts.get() {
            Some(_) => None,
            None if split.decided => None,
            None => self.plan(pkg, *have),
        };
        let head_end = split
            .parts
            .get()
            .map(|p| p.start())
            .or(plan.as_ref().map(|(end, _)| *end));
        let mut body = match self.remote.open(&pkg.path, *have, head_end).await {
            Ok(body) => body,
            Err(e) if e.is_connect() && fresh => {
                return Err(Failure::Fatal(self.went_offline(&e)));
            }
            Err(e) => return Err(Failure::from_open(e, pkg)),
        };
        *self.offline.lock().unwrap() = None;
        let served_end = self.check_answer(pkg, &body, *have)?;
        let mut pending = None;
        let limit = match (head_end, plan) {
            (Some(end), Some((_, segs))) if body.range_end() == Some(end) => {
                pending = Some(segs);
                end
            }
            (Some(end), None) => end,
            (Some(_), Some(_)) => {
                if body.is_partial() {
                    self.stop_splitting(pkg, "answered a range request with another range");
                }
                // One stream: a whole-file answer, or a range that ends elsewhere (the rest
                // comes by resuming).
                pkg.size
            }
            (None, _) => pkg.size,
        };
        let start = *have;
        // While the plan is pending, the head's rate is measured over each `PROBE` bytes,
        // from its first chunk on (a server slow to start answering is not a slow stream), as
        // bytes per second spent waiting for the network (time the writer holds us up is a
        // busy CPU, which parts would not help): the first window slower than `SPLIT_BELOW`
        // starts the parts. Every window, not just the first: nginx's `limit_rate` lets a
        // first burst through at full speed before it caps.
        let mut window: Option<(u64, Duration)> = None;
        let progress = |at: u64, waited: Duration| {
            // A part that gave up means the file cannot be completed: say so now, not after
            // the head is in.
            if let Some(reason) = split.parts.get().and_then(|p| p.failure()) {
                return Err(Failure::Fatal(reason));
            }
            if pending.is_none() {
                return Ok(());
            }
            let Some((from, spent)) = &mut window else {
                window = Some((at, Duration::ZERO));
                return Ok(());
            };
            *spent += waited;
            if at - *from >= PROBE {
                let rate = (at - *from) as f64 / spent.as_secs_f64().max(1e-6);
                if rate < SPLIT_BELOW
                    && let Some(segs) = pending.take()
                {
                    debug!(path = %pkg.path, mbps = format!("{:.1}", rate / 1e6), "one stream is slow: split");
                    self.start_parts(pkg, segs, split);
                }
                window = Some((at, Duration::ZERO));
            }
            Ok(())
        };
        self.pump(
            &mut body,
            have,
            (limit, served_end),
            pkg.size,
            chunks,
            progress,
        )
        .await?;
        if pending.is_some() {
            // Fast all along: this transfer stays one stream, and the rest comes next.
            split.decided = true;
        }
        let done = short_answer(start, *have, limit)?;
        Ok(done && (split.parts.get().is_some() || *have == pkg.size))
    }

    /// Moves a body's bytes from `*at` up to `limit` (or where the server said it would stop,
    /// if sooner) into `chunks`, cutting or refusing what runs past (see `clip`); a body that
    /// ends where it said must end there (see `expect_end`). `progress` hears of every chunk
    /// (the new position, and how long the chunk was waited for) and may stop the transfer.
    async fn pump(
        &self,
        body: &mut crate::remote::Body,
        at: &mut u64,
        (limit, served_end): (u64, u64),
        size: u64,
        chunks: &mpsc::Sender<Bytes>,
        mut progress: impl FnMut(u64, Duration) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        while *at < limit.min(served_end) {
            let asked = Instant::now();
            let next = body.chunk().await;
            let waited = asked.elapsed();
            match next {
                Ok(Some(mut chunk)) => {
                    clip(&mut chunk, *at, limit, served_end, size)?;
                    let len = chunk.len() as u64;
                    self.stats.bytes_fetched.fetch_add(len, Ordering::Relaxed);
                    if chunks.send(chunk).await.is_err() {
                        return Err(Failure::WriterGone);
                    }
                    *at += len;
                    progress(*at, waited)?;
                }
                Ok(None) => {
                    return Err(Failure::Retry(format!(
                        "truncated at {} of {} bytes",
                        *at,
                        limit.min(served_end)
                    )));
                }
                Err(e) => return Err(Failure::Retry(chain(&e))),
            }
        }
        if served_end <= limit {
            expect_end(body, served_end, size).await?;
        }
        Ok(())
    }

    /// Checks an answer's stated lengths against the index before any byte is kept, and
    /// returns where its body will end (exclusive). Bytes a whole-file answer to a resumed
    /// request skips still crossed the network: they are counted.
    fn check_answer(
        &self,
        pkg: &Package,
        body: &crate::remote::Body,
        start: u64,
    ) -> Result<u64, Failure> {
        if let Some(total) = body.total_len()
            && total != pkg.size
        {
            return Err(Failure::Fatal(format!(
                "server says the file has {total} bytes, index SIZE is {}",
                pkg.size
            )));
        }
        let served_end = body.range_end().unwrap_or(pkg.size);
        if served_end > pkg.size {
            return Err(Failure::Fatal(format!(
                "server sends bytes up to {} of a file whose index SIZE is {}",
                served_end - 1,
                pkg.size
            )));
        }
        if let Some(n) = body.announced_len()
            && n != served_end.saturating_sub(start)
        {
            return Err(Failure::Fatal(if body.is_partial() {
                format!(
                    "server announces {n} bytes for the range {start}-{}",
                    served_end - 1
                )
            } else {
                format!(
                    "server announces {} bytes, index SIZE is {}",
                    n + start,
                    pkg.size
                )
            }));
        }
        if !body.is_partial() {
            self.stats.bytes_fetched.fetch_add(start, Ordering::Relaxed);
        }
        Ok(served_end)
    }

    /// How this transfer would be split from byte `have` on, if it is worth several streams
    /// and the server has not shown it does ranges oddly.
    ///
    /// Only a transfer running alone is split. Parts help one transfer fill a link that caps
    /// each connection; when other transfers run (a merge-list prefetch, parallel readers),
    /// the link already carries several streams, and splitting each of them only shares the
    /// same bandwidth more finely, delays the front of the file a reader is waiting for, and
    /// costs CPU the install needs (measured: `bench/emerge-shaped.sh` cold went from 1.07x to
    /// 1.11x local when every prefetched package was split). A plan is only a plan: the parts
    /// start at the first `PROBE` window of the head that came slower than `SPLIT_BELOW` (see
    /// `attempt`).
    fn plan(&self, pkg: &Package, have: u64) -> Option<(u64, Segments)> {
        if self.streams < 2
            || self.no_split.load(Ordering::Relaxed)
            || self.stats.in_flight.load(Ordering::Relaxed) > 1
        {
            return None;
        }
        Segments::plan(have, pkg.size, self.streams)
    }

    /// The server does ranges in a way splitting cannot use: later transfers stay one stream.
    fn stop_splitting(&self, pkg: &Package, why: &str) {
        if !self.no_split.swap(true, Ordering::Relaxed) {
            warn!(path = %pkg.path, "the binhost {why}; large packages will be fetched as one stream");
        }
    }

    /// Starts a fetcher for each part after the head.
    fn start_parts(self: &Arc<Self>, pkg: &Package, segs: Segments, split: &mut Split) {
        let segs = Arc::new(segs);
        debug!(path = %pkg.path, parts = segs.spans().len() + 1, "fetching in parallel parts");
        let _ = split.parts.set(segs.clone());
        for i in 0..segs.spans().len() {
            split.tasks.push(tokio::spawn(self.clone().fetch_part(
                pkg.clone(),
                split.file.clone(),
                segs.clone(),
                i,
            )));
        }
    }

    /// Fetches part `i` of a split transfer into `file`, resuming after transient failures
    /// like the head does; reports progress or failure to the writer through `segs`. Disk
    /// writes run on a blocking thread of their own, as the head's do.
    async fn fetch_part(
        self: Arc<Self>,
        pkg: Package,
        file: Arc<File>,
        segs: Arc<Segments>,
        i: usize,
    ) {
        let mut guard = PartGuard::new(&segs, i);
        let (from, to) = segs.spans()[i];
        let (chunks, mut rx) = mpsc::channel::<Bytes>(16);
        let writer = {
            let (segs, store) = (segs.clone(), self.store.clone());
            tokio::task::spawn_blocking(move || {
                let mut written = 0u64;
                while let Some(chunk) = rx.blocking_recv() {
                    write_making_room(&file, &chunk, from + written, &store)?;
                    written += chunk.len() as u64;
                    segs.advance(i, written);
                }
                Ok::<(), String>(())
            })
        };
        let mut got = 0u64;
        let mut attempt = 0;
        let outcome = loop {
            match self.part_attempt(&pkg, (from, to), &chunks, &mut got).await {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(Failure::Retry(e)) if attempt < RETRIES => {
                    attempt += 1;
                    debug!(path = %pkg.path, from, to, got, "part interrupted ({e}); retry {attempt}/{RETRIES}");
                    tokio::time::sleep(BACKOFF * 2u32.pow(attempt - 1)).await;
                }
                Err(Failure::Retry(e) | Failure::Fatal(e)) => break Err(e),
                Err(Failure::WriterGone) => break Err("writer stopped".into()),
            }
        };
        drop(chunks);
        // The writer's own error (a full disk) says more than the network side's "stopped".
        let written = match writer.await {
            Ok(r) => r,
            Err(e) => Err(format!("part writer failed: {e}")),
        };
        if let Err(reason) = written.and(outcome) {
            segs.fail(i, format!("bytes {from}-{}: {reason}", to - 1));
        }
        guard.reported();
    }

    /// One request for the rest of a part: `Ok(true)` once all of it went to the part's
    /// writer, `Ok(false)` after a shorter range than asked for (see `attempt`).
    async fn part_attempt(
        &self,
        pkg: &Package,
        (from, to): (u64, u64),
        chunks: &mpsc::Sender<Bytes>,
        got: &mut u64,
    ) -> Result<bool, Failure> {
        let start = from + *got;
        let mut body = self
            .remote
            .open(&pkg.path, start, Some(to))
            .await
            .map_err(|e| Failure::from_open(e, pkg))?;
        let served_end = self.check_answer(pkg, &body, start)?;
        if !body.is_partial() {
            // Used (the body skips to the part), but it costs the bytes before it.
            self.stop_splitting(pkg, "answered a range request with the whole file");
        } else if served_end != to {
            self.stop_splitting(pkg, "answered a range request with another range");
        }
        let mut at = start;
        let pumped = self
            .pump(
                &mut body,
                &mut at,
                (to, served_end),
                pkg.size,
                chunks,
                |_, _| Ok(()),
            )
            .await;
        // What went to the writer counts, even if the answer then failed: resume after it.
        *got = at - from;
        pumped?;
        short_answer(start, at, to)
    }
}

/// After an answer that ended where the server said it would: done if it reached `limit`;
/// else progress (a server that caps its ranges), and the caller asks for the rest at once.
/// An answer of less than 64 KiB that stops short is counted as a failed attempt instead, so a
/// server that answers with tiny ranges fails after the usual retries rather than being
/// asked size/cap times in a row.
fn short_answer(start: u64, at: u64, limit: u64) -> Result<bool, Failure> {
    const MIN_ANSWER: u64 = 64 * 1024;
    if at == limit {
        Ok(true)
    } else if at - start < MIN_ANSWER {
        Err(Failure::Retry(format!(
            "server answered with only {} bytes of the range {start}-{}",
            at - start,
            limit - 1
        )))
    } else {
        Ok(false)
    }
}

/// A chunk at `at` that would take a body past `limit`, where we stop reading: cut it there
/// if the server said it would send more (a whole file, or a wider range). A chunk past where
/// the server said it would stop (`served_end`) is the server sending more than it said.
fn clip(chunk: &mut Bytes, at: u64, limit: u64, served_end: u64, size: u64) -> Result<(), Failure> {
    if at + chunk.len() as u64 <= limit.min(served_end) {
        return Ok(());
    }
    if served_end > limit {
        chunk.truncate((limit - at) as usize);
        return Ok(());
    }
    Err(overshoot(served_end, size))
}

/// After the last byte of a body that should end at `served_end`: anything more is the server
/// sending more than it said (caught even without a Content-Length). An error at this point
/// is not: every byte wanted is in, and the digests decide.
async fn expect_end(
    body: &mut crate::remote::Body,
    served_end: u64,
    size: u64,
) -> Result<(), Failure> {
    match body.chunk().await {
        Ok(Some(extra)) if !extra.is_empty() => Err(overshoot(served_end, size)),
        _ => Ok(()),
    }
}

fn overshoot(served_end: u64, size: u64) -> Failure {
    Failure::Fatal(if served_end == size {
        format!("server sent more than SIZE ({size} bytes)")
    } else {
        format!(
            "server sent more than the range ending at {}",
            served_end - 1
        )
    })
}

/// The parts of a transfer, if it was split, and their fetchers: dropping it (the transfer is
/// over) stops them, and any writer still waiting is told so.
struct Split {
    parts: Arc<OnceLock<Arc<Segments>>>,
    file: Arc<File>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The head was fast enough alone: this transfer stays one stream.
    decided: bool,
}

impl Split {
    fn cancel(&self) {
        if let Some(segs) = self.parts.get() {
            segs.cancel();
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Split {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Counts a transfer in `status` for exactly as long as it runs, even if it panics.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How many times a transfer is resumed after a transient failure, and the first backoff
/// (doubling each time): at most 0.5 + 1 + 2 s of waiting.
const RETRIES: u32 = 3;
const BACKOFF: Duration = Duration::from_millis(500);

enum Failure {
    /// The binhost may do better next time.
    Retry(String),
    /// The binhost is wrong about this file: retrying cannot help.
    Fatal(String),
    /// The writer refused more bytes; its own error says why.
    WriterGone,
}

impl Failure {
    /// Like `from_remote`, for a package request: a 416 means the server's file is shorter
    /// than the index says.
    fn from_open(e: RemoteError, pkg: &Package) -> Failure {
        match &e {
            RemoteError::Status { status, .. } if *status == StatusCode::RANGE_NOT_SATISFIABLE => {
                Failure::Fatal(format!(
                    "{}: the server's file is shorter than the index SIZE ({} bytes)",
                    chain(&e),
                    pkg.size
                ))
            }
            _ => Failure::from_remote(e),
        }
    }

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
    digests: &crate::verify::Digests,
    tx: &watch::Sender<State>,
    store: &Store,
    parts: &OnceLock<Arc<Segments>>,
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
    if let Some(segs) = parts.get()
        && have == segs.start()
    {
        follow_parts(segs, file, &mut verifier, &mut have, tx)?;
    }
    if have != size {
        return Err(format!("truncated: got {have} of {size} bytes"));
    }
    verifier.finish(digests)
}

/// After the head: hashes each part in file order as its fetcher fills it, reading it back
/// from the page cache, and only then publishes its bytes to readers.
fn follow_parts(
    segs: &Segments,
    file: &File,
    verifier: &mut Verifier,
    have: &mut u64,
    tx: &watch::Sender<State>,
) -> Result<(), String> {
    const PIECE: u64 = 1 << 20;
    for (i, &(from, to)) in segs.spans().iter().enumerate() {
        let mut done = 0;
        while done < to - from {
            let filled = segs.wait_beyond(i, done)?;
            while done < filled {
                let mut buf = vec![0u8; (filled - done).min(PIECE) as usize];
                file.read_exact_at(&mut buf, from + done)
                    .map_err(|e| format!("reading back cache file: {e}"))?;
                done += buf.len() as u64;
                verifier.update(&Bytes::from(buf));
                *have = from + done;
                tx.send_replace(State::Receiving(*have));
            }
        }
    }
    Ok(())
}

/// Writes at `offset`; when the cache's disk is full, evicts unpinned entries one by one and
/// tries again, and only gives up when nothing is left to evict.
pub(crate) fn write_making_room(
    file: &File,
    data: &[u8],
    offset: u64,
    store: &Store,
) -> Result<(), String> {
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
