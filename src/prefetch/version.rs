//! Gentoo package versions: splitting `cat/pn-ver` and ordering versions, for the rule in `world`.
//!
//! Implements the comparison of PMS 3.3 (numeric components with the leading-zero rule, the
//! letter, `_alpha < _beta < _pre < _rc < (none) < _p` suffixes, `-rN`). Limits: no `*` or
//! `~` matching, no slots or USE — callers compare plain versions only.

use std::cmp::Ordering;

/// A parsed version, e.g. `1.2.03b_rc1_p2-r3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Numeric components as written (`1`, `2`, `03`).
    nums: Vec<String>,
    letter: Option<u8>,
    /// `(rank, digits)`: rank orders the suffix kinds; digits as written ("" means 0), so
    /// numbers of any length compare without overflow.
    suffixes: Vec<(u8, String)>,
    revision: String,
}

const SUFFIXES: [(&str, u8); 5] = [("alpha", 0), ("beta", 1), ("pre", 2), ("rc", 3), ("p", 5)];
/// Rank of "no suffix here" when one version has more suffixes than the other.
const NO_SUFFIX: u8 = 4;

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        let (main, revision) = match s.rsplit_once("-r") {
            Some((main, rev)) if !rev.is_empty() && rev.bytes().all(|b| b.is_ascii_digit()) => {
                (main, rev.to_string())
            }
            _ => (s, String::new()),
        };
        let mut parts = main.split('_');
        let head = parts.next()?;
        let (numbers, letter) = match head.as_bytes().last() {
            Some(&c) if c.is_ascii_lowercase() => (&head[..head.len() - 1], Some(c)),
            _ => (head, None),
        };
        let nums: Vec<String> = numbers.split('.').map(str::to_string).collect();
        if nums
            .iter()
            .any(|n| n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()))
        {
            return None;
        }
        let mut suffixes = Vec::new();
        for part in parts {
            let (rank, digits) = SUFFIXES
                .iter()
                .find_map(|(name, rank)| part.strip_prefix(name).map(|d| (*rank, d)))?;
            if !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            suffixes.push((rank, digits.to_string()));
        }
        Some(Version {
            nums,
            letter,
            suffixes,
            revision,
        })
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        compare_numbers(&self.nums, &other.nums)
            .then_with(|| self.letter.cmp(&other.letter))
            .then_with(|| compare_suffixes(&self.suffixes, &other.suffixes))
            .then_with(|| compare_integers(&self.revision, &other.revision))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Integers of any length, compared without overflow.
fn compare_integers(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

fn compare_numbers(a: &[String], b: &[String]) -> Ordering {
    let first = compare_integers(&a[0], &b[0]);
    if first != Ordering::Equal {
        return first;
    }
    for (x, y) in a.iter().zip(b).skip(1) {
        // PMS: a component with a leading zero compares as a decimal fraction.
        let o = if x.starts_with('0') || y.starts_with('0') {
            x.trim_end_matches('0').cmp(y.trim_end_matches('0'))
        } else {
            compare_integers(x, y)
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

fn compare_suffixes(a: &[(u8, String)], b: &[(u8, String)]) -> Ordering {
    let none = (NO_SUFFIX, String::new());
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (a.get(i).unwrap_or(&none), b.get(i).unwrap_or(&none));
        let o = x.0.cmp(&y.0).then_with(|| compare_integers(&x.1, &y.1));
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

/// Splits `cat/pn-ver` into `("cat/pn", version)`; `None` if it is not a CPV.
pub fn split_cpv(cpv: &str) -> Option<(&str, Version)> {
    let (cat, pf) = cpv.split_once('/')?;
    if cat.is_empty() || pf.contains('/') {
        return None;
    }
    // The name may contain hyphens but never ends in one followed by a valid version, so the
    // first hyphen that starts a valid version is the split.
    let base = cat.len() + 1;
    pf.match_indices('-')
        .map(|(i, _)| i)
        .filter(|&i| i > 0)
        .find_map(|i| Some((&cpv[..base + i], Version::parse(&pf[i + 1..])?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap_or_else(|| panic!("{s} should parse"))
    }

    #[test]
    fn orders_like_portage() {
        // Each strictly less than the next (checked against portage.versions.vercmp).
        let ascending = [
            "0.9",
            "1",
            "1.0",
            "1.0a",
            "1.0b",
            "1.0.0",
            "1.01",
            "1.1_alpha",
            "1.1_alpha1",
            "1.1_beta",
            "1.1_pre2",
            "1.1_rc1",
            "1.1",
            "1.1-r1",
            "1.1-r10",
            "1.1_p",
            "1.1_p1",
            "1.1_p1-r1",
            "1.2",
            "1.10",
            "2",
            "9999",
        ];
        for pair in ascending.windows(2) {
            assert!(v(pair[0]) < v(pair[1]), "{} < {}", pair[0], pair[1]);
            assert!(v(pair[1]) > v(pair[0]), "{} > {}", pair[1], pair[0]);
        }
        assert_eq!(v("1.0").cmp(&v("1.0-r0")), Ordering::Equal);
        assert_eq!(v("01").cmp(&v("1")), Ordering::Equal);
        assert_eq!(v("1.01").cmp(&v("1.010")), Ordering::Equal);
        assert!(v("12345678901234567890123") > v("12345678901234567890122"));
        // Suffix numbers and revisions of any length (they used to overflow to 0).
        assert!(v("1.0_p99999999999999999999999") > v("1.0_p0"));
        assert!(v("1.0-r99999999999999999999999") > v("1.0-r1"));
        assert_eq!(v("1.0_rc").cmp(&v("1.0_rc0")), Ordering::Equal);
        assert_eq!(v("1.0-r01").cmp(&v("1.0-r1")), Ordering::Equal);
    }

    #[test]
    fn rejects_non_versions() {
        for bad in ["", "a", "1.", ".1", "1..2", "1_foo", "1-r", "1ab", "1_rcx"] {
            assert!(Version::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn splits_cpvs() {
        let (pn, ver) = split_cpv("dev-libs/libdemo-2.1").unwrap();
        assert_eq!((pn, ver), ("dev-libs/libdemo", v("2.1")));
        let (pn, ver) = split_cpv("app-misc/foo-bar-1.0_rc1-r2").unwrap();
        assert_eq!((pn, ver), ("app-misc/foo-bar", v("1.0_rc1-r2")));
        let (pn, _) = split_cpv("dev-python/python-3-1.0").unwrap();
        assert_eq!(pn, "dev-python/python-3");
        for bad in ["dev-libs/libdemo", "libdemo-2.1", "a/b/c-1", "/x-1"] {
            assert!(split_cpv(bad).is_none(), "{bad:?}");
        }
    }
}
