//! Which traffic comes from this node's pods: kube-proxy's local traffic detector
//! (`pkg/proxy/util/localdetector.go`), one per family, as the match it adds to a rule.
//!
//! Both renderings ask it the same two questions: the ipvs mode masquerades ClusterIP traffic
//! that is not local ([`LocalDetector::if_not_local`]); the iptables mode does too, and sends
//! local traffic to an external destination of an `externalTrafficPolicy: Local` Service to
//! the cluster policy chain ([`LocalDetector::if_local`]). Each says what it writes instead
//! when the detector is not implemented.

use ipnet::IpNet;

use crate::rule::Rule;

/// How local traffic is told, for one family (upstream's `getLocalDetectors` picks it from
/// `detectLocalMode`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LocalDetector {
    /// Upstream's no-op detector: the mode names no CIDR of this family (no `clusterCIDR` of
    /// it with ClusterCIDR, no `podCIDR` of it with NodeCIDR). The rules that need a detector
    /// are not written.
    #[default]
    NotImplemented,
    /// `-s CIDR` / `! -s CIDR`: ClusterCIDR (the first `clusterCIDR` of the family) and
    /// NodeCIDR (the first of the Node's `spec.podCIDRs` of the family).
    Cidr(IpNet),
    /// `-i NAME` / `! -i NAME`: BridgeInterface (the bridge's name) and InterfaceNamePrefix
    /// (the prefix followed by iptables' wildcard `+`); the same for both families.
    Interface(String),
}

impl LocalDetector {
    /// detectLocalMode BridgeInterface: traffic entering on `bridge` is local.
    #[must_use]
    pub fn bridge(bridge: &str) -> LocalDetector {
        LocalDetector::Interface(bridge.to_owned())
    }

    /// detectLocalMode InterfaceNamePrefix: traffic entering on an interface whose name
    /// starts with `prefix` is local.
    #[must_use]
    pub fn interface_prefix(prefix: &str) -> LocalDetector {
        LocalDetector::Interface(format!("{prefix}+"))
    }

    /// Whether the detector tells anything (upstream's `IsImplemented`).
    #[must_use]
    pub fn is_implemented(&self) -> bool {
        *self != LocalDetector::NotImplemented
    }

    /// `rule` matching only local traffic (upstream's `IfLocal`); `None` when not
    /// implemented.
    #[must_use]
    pub fn if_local(&self, rule: Rule) -> Option<Rule> {
        self.restrict(rule, false)
    }

    /// `rule` matching only traffic that is not local (upstream's `IfNotLocal`); `None` when
    /// not implemented.
    #[must_use]
    pub fn if_not_local(&self, rule: Rule) -> Option<Rule> {
        self.restrict(rule, true)
    }

    fn restrict(&self, rule: Rule, negated: bool) -> Option<Rule> {
        match self {
            LocalDetector::NotImplemented => None,
            LocalDetector::Cidr(cidr) if negated => Some(rule.not_source(*cidr)),
            LocalDetector::Cidr(cidr) => Some(rule.source(*cidr)),
            LocalDetector::Interface(name) => Some(rule.in_interface(name.clone(), negated)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Upstream's fragments for each detector, on a rule with a destination and a match so
    /// the position `iptables-save` prints them in is checked too.
    #[test]
    fn each_detector_adds_upstreams_fragment() {
        let rule = || {
            Rule::jump("KUBE-SVC-X", "KUBE-MARK-MASQ")
                .destination_host("10.96.0.1".parse().unwrap())
                .comment("c")
        };
        let cases = [
            (
                LocalDetector::Cidr("10.244.0.0/16".parse().unwrap()),
                "-A KUBE-SVC-X -s 10.244.0.0/16 -d 10.96.0.1/32 -m comment --comment c -j KUBE-MARK-MASQ",
                "-A KUBE-SVC-X ! -s 10.244.0.0/16 -d 10.96.0.1/32 -m comment --comment c -j KUBE-MARK-MASQ",
            ),
            (
                LocalDetector::bridge("cbr0"),
                "-A KUBE-SVC-X -d 10.96.0.1/32 -i cbr0 -m comment --comment c -j KUBE-MARK-MASQ",
                "-A KUBE-SVC-X -d 10.96.0.1/32 ! -i cbr0 -m comment --comment c -j KUBE-MARK-MASQ",
            ),
            (
                LocalDetector::interface_prefix("veth"),
                "-A KUBE-SVC-X -d 10.96.0.1/32 -i veth+ -m comment --comment c -j KUBE-MARK-MASQ",
                "-A KUBE-SVC-X -d 10.96.0.1/32 ! -i veth+ -m comment --comment c -j KUBE-MARK-MASQ",
            ),
        ];
        for (detector, local, not_local) in cases {
            assert!(detector.is_implemented());
            assert_eq!(detector.if_local(rule()).unwrap().to_string(), local);
            assert_eq!(
                detector.if_not_local(rule()).unwrap().to_string(),
                not_local
            );
        }
        let none = LocalDetector::NotImplemented;
        assert!(!none.is_implemented());
        assert_eq!(none.if_local(rule()), None);
        assert_eq!(none.if_not_local(rule()), None);
    }
}
