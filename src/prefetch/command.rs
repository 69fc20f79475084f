//! `binpkgfs prefetch`: fill a mounted binpkgfs's cache ahead of an install.
//!
//! No IPC: the command reads the mount's own `Packages`, resolves its arguments against it, and
//! reads the chosen files through the mount to a sink, `JOBS` at a time. Each read makes the
//! daemon fetch and verify the file (the final byte is only served once the whole file checks
//! out), so a file read to the end is in the cache; a wrong one fails the read with `EIO`.
//!
//! Every argument must match something before anything is read: a typo is one clear error,
//! not a partial prefetch.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::io::{IsTerminal, Read};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};

use super::version::{Version, split_cpv};
use crate::config::PrefetchConfig;
use crate::index::{Index, Package};

/// Files read through the mount at once.
const JOBS: usize = 3;

/// Runs `binpkgfs prefetch`. `Err` is the one line to print before exiting non-zero.
pub fn run(cfg: PrefetchConfig) -> Result<(), String> {
    let mount = &cfg.mountpoint;
    let index_path = mount.join("Packages");
    let raw = fs::read(&index_path).map_err(|e| {
        format!(
            "{}: {e} (is binpkgfs mounted at {}?)",
            index_path.display(),
            mount.display()
        )
    })?;
    let raw = Bytes::from(raw);
    let index = Index::parse(raw.clone()).map_err(|e| format!("{}: {e}", index_path.display()))?;
    let mut chosen: Vec<&Package> = Vec::new();
    for arg in &cfg.targets {
        let found = resolve(&index, mount, arg);
        if found.is_empty() {
            return Err(format!(
                "`{arg}` matches no package in {}",
                index_path.display()
            ));
        }
        chosen.extend(found);
    }
    if let Some(root) = &cfg.world_updates {
        let installed = installed(root)?;
        let updates = world_updates(&index, &slots(&raw), &installed);
        if updates.is_empty() {
            println!(
                "no updates in the index for the {} packages installed in {}",
                installed.len(),
                root.display()
            );
        }
        chosen.extend(updates);
    }
    let mut seen = std::collections::HashSet::new();
    chosen.retain(|p| seen.insert(&p.path));
    let outcome = read_all(mount, &chosen);
    let mib = outcome.bytes as f64 / (1 << 20) as f64;
    println!(
        "prefetched {} packages, {mib:.1} MiB in {:.1} s; {} failed",
        outcome.ok,
        outcome.elapsed.as_secs_f64(),
        outcome.failed
    );
    if outcome.failed > 0 {
        return Err(format!(
            "{} of {} packages could not be prefetched",
            outcome.failed,
            chosen.len()
        ));
    }
    Ok(())
}

/// The packages `arg` names: a path in the mount, `cat/pkg-ver`, or `cat/pkg`.
fn resolve<'a>(index: &'a Index, mount: &Path, arg: &str) -> Vec<&'a Package> {
    let rel = Path::new(arg)
        .strip_prefix(mount)
        .ok()
        .and_then(Path::to_str)
        .unwrap_or(arg);
    let rel = rel.trim_start_matches("./");
    if let Some(p) = index.packages.iter().find(|p| &*p.path == rel) {
        return vec![p];
    }
    let atom = arg.strip_prefix('=').unwrap_or(arg);
    let mut by_cpv: Vec<&Package> = match split_cpv(atom) {
        Some(_) => index.packages.iter().filter(|p| &*p.cpv == atom).collect(),
        None => index
            .packages
            .iter()
            .filter(|p| split_cpv(&p.cpv).is_some_and(|(name, _)| name == atom))
            .collect(),
    };
    newest_builds(&mut by_cpv);
    by_cpv
}

/// Keeps, per CPV, the entry with the highest BUILD_ID (first one on ties).
fn newest_builds(pkgs: &mut Vec<&Package>) {
    let mut best: HashMap<&str, &Package> = HashMap::new();
    for p in pkgs.iter() {
        let slot = best.entry(&p.cpv).or_insert(p);
        if p.build_id > slot.build_id {
            *slot = p;
        }
    }
    pkgs.retain(|p| best.get(&*p.cpv).is_some_and(|b| std::ptr::eq(*b, *p)));
}

/// One package installed in EROOT/var/db/pkg.
#[derive(Debug)]
struct Installed {
    name: String,
    version: Version,
    slot: Option<String>,
    build_id: Option<u64>,
}

fn installed(root: &Path) -> Result<Vec<Installed>, String> {
    let db = root.join("var/db/pkg");
    let cats = fs::read_dir(&db).map_err(|e| format!("{}: {e}", db.display()))?;
    let mut out = Vec::new();
    for cat in cats.flatten() {
        let Ok(pfs) = fs::read_dir(cat.path()) else {
            continue;
        };
        for pf in pfs.flatten() {
            let (cat, pf) = (cat.file_name(), pf.file_name());
            let (Some(cat), Some(pf)) = (cat.to_str(), pf.to_str()) else {
                continue;
            };
            // Portage's in-progress merges and lock files.
            if pf.starts_with('.') || pf.starts_with("-MERGING-") {
                continue;
            }
            let Some((name, version)) = split_cpv(&format!("{cat}/{pf}"))
                .map(|(name, version)| (name.to_string(), version))
            else {
                continue;
            };
            let dir = db.join(cat).join(pf);
            let field = |f: &str| {
                fs::read_to_string(dir.join(f))
                    .ok()
                    .map(|s| s.trim().to_string())
            };
            out.push(Installed {
                name,
                version,
                slot: field("SLOT").map(|s| main_slot(&s).to_string()),
                build_id: field("BUILD_ID").and_then(|s| s.parse().ok()),
            });
        }
    }
    Ok(out)
}

fn main_slot(slot: &str) -> &str {
    slot.split('/').next().unwrap_or(slot)
}

/// `PATH -> main SLOT` for the index's entries that carry a SLOT (the snapshot does not keep it).
fn slots(raw: &[u8]) -> HashMap<String, String> {
    let text = String::from_utf8_lossy(raw);
    let mut out = HashMap::new();
    for block in text.split("\n\n") {
        let field = |key: &str| {
            block.lines().rev().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k == key).then(|| v.get(1..).unwrap_or("").trim().to_string())
            })
        };
        if let (Some(cpv), Some(slot)) = (field("CPV"), field("SLOT")) {
            let path = field("PATH").unwrap_or_else(|| format!("{cpv}.tbz2"));
            out.insert(path, main_slot(&slot).to_string());
        }
    }
    out
}

/// For each installed package, the newest index entry of the same name and slot that is a
/// newer version, or the same version with a higher BUILD_ID. A slot unknown on either side
/// matches any slot. Without dependency resolution this is an approximation of `emerge -u`: it
/// sees no new dependencies, slot moves, masks or USE changes.
fn world_updates<'a>(
    index: &'a Index,
    slots: &HashMap<String, String>,
    installed: &[Installed],
) -> Vec<&'a Package> {
    let mut by_name: HashMap<&str, Vec<(&Package, Version)>> = HashMap::new();
    for p in &index.packages {
        if let Some((name, v)) = split_cpv(&p.cpv) {
            by_name.entry(name).or_default().push((p, v));
        }
    }
    let mut out = Vec::new();
    for inst in installed {
        let Some(candidates) = by_name.get(inst.name.as_str()) else {
            continue;
        };
        let best = candidates
            .iter()
            .filter(|(p, _)| match (&inst.slot, slots.get(&*p.path)) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            })
            .filter(|(p, v)| match v.cmp(&inst.version) {
                std::cmp::Ordering::Greater => true,
                std::cmp::Ordering::Equal => inst.build_id.is_some() && p.build_id > inst.build_id,
                std::cmp::Ordering::Less => false,
            })
            .max_by(|(p, v), (q, w)| v.cmp(w).then(p.build_id.cmp(&q.build_id)));
        if let Some((p, _)) = best {
            out.push(*p);
        }
    }
    out
}

struct Outcome {
    ok: usize,
    failed: usize,
    bytes: u64,
    elapsed: Duration,
}

/// Reads every package through the mount to the end, `JOBS` at a time, in the given order.
fn read_all(mount: &Path, pkgs: &[&Package]) -> Outcome {
    let total: u64 = pkgs.iter().map(|p| p.size).sum();
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed:>4} [{bar:30}] {binary_bytes}/{binary_total_bytes} \
                 {binary_bytes_per_sec} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    } else {
        ProgressBar::hidden()
    };
    let started = Instant::now();
    let queue = Mutex::new(pkgs.iter().copied().collect::<VecDeque<_>>());
    let counts = Mutex::new((0usize, 0usize, 0u64));
    let n = pkgs.len();
    std::thread::scope(|s| {
        for _ in 0..JOBS.min(n) {
            s.spawn(|| {
                while let Some(pkg) = queue.lock().unwrap().pop_front() {
                    let result = read_one(&mount.join(&*pkg.path), pkg.size, &bar);
                    let mut c = counts.lock().unwrap();
                    match result {
                        Ok(()) => {
                            c.0 += 1;
                            c.2 += pkg.size;
                        }
                        Err(e) => {
                            c.1 += 1;
                            bar.suspend(|| eprintln!("binpkgfs: {}: {e}", pkg.path));
                        }
                    }
                    bar.set_message(format!("{}/{n} packages", c.0 + c.1));
                }
            });
        }
    });
    bar.finish_and_clear();
    let (ok, failed, bytes) = *counts.lock().unwrap();
    Outcome {
        ok,
        failed,
        bytes,
        elapsed: started.elapsed(),
    }
}

fn read_one(path: &Path, size: u64, bar: &ProgressBar) -> Result<(), String> {
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                got += k as u64;
                bar.inc(k as u64);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    if got != size {
        return Err(format!("read {got} bytes, the index says {size}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDEX: &str = "TIMESTAMP: 100\nVERSION: 0\n\n\
        CPV: a/x-1\nBUILD_ID: 1\nPATH: a/x/x-1-1.gpkg.tar\nSIZE: 10\nSLOT: 0\n\n\
        CPV: a/x-1\nBUILD_ID: 2\nPATH: a/x/x-1-2.gpkg.tar\nSIZE: 20\nSLOT: 0\n\n\
        CPV: a/x-1.1\nBUILD_ID: 1\nPATH: a/x/x-1.1-1.gpkg.tar\nSIZE: 20\nSLOT: 0\n\n\
        CPV: a/x-2\nBUILD_ID: 1\nPATH: a/x/x-2-1.gpkg.tar\nSIZE: 20\nSLOT: 2/2.1\n\n\
        CPV: a/x-lib-3\nPATH: a/x-lib-3.tbz2\nSIZE: 30\n";

    fn index() -> Index {
        Index::parse(Bytes::from_static(INDEX.as_bytes())).unwrap()
    }

    fn paths(pkgs: &[&Package]) -> Vec<String> {
        pkgs.iter().map(|p| p.path.to_string()).collect()
    }

    #[test]
    fn resolves_paths_cpvs_and_names() {
        let idx = index();
        let m = Path::new("/mnt");
        let r = |arg| paths(&resolve(&idx, m, arg));
        assert_eq!(r("a/x/x-1-1.gpkg.tar"), ["a/x/x-1-1.gpkg.tar"]);
        assert_eq!(r("/mnt/a/x/x-1-1.gpkg.tar"), ["a/x/x-1-1.gpkg.tar"]);
        assert_eq!(r("a/x-1"), ["a/x/x-1-2.gpkg.tar"]);
        assert_eq!(r("=a/x-1"), ["a/x/x-1-2.gpkg.tar"]);
        assert_eq!(
            r("a/x"),
            [
                "a/x/x-1-2.gpkg.tar",
                "a/x/x-1.1-1.gpkg.tar",
                "a/x/x-2-1.gpkg.tar"
            ]
        );
        assert_eq!(r("a/x-lib"), ["a/x-lib-3.tbz2"]);
        for none in ["a/y", "a/x-3", "a", "a/x/x-9.gpkg.tar", ""] {
            assert!(r(none).is_empty(), "{none:?}");
        }
    }

    #[test]
    fn world_updates_pick_the_newest_in_the_same_slot() {
        let idx = index();
        let inst = |name: &str, v: &str, slot: Option<&str>, build_id| Installed {
            name: name.into(),
            version: Version::parse(v).unwrap(),
            slot: slot.map(str::to_string),
            build_id,
        };
        let up = |installed: &[Installed]| paths(&world_updates(&idx, &slots(&idx.raw), installed));
        // Slot 0 at 1: 1.1 is newer (2 is another slot).
        assert_eq!(
            up(&[inst("a/x", "1", Some("0"), Some(2))]),
            ["a/x/x-1.1-1.gpkg.tar"]
        );
        // Already newest in slot 2; nothing else in the index.
        assert!(up(&[inst("a/x", "2", Some("2"), Some(1))]).is_empty());
        // Unknown slot: the newest of any slot.
        assert_eq!(up(&[inst("a/x", "1", None, None)]), ["a/x/x-2-1.gpkg.tar"]);
        // Same version, newer build (slot 0, version 1.1 has only build 1).
        assert_eq!(
            up(&[inst("a/x", "1.1", Some("0"), Some(0))]),
            ["a/x/x-1.1-1.gpkg.tar"]
        );
        assert!(up(&[inst("a/x", "1.1", Some("0"), None)]).is_empty());
        assert!(up(&[inst("b/nothing", "1", None, None)]).is_empty());
    }
}
