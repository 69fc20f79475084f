//! One package as its readers see it: a `Blob` is shared by every open handle of the file, and
//! decides when a read may be answered (see the invariants in `fetch`): at once for bytes on
//! disk, after the whole check for the final byte, by ranged fetches while it is sparse.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use tokio::sync::watch;
use tracing::warn;

use super::sparse::Ranged;
use super::{Fetcher, PROMOTE_AFTER, Sparse};
use crate::cache::Store;
use crate::error::FsError;
use crate::index::{CacheKey, Package};

#[derive(Debug, Clone)]
pub(super) enum State {
    /// No whole transfer yet: reads are served by ranged fetches (large files only).
    Sparse,
    /// Bytes `0..n` are on disk.
    Receiving(u64),
    /// Whole file on disk and verified.
    Complete,
    Failed(Arc<str>),
}

/// The bytes of one package as seen by its readers; shared by every open handle of the file.
pub struct Blob {
    pub(super) key: CacheKey,
    pub(super) pkg: Package,
    pub(super) fetcher: Weak<Fetcher>,
    /// The whole file: the partial being received, then the verified object. Unset while the
    /// blob is sparse.
    pub(super) file: OnceLock<Arc<File>>,
    pub(super) state: watch::Receiver<State>,
    /// Held until promotion hands it to the whole transfer.
    pub(super) tx: Mutex<Option<watch::Sender<State>>>,
    pub(super) sparse: Option<Sparse>,
    /// The prefix the whole transfer adopted from the sparse file.
    pub(super) adopted: AtomicU64,
    /// The last ranged-read failure logged, so a failing file is logged once, not per read.
    pub(super) last_warning: Mutex<Option<String>>,
    pub(super) store: Arc<Store>,
}

impl Blob {
    /// Reads `size` bytes at `offset`, waiting only as long as the bytes are not there yet.
    pub async fn read(self: &Arc<Self>, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        if offset >= self.pkg.size {
            return Ok(Vec::new());
        }
        let end = self.pkg.size.min(offset.saturating_add(u64::from(size)));
        if let Some(data) = self.read_sparse(offset, end).await? {
            return Ok(data);
        }
        // The read that delivers the final byte waits for the check. If a sparse read already
        // delivered the tail, every byte past the adopted prefix waits instead: otherwise a
        // reader could collect the whole file without any read having waited.
        let tail_served = self.sparse.as_ref().is_some_and(Sparse::tail_served);
        let must_be_checked =
            end == self.pkg.size || (tail_served && end > self.adopted.load(Ordering::Acquire));
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
                let file = self
                    .file
                    .get()
                    .expect("set before any byte is published")
                    .clone();
                let len = (end - offset) as usize;
                // On the blocking pool: a slow cache disk must not hold a runtime worker, which
                // every other reader and transfer needs.
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len];
                    file.read_exact_at(&mut buf, offset).map(|()| buf)
                });
                match read.await {
                    Ok(r) => Ok(r?),
                    Err(e) => Err(self.error(&format!("cache read: {e}"))),
                }
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
        let data = match sparse.read(&fetcher, &self.pkg, (offset, end)).await {
            Ok(Ranged::Data(data)) => Some(data),
            // A whole-file reader in order, or a server without ranges: fetch it all, verified.
            Ok(Ranged::NoRanges | Ranged::Sequential) => None,
            // Another read started the whole transfer while this one waited.
            Ok(Ranged::Closed) => return Ok(None),
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
            // A whole-file reader in any order (it holds `PROMOTE_AFTER` bytes) is promoted
            // too. This read, if it has data, is still a ranged one.
            self.promote_off_worker().await?;
        }
        if !self.is_sparse() && self.adopted.load(Ordering::Acquire) < end {
            // Promoted meanwhile (by this read or another): bytes past the adopted prefix must
            // come from the verified stream, not from the range.
            return Ok(None);
        }
        Ok(data)
    }

    pub(super) fn is_sparse(&self) -> bool {
        matches!(*self.state.borrow(), State::Sparse)
    }

    /// The moments at which pages the kernel cached from this blob's unchecked reads must be
    /// dropped: its promotion (later reads come from the verified stream) and its completion.
    /// Holds no reference to the blob, so watching never keeps a file pinned.
    pub fn page_events(&self) -> PageEvents {
        PageEvents {
            state: self.state.clone(),
            promoted: !self.is_sparse(),
            done: false,
        }
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
            sparse.close();
            self.adopted.store(sparse.prefix_len(), Ordering::Release);
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

    /// `promote` from async code: creating the partial file is disk I/O, kept off the
    /// runtime's workers.
    async fn promote_off_worker(self: &Arc<Self>) -> Result<(), FsError> {
        if self.tx.lock().unwrap().is_none() {
            return Ok(());
        }
        let me = self.clone();
        match tokio::task::spawn_blocking(move || me.promote()).await {
            Ok(r) => r,
            Err(e) => Err(self.error(&format!("starting the transfer: {e}"))),
        }
    }

    pub(super) fn error(&self, reason: &str) -> FsError {
        FsError::Fetch {
            path: self.pkg.path.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Fetches the whole file if that has not started, and waits until it is verified.
    pub async fn wait_complete(self: &Arc<Self>) -> Result<(), FsError> {
        self.promote_off_worker().await?;
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

    pub(super) fn failed(&self) -> bool {
        matches!(*self.state.borrow(), State::Failed(_))
    }
}

/// What happened to a blob, as far as the kernel's cached pages of it are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageEvent {
    /// A sparse blob became a whole transfer.
    Promoted,
    /// The whole file is verified: every read from now on returns checked bytes.
    Complete,
}

/// See `Blob::page_events`.
pub struct PageEvents {
    state: watch::Receiver<State>,
    promoted: bool,
    done: bool,
}

impl PageEvents {
    /// The next event; `None` once there will be none (failed, or the blob is gone).
    pub async fn next(&mut self) -> Option<PageEvent> {
        let state = self
            .state
            .wait_for(|s| match s {
                State::Sparse => false,
                State::Receiving(_) => !self.promoted,
                State::Complete | State::Failed(_) => true,
            })
            .await
            .ok()?
            .clone();
        match state {
            State::Receiving(_) => {
                self.promoted = true;
                Some(PageEvent::Promoted)
            }
            State::Complete if !self.done => {
                self.done = true;
                Some(PageEvent::Complete)
            }
            State::Complete => None,
            State::Sparse | State::Failed(_) => None,
        }
    }
}

impl Drop for Blob {
    fn drop(&mut self) {
        self.store.unpin(&self.key);
    }
}
