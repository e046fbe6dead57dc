//! Manifest files: `v1/Service` and `discovery.k8s.io/v1/EndpointSlice` objects from a YAML file
//! or a directory of them (multi-document YAML, and `kind: List` as `kubectl get -o yaml`
//! prints it), watched for changes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use notify::{RecursiveMode, Watcher as _};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{
    settle::{Change, Settle},
    update::{Sink, Update},
};
use crate::{
    model::{InvalidCode, InvalidObject},
    tracker::ObjectKey,
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
    let (mut files, mut failed) = (Vec::new(), Vec::new());
    collect_files(path, &mut files, &mut failed);
    let mut out: Vec<(PathBuf, Manifests)> = failed
        .into_iter()
        .map(|(dir, e)| {
            let errors = vec![ManifestError { origin: dir.display().to_string(), message: e.to_string() }];
            (dir, Manifests { errors, ..Default::default() })
        })
        .collect();
    out.extend(files.into_iter().map(|file| {
        let m = read_file(&file).unwrap_or_else(|e| Manifests {
            errors: vec![ManifestError { origin: file.display().to_string(), message: format!("read: {e}") }],
            ..Default::default()
        });
        (file, m)
    }));
    out
}

/// Lists the manifest files at `path` (itself, if it is not a directory) in name order,
/// skipping hidden entries. A directory that cannot be read goes to `failed` and the walk
/// goes on: what is below it is unknown, not absent.
fn collect_files(path: &Path, files: &mut Vec<PathBuf>, failed: &mut Vec<(PathBuf, std::io::Error)>) {
    if !path.is_dir() {
        // Reading a missing file reports the error with its name.
        files.push(path.to_path_buf());
        return;
    }
    let entries = std::fs::read_dir(path).and_then(|d| d.map(|e| e.map(|e| e.path())).collect::<Result<Vec<PathBuf>, _>>());
    let mut entries = match entries {
        Ok(entries) => entries,
        Err(e) => {
            failed.push((path.to_path_buf(), e));
            return;
        }
    };
    entries.sort();
    for entry in entries {
        let hidden = entry.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden {
            continue;
        }
        if entry.is_dir() {
            collect_files(&entry, files, failed);
        } else if is_manifest_file(&entry) {
            files.push(entry);
        }
    }
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

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        Stamp {
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            ino: m.ino(),
            dev: m.dev(),
        }
    }

    /// How long ago the file last changed (data or metadata), by its change time; zero for a
    /// change time in the future.
    fn age(&self, now: SystemTime) -> Duration {
        let (secs, nanos) = self.ctime;
        let ctime = match u64::try_from(secs) {
            Ok(s) => SystemTime::UNIX_EPOCH + Duration::new(s, nanos.clamp(0, 999_999_999) as u32),
            Err(_) => SystemTime::UNIX_EPOCH,
        };
        now.duration_since(ctime).unwrap_or_default()
    }
}

fn stamp(path: &Path) -> Option<Stamp> {
    std::fs::metadata(path).ok().map(|m| Stamp::of(&m))
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

/// The paths the watcher saw change and that were not read yet, and the timer thread's state.
#[derive(Debug)]
struct Dirty {
    /// Walk everything (first read, watcher errors and overflows).
    rescan: bool,
    settle: Settle,
    /// When the timer thread wakes up next (`None`: when woken); an event that makes a path
    /// ready sooner wakes it.
    timer_at: Option<Instant>,
    /// The timer asked for a read and none happened since.
    signalled: bool,
    /// The watcher is gone: the timer thread ends.
    stop: bool,
}

/// [`Dirty`], shared by the watcher's callback, the timer thread and the reads.
#[derive(Debug)]
struct Pending {
    dirty: Mutex<Dirty>,
    /// Wakes the timer thread.
    wake: Condvar,
}

impl Pending {
    fn lock(&self) -> MutexGuard<'_, Dirty> {
        // The fields stay consistent whatever panicked while holding the lock.
        self.dirty.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a change of `path` (see [`mark`]) and wakes the timer if it must wake sooner.
    fn record(&self, root: &Path, path: &Path, change: Change, now: Instant) {
        let mut d = self.lock();
        if let Some(ready_at) = mark(&mut d, root, path, change, now) {
            if d.timer_at.is_none_or(|t| ready_at < t) {
                self.wake.notify_one();
            }
        }
    }

    fn rescan(&self) {
        self.lock().rescan = true;
        self.wake.notify_one();
    }
}

/// The first wait before a failed read is tried again; it doubles with each failure in a row,
/// up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The manifest source, incremental: the watcher records which paths changed, and a read
/// re-parses only those files and pushes the objects they define now into a [`Sink`] (the
/// proxier's store), with a delete for each object they no longer define.
///
/// - A changed file is read only once it is complete: closed by its writer or renamed into
///   place, then quiet for the settle time ([`super::settle`]). A file written in place is
///   empty or cut mid-document while it is written; read then, it would take its Services
///   down and end their connections.
/// - A file that fails to parse keeps serving the objects of its last good version, so a
///   half-saved edit never takes services down.
/// - A file or directory that cannot be read (`EMFILE`, `EACCES`, …) keeps its last version
///   and is read again at the next read, which is asked for after a back-off (1 s, doubling
///   to 30 s); what is below a directory that cannot be listed is not taken for deleted.
/// - A ConfigMap volume (kubelet's atomic writer: the visible files are links through the
///   `..data` link, which is replaced by a rename) is re-read when `..data` changes.
/// - When an object is defined twice, the first copy in file order is used and the others are
///   reported, as in a read of all files in order.
///
/// The parsed objects are not kept: they are moved into the updates, the store holds what is
/// served, and the source only the keys each file defines, so memory does not hold the
/// manifests twice.
pub struct ManifestSource {
    path: PathBuf,
    files: BTreeMap<Arc<Path>, FileState>,
    defs: HashMap<(Kind, ObjectKey), Vec<Def>>,
    /// Keys defined more than once.
    duplicated: BTreeSet<(Kind, ObjectKey)>,
    /// Directories that could not be listed, with the problem.
    walk_problems: BTreeMap<PathBuf, String>,
    /// Files that could not be read, with the problem (those with a last good version keep
    /// their [`FileState`]).
    read_problems: BTreeMap<PathBuf, String>,
    /// Failed reads in a row, per path, for the back-off.
    failures: HashMap<PathBuf, u32>,
    pending: Arc<Pending>,
}

/// What one [`ManifestSource::update`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UpdateStats {
    /// Files parsed (changed ones, plus files holding the copy of an object that now takes over).
    pub parsed: usize,
    /// Objects pushed (the sink validates them: an invalid one is counted here too).
    pub applied: usize,
    /// Deletes pushed.
    pub deleted: usize,
    /// Files and directories that could not be read (read again later).
    pub failed: usize,
    /// Changed files not read yet because they have not settled.
    pub unsettled: usize,
}

/// One file, read.
enum Read {
    /// Gone, or not a regular file any more.
    Gone,
    /// Could not be read; `String` says what failed.
    Failed(String),
    Parsed(Stamp, Manifests),
}

impl ManifestSource {
    /// A source that reads a changed file as soon as it is asked to (no settle time): for
    /// one-shot reads and tests. The agent uses [`Self::with_settle`].
    pub fn new(path: PathBuf) -> Self {
        Self::with_settle(path, Duration::ZERO)
    }

    /// A source that reads a changed file once it has settled for `settle` (see the type's
    /// documentation).
    pub fn with_settle(path: PathBuf, settle: Duration) -> Self {
        // The first read comes with the runner's first sync: no need for the timer to ask.
        let dirty = Dirty { rescan: true, settle: Settle::new(settle), timer_at: None, signalled: true, stop: false };
        Self {
            path,
            files: BTreeMap::new(),
            defs: HashMap::new(),
            duplicated: BTreeSet::new(),
            walk_problems: BTreeMap::new(),
            read_problems: BTreeMap::new(),
            failures: HashMap::new(),
            pending: Arc::new(Pending { dirty: Mutex::new(dirty), wake: Condvar::new() }),
        }
    }

    /// Records that `path` (a file or directory at or below the manifest path) changed and is
    /// complete; the next [`Self::update`] after the settle time re-reads it.
    pub fn mark_changed(&self, path: &Path) {
        self.pending.record(&self.path, path, Change::Done, Instant::now());
    }

    /// Watches the manifest path: every change is recorded, and `changed` is notified once a
    /// changed path has settled (or a failed read is due again).
    pub fn watch(&self, changed: Arc<tokio::sync::Notify>) -> notify::Result<ManifestWatcher> {
        ManifestWatcher::new(&self.path, self.pending.clone(), changed)
    }

    /// Pushes into `sink` what changed in the files changed since the last update (every file
    /// the first time) that have settled; the others wait for a later update. With `full`, also
    /// re-reads every file whose size, times or inode changed (a check that costs a `stat` per
    /// file, for changes the watcher missed). `Err` when the path itself is gone: an
    /// unreadable path must not look like "no services", so nothing changes then.
    pub fn update(&mut self, sink: &mut impl Sink, full: bool) -> Result<UpdateStats, String> {
        if !self.path.exists() {
            // Everything is read again once it is back.
            self.pending.lock().rescan = true;
            return Err(format!("{}: no such file or directory; keeping the programmed services", self.path.display()));
        }
        let mut stats = UpdateStats::default();
        let mut retries: Vec<(PathBuf, Duration)> = Vec::new();
        let mut parsed: HashSet<Arc<Path>> = HashSet::new();
        // Keys a file stopped defining (or defines at another place), with the copy that was in
        // force before this update.
        let mut affected: BTreeMap<(Kind, ObjectKey), Option<Def>> = BTreeMap::new();
        // In file order: when a file is read, every file before it is final, so the copy in
        // force of each key the file defines is known, and the file's objects are applied and
        // dropped before the next file is read.
        let changed: Vec<PathBuf> = self.take_changed(full, &mut stats, &mut retries).into_iter().collect();
        let read = parse_batches(&changed).flat_map(|batch| batch.iter().zip(read_files_parallel(batch)));
        for (file, outcome) in read {
            let (st, now) = match outcome {
                Read::Failed(e) => {
                    retries.push((file.clone(), self.read_failed(file, &e)));
                    stats.failed += 1;
                    continue;
                }
                Read::Gone => (None, None),
                Read::Parsed(st, m) => (Some(st), Some(m)),
            };
            self.read_problems.remove(file);
            self.failures.remove(file);
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
            let Some(mut m) = now else { continue };
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
                        stats.applied += usize::from(push(sink, &mut m, kind, i));
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
                    let (namespace, name) = key;
                    sink.push(match kind {
                        Kind::Service => Update::DeleteService { namespace, name },
                        Kind::EndpointSlice => Update::DeleteSlice { namespace, name },
                    });
                    stats.deleted += 1;
                }
                Some((file, _)) if parsed.contains(&file) => {} // applied when it was read
                Some(w) if before.as_ref() == Some(&w) => {}      // the copy in force is unchanged
                Some((file, index)) => pull.entry(file).or_default().push((kind, key, index)),
            }
        }
        for (file, wanted) in pull {
            let mut m = match read_file(&file) {
                Ok(m) => m,
                Err(e) => {
                    // Read whole again later: that applies every object it is the copy in force of.
                    retries.push((file.to_path_buf(), self.read_failed(&file, &format!("read: {e}"))));
                    stats.failed += 1;
                    continue;
                }
            };
            stats.parsed += 1;
            for (kind, key, index) in wanted {
                // Only if the file still says what it said when it was last read.
                let same = match kind {
                    Kind::Service => m.services.get(index).map(|s| key_of(&s.metadata)),
                    Kind::EndpointSlice => m.slices.get(index).map(|s| key_of(&s.metadata)),
                };
                if same.as_ref() == Some(&key) {
                    stats.applied += usize::from(push(sink, &mut m, kind, index));
                }
            }
        }
        // A read happened: the timer may ask for the next one (a failed read's retry, or a
        // path that settles later).
        let mut d = self.pending.lock();
        let at = Instant::now();
        for (path, delay) in retries {
            d.settle.retry(&path, at + delay);
        }
        d.signalled = false;
        self.pending.wake.notify_one();
        Ok(stats)
    }

    /// Counts a failed read of `path` and records `what` failed; returns when to try again.
    fn read_failed(&mut self, path: &Path, what: &str) -> Duration {
        let failures = self.failures.entry(path.to_path_buf()).or_insert(0);
        *failures += 1;
        let delay = RETRY_FIRST.saturating_mul(1 << (*failures - 1).min(8)).min(RETRY_MAX);
        let kept = if self.files.contains_key(path) { "serving its last good version, " } else { "" };
        let problem = format!("{}: {what}; {kept}reading it again in {}", path.display(), humantime::format_duration(delay));
        self.read_problems.insert(path.to_path_buf(), problem);
        delay
    }

    /// Problems of the files (each naming file and document, and what was done about it).
    pub fn problems(&self) -> impl Iterator<Item = &String> {
        self.walk_problems
            .values()
            .chain(self.read_problems.values())
            .chain(self.files.values().flat_map(|f| &f.problems))
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

    /// The files to read now: every settled file the watcher named; below a settled changed
    /// directory (and below the manifest path on a rescan or with `full`), every file that is
    /// new or whose stamp changed, once it has settled by its change time; and every known
    /// file that is gone. Paths that cannot be looked at are added to `retries`.
    fn take_changed(&mut self, full: bool, stats: &mut UpdateStats, retries: &mut Vec<(PathBuf, Duration)>) -> BTreeSet<PathBuf> {
        let now = Instant::now();
        let (rescan, ready, settle) = {
            let mut d = self.pending.lock();
            (std::mem::take(&mut d.rescan), d.settle.take_ready(now), d.settle.settle_time())
        };
        let mut out = BTreeSet::new();
        let mut scan = Vec::new();
        if rescan || full {
            scan.push(self.path.clone());
        }
        for p in ready {
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => scan.push(p),
                Ok(_) => {
                    if p == self.path || is_manifest_file(&p) {
                        out.insert(p);
                    }
                }
                // Gone: the files known at or below it are removed.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    out.extend(self.files.keys().filter(|f| f.starts_with(&p)).map(|f| f.to_path_buf()));
                }
                Err(e) => {
                    retries.push((p.clone(), self.read_failed(&p, &format!("stat: {e}"))));
                    stats.failed += 1;
                }
            }
        }
        let wall = SystemTime::now();
        let mut young = Vec::new();
        for dir in scan {
            let (mut files, mut failed) = (Vec::new(), Vec::new());
            collect_files(&dir, &mut files, &mut failed);
            self.walk_problems.retain(|d, _| !d.starts_with(&dir));
            if failed.is_empty() {
                self.failures.remove(&dir);
            }
            let files: BTreeSet<PathBuf> = files.into_iter().collect();
            {
                let d = self.pending.lock();
                for f in &files {
                    if retries.iter().any(|(p, _)| p == f) {
                        continue; // failed already in this update
                    }
                    if d.settle.waits(f, now) {
                        stats.unsettled += 1; // read when it has settled
                        continue;
                    }
                    let Some(st) = stamp(f) else {
                        out.insert(f.clone()); // the read says what is wrong
                        continue;
                    };
                    if self.files.get(f.as_path()).map(|s| s.stamp) == Some(Some(st)) {
                        continue;
                    }
                    // Changed unseen (or before the watcher started): settled by its change time.
                    let age = st.age(wall);
                    if age < settle {
                        young.push((f.clone(), now + (settle - age)));
                        stats.unsettled += 1;
                    } else {
                        out.insert(f.clone());
                    }
                }
            }
            // Files under a directory that could not be listed are not gone.
            let unknown = |f: &Path| failed.iter().any(|(d, _)| f.starts_with(d));
            let gone = self.files.keys().filter(|f| f.starts_with(&dir) && !files.contains(&***f) && !unknown(f));
            out.extend(gone.map(|f| f.to_path_buf()));
            for (d, e) in failed {
                let delay = self.read_failed(&d, &format!("list: {e}"));
                // The directory's problem is its listing's, not a file's.
                let problem = self.read_problems.remove(&d).unwrap_or_default();
                self.walk_problems.insert(d.clone(), problem);
                retries.push((d, delay));
                stats.failed += 1;
            }
        }
        if !young.is_empty() {
            let mut d = self.pending.lock();
            for (f, at) in young {
                d.settle.defer(&f, at);
            }
        }
        out
    }
}

/// Files parsed together by [`read_files_parallel`]: enough to keep every core busy, few enough
/// that the parsed objects of one batch (not yet in the store) stay small. A batch holds at
/// most this many files and this many bytes of manifests (and at least one file): parsed
/// objects take some ten times the size of their text, and what a batch parses is all in
/// memory at once, so a large file is parsed and applied alone.
const PARSE_BATCH: usize = 512;
const PARSE_BATCH_BYTES: u64 = 1 << 20;

/// `files` cut into parse batches, in order (see [`PARSE_BATCH_BYTES`]).
fn parse_batches(files: &[PathBuf]) -> impl Iterator<Item = &[PathBuf]> {
    let mut rest = files;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        while n < rest.len().min(PARSE_BATCH) {
            let size = std::fs::metadata(&rest[n]).map_or(0, |m| m.len());
            if n > 0 && bytes + size > PARSE_BATCH_BYTES {
                break;
            }
            bytes += size;
            n += 1;
        }
        let (batch, tail) = rest.split_at(n);
        rest = tail;
        Some(batch)
    })
}

/// Stamps, reads and parses `files` on every core, returned in the order of `files`. The
/// stamp is taken first, so a write after it shows as a changed stamp on the next check.
fn read_files_parallel(files: &[PathBuf]) -> Vec<Read> {
    let read_one = |f: &PathBuf| match std::fs::metadata(f) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Read::Gone,
        Err(e) => Read::Failed(format!("stat: {e}")),
        Ok(m) if !m.is_file() => Read::Gone,
        Ok(m) => match read_file(f) {
            Ok(parsed) => Read::Parsed(Stamp::of(&m), parsed),
            Err(e) => Read::Failed(format!("read: {e}")),
        },
    };
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

/// Reads and parses one file. `Err` when it cannot be read (it is read again later); content
/// that is not UTF-8 is a parse error of the file.
fn read_file(file: &Path) -> std::io::Result<Manifests> {
    let mut m = Manifests::default();
    match std::fs::read_to_string(file) {
        Ok(text) => parse_into(file, &text, &mut m),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            m.errors.push(ManifestError { origin: file.display().to_string(), message: format!("read: {e}") })
        }
        Err(e) => return Err(e),
    }
    Ok(m)
}

/// Pushes the `index`-th object of `kind` in `m` (moved out: each is pushed once); false if
/// there is none.
fn push(sink: &mut impl Sink, m: &mut Manifests, kind: Kind, index: usize) -> bool {
    let update = match kind {
        Kind::Service => m.services.get_mut(index).map(|s| Update::ApplyService(Box::new(std::mem::take(s)))),
        Kind::EndpointSlice => m.slices.get_mut(index).map(|s| Update::ApplySlice(Box::new(std::mem::take(s)))),
    };
    update.map(|u| sink.push(u)).is_some()
}

/// The link kubelet's atomic writer replaces (by a rename) to update a ConfigMap or Secret
/// volume: the visible files are links through it, so their content changes with it although
/// they themselves are never written.
const ATOMIC_WRITER_LINK: &str = "..data";

fn is_atomic_writer_link(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n == ATOMIC_WRITER_LINK)
}

/// Records a changed path for `root`'s source and returns when it is ready: a path of the
/// manifest file itself (or the atomic writer's link beside it) marks the file; `..data` in a
/// directory marks that directory; a path the reads cannot place under `root` asks for a
/// rescan; other hidden entries are ignored, as the directory walk does.
fn mark(d: &mut Dirty, root: &Path, path: &Path, change: Change, now: Instant) -> Option<Instant> {
    if !root.is_dir() && (path.file_name() == root.file_name() || is_atomic_writer_link(path)) {
        // A single manifest file, watched through its directory.
        return Some(d.settle.record(root, change, now));
    }
    match path.strip_prefix(root) {
        Ok(rel) => {
            let rel = if is_atomic_writer_link(rel) { rel.parent().unwrap_or(Path::new("")) } else { rel };
            let hidden = rel.components().any(|c| c.as_os_str().to_string_lossy().starts_with('.'));
            if hidden {
                return None;
            }
            let path = if rel.as_os_str().is_empty() { root.to_path_buf() } else { root.join(rel) };
            Some(d.settle.record(&path, change, now))
        }
        Err(_) => {
            d.rescan = true;
            Some(now)
        }
    }
}

/// What a watch event says about its paths; `None` for events that change nothing (opens and
/// reads, the agent's own included).
fn change_of(kind: &notify::EventKind) -> Option<Change> {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(Change::Done),
        EventKind::Access(_) => None,
        EventKind::Modify(ModifyKind::Data(_)) => Some(Change::Writing),
        // Renamed into place, or away, or removed: nothing writes that name now.
        EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both | RenameMode::From)) | EventKind::Remove(_) => {
            Some(Change::Done)
        }
        _ => Some(Change::Touched),
    }
}

/// Watches the manifest path and records every change for the [`ManifestSource`]; a timer
/// thread notifies `changed` once a changed path has settled. A file is watched through its
/// directory, so editors that replace the file are seen.
pub struct ManifestWatcher {
    _watcher: notify::RecommendedWatcher,
    pending: Arc<Pending>,
    timer: Option<std::thread::JoinHandle<()>>,
}

impl ManifestWatcher {
    fn new(path: &Path, pending: Arc<Pending>, changed: Arc<tokio::sync::Notify>) -> notify::Result<Self> {
        let watched_file = (!path.is_dir()).then(|| path.to_path_buf());
        let root = path.to_path_buf();
        let events = pending.clone();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            tracing::debug!(?event, "manifest watch event");
            let e = match event {
                // Re-read everything on watcher errors: better a spare read than a lost one.
                Err(_) => return events.rescan(),
                Ok(e) if e.need_rescan() => return events.rescan(),
                Ok(e) => e,
            };
            let Some(change) = change_of(&e.kind) else { return };
            let now = Instant::now();
            for p in &e.paths {
                let wanted = is_atomic_writer_link(p)
                    || match &watched_file {
                        // Other files in the same directory (logs, editor swap files)
                        // must not trigger syncs.
                        Some(file) => p.file_name() == file.file_name(),
                        None => is_manifest_file(p) || p.extension().is_none(),
                    };
                if wanted {
                    events.record(&root, p, change, now);
                }
            }
        })?;
        let target = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            _ if path.is_dir() => path.to_path_buf(),
            Some(parent) => parent.to_path_buf(),
            None => PathBuf::from("."),
        };
        let mode = if path.is_dir() { RecursiveMode::Recursive } else { RecursiveMode::NonRecursive };
        watcher.watch(&target, mode)?;
        let timer_pending = pending.clone();
        let timer = std::thread::Builder::new()
            .name("manifest-settle".into())
            .spawn(move || settle_timer(&timer_pending, &changed))
            .map_err(|e| notify::Error::io(e).add_path(target))?;
        Ok(Self { _watcher: watcher, pending, timer: Some(timer) })
    }
}

impl Drop for ManifestWatcher {
    fn drop(&mut self) {
        self.pending.lock().stop = true;
        self.pending.wake.notify_one();
        if let Some(timer) = self.timer.take() {
            let _ = timer.join();
        }
    }
}

/// The timer thread: notifies `changed` when a pending path is ready (once per read: a
/// ready path the next read has not taken yet is not announced twice), and otherwise sleeps
/// until the earliest one will be, or until an event or a read wakes it.
fn settle_timer(pending: &Pending, changed: &tokio::sync::Notify) {
    let mut d = pending.lock();
    while !d.stop {
        let now = Instant::now();
        let next = if d.rescan { Some(now) } else { d.settle.next_ready() };
        d.timer_at = next.filter(|t| *t > now);
        if next.is_some_and(|t| t <= now) && !d.signalled {
            d.signalled = true;
            changed.notify_one();
        }
        d = match d.timer_at {
            Some(t) => pending.wake.wait_timeout(d, t - now).unwrap_or_else(|e| e.into_inner()).0,
            None => pending.wake.wait(d).unwrap_or_else(|e| e.into_inner()),
        };
    }
}

fn is_manifest_file(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::ModelStore;

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
    fn a_large_file_is_parsed_alone_and_small_ones_together() {
        // What a batch parses is in memory at once (some ten times its text): a full read of
        // large files must not hold all of them (it did, 1.1 GB at 100,000 Services).
        let dir = std::env::temp_dir().join(format!("kproxy-batches-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sizes = [(PARSE_BATCH_BYTES * 3 / 4) as usize, (PARSE_BATCH_BYTES / 2) as usize, 100, 100, 100];
        let files: Vec<PathBuf> = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let f = dir.join(format!("{i}.yaml"));
                std::fs::write(&f, "#".repeat(*n)).unwrap();
                f
            })
            .collect();
        let batches: Vec<usize> = parse_batches(&files).map(<[PathBuf]>::len).collect();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(batches, [1, 4], "the second file joins the small ones, not the first");
        assert_eq!(parse_batches(&[]).count(), 0);
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

    #[test]
    fn a_changed_file_waits_until_it_has_settled() {
        let (dir, _, mut store) = source_on("settle", &[("a.yaml", service_file("a", "10.96.0.1", "10.244.0.1"))]);
        let mut source = ManifestSource::with_settle(dir.clone(), Duration::from_secs(3600));
        // Written just now: the first read leaves it for later, by its change time.
        let stats = source.update(&mut store, false).unwrap();
        assert_eq!((stats.parsed, stats.unsettled), (0, 1));
        assert!(programmed(&mut store).is_empty());
        // A change the watcher reports waits too, and so does the periodic check.
        source.mark_changed(&dir.join("a.yaml"));
        let stats = source.update(&mut store, true).unwrap();
        assert_eq!((stats.parsed, stats.unsettled), (0, 1));
        // Without a settle time it is read at once.
        let mut source = ManifestSource::new(dir.clone());
        assert_eq!(source.update(&mut store, false).unwrap().parsed, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_that_cannot_be_read_keeps_its_last_version_and_is_read_again() {
        let files = [("a.yaml", service_file("a", "10.96.0.1", "10.244.0.1")), ("b.yaml", service_file("b", "10.96.0.2", "10.244.0.2"))];
        let (dir, mut source, mut store) = source_on("unreadable", &files);
        source.update(&mut store, false).unwrap();
        assert_eq!(programmed(&mut store).len(), 2);
        // As root, modes do not stop a read; a symbolic link to itself does (ELOOP).
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        std::os::unix::fs::symlink("a.yaml", dir.join("a.yaml")).unwrap();
        source.mark_changed(&dir.join("a.yaml"));
        let stats = source.update(&mut store, false).unwrap();
        assert_eq!((stats.parsed, stats.failed, stats.deleted), (0, 1, 0));
        assert_eq!(programmed(&mut store).len(), 2, "the last good version is served");
        let problems: Vec<&String> = source.problems().collect();
        assert!(
            problems.iter().any(|p| p.contains("a.yaml: stat:") && p.contains("serving its last good version, reading it again in 1s")),
            "{problems:?}"
        );
        // The periodic check does not take it for deleted either, and it is read again at the
        // next update whatever triggers it (no event comes for it).
        let stats = source.update(&mut store, true).unwrap();
        assert_eq!((stats.failed, stats.deleted), (1, 0), "{stats:?}");
        assert!(source.problems().any(|p| p.contains("reading it again in 2s")), "back-off");
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        std::fs::write(dir.join("a.yaml"), service_file("a", "10.96.0.1", "10.244.0.7")).unwrap();
        let stats = source.update(&mut store, false).unwrap();
        assert_eq!((stats.parsed, stats.failed), (1, 0));
        assert_eq!(programmed(&mut store)[0], ("10.96.0.1".into(), vec!["10.244.0.7".into()]));
        assert_eq!(source.problems().count(), 0);
        // A new file that cannot be read is not taken for empty: it is read once it can be.
        std::os::unix::fs::symlink("c.yaml", dir.join("c.yaml")).unwrap();
        source.mark_changed(&dir.join("c.yaml"));
        assert_eq!(source.update(&mut store, false).unwrap().failed, 1);
        std::fs::remove_file(dir.join("c.yaml")).unwrap();
        std::fs::write(dir.join("c.yaml"), service_file("c", "10.96.0.3", "10.244.0.3")).unwrap();
        assert_eq!(source.update(&mut store, false).unwrap().parsed, 1);
        assert_eq!(programmed(&mut store).len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Lays out `dir` as kubelet's atomic writer does for a ConfigMap volume with one key,
    /// `services.yaml`: the content in a timestamped directory, `..data` linking to it, and the
    /// visible file linking through `..data`. Replaces an earlier version by a rename of the
    /// `..data` link, as kubelet does.
    fn atomic_write(dir: &Path, version: u32, content: &str) {
        let data = dir.join(format!("..2024_01_01_00_00_0{version}.000000001"));
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("services.yaml"), content).unwrap();
        std::os::unix::fs::symlink(data.file_name().unwrap(), dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        if !dir.join("services.yaml").exists() {
            std::os::unix::fs::symlink("..data/services.yaml", dir.join("services.yaml")).unwrap();
        }
        if version > 1 {
            std::fs::remove_dir_all(dir.join(format!("..2024_01_01_00_00_0{}.000000001", version - 1))).unwrap();
        }
    }

    #[test]
    fn a_configmap_volume_is_read_again_when_its_data_link_is_swapped() {
        for single_file in [false, true] {
            let dir = temp_dir(&format!("configmap-{single_file}"));
            atomic_write(&dir, 1, &service_file("a", "10.96.0.1", "10.244.0.1"));
            let root = if single_file { dir.join("services.yaml") } else { dir.clone() };
            let (mut source, mut store) = (ManifestSource::new(root), ModelStore::default());
            source.update(&mut store, false).unwrap();
            assert_eq!(programmed(&mut store), [("10.96.0.1".into(), vec!["10.244.0.1".into()])]);
            atomic_write(&dir, 2, &service_file("a", "10.96.0.1", "10.244.0.2"));
            // The only event is the rename of `..data` (the visible link is not touched).
            source.mark_changed(&dir.join("..data"));
            assert_eq!(source.update(&mut store, false).unwrap().parsed, 1, "single file: {single_file}");
            assert_eq!(programmed(&mut store), [("10.96.0.1".into(), vec!["10.244.0.2".into()])]);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    /// The real watcher and timer: a file rewritten in place, slowly, is read once, complete,
    /// after its writer closed it and it settled.
    #[tokio::test]
    async fn the_watcher_reads_a_file_rewritten_in_place_once_it_is_complete() {
        use std::io::Write as _;
        let text = service_file("a", "10.96.0.1", "10.244.0.1");
        let (dir, _, mut store) = source_on("watch", &[("a.yaml", text.clone())]);
        let mut source = ManifestSource::with_settle(dir.clone(), Duration::from_millis(300));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(source.update(&mut store, false).unwrap().parsed, 1);
        let changed = Arc::new(tokio::sync::Notify::new());
        let _watcher = source.watch(changed.clone()).unwrap();
        let new = service_file("a", "10.96.0.1", "10.244.0.2");
        let started = Instant::now();
        let mut f = std::fs::File::create(dir.join("a.yaml")).unwrap(); // truncated
        for chunk in new.as_bytes().chunks(new.len() / 4 + 1) {
            std::thread::sleep(Duration::from_millis(200));
            f.write_all(chunk).unwrap();
            // Nothing is announced while the writer has it open.
            assert!(tokio::time::timeout(Duration::from_millis(1), changed.notified()).await.is_err());
        }
        std::thread::sleep(Duration::from_millis(400)); // open, quiet longer than the settle time
        assert!(tokio::time::timeout(Duration::from_millis(1), changed.notified()).await.is_err(), "still open");
        drop(f);
        let closed = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), changed.notified()).await.expect("announced once settled");
        assert!(closed.elapsed() >= Duration::from_millis(250), "{:?} after the close", closed.elapsed());
        let stats = source.update(&mut store, false).unwrap();
        assert_eq!((stats.parsed, stats.unsettled), (1, 0), "{stats:?} after {:?}", started.elapsed());
        assert_eq!(programmed(&mut store), [("10.96.0.1".into(), vec!["10.244.0.2".into()])]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
