//! Host tests in a fresh network namespace: what works without the dummy module.
//! (The host kernel has veth but no dummy links; the rest is in `vm_netif.rs`.)

mod common;

use common::{addresses_on, in_new_netns, ip, link_exists};
use netif::{DummyLink, Error, KUBE_IPVS0};

#[test]
fn a_veth_named_kube_ipvs0_is_refused_and_left_untouched() {
    in_new_netns(|| {
        ip("link add kube-ipvs0 type veth peer name kube-peer0");
        ip("addr add 192.0.2.1/32 dev kube-ipvs0");
        let before = ip("-d -o link show kube-ipvs0");

        let ensured = DummyLink::ensure(KUBE_IPVS0);
        assert!(
            matches!(&ensured, Err(Error::NotDummy { name, kind }) if name == KUBE_IPVS0 && kind == "veth"),
            "{ensured:?}"
        );
        let message = ensured.unwrap_err().to_string();
        assert!(
            message.contains("veth") && message.contains("untouched"),
            "{message}"
        );
        assert!(matches!(
            DummyLink::open(KUBE_IPVS0),
            Err(Error::NotDummy { .. })
        ));
        assert!(matches!(
            DummyLink::delete(KUBE_IPVS0),
            Err(Error::NotDummy { .. })
        ));

        assert_eq!(ip("-d -o link show kube-ipvs0"), before);
        assert_eq!(
            addresses_on("kube-ipvs0"),
            ["192.0.2.1/32".to_owned()].into()
        );
    });
}

#[test]
fn deleting_a_missing_link_is_not_an_error() {
    in_new_netns(|| {
        assert!(!DummyLink::delete(KUBE_IPVS0).expect("delete"));
        assert!(DummyLink::open(KUBE_IPVS0).expect("open").is_none());
    });
}

#[test]
fn ensure_names_a_missing_dummy_module_or_creates_the_link() {
    in_new_netns(|| match DummyLink::ensure(KUBE_IPVS0) {
        // The host kernel of this project's machines: no CONFIG_DUMMY.
        Err(Error::DummyUnsupported { name }) => {
            assert_eq!(name, KUBE_IPVS0);
            assert!(!link_exists(KUBE_IPVS0));
        }
        Ok(link) => {
            assert!(ip("-d -o link show kube-ipvs0").contains("dummy"));
            assert_eq!(link.name(), KUBE_IPVS0);
        }
        Err(other) => panic!("unexpected {other}"),
    });
}

#[test]
fn invalid_names_are_refused_before_any_request() {
    for name in ["", "a-name-far-too-long", "a/b"] {
        assert!(
            matches!(DummyLink::ensure(name), Err(Error::InvalidName(_))),
            "{name}"
        );
    }
}
