//! Fuzz harnesses that run on stable Rust as ordinary tests (so in `cargo
//! xtask test`), as systemd fuzzes its unit parser: a fixed-seed mutation
//! loop over the committed corpus in `supervisor/fuzz/corpus/` (every valid
//! key, and every input that ever failed), for the three parsers that read
//! what others write: the unit file, the notify datagram and the control
//! request. Each input must not panic and must take under a second; what
//! parses must survive parse → serialize → parse unchanged.
//!
//! An input that fails is printed escaped: add it to the corpus directory
//! of its target (one file per input) with the fix, so it is tried forever.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::control::Request;
use crate::notify::{self, Notification};
use crate::unit;

/// The longest any one input may take.
const PER_INPUT: Duration = Duration::from_secs(1);

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// Every file of a target's corpus, sorted by name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files
}

/// xorshift64*, seeded: the same cases every run, no dependency (the unit
/// tests' generated units use it too).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A number below `n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    pub(crate) fn chance(&mut self) -> bool {
        self.next() & 1 == 1
    }
    /// An index below `n`.
    fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }
}

/// Pieces worth inserting: syntax, limits, and values near the edges.
const TOKENS: &[&str] = &[
    "=",
    "\n",
    "\"",
    "'",
    "[",
    "]",
    "{",
    "}",
    ",",
    ".",
    "-",
    ":",
    "/",
    "#",
    "\\",
    " ",
    "\0",
    "é",
    "[[socket]]",
    "[service]",
    "= \"",
    "0",
    "1",
    "-1",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999s",
    "1year",
    "2years",
    "0s",
    "1ns",
    "0o7777",
    "::",
    "::ffff:1.2.3.4",
    "/0",
    "/129",
    "65536",
    "true",
    "nan",
    "inf",
    "1e999",
    "READY=1",
    "FDNAME=",
    "FDSTORE=1",
    "MAINPID=",
    "_USEC=",
    "\"command\":",
    "\"name\":",
    "null",
    "{\"command\":\"stop\"}",
    "\\u0000",
    "\u{10ffff}",
];

/// One to four random edits of `input`: delete, overwrite, insert a byte or
/// a token, duplicate a slice, or splice in a piece of `other`.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.index(4) {
        let at = rng.index(out.len() + 1);
        match rng.index(6) {
            0 if at < out.len() => {
                let len = 1 + rng.index(8).min(out.len() - at - 1);
                out.drain(at..at + len);
            }
            1 if at < out.len() => out[at] = rng.next() as u8,
            2 => {
                let token = TOKENS[rng.index(TOKENS.len())].as_bytes();
                out.splice(at..at, token.iter().copied());
            }
            3 if at < out.len() => {
                let end = (at + 1 + rng.index(32)).min(out.len());
                let piece = out[at..end].to_vec();
                out.splice(at..at, piece);
            }
            4 if !other.is_empty() => {
                let from = rng.index(other.len());
                let end = (from + 1 + rng.index(64)).min(other.len());
                out.splice(at..at, other[from..end].iter().copied());
            }
            _ => out.insert(at, b"=\n\"[]{}:,.0123456789aZ_-/ "[rng.index(26)]),
        }
    }
    out
}

/// Runs `check` on every corpus entry, then on `iterations` mutants; a panic
/// or a slow input fails with the input shown so it can join the corpus.
fn run(target: &str, iterations: usize, seed: u64, check: impl Fn(&[u8])) {
    let corpus = corpus(target);
    let mut rng = Rng(seed);
    let one = |input: &[u8], what: &str| {
        let start = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(input)));
        let took = start.elapsed();
        let shown = String::from_utf8_lossy(input).escape_debug().to_string();
        if let Err(panic) = result {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            panic!(
                "{target} fuzz: {what} failed: {why}\ninput (add it to {}): \"{shown}\"",
                corpus_dir(target).display()
            );
        }
        assert!(
            took < PER_INPUT,
            "{target} fuzz: {what} took {took:?}\ninput (add it to {}): \"{shown}\"",
            corpus_dir(target).display()
        );
    };
    for (name, input) in &corpus {
        one(input, &format!("corpus file {name}"));
    }
    for i in 0..iterations {
        let (_, base) = &corpus[rng.index(corpus.len())];
        let (_, other) = &corpus[rng.index(corpus.len())];
        let input = mutate(&mut rng, base, other);
        one(&input, &format!("mutant {i}"));
    }
}

/// parse → validate → to_toml → parse again must agree; a refusal must say
/// something and point inside the text.
fn check_unit(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return; // load_dir refuses a file that is not UTF-8 before parsing
    };
    let path = Path::new("fuzz.toml");
    match unit::parse_unit("fuzz", path, text) {
        Ok(u) => {
            if let Err(e) = unit::validate_set(std::slice::from_ref(&u)) {
                panic!("one valid unit fails validate_set: {e}");
            }
            let written = unit::to_toml(&u);
            match unit::parse_unit("fuzz", path, &written) {
                Ok(again) => assert_eq!(again, u, "round trip through:\n{written}"),
                Err(e) => panic!("to_toml wrote a unit that does not parse:\n{written}\n{e}"),
            }
        }
        Err(diags) => {
            assert!(!diags.is_empty(), "refused with no diagnostic");
            for d in &diags {
                assert!(!d.message.is_empty(), "empty message: {d:?}");
                assert!(d.line <= text.lines().count() + 1, "{d} is past the end");
            }
        }
    }
}

/// The items as a datagram, the way a service would send them.
fn notify_text(items: &[Notification]) -> String {
    let mut lines = Vec::new();
    let mut fd_name = None;
    for item in items {
        let line = match item {
            Notification::Ready => "READY=1".to_string(),
            Notification::Reloading => "RELOADING=1".to_string(),
            Notification::Stopping => "STOPPING=1".to_string(),
            Notification::Status(s) => format!("STATUS={s}"),
            Notification::MainPid(p) => format!("MAINPID={p}"),
            Notification::ExtendTimeout(d) => format!("EXTEND_TIMEOUT_USEC={}", d.as_micros()),
            Notification::Watchdog => "WATCHDOG=1".to_string(),
            Notification::WatchdogTrigger => "WATCHDOG=trigger".to_string(),
            Notification::WatchdogUsec(d) => format!("WATCHDOG_USEC={}", d.as_micros()),
            Notification::Errno(e) => format!("ERRNO={e}"),
            Notification::FdStore { name } => {
                fd_name = fd_name.or(name.clone());
                "FDSTORE=1".to_string()
            }
            Notification::FdStoreRemove { name } => {
                fd_name = fd_name.or(Some(name.clone()));
                "FDSTOREREMOVE=1".to_string()
            }
            Notification::Barrier => "BARRIER=1".to_string(),
            Notification::Other(k, v) => format!("{k}={v}"),
        };
        lines.push(line);
    }
    if let Some(name) = fd_name {
        lines.push(format!("FDNAME={name}"));
    }
    lines.join("\n")
}

/// parse → the items as text → parse again gives the same items, with
/// nothing ignored; every ignored field says why.
fn check_notify(input: &[u8]) {
    let Ok(parsed) = notify::parse(input) else {
        return;
    };
    for e in &parsed.ignored {
        assert!(!e.to_string().is_empty());
    }
    let text = notify_text(&parsed.items);
    let again = notify::parse(text.as_bytes())
        .unwrap_or_else(|e| panic!("the items as text are refused: {e}\n{text}"));
    assert_eq!(again.items, parsed.items, "through:\n{text}");
    assert!(
        again.ignored.is_empty(),
        "{:?} through:\n{text}",
        again.ignored
    );
}

/// A request that parses survives serialize → parse unchanged.
fn check_control(input: &[u8]) {
    let Ok(request) = serde_json::from_slice::<Request>(input) else {
        return;
    };
    let text = serde_json::to_string(&request).expect("requests serialize");
    let again: Request = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("the request as JSON is refused: {e}\n{text}"));
    assert_eq!(again, request, "through {text}");
}

#[test]
fn fuzz_unit_parser() {
    run("unit", 4000, 0x5eed_0001, check_unit);
}

#[test]
fn fuzz_notify_parser() {
    run("notify", 30_000, 0x5eed_0002, check_notify);
}

#[test]
fn fuzz_control_request_parser() {
    run("control", 30_000, 0x5eed_0003, check_control);
}

#[test]
fn the_unit_corpus_has_every_valid_key() {
    let files = corpus("unit");
    // A key counts only where it is used validly: every file parses, but
    // those named *-refused.toml (inputs that must be refused).
    for (name, text) in &files {
        let text = std::str::from_utf8(text).unwrap();
        let parsed = unit::parse_unit("fuzz", Path::new(name), text);
        assert_eq!(
            parsed.is_err(),
            name.ends_with("-refused.toml"),
            "{name}: {parsed:?}"
        );
    }
    let corpus: Vec<String> = files
        .into_iter()
        .map(|(_, text)| String::from_utf8(text).unwrap())
        .collect();
    let used = |key: &str| {
        corpus.iter().any(|text| {
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("{key} =")))
        })
    };
    let missing: Vec<&str> = unit::SERVICE_KEYS
        .iter()
        .chain(unit::SOCKET_KEYS)
        .copied()
        .filter(|k| *k != "environment" && !used(k))
        .collect();
    assert!(
        missing.is_empty(),
        "keys no file of {} uses: {missing:?} (add a valid use of each)",
        corpus_dir("unit").display()
    );
}

#[test]
fn the_notify_and_control_corpora_have_every_key_and_command() {
    let notify: Vec<u8> = corpus("notify").into_iter().flat_map(|(_, b)| b).collect();
    let notify = String::from_utf8_lossy(&notify);
    for key in [
        "READY=",
        "RELOADING=",
        "STOPPING=",
        "STATUS=",
        "MAINPID=",
        "EXTEND_TIMEOUT_USEC=",
        "WATCHDOG=1",
        "WATCHDOG=trigger",
        "WATCHDOG_USEC=",
        "ERRNO=",
        "FDSTORE=",
        "FDSTOREREMOVE=",
        "FDNAME=",
        "BARRIER=",
    ] {
        assert!(notify.contains(key), "no notify corpus file has {key}");
    }
    let requests: Vec<Request> = corpus("control")
        .into_iter()
        .filter_map(|(_, b)| serde_json::from_slice(&b).ok())
        .collect();
    let commands: std::collections::BTreeSet<String> = requests
        .iter()
        .map(|r| {
            serde_json::to_value(r).unwrap()["command"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for c in [
        "status", "start", "stop", "restart", "bindings", "metrics", "reload", "logs",
    ] {
        assert!(
            commands.contains(c),
            "no control corpus file has a valid {c:?} request"
        );
    }
}
