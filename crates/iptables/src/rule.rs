//! One iptables rule, typed, rendered exactly as `iptables-save` prints it.
//!
//! `iptables-save` prints a rule as `-A CHAIN`, then `-s`, `-d`, `-i`, `-o`, `-p` (each with an
//! optional leading `!`), then the matches in the order they were given, then `-j TARGET` with
//! the target's options in their canonical spelling (`--or-mark 0x4000` saves as
//! `--set-xmark 0x4000/0x4000`). [`Rule`]'s `Display` follows that order so a rendered rule and a
//! saved rule compare equal as strings, and `iptables-restore` reads either.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

pub use inet::Protocol;

/// An address match (`-s`/`-d`), possibly negated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddrMatch {
    /// `! -s …` when true.
    pub negated: bool,
    /// The network; a host is a /32 or /128, printed with its prefix length.
    pub net: IpNet,
}

/// An input-interface match (`-i`), possibly negated; a name ending in `+` matches every
/// interface with that prefix (iptables' wildcard).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InterfaceMatch {
    /// `! -i …` when true.
    pub negated: bool,
    /// The interface name or prefix with `+`.
    pub name: String,
}

/// An address type for `-m addrtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AddrType {
    /// `LOCAL`: an address of this host.
    Local,
}

impl AddrType {
    fn as_str(self) -> &'static str {
        match self {
            AddrType::Local => "LOCAL",
        }
    }
}

/// A `-m recent` match, as kube-proxy uses it for ClientIP session affinity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Recent {
    /// `--set`: remember the source address in the list.
    Set,
    /// `--rcheck --seconds N --reap`: the source was seen in the last N seconds.
    Rcheck {
        /// The affinity timeout.
        seconds: u32,
    },
}

/// A match (`-m …`), in the spelling `iptables-save` prints.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Match {
    /// `-m comment --comment TEXT` (quoted as `iptables-save` quotes it).
    Comment(String),
    /// `-m tcp --sport S --dport D` (or udp, sctp); needs `-p` of the same protocol.
    Port {
        /// The protocol module.
        protocol: Protocol,
        /// `--sport`.
        sport: Option<u16>,
        /// `--dport`.
        dport: Option<u16>,
    },
    /// `-m addrtype [!] --src-type T` / `[!] --dst-type T`.
    AddrType {
        /// `!` before the type option.
        negated: bool,
        /// Source (true) or destination (false).
        source: bool,
        /// The address type.
        kind: AddrType,
    },
    /// `-m statistic --mode random --probability 1/N`, printed with 10 decimals as kube-proxy
    /// writes it (`iptables-save` reads back the kernel's fixed-point value with 11 decimals;
    /// see [`saved_probability`]).
    OneIn(u32),
    /// `-m recent … --name NAME --mask ALL-ONES --rsource`.
    Recent {
        /// What the match does.
        action: Recent,
        /// The list name (kube-proxy uses the KUBE-SEP chain name).
        name: String,
        /// The family, for the printed mask.
        ipv6: bool,
    },
    /// `-m mark [!] --mark VALUE/MASK`.
    Mark {
        /// `!` before `--mark`.
        negated: bool,
        /// The value.
        value: u32,
        /// The mask.
        mask: u32,
    },
    /// `-m conntrack [!] --ctstate STATES` (comma-separated, e.g. `RELATED,ESTABLISHED`).
    Conntrack {
        /// `!` before `--ctstate`.
        negated: bool,
        /// The states, as printed.
        states: &'static str,
    },
    /// `-m set [!] --match-set NAME FLAGS` (FLAGS like `dst,dst`).
    Set {
        /// `!` before `--match-set`.
        negated: bool,
        /// The ipset name.
        name: String,
        /// The direction flags.
        flags: &'static str,
    },
    /// Any other match, written verbatim after a space (must start with `-m`).
    Other(String),
}

/// The packet mark that asks for masquerading: `1 << --masquerade-bit` (bit 14: 0x4000, as
/// kube-proxy's default). A bit past 31 gives the default mark.
#[must_use]
pub fn masquerade_mark(bit: u8) -> u32 {
    1u32.checked_shl(u32::from(bit)).unwrap_or(0x4000)
}

/// A MARK target operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MarkOp {
    /// `--or-mark V` (saved as `--set-xmark V/V`).
    Or(u32),
    /// `--xor-mark V` (saved as `--set-xmark V/0x0`).
    Xor(u32),
    /// `--set-xmark V/M`.
    SetXmark(u32, u32),
}

/// What a rule does (`-j …`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Target {
    /// `-j CHAIN`
    Jump(String),
    /// `-j ACCEPT`
    Accept,
    /// `-j DROP`
    Drop,
    /// `-j RETURN`
    Return,
    /// `-j REJECT --reject-with TYPE`
    Reject(&'static str),
    /// `-j DNAT --to-destination ADDR:PORT`
    Dnat(SocketAddr),
    /// `-j MASQUERADE [--random-fully]`
    Masquerade {
        /// `--random-fully`
        random_fully: bool,
    },
    /// `-j MARK --set-xmark …`
    Mark(MarkOp),
    /// No target: the rule only counts packets (kube-proxy uses this for comment-only rules).
    None,
    /// Any other target, written verbatim after `-j `.
    Other(String),
}

impl Target {
    /// The chain this target jumps to, if it is a jump to a user-defined chain.
    #[must_use]
    pub fn jump_chain(&self) -> Option<&str> {
        match self {
            Target::Jump(c) => Some(c),
            _ => None,
        }
    }
}

/// One rule of one chain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// The chain the rule is in.
    pub chain: String,
    /// `-s`
    pub source: Option<AddrMatch>,
    /// `-d`
    pub destination: Option<AddrMatch>,
    /// `-i`
    pub in_interface: Option<InterfaceMatch>,
    /// `-o`
    pub out_interface: Option<String>,
    /// `-p`
    pub protocol: Option<Protocol>,
    /// `-m …`, in order.
    pub matches: Vec<Match>,
    /// `-j …`
    pub target: Target,
}

impl Rule {
    /// A rule in `chain` that does `target` to every packet; add matches with the builders.
    #[must_use]
    pub fn new(chain: impl Into<String>, target: Target) -> Rule {
        Rule {
            chain: chain.into(),
            source: None,
            destination: None,
            in_interface: None,
            out_interface: None,
            protocol: None,
            matches: Vec::new(),
            target,
        }
    }

    /// A jump to `to`.
    #[must_use]
    pub fn jump(chain: impl Into<String>, to: impl Into<String>) -> Rule {
        Rule::new(chain, Target::Jump(to.into()))
    }

    /// `-s NET`
    #[must_use]
    pub fn source(mut self, net: impl Into<IpNet>) -> Rule {
        self.source = Some(AddrMatch {
            negated: false,
            net: net.into(),
        });
        self
    }

    /// `! -s NET`
    #[must_use]
    pub fn not_source(mut self, net: impl Into<IpNet>) -> Rule {
        self.source = Some(AddrMatch {
            negated: true,
            net: net.into(),
        });
        self
    }

    /// `-i NAME`, or `! -i NAME` when `negated`.
    #[must_use]
    pub fn in_interface(mut self, name: impl Into<String>, negated: bool) -> Rule {
        self.in_interface = Some(InterfaceMatch {
            negated,
            name: name.into(),
        });
        self
    }

    /// `! -d NET`
    #[must_use]
    pub fn not_destination(mut self, net: impl Into<IpNet>) -> Rule {
        self.destination = Some(AddrMatch {
            negated: true,
            net: net.into(),
        });
        self
    }

    /// `-d NET`
    #[must_use]
    pub fn destination(mut self, net: impl Into<IpNet>) -> Rule {
        self.destination = Some(AddrMatch {
            negated: false,
            net: net.into(),
        });
        self
    }

    /// `-d ADDR/32` (or /128).
    #[must_use]
    pub fn destination_host(self, addr: IpAddr) -> Rule {
        self.destination(IpNet::from(addr))
    }

    /// `-s ADDR/32` (or /128).
    #[must_use]
    pub fn source_host(self, addr: IpAddr) -> Rule {
        self.source(IpNet::from(addr))
    }

    /// `-p PROTO` alone.
    #[must_use]
    pub fn protocol(mut self, protocol: Protocol) -> Rule {
        self.protocol = Some(protocol);
        self
    }

    /// `-p PROTO -m PROTO --dport PORT`.
    #[must_use]
    pub fn dport(mut self, protocol: Protocol, port: u16) -> Rule {
        self.protocol = Some(protocol);
        self.matches.push(Match::Port {
            protocol,
            sport: None,
            dport: Some(port),
        });
        self
    }

    /// `-m comment --comment TEXT`.
    #[must_use]
    pub fn comment(mut self, text: impl Into<String>) -> Rule {
        self.matches.push(Match::Comment(text.into()));
        self
    }

    /// Any match.
    #[must_use]
    pub fn with(mut self, m: Match) -> Rule {
        self.matches.push(m);
        self
    }

    /// Writes the rule after `op` (`-A`, `-I`, `-D`), without a trailing newline.
    pub fn write_with(&self, op: &str, out: &mut String) {
        self.write_as(op, out, false);
    }

    /// Writes the rule as `iptables-save` prints it back from the kernel (`-A …`, without a
    /// trailing newline): as [`Rule::write_with`] but with the kernel's probabilities
    /// ([`saved_probability`]), so it can be compared with a saved line.
    pub fn write_saved(&self, out: &mut String) {
        self.write_as("-A", out, true);
    }

    fn write_as(&self, op: &str, out: &mut String, saved: bool) {
        out.push_str(op);
        out.push(' ');
        out.push_str(&self.chain);
        if let Some(s) = &self.source {
            addr(out, "-s", s);
        }
        if let Some(d) = &self.destination {
            addr(out, "-d", d);
        }
        if let Some(i) = &self.in_interface {
            if i.negated {
                out.push_str(" !");
            }
            let _ = write!(out, " -i {}", i.name);
        }
        if let Some(o) = &self.out_interface {
            let _ = write!(out, " -o {o}");
        }
        if let Some(p) = self.protocol {
            let _ = write!(out, " -p {p}");
        }
        for m in &self.matches {
            write_match(out, m, saved);
        }
        write_target(out, &self.target);
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::with_capacity(128);
        self.write_with("-A", &mut s);
        f.write_str(&s)
    }
}

fn addr(out: &mut String, flag: &str, a: &AddrMatch) {
    if a.negated {
        out.push_str(" !");
    }
    let _ = write!(out, " {flag} {}/{}", a.net.addr(), a.net.prefix_len());
}

fn write_match(out: &mut String, m: &Match, saved: bool) {
    match m {
        Match::Comment(text) => {
            out.push_str(" -m comment --comment");
            save_string(out, &comment_text(text));
        }
        Match::Port {
            protocol,
            sport,
            dport,
        } => {
            let _ = write!(out, " -m {protocol}");
            if let Some(p) = sport {
                let _ = write!(out, " --sport {p}");
            }
            if let Some(p) = dport {
                let _ = write!(out, " --dport {p}");
            }
        }
        Match::AddrType {
            negated,
            source,
            kind,
        } => {
            out.push_str(" -m addrtype");
            if *negated {
                out.push_str(" !");
            }
            let dir = if *source { "src" } else { "dst" };
            let _ = write!(out, " --{dir}-type {}", kind.as_str());
        }
        Match::OneIn(n) => {
            let p = 1.0 / f64::from(*n);
            if saved {
                let p = saved_probability(p);
                let _ = write!(out, " -m statistic --mode random --probability {p}");
            } else {
                let _ = write!(out, " -m statistic --mode random --probability {p:.10}");
            }
        }
        Match::Recent { action, name, ipv6 } => {
            out.push_str(" -m recent");
            match action {
                Recent::Set => out.push_str(" --set"),
                Recent::Rcheck { seconds } => {
                    let _ = write!(out, " --rcheck --seconds {seconds} --reap");
                }
            }
            let mask = if *ipv6 {
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
            } else {
                "255.255.255.255"
            };
            let _ = write!(out, " --name {name} --mask {mask} --rsource");
        }
        Match::Mark {
            negated,
            value,
            mask,
        } => {
            out.push_str(" -m mark");
            if *negated {
                out.push_str(" !");
            }
            let _ = write!(out, " --mark {value:#x}/{mask:#x}");
        }
        Match::Conntrack { negated, states } => {
            out.push_str(" -m conntrack");
            if *negated {
                out.push_str(" !");
            }
            let _ = write!(out, " --ctstate {states}");
        }
        Match::Set {
            negated,
            name,
            flags,
        } => {
            out.push_str(" -m set");
            if *negated {
                out.push_str(" !");
            }
            let _ = write!(out, " --match-set {name} {flags}");
        }
        Match::Other(text) => {
            out.push(' ');
            out.push_str(text);
        }
    }
}

fn write_target(out: &mut String, t: &Target) {
    match t {
        Target::Jump(c) => {
            let _ = write!(out, " -j {c}");
        }
        Target::Accept => out.push_str(" -j ACCEPT"),
        Target::Drop => out.push_str(" -j DROP"),
        Target::Return => out.push_str(" -j RETURN"),
        Target::Reject(with) => {
            let _ = write!(out, " -j REJECT --reject-with {with}");
        }
        Target::Dnat(to) => {
            let _ = write!(out, " -j DNAT --to-destination {to}");
        }
        Target::Masquerade { random_fully } => {
            out.push_str(" -j MASQUERADE");
            if *random_fully {
                out.push_str(" --random-fully");
            }
        }
        Target::Mark(op) => {
            let (v, m) = match *op {
                MarkOp::Or(v) => (v, v),
                MarkOp::Xor(v) => (v, 0),
                MarkOp::SetXmark(v, m) => (v, m),
            };
            let _ = write!(out, " -j MARK --set-xmark {v:#x}/{m:#x}");
        }
        Target::None => {}
        Target::Other(text) => {
            let _ = write!(out, " -j {text}");
        }
    }
}

/// The longest comment the kernel keeps: `XT_MAX_COMMENT_LEN` (256) bytes with the NUL that
/// ends it; `iptables-restore` refuses a longer one, and with it the whole restore.
pub const MAX_COMMENT_BYTES: usize = 255;

/// A comment as it is written: each control character (`\n`, `\r`, NUL, tab, DEL, …) as `?`,
/// since `iptables-restore` has no escape that keeps a newline inside an argument and a NUL
/// ends the kernel's copy; then cut to [`MAX_COMMENT_BYTES`] on a character boundary. Names
/// the API server accepted never hold either, so their comments are unchanged.
#[must_use]
pub fn comment_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_COMMENT_BYTES && !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len().min(MAX_COMMENT_BYTES));
    for c in text.chars() {
        let c = if c.is_control() { '?' } else { c };
        if out.len() + c.len_utf8() > MAX_COMMENT_BYTES {
            break;
        }
        out.push(c);
    }
    std::borrow::Cow::Owned(out)
}

/// Quotes a string as libxtables' `xtables_save_string` does: bare when it is only letters,
/// digits, `_` and `-`, otherwise in double quotes with `"`, `\` and `'` escaped.
fn save_string(out: &mut String, value: &str) {
    let bare = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    out.push(' ');
    if bare {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        if matches!(c, '"' | '\\' | '\'') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// The probability `iptables-save` prints for a rule written with `p`: the statistic match
/// stores `round(p * 2^31)` and prints it back with 11 decimals.
#[must_use]
pub fn saved_probability(p: f64) -> String {
    let scale = f64::from(0x8000_0000_u32);
    format!("{:.11}", (p * scale).round() / scale)
}

/// The chain and the `-j` target of a saved `-A` line.
#[must_use]
pub fn rule_chain_and_target(line: &str) -> Option<(&str, Option<&str>)> {
    let rest = line.strip_prefix("-A ")?;
    let chain = rest.split(' ').next()?;
    // The target is the word after the last ` -j ` outside quotes; comments are quoted and a
    // quoted " -j " cannot end the line's last word, so the last occurrence is the target.
    let target = rest
        .rfind(" -j ")
        .map(|i| rest[i + 4..].split(' ').next().unwrap_or(""));
    Some((chain, target))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn cluster_ip_jump_renders_in_save_order() {
        let r = Rule::jump("KUBE-SERVICES", "KUBE-SVC-XPGD46QRK7WJZT7O")
            .comment("ns1/svc1:p80 cluster IP")
            .dport(Protocol::Tcp, 80)
            .destination_host(IpAddr::V4(Ipv4Addr::new(172, 30, 0, 41)));
        assert_eq!(
            r.to_string(),
            "-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O"
        );
    }

    #[test]
    fn mark_targets_save_as_set_xmark() {
        let or = Rule::new("KUBE-MARK-MASQ", Target::Mark(MarkOp::Or(0x4000)));
        assert_eq!(
            or.to_string(),
            "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"
        );
        let xor = Rule::new("KUBE-POSTROUTING", Target::Mark(MarkOp::Xor(0x4000)));
        assert_eq!(
            xor.to_string(),
            "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0"
        );
    }

    #[test]
    fn comments_are_quoted_only_when_needed() {
        let mut s = String::new();
        save_string(&mut s, "plain-word_1");
        save_string(&mut s, "a \"b\"");
        assert_eq!(s, " plain-word_1 \"a \\\"b\\\"\"");
    }

    #[test]
    fn control_characters_in_a_comment_become_question_marks_on_one_line() {
        let r = Rule::new("KUBE-SEP-X", Target::None).comment("ns/a\nCOMMIT\r\0\tb\u{7f}\u{85}");
        assert_eq!(
            r.to_string(),
            "-A KUBE-SEP-X -m comment --comment \"ns/a?COMMIT???b??\""
        );
    }

    #[test]
    fn a_comment_is_cut_to_the_kernels_255_bytes_on_a_character_boundary() {
        assert_eq!(comment_text(&"a".repeat(255)), "a".repeat(255));
        assert_eq!(comment_text(&"a".repeat(300)), "a".repeat(255));
        // 'é' is two bytes: 127 of them fill 254, a 128th would pass 255.
        assert_eq!(comment_text(&"é".repeat(200)), "é".repeat(127));
        let r = Rule::jump("KUBE-SERVICES", "KUBE-SVC-X").comment("a".repeat(300));
        assert_eq!(
            r.to_string(),
            format!(
                "-A KUBE-SERVICES -m comment --comment {} -j KUBE-SVC-X",
                "a".repeat(255)
            )
        );
    }

    #[test]
    fn ordinary_comments_are_borrowed_unchanged() {
        for c in [
            "ns1/svc1:p80 cluster IP",
            "kubernetes service portals",
            "é ü",
            "",
        ] {
            assert!(matches!(comment_text(c), std::borrow::Cow::Borrowed(b) if b == c));
        }
    }

    /// Splits a rule line into arguments as `iptables-restore` does: blanks separate outside
    /// double quotes; inside them a backslash takes the next character as it is and `"` closes.
    fn restore_args(line: &str) -> Vec<String> {
        let mut args = Vec::new();
        let (mut arg, mut started, mut quoted, mut escaped) = (String::new(), false, false, false);
        for c in line.chars() {
            if quoted {
                if escaped {
                    arg.push(c);
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    quoted = false;
                } else {
                    arg.push(c);
                }
            } else if c == '"' {
                quoted = true;
                started = true;
            } else if c == ' ' || c == '\t' {
                if started {
                    args.push(std::mem::take(&mut arg));
                    started = false;
                }
            } else {
                arg.push(c);
                started = true;
            }
        }
        if started {
            args.push(arg);
        }
        args
    }

    proptest::proptest! {
        #[test]
        fn any_comment_renders_on_one_line_as_one_argument_of_at_most_256_bytes(
            text in proptest::prop_oneof![
                proptest::prelude::any::<String>(),
                "[a-z/:\"'\\\\ \\n\\r\\t\\x00\\x7fé-]{0,400}",
            ],
        ) {
            let rule = Rule::jump("KUBE-SERVICES", "KUBE-SVC-X")
                .comment(text.clone())
                .dport(Protocol::Tcp, 80);
            let line = rule.to_string();
            proptest::prop_assert!(!line.contains(['\n', '\r', '\0']), "{line:?}");
            let args = restore_args(&line);
            let at = args.iter().position(|a| a == "--comment").unwrap();
            let comment = &args[at + 1];
            proptest::prop_assert!(comment.len() <= MAX_COMMENT_BYTES && MAX_COMMENT_BYTES < 256);
            proptest::prop_assert_eq!(comment, &comment_text(&text));
            proptest::prop_assert_eq!(
                &args[at + 2..],
                ["-m", "tcp", "--dport", "80", "-j", "KUBE-SVC-X"]
            );
            proptest::prop_assert_eq!(
                rule_chain_and_target(&line),
                Some(("KUBE-SERVICES", Some("KUBE-SVC-X")))
            );
            let saved = crate::saved::Saved::parse(&format!("*nat\n{line}\nCOMMIT\n"));
            proptest::prop_assert_eq!(&saved.tables[&crate::table::Table::Nat].rules, &vec![line]);
        }
    }

    #[test]
    fn probability_prints_ten_decimals_and_saves_eleven() {
        let r = Rule::jump("KUBE-SVC-X", "KUBE-SEP-Y").with(Match::OneIn(3));
        assert!(
            r.to_string()
                .ends_with("--probability 0.3333333333 -j KUBE-SEP-Y")
        );
        assert_eq!(saved_probability(1.0 / 3.0), "0.33333333349");
        assert_eq!(saved_probability(0.5), "0.50000000000");
    }
}
