//! Idempotent set-up of what a fresh machine (Rust stable via rustup, gcc, Debian base, root)
//! lacks: rustup components, bpf-linker, the Debian packages the tests use, and bpffs.
//! Every item is probed first (a file, a command on PATH, a version string, /proc/self/mounts),
//! so a run on a machine that has everything forks three short processes (rustc, rustup,
//! bpf-linker, each for a version or a path) and changes nothing.
//! It prints one line per thing it installs and nothing else when all is there.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::shell::{self, Workspace};

/// Debian packages and what proves each is installed (separated by spaces): absolute paths
/// must exist, bare names must be commands on PATH. Add a package here when a test or example
/// starts to need it.
#[rustfmt::skip] // one package a line
pub const APT_PACKAGES: &[(&str, &str)] = &[
    // `ip netns`, `ip route add local PREFIX dev lo` in the privileged tests.
    ("iproute2", "ip"),
    // Real peers and small services in the tests.
    ("python3", "python3"),
    ("curl", "curl"),
    // Real LISTEN_FDS / NOTIFY_SOCKET consumers and senders.
    ("systemd", "/usr/bin/systemd-socket-activate /lib/systemd/systemd-socket-proxyd systemd-notify"),
    ("procps", "ps pgrep"),
    // The load generator of the restart tests and `cargo xtask bench`.
    ("wrk", "wrk"),
    // A real third-party LISTEN_FDS + NOTIFY_SOCKET service for `cargo xtask bench --only restarts`.
    ("gunicorn", "/usr/bin/gunicorn"),
    // A real Prometheus/OpenMetrics parser for the metrics tests (tests/tests/integration/observability.rs).
    ("python3-prometheus-client", "/usr/lib/python3/dist-packages/prometheus_client"),
    // A real inetd-style (accept = true) program served unchanged in tests/tests/integration/inetd.rs.
    ("micro-httpd", "/usr/sbin/micro-httpd /lib/systemd/system/micro-httpd.socket"),
    // A real inetd `wait = yes` daemon that reads the socket on stdin
    // (tests/tests/integration/inetd.rs: standard-input = "socket").
    ("tftpd-hpa", "/usr/sbin/in.tftpd"),
    // Debian's .socket/.service pairs that `holdfast import` is tested on
    // (tests/tests/integration/import.rs); sshd and uuidd also run under holdfast there.
    ("openssh-server", "/usr/sbin/sshd /usr/bin/ssh /usr/bin/ssh-keygen /lib/systemd/system/ssh.socket"),
    ("uuid-runtime", "/usr/sbin/uuidd /lib/systemd/system/uuidd.socket"),
    ("fcgiwrap", "/lib/systemd/system/fcgiwrap.socket"),
    ("rpcbind", "/lib/systemd/system/rpcbind.socket"),
    ("pcscd", "/lib/systemd/system/pcscd.socket"),
    // Debian's python is externally managed: the PyPI packages go into a venv of their own.
    ("python3-venv", "/usr/lib/python3.11/ensurepip/__init__.py"),
    // The `nc` lines `cargo xtask run` prints for the echo service.
    ("netcat-openbsd", "nc"),
    // systemd as PID 1 in a container, running deploy/holdfast.service (integration nspawn::).
    ("systemd-container", "/usr/bin/systemd-nspawn"),
    // Lists the kernel's BPF links: the stale sk_lookup link test (integration survive::).
    ("bpftool", "/usr/sbin/bpftool"),
];

/// The BPF linker aya-build drives; newer releases need a newer rustc than these machines have.
pub const BPF_LINKER_VERSION: &str = "0.10.0";

/// rustup components of the active toolchain, and the file in its sysroot that proves each.
/// rust-src (first): the BPF crate builds with `-Z build-std=core`; rustfmt, clippy: `xtask test`.
const RUST_COMPONENTS: &[(&str, &str)] = &[
    ("rust-src", "lib/rustlib/src/rust/library/core/Cargo.toml"),
    ("rustfmt", "bin/rustfmt"),
    ("clippy", "bin/cargo-clippy"),
];

const BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// What building needs: rustup components and bpf-linker. Never needs root.
    Toolchain,
    /// Also what running and testing need: Debian packages (root) and bpffs (root).
    Full,
}

/// Ensures everything in `scope`; returns one line per thing it installed.
pub fn ensure(ws: &Workspace, scope: Scope) -> Result<Vec<String>> {
    let mut done = Vec::new();
    rust_components(&mut done)?;
    bpf_linker(ws, &mut done)?;
    if scope == Scope::Full {
        apt_packages(&mut done)?;
        pip_packages(&mut done)?;
        bpffs(&mut done)?;
    }
    Ok(done)
}

fn installing(done: &mut Vec<String>, line: String) {
    eprintln!("bootstrap: {line}");
    done.push(line);
}

/// Does what `lines` say (one line per thing, none: nothing to do) with `install`, which
/// needs root: without root, says it cannot (see [`cannot`]).
fn as_root(
    done: &mut Vec<String>,
    lines: Vec<String>,
    install: impl FnOnce() -> Result<()>,
) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    if !shell::is_root() {
        return cannot(&format!("{} needs root", lines.join(", ")));
    }
    for line in lines {
        installing(done, line);
    }
    install()
}

/// Something that needs root cannot be done: an error under CI, a warning elsewhere
/// (the privileged tests then skip, naming what they lack).
fn cannot(what: &str) -> Result<()> {
    if shell::in_ci() {
        bail!("{what} (CI=true: set-up must not be skipped)");
    }
    eprintln!("bootstrap: warning: {what}; continuing without it");
    Ok(())
}

/// supervisor/build.rs builds the BPF crate with `rustup run $HOLDFAST_BPF_TOOLCHAIN`
/// (default `stable`), which needs rust-src too when it is not the active toolchain.
const BPF_TOOLCHAIN_ENV: &str = "HOLDFAST_BPF_TOOLCHAIN";
const BPF_TOOLCHAIN_DEFAULT: &str = "stable";

fn rust_components(done: &mut Vec<String>) -> Result<()> {
    let active = sysroot(None)?;
    add_components(None, &active, RUST_COMPONENTS, done)?;
    let bpf = std::env::var(BPF_TOOLCHAIN_ENV).unwrap_or_else(|_| BPF_TOOLCHAIN_DEFAULT.into());
    let bpf_sysroot = sysroot(Some(&bpf)).with_context(|| {
        format!("the BPF build's toolchain {bpf:?} (from {BPF_TOOLCHAIN_ENV}, default {BPF_TOOLCHAIN_DEFAULT:?})")
    })?;
    if bpf_sysroot != active {
        add_components(Some(&bpf), &bpf_sysroot, &RUST_COMPONENTS[..1], done)?;
    }
    Ok(())
}

/// The sysroot of the active toolchain, or of `toolchain` through `rustup run`.
fn sysroot(toolchain: Option<&str>) -> Result<PathBuf> {
    let mut cmd = Command::new(if toolchain.is_some() {
        "rustup"
    } else {
        "rustc"
    });
    if let Some(t) = toolchain {
        cmd.args(["run", t, "rustc"]);
    }
    let out = shell::run_quiet(cmd.args(["--print", "sysroot"]))?;
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn add_components(
    toolchain: Option<&str>,
    sysroot: &Path,
    components: &[(&str, &str)],
    done: &mut Vec<String>,
) -> Result<()> {
    let missing: Vec<&str> = components
        .iter()
        .filter(|(_, proof)| !sysroot.join(proof).exists())
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let of = toolchain.map_or_else(String::new, |t| format!(" of toolchain {t}"));
    for name in &missing {
        installing(done, format!("installing rustup component {name}{of}"));
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "add"]).args(&missing);
    if let Some(t) = toolchain {
        cmd.args(["--toolchain", t]);
    }
    shell::run_quiet(&mut cmd).context("rustup component add")?;
    Ok(())
}

/// `Some(version)` from `bpf-linker --version` ("bpf-linker 0.10.0"), `None` when absent.
fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    parse_bpf_linker_version(&String::from_utf8_lossy(&out.stdout))
}

fn parse_bpf_linker_version(stdout: &str) -> Option<String> {
    let line = stdout.lines().next()?;
    line.strip_prefix("bpf-linker ")
        .map(|v| v.split_whitespace().next().unwrap_or_default().to_string())
}

fn bpf_linker(ws: &Workspace, done: &mut Vec<String>) -> Result<()> {
    let found = bpf_linker_version();
    if found.as_deref() == Some(BPF_LINKER_VERSION) {
        return Ok(());
    }
    let was = found.map_or_else(|| "not found".to_string(), |v| format!("found {v}"));
    installing(
        done,
        format!(
            "installing bpf-linker {BPF_LINKER_VERSION} ({was}; cargo install, about a minute)"
        ),
    );
    let mut cmd = ws.cargo(["install", "bpf-linker", "--locked", "--force", "--version"]);
    // Its own throw-away target dir, not the workspace's.
    cmd.arg(BPF_LINKER_VERSION).env_remove("CARGO_TARGET_DIR");
    shell::run_quiet(&mut cmd)?;
    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => Ok(()),
        other => bail!(
            "bpf-linker {BPF_LINKER_VERSION} was installed but `bpf-linker --version` reports {other:?}: \
             is $CARGO_HOME/bin (usually ~/.cargo/bin) first on PATH?"
        ),
    }
}

fn is_present(proof: &str) -> bool {
    if proof.starts_with('/') {
        Path::new(proof).exists()
    } else {
        shell::find_command(proof).is_some()
    }
}

/// The packages some proof of which is missing.
fn missing_packages(present: impl Fn(&str) -> bool) -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .filter(|(_, proofs)| !proofs.split_whitespace().all(&present))
        .map(|(name, _)| *name)
        .collect()
}

fn apt_packages(done: &mut Vec<String>) -> Result<()> {
    let missing = missing_packages(is_present);
    let lines = missing
        .iter()
        .map(|n| format!("installing Debian package {n}"));
    as_root(done, lines.collect(), || {
        // One update, only because something is missing.
        let apt_get = |args: &[&str]| {
            let env = ("DEBIAN_FRONTEND", "noninteractive");
            shell::run_quiet(Command::new("apt-get").args(args).envs([env]))
        };
        apt_get(&["update", "-q"])?;
        let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
        install.extend(&missing);
        apt_get(&install)?;
        let still = missing_packages(is_present);
        if !still.is_empty() {
            bail!(
                "apt-get installed {} but some of what they should provide is still missing: {}",
                missing.join(", "),
                still.join(", ")
            );
        }
        Ok(())
    })
}

/// The venv the tests' PyPI packages live in (tests/tests/integration/deploy.rs runs its
/// programs from here).
pub const TEST_VENV: &str = "/opt/holdfast-test-python";

/// PyPI packages the tests use, pinned: (name, version). Each installed one leaves a
/// marker file `TEST_VENV/.installed-NAME-VERSION`, which is the probe.
pub const PIP_PACKAGES: &[(&str, &str)] = &[
    // The Kubernetes manifests in deploy/kubernetes, validated against the API's schemas.
    ("kubernetes-validate", "1.37.0"),
    // The Nomad job in deploy/nomad, parsed as HCL2.
    ("python-hcl2", "8.1.4"),
];

fn pip_marker(name: &str, version: &str) -> PathBuf {
    Path::new(TEST_VENV).join(format!(".installed-{name}-{version}"))
}

fn pip_packages(done: &mut Vec<String>) -> Result<()> {
    let missing: Vec<(&str, &str)> = PIP_PACKAGES
        .iter()
        .copied()
        .filter(|(n, v)| !pip_marker(n, v).exists())
        .collect();
    let python = Path::new(TEST_VENV).join("bin/python");
    let venv = !missing.is_empty() && !python.exists();
    let lines = venv
        .then(|| format!("creating the tests' Python venv {TEST_VENV}"))
        .into_iter()
        .chain(
            missing
                .iter()
                .map(|(n, v)| format!("installing PyPI package {n} {v} into {TEST_VENV}")),
        );
    as_root(done, lines.collect(), || {
        if venv {
            // Debian's interpreter, not whichever python3 comes first on PATH.
            shell::run_quiet(Command::new("/usr/bin/python3").args(["-m", "venv", TEST_VENV]))?;
        }
        let pins: Vec<String> = missing.iter().map(|(n, v)| format!("{n}=={v}")).collect();
        shell::run_quiet(
            Command::new(&python)
                .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
                .args(&pins),
        )?;
        for (name, version) in &missing {
            let marker = pip_marker(name, version);
            std::fs::write(&marker, "").with_context(|| format!("write {}", marker.display()))?;
        }
        Ok(())
    })
}

/// Whether /proc/self/mounts has a bpf filesystem mounted at `at`.
fn bpffs_mounted(mounts: &str, at: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next(), fields.next(), fields.next());
        target == Some(at) && fstype == Some("bpf")
    })
}

fn bpffs(done: &mut Vec<String>) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    if bpffs_mounted(&mounts, BPFFS) {
        return Ok(());
    }
    as_root(
        done,
        vec![format!("mounting bpffs at {BPFFS}")],
        || match shell::run_quiet(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS])) {
            Ok(_) => Ok(()),
            Err(e) => cannot(&format!("mount bpffs at {BPFFS}: {e:#}")),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpf_linker_version_is_read_from_its_first_line() {
        let cases = [
            ("bpf-linker 0.10.0\n", Some("0.10.0")),
            ("bpf-linker 0.9.13 (abc)\n", Some("0.9.13")),
            ("", None),
            ("error: something\n", None),
        ];
        for (stdout, want) in cases {
            assert_eq!(
                parse_bpf_linker_version(stdout).as_deref(),
                want,
                "{stdout:?}"
            );
        }
    }

    #[test]
    fn a_package_is_missing_when_any_of_its_proofs_is() {
        assert!(missing_packages(|_| true).is_empty());
        let all: Vec<_> = APT_PACKAGES.iter().map(|(name, _)| *name).collect();
        assert_eq!(missing_packages(|_| false), all);
        let no_proxyd = missing_packages(|p| p != "/lib/systemd/systemd-socket-proxyd");
        assert_eq!(no_proxyd, ["systemd"]);
    }

    #[test]
    fn every_package_has_a_proof() {
        for (name, proofs) in APT_PACKAGES {
            assert!(!proofs.trim().is_empty(), "{name} has nothing to probe");
        }
    }

    #[test]
    fn bpffs_is_found_only_with_type_bpf_at_the_place() {
        let mounts = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n";
        assert!(bpffs_mounted(mounts, "/sys/fs/bpf"));
        assert!(!bpffs_mounted("sysfs /sys sysfs rw 0 0\n", "/sys/fs/bpf"));
        assert!(!bpffs_mounted(
            "tmpfs /sys/fs/bpf tmpfs rw 0 0\n",
            "/sys/fs/bpf"
        ));
    }
}
