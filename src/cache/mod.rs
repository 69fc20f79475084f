//! The on-disk cache directory: verified package files, partial downloads, the saved index.
//!
//! Layout under `--cache-dir`:
//! * `objects/<key>`: complete files, each checked against the index before it was renamed in;
//!   `<key>` is `Package::cache_key()`, derived only from what the index says the file is;
//! * `partial/<key>.<n>.part`: downloads in progress. They are never read back after a restart:
//!   `Store::open` deletes them all, so a crash can leave nothing that passes for complete;
//! * `index/<url-hash>/{Packages,validators}`: the last good index per binhost, replaced
//!   atomically, so a mount can start while the binhost is down;
//! * `lock`: held with `flock` for the daemon's life; a second daemon on the same directory
//!   refuses to start instead of corrupting the first one's accounting.
//!
//! The directory is private (created 0700; world access removed from an older one): it holds
//! the saved index and the log. The daemon runs as root, so `objects/`, `partial/` and `index/`
//! must be real directories, never symlinks: a planted `partial/` link would make start-up
//! delete files wherever it points.
//!
//! Size is bounded by LRU eviction of entries nobody has open (pinned entries are skipped).
//! The LRU order survives restarts through the files' mtimes, which are bumped on every hit.
//! Start-up reads directory entries and metadata only, never cached bytes.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use lru::LruCache;
use tracing::{debug, info, warn};

use crate::index::CacheKey;

mod saved_index;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cache directory {0} is in use by another binpkgfs (lock file held)")]
    Locked(PathBuf),
    #[error("cache directory: {0} is a symlink; refusing to use it (make it a directory)")]
    Symlink(PathBuf),
}

/// Creates `dir` (and its parents) mode 0700, or removes world access from an existing one.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::metadata(dir)?;
    let mode = meta.permissions().mode();
    if mode & 0o007 != 0 && meta.uid() == unsafe { libc::geteuid() } {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode & 0o7770))?;
    }
    Ok(())
}

/// Creates the subdirectory `path` unless it is there, refusing a symlink.
fn create_subdir(path: &Path) -> Result<(), StoreError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(StoreError::Symlink(path.to_path_buf())),
        _ => fs::create_dir_all(path).map_err(|source| StoreError::Io {
            dir: path.to_path_buf(),
            source,
        }),
    }
}

pub struct Store {
    dir: PathBuf,
    objects: PathBuf,
    partial: PathBuf,
    limit: u64,
    partial_seq: AtomicU64,
    inner: Mutex<Inner>,
    /// Holds the `flock`; released when the daemon exits, however it exits.
    _lock: File,
}

struct Inner {
    lru: LruCache<CacheKey, u64>,
    total: u64,
    pins: HashMap<CacheKey, u32>,
}

impl Inner {
    /// Forgets the least recently used entry nobody has open; the caller removes its file.
    fn pop_lru_unpinned(&mut self) -> Option<CacheKey> {
        let key = self
            .lru
            .iter()
            .rev()
            .map(|(k, _)| k)
            .find(|k| !self.pins.contains_key(*k))
            .cloned()?;
        let size = self.lru.pop(&key).unwrap_or(0);
        self.total -= size;
        Some(key)
    }
}

/// Cache usage for `status`.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub bytes: u64,
    pub entries: usize,
    pub limit: u64,
}

impl Store {
    pub fn open(dir: &Path, limit: u64) -> Result<Store, StoreError> {
        let err = |source| StoreError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        let objects = dir.join("objects");
        let partial = dir.join("partial");
        create_private_dir(dir).map_err(err)?;
        for d in [&objects, &partial, &dir.join("index")] {
            create_subdir(d)?;
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(dir.join("lock"))
            .map_err(err)?;
        // SAFETY: flock on a valid fd we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                StoreError::Locked(dir.to_path_buf())
            } else {
                err(e)
            });
        }
        let mut removed = 0;
        for entry in fs::read_dir(&partial).map_err(err)? {
            let entry = entry.map_err(err)?;
            if fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            info!(
                removed,
                "discarded partial downloads left by an earlier run"
            );
        }
        let mut found = Vec::new();
        for entry in fs::read_dir(&objects).map_err(err)? {
            let entry = entry.map_err(err)?;
            let name = entry.file_name();
            let Some(key) = name.to_str().and_then(CacheKey::from_file_name) else {
                debug!(name = ?name, "ignoring foreign file in cache");
                continue;
            };
            let meta = entry.metadata().map_err(err)?;
            found.push((meta.mtime(), meta.mtime_nsec(), key, meta.len()));
        }
        found.sort_unstable();
        let mut inner = Inner {
            lru: LruCache::unbounded(),
            total: 0,
            pins: HashMap::new(),
        };
        for (_, _, key, size) in found {
            inner.total += size;
            inner.lru.put(key, size);
        }
        let store = Store {
            dir: dir.to_path_buf(),
            objects,
            partial,
            limit,
            partial_seq: AtomicU64::new(0),
            inner: Mutex::new(inner),
            _lock: lock,
        };
        store.evict();
        store.forget_indexes_with_credentials();
        let usage = store.usage();
        info!(
            dir = %dir.display(),
            entries = usage.entries,
            bytes = usage.bytes,
            limit,
            "cache opened"
        );
        Ok(store)
    }

    fn object_path(&self, key: &CacheKey) -> PathBuf {
        self.objects.join(&key.0)
    }

    /// Opens a complete entry of `size` bytes (its index SIZE), if there is one, and marks it
    /// most recently used. An entry of another length (a damaged disk, a truncated file) is
    /// deleted and reported absent, so it is fetched again and never served short.
    pub fn open_object(&self, key: &CacheKey, size: u64) -> io::Result<Option<File>> {
        let file = match File::open(self.object_path(key)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Removed behind our back: forget it.
                let mut inner = self.inner.lock().unwrap();
                if let Some(size) = inner.lru.pop(key) {
                    inner.total -= size;
                }
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        if len != size {
            warn!(
                key = %key,
                len, size, "cache entry has the wrong length (damaged?); dropping it"
            );
            let _ = fs::remove_file(self.object_path(key));
            let mut inner = self.inner.lock().unwrap();
            if let Some(had) = inner.lru.pop(key) {
                inner.total -= had;
            }
            return Ok(None);
        }
        {
            let mut inner = self.inner.lock().unwrap();
            if inner.lru.get(key).is_none() {
                inner.total += len;
                inner.lru.put(key.clone(), len);
            }
        }
        // Persist the LRU order for the next start; failure only costs ordering.
        let _ = file.set_modified(SystemTime::now());
        Ok(Some(file))
    }

    /// A fresh partial file for a download, opened for reading and writing.
    pub fn new_partial(&self, key: &CacheKey) -> io::Result<(PathBuf, File)> {
        let n = self.partial_seq.fetch_add(1, Ordering::Relaxed);
        let path = self.partial.join(format!("{key}.{n}.part"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((path, file))
    }

    /// Moves a verified partial into place. The data is flushed first, so the rename never
    /// publishes a file whose bytes are not on disk.
    pub fn commit(&self, key: &CacheKey, partial: &Path, file: &File) -> io::Result<()> {
        file.sync_data()?;
        let size = file.metadata()?.len();
        fs::rename(partial, self.object_path(key))?;
        {
            let mut inner = self.inner.lock().unwrap();
            if let Some(old) = inner.lru.put(key.clone(), size) {
                inner.total -= old;
            }
            inner.total += size;
        }
        self.evict();
        Ok(())
    }

    pub fn pin(&self, key: &CacheKey) {
        *self
            .inner
            .lock()
            .unwrap()
            .pins
            .entry(key.clone())
            .or_default() += 1;
    }

    pub fn unpin(&self, key: &CacheKey) {
        {
            let mut inner = self.inner.lock().unwrap();
            if let Some(n) = inner.pins.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    inner.pins.remove(key);
                }
            }
        }
        self.evict();
    }

    /// Removes the least recently used unpinned entry, to make room on a full disk. `false`
    /// when there is none. Called from the writer, on the blocking pool.
    pub fn evict_one(&self) -> bool {
        let key = self.inner.lock().unwrap().pop_lru_unpinned();
        match key {
            Some(key) => {
                warn!(%key, "cache disk full: evicting to make room");
                let _ = fs::remove_file(self.object_path(&key));
                true
            }
            None => false,
        }
    }

    /// Removes least recently used, unpinned entries until the total fits the limit.
    ///
    /// The entries leave the accounting under the lock; their files are unlinked after it, on
    /// the blocking pool when there is a runtime (a blob's last drop may run on a worker), so
    /// no lock is held across disk I/O and no worker waits for a slow disk. That is safe
    /// because an evicted key is unpinned: no transfer of it is running, so nothing can commit
    /// it before the unlink; a new transfer of it starts only once `open_object` finds no
    /// file, i.e. after the unlink. An open that races the unlink keeps a working descriptor
    /// and re-enters the key; the next open then finds the file gone and forgets it again.
    pub fn evict(&self) {
        let victims: Vec<PathBuf> = {
            let mut inner = self.inner.lock().unwrap();
            let mut victims = Vec::new();
            while inner.total > self.limit {
                let Some(key) = inner.pop_lru_unpinned() else {
                    break;
                };
                debug!(%key, "evicting");
                victims.push(self.object_path(&key));
            }
            victims
        };
        if victims.is_empty() {
            return;
        }
        let unlink = move || {
            for path in victims {
                if let Err(e) = fs::remove_file(&path)
                    && e.kind() != io::ErrorKind::NotFound
                {
                    warn!(path = %path.display(), error = %e, "could not remove evicted cache entry");
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(unlink)),
            Err(_) => unlink(),
        }
    }

    pub fn usage(&self) -> Usage {
        let inner = self.inner.lock().unwrap();
        Usage {
            bytes: inner.total,
            entries: inner.lru.len(),
            limit: self.limit,
        }
    }

    /// Whether a verified entry for `key` is in the cache.
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.inner.lock().unwrap().lru.contains(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Validators;
    use std::io::Write;

    fn key(n: u8) -> CacheKey {
        CacheKey(format!("{:040x}", n))
    }

    fn put(store: &Store, k: &CacheKey, len: usize) {
        let (path, mut file) = store.new_partial(k).unwrap();
        file.write_all(&vec![7u8; len]).unwrap();
        store.commit(k, &path, &file).unwrap();
    }

    #[test]
    fn an_entry_shorter_than_its_size_is_dropped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        put(&store, &key(1), 100);
        // The disk lost the file's tail.
        let path = dir.path().join("objects").join(&key(1).0);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(60)
            .unwrap();
        assert!(store.open_object(&key(1), 100).unwrap().is_none());
        assert!(!path.exists(), "the damaged entry is deleted");
        assert!(!store.contains(&key(1)));
        assert_eq!(store.usage().bytes, 0);
        put(&store, &key(2), 100);
        assert!(store.open_object(&key(2), 100).unwrap().is_some());
    }

    #[test]
    fn evicts_least_recently_used_unpinned() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 250).unwrap();
        put(&store, &key(1), 100);
        put(&store, &key(2), 100);
        assert!(store.open_object(&key(1), 100).unwrap().is_some()); // 1 is now most recent
        put(&store, &key(3), 100); // over the limit: 2 goes
        assert!(store.contains(&key(1)) && store.contains(&key(3)));
        assert!(!store.contains(&key(2)));
        assert!(!dir.path().join("objects").join(&key(2).0).exists());
        assert_eq!(store.usage().bytes, 200);

        store.pin(&key(1));
        store.pin(&key(3));
        put(&store, &key(4), 100); // everything else pinned: 4 itself is the only victim
        assert!(!store.contains(&key(4)));
        assert!(store.contains(&key(1)) && store.contains(&key(3)));
        put(&store, &key(5), 100);
        store.pin(&key(5)); // too late: 5 was already evicted on commit
        store.unpin(&key(5));
        store.unpin(&key(1)); // 1 becomes evictable, but 200 <= 250 now
        assert_eq!(store.usage().entries, 2);
    }

    #[test]
    fn survives_restart_and_drops_partials() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), 1 << 20).unwrap();
            put(&store, &key(1), 10);
            let (_partial, mut f) = store.new_partial(&key(2)).unwrap();
            f.write_all(b"half").unwrap();
        }
        fs::write(dir.path().join("objects").join("not-a-key"), b"x").unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        assert!(store.contains(&key(1)));
        assert!(!store.contains(&key(2)));
        assert_eq!(store.usage().entries, 1);
        assert_eq!(fs::read_dir(dir.path().join("partial")).unwrap().count(), 0);
    }

    #[test]
    fn symlinked_subdirectories_are_refused_and_their_targets_untouched() {
        use std::os::unix::fs::PermissionsExt;
        for sub in ["objects", "partial", "index"] {
            let dir = tempfile::tempdir().unwrap();
            let victim = tempfile::tempdir().unwrap();
            fs::write(victim.path().join("precious"), b"x").unwrap();
            std::os::unix::fs::symlink(victim.path(), dir.path().join(sub)).unwrap();
            let e = Store::open(dir.path(), 1).err().expect(sub).to_string();
            assert!(e.contains("is a symlink") && e.contains(sub), "{e}");
            assert!(victim.path().join("precious").exists(), "{sub}");
        }
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("new");
        let _store = Store::open(&cache, 1).unwrap();
        let mode = fs::metadata(&cache).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn second_store_on_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path(), 1).unwrap();
        assert!(matches!(
            Store::open(dir.path(), 1),
            Err(StoreError::Locked(_))
        ));
    }

    #[test]
    fn index_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1).unwrap();
        assert!(store.load_index("http://a/").unwrap().is_none());
        let v = Validators {
            etag: Some("\"abc\"".into()),
            last_modified: None,
            compressed: true,
        };
        store
            .save_index("http://a/", b"TIMESTAMP: 1\n", &v)
            .unwrap();
        let (raw, got) = store.load_index("http://a/").unwrap().unwrap();
        assert_eq!(raw, b"TIMESTAMP: 1\n");
        assert_eq!(got, v);
        assert!(store.load_index("http://b/").unwrap().is_none());
    }

    #[test]
    fn a_saved_index_under_a_url_with_a_password_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let leaked = dir.path().join("index/0123456789abcdef");
        fs::create_dir_all(&leaked).unwrap();
        fs::write(leaked.join("validators"), "url: http://u:pw@h/x\netag: 1\n").unwrap();
        let store = Store::open(dir.path(), 1).unwrap();
        assert!(!leaked.exists());
        let v = Validators::default();
        store
            .save_index("http://h/x", b"TIMESTAMP: 1\n", &v)
            .unwrap();
        drop(store);
        let store = Store::open(dir.path(), 1).unwrap();
        assert!(store.load_index("http://h/x").unwrap().is_some());
    }
}
