//! Checks across units: no two sockets may claim equally specific
//! overlapping bindings (the lookup could not choose between them), and no
//! two unix sockets may share a path. Each mistake names both files.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use super::diag::{Diagnostic, Diagnostics, Pos};
use super::model::{PortRange, Protocol, Unit};
use super::parse::{parse_spanned, UnitSpans};

/// Check a set of units that are each valid on their own. Places in the
/// files are found by reading them again from `unit.path`; when a file is
/// gone or no longer matches its unit, its diagnostics carry no line.
pub fn validate_set(units: &[Unit]) -> Result<(), Diagnostics> {
    let spans: Vec<UnitSpans> = units.iter().map(spans_from_disk).collect();
    let refs: Vec<_> = units.iter().zip(&spans).collect();
    Diagnostics::into_result(check_spanned(&refs))
}

fn spans_from_disk(unit: &Unit) -> UnitSpans {
    let Ok(text) = fs::read_to_string(&unit.path) else {
        return UnitSpans::default();
    };
    let parsed = parse_spanned(&unit.name, &unit.path, &text);
    match parsed.unit {
        Some(u) if u == *unit => parsed.spans,
        _ => UnitSpans::default(),
    }
}

/// One (prefix, port range) of one socket, and where it was written.
#[derive(Clone, Copy)]
struct Claim {
    unit: usize,
    socket: usize,
    address: usize,
    port: usize,
    range: PortRange,
}

/// Everything wrong across `units` (each given with the places of its parts).
pub(crate) fn check_spanned(units: &[(&Unit, &UnitSpans)]) -> Vec<Diagnostic> {
    let mut diags = duplicate_names(units);
    diags.extend(binding_clashes(units));
    diags.extend(shared_unix_paths(units));
    diags
}

/// Where socket `s` of unit `u` has what `pick` picks, if it was read from a file.
fn place(
    units: &[(&Unit, &UnitSpans)],
    u: usize,
    s: usize,
    pick: &dyn Fn(&super::parse::SocketSpans) -> Pos,
) -> Pos {
    units[u].1.sockets.get(s).map_or(Pos::NONE, pick)
}

/// Two units of one name.
fn duplicate_names(units: &[(&Unit, &UnitSpans)]) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    // The same name twice can only come from a caller building units by hand.
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, (u, _)) in units.iter().enumerate() {
        if let Some(&j) = names.get(u.name.as_str()) {
            diags.push(Pos::NONE.diag(
                &u.path,
                "",
                format!(
                    "service name {:?} is also the name of {}",
                    u.name,
                    units[j].0.path.display()
                ),
                "each service needs its own name",
            ));
        } else {
            names.insert(&u.name, i);
        }
    }

    diags
}

/// Per pair of (socket, address entry) of two sockets: the equally specific
/// bindings of theirs that overlap.
type Key = ((usize, usize, usize), (usize, usize, usize));

/// Bindings of two sockets that are equally specific and overlap: a packet
/// would have two sockets to go to.
fn binding_clashes(units: &[(&Unit, &UnitSpans)]) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    for pairs in clashing_claims(units).values() {
        diags.push(clash_diagnostic(units, pairs));
    }
    diags
}

/// The overlapping claims of equal specificity, by pair of address entries.
fn clashing_claims(units: &[(&Unit, &UnitSpans)]) -> BTreeMap<Key, Vec<(Claim, Claim)>> {
    // Bindings grouped by what makes them equally specific: the protocol
    // (tcp and udp are looked up apart), the prefix, and the port range width.
    let mut groups: HashMap<(Protocol, u128, u8, u32), Vec<Claim>> = HashMap::new();
    for (ui, (u, _)) in units.iter().enumerate() {
        for (si, s) in u.sockets.iter().enumerate() {
            if !s.protocol.is_ip() {
                continue;
            }
            for (ai, a) in s.addresses.iter().enumerate() {
                let addr = u128::from(a.mapped_addr());
                for (pi, range) in s.ports.iter().enumerate() {
                    groups
                        .entry((s.protocol, addr, a.mapped_len(), range.width()))
                        .or_default()
                        .push(Claim {
                            unit: ui,
                            socket: si,
                            address: ai,
                            port: pi,
                            range: *range,
                        });
                }
            }
        }
    }
    // Per pair of (socket, address entry): the port ranges that collide.
    let mut clashes: BTreeMap<Key, Vec<(Claim, Claim)>> = BTreeMap::new();
    for claims in groups.values_mut() {
        claims.sort_by_key(|c| (c.range.first, c.unit, c.socket, c.address, c.port));
        for (i, a) in claims.iter().enumerate() {
            // Equal widths, sorted by first port: the ones that overlap `a` follow it.
            for b in claims[i + 1..]
                .iter()
                .take_while(|b| b.range.first <= a.range.last)
            {
                if (a.unit, a.socket) == (b.unit, b.socket) {
                    continue;
                }
                let (first, second) = if (a.unit, a.socket, a.address, a.port)
                    < (b.unit, b.socket, b.address, b.port)
                {
                    (*a, *b)
                } else {
                    (*b, *a)
                };
                clashes
                    .entry((
                        (first.unit, first.socket, first.address),
                        (second.unit, second.socket, second.address),
                    ))
                    .or_default()
                    .push((first, second));
            }
        }
    }
    clashes
}

/// The diagnostic of one pair of clashing address entries (`pairs`: every
/// overlapping port range of theirs, the first one named).
fn clash_diagnostic(units: &[(&Unit, &UnitSpans)], pairs: &[(Claim, Claim)]) -> Diagnostic {
    let (a, b) = pairs[0];
    let (ua, ub) = (units[a.unit].0, units[b.unit].0);
    let (sa, sb) = (&ua.sockets[a.socket], &ub.sockets[b.socket]);
    let prefix = sb.addresses[b.address];
    let a_pos = place(units, a.unit, a.socket, &|s| {
        s.addresses.get(a.address).copied().unwrap_or(s.table)
    });
    let b_pos = place(units, b.unit, b.socket, &|s| {
        s.addresses.get(b.address).copied().unwrap_or(s.table)
    });
    let more = match pairs.len() {
        1 => String::new(),
        2 => " (and 1 more overlapping port range)".to_string(),
        n => format!(" (and {} more overlapping port ranges)", n - 1),
    };
    b_pos.diag(
        &ub.path,
        format!("socket[{}].addresses[{}]", b.socket, b.address),
        format!(
            "{} {prefix} {} of socket {:?} is also claimed, equally specifically, by {} (socket[{}].addresses[{}] with {} of socket {:?}){more}",
            sb.protocol,
            ports(b.range),
            sb.name,
            located(&ua.path, a_pos),
            a.socket,
            a.address,
            ports(a.range),
            sa.name,
        ),
        "a packet must have one socket to go to: make one of the two more specific \
         (a longer prefix or a narrower port range), or serve these ports from one socket",
    )
}

/// Two unix sockets on one path.
fn shared_unix_paths(units: &[(&Unit, &UnitSpans)]) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    // Unix socket paths.
    let mut paths: HashMap<&Path, (usize, usize)> = HashMap::new();
    for (ui, (u, _)) in units.iter().enumerate() {
        for (si, s) in u.sockets.iter().enumerate() {
            let Some(path) = s.path.as_deref() else {
                continue;
            };
            match paths.get(path) {
                Some(&(uj, sj)) => {
                    let other = located(&units[uj].0.path, place(units, uj, sj, &|s| s.path));
                    diags.push(place(units, ui, si, &|s| s.path).diag(
                        &u.path,
                        format!("socket[{si}].path"),
                        format!(
                            "unix socket path {} is also used by {other} (socket[{sj}].path)",
                            path.display()
                        ),
                        "give each unix socket its own path",
                    ));
                }
                None => {
                    paths.insert(path, (ui, si));
                }
            }
        }
    }
    diags
}

/// `units/a.toml:5:3`, or just the file when the place is unknown.
fn located(file: &Path, pos: Pos) -> String {
    if pos == Pos::NONE {
        file.display().to_string()
    } else {
        format!("{}:{pos}", file.display())
    }
}

/// `port 80` or `ports 8000-8099`.
fn ports(r: PortRange) -> String {
    if r.first == r.last {
        format!("port {r}")
    } else {
        format!("ports {r}")
    }
}
