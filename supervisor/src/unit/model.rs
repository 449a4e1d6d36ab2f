//! The validated shape of a unit: what the rest of holdfast reads. Parsing and
//! diagnostics live in the sibling modules; nothing here touches the system.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One service and its sockets, from one `NAME.toml` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {
    /// The file name without `.toml`.
    pub name: String,
    /// The file it was read from.
    pub path: PathBuf,
    pub service: ServiceConfig,
    /// In file order: the child sees them as fds 3, 4, ….
    pub sockets: Vec<SocketConfig>,
}

/// `[service]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    /// argv; `exec[0]` as written (PATH resolution happens at spawn).
    pub exec: Vec<String>,
    pub kind: ServiceType,
    pub restart: RestartPolicy,
    pub restart_mode: RestartMode,
    /// After an overlap restart's new instance is ready, how long the old one
    /// goes on serving beside it before it is told to stop (0: at once). For
    /// a service that says READY=1 before it can answer (gunicorn's arbiter
    /// does, before its workers have loaded the app).
    #[serde(default)]
    pub overlap_grace: Duration,
    /// First restart delay; doubles for a service that keeps dying quickly.
    pub restart_delay: Duration,
    /// Cap on the doubled restart delay.
    pub restart_delay_max: Duration,
    pub stop_timeout: Duration,
    /// How long a `notify` service may take to send READY=1.
    pub start_timeout: Duration,
    /// More than `start_limit_burst` starts within `start_limit_interval`: `failed`.
    pub start_limit_burst: u32,
    pub start_limit_interval: Duration,
    /// `WATCHDOG_USEC`; `None` disables the watchdog.
    pub watchdog: Option<Duration>,
    /// Upper bound on fds kept for the service through FDSTORE=1 (0: off).
    pub fd_store_max: u32,
    /// The service cannot run twice at once: overlap restarts are refused.
    pub single_instance: bool,
    /// Started when traffic first arrives on one of its sockets, and again
    /// after it exits (xinetd's `wait = yes`, systemd's socket activation),
    /// instead of at boot.
    pub on_demand: bool,
    pub environment: BTreeMap<String, String>,
    pub working_directory: Option<PathBuf>,
    pub user: Option<String>,
    pub group: Option<String>,
    /// The keys about the service's processes (limits, signals, stdio).
    pub process: ProcessConfig,
    /// The commands run around the main process (`exec-start-pre`).
    #[serde(default)]
    pub commands: Commands,
}

/// The commands a service runs beside its main process, systemd's
/// `ExecStartPre=` and friends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commands {
    /// `exec-start-pre`: run one after another, each to completion, before
    /// every start of the main process, with its user, environment,
    /// directory and cgroup but without its sockets.
    pub start_pre: Vec<ExecCommand>,
    /// `exec-start-post`: run one after another once the main process has
    /// started (simple) or said READY=1 (notify); the service is `running`
    /// when they are done, and stopped as failed if one fails.
    #[serde(default)]
    pub start_post: Vec<ExecCommand>,
    /// `exec-stop`: run one after another when the service is stopped,
    /// with `$MAINPID`; then `kill-signal` to what is left.
    #[serde(default)]
    pub stop: Vec<ExecCommand>,
    /// `exec-reload`: run one after another by `holdfast reload-service`,
    /// with `$MAINPID`.
    #[serde(default)]
    pub reload: Vec<ExecCommand>,
    /// `reload-signal` of a `type = "notify-reload"` service; `None`: SIGHUP.
    #[serde(default)]
    pub reload_signal: Option<KillSignal>,
}

impl Commands {
    pub fn is_empty(&self) -> bool {
        *self == Commands::default()
    }
    /// What `reload-signal` says, SIGHUP by default.
    pub fn reload_signal(&self) -> KillSignal {
        self.reload_signal.unwrap_or(KillSignal(1))
    }
}

/// One command of [`Commands`]: its argv, and whether its failure is
/// ignored (a leading `-` on the program in the unit file, as in systemd).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecCommand {
    /// argv, without the `-`; `argv[0]` is looked up in PATH at spawn.
    pub argv: Vec<String>,
    /// Written `-/path`: a failure (exit status, signal, cannot exec) is
    /// logged and the start goes on.
    pub ignore_failure: bool,
}

impl ExecCommand {
    /// The command as written in a unit file: `argv` with the `-` back on
    /// the program.
    pub fn written(&self) -> Vec<String> {
        let mut argv = self.argv.clone();
        if self.ignore_failure {
            if let Some(p) = argv.first_mut() {
                p.insert(0, '-');
            }
        }
        argv
    }
}

/// The `[service]` keys about the service's processes, systemd's meanings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessConfig {
    /// Which of the service's processes may send to NOTIFY_SOCKET.
    pub notify_access: NotifyAccess,
    /// The signal `stop` sends first (a number, e.g. 15 for SIGTERM).
    pub kill_signal: KillSignal,
    /// Which processes that first signal goes to (systemd's `KillMode=`).
    pub kill_mode: KillMode,
    /// Resource limits the kernel applies to each process (setrlimit).
    pub rlimits: Rlimits,
    /// Limits on the service's cgroup as a whole.
    pub cgroup_limits: CgroupLimits,
    /// The handed-over sockets are non-blocking (O_NONBLOCK), set or
    /// cleared on every spawn (systemd's `NonBlocking=`).
    pub non_blocking: bool,
    pub standard_input: StandardInput,
    pub standard_output: StandardOutput,
    /// The file mode creation mask set before exec (systemd's `UMask=`, default 0022).
    #[serde(default = "default_umask")]
    pub umask: u32,
    /// Groups (names or numeric ids) the process is in besides its user's
    /// own (systemd's `SupplementaryGroups=`).
    #[serde(default)]
    pub supplementary_groups: Vec<String>,
    /// PR_SET_NO_NEW_PRIVS: exec can never grant more privileges (setuid
    /// bits, file capabilities) than the process has.
    #[serde(default)]
    pub no_new_privileges: bool,
    /// Read at each start, in order, after `environment` (later values win).
    #[serde(default)]
    pub environment_files: Vec<EnvironmentFile>,
}

/// systemd's default `UMask=`.
pub const DEFAULT_UMASK: u32 = 0o022;

fn default_umask() -> u32 {
    DEFAULT_UMASK
}

/// One `environment-file` entry: `"/etc/default/web"`, or `"-/etc/default/web"`
/// for a file that may be missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentFile {
    pub path: PathBuf,
    /// A missing file is skipped instead of failing the start.
    pub optional: bool,
}

impl ProcessConfig {
    /// systemd's defaults for a service of type `kind`.
    pub fn defaults_for(kind: ServiceType) -> ProcessConfig {
        ProcessConfig {
            notify_access: NotifyAccess::default_for(kind),
            kill_signal: KillSignal::TERM,
            kill_mode: KillMode::ControlGroup,
            rlimits: Rlimits::default(),
            cgroup_limits: CgroupLimits::default(),
            non_blocking: false,
            standard_input: StandardInput::Null,
            standard_output: StandardOutput::Log,
            umask: DEFAULT_UMASK,
            supplementary_groups: Vec::new(),
            no_new_privileges: false,
            environment_files: Vec::new(),
        }
    }
}

/// systemd's `NotifyAccess=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotifyAccess {
    /// No process: NOTIFY_SOCKET is not set.
    None,
    /// The main process of an instance (the spawned one, or the one named by MAINPID=).
    Main,
    /// The main process and the process holdfast started.
    Exec,
    /// Any process in the service's cgroup.
    All,
}

impl NotifyAccess {
    /// Every value, in the order a unit file's diagnostics list them (the first is the example).
    pub const ALL: [NotifyAccess; 4] = [
        NotifyAccess::Main,
        NotifyAccess::Exec,
        NotifyAccess::All,
        NotifyAccess::None,
    ];

    /// systemd's default: `main` for `type = "notify"`, otherwise `none`.
    pub fn default_for(kind: ServiceType) -> NotifyAccess {
        match kind {
            ServiceType::Notify | ServiceType::NotifyReload => NotifyAccess::Main,
            ServiceType::Simple => NotifyAccess::None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyAccess::None => "none",
            NotifyAccess::Main => "main",
            NotifyAccess::Exec => "exec",
            NotifyAccess::All => "all",
        }
    }
}

/// A signal number (1-64), e.g. 15 for SIGTERM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillSignal(pub i32);

impl KillSignal {
    pub const TERM: KillSignal = KillSignal(15);
}

/// An rlimit value: `u64::MAX` is `infinity` (RLIM_INFINITY).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub soft: u64,
    pub hard: u64,
}

impl Rlimit {
    pub const INFINITY: u64 = u64::MAX;
}

/// `limit-nofile`, `limit-nproc`, `limit-core`, `limit-memlock`; `None`: inherited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimits {
    pub nofile: Option<Rlimit>,
    pub nproc: Option<Rlimit>,
    pub core: Option<Rlimit>,
    pub memlock: Option<Rlimit>,
}

/// A cgroup limit: a number (bytes, tasks) or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Limit {
    Value(u64),
    Infinity,
}

/// `memory-max`, `memory-high`, `tasks-max`, `cpu-quota`, `cpu-weight`,
/// `io-weight`; `None`: the kernel's default (no limit, weight 100).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupLimits {
    pub memory_max: Option<Limit>,
    pub memory_high: Option<Limit>,
    pub tasks_max: Option<Limit>,
    /// Percent of one CPU (200: two CPUs).
    pub cpu_quota: Option<u32>,
    /// 1-10000.
    pub cpu_weight: Option<u32>,
    /// 1-10000.
    pub io_weight: Option<u32>,
}

impl CgroupLimits {
    pub fn is_empty(&self) -> bool {
        *self == CgroupLimits::default()
    }
}

/// systemd's `KillMode=`: who gets `kill-signal` at a stop. SIGKILL at the
/// stop timeout goes to every process left, either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KillMode {
    /// Every process of the instance (its cgroup, or its process group).
    ControlGroup,
    /// The main process only, which stops its own children (gunicorn's
    /// arbiter, nginx's master); what is left gets SIGKILL at the timeout.
    Mixed,
}

impl KillMode {
    /// Every value, in the order a unit file's diagnostics list them (the first is the example).
    pub const ALL: [KillMode; 2] = [KillMode::ControlGroup, KillMode::Mixed];

    /// The name in unit files (and serde's).
    pub fn as_str(self) -> &'static str {
        match self {
            KillMode::ControlGroup => "control-group",
            KillMode::Mixed => "mixed",
        }
    }
}

/// systemd's `StandardInput=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StandardInput {
    /// /dev/null.
    Null,
    /// The service's socket (the connection, for `accept = true`; else its first socket).
    Socket,
}

impl StandardInput {
    /// Every value, in the order a unit file's diagnostics list them (the first is the example).
    pub const ALL: [StandardInput; 2] = [StandardInput::Null, StandardInput::Socket];

    /// The name in unit files (and serde's).
    pub fn as_str(self) -> &'static str {
        match self {
            StandardInput::Null => "null",
            StandardInput::Socket => "socket",
        }
    }
}

/// systemd's `StandardOutput=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StandardOutput {
    /// holdfast's log (`holdfast logs`).
    Log,
    /// The socket, as for stdin.
    Socket,
}

impl StandardOutput {
    /// Every value, in the order a unit file's diagnostics list them (the first is the example).
    pub const ALL: [StandardOutput; 2] = [StandardOutput::Log, StandardOutput::Socket];

    /// The name in unit files (and serde's).
    pub fn as_str(self) -> &'static str {
        match self {
            StandardOutput::Log => "log",
            StandardOutput::Socket => "socket",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceType {
    /// Ready once started.
    Simple,
    /// Ready on READY=1 through NOTIFY_SOCKET.
    Notify,
    /// As notify, and reloaded by `reload-signal`: RELOADING=1, then READY=1.
    NotifyReload,
}

impl ServiceType {
    /// Every value, in the order a unit file's diagnostics list them (the first is the example).
    pub const ALL: [ServiceType; 3] = [
        ServiceType::Simple,
        ServiceType::Notify,
        ServiceType::NotifyReload,
    ];

    /// Ready on READY=1 (notify, notify-reload).
    pub fn notifies(self) -> bool {
        self != ServiceType::Simple
    }
    /// The name in unit files (and serde's).
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::Simple => "simple",
            ServiceType::Notify => "notify",
            ServiceType::NotifyReload => "notify-reload",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// Every value, in the order a unit file's diagnostics list them (the first is the example).
    pub const ALL: [RestartPolicy; 3] = [
        RestartPolicy::Always,
        RestartPolicy::OnFailure,
        RestartPolicy::Never,
    ];

    /// The name in unit files (and serde's).
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
    }
}

/// One list for the unit key, `--mode` (clap) and the control protocol (serde).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    /// Stop the old instance, then start the new one (systemd's way).
    StopStart,
    /// Start the new instance on the same sockets, wait for it to be ready, then stop the old one.
    Overlap,
}

impl RestartMode {
    /// Every value, in the order a unit file's diagnostics list them (the first is the example).
    pub const ALL: [RestartMode; 2] = [RestartMode::StopStart, RestartMode::Overlap];

    /// The name in unit files (and serde's).
    pub fn as_str(self) -> &'static str {
        match self {
            RestartMode::StopStart => "stop-start",
            RestartMode::Overlap => "overlap",
        }
    }
}

/// `[[socket]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketConfig {
    /// Its LISTEN_FDNAMES entry (default: the service name).
    pub name: String,
    pub protocol: Protocol,
    /// IP sockets: the prefixes traffic may arrive on. Empty for unix sockets.
    pub addresses: Vec<IpPrefix>,
    /// IP sockets: single ports and inclusive ranges. Empty for unix sockets.
    pub ports: Vec<PortRange>,
    /// Unix sockets: the path of the socket file.
    pub path: Option<PathBuf>,
    pub options: SocketOptions,
}

impl SocketConfig {
    /// Every (prefix, port range) this socket is reachable on: `addresses × ports`.
    pub fn bindings(&self) -> impl Iterator<Item = (IpPrefix, PortRange)> + '_ {
        self.addresses
            .iter()
            .flat_map(move |a| self.ports.iter().map(move |p| (*a, *p)))
    }

    /// `Some((address, port))` when the socket's bindings are exactly one
    /// host address and one port, so that a plain bind() serves it.
    pub fn single_bind(&self) -> Option<(IpAddr, u16)> {
        match (self.addresses.as_slice(), self.ports.as_slice()) {
            ([a], [p]) if a.is_host() && p.first == p.last => Some((a.addr, p.first)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Tcp,
    Udp,
    UnixStream,
    UnixDgram,
}

impl Protocol {
    /// Every value, in the order a unit file's diagnostics list them (the first is the example).
    pub const ALL: [Protocol; 4] = [
        Protocol::Tcp,
        Protocol::Udp,
        Protocol::UnixStream,
        Protocol::UnixDgram,
    ];

    pub fn is_ip(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::UnixStream => "unix-stream",
            Protocol::UnixDgram => "unix-dgram",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Socket options, with systemd's meanings. `None`: the kernel's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketOptions {
    pub backlog: Option<u32>,
    pub reuse_port: bool,
    pub free_bind: bool,
    pub transparent: bool,
    pub receive_buffer: Option<u32>,
    pub send_buffer: Option<u32>,
    pub mark: Option<u32>,
    pub keep_alive: bool,
    pub no_delay: bool,
    /// `None`: decided by the addresses (dual-stack when both families are declared).
    pub ipv6_only: Option<bool>,
    /// Unix socket file mode, e.g. 0o660.
    pub mode: Option<u32>,
    /// Unix sockets: the owner and group of the socket file (names or
    /// numeric ids; `None`: holdfast's).
    #[serde(default)]
    pub socket_user: Option<String>,
    #[serde(default)]
    pub socket_group: Option<String>,
    /// Unix sockets: the socket file is removed when holdfast closes the
    /// socket (a reload that drops it, or holdfast's exit).
    #[serde(default)]
    pub remove_on_stop: bool,
    /// holdfast accepts and starts one instance per connection (inetd's
    /// `wait = no`, systemd's `Accept=yes`). Stream sockets only.
    pub accept: bool,
    /// accept: instances at once (default 64); further connections wait in the backlog.
    pub max_connections: Option<u32>,
    /// accept: instances at once from one source address (none: unlimited).
    pub max_connections_per_source: Option<u32>,
    /// accept: connections per second before accepting pauses (none: unlimited).
    pub max_connection_rate: Option<u32>,
    /// accept: how long accepting pauses when the rate is exceeded (default 10s).
    pub rate_limit_pause: Option<Duration>,
    /// Source prefixes that may connect (empty: any).
    pub allow: Vec<IpPrefix>,
    /// Source prefixes that may not connect (wins over `allow`).
    pub deny: Vec<IpPrefix>,
}

impl SocketOptions {
    /// The kernel socket's on/off options: each one's unit key, systemd's
    /// directive for it (what `import` reads), and the field.
    pub fn flags_mut(&mut self) -> [(&'static str, &'static str, &mut bool); 5] {
        [
            ("reuse-port", "ReusePort", &mut self.reuse_port),
            ("free-bind", "FreeBind", &mut self.free_bind),
            ("transparent", "Transparent", &mut self.transparent),
            ("keep-alive", "KeepAlive", &mut self.keep_alive),
            ("no-delay", "NoDelay", &mut self.no_delay),
        ]
    }

    /// Whether a source address may reach this socket under allow/deny.
    pub fn admits(&self, source: IpAddr) -> bool {
        if self.deny.iter().any(|p| p.contains(source)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|p| p.contains(source))
    }

    /// These options without holdfast's own policy (allow, deny, the
    /// accept limits, remove-on-stop): what the kernel socket itself is made with.
    pub fn without_policy(&self) -> SocketOptions {
        SocketOptions {
            remove_on_stop: false,
            allow: Vec::new(),
            deny: Vec::new(),
            max_connections: None,
            max_connections_per_source: None,
            max_connection_rate: None,
            rate_limit_pause: None,
            ..self.clone()
        }
    }
}

/// An address prefix with its host bits zero: `192.0.2.0/24`, `2001:db8::/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl IpPrefix {
    /// The prefix length in the IPv4-mapped IPv6 space (IPv4 /24 is /120).
    pub fn mapped_len(&self) -> u8 {
        match self.addr {
            IpAddr::V4(_) => self.len + 96,
            IpAddr::V6(_) => self.len,
        }
    }
    /// The address as 16 bytes, IPv4 as `::ffff:a.b.c.d`.
    pub fn mapped_addr(&self) -> Ipv6Addr {
        match self.addr {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        }
    }
    pub fn is_host(&self) -> bool {
        match self.addr {
            IpAddr::V4(_) => self.len == 32,
            IpAddr::V6(_) => self.len == 128,
        }
    }
    pub fn contains(&self, addr: IpAddr) -> bool {
        let a = match addr {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let len = u32::from(self.mapped_len());
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        (u128::from(a) & mask) == (u128::from(self.mapped_addr()) & mask)
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// An inclusive port range, `first <= last`, both in 1..=65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn width(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}
