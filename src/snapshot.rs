//! The current tree, shared between the FUSE adapter, the refresher and the prefetcher.
//!
//! A refresh builds a whole new `Namespace` aside and swaps it in with one store: a reader
//! holds the `Arc` it got and sees one tree or the other, never a mix, and `Packages` always
//! matches the tree it describes.

use std::sync::{Arc, RwLock};

use crate::namespace::Namespace;

pub struct Snapshot {
    current: RwLock<Arc<Namespace>>,
}

impl Snapshot {
    pub fn new(ns: Namespace) -> Snapshot {
        Snapshot {
            current: RwLock::new(Arc::new(ns)),
        }
    }

    /// The tree as it is now; it stays valid for as long as the caller holds it.
    pub fn current(&self) -> Arc<Namespace> {
        self.current.read().unwrap().clone()
    }

    /// Replaces the tree whole; returns the one it replaced.
    pub fn swap(&self, ns: Namespace) -> Arc<Namespace> {
        std::mem::replace(&mut *self.current.write().unwrap(), Arc::new(ns))
    }
}
