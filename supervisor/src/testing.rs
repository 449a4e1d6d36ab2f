//! What the in-crate tests share beyond one module: the skip rule for a test
//! that needs root.

/// Whether the test runs as root. If not: under `CI=true` it panics with
/// `why`; elsewhere it prints `skipped: why` and the test should return.
pub(crate) fn is_root_or_skip(why: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}");
    }
    eprintln!("skipped: {why}");
    false
}
