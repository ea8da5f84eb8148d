//! Records the compiler's version for `kubernetes_build_info` (upstream's `go_version`).

use std::process::Command;

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    // `rustc 1.89.0 (29483883e 2025-08-04)`: the second word is the version.
    let version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_default();
    println!("cargo:rustc-env=TELEMETRY_RUSTC_VERSION={version}");
    println!("cargo:rerun-if-env-changed=RUSTC");
    for var in [
        "IPVS_PROXY_GIT_COMMIT",
        "IPVS_PROXY_GIT_TREE_STATE",
        "IPVS_PROXY_BUILD_DATE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
}
