//! What an open, read, lookup or readdir means, decided without FUSE and returned as plain
//! values; `fs` only translates requests into these calls and decisions into replies and
//! notifications.
//!
//! The vfs owns what the kernel's view of the mount depends on:
//!
//! * **Inodes the kernel holds.** Every inode handed out (a `lookup` reply, a `readdirplus`
//!   entry) is counted, and stays answerable, with the attributes it was handed out with, until
//!   the kernel forgets it (`forget`), even when a refresh swapped in a tree without it. An
//!   inode the current tree lacks is answered from the tree it was last handed out from
//!   (issue 11.2: `fstat` of a file opened before a refresh got `ENOENT`).
//! * **Names the kernel caches.** At a swap, every name of a held inode that now means another
//!   inode (or nothing) is invalidated at once (`Invalidation::Entry`), so a new lookup sees
//!   the new tree without waiting for the entry TTL.
//! * **Pages the kernel caches.** The kernel may only keep pages a whole reader may see: bytes
//!   read from a verified file. A read answered while its blob was not complete (ranged bytes
//!   of a metadata scan, bytes of a transfer not yet checked) marks its inode *unchecked*. Such
//!   an inode never gets `keep_cache` (the kernel drops its pages at the open), and its pages
//!   are dropped (`Invalidation::Pages`) when the blob is promoted and when it is complete,
//!   whoever caused that: a prefetch, another reader, a later open (issue 11.1: a prefetch
//!   verified a file whose unchecked tail the kernel kept). The mark is cleared once a drop
//!   ordered after the last unchecked read is done.
//! * **Passthrough.** A complete package is handed to the kernel as a backing file where the
//!   kernel allows; the kernel refuses to mix cached and passthrough opens of one inode, so an
//!   inode with a cached open stays cached until that handle is released.
//! * **Directory listings.** The mount uses no-opendir, so there is no directory handle to pin
//!   a tree to. Instead the readdir cookie carries the tree's generation (high 32 bits) and the
//!   entry index (low 32 bits); a listing continued after a swap reads on in the tree it started
//!   in, so it never skips or repeats an entry. The last `LISTED_TREES` trees are kept for this;
//!   a listing that spans more swaps than that (minutes, at the shortest TTL) continues in the
//!   current tree.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use crate::error::FsError;
use crate::fetch::{Blob, Fetcher, PageEvent};
use crate::index::Package;
use crate::namespace::{Attr, Namespace, Node, NodeKind, ROOT_INO};
use crate::snapshot::Snapshot;

/// How many trees (the current one included) a directory listing can continue in.
pub const LISTED_TREES: usize = 4;

/// What the kernel should be told to forget, in the order it is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// Drop the inode's cached pages; then report `Vfs::pages_dropped(ino, epoch)`.
    Pages { ino: u64, epoch: u64 },
    /// Drop the cached name `name` in directory `parent`.
    Entry { parent: u64, name: Box<str> },
}

/// How to answer an open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenDecision {
    pub fh: u64,
    /// The kernel may keep the inode's cached pages (`FOPEN_KEEP_CACHE`): they are verified.
    pub keep_cache: bool,
    /// Hand the blob's file to the kernel (FUSE passthrough); `fs` must then call
    /// `passthrough_refused` if the kernel will not take it.
    pub passthrough: bool,
}

/// An open file, as a handle holds it: the version it was opened with, whatever swaps later.
pub enum Handle {
    Package {
        blob: Arc<Blob>,
        attr: Attr,
        passthrough: bool,
    },
    Index {
        raw: Bytes,
        attr: Attr,
    },
}

impl Handle {
    pub fn attr(&self) -> Attr {
        match self {
            Handle::Package { attr, .. } | Handle::Index { attr, .. } => *attr,
        }
    }
}

/// What the vfs knows about one inode the kernel holds (or has open, or reads).
struct Inode {
    /// Lookups handed out minus those forgotten.
    lookups: u64,
    /// The newest tree this inode was handed out from: answers for it if the current tree
    /// has no such inode.
    ns: Arc<Namespace>,
    /// The kernel may hold pages of this inode that were not verified when they were read.
    unchecked: bool,
    /// Bumped by every unchecked read; a page drop ordered at `epoch` clears `unchecked` only
    /// if no unchecked read began since.
    epoch: u64,
    /// Unchecked reads not yet answered.
    unchecked_reads: u32,
    /// The blob whose page events are watched for this inode (by address), if any.
    watching: usize,
    cached_opens: usize,
    passthrough_opens: usize,
}

impl Inode {
    fn new(ns: Arc<Namespace>) -> Inode {
        Inode {
            lookups: 0,
            ns,
            unchecked: false,
            epoch: 0,
            unchecked_reads: 0,
            watching: 0,
            cached_opens: 0,
            passthrough_opens: 0,
        }
    }

    fn idle(&self) -> bool {
        self.lookups == 0
            && self.cached_opens == 0
            && self.passthrough_opens == 0
            && self.unchecked_reads == 0
    }
}

#[derive(Default)]
struct State {
    handles: HashMap<u64, Arc<Handle>>,
    inodes: HashMap<u64, Inode>,
    /// Recent trees by generation, newest last, for readdir cookies.
    trees: VecDeque<(u32, Arc<Namespace>)>,
}

pub struct Vfs {
    snapshot: Arc<Snapshot>,
    fetcher: Arc<Fetcher>,
    state: Mutex<State>,
    next_fh: AtomicU64,
    passthrough: AtomicBool,
    tx: mpsc::Sender<Invalidation>,
    rx: Mutex<Option<mpsc::Receiver<Invalidation>>>,
}

impl Vfs {
    pub fn new(snapshot: Arc<Snapshot>, fetcher: Arc<Fetcher>) -> Arc<Vfs> {
        let (tx, rx) = mpsc::channel();
        let mut state = State::default();
        state.trees.push_back((1, snapshot.current()));
        let vfs = Arc::new(Vfs {
            snapshot: snapshot.clone(),
            fetcher,
            state: Mutex::new(state),
            next_fh: AtomicU64::new(1),
            passthrough: AtomicBool::new(false),
            tx,
            rx: Mutex::new(Some(rx)),
        });
        let weak = Arc::downgrade(&vfs);
        snapshot.on_swap(move |old, new| {
            if let Some(vfs) = weak.upgrade() {
                vfs.swapped(old, new);
            }
        });
        vfs
    }

    /// The invalidations to carry out, in order (once; `None` after the first call).
    pub fn invalidations(&self) -> Option<mpsc::Receiver<Invalidation>> {
        self.rx.lock().unwrap().take()
    }

    /// Whether complete packages may be handed to the kernel (configured, and agreed by it).
    pub fn set_passthrough(&self, on: bool) {
        self.passthrough.store(on, Ordering::Relaxed);
    }

    pub fn fetcher(&self) -> &Arc<Fetcher> {
        &self.fetcher
    }

    pub fn current(&self) -> Arc<Namespace> {
        self.snapshot.current()
    }

    /// The tree that answers for `ino`: the current one if it has it, else the one the inode
    /// was handed out from while the kernel still holds it.
    fn tree_of(&self, st: &State, ino: u64) -> Option<Arc<Namespace>> {
        let ns = self.snapshot.current();
        if ns.node(ino).is_some() {
            return Some(ns);
        }
        st.inodes
            .get(&ino)
            .map(|i| i.ns.clone())
            .filter(|ns| ns.node(ino).is_some())
    }

    /// Counts one more reference the kernel holds to `node` of `ns`.
    fn hand_out(st: &mut State, ns: &Arc<Namespace>, node: &Node) {
        if node.ino == ROOT_INO {
            return;
        }
        let inode = st
            .inodes
            .entry(node.ino)
            .or_insert_with(|| Inode::new(ns.clone()));
        inode.lookups += 1;
        inode.ns = ns.clone();
    }

    /// A `lookup`: the child's attributes, counted as handed out.
    pub fn lookup(&self, parent: u64, name: &str) -> Result<Attr, FsError> {
        let mut st = self.state.lock().unwrap();
        let ns = self.tree_of(&st, parent).ok_or(FsError::NotFound)?;
        let node = ns.lookup(parent, name).ok_or(FsError::NotFound)?;
        let attr = ns.attr(node);
        Self::hand_out(&mut st, &ns, node);
        Ok(attr)
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        let mut st = self.state.lock().unwrap();
        if let Some(inode) = st.inodes.get_mut(&ino) {
            inode.lookups = inode.lookups.saturating_sub(n);
            if inode.idle() {
                st.inodes.remove(&ino);
            }
        }
    }

    /// Whether the vfs still keeps state for `ino` (for tests: forgotten inodes are dropped).
    pub fn holds(&self, ino: u64) -> bool {
        self.state.lock().unwrap().inodes.contains_key(&ino)
    }

    /// Attributes: of the handle's version when there is a handle, else of the inode.
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<Attr, FsError> {
        let st = self.state.lock().unwrap();
        if let Some(h) = fh.and_then(|fh| st.handles.get(&fh)) {
            return Ok(h.attr());
        }
        let ns = self.tree_of(&st, ino).ok_or(FsError::NotFound)?;
        Ok(ns.attr(ns.node(ino).expect("tree_of checked")))
    }

    /// Whether `ino` exists (for `access`).
    pub fn exists(&self, ino: u64) -> bool {
        let st = self.state.lock().unwrap();
        self.tree_of(&st, ino).is_some()
    }

    pub fn handle(&self, fh: u64) -> Result<Arc<Handle>, FsError> {
        let st = self.state.lock().unwrap();
        st.handles.get(&fh).cloned().ok_or(FsError::BadHandle)
    }

    /// Opens a file read-only. A package goes through the fetcher, which may start a transfer:
    /// call from within the tokio runtime.
    pub fn open(&self, ino: u64, write: bool) -> Result<OpenDecision, FsError> {
        if write {
            return Err(FsError::ReadOnly);
        }
        let (ns, pkg): (Arc<Namespace>, Option<Package>) = {
            let st = self.state.lock().unwrap();
            let ns = self.tree_of(&st, ino).ok_or(FsError::NotFound)?;
            let node = ns.node(ino).expect("tree_of checked");
            match &node.kind {
                NodeKind::Dir(_) => return Err(FsError::IsDir),
                NodeKind::IndexFile => (ns.clone(), None),
                NodeKind::Package(_) => {
                    let pkg = ns.package(node).cloned();
                    (ns.clone(), pkg)
                }
            }
        };
        let attr = ns.attr(ns.node(ino).expect("tree_of checked"));
        // Outside the lock: opening a cache entry is disk I/O.
        let blob = pkg.map(|p| self.fetcher.open(&p)).transpose()?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let mut st = self.state.lock().unwrap();
        let (handle, decision) = match blob {
            None => (
                Handle::Index {
                    raw: ns.index.raw.clone(),
                    attr,
                },
                // The index is in memory and its inode carries its content identity.
                OpenDecision {
                    fh,
                    keep_cache: true,
                    passthrough: false,
                },
            ),
            Some(blob) => {
                let complete = blob.is_complete();
                let inode = st
                    .inodes
                    .entry(ino)
                    .or_insert_with(|| Inode::new(ns.clone()));
                let passthrough = self.passthrough.load(Ordering::Relaxed)
                    && complete
                    && blob.file().is_some()
                    && inode.cached_opens == 0;
                let keep_cache = !passthrough && complete && !inode.unchecked;
                if passthrough {
                    inode.passthrough_opens += 1;
                } else {
                    inode.cached_opens += 1;
                    if inode.unchecked_reads == 0 {
                        // The kernel drops every cached page at an open without keep_cache,
                        // before any read of it; unchecked reads after this one mark again.
                        inode.unchecked = false;
                    }
                }
                (
                    Handle::Package {
                        blob,
                        attr,
                        passthrough,
                    },
                    OpenDecision {
                        fh,
                        keep_cache,
                        passthrough,
                    },
                )
            }
        };
        st.handles.insert(fh, Arc::new(handle));
        Ok(decision)
    }

    /// The kernel would not take the backing file: serve this handle (and, from now on, every
    /// open) through `read`. Returns whether the kernel may keep its cached pages.
    pub fn passthrough_refused(&self, fh: u64) -> bool {
        self.passthrough.store(false, Ordering::Relaxed);
        let mut st = self.state.lock().unwrap();
        let Some(h) = st.handles.get(&fh).cloned() else {
            return false;
        };
        let Handle::Package { blob, attr, .. } = &*h else {
            return true;
        };
        let inode = st.inodes.get_mut(&attr.ino).expect("open inode is known");
        inode.passthrough_opens -= 1;
        inode.cached_opens += 1;
        let keep_cache = blob.is_complete() && !inode.unchecked;
        if inode.unchecked_reads == 0 {
            inode.unchecked = false;
        }
        let handle = Handle::Package {
            blob: blob.clone(),
            attr: *attr,
            passthrough: false,
        };
        st.handles.insert(fh, Arc::new(handle));
        keep_cache
    }

    /// The kernel closed `fh`. Returns whether it was a passthrough open.
    pub fn release(&self, fh: u64) -> bool {
        let mut st = self.state.lock().unwrap();
        let Some(h) = st.handles.remove(&fh) else {
            return false;
        };
        let Handle::Package {
            attr, passthrough, ..
        } = &*h
        else {
            return false;
        };
        if let Some(inode) = st.inodes.get_mut(&attr.ino) {
            if *passthrough {
                inode.passthrough_opens -= 1;
            } else {
                inode.cached_opens -= 1;
            }
            if inode.idle() {
                st.inodes.remove(&attr.ino);
            }
        }
        *passthrough
    }

    /// Reads `size` bytes at `offset` of an open file, waiting as the blob says (see `fetch`).
    /// Call on the tokio runtime.
    pub async fn read(
        self: &Arc<Self>,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, FsError> {
        let h = self.handle(fh)?;
        let (blob, ino) = match &*h {
            Handle::Index { raw, .. } => {
                let start = (offset as usize).min(raw.len());
                let end = start.saturating_add(size as usize).min(raw.len());
                return Ok(raw[start..end].to_vec());
            }
            Handle::Package { blob, attr, .. } => (blob, attr.ino),
        };
        // Decided before the read, so no open can grant keep_cache while its bytes are on
        // their way to the kernel.
        let unchecked = !blob.is_complete();
        if unchecked {
            self.unchecked_read_begins(ino, blob);
        }
        let result = blob.read(offset, size).await;
        if unchecked {
            self.unchecked_read_ends(ino, blob);
        }
        result
    }

    fn unchecked_read_begins(self: &Arc<Self>, ino: u64, blob: &Arc<Blob>) {
        let mut st = self.state.lock().unwrap();
        let Some(inode) = st.inodes.get_mut(&ino) else {
            return;
        };
        inode.unchecked = true;
        inode.epoch += 1;
        inode.unchecked_reads += 1;
        let addr = Arc::as_ptr(blob) as usize;
        if inode.watching != addr {
            inode.watching = addr;
            let mut events = blob.page_events();
            let vfs = Arc::downgrade(self);
            tokio::spawn(async move {
                while let Some(event) = events.next().await {
                    let Some(vfs) = Weak::upgrade(&vfs) else {
                        return;
                    };
                    vfs.blob_event(ino, event);
                }
            });
        }
    }

    fn unchecked_read_ends(&self, ino: u64, blob: &Blob) {
        let mut st = self.state.lock().unwrap();
        let Some(inode) = st.inodes.get_mut(&ino) else {
            return;
        };
        inode.unchecked_reads -= 1;
        // The blob's completion may have come while this read was running: its page drop could
        // not clear the mark, so order another now that the last such read is answered.
        if inode.unchecked_reads == 0 && blob.is_complete() {
            let epoch = inode.epoch;
            let _ = self.tx.send(Invalidation::Pages { ino, epoch });
        }
    }

    /// A watched blob of `ino` was promoted or completed: drop the pages it served unchecked.
    fn blob_event(&self, ino: u64, _event: PageEvent) {
        let st = self.state.lock().unwrap();
        if let Some(inode) = st.inodes.get(&ino)
            && inode.unchecked
        {
            let _ = self.tx.send(Invalidation::Pages {
                ino,
                epoch: inode.epoch,
            });
        }
    }

    /// The page drop ordered at `epoch` is done.
    pub fn pages_dropped(&self, ino: u64, epoch: u64) {
        let mut st = self.state.lock().unwrap();
        if let Some(inode) = st.inodes.get_mut(&ino)
            && inode.epoch == epoch
            && inode.unchecked_reads == 0
        {
            inode.unchecked = false;
        }
    }

    /// Whether the kernel may hold unverified pages of `ino` (for tests and `status`).
    pub fn has_unchecked_pages(&self, ino: u64) -> bool {
        let st = self.state.lock().unwrap();
        st.inodes.get(&ino).is_some_and(|i| i.unchecked)
    }

    /// Lists directory `ino` from cookie `offset` (0: from the start) to `add(cookie, attr,
    /// name)`, which returns true when the reply is full (that entry is not in it). With
    /// `plus`, every entry added but `.` and `..` counts as handed out, as the kernel counts
    /// `readdirplus` entries.
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        plus: bool,
        mut add: impl FnMut(u64, &Attr, &str) -> bool,
    ) -> Result<(), FsError> {
        let mut st = self.state.lock().unwrap();
        let (generation, start) = split_cookie(offset);
        let pinned = (offset != 0)
            .then(|| st.trees.iter().find(|(g, _)| *g == generation).cloned())
            .flatten()
            .filter(|(_, ns)| ns.node(ino).is_some());
        let (generation, ns) = match pinned {
            Some(t) => t,
            None => {
                let (g, current) = st.trees.back().cloned().expect("always one tree");
                match self.tree_of(&st, ino) {
                    Some(ns) if Arc::ptr_eq(&ns, &current) => (g, ns),
                    // A directory only an older tree has: list that tree (generation 0 is
                    // never pinned, so a continuation lists it again from the same tree).
                    Some(ns) => (0, ns),
                    None => return Err(FsError::NotFound),
                }
            }
        };
        let (parent, children) = ns.dir(ino).ok_or(FsError::NotFound)?;
        let node_of = |ino| ns.node(ino);
        let dots = [(node_of(ino), "."), (node_of(parent), "..")];
        let dots = dots.into_iter().filter_map(|(n, name)| Some((n?, name)));
        let all = dots.chain(children.map(|n| (n, &*n.name)));
        for (i, (node, name)) in all.enumerate().skip(start as usize) {
            if add(cookie(generation, i as u64 + 1), &ns.attr(node), name) {
                break;
            }
            if plus && i >= 2 {
                Self::hand_out(&mut st, &ns, node);
            }
        }
        Ok(())
    }

    /// A refresh swapped `old` for `new`: keep held inodes answerable, drop stale names, and
    /// remember `new` for listings.
    fn swapped(&self, old: &Arc<Namespace>, new: &Arc<Namespace>) {
        let mut st = self.state.lock().unwrap();
        let generation = st.trees.back().map_or(0, |(g, _)| *g) + 1;
        st.trees.push_back((generation, new.clone()));
        while st.trees.len() > LISTED_TREES {
            st.trees.pop_front();
        }
        let mut stale = BTreeSet::new();
        for (&ino, inode) in st.inodes.iter_mut() {
            if new.node(ino).is_some() {
                inode.ns = new.clone();
            }
            let tree = if Arc::ptr_eq(&inode.ns, new) {
                old
            } else {
                &inode.ns
            };
            if let Some((parent, name)) = tree.parent_and_name(ino)
                && new.lookup(parent, name).map(|n| n.ino) != Some(ino)
            {
                stale.insert((parent, Box::<str>::from(name)));
            }
        }
        for (parent, name) in stale {
            let _ = self.tx.send(Invalidation::Entry { parent, name });
        }
    }
}

fn cookie(generation: u32, next: u64) -> u64 {
    (u64::from(generation) << 32) | (next & 0xffff_ffff)
}

fn split_cookie(offset: u64) -> (u32, u64) {
    ((offset >> 32) as u32, offset & 0xffff_ffff)
}

#[cfg(test)]
mod model;
#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;
