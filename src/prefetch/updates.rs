//! The daemon side of `-o prefetch=updates`: after the binhost publishes newer builds of
//! installed packages, fetch them into the cache in the background, so the next `emerge -u`
//! reads from the cache.
//!
//! Which packages: the rule of `binpkgfs prefetch --world-updates` (`world`), applied to the
//! served tree and the installed packages of `ROOT/var/db/pkg` (`-o updates_root=`, default
//! `/`), read anew for every pass; of those, only what the cache does not hold yet. Each is
//! fetched with `Fetcher::fetch_whole`, so it shares a transfer a reader (or the merge-list
//! prefetch) already started, and nothing crosses the network twice.
//!
//! Rules:
//! * a pass runs after every refresh that changed the index, and once at mount when the
//!   index loaded then was new to this cache (fetched, not the saved copy nor a 304): a driver
//!   switched off over a release sees it only at mount. A mount from the saved or an
//!   unchanged index does nothing: the daemon before it had its chance, and a restart loop must
//!   not restart work. A first mount (empty cache) counts as new: the budget bounds it;
//! * the updates a pass finds take at most a quarter of the cache's size (`SHARE`): those
//!   cached already (by an earlier pass, or read) count against it, and the pass fetches the
//!   others smallest first within what is left, so it covers as many updates as it can and
//!   leaves room for what emerge reads anyway; the rest is counted as over budget and fetched
//!   when read;
//! * one package at a time (`fetch_whole` splits a large one itself): a background job must
//!   not take the link from a reader;
//! * while emerge merges packages of this mount (its merge list held, see `lifecycle`), no
//!   new transfer starts: the merge-list prefetch and emerge's own reads go first. The one in
//!   flight runs to its end. A merge list that stopped changing for `MERGE_ACTIVE` (emerge
//!   interrupted) no longer pauses a pass;
//! * a newer index stops a running pass before its next package; the next pass starts from
//!   the new tree (what the old one fetched is cached, so it is not fetched again);
//! * no dependency resolution: a new dependency, a USE change or a slot move is not seen.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::mergelist::{served, within};
use super::world::{Installed, installed, slots, world_updates};
use crate::fetch::Fetcher;
use crate::index::Package;
use crate::lifecycle::Lifecycle;
use crate::namespace::Namespace;

/// The updates a pass finds take at most `1 / SHARE` of the cache's size, cached ones
/// included.
pub const SHARE: u64 = 4;
/// How often a pass paused for a merge looks again.
const PAUSE_POLL: Duration = Duration::from_secs(1);
/// Queued paths `status` lists (it answers through a 64 KiB xattr); the rest are counted.
const QUEUED_SHOWN: usize = 20;

/// What the passes did, for `status`; shared by the task and the status reporter.
pub struct Updates {
    root: PathBuf,
    report: Mutex<Report>,
}

#[derive(Default)]
struct Report {
    passes: u64,
    last: Option<Pass>,
    /// Paths the running pass has still to fetch, in order (it takes them from the front).
    queued: VecDeque<String>,
}

/// One pass: what it found and what it cost.
#[derive(Clone, Debug)]
struct Pass {
    at: SystemTime,
    trigger: &'static str,
    index_timestamp: Option<u64>,
    installed: usize,
    plan: Counts,
    fetched: usize,
    failed: usize,
    bytes: u64,
    seconds: f64,
    state: &'static str,
    error: Option<String>,
}

/// What a pass chose among the updates it found.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Counts {
    found: usize,
    cached: usize,
    over_budget: usize,
    /// What this pass may fetch: the cap less what the cached updates take already.
    budget: u64,
}

/// The packages a pass fetches, and how the others were left out.
#[derive(Debug)]
struct Plan {
    fetch: Vec<Package>,
    counts: Counts,
}

/// Of `found`, those not `cached`, smallest first, as many as fit beside the cached ones in
/// `cap` bytes: the cap bounds what the updates hold in the cache, not what one pass adds, so
/// several releases a day do not churn it. Saturating: SIZE comes from the index.
fn plan(found: Vec<Package>, cached: impl Fn(&Package) -> bool, cap: u64) -> Plan {
    let total = found.len();
    let (hit, mut todo): (Vec<Package>, Vec<Package>) = found.into_iter().partition(cached);
    let held = hit.iter().fold(0u64, |n, p| n.saturating_add(p.size));
    let budget = cap.saturating_sub(held);
    todo.sort_by(|a, b| a.size.cmp(&b.size).then_with(|| a.path.cmp(&b.path)));
    let wanted = todo.len();
    let fetch = within(todo, budget);
    Plan {
        counts: Counts {
            found: total,
            cached: hit.len(),
            over_budget: wanted - fetch.len(),
            budget,
        },
        fetch,
    }
}

/// The served packages that are newer builds of `installed`, each once.
fn updates(ns: &Namespace, installed: &[Installed]) -> Vec<Package> {
    let slots = slots(&ns.index.raw);
    let mut seen = HashSet::new();
    world_updates(&ns.index, &slots, installed)
        .into_iter()
        .filter_map(|p| served(ns, &p.path))
        .filter(|p| seen.insert(p.path.clone()))
        .cloned()
        .collect()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

impl Updates {
    /// Updates of the packages installed in `root` (an EROOT).
    pub fn new(root: PathBuf) -> Updates {
        Updates {
            root,
            report: Mutex::default(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Report)) {
        f(&mut self.report.lock().unwrap());
    }

    fn update_pass(&self, f: impl FnOnce(&mut Pass)) {
        self.update(|r| r.last.as_mut().map_or((), f));
    }

    /// Runs a pass after each index new to this cache, for as long as the daemon runs.
    pub async fn watch(self: Arc<Self>, lifecycle: Arc<Lifecycle>, fetcher: Arc<Fetcher>) {
        let mut fresh = lifecycle.new_indexes();
        let at_mount = *fresh.borrow_and_update() > 0;
        info!(
            root = %self.root.display(),
            at_mount,
            "prefetching updates after index refreshes"
        );
        let mut trigger = "mount";
        if !at_mount {
            if fresh.changed().await.is_err() {
                return;
            }
            trigger = "refresh";
        }
        loop {
            fresh.borrow_and_update();
            self.pass(trigger, &lifecycle, &fetcher, &fresh).await;
            if fresh.changed().await.is_err() {
                return;
            }
            trigger = "refresh";
        }
    }

    /// One pass over the tree published now.
    async fn pass(
        &self,
        trigger: &'static str,
        lifecycle: &Lifecycle,
        fetcher: &Arc<Fetcher>,
        fresh: &watch::Receiver<u64>,
    ) {
        let started = Instant::now();
        let ns = lifecycle.ns.current();
        self.update(|r| {
            r.passes += 1;
            r.queued.clear();
            r.last = Some(Pass {
                at: SystemTime::now(),
                trigger,
                index_timestamp: ns.index.timestamp,
                installed: 0,
                plan: Counts::default(),
                fetched: 0,
                failed: 0,
                bytes: 0,
                seconds: 0.0,
                state: "reading the installed packages",
                error: None,
            });
        });
        let Some(plan) = self.plan(ns, fetcher).await else {
            return;
        };
        let c = plan.counts;
        if plan.fetch.is_empty() {
            debug!(found = c.found, cached = c.cached, "no updates to prefetch");
        } else {
            let bytes = plan
                .fetch
                .iter()
                .fold(0u64, |n, p| n.saturating_add(p.size));
            info!(
                "prefetching {} updates ({:.1} MiB) after {trigger}",
                plan.fetch.len(),
                mib(bytes)
            );
        }
        if c.over_budget > 0 {
            info!(
                left_out = c.over_budget,
                budget = c.budget,
                "updates would take more than a quarter of the cache; the rest is fetched when read"
            );
        }
        let state = self.fetch_all(plan.fetch, lifecycle, fetcher, fresh).await;
        self.update(|r| r.queued.clear());
        self.update_pass(|p| {
            p.state = state;
            p.seconds = started.elapsed().as_secs_f64();
        });
    }

    /// Reads the installed packages and chooses what to fetch; `None` if the database could
    /// not be read (the pass is recorded as failed).
    async fn plan(&self, ns: Arc<Namespace>, fetcher: &Fetcher) -> Option<Plan> {
        let root = self.root.clone();
        let store = fetcher.store().clone();
        // Reading var/db/pkg is disk I/O, and the updates come from the whole index (its raw
        // text decoded and split, maps of every package): not on the runtime's workers.
        let work = tokio::task::spawn_blocking(move || {
            let installed = installed(&root)?;
            let plan = plan(
                updates(&ns, &installed),
                |p| store.contains(&p.cache_key()),
                store.usage().limit / SHARE,
            );
            Ok((installed.len(), plan))
        });
        let read = work
            .await
            .unwrap_or_else(|e| Err(format!("reader failed: {e}")));
        let (installed, plan) = match read {
            Ok(done) => done,
            Err(e) => {
                warn!("cannot prefetch updates: {e}");
                self.update_pass(|p| {
                    p.state = "failed";
                    p.error = Some(e);
                });
                return None;
            }
        };
        self.update(|r| {
            r.queued = plan.fetch.iter().map(|p| p.path.to_string()).collect();
            if let Some(p) = r.last.as_mut() {
                p.installed = installed;
                p.plan = plan.counts;
                p.state = "fetching";
            }
        });
        Some(plan)
    }

    /// Fetches `packages` one at a time, pausing while a merge runs; returns how it ended.
    async fn fetch_all(
        &self,
        packages: Vec<Package>,
        lifecycle: &Lifecycle,
        fetcher: &Arc<Fetcher>,
        fresh: &watch::Receiver<u64>,
    ) -> &'static str {
        let superseded = || fresh.has_changed().unwrap_or(true);
        for pkg in packages {
            while lifecycle.merge_in_progress() && !superseded() {
                self.update_pass(|p| p.state = "paused: a merge is running");
                tokio::time::sleep(PAUSE_POLL).await;
            }
            if superseded() {
                debug!("a newer index came; the updates pass starts again");
                return "superseded by a newer index";
            }
            // Cached since the plan (read, or the merge-list prefetch): nothing to fetch, and
            // not counted as fetched. An in-memory lookup, no disk.
            if fetcher.store().contains(&pkg.cache_key()) {
                self.update(|r| {
                    r.queued.pop_front();
                    if let Some(p) = r.last.as_mut() {
                        p.plan.cached += 1;
                    }
                });
                continue;
            }
            self.update_pass(|p| p.state = "fetching");
            debug!(path = %pkg.path, "prefetching an update");
            let result = fetcher.fetch_whole(&pkg).await;
            if let Err(e) = &result {
                // The transfer logged why at warn already.
                debug!(path = %pkg.path, "update prefetch failed: {e}");
            }
            self.update(|r| {
                r.queued.pop_front();
                if let Some(p) = r.last.as_mut() {
                    match result {
                        Ok(()) => {
                            p.fetched += 1;
                            p.bytes = p.bytes.saturating_add(pkg.size);
                        }
                        Err(_) => p.failed += 1,
                    }
                }
            });
        }
        "done"
    }

    /// The passes so far, for `status`.
    pub fn status(&self) -> Value {
        let r = self.report.lock().unwrap();
        let last = r.last.as_ref().map(|p| {
            json!({
                "at": p.at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                "trigger": p.trigger,
                "index_timestamp": p.index_timestamp,
                "installed": p.installed,
                "found": p.plan.found,
                "already_cached": p.plan.cached,
                "over_budget": p.plan.over_budget,
                "budget": p.plan.budget,
                "fetched": p.fetched,
                "failed": p.failed,
                "bytes": p.bytes,
                "seconds": (p.seconds * 100.0).round() / 100.0,
                "state": p.state,
                "error": p.error,
            })
        });
        json!({
            "enabled": true,
            "root": self.root.display().to_string(),
            "passes": r.passes,
            "last": last,
            "queued": r.queued.iter().take(QUEUED_SHOWN).collect::<Vec<_>>(),
            "queued_total": r.queued.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefetch::world::tests::{index, inst};

    fn sizes(plan: &Plan) -> Vec<(String, u64)> {
        plan.fetch
            .iter()
            .map(|p| (p.path.to_string(), p.size))
            .collect()
    }

    fn ns() -> Namespace {
        Namespace::build(Arc::new(index())).0
    }

    #[test]
    fn updates_are_the_world_rule_on_the_served_tree_each_once() {
        let ns = ns();
        let got = updates(
            &ns,
            &[
                inst("a/x", "1", Some("0"), Some(1)),
                // The same package installed twice (as a broken vdb may have it): fetched once.
                inst("a/x", "1", Some("0"), Some(2)),
                inst("a/x-lib", "3", None, None),
            ],
        );
        let paths: Vec<&str> = got.iter().map(|p| &*p.path).collect();
        assert_eq!(paths, ["a/x/x-1.1-1.gpkg.tar"]);
        assert!(updates(&ns, &[inst("a/x", "2", Some("2"), Some(1))]).is_empty());
    }

    #[test]
    fn a_pass_skips_the_cached_and_stays_within_its_budget() {
        let pkgs = index().packages;
        // 10 + 20 + 20 + 20 + 30 bytes; a/x-1 build 1 (10 bytes) is cached.
        let cached = |p: &Package| &*p.path == "a/x/x-1-1.gpkg.tar";
        let all = plan(pkgs.clone(), cached, u64::MAX);
        assert_eq!(all.counts.found, 5);
        assert_eq!((all.counts.cached, all.counts.over_budget), (1, 0));
        assert_eq!(
            sizes(&all),
            [
                ("a/x/x-1-2.gpkg.tar".into(), 20),
                ("a/x/x-1.1-1.gpkg.tar".into(), 20),
                ("a/x/x-2-1.gpkg.tar".into(), 20),
                ("a/x-lib-3.tbz2".into(), 30)
            ],
            "smallest first, then by path"
        );
        // A cap of 55 bytes, 10 of them held by the cached update: two of the 20-byte ones;
        // the rest is over budget.
        let some = plan(pkgs.clone(), cached, 55);
        assert_eq!(sizes(&some).len(), 2);
        assert_eq!((some.counts.over_budget, some.counts.budget), (2, 45));
        let less = plan(pkgs.clone(), cached, 45);
        assert_eq!(
            sizes(&less).len(),
            1,
            "the cached update counts against the cap"
        );
        // Updates larger than the budget are not fetched at all.
        let none = plan(pkgs, |_| false, 9);
        assert!(none.fetch.is_empty());
        assert_eq!(none.counts.over_budget, 5);
        assert_eq!(
            plan(Vec::new(), |_| false, 100).counts,
            Counts {
                budget: 100,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn cached_updates_count_against_the_cap_saturating() {
        let pkgs = index().packages;
        // Earlier passes cached everything but a/x-lib (30 bytes): 70 bytes held of a 90-byte
        // cap leave 20, and a/x-lib does not fit.
        let earlier = |p: &Package| &*p.path != "a/x-lib-3.tbz2";
        let p = plan(pkgs.clone(), earlier, 90);
        assert!(p.fetch.is_empty());
        assert_eq!(
            (p.counts.cached, p.counts.over_budget, p.counts.budget),
            (4, 1, 20)
        );
        assert_eq!(plan(pkgs.clone(), earlier, 100).fetch.len(), 1);
        // A hostile SIZE on a cached entry: the budget is 0, nothing overflows.
        let mut hostile = pkgs;
        hostile[0].size = u64::MAX - 5;
        hostile[1].size = u64::MAX - 5;
        let p = plan(hostile, |p| p.size > 1000, u64::MAX / 2);
        assert_eq!((p.counts.budget, p.fetch.len()), (0, 0));
    }

    #[test]
    fn status_before_any_pass_says_so() {
        let u = Updates::new(PathBuf::from("/sandbox"));
        let v = u.status();
        assert_eq!(v["enabled"], true);
        assert_eq!(v["root"], "/sandbox");
        assert_eq!(v["passes"], 0);
        assert!(v["last"].is_null());
        u.update(|r| r.queued = (0..1000).map(|i| format!("a/x/x-{i}-1.gpkg.tar")).collect());
        let v = u.status();
        assert_eq!(v["queued"].as_array().unwrap().len(), QUEUED_SHOWN);
        assert_eq!(
            v["queued_total"], 1000,
            "a long queue is counted, not listed"
        );
    }
}
