//! ipsets, typed, rendered as `ipset save` prints them and as `ipset restore -exist` reads them,
//! and read back from `ipset save` ([`parse_save`]).
//!
//! A set's entries are kept sorted (by address, then protocol and port), so the same content
//! always renders to the same text. Sizes follow the content: kube-proxy's fixed `maxelem 65536`
//! is kept as the floor (so small clusters read the same), and grows to the next power of two
//! above twice the entry count.

use std::collections::BTreeSet;
use std::fmt::{self, Write};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::Error;
use crate::rule::Protocol;
use crate::table::{Family, FamilyNames as _};

/// The temporary twin a resize fills before `swap`: the same name with `KUBE-` spelled
/// `KUBE~`, so it is as long as the original and still recognisably the proxy's.
#[must_use]
pub fn swap_name(name: &str) -> String {
    name.replacen("KUBE-", "KUBE~", 1)
}

/// The longest set name the kernel accepts (IPSET_MAXNAMELEN - 1).
pub const MAX_SET_NAME_LEN: usize = 31;

/// An ipset type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum SetType {
    /// `hash:ip`
    HashIp,
    /// `hash:ip,port`
    HashIpPort,
    /// `hash:ip,port,ip`
    HashIpPortIp,
    /// `hash:ip,port,net`
    HashIpPortNet,
    /// `hash:net`
    HashNet,
    /// `bitmap:port` (range 0-65535)
    BitmapPort,
}

impl SetType {
    /// The type name `ipset create` takes.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            SetType::HashIp => "hash:ip",
            SetType::HashIpPort => "hash:ip,port",
            SetType::HashIpPortIp => "hash:ip,port,ip",
            SetType::HashIpPortNet => "hash:ip,port,net",
            SetType::HashNet => "hash:net",
            SetType::BitmapPort => "bitmap:port",
        }
    }

    /// The type of a name as `ipset create` takes it and `ipset save` prints it.
    #[must_use]
    pub fn from_name(name: &str) -> Option<SetType> {
        [
            SetType::HashIp,
            SetType::HashIpPort,
            SetType::HashIpPortIp,
            SetType::HashIpPortNet,
            SetType::HashNet,
            SetType::BitmapPort,
        ]
        .into_iter()
        .find(|t| t.as_str() == name)
    }

    /// Whether `entry` has the shape this type stores.
    #[must_use]
    pub fn accepts(self, entry: &SetEntry) -> bool {
        matches!(
            (self, entry),
            (SetType::HashIp, SetEntry::Ip(_))
                | (SetType::HashIpPort, SetEntry::IpPort(..))
                | (SetType::HashIpPortIp, SetEntry::IpPortIp(..))
                | (SetType::HashIpPortNet, SetEntry::IpPortNet(..))
                | (SetType::HashNet, SetEntry::Net(_))
                | (SetType::BitmapPort, SetEntry::Port(_))
        )
    }
}

impl fmt::Display for SetType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One member of a set, in the shape of its set's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetEntry {
    /// `10.96.0.10` (hash:ip)
    Ip(IpAddr),
    /// `10.96.0.10,tcp:80` (hash:ip,port)
    IpPort(IpAddr, Protocol, u16),
    /// `10.244.1.5,tcp:8080,10.244.1.5` (hash:ip,port,ip)
    IpPortIp(IpAddr, Protocol, u16, IpAddr),
    /// `10.96.0.10,tcp:80,192.168.0.0/16` (hash:ip,port,net)
    IpPortNet(IpAddr, Protocol, u16, IpNet),
    /// `10.0.0.0/8` (hash:net; a host network prints without its prefix, as `ipset save` does)
    Net(IpNet),
    /// `30080` (bitmap:port)
    Port(u16),
}

impl fmt::Display for SetEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetEntry::Ip(ip) => write!(f, "{ip}"),
            SetEntry::IpPort(ip, p, port) => write!(f, "{ip},{p}:{port}"),
            SetEntry::IpPortIp(ip, p, port, ip2) => write!(f, "{ip},{p}:{port},{ip2}"),
            SetEntry::IpPortNet(ip, p, port, net) => {
                write!(f, "{ip},{p}:{port},")?;
                write_net(f, net)
            }
            SetEntry::Net(net) => write_net(f, net),
            SetEntry::Port(port) => write!(f, "{port}"),
        }
    }
}

impl SetEntry {
    /// The entry of a set of `kind` as `ipset save` prints it (the inverse of `Display`).
    #[must_use]
    pub fn parse(kind: SetType, text: &str) -> Option<SetEntry> {
        // IPv6 addresses hold `:` but never `,`: the fields split on `,`.
        let mut fields = text.split(',');
        let mut field = || fields.next();
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        let proto_port = |s: &str| {
            let (p, port) = s.split_once(':')?;
            Some((Protocol::from_name(p)?, port.parse::<u16>().ok()?))
        };
        // `ipset save` prints a network without host bits; one with them reads as that network.
        let net = |s: &str| {
            s.parse::<IpNet>()
                .ok()
                .or_else(|| ip(s).map(IpNet::from))
                .map(|n| n.trunc())
        };
        let entry = match kind {
            SetType::HashIp => SetEntry::Ip(ip(field()?)?),
            SetType::HashIpPort => {
                let a = ip(field()?)?;
                let (p, port) = proto_port(field()?)?;
                SetEntry::IpPort(a, p, port)
            }
            SetType::HashIpPortIp => {
                let a = ip(field()?)?;
                let (p, port) = proto_port(field()?)?;
                SetEntry::IpPortIp(a, p, port, ip(field()?)?)
            }
            SetType::HashIpPortNet => {
                let a = ip(field()?)?;
                let (p, port) = proto_port(field()?)?;
                SetEntry::IpPortNet(a, p, port, net(field()?)?)
            }
            SetType::HashNet => SetEntry::Net(net(field()?)?),
            SetType::BitmapPort => SetEntry::Port(field()?.parse().ok()?),
        };
        field().is_none().then_some(entry)
    }
}

fn write_net(f: &mut fmt::Formatter<'_>, net: &IpNet) -> fmt::Result {
    if net.prefix_len() == net.max_prefix_len() {
        write!(f, "{}", net.addr())
    } else {
        write!(f, "{}/{}", net.network(), net.prefix_len())
    }
}

/// A set's identity and parameters: the `create` line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SetHeader {
    /// The set name.
    pub name: String,
    /// The set type.
    pub kind: SetType,
    /// The family (ignored by bitmap:port).
    pub family: Family,
    /// `hashsize` (hash types; a power of two).
    pub hashsize: u32,
    /// `maxelem` (hash types).
    pub maxelem: u32,
}

impl SetHeader {
    /// The header for a set of `kind` holding `len` entries, sized from its content.
    #[must_use]
    pub fn sized(name: impl Into<String>, kind: SetType, family: Family, len: usize) -> SetHeader {
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        let maxelem = len
            .saturating_mul(2)
            .checked_next_power_of_two()
            .unwrap_or(u32::MAX)
            .max(65_536);
        let hashsize = (len / 4)
            .checked_next_power_of_two()
            .unwrap_or(1 << 30)
            .max(1024);
        SetHeader {
            name: name.into(),
            kind,
            family,
            hashsize,
            maxelem,
        }
    }

    /// Whether a set made with these parameters can hold what `wanted` is sized for: the same
    /// type and family (a bitmap has none) and at least its `maxelem`. The kernel grows a
    /// hash set's `hashsize` as it fills, so that is not compared.
    #[must_use]
    pub fn fits(&self, wanted: &SetHeader) -> bool {
        self.kind == wanted.kind
            && (self.kind == SetType::BitmapPort
                || (self.family == wanted.family && self.maxelem >= wanted.maxelem))
    }

    /// Writes `create NAME TYPE …` (without `-exist`; `ipset restore -exist` supplies it).
    pub fn write_create(&self, name: &str, out: &mut String) {
        let _ = write!(out, "create {name} {}", self.kind);
        if self.kind == SetType::BitmapPort {
            out.push_str(" range 0-65535\n");
        } else {
            let _ = writeln!(
                out,
                " family {} hashsize {} maxelem {}",
                self.family.ipset_family(),
                self.hashsize,
                self.maxelem
            );
        }
    }
}

/// A set with its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpSet {
    /// Name and parameters.
    pub header: SetHeader,
    /// Members, sorted.
    pub entries: BTreeSet<SetEntry>,
}

impl IpSet {
    /// A set holding `entries`, sized from them.
    #[must_use]
    pub fn new(
        name: impl Into<String>,
        kind: SetType,
        family: Family,
        entries: BTreeSet<SetEntry>,
    ) -> IpSet {
        IpSet {
            header: SetHeader::sized(name, kind, family, entries.len()),
            entries,
        }
    }

    /// The set's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.header.name
    }

    /// Checks the name (`owned` says it is, short enough) and that every entry fits the type
    /// and family.
    pub fn validate(&self, owned: fn(&str) -> bool) -> Result<(), Error> {
        let name = self.name();
        if !owned(name) || name.len() > MAX_SET_NAME_LEN {
            return Err(Error::SetNotOwned(name.to_owned()));
        }
        for e in &self.entries {
            if !self.header.kind.accepts(e) || !family_fits(self.header.family, e) {
                return Err(Error::BadEntry {
                    set: name.to_owned(),
                    entry: e.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Writes the set as `ipset save` prints it: the `create` line, then one `add` per entry.
    pub fn write_save(&self, out: &mut String) {
        self.header.write_create(self.name(), out);
        for e in &self.entries {
            let _ = writeln!(out, "add {} {e}", self.name());
        }
    }
}

fn family_fits(family: Family, e: &SetEntry) -> bool {
    let addrs: [Option<IpAddr>; 2] = match e {
        SetEntry::Ip(a) | SetEntry::IpPort(a, ..) => [Some(*a), None],
        SetEntry::IpPortIp(a, _, _, b) => [Some(*a), Some(*b)],
        SetEntry::IpPortNet(a, _, _, n) => [Some(*a), Some(n.addr())],
        SetEntry::Net(n) => [Some(n.addr()), None],
        SetEntry::Port(_) => [None, None],
    };
    addrs.into_iter().flatten().all(|a| Family::of(a) == family)
}

/// One line of `ipset restore` input.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SetOp {
    /// `create NAME …` (a no-op under `-exist` if the set exists with the same parameters).
    Create(SetHeader),
    /// `create KUBE~… …`: the temporary twin a resize fills (see [`swap_name`]).
    CreateSwap(SetHeader),
    /// `add NAME ENTRY`
    Add(String, SetEntry),
    /// `del NAME ENTRY`
    Del(String, SetEntry),
    /// `swap A B`
    Swap(String, String),
    /// `flush NAME`
    Flush(String),
    /// `destroy NAME`
    Destroy(String),
}

impl SetOp {
    fn set_name(&self) -> &str {
        match self {
            SetOp::Create(h) | SetOp::CreateSwap(h) => &h.name,
            SetOp::Add(n, _)
            | SetOp::Del(n, _)
            | SetOp::Swap(n, _)
            | SetOp::Flush(n)
            | SetOp::Destroy(n) => n,
        }
    }

    fn write(&self, out: &mut String) {
        match self {
            SetOp::Create(h) => h.write_create(&h.name, out),
            SetOp::CreateSwap(h) => h.write_create(&swap_name(&h.name), out),
            SetOp::Add(n, e) => {
                let _ = writeln!(out, "add {n} {e}");
            }
            SetOp::Del(n, e) => {
                let _ = writeln!(out, "del {n} {e}");
            }
            SetOp::Swap(a, b) => {
                let _ = writeln!(out, "swap {a} {b}");
            }
            SetOp::Flush(n) => {
                let _ = writeln!(out, "flush {n}");
            }
            SetOp::Destroy(n) => {
                let _ = writeln!(out, "destroy {n}");
            }
        }
    }
}

/// A batch of set operations for one `ipset restore -exist` run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetPatch {
    /// The operations, in order.
    pub ops: Vec<SetOp>,
}

impl SetPatch {
    /// Appends the operations that turn `old` (what was last applied, if anything) into `new`:
    /// only the changed entries when the parameters are equal; otherwise the content is built
    /// in a temporary twin and swapped in, so the set is never seen half-filled.
    pub fn update(&mut self, old: Option<&IpSet>, new: &IpSet) {
        let name = new.name().to_owned();
        match old {
            Some(old) if old.header == new.header => {
                for e in old.entries.difference(&new.entries) {
                    self.ops.push(SetOp::Del(name.clone(), *e));
                }
                for e in new.entries.difference(&old.entries) {
                    self.ops.push(SetOp::Add(name.clone(), *e));
                }
            }
            Some(_) => {
                self.ops.push(SetOp::Destroy(swap_name(&name)));
                self.fill_twin_and_swap(new);
            }
            None => {
                self.ops.push(SetOp::Create(new.header.clone()));
                self.ops.push(SetOp::Flush(name.clone()));
                for e in &new.entries {
                    self.ops.push(SetOp::Add(name.clone(), *e));
                }
            }
        }
    }

    /// Appends the operations that make `set` hold exactly its entries whatever the kernel
    /// has now, `existing` being the names `ipset list -n` printed: the set is created if
    /// missing, its content is built in the temporary twin and swapped in, so traffic never
    /// meets a half-filled set. A twin a killed run left behind is destroyed first, and an
    /// existing set is not created again (`create` with other parameters fails even under
    /// `-exist`; the swap brings the new parameters).
    pub fn refill(&mut self, existing: &BTreeSet<String>, set: &IpSet) {
        let name = set.name();
        if !existing.contains(name) {
            self.ops.push(SetOp::Create(set.header.clone()));
        }
        let swap = swap_name(name);
        if existing.contains(&swap) {
            self.ops.push(SetOp::Destroy(swap));
        }
        self.fill_twin_and_swap(set);
    }

    /// Creates `set`'s twin, fills it, swaps it with `set` and destroys it.
    fn fill_twin_and_swap(&mut self, set: &IpSet) {
        let swap = swap_name(set.name());
        self.ops.push(SetOp::CreateSwap(set.header.clone()));
        for e in &set.entries {
            self.ops.push(SetOp::Add(swap.clone(), *e));
        }
        self.ops
            .push(SetOp::Swap(swap.clone(), set.name().to_owned()));
        self.ops.push(SetOp::Destroy(swap));
    }

    /// Appends the removal of a set the proxy no longer wants (after no rule references it).
    pub fn remove(&mut self, name: &str) {
        self.ops.push(SetOp::Flush(name.to_owned()));
        self.ops.push(SetOp::Destroy(name.to_owned()));
    }

    /// Whether there is nothing to do.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Refuses any operation on a set `owned` does not own (the proxy's:
    /// [`crate::ipvs_mode::is_proxy_set`]).
    pub fn check_ownership(&self, owned: fn(&str) -> bool) -> Result<(), Error> {
        match self.ops.iter().find(|op| !owned(op.set_name())) {
            Some(op) => Err(Error::SetNotOwned(op.set_name().to_owned())),
            None => Ok(()),
        }
    }

    /// The `ipset restore -exist` input.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(self.ops.len() * 48);
        for op in &self.ops {
            op.write(&mut out);
        }
        out
    }
}

/// Writes the `ipset restore -exist` input that makes each set of `wanted` hold exactly its
/// members, given the sets `ipset save` read (`kernel`), without a copy of the members:
/// `members` yields each one once, with the index in `wanted` of its set, in any order, and
/// `holds(i, e)` says whether set `i` wants `e`. Where a set exists with room for them (same
/// type and family, `maxelem` as large), only the members that differ are deleted and added;
/// a missing set, or one that needs other parameters, is built as [`SetPatch::refill`] builds
/// it (its twin filled, then swapped in). A full sync over sets that hold what they should
/// writes nothing.
pub fn write_between<'e, W: Write>(
    out: &mut W,
    kernel: &[IpSet],
    wanted: &[SetHeader],
    members: impl IntoIterator<Item = (usize, &'e SetEntry)>,
    holds: impl Fn(usize, &SetEntry) -> bool,
) -> fmt::Result {
    let in_kernel = |name: &str| kernel.iter().position(|k| k.name() == name);
    // Per wanted set: the kernel's set it patches, or `None` when it is built in its twin.
    let mut patched: Vec<Option<&IpSet>> = Vec::with_capacity(wanted.len());
    let swaps: Vec<String> = wanted.iter().map(|set| swap_name(&set.name)).collect();
    let mut header = String::new();
    for (i, (set, swap)) in wanted.iter().zip(&swaps).enumerate() {
        let name = &set.name;
        if in_kernel(swap).is_some() {
            writeln!(out, "destroy {swap}")?;
        }
        match in_kernel(name).map(|k| &kernel[k]) {
            Some(old) if old.header.fits(set) => {
                for e in old.entries.iter().filter(|e| !holds(i, e)) {
                    writeln!(out, "del {name} {e}")?;
                }
                patched.push(Some(old));
            }
            old => {
                header.clear();
                if old.is_none() {
                    set.write_create(name, &mut header);
                }
                set.write_create(swap, &mut header);
                out.write_str(&header)?;
                patched.push(None);
            }
        }
    }
    for (i, e) in members {
        match patched[i] {
            Some(old) if old.entries.contains(e) => {}
            Some(_) => writeln!(out, "add {} {e}", wanted[i].name)?,
            None => writeln!(out, "add {} {e}", swaps[i])?,
        }
    }
    for ((set, swap), _) in wanted
        .iter()
        .zip(&swaps)
        .zip(&patched)
        .filter(|(_, p)| p.is_none())
    {
        writeln!(out, "swap {swap} {}\ndestroy {swap}", set.name)?;
    }
    Ok(())
}

/// Renders sets as `ipset save` prints them, sorted by name.
#[must_use]
pub fn render_save<'a>(sets: impl IntoIterator<Item = &'a IpSet>) -> String {
    let mut sets: Vec<&IpSet> = sets.into_iter().collect();
    sets.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = String::new();
    for s in sets {
        s.write_save(&mut out);
    }
    out
}

/// Reads `ipset save` output back: every set of a type listed in [`SetType`], with the
/// entries that fit it, in the order printed. Sets of other types, options this crate does not
/// write (`bucketsize`, `initval`, `comment`, an entry's `timeout`, …) and lines it does not
/// know are skipped, so a newer ipset never breaks the reading.
#[must_use]
pub fn parse_save(text: &str) -> Vec<IpSet> {
    let mut sets = SaveSets::default();
    for line in text.lines() {
        sets.line(line);
    }
    sets.finish()
}

/// Every set of `ipset save` output with its members, read one line at a time
/// ([`parse_save`], and the output of the tool as it prints it).
#[derive(Debug, Default)]
pub struct SaveSets {
    parser: SaveParser,
    /// The members of each set of the parser's, by its index.
    entries: Vec<BTreeSet<SetEntry>>,
}

impl SaveSets {
    pub fn line(&mut self, line: &str) {
        if let Some((i, e)) = self.parser.line(line) {
            self.entries
                .resize_with(self.parser.headers.len(), BTreeSet::new);
            self.entries[i].insert(e);
        }
    }

    /// The sets read, in the order printed.
    #[must_use]
    pub fn finish(mut self) -> Vec<IpSet> {
        self.entries
            .resize_with(self.parser.headers.len(), BTreeSet::new);
        let sets = self.parser.headers.into_iter().zip(self.entries);
        sets.map(|(header, entries)| IpSet { header, entries })
            .collect()
    }
}

/// Reads `ipset save` output one line at a time, as [`parse_save`] reads it whole, so that a
/// large save is never held (as text, or as sets) to be read.
#[derive(Debug, Default)]
pub struct SaveParser {
    /// The sets read so far, in the order printed.
    pub headers: Vec<SetHeader>,
}

impl SaveParser {
    /// Reads one line: a set's `create` line is kept; a member of a set read before is
    /// returned, with its set's index in [`SaveParser::headers`].
    pub fn line(&mut self, line: &str) -> Option<(usize, SetEntry)> {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("create"), Some(name), Some(kind)) => {
                let kind = SetType::from_name(kind)?;
                // ipset's defaults, for what a line leaves out.
                let mut header = SetHeader {
                    name: name.to_owned(),
                    kind,
                    family: Family::V4,
                    hashsize: 1024,
                    maxelem: 65_536,
                };
                // ipset prints no family or sizes for a bitmap (it has none): any on the line
                // are not the set's, and reading them would make it differ from its print.
                while let Some(option) = words.next().filter(|_| kind != SetType::BitmapPort) {
                    match (option, words.next()) {
                        ("family", Some("inet6")) => header.family = Family::V6,
                        ("hashsize", Some(n)) => header.hashsize = n.parse().unwrap_or(1024),
                        ("maxelem", Some(n)) => header.maxelem = n.parse().unwrap_or(65_536),
                        _ => {}
                    }
                }
                self.headers.push(header);
                None
            }
            (Some("add"), Some(name), Some(entry)) => {
                let i = self.headers.iter().rposition(|s| s.name == name)?;
                Some((i, SetEntry::parse(self.headers[i].kind, entry)?))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipvs_mode::is_proxy_set;
    use std::net::Ipv4Addr;

    fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    #[test]
    fn save_prints_create_then_sorted_adds() {
        let entries = [
            SetEntry::IpPort(ip(10, 96, 0, 10), Protocol::Udp, 53),
            SetEntry::IpPort(ip(10, 96, 0, 1), Protocol::Tcp, 443),
            SetEntry::IpPort(ip(10, 96, 0, 10), Protocol::Tcp, 53),
        ];
        let set = IpSet::new(
            "KUBE-CLUSTER-IP",
            SetType::HashIpPort,
            Family::V4,
            entries.into(),
        );
        set.validate(is_proxy_set).unwrap();
        assert_eq!(
            render_save([&set]),
            "create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536\n\
             add KUBE-CLUSTER-IP 10.96.0.1,tcp:443\n\
             add KUBE-CLUSTER-IP 10.96.0.10,tcp:53\n\
             add KUBE-CLUSTER-IP 10.96.0.10,udp:53\n"
        );
    }

    #[test]
    fn every_type_renders_its_entry_shape() {
        let net: IpNet = "192.168.0.0/16".parse().unwrap();
        let host: IpNet = "1.2.3.4/32".parse().unwrap();
        let cases = [
            (SetEntry::Ip(ip(10, 0, 0, 1)), "10.0.0.1"),
            (
                SetEntry::IpPortIp(ip(10, 0, 0, 1), Protocol::Tcp, 80, ip(10, 0, 0, 1)),
                "10.0.0.1,tcp:80,10.0.0.1",
            ),
            (
                SetEntry::IpPortNet(ip(10, 0, 0, 1), Protocol::Sctp, 80, net),
                "10.0.0.1,sctp:80,192.168.0.0/16",
            ),
            (SetEntry::Net(host), "1.2.3.4"),
            (SetEntry::Port(30080), "30080"),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
        }
        let mut out = String::new();
        SetHeader::sized("KUBE-NODE-PORT-TCP", SetType::BitmapPort, Family::V4, 3)
            .write_create("KUBE-NODE-PORT-TCP", &mut out);
        assert_eq!(out, "create KUBE-NODE-PORT-TCP bitmap:port range 0-65535\n");
    }

    #[test]
    fn save_text_reads_back_as_the_sets_it_was_rendered_from() {
        let net: IpNet = "192.168.0.0/16".parse().unwrap();
        let v6: IpAddr = "fd00::a".parse().unwrap();
        let sets = [
            IpSet::new(
                "KUBE-CLUSTER-IP",
                SetType::HashIpPort,
                Family::V4,
                [SetEntry::IpPort(ip(10, 96, 0, 1), Protocol::Tcp, 443)].into(),
            ),
            IpSet::new(
                "KUBE-6-CLUSTER-IP",
                SetType::HashIpPort,
                Family::V6,
                [SetEntry::IpPort(v6, Protocol::Sctp, 53)].into(),
            ),
            IpSet::new(
                "KUBE-LOOP-BACK",
                SetType::HashIpPortIp,
                Family::V4,
                [SetEntry::IpPortIp(
                    ip(10, 0, 0, 1),
                    Protocol::Udp,
                    53,
                    ip(10, 0, 0, 1),
                )]
                .into(),
            ),
            IpSet::new(
                "KUBE-LOAD-BALANCER-SOURCE-CIDR",
                SetType::HashIpPortNet,
                Family::V4,
                [SetEntry::IpPortNet(ip(1, 2, 3, 4), Protocol::Tcp, 80, net)].into(),
            ),
            IpSet::new(
                "KUBE-IPVS-IPS",
                SetType::HashIp,
                Family::V4,
                [SetEntry::Ip(ip(10, 96, 0, 1))].into(),
            ),
            IpSet::new(
                "KUBE-NODE-PORT-TCP",
                SetType::BitmapPort,
                Family::V4,
                [SetEntry::Port(30080), SetEntry::Port(30081)].into(),
            ),
        ];
        let text = render_save(&sets);
        assert_eq!(render_save(&parse_save(&text)), text);
    }

    #[test]
    fn save_of_a_newer_ipset_reads_past_what_it_does_not_know() {
        let text = "create my-macs hash:mac hashsize 1024 maxelem 65536\n\
                    add my-macs 00:11:22:33:44:55\n\
                    create KUBE-NODE-PORT-SCTP-HASH hash:ip,port family inet hashsize 2048 maxelem 131072 bucketsize 12 initval 0x5a2bd4ce\n\
                    add KUBE-NODE-PORT-SCTP-HASH 10.0.0.1,sctp:30080\n\
                    add KUBE-NODE-PORT-SCTP-HASH 10.0.0.1,icmp:echo-request\n\
                    create KUBE-NODE-PORT-UDP bitmap:port range 0-65535 comment\n\
                    add KUBE-NODE-PORT-UDP 30053 comment \"dns\"\n";
        let sets = parse_save(text);
        let names: Vec<&str> = sets.iter().map(IpSet::name).collect();
        assert_eq!(names, ["KUBE-NODE-PORT-SCTP-HASH", "KUBE-NODE-PORT-UDP"]);
        assert_eq!(
            (sets[0].header.hashsize, sets[0].header.maxelem),
            (2048, 131_072)
        );
        assert_eq!(
            sets[0].entries,
            [SetEntry::IpPort(ip(10, 0, 0, 1), Protocol::Sctp, 30080)].into()
        );
        assert_eq!(sets[1].entries, [SetEntry::Port(30053)].into());
    }

    /// Found by fuzzing: a bitmap's `create` line with sizes, and a network with host bits,
    /// read as values that printed otherwise (`ipset save` prints neither).
    #[test]
    fn what_reads_back_prints_as_it_was_read() {
        let text = "create KUBE-HEALTH-CHECK-NODE-PORT bitmap:port family inet6 hashsize 8113\n\
                    create KUBE-LOAD-BALANCER-SOURCE-CIDR hash:net family inet\n\
                    add KUBE-LOAD-BALANCER-SOURCE-CIDR 10.1.2.3/8\n";
        let sets = parse_save(text);
        assert_eq!(parse_save(&render_save(&sets)), sets);
        assert_eq!(
            (sets[0].header.family, sets[0].header.hashsize),
            (Family::V4, 1024)
        );
        let net: IpNet = "10.0.0.0/8".parse().unwrap();
        assert_eq!(sets[1].entries, [SetEntry::Net(net)].into());
    }

    #[test]
    fn sizes_grow_with_content() {
        let h = SetHeader::sized("KUBE-CLUSTER-IP", SetType::HashIpPort, Family::V4, 100_000);
        assert_eq!((h.hashsize, h.maxelem), (32_768, 262_144));
    }

    #[test]
    fn update_sends_only_the_difference() {
        let a = IpSet::new(
            "KUBE-LOOP-BACK",
            SetType::HashIp,
            Family::V4,
            [SetEntry::Ip(ip(1, 1, 1, 1)), SetEntry::Ip(ip(2, 2, 2, 2))].into(),
        );
        let b = IpSet::new(
            "KUBE-LOOP-BACK",
            SetType::HashIp,
            Family::V4,
            [SetEntry::Ip(ip(2, 2, 2, 2)), SetEntry::Ip(ip(3, 3, 3, 3))].into(),
        );
        let mut p = SetPatch::default();
        p.update(Some(&a), &b);
        assert_eq!(
            p.render(),
            "del KUBE-LOOP-BACK 1.1.1.1\nadd KUBE-LOOP-BACK 3.3.3.3\n"
        );
        p.check_ownership(is_proxy_set).unwrap();
    }

    #[test]
    fn refill_creates_what_is_missing_clears_a_left_over_twin_and_swaps() {
        let set = |name: &str, entries: &[SetEntry]| {
            IpSet::new(
                name,
                SetType::HashIp,
                Family::V4,
                entries.iter().copied().collect(),
            )
        };
        let existing: BTreeSet<String> = ["KUBE-LOOP-BACK", "KUBE~LOOP-BACK", "my-blocklist"]
            .map(str::to_owned)
            .into();
        let mut p = SetPatch::default();
        p.refill(
            &existing,
            &set("KUBE-LOOP-BACK", &[SetEntry::Ip(ip(1, 1, 1, 1))]),
        );
        p.refill(&existing, &set("KUBE-IPVS-IPS", &[]));
        p.check_ownership(is_proxy_set).unwrap();
        assert_eq!(
            p.render(),
            "destroy KUBE~LOOP-BACK\n\
             create KUBE~LOOP-BACK hash:ip family inet hashsize 1024 maxelem 65536\n\
             add KUBE~LOOP-BACK 1.1.1.1\n\
             swap KUBE~LOOP-BACK KUBE-LOOP-BACK\n\
             destroy KUBE~LOOP-BACK\n\
             create KUBE-IPVS-IPS hash:ip family inet hashsize 1024 maxelem 65536\n\
             create KUBE~IPVS-IPS hash:ip family inet hashsize 1024 maxelem 65536\n\
             swap KUBE~IPVS-IPS KUBE-IPVS-IPS\n\
             destroy KUBE~IPVS-IPS\n"
        );
    }

    #[test]
    fn a_full_write_sends_only_the_members_that_differ_and_builds_what_does_not_fit() {
        let set = |name: &str, entries: &[SetEntry]| {
            IpSet::new(
                name,
                SetType::HashIp,
                Family::V4,
                entries.iter().copied().collect(),
            )
        };
        let (a, b, c) = (
            SetEntry::Ip(ip(1, 1, 1, 1)),
            SetEntry::Ip(ip(2, 2, 2, 2)),
            SetEntry::Ip(ip(3, 3, 3, 3)),
        );
        let mut small = set("KUBE-CLUSTER-IP", &[a]);
        small.header.maxelem = 1024;
        let kernel = [
            set("KUBE-LOOP-BACK", &[a, b]),
            small,
            set("KUBE~LOOP-BACK", &[]),
            set("KUBE-IPVS-IPS", &[c]),
        ];
        let wanted = [
            set("KUBE-LOOP-BACK", &[b, c]),
            set("KUBE-CLUSTER-IP", &[a]),
            set("KUBE-EXTERNAL-IP", &[]),
            set("KUBE-IPVS-IPS", &[c]),
        ];
        let between = |kernel: &[IpSet]| {
            let headers: Vec<SetHeader> = wanted.iter().map(|s| s.header.clone()).collect();
            // Members come in any order: here the last set's first.
            let members = wanted
                .iter()
                .enumerate()
                .rev()
                .flat_map(|(i, s)| s.entries.iter().map(move |e| (i, e)));
            let mut out = String::new();
            write_between(&mut out, kernel, &headers, members, |i, e| {
                wanted[i].entries.contains(e)
            })
            .unwrap();
            out
        };
        assert_eq!(
            between(&kernel),
            "destroy KUBE~LOOP-BACK\n\
             del KUBE-LOOP-BACK 1.1.1.1\n\
             create KUBE~CLUSTER-IP hash:ip family inet hashsize 1024 maxelem 65536\n\
             create KUBE-EXTERNAL-IP hash:ip family inet hashsize 1024 maxelem 65536\n\
             create KUBE~EXTERNAL-IP hash:ip family inet hashsize 1024 maxelem 65536\n\
             add KUBE~CLUSTER-IP 1.1.1.1\n\
             add KUBE-LOOP-BACK 3.3.3.3\n\
             swap KUBE~CLUSTER-IP KUBE-CLUSTER-IP\n\
             destroy KUBE~CLUSTER-IP\n\
             swap KUBE~EXTERNAL-IP KUBE-EXTERNAL-IP\n\
             destroy KUBE~EXTERNAL-IP\n"
        );
        assert_eq!(between(&wanted), "");
    }

    #[test]
    fn only_proxy_sets_are_owned() {
        assert!(is_proxy_set("KUBE-CLUSTER-IP"));
        assert!(is_proxy_set("KUBE-6-CLUSTER-IP"));
        assert!(is_proxy_set("KUBE~CLUSTER-IP"));
        assert!(
            is_proxy_set("KUBE-6-LOAD-BALANCER-SOURCE-CID"),
            "kube-proxy's truncated IPv6 name"
        );
        assert!(is_proxy_set("KUBE~6-LOAD-BALANCER-SOURCE-CID"));
        assert!(!is_proxy_set("KUBE-6-LOAD-BALANCER-SOURCE"));
        assert!(!is_proxy_set("my-blocklist"));
        assert!(!is_proxy_set("KUBE-SOMETHING-ELSE"));
        let mut p = SetPatch::default();
        p.remove("my-blocklist");
        assert!(p.check_ownership(is_proxy_set).is_err());
    }
}
