//! The `Packages` the mount serves when it is not the binhost's own: the same header (with
//! `PACKAGES` counting what is served) and each served entry's block exactly as its index
//! wrote it, so every key Portage reads (including ones we do not parse) is unchanged.
//!
//! The entries may come from more than one index: during a merge, entries of the release
//! emerge resolved are served beside the new release's (see `lifecycle`).

use std::borrow::Cow;

use bytes::Bytes;

use super::{Index, Package};

/// `header`'s header block, then the blocks of `entries` in order, separated by blank lines.
pub fn render<'a>(header: &'a Index, entries: &[(&'a Index, &Package)]) -> Bytes {
    let mut texts: Vec<(&'a Index, Cow<'a, str>)> = Vec::new();
    fn text_of<'a>(texts: &mut Vec<(&'a Index, Cow<'a, str>)>, index: &'a Index) -> usize {
        match texts.iter().position(|(i, _)| std::ptr::eq(*i, index)) {
            Some(n) => n,
            None => {
                texts.push((index, String::from_utf8_lossy(&index.raw)));
                texts.len() - 1
            }
        }
    }
    let head = text_of(&mut texts, header);
    let mut out = String::new();
    let (start, end) = header.header_span;
    for line in texts[head].1[start..end].split_inclusive('\n') {
        if line.split_once(':').is_some_and(|(k, _)| k == "PACKAGES") {
            out += &format!("PACKAGES: {}\n", entries.len());
        } else {
            out += line;
            if !line.ends_with('\n') {
                out.push('\n');
            }
        }
    }
    for (index, pkg) in entries {
        let n = text_of(&mut texts, index);
        let (start, end) = pkg.span;
        let block = &texts[n].1[start..end];
        out.push('\n');
        out += block;
        if !block.ends_with('\n') {
            out.push('\n');
        }
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "ARCH: amd64\nPACKAGES: 3\nTIMESTAMP: 100\nVERSION: 0\n\n\
        CPV: a/x-1\nBUILD_ID: 1\nPATH: a/x/x-1-1.gpkg.tar\nSIZE: 10\nRDEPEND: b/y\n\n\
        CPV: a/z-1\nPATH: ../evil\nSIZE: 10\n\n\
        CPV: b/y-2\r\nPATH: b/y-2.tbz2\r\nSIZE: 30\r\nMTIME: 70";
    const NEW: &str = "PACKAGES: 1\nTIMESTAMP: 200\n\nCPV: a/x-1\nBUILD_ID: 2\nPATH: a/x/x-1-2.gpkg.tar\nSIZE: 11\n";

    fn parse(s: &str) -> Index {
        Index::parse(Bytes::copy_from_slice(s.as_bytes())).unwrap()
    }

    #[test]
    fn renders_the_chosen_entries_verbatim_with_packages_adjusted() {
        let old = parse(OLD);
        assert_eq!(old.packages.len(), 2, "the unsafe PATH is refused");
        let entries: Vec<(&Index, &Package)> = old.packages.iter().map(|p| (&old, p)).collect();
        let text = render(&old, &entries);
        let again = parse(std::str::from_utf8(&text).unwrap());
        assert_eq!(again.packages, {
            let mut p = old.packages.clone();
            // Spans are positions in the new text; everything else is the same.
            for (q, r) in p.iter_mut().zip(&again.packages) {
                q.span = r.span;
            }
            p
        });
        let text = std::str::from_utf8(&text).unwrap();
        assert!(text.starts_with("ARCH: amd64\nPACKAGES: 2\nTIMESTAMP: 100\nVERSION: 0\n\n"));
        assert!(text.contains("RDEPEND: b/y\n"), "unparsed keys are kept");
        assert!(!text.contains("evil"), "{text}");
    }

    #[test]
    fn mixes_entries_of_two_indexes_under_the_newer_header() {
        let (old, new) = (parse(OLD), parse(NEW));
        let text = render(&new, &[(&new, &new.packages[0]), (&old, &old.packages[0])]);
        let both = parse(std::str::from_utf8(&text).unwrap());
        assert_eq!(both.timestamp, Some(200));
        let ids: Vec<_> = both.packages.iter().map(|p| p.build_id).collect();
        assert_eq!(ids, [Some(2), Some(1)]);
        assert!(
            std::str::from_utf8(&text)
                .unwrap()
                .starts_with("PACKAGES: 2\n")
        );
    }
}
