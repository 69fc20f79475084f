//! The saved index: the last good `Packages` of each binhost and its validators, kept under
//! `index/<url-hash>/`, so a mount can start (and answer) while the binhost is down.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha1::{Digest as _, Sha1};

use tracing::info;

use super::Store;
use crate::credentials::BinhostUrl;
use crate::index::Validators;

impl Store {
    /// Deletes saved indexes whose recorded URL carries userinfo: older versions keyed (and
    /// labelled) them by the URL as given, password included. Now the key is the URL without
    /// userinfo, so such a directory is never read again, and it must not keep the password.
    pub(super) fn forget_indexes_with_credentials(&self) {
        let Ok(dirs) = fs::read_dir(self.dir.join("index")) else {
            return;
        };
        for dir in dirs.flatten() {
            let meta = fs::read_to_string(dir.path().join("validators")).unwrap_or_default();
            let leaked = meta
                .lines()
                .filter_map(|l| l.strip_prefix("url: "))
                .any(|url| BinhostUrl::parse(url).credentials().is_some());
            if leaked && fs::remove_dir_all(dir.path()).is_ok() {
                info!("removed a saved index an older binpkgfs kept under a URL with a password");
            }
        }
    }

    fn index_dir(&self, url: &str) -> PathBuf {
        let h = hex::encode(Sha1::digest(url.as_bytes()));
        self.dir.join("index").join(&h[..16])
    }

    /// The last good index saved for `url`, with its validators. `url` is always the URL
    /// without userinfo (see `BinhostUrl`): the index does not depend on who reads it, and no
    /// password (nor a hash of one) reaches the disk.
    pub fn load_index(&self, url: &str) -> io::Result<Option<(Vec<u8>, Validators)>> {
        let dir = self.index_dir(url);
        let raw = match fs::read(dir.join("Packages")) {
            Ok(raw) => raw,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = fs::read_to_string(dir.join("validators")).unwrap_or_default();
        let mut v = Validators::default();
        for line in meta.lines() {
            match line.split_once(": ") {
                Some(("etag", x)) => v.etag = Some(x.to_string()),
                Some(("last-modified", x)) => v.last_modified = Some(x.to_string()),
                Some(("source", x)) => v.compressed = x == "Packages.gz",
                _ => {}
            }
        }
        Ok(Some((raw, v)))
    }

    /// Saves an index atomically: a crash leaves the old one or the new one, never a mix.
    /// Validators are written first; stale validators beside a newer index only cost one
    /// unconditional fetch, while the reverse could make us skip a real update.
    pub fn save_index(&self, url: &str, raw: &[u8], v: &Validators) -> io::Result<()> {
        let dir = self.index_dir(url);
        fs::create_dir_all(&dir)?;
        let _ = fs::remove_file(dir.join("validators"));
        write_atomic(&dir.join("Packages"), raw)?;
        let mut meta = format!("url: {url}\n");
        if let Some(e) = &v.etag {
            meta += &format!("etag: {e}\n");
        }
        if let Some(lm) = &v.last_modified {
            meta += &format!("last-modified: {lm}\n");
        }
        if v.compressed {
            meta += "source: Packages.gz\n";
        }
        write_atomic(&dir.join("validators"), meta.as_bytes())
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_data()?;
    fs::rename(&tmp, path)
}
