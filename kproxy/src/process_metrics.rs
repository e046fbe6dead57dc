//! The standard `process_*` metrics (as Prometheus' Go process collector names them, so the
//! kubernetes-mixin "Kubernetes / Proxy" dashboard's Memory and CPU panels have data), read from
//! `/proc/self` at every scrape. Nothing is cached or estimated: a value that cannot be read is
//! left out of that scrape rather than reported as 0.

use std::fmt::Error as FmtError;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};

/// What `/proc/self/stat`, `/proc/stat` and the resource limits say about this process.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time, in seconds.
    pub cpu_seconds: f64,
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    /// Start time since the Unix epoch, in seconds.
    pub start_time_seconds: f64,
    /// OS threads (the closest a Rust process has to `go_goroutines`; named as its own metric).
    pub threads: u64,
}

/// Parses the fields of `/proc/PID/stat` that [`ProcessStats`] holds. `boot_time` is `btime`
/// from `/proc/stat`, `ticks` the clock ticks per second and `page_size` in bytes.
pub fn parse_stat(stat: &str, boot_time: u64, ticks: u64, page_size: u64) -> Option<ProcessStats> {
    // The command name (field 2) is in parentheses and may itself hold spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // `fields[0]` is field 3 (state) of proc(5).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let ticks = ticks.max(1) as f64;
    Some(ProcessStats {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        threads: field(20)?,
        start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
        virtual_memory_bytes: field(23)?,
        resident_memory_bytes: field(24)? * page_size,
    })
}

/// `btime` (boot time, seconds since the epoch) from the content of `/proc/stat`.
pub fn parse_boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat.lines().find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
}

/// Registered once on the metrics registry; reads the process's state at every scrape.
#[derive(Debug)]
pub struct ProcessCollector {
    boot_time: Option<u64>,
    ticks: u64,
    page_size: u64,
}

impl ProcessCollector {
    pub fn new() -> Self {
        use nix::unistd::{sysconf, SysconfVar};
        let conf = |v| sysconf(v).ok().flatten().and_then(|n| u64::try_from(n).ok());
        ProcessCollector {
            boot_time: std::fs::read_to_string("/proc/stat").ok().as_deref().and_then(parse_boot_time),
            ticks: conf(SysconfVar::CLK_TCK).unwrap_or(100),
            page_size: conf(SysconfVar::PAGE_SIZE).unwrap_or(4096),
        }
    }

    fn stats(&self) -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        parse_stat(&stat, self.boot_time?, self.ticks, self.page_size)
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

/// The soft limit of `resource`, `None` when unlimited or unreadable.
fn soft_limit(resource: nix::sys::resource::Resource) -> Option<u64> {
    let (soft, _) = nix::sys::resource::getrlimit(resource).ok()?;
    (soft != nix::sys::resource::RLIM_INFINITY).then_some(soft)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> Result<(), FmtError> {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), FmtError> {
        use nix::sys::resource::Resource;
        if let Some(s) = self.stats() {
            ConstCounter::new(s.cpu_seconds).encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                MetricType::Counter,
            )?)?;
            gauge(&mut encoder, "process_resident_memory_bytes", "Resident memory size in bytes.", s.resident_memory_bytes as f64)?;
            gauge(&mut encoder, "process_virtual_memory_bytes", "Virtual memory size in bytes.", s.virtual_memory_bytes as f64)?;
            gauge(&mut encoder, "process_start_time_seconds", "Start time of the process since unix epoch in seconds.", s.start_time_seconds)?;
            gauge(&mut encoder, "kproxy_process_threads", "OS threads of the agent process.", s.threads as f64)?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle itself is one of the entries; Go's collector counts it too.
            gauge(&mut encoder, "process_open_fds", "Number of open file descriptors.", fds.count() as f64)?;
        }
        if let Some(max) = soft_limit(Resource::RLIMIT_NOFILE) {
            gauge(&mut encoder, "process_max_fds", "Maximum number of open file descriptors.", max as f64)?;
        }
        if let Some(max) = soft_limit(Resource::RLIMIT_AS) {
            gauge(&mut encoder, "process_virtual_memory_max_bytes", "Maximum amount of virtual memory available in bytes.", max as f64)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_a_command_name_with_spaces_and_parentheses() {
        // Fields 3..=24 of proc(5); utime 250, stime 50, threads 7, starttime 1000, vsize, rss.
        let stat = "4242 (kp (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 1000 123456789 300 18446744073709551615";
        let s = parse_stat(stat, 1_700_000_000, 100, 4096).expect("parses");
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_time_seconds, 1_700_000_010.0);
        assert_eq!(s.virtual_memory_bytes, 123_456_789);
        assert_eq!(s.resident_memory_bytes, 300 * 4096);
        assert_eq!(parse_stat("4242 (kproxy) S 1 2", 0, 100, 4096), None, "a truncated line is not read as zeros");
    }

    #[test]
    fn boot_time_comes_from_btime() {
        assert_eq!(parse_boot_time("cpu  1 2 3\nbtime 1733300000\nprocesses 9\n"), Some(1_733_300_000));
        assert_eq!(parse_boot_time("cpu  1 2 3\n"), None);
    }

    #[test]
    fn this_process_is_described_truthfully() {
        let c = ProcessCollector::new();
        let s = c.stats().expect("/proc/self/stat is readable");
        assert!(s.resident_memory_bytes > 1 << 20, "a test process holds more than 1 MiB: {s:?}");
        assert!(s.threads >= 1);
        let now = crate::metrics::unix_seconds(std::time::SystemTime::now());
        assert!(s.start_time_seconds <= now + 1.0 && s.start_time_seconds > now - 86_400.0, "started within a day: {s:?}");
    }
}
