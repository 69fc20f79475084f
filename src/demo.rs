//! `binpkgfs demo`: the main job on a built-in binhost, with no server and no configuration.
//!
//! It mounts the small real binhost shipped in the source tree (`tests/fixtures/binhost`, built
//! by Portage) through `file://` at a private temporary directory (mkdtemp), in a temporary cache, exactly as
//! `binpkgfs mount` would; lists the tree with the index's sizes and mtimes; reads every package
//! through the mount, as Portage does: the gpkg's tar members (with the `tar` crate) and the
//! package's metadata (decompressed with `zstd`); prints `status`; and unmounts. Nothing is left
//! behind.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The binhost shipped in the source tree.
fn builtin_binhost() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/binhost")
}

pub fn run() -> Result<(), String> {
    let binhost = builtin_binhost();
    if !binhost.join("Packages").is_file() {
        return Err(format!(
            "the built-in binhost {} is not there (the demo runs from a source checkout)",
            binhost.display()
        ));
    }
    // A private directory (mkdtemp, 0700): a predictable name in /tmp would let another user
    // plant a symlinked `cache/partial` there, which the daemon (root) would follow.
    let scratch = tempfile::Builder::new()
        .prefix("binpkgfs-demo.")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?
        .keep();
    let (mnt, cache) = (scratch.join("mnt"), scratch.join("cache"));
    fs::create_dir_all(&mnt)
        .and_then(|()| fs::create_dir_all(&cache))
        .map_err(|e| format!("{}: {e}", scratch.display()))?;
    let url = format!("file://{}", binhost.display());
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    println!(
        "$ binpkgfs mount --cache-dir {} {url} {}",
        cache.display(),
        mnt.display()
    );
    let status = Command::new(&exe)
        .arg("mount")
        .arg("--cache-dir")
        .arg(&cache)
        .arg(&url)
        .arg(&mnt)
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        let _ = fs::remove_dir_all(&scratch);
        return Err("mount failed (the demo needs root and /dev/fuse)".into());
    }
    let shown = show(&mnt, &exe);
    let unmounted = Command::new("umount").arg(&mnt).status();
    println!("$ umount {}", mnt.display());
    // Wait for the daemon to let go of the cache before removing it.
    for _ in 0..50 {
        if !crate::daemon::is_mounted(&mnt) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if unmounted.is_ok_and(|s| s.success()) {
        let _ = fs::remove_dir_all(&scratch);
    }
    shown
}

fn show(mnt: &Path, exe: &Path) -> Result<(), String> {
    println!("\nThe tree, straight from the index (no package fetched yet):");
    let mut files = Vec::new();
    walk(mnt, &mut files).map_err(|e| format!("walking the mount: {e}"))?;
    files.sort();
    for f in &files {
        let m = fs::metadata(f).map_err(|e| e.to_string())?;
        println!(
            "  {:>9} B  mtime {}  {}",
            m.len(),
            m.mtime(),
            f.strip_prefix(mnt).unwrap_or(f).display()
        );
    }
    println!("\nEach package read through the mount (fetched once, verified, cached):");
    for f in files
        .iter()
        .filter(|f| f.to_string_lossy().ends_with(".gpkg.tar"))
    {
        let (members, pf) = inspect(f).map_err(|e| format!("{}: {e}", f.display()))?;
        println!("  {pf:<24} {}", members.join(", "));
    }
    println!("\n$ binpkgfs status {}", mnt.display());
    let _ = Command::new(exe).arg("status").arg(mnt).status();
    Ok(())
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            walk(&entry.path(), out)?;
        } else {
            out.push(entry.path());
        }
    }
    Ok(())
}

/// The gpkg's member names and the package's `PF` from its metadata.
fn inspect(gpkg: &Path) -> Result<(Vec<String>, String), String> {
    let mut archive = tar::Archive::new(File::open(gpkg).map_err(|e| e.to_string())?);
    let mut members = Vec::new();
    let mut pf = String::from("?");
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let name = entry
            .path()
            .map_err(|e| e.to_string())?
            .to_string_lossy()
            .into_owned();
        let base = name.rsplit('/').next().unwrap_or(&name).to_string();
        if base == "metadata.tar.zst" {
            let decoder = zstd::Decoder::new(&mut entry).map_err(|e| e.to_string())?;
            for m in tar::Archive::new(decoder)
                .entries()
                .map_err(|e| e.to_string())?
            {
                let mut m = m.map_err(|e| e.to_string())?;
                if m.path().is_ok_and(|p| p.ends_with("PF")) {
                    pf.clear();
                    m.read_to_string(&mut pf).map_err(|e| e.to_string())?;
                    pf = pf.trim().to_string();
                }
            }
        }
        members.push(base);
    }
    Ok((members, pf))
}
