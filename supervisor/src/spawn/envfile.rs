//! `environment-file`: reading systemd's `EnvironmentFile=` format, before
//! fork, at each start. `KEY=VALUE` lines; blank lines, lines without `=` and
//! lines whose first non-blank character is `#` or `;` are skipped; an
//! unquoted value keeps its inner whitespace, loses the leading and trailing
//! whitespace, and takes `\` as "the next character as it is" (a `\` before
//! the newline joins the next line); a `'…'` value is verbatim and may span
//! lines; a `"…"` value unescapes `\"`, `\\`, `` \` `` and `\$`, keeps any
//! other `\x` as written, and joins lines at `\` + newline. Quoted and
//! unquoted parts next to each other join (`A="x"y` is `xy`), as in systemd.
//! Names that are not `[A-Za-z_][A-Za-z0-9_]*` are ignored, as systemd
//! ignores them; the last assignment of a name wins.

use std::ffi::OsString;
use std::io;
use std::path::Path;

use crate::unit::EnvironmentFile;

use super::SpawnError;

/// The variables of `files`, in order (a later file's value wins). A missing
/// optional file is skipped; any other file that cannot be read fails, naming it.
pub(super) fn read(files: &[EnvironmentFile]) -> Result<Vec<(String, OsString)>, SpawnError> {
    let mut out: Vec<(String, OsString)> = Vec::new();
    for file in files {
        let text = match read_text(&file.path) {
            Ok(text) => text,
            Err(e) if file.optional && e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(SpawnError::EnvironmentFile {
                    path: file.path.clone(),
                    source,
                })
            }
        };
        for (k, v) in parse(&text) {
            out.retain(|(key, _)| *key != k);
            out.push((k, v.into()));
        }
    }
    Ok(out)
}

/// The most an environment file may hold.
const MAX_BYTES: u64 = 1 << 20;

/// A regular file's text, read without ever blocking the caller (the
/// daemon's event loop): a FIFO or a device is refused, not waited on.
fn read_text(path: &Path) -> io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > MAX_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} bytes, more than the {MAX_BYTES} an environment file may have",
                meta.len()
            ),
        ));
    }
    let mut text = String::new();
    f.by_ref().take(MAX_BYTES).read_to_string(&mut text)?;
    Ok(text)
}

/// Where the reader is, as in systemd's `parse_env_file_internal`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a name: blanks are skipped, `#`/`;` start a comment.
    PreKey,
    Key,
    /// After `=` (or a closing quote): blanks are skipped.
    PreValue,
    Value,
    ValueEscape,
    Single,
    Double,
    DoubleEscape,
    Comment,
}

fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

fn is_newline(c: char) -> bool {
    matches!(c, '\n' | '\r')
}

fn valid_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// One assignment being read.
#[derive(Default)]
struct Pending {
    key: String,
    value: String,
    /// The length of `value` without its trailing unescaped blanks.
    value_end: Option<usize>,
}

impl Pending {
    fn push_value(&mut self, c: char, escaped: bool) {
        if escaped || !is_blank(c) {
            self.value_end = None;
        } else if self.value_end.is_none() {
            self.value_end = Some(self.value.len());
        }
        self.value.push(c);
    }

    /// The finished assignment, if its name is valid.
    fn finish(&mut self, trim_value: bool, out: &mut Vec<(String, String)>) {
        let mut p = std::mem::take(self);
        if trim_value {
            if let Some(end) = p.value_end {
                p.value.truncate(end);
            }
        }
        let key = p.key.trim_end_matches(is_blank).to_string();
        if valid_name(&key) {
            out.retain(|(k, _)| *k != key);
            out.push((key, p.value));
        }
    }
}

/// The assignments of an environment file's text, the last of each name.
pub(super) fn parse(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut p = Pending::default();
    let mut state = State::PreKey;
    for c in text.chars() {
        state = match state {
            State::PreKey if c == '#' || c == ';' => State::Comment,
            State::PreKey if is_blank(c) => State::PreKey,
            State::Key if is_newline(c) => {
                // A line without `=`: ignored.
                p = Pending::default();
                State::PreKey
            }
            State::Key if c == '=' => State::PreValue,
            State::PreKey | State::Key => {
                p.key.push(c);
                State::Key
            }
            State::PreValue | State::Value if is_newline(c) => {
                p.finish(state == State::Value, &mut out);
                State::PreKey
            }
            State::PreValue if c == '\'' => State::Single,
            State::PreValue if c == '"' => State::Double,
            State::PreValue | State::Value if c == '\\' => {
                p.value_end = None;
                State::ValueEscape
            }
            State::PreValue if is_blank(c) => State::PreValue,
            State::PreValue | State::Value => {
                p.push_value(c, false);
                State::Value
            }
            State::ValueEscape => {
                // An escaped newline joins the lines; anything else is kept as it is.
                if !is_newline(c) {
                    p.push_value(c, true);
                }
                State::Value
            }
            State::Single if c == '\'' => State::PreValue,
            State::Single => {
                p.value.push(c);
                State::Single
            }
            State::Double if c == '"' => State::PreValue,
            State::Double if c == '\\' => State::DoubleEscape,
            State::Double => {
                p.value.push(c);
                State::Double
            }
            State::DoubleEscape => {
                if matches!(c, '"' | '\\' | '`' | '$') {
                    p.value.push(c);
                } else if c != '\n' {
                    p.value.push('\\');
                    p.value.push(c);
                }
                State::Double
            }
            State::Comment if is_newline(c) => State::PreKey,
            State::Comment => State::Comment,
        };
    }
    if !matches!(state, State::PreKey | State::Key | State::Comment) {
        p.finish(state == State::Value, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(text: &str) -> Vec<(&'static str, String)> {
        parse(text)
            .into_iter()
            .map(|(k, v)| (&*Box::leak(k.into_boxed_str()), v))
            .collect()
    }

    #[test]
    fn systemds_format() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("A=1\nB = two words  \n", &[("A", "1"), ("B", "two words")]),
            ("# c\n; c\n  # indented\n\nNOEQUALS\nA=1", &[("A", "1")]),
            ("A=x # not a comment\n", &[("A", "x # not a comment")]),
            ("A='sin gle\n  line' \n", &[("A", "sin gle\n  line")]),
            ("A='$HOME \\n'\n", &[("A", "$HOME \\n")]),
            (
                "A=\"d \\\"q\\\" \\\\ \\$x \\` \\n\"\n",
                &[("A", "d \"q\" \\ $x ` \\n")],
            ),
            ("A=\"one\\\ntwo\"\n", &[("A", "onetwo")]),
            ("A=one\\\n  two\n", &[("A", "one  two")]),
            ("A=a\\ \\#b\\\\\n", &[("A", "a #b\\")]),
            ("A=trail\\ \n", &[("A", "trail ")]),
            ("A=\"x\"y 'z'\n", &[("A", "xy 'z'")]),
            ("A=\"x\" \"y\"  \n", &[("A", "xy")]),
            ("=A=1\nB C=2\n", &[]),
            ("A=\nB\t=\t  v\r\n", &[("A", ""), ("B", "v")]),
            ("A=1\nA=2\n", &[("A", "2")]),
            ("1A=x\nA-B=y\nexport C=z\n_ok=1\n", &[("_ok", "1")]),
            ("A=\"unterminated\nstill", &[("A", "unterminated\nstill")]),
            ("A=last", &[("A", "last")]),
        ];
        for (text, want) in cases {
            let want: Vec<(&str, String)> = want.iter().map(|(k, v)| (*k, v.to_string())).collect();
            assert_eq!(vars(text), want, "{text:?}");
        }
    }

    #[test]
    fn files_in_order_a_missing_optional_one_skipped_a_missing_one_named() {
        let dir = std::env::temp_dir().join(format!("holdfast-envfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.env"), dir.join("b.env"));
        std::fs::write(&a, "X=1\nY=a\n").unwrap();
        std::fs::write(&b, "Y=b\n").unwrap();
        let file = |path: &std::path::Path, optional| EnvironmentFile {
            path: path.to_path_buf(),
            optional,
        };
        let missing = dir.join("missing.env");
        let got = read(&[file(&a, false), file(&missing, true), file(&b, false)]).unwrap();
        assert_eq!(
            got,
            [("X".to_string(), "1".into()), ("Y".to_string(), "b".into())]
        );
        let err = read(&[file(&a, false), file(&missing, false)]).unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains(&missing.display().to_string()), "{shown}");
        assert!(shown.contains("No such file"), "{shown}");
        // A FIFO would block the daemon's loop until a writer came: refused at once.
        let fifo = dir.join("fifo.env");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = read(&[file(&fifo, true)]).unwrap_err().to_string();
        assert!(err.ends_with("fifo.env: not a regular file"), "{err}");
        let err = read(&[file(&dir, false)]).unwrap_err().to_string();
        assert!(err.ends_with("not a regular file"), "{err}");
        let big = dir.join("big.env");
        std::fs::write(&big, vec![b'#'; MAX_BYTES as usize + 1]).unwrap();
        let err = read(&[file(&big, false)]).unwrap_err().to_string();
        assert!(err.contains("more than the 1048576"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
