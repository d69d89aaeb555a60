//! Benchmark users: RSA-2048 identities cached in a folder (PKCS#8 PEM,
//! mode 0600), so that only the first run pays for key generation.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use saferchat_client::Identity;

/// Most users a run may ask for (keys are generated at ~70 ms each).
pub const USERS_MAX: usize = 1000;

/// Loads `count` identities from `dir` (`user0000.pem`, …), generating
/// and saving the missing ones. Returns them and the seconds spent
/// generating.
///
/// # Errors
/// When a key file cannot be read or written.
pub fn load_or_generate(dir: &Path, count: usize) -> anyhow::Result<(Vec<Arc<Identity>>, f64)> {
    anyhow::ensure!(
        count <= USERS_MAX,
        "{count} users asked; at most {USERS_MAX}"
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut users = Vec::with_capacity(count);
    let mut generated = 0usize;
    let started = Instant::now();
    let mut generating_s = 0.0;
    for n in 0..count {
        let path = dir.join(format!("user{n:04}.pem"));
        let identity = if path.exists() {
            Identity::load(&path)?
        } else {
            let t = Instant::now();
            let identity = Identity::generate()?;
            identity.save(&path, false)?;
            generating_s += t.elapsed().as_secs_f64();
            generated += 1;
            identity
        };
        users.push(Arc::new(identity));
    }
    if generated > 0 {
        eprintln!(
            "keys: generated {generated} RSA-2048 keys into {} in {:.1} s",
            dir.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok((users, generating_s))
}
