//! The current tree, shared between the FUSE adapter, the refresher and the prefetcher.
//!
//! A refresh builds a whole new `Namespace` aside and swaps it in with one store: a reader
//! holds the `Arc` it got and sees one tree or the other, never a mix, and `Packages` always
//! matches the tree it describes. Whoever must react to a swap (the vfs: names the kernel
//! caches, inodes it still holds) registers with `on_swap` and is told, old tree and new,
//! right after the store.

use std::sync::{Arc, Mutex, RwLock};

use crate::namespace::Namespace;

type SwapHook = Box<dyn Fn(&Arc<Namespace>, &Arc<Namespace>) + Send + Sync>;

pub struct Snapshot {
    current: RwLock<Arc<Namespace>>,
    /// Serialises swaps, so hooks see them in order; held while the hooks run.
    hooks: Mutex<Vec<SwapHook>>,
}

impl Snapshot {
    pub fn new(ns: Namespace) -> Snapshot {
        Snapshot {
            current: RwLock::new(Arc::new(ns)),
            hooks: Mutex::default(),
        }
    }

    /// The tree as it is now; it stays valid for as long as the caller holds it.
    pub fn current(&self) -> Arc<Namespace> {
        self.current.read().unwrap().clone()
    }

    /// Replaces the tree whole; returns the one it replaced. The hooks run after the store.
    pub fn swap(&self, ns: Namespace) -> Arc<Namespace> {
        let hooks = self.hooks.lock().unwrap();
        let new = Arc::new(ns);
        let old = std::mem::replace(&mut *self.current.write().unwrap(), new.clone());
        for hook in hooks.iter() {
            hook(&old, &new);
        }
        old
    }

    /// Calls `hook(old, new)` after every later swap.
    pub fn on_swap(&self, hook: impl Fn(&Arc<Namespace>, &Arc<Namespace>) + Send + Sync + 'static) {
        self.hooks.lock().unwrap().push(Box::new(hook));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Index;
    use bytes::Bytes;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn ns(ts: u32) -> Namespace {
        let idx = Index::parse(Bytes::from(format!("TIMESTAMP: {ts}\n\n"))).unwrap();
        Namespace::build(Arc::new(idx)).0
    }

    #[test]
    fn a_swap_replaces_the_tree_and_tells_the_hooks_in_order() {
        let snap = Snapshot::new(ns(1));
        let held = snap.current();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let (s, c) = (seen.clone(), calls.clone());
        snap.on_swap(move |old, new| {
            c.fetch_add(1, Ordering::Relaxed);
            s.lock()
                .unwrap()
                .push((old.index.timestamp, new.index.timestamp));
        });
        snap.swap(ns(2));
        snap.swap(ns(3));
        assert_eq!(held.index.timestamp, Some(1), "a held tree never changes");
        assert_eq!(snap.current().index.timestamp, Some(3));
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        assert_eq!(
            *seen.lock().unwrap(),
            [(Some(1), Some(2)), (Some(2), Some(3))]
        );
    }
}
