//! Prefetching against real parts: a real `emerge` whose merge list the daemon watches, the
//! daemon's `-o prefetch=updates` after a release on the served binhost, and the
//! `binpkgfs prefetch` command reading through a real mount served by real nginx.

mod support;

use std::fs::{self, File};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use support::{
    EMERGE_TIMEOUT, IndexEntry, LogLine, PortageSandbox, Served, binpkgfs_bin, both_modes,
    entry_for, fixture_binhost, parse_packages, wait_until,
};
use tempfile::TempDir;

/// The merge order of `app-misc/binpkgfs-demo`, as CPVs.
const CHAIN: [&str; 3] = [
    "sys-apps/demo-base-1.0",
    "dev-libs/libdemo-2.1",
    "app-misc/binpkgfs-demo-0.3",
];

/// `binpkgfs prefetch --mount` of `served`'s mount with `args`.
fn run_prefetch(served: &Served, args: &[&str]) -> Output {
    Command::new(binpkgfs_bin())
        .arg("prefetch")
        .arg("--mount")
        .arg(served.mount.path())
        .args(args)
        .output()
        .expect("run binpkgfs prefetch")
}

fn fetched_once_whole(fetches: &[LogLine], entry: &IndexEntry) -> bool {
    let size: u64 = entry["SIZE"].parse().unwrap();
    matches!(fetches, [only] if only.method == "GET" && only.status == 200 && only.bytes_sent == size)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Makes emerge stop in the `setup` phase of the first package of the merge until the test
/// lets it go. By then emerge has read and verified that package and opened no other, so
/// whatever else nginx served came from the daemon's prefetch.
struct Pause {
    reached: PathBuf,
    release: PathBuf,
}

impl Pause {
    fn install(sandbox: &PortageSandbox, cpv: &str) -> Pause {
        let dir = sandbox.root().join("pause");
        fs::create_dir_all(&dir).unwrap();
        let (reached, release) = (dir.join("reached"), dir.join("release"));
        // A bounded wait: a test that dies early must not leave emerge hanging.
        let bashrc = format!(
            r#"if [[ ${{EBUILD_PHASE}} == setup && ${{CATEGORY}}/${{PF}} == {cpv} ]]; then
    : > "{reached}"
    for ((i = 0; i < 1200; i++)); do [[ -e "{release}" ]] && break; sleep 0.1; done
fi
"#,
            reached = reached.display(),
            release = release.display(),
        );
        fs::write(sandbox.root().join("etc/portage/bashrc"), bashrc).unwrap();
        Pause { reached, release }
    }

    fn release(&self) {
        let _ = fs::write(&self.release, "");
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        self.release();
    }
}

both_modes! {
    /// The daemon reads the merge list emerge writes to `EROOT/var/cache/edb/mtimedb` and fetches
    /// every package of the merge: while emerge is held in the first package's setup phase (that
    /// package read, no other opened), nginx has already served the rest. Each package still
    /// crosses the network exactly once, and the install is complete.
    fn merge_list_prefetch_fetches_the_merge_before_emerge_opens_it(mode) {
        // The sandbox must exist before the mount (the daemon watches its mtimedb) and name its
        // PKGDIR before the mount point exists: a symlink bridges the two.
        let scratch = TempDir::new().unwrap();
        let pkgdir = scratch.path().join("pkgdir");
        let sandbox = PortageSandbox::new(&pkgdir);
        // PORTAGE_OVERRIDE_EPREFIX=S and ROOT=/ make EROOT = S.
        let mtimedb = sandbox.root().join("var/cache/edb/mtimedb");
        let served = Served::new(mode, &["--mtimedb", mtimedb.to_str().unwrap()]);
        symlink(served.mount.path(), &pkgdir).unwrap();
        let pause = Pause::install(&sandbox, CHAIN[0]);
        served.nginx.clear_log();

        let chain: Vec<IndexEntry> = CHAIN.iter().map(|cpv| entry_for(cpv)).collect();
        let (all_fetched_during_pause, requests_during_pause) = std::thread::scope(|s| {
            let emerge =
                s.spawn(|| sandbox.emerge(&["--oneshot", "--usepkgonly", "app-misc/binpkgfs-demo"]));
            let reached = wait_until(EMERGE_TIMEOUT, || {
                pause.reached.exists() || emerge.is_finished()
            });
            assert!(
                reached && pause.reached.exists(),
                "emerge never reached the setup phase of {}; daemon log:\n{}",
                CHAIN[0],
                served.daemon_log()
            );
            let all = wait_until(Duration::from_secs(30), || {
                chain.iter().all(|e| !served.fetches_of(e).is_empty())
            });
            let requests = served.nginx.requests();
            pause.release();
            let output = emerge.join().expect("emerge thread");
            assert!(
                output.status.success(),
                "emerge failed: {}\n{}\ndaemon log:\n{}",
                text(&output.stdout),
                text(&output.stderr),
                served.daemon_log()
            );
            (all, requests)
        });
        assert!(
            mtimedb.is_file(),
            "emerge wrote no {}: the test watches the wrong path",
            mtimedb.display()
        );
        let log = served.daemon_log();
        assert!(
            all_fetched_during_pause,
            "while emerge sat in {}'s setup phase, not every package of the merge was fetched; \
             nginx logged {requests_during_pause:#?}\ndaemon log:\n{log}",
            CHAIN[0]
        );
        let bytes: u64 = chain
            .iter()
            .map(|e| e["SIZE"].parse::<u64>().unwrap())
            .sum();
        let batch = format!("prefetching the merge list listed=3 matched=3 fetching=3 bytes={bytes}");
        assert!(
            log.contains(&batch),
            "no `{batch}` line in the daemon log:\n{log}"
        );
        assert_eq!(
            log.matches("prefetching the merge list").count(),
            1,
            "one merge must be one batch, whatever emerge rewrites as it goes:\n{log}"
        );
        assert_eq!(
            sandbox.installed(),
            [
                "app-misc/binpkgfs-demo-0.3",
                "dev-libs/libdemo-2.1",
                "sys-apps/demo-base-1.0"
            ]
        );
        for entry in &chain {
            let fetches = served.fetches_of(entry);
            assert!(
                fetched_once_whole(&fetches, entry),
                "{} should cross the network exactly once, whole; nginx logged {fetches:#?}",
                entry["PATH"]
            );
        }
        served.settle(&[]);
        let others = served.nginx.count_matching(|l| {
            l.is_package() && !chain.iter().any(|e| l.uri == format!("/{}", e["PATH"]))
        });
        assert_eq!(others, 0, "a package outside the merge was fetched");
    }
}

/// Replaces `path` the way Portage does: a temporary file beside it, then `rename`.
fn replace_atomically(path: &Path, content: &str) {
    let tmp = path.with_file_name("mtimedb.tmp123");
    fs::write(&tmp, content).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// An `mtimedb` as Portage 3.0.83 writes it at the start of a merge of `cpvs`, with the
/// first `merged` packages already done. The entries are whole instance keys (BUILD_TIME
/// included), so the daemon holds them as it holds a real merge's.
fn mtimedb_for(eroot: &Path, cpvs: &[&str], merged: usize) -> String {
    let binpkgs: Vec<String> = cpvs
        .iter()
        .map(|cpv| {
            let e = entry_for(cpv);
            format!(
                r#"{{"BUILD_ID": {}, "BUILD_TIME": {}, "CPV": "{cpv}", "EROOT": "{}/", "MTIME": {}, "SIZE": {}}}"#,
                e["BUILD_ID"],
                e["BUILD_TIME"],
                eroot.display(),
                e["MTIME"],
                e["SIZE"]
            )
        })
        .collect();
    let mergelist: Vec<String> = cpvs[merged..]
        .iter()
        .map(|cpv| format!(r#"["binary", "{}/", "{cpv}", "merge"]"#, eroot.display()))
        .collect();
    format!(
        r#"{{"info": {{}}, "resume": {{"binpkgs": [{}], "favorites": [], "mergelist": [{}], "myopts": {{}}}}, "version": "3.0.83"}}"#,
        binpkgs.join(", "),
        mergelist.join(", ")
    )
}

both_modes! {
    /// The daemon follows an `mtimedb` whose directory appears only after the mount, skips a
    /// half-written file, fetches a merge list once however often emerge rewrites it as it goes;
    /// `-o noprefetch` (watching the very same file) fetches nothing.
    fn merge_list_in_a_later_directory_is_prefetched_once_and_noprefetch_disables_it(mode) {
        let eroot = TempDir::new().unwrap();
        let mtimedb = eroot.path().join("var/cache/edb/mtimedb");
        let on = Served::new(mode, &["--mtimedb", mtimedb.to_str().unwrap()]);
        let off = Served::new(mode, &["-o", &format!("mtimedb={},noprefetch", mtimedb.display())]);
        let chain: Vec<IndexEntry> = CHAIN.iter().map(|cpv| entry_for(cpv)).collect();

        fs::create_dir_all(mtimedb.parent().unwrap()).unwrap();
        replace_atomically(&mtimedb, r#"{"resume": {"binpkgs": [{"CPV": "#);
        replace_atomically(&mtimedb, &mtimedb_for(eroot.path(), &CHAIN, 0));
        on.settle(&chain.iter().collect::<Vec<_>>());
        // emerge rewrites the file after each package; the merge list shrinks, binpkgs stays.
        replace_atomically(&mtimedb, &mtimedb_for(eroot.path(), &CHAIN, 1));
        replace_atomically(&mtimedb, &mtimedb_for(eroot.path(), &CHAIN, 2));
        // Then another merge, of a package outside the chain: once the daemon has fetched it,
        // it has read the rewrites before it (the watcher takes the file's changes in order).
        let other = entry_for("app-misc/demo-data-1.0");
        replace_atomically(&mtimedb, &mtimedb_for(eroot.path(), &["app-misc/demo-data-1.0"], 0));
        on.settle(&[&other]);
        off.nginx.sync_log();

        let log = on.daemon_log();
        for entry in &chain {
            let fetches = on.fetches_of(entry);
            assert!(
                fetched_once_whole(&fetches, entry),
                "{} should be prefetched exactly once, whole; nginx logged {fetches:#?}\n{log}",
                entry["PATH"]
            );
        }
        assert_eq!(
            log.matches("prefetching the merge list").count(),
            2,
            "one merge, one batch (and one for the other merge):\n{log}"
        );
        assert!(fetched_once_whole(&on.fetches_of(&other), &other));
        assert_eq!(off.nginx.count_matching(LogLine::is_package), 0);
        assert!(!off.daemon_log().contains("prefetching the merge list"));
    }
}

both_modes! {
    /// `binpkgfs prefetch` by name, by CPV and by path fetches exactly those packages, once; a later
    /// read is served from the cache; an unknown atom is a clear error and fetches nothing.
    fn prefetch_command_fetches_named_packages_once_and_reads_then_hit_the_cache(mode) {
        let served = Served::new(mode, &["--no-prefetch"]);
        let libdemo = entry_for("dev-libs/libdemo-2.1");

        let out = run_prefetch(&served, &["dev-libs/libdemo"]);
        assert!(
            out.status.success(),
            "prefetch failed: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stdout).contains("prefetched 1 packages"),
            "summary line: {}",
            text(&out.stdout)
        );
        served.settle(&[&libdemo]);
        let fetches = served.fetches_of(&libdemo);
        assert!(
            fetched_once_whole(&fetches, &libdemo),
            "libdemo should be fetched once, whole: {fetches:#?}"
        );
        assert_eq!(
            served.nginx.count_matching(LogLine::is_package),
            1,
            "only libdemo was asked for: {:#?}",
            served.nginx.requests()
        );

        served.nginx.clear_log();
        let bytes = fs::read(served.mount.path().join(&libdemo["PATH"])).unwrap();
        assert_eq!(
            bytes,
            fs::read(fixture_binhost().join(&libdemo["PATH"])).unwrap()
        );
        served.settle(&[]);
        assert_eq!(
            served.nginx.requests(),
            [],
            "a read after prefetch must be a cache hit"
        );

        let out = run_prefetch(
            &served,
            &[
                "=sys-apps/demo-base-1.0",
                "app-misc/binpkgfs-demo/binpkgfs-demo-0.3-1.gpkg.tar",
                "dev-libs/libdemo-2.1",
            ],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains("prefetched 3 packages"));
        let others = ["sys-apps/demo-base-1.0", "app-misc/binpkgfs-demo-0.3"].map(entry_for);
        served.settle(&[&others[0], &others[1]]);
        for e in &others {
            let fetches = served.fetches_of(e);
            assert!(
                fetched_once_whole(&fetches, e),
                "{}: {fetches:#?}",
                e["CPV"]
            );
        }
        assert!(served.fetches_of(&libdemo).is_empty(), "libdemo was cached");

        served.nginx.clear_log();
        let out = run_prefetch(&served, &["dev-libs/libdemo", "dev-libs/no-such-thing"]);
        assert!(!out.status.success(), "an unknown atom must fail");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("`dev-libs/no-such-thing` matches no package in")
                && stderr.lines().count() == 1,
            "unclear error: {stderr:?}"
        );
        served.settle(&[]);
        assert_eq!(
            served.nginx.requests(),
            [],
            "a failed resolution fetches nothing"
        );
    }
}

both_modes! {
    /// `--world-updates` compares the index with an installed package database.
    fn prefetch_world_updates_fetches_newer_versions_and_builds(mode) {
        let served = Served::new(mode, &["--no-prefetch"]);
        let root = TempDir::new().unwrap();
        let vdb = |pf: &str, slot: &str, build_id: Option<&str>| {
            let dir = root.path().join("var/db/pkg").join(pf);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("SLOT"), format!("{slot}\n")).unwrap();
            if let Some(id) = build_id {
                fs::write(dir.join("BUILD_ID"), format!("{id}\n")).unwrap();
            }
        };
        vdb("dev-libs/libdemo-2.0", "0", None); // older version
        vdb("app-misc/binpkgfs-demo-0.3", "0", Some("0")); // older build
        vdb("sys-apps/demo-base-1.0", "0", Some("1")); // up to date
        vdb("app-misc/unrelated-1", "0", None); // not on the binhost

        let out = run_prefetch(
            &served,
            &["--world-updates", "--root", root.path().to_str().unwrap()],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains("prefetched 2 packages"),
            "{}",
            text(&out.stdout)
        );
        let updates = ["app-misc/binpkgfs-demo-0.3", "dev-libs/libdemo-2.1"].map(entry_for);
        served.settle(&[&updates[0], &updates[1]]);
        let mut fetched: Vec<String> = served
            .nginx
            .requests()
            .into_iter()
            .filter(LogLine::is_package)
            .map(|l| l.uri)
            .collect();
        fetched.sort();
        assert_eq!(
            fetched,
            [
                "/app-misc/binpkgfs-demo/binpkgfs-demo-0.3-1.gpkg.tar",
                "/dev-libs/libdemo/libdemo-2.1-1.gpkg.tar"
            ]
        );
    }
}

/// Writes `cat/pf` into `root`/var/db/pkg as Portage records an installed package, with the
/// two files the world-updates rule reads.
fn install_in_vdb(root: &Path, pf: &str, slot: &str, build_id: &str) {
    let dir = root.join("var/db/pkg").join(pf);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("SLOT"), format!("{slot}\n")).unwrap();
    fs::write(dir.join("BUILD_ID"), format!("{build_id}\n")).unwrap();
}

/// Publishes on `binhost` a new build of `cpv` beside the old one, as a binhost release
/// does: the file first (BUILD_ID 2 at its own PATH, same bytes), then a `Packages` with a
/// newer TIMESTAMP, renamed into place. Returns the new entry.
fn publish_new_build(binhost: &Path, cpv: &str) -> IndexEntry {
    let text = fs::read_to_string(binhost.join("Packages")).unwrap();
    let (header, entries) = text.split_once("\n\n").unwrap();
    let header: String = header
        .lines()
        .map(|l| match l.split_once(": ") {
            Some(("TIMESTAMP", t)) => format!("TIMESTAMP: {}\n", t.parse::<u64>().unwrap() + 10),
            Some(("PACKAGES", n)) => format!("PACKAGES: {}\n", n.parse::<u64>().unwrap() + 1),
            _ => format!("{l}\n"),
        })
        .collect();
    let old = entries
        .split("\n\n")
        .find(|b| b.lines().any(|l| l == format!("CPV: {cpv}")))
        .unwrap_or_else(|| panic!("{cpv} is not on the binhost"));
    let old_path = old.lines().find_map(|l| l.strip_prefix("PATH: ")).unwrap();
    let new_path = old_path.replace("-1.gpkg.tar", "-2.gpkg.tar");
    let new_block: String = old
        .lines()
        .map(|l| match l.split_once(": ") {
            Some(("BUILD_ID", _)) => "BUILD_ID: 2\n".to_string(),
            Some(("BUILD_TIME", t)) => format!("BUILD_TIME: {}\n", t.parse::<u64>().unwrap() + 10),
            Some(("PATH", _)) => format!("PATH: {new_path}\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    let (old_file, new_file) = (binhost.join(old_path), binhost.join(&new_path));
    fs::copy(&old_file, &new_file).unwrap();
    let mtime = fs::metadata(&old_file).unwrap().modified().unwrap();
    File::options()
        .write(true)
        .open(&new_file)
        .and_then(|f| f.set_modified(mtime))
        .unwrap();
    let published = format!("{header}\n{}\n\n{new_block}", entries.trim_end());
    let tmp = binhost.join("Packages.new");
    fs::write(&tmp, &published).unwrap();
    fs::rename(&tmp, binhost.join("Packages")).unwrap();
    parse_packages(&published)
        .1
        .into_iter()
        .find(|e| e["PATH"] == new_path)
        .unwrap()
}

/// `binpkgfs status --json` of the mount, parsed.
/// Waits (failing the test after a deadline) until the last updates pass is over for the
/// index whose TIMESTAMP is `timestamp` (any index if `None`), and returns that status.
fn updates_pass_done(served: &Served, timestamp: Option<u64>) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let done = wait_until(Duration::from_secs(60), || {
        last = served.mount.status_json();
        let pass = &last["updates_prefetch"]["last"];
        pass["state"] == "done"
            && timestamp.is_none_or(|t| pass["index_timestamp"] == t)
            && last["downloads_in_flight"] == 0
    });
    assert!(
        done,
        "no finished updates pass for TIMESTAMP {timestamp:?}: {last:#}\n{}",
        served.daemon_log()
    );
    last
}

/// The arguments of a mount that prefetches the updates of the packages installed in
/// `root`, and not the merge list (watched only to yield to a merge: `root`'s, which no test
/// here writes unless it says so), re-checking the index every `ttl` seconds.
fn updates_args(root: &Path, ttl: &str) -> Vec<String> {
    let mtimedb = root.join("var/cache/edb/mtimedb");
    let opt = format!("ro,prefetch=updates,updates_root={}", root.display());
    [
        "--no-prefetch",
        "--mtimedb",
        mtimedb.to_str().unwrap(),
        "--index-ttl",
        ttl,
        "-o",
        &opt,
    ]
    .map(String::from)
    .to_vec()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A mount that prefetches the updates of the packages installed in `root` (see
/// `updates_args`), re-checking the index every second.
fn mount_with_updates(mode: support::Mode, root: &Path) -> Served {
    Served::new(mode, &strs(&updates_args(root, "1")))
}

fn timestamp_of(binhost: &Path) -> u64 {
    let text = fs::read_to_string(binhost.join("Packages")).unwrap();
    parse_packages(&text).0["TIMESTAMP"].parse().unwrap()
}

both_modes! {
    /// `-o prefetch=updates`: a refresh that brings a newer build of an installed package
    /// fetches it into the cache at once, whole and once; reading it through the mount then
    /// asks nginx for nothing, and status says what the pass did.
    fn a_refresh_with_a_newer_build_of_an_installed_package_prefetches_it(mode) {
        let root = TempDir::new().unwrap();
        install_in_vdb(root.path(), "dev-libs/libdemo-2.1", "0", "1");
        install_in_vdb(root.path(), "sys-apps/demo-base-1.0", "0", "1");
        let served = mount_with_updates(mode, root.path());
        // A first mount fetched an index new to this cache: one pass, nothing newer.
        let s = updates_pass_done(&served, None);
        assert_eq!(s["updates_prefetch"]["last"]["trigger"], "mount", "{s:#}");
        assert_eq!(s["updates_prefetch"]["last"]["found"], 0, "{s:#}");

        let new = publish_new_build(served.binhost(), "dev-libs/libdemo-2.1");
        let s = updates_pass_done(&served, Some(timestamp_of(served.binhost())));
        let pass = &s["updates_prefetch"]["last"];
        let size: u64 = new["SIZE"].parse().unwrap();
        assert_eq!(pass["trigger"], "refresh", "{s:#}");
        assert_eq!(
            (&pass["found"], &pass["fetched"], &pass["failed"], &pass["bytes"]),
            (&1.into(), &1.into(), &0.into(), &size.into()),
            "{s:#}"
        );
        assert_eq!(s["updates_prefetch"]["queued"], serde_json::json!([]), "{s:#}");
        let committed = wait_until(Duration::from_secs(10), || {
            served.mount.status_json()["cache"]["entries"] == 1
        });
        assert!(committed, "the update is not in the cache: {:#}", served.mount.status_json());
        served.settle(&[&new]);
        let fetches = served.fetches_of(&new);
        assert!(fetched_once_whole(&fetches, &new), "{fetches:#?}");
        assert_eq!(served.nginx.count_matching(LogLine::is_package), 1, "only the update");
        let log = served.daemon_log();
        assert!(
            log.contains("prefetching 1 updates (0.0 MiB) after refresh"),
            "no info line for the pass:\n{log}"
        );

        served.nginx.clear_log();
        let bytes = fs::read(served.mount.path().join(&new["PATH"])).unwrap();
        assert_eq!(bytes, fs::read(served.binhost().join(&new["PATH"])).unwrap());
        served.settle(&[]);
        assert_eq!(
            served.nginx.count_matching(LogLine::is_package),
            0,
            "a read of a prefetched update must be a cache hit: {:#?}",
            served.nginx.requests()
        );
        let out = Command::new(binpkgfs_bin())
            .arg("status")
            .arg(served.mount.path())
            .output()
            .unwrap();
        let human = text(&out.stdout);
        assert!(
            human.contains("last after refresh") && human.contains("1 found, 1 fetched"),
            "{human}"
        );
    }
}

both_modes! {
    /// A refresh that brings no newer build of an installed package (here a new build of
    /// one that is not installed) runs a pass that finds nothing and fetches nothing.
    fn a_refresh_without_updates_of_installed_packages_fetches_nothing(mode) {
        let root = TempDir::new().unwrap();
        install_in_vdb(root.path(), "dev-libs/libdemo-2.1", "0", "1");
        let served = mount_with_updates(mode, root.path());
        updates_pass_done(&served, None);

        let new = publish_new_build(served.binhost(), "app-misc/demo-data-1.0");
        // The positive signal first: the pass for the new index has run to its end.
        let s = updates_pass_done(&served, Some(timestamp_of(served.binhost())));
        let pass = &s["updates_prefetch"]["last"];
        assert_eq!(
            (&pass["trigger"], &pass["installed"], &pass["found"], &pass["fetched"]),
            (&"refresh".into(), &1.into(), &0.into(), &0.into()),
            "{s:#}"
        );
        assert_eq!(s["updates_prefetch"]["passes"], 2, "{s:#}");
        let listed = fs::read_to_string(served.mount.path().join("Packages")).unwrap();
        assert!(listed.contains(&new["PATH"]), "the refresh is not served:\n{listed}");
        served.nginx.sync_log();
        assert_eq!(
            served.nginx.count_matching(LogLine::is_package),
            0,
            "nothing to prefetch, yet nginx served a package: {:#?}",
            served.nginx.requests()
        );
        assert!(!served.daemon_log().contains("updates ("), "{}", served.daemon_log());
    }
}

both_modes! {
    /// At mount, a pass runs only when the index loaded then is new to this cache: a remount
    /// on an unchanged binhost (a 304 against the saved index) starts nothing, a remount
    /// after a release that came while unmounted prefetches it.
    fn a_remount_prefetches_only_a_release_it_has_not_seen(mode) {
        let root = TempDir::new().unwrap();
        install_in_vdb(root.path(), "dev-libs/libdemo-2.1", "0", "1");
        let mut served = mount_with_updates(mode, root.path());
        updates_pass_done(&served, None);
        let remount = |served: &mut Served| {
            served.mount.unmount().unwrap();
            let args = updates_args(root.path(), "600");
            served.mount =
                support::Mount::new(mode, &served.nginx.url(), served.cache.path(), &strs(&args))
                    .unwrap_or_else(|e| panic!("remount: {e}"));
        };

        remount(&mut served);
        // The decision is logged as it is taken: the positive signal before the check.
        let decided = wait_until(Duration::from_secs(30), || {
            served.daemon_log().lines().any(|l| {
                l.contains("prefetching updates after index refreshes") && l.contains("at_mount=false")
            })
        });
        assert!(decided, "no decision logged:\n{}", served.daemon_log());
        let s = served.mount.status_json();
        assert_eq!(s["updates_prefetch"]["passes"], 0, "{s:#}");
        assert_eq!(s["index"]["last_check_result"], "not modified", "{s:#}");

        let new = publish_new_build(served.binhost(), "dev-libs/libdemo-2.1");
        served.nginx.clear_log();
        remount(&mut served);
        let s = updates_pass_done(&served, Some(timestamp_of(served.binhost())));
        let pass = &s["updates_prefetch"]["last"];
        assert_eq!((&pass["trigger"], &pass["fetched"]), (&"mount".into(), &1.into()), "{s:#}");
        served.settle(&[&new]);
        assert!(fetched_once_whole(&served.fetches_of(&new), &new));
    }
}

/// While emerge merges packages of the mount (its merge list in `mtimedb`), an updates pass
/// starts no transfer: the merge-list prefetch (if on) and emerge go first. Once the merge
/// list ends, the pass goes on and fetches the update.
fn an_updates_pass_waits_for_a_running_merge(mode: support::Mode, merge_list_prefetch: bool) {
    let root = TempDir::new().unwrap();
    install_in_vdb(root.path(), "dev-libs/libdemo-2.1", "0", "1");
    let mtimedb = root.path().join("var/cache/edb/mtimedb");
    fs::create_dir_all(mtimedb.parent().unwrap()).unwrap();
    let mut args = updates_args(root.path(), "1");
    if merge_list_prefetch {
        args.retain(|a| a != "--no-prefetch");
    }
    let served = Served::new(mode, &strs(&args));
    updates_pass_done(&served, None);
    let base = entry_for("sys-apps/demo-base-1.0");
    replace_atomically(
        &mtimedb,
        &mtimedb_for(root.path(), &["sys-apps/demo-base-1.0"], 0),
    );
    let held = wait_until(Duration::from_secs(30), || {
        served
            .daemon_log()
            .contains("merge in progress: its entries stay served")
    });
    assert!(
        held,
        "the merge list was not seen:\n{}",
        served.daemon_log()
    );
    if merge_list_prefetch {
        served.settle(&[&base]);
    }

    let new = publish_new_build(served.binhost(), "dev-libs/libdemo-2.1");
    let timestamp = timestamp_of(served.binhost());
    let mut s = serde_json::Value::Null;
    let paused = wait_until(Duration::from_secs(30), || {
        s = served.mount.status_json();
        let pass = &s["updates_prefetch"]["last"];
        pass["index_timestamp"] == timestamp && pass["state"] == "paused: a merge is running"
    });
    assert!(paused, "the pass did not pause for the merge: {s:#}");
    assert_eq!(
        s["updates_prefetch"]["queued"],
        serde_json::json!([new["PATH"]]),
        "{s:#}"
    );
    served.nginx.sync_log();
    assert!(
        served.fetches_of(&new).is_empty(),
        "fetched during the merge"
    );
    if !merge_list_prefetch {
        assert!(
            served.fetches_of(&base).is_empty(),
            "noprefetch, yet the merge list was fetched"
        );
    }

    // The merge ends: emerge drops `resume` from mtimedb.
    replace_atomically(&mtimedb, r#"{"info": {}, "version": "3.0.83"}"#);
    let s = updates_pass_done(&served, Some(timestamp));
    assert_eq!(s["updates_prefetch"]["last"]["fetched"], 1, "{s:#}");
    served.settle(&[&new]);
    assert!(fetched_once_whole(&served.fetches_of(&new), &new));
}

both_modes! {
    /// With the merge-list prefetch on.
    fn an_updates_pass_waits_for_a_running_merge_it_prefetches(mode) {
        an_updates_pass_waits_for_a_running_merge(mode, true);
    }
}

both_modes! {
    /// With `--no-prefetch`: the merge list is still watched, to yield to it.
    fn an_updates_pass_waits_for_a_running_merge_with_noprefetch(mode) {
        an_updates_pass_waits_for_a_running_merge(mode, false);
    }
}

both_modes! {
    /// A remount whose index comes back with new validators but the same bytes (a touched
    /// `Packages`, as a binhost without validators or a mirror failover gives) is no new
    /// index: no pass runs.
    fn a_remount_on_the_same_bytes_with_new_validators_starts_nothing(mode) {
        let root = TempDir::new().unwrap();
        install_in_vdb(root.path(), "dev-libs/libdemo-2.1", "0", "1");
        let mut served = mount_with_updates(mode, root.path());
        updates_pass_done(&served, None);
        served.mount.unmount().unwrap();
        // nginx's ETag and Last-Modified follow the file's mtime: both change, the bytes do not.
        let packages = served.binhost().join("Packages");
        let mtime = fs::metadata(&packages).unwrap().modified().unwrap();
        File::options()
            .write(true)
            .open(&packages)
            .and_then(|f| f.set_modified(mtime + Duration::from_secs(3600)))
            .unwrap();
        let args = updates_args(root.path(), "600");
        served.mount =
            support::Mount::new(mode, &served.nginx.url(), served.cache.path(), &strs(&args))
                .unwrap_or_else(|e| panic!("remount: {e}"));
        let decided = wait_until(Duration::from_secs(30), || {
            served.daemon_log().lines().any(|l| {
                l.contains("prefetching updates after index refreshes") && l.contains("at_mount=false")
            })
        });
        assert!(decided, "no pass-less decision logged:\n{}", served.daemon_log());
        let s = served.mount.status_json();
        assert_eq!(s["updates_prefetch"]["passes"], 0, "{s:#}");
        assert_eq!(s["index"]["last_check_result"], "not modified (same bytes)", "{s:#}");
    }
}
