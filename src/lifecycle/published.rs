//! What the mount serves of one binhost (see the parent module's comment): its latest index,
//! the ones it replaced lately, and the entries a running merge holds, rendered into one tree
//! whose `Packages` and files agree. Pure state and decisions; `Lifecycle` owns the fetching,
//! the timing and the swap.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::index::{Index, Instance, Package, Rejected};
use crate::namespace::Namespace;

/// How long a merge list that stopped changing keeps its entries held. emerge rewrites the
/// list after every package; one that has not changed for this long belongs to an emerge that
/// died (or builds one package from source for longer than this).
pub const HOLD_IDLE: Duration = Duration::from_secs(6 * 3600);
/// How long after its merge list last changed a merge counts as running for the background
/// work that yields to it (`merge_in_progress`). Portage rewrites `mtimedb` after each
/// package, so a merge of binary packages changes it every few seconds; an emerge stopped by
/// Ctrl-C leaves `resume` behind unchanged, and yielding until `HOLD_IDLE` would pause the
/// updates prefetch for hours. A source build that takes longer than this reads nothing from
/// the mount meanwhile: it does not need the link.
pub const MERGE_ACTIVE: Duration = Duration::from_secs(15 * 60);
/// How many replaced indexes are kept for a merge list that names their entries, and for how
/// long (emerge resolves against the index it read, maybe before a refresh).
const RETAIN: usize = 2;
const RETAIN_FOR: Duration = Duration::from_secs(3600);
/// What the served tree is made of (see the module comment).
pub(super) struct Published {
    /// The binhost's latest index and what its tree refused.
    pub(super) upstream: Upstream,
    /// Indexes it replaced, newest first, with when.
    previous: VecDeque<(Instant, Upstream)>,
    pub(super) hold: Option<Hold>,
}

#[derive(Clone)]
pub(super) struct Upstream {
    pub(super) index: Arc<Index>,
    /// Positions in `index.packages` of the entries its tree placed.
    placed: Arc<Vec<usize>>,
    refused: Arc<Vec<Rejected>>,
}

impl Upstream {
    fn new(index: Index) -> Upstream {
        let index = Arc::new(index);
        let (ns, collisions) = Namespace::build(index.clone());
        let refused: Vec<Rejected> = index.rejected.iter().cloned().chain(collisions).collect();
        for r in refused.iter().take(20) {
            warn!(entry = %r.what, "refusing index entry: {}", r.reason);
        }
        if refused.len() > 20 {
            warn!("{} more index entries refused", refused.len() - 20);
        }
        Upstream {
            placed: Arc::new(ns.placed().collect()),
            index,
            refused: Arc::new(refused),
        }
    }

    pub(super) fn placed(&self) -> impl Iterator<Item = (&Arc<Index>, &Package)> {
        self.placed
            .iter()
            .map(|&i| (&self.index, &self.index.packages[i]))
    }
}

/// The entries of a running merge, served whatever the binhost publishes.
pub(super) struct Hold {
    /// When the merge list last changed.
    pub(super) changed: Instant,
    pub(super) entries: Vec<(Arc<Index>, usize)>,
}

impl Published {
    pub(super) fn new(index: Index) -> Published {
        Published {
            upstream: Upstream::new(index),
            previous: VecDeque::new(),
            hold: None,
        }
    }

    /// A release: `index` becomes the latest, the one it replaces is kept (`RETAIN`).
    pub(super) fn release(&mut self, index: Index) {
        let old = std::mem::replace(&mut self.upstream, Upstream::new(index));
        self.previous.push_front((Instant::now(), old));
        self.previous.truncate(RETAIN);
    }

    /// Drops a hold idle for `HOLD_IDLE` and replaced indexes older than `RETAIN_FOR`.
    pub(super) fn expire(&mut self) {
        if self
            .hold
            .as_ref()
            .is_some_and(|h| h.changed.elapsed() > HOLD_IDLE)
        {
            warn!(
                "the merge list has not changed for {HOLD_IDLE:?}; no longer holding its entries"
            );
            self.hold = None;
        }
        self.previous.retain(|(at, _)| at.elapsed() < RETAIN_FOR);
    }

    /// See `Lifecycle::merge_in_progress`.
    pub(super) fn merging(&self, now: Instant) -> bool {
        self.hold
            .as_ref()
            .is_some_and(|h| now.saturating_duration_since(h.changed) <= MERGE_ACTIVE)
    }

    /// The served tree: the upstream entries its tree placed, less the missing ones and those
    /// whose PATH a held entry has, then the held entries. The upstream index as it is when
    /// nothing is left out or added (the served `Packages` is then byte-identical).
    pub(super) fn namespace(&self, missing: &[String]) -> Namespace {
        let up = &self.upstream;
        let held: Vec<(&Index, &Package)> = self
            .hold
            .iter()
            .flat_map(|h| &h.entries)
            .map(|(index, i)| (&**index, &index.packages[*i]))
            .filter(|(_, held)| {
                // The same entry is in the release too: it is served from there.
                !up.placed().any(|(_, p)| same_entry(p, held))
            })
            .collect();
        let held_paths: HashSet<&str> = held.iter().map(|(_, p)| &*p.path).collect();
        let missing: HashSet<&str> = missing.iter().map(String::as_str).collect();
        let mut served: Vec<(&Index, &Package)> = up
            .placed()
            .filter(|(_, p)| !held_paths.contains(&*p.path) && !missing.contains(&*p.path))
            .map(|(i, p)| (&**i, p))
            .collect();
        if served.len() == up.index.packages.len() && held.is_empty() && up.refused.is_empty() {
            return Namespace::build(up.index.clone()).0;
        }
        let hidden = up.placed.len() - served.len();
        served.extend(held);
        let raw = crate::index::render(&up.index, &served);
        let mut index = match Index::parse(raw) {
            Ok(index) => index,
            Err(e) => {
                // Cannot happen (rendered from parsed entries); serve the binhost's as it is.
                warn!("could not re-read the served index ({e}); serving the binhost's");
                return Namespace::build(up.index.clone()).0;
            }
        };
        index.rejected = (*up.refused).clone();
        let (ns, collisions) = Namespace::build(Arc::new(index));
        for c in collisions {
            debug!(entry = %c.what, "held entry not served: {}", c.reason);
        }
        debug!(
            served = ns.index.packages.len(),
            hidden,
            refused = up.refused.len(),
            "serving an index rendered from the binhost's"
        );
        ns
    }

    /// The entries of a merge list, found in the current index, else among the entries held
    /// already, else in the previous indexes. All are kept (not only those a release already
    /// replaced): the next release may come at any moment. `namespace` serves a held entry
    /// only while the current index lacks it.
    pub(super) fn resolve_hold(&self, entries: &[Instance]) -> Vec<(Arc<Index>, usize)> {
        let mut out: Vec<(Arc<Index>, usize)> = Vec::new();
        for e in entries {
            let current = self
                .upstream
                .placed
                .iter()
                .map(|&i| (self.upstream.index.clone(), i));
            let held = self.hold.iter().flat_map(|h| &h.entries).cloned();
            let previous = self
                .previous
                .iter()
                .flat_map(|(_, up)| up.placed.iter().map(|&i| (up.index.clone(), i)));
            let found = current
                .chain(held)
                .chain(previous)
                .find(|(index, i)| e.matches(&index.packages[*i]));
            if let Some(found) = found
                && !out
                    .iter()
                    .any(|(index, i)| index.packages[*i].path == found.0.packages[found.1].path)
            {
                out.push(found);
            }
        }
        out
    }
}

/// Two entries are the same file under the same instance key.
fn same_entry(a: &Package, b: &Package) -> bool {
    a.path == b.path
        && a.cpv == b.cpv
        && a.build_id == b.build_id
        && a.build_time == b.build_time
        && a.size == b.size
        && a.mtime == b.mtime
        && a.digests == b.digests
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn index(entries: &[(&str, u64, &str, u64)]) -> Index {
        let mut text = String::from("PACKAGES: 9\nTIMESTAMP: 100\nVERSION: 0\n\n");
        for (cpv, build_id, path, size) in entries {
            text += &format!(
                "CPV: {cpv}\nBUILD_ID: {build_id}\nBUILD_TIME: {build_id}\nPATH: {path}\nSIZE: {size}\nMTIME: 5\n\n"
            );
        }
        Index::parse(Bytes::from(text)).unwrap()
    }

    fn instance(cpv: &str, build_id: u64, size: u64) -> Instance {
        Instance {
            cpv: cpv.into(),
            build_id: Some(build_id),
            build_time: Some(build_id),
            size: Some(size),
            mtime: Some(5),
        }
    }

    fn published(upstream: Index) -> Published {
        Published::new(upstream)
    }

    fn release(p: &mut Published, next: Index) {
        p.release(next);
    }

    fn hold(p: &mut Published, entries: &[Instance]) {
        let entries = p.resolve_hold(entries);
        p.hold = Some(Hold {
            changed: Instant::now(),
            entries,
        });
    }

    fn served(ns: &Namespace) -> Vec<(String, Option<u64>)> {
        ns.index
            .packages
            .iter()
            .map(|p| (p.path.to_string(), p.build_id))
            .collect()
    }

    const OLD: &[(&str, u64, &str, u64)] = &[
        ("a/x-1", 1, "a/x/x-1-1.gpkg.tar", 10),
        ("b/y-1", 1, "b/y/y-1-1.gpkg.tar", 20),
    ];
    const NEW: &[(&str, u64, &str, u64)] = &[
        ("a/x-1", 2, "a/x/x-1-2.gpkg.tar", 11),
        ("b/y-1", 2, "b/y/y-1-2.gpkg.tar", 21),
    ];

    #[test]
    fn without_anything_to_change_the_binhost_index_is_served_byte_for_byte() {
        let up = index(OLD);
        let raw = up.raw.clone();
        assert_eq!(published(up).namespace(&[]).index.raw, raw);
    }

    #[test]
    fn a_release_during_a_merge_serves_the_merge_entries_beside_the_new_ones() {
        let mut p = published(index(OLD));
        let merge = [instance("a/x-1", 1, 10), instance("b/y-1", 1, 20)];
        hold(&mut p, &merge);
        let raw = p.upstream.index.raw.clone();
        assert_eq!(
            p.namespace(&[]).index.raw,
            raw,
            "nothing beside the index yet"
        );
        // The release comes mid-merge: no new merge list, the held entries stay.
        release(&mut p, index(NEW));
        let ns = p.namespace(&[]);
        let got = served(&ns);
        assert_eq!(got.len(), 4, "{got:?}");
        for path in [
            "a/x/x-1-1.gpkg.tar",
            "a/x/x-1-2.gpkg.tar",
            "b/y/y-1-1.gpkg.tar",
        ] {
            assert!(
                got.iter().any(|(p, _)| p == path),
                "{path} missing: {got:?}"
            );
        }
        assert!(
            std::str::from_utf8(&ns.index.raw)
                .unwrap()
                .starts_with("PACKAGES: 4\n")
        );
        // A second release: the held entries are still found (in the hold itself).
        release(&mut p, index(&[("a/x-1", 3, "a/x/x-1-3.gpkg.tar", 12)]));
        hold(&mut p, &merge);
        assert_eq!(served(&p.namespace(&[])).len(), 3);
        // The merge ends: the release alone.
        p.hold = None;
        assert_eq!(
            served(&p.namespace(&[])),
            [("a/x/x-1-3.gpkg.tar".into(), Some(3))]
        );
    }

    #[test]
    fn a_same_path_rebuild_waits_while_the_merge_holds_that_path() {
        let flat_old = &[("a/x-1", 0, "a/x-1.gpkg.tar", 10)];
        let flat_new = &[("a/x-1", 0, "a/x-1.gpkg.tar", 11)];
        let mut p = published(index(flat_old));
        release(&mut p, index(flat_new));
        hold(&mut p, &[instance("a/x-1", 0, 10)]);
        let ns = p.namespace(&[]);
        assert_eq!(ns.index.packages.len(), 1);
        assert_eq!(
            ns.index.packages[0].size, 10,
            "the resolved build keeps its PATH"
        );
        p.hold = None;
        assert_eq!(p.namespace(&[]).index.packages[0].size, 11);
    }

    #[test]
    fn a_merge_list_that_stopped_changing_is_no_running_merge_but_stays_held() {
        let mut p = published(index(OLD));
        let t0 = Instant::now();
        assert!(!p.merging(t0), "no merge list");
        hold(&mut p, &[instance("a/x-1", 1, 10)]);
        let changed = p.hold.as_ref().unwrap().changed;
        assert!(p.merging(changed));
        assert!(p.merging(changed + MERGE_ACTIVE));
        // emerge killed (Ctrl-C leaves `resume` in mtimedb): no longer yielded to...
        assert!(!p.merging(changed + MERGE_ACTIVE + Duration::from_secs(1)));
        // ...though its entries are still held.
        assert!(p.hold.is_some());
        assert!(MERGE_ACTIVE < HOLD_IDLE);
        // The list changes again (the next package): running again.
        hold(&mut p, &[instance("a/x-1", 1, 10)]);
        assert!(p.merging(Instant::now()));
    }

    #[test]
    fn refused_and_missing_entries_are_not_served() {
        let mut up = index(OLD);
        let text = format!(
            "{}CPV: c/z-1\nPATH: ../../etc/passwd\nSIZE: 1\n\nCPV: c/w-1\nPATH: a/x/x-1-1.gpkg.tar\nSIZE: 3\n",
            String::from_utf8_lossy(&up.raw)
        );
        up = Index::parse(Bytes::from(text)).unwrap();
        let p = published(up);
        let ns = p.namespace(&[]);
        let text = String::from_utf8_lossy(&ns.index.raw).into_owned();
        assert!(text.starts_with("PACKAGES: 2\n"), "{text}");
        assert!(
            !text.contains("passwd") && !text.contains("c/w-1"),
            "{text}"
        );
        assert_eq!(ns.index.rejected.len(), 2, "still counted for status");
        let ns = p.namespace(&["b/y/y-1-1.gpkg.tar".to_string()]);
        assert_eq!(served(&ns), [("a/x/x-1-1.gpkg.tar".into(), Some(1))]);
    }
}
