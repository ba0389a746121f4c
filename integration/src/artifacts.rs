//! Locating the patched QEMU and the guest that `integration/setup.sh` builds into the cache.
//!
//! A test that cannot find them must fail loudly with the command that builds them; it never
//! skips. The cache lives outside the clone so that a fresh clone reuses an earlier build.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Default cache directory, shared with `integration/setup.sh`.
pub const DEFAULT_CACHE: &str = "/var/cache/colo";

/// Firmware directories from Debian's `qemu-system-data` and `seabios` packages; the minimal
/// QEMU build does not ship its own ROMs.
pub const FIRMWARE_DIRS: [&str; 2] = ["/usr/share/qemu", "/usr/share/seabios"];

/// Everything a test-bed VM needs from outside the repository.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// `qemu-system-x86_64` with the two COLO fixes.
    pub qemu: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs (busybox userland that serves HTTP and writes heartbeats).
    pub initrd: PathBuf,
}

/// The cache directory: `$COLO_CACHE` or [`DEFAULT_CACHE`].
pub fn cache_dir() -> PathBuf {
    std::env::var_os("COLO_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE))
}

impl Artifacts {
    /// Finds QEMU (`$COLO_QEMU` overrides the cache) and the guest, or explains how to build them.
    pub fn locate() -> Result<Self> {
        let cache = cache_dir();
        let qemu = std::env::var_os("COLO_QEMU")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache.join("qemu/bin/qemu-system-x86_64"));
        let guest = cache.join("guest");
        let found = Artifacts {
            qemu,
            kernel: guest.join("vmlinuz"),
            initrd: guest.join("initrd.img"),
        };
        for (what, path) in [
            ("patched QEMU", &found.qemu),
            ("guest kernel", &found.kernel),
            ("guest initramfs", &found.initrd),
        ] {
            require_file(what, path)?;
        }
        for dir in FIRMWARE_DIRS {
            if !Path::new(dir).is_dir() {
                bail!(
                    "firmware directory {dir} is missing (Debian packages qemu-system-data and \
                     seabios); run `sudo integration/setup.sh`"
                );
            }
        }
        Ok(found)
    }
}

fn require_file(what: &str, path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "{what} not found at {}: build it with `sudo integration/setup.sh` \
             (COLO_CACHE={} ; COLO_QEMU overrides the QEMU binary)",
            path.display(),
            cache_dir().display()
        )
    })?;
    if !meta.is_file() || meta.len() == 0 {
        bail!("{what} at {} is not a usable file", path.display());
    }
    Ok(())
}

/// A directory for one run's sockets, images and logs, kept after the run for post-mortems.
pub fn run_dir(scenario: &str) -> Result<PathBuf> {
    let base = std::env::var_os("COLO_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("colo-testbed"));
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let dir = base.join(format!("{scenario}-{}-{stamp}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
