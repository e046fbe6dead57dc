//! The tc programs on crafted frames, with BPF_PROG_TEST_RUN: the kernel runs the real,
//! verified programs against maps programmed by the agent's own sync code, and an independent
//! packet library (etherparse) builds the input and checks the output, recomputing every
//! checksum. Needs root (loading BPF); without it every test says SKIPPED.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf,
};
use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use kproxy::{
    dataplane::{
        bpf::{BpfMaps, FrontendCounters, ServiceCounterMaps},
        plan::Limits,
    },
    loader::{self, Capacities},
    model::{DesiredService, DesiredState, Frontend, FrontendKind, Protocol, ServicePortName},
    sync::{SyncScope, Syncer},
};

use kproxy_common::drops::DropReason;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const NODE_PORT: u16 = 30080;

fn skip_unless_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return false;
    }
    eprintln!("SKIPPED (needs root to load BPF programs): {test}");
    true
}

/// The loaded object with the tc programs, and the agent's syncer on its private maps.
struct Datapath {
    ebpf: Ebpf,
    /// Owns the map fds the programs use; also reprograms them ([`Datapath::sync`]).
    syncer: Syncer<BpfMaps>,
    /// Ids of `KP_SVC_COUNTERS` and `KP_SVC_META` (the syncer holds the object's handles).
    counter_map_ids: (u32, u32),
}

fn service(frontend: Frontend, backends: &[&str]) -> (Frontend, DesiredService) {
    let name = ServicePortName {
        namespace: "default".into(),
        name: format!("svc-{}", frontend.port),
        port_name: String::new(),
        protocol: frontend.protocol,
    };
    let backends = backends.iter().map(|b| b.parse().expect("backend address")).collect();
    let desired = DesiredService {
        name: name.into(),
        frontend_type: FrontendKind::ClusterIp,
        backends,
        internal_backends: None,
        draining: Vec::new(),
        drop_unserved: false,
        source_ranges: Vec::new(),
        affinity_timeout: 0,
    };
    (frontend, desired)
}

fn frontend(address: Ipv4Addr, port: u16, protocol: Protocol) -> Frontend {
    Frontend { address, port, protocol }
}

impl Datapath {
    fn new(desired: &DesiredState) -> Self {
        Self::with_service_counters(desired, 0)
    }

    /// As [`Datapath::new`], with `--service-counters service_counters`.
    fn with_service_counters(desired: &DesiredState, service_counters: u32) -> Self {
        let caps = Capacities {
            max_services: 32_768,
            max_backends: 65_536,
            max_sock_entries: 1024,
            max_ct_entries: 65_536,
            service_counters,
        };
        let mut ebpf = loader::load_object(None, caps).expect("load the eBPF object");
        let map_id = |name: &str| match ebpf.map(name).unwrap_or_else(|| panic!("{name} in the object")) {
            aya::maps::Map::HashMap(d) | aya::maps::Map::PerCpuHashMap(d) => d.info().expect("map info").id(),
            _ => panic!("{name}: not a hash map"),
        };
        let counter_map_ids = (map_id("KP_SVC_COUNTERS"), map_id("KP_SVC_META"));
        let maps = BpfMaps::from_ebpf(&mut ebpf).expect("take the maps");
        let limits = Limits {
            max_services: caps.max_services,
            max_backends: caps.max_backends,
            max_service_entries: caps.service_entries(),
        };
        let mut syncer = Syncer::new(maps, limits);
        syncer.sync(desired, SyncScope::Full).expect("program the services");
        for name in ["kp_tc_ingress", "kp_tc_egress", "kp_tc_baseline"] {
            let program: &mut SchedClassifier =
                ebpf.program_mut(name).expect("program in object").try_into().expect("classifier");
            program.load().unwrap_or_else(|e| panic!("verifier rejected {name}: {e:?}"));
        }
        Datapath { ebpf, syncer, counter_map_ids }
    }

    /// Programs `desired` in place of what is programmed.
    fn sync(&mut self, desired: &DesiredState) {
        self.syncer.sync(desired, SyncScope::Full).expect("reprogram the services");
    }

    /// Runs `program` once on `frame`: (verdict, frame out).
    fn run(&self, program: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(program, frame).unwrap_or_else(|e| panic!("test run of {program} on {} bytes: {e:?}", frame.len()))
    }

    fn try_run(&self, program: &str, frame: &[u8]) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        let mut out = vec![0u8; frame.len() + 64];
        let prog: &SchedClassifier = self.ebpf.program(program).expect("program").try_into().expect("classifier");
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::new() };
        let result = prog.test_run(opts)?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// As [`Datapath::run`], with `ctx` as the `__sk_buff` the program sees (e.g. its ifindex).
    fn run_on(&self, program: &str, frame: &[u8], ctx: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 64];
        let prog: &SchedClassifier = self.ebpf.program(program).expect("program").try_into().expect("classifier");
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ctx_in: Some(ctx), ..TestRunOptions::new() };
        let result = prog.test_run(opts).unwrap_or_else(|e| panic!("test run of {program} with a context: {e:?}"));
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// The drop counters of `KP_DROPS`, summed over the CPUs, by reason name.
    fn drops(&self) -> BTreeMap<&'static str, u64> {
        let map: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(self.ebpf.map("KP_DROPS").expect("KP_DROPS in the object")).expect("per-CPU array");
        DropReason::ALL
            .iter()
            .map(|r| (r.as_str(), map.get(&r.index(), 0).expect("a counter").iter().sum()))
            .collect()
    }

    /// The per-frontend counters and the metadata map, as the agent's metrics read them (opened
    /// by id: the syncer holds the object's own handles).
    fn service_counters(&self) -> ServiceCounterMaps {
        let by_id = |id| aya::maps::MapData::from_id(id).expect("open the map by id");
        let (counters, meta) = self.counter_map_ids;
        ServiceCounterMaps::from_map_data(by_id(counters), by_id(meta)).expect("service counter maps")
    }

    /// Average ns per run over `repeat` runs.
    fn cost(&self, program: &str, frame: &[u8], repeat: u32) -> f64 {
        let mut out = vec![0u8; frame.len() + 64];
        let prog: &SchedClassifier = self.ebpf.program(program).expect("program").try_into().expect("classifier");
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat, ..TestRunOptions::new() };
        prog.test_run(opts).expect("test run").duration.as_nanos() as f64
    }
}

fn tcp_frame(src: SocketAddrV4, dst: SocketAddrV4, syn: bool, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), 1000, 64_000);
    let b = if syn { b.syn() } else { b.ack(2000) };
    let mut frame = Vec::new();
    b.write(&mut frame, payload).expect("build TCP frame");
    frame
}

fn udp_frame(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port())
        .write(&mut frame, payload)
        .expect("build UDP frame");
    frame
}

/// Parses a frame with etherparse, checks every checksum from scratch, and returns
/// (source, destination, payload).
fn check(frame: &[u8]) -> (SocketAddrV4, SocketAddrV4, Vec<u8>) {
    let headers = PacketHeaders::from_ethernet_slice(frame).expect("output parses");
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else { panic!("no IPv4 header in output") };
    assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "IPv4 header checksum");
    let payload = headers.payload.slice().to_vec();
    let (sport, dport) = match &headers.transport {
        Some(TransportHeader::Tcp(tcp)) => {
            let want = tcp.calc_checksum_ipv4(ip, &payload).expect("tcp checksum");
            assert_eq!(tcp.checksum, want, "TCP checksum");
            (tcp.source_port, tcp.destination_port)
        }
        Some(TransportHeader::Udp(udp)) => {
            if udp.checksum != 0 {
                let want = udp.calc_checksum_ipv4(ip, &payload).expect("udp checksum");
                assert_eq!(udp.checksum, want, "UDP checksum");
            }
            (udp.source_port, udp.destination_port)
        }
        other => panic!("unexpected transport {other:?}"),
    };
    (
        SocketAddrV4::new(ip.source.into(), sport),
        SocketAddrV4::new(ip.destination.into(), dport),
        payload,
    )
}

fn node_port_state() -> DesiredState {
    [
        service(frontend(NODE, NODE_PORT, Protocol::Tcp), &["10.244.1.10:8080", "10.244.1.11:8080", "10.244.2.10:8080"]),
        service(frontend(NODE, NODE_PORT, Protocol::Udp), &["10.244.1.10:5353"]),
        service(frontend(NODE, 30099, Protocol::Tcp), &[]),
        service(frontend(NODE, 30099, Protocol::Udp), &[]),
    ]
    .into_iter()
    .collect()
}

#[test]
fn ingress_translates_a_new_flow_and_keeps_it_on_its_backend() {
    if skip_unless_root("ingress_translates_a_new_flow_and_keeps_it_on_its_backend") {
        return;
    }
    let dp = Datapath::new(&node_port_state());
    let client = SocketAddrV4::new(CLIENT, 40_000);
    let front = SocketAddrV4::new(NODE, NODE_PORT);
    let (verdict, out) = dp.run("kp_tc_ingress", &tcp_frame(client, front, true, b""));
    assert_eq!(verdict, TC_ACT_OK);
    let (src, backend, _) = check(&out);
    assert_eq!(src, client, "the client's address is kept");
    let backends: BTreeSet<SocketAddrV4> =
        ["10.244.1.10:8080", "10.244.1.11:8080", "10.244.2.10:8080"].iter().map(|b| b.parse().unwrap()).collect();
    assert!(backends.contains(&backend), "translated to {backend}");
    // Every later packet of the flow, with data, goes to the same backend.
    for i in 0..20 {
        let (_, out) = dp.run("kp_tc_ingress", &tcp_frame(client, front, false, format!("data {i}").as_bytes()));
        let (_, dst, payload) = check(&out);
        assert_eq!(dst, backend);
        assert_eq!(payload, format!("data {i}").as_bytes());
    }
    // New flows spread over every backend.
    let mut seen = BTreeMap::new();
    for port in 41_000..41_300 {
        let (_, out) = dp.run("kp_tc_ingress", &tcp_frame(SocketAddrV4::new(CLIENT, port), front, true, b""));
        *seen.entry(check(&out).1).or_insert(0) += 1;
    }
    assert_eq!(seen.keys().copied().collect::<BTreeSet<_>>(), backends, "{seen:?}");
    assert!(seen.values().all(|n| *n >= 60), "uneven spread {seen:?}");
}

#[test]
fn egress_translates_replies_back_to_the_frontend() {
    if skip_unless_root("egress_translates_replies_back_to_the_frontend") {
        return;
    }
    let dp = Datapath::new(&node_port_state());
    let client = SocketAddrV4::new(CLIENT, 40_001);
    let front = SocketAddrV4::new(NODE, NODE_PORT);
    let (_, out) = dp.run("kp_tc_ingress", &tcp_frame(client, front, true, b""));
    let backend = check(&out).1;
    let (verdict, out) = dp.run("kp_tc_egress", &tcp_frame(backend, client, false, b"reply"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(check(&out), (front, client, b"reply".to_vec()));
    // A packet from the backend to someone else is not this flow: untouched.
    let other = SocketAddrV4::new(CLIENT, 40_002);
    let frame = tcp_frame(backend, other, false, b"x");
    assert_eq!(dp.run("kp_tc_egress", &frame), (TC_ACT_OK, frame));
}

#[test]
fn udp_is_translated_with_and_without_checksum() {
    if skip_unless_root("udp_is_translated_with_and_without_checksum") {
        return;
    }
    let dp = Datapath::new(&node_port_state());
    let front = SocketAddrV4::new(NODE, NODE_PORT);
    let backend: SocketAddrV4 = "10.244.1.10:5353".parse().unwrap();
    for (port, zero_checksum) in [(50_000, false), (50_001, true)] {
        let client = SocketAddrV4::new(CLIENT, port);
        let mut frame = udp_frame(client, front, b"query");
        if zero_checksum {
            frame[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
        }
        let (verdict, out) = dp.run("kp_tc_ingress", &frame);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(check(&out), (client, backend, b"query".to_vec()));
        if zero_checksum {
            assert_eq!(&out[14 + 20 + 6..14 + 20 + 8], &[0, 0], "a zero UDP checksum stays zero");
        }
        let (_, out) = dp.run("kp_tc_egress", &udp_frame(backend, client, b"answer"));
        assert_eq!(check(&out), (front, client, b"answer".to_vec()));
    }
}

const TC_ACT_REDIRECT: u32 = 7;

#[test]
fn a_frontend_without_endpoints_refuses_with_rst_or_port_unreachable() {
    if skip_unless_root("a_frontend_without_endpoints_refuses_with_rst_or_port_unreachable") {
        return;
    }
    let dp = Datapath::new(&node_port_state());
    let client = SocketAddrV4::new(CLIENT, 40_003);
    let empty = SocketAddrV4::new(NODE, 30099);

    // TCP: a SYN gets RST|ACK acknowledging it, from the frontend, out of the same device.
    let syn = tcp_frame(client, empty, true, b"");
    let (verdict, out) = dp.run("kp_tc_ingress", &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!((&out[0..6], &out[6..12]), (&syn[6..12], &syn[0..6]), "Ethernet addresses swapped");
    assert_eq!(check(&out), (empty, client, Vec::new()));
    let headers = PacketHeaders::from_ethernet_slice(&out).unwrap();
    let Some(TransportHeader::Tcp(rst)) = headers.transport else { panic!("no TCP in the reply") };
    assert!(rst.rst && rst.ack && !rst.syn, "{rst:?}");
    assert_eq!(rst.acknowledgment_number, 1001, "acknowledges the SYN (seq 1000)");
    // An ACK segment gets a bare RST with its ack number as sequence number.
    let (_, out) = dp.run("kp_tc_ingress", &tcp_frame(client, empty, false, b"data"));
    let headers = PacketHeaders::from_ethernet_slice(&out).unwrap();
    let Some(TransportHeader::Tcp(rst)) = headers.transport else { panic!("no TCP in the reply") };
    assert!(rst.rst && !rst.ack, "{rst:?}");
    assert_eq!(rst.sequence_number, 2000);
    // A RST is never answered.
    let mut reset = tcp_frame(client, empty, false, b"");
    reset[14 + 20 + 13] = 0x04;
    assert_eq!(dp.run("kp_tc_ingress", &reset).0, TC_ACT_SHOT);

    // UDP: ICMP port unreachable from the frontend, quoting the datagram's headers.
    let query = udp_frame(client, SocketAddrV4::new(NODE, 30099), b"query");
    let (verdict, out) = dp.run("kp_tc_ingress", &query);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let headers = PacketHeaders::from_ethernet_slice(&out).expect("ICMP reply parses");
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else { panic!("no IPv4 in the reply") };
    assert_eq!((ip.source, ip.destination), (NODE.octets(), CLIENT.octets()));
    assert_eq!(ip.header_checksum, ip.calc_header_checksum());
    let Some(TransportHeader::Icmpv4(icmp)) = &headers.transport else { panic!("no ICMP in {:?}", headers.transport) };
    assert_eq!(
        icmp.icmp_type,
        etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port)
    );
    let quoted = headers.payload.slice();
    assert_eq!(quoted, &query[14..14 + 28], "quotes the IP header and 8 bytes of UDP");
    assert_eq!(icmp.checksum, icmp.icmp_type.calc_checksum(quoted), "ICMP checksum");
}

#[test]
fn source_ranges_and_frontends_without_local_endpoints_drop_what_they_must_not_serve() {
    if skip_unless_root("source_ranges_and_frontends_without_local_endpoints_drop_what_they_must_not_serve") {
        return;
    }
    let lb_ip = Ipv4Addr::new(198, 51, 100, 10);
    let limited = |port: u16, backends: &[&str]| {
        let (f, mut d) = service(frontend(lb_ip, port, Protocol::Tcp), backends);
        d.frontend_type = FrontendKind::LoadBalancer;
        d.source_ranges = vec!["203.0.113.0/28".parse().unwrap(), "192.0.2.128/25".parse().unwrap()];
        (f, d)
    };
    let (unserved, mut unserved_desired) = service(frontend(NODE, 30091, Protocol::Tcp), &[]);
    unserved_desired.drop_unserved = true;
    let state: DesiredState = [limited(80, &["10.244.1.10:8080"]), limited(81, &[]), (unserved, unserved_desired)]
        .into_iter()
        .collect();
    let dp = Datapath::new(&state);
    let front = SocketAddrV4::new(lb_ip, 80);
    // Within a range (203.0.113.5 in /28, 192.0.2.200 in /25): translated.
    for client in [SocketAddrV4::new(CLIENT, 40_010), "192.0.2.200:40010".parse().unwrap()] {
        let (verdict, out) = dp.run("kp_tc_ingress", &tcp_frame(client, front, true, b""));
        assert_eq!(verdict, TC_ACT_OK, "{client}");
        assert_eq!(check(&out).1, "10.244.1.10:8080".parse().unwrap(), "{client}");
    }
    // Outside every range (203.0.113.16 is just past the /28): dropped, before anything else,
    // also where the frontend has no endpoint to refuse with.
    for client in ["203.0.113.16:40011", "192.0.2.127:40011", "10.0.0.1:40011"] {
        let client: SocketAddrV4 = client.parse().unwrap();
        for port in [80, 81] {
            let frame = tcp_frame(client, SocketAddrV4::new(lb_ip, port), true, b"");
            assert_eq!(dp.run("kp_tc_ingress", &frame).0, TC_ACT_SHOT, "{client} to port {port}");
        }
    }
    let inside_to_empty = tcp_frame(SocketAddrV4::new(CLIENT, 40_012), SocketAddrV4::new(lb_ip, 81), true, b"");
    assert_eq!(dp.run("kp_tc_ingress", &inside_to_empty).0, TC_ACT_REDIRECT, "refused with a RST");
    // externalTrafficPolicy Local, endpoints only elsewhere: dropped, not refused.
    let frame = tcp_frame(SocketAddrV4::new(CLIENT, 40_013), SocketAddrV4::new(NODE, 30091), true, b"");
    assert_eq!(dp.run("kp_tc_ingress", &frame).0, TC_ACT_SHOT);
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend_until_the_backend_leaves() {
    if skip_unless_root("session_affinity_keeps_a_client_on_its_backend_until_the_backend_leaves") {
        return;
    }
    let backends = ["10.244.1.10:8080", "10.244.1.11:8080", "10.244.1.12:8080"];
    let sticky = |backends: &[&str]| -> DesiredState {
        let (f, mut d) = service(frontend(NODE, NODE_PORT, Protocol::Tcp), backends);
        d.affinity_timeout = 10_800;
        [(f, d)].into_iter().collect()
    };
    let mut dp = Datapath::new(&sticky(&backends));
    let front = SocketAddrV4::new(NODE, NODE_PORT);
    // Every new flow (new source port) of one client goes where its first went.
    let first_flow = |dp: &Datapath, client: Ipv4Addr, port: u16| {
        let (_, out) = dp.run("kp_tc_ingress", &tcp_frame(SocketAddrV4::new(client, port), front, true, b""));
        check(&out).1
    };
    let chosen = first_flow(&dp, CLIENT, 42_000);
    for port in 42_001..42_030 {
        assert_eq!(first_flow(&dp, CLIENT, port), chosen, "flow from port {port}");
    }
    // Other clients are balanced independently: over 30 clients, more than one backend.
    let others: BTreeSet<SocketAddrV4> =
        (1..=30u8).map(|i| first_flow(&dp, Ipv4Addr::new(198, 18, 0, i), 42_000)).collect();
    assert!(others.len() > 1, "{others:?}");
    // The backend leaves: the affinity ends at once, and the client sticks to its new one.
    let remaining: Vec<&str> = backends.iter().copied().filter(|b| b.parse::<SocketAddrV4>().unwrap() != chosen).collect();
    dp.sync(&sticky(&remaining));
    let moved = first_flow(&dp, CLIENT, 42_100);
    assert_ne!(moved, chosen);
    for port in 42_101..42_120 {
        assert_eq!(first_flow(&dp, CLIENT, port), moved, "flow from port {port}");
    }
}

#[test]
fn a_udp_flow_moves_when_its_backend_leaves_and_a_tcp_flow_does_not() {
    if skip_unless_root("a_udp_flow_moves_when_its_backend_leaves_and_a_tcp_flow_does_not") {
        return;
    }
    let both = |backends: &[&str]| -> DesiredState {
        [Protocol::Udp, Protocol::Tcp].iter().map(|p| service(frontend(NODE, NODE_PORT, *p), backends)).collect()
    };
    let mut dp = Datapath::new(&both(&["10.244.1.10:8080"]));
    let client = SocketAddrV4::new(CLIENT, 43_000);
    let front = SocketAddrV4::new(NODE, NODE_PORT);
    let old: SocketAddrV4 = "10.244.1.10:8080".parse().unwrap();
    let new: SocketAddrV4 = "10.244.1.11:8080".parse().unwrap();
    let (_, out) = dp.run("kp_tc_ingress", &udp_frame(client, front, b"1"));
    assert_eq!(check(&out).1, old);
    let (_, out) = dp.run("kp_tc_ingress", &tcp_frame(client, front, true, b""));
    assert_eq!(check(&out).1, old);
    dp.sync(&both(&["10.244.1.11:8080"]));
    // The next datagram of the same UDP flow goes to the live backend, and its reply
    // still leaves as the frontend.
    let (_, out) = dp.run("kp_tc_ingress", &udp_frame(client, front, b"2"));
    assert_eq!(check(&out).1, new);
    let (_, out) = dp.run("kp_tc_egress", &udp_frame(new, client, b"answer"));
    assert_eq!(check(&out), (front, client, b"answer".to_vec()));
    // An established TCP flow keeps its backend (kube-proxy leaves TCP conntrack alone).
    let (_, out) = dp.run("kp_tc_ingress", &tcp_frame(client, front, false, b"data"));
    assert_eq!(check(&out).1, old);
}

/// Ten backends, then the third leaves: the planner moves the last backend into its slot.
fn ten_backends(port: u16) -> Vec<String> {
    (10..20).map(|i| format!("10.244.1.{i}:{port}")).collect()
}

/// The backend each UDP flow from `clients` (one datagram each) to `front` goes to.
fn udp_backends(dp: &Datapath, clients: &[SocketAddrV4], front: SocketAddrV4) -> Vec<SocketAddrV4> {
    clients.iter().map(|c| check(&dp.run("kp_tc_ingress", &udp_frame(*c, front, b"q")).1).1).collect()
}

/// Which flows changed backend between `before` and `after`, as (old backend, count).
fn moved(before: &[SocketAddrV4], after: &[SocketAddrV4]) -> BTreeMap<SocketAddrV4, usize> {
    let mut out = BTreeMap::new();
    for (b, a) in before.iter().zip(after) {
        if b != a {
            *out.entry(*b).or_default() += 1;
        }
    }
    out
}

#[test]
fn a_backend_that_leaves_moves_only_its_own_udp_flows() {
    if skip_unless_root("a_backend_that_leaves_moves_only_its_own_udp_flows") {
        return;
    }
    let all = ten_backends(5353);
    let udp = |backends: &[String]| -> DesiredState {
        let refs: Vec<&str> = backends.iter().map(String::as_str).collect();
        [service(frontend(NODE, NODE_PORT, Protocol::Udp), &refs)].into_iter().collect()
    };
    let mut dp = Datapath::new(&udp(&all));
    let front = SocketAddrV4::new(NODE, NODE_PORT);
    let clients: Vec<SocketAddrV4> = (0..400u16).map(|i| SocketAddrV4::new(CLIENT, 20_000 + i)).collect();
    let before = udp_backends(&dp, &clients, front);
    assert_eq!(udp_backends(&dp, &clients, front), before, "tracked flows keep their backend");
    let leaving: SocketAddrV4 = all[2].parse().unwrap();
    let last: SocketAddrV4 = all[9].parse().unwrap();
    let rest: Vec<String> = all.iter().filter(|b| **b != all[2]).cloned().collect();
    dp.sync(&udp(&rest));
    let after = udp_backends(&dp, &clients, front);
    let moved = moved(&before, &after);
    let of_leaving = before.iter().filter(|b| **b == leaving).count();
    eprintln!(
        "a_backend_that_leaves_moves_only_its_own_udp_flows: {} of {} flows moved ({moved:?}); {of_leaving} were on {leaving}, {} on {last} (moved into its slot)",
        moved.values().sum::<usize>(),
        clients.len(),
        before.iter().filter(|b| **b == last).count()
    );
    assert!(of_leaving > 10, "{of_leaving} flows on the leaving backend: {before:?}");
    assert_eq!(moved, BTreeMap::from([(leaving, of_leaving)]), "only the flows of {leaving} may move");
    assert!(after.iter().all(|a| *a != leaving));
    // And they stay where they went: the moved backend's flows now remember its new slot.
    assert_eq!(udp_backends(&dp, &clients, front), after);
}

#[test]
fn a_backend_that_leaves_ends_only_its_own_session_affinities() {
    if skip_unless_root("a_backend_that_leaves_ends_only_its_own_session_affinities") {
        return;
    }
    let all = ten_backends(8080);
    let sticky = |backends: &[String]| -> DesiredState {
        let refs: Vec<&str> = backends.iter().map(String::as_str).collect();
        let (f, mut d) = service(frontend(NODE, NODE_PORT, Protocol::Tcp), &refs);
        d.affinity_timeout = 10_800;
        [(f, d)].into_iter().collect()
    };
    let mut dp = Datapath::new(&sticky(&all));
    let front = SocketAddrV4::new(NODE, NODE_PORT);
    // 300 clients, each a new connection (new source port) per round: affinity keeps each on
    // its first backend.
    let round = |dp: &Datapath, port: u16| -> Vec<SocketAddrV4> {
        (0..300u32)
            .map(|i| {
                let client = SocketAddrV4::new(Ipv4Addr::from(0xc612_0000 + i), port);
                check(&dp.run("kp_tc_ingress", &tcp_frame(client, front, true, b"")).1).1
            })
            .collect()
    };
    let before = round(&dp, 41_000);
    assert_eq!(round(&dp, 41_001), before, "affinity keeps every client on its backend");
    let leaving: SocketAddrV4 = all[2].parse().unwrap();
    let rest: Vec<String> = all.iter().filter(|b| **b != all[2]).cloned().collect();
    dp.sync(&sticky(&rest));
    let after = round(&dp, 41_002);
    let moved = moved(&before, &after);
    let of_leaving = before.iter().filter(|b| **b == leaving).count();
    eprintln!("a_backend_that_leaves_ends_only_its_own_session_affinities: {moved:?} moved of 300 clients");
    assert!(of_leaving > 5, "{of_leaving} clients on the leaving backend");
    assert_eq!(moved, BTreeMap::from([(leaving, of_leaving)]), "only the clients of {leaving} may move");
    assert_eq!(round(&dp, 41_003), after, "the moved clients stick to their new backends");
}

/// The socket LRU maps' fill level is read with `BPF_MAP_LOOKUP_BATCH`: it must agree with a
/// walk of the keys, across the batch size (8,192) and on a full map.
#[test]
fn batched_entry_counts_agree_with_a_walk_of_the_keys() {
    if skip_unless_root("batched_entry_counts_agree_with_a_walk_of_the_keys") {
        return;
    }
    use aya::maps::HashMap;
    use kproxy_common::sock::{SockRevNatKey, SockRevNatValue, SOCK_REVNAT_MAP};
    let caps = Capacities { max_services: 1024, max_backends: 1024, max_sock_entries: 20_000, max_ct_entries: 1024, service_counters: 0 };
    let mut ebpf = loader::load_object(None, caps).expect("load the eBPF object");
    let mut map: HashMap<_, SockRevNatKey, SockRevNatValue> =
        HashMap::try_from(ebpf.map_mut(SOCK_REVNAT_MAP).expect("map")).expect("an LRU hash map");
    let mut written = 0u64;
    for n in [0u64, 1, 8191, 8192, 8193, 30_000] {
        for cookie in written..n {
            map.insert(SockRevNatKey { cookie, ..Default::default() }, SockRevNatValue::default(), 0).expect("insert");
        }
        written = n;
        let counted = kproxy::sys::map_count(&map).expect("count");
        let walked = map.keys().count();
        assert_eq!(counted, walked, "after {n} inserts");
        assert!(counted as u64 <= n.min(20_000), "{counted} entries after {n} inserts");
    }
}

/// Offset of `ifindex` in `struct __sk_buff` (the test run's context).
const SKB_IFINDEX_OFF: usize = 40;
/// `sizeof(struct __sk_buff)`.
const SKB_SIZE: usize = 192;

#[test]
fn flows_to_a_backend_behind_a_device_get_distinct_snat_ports_and_replies_find_their_client() {
    let test = "flows_to_a_backend_behind_a_device_get_distinct_snat_ports_and_replies_find_their_client";
    if skip_unless_root(test) {
        return;
    }
    let remote: SocketAddrV4 = "10.244.2.10:8080".parse().unwrap();
    let mut dp = Datapath::new(&[service(frontend(NODE, NODE_PORT, Protocol::Tcp), &["10.244.2.10:8080"])].into_iter().collect());
    let front = SocketAddrV4::new(NODE, NODE_PORT);
    on_a_device_towards_remote_pods(&mut dp, |dp, ctx| {
        let run = |program: &str, frame: &[u8]| dp.run_on(program, frame, ctx);

        let mut ports = BTreeSet::new();
        for port in 44_000..44_200u16 {
            let client = SocketAddrV4::new(CLIENT, port);
            // Ingress: translated to the remote backend, the client's address kept...
            let (verdict, out) = run("kp_tc_ingress", &tcp_frame(client, front, true, b""));
            assert_eq!(verdict, TC_ACT_OK);
            assert_eq!(check(&out).1, remote);
            // ...and, routed out again, it leaves from the node with a port of its own.
            let (_, out) = run("kp_tc_egress", &tcp_frame(client, remote, true, b""));
            let (source, destination, _) = check(&out);
            assert_eq!((*source.ip(), destination), (NODE, remote));
            assert!((61_000..=65_535).contains(&source.port()), "{source}");
            assert!(ports.insert(source.port()), "port {} given twice", source.port());
            // The backend's reply to that port finds the client, and leaves as the frontend.
            let (_, out) = run("kp_tc_ingress", &tcp_frame(remote, source, false, b"reply"));
            assert_eq!(check(&out), (remote, client, b"reply".to_vec()));
            let (_, out) = run("kp_tc_egress", &tcp_frame(remote, client, false, b"reply"));
            assert_eq!(check(&out), (front, client, b"reply".to_vec()));
        }
        assert_eq!(ports.len(), 200);
    });
}

/// Runs `f` with the programs "arriving on" a device that leads to the remote pod subnet
/// 10.244.2.0/24 (`ctx`: the `__sk_buff` with its ifindex), registered with the node's
/// address in `KP_DEVICES`. The FIB lookup runs in the namespace of the packet's device: a
/// thread of this test enters a new network namespace holding a veth device with the node's
/// address and a route to that subnet, and runs `f`; the namespace goes away with the thread.
fn on_a_device_towards_remote_pods(dp: &mut Datapath, f: impl FnOnce(&Datapath, &[u8; SKB_SIZE]) + Send) {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("a network namespace for this thread");
                let ip = |args: &str| {
                    let out = std::process::Command::new("ip").args(args.split_whitespace()).output().expect("ip");
                    assert!(out.status.success(), "ip {args}: {}", String::from_utf8_lossy(&out.stderr));
                };
                ip("link add kpdev0 type veth peer name kpdev1");
                ip("link set kpdev1 up");
                ip("link set kpdev0 up");
                ip(&format!("addr add {NODE}/24 dev kpdev0"));
                ip("route add 10.244.2.0/24 via 192.168.50.3 dev kpdev0");
                std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1").expect("forwarding on");
                let ifindex = nix::net::if_::if_nametoindex("kpdev0").expect("ifindex");
                let mut devices: aya::maps::HashMap<_, u32, kproxy_common::nat::Device> =
                    aya::maps::HashMap::try_from(dp.ebpf.map_mut("KP_DEVICES").expect("KP_DEVICES")).expect("devices map");
                devices.insert(ifindex, kproxy_common::nat::Device { snat_address: NODE.octets() }, 0).expect("device");
                let mut ctx = [0u8; SKB_SIZE];
                ctx[SKB_IFINDEX_OFF..SKB_IFINDEX_OFF + 4].copy_from_slice(&ifindex.to_ne_bytes());
                f(dp, &ctx);
            })
            .join()
            .expect("the namespace thread");
    });
}

/// `want` drops by reason, every other reason at 0.
fn expect_drops(want: &[(&str, u64)]) -> BTreeMap<&'static str, u64> {
    DropReason::ALL
        .iter()
        .map(|r| (r.as_str(), want.iter().find(|(name, _)| *name == r.as_str()).map_or(0, |w| w.1)))
        .collect()
}

#[test]
fn every_drop_is_counted_once_by_its_reason() {
    let test = "every_drop_is_counted_once_by_its_reason";
    if skip_unless_root(test) {
        return;
    }
    let lb_ip = Ipv4Addr::new(198, 51, 100, 10);
    let (limited, mut limited_desired) = service(frontend(lb_ip, 80, Protocol::Tcp), &["10.244.1.10:8080"]);
    limited_desired.frontend_type = FrontendKind::LoadBalancer;
    limited_desired.source_ranges = vec!["203.0.113.0/28".parse().unwrap()];
    let (unserved, mut unserved_desired) = service(frontend(NODE, 30091, Protocol::Tcp), &[]);
    unserved_desired.drop_unserved = true;
    let remote: SocketAddrV4 = "10.244.2.10:8080".parse().unwrap();
    let state: DesiredState = [
        (limited, limited_desired),
        (unserved, unserved_desired),
        service(frontend(NODE, 30099, Protocol::Tcp), &[]),
        service(frontend(NODE, NODE_PORT, Protocol::Tcp), &["10.244.2.10:8080"]),
    ]
    .into_iter()
    .collect();
    let mut dp = Datapath::new(&state);
    assert_eq!(dp.drops(), expect_drops(&[]), "nothing dropped yet");
    // Translated, refused and passed packets are not drops.
    let inside = SocketAddrV4::new(CLIENT, 40_020);
    assert_eq!(dp.run("kp_tc_ingress", &tcp_frame(inside, SocketAddrV4::new(lb_ip, 80), true, b"")).0, TC_ACT_OK);
    assert_eq!(dp.run("kp_tc_ingress", &tcp_frame(inside, SocketAddrV4::new(NODE, 30099), true, b"")).0, TC_ACT_REDIRECT);
    assert_eq!(dp.run("kp_tc_ingress", &tcp_frame(inside, SocketAddrV4::new(NODE, 9), true, b"")).0, TC_ACT_OK);
    assert_eq!(dp.drops(), expect_drops(&[]), "no drop among them");
    // 5 SYNs from outside the source ranges, 3 to a frontend without local endpoints, 2 RSTs
    // to a frontend without endpoints.
    for port in 0..5 {
        let frame = tcp_frame(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 41_000 + port), SocketAddrV4::new(lb_ip, 80), true, b"");
        assert_eq!(dp.run("kp_tc_ingress", &frame).0, TC_ACT_SHOT);
    }
    for port in 0..3 {
        let frame = tcp_frame(SocketAddrV4::new(CLIENT, 42_000 + port), SocketAddrV4::new(NODE, 30091), true, b"");
        assert_eq!(dp.run("kp_tc_ingress", &frame).0, TC_ACT_SHOT);
    }
    for port in 0..2 {
        let mut reset = tcp_frame(SocketAddrV4::new(CLIENT, 43_000 + port), SocketAddrV4::new(NODE, 30099), false, b"");
        reset[14 + 20 + 13] = 0x04;
        assert_eq!(dp.run("kp_tc_ingress", &reset).0, TC_ACT_SHOT);
    }
    let so_far = [("source_range", 5), ("no_local_endpoints", 3), ("no_endpoints", 2)];
    assert_eq!(dp.drops(), expect_drops(&so_far));

    // SNAT ports exhausted: every port of the node towards the remote backend is taken (the
    // reply entries claiming them, written here), so a new flow to it is dropped.
    let mut ct: aya::maps::HashMap<_, kproxy_common::ct::CtKey, kproxy_common::ct::CtValue> =
        aya::maps::HashMap::try_from(dp.ebpf.map_mut("KP_CT").expect("KP_CT")).expect("conntrack map");
    for port in kproxy_common::nat::SNAT_PORT_MIN..=kproxy_common::nat::SNAT_PORT_MAX {
        let key = kproxy_common::ct::CtKey {
            src_address: remote.ip().octets(),
            dst_address: NODE.octets(),
            src_port: remote.port().to_be_bytes(),
            dst_port: port.to_be_bytes(),
            protocol: 6,
            direction: kproxy_common::ct::CT_INGRESS,
            _pad: [0; 2],
        };
        let value = kproxy_common::ct::CtValue { expires_ns: u64::MAX, ..Default::default() };
        ct.insert(key, value, 0).expect("claim a port");
    }
    on_a_device_towards_remote_pods(&mut dp, |dp, ctx| {
        for port in 0..4 {
            let frame = tcp_frame(SocketAddrV4::new(CLIENT, 44_000 + port), SocketAddrV4::new(NODE, NODE_PORT), true, b"");
            assert_eq!(dp.run_on("kp_tc_ingress", &frame, ctx).0, TC_ACT_SHOT, "no port left");
        }
    });
    assert_eq!(dp.drops(), expect_drops(&[so_far[0], so_far[1], so_far[2], ("snat_ports_exhausted", 4)]));
}

/// An ICMP error from `from` to `to` quoting the IP header and first 8 bytes of `about`.
fn icmp_error(from: Ipv4Addr, to: Ipv4Addr, icmp_type: etherparse::Icmpv4Type, about: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], [2, 0, 0, 0, 0, 2])
        .ipv4(from.octets(), to.octets(), 64)
        .icmpv4(icmp_type)
        .write(&mut frame, &about[14..14 + 28])
        .expect("build ICMP frame");
    frame
}

/// Checks an ICMP error's checksums from scratch and returns (outer source, outer destination,
/// quoted source, quoted destination).
fn check_icmp(frame: &[u8]) -> (Ipv4Addr, Ipv4Addr, SocketAddrV4, SocketAddrV4) {
    let headers = PacketHeaders::from_ethernet_slice(frame).expect("ICMP frame parses");
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else { panic!("no IPv4 header") };
    assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "outer IPv4 header checksum");
    let Some(TransportHeader::Icmpv4(icmp)) = &headers.transport else { panic!("no ICMP in {:?}", headers.transport) };
    let quote = headers.payload.slice();
    assert_eq!(icmp.checksum, icmp.icmp_type.calc_checksum(quote), "ICMP checksum");
    let inner = etherparse::Ipv4HeaderSlice::from_slice(quote).expect("quoted IPv4 header").to_header();
    assert_eq!(inner.header_checksum, inner.calc_header_checksum(), "quoted IPv4 header checksum");
    let port = |at: usize| u16::from_be_bytes([quote[at], quote[at + 1]]);
    (
        ip.source.into(),
        ip.destination.into(),
        SocketAddrV4::new(inner.source.into(), port(20)),
        SocketAddrV4::new(inner.destination.into(), port(22)),
    )
}

#[test]
fn icmp_errors_about_a_translated_flow_reach_its_real_sender() {
    if skip_unless_root("icmp_errors_about_a_translated_flow_reach_its_real_sender") {
        return;
    }
    use etherparse::{icmpv4::DestUnreachableHeader, Icmpv4Type};
    let dp = Datapath::new(&node_port_state());
    let router = Ipv4Addr::new(192, 168, 50, 1);
    let client = SocketAddrV4::new(CLIENT, 40_020);
    let front = SocketAddrV4::new(NODE, NODE_PORT);
    let (_, out) = dp.run("kp_tc_ingress", &tcp_frame(client, front, true, b""));
    let backend = check(&out).1;

    // Path MTU: the backend's reply left as the frontend; a router on the way to the client
    // says it is too big. The error goes to the backend, about the backend's own packet.
    let too_big = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1200 });
    let reply_as_sent = tcp_frame(front, client, false, b"");
    let (verdict, out) = dp.run("kp_tc_ingress", &icmp_error(router, NODE, too_big.clone(), &reply_as_sent));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(check_icmp(&out), (router, *backend.ip(), backend, client));

    // The backend's own error about the client's packet leaves as the frontend's.
    let request_as_received = tcp_frame(client, backend, false, b"");
    let unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let (verdict, out) = dp.run("kp_tc_egress", &icmp_error(*backend.ip(), CLIENT, unreachable, &request_as_received));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(check_icmp(&out), (NODE, CLIENT, client, front));

    // An error about a flow kproxy does not track passes unchanged.
    let stranger = icmp_error(router, NODE, too_big, &tcp_frame(front, SocketAddrV4::new(CLIENT, 40_021), false, b""));
    assert_eq!(dp.run("kp_tc_ingress", &stranger), (TC_ACT_OK, stranger.clone()));
}

#[test]
fn foreign_malformed_and_truncated_frames_pass_unchanged() {
    if skip_unless_root("foreign_malformed_and_truncated_frames_pass_unchanged") {
        return;
    }
    let dp = Datapath::new(&node_port_state());
    let client = SocketAddrV4::new(CLIENT, 40_004);
    let front = SocketAddrV4::new(NODE, NODE_PORT);
    let good = tcp_frame(client, front, true, b"hello");
    let mut frames: Vec<(String, Vec<u8>)> = vec![
        ("not a frontend".into(), tcp_frame(client, SocketAddrV4::new(NODE, 22), true, b"")),
        ("other node address".into(), tcp_frame(client, SocketAddrV4::new(Ipv4Addr::new(192, 168, 50, 3), NODE_PORT), true, b"")),
    ];
    let mut fragment = good.clone();
    fragment[14 + 6] = 0x20; // more fragments
    frames.push(("fragment".into(), fragment));
    let mut options = good.clone();
    options[14] = 0x46; // IHL 6: IP options
    frames.push(("IP options".into(), options));
    let mut icmp = good.clone();
    icmp[14 + 9] = 1;
    frames.push(("ICMP".into(), icmp));
    let mut ipv6 = good.clone();
    ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
    frames.push(("IPv6 ethertype".into(), ipv6));
    let mut arp = good.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    frames.push(("ARP".into(), arp));
    // Truncated frames: the kernel's test run refuses some IPv4 frames shorter than an IP
    // header (it parses them itself first); every other length must reach the programs.
    for len in 14..good.len() {
        let frame = good[..len].to_vec();
        match dp.try_run("kp_tc_ingress", &frame) {
            Ok(_) => frames.push((format!("truncated to {len} bytes"), frame)),
            Err(e) => {
                assert!(len < 34, "the kernel refused to run a {len}-byte frame: {e:?}");
                eprintln!("BPF_PROG_TEST_RUN refuses a {len}-byte IPv4 frame; not testable that way");
            }
        }
    }
    let mut x: u32 = 0x1234_5678;
    for n in 0..50 {
        let mut garbage = good.clone();
        for byte in garbage.iter_mut().skip(14) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *byte = x as u8;
        }
        frames.push((format!("garbage {n}"), garbage));
    }
    for (what, frame) in frames {
        for program in ["kp_tc_ingress", "kp_tc_egress"] {
            let (verdict, out) = dp.run(program, &frame);
            // Garbage may by chance look like a tracked or frontend packet; it never does here
            // (random addresses), so everything must pass untouched.
            assert_eq!((verdict, &out), (TC_ACT_OK, &frame), "{program} changed a frame: {what}");
        }
    }
}

#[test]
fn per_packet_cost_next_to_an_empty_program() {
    if skip_unless_root("per_packet_cost_next_to_an_empty_program") {
        return;
    }
    // 10,000 services, so the cost is measured with full maps; the numbers are printed, not
    // asserted (timing belongs in benchmarks).
    let mut desired: DesiredState = node_port_state();
    for i in 0..10_000u32 {
        let address = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i);
        let backend = format!("10.245.{}.{}:8080", i / 250, i % 250 + 1);
        desired.extend([service(frontend(address, 80, Protocol::Tcp), &[&backend])]);
    }
    // With repeat, the kernel runs the program again on the buffer it already translated: a
    // service whose backend is its own frontend keeps every repetition a packet of the same
    // tracked flow (translated to the same address and port, checksums updated all the same).
    let self_mapped = SocketAddrV4::new(NODE, 30_555);
    desired.extend([service(frontend(NODE, 30_555, Protocol::Tcp), &[&self_mapped.to_string()])]);
    let dp = Datapath::new(&desired);
    let client = SocketAddrV4::new(CLIENT, 40_005);
    let (_, out) = dp.run("kp_tc_ingress", &tcp_frame(client, self_mapped, true, b""));
    assert_eq!(check(&out).1, self_mapped);
    let tracked = tcp_frame(client, self_mapped, false, b"data");
    let foreign = tcp_frame(client, SocketAddrV4::new(NODE, 22), false, b"data");
    let repeat = 200_000;
    let mut rows = Vec::new();
    for round in 0..3 {
        rows.push((
            round,
            dp.cost("kp_tc_baseline", &tracked, repeat),
            dp.cost("kp_tc_ingress", &tracked, repeat),
            dp.cost("kp_tc_ingress", &foreign, repeat),
            dp.cost("kp_tc_egress", &foreign, repeat),
        ));
    }
    for (round, empty, tracked, foreign, egress) in rows {
        eprintln!(
            "per-packet cost round {round}: empty {empty:.1} ns, ingress tracked flow {tracked:.1} ns, ingress not-a-frontend {foreign:.1} ns, egress untracked {egress:.1} ns"
        );
    }
}

/// (frontend, kind, new connections, packets, bytes) of every counted frontend.
fn counted(maps: &ServiceCounterMaps) -> Vec<(String, Option<FrontendKind>, u64, u64, u64)> {
    maps.read()
        .expect("read the counters")
        .into_iter()
        .map(|FrontendCounters { meta, counters: c, .. }| {
            let meta = meta.expect("a counted frontend has metadata");
            let front = SocketAddrV4::new(meta.address.into(), u16::from_be_bytes(meta.port));
            let protocol = if meta.protocol == 6 { "TCP" } else { "UDP" };
            (format!("{front}/{protocol}"), FrontendKind::from_meta_code(meta.svc_type), c.new_connections, c.packets, c.bytes)
        })
        .collect()
}

/// `--service-counters 2`: each frontend's new flows, packets and bytes at tc ingress,
/// exactly; replies, refusals and other traffic are not counted; a third frontend finds the
/// map full and is not counted until a counted one is deleted (its counters with it).
/// Without the flag nothing is counted.
#[test]
fn service_counters_count_new_flows_packets_and_bytes_per_frontend_up_to_the_bound() {
    if skip_unless_root("service_counters_count_new_flows_packets_and_bytes_per_frontend_up_to_the_bound") {
        return;
    }
    let node_port = |port, protocol, backends: &[&str]| {
        let (f, mut d) = service(frontend(NODE, port, protocol), backends);
        d.frontend_type = FrontendKind::NodePort;
        (f, d)
    };
    let all: Vec<(Frontend, DesiredService)> = vec![
        node_port(NODE_PORT, Protocol::Tcp, &["10.244.1.10:8080", "10.244.1.11:8080"]),
        node_port(NODE_PORT, Protocol::Udp, &["10.244.1.10:5353"]),
        node_port(30081, Protocol::Tcp, &["10.244.1.12:8080"]),
        node_port(30099, Protocol::Tcp, &[]),
    ];
    let state: DesiredState = all.iter().cloned().collect();
    let tcp_front = SocketAddrV4::new(NODE, NODE_PORT);
    let third = SocketAddrV4::new(NODE, 30081);
    // 3 TCP flows of a SYN and 4 data packets, 2 UDP flows of 3 datagrams; returns the bytes
    // sent to each of the two frontends. Replies, a refused SYN, a foreign packet and a flow to
    // the third frontend go along.
    let traffic = |dp: &Datapath, first_port: u16| -> (u64, u64) {
        let (mut tcp_bytes, mut udp_bytes) = (0u64, 0u64);
        for flow in 0..3u16 {
            let client = SocketAddrV4::new(CLIENT, first_port + flow);
            for i in 0..5 {
                let frame = tcp_frame(client, tcp_front, i == 0, &vec![b'x'; 10 * i]);
                let (verdict, out) = dp.run("kp_tc_ingress", &frame);
                assert_eq!(verdict, TC_ACT_OK);
                tcp_bytes += frame.len() as u64;
                let backend = check(&out).1;
                assert_eq!(dp.run("kp_tc_egress", &tcp_frame(backend, client, false, b"reply")).0, TC_ACT_OK);
            }
        }
        for flow in 0..2u16 {
            let client = SocketAddrV4::new(CLIENT, first_port + 100 + flow);
            for i in 0..3 {
                let frame = udp_frame(client, SocketAddrV4::new(NODE, NODE_PORT), &vec![b'u'; 1 + i]);
                assert_eq!(dp.run("kp_tc_ingress", &frame).0, TC_ACT_OK);
                udp_bytes += frame.len() as u64;
            }
        }
        let refused = tcp_frame(SocketAddrV4::new(CLIENT, first_port + 200), SocketAddrV4::new(NODE, 30099), true, b"");
        assert_ne!(dp.run("kp_tc_ingress", &refused).0, TC_ACT_OK);
        let foreign = tcp_frame(SocketAddrV4::new(CLIENT, first_port + 201), SocketAddrV4::new(NODE, 22), true, b"");
        assert_eq!(dp.run("kp_tc_ingress", &foreign), (TC_ACT_OK, foreign.clone()));
        (tcp_bytes, udp_bytes)
    };

    let off = Datapath::new(&state);
    traffic(&off, 40_000);
    let maps = off.service_counters();
    assert_eq!((maps.capacity().expect("capacity"), counted(&maps)), (1, vec![]), "off: nothing counted");
    drop(off);

    let mut dp = Datapath::with_service_counters(&state, 2);
    let maps = dp.service_counters();
    assert_eq!((maps.capacity().expect("capacity"), counted(&maps)), (2, vec![]), "nothing counted yet");
    let (tcp_bytes, udp_bytes) = traffic(&dp, 40_000);
    let nodeport = Some(FrontendKind::NodePort);
    let want_tcp = (format!("{tcp_front}/TCP"), nodeport, 3, 15, tcp_bytes);
    let want_udp = (format!("{tcp_front}/UDP"), nodeport, 2, 6, udp_bytes);
    let mut got = counted(&maps);
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, vec![want_tcp.clone(), want_udp.clone()], "two frontends, counted exactly");
    // The map is full: a third frontend serves but is not counted.
    let frame = tcp_frame(SocketAddrV4::new(CLIENT, 45_000), third, true, b"");
    assert_eq!(dp.run("kp_tc_ingress", &frame).0, TC_ACT_OK);
    assert_eq!(counted(&maps).len(), 2, "the bound holds: {:?}", counted(&maps));
    // The UDP frontend is deleted: its counters with it, which makes room for the third one.
    dp.sync(&all.iter().filter(|(f, _)| f.protocol == Protocol::Tcp).cloned().collect());
    let (_, out) = dp.run("kp_tc_ingress", &frame);
    assert_eq!(check(&out).1, "10.244.1.12:8080".parse().unwrap());
    let mut got = counted(&maps);
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, vec![want_tcp, (format!("{third}/TCP"), nodeport, 0, 1, frame.len() as u64)], "UDP gone, third counted");
}
