//! Signed packages through the mount, with real GnuPG, real Portage and real nginx.
//!
//! At test time a throwaway signing key is made (no passphrase, a temporary GnuPG home) and
//! real Portage builds `sys-apps/demo-base` with `FEATURES=binpkg-signing`. nginx serves that
//! binhost, binpkgfs mounts it, and a sandbox installs from the mount with
//! `FEATURES=binpkg-request-signature`, which makes Portage require and check a signature on
//! a package from a local PKGDIR (the mount is one). binpkgfs checks no signature itself: it
//! serves the binhost's exact bytes, so the signatures Portage checks stay valid.
//!
//! - the key in Portage's verify keyring, ultimately trusted: the install succeeds;
//! - a keyring holding another key, or the signing key without owner trust: Portage refuses
//!   the package and installs nothing;
//! - an unsigned package (the committed fixture's): refused under `binpkg-request-signature`.
//!
//! The verify keyring is the one Portage would use on a driver, `BINPKG_GPG_VERIFY_GPG_HOME`,
//! and Portage keeps its default `GPG_VERIFY_USER_DROP=nobody`: as root it runs the verifying
//! gpg as `nobody`, so the keyring is made world-readable, as on a driver.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use support::{Mount, Nginx, PortageSandbox, Served, both_modes, run_ok};
use tempfile::TempDir;

const PKG: &str = "sys-apps/demo-base/demo-base-1.0-1.gpkg.tar";
const CPF: &str = "sys-apps/demo-base-1.0";

/// A GnuPG home with one new key (no passphrase), in its own temporary directory.
struct Key {
    home: TempDir,
    fingerprint: String,
}

impl Key {
    fn new(uid: &str) -> Key {
        let home = TempDir::with_prefix("binpkgfs-gpg.").unwrap();
        run_ok(
            gpg(home.path())
                .args(["--passphrase", "", "--quick-gen-key", uid])
                .args(["ed25519", "sign", "never"]),
        );
        let listing = run_ok(gpg(home.path()).args(["--with-colons", "--list-secret-keys"]));
        let fingerprint = String::from_utf8_lossy(&listing.stdout)
            .lines()
            .find_map(|line| line.strip_prefix("fpr:"))
            .and_then(|rest| rest.split(':').find(|field| !field.is_empty()))
            .expect("gpg lists the new key's fingerprint")
            .to_owned();
        Key { home, fingerprint }
    }

    /// The public half, ASCII-armored.
    fn public(&self) -> PublicKey {
        PublicKey {
            fingerprint: self.fingerprint.clone(),
            armored: run_ok(gpg(self.home.path()).args(["--armor", "--export", &self.fingerprint]))
                .stdout,
        }
    }
}

/// A public key as a binhost publishes it.
struct PublicKey {
    fingerprint: String,
    armored: Vec<u8>,
}

impl Drop for Key {
    fn drop(&mut self) {
        // Making and using the key started a gpg-agent for this home; stop it.
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(self.home.path())
            .args(["--kill", "gpg-agent"])
            .output();
    }
}

fn gpg(home: &Path) -> Command {
    let mut cmd = Command::new("gpg");
    cmd.arg("--homedir").arg(home).args(["--batch", "--no-tty"]);
    cmd
}

/// The signed binhost Portage built, and the public half of the key it was signed with, once
/// per test binary. The secret key (and its gpg-agent) is gone once the packages are built.
struct Signed {
    key: PublicKey,
    binhost: PathBuf,
}

fn signed() -> &'static Signed {
    static SIGNED: OnceLock<Signed> = OnceLock::new();
    SIGNED.get_or_init(|| {
        support::require_real_parts();
        let key = Key::new("binpkgfs test signer <signer@binpkgfs.invalid>");
        // A static is never dropped, so the binhost lives at a fixed place in Cargo's scratch
        // directory, replaced by each run, rather than in a temporary directory left behind.
        let binhost = Path::new(env!("CARGO_TARGET_TMPDIR")).join("signed-binhost");
        let _ = fs::remove_dir_all(&binhost);
        // A builder prefix of our own: the default one is shared with other test binaries.
        let builder = TempDir::with_prefix("binpkgfs-sign-builder.").unwrap();
        let prefix = builder.path().join("prefix");
        run_ok(
            Command::new("bash")
                .arg(support::crate_root().join("tests/fixtures/make-binhost.sh"))
                .arg(&binhost)
                .arg("sys-apps/demo-base")
                .env("BINPKGFS_BUILDER_PREFIX", &prefix)
                .env("BINPKGFS_SIGNING_GPG_HOME", key.home.path())
                .env("BINPKGFS_SIGNING_KEY", &key.fingerprint),
        );
        // The package really is signed: detached signatures of both tarballs, and a
        // clear-signed Manifest.
        let pkg = binhost.join(PKG);
        let members = String::from_utf8(run_ok(Command::new("tar").arg("tf").arg(&pkg)).stdout)
            .expect("tar lists UTF-8 names");
        for member in ["metadata.tar.zst.sig", "image.tar.zst.sig"] {
            assert!(
                members
                    .lines()
                    .any(|line| line.ends_with(&format!("/{member}"))),
                "{PKG} has no {member}; its members:\n{members}"
            );
        }
        let manifest = run_ok(
            Command::new("tar")
                .args(["--wildcards", "-xOf"])
                .arg(&pkg)
                .arg("*/Manifest"),
        )
        .stdout;
        assert!(
            manifest.starts_with(b"-----BEGIN PGP SIGNED MESSAGE-----"),
            "{PKG}'s Manifest is not clear-signed"
        );
        Signed {
            key: key.public(),
            binhost,
        }
    })
}

/// How the verify keyring trusts the keys it holds.
#[derive(Clone, Copy)]
enum Trust {
    /// Owner trust set to ultimate and the trustdb checked, as a driver must do.
    Ultimate,
    /// Imported only: gpg reports the signature good but of undefined trust.
    None,
}

/// A verify keyring (`BINPKG_GPG_VERIFY_GPG_HOME`) holding `keys`, readable by `nobody`.
fn keyring(keys: &[&PublicKey], trust: Trust) -> TempDir {
    let dir = TempDir::with_prefix("binpkgfs-verify.").unwrap();
    let home = dir.path();
    for key in keys {
        let public = home.join(format!("{}.asc", key.fingerprint));
        fs::write(&public, &key.armored).unwrap();
        run_ok(gpg(home).arg("--import").arg(&public));
        fs::remove_file(&public).unwrap();
        if let Trust::Ultimate = trust {
            let ownertrust = home.join("ownertrust.txt");
            fs::write(&ownertrust, format!("{}:6:\n", key.fingerprint)).unwrap();
            run_ok(gpg(home).arg("--import-ownertrust").arg(&ownertrust));
            fs::remove_file(&ownertrust).unwrap();
        }
    }
    run_ok(gpg(home).arg("--check-trustdb"));
    // Portage runs the verifying gpg as GPG_VERIFY_USER_DROP (nobody): let it read.
    make_world_readable(home);
    dir
}

fn make_world_readable(path: &Path) {
    let meta = fs::symlink_metadata(path).unwrap();
    if meta.file_type().is_symlink() {
        return;
    }
    let mode = if meta.is_dir() { 0o755 } else { 0o644 };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    if meta.is_dir() {
        for entry in fs::read_dir(path).unwrap() {
            make_world_readable(&entry.unwrap().path());
        }
    }
}

/// A sandbox installing from `pkgdir` that requires signatures and checks them with `keyring`.
fn requiring_sandbox(pkgdir: &Path, keyring: &Path) -> PortageSandbox {
    let mut sandbox = PortageSandbox::new(pkgdir);
    sandbox.add_feature("binpkg-request-signature");
    let make_conf = sandbox.root().join("etc/portage/make.conf");
    let mut conf = fs::read_to_string(&make_conf).unwrap();
    conf.push_str(&format!(
        "BINPKG_GPG_VERIFY_GPG_HOME=\"{}\"\n",
        keyring.display()
    ));
    fs::write(&make_conf, conf).unwrap();
    sandbox
}

fn install(sandbox: &PortageSandbox) -> Output {
    sandbox.emerge(&["--oneshot", "--usepkgonly", "sys-apps/demo-base"])
}

fn text(output: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// emerge failed, said why in GnuPG's terms (`expect`, from Portage's summary), and installed
/// nothing.
fn assert_refused(sandbox: &PortageSandbox, output: &Output, expect: &str) {
    let all = text(output);
    assert!(
        !output.status.success(),
        "emerge installed a package it should refuse: {all}"
    );
    assert!(
        all.contains(expect),
        "emerge failed, but its output does not say {expect:?}: {all}"
    );
    assert!(
        sandbox.installed().is_empty(),
        "a refused package was installed: {:?}",
        sandbox.installed()
    );
    assert!(
        !sandbox.root().join("usr/share/demo-base").exists(),
        "files of the refused package landed in the sandbox"
    );
}

/// nginx serving the signed binhost, mounted by binpkgfs.
struct SignedMount {
    mount: Mount,
    _nginx: Nginx,
    _cache: TempDir,
}

fn mount_signed(mode: support::Mode) -> SignedMount {
    let signed = signed();
    let nginx = Nginx::start(&signed.binhost);
    let cache = TempDir::new().unwrap();
    let mount = Mount::new(mode, &nginx.url(), cache.path(), &[])
        .unwrap_or_else(|err| panic!("binpkgfs mount {} failed: {err}", nginx.url()));
    SignedMount {
        mount,
        _nginx: nginx,
        _cache: cache,
    }
}

fn mounted_pkg(mount: &Mount) -> PathBuf {
    mount.path().join(PKG)
}

both_modes! {
    /// The signing key in Portage's verify keyring, ultimately trusted: the signed package
    /// installs from the mount under `binpkg-request-signature`, and the mount served the
    /// binhost's bytes unchanged.
    fn a_signed_package_installs_with_its_key_trusted(mode) {
        let signed = signed();
        let served = mount_signed(mode);
        let keys = keyring(&[&signed.key], Trust::Ultimate);
        let sandbox = requiring_sandbox(served.mount.path(), keys.path());
        let output = install(&sandbox);
        assert!(output.status.success(), "emerge refused a validly signed package: {}", text(&output));
        assert_eq!(sandbox.installed(), [CPF]);
        assert!(
            fs::read(mounted_pkg(&served.mount)).unwrap()
                == fs::read(signed.binhost.join(PKG)).unwrap(),
            "the mount's {PKG} differs from the binhost's"
        );
    }
}

both_modes! {
    /// Same mount, keyrings Portage must not accept: one holding only another (trusted) key,
    /// and one holding the signing key without owner trust. Both refuse; nothing installs.
    fn a_signed_package_is_refused_without_a_trusted_key(mode) {
        let signed = signed();
        let served = mount_signed(mode);

        let other = Key::new("binpkgfs test stranger <stranger@binpkgfs.invalid>");
        let keys = keyring(&[&other.public()], Trust::Ultimate);
        let sandbox = requiring_sandbox(served.mount.path(), keys.path());
        let output = install(&sandbox);
        assert_refused(&sandbox, &output, "signed with at least one unknown key");

        let keys = keyring(&[&signed.key], Trust::None);
        let sandbox = requiring_sandbox(served.mount.path(), keys.path());
        let output = install(&sandbox);
        assert_refused(&sandbox, &output, "signed with a known key of undefined trust");
    }
}

both_modes! {
    /// An unsigned package (the committed fixture's) through the mount, with
    /// `binpkg-request-signature` and a trusted keyring: refused.
    fn an_unsigned_package_is_refused_when_signatures_are_required(mode) {
        let signed = signed();
        let served = Served::new(mode, &[]);
        let keys = keyring(&[&signed.key], Trust::Ultimate);
        let sandbox = requiring_sandbox(served.mount.path(), keys.path());
        let output = install(&sandbox);
        assert_refused(&sandbox, &output, "binpkg appears unsigned (missing any signature)");
    }
}
