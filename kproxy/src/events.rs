//! `kproxy run --event-file PATH` (hidden): the agent's events ([`kproxy_api::event`]: programs
//! attached, stale-socket termination available or not, each sync) as JSON lines appended to
//! PATH, for the tools that would otherwise parse the human log (kproxy-e2e's harness and VM
//! checks, the benchmark). Each line is written with one `write` to a file opened for appending,
//! so a reader sees whole lines as soon as they are written. Best effort: a failed write is
//! logged once and never stops the agent.

use std::{
    fs::File,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use kproxy_api::event::Event;

/// Where events go: the event file, or nowhere.
#[derive(Debug, Default)]
pub struct Events {
    file: Option<(PathBuf, File)>,
    warned: bool,
}

impl Events {
    /// No event file: [`Events::emit`] does nothing.
    pub fn none() -> Events {
        Events::default()
    }

    /// Appends to `path`, created if missing (a restarted agent appends to its predecessor's).
    pub fn open(path: &Path) -> Result<Events> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("open the event file {}", path.display()))?;
        Ok(Events { file: Some((path.to_path_buf(), file)), warned: false })
    }

    /// Appends `event` as one line.
    pub fn emit(&mut self, event: &Event) {
        let Some((path, file)) = &mut self.file else { return };
        let written = serde_json::to_vec(event)
            .map_err(std::io::Error::from)
            .and_then(|mut line| {
                line.push(b'\n');
                file.write_all(&line)
            });
        if let Err(e) = written {
            if !std::mem::replace(&mut self.warned, true) {
                tracing::warn!("writing the event file {}: {e} (further failures are not logged)", path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use kproxy_api::event::{Synced, SocketTermination, SocketTerminationStatus};

    use super::*;

    #[test]
    fn appends_one_json_line_per_event() {
        let path = std::env::temp_dir().join(format!("kproxy-events-test-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let events = [
            Event::SocketTermination(SocketTermination { status: SocketTerminationStatus::Off, error: None }),
            Event::Synced(Synced { full: true, frontends: 2, changed_frontends: 2, writes: 7, sync_ms: 0.5, total_ms: 1.0 }),
        ];
        Events::open(&path).unwrap().emit(&events[0]);
        // A second agent appends.
        Events::open(&path).unwrap().emit(&events[1]);
        Events::none().emit(&events[1]);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let read: Vec<Event> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(read, events);
        assert!(text.ends_with('\n'));
    }
}
