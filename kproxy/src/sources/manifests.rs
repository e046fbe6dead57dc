//! Manifest files: `v1/Service` and `discovery.k8s.io/v1/EndpointSlice` objects from a YAML file
//! or a directory of them (multi-document YAML, and `kind: List` as `kubectl get -o yaml`
//! prints it), watched for changes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use notify::{RecursiveMode, Watcher as _};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    model::{InvalidCode, InvalidObject},
    tracker::{ModelStore, ObjectKey},
};

/// Where an object came from: file, document index, and list item if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    /// Index in `items` when the document is a `kind: List`.
    pub item: Option<usize>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.file.display(), self.document)?;
        if let Some(item) = self.item {
            write!(f, " items[{item}]")?;
        }
        Ok(())
    }
}

/// A document or file that could not be read into an object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ManifestError {
    pub origin: String,
    pub message: String,
}

/// Everything read from the manifest path.
#[derive(Debug, Default)]
pub struct Manifests {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub errors: Vec<ManifestError>,
    /// Objects of other kinds (Deployments and the like), which are not kproxy's business.
    pub other_kinds: usize,
}

/// Reads every `.yaml`/`.yml`/`.json` file at `path` (a file, or a directory read recursively in
/// name order), one [`Manifests`] per file. Never fails as a whole: an unreadable file or a bad
/// document is an error entry of its file, and every other object is still returned. (The
/// agent reads through [`ManifestSource`], which re-reads only changed files.)
#[cfg(test)]
pub fn read_files(path: &Path) -> Vec<(PathBuf, Manifests)> {
    let mut files = Vec::new();
    let mut out = Vec::new();
    if let Err(e) = collect_files(path, &mut files) {
        let errors = vec![ManifestError { origin: path.display().to_string(), message: e.to_string() }];
        out.push((path.to_path_buf(), Manifests { errors, ..Default::default() }));
    }
    out.extend(files.into_iter().map(|file| {
        let m = read_file(&file);
        (file, m)
    }));
    out
}

fn collect_files(path: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if !path.is_dir() {
        // Reading a missing file reports the error with its name.
        files.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(path)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    entries.sort();
    for entry in entries {
        let hidden = entry.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if entry.is_dir() {
            collect_files(&entry, files)?;
        } else if is_manifest_file(&entry) {
            files.push(entry);
        }
    }
    Ok(())
}

/// The YAML parser's limits, raised from its defaults (1,024 documents, 250,000 nodes) so that
/// a whole cluster's `kubectl get -o yaml` (tens of thousands of objects) fits; the input size
/// stays capped by the parser's own 256 MiB limit.
fn parser_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_documents = 1_000_000;
    budget.max_nodes = 100_000_000;
    budget.max_events = 400_000_000;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// Parses the documents of one file into `out`: a `.json` file holds JSON objects (one, as
/// `kubectl get -o json` prints, or several in a row), read by the JSON parser, which is some
/// 20 times faster than the YAML one; any other file is YAML (of which JSON is a subset).
pub fn parse_into(file: &Path, text: &str, out: &mut Manifests) {
    let json = file.extension().is_some_and(|e| e == "json");
    let parsed = if json {
        serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .collect::<Result<Vec<Value>, _>>()
            .map_err(|e| format!("invalid JSON: {e}"))
    } else {
        serde_saphyr::from_multiple_with_options(text, parser_options()).map_err(|e| format!("invalid YAML: {e}"))
    };
    let documents = match parsed {
        Ok(docs) => docs,
        Err(message) => {
            out.errors.push(ManifestError { origin: file.display().to_string(), message });
            return;
        }
    };
    for (i, doc) in documents.into_iter().enumerate() {
        let origin = Origin { file: file.to_path_buf(), document: i + 1, item: None };
        add_object(doc, origin, out);
    }
}

fn add_object(doc: Value, origin: Origin, out: &mut Manifests) {
    if doc.is_null() {
        return; // an empty document, e.g. after a trailing `---`
    }
    let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
    let error = |message: String| ManifestError { origin: origin.to_string(), message };
    match (api_version, kind) {
        ("", _) | (_, "") => out.errors.push(error("missing apiVersion or kind".into())),
        ("v1", "List") => {
            let Some(Value::Array(items)) = doc.get("items") else {
                out.errors.push(error("items: missing or not a list".into()));
                return;
            };
            for (j, item) in items.iter().enumerate() {
                if origin.item.is_some() {
                    out.errors.push(error("nested List is not supported".into()));
                    return;
                }
                let origin = Origin { item: Some(j), ..origin.clone() };
                add_object(item.clone(), origin, out);
            }
        }
        ("v1", "Service") => match typed::<Service>(doc) {
            Ok(svc) => out.services.push(svc),
            Err(e) => out.errors.push(error(format!("Service {e}"))),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => match typed::<EndpointSlice>(doc) {
            Ok(slice) => out.slices.push(slice),
            Err(e) => out.errors.push(error(format!("EndpointSlice {e}"))),
        },
        _ => out.other_kinds += 1,
    }
}

/// Deserializes with the path of the failing field in the error (`spec.ports[0].port: invalid
/// type: string "http", expected i32`).
fn typed<T: DeserializeOwned>(doc: Value) -> Result<T, String> {
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| "<unnamed>".into());
    serde_path_to_error::deserialize::<_, T>(doc).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { format!("{path}: ") };
        format!("{name}: {field}{}", e.inner())
    })
}

/// Parses YAML that must be free of errors into its Services and EndpointSlices (tests).
#[cfg(test)]
pub fn parse_objects(yaml: &str) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut m = Manifests::default();
    parse_into(Path::new("test.yaml"), yaml, &mut m);
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    (m.services, m.slices)
}

/// What one manifest file defines, as last served: the keys of its objects in document order
/// (the objects themselves live in the [`ModelStore`] only), its problems, and its identity on
/// disk for the periodic check.
#[derive(Debug, Default)]
struct FileState {
    services: Vec<ObjectKey>,
    slices: Vec<ObjectKey>,
    problems: Vec<String>,
    stamp: Option<Stamp>,
}

/// Size, modification and change times, inode: a file whose stamp is unchanged was not written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    dev: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        ino: m.ino(),
        dev: m.dev(),
    })
}

/// Services and EndpointSlices are separate key spaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Service,
    EndpointSlice,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }
}

/// One place an object is defined: file, then index among the file's objects of its kind. The
/// smallest one is the copy in force, as in a read of the files in order.
type Def = (Arc<Path>, usize);

/// `(namespace, name)` as the tracker keys objects.
fn key_of(meta: &ObjectMeta) -> ObjectKey {
    (meta.namespace.clone().unwrap_or_else(|| "default".into()), meta.name.clone().unwrap_or_default())
}

/// Paths the watcher saw change since the last read.
#[derive(Debug, Default)]
struct Dirty {
    /// Walk everything (first read, watcher errors and overflows).
    rescan: bool,
    paths: BTreeSet<PathBuf>,
}

/// The manifest source, incremental: the watcher records which paths changed, and a read
/// re-parses only those files and applies the objects they define now to the [`ModelStore`]
/// (deleting those they no longer define). A file that fails to parse keeps serving the objects
/// of its last good version, so a half-saved edit never takes services down. When an object is
/// defined twice, the first copy in file order is used and the others are reported, as in a
/// read of all files in order.
///
/// The parsed objects are not kept: the store holds what is served, and the source only the
/// keys each file defines, so memory does not hold the manifests twice.
pub struct ManifestSource {
    path: PathBuf,
    files: BTreeMap<Arc<Path>, FileState>,
    defs: HashMap<(Kind, ObjectKey), Vec<Def>>,
    /// Keys defined more than once.
    duplicated: BTreeSet<(Kind, ObjectKey)>,
    /// Problems of the last directory walk.
    walk_problems: Vec<String>,
    dirty: Arc<Mutex<Dirty>>,
}

/// What one [`ManifestSource::update`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UpdateStats {
    /// Files parsed (changed ones, plus files holding the copy of an object that now takes over).
    pub parsed: usize,
    pub applied: usize,
    pub deleted: usize,
}

impl ManifestSource {
    pub fn new(path: PathBuf) -> Self {
        let dirty = Dirty { rescan: true, paths: BTreeSet::new() };
        Self {
            path,
            files: BTreeMap::new(),
            defs: HashMap::new(),
            duplicated: BTreeSet::new(),
            walk_problems: Vec::new(),
            dirty: Arc::new(Mutex::new(dirty)),
        }
    }

    /// Records that `path` (a file or directory at or below the manifest path) changed; the
    /// next [`Self::update`] re-reads it. The watcher calls this.
    pub fn mark_changed(&self, path: &Path) {
        mark(&self.dirty, &self.path, path);
    }

    /// Watches the manifest path: every change is recorded for the next update, then `changed`
    /// is notified.
    pub fn watch(&self, changed: Arc<tokio::sync::Notify>) -> notify::Result<ManifestWatcher> {
        ManifestWatcher::new(&self.path, self.dirty.clone(), changed)
    }

    /// Brings `store` up to date with the files changed since the last update (every file the
    /// first time). With `full`, also re-reads every file whose size, times or inode changed
    /// (a check that costs a `stat` per file, for changes the watcher missed). `Err` when the
    /// path itself is gone: an unreadable path must not look like "no services", so nothing
    /// changes then.
    pub fn update(&mut self, store: &mut ModelStore, full: bool) -> Result<UpdateStats, String> {
        if !self.path.exists() {
            // Everything is read again once it is back.
            self.dirty.lock().unwrap_or_else(|e| e.into_inner()).rescan = true;
            return Err(format!("{}: no such file or directory; keeping the programmed services", self.path.display()));
        }
        let mut stats = UpdateStats::default();
        let mut parsed: HashSet<Arc<Path>> = HashSet::new();
        // Keys a file stopped defining (or defines at another place), with the copy that was in
        // force before this update.
        let mut affected: BTreeMap<(Kind, ObjectKey), Option<Def>> = BTreeMap::new();
        // In file order: when a file is read, every file before it is final, so the copy in
        // force of each key the file defines is known, and the file's objects are applied and
        // dropped before the next file is read.
        let changed: Vec<PathBuf> = self.take_changed(full).into_iter().collect();
        let read = changed.chunks(PARSE_BATCH).flat_map(|batch| batch.iter().zip(read_files_parallel(batch)));
        for (file, (st, now)) in read {
            let file: Arc<Path> = Arc::from(file.as_path());
            stats.parsed += usize::from(now.is_some());
            if let (Some(m), Some(old)) = (&now, self.files.get_mut(&file)) {
                if !m.errors.is_empty() {
                    // Keep serving the last good version: its objects stay in the store.
                    old.problems = m.errors.iter().map(ToString::to_string).collect();
                    old.problems.push(format!("{}: has errors; serving its last good version", file.display()));
                    old.stamp = st;
                    continue;
                }
            }
            let old = match &now {
                Some(m) => {
                    let state = FileState {
                        services: m.services.iter().map(|s| key_of(&s.metadata)).collect(),
                        slices: m.slices.iter().map(|s| key_of(&s.metadata)).collect(),
                        problems: m.errors.iter().map(ToString::to_string).collect(),
                        stamp: st,
                    };
                    self.files.insert(file.clone(), state)
                }
                None => self.files.remove(&file),
            };
            for (kind, keys) in old.iter().flat_map(|o| [(Kind::Service, &o.services), (Kind::EndpointSlice, &o.slices)]) {
                for key in keys {
                    let k = (kind, key.clone());
                    let defs = self.defs.entry(k.clone()).or_default();
                    affected.entry(k).or_insert_with(|| defs.first().cloned());
                    defs.retain(|(f, _)| *f != file);
                }
            }
            let Some(m) = now else { continue };
            parsed.insert(file.clone());
            let new = &self.files[&file];
            for (kind, keys) in [(Kind::Service, &new.services), (Kind::EndpointSlice, &new.slices)] {
                for (i, key) in keys.iter().enumerate() {
                    let k = (kind, key.clone());
                    let defs = self.defs.entry(k.clone()).or_default();
                    let def = (file.clone(), i);
                    let at = defs.partition_point(|d| *d < def);
                    defs.insert(at, def);
                    if at == 0 {
                        stats.applied += usize::from(apply(store, &m, kind, i));
                    }
                    if defs.len() > 1 {
                        self.duplicated.insert(k);
                    } else {
                        self.duplicated.remove(&k);
                    }
                }
            }
        }

        // Keys a file let go of: deleted if no file defines them now; if the copy now in force
        // is in a file not read in this update, it is read from there.
        let mut pull: BTreeMap<Arc<Path>, Vec<(Kind, ObjectKey, usize)>> = BTreeMap::new();
        for (k, before) in affected {
            let winner = self.defs.get(&k).and_then(|d| d.first().cloned());
            if self.defs.get(&k).is_some_and(|d| d.len() > 1) {
                self.duplicated.insert(k.clone());
            } else {
                self.duplicated.remove(&k);
            }
            let (kind, key) = k;
            match winner {
                None => {
                    self.defs.remove(&(kind, key.clone()));
                    match kind {
                        Kind::Service => store.delete_service(&key.0, &key.1),
                        Kind::EndpointSlice => store.delete_slice(&key.0, &key.1),
                    }
                    stats.deleted += 1;
                }
                Some((file, _)) if parsed.contains(&file) => {} // applied when it was read
                Some(w) if before.as_ref() == Some(&w) => {}      // the copy in force is unchanged
                Some((file, index)) => pull.entry(file).or_default().push((kind, key, index)),
            }
        }
        for (file, wanted) in pull {
            let m = read_file(&file);
            stats.parsed += 1;
            for (kind, key, index) in wanted {
                // Only if the file still says what it said when it was last read.
                let same = match kind {
                    Kind::Service => m.services.get(index).map(|s| key_of(&s.metadata)),
                    Kind::EndpointSlice => m.slices.get(index).map(|s| key_of(&s.metadata)),
                };
                if same.as_ref() == Some(&key) {
                    stats.applied += usize::from(apply(store, &m, kind, index));
                }
            }
        }
        Ok(stats)
    }

    /// Problems of the files (each naming file and document, and what was done about it).
    pub fn problems(&self) -> impl Iterator<Item = &String> {
        self.walk_problems.iter().chain(self.files.values().flat_map(|f| &f.problems))
    }

    /// The second (and later) copies of objects defined more than once, as the tracker reports
    /// duplicates in a complete set.
    pub fn duplicates(&self) -> Vec<InvalidObject> {
        let mut out = Vec::new();
        for (kind, key) in &self.duplicated {
            let copies = self.defs.get(&(*kind, key.clone())).map_or(0, Vec::len);
            for _ in 1..copies {
                out.push(InvalidObject {
                    kind: kind.name(),
                    object: format!("{}/{}", key.0, key.1),
                    field: "metadata.name".into(),
                    reason: "duplicate object; the first one is used".into(),
                    code: InvalidCode::DuplicateObject,
                });
            }
        }
        out
    }

    /// The files to read now: every changed file the watcher named; below a changed directory
    /// (and below the manifest path on a rescan or with `full`), every file that is new or
    /// whose stamp changed; and every known file that is gone.
    fn take_changed(&mut self, full: bool) -> BTreeSet<PathBuf> {
        let Dirty { rescan, paths } = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out = BTreeSet::new();
        let mut scan = Vec::new();
        if rescan || full {
            scan.push(self.path.clone());
        }
        for p in paths {
            if p.is_dir() {
                scan.push(p);
            } else if p.is_file() {
                if p == self.path || is_manifest_file(&p) {
                    out.insert(p);
                }
            } else {
                // Gone: the files known at or below it are removed.
                out.extend(self.files.keys().filter(|f| f.starts_with(&p)).map(|f| f.to_path_buf()));
            }
        }
        for dir in scan {
            let mut files = Vec::new();
            let walked = collect_files(&dir, &mut files);
            if dir == self.path {
                self.walk_problems = walked.err().map(|e| format!("{}: {e}", dir.display())).into_iter().collect();
            }
            let files: BTreeSet<PathBuf> = files.into_iter().collect();
            for f in &files {
                let known = self.files.get(f.as_path()).map(|s| s.stamp);
                if known != Some(stamp(f)) {
                    out.insert(f.clone());
                }
            }
            let gone = self.files.keys().filter(|f| f.starts_with(&dir) && !files.contains(&***f));
            out.extend(gone.map(|f| f.to_path_buf()));
        }
        out
    }
}

/// Files parsed together by [`read_files_parallel`]: enough to keep every core busy, few enough
/// that the parsed objects of one batch (not yet in the store) stay small.
const PARSE_BATCH: usize = 512;

/// Stamps, reads and parses `files` on every core, returned in the order of `files`: `None`
/// for a file that is gone. The stamp is taken first, so a write after it shows as a changed
/// stamp on the next check.
fn read_files_parallel(files: &[PathBuf]) -> Vec<(Option<Stamp>, Option<Manifests>)> {
    let read_one = |f: &PathBuf| (stamp(f), f.is_file().then(|| read_file(f)));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // A thread is worth starting for a few files at least (a change is usually one file).
    let workers = cores.min(files.len() / 8).max(1);
    if workers == 1 {
        return files.iter().map(read_one).collect();
    }
    std::thread::scope(|scope| {
        let parts: Vec<_> = files
            .chunks(files.len().div_ceil(workers))
            .map(|part| scope.spawn(move || part.iter().map(read_one).collect::<Vec<_>>()))
            .collect();
        parts.into_iter().flat_map(|p| p.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    })
}

/// Reads and parses one file.
fn read_file(file: &Path) -> Manifests {
    let mut m = Manifests::default();
    match std::fs::read_to_string(file) {
        Ok(text) => parse_into(file, &text, &mut m),
        Err(e) => m.errors.push(ManifestError { origin: file.display().to_string(), message: format!("read: {e}") }),
    }
    m
}

/// Applies the `index`-th object of `kind` in `m`; false if it is invalid (the store lists it).
fn apply(store: &mut ModelStore, m: &Manifests, kind: Kind, index: usize) -> bool {
    match kind {
        Kind::Service => m.services.get(index).is_some_and(|s| store.apply_service(s).is_ok()),
        Kind::EndpointSlice => m.slices.get(index).is_some_and(|s| store.apply_slice(s).is_ok()),
    }
}

/// Records a changed path for `root`'s source: a path the reads cannot place under `root`, a
/// path of the manifest file itself, and hidden entries are handled as the directory walk does.
fn mark(dirty: &Mutex<Dirty>, root: &Path, path: &Path) {
    let mut d = dirty.lock().unwrap_or_else(|e| e.into_inner());
    if !root.is_dir() && path.file_name() == root.file_name() {
        // A single manifest file, watched through its directory.
        d.paths.insert(root.to_path_buf());
        return;
    }
    match path.strip_prefix(root) {
        Ok(rel) => {
            let hidden = rel.components().any(|c| c.as_os_str().to_string_lossy().starts_with('.'));
            if !hidden {
                d.paths.insert(root.join(rel));
            }
        }
        Err(_) => d.rescan = true,
    }
}

/// Watches the manifest path and records every change for the [`ManifestSource`], then
/// notifies `changed` (from the watcher's thread). A file is watched through its directory, so
/// editors that replace the file are seen.
pub struct ManifestWatcher {
    _watcher: notify::RecommendedWatcher,
}

impl ManifestWatcher {
    fn new(path: &Path, dirty: Arc<Mutex<Dirty>>, changed: Arc<tokio::sync::Notify>) -> notify::Result<Self> {
        let watched_file = (!path.is_dir()).then(|| path.to_path_buf());
        let root = path.to_path_buf();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            tracing::debug!(?event, "manifest watch event");
            let relevant = match &event {
                Ok(e) if e.need_rescan() => {
                    dirty.lock().unwrap_or_else(|e| e.into_inner()).rescan = true;
                    true
                }
                Ok(e) if matches!(e.kind, notify::EventKind::Access(_)) => false,
                Ok(e) => {
                    let mut relevant = false;
                    for p in &e.paths {
                        let wanted = match &watched_file {
                            // Other files in the same directory (logs, editor swap files)
                            // must not trigger syncs.
                            Some(file) => p.file_name() == file.file_name(),
                            None => is_manifest_file(p) || p.extension().is_none(),
                        };
                        if wanted {
                            mark(&dirty, &root, p);
                            relevant = true;
                        }
                    }
                    relevant
                }
                Err(_) => {
                    // Re-read everything on watcher errors: better a spare read than a lost one.
                    dirty.lock().unwrap_or_else(|e| e.into_inner()).rescan = true;
                    true
                }
            };
            if relevant {
                changed.notify_one();
            }
        })?;
        let target = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            _ if path.is_dir() => path.to_path_buf(),
            Some(parent) => parent.to_path_buf(),
            None => PathBuf::from("."),
        };
        let mode = if path.is_dir() { RecursiveMode::Recursive } else { RecursiveMode::NonRecursive };
        watcher.watch(&target, mode)?;
        Ok(Self { _watcher: watcher })
    }
}

fn is_manifest_file(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Manifests {
        let mut out = Manifests::default();
        parse_into(Path::new("test.yaml"), text, &mut out);
        out
    }

    #[test]
    fn multi_document_and_list() {
        let m = parse(
            r#"
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: b, namespace: x}
  spec: {clusterIP: 10.96.0.2, ports: [{port: 53, protocol: UDP}]}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: b-1, namespace: x, labels: {kubernetes.io/service-name: b}}
  addressType: IPv4
  endpoints: [{addresses: [10.244.0.1]}]
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: d}
---
"#,
        );
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        assert_eq!(m.services.len(), 2);
        assert_eq!(m.slices.len(), 1);
        assert_eq!(m.other_kinds, 1);
        assert_eq!(m.services[1].metadata.namespace.as_deref(), Some("x"));
    }

    #[test]
    fn bad_document_names_the_field_and_keeps_the_rest() {
        let m = parse(
            r#"
apiVersion: v1
kind: Service
metadata: {name: bad}
spec: {clusterIP: 10.96.0.1, ports: [{port: eighty}]}
---
apiVersion: v1
kind: Service
metadata: {name: good}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
---
kind: Service
"#,
        );
        assert_eq!(m.services.len(), 1);
        assert_eq!(m.services[0].metadata.name.as_deref(), Some("good"));
        assert_eq!(m.errors.len(), 2, "{:?}", m.errors);
        let msg = m.errors[0].to_string();
        assert!(msg.contains("test.yaml document 1"), "{msg}");
        assert!(msg.contains("bad: spec.ports[0].port"), "{msg}");
        assert!(m.errors[1].to_string().contains("missing apiVersion or kind"));
    }

    #[test]
    fn thousands_of_documents_in_one_file() {
        let doc = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\n";
        let m = parse(&doc.repeat(5000));
        assert!(m.errors.is_empty(), "{:?}", m.errors.first());
        assert_eq!(m.services.len(), 5000);
    }

    #[test]
    fn invalid_yaml_is_one_error() {
        let m = parse("apiVersion: v1\nkind: [unclosed\n");
        assert_eq!(m.errors.len(), 1);
        assert!(m.errors[0].message.contains("invalid YAML"), "{:?}", m.errors);
    }

    #[test]
    fn json_files_are_read_by_the_json_parser() {
        let service = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 1}]}}"#;
        let list = format!(r#"{{"apiVersion": "v1", "kind": "List", "items": [{}]}}"#, service.replace("\"a\"", "\"b\""));
        let mut m = Manifests::default();
        parse_into(Path::new("objects.json"), &format!("{service}\n{list}"), &mut m);
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        let names: Vec<_> = m.services.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
        assert_eq!(names, ["a", "b"]);
        // JSON syntax errors are reported as such, with the position.
        let mut m = Manifests::default();
        parse_into(Path::new("bad.json"), "{\"apiVersion\": \"v1\",", &mut m);
        assert_eq!(m.errors.len(), 1);
        assert!(m.errors[0].to_string().starts_with("bad.json: invalid JSON: EOF while parsing"), "{:?}", m.errors);
    }

    #[test]
    fn directory_is_read_in_order_and_missing_path_is_an_error() {
        let dir = std::env::temp_dir().join(format!("kproxy-manifests-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let svc = |n: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {n}}}\nspec: {{clusterIP: 10.96.0.9, ports: [{{port: 1}}]}}\n");
        std::fs::write(dir.join("b.yaml"), svc("b")).unwrap();
        std::fs::write(dir.join("sub/a.yml"), svc("a")).unwrap();
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let files = read_files(&dir);
        let names: Vec<_> = files
            .iter()
            .flat_map(|(_, m)| m.services.iter().map(|s| s.metadata.name.clone().unwrap()))
            .collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(files.len(), 2);
        assert!(files.iter().all(|(_, m)| m.errors.is_empty()));
        let missing = read_files(&dir.join("nope.yaml"));
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].1.errors.len(), 1);
        assert!(missing[0].1.errors[0].to_string().contains("nope.yaml"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A Service with one endpoint, and its EndpointSlice.
    fn service_file(name: &str, ip: &str, backend: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [{backend}]}}]\n"
        )
    }

    /// (ClusterIP, backends) of every programmed frontend.
    fn programmed(store: &mut ModelStore) -> Vec<(String, Vec<String>)> {
        store.take_changes();
        store.desired().iter().map(|(f, d)| (f.address.to_string(), d.backends.iter().map(|b| b.ip().to_string()).collect())).collect()
    }

    fn temp_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kproxy-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A directory with `files` (name, content), a source on it and an empty store.
    fn source_on(test: &str, files: &[(&str, String)]) -> (PathBuf, ManifestSource, ModelStore) {
        let dir = temp_dir(test);
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        (dir.clone(), ManifestSource::new(dir), ModelStore::default())
    }

    #[test]
    fn source_reads_only_what_changed_and_keeps_the_last_good_version() {
        let files = [("a.yaml", service_file("a", "10.96.0.1", "10.244.0.1")), ("b.yaml", service_file("b", "10.96.0.2", "10.244.0.2"))];
        let (dir, mut source, mut store) = source_on("incremental", &files);
        let stats = source.update(&mut store, false).unwrap();
        assert_eq!((stats.parsed, stats.applied, stats.deleted), (2, 4, 0));
        assert_eq!(programmed(&mut store), [("10.96.0.1".into(), vec!["10.244.0.1".into()]), ("10.96.0.2".into(), vec!["10.244.0.2".into()])]);
        assert_eq!(source.update(&mut store, false).unwrap().parsed, 0, "nothing changed, nothing read");

        // One file changes: only it is read.
        std::fs::write(dir.join("b.yaml"), service_file("b", "10.96.0.2", "10.244.0.9")).unwrap();
        source.mark_changed(&dir.join("b.yaml"));
        assert_eq!(source.update(&mut store, false).unwrap().parsed, 1);
        assert_eq!(programmed(&mut store)[1], ("10.96.0.2".into(), vec!["10.244.0.9".into()]));

        // A broken edit keeps serving the last good version, and says so.
        std::fs::write(dir.join("b.yaml"), "apiVersion: v1\nkind: [unclosed\n").unwrap();
        source.mark_changed(&dir.join("b.yaml"));
        source.update(&mut store, false).unwrap();
        assert_eq!(programmed(&mut store).len(), 2);
        let problems: Vec<&String> = source.problems().collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[1].contains("b.yaml: has errors; serving its last good version"), "{problems:?}");

        // Hidden and non-manifest files are not read.
        std::fs::write(dir.join(".a.yaml.swp"), "junk").unwrap();
        std::fs::write(dir.join("notes.txt"), "junk").unwrap();
        source.mark_changed(&dir.join(".a.yaml.swp"));
        source.mark_changed(&dir.join("notes.txt"));
        assert_eq!(source.update(&mut store, false).unwrap().parsed, 0);

        // A removed file takes its objects with it; the broken one is fixed.
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        std::fs::write(dir.join("b.yaml"), service_file("b", "10.96.0.2", "10.244.0.3")).unwrap();
        source.mark_changed(&dir.join("a.yaml"));
        source.mark_changed(&dir.join("b.yaml"));
        let stats = source.update(&mut store, false).unwrap();
        assert_eq!((stats.parsed, stats.deleted), (1, 2));
        assert_eq!(programmed(&mut store), [("10.96.0.2".into(), vec!["10.244.0.3".into()])]);
        assert_eq!(source.problems().count(), 0);

        // A change the watcher did not report is found by the periodic (full) check only.
        std::fs::write(dir.join("c.yaml"), service_file("c", "10.96.0.3", "10.244.0.4")).unwrap();
        assert_eq!(source.update(&mut store, false).unwrap().parsed, 0);
        assert_eq!(source.update(&mut store, true).unwrap().parsed, 1, "only the new file");
        assert_eq!(programmed(&mut store).len(), 2);

        // A missing path changes nothing.
        let moved = dir.with_extension("moved");
        std::fs::rename(&dir, &moved).unwrap();
        assert!(source.update(&mut store, true).unwrap_err().contains("no such file"));
        assert_eq!(store.take_changes().frontends.len(), 0);
        assert_eq!(store.desired().len(), 2);
        std::fs::remove_dir_all(&moved).unwrap();
    }

    #[test]
    fn a_duplicate_serves_the_first_copy_until_it_goes() {
        let files = [("a.yaml", service_file("x", "10.96.0.1", "10.244.0.1")), ("b.yaml", service_file("x", "10.96.0.2", "10.244.0.2"))];
        let (dir, mut source, mut store) = source_on("duplicates", &files);
        source.update(&mut store, false).unwrap();
        assert_eq!(programmed(&mut store), [("10.96.0.1".into(), vec!["10.244.0.1".into()])]);
        let dups: Vec<String> = source.duplicates().iter().map(ToString::to_string).collect();
        assert_eq!(
            dups,
            [
                "Service default/x: metadata.name: duplicate object; the first one is used",
                "EndpointSlice default/x-1: metadata.name: duplicate object; the first one is used"
            ]
        );
        // The first copy goes: the second one, in a file not changed, takes over.
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        source.mark_changed(&dir.join("a.yaml"));
        let stats = source.update(&mut store, false).unwrap();
        assert_eq!((stats.parsed, stats.applied, stats.deleted), (1, 2, 0));
        assert_eq!(programmed(&mut store), [("10.96.0.2".into(), vec!["10.244.0.2".into()])]);
        assert!(source.duplicates().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_renamed_in_and_out_is_read_and_removed() {
        let (dir, mut source, mut store) = source_on("rename", &[]);
        let staged = temp_dir("rename-staged");
        std::fs::create_dir_all(staged.join("sub")).unwrap();
        std::fs::write(staged.join("a.yaml"), service_file("a", "10.96.0.1", "10.244.0.1")).unwrap();
        std::fs::write(staged.join("sub/b.yml"), service_file("b", "10.96.0.2", "10.244.0.2")).unwrap();
        assert_eq!(source.update(&mut store, false).unwrap().parsed, 0);
        std::fs::rename(&staged, dir.join("set")).unwrap();
        source.mark_changed(&dir.join("set"));
        assert_eq!(source.update(&mut store, false).unwrap().parsed, 2);
        assert_eq!(programmed(&mut store).len(), 2);
        // The same directory moved out and back in: nothing to read again.
        std::fs::rename(dir.join("set"), &staged).unwrap();
        std::fs::rename(&staged, dir.join("set")).unwrap();
        source.mark_changed(&dir.join("set"));
        assert_eq!(source.update(&mut store, false).unwrap().parsed, 0);
        std::fs::rename(dir.join("set"), &staged).unwrap();
        source.mark_changed(&dir.join("set"));
        let stats = source.update(&mut store, false).unwrap();
        assert_eq!((stats.parsed, stats.deleted), (0, 4));
        assert!(programmed(&mut store).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&staged).unwrap();
    }
}
