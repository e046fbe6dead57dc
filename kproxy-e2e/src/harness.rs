//! One kproxy agent under test: a [`Topology`] whose pods run `kproxy-testpod serve`, a client
//! [`Cgroup`], a manifest directory, the agent process and its pinned state, all removed on drop.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use kproxy_e2e::harness::{Binaries, Harness};
//! use kproxy_e2e::manifest::{Protocol, ServiceSpec};
//! let bins = Binaries::in_target_dir("target".as_ref());
//! let mut h = Harness::new(bins, &["pod-a", "pod-b"], kproxy_e2e::harness::unique_bpffs_dir("kproxy-test"))?;
//! let web = ServiceSpec::new("web", "10.96.0.10".parse()?, 80, "http", Protocol::Tcp, 8080)
//!     .endpoint("pod-a", h.topology.pod("pod-a").ip, true);
//! h.write_services(&[web.clone()])?;
//! h.start_agent()?;
//! h.wait_for_services(&[web], Duration::from_secs(5))?;
//! let report = h.run_client(&["http", "--addr", "10.96.0.10:80", "--count", "10"], Duration::from_secs(30))?;
//! assert_eq!(report.ok, 10);
//! # Ok(()) }
//! ```

use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use crate::events::{self, Attached, Event, SocketTermination, EVENT_FILE_FLAG};
use crate::fake_apiserver::FakeApiServer;
use crate::manifest::{self, ServiceSpec};
use crate::prometheus::Metrics;
use crate::report::Report;
use crate::topology::{
    output_in, spawn_in, spawn_in_cgroup, unique_name, Cgroup, ChildGuard, Topology,
};
use crate::{cmd, http, interrupt};

/// The TCP port every test pod serves HTTP on.
pub const HTTP_PORT: u16 = 8080;
/// The UDP port every test pod answers datagrams on.
pub const UDP_PORT: u16 = 5353;

const SERVER_READY_WAIT: Duration = Duration::from_secs(5);
const AGENT_STOP_GRACE: Duration = Duration::from_secs(5);
const KPROXY_COMMAND_TIMEOUT: Duration = Duration::from_secs(15);
const DUMP_POLL: Duration = Duration::from_millis(10);
const LOG_TAIL: usize = 4000;
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// kube-proxy's default `--healthz-bind-address` port.
pub const HEALTHZ_PORT: u16 = 10256;
/// kube-proxy's default `--metrics-bind-address` port.
pub const METRICS_PORT: u16 = 10249;

/// Where an agent that watches an apiserver gets it from and serves health and metrics. See
/// [`Harness::with_apiserver`].
#[derive(Debug, Clone)]
pub struct ApiserverSource {
    pub kubeconfig: PathBuf,
    /// `--hostname-override`: the Node the agent watches.
    pub node_name: String,
    /// `--healthz-bind-address` (`/healthz`, `/livez`): 127.0.0.1 of the node namespace.
    pub healthz: SocketAddr,
    /// `--metrics-bind-address` (`/metrics`): 127.0.0.1 of the node namespace.
    pub metrics: SocketAddr,
}

/// A fresh bpffs directory name: `/sys/fs/bpf/<prefix>-<pid>-<n>`.
pub fn unique_bpffs_dir(prefix: &str) -> PathBuf {
    Path::new("/sys/fs/bpf").join(unique_name(prefix))
}

/// The binaries a harness runs (defined in xtask, which builds them).
pub use xtask::workspace::Binaries;

/// One entry of `kproxy dump --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDump {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    /// The `type` field: "ClusterIP", ...
    pub kind: String,
    /// `ip:port`.
    pub frontend: String,
    pub protocol: String,
    /// `ip:port` of each backend, sorted.
    pub backends: Vec<String>,
    /// `in_cluster_backends`, sorted: the backends of clients in the cluster when they are not
    /// `backends` (an external frontend with `externalTrafficPolicy: Local`).
    pub in_cluster_backends: Option<Vec<String>>,
}

impl ServiceDump {
    /// Whether this entry is `spec` with exactly its ready endpoints as backends.
    pub fn matches(&self, spec: &ServiceSpec) -> bool {
        self.namespace == spec.namespace
            && self.name == spec.name
            && self.frontend == spec.frontend()
            && self.protocol.eq_ignore_ascii_case(spec.protocol.as_str())
            && self.backends == spec.ready_backends()
    }
}

/// The parsed output of `kproxy dump --json`, services and backends sorted, so that two dumps of
/// the same state compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dump {
    pub services: Vec<ServiceDump>,
}

impl Dump {
    /// Parses `kproxy dump --json` ([`kproxy_api::dump`]).
    pub fn parse(json: &str) -> Result<Dump> {
        let dump: kproxy_api::dump::Dump = serde_json::from_str(json.trim())
            .with_context(|| format!("kproxy dump printed invalid JSON: {json:?}"))?;
        let mut services: Vec<ServiceDump> = dump.services.into_iter().map(ServiceDump::from).collect();
        services.sort_by(|a, b| {
            (&a.namespace, &a.name, &a.port_name).cmp(&(&b.namespace, &b.name, &b.port_name))
        });
        Ok(Dump { services })
    }

    /// The first entry named `name` (any namespace and port).
    pub fn service(&self, name: &str) -> Option<&ServiceDump> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Whether every spec appears with exactly its ready backends.
    pub fn matches_all(&self, specs: &[ServiceSpec]) -> bool {
        specs
            .iter()
            .all(|spec| self.services.iter().any(|s| s.matches(spec)))
    }
}

impl From<kproxy_api::dump::DumpService> for ServiceDump {
    fn from(s: kproxy_api::dump::DumpService) -> ServiceDump {
        let mut backends = s.backends;
        backends.sort();
        let in_cluster_backends = s.in_cluster_backends.map(|mut list| {
            list.sort();
            list
        });
        ServiceDump {
            namespace: s.namespace,
            name: s.name,
            port_name: s.port_name,
            kind: s.svc_type,
            frontend: s.frontend,
            protocol: s.protocol,
            backends,
            in_cluster_backends,
        }
    }
}

/// How the agent process starts, besides its arguments; see [`Harness::with_agent_umask`] and
/// [`Harness::with_agent_open_files`].
#[derive(Debug, Default, Clone, Copy)]
struct AgentProcess {
    umask: Option<libc::mode_t>,
    /// `RLIMIT_NOFILE` (soft, hard).
    open_files: Option<(libc::rlim_t, libc::rlim_t)>,
}

/// A directory removed (recursively) on drop.
#[derive(Debug)]
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("warning: removing {}: {e}", self.0.display());
        }
    }
}

/// See the module documentation. Dropping it stops the agent, runs `kproxy cleanup`, and removes
/// the pods' servers, the cgroup, the namespaces and the work directory.
#[derive(Debug)]
pub struct Harness {
    agent: Option<ChildGuard>,
    cleaned_up: bool,
    bins: Binaries,
    bpffs_dir: PathBuf,
    manifests: PathBuf,
    apiserver: Option<ApiserverSource>,
    extra_agent_args: Vec<String>,
    agent_process: AgentProcess,
    // Field order is drop order: servers, files, then cgroup and namespaces.
    servers: Vec<ChildGuard>,
    workdir: WorkDir,
    /// Clients run here (and in the node namespace); kproxy attaches its programs here.
    pub cgroup: Cgroup,
    pub topology: Topology,
}

impl Harness {
    /// Builds a topology with `pods`, starts `kproxy-testpod serve` in each (HTTP on
    /// [`HTTP_PORT`], UDP on [`UDP_PORT`], answering with the pod's name) and creates the client
    /// cgroup. The agent uses `bpffs_dir` and, unless [`Harness::with_manifests`] says otherwise,
    /// a fresh manifest directory written by [`Harness::write_manifest`].
    pub fn new(bins: Binaries, pods: &[&str], bpffs_dir: PathBuf) -> Result<Harness> {
        Self::on_subnet(bins, pods, bpffs_dir, 1)
    }

    /// As [`Harness::new`], with the pods on 10.244.`subnet`.0/24 (a second node's pods).
    pub fn on_subnet(bins: Binaries, pods: &[&str], bpffs_dir: PathBuf, subnet: u8) -> Result<Harness> {
        bins.check()?;
        let topology = Topology::builder().pods(pods.iter().copied()).subnet(subnet).build()?;
        let cgroup = Cgroup::new("clients")?;
        let workdir = WorkDir(std::env::temp_dir().join(unique_name("kproxy-harness")));
        let manifests = workdir.0.join("manifests");
        fs::create_dir_all(&manifests)
            .with_context(|| format!("creating {}", manifests.display()))?;
        let mut harness = Harness {
            agent: None,
            cleaned_up: false,
            bins,
            bpffs_dir,
            manifests,
            apiserver: None,
            extra_agent_args: Vec::new(),
            agent_process: AgentProcess::default(),
            servers: Vec::new(),
            workdir,
            cgroup,
            topology,
        };
        harness.start_servers()?;
        Ok(harness)
    }

    /// Makes the agent read `path` (a file or directory) instead of the harness's own directory.
    pub fn with_manifests(mut self, path: PathBuf) -> Harness {
        self.manifests = path;
        self
    }

    /// Makes the agent watch `api` (`--kubeconfig`, written into the work directory) as Node
    /// `node_name`, instead of reading manifests, with `/healthz` and `/metrics` on kube-proxy's
    /// default ports ([`HEALTHZ_PORT`], [`METRICS_PORT`]) of 127.0.0.1.
    ///
    /// The agent still runs in the node namespace, as a kube-proxy DaemonSet pod runs in the
    /// node's (host) network, so it sees the node's devices and addresses and nothing of the
    /// machine's. `api` must therefore listen inside that namespace
    /// (`FakeApiServer::start_in(h.topology.node.path(), 127.0.0.1:0)`): the agent reaches it on
    /// the node's 127.0.0.1, and the test reaches the agent's health and metrics ports there
    /// too (see [`Harness::get_healthz`]). The namespace belongs to this harness alone, so the
    /// fixed ports cannot clash with anything.
    pub fn with_apiserver(mut self, api: &FakeApiServer, node_name: &str) -> Result<Harness> {
        let kubeconfig = self.workdir.0.join("kubeconfig");
        api.kubeconfig(&kubeconfig)?;
        self.apiserver = Some(ApiserverSource {
            kubeconfig,
            node_name: node_name.to_string(),
            healthz: (Ipv4Addr::LOCALHOST, HEALTHZ_PORT).into(),
            metrics: (Ipv4Addr::LOCALHOST, METRICS_PORT).into(),
        });
        Ok(self)
    }

    /// Extra arguments for every `kproxy run` (e.g. `--sync-period 2s`).
    pub fn with_agent_args(mut self, args: &[&str]) -> Harness {
        self.extra_agent_args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Starts the agent with this umask (e.g. 0, to check the modes it creates files with).
    pub fn with_agent_umask(mut self, umask: u32) -> Harness {
        self.agent_process.umask = Some(umask as libc::mode_t);
        self
    }

    /// Starts the agent with this `RLIMIT_NOFILE` (soft, hard), e.g. the common default soft
    /// limit of 1,024.
    pub fn with_agent_open_files(mut self, soft: u64, hard: u64) -> Harness {
        self.agent_process.open_files = Some((soft as libc::rlim_t, hard as libc::rlim_t));
        self
    }

    /// The agent's process id while it runs.
    pub fn agent_pid(&mut self) -> Option<i32> {
        let agent = self.agent.as_mut()?;
        agent.is_running().then(|| agent.pid())
    }

    /// The apiserver settings, if the agent watches one.
    pub fn apiserver(&self) -> Option<&ApiserverSource> {
        self.apiserver.as_ref()
    }

    /// The harness's scratch directory (removed on drop).
    pub fn workdir(&self) -> &Path {
        &self.workdir.0
    }

    fn apiserver_source(&self) -> Result<&ApiserverSource> {
        self.apiserver
            .as_ref()
            .context("the agent does not watch an apiserver (see Harness::with_apiserver)")
    }

    /// `GET path` on the agent's healthz address (`/healthz`, `/livez`), from inside the node
    /// namespace.
    pub fn get_healthz(&self, path: &str) -> Result<http::Response> {
        let addr = self.apiserver_source()?.healthz;
        http::get_in(&self.topology.node.path(), addr, path, SCRAPE_TIMEOUT)
    }

    /// `GET path` on the agent's metrics address, from inside the node namespace: that of
    /// [`Harness::with_apiserver`], else kube-proxy's default ([`METRICS_PORT`] of 127.0.0.1,
    /// the agent's default too).
    pub fn get_metrics_path(&self, path: &str) -> Result<http::Response> {
        let addr = self.apiserver.as_ref().map_or((Ipv4Addr::LOCALHOST, METRICS_PORT).into(), |api| api.metrics);
        http::get_in(&self.topology.node.path(), addr, path, SCRAPE_TIMEOUT)
    }

    /// Scrapes and parses `/metrics`; fails unless it answers 200.
    pub fn metrics(&self) -> Result<Metrics> {
        let response = self.get_metrics_path("/metrics")?;
        if response.status != 200 {
            bail!("/metrics answered {}: {}", response.status, response.text());
        }
        Metrics::parse(&response.text())
    }

    /// Polls `/healthz` until it answers `status`, for at most `timeout`; returns the response.
    pub fn wait_for_healthz(&mut self, status: u16, timeout: Duration) -> Result<http::Response> {
        let start = Instant::now();
        loop {
            interrupt::check()?;
            let last = match self.get_healthz("/healthz") {
                Ok(r) if r.status == status => return Ok(r),
                Ok(r) => format!("it answered {}: {}", r.status, r.text()),
                Err(e) => format!("{e:#}"),
            };
            if let Some(agent) = &mut self.agent {
                if let Some(exit) = agent.try_wait()? {
                    bail!(
                        "the agent exited ({exit}) while waiting for /healthz {status}; \
                         agent log:\n{}",
                        self.agent_log()
                    );
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "/healthz did not answer {status} within {timeout:?}; last: {last}\n\
                     agent log:\n{}",
                    self.agent_log()
                );
            }
            std::thread::sleep(DUMP_POLL * 5);
        }
    }

    fn start_servers(&mut self) -> Result<()> {
        for pod in &self.topology.pods {
            let mut cmd = Command::new(&self.bins.testpod);
            cmd.args(["serve", "--name", &pod.name])
                .arg("--tcp")
                .arg(format!("{}:{HTTP_PORT}", pod.ip))
                .arg("--udp")
                .arg(format!("{}:{UDP_PORT}", pod.ip))
                .stdin(Stdio::null())
                .stdout(Stdio::piped());
            let mut server = spawn_in(&pod.netns, cmd)?;
            let line = server.read_line(SERVER_READY_WAIT)?;
            if !line.starts_with("ready") {
                bail!("`{}` printed {line:?} instead of ready", server.what());
            }
            self.servers.push(server);
        }
        Ok(())
    }

    /// The binaries this harness runs.
    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// Where the agent reads manifests from.
    pub fn manifests(&self) -> &Path {
        &self.manifests
    }

    /// Replaces the manifest (`<manifest dir>/services.yaml`) atomically: written next to the
    /// directory, then renamed into it, so the agent never reads a half-written file.
    pub fn write_manifest(&self, yaml: &str) -> Result<()> {
        let staged = self.workdir.0.join("services.yaml.staged");
        let target = self.manifests.join("services.yaml");
        fs::write(&staged, yaml).with_context(|| format!("writing {}", staged.display()))?;
        fs::rename(&staged, &target)
            .with_context(|| format!("renaming {} to {}", staged.display(), target.display()))
    }

    /// [`Harness::write_manifest`] of these services.
    pub fn write_services(&self, services: &[ServiceSpec]) -> Result<()> {
        self.write_manifest(&manifest::to_yaml(services))
    }

    fn agent_log_path(&self) -> PathBuf {
        self.workdir.0.join("agent.log")
    }

    /// The agent's event file (`kproxy run --event-file`; all runs, appended).
    pub fn event_file(&self) -> PathBuf {
        self.workdir.0.join("events.jsonl")
    }

    /// Every event the agent wrote so far (all runs), oldest first.
    pub fn events(&self) -> Result<Vec<Event>> {
        events::read(&self.event_file())
    }

    /// The latest [`Attached`] event: where and how the programs were attached.
    pub fn attached(&self) -> Result<Option<Attached>> {
        Ok(self.events()?.into_iter().rev().find_map(|e| match e {
            Event::Attached(a) => Some(a),
            _ => None,
        }))
    }

    /// The latest [`SocketTermination`] event: whether the agent could load stale-socket
    /// termination.
    pub fn socket_termination(&self) -> Result<Option<SocketTermination>> {
        Ok(self.events()?.into_iter().rev().find_map(|e| match e {
            Event::SocketTermination(t) => Some(t),
            _ => None,
        }))
    }

    /// The agent's whole stdout and stderr (all runs, appended).
    pub fn agent_log_full(&self) -> String {
        fs::read_to_string(self.agent_log_path()).unwrap_or_default()
    }

    /// The end of the agent's stdout and stderr (all runs, appended).
    pub fn agent_log(&self) -> String {
        let log = fs::read_to_string(self.agent_log_path()).unwrap_or_default();
        let start = log.len().saturating_sub(LOG_TAIL);
        let start = (start..log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(0);
        log[start..].to_string()
    }

    /// Starts `kproxy run` in the node namespace (not in the client cgroup); its output goes to
    /// the agent log, its events to [`Harness::event_file`]. It reads the manifests, or watches
    /// the apiserver given to [`Harness::with_apiserver`].
    pub fn start_agent(&mut self) -> Result<()> {
        if let Some(agent) = &mut self.agent {
            if agent.is_running() {
                bail!("the agent is already running");
            }
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.agent_log_path())
            .context("opening the agent log")?;
        let mut cmd = Command::new(&self.bins.kproxy);
        cmd.arg("run");
        match &self.apiserver {
            Some(api) => {
                cmd.arg("--kubeconfig")
                    .arg(&api.kubeconfig)
                    .arg("--hostname-override")
                    .arg(&api.node_name)
                    .arg("--healthz-bind-address")
                    .arg(api.healthz.to_string())
                    .arg("--metrics-bind-address")
                    .arg(api.metrics.to_string());
            }
            None => {
                cmd.arg("--manifests").arg(&self.manifests);
            }
        }
        cmd.arg("--bpffs-dir")
            .arg(&self.bpffs_dir)
            .arg("--cgroup")
            .arg(self.cgroup.path())
            .arg(EVENT_FILE_FLAG)
            .arg(self.event_file())
            .args(&self.extra_agent_args)
            // Plain text in the log file, so that failures quote it readably.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the agent log")?)
            .stderr(log);
        let AgentProcess { umask, open_files } = self.agent_process;
        if umask.is_some() || open_files.is_some() {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: runs between fork and exec; umask and setrlimit are async-signal-safe
            // and the closure only reads values copied into it.
            unsafe {
                cmd.pre_exec(move || {
                    if let Some(mask) = umask {
                        libc::umask(mask);
                    }
                    if let Some((soft, hard)) = open_files {
                        let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        self.agent = Some(spawn_in(&self.topology.node, cmd)?);
        self.cleaned_up = false;
        Ok(())
    }

    /// Whether the agent process is alive.
    pub fn agent_running(&mut self) -> bool {
        self.agent.as_mut().is_some_and(ChildGuard::is_running)
    }

    /// Sends SIGTERM and waits for the agent to exit (SIGKILL after a grace period).
    pub fn stop_agent(&mut self) -> Result<ExitStatus> {
        let mut agent = self.agent.take().context("no agent was started")?;
        agent.stop(Signal::SIGTERM, AGENT_STOP_GRACE)
    }

    /// SIGKILLs the agent (`kill -9`) and reaps it.
    pub fn kill_agent(&mut self) -> Result<ExitStatus> {
        let mut agent = self.agent.take().context("no agent was started")?;
        agent.signal(Signal::SIGKILL)?;
        agent
            .wait_timeout(AGENT_STOP_GRACE)?
            .with_context(|| format!("`{}` survived SIGKILL", agent.what()))
    }

    /// Runs `kproxy <args>` in the node namespace; returns stdout, fails on a non-zero exit.
    pub fn kproxy(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.bins.kproxy);
        cmd.args(args);
        let what = cmd::describe(&cmd);
        let out = output_in(&self.topology.node, None, cmd, KPROXY_COMMAND_TIMEOUT)?;
        cmd::check_output(&what, &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn bpffs_arg(&self) -> String {
        self.bpffs_dir.display().to_string()
    }

    /// `kproxy dump --json`, parsed.
    pub fn dump(&self) -> Result<Dump> {
        Dump::parse(&self.kproxy(&["dump", "--bpffs-dir", &self.bpffs_arg(), "--json"])?)
    }

    /// `kproxy dump` as a table, for people.
    pub fn dump_table(&self) -> Result<String> {
        self.kproxy(&["dump", "--bpffs-dir", &self.bpffs_arg()])
    }

    /// Polls `kproxy dump --json` until `done` holds, for at most `timeout`. Returns the dump and
    /// how long it took. Fails early if the agent died; errors quote the last dump and the log.
    pub fn wait_for_dump(
        &mut self,
        timeout: Duration,
        done: impl Fn(&Dump) -> bool,
    ) -> Result<(Dump, Duration)> {
        let start = Instant::now();
        loop {
            interrupt::check()?;
            let last = match self.dump() {
                Ok(dump) if done(&dump) => return Ok((dump, start.elapsed())),
                Ok(dump) => format!("last dump: {dump:#?}"),
                Err(e) => format!("last dump failed: {e:#}"),
            };
            if let Some(agent) = &mut self.agent {
                if let Some(status) = agent.try_wait()? {
                    bail!(
                        "the agent exited ({status}) while waiting for its dump; {last}\n\
                         agent log:\n{}",
                        self.agent_log()
                    );
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "kproxy dump did not reach the expected state within {timeout:?}; {last}\n\
                     agent log:\n{}",
                    self.agent_log()
                );
            }
            std::thread::sleep(DUMP_POLL);
        }
    }

    /// Waits until the dump lists each of `services` with exactly its ready backends.
    pub fn wait_for_services(
        &mut self,
        services: &[ServiceSpec],
        timeout: Duration,
    ) -> Result<(Dump, Duration)> {
        self.wait_for_dump(timeout, |d| d.matches_all(services))
    }

    /// Starts `kproxy-testpod <args>` as a client (node namespace + client cgroup), in the
    /// background; see [`Harness::client_report`].
    pub fn spawn_client(&self, args: &[&str]) -> Result<ChildGuard> {
        let mut cmd = Command::new(&self.bins.testpod);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        spawn_in_cgroup(&self.topology.node, &self.cgroup, cmd)
    }

    /// Waits (at most `timeout`) for a client from [`Harness::spawn_client`] and parses its
    /// report.
    pub fn client_report(client: ChildGuard, timeout: Duration) -> Result<Report> {
        let what = client.what().to_string();
        let out = client.wait_with_output_interruptible(timeout)?;
        cmd::check_output(&what, &out)?;
        Report::parse(&String::from_utf8_lossy(&out.stdout))
            .with_context(|| format!("output of `{what}`"))
    }

    /// Runs `kproxy-testpod <args>` as a client and returns its report.
    pub fn run_client(&self, args: &[&str], timeout: Duration) -> Result<Report> {
        interrupt::check()?;
        Self::client_report(self.spawn_client(args)?, timeout)
    }

    /// Runs any command as a client (node namespace + client cgroup), e.g. `curl`. The exit
    /// status is not checked.
    pub fn run_in_client_cgroup(&self, cmd: Command, timeout: Duration) -> Result<Output> {
        interrupt::check()?;
        output_in(&self.topology.node, Some(&self.cgroup), cmd, timeout)
    }

    /// Stops the agent if it runs, then `kproxy cleanup` (detach programs, remove pins).
    pub fn cleanup(&mut self) -> Result<()> {
        if self.agent_running() {
            self.stop_agent()?;
        }
        let cgroup = self.cgroup.path().display().to_string();
        self.kproxy(&[
            "cleanup",
            "--bpffs-dir",
            &self.bpffs_arg(),
            "--cgroup",
            &cgroup,
        ])?;
        self.cleaned_up = true;
        Ok(())
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "agent log ({}):\n{}",
                self.agent_log_path().display(),
                self.agent_log()
            );
        }
        if self.agent_running() {
            if let Err(e) = self.stop_agent() {
                eprintln!("warning: stopping the agent: {e:#}");
            }
        }
        if !self.cleaned_up {
            if let Err(e) = self.cleanup() {
                eprintln!("warning: kproxy cleanup failed: {e:#}");
            }
        }
        if self.bpffs_dir.exists() {
            eprintln!(
                "warning: {} still exists after kproxy cleanup; removing it",
                self.bpffs_dir.display()
            );
            if let Err(e) = fs::remove_dir_all(&self.bpffs_dir) {
                eprintln!("warning: removing {}: {e}", self.bpffs_dir.display());
            }
        }
    }
}
