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

use super::version::split_cpv;
use super::world::{installed, slots, world_updates};
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
    use crate::prefetch::world::tests::{index, paths};

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
}
