//! A cgroup v2 of a test's own: a fresh directory under the test process's
//! cgroup, handed to the daemon as its `--cgroup-root`, and killed and removed
//! (with whatever is left in it) on drop.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

/// A fresh cgroup `hf-it-<pid>-<n>-TAG` below this process's own cgroup.
#[derive(Debug)]
pub struct CgroupRoot(PathBuf);

impl CgroupRoot {
    /// Creates it; fails where there is no cgroup2 mount or no right to write
    /// below this process's cgroup (use it under [`crate::require`]).
    pub fn new(tag: &str) -> Result<CgroupRoot> {
        static N: AtomicU32 = AtomicU32::new(0);
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        let mount = mountinfo
            .lines()
            .filter_map(|l| l.split_once(" - "))
            .find(|(_, fs)| fs.starts_with("cgroup2 "))
            .and_then(|(m, _)| m.split(' ').nth(4))
            .context("no cgroup2 mount in /proc/self/mountinfo")?
            .to_string();
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no 0:: line in /proc/self/cgroup")?
            .trim_start_matches('/')
            .to_string();
        let dir = Path::new(&mount).join(own).join(format!(
            "hf-it-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(CgroupRoot(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `["--cgroup-root", PATH]`, for [`crate::RunOptions::args`].
    pub fn run_args(&self) -> Vec<String> {
        vec!["--cgroup-root".into(), self.0.display().to_string()]
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        std::thread::sleep(Duration::from_millis(100));
        fn remove(dir: &Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        remove(&e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        remove(&self.0);
    }
}
