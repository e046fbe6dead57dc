//! When a changed manifest path is complete enough to read.
//!
//! A file rewritten in place (`kubectl get -o yaml > file`, `echo … > file`) is empty, then
//! half-written, for as long as its writer takes; reading it then would take its Services down
//! and end their established connections. So a path the watcher reports is read only once it
//! has been quiet for the settle time after its writer closed it (`IN_CLOSE_WRITE`) or after it
//! was renamed into place (editors and `kubectl`/kubelet's atomic writes); a path still open for
//! writing waits until it has been quiet for [`WRITER_QUIET`] (a writer that never closes).
//!
//! A failed read (`EMFILE`, say) is retried: the path is ready at the next read whatever the
//! time, and [`Settle::next_ready`] asks for one after a back-off.
//!
//! Pure bookkeeping with the time passed in, so it is tested without sleeping; the manifest
//! watcher's timer thread turns [`Settle::next_ready`] into a sync.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// How long a path that is still open for writing must be quiet before it is read anyway.
pub const WRITER_QUIET: Duration = Duration::from_secs(10);

/// What an event says about a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Its content was written (or truncated): a writer has it open.
    Writing,
    /// A writer closed it, or it was renamed into place, or removed: what is there is complete.
    Done,
    /// Created, its metadata changed, or something unspecified: it settles like any change, and
    /// an open writer stays open.
    Touched,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    /// Read no sooner (unless `retry`).
    ready_at: Instant,
    writing: bool,
    /// A read of it failed: the next read takes it whatever the time; `ready_at` is only
    /// when a read is asked for.
    retry: bool,
}

impl Pending {
    fn ready(&self, now: Instant) -> bool {
        self.retry || now >= self.ready_at
    }
}

/// The changed paths that were not read yet, and when each may be.
#[derive(Debug)]
pub struct Settle {
    settle: Duration,
    pending: BTreeMap<PathBuf, Pending>,
}

impl Settle {
    pub fn new(settle: Duration) -> Self {
        Self { settle, pending: BTreeMap::new() }
    }

    pub fn settle_time(&self) -> Duration {
        self.settle
    }

    /// Records a change of `path` seen at `now`: it is ready once quiet for the settle time
    /// (for [`WRITER_QUIET`] while a writer has it open); returns when that is.
    pub fn record(&mut self, path: &Path, change: Change, now: Instant) -> Instant {
        let was_writing = self.pending.get(path).is_some_and(|p| p.writing);
        let writing = match change {
            Change::Writing => true,
            Change::Done => false,
            Change::Touched => was_writing,
        };
        let quiet = if writing { WRITER_QUIET } else { self.settle };
        let ready_at = now + quiet;
        self.pending.insert(path.to_path_buf(), Pending { ready_at, writing, retry: false });
        ready_at
    }

    /// Makes `path` ready at `at` unless it is pending already (a file found changed by a
    /// directory walk while it was still being written: `at` is its change time plus the
    /// settle time).
    pub fn defer(&mut self, path: &Path, at: Instant) {
        self.pending.entry(path.to_path_buf()).or_insert(Pending { ready_at: at, writing: false, retry: false });
    }

    /// A read of `path` failed: the next read takes it again, and one is asked for at `at`.
    /// A change recorded since the read (or later) settles first, as any change does.
    pub fn retry(&mut self, path: &Path, at: Instant) {
        self.pending.entry(path.to_path_buf()).or_insert(Pending { ready_at: at, writing: false, retry: true });
    }

    /// Whether `path` waits (not ready at `now`).
    pub fn waits(&self, path: &Path, now: Instant) -> bool {
        self.pending.get(path).is_some_and(|p| !p.ready(now))
    }

    /// Removes and returns the paths ready at `now`, in path order.
    pub fn take_ready(&mut self, now: Instant) -> Vec<PathBuf> {
        let ready: Vec<PathBuf> = self.pending.iter().filter(|(_, p)| p.ready(now)).map(|(k, _)| k.clone()).collect();
        for path in &ready {
            self.pending.remove(path);
        }
        ready
    }

    /// When a read should next happen for a pending path (maybe in the past), `None` when
    /// nothing is pending.
    pub fn next_ready(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.ready_at).min()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_millis(500);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_file_rewritten_in_place_is_ready_only_after_its_writer_closed_it_and_it_settled() {
        let t0 = Instant::now();
        let f = Path::new("/m/services.yaml");
        let mut s = Settle::new(SETTLE);
        // Truncated, then written in chunks 300 ms apart (longer gaps than the settle time
        // would not matter: the writer still has it open).
        for i in 0..5 {
            s.record(f, Change::Writing, t0 + ms(300 * i));
            assert!(s.take_ready(t0 + ms(300 * i + 299)).is_empty());
        }
        assert!(s.take_ready(t0 + ms(1200 + 2000)).is_empty(), "still open for writing");
        s.record(f, Change::Done, t0 + ms(1300));
        assert!(s.take_ready(t0 + ms(1799)).is_empty());
        assert_eq!(s.next_ready(), Some(t0 + ms(1800)));
        assert_eq!(s.take_ready(t0 + ms(1800)), [f]);
        assert!(s.is_empty());
    }

    #[test]
    fn a_writer_that_never_closes_is_read_after_the_writer_quiet_time() {
        let t0 = Instant::now();
        let f = Path::new("/m/a.yaml");
        let mut s = Settle::new(SETTLE);
        s.record(f, Change::Writing, t0);
        s.record(f, Change::Touched, t0 + ms(10)); // chmod: still open
        assert!(s.take_ready(t0 + WRITER_QUIET).is_empty());
        assert_eq!(s.take_ready(t0 + ms(10) + WRITER_QUIET), [f]);
    }

    #[test]
    fn a_rename_into_place_settles_and_so_does_a_file_appended_to_in_steps() {
        let t0 = Instant::now();
        let (a, b) = (Path::new("/m/a.yaml"), Path::new("/m/b.yaml"));
        let mut s = Settle::new(SETTLE);
        s.record(a, Change::Done, t0);
        // `truncate -s0 b; cat x >> b; cat y >> b`: closed between appends, read once quiet.
        s.record(b, Change::Writing, t0);
        s.record(b, Change::Done, t0 + ms(1));
        s.record(b, Change::Writing, t0 + ms(100));
        s.record(b, Change::Done, t0 + ms(101));
        assert_eq!(s.take_ready(t0 + ms(500)), [a]);
        assert!(s.take_ready(t0 + ms(600)).is_empty());
        assert_eq!(s.take_ready(t0 + ms(601)), [b]);
    }

    #[test]
    fn a_failed_read_is_taken_by_the_next_read_and_asks_for_one() {
        let t0 = Instant::now();
        let f = Path::new("/m/a.yaml");
        let mut s = Settle::new(SETTLE);
        s.retry(f, t0 + ms(1000));
        assert_eq!(s.next_ready(), Some(t0 + ms(1000)));
        assert!(!s.waits(f, t0));
        assert_eq!(s.take_ready(t0), [f], "any read takes it again");
        // A new version written meanwhile settles first.
        s.retry(f, t0 + ms(1000));
        s.record(f, Change::Writing, t0 + ms(10));
        assert!(s.waits(f, t0 + ms(20)));
        // A change seen between a read and its failure: the retry does not cut its settling.
        let g = Path::new("/m/b.yaml");
        s.record(g, Change::Done, t0 + ms(30));
        s.retry(g, t0 + ms(31));
        assert!(s.waits(g, t0 + ms(40)));
        assert_eq!(s.take_ready(t0 + ms(530)), [g]);
    }

    #[test]
    fn a_deferred_file_keeps_a_pending_change() {
        let t0 = Instant::now();
        let f = Path::new("/m/a.yaml");
        let mut s = Settle::new(SETTLE);
        s.record(f, Change::Writing, t0);
        s.defer(f, t0 + ms(1));
        assert!(s.waits(f, t0 + ms(600)));
        let g = Path::new("/m/b.yaml");
        s.defer(g, t0 + ms(200));
        assert_eq!(s.take_ready(t0 + ms(200)), [g]);
    }
}
