//! The index's life: first load, periodic refresh, atomic swap, and the saved copy.
//!
//! At mount, the binhost's `Packages` is fetched (conditionally, against the saved copy's
//! validators); if the binhost is down or serves a broken index, the last good saved index is
//! used with a warning; with neither, the mount fails with one clear line.
//!
//! While mounted, the index is re-checked every `--index-ttl` seconds, or sooner when the index's
//! own `TTL` header asks for less. A 304 costs nothing. A new index replaces the old one only if
//! it parses and its `TIMESTAMP` is not older; the new tree is built aside and swapped in whole,
//! so a lookup sees one tree or the other, and `Packages` always matches the tree it describes.
//!
//! What the mount serves is the binhost's latest index *published* (`publish`), which differs
//! from it in three cases, each rendered into the served `Packages` (`index::render`, entries
//! verbatim, `PACKAGES` adjusted), so the file and the tree always agree:
//!
//! * entries the tree refused (unsafe or colliding PATHs) are left out, as Portage would never
//!   find their files;
//! * files the binhost said it does not have (404, ENOENT) are left out, like absent files of a
//!   local PKGDIR, until the index changes or `MISSING_RECHECK` passes;
//! * while emerge merges (its merge list in `mtimedb`, see `prefetch::mergelist`), the entries
//!   it resolved are *held*: served beside a newer release, and winning their PATH over a
//!   same-PATH rebuild (issue 11.3). emerge re-reads `Packages` for every package it merges and
//!   looks its entry up by instance key; without the hold, a release mid-merge made it crash.
//!   The entries are found in the current index or in one of the `RETAIN` previous ones (a
//!   release that came while emerge was still resolving). The hold ends when the merge list
//!   does, or `HOLD_IDLE` after the list last changed (an abandoned merge list: emerge killed).
//!   Holding entries beside the release (rather than deferring the swap) keeps a release
//!   visible at once to everything else; what waits is only a same-PATH rebuild.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tracing::{debug, info, warn};

use crate::cache::Store;
use crate::index::Validators;
use crate::index::{Index, Instance, Package, Rejected};
use crate::namespace::Namespace;
use crate::remote::{Endpoint, ErrorKind, IndexFetch};
use crate::snapshot::Snapshot;

/// What the last index check did, for `status`.
#[derive(Debug, Clone)]
pub struct RefreshState {
    pub at: SystemTime,
    pub result: String,
    pub validators: Validators,
}

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
/// Once the binhost is seen listing a file it does not have, the other files of the index
/// that are not cached are checked too (a 1-byte ranged request each, this many at once), so
/// that a second scan finds the tree as a local copy would be: Portage's untrusted scan dies
/// at the first unreadable file (issue 11.5). Not on an index larger than `SWEEP_MAX`.
const SWEEP_PARALLEL: usize = 4;
const SWEEP_MAX: usize = 5000;

/// `RefreshState::result` of a mount that took an index new to this cache from the binhost.
const FETCHED: &str = "fetched";
/// `RefreshState::result` of a 200 whose bytes are those of the index we have.
const NOT_MODIFIED_SAME: &str = "not modified (same bytes)";

pub struct Lifecycle {
    pub remote: Arc<Endpoint>,
    pub store: Arc<Store>,
    pub url: String,
    pub ns: Arc<Snapshot>,
    pub last: Mutex<RefreshState>,
    published: Mutex<Published>,
    /// Whether the current index was checked for missing files (see `SWEEP_MAX`).
    swept: std::sync::atomic::AtomicBool,
    /// Counts the indexes taken from the binhost that were new to this cache: one fetched at
    /// mount (not the saved copy), then every refresh that changed it. What
    /// `prefetch::updates` waits on.
    new_indexes: tokio::sync::watch::Sender<u64>,
}

/// What the served tree is made of (see the module comment).
struct Published {
    /// The binhost's latest index and what its tree refused.
    upstream: Upstream,
    /// Indexes it replaced, newest first, with when.
    previous: VecDeque<(Instant, Upstream)>,
    hold: Option<Hold>,
}

#[derive(Clone)]
struct Upstream {
    index: Arc<Index>,
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

    fn placed(&self) -> impl Iterator<Item = (&Arc<Index>, &Package)> {
        self.placed
            .iter()
            .map(|&i| (&self.index, &self.index.packages[i]))
    }
}

/// The entries of a running merge, served whatever the binhost publishes.
struct Hold {
    /// When the merge list last changed.
    changed: Instant,
    entries: Vec<(Arc<Index>, usize)>,
}

impl Lifecycle {
    /// Loads the first index: from the binhost, else from the saved copy. `Err` is the one-line
    /// reason the mount cannot start.
    pub async fn start(
        remote: Arc<Endpoint>,
        store: Arc<Store>,
        url: String,
    ) -> Result<Lifecycle, String> {
        let saved = store
            .load_index(&url)
            .map_err(|e| format!("reading saved index: {e}"))?;
        let saved_index = saved.as_ref().and_then(|(raw, _)| {
            Index::parse(Bytes::copy_from_slice(raw))
                .map_err(|e| warn!("saved index is unusable, ignoring it: {e}"))
                .ok()
        });
        let since = saved_index
            .as_ref()
            .and_then(|_| saved.as_ref().map(|(_, v)| v));
        let (index, validators, result) = match remote.index_transport().fetch_index(since).await {
            Ok(IndexFetch::NotModified) => {
                let v = since.cloned().unwrap_or_default();
                (
                    saved_index.expect("304 only when we sent validators"),
                    v,
                    "not modified".to_string(),
                )
            }
            // A server without validators (or with new ones for the same file: a mirror
            // failover, a touched file): the same bytes are not a new index, as for a refresh.
            Ok(IndexFetch::Fresh { raw, validators })
                if saved_index.as_ref().is_some_and(|s| s.raw == raw) =>
            {
                // New validators are kept, so the next check can be answered with a 304.
                if since != Some(&validators)
                    && let Err(e) = store.save_index(&url, &raw, &validators)
                {
                    warn!("could not save the index's validators: {e}");
                }
                (
                    saved_index.expect("matched above"),
                    validators,
                    NOT_MODIFIED_SAME.to_string(),
                )
            }
            Ok(IndexFetch::Fresh { raw, validators }) => match Index::parse(raw.clone()) {
                Ok(index) => {
                    if let Err(e) = store.save_index(&url, &raw, &validators) {
                        warn!("could not save the index for offline use: {e}");
                    }
                    (index, validators, FETCHED.to_string())
                }
                Err(e) => match saved_index {
                    Some(index) => {
                        warn!("binhost index is malformed ({e}); using the saved index");
                        (index, Validators::default(), format!("malformed: {e}"))
                    }
                    None => return Err(format!("binhost index is malformed: {e}")),
                },
            },
            Err(e) => match saved_index {
                Some(index) => {
                    let e = e.message;
                    warn!("binhost unreachable ({e}); mounting from the saved index");
                    (
                        index,
                        since.cloned().unwrap_or_default(),
                        format!("offline: {e}"),
                    )
                }
                // A refusal (a wrong ssh host key, a 403) is not "unreachable": say which.
                None if e.kind == ErrorKind::Fatal => {
                    return Err(format!(
                        "no saved index, and the binhost refused: {}",
                        e.message
                    ));
                }
                None => {
                    return Err(format!(
                        "binhost unreachable and no saved index: {}",
                        e.message
                    ));
                }
            },
        };
        remote.follow_uri(index.uri.as_deref());
        let life = Lifecycle::with_index(remote, store, url, index, result.clone(), validators);
        if result == FETCHED {
            life.note_new_index();
        }
        info!(
            url = life.url,
            packages = life.ns.current().index.packages.len(),
            "index loaded ({result})"
        );
        Ok(life)
    }

    /// A lifecycle around an index it did not fetch itself (a merged mount's binhosts, the
    /// merged tree): the same published view, held entries and all.
    pub fn with_index(
        remote: Arc<Endpoint>,
        store: Arc<Store>,
        url: String,
        index: Index,
        result: String,
        validators: Validators,
    ) -> Lifecycle {
        let published = Published {
            upstream: Upstream::new(index),
            previous: VecDeque::new(),
            hold: None,
        };
        let ns = published.namespace(&[]);
        Lifecycle {
            remote,
            store,
            url,
            ns: Arc::new(Snapshot::new(ns)),
            last: Mutex::new(RefreshState {
                at: SystemTime::now(),
                result,
                validators,
            }),
            published: Mutex::new(published),
            swept: Default::default(),
            new_indexes: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Changes whenever an index new to this cache is published (see `new_indexes`); its
    /// value is how many there have been, so a receiver can tell a mount that fetched one.
    pub fn new_indexes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.new_indexes.subscribe()
    }

    /// Says that the tree now published comes from an index new to this cache (a merged
    /// mount's `Union` calls it for the merged view).
    pub fn note_new_index(&self) {
        self.new_indexes.send_modify(|n| *n += 1);
    }

    /// Whether emerge is merging packages of this mount, for background work to yield to:
    /// its merge list holds entries and changed less than `MERGE_ACTIVE` ago (the hold
    /// itself lasts longer, see `HOLD_IDLE`).
    pub fn merge_in_progress(&self) -> bool {
        self.published.lock().unwrap().merging(Instant::now())
    }

    /// Re-checks the index forever; run as a task. Between checks, it re-publishes when the
    /// binhost reports a missing file, or when one is due for a re-check.
    pub async fn run(self: Arc<Self>, ttl: Duration) {
        let mut missing = self.remote.missing_changes();
        loop {
            let header_ttl = self.ns.current().index.ttl.map(Duration::from_secs);
            let wait = header_ttl
                .map_or(ttl, |h| h.min(ttl))
                .max(Duration::from_secs(1));
            let check = tokio::time::Instant::now() + wait;
            loop {
                let recheck = self
                    .remote
                    .next_recheck()
                    .map(tokio::time::Instant::from_std)
                    .map_or(check, |r| r.min(check));
                tokio::select! {
                    _ = tokio::time::sleep_until(recheck) => {
                        if recheck >= check {
                            break;
                        }
                        self.publish();
                    }
                    changed = missing.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        // Coalesce a burst of reports into one rebuild.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        missing.borrow_and_update();
                        self.publish();
                        if !self.swept.swap(true, std::sync::atomic::Ordering::Relaxed)
                            && !self.remote.missing().is_empty()
                        {
                            tokio::spawn(self.clone().sweep());
                        }
                    }
                }
            }
            self.refresh().await;
            self.publish();
        }
    }

    /// Checks every uncached file of the index with a 1-byte ranged request; the ones the
    /// binhost does not have are hidden like the one that started it (see `SWEEP_MAX`).
    async fn sweep(self: Arc<Self>) {
        let up = self.published.lock().unwrap().upstream.clone();
        let known: HashSet<String> = self.remote.missing().into_iter().collect();
        let todo: Vec<String> = up
            .placed()
            .filter(|(_, p)| !known.contains(&*p.path) && !self.store.contains(&p.cache_key()))
            .map(|(_, p)| p.path.to_string())
            .collect();
        if todo.len() > SWEEP_MAX {
            info!(
                files = todo.len(),
                "the binhost lists a file it does not have; too many files to check the others"
            );
            return;
        }
        info!(
            files = todo.len(),
            "the binhost lists a file it does not have; checking the other uncached files"
        );
        let slots = Arc::new(tokio::sync::Semaphore::new(SWEEP_PARALLEL));
        let mut checks = tokio::task::JoinSet::new();
        for path in todo {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let me = self.clone();
            checks.spawn(async move {
                let answer = me.remote.transport().read_range(&path, 0, 1).await;
                drop(slot);
                if let Err(e) = answer
                    && e.kind == crate::remote::ErrorKind::NotFound
                {
                    warn!(%path, "listed in the index but not on the binhost: hidden");
                    me.remote.not_found(&path);
                }
            });
        }
        while checks.join_next().await.is_some() {}
    }

    /// Emerge's merge list changed: `Some(entries)` while a merge runs (every binary package
    /// of it), `None` once it ended. Holds the entries the merge resolved (see the module
    /// comment) and re-publishes.
    pub fn merge_list(&self, entries: Option<&[Instance]>) {
        {
            let mut p = self.published.lock().unwrap();
            match entries {
                None => {
                    if p.hold.take().is_none() {
                        return;
                    }
                    info!("merge finished; its entries are no longer held");
                }
                Some(entries) => {
                    let held = p.resolve_hold(entries);
                    let before = p.hold.as_ref().map(|h| h.entries.len());
                    if !held.is_empty() || before.is_some() {
                        if before != Some(held.len()) && !held.is_empty() {
                            info!(
                                held = held.len(),
                                "merge in progress: its entries stay served until it ends"
                            );
                        }
                        p.hold = Some(Hold {
                            changed: Instant::now(),
                            entries: held,
                        });
                    }
                }
            }
        }
        self.publish();
    }

    /// Builds the served tree from what is known now and swaps it in if it changed.
    pub fn publish(&self) {
        let missing = self.remote.missing();
        let ns = {
            let mut p = self.published.lock().unwrap();
            if p.hold
                .as_ref()
                .is_some_and(|h| h.changed.elapsed() > HOLD_IDLE)
            {
                warn!(
                    "the merge list has not changed for {HOLD_IDLE:?}; no longer holding its entries"
                );
                p.hold = None;
            }
            p.previous.retain(|(at, _)| at.elapsed() < RETAIN_FOR);
            p.namespace(&missing)
        };
        if ns.index.raw != self.ns.current().index.raw {
            let packages = ns.index.packages.len();
            self.ns.swap(ns);
            debug!(packages, "served tree updated");
        }
    }

    /// One conditional check; swaps in a newer index.
    pub async fn refresh(&self) {
        let since = self.last.lock().unwrap().validators.clone();
        let since = (since != Validators::default()).then_some(since);
        let (result, validators) = match self
            .remote
            .index_transport()
            .fetch_index(since.as_ref())
            .await
        {
            Ok(IndexFetch::NotModified) => ("not modified".to_string(), since.unwrap_or_default()),
            Ok(IndexFetch::Fresh { raw, validators })
                if raw == self.published.lock().unwrap().upstream.index.raw =>
            {
                // A server without validators: the same bytes are not a new index.
                (NOT_MODIFIED_SAME.to_string(), validators)
            }
            Ok(IndexFetch::Fresh { raw, validators }) => match Index::parse(raw.clone()) {
                Ok(index) => {
                    let current = self.ns.current().index.timestamp;
                    if let (Some(new), Some(cur)) = (index.timestamp, current)
                        && new < cur
                    {
                        warn!(
                            new,
                            current = cur,
                            "binhost served an older index; keeping ours"
                        );
                        ("older index ignored".to_string(), since.unwrap_or_default())
                    } else {
                        if let Err(e) = self.store.save_index(&self.url, &raw, &validators) {
                            warn!("could not save the index for offline use: {e}");
                        }
                        self.remote.follow_uri(index.uri.as_deref());
                        let packages = index.packages.len();
                        {
                            let mut p = self.published.lock().unwrap();
                            let old = std::mem::replace(&mut p.upstream, Upstream::new(index));
                            p.previous.push_front((Instant::now(), old));
                            p.previous.truncate(RETAIN);
                        }
                        // A new index: every file it names gets a fresh chance.
                        self.remote.forget_missing();
                        self.swept
                            .store(false, std::sync::atomic::Ordering::Relaxed);
                        self.publish();
                        info!(packages, "index refreshed");
                        self.note_new_index();
                        ("updated".to_string(), validators)
                    }
                }
                Err(e) => {
                    warn!("binhost index is malformed, keeping the current one: {e}");
                    (format!("malformed: {e}"), since.unwrap_or_default())
                }
            },
            Err(e) => {
                let e = e.message;
                warn!("index check failed, keeping the current one: {e}");
                (format!("failed: {e}"), since.unwrap_or_default())
            }
        };
        *self.last.lock().unwrap() = RefreshState {
            at: SystemTime::now(),
            result,
            validators,
        };
    }
}

impl Published {
    /// See `Lifecycle::merge_in_progress`.
    fn merging(&self, now: Instant) -> bool {
        self.hold
            .as_ref()
            .is_some_and(|h| now.saturating_duration_since(h.changed) <= MERGE_ACTIVE)
    }

    /// The served tree: the upstream entries its tree placed, less the missing ones and those
    /// whose PATH a held entry has, then the held entries. The upstream index as it is when
    /// nothing is left out or added (the served `Packages` is then byte-identical).
    fn namespace(&self, missing: &[String]) -> Namespace {
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
    fn resolve_hold(&self, entries: &[Instance]) -> Vec<(Arc<Index>, usize)> {
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
        Published {
            upstream: Upstream::new(upstream),
            previous: VecDeque::new(),
            hold: None,
        }
    }

    fn release(p: &mut Published, next: Index) {
        let old = std::mem::replace(&mut p.upstream, Upstream::new(next));
        p.previous.push_front((Instant::now(), old));
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
