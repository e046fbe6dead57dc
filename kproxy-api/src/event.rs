//! `kproxy run --event-file PATH` (hidden, [`EVENT_FILE_FLAG`]): what the agent did, as it
//! happens, one JSON object per line appended to PATH, `{"event":"synced",…}`. The human log
//! says the same in words; tools read this file instead.

use serde::{Deserialize, Serialize};

/// The flag of `kproxy run` that names the event file.
pub const EVENT_FILE_FLAG: &str = "--event-file";

/// One line of the event file, tagged by its `event` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Every program is loaded and attached (the log's "programs attached"); once per start.
    Attached(Attached),
    /// Whether stale-socket termination loaded; once per start, after [`Event::Attached`].
    SocketTermination(SocketTermination),
    /// A sync wrote the maps (the log's "synced").
    Synced(Synced),
}

/// Where and how the programs were attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    /// The cgroup v2 directory of the socket programs.
    pub cgroup: String,
    /// The bpffs directory of the pins.
    pub bpffs: String,
    /// The devices of the tc programs (none: no device, the tc programs are loaded only).
    pub devices: Vec<String>,
    /// How the tc programs attach to `devices`.
    pub tc: TcAttachment,
    /// Whether the socket programs refuse with `ECONNREFUSED` through `bpf_set_retval` (Linux
    /// 5.18); else with `EPERM`.
    pub set_retval: bool,
}

/// How tc programs are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcAttachment {
    /// TCX links (Linux 6.6).
    Tcx,
    /// clsact qdisc filters over netlink.
    Netlink,
}

/// Stale-socket termination (`bpf_sock_destroy`, Linux 6.5) at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketTermination {
    pub status: SocketTerminationStatus,
    /// Why it is unavailable (the load error); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketTerminationStatus {
    /// The socket iterators loaded: sockets connected to removed backends are destroyed.
    Available,
    /// They did not load (an older kernel): connected sockets keep a removed backend.
    Unavailable,
    /// `--terminate-stale-sockets=false`.
    Off,
}

/// One sync that wrote the maps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Synced {
    /// A full sync (every frontend) rather than one of the changed frontends only.
    pub full: bool,
    /// Frontends desired after the sync.
    pub frontends: usize,
    /// Frontends whose Service or endpoints changed since the previous sync.
    pub changed_frontends: usize,
    /// Map writes (updates and deletes).
    pub writes: usize,
    /// Time spent planning and writing the maps, in ms.
    pub sync_ms: f64,
    /// The whole sync, reading the sources included, in ms.
    pub total_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_event_tagged_by_its_kind() {
        let synced = Event::Synced(Synced {
            full: true,
            frontends: 3,
            changed_frontends: 3,
            writes: 12,
            sync_ms: 0.25,
            total_ms: 1.5,
        });
        let line = serde_json::to_string(&synced).unwrap();
        assert_eq!(
            line,
            r#"{"event":"synced","full":true,"frontends":3,"changed_frontends":3,"writes":12,"sync_ms":0.25,"total_ms":1.5}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), synced);

        let attached = r#"{"event":"attached","cgroup":"/sys/fs/cgroup/x","bpffs":"/sys/fs/bpf/kproxy","devices":[],"tc":"netlink","set_retval":false}"#;
        let Event::Attached(a) = serde_json::from_str(attached).unwrap() else { panic!("not attached") };
        assert_eq!((a.tc, a.set_retval), (TcAttachment::Netlink, false));

        let off = Event::SocketTermination(SocketTermination { status: SocketTerminationStatus::Unavailable, error: Some("no BTF".into()) });
        let line = serde_json::to_string(&off).unwrap();
        assert_eq!(line, r#"{"event":"socket_termination","status":"unavailable","error":"no BTF"}"#);
    }
}
