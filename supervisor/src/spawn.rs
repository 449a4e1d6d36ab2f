//! Starting a service process: the one door through which holdfast forks and
//! execs. Everything the child needs (argv, environment, the fd layout, the
//! credentials) is prepared before fork; between fork and exec the child only
//! makes async-signal-safe system calls on that prepared memory, never
//! allocating, so it is safe even if the supervisor has threads.
//!
//! The child is made with `clone3`, which returns a pidfd for it
//! (`CLONE_PIDFD`) and, given a cgroup, starts it there (`CLONE_INTO_CGROUP`),
//! so no instant of its life is outside its service's cgroup. On x86-64 the
//! child shares holdfast's memory until it execs (`CLONE_VM | CLONE_VFORK`,
//! on a stack of its own, every signal blocked until it has reset its
//! dispositions), as posix_spawn does: no page tables are copied and no
//! copy-on-write faults follow, whatever holdfast's size. Nor does it copy
//! holdfast's fd table: its fds are staged in low slots and it keeps only
//! the bottom of the table (`CLONE_FILES`, then `CLOSE_RANGE_UNSHARE`: see
//! `slots`). Where clone3 is
//! refused (ENOSYS under some seccomp filters), `fork`, then the child writes
//! itself into the cgroup's `cgroup.procs` (opened before fork) and the parent
//! opens the pidfd before anything can reap the child.
//!
//! The child gets: a session of its own (`setsid`: it leads a new session and
//! process group, so no service can join another's); stdin from /dev/null or
//! the socket (`standard-input`); stdout and stderr on the given pipes or the
//! socket (`standard-output`); its sockets as fds 3, 4, … with LISTEN_FDS,
//! LISTEN_FDNAMES and LISTEN_PID (its own pid, written after fork into a
//! buffer reserved before it), O_NONBLOCK set on them or cleared
//! (`non-blocking`, on every spawn, whatever an earlier instance did to the
//! shared open file); every other fd closed; an empty signal mask and default
//! signal dispositions; the unit's rlimits; its umask (systemd's 0022 unless
//! `umask` says otherwise); then setgroups (the user's groups and the
//! `supplementary-groups`), setgid, setuid, PR_SET_NO_NEW_PRIVS
//! (`no-new-privileges`), chdir (to `/` unless `working-directory` says
//! otherwise), execve. Its environment is systemd's for a system service:
//! PATH (systemd's default unless given), LANG when holdfast has it,
//! HOME/USER/LOGNAME/SHELL for a `user`, and a fresh INVOCATION_ID; then the
//! unit's `environment`, then its `environment-file`s, read at each start
//! ([`Setup::for_process`]).

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::unistd::Pid;

use crate::pidfd::Pidfd;
use crate::unit::{ProcessConfig, Rlimits, StandardInput, StandardOutput, DEFAULT_UMASK};

mod envfile;
mod slots;

pub use slots::reserve as reserve_low_fds;

/// The width reserved for LISTEN_PID's digits (a pid_t has at most 10).
const PID_DIGITS: usize = 20;
const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
/// Set beside WATCHDOG_USEC, as systemd does: the pid that must send WATCHDOG=1.
const WATCHDOG_PID_PREFIX: &[u8] = b"WATCHDOG_PID=";
/// linux/sched.h (libc's constant is an overflowing c_int).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
/// systemd's PATH for system services.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin";

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("program {program:?} not found in PATH")]
    NotFound { program: String },
    #[error("{what} contains a NUL byte")]
    Nul { what: String },
    #[error("user {user:?} not found")]
    NoUser { user: String },
    #[error("group {group:?} not found")]
    NoGroup { group: String },
    #[error("{call}: {source}")]
    Syscall {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("standard-input or standard-output is \"socket\", but the service is given no socket")]
    NoSocketForStdio,
    #[error("environment file {}: {source}", path.display())]
    EnvironmentFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{stage} failed in the child: {source}")]
    Child {
        stage: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Credentials to switch to before exec.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
    /// HOME, USER, LOGNAME, SHELL for the environment, when a user was named.
    pub home: Option<PathBuf>,
    pub user_name: Option<String>,
    pub shell: Option<PathBuf>,
}

impl Credentials {
    /// Resolves `user` and `group` (names or numeric ids). With only a user,
    /// the group is the user's primary group and the supplementary groups are
    /// the user's memberships; with only a group, the uid stays and the
    /// supplementary groups are dropped.
    pub fn resolve(
        user: Option<&str>,
        group: Option<&str>,
    ) -> Result<Option<Credentials>, SpawnError> {
        use nix::unistd::{getgrouplist, Gid, Uid, User};
        if user.is_none() && group.is_none() {
            return Ok(None);
        }
        let (uid, entry) =
            match user {
                None => (Uid::current().as_raw(), None),
                Some(u) => match u.parse::<u32>() {
                    // A numeric uid with no passwd entry is still a valid uid.
                    Ok(id) => (id, User::from_uid(Uid::from_raw(id)).ok().flatten()),
                    Err(_) => {
                        let entry = User::from_name(u).ok().flatten().ok_or_else(|| {
                            SpawnError::NoUser {
                                user: u.to_string(),
                            }
                        })?;
                        (entry.uid.as_raw(), Some(entry))
                    }
                },
            };
        let gid = match group {
            Some(g) => group_id(g)?,
            None => entry
                .as_ref()
                .map(|e| e.gid.as_raw())
                .unwrap_or_else(|| Gid::current().as_raw()),
        };
        let groups = match &entry {
            Some(e) => {
                let name = cstring(e.name.as_bytes(), "user name")?;
                let mut list: Vec<u32> = getgrouplist(&name, Gid::from_raw(gid))
                    .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
                    .unwrap_or_else(|_| vec![gid]);
                list.sort_unstable();
                list.dedup();
                list
            }
            None => vec![gid],
        };
        Ok(Some(Credentials {
            uid,
            gid,
            groups,
            home: entry.as_ref().map(|e| e.dir.clone()),
            user_name: entry.as_ref().map(|e| e.name.clone()),
            shell: entry.as_ref().map(|e| e.shell.clone()),
        }))
    }
}

/// A group's id: a numeric id as it is, a name looked up in the group database.
pub fn group_id(group: &str) -> Result<libc::gid_t, SpawnError> {
    if let Ok(id) = group.parse::<u32>() {
        return Ok(id);
    }
    nix::unistd::Group::from_name(group)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
        .ok_or_else(|| SpawnError::NoGroup {
            group: group.to_string(),
        })
}

/// What a unit sets up in its process besides the fds and credentials of
/// [`Command`]: resolved and read before fork, at each start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    /// The umask the child gets (`umask`).
    pub umask: libc::mode_t,
    /// PR_SET_NO_NEW_PRIVS (`no-new-privileges`).
    pub no_new_privileges: bool,
    /// Groups the child is in besides its user's (`supplementary-groups`);
    /// with no user or group they are its only supplementary groups.
    pub supplementary_groups: Vec<libc::gid_t>,
    /// The variables of the `environment-file`s, applied after `Command::env`.
    pub environment: Vec<(String, OsString)>,
}

impl Default for Setup {
    /// systemd's: umask 0022, nothing else.
    fn default() -> Setup {
        Setup {
            umask: DEFAULT_UMASK,
            no_new_privileges: false,
            supplementary_groups: Vec::new(),
            environment: Vec::new(),
        }
    }
}

impl Setup {
    /// Resolves `supplementary-groups` and reads the `environment-file`s
    /// (now: call it at each start). A group that does not exist, or a
    /// non-optional environment file that cannot be read, fails naming it.
    pub fn for_process(p: &ProcessConfig) -> Result<Setup, SpawnError> {
        Ok(Setup {
            umask: p.umask,
            no_new_privileges: p.no_new_privileges,
            supplementary_groups: p
                .supplementary_groups
                .iter()
                .map(|g| group_id(g))
                .collect::<Result<_, _>>()?,
            environment: envfile::read(&p.environment_files)?,
        })
    }
}

/// Looks `program` up the way execvp does: a name with a slash is used as it
/// is, otherwise each PATH entry is tried for an executable regular file.
pub fn resolve_program(program: &str, path_var: Option<&OsStr>) -> Result<PathBuf, SpawnError> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let default = OsString::from("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let path_var = path_var.unwrap_or(&default);
    for dir in std::env::split_paths(path_var) {
        let candidate = dir.join(program);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(SpawnError::NotFound {
        program: program.to_string(),
    })
}

/// What a child is started with.
pub struct Command<'a> {
    pub program: &'a Path,
    pub argv: &'a [String],
    /// Besides LISTEN_* (added here); later entries win.
    pub env: Vec<(String, OsString)>,
    /// Handed over as fds 3, 4, …, named in LISTEN_FDNAMES.
    pub fds: Vec<(BorrowedFd<'a>, &'a str)>,
    /// The first `sockets` of `fds` are the unit's sockets (O_NONBLOCK per
    /// `non_blocking`); the rest (the fd store) are left as they are.
    pub sockets: usize,
    /// stdin: /dev/null when `None` (an inetd-style connection otherwise).
    pub stdin: Option<BorrowedFd<'a>>,
    pub stdout: BorrowedFd<'a>,
    pub stderr: BorrowedFd<'a>,
    pub credentials: Option<&'a Credentials>,
    /// `/` when `None`, as systemd.
    pub working_directory: Option<&'a Path>,
    /// A cgroup directory (see `cgroup::Cgroup::as_fd`) the child starts in.
    pub cgroup: Option<BorrowedFd<'a>>,
    pub rlimits: Rlimits,
    /// O_NONBLOCK on the sockets (and a socket stdin/stdout): set when
    /// true, cleared when false.
    pub non_blocking: bool,
    /// `Socket`: stdin is `stdin` if given (the connection), else the first socket.
    pub standard_input: StandardInput,
    /// `Socket`: stdout is the socket stdin would be.
    pub standard_output: StandardOutput,
}

/// A started child.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    /// Signal and watch the child through this, never through `pid`.
    pub pidfd: Pidfd,
    /// Its INVOCATION_ID (32 hex digits).
    pub invocation_id: String,
}

fn cstring(bytes: &[u8], what: &str) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError::Nul {
        what: what.to_string(),
    })
}

/// Everything the child touches, prepared before fork.
struct Prepared {
    program: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _env: Vec<CString>,
    /// "LISTEN_PID=" followed by PID_DIGITS + 1 bytes for the digits and NUL.
    listen_pid: Vec<u8>,
    /// "WATCHDOG_PID=" and room likewise, when WATCHDOG_USEC is set.
    watchdog_pid: Vec<u8>,
    envp: Vec<*const libc::c_char>,
    /// (source fd, target fd): stdin, stdout, stderr, then the sockets.
    moves: Vec<(RawFd, RawFd)>,
    /// Scratch for the high duplicates, filled in by the child.
    scratch: Vec<RawFd>,
    first_free: RawFd,
    /// setgroups' list, when the child sets its groups.
    groups: Option<Vec<libc::gid_t>>,
    ids: Option<(libc::uid_t, libc::gid_t)>,
    umask: libc::mode_t,
    no_new_privileges: bool,
    cwd: CString,
    /// (failure stage, resource, limit) for setrlimit.
    rlimits: Vec<(usize, libc::__rlimit_resource_t, libc::rlimit)>,
    /// Target fds whose O_NONBLOCK is set to `non_blocking`.
    nonblock_targets: Vec<RawFd>,
    non_blocking: bool,
    /// cgroup.procs of the target cgroup, for the fork fallback.
    cgroup_procs: Option<OwnedFd>,
    /// `Some(K)`: the child shares our fd table (CLONE_FILES) and every fd
    /// it needs is below K; its first fd operation unshares the table,
    /// keeping only those (`slots`).
    unshare_below: Option<RawFd>,
}

/// How the child is made; a parameter so tests can take the fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ForkMethod {
    /// clone3 with CLONE_PIDFD (and CLONE_INTO_CGROUP), fork if refused.
    Clone3,
    /// fork, cgroup.procs, pidfd_open.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "taken when clone3 is refused; tests ask for it")
    )]
    Fork,
}

/// Starts `cmd` (see the module doc) with [`Setup::default`] (umask 0022,
/// nothing else): a unit's `umask`, `supplementary-groups`,
/// `no-new-privileges` and `environment-file` need [`spawn_set_up`]. Returns
/// once the child has exec'd (or failed to, reported through a CLOEXEC pipe
/// as systemd and std do).
pub fn spawn(cmd: &Command<'_>) -> Result<Spawned, SpawnError> {
    spawn_with(cmd, &Setup::default(), ForkMethod::Clone3)
}

/// [`spawn`], the child set up as `setup` says (from [`Setup::for_process`]).
pub fn spawn_set_up(cmd: &Command<'_>, setup: &Setup) -> Result<Spawned, SpawnError> {
    spawn_with(cmd, setup, ForkMethod::Clone3)
}

fn spawn_with(cmd: &Command<'_>, setup: &Setup, how: ForkMethod) -> Result<Spawned, SpawnError> {
    let devnull = std::fs::File::open("/dev/null").map_err(|source| SpawnError::Syscall {
        call: "open(/dev/null)",
        source,
    })?;
    let invocation_id = invocation_id()?;
    let mut p = prepare(cmd, setup, devnull.as_raw_fd(), &invocation_id)?;
    let (err_r, err_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SpawnError::Syscall {
            call: "pipe2",
            source: e.into(),
        })?;
    // Every fd the child needs in a low slot, so that it copies only the
    // bottom of our fd table (see `slots`); else it copies the whole table.
    let staged = slots::Staged::new(
        p.moves
            .iter()
            .map(|(src, _)| *src)
            .chain([err_w.as_raw_fd()]),
    );
    let child_err_w = match &staged {
        Some(s) => {
            for (src, _) in &mut p.moves {
                *src = s.slot(*src);
            }
            p.unshare_below = Some(s.below);
            s.slot(err_w.as_raw_fd())
        }
        None => err_w.as_raw_fd(),
    };
    let cloned = match how {
        ForkMethod::Clone3 => clone3(cmd, &mut p, child_err_w),
        ForkMethod::Fork => Ok(None),
    };
    let child = match cloned {
        Ok(Some(child)) => Ok(child),
        Ok(None) => fork(cmd, &mut p, child_err_w),
        Err(e) => Err(e),
    };
    // The child has exec'd or exited (CLONE_VFORK), or has a table of its
    // own (fork): the slots go back to /dev/null, so that the error pipe's
    // write end (and the output pipes') is held by the child alone.
    drop(staged);
    let (pid, pidfd) = child?;
    drop(err_w);
    let mut report = [0u8; 8];
    let n = read_full(&err_r, &mut report);
    drop(devnull);
    let spawned = Spawned {
        pid: Pid::from_raw(pid),
        pidfd,
        invocation_id,
    };
    match n {
        8 => {
            let stage = u32::from_ne_bytes(report[0..4].try_into().expect("4 bytes"));
            let errno = i32::from_ne_bytes(report[4..8].try_into().expect("4 bytes"));
            // Reap the child that failed before exec.
            let _ = nix::sys::wait::waitpid(spawned.pid, None);
            Err(SpawnError::Child {
                stage: STAGES.get(stage as usize).copied().unwrap_or("exec"),
                source: io::Error::from_raw_os_error(errno),
            })
        }
        _ => Ok(spawned),
    }
}

/// The child by clone3 (CLONE_PIDFD, CLONE_INTO_CGROUP): its pid and pidfd,
/// or `None` where clone3 is refused (ENOSYS).
///
/// On x86-64 the child shares this process's memory until it execs
/// (CLONE_VM | CLONE_VFORK, as glibc's posix_spawn does), on a stack of its
/// own: the kernel copies no page tables and the supervisor takes no
/// copy-on-write faults afterwards, which a fork of a supervisor holding
/// thousands of services paid on every spawn. This thread waits, suspended,
/// until the child has exec'd or exited; every signal stays blocked until the
/// child has reset its dispositions, so no handler of the supervisor ever
/// runs in the child.
fn clone3(
    cmd: &Command<'_>,
    p: &mut Prepared,
    err_w: RawFd,
) -> Result<Option<(i32, Pidfd)>, SpawnError> {
    let mut pidfd: RawFd = -1;
    // SAFETY: clone_args is plain integers; zero is "no such option".
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = libc::CLONE_PIDFD as u64;
    args.pidfd = std::ptr::addr_of_mut!(pidfd) as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    if let Some(cg) = cmd.cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = cg.as_raw_fd() as u64;
    }
    let pid = clone_child(&mut args, p, err_w)?;
    if pid < 0 {
        let e = io::Error::from_raw_os_error((-pid) as i32);
        if e.raw_os_error() == Some(libc::ENOSYS) {
            return Ok(None);
        }
        return Err(SpawnError::Syscall {
            call: "clone3",
            source: e,
        });
    }
    let pid = pid as i32;
    if pidfd < 0 {
        return open_pidfd(pid).map(|fd| Some((pid, fd)));
    }
    // SAFETY: CLONE_PIDFD stored a fresh CLOEXEC pidfd there for us.
    Ok(Some((pid, unsafe { Pidfd::from_raw(pidfd, pid) })))
}

/// clone3 with `args`, the child running [`child`]: its pid, or `-errno`.
#[cfg(target_arch = "x86_64")]
fn clone_child(
    args: &mut libc::clone_args,
    p: &mut Prepared,
    err_w: RawFd,
) -> Result<i64, SpawnError> {
    vfork::with_stack(|stack| {
        // SAFETY: as below, on the stack `with_stack` lends us.
        unsafe { clone_on(stack, args, p, err_w) }
    })
    .map_err(|source| SpawnError::Syscall {
        call: "mmap (the child's stack)",
        source,
    })
}

/// [`clone_child`] on `stack`.
///
/// # Safety
/// `stack` must be used by no other child until this returns.
#[cfg(target_arch = "x86_64")]
unsafe fn clone_on(
    stack: &vfork::Stack,
    args: &mut libc::clone_args,
    p: &mut Prepared,
    err_w: RawFd,
) -> i64 {
    args.flags |= (libc::CLONE_VM | libc::CLONE_VFORK) as u64;
    if p.unshare_below.is_some() {
        // Shared until the child's close_range(CLOSE_RANGE_UNSHARE); we are
        // suspended meanwhile, so the staged slots stay as they are.
        args.flags |= libc::CLONE_FILES as u64;
    }
    args.stack = stack.base();
    args.stack_size = stack.len();
    let mut start = vfork::Start { p, err_w };
    let _blocked = vfork::BlockSignals::all();
    // SAFETY: the child runs on `stack`, alive until this returns (CLONE_VFORK
    // suspends us until the child has exec'd or exited), and `start` with it;
    // it only calls async-signal-safe functions on prepared memory, never
    // allocating, and never returns.
    unsafe { vfork::clone3(args, &mut start) }
}

/// clone3 with `args` as a fork (no CLONE_VM), the child running [`child`].
#[cfg(not(target_arch = "x86_64"))]
fn clone_child(
    args: &mut libc::clone_args,
    p: &mut Prepared,
    err_w: RawFd,
) -> Result<i64, SpawnError> {
    // Not suspended until the child execs: its fd table is copied whole
    // (the slots are put back as soon as this returns).
    p.unshare_below = None;
    // SAFETY: clone3 without CLONE_VM is a fork: the child gets a copy of
    // this thread's memory and only calls async-signal-safe functions on
    // memory prepared before (see `child`), never returning from it.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::from_mut(args),
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    if pid == 0 {
        // SAFETY: we are the freshly cloned child; `child` execs or _exits.
        unsafe { child(p, err_w, false) }
    }
    if pid < 0 {
        return Ok(-i64::from(
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL),
        ));
    }
    Ok(pid)
}

/// The x86-64 door for a child that shares our memory until exec.
#[cfg(target_arch = "x86_64")]
mod vfork {
    use std::ffi::c_void;
    use std::io;
    use std::os::fd::RawFd;

    use super::{child, Prepared};

    /// The child's stack size: `child` needs a few KiB; glibc's posix_spawn
    /// gives its child 32 KiB and more for long argument lists.
    const STACK: usize = 256 << 10;
    const GUARD: usize = 4096;

    /// A stack of its own for the child, below it a guard page.
    pub struct Stack {
        map: *mut c_void,
    }

    impl Stack {
        pub fn new() -> io::Result<Stack> {
            // SAFETY: a fresh private anonymous mapping, owned by the Stack.
            let map = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    STACK + GUARD,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                    -1,
                    0,
                )
            };
            if map == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let stack = Stack { map };
            // SAFETY: the lowest page of our own mapping.
            if unsafe { libc::mprotect(map, GUARD, libc::PROT_NONE) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(stack)
        }

        /// The lowest usable address (clone3 wants the base and the size).
        pub fn base(&self) -> u64 {
            self.map as u64 + GUARD as u64
        }

        pub fn len(&self) -> u64 {
            STACK as u64
        }
    }

    impl Drop for Stack {
        fn drop(&mut self) {
            // SAFETY: our own mapping, no longer used: the child exec'd or exited.
            unsafe { libc::munmap(self.map, STACK + GUARD) };
        }
    }

    std::thread_local! {
        /// This thread's child stack, kept for its next spawn (a mapping,
        /// its guard page and the page faults of a fresh stack per spawn
        /// were measurable at 1000 services). CLONE_VFORK suspends the
        /// thread until its child has exec'd or exited, so no two children
        /// ever use it at once.
        static KEPT: std::cell::RefCell<Option<Stack>> = const { std::cell::RefCell::new(None) };
    }

    /// Runs `f` with this thread's child stack, mapped at its first use.
    pub fn with_stack<R>(f: impl FnOnce(&Stack) -> R) -> io::Result<R> {
        KEPT.with(|cell| match cell.try_borrow_mut() {
            Ok(mut kept) => {
                if kept.is_none() {
                    *kept = Some(Stack::new()?);
                }
                Ok(f(kept.as_ref().expect("mapped above")))
            }
            // Not expected (a spawn does not spawn): a stack of its own.
            Err(_) => Stack::new().map(|s| f(&s)),
        })
    }

    /// What the child starts with.
    pub struct Start<'a> {
        pub p: &'a mut Prepared,
        pub err_w: RawFd,
    }

    /// Every signal blocked in this thread while alive; the old mask back after.
    pub struct BlockSignals(libc::sigset_t);

    impl BlockSignals {
        pub fn all() -> BlockSignals {
            // SAFETY: sigset_t is plain data, filled by sigfillset; the old
            // mask is written into our own value.
            unsafe {
                let mut all: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut all);
                let mut old: libc::sigset_t = std::mem::zeroed();
                libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
                BlockSignals(old)
            }
        }
    }

    impl Drop for BlockSignals {
        fn drop(&mut self) {
            // SAFETY: restores the mask saved by `all`.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
        }
    }

    /// The child's first Rust frame, on its own stack.
    extern "C" fn start(arg: *mut c_void) -> ! {
        // SAFETY: `arg` is the `Start` that `clone3` was given, alive while
        // the parent is suspended; we are the fresh child.
        unsafe {
            let s = &mut *arg.cast::<Start<'_>>();
            child(s.p, s.err_w, false)
        }
    }

    /// clone3(`args`): in the parent, the child's pid or `-errno`; the child
    /// (rax 0, on the stack `args` names) calls `start(start_arg)`.
    ///
    /// # Safety
    /// `args` must name a stack that stays mapped until the child has exec'd
    /// or exited, and carry CLONE_VM | CLONE_VFORK; `start_arg` must stay
    /// alive as long.
    pub unsafe fn clone3(args: &mut libc::clone_args, start_arg: &mut Start<'_>) -> i64 {
        let ret: i64;
        // SAFETY: the caller's contract. The parent's registers but rax, rcx
        // and r11 are kept by the syscall; the child, whose stack pointer
        // the kernel set to the top of the new stack (16-byte aligned, a
        // page boundary), calls `start`, which never returns.
        unsafe {
            std::arch::asm!(
                "syscall",
                "test rax, rax",
                "jnz 2f",
                "mov rdi, r12",
                "call r13",
                "ud2",
                "2:",
                inlateout("rax") libc::SYS_clone3 => ret,
                in("rdi") std::ptr::from_mut(args),
                in("rsi") std::mem::size_of::<libc::clone_args>(),
                in("r12") std::ptr::from_mut(start_arg),
                in("r13") start as extern "C" fn(*mut c_void) -> !,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }
}

/// The child by fork: it writes itself into its cgroup, and the parent
/// opens its pidfd before anything can reap it.
fn fork(cmd: &Command<'_>, p: &mut Prepared, err_w: RawFd) -> Result<(i32, Pidfd), SpawnError> {
    // fork copies the fd table whole.
    p.unshare_below = None;
    if cmd.cgroup.is_some() {
        p.cgroup_procs = Some(open_procs(cmd.cgroup)?);
    }
    // SAFETY: as for clone3: the child only calls async-signal-safe
    // functions on prepared memory, never returning.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(SpawnError::Syscall {
            call: "fork",
            source: io::Error::last_os_error(),
        });
    }
    if pid == 0 {
        // SAFETY: we are the freshly forked child; `child` execs or _exits.
        unsafe { child(p, err_w, true) }
    }
    open_pidfd(pid).map(|fd| (pid, fd))
}

/// A pidfd for our child `pid`, which is killed and reaped if it cannot be had.
fn open_pidfd(pid: i32) -> Result<Pidfd, SpawnError> {
    // The child is ours and unreaped (only the event loop's thread reaps,
    // and it is here): its pid cannot have been reused yet.
    match Pidfd::open(pid) {
        Ok(fd) => Ok(fd),
        Err(e) => {
            // SAFETY: plain kill of our own unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
            Err(SpawnError::Syscall {
                call: "pidfd_open",
                source: match e {
                    crate::pidfd::PidfdError::Syscall { source, .. } => source,
                },
            })
        }
    }
}

/// `cgroup.procs` of the cgroup directory `dir`, opened for writing.
fn open_procs(dir: Option<BorrowedFd<'_>>) -> Result<OwnedFd, SpawnError> {
    let Some(dir) = dir else {
        unreachable!("called with a cgroup")
    };
    nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        "cgroup.procs",
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map(|fd| {
        // SAFETY: openat just returned this fd; it is ours.
        unsafe { OwnedFd::from_raw_fd(fd) }
    })
    .map_err(|e| SpawnError::Syscall {
        call: "open(cgroup.procs)",
        source: e.into(),
    })
}

/// 128 random bits as 32 lowercase hex digits, as systemd's INVOCATION_ID.
fn invocation_id() -> Result<String, SpawnError> {
    let mut bytes = [0u8; 16];
    let mut done = 0;
    while done < bytes.len() {
        // SAFETY: getrandom writes at most the given length into the buffer.
        let n =
            unsafe { libc::getrandom(bytes[done..].as_mut_ptr().cast(), bytes.len() - done, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(SpawnError::Syscall {
                call: "getrandom",
                source: e,
            });
        }
        done += n as usize;
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    done
}

fn prepare(
    cmd: &Command<'_>,
    setup: &Setup,
    devnull: RawFd,
    invocation_id: &str,
) -> Result<Prepared, SpawnError> {
    // The child runs in its working directory: a relative program is
    // resolved against ours first.
    let program = std::path::absolute(cmd.program).map_err(|source| SpawnError::Syscall {
        call: "getcwd",
        source,
    })?;
    let program = cstring(program.as_os_str().as_bytes(), "program path")?;
    let argv: Vec<CString> = cmd
        .argv
        .iter()
        .map(|a| cstring(a.as_bytes(), "an exec argument"))
        .collect::<Result<_, _>>()?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let env = environment(cmd, setup, invocation_id)?;
    let fds = fd_layout(cmd, devnull)?;
    let cwd = cstring(
        cmd.working_directory
            .unwrap_or(Path::new("/"))
            .as_os_str()
            .as_bytes(),
        "working directory",
    )?;
    Ok(Prepared {
        program,
        _argv: argv,
        argv_ptrs,
        _env: env.vars,
        listen_pid: env.listen_pid,
        watchdog_pid: env.watchdog_pid,
        envp: env.envp,
        scratch: vec![-1; fds.moves.len()],
        moves: fds.moves,
        first_free: fds.first_free,
        groups: groups(cmd.credentials, &setup.supplementary_groups),
        ids: cmd.credentials.map(|c| (c.uid, c.gid)),
        umask: setup.umask,
        no_new_privileges: setup.no_new_privileges,
        cwd,
        rlimits: rlimits(&cmd.rlimits),
        nonblock_targets: fds.nonblock_targets,
        non_blocking: cmd.non_blocking,
        cgroup_procs: None,
        unshare_below: None,
    })
}

/// The child's environment, its strings and the pointers to them.
struct Environment {
    vars: Vec<CString>,
    listen_pid: Vec<u8>,
    watchdog_pid: Vec<u8>,
    envp: Vec<*const libc::c_char>,
}

/// systemd's variables, then `cmd.env`, then the environment files', then
/// LISTEN_*; LISTEN_PID and WATCHDOG_PID get buffers the child fills in.
fn environment(
    cmd: &Command<'_>,
    setup: &Setup,
    invocation_id: &str,
) -> Result<Environment, SpawnError> {
    let mut vars: Vec<(String, OsString)> = Vec::new();
    let mut set = |k: &str, v: OsString| {
        vars.retain(|(key, _)| key != k);
        vars.push((k.to_string(), v));
    };
    set("PATH", DEFAULT_PATH.into());
    if let Some(lang) = std::env::var_os("LANG") {
        set("LANG", lang);
    }
    set("INVOCATION_ID", invocation_id.into());
    if let Some(c) = cmd.credentials {
        if let Some(home) = &c.home {
            set("HOME", home.clone().into_os_string());
        }
        if let Some(name) = &c.user_name {
            set("USER", name.into());
            set("LOGNAME", name.into());
        }
        if let Some(shell) = &c.shell {
            set("SHELL", shell.clone().into_os_string());
        }
    }
    for (k, v) in cmd.env.iter().chain(&setup.environment) {
        set(k, v.clone());
    }
    if !cmd.fds.is_empty() {
        set("LISTEN_FDS", cmd.fds.len().to_string().into());
        let names: Vec<&str> = cmd.fds.iter().map(|(_, n)| *n).collect();
        set("LISTEN_FDNAMES", names.join(":").into());
    }
    let watchdog = vars.iter().any(|(k, _)| k == "WATCHDOG_USEC");
    let vars: Vec<CString> = vars
        .into_iter()
        .filter(|(k, _)| k != "LISTEN_PID" && k != "WATCHDOG_PID")
        .map(|(k, v)| {
            let mut bytes = k.into_bytes();
            bytes.push(b'=');
            bytes.extend_from_slice(&v.into_vec());
            cstring(&bytes, "an environment variable")
        })
        .collect::<Result<_, _>>()?;
    let pid_buffer = |prefix: &[u8]| {
        let mut b = prefix.to_vec();
        b.resize(prefix.len() + PID_DIGITS + 1, 0);
        b
    };
    let listen_pid = pid_buffer(LISTEN_PID_PREFIX);
    let watchdog_pid = pid_buffer(WATCHDOG_PID_PREFIX);
    let mut envp: Vec<*const libc::c_char> = vars.iter().map(|e| e.as_ptr()).collect();
    if !cmd.fds.is_empty() {
        envp.push(listen_pid.as_ptr().cast());
    }
    if watchdog {
        envp.push(watchdog_pid.as_ptr().cast());
    }
    envp.push(std::ptr::null());
    Ok(Environment {
        vars,
        listen_pid,
        watchdog_pid,
        envp,
    })
}

/// Where the child's fds come from and go.
struct FdLayout {
    /// (source fd, target fd): stdin, stdout, stderr, then the sockets.
    moves: Vec<(RawFd, RawFd)>,
    first_free: RawFd,
    nonblock_targets: Vec<RawFd>,
}

fn fd_layout(cmd: &Command<'_>, devnull: RawFd) -> Result<FdLayout, SpawnError> {
    let socket = cmd
        .stdin
        .or_else(|| cmd.fds.first().map(|(fd, _)| *fd))
        .map(|fd| fd.as_raw_fd());
    let stdin = match cmd.standard_input {
        StandardInput::Null => cmd.stdin.map_or(devnull, |fd| fd.as_raw_fd()),
        StandardInput::Socket => socket.ok_or(SpawnError::NoSocketForStdio)?,
    };
    let stdout = match cmd.standard_output {
        StandardOutput::Log => cmd.stdout.as_raw_fd(),
        StandardOutput::Socket => socket.ok_or(SpawnError::NoSocketForStdio)?,
    };
    let mut nonblock_targets: Vec<RawFd> = (0..cmd.sockets.min(cmd.fds.len()))
        .map(|i| 3 + i as RawFd)
        .collect();
    if cmd.standard_input == StandardInput::Socket {
        nonblock_targets.push(0);
    }
    if cmd.standard_output == StandardOutput::Socket {
        nonblock_targets.push(1);
    }
    let mut moves = vec![(stdin, 0), (stdout, 1), (cmd.stderr.as_raw_fd(), 2)];
    for (i, (fd, _)) in cmd.fds.iter().enumerate() {
        moves.push((fd.as_raw_fd(), 3 + i as RawFd));
    }
    Ok(FdLayout {
        moves,
        first_free: 3 + cmd.fds.len() as RawFd,
        nonblock_targets,
    })
}

/// setgroups' list: the user's groups and the supplementary ones (sorted,
/// once each); the supplementary ones alone without credentials; `None`
/// (the groups are left as they are) when there is neither.
fn groups(
    credentials: Option<&Credentials>,
    supplementary: &[libc::gid_t],
) -> Option<Vec<libc::gid_t>> {
    let mut list = match credentials {
        Some(c) => c.groups.clone(),
        None if supplementary.is_empty() => return None,
        None => Vec::new(),
    };
    list.extend_from_slice(supplementary);
    list.sort_unstable();
    list.dedup();
    Some(list)
}

/// (failure stage, resource, limit) for each rlimit the unit sets.
fn rlimits(r: &Rlimits) -> Vec<(usize, libc::__rlimit_resource_t, libc::rlimit)> {
    [
        (libc::RLIMIT_NOFILE, r.nofile),
        (libc::RLIMIT_NPROC, r.nproc),
        (libc::RLIMIT_CORE, r.core),
        (libc::RLIMIT_MEMLOCK, r.memlock),
    ]
    .into_iter()
    .enumerate()
    .filter_map(|(i, (res, l))| {
        l.map(|l| {
            (
                RLIMIT_STAGE + i,
                res,
                libc::rlimit {
                    rlim_cur: l.soft as libc::rlim_t,
                    rlim_max: l.hard as libc::rlim_t,
                },
            )
        })
    })
    .collect()
}

const STAGES: &[&str] = &[
    "setsid",
    "sigprocmask",
    "dup",
    "dup2",
    "close_range",
    "setgroups",
    "setgid",
    "setuid",
    "chdir",
    "execve",
    "write(cgroup.procs)",
    "fcntl(O_NONBLOCK)",
    // RLIMIT_STAGE + the index in `Prepared::rlimits`' source order:
    "setrlimit for limit-nofile",
    "setrlimit for limit-nproc",
    "setrlimit for limit-core",
    "setrlimit for limit-memlock",
    "prctl(PR_SET_NO_NEW_PRIVS)",
    "unshare(CLONE_FILES)",
];
/// The first setrlimit stage in STAGES.
const RLIMIT_STAGE: usize = 12;
/// The no-new-privileges stage in STAGES.
const NO_NEW_PRIVS_STAGE: usize = 16;
/// The stage of unsharing the fd table in STAGES.
const UNSHARE_STAGE: usize = 17;

/// The child between fork and exec: async-signal-safe calls only, on memory
/// prepared before fork. Never returns.
///
/// `join_cgroup`: write ourselves into `p.cgroup_procs` (the fork fallback).
///
/// # Safety
/// Must be called only in a freshly forked child.
unsafe fn child(p: &mut Prepared, err_w: RawFd, join_cgroup: bool) -> ! {
    // SAFETY: each step makes async-signal-safe system calls on prepared,
    // live memory; the pointers stay valid because `p` outlives the exec.
    // A failing step returns its stage at once, errno untouched since.
    let done = unsafe {
        enter_session(p, join_cgroup)
            .and_then(|()| place_fds(p, err_w))
            .and_then(|()| set_limits_and_ids(p))
    };
    if let Err(stage) = done {
        report(err_w, stage)
    }
    // SAFETY: as above; `cwd` is a prepared C string.
    if unsafe { libc::chdir(p.cwd.as_ptr()) } != 0 {
        report(err_w, 8)
    }
    // LISTEN_PID and WATCHDOG_PID: our own pid, in the reserved buffers.
    // SAFETY: getpid cannot fail and touches no memory.
    let pid = unsafe { libc::getpid() } as u64;
    write_pid(&mut p.listen_pid, LISTEN_PID_PREFIX.len(), pid);
    write_pid(&mut p.watchdog_pid, WATCHDOG_PID_PREFIX.len(), pid);
    // SAFETY: the program, argv and envp are NUL-terminated arrays of
    // prepared C strings, alive until exec replaces this process.
    unsafe { libc::execve(p.program.as_ptr(), p.argv_ptrs.as_ptr(), p.envp.as_ptr()) };
    report(err_w, 9)
}

/// Tells the parent which stage failed, with errno, through the CLOEXEC
/// pipe, and exits. Async-signal-safe: a write from the stack, then _exit.
fn report(err_w: RawFd, stage: usize) -> ! {
    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let mut report = [0u8; 8];
    report[0..4].copy_from_slice(&(stage as u32).to_ne_bytes());
    report[4..8].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: write and _exit are async-signal-safe; the buffer is on the stack.
    unsafe {
        libc::write(err_w, report.as_ptr().cast(), report.len());
        libc::_exit(127)
    }
}

/// The child's cgroup (fork fallback), its own session, default signal
/// dispositions and an empty mask.
///
/// # Safety
/// Only in the child (see [`child`]).
unsafe fn enter_session(p: &Prepared, join_cgroup: bool) -> Result<(), usize> {
    // SAFETY: async-signal-safe system calls on prepared memory and the stack.
    unsafe {
        if join_cgroup {
            if let Some(procs) = &p.cgroup_procs {
                // "0": the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(10);
                }
            }
        }
        if libc::setsid() < 0 {
            return Err(0);
        }
        // Default dispositions (Rust ignores SIGPIPE; handlers do not survive exec
        // anyway, but ignored signals do) and an empty mask.
        for sig in 1..libc::SIGRTMIN() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
            return Err(1);
        }
    }
    Ok(())
}

/// stdin, stdout, stderr and the handed-over fds into place, every other fd
/// closed (but the error pipe), O_NONBLOCK set or cleared on the sockets.
///
/// # Safety
/// Only in the child (see [`child`]).
unsafe fn place_fds(p: &mut Prepared, err_w: RawFd) -> Result<(), usize> {
    // SAFETY: fcntl, dup2 and close_range on fds; `scratch` was sized before fork.
    unsafe {
        // Our own table first, holding only the fds below K, all we need
        // (before 5.9, no CLOSE_RANGE_UNSHARE: a copy of the whole table).
        if let Some(below) = p.unshare_below {
            if libc::syscall(
                libc::SYS_close_range,
                below as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_UNSHARE,
            ) != 0
                && libc::unshare(libc::CLONE_FILES) != 0
            {
                return Err(UNSHARE_STAGE);
            }
        }
        // Move every source above the targets first, so no dup2 clobbers a
        // source still to be moved; then into place (dup2 clears CLOEXEC).
        let high = p.first_free.max(err_w + 1);
        for (i, (src, _)) in p.moves.iter().enumerate() {
            let fd = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, high);
            if fd < 0 {
                return Err(2);
            }
            p.scratch[i] = fd;
        }
        for (i, (_, target)) in p.moves.iter().enumerate() {
            if libc::dup2(p.scratch[i], *target) < 0 {
                return Err(3);
            }
        }
        // Everything above the handed-over fds is CLOEXEC already, except what
        // the supervisor could not control; close it, keeping the error pipe.
        if err_w > p.first_free {
            libc::syscall(
                libc::SYS_close_range,
                p.first_free as libc::c_uint,
                (err_w - 1) as libc::c_uint,
                0 as libc::c_uint,
            );
        }
        libc::syscall(
            libc::SYS_close_range,
            (err_w.max(p.first_free - 1) + 1) as libc::c_uint,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        );
        for &target in &p.nonblock_targets {
            let flags = libc::fcntl(target, libc::F_GETFL);
            let want = if p.non_blocking {
                flags | libc::O_NONBLOCK
            } else {
                flags & !libc::O_NONBLOCK
            };
            if flags < 0 || (want != flags && libc::fcntl(target, libc::F_SETFL, want) < 0) {
                return Err(11);
            }
        }
    }
    Ok(())
}

/// The rlimits, the umask, the groups, gid and uid, and no-new-privileges.
///
/// # Safety
/// Only in the child (see [`child`]).
unsafe fn set_limits_and_ids(p: &Prepared) -> Result<(), usize> {
    // SAFETY: setrlimit, umask, setgroups, setgid, setuid and prctl on
    // prepared memory.
    unsafe {
        // Before setuid: raising a hard limit needs CAP_SYS_RESOURCE.
        for (stage, resource, limit) in &p.rlimits {
            if libc::setrlimit(*resource, limit) != 0 {
                return Err(*stage);
            }
        }
        libc::umask(p.umask);
        // Raw system calls, not glibc's setgroups/setgid/setuid: those apply
        // the change to every thread glibc believes the process has, and a
        // clone3 child inherits the parent's thread list without its threads,
        // so glibc would wait forever for a thread that was being created at
        // the clone (seen as a hang in the tests). This process has one thread.
        if let Some(groups) = &p.groups {
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                return Err(5);
            }
        }
        if let Some((uid, gid)) = p.ids {
            if libc::syscall(libc::SYS_setgid, gid) != 0 {
                return Err(6);
            }
            if libc::syscall(libc::SYS_setuid, uid) != 0 {
                return Err(7);
            }
        }
        if p.no_new_privileges && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(NO_NEW_PRIVS_STAGE);
        }
    }
    Ok(())
}

/// Writes `pid`'s digits and a NUL into `buf` from `base` (room reserved
/// before fork: no allocation).
fn write_pid(buf: &mut [u8], base: usize, mut pid: u64) {
    let mut digits = [0u8; PID_DIGITS];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (pid % 10) as u8;
        n += 1;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    for i in 0..n {
        buf[base + i] = digits[n - 1 - i];
    }
    buf[base + n] = 0;
}

/// A pipe whose read end the supervisor watches (non-blocking, CLOEXEC) and
/// whose write end becomes a child's stdout or stderr.
pub fn output_pipe() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
        .map_err(|e| SpawnError::Syscall {
        call: "pipe2",
        source: e.into(),
    })?;
    // The child's end must block: a service writing to a full non-blocking
    // stdout would see EAGAIN. O_NONBLOCK is per open file, so clear it on w.
    nix::fcntl::fcntl(
        w.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .map_err(|e| SpawnError::Syscall {
        call: "fcntl(F_SETFL)",
        source: e.into(),
    })?;
    Ok((r, w))
}

/// Makes sure fds 0, 1 and 2 are open (on /dev/null if not), so that no
/// socket or pipe of ours is ever created on them.
pub fn ensure_stdio() {
    for fd in 0..3 {
        // SAFETY: F_GETFD on any int is harmless; it only reports EBADF.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            if let Ok(f) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                let raw = f.as_raw_fd();
                if raw != fd {
                    // SAFETY: dup2 onto a closed low fd; `f` is closed on drop.
                    unsafe { libc::dup2(raw, fd) };
                } else {
                    std::mem::forget(f);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
