//! `portcullis check` on real files: findings a user can act on (the field's own line and
//! column, "did you mean"), duplicates across files, `kubectl get -o yaml` lists, and the
//! JSON report for CI; and `portcullis run` keeping the copy that serves when another
//! file repeats a resource. No network namespace: only the admin port on loopback is
//! spoken to.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use portcullis_e2e::preflight::portcullis_bin;

/// A scratch folder of config files, removed on drop.
struct Config(PathBuf);

impl Config {
    fn new(test: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("pce2e-config-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        Ok(Config(dir))
    }

    fn write(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.0.join(name);
        fs::write(&path, text)?;
        Ok(path)
    }
}

impl Drop for Config {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What `portcullis check` printed and how it exited.
struct Checked {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn check(config: &Path, extra: &[&str]) -> anyhow::Result<Checked> {
    let out = Command::new(portcullis_bin()?)
        .arg("check")
        .arg("--config")
        .arg(config)
        .args(extra)
        .output()
        .context("run portcullis check")?;
    Ok(Checked {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout)?,
        stderr: String::from_utf8(out.stderr)?,
    })
}

const TCP_DB: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: data}
spec:
  hosts: [db.example.com]
  adresses: [10.9.0.0/16]
  locaton: MESH_INTERNAL
  ports: [{number: 5432, name: tcp, protocol: TCP}]
";

#[test]
fn a_misspelt_field_is_an_error_at_its_line_and_column() -> anyhow::Result<()> {
    let dir = Config::new("misspelt")?;
    let file = dir.write("db.yaml", TCP_DB)?;
    let out = check(&file, &[])?;
    let f = file.display();
    let lines: Vec<&str> = out.stdout.lines().collect();
    ensure!(
        lines.first().copied()
            == Some(
                format!(
                    "Error [UNKNOWN_FIELD] (ServiceEntry data/db {f}:6:3) unknown field `adresses` in spec (did you mean `addresses`?)"
                )
                .as_str()
            ),
        "{}",
        out.stdout
    );
    ensure!(
        lines.get(1).copied()
            == Some(
                format!(
                    "Error [UNKNOWN_FIELD] (ServiceEntry data/db {f}:7:3) unknown field `locaton` in spec (did you mean `location`?)"
                )
                .as_str()
            ),
        "{}",
        out.stdout
    );
    ensure!(out.code == Some(1), "exit {:?}", out.code);
    // Rejected, it claims no port: no cluster was built from it.
    ensure!(
        lines
            .last()
            .is_some_and(|l| l.starts_with("0 resources, 0 clusters, 2 errors")),
        "{}",
        out.stdout
    );
    Ok(())
}

#[test]
fn findings_and_summary_go_to_the_same_stream() -> anyhow::Result<()> {
    let dir = Config::new("stream")?;
    dir.write("db.yaml", TCP_DB)?;
    dir.write(
        "other.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n",
    )?;
    let out = check(&dir.0, &[])?;
    ensure!(out.stderr.is_empty(), "stderr: {}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    ensure!(lines.len() == 5, "{}", out.stdout);
    ensure!(
        lines[4] == "0 resources, 0 clusters, 2 errors, 2 warnings",
        "{}",
        out.stdout
    );
    Ok(())
}

/// The ServiceEntry `default/api` with one endpoint, `metadata.name` at line 3, column 18.
fn api_entry(address: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api}}
spec:
  hosts: [api.example.com]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {address}}}]
"
    )
}

#[test]
fn a_resource_in_two_files_names_both() -> anyhow::Result<()> {
    let dir = Config::new("duplicate")?;
    let a = dir.write("a.yaml", &api_entry("10.0.0.1"))?;
    let b = dir.write(
        "b.yaml",
        &format!("# the same service again\n---\n{}", api_entry("10.0.0.2")),
    )?;
    let out = check(&dir.0, &[])?;
    let want = format!(
        "Error [DUPLICATE] (ServiceEntry default/api {}:5:18) ServiceEntry default/api is already defined at {}:3:18",
        b.display(),
        a.display()
    );
    ensure!(
        out.stdout.lines().next() == Some(want.as_str()),
        "{}",
        out.stdout
    );
    ensure!(out.code == Some(1), "exit {:?}", out.code);
    // a.yaml's copy is the one that serves.
    ensure!(
        out.stdout
            .ends_with("1 resources, 1 clusters, 1 errors, 0 warnings\n"),
        "{}",
        out.stdout
    );
    Ok(())
}

#[test]
fn kubectl_get_output_is_read_as_its_items() -> anyhow::Result<()> {
    let dir = Config::new("list")?;
    dir.write(
        "cluster.yaml",
        "apiVersion: v1
items:
- apiVersion: v1
  kind: Pod
  metadata:
    creationTimestamp: \"2026-01-01T00:00:00Z\"
    generateName: web-7d4b9-
    labels: {app: web, pod-template-hash: 7d4b9}
    managedFields:
    - {apiVersion: v1, fieldsType: FieldsV1, fieldsV1: {}, manager: kubelet, operation: Update}
    name: web-7d4b9-x2x9z
    namespace: shop
    ownerReferences:
    - {apiVersion: apps/v1, controller: true, kind: ReplicaSet, name: web-7d4b9, uid: 42}
    resourceVersion: \"1234\"
    uid: 8b1e
  spec:
    containers:
    - image: nginx:1.27
      imagePullPolicy: IfNotPresent
      name: web
      ports: [{containerPort: 8080, name: http, protocol: TCP}]
      resources: {}
      terminationMessagePath: /dev/termination-log
      terminationMessagePolicy: File
    dnsPolicy: ClusterFirst
    nodeName: node-1
    restartPolicy: Always
    schedulerName: default-scheduler
    serviceAccountName: default
    terminationGracePeriodSeconds: 30
  status:
    conditions:
    - {lastProbeTime: null, lastTransitionTime: \"2026-01-01T00:00:00Z\", status: \"True\", type: Ready}
    hostIP: 192.168.1.10
    phase: Running
    podIP: 10.244.1.5
    podIPs: [{ip: 10.244.1.5}]
    qosClass: BestEffort
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: shop, resourceVersion: \"99\", uid: 77}
  spec:
    clusterIP: 10.96.0.10
    clusterIPs: [10.96.0.10]
    internalTrafficPolicy: Cluster
    ipFamilies: [IPv4]
    ipFamilyPolicy: SingleStack
    ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]
    selector: {app: web}
    sessionAffinity: None
    type: ClusterIP
  status: {loadBalancer: {}}
kind: List
metadata:
  resourceVersion: \"\"
",
    )?;
    let out = check(&dir.0, &[])?;
    ensure!(out.code == Some(0), "exit {:?}: {}", out.code, out.stdout);
    ensure!(
        out.stdout == "2 resources, 1 clusters, 0 errors, 0 warnings\n",
        "{}",
        out.stdout
    );
    Ok(())
}

#[test]
fn json_output_for_ci() -> anyhow::Result<()> {
    let dir = Config::new("json")?;
    let file = dir.write(
        "mesh.yaml",
        "apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: ALLOW_ANY_DYNAMIC_DNS
",
    )?;
    dir.write("db.yaml", TCP_DB)?;
    let out = check(&dir.0, &["--output", "json"])?;
    ensure!(out.code == Some(1), "exit {:?}", out.code);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).context("stdout is JSON")?;
    ensure!(report["summary"]["errors"] == 3, "{report:#}");
    ensure!(report["summary"]["resources"] == 0, "{report:#}");
    let findings = report["findings"].as_array().context("findings")?;
    let mesh = findings
        .iter()
        .find(|f| f["code"] == "MESH_CONFIG")
        .context("the mesh config's finding")?;
    ensure!(mesh["severity"] == "error", "{mesh}");
    ensure!(
        mesh["file"] == file.display().to_string().as_str(),
        "{mesh}"
    );
    ensure!(mesh["line"] == 7 && mesh["column"] == 13, "{mesh}");
    let message = mesh["message"].as_str().context("message")?;
    ensure!(
        message.contains("ALLOW_ANY_DYNAMIC_DNS")
            && message.contains("supported modes: REGISTRY_ONLY, ALLOW_ANY"),
        "{message}"
    );
    let unknown: Vec<&str> = findings
        .iter()
        .filter(|f| f["code"] == "UNKNOWN_FIELD")
        .filter_map(|f| f["resource"].as_str())
        .collect();
    ensure!(unknown == ["data/db", "data/db"], "{report:#}");
    Ok(())
}

#[test]
fn yaml_errors_in_multi_document_files_count_lines_from_the_file() -> anyhow::Result<()> {
    let dir = Config::new("yaml")?;
    let file = dir.write(
        "multi.yaml",
        "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ok}
spec: {address: 10.0.0.1}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: broken}
spec:
  address: [10.0.0.2
  labels: {}
",
    )?;
    let out = check(&file, &[])?;
    let first = out.stdout.lines().next().unwrap_or_default();
    ensure!(
        first.starts_with(&format!("Error [YAML] ({}:11:", file.display())),
        "{}",
        out.stdout
    );
    ensure!(!out.stdout.contains("<input>"), "{}", out.stdout);
    ensure!(out.stdout.lines().count() == 2, "{}", out.stdout);
    Ok(())
}

/// A `portcullis run` on loopback ports, stopped (by its PID) on drop.
struct Running {
    child: Child,
    admin: u16,
}

impl Running {
    fn start(config: &Path) -> anyhow::Result<Self> {
        let port = || -> anyhow::Result<u16> {
            Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
        };
        let (outbound, admin, metrics, health) = (port()?, port()?, port()?, port()?);
        let child = Command::new(portcullis_bin()?)
            .arg("run")
            .arg("--config")
            .arg(config)
            .args(["--outbound", &format!("127.0.0.1:{outbound}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .args(["--metrics", &format!("127.0.0.1:{metrics}")])
            .args(["--health", &format!("127.0.0.1:{health}")])
            .args(["--rescan-interval", "1s", "--log", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start portcullis run")?;
        let running = Running { child, admin };
        running.wait_for(|ready| ready.starts_with("HTTP/1.0 200"), "/ready")?;
        Ok(running)
    }

    /// The admin server's whole answer (status line, headers, body) to `GET path`.
    fn get(&self, path: &str) -> anyhow::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.admin))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n")?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply)
    }

    /// Polls `path` until `done` holds for its answer, at most ten seconds.
    fn wait_for(&self, done: impl Fn(&str) -> bool, path: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(reply) = self.get(path) {
                if done(&reply) {
                    return Ok(reply);
                }
                last = reply;
            }
            sleep(Duration::from_millis(100));
        }
        bail!("{path} never became as expected; last answer: {last}")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_running_proxy_keeps_the_copy_that_serves() -> anyhow::Result<()> {
    let dir = Config::new("run")?;
    let serving = dir.write("b.yaml", &api_entry("10.0.0.1"))?;
    let running = Running::start(&dir.0)?;
    // The newcomer sorts first, and still does not take over.
    let newcomer = dir.write("a.yaml", &api_entry("10.0.0.2"))?;
    let dump = running.wait_for(|dump| dump.contains("DUPLICATE"), "/config_dump")?;
    let body = dump.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let dump: serde_json::Value = serde_json::from_str(body).context("config_dump is JSON")?;
    let files = dump["portcullis"]["config"]["files"]
        .as_array()
        .context("files")?;
    ensure!(files.len() == 1, "{dump:#}");
    ensure!(
        files[0]["path"] == newcomer.display().to_string().as_str(),
        "{dump:#}"
    );
    ensure!(files[0]["rejected"] == true, "{dump:#}");
    let finding = files[0]["findings"][0].as_str().context("a finding")?;
    ensure!(
        finding.ends_with(&format!(
            "ServiceEntry default/api is already defined at {}:3:18",
            serving.display()
        )),
        "{finding}"
    );
    let clusters = running.get("/clusters")?;
    ensure!(
        clusters.contains("outbound|80||api.example.com::10.0.0.1:80::")
            && !clusters.contains("10.0.0.2"),
        "{clusters}"
    );

    // Once the serving copy goes, the rejected file is read again and takes over.
    fs::remove_file(&serving)?;
    running.wait_for(
        |c| c.contains("api.example.com::10.0.0.2:80::"),
        "/clusters",
    )?;
    running.wait_for(|dump| !dump.contains("DUPLICATE"), "/config_dump")?;
    Ok(())
}
