//! Reading `ipvsadm` rule lines (`ipvsadm -Sn` output, `ipvsadm -R` input) back into [`Op`]s.
//!
//! Defaults are `ipvsadm`'s: scheduler wlc, direct routing, weight 1, `-p` alone is 360
//! seconds, persistence per client address.

use crate::Scheduler;
use crate::dest::{Forwarding, RealServer, Tunnel, TunnelChecksum, TunnelType};
use crate::op::Op;
use crate::service::{
    Family, Persistence, Protocol, ServiceFlags, ServiceKey, VirtualServer, sched_flag_names,
};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// An `ipvsadm` line that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read ipvsadm line {line:?}: {reason}")]
pub struct ParseError {
    /// The line.
    pub line: String,
    /// What was wrong with it.
    pub reason: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Command {
    AddService,
    EditService,
    DeleteService,
    AddDest,
    EditDest,
    DeleteDest,
}

/// Reads every non-empty, non-comment line of `ipvsadm -Sn` output.
pub fn parse_rules(text: &str) -> Result<Vec<Op>, ParseError> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::parse)
        .collect()
}

impl FromStr for Op {
    type Err = ParseError;

    /// Reads one `ipvsadm` rule line, such as `-A -t 10.96.0.10:80 -s rr -p 10800`.
    fn from_str(line: &str) -> Result<Op, ParseError> {
        parse(line).map_err(|reason| ParseError {
            line: line.to_owned(),
            reason,
        })
    }
}

#[allow(
    clippy::too_many_lines,
    reason = "one flat match over ipvsadm's options reads best"
)]
fn parse(line: &str) -> Result<Op, String> {
    let mut tokens = line.split_whitespace().peekable();
    let mut command = None;
    let mut protocol_addr: Option<(Protocol, &str)> = None;
    let mut fwmark: Option<u32> = None;
    let mut ipv6 = false;
    let mut scheduler = Scheduler::WeightedLeastConnection;
    let mut timeout: Option<u32> = None;
    let mut netmask: Option<&str> = None;
    let mut sched_flags: Option<&str> = None;
    let mut flags = ServiceFlags::empty();
    let mut pe = None;
    let mut real: Option<&str> = None;
    let mut forwarding = Forwarding::DirectRoute;
    let mut tunnel = Tunnel::default();
    let mut weight = 1;
    let (mut upper, mut lower) = (0, 0);

    let set = |cmd: &mut Option<Command>, c: Command| {
        if cmd.replace(c).is_some() {
            Err("more than one command".to_owned())
        } else {
            Ok(())
        }
    };
    while let Some(tok) = tokens.next() {
        let mut value = |name: &str| tokens.next().ok_or_else(|| format!("{name} needs a value"));
        match tok {
            "-A" | "--add-service" => set(&mut command, Command::AddService)?,
            "-E" | "--edit-service" => set(&mut command, Command::EditService)?,
            "-D" | "--delete-service" => set(&mut command, Command::DeleteService)?,
            "-a" | "--add-server" => set(&mut command, Command::AddDest)?,
            "-e" | "--edit-server" => set(&mut command, Command::EditDest)?,
            "-d" | "--delete-server" => set(&mut command, Command::DeleteDest)?,
            "-t" | "--tcp-service" => protocol_addr = Some((Protocol::Tcp, value(tok)?)),
            "-u" | "--udp-service" => protocol_addr = Some((Protocol::Udp, value(tok)?)),
            "--sctp-service" => protocol_addr = Some((Protocol::Sctp, value(tok)?)),
            "-f" | "--fwmark-service" => fwmark = Some(fwmark_number(value(tok)?)?),
            "-6" | "--ipv6" => ipv6 = true,
            "-s" | "--scheduler" => {
                scheduler = value(tok)?
                    .parse()
                    .map_err(|e: crate::UnknownScheduler| e.to_string())?;
            }
            "-p" | "--persistent" => {
                // The timeout is optional: `-p` alone is ipvsadm's 360 seconds.
                let explicit = tokens.next_if(|t| t.bytes().all(|b| b.is_ascii_digit()));
                timeout = Some(explicit.map_or(Ok(360), |t| number(tok, t))?);
            }
            "-M" | "--netmask" => netmask = Some(value(tok)?),
            "-b" | "--sched-flags" => sched_flags = Some(value(tok)?),
            "-o" | "--ops" => flags |= ServiceFlags::ONE_PACKET,
            "--pe" => pe = Some(pe_name(value(tok)?)?),
            "-r" | "--real-server" => real = Some(value(tok)?),
            "-g" | "--gatewaying" => forwarding = Forwarding::DirectRoute,
            "-m" | "--masquerading" => forwarding = Forwarding::Masquerade,
            "-i" | "--ipip" => forwarding = Forwarding::Tunnel(Tunnel::default()),
            "-w" | "--weight" => weight = number(tok, value(tok)?)?,
            "-x" | "--u-threshold" => upper = number(tok, value(tok)?)?,
            "-y" | "--l-threshold" => lower = number(tok, value(tok)?)?,
            "--tun-type" => {
                tunnel.kind = match value(tok)? {
                    "ipip" => TunnelType::Ipip,
                    "gue" => TunnelType::Gue,
                    "gre" => TunnelType::Gre,
                    other => return Err(format!("unknown tunnel type {other:?}")),
                }
            }
            "--tun-port" => tunnel.port = number(tok, value(tok)?)?,
            "--tun-nocsum" => tunnel.checksum = TunnelChecksum::None,
            "--tun-csum" => tunnel.checksum = TunnelChecksum::Checksum,
            "--tun-remcsum" => tunnel.checksum = TunnelChecksum::Remote,
            other => return Err(format!("unknown option {other:?}")),
        }
    }

    let key = match (protocol_addr, fwmark) {
        (Some((protocol, text)), None) => {
            let (ip, port) = parse_addr(text)?;
            ServiceKey::Addr {
                protocol,
                addr: SocketAddr::new(ip, port.unwrap_or(0)),
            }
        }
        (None, Some(mark)) => ServiceKey::Fwmark {
            family: if ipv6 { Family::V6 } else { Family::V4 },
            mark,
        },
        (None, None) => return Err("no virtual service (-t, -u, --sctp-service or -f)".to_owned()),
        (Some(_), Some(_)) => return Err("both an address and a firewall mark".to_owned()),
    };
    if let Forwarding::Tunnel(_) = forwarding {
        // As ipvsadm: a port only for GUE, a checksum only for GUE and GRE (the line would
        // print without them, and the kernel ignores them).
        if tunnel.port != 0 && tunnel.kind != TunnelType::Gue {
            return Err("--tun-port is only for --tun-type gue".to_owned());
        }
        if tunnel.checksum != TunnelChecksum::None && tunnel.kind == TunnelType::Ipip {
            return Err("--tun-csum and --tun-remcsum are only for gue and gre tunnels".to_owned());
        }
        forwarding = Forwarding::Tunnel(tunnel);
    }
    let real_server = || -> Result<RealServer, String> {
        let text = real.ok_or("no real server (-r)")?;
        let (ip, port) = parse_addr(text)?;
        Ok(RealServer {
            addr: SocketAddr::new(ip, port.unwrap_or(key.port())),
            forwarding,
            weight,
            upper_threshold: upper,
            lower_threshold: lower,
        })
    };
    let virtual_server = || -> Result<VirtualServer, String> {
        let mut flags = flags;
        if let Some(list) = sched_flags {
            let names = sched_flag_names(scheduler);
            let bits = [
                ServiceFlags::SCHED1,
                ServiceFlags::SCHED2,
                ServiceFlags::SCHED3,
            ];
            for word in list.split(',') {
                let i = names
                    .iter()
                    .position(|n| *n == word)
                    .or_else(|| {
                        ["flag-1", "flag-2", "flag-3"]
                            .iter()
                            .position(|n| *n == word)
                    })
                    .ok_or_else(|| format!("unknown scheduler flag {word:?} for {scheduler}"))?;
                flags |= bits[i];
            }
        }
        let family = key.family();
        let persistence = match timeout {
            None => None,
            Some(timeout) => {
                let prefix_len = match netmask {
                    None => family.max_prefix(),
                    Some(mask) => parse_netmask(family, mask)?,
                };
                Some(Persistence {
                    timeout,
                    prefix_len,
                })
            }
        };
        Ok(VirtualServer {
            key,
            scheduler,
            persistence,
            flags,
            persistence_engine: pe.clone(),
        })
    };
    Ok(
        match command.ok_or("no command (-A, -E, -D, -a, -e, -d)")? {
            Command::AddService => Op::AddService(virtual_server()?),
            Command::EditService => Op::UpdateService(virtual_server()?),
            Command::DeleteService => Op::DeleteService(key),
            Command::AddDest => Op::AddDest(key, real_server()?),
            Command::EditDest => Op::UpdateDest(key, real_server()?),
            Command::DeleteDest => Op::DeleteDest(key, real_server()?.addr),
        },
    )
}

/// A firewall mark of a service: not 0, which the kernel reads as "no mark" (ipvsadm
/// refuses it too).
fn fwmark_number(text: &str) -> Result<u32, String> {
    match number("-f", text)? {
        0 => Err("-f 0: a firewall-mark service needs a mark other than 0".to_owned()),
        mark => Ok(mark),
    }
}

/// A persistence engine's name as the kernel holds it: at most 15 bytes (IP_VS_PENAME_MAXLEN
/// less the NUL) and no NUL, which would cut it short there and leave the kernel with another
/// name than the one read.
fn pe_name(text: &str) -> Result<String, String> {
    if text.len() < 16 && !text.contains('\0') {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "--pe {text:?} is not a persistence engine name (at most 15 bytes, no NUL)"
        ))
    }
}

fn number<T: FromStr>(option: &str, text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{option}: {text:?} is not a valid number"))
}

/// `10.0.0.1:80`, `10.0.0.1`, `[fd00::1]:80`, `[fd00::1]`.
fn parse_addr(text: &str) -> Result<(IpAddr, Option<u16>), String> {
    let bad = || format!("{text:?} is not an address[:port]");
    if let Some(rest) = text.strip_prefix('[') {
        let (ip, after) = rest.split_once(']').ok_or_else(bad)?;
        let ip = ip.parse().map_err(|_| bad())?;
        match after {
            "" => Ok((IpAddr::V6(ip), None)),
            port => Ok((
                IpAddr::V6(ip),
                Some(
                    port.strip_prefix(':')
                        .ok_or_else(bad)?
                        .parse()
                        .map_err(|_| bad())?,
                ),
            )),
        }
    } else if let Some((ip, port)) = text.split_once(':') {
        Ok((
            IpAddr::V4(ip.parse().map_err(|_| bad())?),
            Some(port.parse().map_err(|_| bad())?),
        ))
    } else {
        Ok((text.parse().map_err(|_| bad())?, None))
    }
}

fn parse_netmask(family: Family, text: &str) -> Result<u8, String> {
    match family {
        Family::V4 => {
            let mask = u32::from(
                text.parse::<Ipv4Addr>()
                    .map_err(|_| format!("-M {text:?} is not a netmask"))?,
            );
            if mask.leading_ones() + mask.trailing_zeros() != 32 {
                return Err(format!("-M {text:?} is not a contiguous netmask"));
            }
            Ok(u8::try_from(mask.leading_ones()).expect("at most 32"))
        }
        Family::V6 => match text.parse::<u8>() {
            Ok(n @ 1..=128) => Ok(n),
            _ => Err(format!("-M {text:?} is not an IPv6 prefix length (1-128)")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines in the form `ipvsadm -Sn` prints them: each must read back and print identically.
    const SAVED: &[&str] = &[
        "-A -t 10.96.0.10:80 -s rr",
        "-A -t 10.96.0.10:80 -s rr -p 10800",
        "-A -u 10.96.0.53:53 -s rr -p 300",
        "-A -u 10.96.0.53:53 -s wrr -p 300 -M 255.255.255.0 -o",
        "-A -t [fd00::10]:443 -s sh -b sh-port",
        "-A -t [fd00::10]:443 -s mh -p 60 -M 64 -b mh-fallback,mh-port",
        "-A -f 42 -s rr",
        "-A -f 42 -6 -s lblcr",
        "-A --sctp-service 10.96.0.20:3868 -s nq",
        "-A -u 10.96.0.30:5060 -s rr -p 300 --pe sip",
        "-A -u 10.96.0.31:5060 -s sh -p 30 --pe sip -o -b sh-port",
        "-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1",
        "-a -t 10.96.0.10:80 -r 10.244.1.6:80 -g -w 0",
        "-a -t 10.96.0.10:80 -r 192.168.10.5:80 -i -w 3 --tun-type ipip",
        "-a -t 10.96.0.10:80 -r 192.168.10.5:80 -i -w 3 --tun-type gue --tun-port 6079 --tun-csum",
        "-a -t 10.96.0.10:80 -r 192.168.10.5:80 -i -w 3 --tun-type gre --tun-nocsum",
        "-a -t [fd00::10]:443 -r [fd00:1::5]:8443 -m -w 10 -x 100 -y 50",
        "-a -f 42 -6 -r [fd00:1::5]:0 -g -w 1",
        "-E -t 10.96.0.10:80 -s wlc",
        "-e -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 0",
        "-D -t 10.96.0.10:80",
        "-d -t 10.96.0.10:80 -r 10.244.1.5:8080",
    ];

    #[test]
    fn saved_lines_read_back_and_print_identically() {
        for line in SAVED {
            let op: Op = line.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(op.to_string(), *line);
        }
    }

    #[test]
    fn ipvsadm_defaults_and_long_options_apply() {
        let op: Op = "--add-service --tcp-service 10.0.0.1:80 --persistent"
            .parse()
            .unwrap();
        assert_eq!(op.to_string(), "-A -t 10.0.0.1:80 -s wlc -p 360");
        let op: Op = "-a -t 10.0.0.1:80 -r 10.0.0.2".parse().unwrap();
        assert_eq!(op.to_string(), "-a -t 10.0.0.1:80 -r 10.0.0.2:80 -g -w 1");
    }

    #[test]
    fn bad_lines_say_why() {
        for (line, why) in [
            ("-A -s rr", "no virtual service"),
            ("-A -t 10.0.0.1:80 -s roundrobin", "unknown IPVS scheduler"),
            ("-a -t 10.0.0.1:80", "no real server"),
            ("-t 10.0.0.1:80", "no command"),
            ("-A -t 10.0.0.1:80 -s rr -p 30 -M 255.0.255.0", "contiguous"),
            (
                "-A -t 10.0.0.1:80 -s rr -b sh-port",
                "unknown scheduler flag",
            ),
            ("-A -t 10.0.0.1:80 --frobnicate", "unknown option"),
            ("-A -t 10.0.0.1 -s rr -w", "needs a value"),
            // Found by fuzzing: the kernel would keep "si" and the table would never match.
            (
                "-A -u 10.0.0.1:5060 -s sh -p 30 --pe si\0p",
                "persistence engine",
            ),
            (
                "-A -u 10.0.0.1:5060 -s rr --pe sixteen-bytes-xx",
                "persistence engine",
            ),
        ] {
            let err = line.parse::<Op>().unwrap_err();
            assert!(err.to_string().contains(why), "{line}: {err}");
        }
    }

    #[test]
    fn parse_rules_skips_blanks_and_comments() {
        let ops = parse_rules("# saved\n-A -f 1 -s rr\n\n-a -f 1 -r 10.0.0.1:0 -m -w 1\n").unwrap();
        assert_eq!(ops.len(), 2);
    }
}
