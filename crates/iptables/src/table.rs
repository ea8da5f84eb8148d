//! Tables and address families: which `*table` section and which tool (`iptables` or
//! `ip6tables`) a rule belongs to.

use std::fmt;

/// An iptables table, as named after `*` in `iptables-save` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Table {
    /// `*filter`
    Filter,
    /// `*nat`
    Nat,
    /// `*mangle`
    Mangle,
    /// `*raw`
    Raw,
}

impl Table {
    /// Every table the proxy may touch, in the order `iptables-save` prints them
    /// when they all exist (it prints the kernel's order; we keep ours fixed).
    pub const ALL: [Table; 4] = [Table::Filter, Table::Nat, Table::Mangle, Table::Raw];

    /// The name after `*` and after `-t`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
            Table::Mangle => "mangle",
            Table::Raw => "raw",
        }
    }

    /// Parses a table name as `-t` accepts it.
    #[must_use]
    pub fn parse(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// The built-in chains of this table; a proxy never creates, flushes or deletes these,
    /// it only inserts and deletes its own jump rules in them.
    #[must_use]
    pub fn builtin_chains(self) -> &'static [&'static str] {
        match self {
            Table::Filter => &["INPUT", "FORWARD", "OUTPUT"],
            Table::Nat => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
            Table::Mangle => &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
            Table::Raw => &["PREROUTING", "OUTPUT"],
        }
    }

    /// Whether `chain` is one of this table's built-in chains.
    #[must_use]
    pub fn is_builtin(self, chain: &str) -> bool {
        self.builtin_chains().contains(&chain)
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub use inet::Family;

/// How iptables and ipset spell a [`Family`].
pub trait FamilyNames {
    /// The tool name stem: `iptables` or `ip6tables`.
    fn tool(self) -> &'static str;
    /// The `ipset` family keyword: `inet` or `inet6`.
    fn ipset_family(self) -> &'static str;
    /// The ICMP type REJECT uses for "port unreachable" in this family.
    fn port_unreachable(self) -> &'static str;
}

impl FamilyNames for Family {
    fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn ipset_family(self) -> &'static str {
        match self {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        }
    }

    fn port_unreachable(self) -> &'static str {
        match self {
            Family::V4 => "icmp-port-unreachable",
            Family::V6 => "icmp6-port-unreachable",
        }
    }
}
