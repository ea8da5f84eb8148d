//! `--master http://…` on a machine without CA certificates (a minimal image, the test VM): a
//! plain-HTTP API server needs no trust roots, so the Kubernetes client must build without
//! them. Checked with `ipvs-proxy plan` against the loopback test API server, with the
//! system's trust store pointed at an empty folder.

use controllers::source::Kind;
use testapi::{ApiServer, node, service, slice};

#[tokio::test]
async fn plan_follows_a_plain_http_master_without_ca_certificates() {
    let server = ApiServer::start().await;
    server.apply(Kind::Node, node("node-a", "192.168.56.10"));
    server.apply(Kind::Service, service("default", "web", "10.96.0.20", 80));
    server.apply(
        Kind::EndpointSlice,
        slice(
            "default",
            "web-abc",
            "web",
            &["10.244.1.5".to_owned()],
            8080,
        ),
    );
    let empty = std::env::temp_dir().join(format!("no-ca-certs-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ipvs-proxy"))
        .args(["plan", "--master", &server.url()])
        .args(["--hostname-override", "node-a", "--only", "ipvs"])
        // rustls-native-certs reads only these when they are set: no CA certificate at all.
        .env("SSL_CERT_FILE", empty.join("none.pem"))
        .env("SSL_CERT_DIR", &empty)
        .output()
        .await
        .expect("running ipvs-proxy plan");
    let _ = std::fs::remove_dir_all(&empty);
    assert!(
        out.status.success(),
        "plan failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .collect::<Vec<_>>(),
        [
            "-A -t 10.96.0.20:80 -s rr",
            "-a -t 10.96.0.20:80 -r 10.244.1.5:8080 -m -w 1"
        ]
    );
}
