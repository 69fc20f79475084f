//! The world-updates rule: which index entries are newer builds of installed packages.
//!
//! Shared by `binpkgfs prefetch --world-updates` (`command`) and the daemon's
//! `-o prefetch=updates` (`updates`), so both see the same updates. It reads EROOT/var/db/pkg
//! (each `cat/pf` directory's `SLOT` and `BUILD_ID`) and the index's `SLOT` lines, and compares
//! versions with `version`. It is a version comparison, not emerge's resolver: new
//! dependencies, slot moves, masks and USE changes are not seen.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use super::version::{Version, split_cpv};
use crate::index::{Index, Package};

/// One package installed in EROOT/var/db/pkg.
#[derive(Debug)]
pub struct Installed {
    pub name: String,
    pub version: Version,
    pub slot: Option<String>,
    pub build_id: Option<u64>,
}

/// Every package installed in `root`/var/db/pkg (its `SLOT` and `BUILD_ID` files).
pub fn installed(root: &Path) -> Result<Vec<Installed>, String> {
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
pub fn slots(raw: &[u8]) -> HashMap<String, String> {
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
pub fn world_updates<'a>(
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use bytes::Bytes;

    const INDEX: &str = "TIMESTAMP: 100\nVERSION: 0\n\n\
        CPV: a/x-1\nBUILD_ID: 1\nPATH: a/x/x-1-1.gpkg.tar\nSIZE: 10\nSLOT: 0\n\n\
        CPV: a/x-1\nBUILD_ID: 2\nPATH: a/x/x-1-2.gpkg.tar\nSIZE: 20\nSLOT: 0\n\n\
        CPV: a/x-1.1\nBUILD_ID: 1\nPATH: a/x/x-1.1-1.gpkg.tar\nSIZE: 20\nSLOT: 0\n\n\
        CPV: a/x-2\nBUILD_ID: 1\nPATH: a/x/x-2-1.gpkg.tar\nSIZE: 20\nSLOT: 2/2.1\n\n\
        CPV: a/x-lib-3\nPATH: a/x-lib-3.tbz2\nSIZE: 30\n";

    /// A small index with versions, builds and slots, for this rule's tests and its users'.
    pub(in crate::prefetch) fn index() -> Index {
        Index::parse(Bytes::from_static(INDEX.as_bytes())).unwrap()
    }

    pub(in crate::prefetch) fn paths(pkgs: &[&Package]) -> Vec<String> {
        pkgs.iter().map(|p| p.path.to_string()).collect()
    }

    /// An installed package, as `installed` reads it.
    pub(in crate::prefetch) fn inst(
        name: &str,
        v: &str,
        slot: Option<&str>,
        build_id: Option<u64>,
    ) -> Installed {
        Installed {
            name: name.into(),
            version: Version::parse(v).unwrap(),
            slot: slot.map(str::to_string),
            build_id,
        }
    }

    #[test]
    fn world_updates_pick_the_newest_in_the_same_slot() {
        let idx = index();
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

    #[test]
    fn reads_the_installed_database() {
        let root = tempfile::tempdir().unwrap();
        let vdb = |pf: &str, files: &[(&str, &str)]| {
            let dir = root.path().join("var/db/pkg").join(pf);
            fs::create_dir_all(&dir).unwrap();
            for (name, text) in files {
                fs::write(dir.join(name), text).unwrap();
            }
        };
        vdb("a/x-1", &[("SLOT", "0/1\n"), ("BUILD_ID", "2\n")]);
        vdb("a/-MERGING-x-2", &[("SLOT", "0\n")]);
        vdb("a/not-a-cpv", &[]);
        let got = installed(root.path()).unwrap();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            (
                got[0].name.as_str(),
                got[0].slot.as_deref(),
                got[0].build_id
            ),
            ("a/x", Some("0"), Some(2))
        );
        let e = installed(&root.path().join("nowhere")).unwrap_err();
        assert!(e.contains("nowhere/var/db/pkg"), "{e}");
    }
}
