//! The deployment manifests are valid Kubernetes objects and agree with the binary: every flag
//! the DaemonSet passes is one the binary accepts, the ConfigMap's configuration loads, and
//! the probes and permissions are the ones the proxy needs.

use std::path::{Path, PathBuf};

use clap::Parser;
use ipvs_proxy::config::ProxyConfig;
use ipvs_proxy::config_file::ConfigFile;
use ipvs_proxy::flags::Cli;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/deploy")
}

/// Every document of every file under manifests/deploy, as (kind, value).
fn documents() -> Vec<(String, serde_yaml::Value)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let kind = value["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no kind", file.display()))
                .to_owned();
            out.push((kind, value));
        }
    }
    out
}

fn one<T: serde::de::DeserializeOwned>(kind: &str) -> T {
    let docs: Vec<_> = documents().into_iter().filter(|(k, _)| k == kind).collect();
    assert_eq!(docs.len(), 1, "expected one {kind}");
    serde_yaml::from_value(docs[0].1.clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

/// The name of the ConfigMap the pod mounts at the folder holding `path`.
fn config_map_mounted_at(pod: &k8s_openapi::api::core::v1::PodSpec, path: &Path) -> String {
    let mount = pod.containers[0]
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| path.starts_with(&m.mount_path))
        .unwrap_or_else(|| panic!("{} is in no mounted volume", path.display()));
    let volume = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == mount.name)
        .unwrap();
    volume.config_map.as_ref().unwrap().name.clone()
}

#[test]
fn every_document_parses_into_its_kubernetes_type() {
    let kinds: Vec<String> = documents().into_iter().map(|(k, _)| k).collect();
    for kind in [
        "DaemonSet",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
    ] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "missing {kind} in {kinds:?}"
        );
    }
    let _: DaemonSet = one("DaemonSet");
    let _: ServiceAccount = one("ServiceAccount");
    let _: ClusterRoleBinding = one("ClusterRoleBinding");
}

#[test]
fn daemonset_passes_only_flags_the_binary_accepts() {
    let ds: DaemonSet = one("DaemonSet");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod.host_network,
        Some(true),
        "a service proxy programs the host's network namespace"
    );
    let container = &pod.containers[0];
    assert_eq!(
        container.security_context.as_ref().unwrap().privileged,
        Some(true)
    );
    // The kubelet expands $(NODE_NAME) before the binary sees it.
    let args: Vec<String> = container
        .args
        .clone()
        .unwrap()
        .into_iter()
        .map(|a| a.replace("$(NODE_NAME)", "node-a"))
        .collect();
    let cli = Cli::try_parse_from(std::iter::once("ipvs-proxy".to_owned()).chain(args))
        .unwrap_or_else(|e| panic!("DaemonSet args rejected by the binary: {e}"));
    assert_eq!(cli.flags.hostname_override.as_deref(), Some("node-a"));

    // The config file it names is the ConfigMap's key, mounted where the flag says.
    let config_path = cli.flags.config.clone().unwrap();
    let cm_name = config_map_mounted_at(&pod, &config_path);
    let cm: ConfigMap = one("ConfigMap");
    assert_eq!(cm.metadata.name.as_deref(), Some(cm_name.as_str()));
    let key = config_path.file_name().unwrap().to_str().unwrap();
    let text = cm
        .data
        .unwrap()
        .remove(key)
        .unwrap_or_else(|| panic!("ConfigMap has no key {key}"));
    let file = ConfigFile::parse_str(&config_path, &text).unwrap();
    assert!(file.unknown_fields.is_empty(), "{:?}", file.unknown_fields);
    let config = ProxyConfig::default()
        .with_file(&file.config)
        .with_flags(&cli.flags);

    // Probes reach the health server where the configuration puts it.
    let port = config.healthz_bind_address.port();
    for (probe, path) in [
        (&container.liveness_probe, "/livez"),
        (&container.readiness_probe, "/healthz"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(port))
        );
    }
}

#[test]
fn cluster_role_lets_the_proxy_list_and_watch_what_it_follows() {
    let role: ClusterRole = one("ClusterRole");
    let rules = role.rules.unwrap();
    for (group, resource) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["list", "watch"] {
            assert!(
                rules.iter().any(|r| r
                    .api_groups
                    .as_ref()
                    .is_some_and(|g| g.iter().any(|g| g == group))
                    && r.resources
                        .as_ref()
                        .is_some_and(|rs| rs.iter().any(|x| x == resource))
                    && r.verbs.iter().any(|v| v == verb)),
                "cannot {verb} {resource}"
            );
        }
    }
    let binding: ClusterRoleBinding = one("ClusterRoleBinding");
    let account: ServiceAccount = one("ServiceAccount");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    assert_eq!(
        binding.subjects.unwrap()[0].name,
        account.metadata.name.unwrap()
    );
}

#[test]
fn the_daemonset_reaches_the_api_server_without_the_kubernetes_service() {
    // The configuration names a kubeconfig; it must be in the same ConfigMap, under the same
    // mount, as kubeadm lays them out.
    let cm: ConfigMap = one("ConfigMap");
    let data = cm.data.unwrap();
    let config_path = Path::new("/var/lib/kube-proxy/config.conf");
    let file = ConfigFile::parse_str(config_path, &data["config.conf"]).unwrap();
    let config = ProxyConfig::default().with_file(&file.config);
    let kubeconfig = config
        .kubeconfig
        .expect("clientConnection.kubeconfig is set, as kubeadm sets it");
    assert_eq!(kubeconfig.parent(), config_path.parent(), "side by side");
    let key = kubeconfig.file_name().unwrap().to_str().unwrap();
    let text = data
        .get(key)
        .unwrap_or_else(|| panic!("the ConfigMap has no {key}"));

    let kc: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
    assert_eq!(kc["kind"], "Config");
    let server = kc["clusters"][0]["cluster"]["server"].as_str().unwrap();
    // Not in-cluster config: no ClusterIP, no `kubernetes.default` name, which only resolve
    // once a proxy has programmed them.
    assert!(server.starts_with("https://"), "{server}");
    assert!(
        !server.contains("kubernetes.default") && !server.contains("10.96."),
        "the API server is reached through the kubernetes Service: {server}"
    );
    // The credentials are the pod's service account's, which the kubelet mounts.
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount/";
    let ca = kc["clusters"][0]["cluster"]["certificate-authority"].as_str();
    let token = kc["users"][0]["user"]["tokenFile"].as_str();
    assert!(ca.is_some_and(|p| p.starts_with(sa)), "{ca:?}");
    assert!(token.is_some_and(|p| p.starts_with(sa)), "{token:?}");

    // And the pod mounts that ConfigMap where the paths point.
    let ds: DaemonSet = one("DaemonSet");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_ne!(pod.automount_service_account_token, Some(false));
    assert_eq!(
        config_map_mounted_at(&pod, &kubeconfig),
        cm.metadata.name.unwrap()
    );
}
