//! config/kubernetes as a cluster would run it, as far as a machine without a cluster or an
//! image builder can tell: the manifests are valid Kubernetes objects (strict schema, unknown
//! fields rejected), and the containers of deployment.yaml, run in the lab with their exact
//! args and env (downward-API values filled in as the kubelet would) over the ConfigMap
//! mounted as the kubelet mounts it, capture the pod's traffic, refuse an unregistered host
//! and answer the probes the manifest names on their ports and paths.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use portcullis_e2e::lab::PROXY_UID;
use portcullis_e2e::scenario::{EXTERNAL_IP, POD_IP};
use portcullis_e2e::{Role, cmd, preflight, run};
use serde_json::Value;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/kubernetes");
const DEPLOYMENT: &str = include_str!("../../config/kubernetes/deployment.yaml");
const CONFIGMAP: &str = include_str!("../../config/kubernetes/configmap.yaml");

fn yaml(text: &str) -> anyhow::Result<Value> {
    serde_saphyr::from_str(text).context("parsing a manifest")
}

/// The pod template's container `name`, among its init containers and containers.
fn container<'a>(pod: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    ["initContainers", "containers"]
        .iter()
        .filter_map(|list| pod[list].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .with_context(|| format!("deployment.yaml has no container {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

/// A name the Deployment's controller could give its pod.
const POD_NAME: &str = "sleep-7d9c8b6f5-x2x4q";

/// What the kubelet gives a `fieldRef` for the lab's pod.
fn field(pod: &Value, meta: &Value, path: &str) -> anyhow::Result<String> {
    let label = |key: &str| meta["labels"][key].as_str().map(str::to_owned);
    let value = match path {
        "metadata.name" => Some(POD_NAME.to_owned()),
        "metadata.namespace" => Some("default".to_owned()),
        "status.podIP" => Some(POD_IP.to_owned()),
        "spec.serviceAccountName" => pod["serviceAccountName"].as_str().map(str::to_owned),
        _ => path
            .strip_prefix("metadata.labels['")
            .and_then(|rest| rest.strip_suffix("']"))
            .and_then(label),
    };
    value.with_context(|| format!("no value for fieldRef {path}"))
}

/// A container's env as the kubelet sets it: downward-API values, and `$(VAR)` in a value
/// replaced by an earlier variable.
fn env(pod: &Value, meta: &Value, c: &Value) -> anyhow::Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().context("env without a name")?.to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            out.iter()
                .fold(v.to_owned(), |v, (k, x)| v.replace(&format!("$({k})"), x))
        } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            field(pod, meta, path)?
        } else {
            bail!("env {name}: neither a value nor a fieldRef");
        };
        out.push((name, value));
    }
    Ok(out)
}

/// A map of labels or annotations as the kubelet writes it into a downward-API file: one
/// `key="value"` line per entry, sorted, the value quoted as Go's `%q`.
fn downward_file(map: &Value) -> String {
    let mut lines: Vec<String> = map
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            format!(
                "{k}={}",
                Value::String(v.as_str().unwrap_or_default().into())
            )
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// Runs `kubernetes-validate --strict` on `files`: the output, and whether they passed.
fn validate(files: &[&Path]) -> anyhow::Result<(bool, String)> {
    let out = cmd::output(
        Command::new("kubernetes-validate")
            .args(["--strict", "--no-warn"])
            .args(files),
        Duration::from_secs(120),
    )
    .context("kubernetes-validate (pip install kubernetes-validate) must be installed")?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.success(), text))
}

/// The manifests pass Kubernetes' own schema in strict mode, which does reject an unknown
/// field; the ConfigMap's files pass `portcullis check`.
#[test]
fn manifests_are_valid_kubernetes_objects() {
    let check = || -> anyhow::Result<()> {
        let dir = Path::new(DIR);
        let (deployment, configmap) = (dir.join("deployment.yaml"), dir.join("configmap.yaml"));
        let (passed, text) = validate(&[&deployment, &configmap])?;
        ensure!(passed, "kubernetes-validate --strict failed:\n{text}");

        let tmp = std::env::temp_dir().join(format!("pce2e-k8s-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        let misspelt = tmp.join("misspelt.yaml");
        std::fs::write(
            &misspelt,
            DEPLOYMENT.replacen(
                "\n        restartPolicy: Always\n",
                "\n        restartPolicyy: Always\n",
                1,
            ),
        )?;
        let (passed, text) = validate(&[&misspelt])?;
        ensure!(
            !passed && text.contains("restartPolicyy"),
            "a misspelt field must fail validation:\n{text}"
        );

        let config = tmp.join("config");
        std::fs::create_dir_all(&config)?;
        let cm = yaml(CONFIGMAP)?;
        for (name, content) in cm["data"].as_object().context("ConfigMap without data")? {
            std::fs::write(config.join(name), content.as_str().unwrap_or_default())?;
        }
        let out = cmd::output(
            Command::new(preflight::portcullis_bin()?)
                .arg("check")
                .arg("--config")
                .arg(&config),
            Duration::from_secs(30),
        )?;
        let _ = std::fs::remove_dir_all(&tmp);
        ensure!(
            out.status.success(),
            "portcullis check on the ConfigMap's files failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(())
    };
    check().unwrap();
}

/// deployment.yaml's containers in the lab: the init container's iptables args, then the
/// sidecar with its exact args and env over the mounted ConfigMap; the probes answer 200 from
/// outside the pod, as the kubelet asks them, the app's connection to an unregistered host is
/// captured and refused, and one to the host its `hostAliases` name is routed to that host's
/// service.
#[test]
fn the_deployment_runs_as_written() {
    run("kubernetes", |lab| {
        let deployment = yaml(DEPLOYMENT)?;
        let template = &deployment["spec"]["template"];
        let (meta, pod) = (&template["metadata"], &template["spec"]);

        let init = container(pod, "portcullis-init")?;
        let init_args = strings(&init["args"]);
        let init_args: Vec<&str> = init_args.iter().map(String::as_str).collect();
        lab.run_portcullis_as_root(&init_args)?;

        let sidecar = container(pod, "portcullis")?;
        ensure!(
            sidecar["restartPolicy"] == "Always",
            "portcullis must be a native sidecar (an init container with restartPolicy: Always)"
        );
        ensure!(
            sidecar["securityContext"]["runAsUser"] == u64::from(PROXY_UID),
            "the sidecar must run as the uid the capture rules exempt"
        );

        let cm = yaml(CONFIGMAP)?;
        let data: BTreeMap<&str, &str> = cm["data"]
            .as_object()
            .context("ConfigMap without data")?
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str().unwrap_or_default()))
            .collect();
        let files: Vec<(&str, &str)> = data.into_iter().collect();
        lab.publish_configmap(&files)?;

        // Each mount is a folder of the lab: the ConfigMap's is the config folder, a
        // downward-API volume's holds its files as the kubelet writes them.
        let mut mounts: Vec<(String, String)> = Vec::new();
        for m in sidecar["volumeMounts"].as_array().into_iter().flatten() {
            let path = m["mountPath"].as_str().context("a mount without a path")?;
            let volume = pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == m["name"])
                .context("a mount of no volume")?;
            let folder = if volume["configMap"].is_object() {
                lab.config_dir().to_path_buf()
            } else {
                let folder = lab.dir.join("podinfo");
                std::fs::create_dir_all(&folder)?;
                for item in volume["downwardAPI"]["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let file = item["path"].as_str().context("an item without a path")?;
                    let key = item["fieldRef"]["fieldPath"]
                        .as_str()
                        .and_then(|f| f.strip_prefix("metadata."))
                        .context("an item other than metadata.labels/annotations")?;
                    std::fs::write(folder.join(file), downward_file(&meta[key]))?;
                }
                folder
            };
            mounts.push((path.to_owned(), folder.display().to_string()));
        }
        let args: Vec<String> = strings(&sidecar["args"])
            .into_iter()
            .map(|a| {
                mounts
                    .iter()
                    .fold(a, |a, (mount, folder)| a.replace(mount.as_str(), folder))
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env = env(pod, meta, sidecar)?;
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        lab.start_portcullis_as_given(&args, &env)?;

        // The mode is the pod annotation's, read from the downward-API file.
        let (_, mode) = lab.admin_get("/mode")?;
        let mode: Value = serde_json::from_str(&mode)?;
        ensure!(
            mode["source"] == "annotation"
                && mode["mode"] == meta["annotations"]["portcullis.io/mode"],
            "the mode comes from the pod annotation: {mode:#}"
        );

        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let get = &sidecar[probe]["httpGet"];
            let (path, port) = (get["path"].as_str(), get["port"].as_u64());
            let (Some(path), Some(port)) = (path, port) else {
                bail!("{probe} is not an httpGet with a path and a numeric port");
            };
            let reply = lab.curl_in(Role::External, &[&format!("http://{POD_IP}:{port}{path}")])?;
            ensure!(
                reply.status == 200,
                "{probe} GET :{port}{path} from outside the pod must answer 200: {reply}"
            );
        }

        let before = lab.nginx_requests(Role::External);
        let reply = lab.curl(&[&format!("http://{EXTERNAL_IP}/")])?;
        reply.expect_blocked("an unregistered host, through the capture")?;
        ensure!(
            lab.nginx_requests(Role::External) == before,
            "the refused request reached the external host"
        );
        lab.expect_logged(
            "the refusal in the access log",
            &[" 502 - ", "block_all", EXTERNAL_IP],
        )?;

        // The pod's hostAliases are its /etc/hosts: the ConfigMap's made-up host resolves in
        // the app, and its connection is captured and routed to the registered service.
        let mut hosts = String::from("127.0.0.1 localhost\n");
        for alias in pod["hostAliases"].as_array().into_iter().flatten() {
            let ip = alias["ip"].as_str().context("a hostAlias without an ip")?;
            for name in strings(&alias["hostnames"]) {
                hosts.push_str(&format!("{ip} {name}\n"));
            }
        }
        lab.write_pod_etc("hosts", &hosts)?;
        // A pod has a default route, which the alias address leaves by (and is captured on
        // the way); the lab's pod only has a route to its own network.
        lab.run(Role::Pod, "ip", &["route", "add", "default", "dev", "eth0"])?;
        lab.curl(&["--max-time", "2", "http://app.internal.com/"])?;
        lab.expect_logged(
            "app.internal.com routed to its ServiceEntry's cluster",
            &["app.internal.com", "outbound|80||app.internal.com"],
        )?;
        lab.expect_running()
    });
}
