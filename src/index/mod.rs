//! The binhost's `Packages` index, parsed into an immutable snapshot.
//!
//! The format is Portage's (`portage/dbapi/bintree.py`): a header block, a blank line, then one
//! block per package; each line is `KEY: value`, split on the first `:` with exactly one character
//! dropped after it. This module owns two invariants the rest of the filesystem relies on:
//!
//! * every `Package` it hands out has a `PATH` that is safe to place under the mount point
//!   (relative, no `.`/`..`/empty components, no NUL or control characters, sane lengths) and a
//!   `SIZE`; anything else is refused with a warning naming the entry, never a panic;
//! * the raw bytes are kept unchanged, so the `Packages` file the mount serves is byte-identical
//!   to the binhost's.
//!
//! Collisions between entries (two entries at one PATH, a file where another entry needs a
//! directory) are the namespace's business, not this parser's.

mod key;
mod path;

use bytes::Bytes;

pub use crate::verify::Digests;
pub use key::CacheKey;
pub use path::check_path;

/// Largest index we accept. A real 50,000-package binhost is about 26 MB.
pub const MAX_INDEX_BYTES: usize = 512 << 20;
/// Longest accepted line; real lines (USE, RDEPEND) stay well under 64 KiB.
const MAX_LINE_BYTES: usize = 1 << 20;

/// Validators for a conditional index request. What the transport
/// saw of the index it fetched (HTTP ETag and Last-Modified, or a file's stat); saved beside it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// They belong to `Packages.gz`, not `Packages`.
    pub compressed: bool,
}

/// Why a whole index was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("index is empty")]
    Empty,
    #[error("index is {0} bytes, more than the {MAX_INDEX_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("index is not text (NUL byte at offset {0})")]
    Binary(usize),
    #[error("index line {0} is longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong(usize),
    #[error("index line {line} has no `KEY: value` form: {text:?}")]
    BadLine { line: usize, text: String },
    #[error("index header has VERSION {0}; Portage ignores such an index and so do we")]
    UnsupportedVersion(i64),
    #[error("index header TIMESTAMP is not an integer: {0:?}")]
    BadTimestamp(String),
}

/// One refused package entry, reported by the caller as a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The entry's PATH (or CPV) as written, for the log line.
    pub what: String,
    pub reason: String,
}

/// One package file the binhost publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    /// Validated relative path, `/`-separated.
    pub path: Box<str>,
    pub cpv: Box<str>,
    pub build_id: Option<u64>,
    pub size: u64,
    /// Seconds since the epoch; the mount reports exactly this as st_mtime.
    pub mtime: i64,
    pub digests: Digests,
}

/// A parsed index: the exact bytes and the entries they describe.
#[derive(Debug, Clone)]
pub struct Index {
    pub raw: Bytes,
    pub timestamp: Option<u64>,
    /// The header's `TTL`, in seconds, when the binhost sets one.
    pub ttl: Option<u64>,
    /// The header's `URI`: where the packages are, when not beside the index (release
    /// assets, a CDN). Portage downloads `URI` + `/` + PATH.
    pub uri: Option<String>,
    pub packages: Vec<Package>,
    pub rejected: Vec<Rejected>,
}

impl Index {
    /// Parses `raw`. Entry-level problems are collected in `rejected`; only problems that make the
    /// whole file untrustworthy are errors.
    pub fn parse(raw: Bytes) -> Result<Index, IndexError> {
        if raw.len() > MAX_INDEX_BYTES {
            return Err(IndexError::TooLarge(raw.len()));
        }
        if let Some(pos) = memchr(0, &raw) {
            return Err(IndexError::Binary(pos));
        }
        let text = String::from_utf8_lossy(&raw);
        if text.trim().is_empty() {
            return Err(IndexError::Empty);
        }
        let mut blocks = Blocks::new(&text);
        let header = blocks.next().transpose()?.unwrap_or_default();
        let mut index = Index {
            raw: raw.clone(),
            timestamp: None,
            ttl: None,
            uri: None,
            packages: Vec::new(),
            rejected: Vec::new(),
        };
        for (key, value) in &header.fields {
            match *key {
                "VERSION" => {
                    if let Ok(v) = value.trim().parse::<i64>()
                        && v > 0
                    {
                        return Err(IndexError::UnsupportedVersion(v));
                    }
                }
                "TIMESTAMP" => {
                    let t = value.trim();
                    index.timestamp = Some(
                        t.parse()
                            .map_err(|_| IndexError::BadTimestamp(t.to_string()))?,
                    );
                }
                "TTL" => index.ttl = value.trim().parse().ok(),
                "URI" => index.uri = Some(value.trim().to_string()).filter(|u| !u.is_empty()),
                _ => {}
            }
        }
        let default_mtime = index.timestamp.unwrap_or(0) as i64;
        for block in blocks {
            let block = block?;
            match Package::from_block(&block, default_mtime) {
                Ok(pkg) => index.packages.push(pkg),
                Err(rejected) => index.rejected.push(rejected),
            }
        }
        Ok(index)
    }
}

/// One block of `KEY: value` lines.
#[derive(Debug, Default)]
struct Block<'a> {
    fields: Vec<(&'a str, &'a str)>,
}

impl<'a> Block<'a> {
    fn get(&self, key: &str) -> Option<&'a str> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }
}

struct Blocks<'a> {
    lines: std::iter::Enumerate<std::str::Lines<'a>>,
}

impl<'a> Blocks<'a> {
    fn new(text: &'a str) -> Self {
        Blocks {
            lines: text.lines().enumerate(),
        }
    }
}

impl<'a> Iterator for Blocks<'a> {
    type Item = Result<Block<'a>, IndexError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut block = Block::default();
        for (n, line) in self.lines.by_ref() {
            if line.len() > MAX_LINE_BYTES {
                return Some(Err(IndexError::LineTooLong(n + 1)));
            }
            if line.trim().is_empty() {
                if block.fields.is_empty() {
                    continue;
                }
                return Some(Ok(block));
            }
            let Some((key, rest)) = line.split_once(':') else {
                return Some(Err(IndexError::BadLine {
                    line: n + 1,
                    text: line.chars().take(80).collect(),
                }));
            };
            // Portage drops exactly one character after the colon.
            let value = rest.get(1..).unwrap_or("");
            block.fields.push((key, value));
        }
        (!block.fields.is_empty()).then_some(Ok(block))
    }
}

impl Package {
    fn from_block(block: &Block<'_>, default_mtime: i64) -> Result<Package, Rejected> {
        let cpv = block.get("CPV").unwrap_or("").trim();
        let path_field = block.get("PATH").map(str::trim);
        let what = path_field.unwrap_or(cpv).to_string();
        let reject = |reason: String| Rejected {
            what: what.clone(),
            reason,
        };
        if cpv.is_empty() {
            return Err(reject("entry has no CPV".into()));
        }
        // Portage: an entry without PATH means CPV + ".tbz2".
        let path = match path_field {
            Some(p) => p.to_string(),
            None => format!("{cpv}.tbz2"),
        };
        check_path(&path).map_err(|e| reject(format!("unsafe PATH: {e}")))?;
        let size = block
            .get("SIZE")
            .ok_or_else(|| reject("entry has no SIZE".into()))?
            .trim()
            .parse::<u64>()
            .map_err(|_| reject("SIZE is not a non-negative integer".into()))?;
        let mtime = match block.get("MTIME") {
            Some(m) => m
                .trim()
                .parse::<i64>()
                .map_err(|_| reject("MTIME is not an integer".into()))?,
            None => default_mtime,
        };
        let build_id = block.get("BUILD_ID").and_then(|b| b.trim().parse().ok());
        let digests = Digests {
            md5: hex_field(block, "MD5").map_err(reject)?,
            sha1: hex_field(block, "SHA1").map_err(reject)?,
            sha512: hex_field(block, "SHA512").map_err(reject)?.map(Box::new),
            blake2b: hex_field(block, "BLAKE2B").map_err(reject)?.map(Box::new),
        };
        Ok(Package {
            path: path.into(),
            cpv: cpv.into(),
            build_id,
            size,
            mtime,
            digests,
        })
    }
}

fn hex_field<const N: usize>(block: &Block<'_>, key: &str) -> Result<Option<[u8; N]>, String> {
    let Some(value) = block.get(key) else {
        return Ok(None);
    };
    let mut out = [0u8; N];
    hex::decode_to_slice(value.trim(), &mut out)
        .map_err(|_| format!("{key} is not {} hex digits", N * 2))?;
    Ok(Some(out))
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str =
        "ACCEPT_KEYWORDS: amd64\nPACKAGES: 2\nTIMESTAMP: 1700000000\nVERSION: 0\n\n";

    fn parse(s: &str) -> Result<Index, IndexError> {
        Index::parse(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn entry(path: &str, extra: &str) -> String {
        format!(
            "CPV: app-misc/foo-1\nMD5: 0123456789abcdef0123456789abcdef\nMTIME: 1700000001\n\
             PATH: {path}\nSHA1: 0123456789abcdef0123456789abcdef01234567\nSIZE: 4096\n{extra}\n"
        )
    }

    #[test]
    fn parses_header_and_entries() {
        let idx = parse(&format!(
            "{HEADER}{}\n{}",
            entry("app-misc/foo/foo-1-1.gpkg.tar", "BUILD_ID: 1\n"),
            entry("app-misc/foo-1.tbz2", "")
        ))
        .unwrap();
        assert_eq!(idx.timestamp, Some(1_700_000_000));
        assert_eq!(idx.packages.len(), 2);
        let p = &idx.packages[0];
        assert_eq!(&*p.path, "app-misc/foo/foo-1-1.gpkg.tar");
        assert_eq!(p.size, 4096);
        assert_eq!(p.mtime, 1_700_000_001);
        assert_eq!(p.build_id, Some(1));
        assert_eq!(p.digests.md5.unwrap()[0], 0x01);
        assert!(idx.rejected.is_empty());
    }

    #[test]
    fn value_drops_exactly_one_char_after_colon() {
        let idx = parse(&format!(
            "{HEADER}CPV: a/b-1\nPATH:  a/b-1.tbz2\nSIZE: 1\nUSE:  x\n"
        ))
        .unwrap();
        // PATH is trimmed by us (Portage would look for a leading-space file name, which no
        // binhost writes); SIZE parses.
        assert_eq!(&*idx.packages[0].path, "a/b-1.tbz2");
    }

    #[test]
    fn missing_path_means_cpv_tbz2() {
        let idx = parse(&format!("{HEADER}CPV: app-misc/foo-1\nSIZE: 3\n")).unwrap();
        assert_eq!(&*idx.packages[0].path, "app-misc/foo-1.tbz2");
        assert_eq!(
            idx.packages[0].mtime, 1_700_000_000,
            "falls back to TIMESTAMP"
        );
    }

    #[test]
    fn hostile_paths_are_rejected_not_fatal() {
        let hostile = [
            "/etc/passwd",
            "../../etc/passwd",
            "a/../../b.tbz2",
            "a//b.tbz2",
            "a/./b.tbz2",
            "Packages",
            "a/b\u{7}.tbz2",
            "",
        ];
        let mut text = HEADER.to_string();
        for p in hostile {
            text += &entry(p, "");
            text += "\n";
        }
        text += &entry("ok/fine-1.gpkg.tar", "");
        let idx = parse(&text).unwrap();
        assert_eq!(idx.packages.len(), 1);
        assert_eq!(&*idx.packages[0].path, "ok/fine-1.gpkg.tar");
        assert_eq!(idx.rejected.len(), hostile.len());
    }

    #[test]
    fn bad_numbers_and_digests_reject_the_entry() {
        for extra in [
            "SIZE: -1\n",
            "SIZE: lots\n",
            "MTIME: yesterday\n",
            "SHA1: xyz\n",
        ] {
            // Later keys override earlier ones, as in Portage's dict.
            let idx = parse(&format!("{HEADER}{}", entry("a/b-1.tbz2", extra))).unwrap();
            assert!(idx.packages.is_empty(), "{extra} should reject");
            assert_eq!(idx.rejected.len(), 1);
        }
        let idx = parse(&format!("{HEADER}CPV: a/b-1\nPATH: a/b-1.tbz2\n")).unwrap();
        assert_eq!(idx.rejected[0].reason, "entry has no SIZE");
    }

    #[test]
    fn whole_file_errors() {
        assert_eq!(parse("").unwrap_err(), IndexError::Empty);
        assert_eq!(parse("\n\n  \n").unwrap_err(), IndexError::Empty);
        assert!(matches!(
            parse("PACKAGES: 1\0\n"),
            Err(IndexError::Binary(11))
        ));
        assert!(matches!(
            parse("this is not an index\n"),
            Err(IndexError::BadLine { line: 1, .. })
        ));
        assert_eq!(
            parse("VERSION: 1\n").unwrap_err(),
            IndexError::UnsupportedVersion(1)
        );
        assert!(matches!(
            parse("TIMESTAMP: soon\n"),
            Err(IndexError::BadTimestamp(_))
        ));
        let long = format!("X: {}\n", "a".repeat(MAX_LINE_BYTES + 1));
        assert_eq!(parse(&long).unwrap_err(), IndexError::LineTooLong(1));
    }

    #[test]
    fn cache_key_follows_content_identity() {
        let idx = parse(&format!("{HEADER}{}", entry("a/b-1.tbz2", ""))).unwrap();
        let a = idx.packages[0].clone();
        let mut rebuilt = a.clone();
        rebuilt.digests.sha1 = Some([7; 20]);
        let mut touched = a.clone();
        touched.mtime += 5;
        assert_ne!(a.cache_key(), rebuilt.cache_key());
        assert_eq!(
            a.cache_key(),
            touched.cache_key(),
            "digests decide, not mtime"
        );
        assert!(CacheKey::from_file_name(&a.cache_key().0).is_some());
        assert!(CacheKey::from_file_name("../x").is_none());
    }

    /// A real index written by Portage 3.0.83 (`emerge --buildpkg`), kept as a fixture.
    #[test]
    fn parses_real_portage_index() {
        let raw = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/binhost/Packages"
        ))
        .expect("fixture binhost present");
        let idx = Index::parse(raw.into()).unwrap();
        assert!(idx.timestamp.is_some());
        assert!(!idx.packages.is_empty());
        assert!(idx.rejected.is_empty(), "{:?}", idx.rejected);
        for p in &idx.packages {
            assert!(p.path.ends_with(".gpkg.tar"), "{}", p.path);
            assert!(p.digests.sha1.is_some() && p.digests.md5.is_some());
        }
    }

    /// The six real indexes in `../shared/real-indexes` (published binhosts nobody here
    /// built) parse with every entry Portage itself reads; the one with a `URI` header
    /// (GitHub release assets) says where its packages are.
    #[test]
    fn parses_real_published_indexes() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/real-indexes");
        let Ok(entries) = std::fs::read_dir(dir) else {
            panic!("{dir} is missing: the real indexes are part of the test data");
        };
        let mut seen = 0;
        for e in entries.map(Result::unwrap) {
            let name = e.file_name().into_string().unwrap();
            if !name.ends_with("Packages") {
                continue;
            }
            let idx = Index::parse(std::fs::read(e.path()).unwrap().into()).unwrap();
            let header = idx.raw.split(|&b| b == b'\n').find_map(|l| {
                l.strip_prefix(b"PACKAGES: ").map(|n| {
                    std::str::from_utf8(n)
                        .unwrap()
                        .trim()
                        .parse::<usize>()
                        .unwrap()
                })
            });
            assert_eq!(
                Some(idx.packages.len()),
                header,
                "{name}: {:?}",
                idx.rejected
            );
            if name == "necrose99__gentoo-binhost__x86_64-bonnell-linux-gnu__Packages" {
                assert_eq!(
                    idx.uri.as_deref(),
                    Some(
                        "https://github.com/spreequalle/gentoo-binhost/releases/download/x86_64-bonnell-linux-gnu"
                    )
                );
            } else {
                assert_eq!(idx.uri, None, "{name}");
            }
            seen += 1;
        }
        assert_eq!(seen, 6);
    }
}

/// Property tests: the parser is fed arbitrary bytes and arbitrary index-shaped text. It may
/// refuse, never panic, and whatever it accepts is safe to place under the mount point.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::namespace::Namespace;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn line() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("CPV".to_string()),
            Just("PATH".to_string()),
            Just("SIZE".to_string()),
            Just("MTIME".to_string()),
            Just("SHA1".to_string()),
            Just("MD5".to_string()),
            Just("TIMESTAMP".to_string()),
            Just("VERSION".to_string()),
            Just("TTL".to_string()),
            Just("BUILD_ID".to_string()),
            "[A-Z_]{1,8}",
        ];
        let value = prop_oneof![
            "[a-z0-9./+_-]{0,40}",
            "(\\.\\./|/|//|\\./)?[a-z]{1,5}(/[a-z.]{0,5}){0,4}",
            "-?[0-9]{1,22}",
            "[0-9a-f]{32}|[0-9a-f]{40}",
            any::<String>(),
        ];
        (key, value, prop_oneof![Just(": "), Just(":"), Just(":  ")])
            .prop_map(|(k, v, sep)| format!("{k}{sep}{v}"))
    }

    fn index_text() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::collection::vec(line(), 0..8), 0..12).prop_map(|blocks| {
            blocks
                .into_iter()
                .map(|b| b.join("\n"))
                .collect::<Vec<_>>()
                .join("\n\n")
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(raw in prop::collection::vec(any::<u8>(), 0..4096)) {
            let _ = Index::parse(Bytes::from(raw));
        }

        #[test]
        fn accepted_entries_are_safe_and_reachable(text in index_text()) {
            let Ok(index) = Index::parse(Bytes::from(text)) else { return Ok(()) };
            for p in &index.packages {
                prop_assert!(check_path(&p.path).is_ok(), "{}", p.path);
            }
            let index = Arc::new(index);
            let (ns, collisions) = Namespace::build(index.clone());
            let placed = index.packages.len() - collisions.len();
            // Every placed package is reachable by its PATH, and nothing else appears.
            let reachable = index.packages.iter().filter(|p| {
                ns.resolve(&p.path).and_then(|n| ns.package(n)).is_some_and(|q| q.path == p.path)
            }).count();
            prop_assert!(reachable >= placed);
        }
    }
}
