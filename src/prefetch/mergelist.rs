//! The daemon side: prefetch what emerge is about to install, read from the merge list it
//! publishes in `EROOT/var/cache/edb/mtimedb` before merging starts.
//!
//! `resume.binpkgs` lists every binary package of the merge (`CPV`, `BUILD_ID`, `SIZE`, `MTIME`,
//! ... as in `Packages`). Entries are matched to the current index snapshot (CPV + BUILD_ID,
//! else CPV + SIZE + MTIME); what does not match (another PKGDIR, a source build) is ignored.
//! The matches are fetched whole into the cache in merge order, `PARALLEL` at a time, through
//! `Fetcher::fetch_whole`, which shares a transfer with any reader: the package emerge is
//! reading right now already has its transfer, and nothing crosses the network twice.
//!
//! Every change of the list is also handed to `Lifecycle::merge_list`, which keeps the entries
//! of the running merge served across a binhost release until the list ends (issue 11.3), and
//! tells `prefetch=updates` to yield. With `noprefetch` and `prefetch=updates`, the list is
//! watched for that alone: no batch.
//!
//! Rules:
//! * the list found at mount time is not acted on: it may be an abandoned merge, and a restart
//!   must not start gigabytes of downloads nobody asked for (`emerge --resume` writes anew);
//! * Portage rewrites the file after each package (the merge list shrinks, `binpkgs` does not):
//!   a batch is started only when `binpkgs` changes, so one merge is one batch;
//! * a batch stops at half the cache's size, so prefetching cannot evict what it fetched for
//!   the same merge before emerge reads it;
//! * a file that is missing, partial or not JSON is logged at debug and the next change waited
//!   for; a newer list replaces a running batch (transfers already started run to the end).

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::fetch::Fetcher;
use crate::index::Package;
use crate::lifecycle::Lifecycle;
use crate::namespace::{Namespace, ROOT_INO};

/// Packages fetched at once by one batch (a reader's own transfer comes on top).
const PARALLEL: usize = 2;

/// One `resume.binpkgs` entry: the package's instance key.
pub use crate::index::Instance as Entry;

/// The parts of `mtimedb` that matter here.
#[derive(Debug, PartialEq)]
pub struct MergeList {
    /// `resume.binpkgs` as written: what a batch is keyed on.
    pub key: Value,
    /// Entries still to be merged, in merge order.
    pub entries: Vec<Entry>,
    /// Every entry of `binpkgs`, merged or not: what the index must keep serving until the
    /// merge ends (see `lifecycle`).
    pub all: Vec<Entry>,
}

/// Parses `mtimedb`. `Ok(None)`: no merge in progress.
pub fn parse(raw: &[u8]) -> Result<Option<MergeList>, String> {
    let db: Value = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
    let Some(resume) = db.get("resume") else {
        return Ok(None);
    };
    let Some(binpkgs) = resume.get("binpkgs").and_then(Value::as_array) else {
        return Ok(None);
    };
    // `mergelist` holds `[type, root, cpv, action]` for what is still to merge; without it,
    // every binpkg is still to come.
    let pending: Option<HashSet<&str>> =
        resume
            .get("mergelist")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(Value::as_array)
                    .filter(|x| x.get(3).and_then(Value::as_str) == Some("merge"))
                    .filter_map(|x| x.get(2).and_then(Value::as_str))
                    .collect()
            });
    let all: Vec<Entry> = binpkgs
        .iter()
        .filter_map(|e| {
            Some(Entry {
                cpv: e.get("CPV")?.as_str()?.to_string(),
                build_id: number(e.get("BUILD_ID")),
                build_time: number(e.get("BUILD_TIME")),
                size: number(e.get("SIZE")),
                mtime: number(e.get("MTIME")),
            })
        })
        .collect();
    let entries = all
        .iter()
        .filter(|e| pending.as_ref().is_none_or(|p| p.contains(e.cpv.as_str())))
        .cloned()
        .collect();
    Ok(Some(MergeList {
        key: Value::Array(binpkgs.clone()),
        entries,
        all,
    }))
}

/// An integer written as a JSON number or string (Portage has written both).
fn number<T: TryFrom<i64> + std::str::FromStr>(v: Option<&Value>) -> Option<T> {
    match v? {
        Value::Number(n) => T::try_from(n.as_i64()?).ok(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The index's packages for `entries`, in order; entries with no match are left out.
pub fn resolve(ns: &Namespace, entries: &[Entry]) -> Vec<Package> {
    let mut by_cpv: HashMap<&str, Vec<&Package>> = HashMap::new();
    for p in &ns.index.packages {
        by_cpv.entry(&p.cpv).or_default().push(p);
    }
    let mut seen = HashSet::new();
    entries
        .iter()
        .filter_map(|e| {
            let candidates = by_cpv.get(e.cpv.as_str())?;
            let by_build = e
                .build_id
                .and_then(|id| candidates.iter().find(|p| p.build_id == Some(id)).copied());
            let pkg = by_build.or_else(|| {
                let (size, mtime) = (e.size?, e.mtime?);
                candidates
                    .iter()
                    .find(|p| p.size == size && p.mtime == mtime)
                    .copied()
            })?;
            // Only what the mount shows: an entry the namespace refused is not reachable.
            let shown = served(ns, &pkg.path)?;
            seen.insert(shown.path.clone()).then(|| shown.clone())
        })
        .collect()
}

/// The package the namespace serves at `path`.
pub(super) fn served<'a>(ns: &'a Namespace, path: &str) -> Option<&'a Package> {
    let node = path
        .split('/')
        .try_fold(ns.node(ROOT_INO)?, |node, name| ns.lookup(node.ino, name))?;
    ns.package(node)
}

/// Watches `mtimedb` for as long as the daemon runs. Without `prefetch` (`noprefetch` with
/// `prefetch=updates`), only for the hold, which also tells background work that a merge
/// runs (`Lifecycle::merge_in_progress`): no batch is started.
pub async fn watch(
    mtimedb: PathBuf,
    lifecycle: Arc<Lifecycle>,
    fetcher: Arc<Fetcher>,
    prefetch: bool,
) {
    let mut changes = match super::watcher::spawn(&mtimedb) {
        Ok(rx) => rx,
        Err(e) => {
            warn!(path = %mtimedb.display(), "merge-list watch disabled: cannot watch: {e}");
            return;
        }
    };
    changes.mark_unchanged();
    // The list found now is not acted on (see the module comment), for the hold neither.
    let mut last = read(&mtimedb).await.ok().flatten().map(|m| m.key);
    let mut holding = false;
    let why = if prefetch {
        "for prefetching"
    } else {
        "to hold a merge's entries and yield to it (no merge-list prefetch)"
    };
    info!(path = %mtimedb.display(), "watching emerge's merge list {why}");
    let mut batch: Option<JoinHandle<()>> = None;
    while changes.changed().await.is_ok() {
        let list = match read(&mtimedb).await {
            Ok(Some(list)) => list,
            // The merge ended (or the file is gone): the same list later is a new merge.
            Ok(None) => {
                last = None;
                if std::mem::take(&mut holding) {
                    lifecycle.merge_list(None);
                }
                continue;
            }
            // Half-written or foreign: keep what we know and wait for the next change.
            Err(()) => continue,
        };
        if last.as_ref() == Some(&list.key) {
            if holding {
                // Still merging: the hold's idle bound starts again.
                lifecycle.merge_list(Some(&list.all));
            }
            continue;
        }
        // Before prefetching: the entries this merge resolved stay served (and prefetched)
        // even if a release replaced them in the meantime.
        lifecycle.merge_list(Some(&list.all));
        holding = true;
        last = Some(list.key);
        if !prefetch {
            continue;
        }
        let ns = lifecycle.ns.current();
        let packages = resolve(&ns, &list.entries);
        if let Some(old) = batch.take() {
            old.abort();
        }
        if packages.is_empty() {
            // Source builds, another PKGDIR: not ours, and not worth an info line per emerge.
            debug!(
                listed = list.entries.len(),
                "merge list has nothing from this binhost"
            );
            continue;
        }
        let limit = fetcher.store().usage().limit / 2;
        batch = Some(tokio::spawn(run_batch(
            fetcher.clone(),
            list.entries.len(),
            packages,
            limit,
        )));
    }
}

/// The merge list in `mtimedb`: `Ok(None)` if there is no merge in progress (or no file),
/// `Err` if the file cannot be read or parsed (logged at debug).
/// Real mtimedb files are a few KiB to a few hundred KiB; a larger one is not emerge's.
const MAX_MTIMEDB: u64 = 16 << 20;

async fn read(path: &Path) -> Result<Option<MergeList>, ()> {
    let path = path.to_path_buf();
    // Reading and parsing JSON is blocking work: keep it off the runtime's workers.
    let parsed = tokio::task::spawn_blocking(move || {
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: not readable: {e}", path.display())),
        };
        let mut raw = Vec::new();
        std::io::Read::take(file, MAX_MTIMEDB + 1)
            .read_to_end(&mut raw)
            .map_err(|e| format!("{}: not readable: {e}", path.display()))?;
        if raw.len() as u64 > MAX_MTIMEDB {
            return Err(format!(
                "{}: larger than {MAX_MTIMEDB} bytes",
                path.display()
            ));
        }
        parse(&raw).map_err(|e| format!("{}: not usable (yet): {e}", path.display()))
    })
    .await
    .map_err(|e| debug!("merge list reader failed: {e}"))?;
    parsed.map_err(|e| debug!("merge list {e}"))
}

/// The first of `packages` that fit in `limit` bytes together. Saturating: SIZE comes from
/// the index, and a hostile one may be near u64::MAX.
pub(super) fn within(packages: Vec<Package>, limit: u64) -> Vec<Package> {
    let mut total = 0u64;
    packages
        .into_iter()
        .take_while(|p| {
            total = total.saturating_add(p.size);
            total <= limit
        })
        .collect()
}

/// Fetches `packages` in order, `PARALLEL` at a time, up to `limit` bytes.
async fn run_batch(fetcher: Arc<Fetcher>, listed: usize, packages: Vec<Package>, limit: u64) {
    let matched = packages.len();
    let packages = within(packages, limit);
    let fetching = packages.len();
    let bytes = packages.iter().fold(0u64, |n, p| n.saturating_add(p.size));
    info!(
        listed,
        matched, fetching, bytes, "prefetching the merge list"
    );
    if fetching < matched {
        warn!(
            left_out = matched - fetching,
            "the rest of the merge list would not fit in half the cache; it is fetched when read"
        );
    }
    let started = Instant::now();
    let slots = Arc::new(Semaphore::new(PARALLEL));
    let mut running = JoinSet::new();
    for (i, pkg) in packages.into_iter().enumerate() {
        // Emerge needs the first package now: on a link that bandwidth bounds, sharing it
        // with a second transfer would delay exactly that package (measured on the shaped
        // link: +0.9 s per cold install). Later ones are needed one install later each.
        let Ok(slot) = slots
            .clone()
            .acquire_many_owned(if i == 0 { PARALLEL as u32 } else { 1 })
            .await
        else {
            break;
        };
        debug!(path = %pkg.path, "prefetch");
        let fetcher = fetcher.clone();
        running.spawn(async move {
            let r = fetcher.fetch_whole(&pkg).await;
            drop(slot);
            (pkg, r)
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(done) = running.join_next().await {
        match done {
            Ok((_, Ok(()))) => ok += 1,
            // The transfer logged why at warn already.
            Ok((pkg, Err(e))) => {
                failed += 1;
                debug!(path = %pkg.path, "prefetch failed: {e}");
            }
            Err(_) => failed += 1,
        }
    }
    debug!(
        ok,
        failed,
        secs = format!("{:.2}", started.elapsed().as_secs_f64()),
        "prefetch batch done"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const INDEX: &str = "TIMESTAMP: 100\nVERSION: 0\n\n\
        CPV: a/x-1\nBUILD_ID: 1\nPATH: a/x/x-1-1.gpkg.tar\nSIZE: 10\nMTIME: 50\n\n\
        CPV: a/x-1\nBUILD_ID: 2\nPATH: a/x/x-1-2.gpkg.tar\nSIZE: 20\nMTIME: 60\n\n\
        CPV: b/y-2\nPATH: b/y-2.tbz2\nSIZE: 30\nMTIME: 70\n";

    fn ns() -> Namespace {
        let index = crate::index::Index::parse(Bytes::from_static(INDEX.as_bytes())).unwrap();
        Namespace::build(Arc::new(index)).0
    }

    fn mtimedb(binpkgs: &str, mergelist: &str) -> String {
        format!(
            r#"{{"info": {{}}, "resume": {{"favorites": [], "mergelist": {mergelist},
                "binpkgs": {binpkgs}, "myopts": {{}}}}, "version": "3.0.83"}}"#
        )
    }

    #[test]
    fn parses_portage_mtimedb_and_skips_what_is_merged() {
        let db = mtimedb(
            r#"[{"CPV": "b/y-2", "BUILD_ID": null, "BUILD_TIME": 0, "MTIME": 70, "SIZE": 30, "EROOT": "/"},
                {"CPV": "a/x-1", "BUILD_ID": 2, "BUILD_TIME": 5, "MTIME": "60", "SIZE": 20, "EROOT": "/"}]"#,
            r#"[["binary", "/", "a/x-1", "merge"]]"#,
        );
        let list = parse(db.as_bytes()).unwrap().unwrap();
        assert_eq!(
            list.entries,
            [Entry {
                cpv: "a/x-1".into(),
                build_id: Some(2),
                build_time: Some(5),
                size: Some(20),
                mtime: Some(60)
            }]
        );
        assert_eq!(list.key.as_array().unwrap().len(), 2);
        assert_eq!(parse(br#"{"info": {}}"#).unwrap(), None);
        for garbage in [&b""[..], b"{\"resume\": {\"binp", b"\x00\x01", b"[1, 2"] {
            assert!(parse(garbage).is_err());
        }
    }

    #[test]
    fn a_hostile_size_does_not_overflow_the_batch_limit() {
        let index = crate::index::Index::parse(Bytes::from(format!(
            "TIMESTAMP: 1\n\nCPV: a/x-1\nPATH: a/x-1.tbz2\nSIZE: 10\n\n\
             CPV: a/y-1\nPATH: a/y-1.tbz2\nSIZE: {}\n",
            u64::MAX - 5
        )))
        .unwrap();
        let got = within(index.packages.clone(), u64::MAX / 2);
        assert_eq!(got.len(), 1);
        assert_eq!(within(index.packages, u64::MAX).len(), 2);
    }

    #[test]
    fn matches_by_build_id_then_size_and_mtime() {
        let ns = ns();
        let e = |cpv: &str, build_id, size, mtime| Entry {
            cpv: cpv.into(),
            build_id,
            build_time: None,
            size,
            mtime,
        };
        let got = resolve(
            &ns,
            &[
                e("a/x-1", Some(2), None, None),
                e("b/y-2", None, Some(30), Some(70)),
                e("a/x-1", None, Some(10), Some(50)),
                e("a/x-1", Some(9), None, None),      // no such build
                e("b/y-2", None, Some(31), Some(70)), // another file
                e("c/z-1", Some(1), Some(1), Some(1)), // not on this binhost
                e("a/x-1", Some(2), None, None),      // listed twice
            ],
        );
        let paths: Vec<&str> = got.iter().map(|p| &*p.path).collect();
        assert_eq!(
            paths,
            ["a/x/x-1-2.gpkg.tar", "b/y-2.tbz2", "a/x/x-1-1.gpkg.tar"]
        );
    }
}
