//! `kproxy trace` and `kproxy dump --conntrack`: where a connection from a source to a
//! frontend goes and why, and the tc path's tracked flows, from the live maps alone.
//!
//! [`trace`] and [`conntrack`] are pure functions over decoded map contents ([`MapContents`],
//! [`FlowContents`]) that take the decisions the kernel programs take (`kproxy-ebpf`'s
//! `tc::ingress`, `sock::forward`, `lb::lookup`, `conntrack::stale`) in the same order; the
//! CLI reads the maps and prints what they return ([`kproxy_api::trace`]).

use std::{
    collections::HashSet,
    io::Write,
    net::{Ipv4Addr, SocketAddrV4},
};

use kproxy_api::trace::{
    ConntrackDump, ConntrackEntry, ConntrackFlow, Selection, Trace, TraceBackend, TraceFrontend, TracePath, Verdict,
};
use kproxy_common::{
    ct::{CtKey, CtValue, CT_EGRESS, CT_FLAG_FRONTEND, CT_INGRESS, CT_SEEN_CLOSING, CT_SEEN_ESTABLISHED, CT_SEEN_SYN},
    lb::{
        MemberKey, ServiceKey, ServiceValue, AFFINITY_ADDRESS, AFFINITY_NETNS, SCOPE_EXTERNAL, SCOPE_INTERNAL,
        SVC_FLAG_AFFINITY, SVC_FLAG_CLUSTER_IP, SVC_FLAG_DROP_UNSERVED, SVC_FLAG_EXTERNAL_IP, SVC_FLAG_LOAD_BALANCER,
        SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES, SVC_FLAG_TWO_SCOPES,
    },
    PROTO_UDP,
};

use crate::{
    dataplane::{bpf::FlowContents, meta_names, service_key, MapContents, Origin},
    model::{Frontend, FrontendKind, Protocol},
};

/// What to trace: a client and a frontend, and where the client is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub source: Ipv4Addr,
    /// The client's port, to trace one existing flow; `None`: a new connection (and every
    /// tracked flow from `source` to the frontend is listed).
    pub source_port: Option<u16>,
    /// `namespace/name` when the source was given as a pod.
    pub source_pod: Option<String>,
    pub frontend: Frontend,
    /// Which path translates the client's connections, and why (see [`origin_of`]).
    pub origin: Origin,
    pub origin_reason: String,
}

/// Where a source is, from what the node knows: a pod (given by name) or one of the node's
/// own addresses is in the cluster (its sockets are in the cgroup the socket programs are
/// attached to); any other address is a client from outside, whose packets reach the tc
/// programs on the node's devices. `forced` (the `--origin` flag) wins: a pod on this node
/// given by its address needs it.
pub fn origin_of(source: Ipv4Addr, pod: Option<&str>, node_addresses: &[(String, Ipv4Addr)], forced: Option<Origin>) -> (Origin, String) {
    if let Some(origin) = forced {
        let what = match origin {
            Origin::InCluster => "in the cluster (--origin cluster): translated at connect() by the socket programs",
            Origin::Outside => "outside the node (--origin outside): translated per packet at tc ingress",
        };
        return (origin, format!("{source} is {what}"));
    }
    if let Some(pod) = pod {
        return (Origin::InCluster, format!("pod {pod} ({source}) is in the cluster: translated at connect() by the socket programs"));
    }
    if source.is_loopback() {
        return (Origin::InCluster, format!("{source} is the node's loopback: a node process, translated at connect() by the socket programs"));
    }
    if let Some((device, _)) = node_addresses.iter().find(|(_, ip)| *ip == source) {
        return (
            Origin::InCluster,
            format!("{source} is this node's address (on {device}): a node process, translated at connect() by the socket programs"),
        );
    }
    (
        Origin::Outside,
        format!(
            "{source} is not an address of this node: a client from outside, translated per packet at tc ingress \
             (pass --origin cluster for a pod on this node given by its address)"
        ),
    )
}

fn addr(address: [u8; 4], port: [u8; 2]) -> String {
    SocketAddrV4::new(Ipv4Addr::from(address), u16::from_be_bytes(port)).to_string()
}

fn proto_name(protocol: u8) -> String {
    Protocol::from_ip_proto(protocol).map_or_else(|| format!("proto {protocol}"), |p| p.to_string())
}

fn seconds(until_ns: u64, now_ns: u64) -> f64 {
    (until_ns as i128 - now_ns as i128) as f64 / 1e9
}

/// The names of a frontend entry's `SVC_FLAG_*` bits.
pub fn flag_names(flags: u16) -> Vec<String> {
    [
        (SVC_FLAG_CLUSTER_IP, "ClusterIP"),
        (SVC_FLAG_NODE_PORT, "NodePort"),
        (SVC_FLAG_EXTERNAL_IP, "ExternalIP"),
        (SVC_FLAG_LOAD_BALANCER, "LoadBalancer"),
        (SVC_FLAG_DROP_UNSERVED, "DropUnserved"),
        (SVC_FLAG_SOURCE_RANGES, "SourceRanges"),
        (SVC_FLAG_AFFINITY, "SessionAffinity"),
        (SVC_FLAG_TWO_SCOPES, "TwoScopes"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name.to_string())
    .collect()
}

/// `namespace/name:port_name` of a service id, if the metadata map has it.
fn service_name(lb: &MapContents, service_id: u32) -> Option<String> {
    lb.meta.get(&service_id).map(meta_names).map(|(ns, name, port)| {
        if port.is_empty() { format!("{ns}/{name}") } else { format!("{ns}/{name}:{port}") }
    })
}

/// The slot of frontend `key` (any slot) that holds `backend_id` of `service_id` now, as the
/// kernel's `lb::relocate`: the membership entry's slot, confirmed by that slot.
fn relocate(lb: &MapContents, key: &ServiceKey, service_id: u32, backend_id: u32) -> Option<u16> {
    let member = MemberKey { service_id, backend_id, scope: key.scope, _pad: [0; 3] };
    let slot = lb.members.get(&member)?.slot;
    let v = lb.services.get(&ServiceKey { slot, ..*key })?;
    (slot != 0 && v.backend_id == backend_id && v.service_id == service_id).then_some(slot)
}

/// Where a remembered (slot, backend) is now in the frontend `key` (`front`): its slot, or the
/// slot the backend moved to, as `lb::lookup` keeps a sticky backend. `None`: it left.
fn still_in(lb: &MapContents, key: &ServiceKey, front: &ServiceValue, slot: u16, backend_id: u32) -> Option<u16> {
    if (1..=front.count).contains(&slot) && lb.services.get(&ServiceKey { slot, ..*key }).is_some_and(|v| v.backend_id == backend_id) {
        return Some(slot);
    }
    relocate(lb, key, front.service_id, backend_id).filter(|moved| *moved <= front.count)
}

/// Whether a (client, frontend) entry is a UDP flow whose backend has left the service, as
/// the kernel's `conntrack::stale`: then its next datagram is balanced afresh. Returns the
/// slot the flow's backend is in now otherwise.
fn stale(lb: &MapContents, key: &CtKey, v: &CtValue) -> Result<u16, ()> {
    if key.protocol != PROTO_UDP || v.flags & CT_FLAG_FRONTEND == 0 {
        return Ok(v.slot);
    }
    let skey = ServiceKey { address: key.dst_address, port: key.dst_port, slot: v.slot, protocol: key.protocol, scope: 0, _pad: [0; 2] };
    if lb.services.get(&skey).is_some_and(|s| s.backend_id == v.backend_id) {
        return Ok(v.slot);
    }
    relocate(lb, &skey, v.service_id, v.backend_id).ok_or(())
}

fn ct_key(src: ([u8; 4], [u8; 2]), dst: ([u8; 4], [u8; 2]), protocol: u8, direction: u8) -> CtKey {
    CtKey { src_address: src.0, dst_address: dst.0, src_port: src.1, dst_port: dst.1, protocol, direction, _pad: [0; 2] }
}

fn entry(k: &CtKey, v: &CtValue, role: &str, now_ns: u64) -> ConntrackEntry {
    ConntrackEntry {
        direction: if k.direction == CT_INGRESS { "ingress" } else { "egress" }.to_string(),
        src: addr(k.src_address, k.src_port),
        dst: addr(k.dst_address, k.dst_port),
        protocol: proto_name(k.protocol),
        nat: addr(v.nat_address, v.nat_port),
        role: role.to_string(),
        service_id: v.service_id,
        expires_in_seconds: seconds(v.expires_ns, now_ns),
    }
}

/// Every tracked flow, from its (client, frontend) entry and the entries that go with it
/// (`kproxy_common::ct`): the backend's reply, and with SNAT the forwarded request and its
/// reply. Entries of no flow are `unpaired`. Sorted by frontend, then client.
pub fn conntrack(lb: &MapContents, flows: &FlowContents) -> ConntrackDump {
    let now = flows.now_ns;
    let mut used: HashSet<CtKey> = HashSet::new();
    let mut out = Vec::new();
    for (k, v) in &flows.ct {
        if k.direction != CT_INGRESS || v.flags & CT_FLAG_FRONTEND == 0 {
            continue;
        }
        let (client, frontend, backend) = ((k.src_address, k.src_port), (k.dst_address, k.dst_port), (v.nat_address, v.nat_port));
        used.insert(*k);
        let mut entries = vec![entry(k, v, "client→frontend", now)];
        let mut take = |key: CtKey, role: &str, entries: &mut Vec<ConntrackEntry>| {
            let found = flows.ct.get(&key).copied();
            if let Some(value) = found {
                used.insert(key);
                entries.push(entry(&key, &value, role, now));
            }
            found
        };
        take(ct_key(backend, client, k.protocol, CT_EGRESS), "backend reply", &mut entries);
        let snat = take(ct_key(client, backend, k.protocol, CT_EGRESS), "SNAT request", &mut entries);
        if let Some(s) = snat {
            take(ct_key(backend, (s.nat_address, s.nat_port), k.protocol, CT_INGRESS), "SNAT reply", &mut entries);
        }
        let seen = [(CT_SEEN_SYN, "syn"), (CT_SEEN_ESTABLISHED, "established"), (CT_SEEN_CLOSING, "closing")]
            .into_iter()
            .filter(|(bit, _)| v.seen & bit != 0)
            .map(|(_, name)| name.to_string())
            .collect();
        out.push(ConntrackFlow {
            client: addr(client.0, client.1),
            frontend: addr(frontend.0, frontend.1),
            protocol: proto_name(k.protocol),
            service: service_name(lb, v.service_id),
            backend: addr(backend.0, backend.1),
            backend_id: v.backend_id,
            slot: v.slot,
            snat: snat.map(|s| addr(s.nat_address, s.nat_port)),
            seen,
            expires_in_seconds: seconds(v.expires_ns, now),
            entries,
        });
    }
    let sort_key = |a: &str| a.parse::<SocketAddrV4>().ok();
    out.sort_by(|a, b| {
        (sort_key(&a.frontend), &a.protocol, sort_key(&a.client)).cmp(&(sort_key(&b.frontend), &b.protocol, sort_key(&b.client)))
    });
    let mut unpaired: Vec<ConntrackEntry> =
        flows.ct.iter().filter(|(k, _)| !used.contains(k)).map(|(k, v)| entry(k, v, "unpaired", now)).collect();
    unpaired.sort_by_key(|e| (sort_key(&e.src), sort_key(&e.dst)));
    ConntrackDump { flows: out, unpaired }
}

/// `kproxy dump --conntrack` filters; every one given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConntrackFilter {
    /// The client's address, and port if given.
    pub src: Option<(Ipv4Addr, Option<u16>)>,
    /// The frontend's address, and port if given.
    pub dst: Option<(Ipv4Addr, Option<u16>)>,
    pub protocol: Option<Protocol>,
    /// The backend's address, and port if given.
    pub backend: Option<(Ipv4Addr, Option<u16>)>,
}

impl ConntrackFilter {
    pub fn is_empty(&self) -> bool {
        *self == ConntrackFilter::default()
    }

    fn matches(&self, flow: &ConntrackFlow) -> bool {
        let at = |want: Option<(Ipv4Addr, Option<u16>)>, have: &str| {
            let Some((ip, port)) = want else { return true };
            have.parse::<SocketAddrV4>().is_ok_and(|a| *a.ip() == ip && port.is_none_or(|p| a.port() == p))
        };
        at(self.src, &flow.client)
            && at(self.dst, &flow.frontend)
            && at(self.backend, &flow.backend)
            && self.protocol.is_none_or(|p| p.to_string() == flow.protocol)
    }

    /// The flows of `dump` that match; unpaired entries are kept only without filters.
    pub fn apply(&self, mut dump: ConntrackDump) -> ConntrackDump {
        if !self.is_empty() {
            dump.flows.retain(|f| self.matches(f));
            dump.unpaired.clear();
        }
        dump
    }
}

/// Traces `q` through the maps, in the kernel's order: at tc a tracked flow first (the given
/// source port), then the frontend lookup (the in-cluster scope for in-cluster clients of a
/// frontend with two scopes), the source ranges (tc only), no backend (drop or refuse), then
/// the selection (session affinity, else random).
pub fn trace(lb: &MapContents, flows: &FlowContents, q: &Query) -> Trace {
    let f = q.frontend;
    let protocol = f.protocol.ip_proto();
    let now = flows.now_ns;
    let conntrack: Vec<ConntrackFlow> = ConntrackFilter {
        src: Some((q.source, q.source_port)),
        dst: Some((f.address, Some(f.port))),
        protocol: Some(f.protocol),
        backend: None,
    }
    .apply(conntrack(lb, flows))
    .flows;
    let mut t = Trace {
        source: match q.source_port {
            Some(port) => SocketAddrV4::new(q.source, port).to_string(),
            None => q.source.to_string(),
        },
        source_pod: q.source_pod.clone(),
        destination: SocketAddrV4::new(f.address, f.port).to_string(),
        protocol: f.protocol.to_string(),
        path: match q.origin {
            Origin::InCluster => TracePath::Socket,
            Origin::Outside => TracePath::Tc,
        },
        path_reason: q.origin_reason.clone(),
        frontend: None,
        verdict: Verdict::NotAService,
        verdict_reason: String::new(),
        selection: None,
        conntrack,
    };
    let key0 = service_key(f, 0);
    let front0 = lb.services.get(&key0).copied();

    // tc: a tracked, unexpired, not stale flow keeps its backend, whatever the frontend is now.
    let mut note = String::new();
    if let (Origin::Outside, Some(port)) = (q.origin, q.source_port) {
        let k = ct_key((q.source.octets(), port.to_be_bytes()), (key0.address, key0.port), protocol, CT_INGRESS);
        if let Some(v) = flows.ct.get(&k).filter(|v| v.expires_ns > now) {
            match stale(lb, &k, v) {
                Ok(slot) => {
                    let backend = addr(v.nat_address, v.nat_port);
                    t.verdict = Verdict::Backend;
                    t.verdict_reason = format!(
                        "an existing flow: its conntrack entry ({}) sends it to {backend} (expires in {:.0} s)",
                        addr(k.src_address, k.src_port),
                        seconds(v.expires_ns, now)
                    );
                    t.selection = Some(Selection::Conntrack { backend, backend_id: v.backend_id, slot });
                    if let Some(front) = front0 {
                        t.frontend = Some(describe(lb, &key0, &front, &key0, &front, q));
                    }
                    return t;
                }
                Err(()) => note = "; its tracked backend left the service, so its next datagram is balanced afresh".into(),
            }
        }
    }

    let Some(front0) = front0 else {
        t.verdict_reason = format!("{}/{} is not a frontend in the services map: the connection is left alone", t.destination, t.protocol);
        return t;
    };
    let (mut key, mut front) = (key0, front0);
    if q.origin == Origin::InCluster && front0.flags & SVC_FLAG_TWO_SCOPES != 0 {
        let internal = ServiceKey { scope: SCOPE_INTERNAL, ..key0 };
        if let Some(v) = lb.services.get(&internal) {
            (key, front) = (internal, *v);
        }
    }
    let described = describe(lb, &key0, &front0, &key, &front, q);
    let allowed = described.source_allowed;
    t.frontend = Some(described);
    if allowed == Some(false) {
        t.verdict = Verdict::DropSourceRange;
        t.verdict_reason = format!("{} is outside the frontend's loadBalancerSourceRanges: dropped at tc", q.source);
        return t;
    }
    if front.count == 0 {
        (t.verdict, t.verdict_reason) = match q.origin {
            Origin::Outside if front.flags & SVC_FLAG_DROP_UNSERVED != 0 => (
                Verdict::DropUnserved,
                "externalTrafficPolicy: Local and no endpoint on this node: dropped at tc, so that the client (or \
                 load balancer) retries elsewhere"
                    .to_string(),
            ),
            Origin::Outside => (Verdict::Refuse, "no endpoint: refused at tc (TCP RST, ICMP port unreachable for UDP)".to_string()),
            Origin::InCluster => (Verdict::Refuse, "no endpoint: connect() fails with ECONNREFUSED".to_string()),
        };
        return t;
    }
    t.verdict = Verdict::Backend;
    let udp_socket = if q.origin == Origin::InCluster && protocol == PROTO_UDP {
        "; an unconnected UDP socket then keeps its backend for its later datagrams"
    } else {
        ""
    };
    // Session affinity: the client's entry, if within the timeout and its backend still in.
    if front.flags & SVC_FLAG_AFFINITY != 0 {
        let timeout_ns = u64::from(front.backend_id) * 1_000_000_000;
        let hit = match q.origin {
            Origin::Outside => {
                let mut client = [0u8; 8];
                client[..4].copy_from_slice(&q.source.octets());
                let ak = kproxy_common::lb::AffinityKey { client, service_id: front.service_id, kind: AFFINITY_ADDRESS, _pad: [0; 3] };
                flows.affinity.get(&ak).filter(|a| now.saturating_sub(a.last_used_ns) <= timeout_ns)
            }
            Origin::InCluster => None,
        };
        if let Some(a) = hit {
            if let Some(slot) = still_in(lb, &key, &front, a.slot, a.backend_id) {
                if let Some(b) = lb.backends.get(&a.backend_id) {
                    let backend = addr(b.address, b.port);
                    t.verdict_reason = format!("session affinity: {} used {backend} last, within the timeout{note}", q.source);
                    t.selection = Some(Selection::Affinity {
                        backend,
                        backend_id: a.backend_id,
                        slot,
                        expires_in_seconds: seconds(a.last_used_ns.saturating_add(timeout_ns), now),
                    });
                    return t;
                }
            }
        }
        let held = flows.affinity.keys().filter(|k| k.service_id == front.service_id && k.kind == AFFINITY_NETNS).count();
        t.verdict_reason = match q.origin {
            Origin::Outside => format!(
                "session affinity: no live entry for {} (or its backend left): one of {} backends at random, then \
                 kept for {} s{note}",
                q.source, front.count, front.backend_id
            ),
            Origin::InCluster => format!(
                "session affinity per network namespace on the socket path ({held} clients hold an entry; a client's \
                 namespace cannot be told from its address): its last backend if within {} s, else one of {} at random{udp_socket}",
                front.backend_id, front.count
            ),
        };
        t.selection = Some(Selection::Random { among: front.count });
        return t;
    }
    t.verdict_reason = format!("one of {} backends at random{udp_socket}{note}", front.count);
    t.selection = Some(Selection::Random { among: front.count });
    t
}

/// The frontend entry as the trace shows it: the scope-0 entry's flags and the policies they
/// record, and the backend set of the scope used (`key`, `front`).
fn describe(lb: &MapContents, key0: &ServiceKey, front0: &ServiceValue, key: &ServiceKey, front: &ServiceValue, q: &Query) -> TraceFrontend {
    let meta = lb.meta.get(&front0.service_id);
    let (namespace, name, port_name) = meta.map(meta_names).unwrap_or_default();
    let ranges: Vec<_> = lb.source_ranges.get(&front0.service_id).into_iter().flatten().copied().collect();
    let flags = front0.flags;
    let affinity = (front.flags & SVC_FLAG_AFFINITY != 0).then_some(front.backend_id);
    let mut policies = Vec::new();
    if flags & SVC_FLAG_TWO_SCOPES != 0 {
        policies.push(
            "externalTrafficPolicy: Local: clients from outside get this node's endpoints, clients in the cluster \
             (socket path) the cluster's"
                .to_string(),
        );
    }
    if flags & SVC_FLAG_DROP_UNSERVED != 0 {
        policies.push("externalTrafficPolicy: Local and no endpoint on this node: new flows from outside are dropped".to_string());
    }
    if flags & SVC_FLAG_SOURCE_RANGES != 0 {
        let list: Vec<String> = ranges.iter().map(ToString::to_string).collect();
        policies.push(format!("loadBalancerSourceRanges: only from {} (checked at tc)", list.join(", ")));
    }
    if let Some(seconds) = affinity {
        policies.push(format!("sessionAffinity: ClientIP, timeout {seconds} s"));
    }
    let source_allowed = (q.origin == Origin::Outside && flags & SVC_FLAG_SOURCE_RANGES != 0)
        .then(|| ranges.iter().any(|r| r.contains(q.source)));
    TraceFrontend {
        service_id: front0.service_id,
        namespace,
        name,
        port_name,
        svc_type: meta.and_then(|m| FrontendKind::from_meta_code(m.svc_type)).map_or("Unknown", FrontendKind::as_str).to_string(),
        frontend: addr(key0.address, key0.port),
        scope: if key.scope == SCOPE_EXTERNAL { "external" } else { "in_cluster" }.to_string(),
        flags: flag_names(flags),
        policies,
        source_ranges: if flags & SVC_FLAG_SOURCE_RANGES != 0 { ranges.iter().map(ToString::to_string).collect() } else { vec![] },
        source_allowed,
        session_affinity_seconds: affinity,
        backends: lb
            .slots(key, front)
            .into_iter()
            .map(|(slot, backend_id, a)| TraceBackend { slot, backend_id, address: a.map(|a| a.to_string()).unwrap_or_default() })
            .collect(),
    }
}

/// `kproxy trace` for people.
pub fn write_trace(t: &Trace, out: &mut impl Write) -> std::io::Result<()> {
    let source = match &t.source_pod {
        Some(pod) => format!("{} (pod {pod})", t.source),
        None => t.source.clone(),
    };
    writeln!(out, "trace {source} → {}/{}", t.destination, t.protocol)?;
    let path = match t.path {
        TracePath::Socket => "socket (cgroup connect4/sendmsg4)",
        TracePath::Tc => "tc (ingress of the node's devices)",
    };
    writeln!(out, "path:      {path}\n           {}", t.path_reason)?;
    if let Some(fe) = &t.frontend {
        let name = if fe.port_name.is_empty() { format!("{}/{}", fe.namespace, fe.name) } else { format!("{}/{}:{}", fe.namespace, fe.name, fe.port_name) };
        writeln!(out, "frontend:  {} {} {name} (service id {}, {} entries)", fe.svc_type, fe.frontend, fe.service_id, fe.scope)?;
        writeln!(out, "flags:     {}", fe.flags.join(" "))?;
        for p in &fe.policies {
            writeln!(out, "policy:    {p}")?;
        }
        if let Some(allowed) = fe.source_allowed {
            writeln!(out, "source:    {} loadBalancerSourceRanges", if allowed { "within" } else { "OUTSIDE" })?;
        }
        if fe.backends.is_empty() {
            writeln!(out, "backends:  none")?;
        }
        for (i, b) in fe.backends.iter().enumerate() {
            let head = if i == 0 { "backends:" } else { "" };
            writeln!(out, "{head:10} slot {:<3} {} (backend id {})", b.slot, if b.address.is_empty() { "(missing)" } else { &b.address }, b.backend_id)?;
        }
    }
    let verdict = match t.verdict {
        Verdict::NotAService => "not a service",
        Verdict::Backend => "translated",
        Verdict::Refuse => "REFUSED",
        Verdict::DropSourceRange => "DROPPED (source range)",
        Verdict::DropUnserved => "DROPPED (no local endpoint)",
    };
    writeln!(out, "verdict:   {verdict}: {}", t.verdict_reason)?;
    match &t.selection {
        Some(Selection::Random { among }) => writeln!(out, "selection: random among {among}")?,
        Some(Selection::Affinity { backend, slot, expires_in_seconds, .. }) => {
            writeln!(out, "selection: session affinity → {backend} (slot {slot}, holds {expires_in_seconds:.0} s more)")?
        }
        Some(Selection::Conntrack { backend, slot, .. }) => writeln!(out, "selection: conntrack → {backend} (slot {slot})")?,
        None => {}
    }
    if t.conntrack.is_empty() {
        writeln!(out, "conntrack: no tracked flow from {} to {}", t.source, t.destination)?;
    } else {
        write_flows(&t.conntrack, out)?;
    }
    Ok(())
}

/// Tracked flows for people, one line per flow and one per entry.
pub fn write_flows(flows: &[ConntrackFlow], out: &mut impl Write) -> std::io::Result<()> {
    for f in flows {
        let snat = f.snat.as_ref().map(|s| format!(" snat {s}")).unwrap_or_default();
        let service = f.service.as_ref().map(|s| format!(" ({s})")).unwrap_or_default();
        let seen = if f.seen.is_empty() { String::new() } else { format!(" [{}]", f.seen.join(",")) };
        writeln!(
            out,
            "conntrack: {} {} → {}{service} → {}{snat}{seen} expires in {:.0} s",
            f.protocol, f.client, f.frontend, f.backend, f.expires_in_seconds
        )?;
        for e in &f.entries {
            writeln!(out, "             {:7} {} → {}  rewrite to {}  ({})", e.direction, e.src, e.dst, e.nat, e.role)?;
        }
    }
    Ok(())
}

/// `kproxy dump --conntrack` for people.
pub fn write_conntrack(dump: &ConntrackDump, out: &mut impl Write) -> std::io::Result<()> {
    write_flows(&dump.flows, out)?;
    for e in &dump.unpaired {
        writeln!(out, "unpaired:  {} {:7} {} → {}  rewrite to {}  expires in {:.0} s", e.protocol, e.direction, e.src, e.dst, e.nat, e.expires_in_seconds)?;
    }
    writeln!(out, "{} flows, {} unpaired entries", dump.flows.len(), dump.unpaired.len())
}

/// `IP:PORT/PROTO` (`PROTO` `tcp` or `udp`, any case; `/tcp` may be left out), as `kproxy
/// trace --to` takes it.
pub fn parse_destination(s: &str) -> Result<Frontend, String> {
    let (at, protocol) = match s.rsplit_once('/') {
        Some((at, p)) => (at, parse_protocol(p).map_err(|e| format!("{s:?}: {e}"))?),
        None => (s, Protocol::Tcp),
    };
    let at: SocketAddrV4 = at.parse().map_err(|_| format!("{s:?}: {at:?} is not IPv4:PORT (as in 10.96.0.10:80/tcp)"))?;
    Ok(Frontend { address: *at.ip(), port: at.port(), protocol })
}

/// `tcp` or `udp`, any case.
pub fn parse_protocol(s: &str) -> Result<Protocol, String> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        _ => Err(format!("protocol {s:?} is not tcp or udp")),
    }
}

/// `IP` or `IP:PORT`.
pub fn parse_address(s: &str) -> Result<(Ipv4Addr, Option<u16>), String> {
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        return Ok((ip, None));
    }
    s.parse::<SocketAddrV4>().map(|a| (*a.ip(), Some(a.port()))).map_err(|_| format!("{s:?} is not IPv4 or IPv4:PORT"))
}

/// The address of pod `namespace/name` from the apiserver (`status.podIP`), with the client
/// configuration the agent uses (`--kubeconfig`, else in-cluster).
pub async fn pod_address(kubeconfig: Option<&std::path::Path>, pod: &str) -> anyhow::Result<Ipv4Addr> {
    use anyhow::Context as _;
    let (namespace, name) = pod
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .ok_or_else(|| anyhow::anyhow!("--pod {pod:?}: not NAMESPACE/NAME"))?;
    let config = crate::sources::apiserver::config(kubeconfig).await?;
    let client = kube::Client::try_from(config).context("create the Kubernetes client")?;
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, namespace);
    let found = api.get_opt(name).await.with_context(|| format!("pod {namespace}/{name}: GET from the apiserver"))?;
    let found = found.ok_or_else(|| anyhow::anyhow!("pod {namespace}/{name}: not found"))?;
    let ip = found.status.and_then(|s| s.pod_ip).filter(|ip| !ip.is_empty());
    let ip = ip.ok_or_else(|| anyhow::anyhow!("pod {namespace}/{name}: status.podIP is empty (not running yet?)"))?;
    ip.parse().map_err(|_| anyhow::anyhow!("pod {namespace}/{name}: status.podIP {ip:?} is not an IPv4 address"))
}

#[cfg(test)]
mod tests {
    use kproxy_common::{
        ct::CT_SEEN_ESTABLISHED,
        lb::{AffinityKey, AffinityValue, Backend, MemberValue},
        PROTO_TCP,
    };

    use super::*;
    use crate::{dataplane::service_meta, model::{Cidr, FrontendKind, ServicePortName}};

    const NOW: u64 = 1_000 * 1_000_000_000;
    const NODE_PORT: &str = "192.168.50.2:30080/tcp";
    const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);

    fn fe(s: &str) -> Frontend {
        parse_destination(s).unwrap()
    }

    fn b(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    /// Writes a frontend's scope-`scope` entries (and its backends and metadata) as the agent
    /// does.
    fn program(lb: &mut MapContents, f: Frontend, scope: u8, flags: u16, timeout: u32, id: u32, backends: &[(u32, &str)]) {
        let key0 = ServiceKey { scope, ..service_key(f, 0) };
        lb.services.insert(key0, ServiceValue { backend_id: timeout, count: backends.len() as u16, flags, service_id: id });
        for (slot, (bid, at)) in (1u16..).zip(backends) {
            let a = b(at);
            lb.backends.insert(*bid, Backend { address: a.ip().octets(), port: a.port().to_be_bytes(), protocol: f.protocol.ip_proto(), flags: 0 });
            lb.services.insert(ServiceKey { slot, ..key0 }, ServiceValue { backend_id: *bid, count: 0, flags: 0, service_id: id });
            lb.members.insert(MemberKey { service_id: id, backend_id: *bid, scope, _pad: [0; 3] }, MemberValue { slot, _pad: 0 });
        }
        let kind = if flags & SVC_FLAG_LOAD_BALANCER != 0 { FrontendKind::LoadBalancer } else { FrontendKind::NodePort };
        let name = ServicePortName { namespace: "default".into(), name: "web".into(), port_name: "http".into(), protocol: f.protocol };
        lb.meta.insert(id, service_meta(f, &name, kind));
    }

    fn node_port() -> MapContents {
        let mut lb = MapContents::default();
        program(&mut lb, fe(NODE_PORT), SCOPE_EXTERNAL, SVC_FLAG_NODE_PORT, 0, 7, &[(1, "10.244.1.10:8080"), (2, "10.244.1.11:8080")]);
        lb
    }

    fn query(from: Ipv4Addr, port: Option<u16>, to: &str, origin: Origin) -> Query {
        Query { source: from, source_port: port, source_pod: None, frontend: fe(to), origin, origin_reason: "test".into() }
    }

    fn flows() -> FlowContents {
        FlowContents { now_ns: NOW, ..Default::default() }
    }

    /// A tracked flow from `client` to `frontend` on backend `backend_id` in `slot`, as
    /// `conntrack::create` writes it (`snat`: as `create_snat`).
    fn track(flows: &mut FlowContents, client: &str, f: Frontend, backend: &str, backend_id: u32, slot: u16, snat: Option<&str>) {
        let (c, fa, ba) = (b(client), SocketAddrV4::new(f.address, f.port), b(backend));
        let ep = |a: SocketAddrV4| (a.ip().octets(), a.port().to_be_bytes());
        let p = f.protocol.ip_proto();
        let value = |to: SocketAddrV4| CtValue { expires_ns: NOW + 30_000_000_000, nat_address: to.ip().octets(), nat_port: to.port().to_be_bytes(), service_id: 7, ..Default::default() };
        flows.ct.insert(ct_key(ep(ba), ep(c), p, CT_EGRESS), value(fa));
        if let Some(n) = snat {
            flows.ct.insert(ct_key(ep(c), ep(ba), p, CT_EGRESS), value(b(n)));
            flows.ct.insert(ct_key(ep(ba), ep(b(n)), p, CT_INGRESS), value(c));
        }
        let front = CtValue { flags: CT_FLAG_FRONTEND, backend_id, slot, seen: CT_SEEN_ESTABLISHED, ..value(ba) };
        flows.ct.insert(ct_key(ep(c), ep(fa), p, CT_INGRESS), front);
    }

    #[test]
    fn a_node_port_from_outside_is_random_among_its_backends_at_tc() {
        let t = trace(&node_port(), &flows(), &query(CLIENT, None, NODE_PORT, Origin::Outside));
        assert_eq!((t.path, t.verdict, t.selection), (TracePath::Tc, Verdict::Backend, Some(Selection::Random { among: 2 })));
        let f = t.frontend.unwrap();
        assert_eq!((f.service_id, f.svc_type.as_str(), f.scope.as_str(), f.flags), (7, "NodePort", "external", vec!["NodePort".to_string()]));
        let backends: Vec<_> = f.backends.iter().map(|b| (b.slot, b.backend_id, b.address.as_str())).collect();
        assert_eq!(backends, [(1, 1, "10.244.1.10:8080"), (2, 2, "10.244.1.11:8080")]);
        assert_eq!(f.source_allowed, None);
    }

    #[test]
    fn an_unknown_destination_is_not_a_service() {
        let t = trace(&node_port(), &flows(), &query(CLIENT, None, "192.168.50.2:30081/tcp", Origin::Outside));
        assert_eq!((t.verdict, t.frontend, t.selection), (Verdict::NotAService, None, None));
        // Another protocol at the same address and port is another frontend.
        let t = trace(&node_port(), &flows(), &query(CLIENT, None, "192.168.50.2:30080/udp", Origin::Outside));
        assert_eq!(t.verdict, Verdict::NotAService);
    }

    #[test]
    fn source_ranges_drop_at_tc_before_anything_else_and_are_not_checked_at_the_socket() {
        let mut lb = MapContents::default();
        let lb_ip = "203.0.113.30:80/tcp";
        program(&mut lb, fe(lb_ip), SCOPE_EXTERNAL, SVC_FLAG_LOAD_BALANCER | SVC_FLAG_SOURCE_RANGES, 0, 7, &[(1, "10.244.1.10:8080")]);
        lb.source_ranges.entry(7).or_default().insert(Cidr { address: Ipv4Addr::new(192, 168, 50, 0), prefix_len: 24 });
        let allowed = trace(&lb, &flows(), &query(CLIENT, None, lb_ip, Origin::Outside));
        assert_eq!((allowed.verdict, allowed.frontend.as_ref().unwrap().source_allowed), (Verdict::Backend, Some(true)));
        let outsider = Ipv4Addr::new(198, 51, 100, 7);
        let denied = trace(&lb, &flows(), &query(outsider, None, lb_ip, Origin::Outside));
        assert_eq!((denied.verdict, denied.selection), (Verdict::DropSourceRange, None));
        assert_eq!(denied.frontend.unwrap().source_ranges, ["192.168.50.0/24"]);
        // Without backends, the source range still decides first, as in tc::ingress.
        lb.services.get_mut(&service_key(fe(lb_ip), 0)).unwrap().count = 0;
        assert_eq!(trace(&lb, &flows(), &query(outsider, None, lb_ip, Origin::Outside)).verdict, Verdict::DropSourceRange);
        assert_eq!(trace(&lb, &flows(), &query(CLIENT, None, lb_ip, Origin::Outside)).verdict, Verdict::Refuse);
        // The socket path has no source range check.
        let socket = trace(&lb, &flows(), &query(outsider, None, lb_ip, Origin::InCluster));
        assert_eq!((socket.verdict, socket.frontend.unwrap().source_allowed), (Verdict::Refuse, None));
    }

    #[test]
    fn external_traffic_policy_local_without_local_endpoints_drops_outside_and_uses_the_in_cluster_scope_inside() {
        let mut lb = MapContents::default();
        let np = fe(NODE_PORT);
        program(&mut lb, np, SCOPE_EXTERNAL, SVC_FLAG_NODE_PORT | SVC_FLAG_DROP_UNSERVED | SVC_FLAG_TWO_SCOPES, 0, 7, &[]);
        program(&mut lb, np, SCOPE_INTERNAL, SVC_FLAG_NODE_PORT, 0, 7, &[(2, "10.244.1.11:8080")]);
        let outside = trace(&lb, &flows(), &query(CLIENT, None, NODE_PORT, Origin::Outside));
        assert_eq!(outside.verdict, Verdict::DropUnserved);
        let f = outside.frontend.unwrap();
        assert_eq!((f.scope.as_str(), f.backends.len()), ("external", 0));
        assert!(f.policies.iter().any(|p| p.contains("no endpoint on this node")), "{:?}", f.policies);
        let inside = trace(&lb, &flows(), &query(Ipv4Addr::new(10, 244, 1, 10), None, NODE_PORT, Origin::InCluster));
        assert_eq!((inside.path, inside.verdict, inside.selection), (TracePath::Socket, Verdict::Backend, Some(Selection::Random { among: 1 })));
        let f = inside.frontend.unwrap();
        assert_eq!((f.scope.as_str(), f.backends[0].address.as_str()), ("in_cluster", "10.244.1.11:8080"));
        // Without the in-cluster scope, the socket refuses (ECONNREFUSED), as sock::forward.
        lb.services.get_mut(&service_key(np, 0)).unwrap().flags &= !SVC_FLAG_TWO_SCOPES;
        assert_eq!(trace(&lb, &flows(), &query(Ipv4Addr::LOCALHOST, None, NODE_PORT, Origin::InCluster)).verdict, Verdict::Refuse);
    }

    #[test]
    fn an_existing_flow_keeps_its_conntrack_backend_unless_expired_or_a_stale_udp_flow() {
        let lb = node_port();
        let mut fl = flows();
        track(&mut fl, "192.168.50.100:40000", fe(NODE_PORT), "10.244.1.11:8080", 2, 2, None);
        let t = trace(&lb, &fl, &query(CLIENT, Some(40000), NODE_PORT, Origin::Outside));
        assert_eq!(t.selection, Some(Selection::Conntrack { backend: "10.244.1.11:8080".into(), backend_id: 2, slot: 2 }));
        assert_eq!(t.conntrack.len(), 1);
        assert_eq!(t.conntrack[0].entries.len(), 2);
        // Another port of the same client: a new connection, but its flows are listed.
        let other = trace(&lb, &fl, &query(CLIENT, Some(40001), NODE_PORT, Origin::Outside));
        assert_eq!((other.selection, other.conntrack.len()), (Some(Selection::Random { among: 2 }), 0));
        assert_eq!(trace(&lb, &fl, &query(CLIENT, None, NODE_PORT, Origin::Outside)).conntrack.len(), 1);
        // Expired: no longer matches.
        fl.now_ns = NOW + 31_000_000_000;
        let expired = trace(&lb, &fl, &query(CLIENT, Some(40000), NODE_PORT, Origin::Outside));
        assert_eq!(expired.selection, Some(Selection::Random { among: 2 }));
        assert!(expired.conntrack[0].expires_in_seconds < 0.0);

        // UDP: a flow whose backend left is balanced afresh; one whose backend moved keeps it.
        let dns = "192.168.50.2:30053/udp";
        let mut lb = MapContents::default();
        program(&mut lb, fe(dns), SCOPE_EXTERNAL, SVC_FLAG_NODE_PORT, 0, 7, &[(1, "10.244.1.10:5353")]);
        let mut fl = flows();
        track(&mut fl, "192.168.50.100:40000", fe(dns), "10.244.1.11:5353", 2, 1, None);
        let stale = trace(&lb, &fl, &query(CLIENT, Some(40000), dns, Origin::Outside));
        assert_eq!(stale.selection, Some(Selection::Random { among: 1 }));
        assert!(stale.verdict_reason.contains("balanced afresh"), "{}", stale.verdict_reason);
        program(&mut lb, fe(dns), SCOPE_EXTERNAL, SVC_FLAG_NODE_PORT, 0, 7, &[(1, "10.244.1.10:5353"), (2, "10.244.1.11:5353")]);
        let moved = trace(&lb, &fl, &query(CLIENT, Some(40000), dns, Origin::Outside));
        assert_eq!(moved.selection, Some(Selection::Conntrack { backend: "10.244.1.11:5353".into(), backend_id: 2, slot: 2 }));
    }

    #[test]
    fn session_affinity_from_outside_keeps_the_live_entry_s_backend() {
        let mut lb = MapContents::default();
        program(&mut lb, fe(NODE_PORT), SCOPE_EXTERNAL, SVC_FLAG_NODE_PORT | SVC_FLAG_AFFINITY, 10, 7, &[(1, "10.244.1.10:8080"), (2, "10.244.1.11:8080")]);
        let mut fl = flows();
        let mut client = [0u8; 8];
        client[..4].copy_from_slice(&CLIENT.octets());
        let key = AffinityKey { client, service_id: 7, kind: AFFINITY_ADDRESS, _pad: [0; 3] };
        fl.affinity.insert(key, AffinityValue { last_used_ns: NOW - 4_000_000_000, backend_id: 2, slot: 2, _pad: 0 });
        let t = trace(&lb, &fl, &query(CLIENT, None, NODE_PORT, Origin::Outside));
        assert_eq!(t.selection, Some(Selection::Affinity { backend: "10.244.1.11:8080".into(), backend_id: 2, slot: 2, expires_in_seconds: 6.0 }));
        assert_eq!(t.frontend.unwrap().session_affinity_seconds, Some(10));
        // Another client, or after the timeout: random.
        let other = trace(&lb, &fl, &query(Ipv4Addr::new(192, 168, 50, 101), None, NODE_PORT, Origin::Outside));
        assert_eq!(other.selection, Some(Selection::Random { among: 2 }));
        fl.now_ns = NOW + 7_000_000_000;
        assert_eq!(trace(&lb, &fl, &query(CLIENT, None, NODE_PORT, Origin::Outside)).selection, Some(Selection::Random { among: 2 }));
        // The backend left: random.
        fl.now_ns = NOW;
        program(&mut lb, fe(NODE_PORT), SCOPE_EXTERNAL, SVC_FLAG_NODE_PORT | SVC_FLAG_AFFINITY, 10, 7, &[(1, "10.244.1.10:8080")]);
        lb.members.remove(&MemberKey { service_id: 7, backend_id: 2, scope: 0, _pad: [0; 3] });
        assert_eq!(trace(&lb, &fl, &query(CLIENT, None, NODE_PORT, Origin::Outside)).selection, Some(Selection::Random { among: 1 }));
    }

    #[test]
    fn conntrack_groups_a_flow_s_entries_and_filters_them() {
        let lb = node_port();
        let mut fl = flows();
        track(&mut fl, "192.168.50.100:40000", fe(NODE_PORT), "10.244.1.11:8080", 2, 2, Some("10.0.0.1:61000"));
        track(&mut fl, "192.168.50.101:40000", fe(NODE_PORT), "10.244.1.10:8080", 1, 1, None);
        let orphan = ct_key(([10, 244, 1, 12], 80u16.to_be_bytes()), ([1, 2, 3, 4], 5u16.to_be_bytes()), PROTO_TCP, CT_EGRESS);
        fl.ct.insert(orphan, CtValue::default());
        let dump = conntrack(&lb, &fl);
        assert_eq!(dump.flows.len(), 2);
        let f = &dump.flows[0];
        assert_eq!((f.client.as_str(), f.backend.as_str(), f.snat.as_deref()), ("192.168.50.100:40000", "10.244.1.11:8080", Some("10.0.0.1:61000")));
        let roles: Vec<_> = f.entries.iter().map(|e| e.role.as_str()).collect();
        assert_eq!(roles, ["client→frontend", "backend reply", "SNAT request", "SNAT reply"]);
        assert_eq!((f.service.as_deref(), f.seen.clone()), (Some("default/web:http"), vec!["established".to_string()]));
        assert_eq!(dump.flows[1].entries.len(), 2);
        assert_eq!(dump.unpaired.len(), 1);
        let by = |filter: ConntrackFilter| filter.apply(conntrack(&lb, &fl)).flows.iter().map(|f| f.client.clone()).collect::<Vec<_>>();
        assert_eq!(by(ConntrackFilter { backend: Some((Ipv4Addr::new(10, 244, 1, 10), None)), ..Default::default() }), ["192.168.50.101:40000"]);
        assert_eq!(by(ConntrackFilter { src: Some((CLIENT, Some(40000))), ..Default::default() }), ["192.168.50.100:40000"]);
        assert_eq!(by(ConntrackFilter { src: Some((CLIENT, Some(40001))), ..Default::default() }), Vec::<String>::new());
        assert_eq!(by(ConntrackFilter { protocol: Some(Protocol::Udp), ..Default::default() }), Vec::<String>::new());
        assert_eq!(by(ConntrackFilter { dst: Some((Ipv4Addr::new(192, 168, 50, 2), Some(30080))), ..Default::default() }).len(), 2);
        assert!(ConntrackFilter { protocol: Some(Protocol::Tcp), ..Default::default() }.apply(conntrack(&lb, &fl)).unpaired.is_empty());
    }

    #[test]
    fn the_origin_follows_the_source() {
        let node = [("kpext0".to_string(), Ipv4Addr::new(192, 168, 50, 2))];
        assert_eq!(origin_of(CLIENT, None, &node, None).0, Origin::Outside);
        assert_eq!(origin_of(Ipv4Addr::new(192, 168, 50, 2), None, &node, None).0, Origin::InCluster);
        assert_eq!(origin_of(Ipv4Addr::LOCALHOST, None, &node, None).0, Origin::InCluster);
        assert_eq!(origin_of(Ipv4Addr::new(10, 244, 1, 10), Some("default/client"), &node, None).0, Origin::InCluster);
        assert_eq!(origin_of(Ipv4Addr::new(10, 244, 1, 10), None, &node, Some(Origin::InCluster)).0, Origin::InCluster);
    }

    #[test]
    fn destinations_and_addresses_parse_or_say_why_not() {
        assert_eq!(parse_destination("10.96.0.10:53/UDP").unwrap(), Frontend { address: Ipv4Addr::new(10, 96, 0, 10), port: 53, protocol: Protocol::Udp });
        assert_eq!(parse_destination("10.96.0.10:80").unwrap().protocol, Protocol::Tcp);
        assert!(parse_destination("10.96.0.10:80/sctp").unwrap_err().contains("not tcp or udp"));
        assert!(parse_destination("10.96.0.10/tcp").unwrap_err().contains("not IPv4:PORT"));
        assert_eq!(parse_address("10.0.0.1").unwrap(), (Ipv4Addr::new(10, 0, 0, 1), None));
        assert_eq!(parse_address("10.0.0.1:99").unwrap(), (Ipv4Addr::new(10, 0, 0, 1), Some(99)));
        assert!(parse_address("web").is_err());
    }

    #[test]
    fn the_report_for_people_names_path_frontend_backends_and_verdict() {
        let mut fl = flows();
        track(&mut fl, "192.168.50.100:40000", fe(NODE_PORT), "10.244.1.11:8080", 2, 2, None);
        let t = trace(&node_port(), &fl, &query(CLIENT, None, NODE_PORT, Origin::Outside));
        let mut out = Vec::new();
        write_trace(&t, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        for want in ["path:      tc", "NodePort 192.168.50.2:30080 default/web:http", "slot 2   10.244.1.11:8080", "random among 2", "TCP 192.168.50.100:40000 → 192.168.50.2:30080"] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
    }
}
