//! In-process rig for the vfs tests: a scripted binhost behind the real `Transport` seam, the
//! real fetcher, store, lifecycle and vfs, and a model of the kernel's side (lookup counts,
//! page cache per inode, what `keep_cache` and page drops do to it).

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sha1::{Digest as _, Sha1};
use tempfile::TempDir;

use super::{Invalidation, Vfs};
use crate::cache::Store;
use crate::error::FsError;
use crate::fetch::Fetcher;
use crate::index::{Index, Package};
use crate::lifecycle::Lifecycle;
use crate::namespace::{Attr, ROOT_INO};
use crate::remote::{Body, Chunks, Endpoint, ErrorKind, IndexFetch, Transport, TransportError};

/// How long a stalled answer takes to fail (a transport's stall timeout).
const STALL: Duration = Duration::from_secs(30);

/// The kernel reads in pages of this size (one sparse block, so a ranged read is one request).
pub const PAGE: u64 = 64 * 1024;

/// How the scripted server answers for one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Honest,
    /// Ranged reads (a metadata scan) answer with one byte flipped; whole reads are honest.
    LieRanges,
    /// Every answer has one byte flipped.
    Lie,
    /// Whole reads stop halfway.
    Truncate,
    NotFound,
    /// Nothing comes until the stall timeout (paused time: quick).
    Stall,
}

#[derive(Default)]
pub struct Server {
    files: Mutex<HashMap<String, Vec<u8>>>,
    faults: Mutex<HashMap<String, Fault>>,
    index: Mutex<Bytes>,
}

impl Server {
    pub fn set_fault(&self, path: &str, fault: Fault) {
        self.faults.lock().unwrap().insert(path.into(), fault);
    }

    /// The bytes `from..to` as the fault makes them, and how many the server announces.
    fn answer(
        &self,
        path: &str,
        from: u64,
        to: u64,
        ranged: bool,
    ) -> Result<(Vec<u8>, u64), ErrorKind> {
        let fault = *self
            .faults
            .lock()
            .unwrap()
            .get(path)
            .unwrap_or(&Fault::Honest);
        let files = self.files.lock().unwrap();
        let file = files.get(path).ok_or(ErrorKind::NotFound)?;
        let to = to.min(file.len() as u64);
        let mut out = file[from.min(to) as usize..to as usize].to_vec();
        let announced = out.len() as u64;
        let flip = |out: &mut Vec<u8>| {
            let mid = out.len() / 2;
            if let Some(b) = out.get_mut(mid) {
                *b ^= 0x5a;
            }
        };
        match fault {
            Fault::Honest => {}
            Fault::LieRanges if ranged => flip(&mut out),
            Fault::LieRanges => {}
            Fault::Lie => flip(&mut out),
            Fault::Truncate if !ranged => out.truncate(out.len() / 2),
            Fault::Truncate => {}
            Fault::NotFound => return Err(ErrorKind::NotFound),
            Fault::Stall => return Err(ErrorKind::Retryable),
        }
        Ok((out, announced))
    }

    fn is_stalled(&self, path: &str) -> bool {
        self.faults.lock().unwrap().get(path) == Some(&Fault::Stall)
    }
}

struct Scripted(Arc<Server>);

struct Mem(Vec<Bytes>);

#[async_trait::async_trait]
impl Chunks for Mem {
    async fn next(&mut self) -> Result<Option<Bytes>, TransportError> {
        tokio::task::yield_now().await;
        Ok(self.0.pop())
    }
}

fn err(kind: ErrorKind, path: &str) -> TransportError {
    TransportError::new(kind, format!("scripted {kind:?} for {path}"))
}

#[async_trait::async_trait]
impl Transport for Scripted {
    async fn fetch_index(
        &self,
        _: Option<&crate::index::Validators>,
    ) -> Result<IndexFetch, TransportError> {
        Ok(IndexFetch::Fresh {
            raw: self.0.index.lock().unwrap().clone(),
            validators: Default::default(),
        })
    }

    async fn open(&self, path: &str, from: u64, to: Option<u64>) -> Result<Body, TransportError> {
        if self.0.is_stalled(path) {
            tokio::time::sleep(STALL).await;
        }
        let (data, len) = self
            .0
            .answer(path, from, to.unwrap_or(u64::MAX), false)
            .map_err(|k| err(k, path))?;
        let mut chunks: Vec<Bytes> = data
            .chunks(256 * 1024)
            .map(Bytes::copy_from_slice)
            .collect();
        chunks.reverse();
        Ok(Body::whole(Box::new(Mem(chunks)), 0, Some(len)))
    }

    async fn read_range(
        &self,
        path: &str,
        from: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, TransportError> {
        if self.0.is_stalled(path) {
            tokio::time::sleep(STALL).await;
        }
        let (data, _) = self
            .0
            .answer(path, from, from + len, true)
            .map_err(|k| err(k, path))?;
        if (data.len() as u64) < len {
            return Err(err(ErrorKind::Fatal, path));
        }
        Ok(Some(data))
    }

    fn may_split(&self) -> bool {
        false
    }
}

/// Polls `f` once.
async fn futures_poll<F: std::future::Future>(
    f: std::pin::Pin<&mut F>,
) -> std::task::Poll<F::Output> {
    let mut f = Some(f);
    std::future::poll_fn(move |cx| std::task::Poll::Ready(f.take().unwrap().poll(cx))).await
}

/// The bytes of build `build` of a file of `size` bytes.
pub fn content(size: usize, build: u32) -> Vec<u8> {
    thread_local! {
        // Generating megabytes per step in a debug build would dominate the model test.
        static MADE: std::cell::RefCell<HashMap<(usize, u32), Vec<u8>>> = Default::default();
    }
    MADE.with_borrow_mut(|made| {
        made.entry((size, build))
            .or_insert_with(|| {
                let seed = build.wrapping_mul(0x9e37_79b9) | 1;
                (0..size as u32)
                    .map(|i| ((i ^ seed).wrapping_mul(2_654_435_761) >> 13) as u8)
                    .collect()
            })
            .clone()
    })
}

pub struct Rig {
    pub rt: tokio::runtime::Runtime,
    pub server: Arc<Server>,
    pub store: Arc<Store>,
    pub lifecycle: Arc<Lifecycle>,
    pub fetcher: Arc<Fetcher>,
    pub vfs: Arc<Vfs>,
    pub invalidations: mpsc::Receiver<Invalidation>,
    timestamp: u64,
    _dir: TempDir,
}

impl Rig {
    /// A mount of a binhost holding `files` (path, bytes).
    pub fn new(files: &[(&str, Vec<u8>)]) -> Rig {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let dir = TempDir::new().unwrap();
        let store = Arc::new(Store::open(dir.path(), 1 << 30).unwrap());
        let server = Arc::new(Server::default());
        let mut rig_ts = 1;
        server.publish(files, &mut rig_ts);
        let endpoint = Arc::new(Endpoint::new(Box::new(Scripted(server.clone()))));
        let lifecycle = rt
            .block_on(Lifecycle::start(
                endpoint.clone(),
                store.clone(),
                "scripted:".into(),
            ))
            .unwrap();
        let lifecycle = Arc::new(lifecycle);
        let fetcher = Arc::new(Fetcher::new(endpoint, store.clone()));
        let vfs = Vfs::new(lifecycle.ns.clone(), fetcher.clone());
        let invalidations = vfs.invalidations().unwrap();
        Rig {
            rt,
            server,
            store,
            lifecycle,
            fetcher,
            vfs,
            invalidations,
            timestamp: rig_ts,
            _dir: dir,
        }
    }

    /// Puts `files` on the server with a new index (the mount sees it at `refresh`).
    pub fn publish(&mut self, files: &[(&str, Vec<u8>)]) {
        self.server.publish(files, &mut self.timestamp);
    }

    pub fn refresh(&self) {
        self.drive(self.lifecycle.refresh());
    }

    /// Runs `f` to its end on the rig's runtime, moving the paused clock on while it waits:
    /// retry backoffs and stalls then take no wall-clock time. (Tokio does not advance a paused
    /// clock by itself while a blocking task, here the writer, runs.)
    pub fn drive<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(async {
            let mut f = std::pin::pin!(f);
            loop {
                for _ in 0..32 {
                    if let std::task::Poll::Ready(out) = futures_poll(f.as_mut()).await {
                        return out;
                    }
                    tokio::task::yield_now().await;
                }
                // Let the blocking writer have a moment, then move time on.
                std::thread::sleep(Duration::from_micros(100));
                tokio::time::advance(Duration::from_millis(250)).await;
            }
        })
    }

    /// Looks a path up from the root, as the kernel does, one handed-out inode per component.
    pub fn lookup(&self, path: &str) -> Result<Attr, FsError> {
        let mut attr = self.vfs.getattr(ROOT_INO, None)?;
        for name in path.split('/') {
            attr = self.vfs.lookup(attr.ino, name)?;
        }
        Ok(attr)
    }

    pub fn open(&self, ino: u64) -> Result<super::OpenDecision, FsError> {
        let _rt = self.rt.enter();
        self.vfs.open(ino, false)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        self.drive(self.vfs.read(fh, offset, size))
    }

    /// The package the current tree has at `path`.
    pub fn package(&self, path: &str) -> Package {
        let ns = self.vfs.current();
        ns.index
            .packages
            .iter()
            .find(|p| &*p.path == path)
            .unwrap()
            .clone()
    }

    pub fn prefetch(&self, path: &str) -> Result<(), FsError> {
        let pkg = self.package(path);
        self.drive(self.fetcher.fetch_whole(&pkg))
    }

    /// Lets background transfers, commits and watchers run (paused time: instant).
    pub fn settle(&self) {
        self.drive(async { tokio::time::sleep(Duration::from_secs(2)).await });
    }

    pub fn take_invalidations(&self) -> Vec<Invalidation> {
        self.invalidations.try_iter().collect()
    }
}

impl Server {
    fn publish(&self, files: &[(&str, Vec<u8>)], timestamp: &mut u64) {
        *timestamp += 1;
        let mut text = format!("TIMESTAMP: {timestamp}\nVERSION: 0\n\n");
        let mut served = self.files.lock().unwrap();
        for (i, (path, bytes)) in files.iter().enumerate() {
            let sha1 = sha1_hex(bytes);
            text += &format!(
                "CPV: c/p{i}-1\nPATH: {path}\nSIZE: {}\nMTIME: 1000\nSHA1: {sha1}\n\n",
                bytes.len()
            );
            served.insert(path.to_string(), bytes.clone());
        }
        assert!(Index::parse(Bytes::from(text.clone())).is_ok());
        *self.index.lock().unwrap() = Bytes::from(text);
    }
}

/// SHA1 of `bytes`, remembered: hashing megabytes per step in a debug build (the digest
/// crates' inlined rounds are built at the caller's opt-level) would dominate the model test.
/// SHA1 alone, as some binhosts list it: its SHA-NI rounds are the fastest check unoptimised.
fn sha1_hex(bytes: &[u8]) -> String {
    thread_local! {
        static DONE: std::cell::RefCell<HashMap<Vec<u8>, String>> = Default::default();
    }
    // `content` differs everywhere between builds: a sample names the bytes.
    let mut sample: Vec<u8> = bytes.iter().step_by(4093).copied().collect();
    sample.extend((bytes.len() as u64).to_le_bytes());
    DONE.with_borrow_mut(|done| {
        done.entry(sample)
            .or_insert_with(|| hex::encode(Sha1::digest(bytes)))
            .clone()
    })
}

/// The kernel's side, as far as the vfs's decisions touch it.
#[derive(Default)]
pub struct Kernel {
    /// Cached pages per inode, by page number.
    pub pages: HashMap<u64, BTreeMap<u64, Vec<u8>>>,
    /// Lookup counts the kernel holds.
    pub lookups: HashMap<u64, u64>,
}

impl Kernel {
    /// Carries out the vfs's invalidations, as `fs`'s notifier thread does.
    pub fn apply(&mut self, rig: &Rig) {
        for inv in rig.take_invalidations() {
            if let Invalidation::Pages { ino, epoch } = inv {
                self.pages.remove(&ino);
                rig.vfs.pages_dropped(ino, epoch);
            }
        }
    }

    /// Looks `path` up and counts the handed-out inodes.
    pub fn lookup(&mut self, rig: &Rig, path: &str) -> Result<Attr, FsError> {
        let mut attr = rig.vfs.getattr(ROOT_INO, None)?;
        for name in path.split('/') {
            attr = rig.vfs.lookup(attr.ino, name)?;
            *self.lookups.entry(attr.ino).or_default() += 1;
        }
        Ok(attr)
    }

    /// Opens `ino`; returns the decision. Without keep_cache the kernel drops the pages.
    pub fn open(&mut self, rig: &Rig, ino: u64) -> Result<super::OpenDecision, FsError> {
        self.apply(rig);
        let d = rig.open(ino)?;
        if !d.keep_cache && !d.passthrough {
            self.pages.remove(&ino);
        }
        Ok(d)
    }

    /// Reads page `n` through the page cache (passthrough handles bypass it).
    pub fn read_page(
        &mut self,
        rig: &Rig,
        ino: u64,
        d: &super::OpenDecision,
        n: u64,
    ) -> Result<Vec<u8>, FsError> {
        self.apply(rig);
        if !d.passthrough
            && let Some(p) = self.pages.get(&ino).and_then(|p| p.get(&n))
        {
            return Ok(p.clone());
        }
        let data = rig.read(d.fh, n * PAGE, PAGE as u32)?;
        if !d.passthrough && !data.is_empty() {
            self.pages.entry(ino).or_default().insert(n, data.clone());
        }
        self.apply(rig);
        Ok(data)
    }

    /// Reads the whole file from 0 to EOF, as `cat` does.
    pub fn read_all(
        &mut self,
        rig: &Rig,
        ino: u64,
        d: &super::OpenDecision,
        size: u64,
    ) -> Result<Vec<u8>, FsError> {
        let mut out = Vec::new();
        for n in 0..size.div_ceil(PAGE) {
            out.extend(self.read_page(rig, ino, d, n)?);
        }
        Ok(out)
    }
}
