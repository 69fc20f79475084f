//! A binhost release while emerge works through the mount (issue 11.3): real nginx, real FUSE,
//! real `emerge --usepkgonly`. emerge re-reads `Packages` for every package it merges and looks
//! its entry up by instance key, and opens each package by its PATH: whatever the binhost
//! publishes meanwhile, the merge must finish with exactly the builds it resolved, and the
//! release must show once it is done. Every test runs in both kernel modes (passthrough and
//! `--no-passthrough`).

mod support;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use support::{
    EMERGE_TIMEOUT, Mode, Mount, Nginx, PortageSandbox, copy_fixture_binhost, parse_packages,
    wait_until,
};
use tempfile::TempDir;

/// The merge order of `app-misc/binpkgfs-demo`.
const CHAIN: [&str; 3] = [
    "sys-apps/demo-base-1.0",
    "dev-libs/libdemo-2.1",
    "app-misc/binpkgfs-demo-0.3",
];

/// The index re-check interval the tests mount with.
const TTL: Duration = Duration::from_secs(2);

const MODES: [Mode; 2] = [Mode::Passthrough, Mode::NoPassthrough];

/// A copy of the fixture binhost behind nginx, a Portage sandbox whose PKGDIR is the mount,
/// and the daemon watching that sandbox's merge list.
struct Setup {
    // Drop order: unmount before nginx stops.
    mount: Mount,
    nginx: Nginx,
    binhost: TempDir,
    cache: TempDir,
    sandbox: PortageSandbox,
    _scratch: TempDir,
}

impl Setup {
    fn new(mode: Mode, extra: &[&str]) -> Setup {
        support::require_real_parts();
        let binhost = TempDir::new().unwrap();
        copy_fixture_binhost(binhost.path());
        let nginx = Nginx::start(binhost.path());
        let scratch = TempDir::new().unwrap();
        let pkgdir = scratch.path().join("pkgdir");
        let sandbox = PortageSandbox::new(&pkgdir);
        let mtimedb = sandbox.root().join("var/cache/edb/mtimedb");
        let cache = TempDir::new().unwrap();
        let ttl = TTL.as_secs().to_string();
        let mut args = vec!["--mtimedb", mtimedb.to_str().unwrap(), "--index-ttl", &ttl];
        args.extend_from_slice(extra);
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &args)
            .unwrap_or_else(|e| panic!("mount {}: {e}", nginx.url()));
        symlink(mount.path(), &pkgdir).unwrap();
        Setup {
            mount,
            nginx,
            binhost,
            cache,
            sandbox,
            _scratch: scratch,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.cache.path().join("binpkgfs.log")).unwrap_or_default()
    }

    /// The `Packages` the mount serves now.
    fn served(&self) -> String {
        fs::read_to_string(self.mount.path().join("Packages")).unwrap_or_default()
    }

    /// The BUILD_IDs the served `Packages` lists for `cpv`, sorted.
    fn served_builds(&self, cpv: &str) -> Vec<String> {
        let mut ids: Vec<String> = parse_packages(&self.served())
            .1
            .into_iter()
            .filter(|e| e["CPV"] == cpv)
            .map(|e| e.get("BUILD_ID").cloned().unwrap_or_default())
            .collect();
        ids.sort();
        ids
    }

    /// Package files of the release (BUILD_ID 2) nginx has served.
    fn release_fetches(&self) -> Vec<String> {
        self.nginx
            .requests()
            .into_iter()
            .filter(|l| l.uri.ends_with("-2.gpkg.tar"))
            .map(|l| l.uri)
            .collect()
    }

    fn wait_for_log(&self, what: &str) -> bool {
        wait_until(Duration::from_secs(30), || self.log().contains(what))
    }
}

/// How the binhost publishes a release.
#[derive(Clone, Copy, PartialEq)]
enum Release {
    /// Every package rebuilt under BUILD_ID 2 at a new PATH; old files stay on the server.
    NewBuilds,
    /// Every package rebuilt at its old PATH (new bytes, size and BUILD_TIME): the PATH
    /// collision of a flat layout.
    SamePath,
    /// As `NewBuilds`, and the old files are deleted from the server (`eclean-pkg`).
    NewBuildsOldDeleted,
}

/// Publishes a release on the binhost the way a build swarm flips staging to production:
/// package files first, then the new `Packages` with a newer TIMESTAMP, renamed into place.
fn publish(binhost: &Path, how: Release) {
    let text = fs::read_to_string(binhost.join("Packages")).unwrap();
    let mut blocks = text.split("\n\n").filter(|b| !b.trim().is_empty());
    let header = blocks.next().unwrap();
    let mut out = String::new();
    for line in header.lines() {
        match line.strip_prefix("TIMESTAMP: ") {
            Some(t) => out += &format!("TIMESTAMP: {}\n", t.parse::<u64>().unwrap() + 10),
            None => out += &format!("{line}\n"),
        }
    }
    for block in blocks {
        let path = block
            .lines()
            .find_map(|l| l.strip_prefix("PATH: "))
            .unwrap()
            .to_string();
        let old = fs::read(binhost.join(&path)).unwrap();
        let (new_path, bytes) = match how {
            Release::NewBuilds | Release::NewBuildsOldDeleted => {
                (path.replace("-1.gpkg.tar", "-2.gpkg.tar"), old.clone())
            }
            // Another file at the same PATH: nobody may install it in place of the old one.
            Release::SamePath => (path.clone(), [&old[..], &[0u8; 512][..]].concat()),
        };
        fs::write(binhost.join(&new_path), &bytes).unwrap();
        let mtime = fs::metadata(binhost.join(&new_path))
            .unwrap()
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        out += "\n";
        for line in block.lines() {
            let (key, value) = line.split_once(": ").unwrap();
            let value = match key {
                "BUILD_ID" if how != Release::SamePath => "2".to_string(),
                "BUILD_TIME" => (value.parse::<u64>().unwrap() + 10).to_string(),
                "PATH" => new_path.clone(),
                "SIZE" => bytes.len().to_string(),
                "MTIME" => mtime.to_string(),
                "MD5" => support::digest_hex("md5sum", &bytes),
                "SHA1" => support::digest_hex("sha1sum", &bytes),
                _ => value.to_string(),
            };
            out += &format!("{key}: {value}\n");
        }
        if how == Release::NewBuildsOldDeleted {
            fs::remove_file(binhost.join(&path)).unwrap();
        }
    }
    let tmp = binhost.join("Packages.new");
    fs::write(&tmp, out).unwrap();
    fs::rename(&tmp, binhost.join("Packages")).unwrap();
}

/// Holds emerge in the `setup` phase of `cpv` until released (as in tests/prefetch.rs).
struct Pause {
    reached: PathBuf,
    release: PathBuf,
}

impl Pause {
    fn install(sandbox: &PortageSandbox, cpv: &str) -> Pause {
        let dir = sandbox.root().join("pause");
        fs::create_dir_all(&dir).unwrap();
        let (reached, release) = (dir.join("reached"), dir.join("release"));
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

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs the install of `app-misc/binpkgfs-demo`, calling `during` while emerge sits in the
/// setup phase of the first package (the merge list is out, that package is read).
fn merge_with(s: &Setup, during: impl FnOnce()) -> Output {
    let pause = Pause::install(&s.sandbox, CHAIN[0]);
    std::thread::scope(|scope| {
        let emerge = scope.spawn(|| {
            s.sandbox
                .emerge(&["--oneshot", "--usepkgonly", "app-misc/binpkgfs-demo"])
        });
        let reached = wait_until(EMERGE_TIMEOUT, || {
            pause.reached.exists() || emerge.is_finished()
        });
        assert!(
            reached && pause.reached.exists(),
            "emerge never reached {}'s setup phase; daemon log:\n{}",
            CHAIN[0],
            s.log()
        );
        during();
        pause.release();
        emerge.join().expect("emerge thread")
    })
}

/// (a) and (d): every package rebuilt under BUILD_ID 2 while the merge runs, old files still
/// on the server. emerge finishes with the builds it resolved (it died with `File not found`
/// before); the new release is served beside them meanwhile, and alone within one TTL after.
#[test]
fn a_release_during_the_merge_lets_it_finish_and_shows_after_it() {
    for mode in MODES {
        let s = Setup::new(mode, &[]);
        let output = merge_with(&s, || {
            publish(s.binhost.path(), Release::NewBuilds);
            let seen = wait_until(Duration::from_secs(30), || {
                s.served_builds(CHAIN[1]) == ["1", "2"]
            });
            assert!(
                seen,
                "{mode:?}: the release was not served beside the merge's builds: {:?}\n{}",
                s.served_builds(CHAIN[1]),
                s.log()
            );
        });
        assert!(
            output.status.success(),
            "{mode:?}: emerge failed across a release: {}\ndaemon log:\n{}",
            text(&output),
            s.log()
        );
        assert_eq!(s.sandbox.installed(), {
            let mut c = CHAIN.map(String::from).to_vec();
            c.sort();
            c
        });
        // The release's files are copies of the old ones: what shows which build was
        // installed is which files were read.
        assert_eq!(
            s.release_fetches(),
            Vec::<String>::new(),
            "{mode:?}: the merge read files of a build it did not resolve"
        );
        // (d) The merge is over: within one TTL (and the watcher's latency), only the release.
        let ended = Instant::now();
        let alone = wait_until(TTL + Duration::from_secs(3), || {
            CHAIN.iter().all(|cpv| s.served_builds(cpv) == ["2"])
        });
        assert!(
            alone,
            "{mode:?}: {:?} after the merge ended, Packages still lists {:?}",
            ended.elapsed(),
            s.served_builds(CHAIN[0])
        );
    }
}

/// (c) A same-PATH rebuild during the merge: the old and the new entry claim one PATH. The
/// merge installs the build it resolved (its bytes were prefetched when the merge list came
/// out); the rebuild takes the PATH once the merge is over.
#[test]
fn a_same_path_rebuild_during_the_merge_installs_the_resolved_build() {
    for mode in MODES {
        let s = Setup::new(mode, &[]);
        let old_sizes: Vec<String> = CHAIN.iter().map(|c| size_of(&s.served(), c)).collect();
        let output = merge_with(&s, || {
            // The merge list's packages are in the cache before the binhost replaces them.
            assert!(
                s.wait_for_log("prefetch batch done") || s.log().contains("downloaded"),
                "{mode:?}: no prefetch\n{}",
                s.log()
            );
            wait_until(Duration::from_secs(30), || {
                s.log().matches("downloaded").count() >= CHAIN.len()
            });
            publish(s.binhost.path(), Release::SamePath);
            // The refresh has happened (its log line), and the PATH still serves the old entry.
            let refreshed = wait_until(Duration::from_secs(30), || {
                s.log().contains("index refreshed")
            });
            assert!(refreshed, "{mode:?}: no refresh\n{}", s.log());
            assert_eq!(size_of(&s.served(), CHAIN[1]), old_sizes[1], "{mode:?}");
        });
        assert!(
            output.status.success(),
            "{mode:?}: emerge failed across a same-PATH rebuild: {}\ndaemon log:\n{}",
            text(&output),
            s.log()
        );
        let rebuilt = wait_until(TTL + Duration::from_secs(3), || {
            CHAIN
                .iter()
                .zip(&old_sizes)
                .all(|(c, old)| size_of(&s.served(), c) != *old)
        });
        assert!(rebuilt, "{mode:?}: the rebuild never took its PATH");
        assert_eq!(s.sandbox.installed().len(), CHAIN.len(), "{mode:?}");
    }
}

/// (e) A release that also deletes the old files mid-merge: what is cached installs; what is
/// not fails with `EIO` and a log line naming the file, never with other bytes. The cache is
/// sized so that the merge-list prefetch (half the cache) takes only the first package.
#[test]
fn old_files_deleted_mid_merge_fail_cleanly_and_cached_ones_install() {
    for mode in MODES {
        let s = Setup::new(mode, &["--cache-size", "60K"]);
        let output = merge_with(&s, || {
            publish(s.binhost.path(), Release::NewBuildsOldDeleted);
            let refreshed = wait_until(Duration::from_secs(30), || {
                s.served_builds(CHAIN[1]) == ["1", "2"]
            });
            assert!(refreshed, "{mode:?}: no refresh\n{}", s.log());
        });
        assert!(
            !output.status.success(),
            "{mode:?}: emerge installed packages whose files are gone: {}",
            text(&output)
        );
        assert!(
            s.sandbox.installed().contains(&CHAIN[0].to_string()),
            "{mode:?}: the cached first package did not install: {}\n{}",
            text(&output),
            s.log()
        );
        let log = s.log();
        let libdemo = "dev-libs/libdemo/libdemo-2.1-1.gpkg.tar";
        assert!(
            log.lines()
                .any(|l| l.contains("download failed") && l.contains(libdemo) && l.contains("404")),
            "{mode:?}: no log line names {libdemo}:\n{log}"
        );
    }
}

fn size_of(packages: &str, cpv: &str) -> String {
    parse_packages(packages)
        .1
        .into_iter()
        .find(|e| e["CPV"] == cpv)
        .map(|e| e["SIZE"].clone())
        .unwrap_or_default()
}

/// (b) A release during dependency calculation: emerge has read `Packages` and resolved, the
/// binhost publishes, the new index is swapped in, and only then does emerge write its merge
/// list (naming builds the current index no longer has) and merge. The window is held open
/// with `emerge --ask` (on a pty, as it insists), answered once the release is served.
#[test]
fn a_release_between_resolving_and_merging_lets_the_merge_finish() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    for mode in MODES {
        let s = Setup::new(mode, &[]);
        let venv = support::portage_venv();
        let root = s.sandbox.root();
        let transcript = root.join("capture/ask.out");
        let emerge = format!(
            "{} --ask --oneshot --usepkgonly app-misc/binpkgfs-demo",
            venv.join("bin/emerge").display()
        );
        let mut child = Command::new("script")
            .args(["-qefc", &emerge])
            .arg(&transcript)
            .env("PORTAGE_OVERRIDE_EPREFIX", root)
            .env(
                "PORTAGE_REPOSITORIES",
                format!(
                    "[DEFAULT]\nmain-repo = binpkgfs-test\n[binpkgfs-test]\nlocation = {}\n",
                    support::fixture_repo().display()
                ),
            )
            .env("FEATURES", "")
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    venv.join("bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env_remove("ROOT")
            .env_remove("PORTAGE_CONFIGROOT")
            .env_remove("PKGDIR")
            .env_remove("PORTAGE_BINHOST")
            .env_remove("EMERGE_DEFAULT_OPTS")
            .current_dir(root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run emerge --ask under script(1)");
        let said = || fs::read_to_string(&transcript).unwrap_or_default();
        let asked = wait_until(EMERGE_TIMEOUT, || {
            said().contains("Would you like to merge")
        });
        if !asked {
            let _ = child.kill();
            panic!("{mode:?}: emerge --ask never asked:\n{}", said());
        }
        publish(s.binhost.path(), Release::NewBuilds);
        let swapped = wait_until(Duration::from_secs(30), || {
            s.served_builds(CHAIN[1]) == ["2"]
        });
        assert!(swapped, "{mode:?}: the release was not served\n{}", s.log());
        child.stdin.as_mut().unwrap().write_all(b"Yes\n").unwrap();
        let mut status = None;
        wait_until(EMERGE_TIMEOUT, || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        let Some(status) = status else {
            let _ = child.kill();
            panic!("{mode:?}: emerge did not finish:\n{}", said());
        };
        assert!(
            status.success(),
            "{mode:?}: emerge failed after a release while it resolved:\n{}\ndaemon log:\n{}",
            said(),
            s.log()
        );
        assert_eq!(s.sandbox.installed().len(), CHAIN.len(), "{mode:?}");
        assert!(
            s.log().contains("its entries stay served until it ends"),
            "{mode:?}: the merge's entries were not held:\n{}",
            s.log()
        );
        assert_eq!(
            s.release_fetches(),
            Vec::<String>::new(),
            "{mode:?}: the merge read files of a build it did not resolve"
        );
        let alone = wait_until(TTL + Duration::from_secs(3), || {
            CHAIN.iter().all(|cpv| s.served_builds(cpv) == ["2"])
        });
        assert!(alone, "{mode:?}: the held builds outlived the merge");
    }
}
