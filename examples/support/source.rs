//! Where a benchmarked daemon reads the synthetic cluster from: a manifest directory, or the
//! test API server (`--source api`), and one endpoint change made through either.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use controllers::source::Kind;
use serde_json::{Value, json};
use testapi::ApiServer;

use super::{ENDPOINTS, endpoint, service_yaml};

/// The benchmark's arguments: `[--source api|manifests] SIZES…` (default sizes 1000 10000);
/// whether the source is the API server, and the sizes.
pub fn parse_args(args: &[String]) -> Result<(bool, Vec<u32>)> {
    let (api, args) = match args {
        [flag, source, rest @ ..] if flag == "--source" => match source.as_str() {
            "api" => (true, rest),
            "manifests" => (false, rest),
            other => bail!("--source {other}: api or manifests"),
        },
        _ => (false, args),
    };
    let sizes: Vec<u32> = args.iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
    let sizes = if sizes.is_empty() {
        vec![1000, 10_000]
    } else {
        sizes
    };
    anyhow::ensure!(sizes.iter().all(|&n| n <= 60_000), "at most 60000 Services");
    Ok((api, sizes))
}

/// The synthetic cluster of N Services × [`ENDPOINTS`] endpoints, served to the daemon.
pub enum Source {
    /// One manifest file per Service in this directory.
    Manifests(PathBuf),
    /// The test API server, on a runtime of its own. It listens in the network namespace it
    /// was started in (a socket stays in the one it was made in).
    Api(Api),
}

pub struct Api {
    // Dropped before the runtime: its Drop aborts the server's tasks.
    server: ApiServer,
    _runtime: tokio::runtime::Runtime,
}

impl Source {
    /// The cluster of `n` Services, from the API server when `api`, else as manifests in a
    /// directory named after `bench` and `n`.
    pub fn new(api: bool, bench: &str, n: u32) -> Result<Source> {
        let started = Instant::now();
        let source = if api {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            let server = runtime.block_on(ApiServer::start());
            server.apply(Kind::Node, testapi::node("node-a", "192.168.56.10"));
            server.apply_many((0..n).flat_map(|i| {
                let (service, slice) = service_json(i, None);
                [(Kind::Service, service), (Kind::EndpointSlice, slice)]
            }));
            Source::Api(Api {
                server,
                _runtime: runtime,
            })
        } else {
            let dir = std::env::temp_dir().join(format!("{bench}-{n}"));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            for i in 0..n {
                std::fs::write(dir.join(format!("svc-{i}.yaml")), service_yaml(i, None))?;
            }
            Source::Manifests(dir)
        };
        println!(
            "{n} Services x {ENDPOINTS} endpoints: {} in {:.2}s",
            if api {
                "API server loaded"
            } else {
                "manifests written"
            },
            started.elapsed().as_secs_f64()
        );
        Ok(source)
    }

    /// The daemon's (and plan's) flags that name the source and the node.
    pub fn flags(&self) -> Vec<String> {
        let mut flags = match self {
            Source::Manifests(dir) => {
                vec!["--manifests".into(), dir.to_string_lossy().into_owned()]
            }
            Source::Api(api) => vec!["--master".into(), api.server.url()],
        };
        flags.extend([
            "--hostname-override".into(),
            "node-a".into(),
            "--cluster-cidr".into(),
            "10.128.0.0/10".into(),
        ]);
        flags
    }

    /// Moves Service `i`'s last endpoint to `moved`: a file renamed into the directory, or an
    /// EndpointSlice updated on the server.
    pub fn change(&self, i: u32, moved: Ipv4Addr) -> Result<()> {
        match self {
            Source::Manifests(dir) => {
                let tmp = dir.join(format!(".svc-{i}.tmp"));
                std::fs::write(&tmp, service_yaml(i, Some(moved)))?;
                std::fs::rename(&tmp, dir.join(format!("svc-{i}.yaml")))?;
            }
            Source::Api(api) => {
                api.server
                    .apply(Kind::EndpointSlice, service_json(i, Some(moved)).1);
            }
        }
        Ok(())
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Source::Manifests(dir) = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Service `i` and its slice as [`service_yaml`] writes them, as API objects with what a real
/// API server and its controllers add to them (a uid, a creation time, managedFields, kubectl's
/// last-applied-configuration, the slice's owner, trigger time and Pod references), which the
/// proxy must not keep.
pub fn service_json(i: u32, moved: Option<Ipv4Addr>) -> (Value, Value) {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i + 1).to_string();
    let name = format!("svc-{i}");
    let (svc_uid, slice_uid) = (uid(2 * i), uid(2 * i + 1));
    let time = "2026-01-01T00:00:00Z";
    let endpoints: Vec<Value> = (0..ENDPOINTS)
        .map(|j| {
            let ip = match moved {
                Some(ip) if j == ENDPOINTS - 1 => ip,
                _ => endpoint(i, j),
            };
            json!({"addresses": [ip.to_string()],
                   "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": format!("node-{}", j % 3),
                   "targetRef": {"kind": "Pod", "namespace": "bench", "name": format!("{name}-7d9f8b6c5-{j:05}"),
                                 "uid": uid(1_000_000 + i * ENDPOINTS + j)}})
        })
        .collect();
    let ports = json!([{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]);
    let applied = json!({"apiVersion": "v1", "kind": "Service",
                         "metadata": {"name": name, "namespace": "bench"},
                         "spec": {"clusterIP": vip, "ports": ports}});
    let service = json!({
        "metadata": {"name": name, "namespace": "bench", "uid": svc_uid, "creationTimestamp": time,
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": applied.to_string()},
                     "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update",
                                        "apiVersion": "v1", "time": time, "fieldsType": "FieldsV1",
                                        "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}}},
                                                     "f:spec": {"f:clusterIP": {}, "f:internalTrafficPolicy": {},
                                                                "f:ports": {".": {}, r#"k:{"port":80,"protocol":"TCP"}"#: {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}},
                                                                "f:sessionAffinity": {}, "f:type": {}}}}]},
        "spec": {"type": "ClusterIP", "clusterIP": vip, "clusterIPs": [vip], "ports": ports,
                 "sessionAffinity": "None", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                 "internalTrafficPolicy": "Cluster"},
        "status": {"loadBalancer": {}},
    });
    let slice = json!({
        "metadata": {"name": format!("{name}-x"), "namespace": "bench", "uid": slice_uid,
                     "creationTimestamp": time, "generateName": format!("{name}-"),
                     "labels": {"kubernetes.io/service-name": name,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                     "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": time},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name, "uid": svc_uid,
                                          "controller": true, "blockOwnerDeletion": true}],
                     "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                                        "apiVersion": "discovery.k8s.io/v1", "time": time, "fieldsType": "FieldsV1",
                                        "fieldsV1": {"f:addressType": {}, "f:endpoints": {},
                                                     "f:metadata": {"f:annotations": {".": {}, "f:endpoints.kubernetes.io/last-change-trigger-time": {}},
                                                                    "f:generateName": {}, "f:labels": {".": {}, "f:endpointslice.kubernetes.io/managed-by": {}, "f:kubernetes.io/service-name": {}},
                                                                    "f:ownerReferences": {".": {}, format!("k:{{\"uid\":\"{svc_uid}\"}}"): {}}},
                                                     "f:ports": {}}}]},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    });
    (service, slice)
}

/// A uid as random-looking as a real one, the same for `seed` in every run (splitmix64).
fn uid(seed: u32) -> String {
    let mut z = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        z >> 32,
        (z >> 16) & 0xffff,
        z & 0xfff,
        0x8000 | (z >> 50),
        z & 0xffff_ffff_ffff
    )
}
