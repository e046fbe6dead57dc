//! The manifests under `deploy/` (not `deploy/examples/`), checked against the Kubernetes API types
//! and against kproxy itself:
//!
//! - every document is a known kind, parses into its k8s-openapi type, and has no field that the
//!   type does not know (k8s-openapi ignores unknown fields, so each document is parsed, written
//!   back and compared: a key that does not survive the round trip is unknown);
//! - the ClusterRole grants exactly [`API_ACCESS`], and is bound to the DaemonSet's ServiceAccount
//!   and nothing else;
//! - the DaemonSet runs kproxy as a node proxy: host network, node-critical priority, every node,
//!   not privileged, exactly the documented capabilities, probes on /healthz and /livez at 10256,
//!   the host's bpffs and cgroup2 root mounted where its flags say;
//! - every flag passed to kproxy exists in `kproxy <subcommand> --help` of the built binary, and the
//!   arguments as the kubelet expands them (`$(VAR)` from env, ConfigMaps and the downward API)
//!   parse.
//!
//! Each check also has a test that breaks a copy of the manifests and expects the check to fail.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, Pod, PodSpec, Probe, ServiceAccount, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::Resource;
use kproxy::sources::apiserver::API_ACCESS;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

/// The namespace everything namespaced goes to.
const NAMESPACE: &str = "kube-system";
/// The agent's DaemonSet, container and ClusterRole.
const AGENT: &str = "kproxy";
/// Capabilities of the agent container, justified in deploy/kproxy.yaml and in
/// docs/migrating-from-kube-proxy.md ("Capabilities"). Not CAP_SYS_ADMIN: the init container
/// mounts bpffs.
const AGENT_CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"];
/// Capabilities of `kproxy cleanup` (deploy/migration/kproxy-cleanup.yaml): CAP_SYS_ADMIN to list
/// programs by id for its `--cgroup` check.
const CLEANUP_CAPABILITIES: &[&str] = &["BPF", "NET_ADMIN", "SYS_ADMIN"];
/// kube-proxy's healthz port, which the probes use.
const HEALTHZ_PORT: i32 = 10256;
/// The host's bpffs, and the directory of kproxy's pins when `--bpffs-dir` is not given.
const HOST_BPFFS: &str = "/sys/fs/bpf";
const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/kproxy";
/// Where a host keeps its cgroup2 root: unified hosts, and hybrid (v1 + v2) ones.
const HOST_CGROUP2_ROOTS: &[&str] = &["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
/// The kproxy binary inside the image.
const IMAGE_BINARY: &str = "/usr/local/bin/kproxy";
/// What the downward API's `spec.nodeName` stands for when arguments are expanded here.
const EXAMPLE_NODE_NAME: &str = "node-1";

// ---------------------------------------------------------------------------------------------
// Loading

/// Where an object comes from, for messages: file, document number, kind and name.
#[derive(Clone, Debug)]
struct Origin {
    file: String,
    /// 1-based, counting the documents that hold an object.
    doc: usize,
    kind: String,
    name: String,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, document {} ({} {})", self.file, self.doc, self.kind, self.name)
    }
}

#[derive(Clone, Debug)]
enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    ConfigMap(ConfigMap),
    DaemonSet(DaemonSet),
    Pod(Pod),
}

impl Object {
    fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::ClusterRole(o) => &o.metadata,
            Object::ClusterRoleBinding(o) => &o.metadata,
            Object::ConfigMap(o) => &o.metadata,
            Object::DaemonSet(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
        }
    }

    fn namespaced(&self) -> bool {
        !matches!(
            self,
            Object::Namespace(_) | Object::ClusterRole(_) | Object::ClusterRoleBinding(_)
        )
    }
}

#[derive(Clone, Debug)]
struct Manifest {
    origin: Origin,
    object: Object,
}

/// A document as read, before typing.
#[derive(Clone, Debug)]
struct RawDoc {
    file: String,
    doc: usize,
    value: Value,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every manifest file under deploy/ except deploy/examples/ and deploy/grafana/ (a dashboard
/// for Grafana's import, not a Kubernetes object), as kubectl would pick them up (`.yaml`,
/// `.yml`, `.json`), sorted.
fn manifest_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, skip: &[PathBuf], out: &mut Vec<PathBuf>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap_or_else(|e| panic!("read {}: {e}", dir.display())).path();
            if skip.contains(&path) {
                continue;
            }
            if path.is_dir() {
                walk(&path, skip, out);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                out.push(path);
            }
        }
    }
    let deploy = workspace_root().join("deploy");
    let mut files = Vec::new();
    walk(&deploy, &[deploy.join("examples"), deploy.join("grafana")], &mut files);
    files.sort();
    assert!(!files.is_empty(), "no manifests under {}", deploy.display());
    files
}

/// The documents of every manifest file; panics naming the file when one does not parse.
fn raw_docs() -> Vec<RawDoc> {
    let root = workspace_root();
    let mut docs = Vec::new();
    for path in manifest_files() {
        let name = path.strip_prefix(&root).unwrap_or(&path).display().to_string();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        docs.extend(parse_text(&name, &text).unwrap_or_else(|e| panic!("{e}")));
    }
    docs
}

/// Splits one file into documents (empty documents are skipped, as kubectl does).
fn parse_text(name: &str, text: &str) -> Result<Vec<RawDoc>, String> {
    let values: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| format!("{name}: not valid YAML: {e}"))?;
    let docs: Vec<RawDoc> = values
        .into_iter()
        .filter(|v| !v.is_null())
        .enumerate()
        .map(|(i, value)| RawDoc { file: name.to_string(), doc: i + 1, value })
        .collect();
    if docs.is_empty() {
        return Err(format!("{name}: no object in this file"));
    }
    Ok(docs)
}

/// Types every document; all problems of all documents, or the objects.
fn type_docs(docs: &[RawDoc]) -> Result<Vec<Manifest>, Vec<String>> {
    let mut errors = Vec::new();
    let mut manifests = Vec::new();
    for doc in docs {
        match type_doc(doc) {
            Ok(m) => manifests.push(m),
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(manifests)
    } else {
        Err(errors)
    }
}

fn type_doc(doc: &RawDoc) -> Result<Manifest, Vec<String>> {
    let text = |key: &str| doc.value.get(key).and_then(Value::as_str).unwrap_or("").to_string();
    let name = doc.value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("<no name>");
    let origin =
        Origin { file: doc.file.clone(), doc: doc.doc, kind: text("kind"), name: name.to_string() };
    let (api_version, kind) = (text("apiVersion"), text("kind"));
    let object = match (api_version.as_str(), kind.as_str()) {
        (v, k) if is::<Namespace>(v, k) => Object::Namespace(typed(&origin, &doc.value)?),
        (v, k) if is::<ServiceAccount>(v, k) => Object::ServiceAccount(typed(&origin, &doc.value)?),
        (v, k) if is::<ClusterRole>(v, k) => Object::ClusterRole(typed(&origin, &doc.value)?),
        (v, k) if is::<ClusterRoleBinding>(v, k) => Object::ClusterRoleBinding(typed(&origin, &doc.value)?),
        (v, k) if is::<ConfigMap>(v, k) => Object::ConfigMap(typed(&origin, &doc.value)?),
        (v, k) if is::<DaemonSet>(v, k) => Object::DaemonSet(typed(&origin, &doc.value)?),
        (v, k) if is::<Pod>(v, k) => Object::Pod(typed(&origin, &doc.value)?),
        _ => {
            return Err(vec![format!(
                "{origin}: unknown kind {kind:?} of apiVersion {api_version:?}; this test knows Namespace, \
                 ServiceAccount, ClusterRole, ClusterRoleBinding, ConfigMap, DaemonSet and Pod (add the \
                 type to deploy_manifests.rs to use another)"
            )])
        }
    };
    Ok(Manifest { origin, object })
}

fn is<T: Resource>(api_version: &str, kind: &str) -> bool {
    api_version == T::API_VERSION && kind == T::KIND
}

/// Parses `value` as `T`, then requires every key of `value` to survive `T`'s round trip.
fn typed<T: DeserializeOwned + Serialize>(
    origin: &Origin,
    value: &Value,
) -> Result<T, Vec<String>> {
    let object: T = serde_path_to_error::deserialize(value.clone())
        .map_err(|e| vec![format!("{origin}: field {}: {}", e.path(), e.inner())])?;
    let back = serde_json::to_value(&object).expect("k8s-openapi objects serialize");
    let mut lost = Vec::new();
    round_trip_losses(value, &back, "", &mut lost);
    if lost.is_empty() {
        Ok(object)
    } else {
        Err(lost
            .into_iter()
            .map(|(path, what)| format!("{origin}: field {path}: {what}"))
            .collect())
    }
}

fn child_path(path: &str, key: &str) -> String {
    if key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    } else {
        format!("{path}[{key:?}]")
    }
}

/// Paths of `original` that `back` (the typed round trip) lost or changed. A null in the original is
/// reported too: the type reads it as absent, so it would hide a misspelt key from this check.
fn round_trip_losses(original: &Value, back: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match (original, back) {
        (Value::Object(original), Value::Object(back)) => {
            for (key, value) in original {
                let path = child_path(path, key);
                if value.is_null() {
                    out.push((path, "null value: write a value or leave the field out".into()));
                    continue;
                }
                match back.get(key) {
                    None | Some(Value::Null) => out.push((
                        path,
                        "unknown field: the Kubernetes type has no such field here (misspelt or misplaced?)"
                            .into(),
                    )),
                    Some(back) => round_trip_losses(value, back, &path, out),
                }
            }
        }
        (Value::Array(original), Value::Array(back)) if original.len() == back.len() => {
            for (i, (original, back)) in original.iter().zip(back).enumerate() {
                round_trip_losses(original, back, &format!("{path}[{i}]"), out);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => out.push((path.to_string(), format!("{a} was read as {b}"))),
    }
}

/// All manifests, typed; panics listing every problem.
fn manifests() -> Vec<Manifest> {
    type_docs(&raw_docs()).unwrap_or_else(|errors| fail("the manifests do not parse", &errors))
}

fn fail(what: &str, errors: &[String]) -> ! {
    panic!("{what}:\n  - {}", errors.join("\n  - "))
}

fn assert_clean(what: &str, errors: Vec<String>) {
    if !errors.is_empty() {
        fail(what, &errors);
    }
}

// ---------------------------------------------------------------------------------------------
// Lookups

fn find<'a, T>(
    ms: &'a [Manifest],
    pick: impl Fn(&'a Object) -> Option<&'a T>,
) -> Vec<(&'a Origin, &'a T)> {
    ms.iter().filter_map(|m| pick(&m.object).map(|o| (&m.origin, o))).collect()
}

fn daemon_sets(ms: &[Manifest]) -> Vec<(&Origin, &DaemonSet)> {
    find(ms, |o| if let Object::DaemonSet(d) = o { Some(d) } else { None })
}

fn pods(ms: &[Manifest]) -> Vec<(&Origin, &Pod)> {
    find(ms, |o| if let Object::Pod(p) = o { Some(p) } else { None })
}

fn config_maps(ms: &[Manifest]) -> Vec<(&Origin, &ConfigMap)> {
    find(ms, |o| if let Object::ConfigMap(c) = o { Some(c) } else { None })
}

/// The agent's DaemonSet, or an error.
fn agent_daemon_set(ms: &[Manifest]) -> Result<(&Origin, &DaemonSet), String> {
    let found: Vec<_> = daemon_sets(ms)
        .into_iter()
        .filter(|(_, d)| d.metadata.name.as_deref() == Some(AGENT))
        .collect();
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(format!("no DaemonSet named {AGENT} under deploy/")),
        more => Err(format!("{} DaemonSets named {AGENT}: {}", more.len(), origins(more))),
    }
}

fn origins<T>(items: &[(&Origin, T)]) -> String {
    items.iter().map(|(o, _)| o.to_string()).collect::<Vec<_>>().join("; ")
}

fn pod_spec<'a>(origin: &Origin, ds: &'a DaemonSet) -> Result<&'a PodSpec, String> {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .ok_or_else(|| format!("{origin}: field spec.template.spec is missing"))
}

/// Every container and init container of a pod spec, with its field path.
fn containers<'a>(spec: &'a PodSpec, base: &str) -> Vec<(String, &'a Container, bool)> {
    let mut all: Vec<(String, &Container, bool)> = spec
        .init_containers
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| (format!("{base}.initContainers[{i}]"), c, true))
        .collect();
    all.extend(
        spec.containers
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("{base}.containers[{i}]"), c, false)),
    );
    all
}

// ---------------------------------------------------------------------------------------------
// Checks. Each returns every problem it finds, each naming file, document and field.

/// Namespaced objects go to kube-system explicitly (without it, `kubectl apply` uses the current
/// context's namespace); cluster-scoped ones have none; no object is defined twice.
fn check_namespaces(ms: &[Manifest]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut seen: BTreeMap<(String, String, String), &Origin> = BTreeMap::new();
    for m in ms {
        let meta = m.object.metadata();
        let namespace = meta.namespace.clone().unwrap_or_default();
        if m.object.namespaced() && namespace != NAMESPACE {
            errors.push(format!(
                "{}: field metadata.namespace: must be {NAMESPACE}, is {namespace:?}",
                m.origin
            ));
        }
        if !m.object.namespaced() && meta.namespace.is_some() {
            errors.push(format!(
                "{}: field metadata.namespace: a cluster-scoped object has none",
                m.origin
            ));
        }
        if meta.name.as_deref().unwrap_or("").is_empty() {
            errors.push(format!("{}: field metadata.name is missing", m.origin));
        }
        let key = (m.origin.kind.clone(), namespace, meta.name.clone().unwrap_or_default());
        if let Some(first) = seen.insert(key, &m.origin) {
            errors.push(format!("{}: defines the same object as {first}", m.origin));
        }
    }
    errors
}

/// The ClusterRole grants exactly API_ACCESS (as a set of (group, resource, verb)), with no
/// wildcard, resourceNames, nonResourceURLs or aggregation.
fn check_cluster_role(ms: &[Manifest]) -> Vec<String> {
    let roles: Vec<_> = find(ms, |o| if let Object::ClusterRole(r) = o { Some(r) } else { None });
    let (origin, role) = match roles.iter().find(|(_, r)| r.metadata.name.as_deref() == Some(AGENT))
    {
        Some(found) => *found,
        None => return vec![format!("no ClusterRole named {AGENT} under deploy/")],
    };
    let mut errors = Vec::new();
    if role.aggregation_rule.is_some() {
        errors.push(format!(
            "{origin}: field aggregationRule: the agent's role must not aggregate others"
        ));
    }
    let mut granted = BTreeSet::new();
    for (i, rule) in role.rules.iter().flatten().enumerate() {
        let at = format!("{origin}: field rules[{i}]");
        if rule.resource_names.as_ref().is_some_and(|n| !n.is_empty()) {
            errors.push(format!("{at}.resourceNames: API_ACCESS names no objects"));
        }
        if rule.non_resource_urls.as_ref().is_some_and(|n| !n.is_empty()) {
            errors.push(format!("{at}.nonResourceURLs: API_ACCESS has none"));
        }
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        for (field, values) in
            [("apiGroups", &groups), ("resources", &resources), ("verbs", &rule.verbs)]
        {
            if values.iter().any(|v| v.contains('*')) {
                errors.push(format!(
                    "{at}.{field}: wildcard {values:?}; grant exactly what API_ACCESS lists"
                ));
            }
            if values.is_empty() {
                errors.push(format!("{at}.{field}: empty, so the rule grants nothing"));
            }
        }
        for group in &groups {
            for resource in &resources {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let wanted: BTreeSet<(String, String, String)> = API_ACCESS
        .iter()
        .flat_map(|a| {
            a.verbs
                .iter()
                .map(move |v| (a.group.to_string(), a.resource.to_string(), v.to_string()))
        })
        .collect();
    let show = |s: &BTreeSet<(String, String, String)>| {
        s.iter()
            .map(|(g, r, v)| format!("{v} {r}.{}", if g.is_empty() { "core" } else { g }))
            .collect::<Vec<_>>()
    };
    let missing: BTreeSet<_> = wanted.difference(&granted).cloned().collect();
    let extra: BTreeSet<_> = granted.difference(&wanted).cloned().collect();
    if !missing.is_empty() {
        errors.push(format!(
            "{origin}: field rules: missing from the role but in API_ACCESS: {:?}",
            show(&missing)
        ));
    }
    if !extra.is_empty() {
        errors.push(format!(
            "{origin}: field rules: granted but not in API_ACCESS: {:?}",
            show(&extra)
        ));
    }
    errors
}

/// The role is bound, once, to exactly the ServiceAccount the DaemonSet runs as; that account
/// exists and keeps its token; nothing else is bound to it.
fn check_binding(ms: &[Manifest]) -> Vec<String> {
    let (ds_origin, ds) = match agent_daemon_set(ms) {
        Ok(found) => found,
        Err(e) => return vec![e],
    };
    let spec = match pod_spec(ds_origin, ds) {
        Ok(spec) => spec,
        Err(e) => return vec![e],
    };
    let mut errors = Vec::new();
    let account = spec.service_account_name.clone().unwrap_or_else(|| "default".into());
    let namespace = ds.metadata.namespace.clone().unwrap_or_default();
    if account != AGENT {
        errors.push(format!(
            "{ds_origin}: field spec.template.spec.serviceAccountName: is {account:?}, must be {AGENT:?}"
        ));
    }
    if spec.automount_service_account_token == Some(false) {
        errors.push(format!(
            "{ds_origin}: field spec.template.spec.automountServiceAccountToken: the agent needs its token"
        ));
    }
    let accounts: Vec<_> =
        find(ms, |o| if let Object::ServiceAccount(s) = o { Some(s) } else { None });
    match accounts.iter().find(|(_, s)| {
        s.metadata.name.as_deref() == Some(account.as_str())
            && s.metadata.namespace.as_deref() == Some(&namespace)
    }) {
        None => errors.push(format!(
            "no ServiceAccount {namespace}/{account} (the DaemonSet's) under deploy/"
        )),
        Some((origin, s)) if s.automount_service_account_token == Some(false) => errors.push(
            format!("{origin}: field automountServiceAccountToken: the agent needs its token"),
        ),
        Some(_) => {}
    }
    let bindings: Vec<_> =
        find(ms, |o| if let Object::ClusterRoleBinding(b) = o { Some(b) } else { None });
    let is_agent_account = |s: &k8s_openapi::api::rbac::v1::Subject| {
        s.kind == "ServiceAccount"
            && s.name == account
            && s.namespace.as_deref() == Some(&namespace)
    };
    let mut bound = 0;
    for (origin, binding) in &bindings {
        let role = &binding.role_ref;
        let to_agent_role = role.kind == "ClusterRole"
            && role.name == AGENT
            && role.api_group == "rbac.authorization.k8s.io";
        let subjects = binding.subjects.clone().unwrap_or_default();
        if to_agent_role {
            bound += 1;
            if subjects.len() != 1 || !is_agent_account(&subjects[0]) {
                errors.push(format!(
                    "{origin}: field subjects: must be exactly the ServiceAccount {namespace}/{account}, is {:?}",
                    subjects.iter().map(|s| format!("{} {:?}/{}", s.kind, s.namespace, s.name)).collect::<Vec<_>>()
                ));
            }
        } else if subjects.iter().any(is_agent_account) {
            errors.push(format!(
                "{origin}: field roleRef: binds {} {} to the agent's account; it must hold only ClusterRole {AGENT}",
                role.kind, role.name
            ));
        }
    }
    if bound != 1 {
        errors.push(format!(
            "{bound} ClusterRoleBindings bind ClusterRole {AGENT}; there must be one"
        ));
    }
    errors
}

/// The DaemonSet's pod-level settings: a node proxy on every Linux node.
fn check_daemon_set(ms: &[Manifest]) -> Vec<String> {
    let (origin, ds) = match agent_daemon_set(ms) {
        Ok(found) => found,
        Err(e) => return vec![e],
    };
    let spec = match pod_spec(origin, ds) {
        Ok(spec) => spec,
        Err(e) => return vec![e],
    };
    let mut errors = Vec::new();
    let mut expect = |ok: bool, field: &str, what: &str| {
        if !ok {
            errors.push(format!("{origin}: field {field}: {what}"));
        }
    };
    let ds_spec = ds.spec.as_ref().expect("checked by pod_spec");
    let labels =
        ds_spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    let selector = ds_spec.selector.match_labels.clone().unwrap_or_default();
    expect(
        !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "spec.selector.matchLabels",
        "must be non-empty and match spec.template.metadata.labels",
    );
    let strategy = ds_spec.update_strategy.as_ref();
    expect(
        strategy.and_then(|s| s.type_.as_deref()) == Some("RollingUpdate")
            && strategy
                .and_then(|s| s.rolling_update.as_ref())
                .and_then(|r| r.max_unavailable.as_ref())
                == Some(&IntOrString::String("10%".into())),
        "spec.updateStrategy",
        "must be RollingUpdate with maxUnavailable 10%",
    );
    let at = "spec.template.spec";
    expect(
        spec.host_network == Some(true),
        &format!("{at}.hostNetwork"),
        "must be true (healthz on the node's address)",
    );
    expect(spec.host_pid != Some(true), &format!("{at}.hostPID"), "not needed; must not be true");
    expect(spec.host_ipc != Some(true), &format!("{at}.hostIPC"), "not needed; must not be true");
    expect(
        spec.priority_class_name.as_deref() == Some("system-node-critical"),
        &format!("{at}.priorityClassName"),
        "must be system-node-critical",
    );
    expect(
        spec.termination_grace_period_seconds == Some(30),
        &format!("{at}.terminationGracePeriodSeconds"),
        "must be 30",
    );
    expect(
        spec.node_selector.as_ref().and_then(|s| s.get("kubernetes.io/os")).map(String::as_str)
            == Some("linux"),
        &format!("{at}.nodeSelector"),
        "must select kubernetes.io/os: linux",
    );
    let tolerations = spec.tolerations.clone().unwrap_or_default();
    expect(
        tolerations.iter().any(|t| {
            t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()
                && t.toleration_seconds.is_none()
        }),
        &format!("{at}.tolerations"),
        "must tolerate every taint (operator: Exists, no key, no effect), like kube-proxy",
    );
    expect(
        tolerations.iter().any(|t| {
            t.key.as_deref() == Some("CriticalAddonsOnly")
                && t.operator.as_deref() == Some("Exists")
        }),
        &format!("{at}.tolerations"),
        "must tolerate CriticalAddonsOnly",
    );
    errors
}

/// The agent container: capabilities, security context, probes, volumes, and flags that agree
/// with them; and the init container that mounts bpffs for it.
fn check_agent_container(ms: &[Manifest]) -> Vec<String> {
    let (origin, ds) = match agent_daemon_set(ms) {
        Ok(found) => found,
        Err(e) => return vec![e],
    };
    let spec = match pod_spec(origin, ds) {
        Ok(spec) => spec,
        Err(e) => return vec![e],
    };
    let mut errors = Vec::new();
    let base = "spec.template.spec";
    let agents: Vec<_> =
        spec.containers.iter().enumerate().filter(|(_, c)| c.name == AGENT).collect();
    let [(index, agent)] = agents.as_slice() else {
        return vec![format!(
            "{origin}: field {base}.containers: needs exactly one container named {AGENT}"
        )];
    };
    let at = format!("{base}.containers[{index}]");
    if !runs_kproxy(agent) {
        errors.push(format!("{origin}: field {at}.command: must run {IMAGE_BINARY}"));
    }
    if agent.args.as_ref().and_then(|a| a.first()).map(String::as_str) != Some("run") {
        errors.push(format!("{origin}: field {at}.args[0]: must be `run`"));
    }

    // Privileges: in the DaemonSet only the bpffs init container may be privileged.
    for (path, container, init) in containers(spec, base) {
        let privileged =
            container.security_context.as_ref().and_then(|s| s.privileged) == Some(true);
        if privileged && !(init && is_bpffs_mounter(spec, container)) {
            errors.push(format!(
                "{origin}: field {path}.securityContext.privileged: only the init container that mounts \
                 bpffs (and mounts nothing else) may be privileged"
            ));
        }
    }
    let sc = agent.security_context.clone().unwrap_or_default();
    if sc.privileged == Some(true) {
        errors.push(format!("{origin}: field {at}.securityContext.privileged: must not be true"));
    }
    if sc.read_only_root_filesystem != Some(true) {
        errors.push(format!(
            "{origin}: field {at}.securityContext.readOnlyRootFilesystem: must be true"
        ));
    }
    if sc.run_as_user != Some(0) {
        errors.push(format!("{origin}: field {at}.securityContext.runAsUser: must be 0 (capabilities apply to root only)"));
    }
    errors.extend(check_capabilities(origin, &at, agent, AGENT_CAPABILITIES));

    // Probes on kube-proxy's healthz port.
    errors.extend(check_probe(
        origin,
        &format!("{at}.readinessProbe"),
        agent.readiness_probe.as_ref(),
        &["/healthz"],
        true,
    ));
    errors.extend(check_probe(
        origin,
        &format!("{at}.livenessProbe"),
        agent.liveness_probe.as_ref(),
        &["/livez", "/healthz"],
        true,
    ));
    errors.extend(check_probe(
        origin,
        &format!("{at}.startupProbe"),
        agent.startup_probe.as_ref(),
        &["/livez", "/healthz"],
        false,
    ));

    // Arguments as the kubelet expands them, and the mounts they point at.
    let args = match expanded_args(ms, origin, &at, agent) {
        Ok(args) => args,
        Err(mut e) => {
            errors.append(&mut e);
            return errors;
        }
    };
    let flag = |name: &str| flag_value(&args, name);
    let node_name_from_downward_api = agent.env.iter().flatten().any(|e| {
        e.name == "NODE_NAME"
            && e.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str())
                == Some("spec.nodeName")
    });
    if !node_name_from_downward_api
        || agent.args.iter().flatten().all(|a| a != "--hostname-override=$(NODE_NAME)")
    {
        errors.push(format!(
            "{origin}: field {at}.args: must pass --hostname-override=$(NODE_NAME), with NODE_NAME from the \
             downward API's spec.nodeName"
        ));
    }
    for name in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        if !agent.env.iter().flatten().any(|e| e.name == name) {
            errors.push(format!(
                "{origin}: field {at}.env: must set {name}, so that the agent reaches the apiserver directly \
                 and not through the `kubernetes` Service it programs itself"
            ));
        }
    }
    // Without the flag, the default (0.0.0.0:10256) applies.
    if let Some(address) = flag("--healthz-bind-address") {
        let loopback = ["127.", "localhost", "[::1]"].iter().any(|p| address.starts_with(p));
        if loopback || !address.ends_with(&format!(":{HEALTHZ_PORT}")) {
            errors.push(format!(
                "{origin}: field {at}.args: --healthz-bind-address expands to {address:?}; the probes need \
                 port {HEALTHZ_PORT} on the node's address"
            ));
        }
    }
    errors.extend(check_host_mounts(origin, &at, spec, agent, &args, Some("HostToContainer")));
    if flag("--cgroup").is_none() {
        errors.push(format!(
            "{origin}: field {at}.args: needs --cgroup: the default comes from the container's own \
             /proc/self/mountinfo, i.e. its cgroup namespace, and would translate only the agent itself"
        ));
    }

    // The agent lacks CAP_SYS_ADMIN, so an init container must make sure bpffs is mounted.
    if !spec.init_containers.iter().flatten().any(|c| is_bpffs_mounter(spec, c)) {
        errors.push(format!(
            "{origin}: field {base}.initContainers: needs the privileged init container that mounts bpffs on \
             the host (`mount -t bpf bpf {HOST_BPFFS}`, Bidirectional propagation): the agent has no \
             CAP_SYS_ADMIN to do it"
        ));
    }
    errors
}

/// A container that runs the kproxy binary of the image.
fn runs_kproxy(c: &Container) -> bool {
    match &c.command {
        Some(command) => command.len() == 1 && command[0] == IMAGE_BINARY,
        None => {
            c.image.as_deref().is_some_and(|i| i.contains("/kproxy:") || i.ends_with("/kproxy"))
        }
    }
}

/// An init container that mounts the host's bpffs, and nothing else.
fn is_bpffs_mounter(spec: &PodSpec, c: &Container) -> bool {
    let mounts = c.volume_mounts.clone().unwrap_or_default();
    let script = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    mounts.len() == 1
        && mounts[0].mount_path == HOST_BPFFS
        && mounts[0].mount_propagation.as_deref() == Some("Bidirectional")
        && host_path(spec, &mounts[0]) == Some(HOST_BPFFS)
        && script.contains(&format!("mount -t bpf bpf {HOST_BPFFS}"))
}

fn host_path<'a>(spec: &'a PodSpec, mount: &VolumeMount) -> Option<&'a str> {
    spec.volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.host_path.as_ref())
        .map(|h| h.path.as_str())
}

fn check_capabilities(origin: &Origin, at: &str, c: &Container, wanted: &[&str]) -> Vec<String> {
    let mut errors = Vec::new();
    let caps = c.security_context.as_ref().and_then(|s| s.capabilities.clone()).unwrap_or_default();
    if caps.drop.as_deref() != Some(&["ALL".to_string()][..]) {
        errors.push(format!(
            "{origin}: field {at}.securityContext.capabilities.drop: must be [ALL], is {:?}",
            caps.drop
        ));
    }
    let added = caps.add.clone().unwrap_or_default();
    let normal: Vec<String> =
        added.iter().map(|c| c.trim_start_matches("CAP_").to_ascii_uppercase()).collect();
    let set: BTreeSet<&str> = normal.iter().map(String::as_str).collect();
    if set.len() != added.len() {
        errors.push(format!("{origin}: field {at}.securityContext.capabilities.add: lists a capability twice: {added:?}"));
    }
    let wanted: BTreeSet<&str> = wanted.iter().copied().collect();
    if set != wanted {
        errors.push(format!(
            "{origin}: field {at}.securityContext.capabilities.add: must be exactly {wanted:?} (see \
             docs/migrating-from-kube-proxy.md), is {added:?}; extra: {:?}, missing: {:?}",
            set.difference(&wanted).collect::<Vec<_>>(),
            wanted.difference(&set).collect::<Vec<_>>()
        ));
    }
    errors
}

fn check_probe(
    origin: &Origin,
    at: &str,
    probe: Option<&Probe>,
    paths: &[&str],
    required: bool,
) -> Vec<String> {
    let Some(probe) = probe else {
        return if required { vec![format!("{origin}: field {at}: missing")] } else { vec![] };
    };
    let Some(get) = probe.http_get.as_ref() else {
        return vec![format!("{origin}: field {at}: must be an httpGet probe")];
    };
    let mut errors = Vec::new();
    if get.port != IntOrString::Int(HEALTHZ_PORT) {
        errors.push(format!(
            "{origin}: field {at}.httpGet.port: must be {HEALTHZ_PORT}, is {:?}",
            get.port
        ));
    }
    if !get.path.as_deref().is_some_and(|p| paths.contains(&p)) {
        errors.push(format!(
            "{origin}: field {at}.httpGet.path: must be one of {paths:?}, is {:?}",
            get.path
        ));
    }
    if get.host.is_some() || get.scheme.as_deref().is_some_and(|s| s != "HTTP") {
        errors.push(format!(
            "{origin}: field {at}.httpGet: plain HTTP to the pod's (the node's) address"
        ));
    }
    errors
}

/// `--bpffs-dir` lies on a writable mount of the host's bpffs, and `--cgroup` is the mount point of
/// the host's cgroup2 root.
fn check_host_mounts(
    origin: &Origin,
    at: &str,
    spec: &PodSpec,
    c: &Container,
    args: &[String],
    propagation: Option<&str>,
) -> Vec<String> {
    let mut errors = Vec::new();
    let mounts = c.volume_mounts.clone().unwrap_or_default();
    let bpffs_dir =
        flag_value(args, "--bpffs-dir").unwrap_or_else(|| DEFAULT_BPFFS_DIR.to_string());
    match mounts.iter().find(|m| Path::new(&bpffs_dir).starts_with(&m.mount_path)) {
        Some(m) if host_path(spec, m) == Some(HOST_BPFFS) && m.read_only != Some(true) => {
            if propagation.is_some() && m.mount_propagation.as_deref() != propagation {
                errors.push(format!(
                    "{origin}: field {at}.volumeMounts: the bpffs mount needs mountPropagation {:?}",
                    propagation.unwrap_or_default()
                ));
            }
            let volume = spec.volumes.iter().flatten().find(|v| v.name == m.name).and_then(|v| v.host_path.clone());
            if let Some(volume) = volume {
                if !matches!(volume.type_.as_deref(), Some("DirectoryOrCreate" | "Directory")) {
                    errors.push(format!(
                        "{origin}: volume {}: hostPath {HOST_BPFFS} should have type DirectoryOrCreate",
                        m.name
                    ));
                }
            }
        }
        _ => errors.push(format!(
            "{origin}: field {at}.volumeMounts: --bpffs-dir {bpffs_dir} is not on a writable mount of the \
             host's {HOST_BPFFS} (a hostPath volume): pins would die with the container"
        )),
    }
    if let Some(cgroup) = flag_value(args, "--cgroup") {
        let root = mounts
            .iter()
            .find(|m| m.mount_path.trim_end_matches('/') == cgroup.trim_end_matches('/'))
            .and_then(|m| host_path(spec, m));
        if !root.is_some_and(|r| HOST_CGROUP2_ROOTS.contains(&r.trim_end_matches('/'))) {
            errors.push(format!(
                "{origin}: field {at}.volumeMounts: --cgroup {cgroup} must be the mount point of a hostPath \
                 volume of the host's cgroup2 root (one of {HOST_CGROUP2_ROOTS:?})"
            ));
        }
    }
    errors
}

/// The value of `--name=value` or `--name value` in expanded arguments.
fn flag_value(args: &[String], name: &str) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| {
        if let Some(value) = a.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')) {
            Some(value.to_string())
        } else if a == name {
            args.get(i + 1).cloned()
        } else {
            None
        }
    })
}

/// The container's environment as the kubelet builds it from these manifests: literal values,
/// ConfigMap keys (which must exist) and the downward API's spec.nodeName.
fn environment(
    ms: &[Manifest],
    origin: &Origin,
    at: &str,
    c: &Container,
) -> Result<BTreeMap<String, String>, Vec<String>> {
    let namespace = NAMESPACE;
    let mut env = BTreeMap::new();
    let mut errors = Vec::new();
    if c.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        errors.push(format!("{origin}: field {at}.envFrom: name each variable in env instead"));
    }
    for (i, var) in c.env.iter().flatten().enumerate() {
        let field = format!("{origin}: field {at}.env[{i}] ({})", var.name);
        let value = match (&var.value, &var.value_from) {
            (Some(value), None) => Some(value.clone()),
            (None, Some(from)) => {
                if let Some(key_ref) = &from.config_map_key_ref {
                    if key_ref.optional == Some(true) {
                        errors.push(format!(
                            "{field}: optional ConfigMap keys hide typos; drop `optional`"
                        ));
                    }
                    let map = config_maps(ms).into_iter().find(|(_, m)| {
                        m.metadata.name.as_deref() == Some(key_ref.name.as_str())
                            && m.metadata.namespace.as_deref() == Some(namespace)
                    });
                    match map {
                        None => {
                            errors.push(format!(
                                "{field}: no ConfigMap {namespace}/{} under deploy/",
                                key_ref.name
                            ));
                            None
                        }
                        Some((_, map)) => match map.data.as_ref().and_then(|d| d.get(&key_ref.key))
                        {
                            Some(value) => Some(value.clone()),
                            None => {
                                errors.push(format!(
                                    "{field}: ConfigMap {} has no key {:?}",
                                    key_ref.name, key_ref.key
                                ));
                                None
                            }
                        },
                    }
                } else if let Some(field_ref) = &from.field_ref {
                    match field_ref.field_path.as_str() {
                        "spec.nodeName" => Some(EXAMPLE_NODE_NAME.to_string()),
                        other => {
                            errors.push(format!(
                                "{field}: this test does not know fieldRef {other:?}"
                            ));
                            None
                        }
                    }
                } else {
                    errors.push(format!(
                        "{field}: only value, configMapKeyRef and fieldRef are used here"
                    ));
                    None
                }
            }
            _ => {
                errors.push(format!("{field}: needs exactly one of value and valueFrom"));
                None
            }
        };
        if let Some(value) = value {
            env.insert(var.name.clone(), value);
        }
    }
    if errors.is_empty() {
        Ok(env)
    } else {
        Err(errors)
    }
}

/// Kubernetes' `$(VAR)` expansion; a reference to an undefined variable stays as written (so it
/// is reported), `$$` is a literal `$`.
fn expand(arg: &str, env: &BTreeMap<String, String>, undefined: &mut Vec<String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|a| a.split_once(')')) {
            match env.get(name) {
                Some(value) => out.push_str(value),
                None => {
                    undefined.push(name.to_string());
                    out.push_str(&format!("$({name})"));
                }
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn expanded_args(
    ms: &[Manifest],
    origin: &Origin,
    at: &str,
    c: &Container,
) -> Result<Vec<String>, Vec<String>> {
    let env = environment(ms, origin, at, c)?;
    let mut undefined = Vec::new();
    let args: Vec<String> =
        c.args.iter().flatten().map(|a| expand(a, &env, &mut undefined)).collect();
    if undefined.is_empty() {
        Ok(args)
    } else {
        Err(vec![format!(
            "{origin}: field {at}.args: refers to {undefined:?}, which the container's env does not define \
             (the kubelet would pass `$(NAME)` literally)"
        )])
    }
}

/// Every ConfigMap key is read by some container: an unused key is a setting with no effect.
fn check_config_maps_used(ms: &[Manifest]) -> Vec<String> {
    let mut used = BTreeSet::new();
    for m in ms {
        let spec = match &m.object {
            Object::DaemonSet(d) => d.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
            Object::Pod(p) => p.spec.as_ref(),
            _ => None,
        };
        for (_, c, _) in spec.map(|s| containers(s, "")).unwrap_or_default() {
            for var in c.env.iter().flatten() {
                if let Some(r) = var.value_from.as_ref().and_then(|v| v.config_map_key_ref.as_ref())
                {
                    used.insert((r.name.clone(), r.key.clone()));
                }
            }
        }
    }
    let mut errors = Vec::new();
    for (origin, map) in config_maps(ms) {
        let name = map.metadata.name.clone().unwrap_or_default();
        for key in map.data.iter().flat_map(|d| d.keys()) {
            if !used.contains(&(name.clone(), key.clone())) {
                errors.push(format!("{origin}: field data[{key:?}]: no container reads this key"));
            }
        }
    }
    errors
}

/// The one-off Pods under deploy/migration/: `kproxy cleanup` with its own capability set and the
/// same host mounts as the agent.
fn check_cleanup_pods(ms: &[Manifest]) -> Vec<String> {
    let mut errors = Vec::new();
    for (origin, pod) in pods(ms) {
        let Some(spec) = pod.spec.as_ref() else {
            errors.push(format!("{origin}: field spec is missing"));
            continue;
        };
        if spec.restart_policy.as_deref() != Some("Never") {
            errors.push(format!("{origin}: field spec.restartPolicy: a one-off Pod must be Never"));
        }
        for (at, c, _) in containers(spec, "spec") {
            if !runs_kproxy(c) {
                continue;
            }
            errors.extend(check_capabilities(origin, &at, c, CLEANUP_CAPABILITIES));
            match expanded_args(ms, origin, &at, c) {
                Ok(args) => errors.extend(check_host_mounts(origin, &at, spec, c, &args, None)),
                Err(mut e) => errors.append(&mut e),
            }
        }
    }
    errors
}

// ---------------------------------------------------------------------------------------------
// The built binary

fn kproxy(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {} {args:?}: {e}", env!("CARGO_BIN_EXE_kproxy")))
}

/// The flags `kproxy <subcommand> --help` lists (from the option lines only, not the prose).
fn help_flags(subcommand: &str) -> BTreeSet<String> {
    let out = kproxy(&[subcommand.to_string(), "--help".to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kproxy {subcommand} --help failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| {
            l.split([' ', ','])
                .take_while(|t| t.is_empty() || t.starts_with('-'))
                .filter(|t| t.starts_with("--"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every kproxy container's flags exist in its subcommand's --help, and its expanded arguments
/// parse (`kproxy <args> --help`: clap checks each value as it reads it, then prints help before
/// looking for required flags).
fn check_flags(ms: &[Manifest]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut helps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for m in ms {
        let spec = match &m.object {
            Object::DaemonSet(d) => d
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .map(|s| (s, "spec.template.spec")),
            Object::Pod(p) => p.spec.as_ref().map(|s| (s, "spec")),
            _ => None,
        };
        let Some((spec, base)) = spec else { continue };
        for (at, c, _) in containers(spec, base) {
            if !runs_kproxy(c) {
                continue;
            }
            let raw = c.args.clone().unwrap_or_default();
            let Some(subcommand) = raw.first().filter(|s| !s.starts_with('-')) else {
                errors.push(format!(
                    "{}: field {at}.args[0]: must be the kproxy subcommand",
                    m.origin
                ));
                continue;
            };
            let known = helps.entry(subcommand.clone()).or_insert_with(|| help_flags(subcommand));
            if known.is_empty() {
                errors.push(format!(
                    "{}: field {at}.args[0]: `kproxy {subcommand} --help` lists no flags",
                    m.origin
                ));
                continue;
            }
            for (i, arg) in raw.iter().enumerate().skip(1) {
                if let Some(flag) = arg
                    .strip_prefix("--")
                    .map(|f| format!("--{}", f.split('=').next().unwrap_or("")))
                {
                    if !known.contains(&flag) {
                        errors.push(format!(
                            "{}: field {at}.args[{i}]: `kproxy {subcommand}` has no flag {flag} (its --help lists {:?})",
                            m.origin,
                            known.iter().collect::<Vec<_>>()
                        ));
                    }
                }
            }
            match expanded_args(ms, &m.origin, &at, c) {
                Ok(mut args) => {
                    args.push("--help".into());
                    let out = kproxy(&args);
                    if !out.status.success() {
                        errors.push(format!(
                            "{}: field {at}.args: kproxy rejects them as the kubelet expands them ({args:?}): {}",
                            m.origin,
                            String::from_utf8_lossy(&out.stderr).trim()
                        ));
                    }
                }
                Err(mut e) => errors.append(&mut e),
            }
        }
    }
    errors
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn every_document_is_a_known_kind_without_unknown_fields() {
    let ms = manifests();
    assert_clean("objects in the wrong namespace or defined twice", check_namespaces(&ms));
}

#[test]
fn cluster_role_grants_exactly_api_access() {
    assert_clean(
        "the ClusterRole differs from kproxy::sources::apiserver::API_ACCESS",
        check_cluster_role(&manifests()),
    );
}

#[test]
fn binding_gives_the_role_to_the_daemon_sets_service_account_only() {
    assert_clean("RBAC binding", check_binding(&manifests()));
}

#[test]
fn daemon_set_is_a_node_proxy_on_every_node() {
    assert_clean("the DaemonSet", check_daemon_set(&manifests()));
}

#[test]
fn agent_has_the_documented_capabilities_probes_and_host_mounts() {
    assert_clean("the agent container", check_agent_container(&manifests()));
}

#[test]
fn every_config_map_key_is_used() {
    assert_clean("ConfigMap keys", check_config_maps_used(&manifests()));
}

#[test]
fn cleanup_pods_have_their_capabilities_and_mounts() {
    assert_clean("the cleanup Pods", check_cleanup_pods(&manifests()));
}

#[test]
fn kproxy_accepts_every_flag_of_the_manifests() {
    assert_clean("flags kproxy does not accept", check_flags(&manifests()));
}

// The checks themselves: each one, given a broken copy of the manifests, must complain.

/// The real documents with one edit applied to the first document of `kind` named `name`.
fn broken(kind: &str, name: &str, edit: impl FnOnce(&mut Value)) -> Vec<RawDoc> {
    let mut docs = raw_docs();
    let doc = docs
        .iter_mut()
        .find(|d| d.value["kind"] == kind && d.value["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} to break"));
    edit(&mut doc.value);
    docs
}

fn broken_manifests(kind: &str, name: &str, edit: impl FnOnce(&mut Value)) -> Vec<Manifest> {
    type_docs(&broken(kind, name, edit))
        .unwrap_or_else(|e| fail("the broken copy should still parse", &e))
}

fn expect_error(errors: Vec<String>, needles: &[&str]) {
    assert!(
        errors.iter().any(|e| needles.iter().all(|n| e.contains(n))),
        "expected an error containing {needles:?}, got {errors:#?}"
    );
}

fn agent_container(doc: &mut Value) -> &mut Value {
    doc.pointer_mut("/spec/template/spec/containers/0").expect("the agent container")
}

#[test]
fn an_unknown_field_is_reported_with_its_path() {
    let docs = broken("DaemonSet", AGENT, |d| {
        d["spec"]["template"]["spec"]["hostNetwok"] = Value::Bool(true);
        agent_container(d)["securityContext"]["capabilites"] =
            serde_json::json!({"add": ["SYS_ADMIN"]});
    });
    let errors = type_docs(&docs).expect_err("unknown fields must fail");
    expect_error(
        errors.clone(),
        &[
            "deploy/kproxy.yaml",
            "DaemonSet kproxy",
            "spec.template.spec.hostNetwok",
            "unknown field",
        ],
    );
    expect_error(
        errors,
        &["spec.template.spec.containers[0].securityContext.capabilites", "unknown field"],
    );
}

#[test]
fn a_null_value_an_unknown_kind_and_bad_yaml_are_reported() {
    // The type reads a null as absent, so a misspelt key with a null value would go unnoticed.
    let docs =
        broken("DaemonSet", AGENT, |d| d["spec"]["template"]["spec"]["hostNetwok"] = Value::Null);
    expect_error(
        type_docs(&docs).expect_err("null must fail"),
        &["spec.template.spec.hostNetwok", "null value"],
    );
    let docs = parse_text("x.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n")
        .unwrap();
    expect_error(
        type_docs(&docs).expect_err("unknown kind must fail"),
        &["x.yaml, document 1", "unknown kind \"Deployment\""],
    );
    let docs = parse_text(
        "x.yaml",
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x}\nkind: Pod\n",
    );
    assert!(docs.is_err(), "a duplicate key must fail: {docs:?}");
    let docs = parse_text(
        "x.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: 1}\n",
    )
    .unwrap();
    expect_error(
        type_docs(&docs).expect_err("a number in ConfigMap data must fail"),
        &["field data.a"],
    );
}

#[test]
fn an_extra_or_missing_grant_is_reported() {
    let ms = broken_manifests("ClusterRole", AGENT, |d| {
        d["rules"][0]["verbs"].as_array_mut().unwrap().push("delete".into());
        d["rules"].as_array_mut().unwrap().pop();
    });
    let errors = check_cluster_role(&ms);
    expect_error(errors.clone(), &["granted but not in API_ACCESS", "delete services.core"]);
    expect_error(errors, &["missing from the role", "create events.events.k8s.io"]);
    let ms = broken_manifests("ClusterRole", AGENT, |d| {
        d["rules"][1]["resourceNames"] = serde_json::json!(["x"])
    });
    expect_error(check_cluster_role(&ms), &["rules[1].resourceNames"]);
    let ms = broken_manifests("ClusterRole", AGENT, |d| {
        d["rules"][0]["verbs"] = serde_json::json!(["*"])
    });
    expect_error(check_cluster_role(&ms), &["rules[0].verbs", "wildcard"]);
}

#[test]
fn a_binding_to_another_account_is_reported() {
    let ms = broken_manifests("ClusterRoleBinding", AGENT, |d| {
        d["subjects"][0]["name"] = "default".into()
    });
    expect_error(
        check_binding(&ms),
        &["field subjects", "exactly the ServiceAccount kube-system/kproxy"],
    );
    let ms = broken_manifests("DaemonSet", AGENT, |d| {
        d["spec"]["template"]["spec"]["serviceAccountName"] = "other".into()
    });
    expect_error(check_binding(&ms), &["serviceAccountName"]);
}

#[test]
fn privileges_and_capabilities_beyond_the_documented_set_are_reported() {
    let ms = broken_manifests("DaemonSet", AGENT, |d| {
        agent_container(d)["securityContext"]["capabilities"]["add"]
            .as_array_mut()
            .unwrap()
            .push("SYS_ADMIN".into())
    });
    expect_error(check_agent_container(&ms), &["capabilities.add", "extra: [\"SYS_ADMIN\"]"]);
    let ms = broken_manifests("DaemonSet", AGENT, |d| {
        agent_container(d)["securityContext"]["privileged"] = true.into()
    });
    expect_error(check_agent_container(&ms), &["containers[0].securityContext.privileged"]);
    let ms = broken_manifests("DaemonSet", AGENT, |d| {
        d["spec"]["template"]["spec"]["hostNetwork"] = false.into()
    });
    expect_error(check_daemon_set(&ms), &["spec.template.spec.hostNetwork"]);
}

#[test]
fn wrong_probes_and_mounts_are_reported() {
    let ms = broken_manifests("DaemonSet", AGENT, |d| {
        agent_container(d)["readinessProbe"]["httpGet"]["port"] = 10249.into()
    });
    expect_error(check_agent_container(&ms), &["readinessProbe.httpGet.port"]);
    let ms = broken_manifests("DaemonSet", AGENT, |d| {
        let args = agent_container(d)["args"].as_array_mut().unwrap();
        args.retain(|a| !a.as_str().unwrap().starts_with("--cgroup"));
    });
    expect_error(check_agent_container(&ms), &["needs --cgroup"]);
    let ms = broken_manifests("DaemonSet", AGENT, |d| {
        agent_container(d)["volumeMounts"][0]["mountPath"] = "/run/kproxy/bpf".into();
    });
    expect_error(
        check_agent_container(&ms),
        &["--bpffs-dir /sys/fs/bpf/kproxy is not on a writable mount"],
    );
    let ms = broken_manifests("ConfigMap", "kproxy-config", |d| {
        d["data"]["healthz-bind-address"] = "127.0.0.1:10256".into()
    });
    expect_error(
        check_agent_container(&ms),
        &["--healthz-bind-address expands to \"127.0.0.1:10256\""],
    );
}

#[test]
fn unknown_flags_bad_values_and_dangling_references_are_reported() {
    let ms = broken_manifests("DaemonSet", AGENT, |d| {
        agent_container(d)["args"].as_array_mut().unwrap().push("--no-such-flag=1".into())
    });
    expect_error(check_flags(&ms), &["has no flag --no-such-flag"]);
    let ms = broken_manifests("ConfigMap", "kproxy-config", |d| {
        d["data"]["sync-period"] = "30 parsecs".into()
    });
    expect_error(check_flags(&ms), &["kproxy rejects them", "30 parsecs"]);
    let ms = broken_manifests("DaemonSet", AGENT, |d| {
        agent_container(d)["args"]
            .as_array_mut()
            .unwrap()
            .push("--sync-period=$(KPROXY_SYNC_PERIDO)".into())
    });
    expect_error(check_flags(&ms), &["KPROXY_SYNC_PERIDO", "does not define"]);
    let ms = broken_manifests("ConfigMap", "kproxy-config", |d| {
        d["data"].as_object_mut().unwrap().remove("max-backends");
        d["data"]["max-backend"] = "1".into();
    });
    expect_error(
        check_agent_container(&ms),
        &["ConfigMap kproxy-config has no key \"max-backends\""],
    );
    expect_error(check_config_maps_used(&ms), &["data[\"max-backend\"]", "no container reads"]);
}
