//! The directory tree an index describes: inode numbers, names and attributes.
//!
//! A `Namespace` is built once per index snapshot and never changes; an index refresh builds a
//! new one and swaps it in whole, so a lookup sees the old tree or the new one, never a mix.
//!
//! Inode numbers are derived from what a node *is* (a directory's path; a file's path plus its
//! cache key), not from its position. The same file keeps its inode across refreshes, and a
//! package rebuilt at the same PATH gets a new inode, so the kernel's page cache for the old
//! bytes can never be served for the new file.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::index::{Index, Package, Rejected};

pub const ROOT_INO: u64 = 1;
/// The served copy of the index, always at `<mount>/Packages`.
pub const INDEX_NAME: &str = "Packages";

#[derive(Debug)]
pub enum NodeKind {
    /// Children sorted by name, as node ids.
    Dir(Vec<u32>),
    /// Index into `Index::packages`.
    Package(u32),
    /// The `Packages` file itself.
    IndexFile,
}

#[derive(Debug)]
pub struct Node {
    pub ino: u64,
    pub name: Box<str>,
    pub parent: u32,
    pub kind: NodeKind,
}

/// Attributes of one node, as the FUSE layer reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub is_dir: bool,
    pub size: u64,
    pub mtime: i64,
}

#[derive(Debug)]
pub struct Namespace {
    pub index: Arc<Index>,
    nodes: Vec<Node>,
    by_ino: HashMap<u64, u32>,
    /// Newest package mtime, used for directories (any stable value would do).
    dir_mtime: i64,
}

impl Namespace {
    /// Builds the tree. Entries that collide with earlier ones are returned as rejected.
    pub fn build(index: Arc<Index>) -> (Namespace, Vec<Rejected>) {
        let dir_mtime = index
            .timestamp
            .map(|t| t as i64)
            .or_else(|| index.packages.iter().map(|p| p.mtime).max())
            .unwrap_or(0);
        let mut b = Builder {
            nodes: vec![Node {
                ino: ROOT_INO,
                name: "".into(),
                parent: 0,
                kind: NodeKind::Dir(Vec::new()),
            }],
            children: vec![HashMap::new()],
            rejected: Vec::new(),
        };
        // Like every file, the index's inode carries its content identity: the kernel keeps page
        // cache per inode, so a new index of the same size must not look like the old file.
        let index_id = {
            let mut h = DefaultHasher::new();
            index.raw.hash(&mut h);
            h.finish().to_string()
        };
        b.add(
            0,
            INDEX_NAME,
            NodeKind::IndexFile,
            stable_ino(&["i", &index_id]),
        );
        for (i, pkg) in index.packages.iter().enumerate() {
            if let Err(reason) = b.add_package(i as u32, pkg) {
                b.rejected.push(Rejected {
                    what: pkg.path.to_string(),
                    reason,
                });
            }
        }
        let Builder {
            mut nodes,
            children,
            rejected,
        } = b;
        for (id, kids) in children.into_iter().enumerate() {
            if let NodeKind::Dir(list) = &mut nodes[id].kind {
                let mut sorted: Vec<(&str, u32)> = kids.into_iter().collect();
                sorted.sort_unstable();
                *list = sorted.into_iter().map(|(_, id)| id).collect();
            }
        }
        let mut by_ino = HashMap::with_capacity(nodes.len());
        for (id, node) in nodes.iter().enumerate() {
            by_ino.insert(node.ino, id as u32);
        }
        let ns = Namespace {
            index,
            nodes,
            by_ino,
            dir_mtime,
        };
        (ns, rejected)
    }

    pub fn node(&self, ino: u64) -> Option<&Node> {
        self.by_ino.get(&ino).map(|&id| &self.nodes[id as usize])
    }

    pub fn lookup(&self, parent_ino: u64, name: &str) -> Option<&Node> {
        let NodeKind::Dir(children) = &self.node(parent_ino)?.kind else {
            return None;
        };
        children
            .binary_search_by(|&id| (*self.nodes[id as usize].name).cmp(name))
            .ok()
            .map(|i| &self.nodes[children[i] as usize])
    }

    /// `(ino of parent, children)` of a directory.
    pub fn dir(&self, ino: u64) -> Option<(u64, impl Iterator<Item = &Node>)> {
        let node = self.node(ino)?;
        let NodeKind::Dir(children) = &node.kind else {
            return None;
        };
        let parent = self.nodes[node.parent as usize].ino;
        Some((parent, children.iter().map(|&id| &self.nodes[id as usize])))
    }

    /// The entries of `index.packages` the tree shows (in index order), by position.
    pub fn placed(&self) -> impl Iterator<Item = usize> + '_ {
        self.nodes.iter().filter_map(|n| match n.kind {
            NodeKind::Package(i) => Some(i as usize),
            _ => None,
        })
    }

    /// The directory holding `ino` and its name there; `None` for the root or an unknown inode.
    pub fn parent_and_name(&self, ino: u64) -> Option<(u64, &str)> {
        let node = self.node(ino).filter(|n| n.ino != ROOT_INO)?;
        Some((self.nodes[node.parent as usize].ino, &node.name))
    }

    pub fn package(&self, node: &Node) -> Option<&Package> {
        match node.kind {
            NodeKind::Package(i) => self.index.packages.get(i as usize),
            _ => None,
        }
    }

    pub fn attr(&self, node: &Node) -> Attr {
        let (is_dir, size, mtime) = match &node.kind {
            NodeKind::Dir(_) => (true, 0, self.dir_mtime),
            NodeKind::Package(i) => {
                let p = &self.index.packages[*i as usize];
                (false, p.size, p.mtime)
            }
            NodeKind::IndexFile => (false, self.index.raw.len() as u64, self.dir_mtime),
        };
        Attr {
            ino: node.ino,
            is_dir,
            size,
            mtime,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Finds a node by its path.
    #[cfg(test)]
    pub fn resolve(&self, path: &str) -> Option<&Node> {
        path.split('/')
            .try_fold(&self.nodes[0], |node, name| self.lookup(node.ino, name))
    }
}

struct Builder<'a> {
    nodes: Vec<Node>,
    /// Per node: name -> child id, while building.
    children: Vec<HashMap<&'a str, u32>>,
    rejected: Vec<Rejected>,
}

impl<'a> Builder<'a> {
    fn add(&mut self, parent: u32, name: &'a str, kind: NodeKind, ino: u64) -> u32 {
        let id = self.nodes.len() as u32;
        self.nodes.push(Node {
            ino,
            name: name.into(),
            parent,
            kind,
        });
        self.children.push(HashMap::new());
        self.children[parent as usize].insert(name, id);
        id
    }

    fn add_package(&mut self, i: u32, pkg: &'a Package) -> Result<(), String> {
        let path: &'a str = &pkg.path;
        let (dirs, file) = match path.rsplit_once('/') {
            Some((dirs, file)) => (Some(dirs), file),
            None => (None, path),
        };
        // Check the whole path before creating anything, so a refused entry leaves no trace.
        let mut parent = 0u32;
        let mut missing_from = None;
        let components: Vec<&'a str> = dirs.map(|d| d.split('/').collect()).unwrap_or_default();
        for (n, name) in components.iter().enumerate() {
            match self.children[parent as usize].get(name) {
                Some(&id) if matches!(self.nodes[id as usize].kind, NodeKind::Dir(_)) => {
                    parent = id
                }
                Some(_) => return Err(format!("`{name}` is a file in another entry's PATH")),
                None => {
                    missing_from = Some(n);
                    break;
                }
            }
        }
        if missing_from.is_none() && self.children[parent as usize].contains_key(file) {
            return Err("another entry already has this PATH".into());
        }
        if let Some(start) = missing_from {
            for n in start..components.len() {
                let dir_path = components[..=n].join("/");
                let ino = stable_ino(&["d", &dir_path]);
                parent = self.add(parent, components[n], NodeKind::Dir(Vec::new()), ino);
            }
        }
        let key = pkg.cache_key();
        let ino = stable_ino(&["f", path, &key.0]);
        self.add(parent, file, NodeKind::Package(i), ino);
        Ok(())
    }
}

/// A 64-bit inode number from a node's identity. Stable for the life of the process, which is
/// as long as the kernel remembers inode numbers of this mount. 0 and 1 are reserved.
fn stable_ino(parts: &[&str]) -> u64 {
    let mut h = DefaultHasher::new();
    parts.hash(&mut h);
    match h.finish() {
        0 | ROOT_INO => 2,
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn ns(entries: &[&str]) -> (Namespace, Vec<Rejected>) {
        let mut text = String::from("TIMESTAMP: 100\nVERSION: 0\n\n");
        for (i, path) in entries.iter().enumerate() {
            text += &format!(
                "CPV: c/p-{i}\nPATH: {path}\nSIZE: {}\nMTIME: {}\n\n",
                i + 10,
                i + 1000
            );
        }
        let idx = Index::parse(Bytes::from(text)).unwrap();
        Namespace::build(Arc::new(idx))
    }

    #[test]
    fn builds_tree_with_all_path_forms() {
        let (ns, rejected) = ns(&[
            "app-misc/foo/foo-1-1.gpkg.tar",
            "app-misc/foo/foo-1-2.gpkg.tar",
            "dev-libs/bar-2.gpkg.tar",
            "All/baz-3.tbz2",
            "sys-apps/qux-1.tbz2",
        ]);
        assert!(rejected.is_empty());
        let f = ns.resolve("app-misc/foo/foo-1-2.gpkg.tar").unwrap();
        let a = ns.attr(f);
        assert_eq!((a.is_dir, a.size, a.mtime), (false, 11, 1001));
        assert!(ns.attr(ns.resolve("app-misc/foo").unwrap()).is_dir);
        assert!(ns.resolve("All/baz-3.tbz2").is_some());
        let (_, root) = ns.dir(ROOT_INO).unwrap();
        let names: Vec<&str> = root.map(|n| &*n.name).collect();
        assert_eq!(
            names,
            ["All", "Packages", "app-misc", "dev-libs", "sys-apps"]
        );
        assert!(ns.lookup(ROOT_INO, "nope").is_none());
        assert!(ns.lookup(f.ino, "x").is_none(), "files have no children");
    }

    #[test]
    fn collisions_are_refused_and_leave_no_trace() {
        let (ns, rejected) = ns(&[
            "a/b.tbz2",
            "a/b.tbz2",          // duplicate
            "a/b.tbz2/c.tbz2",   // file used as directory
            "a/b.tbz2/d/e.tbz2", // same, deeper
            "x/y.tbz2",
        ]);
        assert_eq!(rejected.len(), 3);
        assert_eq!(ns.len(), 1 + 1 + 2 + 2, "root, Packages, a, a/b, x, x/y");
    }

    #[test]
    fn the_index_file_gets_a_new_inode_when_its_bytes_change() {
        let (a, _) = ns(&["c/p-1.tbz2"]);
        let (b, _) = ns(&["c/p-1.tbz2"]);
        let (c, _) = ns(&["c/p-2.tbz2"]);
        let ino = |n: &Namespace| n.resolve(INDEX_NAME).unwrap().ino;
        assert_eq!(ino(&a), ino(&b));
        assert_ne!(
            ino(&a),
            ino(&c),
            "same size, other bytes: must not share page cache"
        );
    }

    #[test]
    fn inodes_are_stable_across_rebuilds_and_change_with_content() {
        let (a, _) = ns(&["c/p/p-1.gpkg.tar", "c/q-1.tbz2"]);
        let (b, _) = ns(&["c/q-1.tbz2", "c/p/p-1.gpkg.tar"]);
        // Same path, different SIZE (hence key) in b: the entries swapped places above.
        let ia = a.resolve("c/p/p-1.gpkg.tar").unwrap().ino;
        let ib = b.resolve("c/p/p-1.gpkg.tar").unwrap().ino;
        assert_ne!(ia, ib, "a different file at the same PATH gets a new inode");
        assert_eq!(
            a.resolve("c/p").unwrap().ino,
            b.resolve("c/p").unwrap().ino,
            "directories keep their inode"
        );
        let (c, _) = ns(&["c/p/p-1.gpkg.tar", "c/q-1.tbz2"]);
        assert_eq!(ia, c.resolve("c/p/p-1.gpkg.tar").unwrap().ino);
    }
}
