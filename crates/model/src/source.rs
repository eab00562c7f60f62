//! Reading configuration from disk, and keeping the last good content of every file.
//!
//! [`scan`] lists the config files; [`ConfigSet`] reads each a line at a time when it
//! looks at it, or takes its text from memory ([`Content::Text`]) so that reload semantics
//! can be tested without files.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::load::{duplicate, identity, load_lines};
use crate::{FileLoad, Finding, Position, Resource, Severity};

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

/// The files of one scan, each with where its content is or the error finding it.
pub type Scan = Vec<(PathBuf, io::Result<Content>)>;

/// Where a scanned file's content is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// In the file at the scanned path, read when needed. Never read whole: an unchanged
    /// file is only hashed, and a changed one parsed a document at a time, so a large
    /// registry is not held in memory a second time as text.
    Disk,
    /// This text.
    Text(String),
}

impl Content {
    fn reader<'a>(&'a self, path: &Path) -> io::Result<Box<dyn BufRead + 'a>> {
        Ok(match self {
            Content::Disk => Box::new(BufReader::new(File::open(path)?)),
            Content::Text(text) => Box::new(text.as_bytes()),
        })
    }
}

/// File name endings that are read as configuration.
const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// Lists the config at `path`: the file itself, or every `*.yaml`, `*.yml` and `*.json`
/// file under the folder, recursively, sorted by path.
///
/// Names starting with `.` are skipped. That covers hidden files and, importantly, the
/// `..data` and `..2024_…` folders of a Kubernetes ConfigMap mount, whose files are also
/// reachable through the top-level `x.yaml -> ..data/x.yaml` symlinks; those symlinks are
/// followed, so each file is listed exactly once. Symlinked folders are followed too, each
/// real folder at most once, so that a symlink loop cannot make the scan run forever.
pub fn scan(path: &Path) -> Result<Scan, ScanError> {
    let fail = |source| ScanError {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(fail)?;
    if !meta.is_dir() {
        return Ok(vec![(path.to_path_buf(), Ok(Content::Disk))]);
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
            Ok(_) if is_config_name(&name) => files.push((path, Ok(Content::Disk))),
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

#[derive(Debug, Clone, Default)]
struct FileState {
    /// Digest of the text last seen, so that an unchanged file is not parsed again. A
    /// digest rather than the text: a sidecar would otherwise hold its whole registry twice.
    digest: Option<u64>,
    /// How many of [`ConfigSet::resources`], from where the files before it end, come from
    /// this file's last content that loaded without errors.
    contributes: usize,
    /// Findings of the latest attempt (the read error, or the load's findings).
    findings: Vec<Finding>,
}

/// What a file's resources become in an update, in path order.
enum Step {
    /// The next `n` current resources stay.
    Keep(usize),
    /// The next `n` current resources go.
    Drop(usize),
    /// These join.
    Add(Vec<Resource>),
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
    /// Every file's contribution, files in path order: one slice that the registry compiles
    /// as it is, without a copy.
    resources: Vec<Resource>,
    /// Keys the file digests; random so that no one can write a file that collides.
    hasher: RandomState,
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

    fn apply(&mut self, mut files: Scan) -> Update {
        let mut update = Update {
            changed: !self.loaded,
            findings_changed: self.scan_error.take().is_some(),
            rejected: Vec::new(),
        };
        self.loaded = true;
        // Walked in step with the current files, which are in path order; a path listed
        // twice is looked at once.
        files.sort_by(|a, b| a.0.cmp(&b.0));
        files.dedup_by(|later, first| later.0 == first.0);
        // Files this scan no longer lists: their resources go in this update, so they
        // do not make a file that now defines the same (one renamed, say) a duplicate.
        let gone_paths: HashSet<PathBuf> = self
            .files
            .keys()
            .filter(|p| files.binary_search_by(|(f, _)| f.cmp(p)).is_err())
            .cloned()
            .collect();
        let mut old = std::mem::take(&mut self.files).into_iter().peekable();
        let mut steps = Vec::new();
        // Where the file being looked at starts in `self.resources`.
        let mut offset = 0;
        // Who defines each resource, built once a file brings new content to check.
        let mut index = None;
        for (path, content) in files {
            while let Some((_, state)) = old.next_if(|(p, _)| *p < path) {
                steps.push(gone(state, &mut offset, &mut update));
            }
            let mut state = old
                .next_if(|(p, _)| *p == path)
                .map(|(_, state)| state)
                .unwrap_or_default();
            let before = &self.resources[offset..offset + state.contributes];
            offset += state.contributes;
            let read = content.and_then(|content| self.read(&path, &content, state.digest));
            let (findings, new_good, digest) = match read {
                Ok(Some((mut load, digest))) if !load.has_errors() => {
                    let index =
                        index.get_or_insert_with(|| identities(&self.resources, &gone_paths));
                    let repeated = repeats(&load.resources, &path, index);
                    if repeated.is_empty() {
                        for r in &load.resources {
                            let (kind, namespace, name) = identity(r);
                            index.insert(
                                (kind, namespace.to_string(), name.to_string()),
                                (Arc::clone(&r.origin().file), r.origin().name),
                            );
                        }
                        (load.findings, Some(load.resources), Some(digest))
                    } else {
                        load.findings.extend(repeated);
                        load.findings.sort_by_key(|f| f.line);
                        // Not remembered as seen: the other file may drop its copy, and then
                        // this one must be read again to take over.
                        (load.findings, None, None)
                    }
                }
                Ok(None) => {
                    if state.findings.iter().any(|f| f.severity == Severity::Error) {
                        update.rejected.push(path.clone());
                    }
                    steps.push(Step::Keep(state.contributes));
                    self.files.insert(path, state);
                    continue;
                }
                Ok(Some((load, digest))) => {
                    let good = (!load.has_errors()).then_some(load.resources);
                    (load.findings, good, Some(digest))
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
            // A failed read forgets the digest so that the same content is parsed again
            // once the file is readable.
            state.digest = digest;
            match new_good {
                Some(good) => {
                    update.changed |= before != good.as_slice();
                    steps.push(Step::Drop(state.contributes));
                    state.contributes = good.len();
                    steps.push(Step::Add(good));
                }
                None => {
                    update.rejected.push(path.clone());
                    steps.push(Step::Keep(state.contributes));
                }
            }
            self.files.insert(path, state);
        }
        for (_, state) in old {
            steps.push(gone(state, &mut offset, &mut update));
        }
        apply_steps(&mut self.resources, steps);
        update
    }

    /// Loads the file unless its content hashes to `seen`, the digest of what it was last
    /// loaded from: `None` when unchanged, else the load and the digest of the text loaded.
    fn read(
        &self,
        path: &Path,
        content: &Content,
        seen: Option<u64>,
    ) -> io::Result<Option<(FileLoad, u64)>> {
        if seen.is_some() {
            let mut reader = content.reader(path)?;
            let mut digest = self.hasher.build_hasher();
            let mut line = Vec::new();
            // A line at a time, as `load_lines` feeds the digest: the same text hashes the
            // same whatever the reads return.
            while reader.read_until(b'\n', &mut line)? > 0 {
                digest.write(&line);
                line.clear();
            }
            if seen == Some(digest.finish()) {
                return Ok(None);
            }
        }
        // The file may change between the two reads: what is kept is the digest of the
        // text actually loaded, so a later change is still seen as one.
        let mut digest = self.hasher.build_hasher();
        let load = load_lines(
            content.reader(path)?,
            &Arc::new(path.to_path_buf()),
            &mut digest,
        )?;
        Ok(Some((load, digest.finish())))
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
    pub fn resources(&self) -> &[Resource] {
        &self.resources
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

/// A resource's identity, owned.
type Identity = (&'static str, String, String);

/// Where each of `resources` is defined, by identity, but for those of the files `gone`.
fn identities(
    resources: &[Resource],
    gone: &HashSet<PathBuf>,
) -> HashMap<Identity, (Arc<PathBuf>, Position)> {
    resources
        .iter()
        .filter(|r| !gone.contains(r.origin().file.as_path()))
        .map(|r| {
            let (kind, namespace, name) = identity(r);
            let origin = r.origin();
            (
                (kind, namespace.to_string(), name.to_string()),
                (Arc::clone(&origin.file), origin.name),
            )
        })
        .collect()
}

/// An error for each of `resources`, new content of `path`, that another file defines
/// already: the resource that serves keeps serving, and the newcomer's file is rejected.
fn repeats(
    resources: &[Resource],
    path: &Path,
    index: &HashMap<Identity, (Arc<PathBuf>, Position)>,
) -> Vec<Finding> {
    resources
        .iter()
        .filter_map(|r| {
            let (kind, namespace, name) = identity(r);
            let (file, at) = index.get(&(kind, namespace.to_string(), name.to_string()))?;
            (file.as_path() != path).then(|| duplicate(r, file, *at))
        })
        .collect()
}

/// The step for a file gone from the scan, whose resources start at `offset`.
fn gone(state: FileState, offset: &mut usize, update: &mut Update) -> Step {
    update.changed |= state.contributes > 0;
    update.findings_changed |= !state.findings.is_empty();
    *offset += state.contributes;
    Step::Drop(state.contributes)
}

/// Applies `steps`, which walk `resources` from its start to its end, in place: the list
/// of a large registry is not copied for a change to another file, nor freed and
/// allocated again.
fn apply_steps(resources: &mut Vec<Resource>, steps: Vec<Step>) {
    let mut at = 0;
    for step in steps {
        match step {
            Step::Keep(n) => at += n,
            Step::Drop(n) => {
                resources.drain(at..at + n);
            }
            // Into an empty set (the first load) the file's list goes as it is, uncopied.
            Step::Add(new) if resources.is_empty() => {
                at = new.len();
                *resources = new;
            }
            Step::Add(new) => {
                let n = new.len();
                resources.splice(at..at, new);
                at += n;
            }
        }
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
        column: None,
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
        set.resources()
            .iter()
            .map(|r| r.meta().name.clone())
            .collect()
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

    fn ok(path: &str, text: String) -> (PathBuf, io::Result<Content>) {
        (PathBuf::from(path), Ok(Content::Text(text)))
    }

    #[test]
    fn scan_single_file() {
        let dir = TempDir::new("single");
        let file = dir.write("one.yaml", "a: 1\n");
        let scan = scan(&file).expect("scan");
        assert_eq!(scan.len(), 1);
        assert_eq!(scan[0].0, file);
        assert_eq!(scan[0].1.as_ref().ok(), Some(&Content::Disk));
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
        let Some(Resource::WorkloadEntry(o)) = set.resources().first() else {
            panic!("expected a WorkloadEntry");
        };
        assert_eq!(o.spec.spec.address, "10.0.0.9");
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
    fn unchanged_text_is_unchanged_however_it_is_read() {
        let dir = TempDir::new("digest");
        // Larger than a read buffer, so that the file arrives in several reads.
        let text: String = (0..200)
            .map(|i| format!("---\n{}", we(&format!("w{i}"), "10.0.0.1")))
            .collect();
        let file = dir.write("a.yaml", &text);
        let mut set = ConfigSet::new();
        assert!(
            set.update(Ok(vec![(file, Ok(Content::Text(text)))]))
                .changed
        );
        assert_eq!(set.resources().len(), 200);
        let update = set.update(scan(&dir.0));
        assert!(!update.changed && !update.findings_changed);
        dir.write("a.yaml", &we("w0", "10.0.0.9"));
        assert!(set.update(scan(&dir.0)).changed);
        assert_eq!(names(&set), ["w0"]);
    }

    #[test]
    fn invalid_utf8_on_disk_is_a_read_error() {
        let dir = TempDir::new("utf8");
        let file = dir.write("a.yaml", &we("a", "10.0.0.1"));
        let mut set = ConfigSet::new();
        set.update(scan(&dir.0));
        fs::write(&file, b"kind: \xff\n").expect("write");
        let update = set.update(scan(&dir.0));
        assert_eq!(update.rejected, [file]);
        assert_eq!(names(&set), ["a"]);
        assert_eq!(set.findings().map(|f| f.code).collect::<Vec<_>>(), ["READ"]);
    }

    #[test]
    fn files_that_change_come_and_go_keep_path_order() {
        let two = |a: &str, b: &str| format!("{}---\n{}", we(a, "10.0.0.1"), we(b, "10.0.0.2"));
        let mut set = ConfigSet::new();
        set.update(Ok(vec![
            ok("a.yaml", we("a", "10.0.0.1")),
            ok("b.yaml", two("b1", "b2")),
            ok("c.yaml", we("c", "10.0.0.3")),
        ]));
        assert_eq!(names(&set), ["a", "b1", "b2", "c"]);
        let update = set.update(Ok(vec![
            ok("b.yaml", we("b3", "10.0.0.1")),
            ok("c.yaml", we("c", "10.0.0.3")),
            ok("d.yaml", two("d1", "d2")),
        ]));
        assert!(update.changed);
        assert_eq!(names(&set), ["b3", "c", "d1", "d2"]);
        let update = set.update(Ok(vec![
            ok("0.yaml", we("z", "10.0.0.1")),
            ok("c.yaml", we("c", "10.0.0.3")),
        ]));
        assert!(update.changed);
        assert_eq!(names(&set), ["z", "c"]);
        assert!(set.update(Ok(Vec::new())).changed);
        assert!(set.resources().is_empty());
    }

    #[test]
    fn first_update_is_a_change_even_when_empty() {
        let mut set = ConfigSet::new();
        assert!(!set.loaded());
        let update = set.update(Ok(Vec::new()));
        assert!(update.changed && set.changed() && set.loaded());
        assert!(!set.update(Ok(Vec::new())).changed);
        assert!(set.resources().is_empty());
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
        let Some(Resource::WorkloadEntry(b)) = set.resources().get(1) else {
            panic!("b kept");
        };
        assert_eq!(b.spec.spec.address, "10.0.0.2", "previous content kept");
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
    fn a_resource_defined_in_two_files_is_kept_where_it_serves() {
        let mut set = ConfigSet::new();
        // On a first load the later file in path order is the one in error.
        let update = set.update(Ok(vec![
            ok("a.yaml", we("w", "10.0.0.1")),
            ok(
                "b.yaml",
                format!("{}---\n{}", we("x", "10.0.0.3"), we("w", "10.0.0.2")),
            ),
        ]));
        assert_eq!(update.rejected, [PathBuf::from("b.yaml")]);
        assert_eq!(names(&set), ["w"]);
        let shown: Vec<String> = set.findings().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "Error [DUPLICATE] (WorkloadEntry default/w b.yaml:8:18) WorkloadEntry default/w is already defined at a.yaml:3:18"
            ]
        );

        // The copy that serves wins even when the newcomer sorts first.
        let mut set = ConfigSet::new();
        set.update(Ok(vec![ok("b.yaml", we("w", "10.0.0.2"))]));
        let update = set.update(Ok(vec![
            ok("a.yaml", we("w", "10.0.0.1")),
            ok("b.yaml", we("w", "10.0.0.2")),
        ]));
        assert!(!update.changed);
        assert_eq!(update.rejected, [PathBuf::from("a.yaml")]);
        let Some(Resource::WorkloadEntry(w)) = set.resources().first() else {
            panic!("w kept");
        };
        assert_eq!(w.spec.spec.address, "10.0.0.2");
        assert_eq!(
            set.findings()
                .map(|f| f.message.as_str())
                .collect::<Vec<_>>(),
            ["WorkloadEntry default/w is already defined at b.yaml:3:18"]
        );

        // Once the serving copy is gone, the rejected file is read again and takes over.
        let update = set.update(Ok(vec![
            ok("a.yaml", we("w", "10.0.0.1")),
            ok("b.yaml", we("other", "10.0.0.2")),
        ]));
        assert!(update.changed);
        assert_eq!(names(&set), ["other"]);
        let update = set.update(Ok(vec![
            ok("a.yaml", we("w", "10.0.0.1")),
            ok("b.yaml", we("other", "10.0.0.2")),
        ]));
        assert!(update.changed && update.rejected.is_empty());
        assert_eq!(names(&set), ["w", "other"]);
        assert!(!set.has_errors());
    }

    /// Each resource's name and the file it was parsed from, as that file's own `Arc`: the
    /// same `Arc` after an update means the file was not parsed again.
    fn origins(set: &ConfigSet) -> Vec<(String, Arc<PathBuf>)> {
        set.resources()
            .iter()
            .map(|r| (r.meta().name.clone(), Arc::clone(&r.origin().file)))
            .collect()
    }

    #[test]
    fn only_changed_files_are_parsed_again() {
        let dir = TempDir::new("cache");
        dir.write("a.yaml", &we("a", "10.0.0.1"));
        dir.write("b.yaml", &we("b", "10.0.0.2"));
        let mut set = ConfigSet::new();
        set.update(scan(&dir.0));
        let first = origins(&set);

        // Unchanged: nothing is parsed, the resources stay as they were.
        let update = set.update(scan(&dir.0));
        assert!(!update.changed && !update.findings_changed);
        assert!(Arc::ptr_eq(&first[0].1, &origins(&set)[0].1));
        assert!(Arc::ptr_eq(&first[1].1, &origins(&set)[1].1));

        // Changed: only that file is parsed.
        dir.write("b.yaml", &we("b2", "10.0.0.2"));
        assert!(set.update(scan(&dir.0)).changed);
        let changed = origins(&set);
        assert_eq!(names(&set), ["a", "b2"]);
        assert!(Arc::ptr_eq(&first[0].1, &changed[0].1));
        assert!(!Arc::ptr_eq(&first[1].1, &changed[1].1));

        // Added: only the new file is parsed.
        dir.write("c.yaml", &we("c", "10.0.0.3"));
        assert!(set.update(scan(&dir.0)).changed);
        let added = origins(&set);
        assert_eq!(names(&set), ["a", "b2", "c"]);
        assert!(Arc::ptr_eq(&changed[0].1, &added[0].1));
        assert!(Arc::ptr_eq(&changed[1].1, &added[1].1));

        // Removed: its resources go, the others stay unparsed.
        fs::remove_file(dir.0.join("a.yaml")).expect("remove");
        assert!(set.update(scan(&dir.0)).changed);
        assert_eq!(names(&set), ["b2", "c"]);
        assert!(Arc::ptr_eq(&added[1].1, &origins(&set)[0].1));
        assert!(Arc::ptr_eq(&added[2].1, &origins(&set)[1].1));
    }

    #[test]
    fn a_renamed_file_serves_on_under_its_new_name() {
        let dir = TempDir::new("rename");
        dir.write("b.yaml", &we("b", "10.0.0.2"));
        dir.write("m.yaml", &we("m", "10.0.0.3"));
        let mut set = ConfigSet::new();
        set.update(scan(&dir.0));
        // Renamed to sort after its old name, then before it.
        for (from, to) in [("b.yaml", "x.yaml"), ("x.yaml", "a.yaml")] {
            fs::rename(dir.0.join(from), dir.0.join(to)).expect("rename");
            let update = set.update(scan(&dir.0));
            assert!(update.rejected.is_empty(), "{to}: {:?}", update.rejected);
            assert_eq!(set.findings().count(), 0, "{to}");
            let served: Vec<(String, PathBuf)> = origins(&set)
                .into_iter()
                .map(|(n, f)| (n, f.strip_prefix(&dir.0).expect("under").to_path_buf()))
                .collect();
            let mut want = vec![
                ("b".to_string(), PathBuf::from(to)),
                ("m".to_string(), PathBuf::from("m.yaml")),
            ];
            want.sort_by(|x, y| x.1.cmp(&y.1));
            assert_eq!(served, want);
        }
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
