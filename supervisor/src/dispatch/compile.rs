//! The bindings compiler: turns a set of [`Binding`]s into the contents of the
//! lookup maps (a port → port class table per protocol, and binding entries
//! keyed by protocol, port class and address prefix). Pure: no syscalls, so
//! every precedence rule is tested here without root.
//!
//! Port classes are the elementary intervals of all declared port ranges of a
//! protocol: two ports share a class exactly when every range contains both or
//! neither. A binding costs one entry per class its range spans, so a range
//! that no other range cuts (e.g. 1-65535 alone) costs one entry however many
//! ports it covers.
//!
//! Precedence is resolved here, not in the program: for each (class, prefix) the
//! entry holds the narrowest binding with that prefix whose range contains the
//! class; the program's longest-prefix-first search then gives "longest prefix
//! first, then narrowest range". Two bindings with the same prefix, overlapping ranges of the
//! same width and different destinations are ambiguous and rejected.
//!
//! It also compiles a destination's source rules (allow/deny) into the entries
//! of the rules trie, see [`compile_rules`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use holdfast_common::{IPPROTO_TCP, IPPROTO_UDP};

use super::{Binding, DestinationId, DispatchError};
use crate::unit::{IpPrefix, Protocol};

/// An entry value meaning "no binding here": the program lets the kernel's normal
/// lookup go on. Shadows IPv6 prefixes such as `::/0` in the IPv4-mapped space.
pub use holdfast_common::NO_DESTINATION;

/// Number of port-class slots: one per protocol.
pub const PROTOCOLS: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

/// One binding entry, independent of the generation it is written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BindingEntry {
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub protocol: u8,
    pub class: u16,
    /// Prefix length in the IPv4-mapped IPv6 space (0..=128).
    pub prefix_len: u8,
    /// Address with the host bits cleared, IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
}

/// What the maps must hold for one set of bindings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// Port → class (0: no binding), indexed `[protocol slot][port]`, slots in
    /// [`PROTOCOLS`] order.
    pub classes: [Vec<u16>; 2],
    /// Sorted entries and their destination (or [`NO_DESTINATION`]).
    pub entries: Vec<(BindingEntry, DestinationId)>,
}

impl Compiled {
    /// The empty set: every port class 0, no entries.
    pub fn empty() -> Self {
        Compiled {
            classes: [vec![0; 1 << 16], vec![0; 1 << 16]],
            entries: Vec::new(),
        }
    }

    /// What the program would answer for this lookup: `None` is SK_PASS with no
    /// socket selected. Mirrors `ebpf/holdfast-ebpf`; used by tests.
    pub fn lookup(&self, protocol: Protocol, addr: IpAddr, port: u16) -> Option<DestinationId> {
        let slot = slot(protocol)?;
        let class = self.classes[slot][usize::from(port)];
        if class == 0 {
            return None;
        }
        let ipproto = ipproto(protocol)?;
        let a = u128::from(mapped(addr));
        self.entries
            .iter()
            .filter(|(e, _)| {
                e.protocol == ipproto
                    && e.class == class
                    && masked(a, e.prefix_len) == u128::from_be_bytes(e.addr)
            })
            .max_by_key(|(e, _)| e.prefix_len)
            .map(|(_, d)| *d)
            .filter(|d| *d != NO_DESTINATION)
    }
}

fn slot(protocol: Protocol) -> Option<usize> {
    PROTOCOLS.iter().position(|p| *p == protocol)
}

fn ipproto(protocol: Protocol) -> Option<u8> {
    match protocol {
        Protocol::Tcp => Some(IPPROTO_TCP),
        Protocol::Udp => Some(IPPROTO_UDP),
        _ => None,
    }
}

fn mapped(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn masked(addr: u128, len: u8) -> u128 {
    match len {
        0 => 0,
        l => addr & (u128::MAX << (128 - u32::from(l.min(128)))),
    }
}

/// One entry of a destination's compiled source rules: a source prefix and
/// the verdict for sources it contains, unless a longer entry also contains them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleEntry {
    /// In the IPv4-mapped IPv6 space, 0..=128; 0 is the rule set's default.
    pub prefix_len: u8,
    /// Address with the host bits cleared, IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    pub refuse: bool,
}

/// Compiles a destination's `allow` and `deny` source prefixes into trie
/// entries whose longest match is the verdict of
/// [`SocketOptions::admits`](crate::unit::SocketOptions::admits): a source is
/// refused when any deny prefix contains it, else admitted when `allow` is
/// empty or any allow prefix contains it. Whatever the lengths, deny wins.
///
/// A longest match gives that answer once the entries are: a default (length 0)
/// refusing when `allow` is non-empty, else admitting; every deny prefix,
/// refusing; every allow prefix that no deny prefix contains, admitting. (Two
/// prefixes that contain the same source are nested, so a source in a deny
/// prefix matches either that deny entry or a longer one inside it: a longer
/// deny, or an allow that a deny contains — and those were left out.) A prefix
/// of length 0 replaces the default.
///
/// Both lists empty: no entries, the destination has no rules.
pub fn compile_rules(
    destination: DestinationId,
    allow: &[IpPrefix],
    deny: &[IpPrefix],
) -> Result<Vec<RuleEntry>, DispatchError> {
    if allow.is_empty() && deny.is_empty() {
        return Ok(Vec::new());
    }
    let mapped = |p: &IpPrefix| -> Result<(u8, u128), DispatchError> {
        let max = if p.addr.is_ipv4() { 32 } else { 128 };
        if p.len > max {
            return Err(DispatchError::InvalidSourcePrefix {
                destination,
                prefix: p.to_string(),
            });
        }
        let len = p.mapped_len();
        Ok((len, masked(u128::from(p.mapped_addr()), len)))
    };
    let deny: Vec<(u8, u128)> = deny.iter().map(mapped).collect::<Result<_, _>>()?;
    let allow: Vec<(u8, u128)> = allow.iter().map(mapped).collect::<Result<_, _>>()?;
    let within = |(len, addr): (u8, u128), (outer_len, outer): (u8, u128)| {
        outer_len <= len && masked(addr, outer_len) == outer
    };
    // Keyed by (length, address); later inserts replace earlier ones.
    let mut entries: std::collections::BTreeMap<(u8, u128), bool> = Default::default();
    entries.insert((0, 0), !allow.is_empty());
    for a in &allow {
        if !deny.iter().any(|d| within(*a, *d)) {
            entries.insert(*a, false);
        }
    }
    for d in &deny {
        entries.insert(*d, true);
    }
    Ok(entries
        .into_iter()
        .map(|((prefix_len, addr), refuse)| RuleEntry {
            prefix_len,
            addr: addr.to_be_bytes(),
            refuse,
        })
        .collect())
}

/// What the program answers for `source` under compiled rules: the longest
/// matching entry's verdict; no rules admit; rules with no matching entry
/// refuse (the program fails closed). Mirrors `ebpf/holdfast-ebpf`.
pub fn rules_admit(entries: &[RuleEntry], source: IpAddr) -> bool {
    if entries.is_empty() {
        return true;
    }
    let a = u128::from(mapped(source));
    entries
        .iter()
        .filter(|e| masked(a, e.prefix_len) == u128::from_be_bytes(e.addr))
        .max_by_key(|e| e.prefix_len)
        .is_some_and(|e| !e.refuse)
}

/// A binding as it is named in errors.
pub fn describe(b: &Binding) -> String {
    format!(
        "service {} socket {}: {} {} port {} (destination {})",
        b.service, b.socket, b.protocol, b.prefix, b.ports, b.destination
    )
}

/// Where an IPv6 prefix covers the IPv4-mapped space (`::/0`, `::/80`), IPv4
/// traffic must not match it: a binding on `::/0` means every IPv6 address, and
/// its socket may be IPv6-only. An entry for `::ffff:0:0/96` with
/// [`NO_DESTINATION`] shadows it; any IPv4 binding is at least that long and wins.
fn shadows_ipv4(prefix: &IpPrefix) -> bool {
    matches!(prefix.addr, IpAddr::V6(_))
        && prefix.len < 96
        && prefix.contains(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// The winning candidate so far for one (class, prefix).
struct Candidate {
    width: u32,
    destination: DestinationId,
    /// Index into the bindings, for errors; `None` for a shadow entry.
    binding: Option<usize>,
}

/// Compiles `bindings` into map contents; rejects unsupported protocols,
/// destination ids out of range and ambiguous overlaps.
pub fn compile(bindings: &[Binding], max_destinations: u32) -> Result<Compiled, DispatchError> {
    for b in bindings {
        if slot(b.protocol).is_none() {
            return Err(DispatchError::UnsupportedProtocol {
                binding: describe(b),
            });
        }
        if b.destination >= max_destinations || b.destination == NO_DESTINATION {
            return Err(DispatchError::DestinationOutOfRange {
                binding: describe(b),
                max: max_destinations,
            });
        }
        if b.ports.first == 0 || b.ports.first > b.ports.last {
            return Err(DispatchError::InvalidPortRange {
                binding: describe(b),
            });
        }
    }
    let mut out = Compiled::empty();
    for (slot, protocol) in PROTOCOLS.iter().enumerate() {
        let ipproto = ipproto(*protocol).expect("tcp and udp have an IPPROTO");
        let of_protocol: Vec<usize> = (0..bindings.len())
            .filter(|i| bindings[*i].protocol == *protocol)
            .collect();
        let classes = &mut out.classes[slot];
        assign_classes(of_protocol.iter().map(|i| bindings[*i].ports), classes);

        let mut best: HashMap<(u16, u8, u128), Candidate> = HashMap::new();
        for &i in &of_protocol {
            let b = &bindings[i];
            let len = b.prefix.mapped_len();
            let addr = masked(u128::from(b.prefix.mapped_addr()), len);
            let lo = classes[usize::from(b.ports.first)];
            let hi = classes[usize::from(b.ports.last)];
            for class in lo..=hi {
                let new = Candidate {
                    width: b.ports.width(),
                    destination: b.destination,
                    binding: Some(i),
                };
                offer(&mut best, (class, len, addr), new, bindings)?;
                if shadows_ipv4(&b.prefix) {
                    let shadow = Candidate {
                        width: u32::MAX,
                        destination: NO_DESTINATION,
                        binding: None,
                    };
                    let v4 = u128::from(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped());
                    offer(&mut best, (class, 96, v4), shadow, bindings)?;
                }
            }
        }
        out.entries
            .extend(best.into_iter().map(|((class, prefix_len, addr), c)| {
                (
                    BindingEntry {
                        protocol: ipproto,
                        class,
                        prefix_len,
                        addr: addr.to_be_bytes(),
                    },
                    c.destination,
                )
            }));
    }
    out.entries.sort_unstable();
    Ok(out)
}

/// Numbers the elementary intervals of `ranges` 1, 2, … in port order into
/// `classes` (65536 entries, all 0 on entry).
fn assign_classes(ranges: impl Iterator<Item = crate::unit::PortRange>, classes: &mut [u16]) {
    let mut depth_change = vec![0i32; (1 << 16) + 1];
    let mut boundary = vec![false; (1 << 16) + 1];
    for r in ranges {
        let (first, end) = (usize::from(r.first), usize::from(r.last) + 1);
        depth_change[first] += 1;
        depth_change[end] -= 1;
        boundary[first] = true;
        boundary[end] = true;
    }
    let mut depth = 0;
    let mut class: u16 = 0;
    for port in 0..(1usize << 16) {
        depth += depth_change[port];
        if depth > 0 {
            // A covered port right after a boundary starts a new class; an
            // uncovered gap always ends at a boundary, so classes never span one.
            if boundary[port] {
                class += 1;
            }
            classes[port] = class;
        }
    }
}

/// Keeps the narrower of the current and `new` candidates for `key`; equal widths
/// with different destinations are ambiguous.
fn offer(
    best: &mut HashMap<(u16, u8, u128), Candidate>,
    key: (u16, u8, u128),
    new: Candidate,
    bindings: &[Binding],
) -> Result<(), DispatchError> {
    use std::collections::hash_map::Entry;
    match best.entry(key) {
        Entry::Vacant(v) => {
            v.insert(new);
        }
        Entry::Occupied(mut o) => {
            let cur = o.get();
            if new.width < cur.width {
                o.insert(new);
            } else if new.width == cur.width && new.destination != cur.destination {
                if let (Some(a), Some(b)) = (cur.binding, new.binding) {
                    return Err(DispatchError::Ambiguous {
                        first: describe(&bindings[a]),
                        second: describe(&bindings[b]),
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unit::PortRange;
    use pretty_assertions::assert_eq;

    fn prefix(s: &str) -> IpPrefix {
        let (a, l) = s.split_once('/').unwrap();
        IpPrefix {
            addr: a.parse().unwrap(),
            len: l.parse().unwrap(),
        }
    }

    fn ports(s: &str) -> PortRange {
        match s.split_once('-') {
            Some((a, b)) => PortRange {
                first: a.parse().unwrap(),
                last: b.parse().unwrap(),
            },
            None => {
                let p = s.parse().unwrap();
                PortRange { first: p, last: p }
            }
        }
    }

    fn b(protocol: Protocol, pfx: &str, p: &str, dest: u32) -> Binding {
        Binding {
            service: format!("svc{dest}"),
            socket: "s".into(),
            protocol,
            prefix: prefix(pfx),
            ports: ports(p),
            destination: dest,
        }
    }

    use Protocol::{Tcp, Udp};

    /// A case of `precedence_cases.txt`: its name, bindings, and probes
    /// (protocol, address, port, expected destination).
    struct Case {
        name: String,
        bindings: Vec<Binding>,
        probes: Vec<(Protocol, String, u16, Option<u32>)>,
    }

    fn protocol(s: &str) -> Protocol {
        match s {
            "tcp" => Tcp,
            "udp" => Udp,
            other => panic!("precedence_cases.txt: unknown protocol {other}"),
        }
    }

    fn cases() -> Vec<Case> {
        let mut cases: Vec<Case> = Vec::new();
        for line in include_str!("precedence_cases.txt").lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                [] => {}
                [w, ..] if w.starts_with('#') => {}
                ["case", ..] => cases.push(Case {
                    name: line["case ".len()..].to_string(),
                    bindings: Vec::new(),
                    probes: Vec::new(),
                }),
                ["bind", proto, pfx, p, dest] => cases.last_mut().expect("a case").bindings.push(
                    b(protocol(proto), pfx, p, dest.parse().expect("destination")),
                ),
                ["probe", proto, addr, port, want] => {
                    cases.last_mut().expect("a case").probes.push((
                        protocol(proto),
                        addr.to_string(),
                        port.parse().expect("port"),
                        want.parse().ok(),
                    ))
                }
                _ => panic!("precedence_cases.txt: cannot read {line:?}"),
            }
        }
        cases
    }

    #[test]
    fn precedence_table() {
        let cases = cases();
        assert_eq!(cases.len(), 8, "every case of precedence_cases.txt read");
        for Case {
            name,
            bindings,
            probes,
        } in cases
        {
            let c = compile(&bindings, 4096).unwrap_or_else(|e| panic!("{name}: {e}"));
            for (proto, addr, port, want) in probes {
                let got = c.lookup(proto, addr.parse().unwrap(), port);
                assert_eq!(got, want, "{name}: {proto} {addr} port {port}");
            }
        }
    }

    #[test]
    fn all_ports_cost_one_entry_like_one_port() {
        let all = compile(&[b(Tcp, "192.0.2.0/24", "1-65535", 1)], 4096).unwrap();
        let one = compile(&[b(Tcp, "192.0.2.0/24", "80", 1)], 4096).unwrap();
        assert_eq!(all.entries.len(), 1);
        assert_eq!(one.entries.len(), 1);
        assert_eq!(all.classes[0][1], 1);
        assert_eq!(all.classes[0][65535], 1);
        assert_eq!(all.classes[0][0], 0);
    }

    #[test]
    fn ranges_split_into_elementary_classes() {
        let c = compile(
            &[
                b(Tcp, "192.0.2.0/24", "10-20", 1),
                b(Tcp, "198.51.100.0/24", "15-30", 2),
                b(Tcp, "203.0.113.0/24", "40", 3),
            ],
            4096,
        )
        .unwrap();
        let classes: Vec<(u16, u16)> = [9u16, 10, 14, 15, 20, 21, 30, 31, 40, 41]
            .iter()
            .map(|p| (*p, c.classes[0][usize::from(*p)]))
            .collect();
        assert_eq!(
            classes,
            vec![
                (9, 0),
                (10, 1),
                (14, 1),
                (15, 2),
                (20, 2),
                (21, 3),
                (30, 3),
                (31, 0),
                (40, 4),
                (41, 0)
            ]
        );
        // 10-20 spans classes 1,2; 15-30 spans 2,3; 40 is class 4.
        assert_eq!(c.entries.len(), 5);
        assert!(c.classes[1].iter().all(|k| *k == 0), "udp untouched");
    }

    #[test]
    fn rejects() {
        let cases: Vec<(&str, Vec<Binding>, &str)> = vec![
            (
                "equal prefix, equal width, overlapping, two destinations",
                vec![
                    b(Tcp, "192.0.2.0/24", "8000-8099", 1),
                    b(Tcp, "192.0.2.0/24", "8050-8149", 2),
                ],
                "service svc1 socket s: tcp 192.0.2.0/24 port 8000-8099 (destination 1)",
            ),
            (
                "v4 and its mapped form are the same prefix",
                vec![
                    b(Udp, "192.0.2.0/24", "53", 1),
                    b(Udp, "::ffff:192.0.2.0/120", "53", 2),
                ],
                "service svc2",
            ),
            (
                "unix protocol",
                vec![b(Protocol::UnixStream, "192.0.2.0/24", "1", 1)],
                "unix-stream",
            ),
            (
                "destination out of range",
                vec![b(Tcp, "192.0.2.0/24", "1", 4096)],
                "destination 4096",
            ),
        ];
        for (name, bindings, needle) in cases {
            let err = compile(&bindings, 4096).expect_err(name).to_string();
            assert!(err.contains(needle), "{name}: {err}");
        }
    }

    #[test]
    fn same_destination_overlaps_are_fine() {
        let c = compile(
            &[
                b(Tcp, "192.0.2.0/24", "80", 1),
                b(Tcp, "192.0.2.0/24", "80", 1),
            ],
            4096,
        )
        .unwrap();
        assert_eq!(c.entries.len(), 1);
    }

    fn options(allow: &[&str], deny: &[&str]) -> crate::unit::SocketOptions {
        crate::unit::SocketOptions {
            allow: allow.iter().map(|p| prefix(p)).collect(),
            deny: deny.iter().map(|p| prefix(p)).collect(),
            ..Default::default()
        }
    }

    /// (name, allow, deny, probes: (source, admitted)).
    type RuleCase = (
        &'static str,
        Vec<&'static str>,
        Vec<&'static str>,
        Vec<(&'static str, bool)>,
    );

    #[test]
    fn source_rules_table() {
        let cases: Vec<RuleCase> = vec![
            (
                "no rules admit everything",
                vec![],
                vec![],
                vec![("192.0.2.1", true), ("2001:db8::1", true)],
            ),
            (
                "allow only",
                vec!["192.0.2.0/25"],
                vec![],
                vec![
                    ("192.0.2.1", true),
                    ("192.0.2.127", true),
                    ("192.0.2.128", false),
                    ("2001:db8::1", false),
                ],
            ),
            (
                "deny only",
                vec![],
                vec!["198.51.100.0/24"],
                vec![
                    ("198.51.100.7", false),
                    ("198.51.101.7", true),
                    ("2001:db8::1", true),
                ],
            ),
            (
                "a longer allow inside a deny is still refused",
                vec!["198.51.100.0/25"],
                vec!["198.51.100.0/24"],
                vec![("198.51.100.7", false), ("198.51.100.200", false)],
            ),
            (
                "a longer deny inside an allow refuses its part",
                vec!["198.51.100.0/24"],
                vec!["198.51.100.128/25"],
                vec![
                    ("198.51.100.7", true),
                    ("198.51.100.200", false),
                    ("198.51.101.1", false),
                ],
            ),
            (
                "the same prefix in both is refused",
                vec!["198.51.100.0/24", "2001:db8::/32"],
                vec!["198.51.100.0/24"],
                vec![("198.51.100.7", false), ("2001:db8::7", true)],
            ),
            (
                "deny everything",
                vec!["198.51.100.0/24"],
                vec!["::/0"],
                vec![("198.51.100.7", false), ("2001:db8::7", false)],
            ),
            (
                "allow everything but one host",
                vec!["::/0"],
                vec!["2001:db8::7/128", "198.51.100.7/32"],
                vec![
                    ("2001:db8::7", false),
                    ("2001:db8::8", true),
                    ("198.51.100.7", false),
                    ("198.51.100.8", true),
                ],
            ),
            (
                "0.0.0.0/0 is every IPv4 source and no IPv6 one",
                vec!["0.0.0.0/0"],
                vec![],
                vec![("203.0.113.9", true), ("2001:db8::1", false)],
            ),
            (
                "::/0 contains IPv4 sources too, as in admits()",
                vec![],
                vec!["::/0"],
                vec![("203.0.113.9", false), ("2001:db8::1", false)],
            ),
        ];
        for (name, allow, deny, probes) in cases {
            let o = options(&allow, &deny);
            let entries = compile_rules(1, &o.allow, &o.deny).unwrap();
            for (src, want) in probes {
                let src: IpAddr = src.parse().unwrap();
                assert_eq!(
                    o.admits(src),
                    want,
                    "{name}: admits({src}) disagrees with the table"
                );
                assert_eq!(rules_admit(&entries, src), want, "{name}: {src}");
            }
        }
    }

    #[test]
    fn source_rules_entries() {
        let o = options(&["198.51.100.0/25", "2001:db8::/32"], &["198.51.100.0/24"]);
        let entries = compile_rules(1, &o.allow, &o.deny).unwrap();
        let got: Vec<(u8, bool)> = entries.iter().map(|e| (e.prefix_len, e.refuse)).collect();
        // Default refuse; the allow inside the deny is left out.
        assert_eq!(got, vec![(0, true), (32, false), (120, true)]);
        assert!(compile_rules(1, &[], &[]).unwrap().is_empty());
        let bad = IpPrefix {
            addr: "192.0.2.0".parse().unwrap(),
            len: 33,
        };
        let err = compile_rules(7, &[bad], &[]).unwrap_err().to_string();
        assert!(
            err.contains("192.0.2.0/33") && err.contains("destination 7"),
            "{err}"
        );
    }

    /// Random allow/deny lists: the compiled rules agree with `admits()`.
    #[test]
    fn compiled_rules_match_admits() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        // Addresses from a small space, so that prefixes nest and collide often.
        let addr = |next: &mut dyn FnMut() -> u64| -> IpAddr {
            let r = next();
            if r.is_multiple_of(3) {
                IpAddr::V6(Ipv6Addr::from(
                    (0x2001_0db8u128 << 96) | (u128::from((r >> 40) & 0xff) << 88),
                ))
            } else {
                IpAddr::V4(Ipv4Addr::from(0xc633_6400 | ((r >> 32) as u32 & 0x00ff)))
            }
        };
        let pfx = |a: IpAddr, len: u8| {
            let len = if a.is_ipv4() {
                len.min(32)
            } else {
                len.min(128)
            };
            let masked_addr = match a {
                IpAddr::V4(v) => IpAddr::V4(Ipv4Addr::from(
                    u32::from(v) & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0),
                )),
                IpAddr::V6(v) => IpAddr::V6(Ipv6Addr::from(masked(u128::from(v), len))),
            };
            IpPrefix {
                addr: masked_addr,
                len,
            }
        };
        for _round in 0..300 {
            let mut lists = [Vec::new(), Vec::new()];
            for list in lists.iter_mut() {
                for _ in 0..(next() % 4) {
                    let a = addr(&mut next);
                    let len = if a.is_ipv4() {
                        [0u8, 24, 25, 26, 30, 32][(next() % 6) as usize]
                    } else {
                        [0u8, 32, 36, 40, 128][(next() % 5) as usize]
                    };
                    list.push(pfx(a, len));
                }
            }
            let [allow, deny] = lists;
            let o = crate::unit::SocketOptions {
                allow,
                deny,
                ..Default::default()
            };
            let entries = compile_rules(3, &o.allow, &o.deny).unwrap();
            for _ in 0..100 {
                let src = addr(&mut next);
                assert_eq!(
                    rules_admit(&entries, src),
                    o.admits(src),
                    "{src} under allow {:?} deny {:?}",
                    o.allow,
                    o.deny
                );
            }
        }
    }

    /// A xorshift generator: the same draws on every run.
    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// Random binding sets: the compiled lookup equals the rule applied directly.
    #[test]
    fn compiled_lookup_matches_the_rule() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let mut compiled_rounds = 0;
        for _round in 0..50 {
            let mut bindings = Vec::new();
            for i in 0..12u32 {
                let len = [8u8, 16, 24, 25, 32][(next() % 5) as usize];
                let addr = Ipv4Addr::from((10u32 << 24) | (next() as u32 & 0x00ff_ff00));
                let p = IpPrefix {
                    addr: IpAddr::V4(Ipv4Addr::from(
                        u32::from(addr) & (u32::MAX << (32 - u32::from(len))),
                    )),
                    len,
                };
                let first = 100 + (next() % 50) as u16;
                let last = first + (next() % 40) as u16 + u16::from(i as u8);
                bindings.push(Binding {
                    service: format!("s{i}"),
                    socket: "x".into(),
                    protocol: Tcp,
                    prefix: p,
                    ports: PortRange { first, last },
                    destination: i,
                });
            }
            let Ok(c) = compile(&bindings, 4096) else {
                continue; // an ambiguous draw
            };
            compiled_rounds += 1;
            for _ in 0..200 {
                let addr = IpAddr::V4(Ipv4Addr::from(
                    (10u32 << 24) | (next() as u32 & 0x00ff_ffff),
                ));
                let port = 90 + (next() % 120) as u16;
                let want = bindings
                    .iter()
                    .filter(|b| b.prefix.contains(addr) && b.ports.contains(port))
                    .min_by_key(|b| (std::cmp::Reverse(b.prefix.len), b.ports.width()))
                    .map(|b| b.destination);
                assert_eq!(c.lookup(Tcp, addr, port), want, "{addr} port {port}");
            }
        }
        assert!(
            compiled_rounds > 10,
            "only {compiled_rounds} unambiguous draws"
        );
    }
}
