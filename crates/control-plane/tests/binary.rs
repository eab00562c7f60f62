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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_folder_and_reloads_on_change_and_sighup() {
    let dir = tempfile::tempdir().unwrap();
    write_cluster(dir.path(), "a.pb", "a");
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis-control-plane"))
        .args(["--listen", "127.0.0.1:0", "--resources"])
        .arg(dir.path())
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

    let names = Names::default();
    let mut config = ClientConfig::new(
        format!("http://{addr}"),
        NodeIdentity::from_env(Vec::new(), &NodeOverrides::default()),
    );
    config.token_file = dir.path().join("no-token");
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
