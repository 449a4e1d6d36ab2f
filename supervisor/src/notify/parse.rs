//! The sd_notify message format: newline-separated `KEY=VALUE` lines, parsed
//! into [`Notification`]s with the meanings systemd gives them. Pure: no
//! sockets, no logging; the socket side decides what to do with an error.

use std::time::Duration;

use super::NotifyError;

/// The largest message accepted, in bytes (a longer one is ignored whole).
pub const MAX_MESSAGE: usize = 4096;
/// The longest fd name (systemd's FDNAME_MAX).
pub const MAX_FD_NAME: usize = 255;
/// The name of a stored fd whose message had no FDNAME= (systemd's default).
pub const DEFAULT_FD_NAME: &str = "stored";
/// The largest ERRNO= value (the kernel's MAX_ERRNO).
const MAX_ERRNO: i32 = 4095;

/// One item of a notification message, with systemd's meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// `READY=1`: start-up is finished (or a reload is, after RELOADING=1).
    Ready,
    /// `RELOADING=1`: reloading its configuration; READY=1 follows when done.
    Reloading,
    /// `STOPPING=1`: beginning its shutdown.
    Stopping,
    /// `STATUS=…`: free-form status text; empty clears it.
    Status(String),
    /// `MAINPID=…`: the service's main process is now this pid.
    MainPid(i32),
    /// `EXTEND_TIMEOUT_USEC=…`: the current start/stop timeout is extended
    /// to at least this long from now.
    ExtendTimeout(Duration),
    /// `WATCHDOG=1`: a watchdog keep-alive ping.
    Watchdog,
    /// `WATCHDOG=trigger`: the service asks to be treated as if its watchdog
    /// had expired.
    WatchdogTrigger,
    /// `WATCHDOG_USEC=…`: a new watchdog timeout from now on; zero turns the
    /// watchdog off.
    WatchdogUsec(Duration),
    /// `ERRNO=…`: the service failed with this errno (0 ..= 4095).
    Errno(i32),
    /// `FDSTORE=1`: keep the fds sent with this message, under `name`
    /// (FDNAME= of the same message; `None` means [`DEFAULT_FD_NAME`]).
    FdStore { name: Option<String> },
    /// `FDSTOREREMOVE=1` with `FDNAME=name`: drop every stored fd so named.
    FdStoreRemove { name: String },
    /// `BARRIER=1` (sent by `systemd-notify` and `sd_notify_barrier`): the
    /// sender waits until the fd it sent is closed, which `receive` has
    /// already done. Nothing else to do.
    Barrier,
    /// Any other well-formed `KEY=VALUE` (e.g. BUSERROR, MONOTONIC_USEC,
    /// FDPOLL, X_…); FDNAME= is consumed by FDSTORE=1 / FDSTOREREMOVE=1 and
    /// never reported on its own.
    Other(String, String),
}

impl Notification {
    /// The stored-fd name this item uses, for FDSTORE=1.
    pub fn fd_name(name: &Option<String>) -> &str {
        name.as_deref().unwrap_or(DEFAULT_FD_NAME)
    }
}

/// Whether `name` may name a stored fd (and so appear in LISTEN_FDNAMES):
/// 1 ..= 255 printable ASCII characters other than space and `:`, as
/// systemd's `fdname_is_valid` (which also refuses the empty name here).
pub fn fd_name_is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_FD_NAME
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// Parses one datagram's payload. The whole message is refused when any line
/// is malformed: not UTF-8, a NUL byte, a line without `=`, a key that is
/// not `[A-Za-z_][A-Za-z0-9_]*`, a known key with a bad value, an invalid
/// FDNAME, FDSTOREREMOVE=1 without FDNAME, or more than [`MAX_MESSAGE`]
/// bytes. Empty lines are skipped; an empty payload gives no items. When
/// FDNAME= appears more than once the first counts, as in systemd.
pub fn parse(payload: &[u8]) -> Result<Vec<Notification>, NotifyError> {
    if payload.len() > MAX_MESSAGE {
        return Err(NotifyError::Oversized { len: payload.len() });
    }
    if payload.contains(&0) {
        return Err(NotifyError::Nul);
    }
    let text = std::str::from_utf8(payload).map_err(|_| NotifyError::NotUtf8)?;
    let mut lines = Vec::new();
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        let (key, value) = line.split_once('=').ok_or_else(|| NotifyError::BadLine {
            line: line.to_string(),
        })?;
        let mut bytes = key.bytes();
        let key_ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !key_ok {
            return Err(NotifyError::BadKey {
                key: key.to_string(),
            });
        }
        lines.push((key, value));
    }
    let fd_name = match lines.iter().find(|(k, _)| *k == "FDNAME") {
        Some((_, name)) if !fd_name_is_valid(name) => {
            return Err(NotifyError::BadFdName {
                name: name.to_string(),
            })
        }
        Some((_, name)) => Some(name.to_string()),
        None => None,
    };
    let mut items = Vec::new();
    for (key, value) in lines {
        let bad = || NotifyError::BadValue {
            key: key.to_string(),
            value: value.to_string(),
        };
        let one = |item: Notification| if value == "1" { Ok(item) } else { Err(bad()) };
        let item = match key {
            "READY" => one(Notification::Ready)?,
            "RELOADING" => one(Notification::Reloading)?,
            "STOPPING" => one(Notification::Stopping)?,
            "BARRIER" => one(Notification::Barrier)?,
            "STATUS" => Notification::Status(value.to_string()),
            "MAINPID" => match number(value).and_then(|n| i32::try_from(n).ok()) {
                Some(pid) if pid > 0 => Notification::MainPid(pid),
                _ => return Err(bad()),
            },
            "EXTEND_TIMEOUT_USEC" => {
                Notification::ExtendTimeout(Duration::from_micros(number(value).ok_or_else(bad)?))
            }
            "WATCHDOG" => match value {
                "1" => Notification::Watchdog,
                "trigger" => Notification::WatchdogTrigger,
                _ => return Err(bad()),
            },
            "WATCHDOG_USEC" => {
                Notification::WatchdogUsec(Duration::from_micros(number(value).ok_or_else(bad)?))
            }
            "ERRNO" => match number(value).and_then(|n| i32::try_from(n).ok()) {
                Some(e) if e <= MAX_ERRNO => Notification::Errno(e),
                _ => return Err(bad()),
            },
            "FDSTORE" => one(Notification::FdStore {
                name: fd_name.clone(),
            })?,
            "FDSTOREREMOVE" => {
                if value != "1" {
                    return Err(bad());
                }
                Notification::FdStoreRemove {
                    name: fd_name.clone().ok_or(NotifyError::NoFdName)?,
                }
            }
            "FDNAME" => continue,
            _ => Notification::Other(key.to_string(), value.to_string()),
        };
        items.push(item);
    }
    Ok(items)
}

/// A plain decimal number: digits only, no sign, no spaces.
fn number(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;
    use Notification as N;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn parse_accepts_every_key_with_systemds_meaning() {
        let cases: Vec<(&str, Vec<Notification>)> = vec![
            ("", vec![]),
            ("\n\n", vec![]),
            ("READY=1", vec![N::Ready]),
            ("READY=1\n", vec![N::Ready]),
            ("RELOADING=1", vec![N::Reloading]),
            ("STOPPING=1", vec![N::Stopping]),
            ("STATUS=hello world", vec![N::Status("hello world".into())]),
            ("STATUS=", vec![N::Status(String::new())]),
            ("STATUS=a=b", vec![N::Status("a=b".into())]),
            ("STATUS=é ✓", vec![N::Status("é ✓".into())]),
            ("MAINPID=4242", vec![N::MainPid(4242)]),
            (
                "EXTEND_TIMEOUT_USEC=5000000",
                vec![N::ExtendTimeout(us(5_000_000))],
            ),
            ("WATCHDOG=1", vec![N::Watchdog]),
            ("WATCHDOG=trigger", vec![N::WatchdogTrigger]),
            ("WATCHDOG_USEC=250000", vec![N::WatchdogUsec(us(250_000))]),
            ("WATCHDOG_USEC=0", vec![N::WatchdogUsec(Duration::ZERO)]),
            ("ERRNO=2", vec![N::Errno(2)]),
            ("ERRNO=0", vec![N::Errno(0)]),
            ("ERRNO=4095", vec![N::Errno(4095)]),
            ("BARRIER=1", vec![N::Barrier]),
            ("FDSTORE=1", vec![N::FdStore { name: None }]),
            (
                "FDSTORE=1\nFDNAME=conn-7",
                vec![N::FdStore {
                    name: Some("conn-7".into()),
                }],
            ),
            (
                "FDNAME=first\nFDSTORE=1\nFDNAME=second",
                vec![N::FdStore {
                    name: Some("first".into()),
                }],
            ),
            (
                "FDSTOREREMOVE=1\nFDNAME=conn-7",
                vec![N::FdStoreRemove {
                    name: "conn-7".into(),
                }],
            ),
            ("FDNAME=lonely", vec![]),
            (
                "BUSERROR=org.x.Err",
                vec![N::Other("BUSERROR".into(), "org.x.Err".into())],
            ),
            (
                "X_CUSTOM=",
                vec![N::Other("X_CUSTOM".into(), String::new())],
            ),
            (
                "lower_key=v",
                vec![N::Other("lower_key".into(), "v".into())],
            ),
            (
                "READY=1\nSTATUS=up\nMAINPID=7\nWATCHDOG=1\n",
                vec![N::Ready, N::Status("up".into()), N::MainPid(7), N::Watchdog],
            ),
        ];
        for (payload, want) in cases {
            let got = parse(payload.as_bytes()).unwrap_or_else(|e| panic!("{payload:?}: {e}"));
            assert_eq!(got, want, "payload {payload:?}");
        }
    }

    #[test]
    fn parse_refuses_malformed_messages_whole() {
        let long_name = format!("FDSTORE=1\nFDNAME={}", "n".repeat(256));
        let just_fits = "x".repeat(MAX_MESSAGE);
        let too_long = "x".repeat(MAX_MESSAGE + 1);
        let cases: Vec<(&[u8], &str)> = vec![
            (b"READY", "line without ="),
            (b"READY=1\ngarbage", "line without ="),
            (b"=1", "empty key"),
            (b"1KEY=1", "key starting with a digit"),
            (b"RE ADY=1", "space in key"),
            (b"READY-X=1", "dash in key"),
            (b"READY=0", "READY other than 1"),
            (b"READY=yes", "READY other than 1"),
            (b"STOPPING=2", "STOPPING other than 1"),
            (b"RELOADING=", "RELOADING empty"),
            (b"BARRIER=0", "BARRIER other than 1"),
            (b"FDSTORE=0", "FDSTORE other than 1"),
            (b"FDSTOREREMOVE=1", "FDSTOREREMOVE without FDNAME"),
            (b"FDSTOREREMOVE=yes\nFDNAME=a", "FDSTOREREMOVE other than 1"),
            (b"MAINPID=0", "pid zero"),
            (b"MAINPID=-5", "negative pid"),
            (b"MAINPID=+5", "signed pid"),
            (b"MAINPID= 5", "space before pid"),
            (b"MAINPID=abc", "pid not a number"),
            (b"MAINPID=2147483648", "pid over i32"),
            (b"MAINPID=", "empty pid"),
            (b"EXTEND_TIMEOUT_USEC=1.5", "fractional usec"),
            (b"EXTEND_TIMEOUT_USEC=18446744073709551616", "usec over u64"),
            (b"WATCHDOG_USEC=-1", "negative usec"),
            (b"WATCHDOG_USEC=5s", "usec with unit"),
            (b"WATCHDOG=0", "WATCHDOG neither 1 nor trigger"),
            (b"WATCHDOG=Trigger", "WATCHDOG trigger is case-sensitive"),
            (b"ERRNO=-1", "negative errno"),
            (b"ERRNO=4096", "errno over 4095"),
            (b"ERRNO=ENOENT", "errno by name"),
            (b"FDSTORE=1\nFDNAME=", "empty fd name"),
            (b"FDSTORE=1\nFDNAME=a:b", "colon in fd name"),
            (b"FDSTORE=1\nFDNAME=a b", "space in fd name"),
            (b"FDSTORE=1\nFDNAME=a\tb", "control char in fd name"),
            ("FDSTORE=1\nFDNAME=é".as_bytes(), "non-ASCII fd name"),
            (long_name.as_bytes(), "fd name over 255"),
            (b"READY=1\xff", "not UTF-8"),
            (b"\xc3\x28", "not UTF-8"),
            (b"READY=1\0STATUS=x", "NUL byte"),
            (too_long.as_bytes(), "over 4096 bytes"),
        ];
        for (payload, why) in cases {
            let shown = String::from_utf8_lossy(&payload[..payload.len().min(40)]);
            match parse(payload) {
                Ok(items) => panic!("{why}: {shown:?} parsed as {items:?}"),
                Err(e) => assert!(!e.to_string().is_empty(), "{why}"),
            }
        }
        // The limit is inclusive: exactly MAX_MESSAGE bytes is a (malformed
        // here) message, not an oversized one.
        assert!(matches!(
            parse(just_fits.as_bytes()),
            Err(NotifyError::BadLine { .. })
        ));
        assert!(matches!(
            parse(too_long.as_bytes()),
            Err(NotifyError::Oversized { len }) if len == MAX_MESSAGE + 1
        ));
    }

    #[test]
    fn fd_names_follow_systemd() {
        assert!(fd_name_is_valid("stored"));
        assert!(fd_name_is_valid(&"n".repeat(MAX_FD_NAME)));
        assert!(fd_name_is_valid("a.b-c_d@e~!"));
        for bad in [
            "",
            "a:b",
            "a b",
            "a\nb",
            "\x7f",
            "é",
            &"n".repeat(MAX_FD_NAME + 1),
        ] {
            assert!(!fd_name_is_valid(bad), "{bad:?}");
        }
        assert_eq!(Notification::fd_name(&None), DEFAULT_FD_NAME);
        assert_eq!(Notification::fd_name(&Some("x".into())), "x");
    }
}
