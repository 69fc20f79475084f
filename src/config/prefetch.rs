//! The prefetch options of a mount: the merge-list watch (`mtimedb=`, `noprefetch`) and
//! `prefetch=updates` (`updates_root=`), from long options and `-o` words.

use std::path::PathBuf;

use super::{DEFAULT_MTIMEDB, MountArgs, absolute};

/// The `-o` words of this module, as given (the last of each wins).
#[derive(Default)]
pub(super) struct PrefetchWords {
    mtimedb: Option<PathBuf>,
    noprefetch: bool,
    updates: Option<bool>,
    updates_root: Option<PathBuf>,
}

/// What a mount watches and prefetches, settled.
#[derive(Debug, PartialEq)]
pub(super) struct Prefetch {
    /// emerge's merge list to watch; `None`: not watched.
    pub mtimedb: Option<PathBuf>,
    /// Whether the packages of a new merge list are prefetched (off with `noprefetch`).
    pub merge_list: bool,
    /// `prefetch=updates`: the EROOT whose installed packages' updates are prefetched.
    pub updates: Option<PathBuf>,
}

impl PrefetchWords {
    /// Takes `opt` if it is one of this module's words (`Ok(false)`: someone else's).
    pub fn take(&mut self, opt: &str) -> Result<bool, String> {
        match opt.split_once('=') {
            Some(("mtimedb", v)) => self.mtimedb = Some(PathBuf::from(v)),
            Some(("prefetch", v)) => self.updates = Some(prefetch_mode(v)?),
            Some(("updates_root", v)) => self.updates_root = Some(PathBuf::from(v)),
            None if opt == "noprefetch" => self.noprefetch = true,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// With the long options, which win over `-o`. The merge list is watched when its
    /// packages are prefetched, and also with `prefetch=updates` alone: an updates pass
    /// yields to a running merge, and only the watch knows of one (it holds the merge's
    /// entries too, as it always does).
    pub fn settle(self, a: &MountArgs) -> Result<Prefetch, String> {
        let merge_list = !(a.no_prefetch || self.noprefetch);
        let on = a.prefetch_updates || self.updates == Some(true);
        let root = a.updates_root.clone().or(self.updates_root);
        if root.is_some() && !on {
            return Err(
                "updates_root (--updates-root) is for prefetch=updates (--prefetch-updates), \
                 which is off"
                    .into(),
            );
        }
        let updates = on
            .then(|| absolute(&root.unwrap_or_else(|| "/".into())))
            .transpose()?;
        let mtimedb = a
            .mtimedb
            .clone()
            .or(self.mtimedb)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_MTIMEDB));
        Ok(Prefetch {
            mtimedb: (merge_list || updates.is_some())
                .then(|| absolute(&mtimedb))
                .transpose()?,
            merge_list,
            updates,
        })
    }
}

/// `-o prefetch=VALUE`: `updates` turns update prefetching on, `none` asks for nothing more
/// (merge-list prefetching has its own switch, `noprefetch`).
fn prefetch_mode(v: &str) -> Result<bool, String> {
    match v.trim() {
        "updates" => Ok(true),
        "none" => Ok(false),
        other => Err(format!("prefetch {other:?}: expected `updates` or `none`")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::cfg;
    use super::*;

    #[test]
    fn merge_list_prefetch_options() {
        let c = cfg(&["http://h/x", "/mnt"]).unwrap();
        assert_eq!(c.mtimedb, Some(PathBuf::from(DEFAULT_MTIMEDB)));
        assert!(c.prefetch_merge_list);
        let c = cfg(&[
            "-o",
            "mtimedb=/s/var/cache/edb/mtimedb",
            "http://h/x",
            "/mnt",
        ])
        .unwrap();
        assert_eq!(c.mtimedb, Some(PathBuf::from("/s/var/cache/edb/mtimedb")));
        let c = cfg(&["--mtimedb", "/a", "-o", "mtimedb=/b", "http://h/x", "/mnt"]).unwrap();
        assert_eq!(c.mtimedb, Some(PathBuf::from("/a")));
        for off in [&["--no-prefetch"][..], &["-o", "ro,noprefetch"]] {
            let mut args = off.to_vec();
            args.extend(["http://h/x", "/mnt"]);
            let c = cfg(&args).unwrap();
            assert_eq!((c.mtimedb, c.prefetch_merge_list), (None, false), "{off:?}");
        }
    }

    #[test]
    fn update_prefetch_options() {
        assert_eq!(cfg(&["http://h/x", "/mnt"]).unwrap().prefetch_updates, None);
        let c = cfg(&["-o", "ro,prefetch=updates", "http://h/x", "/mnt"]).unwrap();
        assert_eq!(c.prefetch_updates, Some(PathBuf::from("/")));
        let c = cfg(&["--prefetch-updates", "http://h/x", "/mnt"]).unwrap();
        assert_eq!(c.prefetch_updates, Some(PathBuf::from("/")));
        let c = cfg(&[
            "-o",
            "prefetch=updates,updates_root=/sandbox",
            "http://h/x",
            "/mnt",
        ])
        .unwrap();
        assert_eq!(c.prefetch_updates, Some(PathBuf::from("/sandbox")));
        // The long option wins over -o, as everywhere.
        let c = cfg(&[
            "--prefetch-updates",
            "--updates-root",
            "/a",
            "-o",
            "updates_root=/b",
            "http://h/x",
            "/mnt",
        ])
        .unwrap();
        assert_eq!(c.prefetch_updates, Some(PathBuf::from("/a")));
        // `none` is not an error, and merge-list prefetching keeps its own switch.
        let c = cfg(&["-o", "prefetch=none", "http://h/x", "/mnt"]).unwrap();
        assert_eq!(c.prefetch_updates, None);
        assert!(c.prefetch_merge_list && c.mtimedb.is_some());
        let c = cfg(&["-o", "prefetch=updates,prefetch=none", "http://h/x", "/mnt"]).unwrap();
        assert_eq!(c.prefetch_updates, None, "the last wins");
        // Without the merge-list prefetch, the merge list is still watched: a pass yields.
        let c = cfg(&["-o", "noprefetch,prefetch=updates", "http://h/x", "/mnt"]).unwrap();
        assert_eq!(
            (
                c.mtimedb,
                c.prefetch_merge_list,
                c.prefetch_updates.is_some()
            ),
            (Some(PathBuf::from(DEFAULT_MTIMEDB)), false, true)
        );
        let c = cfg(&[
            "--updates-root",
            "rel",
            "--prefetch-updates",
            "http://h/x",
            "/mnt",
        ])
        .unwrap();
        assert!(c.prefetch_updates.unwrap().is_absolute());
        for bad in [
            "prefetch=update",
            "prefetch=",
            "prefetch=updates+world",
            "prefetch",
        ] {
            let e = cfg(&["-o", bad, "http://h/x", "/mnt"]).unwrap_err();
            assert!(e.contains("prefetch"), "{bad}: {e}");
        }
    }

    #[test]
    fn an_updates_root_without_prefetch_updates_is_an_error() {
        for args in [
            &["-o", "updates_root=/b", "http://h/x", "/mnt"][..],
            &["-o", "updates_root=/b,prefetch=none", "http://h/x", "/mnt"],
            &["--updates-root", "/b", "http://h/x", "/mnt"],
            &[
                "--updates-root",
                "/b",
                "-o",
                "prefetch=updates,prefetch=none",
                "http://h/x",
                "/mnt",
            ],
        ] {
            let e = cfg(args).unwrap_err();
            assert!(e.contains("prefetch=updates"), "{args:?}: {e}");
        }
    }
}
