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

/// The longest duration EXTEND_TIMEOUT_USEC= and WATCHDOG_USEC= give: a
/// larger value (up to systemd's "infinity", u64::MAX) is taken as one year,
/// so every deadline the supervisor computes from it stays representable.
pub const MAX_USEC_DURATION: Duration = Duration::from_secs(31_557_600);

/// What one datagram says: the items it carries, in order, and each field
/// that was ignored with why (for the socket side to log).
#[derive(Debug, Default)]
pub struct Parsed {
    pub items: Vec<Notification>,
    pub ignored: Vec<NotifyError>,
}

/// Parses one datagram's payload field by field, as systemd does: a
/// malformed field (a line that is not UTF-8 or has no `=`, a key that is
/// not `[A-Za-z_][A-Za-z0-9_]*`, a known key with a bad value, an invalid
/// FDNAME, FDSTOREREMOVE=1 without a valid FDNAME) is ignored and reported in
/// [`Parsed::ignored`]; the other fields apply. FDSTORE=1 with an invalid
/// FDNAME stores under [`DEFAULT_FD_NAME`], as in systemd. Only a message of
/// more than [`MAX_MESSAGE`] bytes, or one with a NUL byte, is refused
/// whole. Empty lines are skipped; an empty payload gives no items. When
/// FDNAME= appears more than once the first counts, as in systemd.
pub fn parse(payload: &[u8]) -> Result<Parsed, NotifyError> {
    if payload.len() > MAX_MESSAGE {
        return Err(NotifyError::Oversized { len: payload.len() });
    }
    if payload.contains(&0) {
        return Err(NotifyError::Nul);
    }
    let mut parsed = Parsed::default();
    let lines = fields(payload, &mut parsed.ignored);
    let fd_name = match lines.iter().find(|(k, _)| *k == "FDNAME") {
        Some((_, name)) if !fd_name_is_valid(name) => {
            parsed.ignored.push(NotifyError::BadFdName {
                name: name.to_string(),
            });
            None
        }
        Some((_, name)) => Some(name.to_string()),
        None => None,
    };
    for (key, value) in lines {
        match field(key, value, &fd_name) {
            Field::Item(item) => parsed.items.push(item),
            Field::Skip => {}
            Field::Bad(e) => parsed.ignored.push(e),
        }
    }
    Ok(parsed)
}

/// The `KEY=VALUE` lines of a payload; a line that is not UTF-8, has no
/// `=` or a key systemd would not take goes to `ignored`.
fn fields<'a>(payload: &'a [u8], ignored: &mut Vec<NotifyError>) -> Vec<(&'a str, &'a str)> {
    let mut lines = Vec::new();
    for raw in payload.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(line) = std::str::from_utf8(raw) else {
            ignored.push(NotifyError::NotUtf8 {
                line: String::from_utf8_lossy(raw).into_owned(),
            });
            continue;
        };
        let Some((key, value)) = line.split_once('=') else {
            ignored.push(NotifyError::BadLine {
                line: line.to_string(),
            });
            continue;
        };
        let mut bytes = key.bytes();
        let key_ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !key_ok {
            ignored.push(NotifyError::BadKey {
                key: key.to_string(),
            });
            continue;
        }
        lines.push((key, value));
    }
    lines
}

/// What one field of a message says.
enum Field {
    Item(Notification),
    /// Read with another field (FDNAME=, with FDSTORE=).
    Skip,
    Bad(NotifyError),
}

/// One `KEY=VALUE` field, with the message's valid FDNAME= if any.
fn field(key: &str, value: &str, fd_name: &Option<String>) -> Field {
    let usec = |value: &str| number(value).map(|n| Duration::from_micros(n).min(MAX_USEC_DURATION));
    let flag = |item: Notification| (value == "1").then_some(item);
    let item = match key {
        "READY" => flag(Notification::Ready),
        "RELOADING" => flag(Notification::Reloading),
        "STOPPING" => flag(Notification::Stopping),
        "BARRIER" => flag(Notification::Barrier),
        "STATUS" => Some(Notification::Status(value.to_string())),
        "MAINPID" => number(value)
            .and_then(|n| i32::try_from(n).ok())
            .filter(|&pid| pid > 0)
            .map(Notification::MainPid),
        "EXTEND_TIMEOUT_USEC" => usec(value).map(Notification::ExtendTimeout),
        "WATCHDOG" => match value {
            "1" => Some(Notification::Watchdog),
            "trigger" => Some(Notification::WatchdogTrigger),
            _ => None,
        },
        "WATCHDOG_USEC" => usec(value).map(Notification::WatchdogUsec),
        "ERRNO" => number(value)
            .and_then(|n| i32::try_from(n).ok())
            .filter(|&e| e <= MAX_ERRNO)
            .map(Notification::Errno),
        "FDSTORE" => flag(Notification::FdStore {
            name: fd_name.clone(),
        }),
        "FDSTOREREMOVE" if value == "1" => {
            return match fd_name {
                Some(name) => Field::Item(Notification::FdStoreRemove { name: name.clone() }),
                None => Field::Bad(NotifyError::NoFdName),
            }
        }
        "FDSTOREREMOVE" => None,
        "FDNAME" => return Field::Skip,
        _ => Some(Notification::Other(key.to_string(), value.to_string())),
    };
    match item {
        Some(item) => Field::Item(item),
        None => Field::Bad(NotifyError::BadValue {
            key: key.to_string(),
            value: value.to_string(),
        }),
    }
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
            assert_eq!(got.items, want, "payload {payload:?}");
            assert!(got.ignored.is_empty(), "{payload:?}: {:?}", got.ignored);
        }
    }

    #[test]
    fn a_bad_field_is_ignored_and_the_rest_applied() {
        // The issue's own datagrams: systemd applies READY=1 and STATUS=.
        let got = parse(b"READY=1\nMAINPID=0\nSTATUS=one").unwrap();
        assert_eq!(got.items, vec![N::Ready, N::Status("one".into())]);
        assert!(
            matches!(&got.ignored[..], [NotifyError::BadValue { key, value }] if key == "MAINPID" && value == "0"),
            "{:?}",
            got.ignored
        );
        let got = parse(b"READY=1\ngarbage\nSTATUS=two\n").unwrap();
        assert_eq!(got.items, vec![N::Ready, N::Status("two".into())]);
        assert!(matches!(&got.ignored[..], [NotifyError::BadLine { line }] if line == "garbage"));

        let long_name = format!("FDNAME={}", "n".repeat(256));
        // Each bad field between two good ones: the good ones apply, the bad
        // one comes back once, with a message.
        let cases: Vec<(&[u8], &str)> = vec![
            (b"READY", "line without ="),
            (b"garbage", "line without ="),
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
            (b"FDSTOREREMOVE=yes", "FDSTOREREMOVE other than 1"),
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
            (b"FDNAME=", "empty fd name"),
            (b"FDNAME=a:b", "colon in fd name"),
            (b"FDNAME=a b", "space in fd name"),
            (b"FDNAME=a\tb", "control char in fd name"),
            ("FDNAME=é".as_bytes(), "non-ASCII fd name"),
            (long_name.as_bytes(), "fd name over 255"),
            (b"STATUS=\xff", "not UTF-8"),
            (b"\xc3\x28", "not UTF-8"),
        ];
        for (bad, why) in cases {
            let payload = [&b"STATUS=before\n"[..], bad, b"\nWATCHDOG=1"].concat();
            let shown = String::from_utf8_lossy(&bad[..bad.len().min(40)]);
            let got =
                parse(&payload).unwrap_or_else(|e| panic!("{why}: {shown:?} refused whole: {e}"));
            assert_eq!(
                got.items,
                vec![N::Status("before".into()), N::Watchdog],
                "{why}: {shown:?}"
            );
            assert_eq!(got.ignored.len(), 1, "{why}: {shown:?}: {:?}", got.ignored);
            assert!(!got.ignored[0].to_string().is_empty(), "{why}");
        }
        // FDSTORE=1 with an invalid FDNAME stores under the default name, as systemd.
        let got = parse(b"FDSTORE=1\nFDNAME=a:b").unwrap();
        assert_eq!(got.items, vec![N::FdStore { name: None }]);
        assert!(matches!(&got.ignored[..], [NotifyError::BadFdName { .. }]));
        // FDSTOREREMOVE=1 with an invalid FDNAME removes nothing.
        let got = parse(b"FDSTOREREMOVE=1\nFDNAME=a b").unwrap();
        assert_eq!(got.items, vec![]);
        assert_eq!(got.ignored.len(), 2, "{:?}", got.ignored);
    }

    #[test]
    fn huge_usec_values_are_capped_not_overflowing() {
        for key in ["EXTEND_TIMEOUT_USEC", "WATCHDOG_USEC"] {
            let got = parse(format!("{key}=18446744073709551615").as_bytes()).unwrap();
            let d = match got.items[..] {
                [N::ExtendTimeout(d) | N::WatchdogUsec(d)] => d,
                _ => panic!("{key}: {:?}", got.items),
            };
            assert_eq!(d, MAX_USEC_DURATION, "{key}");
            // A deadline from it is representable.
            assert!(std::time::Instant::now().checked_add(d).is_some());
        }
    }

    #[test]
    fn only_nul_and_oversized_messages_are_refused_whole() {
        let just_fits = "x".repeat(MAX_MESSAGE);
        let too_long = "x".repeat(MAX_MESSAGE + 1);
        assert!(matches!(parse(b"READY=1\0STATUS=x"), Err(NotifyError::Nul)));
        // The limit is inclusive: exactly MAX_MESSAGE bytes is a (malformed
        // here) message, not an oversized one.
        let got = parse(just_fits.as_bytes()).unwrap();
        assert!(got.items.is_empty());
        assert!(matches!(&got.ignored[..], [NotifyError::BadLine { .. }]));
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
