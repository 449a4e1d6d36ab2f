//! Close-on-exec, switched per fd: every fd holdfast opens is CLOEXEC; an
//! in-place upgrade clears the flag on exactly the fds the new holdfast
//! inherits, and the new holdfast sets it again on each one it adopts.

use std::io;
use std::os::fd::RawFd;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

/// Sets (`on`) or clears FD_CLOEXEC on `fd`.
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}
