//! Several binhosts in one PKGDIR: each binhost's own index life, and their merge.
//!
//! Every binhost is a `Lifecycle` of its own: its endpoint (with its mirrors), its refresh
//! timer, its saved index and validators, its offline state. A binhost that is down keeps its
//! saved (or last good) index in the merge, so it never hides the others' packages; one that
//! has never been reached is an empty index until it answers. After any binhost's index
//! changes, the indexes are merged again (`index::merge`) and the tree is swapped whole.
//!
//! The rest of the mount (the FUSE adapter, status, the merge-list prefetcher) sees the merge
//! through `merged`, a `Lifecycle` whose tree is the merged one; it is never run itself.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::binrepos::BinRepo;
use crate::cache::Store;
use crate::index::merge::{Source, merge};
use crate::index::{Index, Rejected};
use crate::lifecycle::{Lifecycle, RefreshState};
use crate::namespace::Namespace;
use crate::remote::{self, Endpoint, Mirror, Mirrors, RemoteOptions};

pub struct Binhost {
    pub repo: BinRepo,
    pub endpoint: Arc<Endpoint>,
    /// Its mirrors' state, when it has more than one.
    pub mirrors: Vec<Arc<Mirror>>,
    pub life: Arc<Lifecycle>,
}

pub struct Union {
    pub binhosts: Vec<Binhost>,
    /// The merged view, for everything that reads the tree.
    pub merged: Arc<Lifecycle>,
    /// Serialises merges: two binhosts refreshing at once must not swap out of order.
    merging: Mutex<()>,
}

/// The key a binhost's saved index is kept under.
fn key(repo: &BinRepo) -> String {
    repo.mirrors.join(" ")
}

fn empty_index() -> Index {
    Index {
        raw: Bytes::new(),
        timestamp: None,
        ttl: None,
        uri: None,
        header_span: (0, 0),
        packages: Vec::new(),
        rejected: Vec::new(),
    }
}

fn lifecycle_with(
    endpoint: Arc<Endpoint>,
    store: Arc<Store>,
    url: String,
    index: Index,
    result: String,
) -> Lifecycle {
    Lifecycle::with_index(endpoint, store, url, index, result, Default::default())
}

impl Union {
    /// Connects to every binhost and loads each index (at the same time). `Err` only when no
    /// binhost has an index at all, or a URL is unusable.
    pub async fn start(
        repos: Vec<BinRepo>,
        opts: &RemoteOptions,
        store: Arc<Store>,
        source: String,
    ) -> Result<Union, String> {
        let mut pending = Vec::new();
        for repo in repos {
            let (transport, mirrors) = connect(&repo, opts)?;
            let endpoint = Arc::new(Endpoint::new(transport).with_options(opts.clone()));
            let store = store.clone();
            let task = tokio::spawn(load(repo.clone(), endpoint.clone(), store));
            pending.push((repo, endpoint, mirrors, task));
        }
        let mut binhosts = Vec::new();
        for (repo, endpoint, mirrors, task) in pending {
            let life = task
                .await
                .map_err(|e| format!("loading {}: {e}", repo.name))?;
            binhosts.push(Binhost {
                repo,
                endpoint,
                mirrors,
                life: Arc::new(life),
            });
        }
        if binhosts
            .iter()
            .all(|b| b.life.ns.current().index.timestamp.is_none())
        {
            let why: Vec<String> = binhosts
                .iter()
                .map(|b| format!("{}: {}", b.repo.name, b.life.last.lock().unwrap().result))
                .collect();
            return Err(format!("no binhost has an index: {}", why.join("; ")));
        }
        let first = &binhosts[0];
        let merged = lifecycle_with(
            first.endpoint.clone(),
            store,
            source,
            empty_index(),
            "merged".into(),
        );
        let union = Union {
            binhosts,
            merged: Arc::new(merged),
            merging: Mutex::new(()),
        };
        union.remerge();
        // The merged view is new to this cache if any binhost's index was.
        if union
            .binhosts
            .iter()
            .any(|b| *b.life.new_indexes().borrow() > 0)
        {
            union.merged.note_new_index();
        }
        Ok(union)
    }

    /// The endpoints in binhost order, for the fetcher (`Origin::binhost` indexes them).
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.binhosts.iter().map(|b| b.endpoint.clone()).collect()
    }

    /// Merges the binhosts' current indexes and swaps the result in, if it changed (`true`).
    pub fn remerge(&self) -> bool {
        let _one = self.merging.lock().unwrap();
        let indexes: Vec<Arc<Index>> = self
            .binhosts
            .iter()
            .map(|b| b.life.ns.current().index.clone())
            .collect();
        let wants: Vec<_> = self
            .binhosts
            .iter()
            .map(|b| move |cpv: &str, slot: Option<&str>| b.repo.wants(cpv, slot))
            .collect();
        let sources: Vec<Source> = self
            .binhosts
            .iter()
            .zip(&indexes)
            .zip(&wants)
            .filter(|((_, ix), _)| ix.timestamp.is_some())
            .map(|((b, index), wants)| Source {
                index,
                name: &b.repo.name,
                wants,
                gpkg_only: b.repo.verify_signature,
            })
            .collect();
        // Binhosts without an index are left out, so origins must index the full list.
        let positions: Vec<u16> = indexes
            .iter()
            .enumerate()
            .filter(|(_, ix)| ix.timestamp.is_some())
            .map(|(i, _)| i as u16)
            .collect();
        let current = self.merged.ns.current().index.clone();
        let floor = current.timestamp.unwrap_or(0);
        let mut m = merge(&sources, floor);
        if m.index.raw == current.raw {
            return false;
        }
        if current.timestamp.is_some() && m.index.timestamp == current.timestamp {
            // Changed, but no binhost's TIMESTAMP moved past ours: move it anyway.
            m = merge(&sources, floor + 1);
        }
        for p in &mut m.index.packages {
            p.origin.binhost = positions[p.origin.binhost as usize];
        }
        let (ns, collisions) = Namespace::build(Arc::new(m.index));
        let refused: Vec<&Rejected> = ns.index.rejected.iter().chain(&collisions).collect();
        for r in refused.iter().take(20) {
            warn!(entry = %r.what, "refusing index entry: {}", r.reason);
        }
        info!(
            packages = ns.index.packages.len(),
            timestamp = ns.index.timestamp,
            duplicates = m.duplicates,
            filtered = m.filtered,
            moved = m.moved,
            "binhosts merged"
        );
        self.merged.ns.swap(ns);
        *self.merged.last.lock().unwrap() = RefreshState {
            at: SystemTime::now(),
            result: self.summary(),
            validators: Default::default(),
        };
        true
    }

    fn summary(&self) -> String {
        self.binhosts
            .iter()
            .map(|b| format!("{}: {}", b.repo.name, b.life.last.lock().unwrap().result))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Re-checks every binhost on its own timer forever (frozen ones never); run as a task.
    pub async fn run(self: Arc<Self>, ttl: Duration) {
        let mut tasks = JoinSet::new();
        for i in 0..self.binhosts.len() {
            if self.binhosts[i].repo.frozen {
                continue;
            }
            let me = self.clone();
            tasks.spawn(async move {
                let b = &me.binhosts[i];
                loop {
                    let header_ttl = b.life.ns.current().index.ttl.map(Duration::from_secs);
                    let wait = header_ttl
                        .map_or(ttl, |h| h.min(ttl))
                        .max(Duration::from_secs(1));
                    tokio::time::sleep(wait).await;
                    let before = b.life.ns.current();
                    b.life.refresh().await;
                    if !Arc::ptr_eq(&before, &b.life.ns.current()) {
                        if me.remerge() {
                            me.merged.note_new_index();
                        }
                    } else {
                        me.merged.last.lock().unwrap().result = me.summary();
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        std::future::pending::<()>().await
    }

    /// Each binhost and its mirrors, for `status`.
    pub fn status(&self) -> Value {
        let ns = self.merged.ns.current();
        let mut served = vec![0usize; self.binhosts.len()];
        for p in &ns.index.packages {
            if let Some(n) = served.get_mut(p.origin.binhost as usize) {
                *n += 1;
            }
        }
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        };
        let list: Vec<Value> = self
            .binhosts
            .iter()
            .zip(served)
            .map(|(b, served)| {
                let index = b.life.ns.current().index.clone();
                let last = b.life.last.lock().unwrap().clone();
                let mirrors = mirrors_status(&b.mirrors);
                json!({
                    "name": b.repo.name,
                    "priority": b.repo.priority,
                    "urls": b.repo.mirrors,
                    "frozen": b.repo.frozen,
                    "online": b.endpoint.is_online()
                        && !last.result.starts_with("failed")
                        && !last.result.starts_with("offline"),
                    "timestamp": index.timestamp,
                    "packages": index.packages.len(),
                    "served_packages": served,
                    "last_check": unix(last.at),
                    "last_check_result": last.result,
                    "mirrors": mirrors,
                })
            })
            .collect();
        Value::Array(list)
    }
}

/// Each mirror's state, requests and failures, for `status`.
pub fn mirrors_status(mirrors: &[Arc<Mirror>]) -> Value {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    Value::Array(
        mirrors
            .iter()
            .map(|m| {
                json!({
                    "url": m.url,
                    "state": m.state().map_or("ok".to_string(), |w| format!("passed over: {w}")),
                    "requests": load(&m.served),
                    "failures": load(&m.failures),
                })
            })
            .collect(),
    )
}

/// A binhost's transport, and its mirrors' state when it has several.
pub type Connected = (Box<dyn remote::Transport>, Vec<Arc<Mirror>>);

/// The transport for one binhost, and its mirrors' state when it has several.
pub fn connect(repo: &BinRepo, opts: &RemoteOptions) -> Result<Connected, String> {
    if let [one] = &repo.mirrors[..] {
        return Ok((
            remote::connect(one, opts).map_err(|e| e.to_string())?,
            Vec::new(),
        ));
    }
    let mut all = Vec::new();
    for u in &repo.mirrors {
        all.push((
            u.clone(),
            remote::connect(u, opts).map_err(|e| e.to_string())?,
        ));
    }
    let m = Mirrors::new(all);
    let state = m.mirrors.clone();
    Ok((Box::new(m), state))
}

/// One binhost's first index: frozen with a saved copy, that copy (no network); else as a
/// single mount loads it; and if it has neither, an empty index that a refresh fills later.
async fn load(repo: BinRepo, endpoint: Arc<Endpoint>, store: Arc<Store>) -> Lifecycle {
    let url = key(&repo);
    if repo.frozen
        && let Ok(Some((raw, v))) = store.load_index(&url)
        && let Ok(index) = Index::parse(Bytes::from(raw))
    {
        info!(binhost = %repo.name, "frozen: using the saved index");
        endpoint.follow_uri(index.uri.as_deref());
        let life = lifecycle_with(endpoint, store, url, index, "frozen".into());
        life.last.lock().unwrap().validators = v;
        return life;
    }
    match Lifecycle::start(endpoint.clone(), store.clone(), url.clone()).await {
        Ok(life) => life,
        Err(e) => {
            warn!(binhost = %repo.name, "{e}; its packages appear once it answers");
            lifecycle_with(endpoint, store, url, empty_index(), format!("failed: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn index(ts: u64, cpv: &str, size: u64) -> String {
        let (cat, pf) = cpv.split_once('/').unwrap();
        let pn = crate::binrepos::split_cpv(cpv).unwrap().1;
        format!(
            "PACKAGES: 1\nTIMESTAMP: {ts}\nVERSION: 0\n\nBUILD_ID: 1\nCPV: {cpv}\nMTIME: 5\n\
             PATH: {cat}/{pn}/{pf}-1.gpkg.tar\nSIZE: {size}\n\n"
        )
    }

    fn repo(name: &str, dir: &std::path::Path, priority: i64) -> BinRepo {
        BinRepo {
            name: name.into(),
            mirrors: vec![format!("file://{}", dir.display())],
            priority,
            frozen: false,
            include: Vec::new(),
            exclude: Vec::new(),
            verify_signature: false,
        }
    }

    /// A change in a lower-priority binhost whose TIMESTAMP stays below the other's still
    /// changes the merged TIMESTAMP; a binhost with nothing to offer is not fatal; and one
    /// that goes away keeps its last index in the merge.
    #[tokio::test]
    async fn any_change_is_a_change_of_the_whole() {
        let high = tempfile::tempdir().unwrap();
        let low = tempfile::tempdir().unwrap();
        let missing = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        std::fs::write(high.path().join("Packages"), index(1000, "a/x-1", 3)).unwrap();
        std::fs::write(low.path().join("Packages"), index(100, "a/y-1", 4)).unwrap();
        let store = Arc::new(Store::open(cache.path(), 1 << 30).unwrap());
        let opts = RemoteOptions {
            connect_timeout: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(1),
            ..RemoteOptions::default()
        };
        let repos = vec![
            repo("high", high.path(), 2),
            repo("low", low.path(), 1),
            repo("missing", &missing.path().join("nope"), 0),
        ];
        let u = Union::start(repos, &opts, store, "test".into())
            .await
            .unwrap();
        let ts = |u: &Union| u.merged.ns.current().index.timestamp.unwrap();
        let cpvs = |u: &Union| -> Vec<String> {
            u.merged
                .ns
                .current()
                .index
                .packages
                .iter()
                .map(|p| p.cpv.to_string())
                .collect()
        };
        assert_eq!(ts(&u), 1000);
        assert_eq!(cpvs(&u), ["a/x-1", "a/y-1"]);
        assert_eq!(u.merged.ns.current().index.packages[1].origin.binhost, 1);
        let new_indexes = |life: &Lifecycle| *life.new_indexes().borrow();
        assert_eq!(
            new_indexes(&u.merged),
            1,
            "fetched at start: new to the cache"
        );

        std::fs::write(low.path().join("Packages"), index(200, "a/z-1", 4)).unwrap();
        u.binhosts[1].life.refresh().await;
        assert_eq!(new_indexes(&u.binhosts[1].life), 2);
        assert!(u.remerge(), "the merge changed");
        assert_eq!(cpvs(&u), ["a/x-1", "a/z-1"]);
        assert_eq!(
            ts(&u),
            1001,
            "changed below the newest TIMESTAMP: raised by one"
        );
        assert!(!u.remerge());
        assert_eq!(ts(&u), 1001, "no change, no new TIMESTAMP");

        // low goes away: its last index stays in the merge.
        std::fs::remove_file(low.path().join("Packages")).unwrap();
        u.binhosts[1].life.refresh().await;
        u.remerge();
        assert_eq!(cpvs(&u), ["a/x-1", "a/z-1"]);
        let status = u.status();
        assert_eq!(status[2]["online"], false);
        assert_eq!(status[1]["served_packages"], 1);
    }
}
