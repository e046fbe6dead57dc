//! The agent's event file (`kproxy run --event-file PATH`): one JSON [`Event`] per line, typed
//! in kproxy-api, so that tools never parse the human log. [`EventReader`] follows the file as
//! the agent appends to it.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use kproxy_api::event::{
    Attached, Event, SocketTermination, SocketTerminationStatus, Synced, TcAttachment, EVENT_FILE_FLAG,
};

/// Every event in `path` so far; none while the file does not exist.
pub fn read(path: &Path) -> Result<Vec<Event>> {
    EventReader::new(path).read_new()
}

/// Reads an event file incrementally: each [`EventReader::read_new`] returns the events whose
/// lines were completed since the previous call (a line still being written waits for the next).
#[derive(Debug)]
pub struct EventReader {
    path: PathBuf,
    offset: u64,
    pending: String,
}

impl EventReader {
    pub fn new(path: &Path) -> EventReader {
        EventReader {
            path: path.to_path_buf(),
            offset: 0,
            pending: String::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The events appended since the last call; fails on a line that is not an event.
    pub fn read_new(&mut self) -> Result<Vec<Event>> {
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("opening {}", self.path.display())),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let read = file
            .read_to_string(&mut self.pending)
            .with_context(|| format!("reading {}", self.path.display()))?;
        self.offset += read as u64;
        let mut events = Vec::new();
        while let Some(end) = self.pending.find('\n') {
            let line: String = self.pending.drain(..=end).collect();
            let event = serde_json::from_str(line.trim()).with_context(|| {
                format!("{}: not a kproxy event: {line:?}", self.path.display())
            })?;
            events.push(event);
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn follows_whole_lines_as_they_are_appended() {
        let path = std::env::temp_dir().join(crate::topology::unique_name("kproxy-events"));
        let mut reader = EventReader::new(&path);
        assert!(reader.read_new().unwrap().is_empty(), "no file yet");
        let mut file = File::create(&path).unwrap();
        let synced = r#"{"event":"synced","full":true,"frontends":3,"changed_frontends":3,"writes":12,"sync_ms":0.25,"total_ms":1.5}"#;
        let (head, tail) = synced.split_at(20);
        write!(file, "{{\"event\":\"socket_termination\",\"status\":\"off\"}}\n{head}").unwrap();
        let first = reader.read_new().unwrap();
        assert_eq!(
            first,
            [Event::SocketTermination(SocketTermination { status: SocketTerminationStatus::Off, error: None })]
        );
        writeln!(file, "{tail}").unwrap();
        let Event::Synced(s) = &reader.read_new().unwrap()[0] else { panic!("not a sync") };
        assert!(s.full);
        assert_eq!((s.frontends, s.changed_frontends, s.writes), (3, 3, 12));
        assert!((s.sync_ms - 0.25).abs() < 1e-9 && (s.total_ms - 1.5).abs() < 1e-9);
        assert!(reader.read_new().unwrap().is_empty());
        assert_eq!(read(&path).unwrap().len(), 2);
        writeln!(file, "INFO kproxy: watching manifests").unwrap();
        assert!(reader.read_new().is_err(), "a line that is no event is an error");
        std::fs::remove_file(&path).unwrap();
    }
}
