//! The VM's kernel is fit for ipvs-proxy: IPVS and the dummy link type are there, and the
//! IPVS table starts empty. Runs only in the VM: `cargo xtask vm-test` (docs/testing.md).

use std::path::Path;
use std::process::Command;

const NEEDS_VM: &str = "needs an IPVS kernel (IPVS_PROXY_VM unset): run cargo xtask vm-test";

fn require_vm() {
    assert!(std::env::var_os("IPVS_PROXY_VM").is_some(), "{NEEDS_VM}");
}

/// Runs a command and returns its standard output, failing the test on a non-zero exit.
fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn ipvs_and_dummy_modules_are_loaded() {
    require_vm();
    let modules = std::fs::read_to_string("/proc/modules").expect("reading /proc/modules");
    for module in [
        "ip_vs",
        "ip_vs_rr",
        "ip_vs_wrr",
        "ip_vs_sh",
        "ip_vs_mh",
        "dummy",
    ] {
        assert!(
            modules
                .lines()
                .any(|line| line.split(' ').next() == Some(module)),
            "module {module} is not loaded"
        );
    }
    assert!(
        Path::new("/proc/net/ip_vs").exists(),
        "/proc/net/ip_vs is missing"
    );
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn ipvs_table_starts_empty() {
    require_vm();
    assert_eq!(
        run("ipvsadm", &["-Sn"]),
        "",
        "ipvsadm -Sn should print nothing"
    );
    let listing = run("ipvsadm", &["-ln"]);
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "ipvsadm -ln should print only its headers:\n{listing}"
    );
    assert!(
        lines[0].starts_with("IP Virtual Server version"),
        "{listing}"
    );
    assert!(
        lines[1].starts_with("Prot LocalAddress:Port Scheduler Flags"),
        "{listing}"
    );
}

#[test]
#[ignore = "needs an IPVS kernel: run cargo xtask vm-test"]
fn dummy_link_can_be_created_and_deleted() {
    require_vm();
    let link = "vmtest-dummy0";
    run("/bin/ip", &["link", "add", link, "type", "dummy"]);
    let exists = Path::new("/sys/class/net").join(link).exists();
    // Delete before asserting, so a failure leaves nothing behind.
    run("/bin/ip", &["link", "del", link]);
    assert!(exists, "{link} did not appear in /sys/class/net");
    assert!(
        !Path::new("/sys/class/net").join(link).exists(),
        "{link} is still there after ip link del"
    );
}
