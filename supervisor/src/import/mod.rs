//! `holdfast import`: a systemd `.socket` and its `.service` (or a
//! `.service` alone) → one holdfast unit file, and a report of every
//! directive that was not translated, with its `file:line`, why, and what
//! to do instead. Owns the reading of systemd's files ([`ini`], [`values`])
//! and the translation ([`translate`]); writes through [`unit::to_toml`] and
//! checks the result with [`unit::parse_unit`], so what it writes passes
//! `holdfast check`. Starts nothing and touches nothing but the output file.
//!
//! Called by `main` ([`run`]); the tests call [`import`].

pub mod ini;
#[cfg(test)]
mod tests;
mod translate;
pub mod values;

use std::path::{Path, PathBuf};

use crate::unit::{self, Diagnostics, Unit};

pub use translate::Finding;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{place}: {message}")]
    Syntax { place: String, message: String },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The command line asks for something that cannot be done.
    #[error("{0}")]
    Usage(String),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: the service has no ExecStart=, so there is nothing to run; nothing was written", path.display())]
    NoExec { path: PathBuf },
    #[error("the unit for {} does not pass holdfast check (a bug in holdfast import):\n{diags}", path.display())]
    Invalid { path: PathBuf, diags: Diagnostics },
}

/// What to import.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// `FILE.socket [FILE.service]` or `FILE.service`.
    pub files: Vec<PathBuf>,
    /// The instance for a template (`foo@.socket`, `foo@.service`).
    pub instance: Option<String>,
}

/// The translated unit, its TOML text, and the report.
#[derive(Debug, Clone)]
pub struct Imported {
    pub unit: Unit,
    pub toml: String,
    /// The files read, drop-ins included.
    pub sources: Vec<PathBuf>,
    pub dropped: Vec<Finding>,
    pub notes: Vec<Finding>,
}

/// A unit file name split: `foo@bar.socket` → (`foo`, Some(`bar`), `socket`).
struct UnitName<'a> {
    prefix: &'a str,
    instance: Option<&'a str>,
    suffix: &'a str,
}

fn unit_name(path: &Path) -> Result<UnitName<'_>, ImportError> {
    let file = path
        .file_name()
        .and_then(|f| f.to_str())
        .ok_or_else(|| ImportError::Usage(format!("{}: not a unit file name", path.display())))?;
    let (stem, suffix) = file.rsplit_once('.').ok_or_else(|| {
        ImportError::Usage(format!(
            "{}: a unit file name ends in .socket or .service",
            path.display()
        ))
    })?;
    let (prefix, instance) = match stem.split_once('@') {
        Some((p, i)) => (p, Some(i)),
        None => (stem, None),
    };
    Ok(UnitName {
        prefix,
        instance,
        suffix,
    })
}

/// The last value of `[section] key` in `entries`.
fn peek<'e>(entries: &'e [ini::Entry], section: &str, key: &str) -> Option<&'e str> {
    entries
        .iter()
        .rev()
        .find(|e| e.section == section && e.key == key)
        .map(|e| e.value.as_str())
}

/// Directives whose values systemd takes as written: their `%` is a percentage.
fn expands_specifiers(key: &str) -> bool {
    !matches!(
        key,
        "CPUQuota" | "MemoryMax" | "MemoryHigh" | "MemoryLow" | "MemoryMin" | "TasksMax"
    )
}

/// Replaces each entry's `%` specifiers; one that cannot be expanded is
/// reported and left out.
fn expand(
    entries: Vec<ini::Entry>,
    spec: &values::Specifiers,
    dropped: &mut Vec<Finding>,
) -> Vec<ini::Entry> {
    entries
        .into_iter()
        .filter_map(|mut e| {
            let expanded = if expands_specifiers(&e.key) {
                spec.expand(&e.value)
            } else {
                Ok(e.value.clone())
            };
            match expanded {
                Ok(v) => {
                    e.value = v;
                    Some(e)
                }
                Err(why) => {
                    dropped.push(Finding {
                        place: e.place(),
                        directive: format!("{}={}", e.key, e.value),
                        why,
                    });
                    None
                }
            }
        })
        .collect()
}

/// Reads and translates; writes nothing.
pub fn import(req: &Request) -> Result<Imported, ImportError> {
    let (socket_file, service_file) = unit_files(req)?;
    let main_file = socket_file
        .clone()
        .or_else(|| service_file.clone())
        .ok_or_else(|| {
            ImportError::Usage("give FILE.socket [FILE.service], or FILE.service".into())
        })?;
    let main_name = unit_name(&main_file)?;
    let (name, instance) = service_name(&main_name, &main_file, req)?;

    let mut sources = Vec::new();
    let mut dropped = Vec::new();
    let (socket, socket_unit) = match &socket_file {
        Some(path) => {
            let (entries, files) = ini::read_with_dropins(path)?;
            sources.extend(files);
            (Some(entries), format!("{name}.socket"))
        }
        None => (None, String::new()),
    };
    let accept = socket
        .as_deref()
        .and_then(|s| peek(s, "Socket", "Accept"))
        .is_some_and(|v| values::boolean(v) == Ok(true));

    // The service: given, named by Service=, or found beside the socket by
    // systemd's rules (NAME.service; NAME@.service for Accept=yes).
    let service_path = match (&service_file, &socket_file) {
        (Some(p), _) => p.clone(),
        (None, Some(sock)) => {
            let explicit = socket.as_deref().and_then(|s| peek(s, "Socket", "Service"));
            service_beside(
                sock,
                explicit,
                accept,
                &main_name,
                &name,
                instance.as_deref(),
            )?
        }
        (None, None) => unreachable!("main_file is one of them"),
    };
    // Per-connection instances (Accept=yes) get their instance name from the connection.
    let service_unit = if accept {
        format!("{}@.service", main_name.prefix)
    } else {
        format!("{name}.service")
    };
    let (service, files) = ini::read_with_dropins(&service_path)?;
    sources.extend(files);

    let service_spec = values::Specifiers {
        full_name: service_unit.clone(),
        instance: if accept { None } else { instance.clone() },
    };
    let service = expand(service, &service_spec, &mut dropped);
    let socket = socket.map(|s| {
        let spec = values::Specifiers {
            full_name: socket_unit.clone(),
            instance: instance.clone(),
        };
        expand(s, &spec, &mut dropped)
    });

    let input = translate::Input {
        name: &name,
        socket: socket.as_deref(),
        socket_name: &socket_unit,
        service: &service,
        service_name: &service_unit,
    };
    translated(&input, service_path, sources, dropped)
}

/// The translation of `input`, written and checked by `holdfast check`'s
/// parser: what `import` returns.
fn translated(
    input: &translate::Input<'_>,
    service_path: PathBuf,
    sources: Vec<PathBuf>,
    mut dropped: Vec<translate::Finding>,
) -> Result<Imported, ImportError> {
    let name = input.name;
    let out = translate::translate(input);
    let path = PathBuf::from(format!("{name}.toml"));
    if out.unit.service.exec.is_empty() {
        return Err(ImportError::NoExec { path: service_path });
    }
    let toml = written_toml(&sources, out.description.as_deref(), &out.unit);
    let unit = unit::parse_unit(name, &path, &toml).map_err(|diags| ImportError::Invalid {
        path: path.clone(),
        diags,
    })?;
    dropped.extend(out.dropped);
    translate::sort_findings(&mut dropped);
    Ok(Imported {
        unit,
        toml,
        sources,
        dropped,
        notes: out.notes,
    })
}

/// The `.socket` and `.service` files of a request, at most one each.
fn unit_files(req: &Request) -> Result<(Option<PathBuf>, Option<PathBuf>), ImportError> {
    let mut socket_file = None;
    let mut service_file = None;
    for f in &req.files {
        let slot = match unit_name(f)?.suffix {
            "socket" => &mut socket_file,
            "service" => &mut service_file,
            other => {
                return Err(ImportError::Usage(format!(
                    "{}: .{other} units are not imported; give a .socket and/or a .service",
                    f.display()
                )))
            }
        };
        if slot.replace(f.clone()).is_some() {
            return Err(ImportError::Usage(
                "give at most one .socket and one .service".into(),
            ));
        }
    }
    Ok((socket_file, service_file))
}

/// The holdfast service name (`NAME`, `NAME@INSTANCE` for a template) and
/// the instance, from the main file's name and `--instance`.
fn service_name(
    main_name: &UnitName<'_>,
    main_file: &Path,
    req: &Request,
) -> Result<(String, Option<String>), ImportError> {
    let instance = match (main_name.instance, &req.instance) {
        (Some(""), Some(i)) => Some(i.clone()),
        (Some(""), None) => {
            return Err(ImportError::Usage(format!(
                "{} is a template: pass --instance NAME",
                main_file.display()
            )))
        }
        (Some(i), None) => Some(i.to_string()),
        (_, Some(_)) => {
            return Err(ImportError::Usage(format!(
                "--instance is for templates (foo@.socket, foo@.service), and {} is not one",
                main_file.display()
            )))
        }
        (None, None) => None,
    };
    let name = match &instance {
        Some(i) => format!("{}@{i}", main_name.prefix),
        None => main_name.prefix.to_string(),
    };
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '-');
    if name.is_empty() || !name.chars().all(ok_char) {
        return Err(ImportError::Usage(format!(
            "{name:?} cannot be a holdfast service name (letters, digits, _ . @ -); copy the files under a simpler name"
        )));
    }
    Ok((name, instance))
}

/// The service of socket file `sock` found beside it by systemd's rules:
/// `Service=` (`explicit`), `NAME@.service` for Accept=yes, else
/// `NAME.service` (or the template's instance, then the template).
fn service_beside(
    sock: &Path,
    explicit: Option<&str>,
    accept: bool,
    main_name: &UnitName<'_>,
    name: &str,
    instance: Option<&str>,
) -> Result<PathBuf, ImportError> {
    let dir = sock.parent().unwrap_or(Path::new("."));
    let candidates: Vec<String> = match explicit {
        Some(s) => vec![s.to_string()],
        None if accept => vec![format!("{}@.service", main_name.prefix)],
        None => match instance {
            Some(i) => vec![
                format!("{}@{i}.service", main_name.prefix),
                format!("{}@.service", main_name.prefix),
            ],
            None => vec![format!("{name}.service")],
        },
    };
    candidates
        .iter()
        .map(|c| dir.join(c))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            ImportError::Usage(format!(
                "no {} beside {}: give the service file as the second argument",
                candidates.join(" or "),
                sock.display()
            ))
        })
}

/// The unit file as written: where it came from, its description, then the unit.
fn written_toml(sources: &[PathBuf], description: Option<&str>, unit: &unit::Unit) -> String {
    let mut toml = String::from("# Written by `holdfast import` from:\n");
    for s in sources {
        toml.push_str(&format!("#   {}\n", s.display()));
    }
    if let Some(d) = description {
        toml.push_str(&format!("# {d}\n"));
    }
    toml.push_str(&unit::to_toml(unit));
    toml
}

/// Writes `DIR/NAME.toml`; an existing file is replaced only with `force`.
pub fn write(imported: &Imported, dir: &Path, force: bool) -> Result<PathBuf, ImportError> {
    let path = dir.join(format!("{}.toml", imported.unit.name));
    if path.exists() && !force {
        return Err(ImportError::Usage(format!(
            "{} exists: remove it, or pass --force to replace it",
            path.display()
        )));
    }
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&path, &imported.toml))
        .map_err(|source| ImportError::Write {
            path: path.clone(),
            source,
        })?;
    Ok(path)
}

/// `holdfast import`: prints what it did; returns the exit code (0 all
/// translated, 1 something was not, 2 usage or unreadable input).
pub fn run(req: &Request, output: &Path, force: bool) -> u8 {
    let imported = match import(req) {
        Ok(i) => i,
        Err(e @ ImportError::NoExec { .. }) => {
            eprintln!("holdfast import: {e}");
            return 1;
        }
        Err(e) => {
            eprintln!("holdfast import: {e}");
            return 2;
        }
    };
    let path = match write(&imported, output, force) {
        Ok(p) => p,
        Err(e @ ImportError::Usage(_)) => {
            eprintln!("holdfast import: {e}");
            return 2;
        }
        Err(e) => {
            eprintln!("holdfast import: {e}");
            return 1;
        }
    };
    let u = &imported.unit;
    let from: Vec<String> = imported
        .sources
        .iter()
        .map(|s| s.display().to_string())
        .collect();
    println!(
        "wrote {} (service {}, {} socket{}) from {}",
        path.display(),
        u.name,
        u.sockets.len(),
        if u.sockets.len() == 1 { "" } else { "s" },
        from.join(", ")
    );
    for (title, list) in [
        ("not translated", &imported.dropped),
        ("note", &imported.notes),
    ] {
        if list.is_empty() {
            continue;
        }
        println!("{title} ({}):", list.len());
        for f in list {
            println!("  {}: {}\n    {}", f.place, f.directive, f.why);
        }
    }
    if imported.dropped.is_empty() {
        println!("every directive was translated");
        0
    } else {
        1
    }
}
