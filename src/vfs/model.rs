//! A model-based test of the read path (issue 11.8): random sequences of opens, ranged and
//! whole reads, prefetches, promotions, evictions, index refreshes (same and new builds),
//! server faults, closes and forgets, driven through the real fetcher and vfs with a scripted
//! transport and a model of the kernel's page cache (`testkit::Kernel`).
//!
//! Invariants, checked after every step:
//! * a reader that reads a file from 0 to EOF gets the index's bytes or an error, never others;
//! * pages the vfs lets the kernel keep (not marked unchecked; `keep_cache` at an open) are
//!   the index's bytes;
//! * every inode handed out answers, with the attributes it was handed out with, until it is
//!   forgotten; every open handle answers with the attributes it was opened with;
//! * every cache object holds the bytes its key names.

use std::collections::HashMap;

use proptest::prelude::*;

use super::OpenDecision;
use super::testkit::{Fault, Kernel, PAGE, Rig, content};
use crate::index::Package;
use crate::namespace::{Attr, INDEX_NAME};

/// One package large enough to be read sparse (over `fetch::WHOLE_BELOW`), two fetched whole.
/// (Each whole transfer of the large one is hashed in a debug build: it sets the test's pace.)
const FILES: [(&str, usize); 3] = [
    ("c/big/big-1.gpkg.tar", (2 << 20) + 5 * PAGE as usize + 7),
    ("c/small-1.tbz2", 150_000),
    ("c/small/small-1.gpkg.tar", 200_000),
];

#[derive(Debug, Clone)]
enum Op {
    /// Look the file up, open, read 0..EOF, close (as `cat`).
    Cat(usize),
    /// Look up and open; the handle stays open.
    Open(usize),
    /// Open an inode the kernel holds, whatever the tree says now (a cached dentry).
    OpenHeld(usize),
    ReadPage(usize, u64),
    ReadTail(usize),
    ReadWhole(usize),
    Promote(usize),
    Prefetch(usize),
    Evict,
    Settle,
    /// A new build of the file on the server, at the same PATH (the mount sees it at refresh).
    Publish(usize),
    /// The same builds under a new TIMESTAMP.
    Republish,
    Refresh,
    SetFault(usize, Fault),
    Close(usize),
    /// The kernel forgets every reference to a held inode with no open handle.
    Forget(usize),
    LookupIndex,
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        3 => Just(Fault::Honest),
        2 => Just(Fault::LieRanges),
        1 => Just(Fault::Lie),
        1 => Just(Fault::Truncate),
        1 => Just(Fault::NotFound),
        1 => Just(Fault::Stall),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let f = 0..FILES.len();
    let i = 0..8usize;
    prop_oneof![
        3 => f.clone().prop_map(Op::Cat),
        3 => f.clone().prop_map(Op::Open),
        1 => i.clone().prop_map(Op::OpenHeld),
        3 => (i.clone(), 0..40u64).prop_map(|(h, p)| Op::ReadPage(h, p)),
        3 => i.clone().prop_map(Op::ReadTail),
        2 => i.clone().prop_map(Op::ReadWhole),
        1 => i.clone().prop_map(Op::Promote),
        2 => f.clone().prop_map(Op::Prefetch),
        1 => Just(Op::Evict),
        2 => Just(Op::Settle),
        1 => f.clone().prop_map(Op::Publish),
        1 => Just(Op::Republish),
        2 => Just(Op::Refresh),
        3 => (f, fault()).prop_map(|(f, x)| Op::SetFault(f, x)),
        2 => i.clone().prop_map(Op::Close),
        1 => i.prop_map(Op::Forget),
        1 => Just(Op::LookupIndex),
    ]
}

struct Model {
    rig: Rig,
    k: Kernel,
    /// Builds on the server, and in the tree the mount swapped in last.
    builds: Vec<u32>,
    tree_builds: Vec<u32>,
    /// The right bytes and the attributes of every inode handed out.
    truth: HashMap<u64, Vec<u8>>,
    attrs: HashMap<u64, Attr>,
    handles: Vec<(Attr, OpenDecision)>,
    /// Every package version the mount ever had, with its bytes.
    versions: Vec<(Package, Vec<u8>)>,
}

impl Model {
    fn new(passthrough: bool) -> Model {
        let builds = vec![1; FILES.len()];
        let rig = Rig::new(&files(&builds));
        rig.vfs.set_passthrough(passthrough);
        let mut m = Model {
            rig,
            k: Kernel::default(),
            tree_builds: builds.clone(),
            builds,
            truth: HashMap::new(),
            attrs: HashMap::new(),
            handles: Vec::new(),
            versions: Vec::new(),
        };
        m.record_versions();
        m
    }

    fn record_versions(&mut self) {
        let ns = self.rig.vfs.current();
        for (i, (path, size)) in FILES.iter().enumerate() {
            let pkg = ns
                .index
                .packages
                .iter()
                .find(|p| &*p.path == *path)
                .unwrap();
            self.versions
                .push((pkg.clone(), content(*size, self.tree_builds[i])));
        }
    }

    /// Looks a path up; records what the handed-out inode must be.
    fn lookup(&mut self, f: usize) -> Option<Attr> {
        let (path, size) = FILES[f];
        let a = self
            .k
            .lookup(&self.rig, path)
            .expect("every file is in the tree");
        let want = content(size, self.tree_builds[f]);
        self.remember(a, want);
        Some(a)
    }

    fn remember(&mut self, a: Attr, want: Vec<u8>) {
        if let Some(old) = self.attrs.insert(a.ino, a) {
            assert_eq!(old, a, "an inode changed its attributes");
        }
        if let Some(old) = self.truth.insert(a.ino, want.clone()) {
            assert!(old == want, "an inode changed its content");
        }
    }

    fn open(&mut self, a: Attr) {
        if let Ok(d) = self.k.open(&self.rig, a.ino) {
            if d.keep_cache {
                self.check_pages(a.ino, "kept at open");
            }
            self.handles.push((a, d));
        }
    }

    fn handle(&self, i: usize) -> Option<(Attr, OpenDecision)> {
        (!self.handles.is_empty()).then(|| self.handles[i % self.handles.len()])
    }

    /// Reads 0..EOF on a handle: the right bytes or an error.
    fn read_whole(&mut self, a: Attr, d: OpenDecision) {
        if let Ok(got) = self.k.read_all(&self.rig, a.ino, &d, a.size) {
            assert!(
                got == self.truth[&a.ino],
                "a whole reader got wrong bytes (ino {}, passthrough {})",
                a.ino,
                d.passthrough
            );
        }
    }

    fn check_pages(&self, ino: u64, why: &str) {
        let Some(pages) = self.k.pages.get(&ino) else {
            return;
        };
        let want = &self.truth[&ino];
        for (&n, page) in pages {
            let at = (n * PAGE) as usize;
            assert!(
                want.get(at..at + page.len()) == Some(&page[..]),
                "{why}: the kernel keeps a wrong page {n} of inode {ino}"
            );
        }
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Cat(f) => {
                if let Some(a) = self.lookup(f)
                    && let Ok(d) = self.k.open(&self.rig, a.ino)
                {
                    if d.keep_cache {
                        self.check_pages(a.ino, "kept at open");
                    }
                    self.read_whole(a, d);
                    self.rig.vfs.release(d.fh);
                }
            }
            Op::Open(f) => {
                if let Some(a) = self.lookup(f) {
                    self.open(a);
                }
            }
            Op::OpenHeld(i) => {
                let mut held: Vec<u64> = self.k.lookups.keys().copied().collect();
                held.sort_unstable();
                held.retain(|ino| self.truth.contains_key(ino) && !self.attrs[ino].is_dir);
                if !held.is_empty() {
                    let a = self.attrs[&held[i % held.len()]];
                    self.open(a);
                }
            }
            Op::ReadPage(h, p) => {
                if let Some((a, d)) = self.handle(h) {
                    let n = p % a.size.div_ceil(PAGE).max(1);
                    let _ = self.k.read_page(&self.rig, a.ino, &d, n);
                }
            }
            Op::ReadTail(h) => {
                if let Some((a, d)) = self.handle(h)
                    && a.size > 0
                {
                    let _ = self.k.read_page(&self.rig, a.ino, &d, (a.size - 1) / PAGE);
                }
            }
            Op::ReadWhole(h) => {
                if let Some((a, d)) = self.handle(h) {
                    self.read_whole(a, d);
                }
            }
            Op::Promote(h) => {
                if let Some((_, d)) = self.handle(h)
                    && let Ok(handle) = self.rig.vfs.handle(d.fh)
                    && let super::Handle::Package { blob, .. } = &*handle
                {
                    let _rt = self.rig.rt.enter();
                    let _ = blob.promote();
                }
            }
            Op::Prefetch(f) => {
                let _ = self.rig.prefetch(FILES[f].0);
            }
            Op::Evict => {
                self.rig.store.evict_one();
            }
            Op::Settle => self.rig.settle(),
            Op::Publish(f) => {
                self.builds[f] += 1;
                let files = files(&self.builds);
                self.rig.publish(&files);
            }
            Op::Republish => {
                let files = files(&self.builds);
                self.rig.publish(&files);
            }
            Op::Refresh => {
                self.rig.refresh();
                self.tree_builds = self.builds.clone();
                self.record_versions();
            }
            Op::SetFault(f, x) => self.rig.server.set_fault(FILES[f].0, x),
            Op::Close(h) => {
                if !self.handles.is_empty() {
                    let (_, d) = self.handles.remove(h % self.handles.len());
                    self.rig.vfs.release(d.fh);
                }
            }
            Op::Forget(i) => {
                let open: Vec<u64> = self.handles.iter().map(|(a, _)| a.ino).collect();
                let mut held: Vec<u64> = self
                    .k
                    .lookups
                    .keys()
                    .copied()
                    .filter(|ino| !open.contains(ino))
                    .collect();
                held.sort_unstable();
                if !held.is_empty() {
                    let ino = held[i % held.len()];
                    let n = self.k.lookups.remove(&ino).unwrap();
                    // An inode the kernel forgets takes its pages with it.
                    self.k.pages.remove(&ino);
                    self.rig.vfs.forget(ino, n);
                }
            }
            Op::LookupIndex => {
                let a = self.k.lookup(&self.rig, INDEX_NAME).unwrap();
                let raw = self.rig.vfs.current().index.raw.to_vec();
                self.remember(a, raw);
                self.open(a);
            }
        }
        self.check();
    }

    fn check(&mut self) {
        self.k.apply(&self.rig);
        let mut inos: Vec<u64> = self.k.pages.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            if !self.rig.vfs.has_unchecked_pages(ino) {
                self.check_pages(ino, "clean per the vfs");
            }
        }
        for (&ino, _) in self.k.lookups.iter() {
            let got = self.rig.vfs.getattr(ino, None);
            let want = self.attrs.get(&ino);
            match (got, want) {
                (Ok(got), Some(want)) if want.is_dir => assert!(got.is_dir),
                (Ok(got), Some(want)) => assert_eq!(got, *want, "inode {ino} changed"),
                (Ok(_), None) => {}
                (Err(e), _) => panic!("inode {ino} held by the kernel answers {e:?}"),
            }
        }
        for (a, d) in &self.handles {
            assert_eq!(self.rig.vfs.getattr(a.ino, Some(d.fh)).unwrap(), *a);
        }
    }

    fn check_cache(&self) {
        for (pkg, bytes) in &self.versions {
            if let Some(file) = self
                .rig
                .store
                .open_object(&pkg.cache_key(), pkg.size)
                .unwrap()
            {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0u8; bytes.len()];
                file.read_exact_at(&mut buf, 0).unwrap();
                assert!(buf == *bytes, "cache object of {} is wrong", pkg.path);
            }
        }
    }
}

fn files(builds: &[u32]) -> Vec<(&'static str, Vec<u8>)> {
    FILES
        .iter()
        .zip(builds)
        .map(|(&(path, size), &b)| (path, content(size, b)))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 100,
        max_shrink_iters: 200,
        .. ProptestConfig::default()
    })]

    #[test]
    fn the_read_path_never_serves_or_keeps_a_wrong_byte_and_inodes_answer_until_forgotten(
        passthrough in any::<bool>(),
        ops in prop::collection::vec(op(), 1..30),
    ) {
        let mut m = Model::new(passthrough);
        for op in &ops {
            m.step(op);
        }
        m.rig.settle();
        m.check();
        m.check_cache();
        for (_, d) in std::mem::take(&mut m.handles) {
            m.rig.vfs.release(d.fh);
        }
        for (ino, n) in std::mem::take(&mut m.k.lookups) {
            m.rig.vfs.forget(ino, n);
            prop_assert!(!m.rig.vfs.holds(ino), "inode {} kept after its last forget", ino);
        }
    }
}
