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

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tracing::{debug, info, warn};

use crate::cache::Store;
use crate::index::Validators;
use crate::index::{Index, Instance};
use crate::remote::{Endpoint, ErrorKind, IndexFetch};
use crate::snapshot::Snapshot;

mod published;

pub use published::{HOLD_IDLE, MERGE_ACTIVE};
use published::{Hold, Published};

/// What the last index check did, for `status`.
#[derive(Debug, Clone)]
pub struct RefreshState {
    pub at: SystemTime,
    pub result: String,
    pub validators: Validators,
}

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
        let published = Published::new(index);
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
            p.expire();
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
                        self.published.lock().unwrap().release(index);
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
