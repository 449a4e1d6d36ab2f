//! Where the workspace and its build output are, and how xtask runs the tools it drives:
//! every command is echoed and timed, and a failure names the command and what to do.
//! Nothing here knows which tools exist; the subcommands decide.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// The workspace xtask belongs to, and the cargo that built xtask (same toolchain).
pub struct Workspace {
    pub root: PathBuf,
    /// `$CARGO_TARGET_DIR` when set (as cargo itself does), else `<root>/target`.
    pub target_dir: PathBuf,
    cargo: OsString,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    pub fn dir_name(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

impl Workspace {
    pub fn locate() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask's manifest dir has no parent")?
            .to_path_buf();
        // Resolved here, against the caller's cwd, because every cargo below runs in `root`.
        let target_dir = match env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
            Some(dir) => std::path::absolute(dir).context("resolve CARGO_TARGET_DIR")?,
            None => root.join("target"),
        };
        // `cargo run` sets CARGO to the toolchain's own cargo: nested builds use the same one.
        let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        Ok(Workspace {
            root,
            target_dir,
            cargo,
        })
    }

    /// `cargo ARGS` in the workspace root, building into `target_dir`.
    pub fn cargo<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.cargo);
        cmd.args(args)
            .current_dir(&self.root)
            .env("CARGO_TARGET_DIR", &self.target_dir);
        cmd
    }

    /// Where `cargo build` (with or without `--release`) leaves the binaries.
    pub fn bin_dir(&self, profile: Profile) -> PathBuf {
        self.target_dir.join(profile.dir_name())
    }

    /// `$PATH` with `dir` first, so unit files can name the example services by bare name.
    pub fn path_with(&self, dir: &Path) -> Result<OsString> {
        let old = env::var_os("PATH").unwrap_or_default();
        let dirs = std::iter::once(dir.to_path_buf()).chain(env::split_paths(&old));
        env::join_paths(dirs).context("build PATH")
    }
}

/// `CI=true` (or `1`): set-up that cannot be done is an error, never a warning.
pub fn in_ci() -> bool {
    env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() == 0 }
}

/// `command -v NAME`, also looking in the sbin directories a non-login root shell may lack.
pub fn find_command(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The command as a user would type it (program name, not its full path, for cargo).
pub fn display(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let mut line = if program.ends_with("cargo") {
        "cargo".to_string()
    } else {
        program.display().to_string()
    };
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains([' ', '"', '\'']) {
            let _ = write!(line, " '{arg}'");
        } else {
            let _ = write!(line, " {arg}");
        }
    }
    line
}

/// Run with the terminal attached; on failure the error names the command and gives `hint`.
pub fn run(cmd: &mut Command, hint: &str) -> Result<()> {
    let line = display(cmd);
    eprintln!("xtask: $ {line}");
    let start = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    let took = start.elapsed().as_secs_f64();
    if !status.success() {
        bail!("`{line}` failed ({status}) after {took:.1}s: {hint}");
    }
    eprintln!("xtask: ok ({took:.1}s): {line}");
    Ok(())
}

/// Run with output captured, shown only when the command fails.
pub fn run_quiet(cmd: &mut Command) -> Result<Output> {
    let line = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_what_needs_it() {
        let mut cmd = Command::new("/root/.rustup/toolchains/stable/bin/cargo");
        cmd.args(["clippy", "--", "-D", "warnings", "a b", ""]);
        assert_eq!(display(&cmd), "cargo clippy -- -D warnings 'a b' ''");
        assert_eq!(
            display(&Command::new("/usr/bin/apt-get")),
            "/usr/bin/apt-get"
        );
    }

    #[test]
    fn path_with_puts_the_dir_first() {
        let ws = Workspace::locate().unwrap();
        let path = ws.path_with(Path::new("/x/bin")).unwrap();
        let first = env::split_paths(&path).next().unwrap();
        assert_eq!(first, Path::new("/x/bin"));
    }

    #[test]
    fn find_command_finds_sh_and_not_nonsense() {
        assert!(find_command("sh").is_some());
        assert!(find_command("holdfast-no-such-tool").is_none());
    }
}
