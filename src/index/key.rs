//! Cache keys: the name of a package's cache entry, derived only from what the index says the
//! file is (PATH, SIZE and every digest, or MTIME when there is none). A package rebuilt at the
//! same PATH gets a new key, so it is never served from a stale entry.

use std::fmt;

use sha1::{Digest as _, Sha1};

use super::Package;

impl Package {
    /// The cache key: what the index says this file is. A package rebuilt at the same PATH gets
    /// a new digest and so a new key, and is never served from a stale entry.
    pub fn cache_key(&self) -> CacheKey {
        let mut h = Sha1::new();
        for part in [self.path.as_bytes(), &self.size.to_le_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        let d = &self.digests;
        let digests: [Option<&[u8]>; 4] = [
            d.md5.as_ref().map(|x| &x[..]),
            d.sha1.as_ref().map(|x| &x[..]),
            d.sha512.as_deref().map(|x| &x[..]),
            d.blake2b.as_deref().map(|x| &x[..]),
        ];
        for digest in digests {
            let digest = digest.unwrap_or(&[]);
            h.update((digest.len() as u64).to_le_bytes());
            h.update(digest);
        }
        if digests.iter().all(Option::is_none) {
            // Without any digest, MTIME is the only hint that the file changed.
            h.update(self.mtime.to_le_bytes());
        }
        CacheKey(hex::encode(h.finalize()))
    }
}

/// Hex name of a cache entry, derived only from index data (never from a file name on disk).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub String);

impl CacheKey {
    /// Accepts a name read back from the cache directory only if it has the form we write.
    pub fn from_file_name(name: &str) -> Option<CacheKey> {
        (name.len() == 40
            && name
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then(|| CacheKey(name.to_string()))
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
