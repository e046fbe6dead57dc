//! Manifest files: `v1/Service` and `discovery.k8s.io/v1/EndpointSlice` objects from a YAML file
//! or a directory of them (multi-document YAML, and `kind: List` as `kubectl get -o yaml`
//! prints it), watched for changes.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use notify::{RecursiveMode, Watcher as _};
use serde::de::DeserializeOwned;
use serde_json::Value;

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
/// document is an error entry of its file, and every other object is still returned.
pub fn read_files(path: &Path) -> Vec<(PathBuf, Manifests)> {
    let mut files = Vec::new();
    let mut out = Vec::new();
    if let Err(e) = collect_files(path, &mut files) {
        let errors = vec![ManifestError { origin: path.display().to_string(), message: e.to_string() }];
        out.push((path.to_path_buf(), Manifests { errors, ..Default::default() }));
    }
    for file in files {
        let mut m = Manifests::default();
        match std::fs::read_to_string(&file) {
            Ok(text) => parse_into(&file, &text, &mut m),
            Err(e) => m.errors.push(ManifestError {
                origin: file.display().to_string(),
                message: format!("read: {e}"),
            }),
        }
        out.push((file, m));
    }
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

/// Parses the documents of one file into `out`.
pub fn parse_into(file: &Path, text: &str, out: &mut Manifests) {
    let documents: Vec<Value> = match serde_saphyr::from_multiple_with_options(text, parser_options()) {
        Ok(docs) => docs,
        Err(e) => {
            out.errors.push(ManifestError {
                origin: file.display().to_string(),
                message: format!("invalid YAML: {e}"),
            });
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

/// The manifest source with memory: a file that fails to parse keeps serving the objects of
/// its last good version, so a half-saved edit never takes services down.
pub struct ManifestSource {
    path: PathBuf,
    last_good: HashMap<PathBuf, (Vec<Service>, Vec<EndpointSlice>)>,
}

/// One complete read of the manifests.
#[derive(Debug, Default)]
pub struct ManifestSet {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    /// Problems found, each naming file and document (and what was done about it).
    pub problems: Vec<String>,
}

impl ManifestSource {
    pub fn new(path: PathBuf) -> Self {
        Self { path, last_good: HashMap::new() }
    }

    /// Reads every manifest. `Err` when the path itself is gone: an unreadable path must not
    /// look like "no services", so the caller changes nothing then.
    pub fn read(&mut self) -> Result<ManifestSet, String> {
        if !self.path.exists() {
            return Err(format!("{}: no such file or directory; keeping the programmed services", self.path.display()));
        }
        let mut set = ManifestSet::default();
        let mut seen = HashMap::new();
        for (file, m) in read_files(&self.path) {
            set.problems.extend(m.errors.iter().map(ToString::to_string));
            let objects = match self.last_good.get(&file) {
                Some(good) if !m.errors.is_empty() => {
                    set.problems.push(format!("{}: has errors; serving its last good version", file.display()));
                    good.clone()
                }
                _ => (m.services, m.slices),
            };
            set.services.extend(objects.0.iter().cloned());
            set.slices.extend(objects.1.iter().cloned());
            seen.insert(file, objects);
        }
        self.last_good = seen;
        Ok(set)
    }
}

/// Watches the manifest path and calls `changed` (from the watcher's thread) on every change.
/// A file is watched through its directory, so editors that replace the file are seen.
pub struct ManifestWatcher {
    _watcher: notify::RecommendedWatcher,
}

impl ManifestWatcher {
    pub fn new(path: &Path, changed: Arc<tokio::sync::Notify>) -> notify::Result<Self> {
        let watched_file = (!path.is_dir()).then(|| path.to_path_buf());
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            tracing::debug!(?event, "manifest watch event");
            let relevant = match &event {
                Ok(e) => {
                    !matches!(e.kind, notify::EventKind::Access(_))
                        && e.paths.iter().any(|p| match &watched_file {
                            // Other files in the same directory (logs, editor swap files)
                            // must not trigger syncs.
                            Some(file) => p.file_name() == file.file_name(),
                            None => is_manifest_file(p) || p.extension().is_none(),
                        })
                }
                Err(_) => true, // re-read on watcher errors: better a spare sync than a lost one
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
}
