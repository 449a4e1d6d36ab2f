//! The value syntaxes of systemd's directives: quoted words with C escapes
//! (ExecStart=, Environment=), booleans, time spans, byte sizes, `%`
//! specifiers, `$VAR` expansion and the prefixes of an exec line. Pure
//! functions: a problem comes back as text for the report.

use std::collections::BTreeMap;
use std::time::Duration;

/// Words split at whitespace, with `"…"` and `'…'` quoting and C escapes
/// (`\n`, `\t`, `\\`, `\"`, `\s`, `\xNN`, `\NNN`), as systemd's
/// `extract_first_word(…, EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE)`.
pub fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(words);
        }
        let mut word = String::new();
        let mut quote: Option<char> = None;
        while let Some(c) = chars.next() {
            match (c, quote) {
                ('\\', _) => {
                    let Some(e) = chars.next() else {
                        return Err(format!("{s:?} ends in a lone backslash"));
                    };
                    word.push(match e {
                        'a' => '\u{7}',
                        'b' => '\u{8}',
                        'f' => '\u{c}',
                        'n' => '\n',
                        'r' => '\r',
                        't' => '\t',
                        'v' => '\u{b}',
                        's' => ' ',
                        'x' => {
                            let hex: String = (0..2).filter_map(|_| chars.next()).collect();
                            let n = u8::from_str_radix(&hex, 16)
                                .map_err(|_| format!("bad escape \\x{hex} in {s:?}"))?;
                            char::from(n)
                        }
                        '0'..='7' => {
                            let mut oct = e.to_string();
                            for _ in 0..2 {
                                match chars.next() {
                                    Some(d @ '0'..='7') => oct.push(d),
                                    _ => return Err(format!("bad escape \\{oct} in {s:?}")),
                                }
                            }
                            let n = u8::from_str_radix(&oct, 8)
                                .map_err(|_| format!("bad escape \\{oct} in {s:?}"))?;
                            char::from(n)
                        }
                        other => other,
                    });
                }
                (q @ ('"' | '\''), None) => quote = Some(q),
                (c, Some(q)) if c == q => quote = None,
                (c, None) if c.is_whitespace() => break,
                (c, _) => word.push(c),
            }
        }
        if quote.is_some() {
            return Err(format!("{s:?} has an unclosed quote"));
        }
        words.push(word);
    }
}

/// systemd's booleans: 1/yes/y/true/t/on and 0/no/n/false/f/off.
pub fn boolean(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "yes" | "y" | "true" | "t" | "on" => Ok(true),
        "0" | "no" | "n" | "false" | "f" | "off" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (yes/no)")),
    }
}

/// A time span: `5` (seconds), `100ms`, `1min 30s`, `1.5h`; `None` for
/// `infinity`.
pub fn timespan(s: &str) -> Result<Option<Duration>, String> {
    let s = s.trim();
    if s == "infinity" {
        return Ok(None);
    }
    let bad = || format!("{s:?} is not a time span (e.g. \"5s\", \"100ms\", \"1min 30s\")");
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        rest = rest.trim_start();
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = rest[num_end..].trim_start();
        let unit_end = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_end] {
            "" | "s" | "sec" | "second" | "seconds" => 1.0,
            "us" | "usec" | "µs" => 1e-6,
            "ms" | "msec" => 1e-3,
            "ns" | "nsec" => 1e-9,
            "m" | "min" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hour" | "hours" => 3600.0,
            "d" | "day" | "days" => 86400.0,
            "w" | "week" | "weeks" => 604_800.0,
            "M" | "month" | "months" => 2_629_800.0,
            "y" | "year" | "years" => 31_557_600.0,
            _ => return Err(bad()),
        };
        total += number * seconds;
        rest = &rest[unit_end..];
    }
    // holdfast takes durations up to a year (unit::parse's MAX_DURATION).
    if total > 31_557_600.0 {
        return Err(format!(
            "{s:?} is longer than a year, the most holdfast takes"
        ));
    }
    Duration::try_from_secs_f64(total)
        .map(Some)
        .map_err(|_| bad())
}

/// A byte size: `65536`, `8K`, `1M` (powers of 1024).
pub fn size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size (e.g. \"65536\", \"8K\", \"1M\")");
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits].parse().map_err(|_| bad())?;
    let shift = match s[digits..].trim() {
        "" | "B" => 0,
        "K" | "KB" => 10,
        "M" | "MB" => 20,
        "G" | "GB" => 30,
        "T" | "TB" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// What the `%` specifiers stand for in one file: the unit's names and the
/// system manager's fixed directories.
pub struct Specifiers {
    /// The unit file's full name with the instance filled in: `foo@bar.service`.
    pub full_name: String,
    /// The instance, for templates.
    pub instance: Option<String>,
}

/// Undoes systemd's unit name escaping: `\xNN` is that byte, `-` is `/`.
fn unescape(s: &str) -> String {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'-' => out.push(b'/'),
            b'\\' if bytes.get(i + 1) == Some(&b'x') => {
                let hex = bytes
                    .get(i + 2..i + 4)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => out.push(b'\\'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Specifiers {
    fn stem(&self) -> &str {
        self.full_name
            .rsplit_once('.')
            .map_or(self.full_name.as_str(), |(a, _)| a)
    }
    fn prefix(&self) -> &str {
        let stem = self.stem();
        stem.split_once('@').map_or(stem, |(p, _)| p)
    }

    /// `s` with every specifier replaced. A specifier whose value depends
    /// on the host or the moment (`%H`, `%m`, `%b`, …) is refused: written
    /// out at import time it would be wrong elsewhere.
    pub fn expand(&self, s: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let Some(spec) = chars.next() else {
                return Err(format!(
                    "{s:?} ends in a lone %; write %% for a percent sign"
                ));
            };
            let instance = || {
                self.instance.clone().ok_or_else(|| {
                    format!(
                        "%{spec} is the instance name, and this unit is not a template instance"
                    )
                })
            };
            let prefix = self.prefix();
            let last_dash = |p: &str| p.rsplit_once('-').map_or(p, |(_, b)| b).to_string();
            match spec {
                '%' => out.push('%'),
                'n' => out.push_str(&self.full_name),
                'N' => out.push_str(self.stem()),
                'p' => out.push_str(prefix),
                'P' => out.push_str(&unescape(prefix)),
                'i' => out.push_str(&instance()?),
                'I' => out.push_str(&unescape(&instance()?)),
                'j' => out.push_str(&last_dash(prefix)),
                'J' => out.push_str(&unescape(&last_dash(prefix))),
                'f' => {
                    let name = self.instance.as_deref().unwrap_or(prefix);
                    let name = unescape(name);
                    out.push('/');
                    out.push_str(name.trim_start_matches('/'));
                }
                't' => out.push_str("/run"),
                'S' => out.push_str("/var/lib"),
                'C' => out.push_str("/var/cache"),
                'L' => out.push_str("/var/log"),
                'E' => out.push_str("/etc"),
                'T' => out.push_str("/tmp"),
                'V' => out.push_str("/var/tmp"),
                'H' | 'l' | 'q' | 'm' | 'b' | 'v' | 'a' | 'A' | 'B' | 'M' | 'o' | 'w' | 'W' => {
                    return Err(format!(
                        "%{spec} depends on the host it runs on; write its value out"
                    ))
                }
                'u' | 'U' | 'g' | 'G' | 'h' | 's' => {
                    return Err(format!(
                        "%{spec} depends on the service's user; write its value out"
                    ))
                }
                other => return Err(format!("%{other} is not a specifier systemd knows")),
            }
        }
        Ok(out)
    }
}

/// One exec line (`ExecStart=` and its kin) after its prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecLine {
    /// `-`: a failing exit code is not a failure.
    pub ignore_failure: bool,
    /// `@`: the second word is argv[0].
    pub argv0: bool,
    /// `:`: no `$VAR` expansion.
    pub no_env: bool,
    /// `+`, `!`, `!!`, `|`: privilege and shell prefixes holdfast has no equivalent for.
    pub unsupported: Vec<char>,
    /// The words, `$VAR`s not yet expanded.
    pub words: Vec<String>,
}

pub fn exec_line(s: &str) -> Result<ExecLine, String> {
    let mut line = ExecLine {
        ignore_failure: false,
        argv0: false,
        no_env: false,
        unsupported: Vec::new(),
        words: Vec::new(),
    };
    let mut rest = s.trim_start();
    while let Some(c) = rest.chars().next() {
        match c {
            '-' => line.ignore_failure = true,
            '@' => line.argv0 = true,
            ':' => line.no_env = true,
            '+' | '!' | '|' => {
                if !line.unsupported.contains(&c) {
                    line.unsupported.push(c);
                }
            }
            _ => break,
        }
        rest = &rest[1..];
    }
    line.words = split_words(rest)?;
    if line.words.is_empty() {
        return Err("the command line is empty".into());
    }
    if line.words.iter().any(|w| w == ";") {
        return Err("several commands on one line (\";\") are not supported".into());
    }
    Ok(line)
}

/// `$VAR` as a word of its own becomes the variable's value split at
/// whitespace (zero or more words); `${VAR}` anywhere becomes its value.
/// A variable not in `env` stands for nothing, as in systemd; each one is
/// returned so the report can say so.
pub fn expand_env(words: &[String], env: &BTreeMap<String, String>) -> (Vec<String>, Vec<String>) {
    let mut missing = Vec::new();
    let mut out = Vec::new();
    let is_name = |n: &str| {
        !n.is_empty()
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for w in words {
        if let Some(name) = w.strip_prefix('$').filter(|n| is_name(n)) {
            match env.get(name) {
                Some(v) => out.extend(v.split_whitespace().map(str::to_string)),
                None => missing.push(name.to_string()),
            }
            continue;
        }
        let mut word = String::new();
        let mut rest = w.as_str();
        while let Some(start) = rest.find("${") {
            word.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            match after.find('}') {
                Some(end) if is_name(&after[..end]) => {
                    let name = &after[..end];
                    match env.get(name) {
                        Some(v) => word.push_str(v),
                        None => missing.push(name.to_string()),
                    }
                    rest = &after[end + 1..];
                }
                _ => {
                    word.push_str("${");
                    rest = after;
                }
            }
        }
        word.push_str(rest);
        out.push(word);
    }
    (out, missing)
}

/// `VAR=VALUE` pairs.
pub type Assignments = Vec<(String, String)>;

/// `Environment=` words: each `VAR=VALUE`; a word that is not is returned apart.
pub fn assignments(s: &str) -> Result<(Assignments, Vec<String>), String> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for w in split_words(s)? {
        match w.split_once('=') {
            Some((k, v)) if !k.is_empty() && !k.contains(char::is_whitespace) => {
                good.push((k.to_string(), v.to_string()))
            }
            _ => bad.push(w),
        }
    }
    Ok((good, bad))
}

/// A signal: `SIGTERM`, `TERM` or its number; SIGSTOP is refused (it stops nothing).
pub fn signal(s: &str) -> Result<i32, String> {
    use nix::sys::signal::Signal;
    let bad = || format!("{s:?} is not a signal that can stop a process (e.g. SIGTERM, SIGINT)");
    let sig = match s.parse::<i32>() {
        Ok(n) => Signal::try_from(n).map_err(|_| bad())?,
        Err(_) => {
            let upper = s.to_ascii_uppercase();
            let full = if upper.starts_with("SIG") {
                upper
            } else {
                format!("SIG{upper}")
            };
            full.parse::<Signal>().map_err(|_| bad())?
        }
    };
    if sig == Signal::SIGSTOP {
        return Err(bad());
    }
    Ok(sig as i32)
}

/// One rlimit value: a number (a size with K/M/G/T for `bytes`), or `infinity`.
fn rlimit_value(s: &str, bytes: bool) -> Result<u64, String> {
    if s == "infinity" {
        return Ok(u64::MAX);
    }
    if bytes {
        size(s)
    } else {
        s.parse()
            .map_err(|_| format!("{s:?} is not a number or infinity"))
    }
}

/// `LimitNOFILE=` and kin: `N` (soft and hard) or `SOFT:HARD`, each a number or `infinity`.
pub fn rlimit(s: &str, bytes: bool) -> Result<(u64, u64), String> {
    let (soft, hard) = match s.split_once(':') {
        Some((a, b)) => (rlimit_value(a, bytes)?, rlimit_value(b, bytes)?),
        None => {
            let v = rlimit_value(s, bytes)?;
            (v, v)
        }
    };
    if soft > hard {
        return Err(format!("{s:?}: the soft limit is above the hard one"));
    }
    Ok((soft, hard))
}

/// `MemoryMax=`, `TasksMax=`: a number (a size for `bytes`) or `infinity`. A
/// percentage (of the host's memory or tasks) is refused: holdfast takes absolute values.
pub fn limit(s: &str, bytes: bool) -> Result<crate::unit::Limit, String> {
    use crate::unit::Limit;
    if s == "infinity" {
        return Ok(Limit::Infinity);
    }
    if s.ends_with('%') {
        return Err(
            "holdfast takes an absolute limit, not a percentage of the host's; write the number"
                .into(),
        );
    }
    let n = if bytes {
        size(s)?
    } else {
        s.parse()
            .map_err(|_| format!("{s:?} is not a number or infinity"))?
    };
    Ok(Limit::Value(n))
}
