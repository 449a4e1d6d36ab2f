//! What the in-crate tests share beyond one module: the skip rule for a test
//! that needs root, and a read that a stop and continue does not fail.

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

/// `r.read(buf)`, again after each EINTR: a read with SO_RCVTIMEO is not
/// restarted after the process is stopped and continued, or after a signal
/// handler runs (signal(7)), and a test must not fail for that.
pub(crate) fn read_through_interruptions(
    r: &mut impl std::io::Read,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}
