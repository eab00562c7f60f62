//! Reading configuration from disk, and keeping the last good content of every file.
//!
//! [`scan`] is the only function here that touches the file system; [`ConfigSet`] is pure
//! so that reload semantics can be tested without files.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{FileLoad, Finding, Resource, Severity, load_str};

/// The whole config path could not be read (it is missing, or a folder cannot be listed).
#[derive(Debug, thiserror::Error)]
#[error("cannot read {}: {source}", path.display())]
pub struct ScanError {
    /// The path that failed.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// The files of one scan, each with its content or the error reading it.
pub type Scan = Vec<(PathBuf, io::Result<String>)>;

/// File name endings that are read as configuration.
const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// Reads the config at `path`: the file itself, or every `*.yaml`, `*.yml` and `*.json`
/// file under the folder, recursively, sorted by path.
///
/// Names starting with `.` are skipped. That covers hidden files and, importantly, the
/// `..data` and `..2024_…` folders of a Kubernetes ConfigMap mount, whose files are also
/// reachable through the top-level `x.yaml -> ..data/x.yaml` symlinks; those symlinks are
/// followed, so each file is read exactly once. Symlinked folders are followed too, each
/// real folder at most once, so that a symlink loop cannot make the scan run forever.
pub fn scan(path: &Path) -> Result<Scan, ScanError> {
    let fail = |source| ScanError {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(fail)?;
    if !meta.is_dir() {
        return Ok(vec![(path.to_path_buf(), fs::read_to_string(path))]);
    }
    let mut files = Vec::new();
    let mut visited = BTreeSet::new();
    walk(path, &mut visited, &mut files, true).map_err(fail)?;
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

/// Adds the config files under `dir`. Only the top folder's errors are returned: a
/// sub-folder that vanishes or cannot be listed mid-scan is skipped, its files unknown.
fn walk(
    dir: &Path,
    visited: &mut BTreeSet<PathBuf>,
    files: &mut Scan,
    top: bool,
) -> io::Result<()> {
    let real = match fs::canonicalize(dir) {
        Ok(real) => real,
        Err(e) if top => return Err(e),
        Err(_) => return Ok(()),
    };
    if !visited.insert(real) {
        return Ok(());
    }
    let listing = match fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(e) if top => return Err(e),
        Err(_) => return Ok(()),
    };
    let mut entries = Vec::new();
    for entry in listing {
        match entry {
            Ok(entry) => entries.push(entry),
            Err(e) if top => return Err(e),
            Err(_) => {}
        }
    }
    // Listing order is up to the file system; sorting makes the folder that wins among
    // several symlinks to it, and so the paths reported, the same on every scan.
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // `metadata` follows symlinks, which is what makes ConfigMap mounts work.
        match fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => walk(&path, visited, files, false)?,
            Ok(_) if is_config_name(&name) => {
                let text = fs::read_to_string(&path);
                files.push((path, text));
            }
            Ok(_) => {}
            // A dangling `x.yaml` symlink is a config file that cannot be read right now.
            Err(e) if is_config_name(&name) => files.push((path, Err(e))),
            Err(_) => {}
        }
    }
    Ok(())
}

fn is_config_name(name: &str) -> bool {
    name.rsplit_once('.').is_some_and(|(stem, ext)| {
        !stem.is_empty() && EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext))
    })
}

/// What one [`ConfigSet::update`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    /// Whether the current resources differ from those before the update; always true for
    /// the first update that could read the config path.
    pub changed: bool,
    /// Whether any file's findings differ from before the update.
    pub findings_changed: bool,
    /// Files whose current content is rejected; each keeps its previous good contribution.
    pub rejected: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
struct FileState {
    /// The text last seen, so that an unchanged file is not parsed again.
    text: Option<String>,
    /// The last content that loaded without errors: what the file contributes.
    good: Option<FileLoad>,
    /// Findings of the latest attempt (the read error, or the load's findings).
    findings: Vec<Finding>,
}

/// Every config file's last good content, updated scan by scan.
///
/// A file that fails to read or has any error keeps contributing its previous good
/// resources (if it ever had any) and its new findings are recorded; a file that loads
/// cleanly replaces its contribution; a file gone from the scan is dropped. When the config
/// path itself cannot be read, everything is kept and the error is recorded.
#[derive(Debug, Clone, Default)]
pub struct ConfigSet {
    files: BTreeMap<PathBuf, FileState>,
    scan_error: Option<Finding>,
    loaded: bool,
    last: Update,
}

impl ConfigSet {
    /// An empty set that has seen no scan.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a scan's result (see [`scan`]).
    pub fn update(&mut self, scan: Result<Scan, ScanError>) -> Update {
        let update = match scan {
            Ok(files) => self.apply(files),
            Err(e) => {
                let finding = read_finding("UNREADABLE_PATH", &e.path, &e.to_string());
                let findings_changed = self.scan_error.as_ref() != Some(&finding);
                self.scan_error = Some(finding);
                Update {
                    changed: false,
                    findings_changed,
                    rejected: Vec::new(),
                }
            }
        };
        self.last = update.clone();
        update
    }

    fn apply(&mut self, files: Scan) -> Update {
        let mut update = Update {
            changed: !self.loaded,
            findings_changed: self.scan_error.take().is_some(),
            rejected: Vec::new(),
        };
        self.loaded = true;
        let present: BTreeSet<&PathBuf> = files.iter().map(|(p, _)| p).collect();
        self.files.retain(|path, state| {
            let keep = present.contains(path);
            if !keep {
                update.changed |= state.good.as_ref().is_some_and(|g| !g.resources.is_empty());
                update.findings_changed |= !state.findings.is_empty();
            }
            keep
        });
        for (path, text) in files {
            let state = self.files.entry(path.clone()).or_insert(FileState {
                text: None,
                good: None,
                findings: Vec::new(),
            });
            let (findings, new_good, text) = match text {
                Ok(text) if state.text.as_deref() == Some(text.as_str()) => {
                    if state.findings.iter().any(|f| f.severity == Severity::Error) {
                        update.rejected.push(path);
                    }
                    continue;
                }
                Ok(text) => {
                    let load = load_str(&text, &Arc::new(path.clone()));
                    let findings = load.findings.clone();
                    let good = (!load.has_errors()).then_some(load);
                    (findings, good, Some(text))
                }
                Err(e) => (
                    vec![read_finding("READ", &path, &e.to_string())],
                    None,
                    None,
                ),
            };
            if findings != state.findings {
                update.findings_changed = true;
            }
            state.findings = findings;
            // A failed read forgets the text so that the same content is parsed again once
            // the file is readable.
            state.text = text;
            match new_good {
                Some(good) => {
                    let before = state.good.as_ref().map_or(&[][..], |g| &g.resources[..]);
                    if before != good.resources.as_slice() {
                        update.changed = true;
                    }
                    state.good = Some(good);
                }
                None => update.rejected.push(path),
            }
        }
        update
    }

    /// Whether the last update changed the current resources.
    pub fn changed(&self) -> bool {
        self.last.changed
    }

    /// What the last update did.
    pub fn last_update(&self) -> &Update {
        &self.last
    }

    /// Whether any update has read the config path successfully.
    pub fn loaded(&self) -> bool {
        self.loaded
    }

    /// The current resources: every file's last good content, files in path order,
    /// resources in file order.
    pub fn resources(&self) -> impl Iterator<Item = &Resource> {
        self.files
            .values()
            .filter_map(|s| s.good.as_ref())
            .flat_map(|g| g.resources.iter())
    }

    /// The latest findings of every file that has any, in path order.
    pub fn file_findings(&self) -> impl Iterator<Item = (&Path, &[Finding])> {
        self.files
            .iter()
            .filter(|(_, s)| !s.findings.is_empty())
            .map(|(p, s)| (p.as_path(), s.findings.as_slice()))
    }

    /// Why the last scan could not read the config path at all (code `UNREADABLE_PATH`);
    /// `None` once a scan succeeds again.
    pub fn path_error(&self) -> Option<&Finding> {
        self.scan_error.as_ref()
    }

    /// All current findings: the scan error, if the last scan failed, then every file's.
    pub fn findings(&self) -> impl Iterator<Item = &Finding> {
        self.scan_error
            .iter()
            .chain(self.files.values().flat_map(|s| s.findings.iter()))
    }

    /// Whether any current finding is an error.
    pub fn has_errors(&self) -> bool {
        self.findings().any(|f| f.severity == Severity::Error)
    }
}

/// An error reading a file (`READ`) or the whole config path (`UNREADABLE_PATH`).
fn read_finding(code: &'static str, path: &Path, message: &str) -> Finding {
    Finding {
        severity: Severity::Error,
        code,
        kind: String::new(),
        resource: String::new(),
        file: Arc::new(path.to_path_buf()),
        line: 1,
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// A scratch folder under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir()
                .join(format!("portcullis-model-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("create temp dir");
            TempDir(path)
        }

        fn write(&self, rel: &str, text: &str) -> PathBuf {
            let path = self.0.join(rel);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).expect("create parent");
            }
            fs::write(&path, text).expect("write file");
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn we(name: &str, address: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}}}\nspec: {{address: '{address}'}}\n"
        )
    }

    fn names(set: &ConfigSet) -> Vec<String> {
        set.resources().map(|r| r.meta().name.clone()).collect()
    }

    fn paths(scan: &Scan, root: &Path) -> Vec<String> {
        scan.iter()
            .map(|(p, _)| {
                p.strip_prefix(root)
                    .expect("under root")
                    .display()
                    .to_string()
            })
            .collect()
    }

    fn ok(path: &str, text: String) -> (PathBuf, io::Result<String>) {
        (PathBuf::from(path), Ok(text))
    }

    #[test]
    fn scan_single_file() {
        let dir = TempDir::new("single");
        let file = dir.write("one.yaml", "a: 1\n");
        let scan = scan(&file).expect("scan");
        assert_eq!(scan.len(), 1);
        assert_eq!(scan[0].0, file);
        assert_eq!(scan[0].1.as_deref().ok(), Some("a: 1\n"));
        // A single file is read whatever its name.
        let other = dir.write("config.txt", "b: 2\n");
        assert_eq!(super::scan(&other).expect("scan").len(), 1);
    }

    #[test]
    fn scan_folder_picks_config_files_sorted_and_recursive() {
        let dir = TempDir::new("folder");
        dir.write("b.yaml", "");
        dir.write("a.yml", "");
        dir.write("c.JSON", "");
        dir.write("sub/d.yaml", "");
        dir.write("notes.txt", "");
        dir.write(".hidden.yaml", "");
        dir.write(".git/config.yaml", "");
        dir.write("yaml", "");
        dir.write(".yaml", "");
        let scan = scan(&dir.0).expect("scan");
        assert_eq!(
            paths(&scan, &dir.0),
            ["a.yml", "b.yaml", "c.JSON", "sub/d.yaml"]
        );
    }

    #[test]
    fn scan_missing_path_is_an_error() {
        let dir = TempDir::new("missing");
        let err = scan(&dir.0.join("nope")).expect_err("missing path");
        assert_eq!(err.source.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("nope"));
    }

    #[test]
    fn scan_reads_config_map_mount_once_and_follows_swaps() {
        let dir = TempDir::new("configmap");
        dir.write("..2024_01_01_00_00_00.1/se.yaml", &we("first", "10.0.0.1"));
        dir.write("..2024_01_01_00_00_00.1/we.yaml", &we("second", "10.0.0.2"));
        symlink("..2024_01_01_00_00_00.1", dir.0.join("..data")).expect("symlink");
        symlink("..data/se.yaml", dir.0.join("se.yaml")).expect("symlink");
        symlink("..data/we.yaml", dir.0.join("we.yaml")).expect("symlink");

        let first = scan(&dir.0).expect("scan");
        assert_eq!(paths(&first, &dir.0), ["se.yaml", "we.yaml"]);
        let mut set = ConfigSet::new();
        assert!(set.update(Ok(first)).changed);
        assert_eq!(names(&set), ["first", "second"]);

        // Kubelet's swap: write a new timestamped folder, then atomically re-point `..data`.
        dir.write("..2024_01_02_00_00_00.2/se.yaml", &we("first", "10.0.0.9"));
        dir.write("..2024_01_02_00_00_00.2/we.yaml", &we("second", "10.0.0.2"));
        symlink("..2024_01_02_00_00_00.2", dir.0.join("..data_tmp")).expect("symlink");
        fs::rename(dir.0.join("..data_tmp"), dir.0.join("..data")).expect("rename");
        fs::remove_dir_all(dir.0.join("..2024_01_01_00_00_00.1")).expect("remove old");

        let update = set.update(scan(&dir.0));
        assert!(update.changed && update.rejected.is_empty());
        let Some(Resource::WorkloadEntry(o)) = set.resources().next() else {
            panic!("expected a WorkloadEntry");
        };
        assert_eq!(o.spec.address, "10.0.0.9");
        assert!(!set.update(scan(&dir.0)).changed, "nothing changed on disk");
    }

    #[test]
    fn scan_reports_dangling_symlinks_and_survives_loops() {
        let dir = TempDir::new("links");
        dir.write("real/a.yaml", "");
        symlink("gone.yaml", dir.0.join("dangling.yaml")).expect("symlink");
        symlink(".", dir.0.join("real/loop")).expect("symlink");
        symlink("real", dir.0.join("alias")).expect("symlink");
        let scan = scan(&dir.0).expect("scan");
        let listed = paths(&scan, &dir.0);
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert!(
            listed[0] == "alias/a.yaml" || listed[0] == "dangling.yaml",
            "{listed:?}"
        );
        assert!(listed.contains(&"dangling.yaml".to_string()), "{listed:?}");
        let dangling = scan.iter().find(|(p, _)| p.ends_with("dangling.yaml"));
        assert!(dangling.is_some_and(|(_, r)| r.is_err()));
    }

    #[test]
    fn first_update_is_a_change_even_when_empty() {
        let mut set = ConfigSet::new();
        assert!(!set.loaded());
        let update = set.update(Ok(Vec::new()));
        assert!(update.changed && set.changed() && set.loaded());
        assert!(!set.update(Ok(Vec::new())).changed);
        assert_eq!(set.resources().count(), 0);
    }

    #[test]
    fn broken_file_keeps_last_good_content_until_it_recovers() {
        let mut set = ConfigSet::new();
        let good = || {
            vec![
                ok("a.yaml", we("a", "10.0.0.1")),
                ok("b.yaml", we("b", "10.0.0.2")),
            ]
        };
        assert!(set.update(Ok(good())).changed);
        assert_eq!(names(&set), ["a", "b"]);
        assert!(!set.has_errors());

        // b.yaml gains an invalid resource next to a valid one: the whole file is rejected.
        let broken = format!("{}---\n{}", we("b", "10.0.0.3"), we("b2", "not an ip!"));
        let update = set.update(Ok(vec![
            ok("a.yaml", we("a", "10.0.0.1")),
            ok("b.yaml", broken.clone()),
        ]));
        assert!(!update.changed);
        assert!(update.findings_changed);
        assert_eq!(update.rejected, [PathBuf::from("b.yaml")]);
        assert_eq!(names(&set), ["a", "b"]);
        let Some(Resource::WorkloadEntry(b)) = set.resources().nth(1) else {
            panic!("b kept");
        };
        assert_eq!(b.spec.address, "10.0.0.2", "previous content kept");
        assert!(set.has_errors());
        let per_file: Vec<(&Path, usize)> =
            set.file_findings().map(|(p, f)| (p, f.len())).collect();
        assert_eq!(per_file, [(Path::new("b.yaml"), 1)]);
        assert_eq!(
            set.findings().next().map(|f| f.code),
            Some("INVALID_ADDRESS")
        );

        // The same broken content again: still rejected, nothing new.
        let update = set.update(Ok(vec![
            ok("a.yaml", we("a", "10.0.0.1")),
            ok("b.yaml", broken),
        ]));
        assert!(!update.changed && !update.findings_changed);
        assert_eq!(update.rejected, [PathBuf::from("b.yaml")]);

        // Fixed: replaced by the new content.
        let fixed = format!("{}---\n{}", we("b", "10.0.0.3"), we("b2", "10.0.0.4"));
        let update = set.update(Ok(vec![
            ok("a.yaml", we("a", "10.0.0.1")),
            ok("b.yaml", fixed),
        ]));
        assert!(update.changed && update.findings_changed && update.rejected.is_empty());
        assert_eq!(names(&set), ["a", "b", "b2"]);
        assert!(!set.has_errors());
        assert_eq!(set.findings().count(), 0);
    }

    #[test]
    fn warnings_do_not_reject_a_file() {
        let mut set = ConfigSet::new();
        let text = format!(
            "{}---\napiVersion: v9\nkind: Thing\nmetadata: {{name: x}}\n",
            we("a", "10.0.0.1")
        );
        let update = set.update(Ok(vec![ok("a.yaml", text)]));
        assert!(update.changed && update.rejected.is_empty());
        assert_eq!(names(&set), ["a"]);
        assert!(!set.has_errors());
        assert_eq!(
            set.findings().map(|f| f.code).collect::<Vec<_>>(),
            ["SKIPPED"]
        );
    }

    #[test]
    fn new_broken_file_contributes_nothing() {
        let mut set = ConfigSet::new();
        set.update(Ok(vec![ok("a.yaml", we("a", "10.0.0.1"))]));
        let update = set.update(Ok(vec![
            ok("a.yaml", we("a", "10.0.0.1")),
            ok("z.yaml", "kind: [".to_string()),
        ]));
        assert!(!update.changed);
        assert_eq!(update.rejected, [PathBuf::from("z.yaml")]);
        assert_eq!(names(&set), ["a"]);
        assert_eq!(set.findings().map(|f| f.code).collect::<Vec<_>>(), ["YAML"]);
    }

    #[test]
    fn removed_file_is_dropped() {
        let mut set = ConfigSet::new();
        set.update(Ok(vec![
            ok("a.yaml", we("a", "10.0.0.1")),
            ok("b.yaml", we("b", "10.0.0.2")),
        ]));
        let update = set.update(Ok(vec![ok("b.yaml", we("b", "10.0.0.2"))]));
        assert!(update.changed);
        assert_eq!(names(&set), ["b"]);
        // Removing a file that only ever failed changes findings, not resources.
        set.update(Ok(vec![
            ok("b.yaml", we("b", "10.0.0.2")),
            ok("c.yaml", "[".to_string()),
        ]));
        let update = set.update(Ok(vec![ok("b.yaml", we("b", "10.0.0.2"))]));
        assert!(!update.changed && update.findings_changed);
        assert!(!set.has_errors());
    }

    #[test]
    fn unreadable_file_keeps_its_content() {
        let mut set = ConfigSet::new();
        set.update(Ok(vec![ok("a.yaml", we("a", "10.0.0.1"))]));
        let denied = io::Error::new(io::ErrorKind::PermissionDenied, "denied");
        let update = set.update(Ok(vec![(PathBuf::from("a.yaml"), Err(denied))]));
        assert!(!update.changed);
        assert_eq!(update.rejected, [PathBuf::from("a.yaml")]);
        assert_eq!(names(&set), ["a"]);
        let finding = set.findings().next().expect("read error recorded");
        assert_eq!(
            (finding.code, finding.file.as_path()),
            ("READ", Path::new("a.yaml"))
        );
        assert_eq!(finding.to_string(), "Error [READ] (a.yaml:1) denied");
        // Readable again with the same text: parsed again and the error clears.
        let update = set.update(Ok(vec![ok("a.yaml", we("a", "10.0.0.1"))]));
        assert!(!update.changed && update.findings_changed && update.rejected.is_empty());
        assert!(!set.has_errors());
    }

    #[test]
    fn unreadable_config_path_keeps_everything() {
        let mut set = ConfigSet::new();
        set.update(Ok(vec![ok("a.yaml", we("a", "10.0.0.1"))]));
        let gone = ScanError {
            path: PathBuf::from("/etc/portcullis"),
            source: io::Error::new(io::ErrorKind::NotFound, "gone"),
        };
        let update = set.update(Err(gone));
        assert!(!update.changed && update.findings_changed);
        assert_eq!(names(&set), ["a"]);
        assert_eq!(
            set.findings().map(|f| f.code).collect::<Vec<_>>(),
            ["UNREADABLE_PATH"]
        );
        assert_eq!(
            set.path_error().map(ToString::to_string).as_deref(),
            Some("Error [UNREADABLE_PATH] (/etc/portcullis:1) cannot read /etc/portcullis: gone")
        );
        // Back again: the scan error clears, nothing else changed.
        let update = set.update(Ok(vec![ok("a.yaml", we("a", "10.0.0.1"))]));
        assert!(!update.changed && update.findings_changed);
        assert!(!set.has_errors() && set.path_error().is_none());
    }

    #[test]
    fn first_scan_failing_is_not_loaded() {
        let mut set = ConfigSet::new();
        let gone = ScanError {
            path: PathBuf::from("/nope"),
            source: io::Error::new(io::ErrorKind::NotFound, "gone"),
        };
        assert!(!set.update(Err(gone)).changed);
        assert!(!set.loaded());
        assert!(set.has_errors());
    }

    #[test]
    fn resources_are_in_path_then_file_order() {
        let mut set = ConfigSet::new();
        let two = format!("{}---\n{}", we("z", "10.0.0.1"), we("y", "10.0.0.2"));
        set.update(Ok(vec![
            ok("b.yaml", we("x", "10.0.0.3")),
            ok("a.yaml", two),
        ]));
        assert_eq!(names(&set), ["z", "y", "x"]);
    }
}
