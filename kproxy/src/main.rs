//! kproxy: an eBPF replacement for kube-proxy. See README.md. The CLI; everything else is in
//! the library.

#![forbid(unsafe_code)]

use std::{io::Write as _, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use clap::{parser::ValueSource, Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use kproxy_common::{
    ct::DEFAULT_MAX_CT_ENTRIES,
    lb::{DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES},
    sock::DEFAULT_MAX_SOCK_ENTRIES,
};

use kproxy::{
    agent, config,
    dataplane::{bpf::BpfMaps, Dataplane as _},
    dump,
    loader::{self, Capacities, PinLayout},
    runner::RunnerConfig,
};

#[derive(Parser)]
#[command(version, about = "eBPF replacement for kube-proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format (kube-proxy's flag): `text`, or `json` (one object per line). Text has colour
    /// only when stderr is a terminal and NO_COLOR is unset.
    #[arg(long, value_enum, global = true)]
    logging_format: Option<LoggingFormat>,
    /// Log verbosity, kube-proxy's `-v`: 0–3 info, 4 debug, 5 and up trace. `RUST_LOG`, when
    /// set, overrides it.
    #[arg(short = 'v', long = "v", global = true, value_name = "LEVEL")]
    verbosity: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LoggingFormat {
    Text,
    Json,
}

/// kube-proxy's klog verbosity on kproxy's log levels: kube-proxy logs its routine messages at
/// V(2) and its per-change details at V(4) and above.
fn level_for_verbosity(verbosity: u32) -> &'static str {
    match verbosity {
        0..=3 => "info",
        4 => "debug",
        _ => "trace",
    }
}

/// Logs to stderr in `format` at `verbosity` (or `RUST_LOG`). No ANSI escapes unless stderr is
/// a terminal: a container runtime or a file gets plain text.
fn init_logging(format: LoggingFormat, verbosity: u32) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| level_for_verbosity(verbosity).into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LoggingFormat::Text => {
            let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(ansi).init();
        }
        LoggingFormat::Json => builder.json().init(),
    }
}

#[derive(Args, Clone)]
struct PinArgs {
    /// bpffs directory holding kproxy's pinned maps and links (bpffs is mounted if absent).
    #[arg(long, default_value = "/sys/fs/bpf/kproxy")]
    bpffs_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the datapath and keep it in sync with the Services and EndpointSlices.
    Run(Box<RunArgs>),
    /// Print every programmed service and its backends, from the pinned maps.
    Dump {
        #[command(flatten)]
        pin: PinArgs,
        /// Print JSON: {"services":[{"namespace","name","port_name","type","frontend","protocol","backends"}]}
        /// ({"flows":[…]} with --conntrack).
        #[arg(long)]
        json: bool,
        /// List the tc path's tracked flows (the conntrack map) instead.
        #[arg(long)]
        conntrack: bool,
        #[command(flatten)]
        filter: ConntrackFilterArgs,
    },
    /// Where a connection from a source to a frontend would go, and why, from the live maps:
    /// the path (socket or tc), the frontend and its policies, the backends and how one is
    /// chosen, and the tracked flows.
    Trace(TraceArgs),
    /// Detach and remove everything kproxy pinned. Stop the agent first.
    Cleanup {
        #[command(flatten)]
        pin: PinArgs,
        /// Also check that no kproxy program is left attached to this cgroup (one held by a
        /// running agent would be); fails if one is.
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
    /// Per-packet cost of the tc programs with BPF_PROG_TEST_RUN, on maps private to this
    /// process programmed from manifests (`cargo xtask bench` runs it); prints JSON.
    #[command(hide = true)]
    TcCost(TcCostArgs),
}

/// Filters of `kproxy dump --conntrack`; every one given must match.
#[derive(Args)]
struct ConntrackFilterArgs {
    /// Only flows from this client, ADDRESS[:PORT].
    #[arg(long, requires = "conntrack", value_parser = kproxy::trace::parse_address)]
    src: Option<(std::net::Ipv4Addr, Option<u16>)>,
    /// Only flows to this frontend, ADDRESS[:PORT].
    #[arg(long, requires = "conntrack", value_parser = kproxy::trace::parse_address)]
    dst: Option<(std::net::Ipv4Addr, Option<u16>)>,
    /// Only flows of this protocol, tcp or udp.
    #[arg(long, requires = "conntrack", value_parser = kproxy::trace::parse_protocol)]
    proto: Option<kproxy::model::Protocol>,
    /// Only flows translated to this backend, ADDRESS[:PORT].
    #[arg(long, requires = "conntrack", value_parser = kproxy::trace::parse_address)]
    backend: Option<(std::net::Ipv4Addr, Option<u16>)>,
}

#[derive(Args)]
struct TraceArgs {
    #[command(flatten)]
    pin: PinArgs,
    /// The client, ADDRESS[:PORT]; with a port, that flow's conntrack entry decides at tc.
    #[arg(long, required_unless_present = "pod", conflicts_with = "pod", value_parser = kproxy::trace::parse_address)]
    from: Option<(std::net::Ipv4Addr, Option<u16>)>,
    /// The client as a pod, NAMESPACE/NAME: its status.podIP, from the apiserver.
    #[arg(long)]
    pod: Option<String>,
    /// The client's port, with --pod.
    #[arg(long, requires = "pod")]
    source_port: Option<u16>,
    /// Kubeconfig for --pod (default: the in-cluster configuration), as `kproxy run`'s.
    #[arg(long, requires = "pod")]
    kubeconfig: Option<PathBuf>,
    /// Where the client is, when its address does not tell: `cluster` (the node's processes
    /// and its pods: the socket path) or `outside` (the tc path). Default: `cluster` for
    /// --pod and the node's own addresses, `outside` for any other address.
    #[arg(long, value_enum)]
    origin: Option<OriginArg>,
    /// The destination, ADDRESS:PORT/PROTO (tcp or udp; default tcp).
    #[arg(long, value_parser = kproxy::trace::parse_destination)]
    to: kproxy::model::Frontend,
    /// Print JSON (kproxy-api's `trace::Trace`).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OriginArg {
    Cluster,
    Outside,
}

/// Opens the maps pinned under `pin`, or says which directory it looked in.
fn open_maps(pin: &PinArgs) -> Result<(BpfMaps, PinLayout)> {
    let layout = PinLayout::new(pin.bpffs_dir.clone());
    let maps = BpfMaps::open(&layout.maps_dir())
        .with_context(|| format!("is kproxy running with --bpffs-dir {}?", layout.root.display()))?;
    Ok((maps, layout))
}

fn trace(args: TraceArgs) -> Result<()> {
    use kproxy::dataplane::Origin;
    let (maps, layout) = open_maps(&args.pin)?;
    let flows = kproxy::dataplane::bpf::FlowMaps::open(&layout.maps_dir())?;
    let (source, source_port) = match (&args.from, &args.pod) {
        (Some(from), _) => *from,
        (None, Some(pod)) => {
            let ip = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("start the tokio runtime")?
                .block_on(kproxy::trace::pod_address(args.kubeconfig.as_deref(), pod))?;
            (ip, args.source_port)
        }
        (None, None) => anyhow::bail!("give the source: --from ADDRESS[:PORT] or --pod NAMESPACE/NAME"),
    };
    let forced = args.origin.map(|o| match o {
        OriginArg::Cluster => Origin::InCluster,
        OriginArg::Outside => Origin::Outside,
    });
    let (origin, origin_reason) =
        kproxy::trace::origin_of(source, args.pod.as_deref(), &kproxy::node::ipv4_addresses()?, forced);
    let query = kproxy::trace::Query { source, source_port, source_pod: args.pod, frontend: args.to, origin, origin_reason };
    let t = kproxy::trace::trace(&maps.read()?, &flows.read()?, &query);
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer(&mut out, &t)?;
        writeln!(out)?;
    } else {
        kproxy::trace::write_trace(&t, &mut out)?;
    }
    Ok(())
}

#[derive(Args)]
struct TcCostArgs {
    /// The manifests to program (a YAML file or a directory of them).
    #[arg(long)]
    manifests: PathBuf,
    /// The frontend the flows go to, IP:PORT (e.g. a NodePort on a node address).
    #[arg(long)]
    frontend: std::net::SocketAddrV4,
    /// The external client's address.
    #[arg(long, default_value = "203.0.113.5")]
    client: std::net::Ipv4Addr,
    /// As `kproxy run --nodeport-addresses`.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<kproxy::node::Cidr>,
    #[command(flatten)]
    capacities: CapacityArgs,
    /// Rounds; each measures every case.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Runs per case and round (the median is reported).
    #[arg(long, default_value_t = 10_000)]
    runs: u32,
}

/// Map capacities (`kproxy run`, and `kproxy tc-cost` to size its maps the same).
#[derive(Args)]
struct CapacityArgs {
    /// Capacity in service ports (frontends).
    #[arg(long, default_value_t = DEFAULT_MAX_SERVICES)]
    max_services: u32,
    /// Capacity in distinct backends (address, port, protocol).
    #[arg(long, default_value_t = DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    /// Capacity of each socket-level LRU map (reverse translation, UDP socket affinity).
    #[arg(long, default_value_t = DEFAULT_MAX_SOCK_ENTRIES)]
    max_sock_entries: u32,
    /// Capacity of the tc connection-tracking map (LRU; two entries per flow).
    #[arg(long, default_value_t = DEFAULT_MAX_CT_ENTRIES)]
    max_ct_entries: u32,
    /// Count new connections, and tc packets and bytes, per frontend, for at most this many
    /// frontends (the bound on the metric series, three per frontend; those beyond it are not
    /// counted); 0 switches the counters off.
    #[arg(long, default_value_t = 0)]
    service_counters: u32,
}

impl CapacityArgs {
    fn capacities(&self) -> Capacities {
        Capacities {
            max_services: self.max_services,
            max_backends: self.max_backends,
            max_sock_entries: self.max_sock_entries,
            max_ct_entries: self.max_ct_entries,
            service_counters: self.service_counters,
        }
    }
}

#[derive(Args)]
struct RunArgs {
    /// kube-proxy's configuration file (KubeProxyConfiguration, kubeproxy.config.k8s.io/v1alpha1,
    /// as kubeadm writes it): the fields kproxy has a meaning for are used, flags given on the
    /// command line win, and fields without a kproxy meaning are listed once in a warning.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The agent's oom_score_adj in [-1000, 1000] (kube-proxy's flag; default: left as is).
    #[arg(long, allow_hyphen_values = true, value_parser = clap::value_parser!(i32).range(-1000..=1000))]
    oom_score_adj: Option<i32>,
    /// Read Services and EndpointSlices from these manifests (a YAML file or a directory of
    /// them, watched) instead of the apiserver.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// How long a changed manifest file must be quiet, after its writer closed it or it was
    /// renamed into place, before it is read (a file still open for writing waits until it
    /// has been quiet for 10 s).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    manifests_settle_time: Duration,
    /// Kubeconfig for the apiserver (default: the in-cluster configuration).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name, as in the Node object (default: the hostname, lowercased).
    #[arg(long)]
    hostname_override: Option<String>,
    /// Address of the /healthz and /livez server; empty disables it (kube-proxy's flag).
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: String,
    /// Address of the /metrics server; empty disables it (kube-proxy's flag).
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: String,
    #[command(flatten)]
    pin: PinArgs,
    /// cgroup v2 directory to attach to (default: the cgroup2 root, from /proc/self/mountinfo).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Devices for the per-packet datapath (NodePort, external and load-balancer IPs),
    /// comma-separated; empty for none (default: the devices of the default route).
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<String>>,
    /// How tc programs attach.
    #[arg(long, value_enum, default_value = "auto")]
    tc_attach: loader::TcAttach,
    /// Serve NodePorts only on node addresses within these CIDRs, comma-separated (kube-proxy's
    /// flag; default: every IPv4 address of the node).
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<kproxy::node::Cidr>,
    #[command(flatten)]
    capacities: CapacityArgs,
    /// Minimum interval between syncs; changes within it coalesce (kube-proxy's flag).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    min_sync_period: Duration,
    /// Interval of full syncs, which also repair drift (kube-proxy's flag).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    sync_period: Duration,
    /// Destroy sockets still connected to a backend that left its service (connected UDP; TCP
    /// to endpoints no longer listed), where the kernel has `bpf_sock_destroy` (Linux >= 6.5).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    terminate_stale_sockets: bool,
    /// Keep each socket's translation (for getpeername, UDP replies, UDP socket affinity) in the
    /// socket's own storage where the kernel allows it (Linux >= 5.3), so that no process can
    /// evict another's; false keeps them all in the shared LRU maps (`--max-sock-entries`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    socket_storage: bool,
    /// Append machine-readable events (programs attached, each sync) to this file, one JSON
    /// line each (kproxy-api's `event`), for kproxy's test and benchmark tools.
    #[arg(long, hide = true)]
    event_file: Option<PathBuf>,
}

/// The node name: the override, or the hostname, lowercased as kube-proxy does.
fn node_name(hostname_override: Option<String>) -> Result<String> {
    let name = match hostname_override.filter(|h| !h.trim().is_empty()) {
        Some(h) => h,
        None => nix::unistd::gethostname()
            .context("read the hostname (or pass --hostname-override)")?
            .to_string_lossy()
            .into_owned(),
    };
    Ok(name.trim().to_lowercase())
}

/// `IP:PORT`, or `None` when empty (the server is off).
fn bind_address(flag: &str, value: &str) -> Result<Option<std::net::SocketAddr>> {
    if value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).with_context(|| format!("{flag}: {value:?} is not IP:PORT"))
}

/// Whether the user gave `id` (a [`RunArgs`] field) on the command line or in its environment
/// variable, so that it wins over `--config`.
fn explicit(matches: &clap::ArgMatches, id: &str) -> bool {
    matches!(matches.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
}

/// Fills the flags the command line left at their defaults from `--config`, as kube-proxy
/// does, and warns once about the file's fields kproxy does not use.
fn apply_config(args: &mut RunArgs, matches: &clap::ArgMatches, path: &std::path::Path, file: config::KubeProxyConfig) -> Result<()> {
    tracing::debug!(config = %path.display(), parsed = ?file, "KubeProxyConfiguration as read");
    let set = |id: &str| !explicit(matches, id);
    if set("kubeconfig") && args.manifests.is_none() {
        args.kubeconfig = file.kubeconfig.or(args.kubeconfig.take());
    }
    if set("hostname_override") {
        args.hostname_override = file.hostname_override.or(args.hostname_override.take());
    }
    if let (true, Some(a)) = (set("healthz_bind_address"), file.healthz_bind_address) {
        args.healthz_bind_address = a;
    }
    if let (true, Some(a)) = (set("metrics_bind_address"), file.metrics_bind_address) {
        args.metrics_bind_address = a;
    }
    if let (true, Some(cidrs)) = (set("nodeport_addresses"), file.nodeport_addresses) {
        args.nodeport_addresses = cidrs
            .iter()
            .map(|c| c.parse().map_err(|e| anyhow::anyhow!("--config {}: nodePortAddresses: {e}", path.display())))
            .collect::<Result<_>>()?;
    }
    if let (true, Some(d)) = (set("sync_period"), file.sync_period) {
        args.sync_period = d;
    }
    if let (true, Some(d)) = (set("min_sync_period"), file.min_sync_period) {
        args.min_sync_period = d;
    }
    if set("oom_score_adj") {
        args.oom_score_adj = file.oom_score_adj.or(args.oom_score_adj);
    }
    if !file.ignored.is_empty() {
        tracing::warn!(config = %path.display(), "fields without a kproxy meaning, ignored: {}", file.ignored.join(", "));
    }
    if !file.unknown.is_empty() {
        tracing::warn!(config = %path.display(), "unknown KubeProxyConfiguration fields, ignored: {}", file.unknown.join(", "));
    }
    tracing::info!(config = %path.display(), "read kube-proxy's configuration file");
    Ok(())
}

/// Writes `/proc/self/oom_score_adj`, as kube-proxy's `--oom-score-adj` does. Lowering it needs
/// `CAP_SYS_RESOURCE`; failing to is logged, not fatal (kube-proxy logs it too).
fn set_oom_score_adj(value: i32) {
    match std::fs::write("/proc/self/oom_score_adj", value.to_string()) {
        Ok(()) => tracing::info!(oom_score_adj = value, "set oom_score_adj"),
        Err(e) => tracing::warn!(oom_score_adj = value, "could not set oom_score_adj: {e}"),
    }
}

fn main() -> Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // `--config` is read before logging starts: it may set the format and the verbosity.
    let file = match &cli.command {
        Command::Run(args) => match &args.config {
            Some(path) => Some((path.clone(), config::load(path)?)),
            None => None,
        },
        _ => None,
    };
    let in_file = file.as_ref().map(|(_, f)| f);
    let file_format = in_file.and_then(|f| f.logging_format.as_deref()).map(|f| match f {
        "json" => LoggingFormat::Json,
        _ => LoggingFormat::Text,
    });
    let format = cli.logging_format.or(file_format).unwrap_or(LoggingFormat::Text);
    let verbosity = cli.verbosity.or(in_file.and_then(|f| f.verbosity)).unwrap_or(0);
    init_logging(format, verbosity);
    match cli.command {
        Command::Run(mut args) => {
            if let (Some((_, run)), Some((path, file))) = (matches.subcommand(), file) {
                apply_config(&mut args, run, &path, file)?;
            }
            if let Some(value) = args.oom_score_adj {
                set_oom_score_adj(value);
            }
            let cgroup = match args.cgroup {
                Some(c) => c,
                None => loader::cgroup2_root()?,
            };
            let source = match args.manifests {
                Some(path) => agent::Source::Manifests(path),
                None => agent::Source::Apiserver { kubeconfig: args.kubeconfig },
            };
            let devices = match args.devices {
                Some(d) => d.into_iter().filter(|d| !d.is_empty()).collect(),
                None => kproxy::node::default_route_devices()?,
            };
            kproxy::node::check_devices(&devices)?;
            let cfg = agent::AgentConfig {
                source,
                node_name: node_name(args.hostname_override)?,
                devices,
                tc_attach: args.tc_attach,
                node_port_addresses: kproxy::node::node_port_addresses(&args.nodeport_addresses)?,
                healthz_addr: bind_address("--healthz-bind-address", &args.healthz_bind_address)?,
                metrics_addr: bind_address("--metrics-bind-address", &args.metrics_bind_address)?,
                manifests_settle: args.manifests_settle_time,
                layout: PinLayout::new(args.pin.bpffs_dir),
                cgroup,
                capacities: args.capacities.capacities(),
                terminate_sockets: args.terminate_stale_sockets,
                socket_storage: args.socket_storage,
                events: match &args.event_file {
                    Some(path) => kproxy::events::Events::open(path)?,
                    None => kproxy::events::Events::none(),
                },
                runner: RunnerConfig {
                    min_interval: args.min_sync_period,
                    sync_period: args.sync_period,
                    retry_interval: args.min_sync_period.max(Duration::from_secs(1)),
                },
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("start the tokio runtime")?
                .block_on(agent::run(cfg))
        }
        Command::Trace(args) => trace(args),
        Command::Dump { pin, json, conntrack: true, filter } => {
            let (maps, layout) = open_maps(&pin)?;
            let flows = kproxy::dataplane::bpf::FlowMaps::open(&layout.maps_dir())?.read()?;
            let filter = kproxy::trace::ConntrackFilter { src: filter.src, dst: filter.dst, protocol: filter.proto, backend: filter.backend };
            let dump = filter.apply(kproxy::trace::conntrack(&maps.read()?, &flows));
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer(&mut out, &dump)?;
                writeln!(out)?;
            } else {
                kproxy::trace::write_conntrack(&dump, &mut out)?;
            }
            Ok(())
        }
        Command::Dump { pin, json, .. } => {
            let (maps, _) = open_maps(&pin)?;
            let dump = dump::Dump::new(maps.read()?.frontends(), maps.usage()?);
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer(&mut out, &dump.json())?;
                println!();
            } else {
                dump.write_table(&mut out)?;
            }
            Ok(())
        }
        Command::TcCost(args) => {
            let cfg = kproxy::tc_cost::Config {
                manifests: args.manifests,
                node_addresses: kproxy::node::node_port_addresses(&args.nodeport_addresses)?,
                capacities: args.capacities.capacities(),
                frontend: args.frontend,
                client: args.client,
                rounds: args.rounds,
                runs: args.runs,
            };
            let report = kproxy::tc_cost::run(&cfg)?;
            serde_json::to_writer(std::io::stdout().lock(), &report)?;
            println!();
            Ok(())
        }
        Command::Cleanup { pin, cgroup } => {
            let report = loader::cleanup(&PinLayout::new(pin.bpffs_dir))?;
            println!(
                "detached {} links and {} tc filters, removed {} maps",
                report.links.len(),
                report.tc_filters,
                report.maps.len()
            );
            if let Some(cgroup) = cgroup {
                let left = loader::wait_detached(&cgroup, std::time::Duration::from_secs(5))?;
                if !left.is_empty() {
                    anyhow::bail!(
                        "{} still has kproxy programs attached ({}); is an agent still running?",
                        cgroup.display(),
                        left.join(", ")
                    );
                }
            }
            Ok(())
        }
    }
}
