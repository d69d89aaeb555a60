//! A small tmpfs for a node's data folder, so a test can fill its disk
//! (root only, as CI runs).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for a test, unmounted (lazily) when dropped.
#[derive(Debug)]
pub struct Tmpfs {
    /// Where it is mounted.
    pub at: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. `8m`) at `at`,
    /// creating the folder.
    ///
    /// # Errors
    /// Why it could not be mounted (mounting needs root).
    pub fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(at).map_err(|e| format!("{}: {e}", at.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mounting a tmpfs at {} failed (root only): {}",
                at.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            at: at.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// Why a tmpfs cannot be mounted here, if it cannot (tried on a scratch
/// folder).
pub fn unavailable() -> Option<String> {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return Some(format!("no scratch folder: {e}")),
    };
    // A probe that mounted is unmounted here, before its folder goes.
    let why = Tmpfs::mount(&dir.path().join("probe"), "1m").err();
    drop(dir);
    why
}

/// Writes zeros into `path` until its disk is full.
pub fn fill(path: &Path) {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path).expect("filler");
    let chunk = vec![0u8; 64 * 1024];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.sync_all();
}
