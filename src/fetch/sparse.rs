//! Ranged reads of a package nobody is reading whole.
//!
//! Portage's metadata scan (`FEATURES=-pkgdir-index-trusted`, `emaint binhost`, qlist-style
//! tools) reads tar headers at scattered offsets, the tail included, and never the image. For
//! such reads a large package is not downloaded: each read fetches the 64 KiB blocks it touches
//! with one HTTP `Range` request into a sparse side file, and later reads of the same blocks are
//! served from there. `Sparse` remembers which blocks it holds for as long as the file is open.
//!
//! These bytes are not verified (nothing can be until the whole file is there), so they never
//! become a cache entry and are never mixed into the whole file's verified stream except as the
//! prefix a promoted transfer adopts — and that prefix is then covered by the digest check,
//! so a reader that went on to read the whole file still cannot complete a wrong one.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Fetcher, write_making_room};
use crate::index::Package;

pub const BLOCK: u64 = 64 * 1024;

pub struct Sparse {
    file: Arc<File>,
    path: PathBuf,
    /// Blocks on disk. The async mutex also serialises this file's range requests, so two
    /// readers of the same header never fetch it twice.
    blocks: tokio::sync::Mutex<BTreeSet<u64>>,
    /// Bytes from offset 0 covered without a gap: what a promoted transfer can adopt.
    prefix: AtomicU64,
    held: AtomicU64,
}

impl Sparse {
    pub fn new(file: File, path: PathBuf) -> Sparse {
        Sparse {
            file: Arc::new(file),
            path,
            blocks: tokio::sync::Mutex::new(BTreeSet::new()),
            prefix: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// Bytes `offset..end` of `pkg`, fetching the blocks that are missing (one request, with
    /// the fetcher's breaker and retries). `Ok(None)` when the server does not serve ranges.
    pub async fn read(
        &self,
        fetcher: &Fetcher,
        pkg: &Package,
        (offset, end): (u64, u64),
    ) -> Result<Option<Vec<u8>>, String> {
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        {
            let mut blocks = self.blocks.lock().await;
            let missing: Vec<u64> = (first..=last).filter(|b| !blocks.contains(b)).collect();
            if let (Some(&a), Some(&b)) = (missing.first(), missing.last()) {
                let from = a * BLOCK;
                let len = ((b + 1) * BLOCK).min(pkg.size) - from;
                let Some(data) = fetcher.read_range(pkg, from, len).await? else {
                    return Ok(None);
                };
                // Disk I/O on the blocking pool; the async lock only orders this file's
                // readers, it holds no runtime worker.
                let (file, store) = (self.file.clone(), fetcher.store().clone());
                tokio::task::spawn_blocking(move || write_making_room(&file, &data, from, &store))
                    .await
                    .map_err(|e| format!("writing sparse cache file: {e}"))??;
                blocks.extend(a..=b);
                let contiguous = blocks.iter().zip(0..).take_while(|(b, i)| *b == i).count();
                self.prefix
                    .store((contiguous as u64 * BLOCK).min(pkg.size), Ordering::Relaxed);
                self.held
                    .store(blocks.len() as u64 * BLOCK, Ordering::Relaxed);
            }
        }
        let file = self.file.clone();
        let len = (end - offset) as usize;
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset).map(|()| buf)
        });
        match read.await {
            Ok(Ok(buf)) => Ok(Some(buf)),
            Ok(Err(e)) => Err(format!("reading sparse cache file: {e}")),
            Err(e) => Err(format!("reading sparse cache file: {e}")),
        }
    }

    /// How many bytes of the file are held, in any order: a reader that pulled this much is
    /// reading the file whole, whatever its order.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// How many bytes from offset 0 are held without a gap.
    pub fn prefix_len(&self) -> u64 {
        self.prefix.load(Ordering::Relaxed)
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for Sparse {
    fn drop(&mut self) {
        // A blob's last drop may run on a runtime worker: unlink on the blocking pool.
        let path = std::mem::take(&mut self.path);
        let unlink = move || {
            let _ = std::fs::remove_file(&path);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(unlink)),
            Err(_) => unlink(),
        }
    }
}
