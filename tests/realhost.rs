//! A real binhost nobody here built (`../shared/real-binhosts/joepasss__gentoo-bin`, see its
//! SOURCES.md): 83 index entries, 8 of them not on the server (404). Served by real nginx as it
//! is (never edited), mounted, and scanned by real Portage with `-pkgdir-index-trusted`, which
//! walks the tree and reads every package's metadata. It must succeed as it does on a plain
//! local copy, where those 8 files are simply absent (issue 11.5), in both kernel modes.

mod support;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::{Mode, Mount, Nginx, crate_root, parse_packages, portage_venv, run_captured};
use tempfile::TempDir;

fn real_binhost() -> PathBuf {
    std::env::var_os("BINPKGFS_REAL_BINHOSTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate_root().join("../shared/real-binhosts"))
        .join("joepasss__gentoo-bin")
}

/// A Portage prefix for an amd64 binhost whose categories are the index's.
struct Sandbox {
    dir: TempDir,
}

impl Sandbox {
    fn new(pkgdir: &Path, index: &str) -> Sandbox {
        let dir = TempDir::with_prefix("binpkgfs-real.").unwrap();
        let s = dir.path();
        for sub in [
            "etc/portage",
            "share/portage",
            "var/db/pkg",
            "var/cache/edb",
            "var/tmp",
            "repo/profiles/default",
            "repo/metadata",
            "capture",
        ] {
            fs::create_dir_all(s.join(sub)).unwrap();
        }
        let mut categories: Vec<String> = parse_packages(index)
            .1
            .iter()
            .filter_map(|e| e["CPV"].split_once('/').map(|(c, _)| c.to_string()))
            .collect();
        categories.sort();
        categories.dedup();
        fs::write(
            s.join("repo/profiles/categories"),
            categories.join("\n") + "\n",
        )
        .unwrap();
        fs::write(s.join("repo/profiles/repo_name"), "realhost-test\n").unwrap();
        fs::write(s.join("repo/profiles/arch.list"), "amd64\n").unwrap();
        fs::write(s.join("repo/profiles/default/eapi"), "8\n").unwrap();
        fs::write(
            s.join("repo/profiles/default/make.defaults"),
            "ARCH=\"amd64\"\nACCEPT_KEYWORDS=\"amd64 ~amd64\"\nELIBC=\"glibc\"\nKERNEL=\"linux\"\n\
             USERLAND=\"GNU\"\nCHOST=\"x86_64-pc-linux-gnu\"\n",
        )
        .unwrap();
        fs::write(s.join("repo/metadata/layout.conf"), "masters =\n").unwrap();
        symlink(
            portage_venv().join("share/portage/config"),
            s.join("share/portage/config"),
        )
        .unwrap();
        symlink(
            s.join("repo/profiles/default"),
            s.join("etc/portage/make.profile"),
        )
        .unwrap();
        fs::write(s.join("var/cache/edb/counter"), "0").unwrap();
        fs::write(
            s.join("etc/portage/make.conf"),
            format!(
                "PKGDIR=\"{}\"\nPORTAGE_TMPDIR=\"{s}/var/tmp\"\nACCEPT_LICENSE=\"*\"\n\
                 PORTAGE_USERNAME=\"root\"\nPORTAGE_GRPNAME=\"root\"\nNOCOLOR=\"true\"\n\
                 FEATURES=\"-sandbox -usersandbox -userpriv -userfetch -ipc-sandbox \
                 -network-sandbox -pid-sandbox -mount-sandbox -news -binpkg-request-signature \
                 -pkgdir-index-trusted\"\n",
                pkgdir.display(),
                s = s.display()
            ),
        )
        .unwrap();
        Sandbox { dir }
    }

    /// `emerge -p --usepkgonly --nodeps ATOM`: the binary tree is scanned whole first.
    fn pretend(&self, atom: &str) -> (Output, Duration) {
        let venv = portage_venv();
        let s = self.dir.path();
        let mut cmd = Command::new(venv.join("bin/emerge"));
        cmd.args(["-p", "--usepkgonly", "--nodeps", atom])
            .env("PORTAGE_OVERRIDE_EPREFIX", s)
            .env(
                "PORTAGE_REPOSITORIES",
                format!(
                    "[DEFAULT]\nmain-repo = realhost-test\n[realhost-test]\nlocation = {}/repo\n",
                    s.display()
                ),
            )
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
            .env_remove("FEATURES")
            .current_dir(s);
        let started = Instant::now();
        let out = run_captured(&mut cmd, &s.join("capture"), Duration::from_secs(300))
            .expect("emerge -p did not finish within 300 s");
        (out, started.elapsed())
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn an_untrusted_scan_of_a_real_binhost_with_missing_files_succeeds_as_on_a_local_copy() {
    support::require_real_parts();
    let root = real_binhost();
    let index = fs::read_to_string(root.join("Packages"))
        .unwrap_or_else(|e| panic!("{}: {e}", root.join("Packages").display()));
    const ATOM: &str = "sys-process/tini";

    // The baseline: a plain local copy.
    let local = TempDir::new().unwrap();
    let status = Command::new("cp")
        .args(["-a", "--no-target-directory"])
        .arg(&root)
        .arg(local.path())
        .status()
        .unwrap();
    assert!(status.success(), "cp -a of the real binhost");
    let (out, local_time) = Sandbox::new(local.path(), &index).pretend(ATOM);
    assert!(out.status.success(), "on a local copy: {}", text(&out));

    let nginx = Nginx::start(&root);
    for mode in [Mode::Passthrough, Mode::NoPassthrough] {
        let cache = TempDir::new().unwrap();
        // A short TTL: the kernel keeps names for a quarter of it (until the names are
        // invalidated at a swap, issue 11.2, a hidden file can still be looked up that long).
        let args = ["--index-ttl", "4"];
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &args).unwrap();
        let sandbox = Sandbox::new(mount.path(), &index);
        let (first, first_time) = sandbox.pretend(ATOM);
        let log = || fs::read_to_string(cache.path().join("binpkgfs.log")).unwrap_or_default();
        // Portage's scan does not catch an unreadable file: the first scan through the mount
        // meets the first missing file (EIO at once, one 404) before anything can know. The
        // daemon then hides it and checks the other uncached files.
        if !first.status.success() {
            assert!(
                text(&first).contains("Errno 5") && first_time < Duration::from_secs(30),
                "{mode:?}: the first scan failed otherwise, or slowly ({first_time:?}): {}",
                text(&first)
            );
        }
        let served = || fs::read_to_string(mount.path().join("Packages")).unwrap_or_default();
        let hidden = support::wait_until(Duration::from_secs(30), || {
            served().starts_with("ACCEPT_KEYWORDS") && served().contains("PACKAGES: 75\n")
        });
        assert!(
            hidden,
            "{mode:?}: the 8 missing files were not all hidden:\n{}",
            log()
        );
        let (out, mount_time) = sandbox.pretend(ATOM);
        assert!(
            out.status.success(),
            "{mode:?}: through the mount: {}\ndaemon log:\n{}",
            text(&out),
            log()
        );
        eprintln!(
            "{mode:?}: untrusted scan: local copy {:.2} s; through the mount: first {:.2} s \
             (success: {}), then {:.2} s",
            local_time.as_secs_f64(),
            first_time.as_secs_f64(),
            first.status.success(),
            mount_time.as_secs_f64()
        );
        let (out, again) = sandbox.pretend(ATOM);
        assert!(out.status.success(), "{mode:?}: third scan: {}", text(&out));
        eprintln!("{mode:?}: third scan {:.2} s", again.as_secs_f64());
        let missing_gets = nginx.count_matching(|l| l.status == 404);
        assert!(
            missing_gets <= 8 * 2,
            "{mode:?}: {missing_gets} requests answered 404 (8 files are missing)"
        );
        nginx.clear_log();
    }
}
