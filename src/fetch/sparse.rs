//! Ranged reads of a package nobody is reading whole.
//!
//! Portage's metadata scan (`FEATURES=-pkgdir-index-trusted`, `emaint binhost`, qlist-style
//! tools) reads tar headers at scattered offsets, the tail included, and never the image. For
//! such reads a large package is not downloaded: each read fetches the 64 KiB blocks it touches
//! with one HTTP `Range` request into a sparse side file, and later reads of the same blocks are
//! served from there. `Sparse` remembers which blocks it holds for as long as the file is open.
//!
//! A read near the start fetches the first `HEAD` bytes in one request: that is what a
//! metadata scan reads there (Python's tar reader asks for 128 KiB, the kernel reads ahead to
//! 384 KiB), in one round trip instead of three; any read of the kernel's first readahead
//! window fetches from block 0 too, as they take the lock in any order. A read from
//! `SEQUENTIAL_FROM` on, within a readahead window of that head, is a whole reader (`cat`,
//! Portage's digest pass): `read` answers `Ranged::Sequential` instead of fetching, and the
//! blob starts the whole transfer, which adopts the gap-free prefix. So a sequential reader
//! costs one or two ranged round trips before its stream, not one per kernel read until 1 MiB.
//! `SEQUENTIAL_FROM` keeps one block of margin over the scan's readahead; a scan that reads on
//! past it is fetched whole (the scan's jump to the tail is further away). Once a whole
//! transfer has taken over (`close`), no read here fetches again: reads queued behind the lock
//! are answered by the stream.
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{Fetcher, write_making_room};
use crate::index::Package;

pub const BLOCK: u64 = 64 * 1024;
/// A read starting below this fetches at least up to it (a whole number of blocks).
pub const HEAD: u64 = 6 * BLOCK;
/// A read from here on, within `READAHEAD` of a gap-free head, is a whole reader's.
pub const SEQUENTIAL_FROM: u64 = 8 * BLOCK;
/// How far ahead of a reader the kernel reads (the mount's `max_readahead`, see `fs`): its
/// reads of one window arrive together, in any order.
const READAHEAD: u64 = 1 << 20;

/// What a ranged read found.
#[derive(Debug)]
pub enum Ranged {
    /// The bytes asked for (unverified).
    Data(Vec<u8>),
    /// The server does not serve ranges.
    NoRanges,
    /// The read goes on in order from a long gap-free prefix: a whole reader, to be served by
    /// the whole transfer (nothing was fetched).
    Sequential,
    /// A whole transfer took over while this read waited (nothing was fetched).
    Closed,
}

pub struct Sparse {
    file: Arc<File>,
    path: PathBuf,
    /// Blocks on disk. The async mutex also serialises this file's range requests, so two
    /// readers of the same header never fetch it twice.
    blocks: tokio::sync::Mutex<BTreeSet<u64>>,
    /// Bytes from offset 0 covered without a gap: what a promoted transfer can adopt.
    prefix: AtomicU64,
    held: AtomicU64,
    /// Set when a whole transfer takes over (`close`).
    closed: AtomicBool,
    /// See `tail_served`.
    tail_served: AtomicBool,
}

impl Sparse {
    pub fn new(file: File, path: PathBuf) -> Sparse {
        Sparse {
            file: Arc::new(file),
            path,
            blocks: tokio::sync::Mutex::new(BTreeSet::new()),
            prefix: AtomicU64::new(0),
            held: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            tail_served: AtomicBool::new(false),
        }
    }

    /// Bytes `offset..end` of `pkg`, fetching the blocks that are missing (one request, with
    /// the fetcher's breaker and retries), or what to do instead (see `Ranged`).
    pub async fn read(
        &self,
        fetcher: &Fetcher,
        pkg: &Package,
        (offset, end): (u64, u64),
    ) -> Result<Ranged, String> {
        {
            let mut blocks = self.blocks.lock().await;
            if self.closed.load(Ordering::SeqCst) {
                return Ok(Ranged::Closed);
            }
            let prefix = self.prefix_len();
            if offset >= SEQUENTIAL_FROM && prefix >= HEAD && offset < prefix + READAHEAD {
                self.close();
                return Ok(Ranged::Sequential);
            }
            if end == pkg.size {
                // Said before the request, and before looking at `closed` again: a whole
                // reader that sees the promotion (which closes first) then sees this too, so
                // it never misses an unchecked tail on its way to a reader.
                self.tail_served.store(true, Ordering::SeqCst);
                if self.closed.load(Ordering::SeqCst) {
                    return Ok(Ranged::Closed);
                }
            }
            // The head comes whole from block 0, whichever of the kernel's readahead reads
            // takes the lock first.
            let (first, want) = if prefix < HEAD && offset < SEQUENTIAL_FROM + READAHEAD {
                (0, end.max(HEAD))
            } else {
                (offset / BLOCK, end)
            };
            let last = (want.min(pkg.size) - 1) / BLOCK;
            let missing: Vec<u64> = (first..=last).filter(|b| !blocks.contains(b)).collect();
            if let (Some(&a), Some(&b)) = (missing.first(), missing.last()) {
                let from = a * BLOCK;
                let len = ((b + 1) * BLOCK).min(pkg.size) - from;
                let Some(data) = fetcher.read_range(pkg, from, len).await? else {
                    self.close();
                    return Ok(Ranged::NoRanges);
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
            Ok(Ok(buf)) => Ok(Ranged::Data(buf)),
            Ok(Err(e)) => Err(format!("reading sparse cache file: {e}")),
            Err(e) => Err(format!("reading sparse cache file: {e}")),
        }
    }

    /// No read fetches from now on: a whole transfer serves them.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
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

    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// A read of the file's final byte was let through here: unchecked, as a metadata scan
    /// needs it. Set before that read's request goes out.
    pub fn tail_served(&self) -> bool {
        self.tail_served.load(Ordering::SeqCst)
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
