//! `kube-ipvs0` against a kernel with dummy links: run by `cargo xtask vm-test -p netif`.
//!
//! Every test runs in its own fresh network namespace (see `common`), reads the kernel's state
//! back with iproute2 (`ip -o addr show dev kube-ipvs0`), and leaves nothing behind.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener};

use common::{address_lines, addresses_on, host_forms, in_new_netns, ip, link_exists};
use netif::{DummyLink, Error, KUBE_IPVS0, Outcome};

fn set(addresses: &[&str]) -> BTreeSet<IpAddr> {
    addresses
        .iter()
        .map(|a| a.parse().expect("address"))
        .collect()
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn ensure_creates_a_down_dummy_and_is_idempotent() {
    in_new_netns(|| {
        assert!(!link_exists(KUBE_IPVS0));
        let link = DummyLink::ensure(KUBE_IPVS0).expect("ensure");
        let shown = ip("-d -o link show kube-ipvs0");
        assert!(shown.contains(" dummy "), "{shown}");
        assert!(
            shown.contains("state DOWN"),
            "left down as kube-proxy leaves it: {shown}"
        );
        assert!(
            shown.starts_with(&format!("{}: kube-ipvs0:", link.index())),
            "{shown}"
        );

        let again = DummyLink::ensure(KUBE_IPVS0).expect("ensure again");
        assert_eq!(again.index(), link.index());
        assert_eq!(
            ip("-d -o link show kube-ipvs0"),
            shown,
            "an existing dummy is not changed"
        );
    });
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn sync_binds_and_unbinds_to_match_the_desired_set() {
    in_new_netns(|| {
        let mut link = DummyLink::ensure(KUBE_IPVS0).expect("ensure");
        let up = [
            "10.96.0.1",
            "10.96.0.10",
            "10.96.100.200",
            "fd00::1",
            "fd00::10",
        ];
        let report = link.sync(&set(&up)).expect("sync up");
        assert_eq!(report.added.len(), 5);
        assert!(
            report.removed.is_empty() && report.is_complete(),
            "{report:?}"
        );
        assert_eq!(addresses_on("kube-ipvs0"), host_forms(up));
        assert_eq!(link.addresses().expect("list"), set(&up));

        let again = link.sync(&set(&up)).expect("sync again");
        assert!(
            again.added.is_empty() && again.removed.is_empty(),
            "idempotent: {again:?}"
        );
        assert_eq!(again.unchanged, 5);

        let down = ["10.96.0.10", "fd00::1"];
        let report = link.sync(&set(&down)).expect("sync down");
        assert!(report.added.is_empty());
        assert_eq!(
            report.removed,
            set(&["10.96.0.1", "10.96.100.200", "fd00::10"])
                .into_iter()
                .collect::<Vec<_>>()
        );
        assert_eq!(addresses_on("kube-ipvs0"), host_forms(down));

        let report = link.sync(&BTreeSet::new()).expect("sync to nothing");
        assert_eq!(report.removed.len(), 2);
        assert!(addresses_on("kube-ipvs0").is_empty());
    });
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn sync_repairs_addresses_changed_by_hand() {
    in_new_netns(|| {
        let mut link = DummyLink::ensure(KUBE_IPVS0).expect("ensure");
        let desired = set(&["10.96.0.10", "10.96.0.11", "10.96.0.12", "fd00::10"]);
        link.sync(&desired).expect("sync");

        ip("addr del 10.96.0.10/32 dev kube-ipvs0");
        ip("addr del fd00::10/128 dev kube-ipvs0");
        ip("addr add 10.96.9.9/32 dev kube-ipvs0");
        ip("addr add fd00::99/128 dev kube-ipvs0");
        // A desired address bound with the wrong prefix is re-bound as a host address.
        ip("addr del 10.96.0.12/32 dev kube-ipvs0");
        ip("addr add 10.96.0.12/24 dev kube-ipvs0");

        let report = link.sync(&desired).expect("resync");
        assert_eq!(
            report.added,
            set(&["10.96.0.10", "10.96.0.12", "fd00::10"])
                .into_iter()
                .collect::<Vec<_>>()
        );
        assert_eq!(
            report.removed,
            set(&["10.96.0.12", "10.96.9.9", "fd00::99"])
                .into_iter()
                .collect::<Vec<_>>()
        );
        assert!(report.is_complete(), "{report:?}");
        assert_eq!(
            addresses_on("kube-ipvs0"),
            host_forms(["10.96.0.10", "10.96.0.11", "10.96.0.12", "fd00::10"])
        );
    });
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn ten_thousand_addresses_both_families() {
    in_new_netns(|| {
        let mut link = DummyLink::ensure(KUBE_IPVS0).expect("ensure");
        let v4 = (0..7_500u32).map(|n| IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + n)));
        let v6 = (0..2_500u16).map(|n| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, n)));
        let desired: BTreeSet<IpAddr> = v4.chain(v6).collect();
        assert_eq!(desired.len(), 10_000);

        let started = std::time::Instant::now();
        let report = link.sync(&desired).expect("sync up");
        eprintln!(
            "sync of 10,000 addresses onto an empty link: {:?}",
            started.elapsed()
        );
        assert_eq!(report.added.len(), 10_000);
        assert!(report.is_complete(), "{:?}", report.failed.first());
        let shown = addresses_on("kube-ipvs0");
        assert_eq!(shown.len(), 10_000);
        assert_eq!(shown, host_forms(desired.iter().map(ToString::to_string)));
        assert_eq!(link.addresses().expect("list"), desired);

        // One Service changes: incremental calls, no listing.
        let gone = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 7));
        assert!(matches!(
            link.remove(&[gone]).expect("remove")[..],
            [Ok(Outcome::Removed)]
        ));
        assert_eq!(addresses_on("kube-ipvs0").len(), 9_999);

        let started = std::time::Instant::now();
        let report = link.sync(&BTreeSet::new()).expect("sync down");
        eprintln!(
            "sync of 9,999 addresses down to none: {:?}",
            started.elapsed()
        );
        assert_eq!(report.removed.len(), 9_999);
        assert!(addresses_on("kube-ipvs0").is_empty());
    });
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn ipv6_addresses_are_usable_on_a_down_dummy() {
    in_new_netns(|| {
        let mut link = DummyLink::ensure(KUBE_IPVS0).expect("ensure");
        let results = link
            .add(&[
                IpAddr::V6("fd00::10".parse().expect("v6")),
                "10.96.0.10".parse().expect("v4"),
            ])
            .expect("add");
        assert!(
            results.iter().all(|r| matches!(r, Ok(Outcome::Added))),
            "{results:?}"
        );
        // A dummy link is NOARP, so the kernel skips duplicate address detection: the address
        // is not tentative (no IFA_F_NODAD needed, and it reads like kube-proxy's).
        for line in address_lines("kube-ipvs0") {
            assert!(
                !line.contains("tentative") && !line.contains("dadfailed"),
                "{line}"
            );
            assert!(!line.contains("nodad"), "{line}");
        }
        assert!(ip("-d -o link show kube-ipvs0").contains("state DOWN"));
        // Both are local addresses of the node although the link is down: a socket can bind.
        TcpListener::bind("[fd00::10]:0").expect("bind the IPv6 VIP");
        TcpListener::bind("10.96.0.10:0").expect("bind the IPv4 VIP");
    });
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn a_non_dummy_link_named_kube_ipvs0_is_refused_and_untouched() {
    in_new_netns(|| {
        ip("link add kube-ipvs0 type veth peer name kube-peer0");
        ip("addr add 10.96.0.10/32 dev kube-ipvs0");
        let before = (ip("-d -o link show kube-ipvs0"), addresses_on("kube-ipvs0"));

        let error = DummyLink::ensure(KUBE_IPVS0).expect_err("a veth is not a dummy");
        assert!(
            matches!(&error, Error::NotDummy { kind, .. } if kind == "veth"),
            "{error:?}"
        );
        assert!(matches!(
            DummyLink::delete(KUBE_IPVS0),
            Err(Error::NotDummy { .. })
        ));
        assert_eq!(
            (ip("-d -o link show kube-ipvs0"), addresses_on("kube-ipvs0")),
            before
        );
    });
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn addresses_on_other_links_are_left_alone() {
    in_new_netns(|| {
        ip("link add other0 type dummy");
        // The same address as a VIP, and another one.
        ip("addr add 10.96.0.10/32 dev other0");
        ip("addr add 10.96.0.99/32 dev other0");
        ip("addr add fd00::10/128 dev other0");
        let before = addresses_on("other0");

        let mut link = DummyLink::ensure(KUBE_IPVS0).expect("ensure");
        link.sync(&set(&["10.96.0.10", "10.96.0.11", "fd00::10"]))
            .expect("sync up");
        assert_eq!(addresses_on("other0"), before);
        link.sync(&BTreeSet::new()).expect("sync down");
        assert_eq!(addresses_on("other0"), before);
        let results = link
            .remove(&set(&["10.96.0.99"]).into_iter().collect::<Vec<_>>())
            .expect("remove");
        assert!(
            matches!(results[..], [Ok(Outcome::AlreadyAbsent)]),
            "{results:?}"
        );
        drop(link);
        assert!(DummyLink::delete(KUBE_IPVS0).expect("delete"));
        assert_eq!(addresses_on("other0"), before);
        assert!(link_exists("other0"));
    });
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn delete_removes_the_link_and_its_addresses() {
    in_new_netns(|| {
        let mut link = DummyLink::ensure(KUBE_IPVS0).expect("ensure");
        link.sync(&set(&["10.96.0.10", "fd00::10"])).expect("sync");
        assert!(DummyLink::delete(KUBE_IPVS0).expect("delete"));
        assert!(!link_exists(KUBE_IPVS0));
        assert!(!ip("-o addr show").contains("10.96.0.10"));
        assert!(
            !DummyLink::delete(KUBE_IPVS0).expect("delete again"),
            "already gone is not an error"
        );

        // The old handle reports the loss instead of failing address by address.
        let error = link
            .add(&["10.96.0.11".parse().expect("v4")])
            .expect_err("link gone");
        assert!(matches!(error, Error::LinkGone { .. }), "{error:?}");
        let error = link.sync(&set(&["10.96.0.11"])).expect_err("link gone");
        assert!(matches!(error, Error::LinkGone { .. }), "{error:?}");
    });
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn add_and_remove_report_one_result_per_address() {
    in_new_netns(|| {
        let mut link = DummyLink::ensure(KUBE_IPVS0).expect("ensure");
        let a: IpAddr = "10.96.0.10".parse().expect("v4");
        let b: IpAddr = "fd00::10".parse().expect("v6");
        let c: IpAddr = "10.96.0.11".parse().expect("v4");
        let outcomes = |results: Vec<netif::AddressResult>| {
            results
                .into_iter()
                .map(|r| r.expect("ok"))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            outcomes(link.add(&[a, b]).expect("add")),
            [Outcome::Added, Outcome::Added]
        );
        assert_eq!(
            outcomes(link.add(&[a, c]).expect("add")),
            [Outcome::AlreadyPresent, Outcome::Added]
        );
        assert_eq!(
            outcomes(link.remove(&[b, b]).expect("remove")),
            [Outcome::Removed, Outcome::AlreadyAbsent]
        );

        // IPv6 turned off on the link: the IPv6 address fails alone, with the kernel's errno.
        std::fs::write("/proc/sys/net/ipv6/conf/kube-ipvs0/disable_ipv6", "1").expect("sysctl");
        let d: IpAddr = "10.96.0.12".parse().expect("v4");
        let results = link.add(&[b, d]).expect("add");
        let error = results[0].as_ref().expect_err("IPv6 disabled");
        assert_eq!(error.errno(), Some(libc::EACCES), "{error}");
        assert!(
            error
                .to_string()
                .starts_with("`ip addr add fd00::10/128 dev kube-ipvs0` failed"),
            "{error}"
        );
        assert!(matches!(results[1], Ok(Outcome::Added)));
        assert_eq!(
            addresses_on("kube-ipvs0"),
            host_forms(["10.96.0.10", "10.96.0.11", "10.96.0.12"])
        );
    });
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn reensure_makes_a_deleted_dummy_again_and_leaves_a_present_one() {
    in_new_netns(|| {
        let mut link = DummyLink::ensure(KUBE_IPVS0).expect("ensure");
        link.add(&[IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))])
            .expect("add");
        let first = link.index();
        assert!(
            !link.reensure().expect("reensure"),
            "present: nothing to do"
        );
        assert_eq!(link.index(), first);

        ip("link del kube-ipvs0");
        assert!(link.reensure().expect("reensure"), "gone: made again");
        assert!(link_exists(KUBE_IPVS0));
        assert_ne!(link.index(), first, "the handle follows the new link");
        assert!(link.addresses().expect("list").is_empty());
        let added = link
            .add(&[IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))])
            .expect("add to the new link");
        assert!(matches!(added[0], Ok(Outcome::Added)), "{added:?}");
        assert_eq!(address_lines("kube-ipvs0").len(), 1);
    });
}
