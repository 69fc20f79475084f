//! `Content-Range` answers, parsed whole: a ranged answer is only used when it says exactly
//! which bytes of how long a file it carries.

/// `bytes A-B/T` as `(A, B + 1, T)`; T is `None` for `*`.
pub fn parse(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let (span, total) = v.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let (a, b) = (a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?);
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    (a <= b && total.is_none_or(|t| b < t)).then_some((a, b.checked_add(1)?, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_are_parsed_strictly() {
        assert_eq!(parse("bytes 0-99/1000"), Some((0, 100, Some(1000))));
        assert_eq!(parse("bytes 5-5/*"), Some((5, 6, None)));
        for bad in [
            "",
            "bytes 10-5/100",
            "bytes 0-100/100",
            "bytes -5/100",
            "items 0-1/2",
            "bytes 0-1",
            "bytes a-b/c",
            "bytes 0-18446744073709551615/*",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
