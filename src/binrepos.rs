//! Portage's `binrepos.conf`, read as Portage 3.0.83 reads it (`portage/binrepo/config.py`),
//! and the binhosts of one mount in the order Portage processes them.
//!
//! A path may be a file or a directory; a directory is walked recursively in sorted order,
//! skipping names that start with `.` or end in `~` and VCS directories. Every file goes into one
//! INI parser, so `[DEFAULT]` keys are inherited by every section and a later file wins a key.
//!
//! Keys honoured: `sync-uri` (required), `priority`, `frozen`, `getbinpkg-include`,
//! `getbinpkg-exclude`, `verify-signature`. `location` is Portage's download cache for fetched
//! packages; a mount has its own cache (`--cache-dir`), so it is ignored. `fetchcommand`,
//! `resumecommand` and `openpgp-key-package` concern Portage's own fetcher and are ignored too.
//!
//! One extension: Portage takes `sync-uri` as one URI; here whitespace separates **mirrors** of
//! one binhost (Portage would fail on such a value, so it cannot mean anything else to it).
//!
//! The order (`BinRepoConfigLoader`, `binarytree._populate_remote`): sort ascending by
//! `(priority or 0, name or md5(uri))`, then walk that list in reverse, so the highest priority
//! comes first, ties by name descending. Command-line binhosts are treated like
//! `PORTAGE_BINHOST`: the first gets priority N, the last 1, and a URI a section already has is
//! left out.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use md5::{Digest as _, Md5};

/// Where Portage ships its own `binrepos.conf` (`[DEFAULT] verify-signature = true`).
pub const GLOBAL_BINREPOS: &str = "/usr/share/portage/config/binrepos.conf";
/// The user's file (or directory), Portage's `/etc/portage/binrepos.conf`.
pub const DEFAULT_BINREPOS: &str = "/etc/portage/binrepos.conf";

/// One binhost of a mount, in processing order (highest priority first).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BinRepo {
    /// The section name; for a command-line binhost, its URI.
    pub name: String,
    /// Mirrors of the same content, in the order given; each without a trailing `/`.
    pub mirrors: Vec<String>,
    pub priority: i64,
    /// Use the saved index without asking the server, once there is one.
    pub frozen: bool,
    pub include: Vec<Atom>,
    pub exclude: Vec<Atom>,
    /// `verify-signature = true|yes` (Portage's own test: anything else is false).
    pub verify_signature: bool,
}

impl BinRepo {
    /// Whether an entry passes this repo's `getbinpkg-include`/`-exclude` (Portage: exclude
    /// always drops; a non-empty include is an allow-list).
    pub fn wants(&self, cpv: &str, slot: Option<&str>) -> bool {
        if self.exclude.iter().any(|a| a.matches(cpv, slot)) {
            return false;
        }
        self.include.is_empty() || self.include.iter().any(|a| a.matches(cpv, slot))
    }
}

/// A `getbinpkg-include`/`-exclude` atom: `[cat/]pn[:slot]`, with `*` wildcards.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Atom {
    pub cat: String,
    pub pn: String,
    pub slot: Option<String>,
}

impl Atom {
    /// Portage allows only package names and slot atoms here (`_find_bad_atoms`): no
    /// operators, versions, USE deps, blockers or `::repo`. A bare name means `*/name`.
    pub fn parse(s: &str) -> Result<Atom, String> {
        let bad = |why: &str| Err(format!("{s:?}: {why} (only package names and slot atoms)"));
        if s.contains("::") {
            return bad("a repository is not allowed");
        }
        if s.starts_with(['<', '>', '=', '~', '!']) || s.contains('[') {
            return bad("operators and USE deps are not allowed");
        }
        let (cp, slot) = match s.split_once(':') {
            Some((cp, slot)) if !slot.is_empty() => (cp, Some(slot.to_string())),
            Some(_) => return bad("empty slot"),
            None => (s, None),
        };
        let (cat, pn) = match cp.split_once('/') {
            Some((c, p)) => (c, p),
            None => ("*", cp),
        };
        if cat.is_empty() || pn.is_empty() || pn.contains('/') {
            return bad("not a package name");
        }
        if split_cpv(&format!("{cat}/{pn}")).is_some() && !pn.contains('*') {
            return bad("a version is not allowed");
        }
        Ok(Atom {
            cat: cat.into(),
            pn: pn.into(),
            slot,
        })
    }

    pub fn matches(&self, cpv: &str, slot: Option<&str>) -> bool {
        let Some((cat, pn)) = split_cpv(cpv) else {
            return false;
        };
        let slot_ok = match (&self.slot, slot) {
            (None, _) => true,
            (Some(want), Some(have)) => want == have.split('/').next().unwrap_or(have),
            (Some(_), None) => want_default_slot(self.slot.as_deref()),
        };
        glob(&self.cat, cat) && glob(&self.pn, pn) && slot_ok
    }
}

/// An entry without SLOT has Portage's default, `0`.
fn want_default_slot(want: Option<&str>) -> bool {
    want == Some("0")
}

/// `cat/pn-ver` split into `(cat, pn)`, or `None` if it carries no version.
pub fn split_cpv(cpv: &str) -> Option<(&str, &str)> {
    let (cat, pf) = cpv.split_once('/')?;
    // The version starts at the first `-` followed by a version-shaped rest.
    let mut at = 0;
    while let Some(i) = pf[at..].find('-') {
        let i = at + i;
        if is_version(&pf[i + 1..]) && i > 0 {
            return Some((cat, &pf[..i]));
        }
        at = i + 1;
    }
    None
}

/// PMS version: `1.2.3[a-z]?(_(alpha|beta|pre|rc|p)N?)*(-rN)?`.
fn is_version(v: &str) -> bool {
    let v = match v.rsplit_once("-r") {
        Some((v, r)) if !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()) => v,
        _ => v,
    };
    let mut parts = v.split('_');
    let Some(num) = parts.next() else {
        return false;
    };
    let num = num
        .strip_suffix(|c: char| c.is_ascii_lowercase())
        .unwrap_or(num);
    if num.is_empty()
        || !num
            .split('.')
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    parts.all(|s| {
        ["alpha", "beta", "pre", "rc", "p"].iter().any(|p| {
            s.strip_prefix(p)
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
    })
}

/// `*` matches any run of characters.
fn glob(pat: &str, s: &str) -> bool {
    match pat.split_once('*') {
        None => pat == s,
        Some((head, rest)) => {
            let Some(s) = s.strip_prefix(head) else {
                return false;
            };
            (0..=s.len())
                .filter(|&i| s.is_char_boundary(i))
                .any(|i| glob(rest, &s[i..]))
        }
    }
}

/// What `load` found: the binhosts in processing order and what it had to warn about.
#[derive(Debug, Default)]
pub struct Loaded {
    pub repos: Vec<BinRepo>,
    pub warnings: Vec<String>,
}

/// Reads `paths` (files or directories; missing ones are skipped, as Portage does) and adds
/// `cli` binhosts as `PORTAGE_BINHOST` entries. `Err` only for an unreadable or unparsable file.
pub fn load(paths: &[PathBuf], cli: &[String]) -> Result<Loaded, String> {
    let mut files = Vec::new();
    for p in paths {
        walk(p, &mut files);
    }
    let mut texts = Vec::new();
    for f in files {
        match fs::read(&f) {
            Ok(b) => texts.push((f.display().to_string(), String::from_utf8_lossy(&b).into())),
            Err(e) => return Err(format!("{}: {e}", f.display())),
        }
    }
    from_texts(&texts, cli)
}

/// `_recursive_file_list`: sorted, recursive, skipping `.`/`~` names and VCS directories.
fn walk(path: &Path, out: &mut Vec<PathBuf>) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.starts_with('.') || name.ends_with('~') {
        return;
    }
    let Ok(meta) = fs::metadata(path) else {
        return;
    };
    if meta.is_dir() {
        if name == "CVS" {
            return;
        }
        let Ok(rd) = fs::read_dir(path) else {
            return;
        };
        let mut kids: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        kids.sort();
        for k in kids {
            walk(&k, out);
        }
    } else if meta.is_file() {
        out.push(path.to_path_buf());
    }
}

type Section = BTreeMap<String, String>;

/// The INI parse (Python's configparser, as Portage uses it): `[section]`, `key = value` or
/// `key: value`, keys lowercased, `#`/`;` comment lines, indented continuation lines.
fn parse_ini(
    source: &str,
    text: &str,
    sections: &mut Vec<(String, Section)>,
) -> Result<(), String> {
    let mut current: Option<usize> = None;
    let mut last_key: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let err = |why: &str| Err(format!("{source}:{}: {why}: {line:?}", n + 1));
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            if trimmed.is_empty() {
                last_key = None;
            }
            continue;
        }
        if line.starts_with([' ', '\t'])
            && let (Some(s), Some(k)) = (current, &last_key)
        {
            let v = sections[s].1.get_mut(k).expect("key just set");
            v.push('\n');
            v.push_str(trimmed);
            continue;
        }
        if let Some(name) = trimmed.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            let name = name.to_string();
            current = Some(match sections.iter().position(|(s, _)| *s == name) {
                Some(i) => i,
                None => {
                    sections.push((name, Section::new()));
                    sections.len() - 1
                }
            });
            last_key = None;
            continue;
        }
        let Some(s) = current else {
            return err("a key before any [section]");
        };
        let Some(i) = trimmed.find(['=', ':']) else {
            return err("not `key = value`");
        };
        let key = trimmed[..i].trim().to_lowercase();
        let value = trimmed[i + 1..].trim().to_string();
        sections[s].1.insert(key.clone(), value);
        last_key = Some(key);
    }
    Ok(())
}

/// Python's BasicInterpolation: `%(key)s` from the section (with defaults), `%%` for `%`.
fn interpolate(value: &str, section: &Section, depth: u32) -> String {
    if depth > 10 || !value.contains('%') {
        return value.to_string();
    }
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(r) = rest.strip_prefix("%%") {
            out.push('%');
            rest = r;
        } else if let Some((key, r)) = rest.strip_prefix("%(").and_then(|r| r.split_once(")s")) {
            let v = section
                .get(&key.to_lowercase())
                .cloned()
                .unwrap_or_default();
            out.push_str(&interpolate(&v, section, depth + 1));
            rest = r;
        } else {
            out.push('%');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// `load` on texts already read: `(source name, text)` in reading order.
pub fn from_texts(texts: &[(String, String)], cli: &[String]) -> Result<Loaded, String> {
    let mut sections = Vec::new();
    for (source, text) in texts {
        parse_ini(source, text, &mut sections)?;
    }
    let mut defaults: Section = [
        ("frozen", "false"),
        ("eprefix", ""),
        ("eroot", "/"),
        ("portage_configroot", "/"),
        ("root", "/"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if let Some((_, d)) = sections.iter().find(|(n, _)| n == "DEFAULT") {
        defaults.extend(d.clone());
    }
    let mut out = Loaded::default();
    // (priority, sort name, repo)
    let mut repos: Vec<(i64, String, BinRepo)> = Vec::new();
    for (name, own) in sections.iter().filter(|(n, _)| n != "DEFAULT") {
        let mut sec = defaults.clone();
        sec.extend(own.clone());
        let get = |k: &str| sec.get(k).map(|v| interpolate(v, &sec, 0));
        let Some(uri) = get("sync-uri") else {
            out.warnings.push(format!(
                "binrepo [{name}]: missing sync-uri setting; ignored"
            ));
            continue;
        };
        let mirrors: Vec<String> = uri
            .split_whitespace()
            .map(|u| u.trim_end_matches('/').to_string())
            .collect();
        if mirrors.is_empty() {
            out.warnings
                .push(format!("binrepo [{name}]: empty sync-uri; ignored"));
            continue;
        }
        let priority = get("priority").and_then(|p| p.trim().parse::<i64>().ok());
        if let Some(p) = get("priority")
            && priority.is_none()
        {
            out.warnings.push(format!(
                "binrepo [{name}]: priority {p:?} is not an integer; using 0"
            ));
        }
        let truthy =
            |k: &str| get(k).is_some_and(|v| matches!(v.to_lowercase().as_str(), "true" | "yes"));
        let mut atoms = |k: &str| -> Vec<Atom> {
            get(k)
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|a| {
                    Atom::parse(a)
                        .map_err(|e| {
                            out.warnings
                                .push(format!("binrepo [{name}] {k}: {e}; ignored"))
                        })
                        .ok()
                })
                .collect()
        };
        let mut include = atoms("getbinpkg-include");
        let mut exclude = atoms("getbinpkg-exclude");
        let both: Vec<Atom> = include
            .iter()
            .filter(|a| exclude.contains(a))
            .cloned()
            .collect();
        for a in &both {
            out.warnings.push(format!(
                "binrepo [{name}]: {}/{} is in both getbinpkg-include and -exclude; dropped from both",
                a.cat, a.pn
            ));
        }
        include.retain(|a| !both.contains(a));
        exclude.retain(|a| !both.contains(a));
        repos.push((
            priority.unwrap_or(0),
            name.clone(),
            BinRepo {
                name: name.clone(),
                mirrors,
                priority: priority.unwrap_or(0),
                frozen: truthy("frozen"),
                include,
                exclude,
                verify_signature: truthy("verify-signature"),
            },
        ));
    }
    let known: Vec<String> = repos
        .iter()
        .flat_map(|(_, _, r)| r.mirrors.clone())
        .collect();
    let mut current = 0;
    for arg in cli.iter().rev() {
        let mirrors: Vec<String> = split_mirrors(arg);
        if mirrors.is_empty() || mirrors.iter().any(|m| known.contains(m)) {
            continue;
        }
        current += 1;
        let name = mirrors.join(" ");
        let fallback = hex::encode(Md5::digest(name.as_bytes()));
        repos.push((
            current,
            fallback,
            BinRepo {
                name,
                mirrors,
                priority: current,
                frozen: false,
                include: Vec::new(),
                exclude: Vec::new(),
                verify_signature: false,
            },
        ));
    }
    repos.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    out.repos = repos.into_iter().rev().map(|(_, _, r)| r).collect();
    Ok(out)
}

/// One command-line binhost: mirrors separated by whitespace or `|` (fstab has no spaces).
pub fn split_mirrors(arg: &str) -> Vec<String> {
    arg.split(|c: char| c.is_whitespace() || c == '|')
        .filter(|u| !u.is_empty())
        .map(|u| u.trim_end_matches('/').to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(files: &[&str], cli: &[&str]) -> Loaded {
        let texts: Vec<(String, String)> = files
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("f{i}"), t.to_string()))
            .collect();
        let cli: Vec<String> = cli.iter().map(|s| s.to_string()).collect();
        from_texts(&texts, &cli).unwrap()
    }

    fn names(l: &Loaded) -> Vec<&str> {
        l.repos.iter().map(|r| r.name.as_str()).collect()
    }

    /// The ordering the notes checked against Portage itself: conf alpha (none), beta (5),
    /// gamma (none), PORTAGE_BINHOST="p1 p2" → beta, p1, p2, gamma, alpha.
    #[test]
    fn order_is_portages() {
        let l = conf(
            &[
                "[alpha]\nsync-uri = http://a\n[beta]\npriority = 5\nsync-uri = http://b/\n[gamma]\nsync-uri = http://g\n",
            ],
            &["http://p1", "http://p2"],
        );
        assert_eq!(
            names(&l),
            ["beta", "http://p1", "http://p2", "gamma", "alpha"]
        );
        assert_eq!(l.repos[0].mirrors, ["http://b"], "trailing / stripped");
        assert_eq!(l.repos[1].priority, 2);
    }

    #[test]
    fn table() {
        struct Case {
            files: &'static [&'static str],
            cli: &'static [&'static str],
            names: &'static [&'static str],
        }
        let cases = [
            // A CLI URI that a section has is left out (the section wins).
            Case {
                files: &["[mine]\nsync-uri = http://m\npriority = 1\n"],
                cli: &["http://m/", "http://o"],
                names: &["mine", "http://o"],
            },
            // Ties in priority: names descending.
            Case {
                files: &[
                    "[a]\nsync-uri=http://a\npriority=3\n[b]\nsync-uri=http://b\npriority=3\n",
                ],
                cli: &[],
                names: &["b", "a"],
            },
            // A bad priority counts as none (0); negative priorities sort last.
            Case {
                files: &[
                    "[x]\nsync-uri=http://x\npriority=high\n[y]\nsync-uri=http://y\npriority=-2\n[z]\nsync-uri=http://z\npriority=1\n",
                ],
                cli: &[],
                names: &["z", "x", "y"],
            },
            // No sync-uri: dropped. A later file wins a key; [DEFAULT] is inherited.
            Case {
                files: &[
                    "[DEFAULT]\npriority = 7\n[nouri]\npriority = 9\n[a]\nsync-uri = http://a\n",
                    "[b]\nsync-uri = http://b\npriority = 8\n[a]\npriority = 9\n",
                ],
                cli: &[],
                names: &["a", "b"],
            },
        ];
        for c in cases {
            let l = conf(c.files, c.cli);
            assert_eq!(names(&l), c.names, "{:?}", c.files);
        }
    }

    #[test]
    fn keys() {
        let l = conf(
            &["[DEFAULT]\nverify-signature = true\n\
               [a]\nsync-uri = http://a1  http://a2/\n   http://a3\nfrozen = Yes\nlocation = /var/cache/binhost/a\n\
               getbinpkg-include = dev-lang/* gcc sys-kernel/gentoo-kernel:6.6 >=x/y-1 bad::repo\n\
               getbinpkg-exclude = dev-lang/rust gcc\n\
               [b]\nsync-uri = http://b\nverify-signature = 1\n"],
            &[],
        );
        let a = l.repos.iter().find(|r| r.name == "a").unwrap();
        let b = l.repos.iter().find(|r| r.name == "b").unwrap();
        assert_eq!(a.mirrors, ["http://a1", "http://a2", "http://a3"]);
        assert!(a.frozen && !b.frozen);
        assert!(a.verify_signature, "inherited from [DEFAULT]");
        assert!(!b.verify_signature, "`1` is false to Portage");
        // gcc in both lists: dropped from both; two invalid atoms warned about.
        assert_eq!(a.include.len(), 2);
        assert_eq!(a.exclude.len(), 1);
        assert_eq!(
            l.warnings.iter().filter(|w| w.contains("ignored")).count(),
            2,
            "{:?}",
            l.warnings
        );
        assert!(l.warnings.iter().any(|w| w.contains("both")));
        assert!(a.wants("dev-lang/python-3.12.1", None));
        assert!(!a.wants("dev-lang/rust-1.80.0-r1", None), "exclude wins");
        assert!(a.wants("sys-kernel/gentoo-kernel-6.6.30", Some("6.6/6.6.30")));
        assert!(!a.wants("sys-kernel/gentoo-kernel-6.9.1", Some("6.9")));
        assert!(!a.wants("app-misc/foo-1", None), "include is an allow-list");
        assert!(b.wants("app-misc/foo-1", None));
    }

    #[test]
    fn interpolation_and_comments() {
        let l = conf(
            &["# c\n; c\n[DEFAULT]\nbase = http://h\n[a]\nsync-uri = %(base)s/amd64%%x\n"],
            &[],
        );
        assert_eq!(l.repos[0].mirrors, ["http://h/amd64%x"]);
        assert!(from_texts(&[("f".into(), "key = v\n".into())], &[]).is_err());
        assert!(from_texts(&[("f".into(), "[a]\nnot a pair\n".into())], &[]).is_err());
    }

    #[test]
    fn cpv_and_atoms() {
        assert_eq!(
            split_cpv("dev-libs/libfoo-2-1.0-r3"),
            Some(("dev-libs", "libfoo-2"))
        );
        assert_eq!(split_cpv("a/b-1.2.3b_rc1_p2"), Some(("a", "b")));
        assert_eq!(split_cpv("a/b"), None);
        assert!(Atom::parse("a/b-1.0").is_err());
        assert!(Atom::parse("a/b:").is_err());
        let a = Atom::parse("gcc").unwrap();
        assert_eq!(a.cat, "*");
        assert!(a.matches("sys-devel/gcc-13.2.0", None));
        assert!(!a.matches("sys-devel/gcc-config-2.11", None));
        assert!(
            Atom::parse("*/*-bin")
                .unwrap()
                .matches("www-client/firefox-bin-128.0", None)
        );
        assert!(
            Atom::parse("a/b:0").unwrap().matches("a/b-1", None),
            "no SLOT means 0"
        );
    }

    #[test]
    fn files_and_directories_as_portage_walks_them() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("binrepos.conf");
        fs::create_dir_all(d.join("sub")).unwrap();
        fs::write(d.join("b.conf"), "[x]\nsync-uri = http://b\n").unwrap();
        fs::write(
            d.join("a.conf"),
            "[x]\nsync-uri = http://a\n[y]\nsync-uri=http://y\n",
        )
        .unwrap();
        fs::write(d.join("sub/c.conf"), "[z]\nsync-uri = http://z\n").unwrap();
        fs::write(d.join("b.conf~"), "[x]\nsync-uri = http://backup\n").unwrap();
        fs::write(d.join(".hidden"), "[x]\nsync-uri = http://hidden\n").unwrap();
        let l = load(&[dir.path().join("missing"), d.clone()], &[]).unwrap();
        let x = l.repos.iter().find(|r| r.name == "x").unwrap();
        assert_eq!(x.mirrors, ["http://b"], "b.conf is read after a.conf");
        assert_eq!(l.repos.len(), 3);
        let file = dir.path().join("one.conf");
        fs::write(&file, "[only]\nsync-uri = file:///srv\n").unwrap();
        assert_eq!(names(&load(&[file], &[]).unwrap()), ["only"]);
    }

    #[test]
    fn cli_mirrors() {
        assert_eq!(
            split_mirrors("http://a/|http://b"),
            ["http://a", "http://b"]
        );
        let l = conf(&[], &["http://a|http://b", "http://c"]);
        assert_eq!(l.repos[0].mirrors, ["http://a", "http://b"]);
        assert_eq!(l.repos.len(), 2);
    }
}
