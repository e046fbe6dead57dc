//! The fake apiserver's state: objects, one global resourceVersion counter (as etcd has), a
//! bounded event history per resource, the open watches, list snapshots for pagination, posted
//! Events and the request log. Everything here is synchronous and runs under one mutex; the
//! HTTP side (`server.rs`) only translates requests into calls on [`Store`].

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::UnboundedSender;

use super::selector::{LabelSelector, Selectors};

/// How many events each resource keeps for watches that resume from a resourceVersion.
pub const DEFAULT_HISTORY_LIMIT: usize = 10_000;
/// How many paginated list snapshots (continue tokens) are kept.
const MAX_SNAPSHOTS: usize = 64;

/// A resource the fake server serves with list and watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    /// Served for `kproxy trace --pod` (a pod's `status.podIP`); the agent does not watch pods.
    Pod,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Service, Kind::EndpointSlice, Kind::Node, Kind::Pod];

    pub fn kind(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Service | Kind::Node | Kind::Pod => "v1",
        }
    }

    /// API group ("" for core) and version.
    pub fn group_version(self) -> (&'static str, &'static str) {
        match self {
            Kind::EndpointSlice => ("discovery.k8s.io", "v1"),
            Kind::Service | Kind::Node | Kind::Pod => ("", "v1"),
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
            Kind::Pod => "pods",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }

    /// The collection path: `/api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`.
    pub fn collection_path(self) -> String {
        match self.group_version() {
            ("", v) => format!("/api/{v}/{}", self.plural()),
            (g, v) => format!("/apis/{g}/{v}/{}", self.plural()),
        }
    }

    /// The kind of an object from its `apiVersion` and `kind`.
    pub fn of(object: &Value) -> Option<Kind> {
        let api_version = object.get("apiVersion").and_then(Value::as_str)?;
        let kind = object.get("kind").and_then(Value::as_str)?;
        Kind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.kind() == kind)
    }

    /// The kind served at `group`/`version`/`plural`.
    pub fn from_path(group: &str, version: &str, plural: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.group_version() == (group, version) && k.plural() == plural)
    }
}

/// An error the API answers with: a `Status` object and its HTTP code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn not_found(kind: &str, name: &str) -> ApiError {
        ApiError::new(404, "NotFound", format!("{kind} {name:?} not found"))
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    /// The `Status` object, as the apiserver sends it in bodies and watch ERROR events.
    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

/// What an open watch's response body receives.
#[derive(Debug)]
pub(crate) enum WatchMsg {
    /// One JSON event and its newline.
    Line(Bytes),
    /// End the response properly (final chunk).
    End,
    /// Abort the connection mid-stream, without a final chunk.
    Cut,
}

struct Watcher {
    kind: Kind,
    selectors: Selectors,
    bookmarks: bool,
    /// The resourceVersion the watch started from; bookmarks never go below it.
    start_rv: u64,
    tx: UnboundedSender<WatchMsg>,
}

/// One change, kept in the history for watches that resume.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    /// The object before (`None` for a creation).
    old: Option<Value>,
    /// The object after (`None` for a deletion).
    new: Option<Value>,
}

struct Snapshot {
    kind: Kind,
    rv: u64,
    items: Vec<Value>,
}

/// One request the server received.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// Position in the log, from 0.
    pub seq: usize,
    pub at: Instant,
    pub method: String,
    pub path: String,
    /// The raw query string (still URL-encoded).
    pub query: String,
    /// The decoded query parameters, in order.
    pub params: Vec<(String, String)>,
    /// The HTTP status answered (200 for a watch, whatever its events said).
    pub status: u16,
}

impl RequestRecord {
    /// The decoded value of query parameter `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch"), Some("true" | "1"))
    }

    /// A GET of a collection without `watch`.
    pub fn is_list_of(&self, kind: Kind) -> bool {
        self.method == "GET" && self.path == kind.collection_path() && !self.is_watch()
    }

    /// A watch of a (cluster-wide) collection.
    pub fn is_watch_of(&self, kind: Kind) -> bool {
        self.method == "GET" && self.path == kind.collection_path() && self.is_watch()
    }

    /// The parsed `labelSelector` (empty when absent).
    pub fn label_selector(&self) -> LabelSelector {
        LabelSelector::parse(self.param("labelSelector").unwrap_or("")).unwrap_or_default()
    }
}

/// Counters of what the server did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// List responses (pages) served.
    pub lists: u64,
    /// Watches started (including those answered with 410 at once).
    pub watches: u64,
    /// Watch events sent (ADDED, MODIFIED, DELETED).
    pub events_sent: u64,
    pub bookmarks_sent: u64,
    /// Watches answered with an ERROR event 410 Expired, and lists with an expired continue
    /// token.
    pub gone_sent: u64,
    /// Watches aborted by `cut_watches` or a restart.
    pub watches_cut: u64,
    /// Times the server stopped listening.
    pub restarts: u64,
}

/// The state behind the fake apiserver; see the module documentation of
/// [`crate::fake_apiserver`]. Reached through [`super::FakeApiServer::atomically`] when several
/// changes must happen without the agent seeing the states in between.
pub struct Store {
    rv: u64,
    objects: BTreeMap<Kind, BTreeMap<(String, String), Value>>,
    history: BTreeMap<Kind, VecDeque<Change>>,
    /// Per resource: events up to this resourceVersion may be forgotten; a watch from an older
    /// resourceVersion gets 410 Expired.
    compacted: BTreeMap<Kind, u64>,
    history_limit: usize,
    watchers: Vec<Watcher>,
    bookmarks_paused: bool,
    snapshots: BTreeMap<u64, Snapshot>,
    next_snapshot: u64,
    next_uid: u64,
    posted_events: Vec<Value>,
    requests: Vec<RequestRecord>,
    stats: Stats,
}

impl Default for Store {
    fn default() -> Self {
        Store::new(DEFAULT_HISTORY_LIMIT)
    }
}

fn now_timestamp() -> Value {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let Ok(now) = k8s_openapi::jiff::Timestamp::from_second(secs) else {
        return Value::Null;
    };
    let time = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now);
    serde_json::to_value(time).unwrap_or(Value::Null)
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

fn set_rv(object: &mut Value, rv: u64) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

/// The object without the fields the server maintains, to detect no-op updates.
fn comparable(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "generation",
            "managedFields",
        ] {
            meta.remove(field);
        }
    }
    o
}

/// JSON merge patch (RFC 7386).
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("made an object above");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// A list item as the apiserver sends it: without `kind` and `apiVersion`.
fn list_item(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(map) = o.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    o
}

fn event_line(ty: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": ty, "object": object}))
        .expect("serializing a JSON value");
    line.push(b'\n');
    Bytes::from(line)
}

/// What one watch sees of `change`: `None`, or the event type and object.
fn render(change: &Change, selectors: &Selectors) -> Option<(&'static str, Value)> {
    let old_matches = change.old.as_ref().is_some_and(|o| selectors.matches(o));
    let new_matches = change.new.as_ref().is_some_and(|o| selectors.matches(o));
    match (old_matches, new_matches) {
        (false, true) => Some(("ADDED", change.new.clone()?)),
        (true, true) => Some(("MODIFIED", change.new.clone()?)),
        (true, false) => {
            // A deletion, or an object that stopped matching the selectors: the last state the
            // watch saw, at the resourceVersion of the change (as the apiserver does).
            let mut gone = change.old.clone()?;
            set_rv(&mut gone, change.rv);
            Some(("DELETED", gone))
        }
        (false, false) => None,
    }
}

/// The outcome of starting a watch.
pub(crate) enum WatchStart {
    /// Registered; its channel already holds the events it missed.
    Started,
    /// The requested resourceVersion is older than the history: the body gets one ERROR event
    /// (410 Expired) and ends.
    Gone,
}

impl Store {
    pub fn new(history_limit: usize) -> Store {
        Store {
            rv: 1,
            objects: Kind::ALL
                .into_iter()
                .map(|k| (k, BTreeMap::new()))
                .collect(),
            history: Kind::ALL
                .into_iter()
                .map(|k| (k, VecDeque::new()))
                .collect(),
            compacted: Kind::ALL.into_iter().map(|k| (k, 1)).collect(),
            history_limit: history_limit.max(1),
            watchers: Vec::new(),
            bookmarks_paused: false,
            snapshots: BTreeMap::new(),
            next_snapshot: 1,
            next_uid: 1,
            posted_events: Vec::new(),
            requests: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn key_of(kind: Kind, object: &Value) -> Result<(String, String), ApiError> {
        let name = meta_str(object, "name").unwrap_or("");
        if name.is_empty() {
            return Err(ApiError::new(
                422,
                "Invalid",
                "metadata.name: Required value",
            ));
        }
        let namespace = if kind.namespaced() {
            meta_str(object, "namespace")
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        Ok((namespace, name.to_string()))
    }

    fn kind_of(object: &Value) -> Result<Kind, ApiError> {
        Kind::of(object).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unsupported apiVersion/kind {:?}/{:?} (Service, EndpointSlice or Node)",
                object.get("apiVersion"),
                object.get("kind")
            ))
        })
    }

    fn new_uid(&mut self) -> String {
        let n = self.next_uid;
        self.next_uid += 1;
        format!("00000000-0000-4000-8000-{n:012x}")
    }

    /// Fills `kind`, `apiVersion` and the server-maintained metadata of a new object.
    fn prepare_new(&mut self, kind: Kind, mut object: Value, rv: u64) -> Result<Value, ApiError> {
        let (namespace, _) = Store::key_of(kind, &object)?;
        let uid = self.new_uid();
        let map = object
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("the object is not a JSON object"))?;
        map.insert("apiVersion".into(), kind.api_version().into());
        map.insert("kind".into(), kind.kind().into());
        let meta = map
            .entry("metadata")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("metadata is not an object"))?;
        if kind.namespaced() {
            meta.insert("namespace".into(), namespace.into());
        } else {
            meta.remove("namespace");
        }
        meta.entry("uid").or_insert_with(|| uid.into());
        meta.entry("creationTimestamp")
            .or_insert_with(now_timestamp);
        meta.entry("generation").or_insert_with(|| 1.into());
        meta.insert("resourceVersion".into(), rv.to_string().into());
        Ok(object)
    }

    /// Creates an object (`kind` and `apiVersion` say which resource); 409 if it exists.
    /// Returns it as stored, with its resourceVersion.
    pub fn create(&mut self, object: Value) -> Result<Value, ApiError> {
        let kind = Store::kind_of(&object)?;
        let key = Store::key_of(kind, &object)?;
        if self.objects[&kind].contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} {:?} already exists", kind.kind(), key.1),
            ));
        }
        let rv = self.rv + 1;
        let stored = self.prepare_new(kind, object, rv)?;
        self.rv = rv;
        self.objects
            .get_mut(&kind)
            .expect("every kind has a map")
            .insert(key, stored.clone());
        self.publish(kind, None, Some(stored.clone()));
        Ok(stored)
    }

    /// Replaces an existing object; 404 if there is none. When `check_rv` and the object names
    /// a resourceVersion other than the stored one: 409 Conflict. An update that changes
    /// nothing is dropped (no new resourceVersion, no event), as the apiserver does.
    pub fn update_checked(&mut self, object: Value, check_rv: bool) -> Result<Value, ApiError> {
        let kind = Store::kind_of(&object)?;
        let key = Store::key_of(kind, &object)?;
        let Some(old) = self.objects[&kind].get(&key).cloned() else {
            return Err(ApiError::not_found(kind.kind(), &key.1));
        };
        if check_rv {
            if let Some(wanted) = meta_str(&object, "resourceVersion") {
                let stored = meta_str(&old, "resourceVersion").unwrap_or("");
                if !wanted.is_empty() && wanted != stored {
                    return Err(ApiError::new(
                        409,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {} {:?}: the object has been \
                             modified (resourceVersion {wanted}, stored {stored})",
                            kind.plural(),
                            key.1
                        ),
                    ));
                }
            }
        }
        let mut new = object;
        if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
            for field in ["uid", "creationTimestamp", "generation"] {
                if let Some(v) = old.pointer(&format!("/metadata/{field}")) {
                    meta.entry(field).or_insert_with(|| v.clone());
                }
            }
        }
        let rv = self.rv + 1;
        let new = self.prepare_new(kind, new, rv)?;
        if comparable(&new) == comparable(&old) {
            return Ok(old);
        }
        self.rv = rv;
        self.objects
            .get_mut(&kind)
            .expect("every kind has a map")
            .insert(key, new.clone());
        self.publish(kind, Some(old), Some(new.clone()));
        Ok(new)
    }

    /// [`Store::update_checked`] without the resourceVersion check.
    pub fn update(&mut self, object: Value) -> Result<Value, ApiError> {
        self.update_checked(object, false)
    }

    /// Creates or updates.
    pub fn apply(&mut self, object: Value) -> Result<Value, ApiError> {
        let kind = Store::kind_of(&object)?;
        let key = Store::key_of(kind, &object)?;
        if self.objects[&kind].contains_key(&key) {
            self.update(object)
        } else {
            self.create(object)
        }
    }

    /// Applies a JSON merge patch to an existing object.
    pub fn patch(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
        patch: &Value,
    ) -> Result<Value, ApiError> {
        let mut object = self
            .get(kind, namespace, name)
            .ok_or_else(|| ApiError::not_found(kind.kind(), name))?;
        merge_patch(&mut object, patch);
        self.update(object)
    }

    /// Deletes an object; returns it as it was, at the deletion's resourceVersion.
    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> Result<Value, ApiError> {
        let ns = if kind.namespaced() { namespace } else { "" };
        let key = (ns.to_string(), name.to_string());
        let Some(old) = self
            .objects
            .get_mut(&kind)
            .expect("every kind has a map")
            .remove(&key)
        else {
            return Err(ApiError::not_found(kind.kind(), name));
        };
        self.rv += 1;
        let mut gone = old.clone();
        set_rv(&mut gone, self.rv);
        self.publish(kind, Some(old), None);
        Ok(gone)
    }

    /// Sets `metadata.deletionTimestamp` (an object being deleted, held by a finalizer).
    pub fn mark_deleting(
        &mut self,
        kind: Kind,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let patch = json!({"metadata": {"deletionTimestamp": now_timestamp(),
                                        "deletionGracePeriodSeconds": 0}});
        self.patch(kind, namespace, name, &patch)
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let ns = if kind.namespaced() { namespace } else { "" };
        self.objects[&kind]
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Every stored object of `kind`, sorted by namespace and name.
    pub fn objects(&self, kind: Kind) -> Vec<Value> {
        self.objects[&kind].values().cloned().collect()
    }

    /// Records a change and sends it to every watch of `kind` that it concerns.
    fn publish(&mut self, kind: Kind, old: Option<Value>, new: Option<Value>) {
        let change = Change {
            rv: self.rv,
            old,
            new,
        };
        let mut sent = 0;
        self.watchers.retain(|w| {
            if w.kind != kind {
                return true;
            }
            match render(&change, &w.selectors) {
                Some((ty, object)) => {
                    sent += 1;
                    w.tx.send(WatchMsg::Line(event_line(ty, &object))).is_ok()
                }
                None => !w.tx.is_closed(),
            }
        });
        self.stats.events_sent += sent;
        let history = self
            .history
            .get_mut(&kind)
            .expect("every kind has a history");
        history.push_back(change);
        while history.len() > self.history_limit {
            let dropped = history.pop_front().expect("history is not empty");
            let compacted = self.compacted.get_mut(&kind).expect("every kind");
            *compacted = (*compacted).max(dropped.rv);
        }
    }

    /// Starts a watch of `kind` from `rv` ("" or "0": from now, with an ADDED event for every
    /// matching object first, as the apiserver does). Events go to `tx`.
    pub(crate) fn start_watch(
        &mut self,
        kind: Kind,
        selectors: Selectors,
        rv: &str,
        bookmarks: bool,
        tx: UnboundedSender<WatchMsg>,
    ) -> Result<WatchStart, ApiError> {
        self.stats.watches += 1;
        let start_rv = if rv.is_empty() || rv == "0" {
            let mut sent = 0;
            for object in self.objects[&kind].values() {
                if selectors.matches(object) {
                    let _ = tx.send(WatchMsg::Line(event_line("ADDED", object)));
                    sent += 1;
                }
            }
            self.stats.events_sent += sent;
            self.rv
        } else {
            let from: u64 = rv
                .parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?;
            if from < self.compacted[&kind] {
                self.stats.gone_sent += 1;
                let gone = ApiError::new(
                    410,
                    "Expired",
                    format!(
                        "too old resource version: {from} ({})",
                        self.compacted[&kind]
                    ),
                );
                let _ = tx.send(WatchMsg::Line(event_line("ERROR", &gone.status())));
                let _ = tx.send(WatchMsg::End);
                return Ok(WatchStart::Gone);
            }
            let mut sent = 0;
            for change in self.history[&kind].iter().filter(|c| c.rv > from) {
                if let Some((ty, object)) = render(change, &selectors) {
                    let _ = tx.send(WatchMsg::Line(event_line(ty, &object)));
                    sent += 1;
                }
            }
            self.stats.events_sent += sent;
            from
        };
        self.watchers.push(Watcher {
            kind,
            selectors,
            bookmarks,
            start_rv,
            tx,
        });
        Ok(WatchStart::Started)
    }

    /// Sends a BOOKMARK with the current resourceVersion to every watch that asked for them
    /// (unless paused), and forgets watches whose client went away.
    pub(crate) fn send_bookmarks(&mut self) {
        self.watchers.retain(|w| !w.tx.is_closed());
        if self.bookmarks_paused {
            return;
        }
        let rv = self.rv;
        let mut sent = 0;
        for w in self.watchers.iter().filter(|w| w.bookmarks) {
            let object = json!({
                "kind": w.kind.kind(),
                "apiVersion": w.kind.api_version(),
                "metadata": {"resourceVersion": rv.max(w.start_rv).to_string()},
            });
            if w.tx
                .send(WatchMsg::Line(event_line("BOOKMARK", &object)))
                .is_ok()
            {
                sent += 1;
            }
        }
        self.stats.bookmarks_sent += sent;
    }

    /// Stops (or resumes) sending BOOKMARK events.
    pub fn pause_bookmarks(&mut self, paused: bool) {
        self.bookmarks_paused = paused;
    }

    /// Aborts every open watch mid-stream (the connection is dropped without a final chunk).
    /// Returns how many there were.
    pub fn cut_watches(&mut self) -> usize {
        self.watchers.retain(|w| !w.tx.is_closed());
        let n = self.watchers.len();
        for w in self.watchers.drain(..) {
            let _ = w.tx.send(WatchMsg::Cut);
        }
        self.stats.watches_cut += n as u64;
        n
    }

    /// Forgets the event history of every resource (as an etcd compaction does): a watch that
    /// resumes from any resourceVersion older than the current one gets 410 Expired, and
    /// pending continue tokens expire. Open watches go on.
    pub fn expire_history(&mut self) {
        for kind in Kind::ALL {
            self.history.get_mut(&kind).expect("every kind").clear();
            self.compacted.insert(kind, self.rv);
        }
        self.snapshots.clear();
    }

    /// Open watches of `kind` (whose client is still there as far as the server knows).
    pub fn open_watches(&self, kind: Kind) -> usize {
        self.watchers
            .iter()
            .filter(|w| w.kind == kind && !w.tx.is_closed())
            .count()
    }

    /// One page of a list of `kind`. `limit` 0 means everything; `continue_token` continues a
    /// paginated list from its snapshot. Returns the `…List` object.
    pub fn list(
        &mut self,
        kind: Kind,
        selectors: &Selectors,
        limit: usize,
        continue_token: Option<&str>,
    ) -> Result<Value, ApiError> {
        let (id, offset) = match continue_token.filter(|t| !t.is_empty()) {
            Some(token) => {
                let parsed = parse_continue(token)
                    .ok_or_else(|| ApiError::bad_request(format!("invalid continue {token:?}")))?;
                let known = self
                    .snapshots
                    .get(&parsed.0)
                    .is_some_and(|s| s.kind == kind);
                if !known {
                    self.stats.gone_sent += 1;
                    return Err(ApiError::new(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent \
                         list result. You can start a new list without the continue parameter.",
                    ));
                }
                parsed
            }
            None => {
                let items: Vec<Value> = self.objects[&kind]
                    .values()
                    .filter(|o| selectors.matches(o))
                    .map(list_item)
                    .collect();
                let id = self.next_snapshot;
                self.next_snapshot += 1;
                self.snapshots.insert(
                    id,
                    Snapshot {
                        kind,
                        rv: self.rv,
                        items,
                    },
                );
                while self.snapshots.len() > MAX_SNAPSHOTS {
                    let oldest = *self.snapshots.keys().next().expect("not empty");
                    self.snapshots.remove(&oldest);
                }
                (id, 0)
            }
        };
        self.stats.lists += 1;
        let snapshot = &self.snapshots[&id];
        let end = if limit == 0 {
            snapshot.items.len()
        } else {
            (offset + limit).min(snapshot.items.len())
        };
        let start = offset.min(end);
        let items = snapshot.items[start..end].to_vec();
        let mut metadata = json!({"resourceVersion": snapshot.rv.to_string()});
        let remaining = snapshot.items.len() - end;
        let done = remaining == 0;
        if !done {
            metadata["continue"] = format!("kp-{id}-{end}").into();
            metadata["remainingItemCount"] = remaining.into();
        }
        if done {
            self.snapshots.remove(&id);
        }
        Ok(json!({
            "kind": format!("{}List", kind.kind()),
            "apiVersion": kind.api_version(),
            "metadata": metadata,
            "items": items,
        }))
    }

    /// Stores a posted `Event` (events.k8s.io/v1 or v1) and returns it with server metadata.
    pub(crate) fn post_event(&mut self, namespace: &str, mut event: Value) -> Value {
        let uid = self.new_uid();
        self.rv += 1;
        if let Some(map) = event.as_object_mut() {
            let meta = map.entry("metadata").or_insert_with(|| json!({}));
            if let Some(meta) = meta.as_object_mut() {
                meta.entry("namespace").or_insert_with(|| namespace.into());
                if !meta.contains_key("name") {
                    let name = format!(
                        "{}{}",
                        meta.get("generateName")
                            .and_then(Value::as_str)
                            .unwrap_or("event-"),
                        self.rv
                    );
                    meta.insert("name".into(), name.into());
                }
                meta.insert("uid".into(), uid.into());
                meta.insert("resourceVersion".into(), self.rv.to_string().into());
                meta.entry("creationTimestamp")
                    .or_insert_with(now_timestamp);
            }
        }
        self.posted_events.push(event.clone());
        event
    }

    /// Updates (merge patch, or replaces when `replace`) a posted Event.
    pub(crate) fn change_event(
        &mut self,
        namespace: &str,
        name: &str,
        body: &Value,
        replace: bool,
    ) -> Result<Value, ApiError> {
        let found = self.posted_events.iter_mut().find(|e| {
            meta_str(e, "name") == Some(name) && meta_str(e, "namespace") == Some(namespace)
        });
        let Some(event) = found else {
            return Err(ApiError::not_found("Event", name));
        };
        if replace {
            *event = body.clone();
        } else {
            merge_patch(event, body);
        }
        self.rv += 1;
        set_rv(event, self.rv);
        Ok(event.clone())
    }

    /// Events the agent posted.
    pub fn posted_events(&self) -> &[Value] {
        &self.posted_events
    }

    pub(crate) fn log_request(&mut self, mut record: RequestRecord) {
        record.seq = self.requests.len();
        self.requests.push(record);
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> &[RequestRecord] {
        &self.requests
    }

    pub fn stats(&self) -> Stats {
        self.stats.clone()
    }

    pub(crate) fn count_restart(&mut self) {
        self.stats.restarts += 1;
    }
}

fn parse_continue(token: &str) -> Option<(u64, usize)> {
    let rest = token.strip_prefix("kp-")?;
    let (id, offset) = rest.split_once('-')?;
    Some((id.parse().ok()?, offset.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::unbounded_channel;

    fn svc(name: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "default", "labels": labels},
               "spec": {"clusterIP": "10.96.0.1"}})
    }

    fn lines(rx: &mut tokio::sync::mpsc::UnboundedReceiver<WatchMsg>) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            match msg {
                WatchMsg::Line(b) => out.push(serde_json::from_slice(&b).unwrap()),
                WatchMsg::End => out.push(json!("END")),
                WatchMsg::Cut => out.push(json!("CUT")),
            }
        }
        out
    }

    #[test]
    fn one_counter_across_resources_and_noop_updates_are_dropped() {
        let mut s = Store::default();
        let a = s.create(svc("a", json!({}))).unwrap();
        assert_eq!(a["metadata"]["resourceVersion"], "2");
        let node = s
            .create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n", "namespace": "x"}}))
            .unwrap();
        assert_eq!(node["metadata"]["resourceVersion"], "3");
        assert!(node["metadata"].get("namespace").is_none());
        let same = s.update(svc("a", json!({}))).unwrap();
        assert_eq!(same["metadata"]["resourceVersion"], "2");
        assert_eq!(s.resource_version(), 3);
        let changed = s.update(svc("a", json!({"x": "y"}))).unwrap();
        assert_eq!(changed["metadata"]["resourceVersion"], "4");
        assert_eq!(changed["metadata"]["uid"], a["metadata"]["uid"]);
        assert_eq!(s.create(svc("a", json!({}))).unwrap_err().code, 409);
        assert_eq!(
            s.delete(Kind::Service, "default", "zz").unwrap_err().code,
            404
        );
    }

    #[test]
    fn label_changes_become_added_and_deleted_for_a_selecting_watch() {
        let mut s = Store::default();
        s.create(svc("a", json!({}))).unwrap();
        let (tx, mut rx) = unbounded_channel();
        let sel = Selectors {
            labels: LabelSelector::parse("!service.kubernetes.io/headless").unwrap(),
            ..Default::default()
        };
        s.start_watch(
            Kind::Service,
            sel,
            &s.resource_version().to_string(),
            true,
            tx,
        )
        .unwrap();
        s.update(svc("a", json!({"service.kubernetes.io/headless": ""})))
            .unwrap();
        s.update(svc("a", json!({}))).unwrap();
        s.delete(Kind::Service, "default", "a").unwrap();
        let got: Vec<(String, String)> = lines(&mut rx)
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap().to_string(),
                    e["object"]["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                )
            })
            .collect();
        let want = [("DELETED", "3"), ("ADDED", "4"), ("DELETED", "5")];
        assert_eq!(
            got,
            want.map(|(a, b)| (a.to_string(), b.to_string())).to_vec()
        );
    }

    #[test]
    fn history_window_and_expiry() {
        let mut s = Store::new(2);
        for i in 0..4 {
            s.create(svc(&format!("s{i}"), json!({}))).unwrap();
        }
        // rv 2..=5 were the four creations; the history keeps rv 4 and 5.
        let (tx, mut rx) = unbounded_channel();
        assert!(matches!(
            s.start_watch(Kind::Service, Selectors::default(), "2", false, tx),
            Ok(WatchStart::Gone)
        ));
        let got = lines(&mut rx);
        assert_eq!(got[0]["type"], "ERROR");
        assert_eq!(got[0]["object"]["code"], 410);
        assert_eq!(got[0]["object"]["reason"], "Expired");
        assert_eq!(got[1], "END");
        let (tx, mut rx) = unbounded_channel();
        s.start_watch(Kind::Service, Selectors::default(), "3", false, tx)
            .unwrap();
        let names: Vec<Value> = lines(&mut rx)
            .iter()
            .map(|e| e["object"]["metadata"]["name"].clone())
            .collect();
        assert_eq!(names, [json!("s2"), json!("s3")]);

        s.expire_history();
        let (tx, mut rx) = unbounded_channel();
        s.start_watch(Kind::Service, Selectors::default(), "4", false, tx)
            .unwrap();
        assert_eq!(lines(&mut rx)[0]["object"]["code"], 410);
        let (tx, mut rx) = unbounded_channel();
        s.start_watch(Kind::Service, Selectors::default(), "5", false, tx)
            .unwrap();
        assert!(lines(&mut rx).is_empty());
    }

    #[test]
    fn pagination_is_a_consistent_snapshot() {
        let mut s = Store::default();
        for i in 0..5 {
            s.create(svc(&format!("s{i}"), json!({}))).unwrap();
        }
        let sel = Selectors::default();
        let page = s.list(Kind::Service, &sel, 2, None).unwrap();
        assert_eq!(page["kind"], "ServiceList");
        assert_eq!(page["items"].as_array().unwrap().len(), 2);
        assert!(page["items"][0].get("kind").is_none());
        assert_eq!(page["metadata"]["remainingItemCount"], 3);
        let rv = page["metadata"]["resourceVersion"].clone();
        let token = page["metadata"]["continue"].as_str().unwrap().to_string();
        // Changes after the first page do not show up in the later pages.
        s.delete(Kind::Service, "default", "s4").unwrap();
        let page2 = s.list(Kind::Service, &sel, 2, Some(&token)).unwrap();
        let token = page2["metadata"]["continue"].as_str().unwrap().to_string();
        let page3 = s.list(Kind::Service, &sel, 2, Some(&token)).unwrap();
        assert_eq!(page3["items"][0]["metadata"]["name"], "s4");
        assert_eq!(page3["metadata"]["resourceVersion"], rv);
        assert!(page3["metadata"].get("continue").is_none());
        assert_eq!(
            s.list(Kind::Service, &sel, 2, Some(&token))
                .unwrap_err()
                .code,
            410
        );
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut v = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(&mut v, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(v, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }
}
