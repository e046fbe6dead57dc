//! Tests of the fake apiserver (`kproxy_e2e::fake_apiserver`) over real HTTP: plain requests with
//! `kproxy_e2e::http`, `curl`, and the client the agent uses (kube-rs `watcher` and `reflector`).
//! No privileges needed; everything stays on 127.0.0.1.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};
use kproxy_e2e::fake_apiserver::{FakeApiServer, Kind, LabelSelector, Options};
use kproxy_e2e::http::{self, LineStream, StreamItem};
use kproxy_e2e::k8s;
use kproxy_e2e::manifest::{Protocol, ServiceSpec};

const T: Duration = Duration::from_secs(5);
const KUBE_PROXY_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

fn start() -> FakeApiServer {
    FakeApiServer::start("127.0.0.1:0".parse().unwrap()).expect("starting the fake apiserver")
}

fn spec(name: &str, ip: [u8; 4], pods: &[u8]) -> ServiceSpec {
    let s = ServiceSpec::new(name, ip.into(), 80, "http", Protocol::Tcp, 8080);
    pods.iter().fold(s, |s, &p| {
        s.endpoint(&format!("pod-{p}"), [10, 244, 1, p].into(), true)
    })
}

fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let r = http::get(addr, path, T).unwrap();
    let status = r.status;
    (status, r.json().unwrap())
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

/// Reads watch lines until one satisfies `pred`, skipping bookmarks unless asked for.
fn next_event(w: &mut LineStream, skip_bookmarks: bool) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = w.next_json(left).expect("a watch event");
        if skip_bookmarks && event["type"] == "BOOKMARK" {
            continue;
        }
        return event;
    }
}

/// The next item that is not a BOOKMARK line.
fn next_item(w: &mut LineStream) -> StreamItem {
    loop {
        match w.next(T).expect("a watch item") {
            StreamItem::Line(l) if l.contains(r#""type":"BOOKMARK""#) => continue,
            other => return other,
        }
    }
}

#[test]
fn lists_paginate_with_continue_and_filter_by_label() {
    let api = start();
    for i in 0..7u8 {
        api.create(&k8s::service(&spec(
            &format!("svc-{i}"),
            [10, 96, 0, i + 1],
            &[],
        )))
        .unwrap();
    }
    let mut headless = k8s::service(&spec("headless", [10, 96, 1, 1], &[]));
    headless.metadata.labels =
        Some([("service.kubernetes.io/headless".to_string(), String::new())].into());
    api.create(&headless).unwrap();

    let base = format!(
        "/api/v1/services?labelSelector={}",
        encode(KUBE_PROXY_SELECTOR)
    );
    let (status, page1) = get_json(api.addr(), &format!("{base}&limit=3"));
    assert_eq!(status, 200);
    assert_eq!(page1["kind"], "ServiceList");
    assert_eq!(page1["apiVersion"], "v1");
    assert_eq!(names(&page1), ["svc-0", "svc-1", "svc-2"]);
    assert_eq!(page1["metadata"]["remainingItemCount"], 4);
    assert!(page1["items"][0]["metadata"]["resourceVersion"].is_string());
    let rv = page1["metadata"]["resourceVersion"].clone();
    // A change between pages is not seen by the later pages (a consistent snapshot).
    api.delete::<Service>("default", "svc-5").unwrap();
    let token = encode(page1["metadata"]["continue"].as_str().unwrap());
    let (_, page2) = get_json(api.addr(), &format!("{base}&limit=3&continue={token}"));
    assert_eq!(names(&page2), ["svc-3", "svc-4", "svc-5"]);
    let token = encode(page2["metadata"]["continue"].as_str().unwrap());
    let (_, page3) = get_json(api.addr(), &format!("{base}&limit=3&continue={token}"));
    assert_eq!(names(&page3), ["svc-6"]);
    assert_eq!(page3["metadata"]["resourceVersion"], rv);
    assert!(page3["metadata"].get("continue").is_none());

    // Unpaginated: everything that matches now; the headless service never.
    let (_, all) = get_json(api.addr(), &base);
    assert_eq!(names(&all).len(), 6);
    assert!(!names(&all).contains(&"headless".to_string()));
    let (_, only) = get_json(
        api.addr(),
        &format!(
            "/api/v1/services?labelSelector={}",
            encode("service.kubernetes.io/headless")
        ),
    );
    assert_eq!(names(&only), ["headless"]);

    // An expired continue token is 410 Expired.
    let (_, first) = get_json(api.addr(), &format!("{base}&limit=2"));
    api.expire_history();
    let token = encode(first["metadata"]["continue"].as_str().unwrap());
    let (status, gone) = get_json(api.addr(), &format!("{base}&limit=2&continue={token}"));
    assert_eq!(status, 410);
    assert_eq!(gone["kind"], "Status");
    assert_eq!(gone["reason"], "Expired");

    // A malformed selector is 400.
    let (status, bad) = get_json(api.addr(), "/api/v1/services?labelSelector=a%20b");
    assert_eq!(status, 400, "{bad}");
}

#[test]
fn watch_streams_events_bookmarks_and_ends_after_timeout() {
    let api = FakeApiServer::start_with(
        "127.0.0.1:0".parse().unwrap(),
        Options {
            bookmark_interval: Duration::from_millis(200),
            ..Options::default()
        },
    )
    .unwrap();
    let web = spec("web", [10, 96, 0, 10], &[10]);
    api.create(&k8s::service(&web)).unwrap();
    api.create(&k8s::slice(&web)).unwrap();
    let (_, list) = get_json(
        api.addr(),
        "/apis/discovery.k8s.io/v1/endpointslices?limit=500",
    );
    assert_eq!(list["kind"], "EndpointSliceList");
    assert_eq!(list["apiVersion"], "discovery.k8s.io/v1");
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();

    let path = format!(
        "/apis/discovery.k8s.io/v1/endpointslices?&watch=true&timeoutSeconds=3\
         &allowWatchBookmarks=true&labelSelector={}&resourceVersion={rv}",
        encode(KUBE_PROXY_SELECTOR)
    );
    let start = Instant::now();
    let mut w = LineStream::open(api.addr(), &path, T).unwrap();
    assert_eq!(w.status, 200);
    assert_eq!(w.header("transfer-encoding"), Some("chunked"));
    assert_eq!(w.header("content-type"), Some("application/json"));

    // A change after rv arrives as MODIFIED with a higher resourceVersion.
    let changed = k8s::slice(
        &web.clone()
            .endpoint("pod-11", [10, 244, 1, 11].into(), true),
    );
    let stored = api.update(&changed).unwrap();
    let event = next_event(&mut w, true);
    assert_eq!(event["type"], "MODIFIED");
    assert_eq!(event["object"]["kind"], "EndpointSlice");
    assert_eq!(event["object"]["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(
        event["object"]["metadata"]["resourceVersion"].as_str(),
        stored.metadata.resource_version.as_deref()
    );
    assert_eq!(event["object"]["endpoints"].as_array().unwrap().len(), 2);

    // Bookmarks carry the current (global) resourceVersion and nothing else.
    api.create(&k8s::node("node-1")).unwrap();
    let current = api.resource_version().to_string();
    // A bookmark already on its way when the Node was created carries the version before it:
    // read on (a few bookmarks at most) to the first one that carries the current version.
    let mut bookmark = next_event(&mut w, false);
    for _ in 0..5 {
        if bookmark["object"]["metadata"]["resourceVersion"] == json!(current) {
            break;
        }
        assert_eq!(bookmark["type"], "BOOKMARK", "{bookmark}");
        bookmark = next_event(&mut w, false);
    }
    assert_eq!(bookmark["type"], "BOOKMARK", "{bookmark}");
    assert_eq!(
        bookmark["object"],
        json!({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
               "metadata": {"resourceVersion": current}})
    );

    // Paused bookmarks: nothing for a while, then DELETED.
    api.pause_bookmarks(true);
    // Drain a bookmark that may have been queued before the pause.
    let _ = w.next(Duration::from_millis(300));
    assert!(
        w.next(Duration::from_millis(600)).is_err(),
        "a line arrived while bookmarks were paused"
    );
    api.delete::<EndpointSlice>("default", "web-slice").unwrap();
    let event = next_event(&mut w, true);
    assert_eq!(event["type"], "DELETED");
    assert_eq!(event["object"]["metadata"]["name"], "web-slice");
    assert_eq!(
        event["object"]["metadata"]["resourceVersion"],
        api.resource_version().to_string()
    );

    // timeoutSeconds=3: the body ends properly (final chunk).
    assert_eq!(w.next(T).unwrap(), StreamItem::End);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(5),
        "the watch ended after {took:?}, expected 3 s"
    );
    let stats = api.stats();
    assert!(stats.bookmarks_sent >= 1, "{stats:?}");
}

#[test]
fn watch_from_expired_resource_version_gets_410_and_a_cut_aborts_the_stream() {
    let api = start();
    let web = spec("web", [10, 96, 0, 10], &[10]);
    let old_rv = api
        .create(&k8s::service(&web))
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    api.update(&k8s::service(&ServiceSpec {
        port: 81,
        ..web.clone()
    }))
    .unwrap();
    api.expire_history();
    api.update(&k8s::service(&ServiceSpec {
        port: 82,
        ..web.clone()
    }))
    .unwrap();

    let watch = |rv: &str| {
        LineStream::open(
            api.addr(),
            &format!("/api/v1/services?watch=true&resourceVersion={rv}&allowWatchBookmarks=true"),
            T,
        )
        .unwrap()
    };
    let mut w = watch(&old_rv);
    assert_eq!(w.status, 200);
    let error = w.next_json(T).unwrap();
    assert_eq!(error["type"], "ERROR");
    assert_eq!(error["object"]["kind"], "Status");
    assert_eq!(error["object"]["code"], 410);
    assert_eq!(error["object"]["reason"], "Expired");
    assert_eq!(w.next(T).unwrap(), StreamItem::End);
    assert_eq!(api.stats().gone_sent, 1);

    // From the resourceVersion the expiry happened at, the later change is still there.
    let rv_at_expiry = (api.resource_version() - 1).to_string();
    let mut w = watch(&rv_at_expiry);
    let event = next_event(&mut w, true);
    assert_eq!(event["type"], "MODIFIED");
    assert_eq!(event["object"]["spec"]["ports"][0]["port"], 82);

    // resourceVersion "0": ADDED for every object first.
    let mut w0 = watch("0");
    let event = next_event(&mut w0, true);
    assert_eq!(event["type"], "ADDED");
    assert_eq!(event["object"]["metadata"]["name"], "web");

    // Both watches are open; a cut drops them without the final chunk.
    let deadline = Instant::now() + T;
    while api.open_watches(Kind::Service) < 2 {
        assert!(Instant::now() < deadline, "the watches never registered");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(api.cut_watches(), 2);
    assert_eq!(next_item(&mut w), StreamItem::Aborted);
    assert_eq!(next_item(&mut w0), StreamItem::Aborted);
}

#[test]
fn restart_keeps_objects_and_port_and_resumed_watches_get_what_they_missed() {
    let api = start();
    let addr = api.addr();
    let web = spec("web", [10, 96, 0, 10], &[10]);
    let rv = api
        .create(&k8s::service(&web))
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut w = LineStream::open(
        addr,
        &format!("/api/v1/services?watch=1&resourceVersion={rv}"),
        T,
    )
    .unwrap();
    api.stop_listening();
    assert!(!api.is_listening());
    assert_eq!(w.next(T).unwrap(), StreamItem::Aborted);
    assert!(http::get(addr, "/api/v1/services", Duration::from_millis(500)).is_err());
    // Changes while down.
    api.create(&k8s::service(&spec("db", [10, 96, 0, 11], &[])))
        .unwrap();
    api.delete::<Service>("default", "web").unwrap();
    api.resume_listening().unwrap();
    let (_, list) = get_json(addr, "/api/v1/services");
    assert_eq!(names(&list), ["db"]);
    let mut w = LineStream::open(
        addr,
        &format!("/api/v1/services?watch=1&resourceVersion={rv}"),
        T,
    )
    .unwrap();
    let e1 = next_event(&mut w, true);
    let e2 = next_event(&mut w, true);
    assert_eq!(
        (e1["type"].as_str(), e2["type"].as_str()),
        (Some("ADDED"), Some("DELETED"))
    );
    api.restart(Duration::from_millis(100)).unwrap();
    let (status, _) = get_json(addr, "/api/v1/services");
    assert_eq!(status, 200);
    assert_eq!(api.stats().restarts, 2);
}

#[test]
fn nodes_events_field_selectors_and_request_log() {
    let api = start();
    api.create(&k8s::node("node-1")).unwrap();
    api.create(&k8s::node("node-2")).unwrap();
    let (status, node) = get_json(api.addr(), "/api/v1/nodes/node-1");
    assert_eq!(status, 200);
    assert_eq!(node["kind"], "Node");
    assert!(node["metadata"].get("namespace").is_none());
    let (status, missing) = get_json(api.addr(), "/api/v1/nodes/node-9");
    assert_eq!(
        (status, missing["reason"].as_str()),
        (404, Some("NotFound"))
    );
    let path = format!(
        "/api/v1/nodes?fieldSelector={}",
        encode("metadata.name=node-2")
    );
    let (_, list) = get_json(api.addr(), &path);
    assert_eq!(list["kind"], "NodeList");
    assert_eq!(names(&list), ["node-2"]);

    let event = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"generateName": "node-1."}, "reason": "Starting",
        "note": "Starting kproxy.", "type": "Normal", "action": "StartKubeProxy",
        "reportingController": "kproxy", "reportingInstance": "kproxy-node-1",
        "regarding": {"kind": "Node", "name": "node-1"}});
    let body = serde_json::to_vec(&event).unwrap();
    let r = http::request(
        api.addr(),
        "POST",
        "/apis/events.k8s.io/v1/namespaces/default/events",
        Some(("application/json", &body)),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 201);
    let created = r.json().unwrap();
    assert_eq!(created["reason"], "Starting");
    let name = created["metadata"]["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("node-1."));
    let patch = serde_json::to_vec(&json!({"series": {"count": 2}})).unwrap();
    let r = http::request(
        api.addr(),
        "PATCH",
        &format!("/apis/events.k8s.io/v1/namespaces/default/events/{name}"),
        Some(("application/merge-patch+json", &patch)),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(api.posted_events().len(), 1);
    assert_eq!(api.posted_events()[0]["series"]["count"], 2);

    let log = api.requests();
    let list = log
        .iter()
        .find(|r| r.path == "/api/v1/nodes" && r.param("fieldSelector").is_some())
        .unwrap();
    assert_eq!(list.method, "GET");
    assert_eq!(list.param("fieldSelector"), Some("metadata.name=node-2"));
    assert!(
        list.query.contains("%3D"),
        "the raw query stays encoded: {}",
        list.query
    );
    assert!(list.is_list_of(Kind::Node));
    assert_eq!(log.iter().filter(|r| r.status == 404).count(), 1);
    assert_eq!(log[0].seq, 0);
}

#[test]
fn curl_lists_and_watches() {
    let api = start();
    api.create(&k8s::service(&spec("web", [10, 96, 0, 10], &[])))
        .unwrap();
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["--silent", "--show-error", "--noproxy", "*"])
            .args(args)
            .output()
            .expect("running curl");
        assert!(
            out.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let url = api.url();
    let list: Value =
        serde_json::from_str(&curl(&[&format!("{url}/api/v1/services?limit=500")])).unwrap();
    assert_eq!(names(&list), ["web"]);
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    // A 1 s watch: no change, so only bookmarks (at most one a second) and a proper end.
    let out = curl(&[
        "--max-time",
        "10",
        "--no-buffer",
        &format!("{url}/api/v1/services?watch=true&timeoutSeconds=1&resourceVersion={rv}"),
    ]);
    assert!(out.is_empty(), "no bookmarks were asked for, yet: {out:?}");
    api.update(&k8s::service(&ServiceSpec {
        port: 81,
        ..spec("web", [10, 96, 0, 10], &[])
    }))
    .unwrap();
    let out = curl(&[
        "--max-time",
        "10",
        &format!("{url}/api/v1/services?watch=true&timeoutSeconds=1&resourceVersion={rv}"),
    ]);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["type"], "MODIFIED");
}

#[test]
fn kubeconfig_is_readable_by_kube_rs() {
    let api = start();
    let dir = std::env::temp_dir().join(kproxy_e2e::topology::unique_name("kproxy-kubeconfig"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    api.kubeconfig(&path).unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        kubeconfig.clusters[0]
            .cluster
            .as_ref()
            .unwrap()
            .server
            .as_deref(),
        Some(api.url().as_str())
    );
    assert_eq!(kubeconfig.current_context.as_deref(), Some("kproxy-fake"));
}

// ---- kube-rs, the client the agent uses -------------------------------------------------------

mod kube_rs {
    use super::*;
    use futures::StreamExt;
    use kube::runtime::{reflector, watcher, WatchStreamExt};
    use kube::{Api, Client};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    async fn client(api: &FakeApiServer) -> Client {
        let dir = std::env::temp_dir().join(kproxy_e2e::topology::unique_name("kproxy-kubeconfig"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kubeconfig");
        api.kubeconfig(&path).unwrap();
        let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        Client::try_from(config).unwrap()
    }

    /// Polls `f` (bounded) until it holds.
    async fn eventually(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn state_of(reader: &reflector::Store<EndpointSlice>) -> BTreeSet<(String, usize)> {
        reader
            .state()
            .iter()
            .map(|s| (s.metadata.name.clone().unwrap(), s.endpoints.len()))
            .collect()
    }

    fn want(items: &[(&str, usize)]) -> BTreeSet<(String, usize)> {
        items.iter().map(|&(n, c)| (n.to_string(), c)).collect()
    }

    /// A kube-rs reflector over EndpointSlices, as the agent runs it (kube-proxy's selector,
    /// default config but tiny pages), follows the fake server through changes, cut watches,
    /// 410 Gone and a restart.
    #[test]
    fn reflector_follows_changes_cuts_410_and_restarts() {
        let api = FakeApiServer::start_with(
            "127.0.0.1:0".parse().unwrap(),
            Options {
                bookmark_interval: Duration::from_millis(200),
                ..Options::default()
            },
        )
        .unwrap();
        for i in 0..5u8 {
            let s = spec(&format!("svc-{i}"), [10, 96, 0, i + 1], &[10]);
            api.create(&k8s::slice(&s)).unwrap();
        }
        let rt = runtime();
        rt.block_on(async {
            let client = client(&api).await;
            let slices: Api<EndpointSlice> = Api::all(client.clone());
            let config = watcher::Config::default()
                .labels(KUBE_PROXY_SELECTOR)
                .page_size(2);
            let (reader, writer) = reflector::store();
            let stream = reflector(writer, watcher(slices, config))
                .default_backoff()
                .touched_objects();
            let task = tokio::spawn(async move {
                let mut stream = std::pin::pin!(stream);
                while let Some(item) = stream.next().await {
                    let _ = item;
                }
            });
            let five: Vec<(String, usize)> =
                (0..5).map(|i| (format!("svc-{i}-slice"), 1)).collect();
            let five: BTreeSet<_> = five.into_iter().collect();
            eventually("the initial list", || state_of(&reader) == five).await;

            // The list was paginated (limit=2 → 3 pages) and the watch asked for bookmarks.
            let log = api.requests();
            let lists: Vec<_> = log
                .iter()
                .filter(|r| r.is_list_of(Kind::EndpointSlice))
                .collect();
            assert_eq!(lists.len(), 3, "{lists:#?}");
            assert!(lists[1].param("continue").is_some());
            assert_eq!(
                lists[0].label_selector(),
                LabelSelector::parse(KUBE_PROXY_SELECTOR).unwrap()
            );
            api.wait_for_watches(&[Kind::EndpointSlice], T).unwrap();
            let watch = api
                .requests()
                .into_iter()
                .find(|r| r.is_watch_of(Kind::EndpointSlice))
                .unwrap();
            assert_eq!(watch.param("allowWatchBookmarks"), Some("true"));
            // No change yet: the list's resourceVersion is the current one.
            let listed_rv = api.resource_version().to_string();
            assert_eq!(watch.param("resourceVersion"), Some(listed_rv.as_str()));
            assert!(watch.param("timeoutSeconds").is_some());

            // A change.
            let s0 = spec("svc-0", [10, 96, 0, 1], &[10, 11]);
            api.update(&k8s::slice(&s0)).unwrap();
            eventually("the change", || {
                state_of(&reader).contains(&("svc-0-slice".into(), 2))
            })
            .await;

            // Cut watches, change while reconnecting: resumed without a new list.
            let lists_before = api.stats().lists;
            api.cut_watches();
            api.delete::<EndpointSlice>("default", "svc-1-slice")
                .unwrap();
            eventually("the deletion after a cut", || {
                state_of(&reader)
                    == want(&[
                        ("svc-0-slice", 2),
                        ("svc-2-slice", 1),
                        ("svc-3-slice", 1),
                        ("svc-4-slice", 1),
                    ])
            })
            .await;
            assert_eq!(
                api.stats().lists,
                lists_before,
                "a cut watch must resume, not relist"
            );

            // Cut + changes + compaction in one step: 410, then a relist.
            api.atomically(|s| {
                s.cut_watches();
                s.delete(Kind::EndpointSlice, "default", "svc-2-slice")
                    .unwrap();
                s.expire_history();
            });
            eventually("the relist after 410", || {
                state_of(&reader)
                    == want(&[("svc-0-slice", 2), ("svc-3-slice", 1), ("svc-4-slice", 1)])
            })
            .await;
            assert!(api.stats().gone_sent >= 1);
            assert!(api.stats().lists > lists_before);

            // Down for a while, changes meanwhile, back up.
            api.stop_listening();
            api.delete::<EndpointSlice>("default", "svc-3-slice")
                .unwrap();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            api.resume_listening().unwrap();
            eventually("the state after the restart", || {
                state_of(&reader) == want(&[("svc-0-slice", 2), ("svc-4-slice", 1)])
            })
            .await;

            // Bookmarks keep the watch's resourceVersion current: after one arrives, a cut
            // watch resumes from the newest resourceVersion even though no slice changed.
            api.create(&k8s::node("unrelated")).unwrap();
            let rv_now = api.resource_version();
            tokio::time::sleep(Duration::from_millis(600)).await;
            let since = api.request_count();
            api.cut_watches();
            let resumed = api
                .wait_for_request(since, T, |r| r.is_watch_of(Kind::EndpointSlice))
                .unwrap();
            assert_eq!(
                resumed.param("resourceVersion"),
                Some(rv_now.to_string().as_str())
            );
            task.abort();
        });
    }

    /// Nodes by name (fieldSelector) and Services, the two other watches of the agent.
    #[test]
    fn watcher_by_field_selector_and_services() {
        let api = start();
        api.create(&k8s::node("node-1")).unwrap();
        api.create(&k8s::node("node-2")).unwrap();
        api.create(&k8s::service(&spec("web", [10, 96, 0, 10], &[])))
            .unwrap();
        let rt = runtime();
        rt.block_on(async {
            let client = client(&api).await;
            let nodes: Api<Node> = Api::all(client.clone());
            let got = nodes.get("node-1").await.unwrap();
            assert_eq!(got.metadata.name.as_deref(), Some("node-1"));
            let config = watcher::Config::default().fields("metadata.name=node-1");
            let (reader, writer) = reflector::store();
            let task = tokio::spawn(async move {
                let stream = reflector(writer, watcher(nodes, config)).default_backoff();
                let mut stream = std::pin::pin!(stream);
                while stream.next().await.is_some() {}
            });
            eventually("node-1", || reader.state().len() == 1).await;
            api.update(&k8s::tainted_to_be_deleted(k8s::node("node-1")))
                .unwrap();
            eventually("the taint", || {
                reader.state().first().is_some_and(|n| {
                    n.spec
                        .as_ref()
                        .and_then(|s| s.taints.as_ref())
                        .is_some_and(|t| t.len() == 1)
                })
            })
            .await;
            assert_eq!(reader.state()[0].metadata.name.as_deref(), Some("node-1"));
            task.abort();

            let services: Api<Service> = Api::all(client);
            let list = services
                .list(&kube::api::ListParams::default().labels(KUBE_PROXY_SELECTOR))
                .await
                .unwrap();
            assert_eq!(list.items.len(), 1);
            assert_eq!(list.items[0].metadata.name.as_deref(), Some("web"));
        });
    }
}
