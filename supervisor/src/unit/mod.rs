//! Unit files: the TOML schema, validation, and diagnostics that name the file,
//! line, column, key and the fix. Knows nothing of processes or sockets.
//!
//! Entry points: [`load_dir`] (what `holdfast run` and `holdfast check` call),
//! [`parse_unit`] for one file, [`validate_set`] for the checks that span
//! units, [`to_toml`] to write a unit back out, and [`diagnostic_at`] for
//! checks made elsewhere (against the system: `preflight`) to place their
//! mistakes in the file the same way.

mod check;
mod diag;
pub mod model;
mod parse;
mod ser;
#[cfg(test)]
mod tests;

use std::fs;
use std::path::{Path, PathBuf};

pub use check::validate_set;
pub use diag::{Diagnostic, Diagnostics};
pub use model::*;
/// A prefix with its host bits cleared (import reads addresses too).
pub(crate) use parse::masked;
pub use parse::{parse_unit, MAX_DURATION};
/// Every key a unit file may have, for the fuzz corpus's completeness check.
#[cfg(test)]
pub(crate) use parse::{SERVICE_KEYS, SOCKET_KEYS};
pub use ser::to_toml;

use diag::{LineIndex, Pos};

/// Read every `*.toml` in `dir` (not hidden files), sorted by name, and
/// validate each file and the set together. On failure, every mistake of
/// every file comes back at once.
pub fn load_dir(dir: &Path) -> Result<Vec<Unit>, Diagnostics> {
    let mut diags = Vec::new();
    let mut parsed = Vec::new();
    for (name, path) in unit_files(dir, &mut diags)? {
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) => {
                diags.push(Pos::NONE.diag(
                    &path,
                    "",
                    format!("cannot read: {e}"),
                    "unit files are UTF-8 text",
                ));
                continue;
            }
        };
        let p = parse::parse_spanned(&name, &path, &text);
        diags.extend(p.diags);
        if let Some(unit) = p.unit {
            parsed.push((unit, p.spans));
        }
    }
    let refs: Vec<_> = parsed.iter().map(|(u, s)| (u, s)).collect();
    diags.extend(check::check_spanned(&refs));
    Diagnostics::into_result(diags)?;
    Ok(parsed.into_iter().map(|(u, _)| u).collect())
}

/// The unit files of `dir` (not hidden ones) as (service name, path), sorted;
/// what cannot be listed or is not a regular file goes to `diags`. An
/// unreadable directory is the one mistake returned.
fn unit_files(
    dir: &Path,
    diags: &mut Vec<Diagnostic>,
) -> Result<Vec<(String, PathBuf)>, Diagnostics> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            return Err(Diagnostics(vec![Pos::NONE.diag(
                dir,
                "",
                format!("cannot read the units directory: {e}"),
                "pass a directory that holds one NAME.toml file per service",
            )]))
        }
    };
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                diags.push(Pos::NONE.diag(
                    dir,
                    "",
                    format!("cannot list the units directory: {e}"),
                    "",
                ));
                continue;
            }
        };
        let path = entry.path();
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            if file_name.as_encoded_bytes().ends_with(b".toml") {
                diags.push(Pos::NONE.diag(
                    &path,
                    "",
                    "the file name is not UTF-8",
                    "rename the file",
                ));
            }
            continue;
        };
        let Some(stem) = file_name.strip_suffix(".toml") else {
            continue;
        };
        if file_name.starts_with('.') {
            continue; // hidden, e.g. an editor's backup
        }
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => files.push((stem.to_string(), path)),
            Ok(_) => diags.push(Pos::NONE.diag(
                &path,
                "",
                "not a regular file",
                "a unit is a NAME.toml file",
            )),
            Err(e) => diags.push(Pos::NONE.diag(&path, "", format!("cannot read: {e}"), "")),
        }
    }
    files.sort();
    Ok(files)
}

/// A diagnostic about `key` of `unit` (a key path as diagnostics write it:
/// `service.user`, `service.exec[0]`; empty for the file as a whole), placed
/// at that value in the unit's file, so a check made outside this module
/// (against the system) reads like the others. The file is read again; when
/// it is gone, changed, or has no such key, the diagnostic has no line.
pub fn diagnostic_at(
    unit: &Unit,
    key: &str,
    message: impl Into<String>,
    hint: impl Into<String>,
) -> Diagnostic {
    let pos = locate(&unit.path, key).unwrap_or(Pos::NONE);
    pos.diag(&unit.path, key, message, hint)
}

/// Where the value at `key` starts in the file at `path`.
fn locate(path: &Path, key: &str) -> Option<Pos> {
    if key.is_empty() {
        return None;
    }
    let text = fs::read_to_string(path).ok()?;
    let doc = toml_edit::ImDocument::parse(text.as_str()).ok()?;
    let mut item = doc.as_item();
    for segment in key.split('.') {
        let (name, index) = match segment.split_once('[') {
            Some((name, rest)) => (name, Some(rest.strip_suffix(']')?.parse::<usize>().ok()?)),
            None => (segment, None),
        };
        item = item.get(name)?;
        // An element of an array, or a table of an array of tables (`socket[0]`).
        if let Some(index) = index {
            item = item.get(index)?;
        }
    }
    let span = item.span();
    Some(LineIndex::new(&text).pos(span?.start))
}
