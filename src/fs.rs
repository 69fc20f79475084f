//! The FUSE adapter: translates kernel requests into `Vfs` calls, and its decisions into
//! replies and notifications.
//!
//! It is thin on purpose. Each handler opens a span, asks the `Vfs`, and turns the `Result` or
//! decision into a reply; what to keep cached, what to drop, which inodes and names stay valid
//! is decided there and tested without a mount. Reads that may wait for the network run as
//! tokio tasks and reply when their bytes are there, so one slow package never blocks the FUSE
//! loop. The vfs's invalidations are carried out by one thread of their own.
//!
//! Everything is read-only: the mount is `ro`, and every write-like request that still reaches
//! us answers `EROFS`, so Portage's `os.access(PKGDIR, W_OK)` says no and it never tries to write.
//! An open handle keeps the snapshot entry (and `Blob`) it was opened with until release, so an
//! index refresh never changes the bytes under a reader.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, Notifier, OpenAccMode, OpenFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{Instrument, debug, debug_span, event, info, warn};

use crate::error::FsError;
use crate::fetch::Fetcher;
use crate::namespace::Attr;
use crate::snapshot::Snapshot;
use crate::vfs::{Handle, Invalidation, Vfs};

/// How long the kernel may cache names and attributes: a quarter of the index TTL, at most a
/// minute, so a withdrawn file disappears within 1.25 refresh intervals. A stale entry can
/// never mean wrong bytes: inode numbers carry content identity.
pub fn attr_ttl(index_ttl: Duration) -> Duration {
    (index_ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}
/// The extended attribute on the mount's root that `binpkgfs status` reads.
pub const STATUS_XATTR: &str = "user.binpkgfs.status";

pub struct BinpkgFs {
    vfs: Arc<Vfs>,
    rt: tokio::runtime::Handle,
    ttl: Duration,
    /// Allowed by the configuration; the kernel must agree too (see `init`).
    passthrough_wanted: bool,
    /// The kernel's backing file per inode while a passthrough handle of it is open (it wants
    /// one per inode), and the handles holding it.
    backing: Mutex<HashMap<u64, Weak<BackingId>>>,
    handle_backing: Mutex<HashMap<u64, Arc<BackingId>>>,
    /// Set by the daemon once the session exists; carries out the vfs's invalidations.
    notifier: Arc<OnceLock<Notifier>>,
    status: Box<dyn Fn() -> String + Send + Sync>,
}

impl BinpkgFs {
    pub fn new(
        ns: Arc<Snapshot>,
        fetcher: Arc<Fetcher>,
        rt: tokio::runtime::Handle,
        ttl: Duration,
        status: Box<dyn Fn() -> String + Send + Sync>,
    ) -> Self {
        let vfs = Vfs::new(ns, fetcher);
        let notifier: Arc<OnceLock<Notifier>> = Arc::default();
        let rx = vfs.invalidations().expect("a new vfs has its receiver");
        let (n, weak) = (notifier.clone(), Arc::downgrade(&vfs));
        // Off the runtime and off the FUSE threads: dropping pages waits for pages that reads
        // in flight hold, and those reads are answered there.
        std::thread::Builder::new()
            .name("binpkgfs-inval".into())
            .spawn(move || invalidate(rx, n, weak))
            .expect("starting the invalidation thread");
        BinpkgFs {
            vfs,
            rt,
            ttl,
            passthrough_wanted: false,
            backing: Mutex::default(),
            handle_backing: Mutex::default(),
            notifier,
            status,
        }
    }

    /// Whether complete packages may be handed to the kernel (FUSE passthrough).
    pub fn with_passthrough(mut self, wanted: bool) -> Self {
        self.passthrough_wanted = wanted;
        self
    }

    /// Where the daemon puts the session's notifier (the session is created after `self`).
    pub fn notifier_slot(&self) -> Arc<OnceLock<Notifier>> {
        self.notifier.clone()
    }

    /// The kernel's backing id for the blob behind `fh`, one per inode; `None` if the kernel
    /// would not take it.
    fn backing_for(&self, fh: u64, ino: u64, reply: &ReplyOpen) -> Option<Arc<BackingId>> {
        let mut by_ino = self.backing.lock().unwrap();
        let id = match by_ino.get(&ino).and_then(Weak::upgrade) {
            Some(id) => id,
            None => {
                let handle = self.vfs.handle(fh).ok()?;
                let Handle::Package { blob, .. } = &*handle else {
                    return None;
                };
                match reply.open_backing(blob.file()?) {
                    Ok(id) => {
                        let id = Arc::new(id);
                        by_ino.retain(|_, w| w.strong_count() > 0);
                        by_ino.insert(ino, Arc::downgrade(&id));
                        id
                    }
                    Err(e) => {
                        warn!("passthrough unavailable, serving reads through the daemon: {e}");
                        return None;
                    }
                }
            }
        };
        self.handle_backing.lock().unwrap().insert(fh, id.clone());
        Some(id)
    }
}

/// Carries out the vfs's invalidations until the vfs is gone.
fn invalidate(rx: mpsc::Receiver<Invalidation>, notifier: Arc<OnceLock<Notifier>>, vfs: Weak<Vfs>) {
    for inv in rx {
        let Some(vfs) = vfs.upgrade() else { return };
        // Before the session exists the kernel holds nothing to drop.
        let n = notifier.get();
        match inv {
            Invalidation::Pages { ino, epoch } => {
                match n.map_or(Ok(()), |n| n.inval_inode(INodeNo(ino), 0, -1)) {
                    Ok(()) => vfs.pages_dropped(ino, epoch),
                    Err(e) => warn!(ino, "dropping cached pages failed: {e}"),
                }
            }
            Invalidation::Entry { parent, name } => {
                if let Some(Err(e)) = n.map(|n| n.inval_entry(INodeNo(parent), OsStr::new(&*name)))
                {
                    debug!(parent, %name, "name invalidation: {e}");
                }
            }
        }
    }
}

fn file_type(a: &Attr) -> FileType {
    if a.is_dir {
        FileType::Directory
    } else {
        FileType::RegularFile
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let mtime = if a.mtime >= 0 {
        UNIX_EPOCH + Duration::from_secs(a.mtime as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(a.mtime.unsigned_abs())
    };
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind: file_type(a),
        perm: if a.is_dir { 0o555 } else { 0o444 },
        nlink: if a.is_dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 128 * 1024,
        flags: 0,
    }
}

/// Logs a failed request at the error's own level and returns its errno.
fn fail(err: FsError) -> Errno {
    match err.level() {
        tracing::Level::WARN => event!(tracing::Level::WARN, error = %err, "request failed"),
        _ => event!(tracing::Level::DEBUG, error = %err, "request failed"),
    }
    err.errno()
}

impl Filesystem for BinpkgFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large reads cut per-request overhead for Portage's whole-file digest pass.
        let _ = config.set_max_readahead(1 << 20);
        // A tree walk is request-bound: READDIRPLUS returns attributes with the names (no
        // LOOKUP per entry), and with no-opendir support the kernel skips OPENDIR/RELEASEDIR.
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        let _ = config.add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        // Passthrough (Linux >= 6.9): complete packages are read by the kernel straight from
        // the cache file. Depth 2 lets the cache live on overlayfs.
        if !self.passthrough_wanted {
            info!("passthrough off (--no-passthrough): serving every read through the daemon");
        } else if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok()
        {
            self.vfs.set_passthrough(true);
        } else {
            info!("kernel without FUSE passthrough: serving every read through the daemon");
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _s = debug_span!("lookup", req = req.unique().0, ino = parent.0, ?name).entered();
        let found = name
            .to_str()
            .ok_or(FsError::NotFound)
            .and_then(|n| self.vfs.lookup(parent.0, n));
        match found {
            Ok(a) => reply.entry(&self.ttl, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(fail(e)),
        }
    }

    /// `batch_forget` is fuser's default, which calls this per node (its `ForgetOne` is not
    /// public in fuser 0.18).
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.vfs.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let _s = debug_span!("getattr", req = req.unique().0, ino = ino.0).entered();
        match self.vfs.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(a) => reply.attr(&self.ttl, &file_attr(&a)),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _s = debug_span!("open", req = req.unique().0, ino = ino.0).entered();
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        // Fetcher::open may start a transfer; it must run on our runtime.
        let decided = {
            let _rt = self.rt.enter();
            self.vfs.open(ino.0, write)
        };
        let d = match decided {
            Ok(d) => d,
            Err(e) => return reply.error(fail(e)),
        };
        let keep_cache = if d.passthrough {
            match self.backing_for(d.fh, ino.0, &reply) {
                // The kernel refuses page-cache flags on a passthrough open.
                Some(id) => {
                    return reply.opened_passthrough(FileHandle(d.fh), FopenFlags::empty(), &id);
                }
                None => self.vfs.passthrough_refused(d.fh),
            }
        } else {
            d.keep_cache
        };
        let flags = if keep_cache {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(d.fh), flags);
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let span = debug_span!(
            "read",
            req = req.unique().0,
            ino = ino.0,
            fh = fh.0,
            offset,
            size
        );
        // Reads that may wait for the network run as tasks, so one slow package never blocks
        // the FUSE loop.
        let vfs = self.vfs.clone();
        self.rt.spawn(
            async move {
                match vfs.read(fh.0, offset, size).await {
                    Ok(data) => reply.data(&data),
                    Err(e) => reply.error(fail(e)),
                }
            }
            .instrument(span),
        );
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if self.vfs.release(fh.0) {
            self.handle_backing.lock().unwrap().remove(&fh.0);
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    /// `ENOSYS` tells the kernel we keep no directory state, so it stops sending OPENDIR and
    /// RELEASEDIR (two requests per directory in a walk). A listing is pinned to its tree by
    /// its cookies instead (see `vfs`).
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _s = debug_span!("readdir", req = req.unique().0, ino = ino.0, offset).entered();
        let listed = self.vfs.readdir(ino.0, offset, false, |cookie, a, name| {
            reply.add(INodeNo(a.ino), cookie, file_type(a), name)
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _s = debug_span!("readdirplus", req = req.unique().0, ino = ino.0, offset).entered();
        let ttl = self.ttl;
        let listed = self.vfs.readdir(ino.0, offset, true, |cookie, a, name| {
            reply.add(
                INodeNo(a.ino),
                cookie,
                name,
                &ttl,
                &file_attr(a),
                Generation(0),
            )
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let ns = self.vfs.current();
        let bytes: u64 = ns.index.packages.iter().map(|p| p.size).sum();
        let bsize = 4096u32;
        reply.statfs(
            bytes.div_ceil(u64::from(bsize)),
            0,
            0,
            ns.len() as u64,
            0,
            bsize,
            255,
            bsize,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            return reply.error(fail(FsError::ReadOnly));
        }
        if self.vfs.exists(ino.0) {
            reply.ok()
        } else {
            reply.error(fail(FsError::NotFound))
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if ino.0 != crate::namespace::ROOT_INO || name != STATUS_XATTR {
            return reply.error(fail(FsError::NoAttr));
        }
        let value = (self.status)();
        if size == 0 {
            reply.size(value.len() as u32);
        } else if (size as usize) < value.len() {
            reply.error(Errno::ERANGE);
        } else {
            reply.data(value.as_bytes());
        }
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    // Write-like requests: the `ro` mount stops them in the VFS; these answer for the rest.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(fail(FsError::ReadOnly));
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(fail(FsError::ReadOnly));
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(fail(FsError::ReadOnly));
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(fail(FsError::ReadOnly));
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(fail(FsError::ReadOnly));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(fail(FsError::ReadOnly));
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(fail(FsError::ReadOnly));
    }
}
