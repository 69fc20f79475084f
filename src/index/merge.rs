//! Several binhosts' indexes as one, merged as Portage merges remote indexes
//! (`portage/dbapi/bintree.py:_populate_remote_repo`), so that `emerge --usepkgonly` on the
//! mount sees what `emerge --getbinpkgonly` with the same `binrepos.conf` would.
//!
//! * Sources come highest priority first. An entry whose instance key (CPV, BUILD_ID, SIZE,
//!   BUILD_TIME, MTIME: `_instance_key_multi_instance`) was already taken is dropped, so an
//!   identical instance appears once, from the highest priority. Different builds of one CPV
//!   are all kept; priority does not choose between them (emerge prefers the newest BUILD_TIME).
//! * Two different builds at one PATH: the earlier (higher priority) keeps it; the other moves
//!   to `cat/pn/pf-N.<ext>` with N the CPV's highest BUILD_ID over every source plus one (the
//!   first free), as `_allocate_filename_multi` does when Portage stores a second build in one
//!   PKGDIR. Its `BUILD_ID` line stays the file's own, as Portage's `inject` writes it; emerge
//!   never compares the two.
//! * Each kept entry's block is served byte for byte, except its PATH line when moved (and an
//!   `MTIME` line added when it had none, since its default would otherwise change).
//! * The header is the highest-priority source's, with `PACKAGES` and `TIMESTAMP` recomputed:
//!   TIMESTAMP is the newest of the sources', raised to at least `timestamp_floor` (the caller
//!   passes the last merged TIMESTAMP + 1 when the content changed without it moving), so a
//!   change in any binhost is a change of the whole.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;

use super::{Blocks, Index, Package, Rejected};

/// One binhost's parsed index, and what of it this mount takes.
pub struct Source<'a> {
    pub index: &'a Index,
    /// A short name for warnings.
    pub name: &'a str,
    /// Whether an entry `(CPV, SLOT)` is taken (`getbinpkg-include`/`-exclude`).
    pub wants: &'a dyn Fn(&str, Option<&str>) -> bool,
    /// Drop entries that are not gpkg (`verify-signature`: xpak carries no signature).
    pub gpkg_only: bool,
}

/// The merge and what it did, for the log.
#[derive(Debug)]
pub struct Merged {
    pub index: Index,
    /// Identical instances left out in favour of a higher priority.
    pub duplicates: usize,
    /// Entries left out by include/exclude lists or `gpkg_only`.
    pub filtered: usize,
    /// Entries given another PATH because a higher priority's build holds theirs.
    pub moved: usize,
}

type InstanceKey = (String, Option<i64>, Option<i64>, i64, Option<i64>);

/// Portage's `_pkg_str._long`: an integer, or the default.
fn long(v: Option<&str>) -> Option<i64> {
    v.and_then(|v| v.trim().parse().ok())
}

/// Merges `sources` (highest priority first). Each index was parsed whole already; its entries
/// are re-read from its raw text so their blocks can be served unchanged.
pub fn merge(sources: &[Source<'_>], timestamp_floor: u64) -> Merged {
    let texts: Vec<_> = sources
        .iter()
        .map(|s| String::from_utf8_lossy(&s.index.raw))
        .collect();
    // Every PATH any source claims, and each CPV's highest BUILD_ID, over all sources: a moved
    // entry takes a PATH nobody claims.
    let mut claimed: HashSet<&str> = HashSet::new();
    let mut max_build: HashMap<&str, u64> = HashMap::new();
    for s in sources {
        for p in &s.index.packages {
            claimed.insert(&p.path);
            let m = max_build.entry(&p.cpv).or_default();
            *m = (*m).max(p.build_id.unwrap_or(0));
        }
    }
    let mut claimed: HashSet<String> = claimed.into_iter().map(str::to_string).collect();
    let mut max_build: HashMap<String, u64> = max_build
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let timestamp = sources
        .iter()
        .filter_map(|s| s.index.timestamp)
        .max()
        .unwrap_or(0)
        .max(timestamp_floor);

    let mut seen: HashSet<InstanceKey> = HashSet::new();
    let mut taken: HashSet<String> = HashSet::new();
    let mut body = String::new();
    let mut packages = Vec::new();
    let mut rejected = Vec::new();
    let (mut duplicates, mut filtered, mut moved) = (0, 0, 0);
    let mut header_text = String::new();
    let mut implicit: Vec<(String, Vec<String>)> = Vec::new();
    for (i, (s, text)) in sources.iter().zip(&texts).enumerate() {
        let mut blocks = Blocks::new(text);
        let header = match blocks.next() {
            Some(Ok(h)) => h,
            _ => continue,
        };
        if header_text.is_empty() && i == 0 {
            header_text = header.text.to_string();
        }
        collect_implicit(&header, &mut implicit);
        let default_mtime = s.index.timestamp.unwrap_or(0) as i64;
        for block in blocks.flatten() {
            let Ok(mut pkg) = Package::from_block(&block, default_mtime) else {
                continue; // refused by the source's own parse, reported there
            };
            if !(s.wants)(&pkg.cpv, block.get("SLOT").map(str::trim))
                || (s.gpkg_only && !pkg.path.ends_with(".gpkg.tar"))
            {
                filtered += 1;
                continue;
            }
            let key: InstanceKey = (
                pkg.cpv.to_string(),
                long(block.get("BUILD_ID")),
                long(block.get("SIZE")),
                long(block.get("BUILD_TIME")).unwrap_or(0),
                long(block.get("MTIME")),
            );
            if !seen.insert(key) {
                duplicates += 1;
                continue;
            }
            let mut text = block.text.to_string();
            if taken.contains(&*pkg.path) {
                let Some(new_path) = allocate(&pkg, &mut claimed, &mut max_build) else {
                    rejected.push(Rejected {
                        what: format!("{} ({})", pkg.path, s.name),
                        reason: "another binhost's build holds this PATH and the CPV has no \
                                 category/name to move it under"
                            .into(),
                    });
                    continue;
                };
                text = with_path(&block.text_fields(), &new_path);
                pkg.origin.path = Some(std::mem::replace(&mut pkg.path, new_path.into()));
                moved += 1;
            }
            if block.get("MTIME").is_none() && default_mtime as u64 != timestamp {
                text.push_str(&format!("\nMTIME: {default_mtime}"));
            }
            taken.insert(pkg.path.to_string());
            pkg.origin.binhost = i as u16;
            body.push_str(&text);
            body.push_str("\n\n");
            packages.push(pkg);
        }
        rejected.extend(s.index.rejected.iter().map(|r| Rejected {
            what: format!("{} ({})", r.what, s.name),
            reason: r.reason.clone(),
        }));
    }
    let raw = format!(
        "{}\n{}",
        header_with(&header_text, packages.len(), timestamp, &implicit),
        body
    );
    let ttl = sources.first().and_then(|s| s.index.ttl);
    let raw = Bytes::from(raw);
    // Spans into the merged text (the served `Packages` is rendered from them): parse what
    // was written; its entries are the merged ones, in order.
    let (header_span, packages) = match Index::parse(raw.clone()) {
        Ok(again) if again.packages.len() == packages.len() => {
            let packages = packages
                .into_iter()
                .zip(again.packages)
                .map(|(mut p, q)| {
                    p.span = q.span;
                    p
                })
                .collect();
            (again.header_span, packages)
        }
        _ => ((0, 0), packages),
    };
    Merged {
        index: Index {
            raw,
            timestamp: Some(timestamp),
            ttl,
            // Each binhost's own endpoint follows its own `URI` header.
            uri: None,
            header_span,
            packages,
            rejected,
        },
        duplicates,
        filtered,
        moved,
    }
}

/// `_allocate_filename_multi`: `cat/pn/pf-N.<ext>` for the first free N above the CPV's
/// highest BUILD_ID.
fn allocate(
    pkg: &Package,
    claimed: &mut HashSet<String>,
    max_build: &mut HashMap<String, u64>,
) -> Option<String> {
    let (cat, pf) = pkg.cpv.split_once('/')?;
    let (_, pn) = crate::binrepos::split_cpv(&pkg.cpv)?;
    let ext = if pkg.path.ends_with(".gpkg.tar") {
        "gpkg.tar"
    } else {
        "xpak"
    };
    let max = max_build.entry(pkg.cpv.to_string()).or_default();
    loop {
        *max += 1;
        let path = format!("{cat}/{pn}/{pf}-{max}.{ext}");
        if claimed.insert(path.clone()) {
            return Some(path);
        }
    }
}

/// The block with its PATH line replaced (or added).
fn with_path(lines: &[&str], path: &str) -> String {
    let mut out = Vec::with_capacity(lines.len() + 1);
    let mut done = false;
    for l in lines {
        if l.split_once(':').is_some_and(|(k, _)| k == "PATH") {
            if !done {
                out.push(format!("PATH: {path}"));
                done = true;
            }
        } else {
            out.push(l.to_string());
        }
    }
    if !done {
        out.push(format!("PATH: {path}"));
    }
    out.join("\n")
}

/// Header keys whose values Portage's `_merge_pkgindex_header` unions over every binhost
/// (implicit IUSE and USE_EXPAND: how binary packages' USE flags are read), and `ARCH`,
/// which it takes from the first header that has one.
fn is_implicit(key: &str) -> bool {
    matches!(
        key,
        "IUSE_IMPLICIT" | "USE_EXPAND_IMPLICIT" | "USE_EXPAND_UNPREFIXED" | "USE_EXPAND" | "ARCH"
    ) || key.starts_with("USE_EXPAND_VALUES_")
}

fn collect_implicit(header: &super::Block<'_>, into: &mut Vec<(String, Vec<String>)>) {
    for (k, v) in &header.fields {
        if !is_implicit(k) {
            continue;
        }
        let words = v.split_whitespace().map(str::to_string);
        match into.iter_mut().find(|(key, _)| key == k) {
            Some(_) if *k == "ARCH" => {}
            Some((_, vals)) => {
                vals.extend(words);
                vals.sort();
                vals.dedup();
            }
            None => into.push((k.to_string(), words.collect())),
        }
    }
}

/// The header block with PACKAGES and TIMESTAMP set and the implicit-USE keys merged (kept in
/// place, added if missing).
fn header_with(
    header: &str,
    packages: usize,
    timestamp: u64,
    implicit: &[(String, Vec<String>)],
) -> String {
    let mut out = String::new();
    let (mut has_p, mut has_t) = (false, false);
    let mut done: Vec<&str> = Vec::new();
    for l in header.lines() {
        let key = l.split_once(':').map(|(k, _)| k);
        if let Some((k, vals)) = key.and_then(|k| implicit.iter().find(|(i, _)| i == k)) {
            if k == "ARCH" {
                out.push_str(l);
                out.push('\n');
            } else {
                out.push_str(&format!("{k}: {}\n", vals.join(" ")));
            }
            done.push(k);
            continue;
        }
        match key {
            Some("PACKAGES") => {
                out.push_str(&format!("PACKAGES: {packages}\n"));
                has_p = true;
            }
            Some("TIMESTAMP") => {
                out.push_str(&format!("TIMESTAMP: {timestamp}\n"));
                has_t = true;
            }
            _ => {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    for (k, vals) in implicit {
        if !done.contains(&k.as_str()) {
            out.push_str(&format!("{k}: {}\n", vals.join(" ")));
        }
    }
    if !has_p {
        out.push_str(&format!("PACKAGES: {packages}\n"));
    }
    if !has_t {
        out.push_str(&format!("TIMESTAMP: {timestamp}\n"));
    }
    if !header.lines().any(|l| l.starts_with("VERSION:")) {
        out.push_str("VERSION: 0\n");
    }
    out
}

impl<'a> super::Block<'a> {
    fn text_fields(&self) -> Vec<&'a str> {
        self.text.lines().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Origin;

    fn idx(ts: u64, entries: &[&str]) -> Index {
        let mut s = format!(
            "ARCH: amd64\nPACKAGES: {}\nTIMESTAMP: {ts}\nVERSION: 0\n\n",
            entries.len()
        );
        for e in entries {
            s += e;
            s += "\n";
        }
        Index::parse(Bytes::from(s)).unwrap()
    }

    fn entry(cpv: &str, build_id: u64, size: u64, build_time: u64, extra: &str) -> String {
        let (cat, pf) = cpv.split_once('/').unwrap();
        let pn = crate::binrepos::split_cpv(cpv).unwrap().1;
        format!(
            "BUILD_ID: {build_id}\nBUILD_TIME: {build_time}\nCPV: {cpv}\nMTIME: {build_time}\n\
             PATH: {cat}/{pn}/{pf}-{build_id}.gpkg.tar\nSHA1: {}\nSIZE: {size}\n{extra}",
            hex::encode([size as u8; 20])
        )
    }

    fn all(_: &str, _: Option<&str>) -> bool {
        true
    }

    fn src<'a>(index: &'a Index, name: &'a str) -> Source<'a> {
        Source {
            index,
            name,
            wants: &all,
            gpkg_only: false,
        }
    }

    #[test]
    fn identical_instance_once_from_the_highest_priority() {
        let a = idx(100, &[&entry("app-misc/foo-1", 1, 10, 50, "USE: a\n")]);
        let b = idx(200, &[&entry("app-misc/foo-1", 1, 10, 50, "USE: b\n")]);
        let m = merge(&[src(&a, "a"), src(&b, "b")], 0);
        assert_eq!(m.index.packages.len(), 1);
        assert_eq!(m.index.packages[0].origin, Origin::default());
        assert_eq!(m.duplicates, 1);
        let text = String::from_utf8_lossy(&m.index.raw);
        assert!(
            text.contains("USE: a\n") && !text.contains("USE: b"),
            "{text}"
        );
        assert!(
            text.starts_with("ARCH: amd64\nPACKAGES: 1\nTIMESTAMP: 200\nVERSION: 0\n\n"),
            "{text}"
        );
        // Reversed priority: b's block wins.
        let m = merge(&[src(&b, "b"), src(&a, "a")], 0);
        assert_eq!(m.index.packages[0].origin.binhost, 0);
        assert!(String::from_utf8_lossy(&m.index.raw).contains("USE: b"));
    }

    #[test]
    fn different_builds_at_one_path_move_the_lower_priority() {
        let a = idx(
            100,
            &[
                &entry("app-misc/foo-1", 1, 10, 50, ""),
                &entry("app-misc/foo-1", 2, 11, 60, ""),
            ],
        );
        let b = idx(100, &[&entry("app-misc/foo-1", 1, 12, 70, "")]);
        let m = merge(&[src(&a, "a"), src(&b, "b")], 0);
        assert_eq!(m.index.packages.len(), 3);
        assert_eq!(m.moved, 1);
        let p = &m.index.packages[2];
        assert_eq!(
            &*p.path, "app-misc/foo/foo-1-3.gpkg.tar",
            "first free above max BUILD_ID"
        );
        assert_eq!(p.remote_path(), "app-misc/foo/foo-1-1.gpkg.tar");
        assert_eq!(p.origin.binhost, 1);
        assert_eq!(
            p.build_id,
            Some(1),
            "the file's own BUILD_ID stays, as inject writes it"
        );
        let text = String::from_utf8_lossy(&m.index.raw);
        assert!(
            text.contains("PATH: app-misc/foo/foo-1-3.gpkg.tar\n"),
            "{text}"
        );
        // The served text reads back as the same packages.
        let again = Index::parse(m.index.raw.clone()).unwrap();
        let strip = |v: &[Package]| {
            v.iter()
                .map(|p| Package {
                    origin: Origin::default(),
                    ..p.clone()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&again.packages), strip(&m.index.packages));
    }

    #[test]
    fn a_moved_entry_avoids_paths_later_sources_claim() {
        let a = idx(1, &[&entry("a/b-1", 1, 10, 5, "")]);
        let b = idx(
            1,
            &[&entry("a/b-1", 1, 11, 6, ""), &entry("a/b-1", 2, 12, 7, "")],
        );
        let m = merge(&[src(&a, "a"), src(&b, "b")], 0);
        let paths: Vec<&str> = m.index.packages.iter().map(|p| &*p.path).collect();
        assert_eq!(
            paths,
            [
                "a/b/b-1-1.gpkg.tar",
                "a/b/b-1-3.gpkg.tar",
                "a/b/b-1-2.gpkg.tar"
            ]
        );
    }

    #[test]
    fn filters_and_gpkg_only() {
        let a = idx(
            1,
            &[
                &entry("a/b-1", 1, 10, 5, "SLOT: 0\n"),
                &entry("c/d-1", 1, 10, 5, ""),
            ],
        );
        let mut x = idx(1, &[]);
        x = Index::parse(Bytes::from(format!(
            "{}CPV: x/y-1\nPATH: x/y-1.tbz2\nSIZE: 3\n",
            String::from_utf8_lossy(&x.raw)
        )))
        .unwrap();
        let only_a = |cpv: &str, _: Option<&str>| cpv.starts_with("a/");
        let m = merge(
            &[
                Source {
                    index: &a,
                    name: "a",
                    wants: &only_a,
                    gpkg_only: false,
                },
                Source {
                    index: &x,
                    name: "x",
                    wants: &all,
                    gpkg_only: true,
                },
            ],
            0,
        );
        assert_eq!(m.index.packages.len(), 1);
        assert_eq!(m.filtered, 2);
    }

    #[test]
    fn implicit_use_keys_are_unions_and_arch_comes_from_the_first() {
        let a = Index::parse(Bytes::from(
            "ARCH: amd64\nIUSE_IMPLICIT: abi_x86_64 prefix\nTIMESTAMP: 1\nUSE_EXPAND: PYTHON_TARGETS\n\n",
        ))
        .unwrap();
        let b = Index::parse(Bytes::from(
            "ARCH: arm64\nIUSE_IMPLICIT: prefix kernel_linux\nTIMESTAMP: 2\nUSE_EXPAND_VALUES_ARCH: amd64 arm64\n\n",
        ))
        .unwrap();
        let m = merge(&[src(&a, "a"), src(&b, "b")], 0);
        let text = String::from_utf8_lossy(&m.index.raw);
        assert!(
            text.starts_with(
                "ARCH: amd64\nIUSE_IMPLICIT: abi_x86_64 kernel_linux prefix\nTIMESTAMP: 2\n\
                 USE_EXPAND: PYTHON_TARGETS\nUSE_EXPAND_VALUES_ARCH: amd64 arm64\nPACKAGES: 0\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn timestamp_is_the_newest_or_the_floor() {
        let a = idx(100, &[]);
        let b = idx(300, &[]);
        assert_eq!(
            merge(&[src(&a, "a"), src(&b, "b")], 0).index.timestamp,
            Some(300)
        );
        assert_eq!(
            merge(&[src(&a, "a"), src(&b, "b")], 301).index.timestamp,
            Some(301)
        );
    }

    #[test]
    fn real_fixture_merged_with_itself_is_itself() {
        let raw = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/binhost/Packages"
        ))
        .unwrap();
        let a = Index::parse(raw.into()).unwrap();
        let m = merge(&[src(&a, "a"), src(&a, "b")], 0);
        assert_eq!(m.index.packages, a.packages);
        assert_eq!(m.duplicates, a.packages.len());
        let again = Index::parse(m.index.raw.clone()).unwrap();
        assert_eq!(again.packages, a.packages);
        assert_eq!(again.timestamp, a.timestamp);
    }
}

/// Property tests against a plain model: random entries spread over random sources.
#[cfg(test)]
mod model {
    use super::*;
    use proptest::prelude::*;

    fn entry() -> impl Strategy<Value = (u8, u8, u8, u8)> {
        // (cpv choice, build_id, size, build_time): few values, so collisions happen.
        (0..3u8, 1..4u8, 1..3u8, 0..2u8)
    }

    fn text(ts: u64, es: &[(u8, u8, u8, u8)]) -> Index {
        let mut s = format!("PACKAGES: {}\nTIMESTAMP: {ts}\nVERSION: 0\n\n", es.len());
        let mut seen = HashSet::new();
        for &(c, b, sz, bt) in es {
            let path = format!("c/p{c}/p{c}-1-{b}.gpkg.tar");
            if !seen.insert(path.clone()) {
                continue; // one source never claims a PATH twice
            }
            s += &format!(
                "BUILD_ID: {b}\nBUILD_TIME: {bt}\nCPV: c/p{c}-1\nMTIME: {bt}\nPATH: {path}\nSIZE: {sz}\n\n"
            );
        }
        Index::parse(Bytes::from(s)).unwrap()
    }

    fn always(_: &str, _: Option<&str>) -> bool {
        true
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

        #[test]
        fn merge_matches_the_model(srcs in prop::collection::vec((0..1000u64, prop::collection::vec(entry(), 0..8)), 1..4)) {
            let indexes: Vec<Index> = srcs.iter().map(|(ts, es)| text(*ts, es)).collect();
            let names: Vec<String> = (0..indexes.len()).map(|i| format!("s{i}")).collect();
            let sources: Vec<Source> = indexes.iter().zip(&names).map(|(index, name)| Source { index, name, wants: &always, gpkg_only: false }).collect();
            let m = merge(&sources, 0);
            // Model: the set of instance keys, first source wins.
            let mut model: Vec<(usize, &Package)> = Vec::new();
            for (i, ix) in indexes.iter().enumerate() {
                for p in &ix.packages {
                    let same = |q: &Package| q.cpv == p.cpv && q.build_id == p.build_id && q.size == p.size && q.mtime == p.mtime;
                    if !model.iter().any(|(_, q)| same(q)) {
                        model.push((i, p));
                    }
                }
            }
            prop_assert_eq!(m.index.packages.len(), model.len());
            let mut paths = HashSet::new();
            for (got, (i, want)) in m.index.packages.iter().zip(&model) {
                prop_assert_eq!(got.origin.binhost as usize, *i);
                prop_assert_eq!(got.remote_path(), &*want.path);
                prop_assert_eq!((&got.cpv, got.size, got.mtime, got.build_id), (&want.cpv, want.size, want.mtime, want.build_id));
                prop_assert!(paths.insert(got.path.clone()), "PATH {} twice", got.path);
                // The highest priority's entries are never moved.
                if *i == 0 { prop_assert!(got.origin.path.is_none()); }
            }
            // The served text is an index of exactly these packages.
            let again = Index::parse(m.index.raw.clone()).unwrap();
            prop_assert_eq!(again.packages.len(), m.index.packages.len());
            for (a, b) in again.packages.iter().zip(&m.index.packages) {
                prop_assert_eq!(&a.path, &b.path);
                prop_assert_eq!(a.size, b.size);
                prop_assert_eq!(a.mtime, b.mtime);
            }
            prop_assert_eq!(again.timestamp, srcs.iter().map(|s| s.0).max());
        }
    }
}
