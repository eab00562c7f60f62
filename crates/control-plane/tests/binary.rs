//! `portcullis-control-plane --resources DIR` serves the folder and follows its changes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::util::pack_any;
use portcullis_xds::{
    Applied, Client, ClientConfig, NodeIdentity, NodeOverrides, Sink, Update, XdsStats, type_url,
};
use prost::Message;

#[path = "support/pki.rs"]
mod pki;

/// Keeps the names of what it was given, per type.
#[derive(Clone, Default)]
struct Names(Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>);

impl Sink for Names {
    fn apply(&mut self, update: Update) -> Applied {
        let mut names = self.0.lock().unwrap();
        let of_type = names.entry(update.type_url).or_default();
        of_type.extend(update.resources.into_iter().map(|r| r.name));
        for name in update.removed {
            of_type.remove(&name);
        }
        Applied::default()
    }
}

impl Names {
    async fn wait_for(&self, clusters: &[&str]) {
        let want: BTreeSet<String> = clusters.iter().map(|c| (*c).to_owned()).collect();
        for _ in 0..500 {
            let now = self.0.lock().unwrap().get(type_url::CLUSTER).cloned();
            if now.as_ref() == Some(&want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "clusters never became {want:?}: {:?}",
            self.0.lock().unwrap()
        );
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_cluster(dir: &Path, file: &str, name: &str) {
    let any = pack_any(Cluster {
        name: name.to_owned(),
        ..Cluster::default()
    });
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, any.encode_to_vec()).unwrap();
    std::fs::rename(tmp, dir.join(file)).unwrap();
}

/// Starts the binary; returns it and the address it printed.
fn spawn(args: &[&std::ffi::OsStr]) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis-control-plane"))
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().unwrap();
    let server = Server(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (server, addr)
}

fn client_config(address: String, dir: &Path) -> ClientConfig {
    let mut config = ClientConfig::new(
        address,
        NodeIdentity::from_env(Vec::new(), &NodeOverrides::default()),
    );
    config.token_file = dir.join("no-token");
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_folder_and_reloads_on_change_and_sighup() {
    let dir = tempfile::tempdir().unwrap();
    write_cluster(dir.path(), "a.pb", "a");
    let (server, addr) = spawn(&[
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--resources".as_ref(),
        dir.path().as_os_str(),
    ]);
    let names = Names::default();
    let config = client_config(format!("http://{addr}"), dir.path());
    let client = Client::new(config, Arc::new(XdsStats::default())).unwrap();
    let task = tokio::spawn(client.run(names.clone()));
    names.wait_for(&["a"]).await;

    // A new file is picked up by the folder watch.
    write_cluster(dir.path(), "b.pb", "b");
    names.wait_for(&["a", "b"]).await;

    // SIGHUP re-reads the folder too; a removed file is a removed resource.
    std::fs::remove_file(dir.path().join("a.pb")).unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    names.wait_for(&["b"]).await;

    // A file that is not an Any leaves the served set as it was.
    std::fs::write(dir.path().join("junk.pb"), b"\xff\xff not protobuf").unwrap();
    write_cluster(dir.path(), "c.pb", "c");
    tokio::time::sleep(Duration::from_millis(300)).await;
    names.wait_for(&["b"]).await;
    std::fs::remove_file(dir.path().join("junk.pb")).unwrap();
    names.wait_for(&["b", "c"]).await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_tls_with_the_given_certificate() {
    let pki = pki::pki();
    let resources = pki.dir.path().join("resources");
    std::fs::create_dir(&resources).unwrap();
    write_cluster(&resources, "a.pb", "a");
    let (cert, key) = (
        pki.dir.path().join("cert.pem"),
        pki.dir.path().join("key.pem"),
    );
    std::fs::write(&cert, &pki.server.cert_pem).unwrap();
    std::fs::write(&key, &pki.server.key_pem).unwrap();
    let (_server, addr) = spawn(&[
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--resources".as_ref(),
        resources.as_os_str(),
        "--tls-cert".as_ref(),
        cert.as_os_str(),
        "--tls-key".as_ref(),
        key.as_os_str(),
    ]);
    let mut config = client_config(format!("https://{addr}"), pki.dir.path());
    config.root_cert = Some(pki.dir.path().join("root-cert.pem"));
    config.token_file = pki.dir.path().join("token");
    std::fs::write(&config.token_file, "t").unwrap();
    let names = Names::default();
    let client = Client::new(config, Arc::new(XdsStats::default())).unwrap();
    let task = tokio::spawn(client.run(names.clone()));
    names.wait_for(&["a"]).await;
    task.abort();
}
