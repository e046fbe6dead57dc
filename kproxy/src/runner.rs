//! A bounded-frequency runner, after kube-proxy's `BoundedFrequencyRunner`: runs are paced by a
//! token bucket that refills one token per `min_interval` and holds `BURST` tokens (kube-proxy
//! uses 2), so an isolated change is applied at once while a storm of changes coalesces into at
//! most one run per `min_interval`; a full run happens at least every `sync_period`; a failed
//! run is retried after `retry_interval`. Uses tokio's clock, so tests pause time.
//!
//! Between runs, each wake-up of the trigger is an [`Step::Intake`]: the job takes in what
//! arrived (the proxier applies the queued updates to its store) and says whether a run is
//! wanted, so an update that changes nothing costs no run.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{sync::Notify, time::Instant};

#[derive(Clone, Copy, Debug)]
pub struct RunnerConfig {
    pub min_interval: Duration,
    pub sync_period: Duration,
    pub retry_interval: Duration,
}

/// Why a run happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind {
    /// Something changed: apply the difference.
    Changed,
    /// Periodic, at start, or retry after a failure: re-read everything and repair drift.
    Full,
}

/// Runs that may happen back to back before `min_interval` pacing applies (kube-proxy's
/// `burstSyncs`).
pub const BURST: f64 = 2.0;

/// Token bucket: `BURST` tokens, one more every `min_interval`.
struct Bucket {
    tokens: f64,
    at: Instant,
    refill: Duration,
}

impl Bucket {
    fn level(&self, now: Instant) -> f64 {
        if self.refill.is_zero() {
            return BURST;
        }
        let refilled = now.saturating_duration_since(self.at).as_secs_f64() / self.refill.as_secs_f64();
        (self.tokens + refilled).min(BURST)
    }

    /// When the bucket next holds a whole token.
    fn ready_at(&self, now: Instant) -> Instant {
        let missing = 1.0 - self.level(now);
        if missing <= 0.0 { now } else { now + self.refill.mul_f64(missing) }
    }

    fn take(&mut self, now: Instant) {
        self.tokens = self.level(now) - 1.0;
        self.at = now;
    }
}

/// What the runner asks of its job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The trigger fired: take in what arrived; answer whether a run is wanted.
    Intake,
    /// Run; answer whether the run succeeded.
    Run(RunKind),
}

/// Runs `run` until `shutdown` completes, a run for every wake-up of `trigger` (paced). The
/// first run is a full one, at once. `run` returns whether it succeeded.
pub async fn run<F, S>(cfg: RunnerConfig, trigger: Arc<Notify>, shutdown: S, mut run: F)
where
    F: FnMut(RunKind) -> bool,
    S: Future<Output = ()>,
{
    run_steps(cfg, trigger, shutdown, move |step| match step {
        Step::Intake => true,
        Step::Run(kind) => run(kind),
    })
    .await
}

/// [`run`] with an intake: each wake-up of `trigger` is first a `job(Step::Intake)`, and only
/// one that answers true asks for a run.
pub async fn run_steps<F, S>(cfg: RunnerConfig, trigger: Arc<Notify>, shutdown: S, mut job: F)
where
    F: FnMut(Step) -> bool,
    S: Future<Output = ()>,
{
    tokio::pin!(shutdown);
    let mut pending: Option<RunKind> = Some(RunKind::Full);
    let mut bucket = Bucket { tokens: BURST, at: Instant::now(), refill: cfg.min_interval };
    // No run before this (set after a failure).
    let mut not_before = Instant::now();
    let mut next_full = Instant::now() + cfg.sync_period;
    loop {
        let now = Instant::now();
        if now >= next_full {
            pending = Some(RunKind::Full);
        }
        let wake = match pending {
            Some(_) => bucket.ready_at(now).max(not_before),
            None => next_full,
        };
        if pending.is_none() || wake > now {
            tokio::select! {
                biased;
                _ = &mut shutdown => return,
                _ = trigger.notified() => {
                    if job(Step::Intake) {
                        pending = Some(pending.unwrap_or(RunKind::Changed));
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
            continue;
        }
        let Some(kind) = pending.take() else { continue };
        bucket.take(now);
        if kind == RunKind::Full {
            next_full = now + cfg.sync_period;
        }
        if !job(Step::Run(kind)) {
            // Retry as a full run (the maps may be off), no sooner than retry_interval.
            not_before = Instant::now() + cfg.retry_interval;
            pending = Some(RunKind::Full);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    const CFG: RunnerConfig = RunnerConfig {
        min_interval: Duration::from_secs(1),
        sync_period: Duration::from_secs(30),
        retry_interval: Duration::from_secs(5),
    };

    /// Starts the runner; returns the trigger, a log of (time since start, kind), and a stop.
    fn start(
        fail_first: usize,
    ) -> (Arc<Notify>, Arc<Mutex<Vec<(Duration, RunKind)>>>, tokio::sync::oneshot::Sender<()>) {
        let trigger = Arc::new(Notify::new());
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let t0 = Instant::now();
        let (l, t) = (log.clone(), trigger.clone());
        let mut failures = fail_first;
        tokio::spawn(run(CFG, t, async move { let _ = stopped.await; }, move |kind| {
            l.lock().unwrap().push((t0.elapsed(), kind));
            if failures > 0 {
                failures -= 1;
                return false;
            }
            true
        }));
        (trigger, log, stop)
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[tokio::test(start_paused = true)]
    async fn first_run_is_immediate_and_full_then_bursts_coalesce() {
        let (trigger, log, _stop) = start(0);
        tokio::time::sleep(secs(5.0)).await;
        // A storm of 10 changes 100 ms apart: two runs at once (the burst), then one when the
        // bucket holds a token again, one second after the first.
        for _ in 0..10 {
            trigger.notify_one();
            tokio::time::sleep(secs(0.1)).await;
        }
        tokio::time::sleep(secs(3.0)).await;
        let log: Vec<_> = log.lock().unwrap().iter().map(|(t, k)| (t.as_millis(), *k)).collect();
        assert_eq!(
            log,
            vec![(0, RunKind::Full), (5000, RunKind::Changed), (5100, RunKind::Changed), (6000, RunKind::Changed)],
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_right_after_a_run_is_applied_at_once() {
        let (trigger, log, _stop) = start(0);
        tokio::time::sleep(secs(0.05)).await;
        trigger.notify_one();
        tokio::time::sleep(secs(0.01)).await;
        let times: Vec<_> = log.lock().unwrap().iter().map(|(t, _)| t.as_millis()).collect();
        assert_eq!(times, vec![0, 50]);
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_full_resync() {
        let (_trigger, log, _stop) = start(0);
        tokio::time::sleep(secs(61.0)).await;
        let kinds: Vec<_> = log.lock().unwrap().iter().map(|(t, k)| (t.as_secs(), *k)).collect();
        assert_eq!(kinds, vec![(0, RunKind::Full), (30, RunKind::Full), (60, RunKind::Full)]);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_retries_after_retry_interval() {
        let (_trigger, log, _stop) = start(2);
        tokio::time::sleep(secs(11.0)).await;
        let times: Vec<_> = log.lock().unwrap().iter().map(|(t, _)| t.as_secs()).collect();
        assert_eq!(times, vec![0, 5, 10]);
    }

    #[tokio::test(start_paused = true)]
    async fn only_an_intake_that_wants_a_run_causes_one() {
        let trigger = Arc::new(Notify::new());
        let log = Arc::new(Mutex::new(Vec::new()));
        let (l, t) = (log.clone(), trigger.clone());
        let t0 = Instant::now();
        let mut intakes = 0;
        tokio::spawn(run_steps(CFG, t, std::future::pending(), move |step| {
            l.lock().unwrap().push((t0.elapsed().as_millis(), step));
            if step == Step::Intake {
                intakes += 1;
                return intakes % 2 == 0; // every second one wants a run
            }
            true
        }));
        for _ in 0..4 {
            tokio::time::sleep(secs(2.0)).await;
            trigger.notify_one();
        }
        tokio::time::sleep(secs(0.5)).await;
        let (intake, run) = (Step::Intake, Step::Run(RunKind::Changed));
        assert_eq!(
            *log.lock().unwrap(),
            vec![(0, Step::Run(RunKind::Full)), (2000, intake), (4000, intake), (4000, run), (6000, intake), (8000, intake), (8000, run)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stops_on_shutdown() {
        let (trigger, log, stop) = start(0);
        tokio::time::sleep(secs(1.5)).await;
        stop.send(()).unwrap();
        tokio::time::sleep(secs(0.1)).await;
        trigger.notify_one();
        tokio::time::sleep(secs(60.0)).await;
        assert_eq!(log.lock().unwrap().len(), 1);
    }
}
