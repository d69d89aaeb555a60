//! Locating the workspace's binaries.

use std::path::PathBuf;

/// The folder cargo puts this profile's binaries in: the parent of the
/// running test binary's `deps` folder, or the folder of a running binary
/// (`chaos-campaign`).
pub fn dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let folder = exe.parent().expect("the executable's folder");
    if folder.file_name().is_some_and(|n| n == "deps") {
        folder.parent().expect("profile folder").to_path_buf()
    } else {
        folder.to_path_buf()
    }
}

/// The path of a workspace binary.
///
/// # Panics
/// When it was not built: run `cargo build --workspace --all-targets`
/// first (the README's test command does).
pub fn path(name: &str) -> PathBuf {
    let path = dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --all-targets` before the tests",
        path.display()
    );
    path
}

/// grpcurl: `$GRPCURL`, else `grpcurl` on the PATH.
pub fn grpcurl() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GRPCURL") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("grpcurl"))
            .find(|p| p.exists())
    })
}
