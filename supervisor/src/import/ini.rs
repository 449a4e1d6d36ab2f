//! systemd's unit file syntax (systemd.syntax(7)): `[Section]` headers,
//! `Key=Value` lines, comments on lines of their own starting with `#` or
//! `;`, and a line ending in `\` continued by the next one (the backslash
//! becomes a space; comment lines inside a continuation are skipped). Every
//! assignment keeps the file and line it started on, and repeated keys stay
//! repeated: what a repetition or an empty value means depends on the
//! directive, so the translator decides.
//!
//! Hand-written: the INI crates on crates.io (rust-ini, systemd-parser) keep
//! no line numbers and do not follow systemd's continuation rules.

use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::ImportError;

/// One `Key=Value` assignment, with where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub section: String,
    pub key: String,
    pub value: String,
    pub file: Rc<PathBuf>,
    /// 1-based line of the key.
    pub line: usize,
}

impl Entry {
    /// `file:line`, as the report shows it.
    pub fn place(&self) -> String {
        format!("{}:{}", self.file.display(), self.line)
    }
}

/// Every assignment of `text`, in order.
pub fn parse(file: &Path, text: &str) -> Result<Vec<Entry>, ImportError> {
    let file = Rc::new(file.to_path_buf());
    let syntax = |line: usize, message: String| ImportError::Syntax {
        place: format!("{}:{line}", file.display()),
        message,
    };
    let mut entries = Vec::new();
    let mut section: Option<String> = None;
    let mut lines = text.lines().enumerate();
    while let Some((i, raw)) = lines.next() {
        let line_no = i + 1;
        let mut line = raw.trim().to_string();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        // A trailing backslash continues the line; comment lines in between are skipped.
        while line.ends_with('\\') {
            line.pop();
            line.push(' ');
            let next = lines
                .by_ref()
                .map(|(_, l)| l.trim())
                .find(|l| !(l.starts_with('#') || l.starts_with(';')));
            match next {
                Some(next) => line.push_str(next),
                None => break,
            }
        }
        let line = line.trim();
        if let Some(rest) = line.strip_prefix('[') {
            let Some(name) = rest.strip_suffix(']') else {
                return Err(syntax(
                    line_no,
                    format!("section header {line:?} has no closing ]"),
                ));
            };
            section = Some(name.to_string());
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(syntax(
                line_no,
                format!("{line:?} is neither a [Section] nor a Key=Value assignment"),
            ));
        };
        let Some(section) = &section else {
            return Err(syntax(
                line_no,
                format!("assignment {line:?} before any [Section] header"),
            ));
        };
        entries.push(Entry {
            section: section.clone(),
            key: key.trim().to_string(),
            value: value.trim().to_string(),
            file: Rc::clone(&file),
            line: line_no,
        });
    }
    Ok(entries)
}

/// `path`'s assignments followed by those of its drop-ins (`path.d/*.conf`
/// beside it, by file name), as systemd reads them.
pub fn read_with_dropins(path: &Path) -> Result<(Vec<Entry>, Vec<PathBuf>), ImportError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| ImportError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let mut entries = parse(path, &read(path)?)?;
    let mut files = vec![path.to_path_buf()];
    let mut dir = path.as_os_str().to_owned();
    dir.push(".d");
    let dir = PathBuf::from(dir);
    if let Ok(list) = std::fs::read_dir(&dir) {
        let mut confs: Vec<PathBuf> = list
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .collect();
        confs.sort();
        for conf in confs {
            entries.extend(parse(&conf, &read(&conf)?)?);
            files.push(conf);
        }
    }
    Ok((entries, files))
}
