//! `cargo xtask bench --compare REV` (issue 19): the same run with the kproxy binary of another
//! commit, rendered side by side with the current one. Each run's kproxy figures are paired with
//! no proxy in its own rounds (so that the machine's state in each run cancels), and the current
//! build's median per-round ratio is divided by the other's, with an interval from resampling
//! both.

use std::fmt::Write as _;

use super::env::{Access, Mode};
use super::load::Workload;
use super::results::{paired, Point, Results};
use super::stats::{self, ratio_of_medians_interval, Interval, SEED};

/// The per-round kproxy / no proxy ratios of `metric` at `p`.
fn vs_none(p: &Point, access: Access, workload: Workload, target: &str, metric: fn(&super::results::Sample) -> f64) -> Vec<f64> {
    let t = if p.services == 1 { "first" } else { target };
    paired(&p.samples, access, workload, (Mode::Kproxy, t), (Mode::None, "pod"), metric).ratios
}

/// What an interval of now ÷ before says: higher, lower, or no resolved difference.
fn change(i: &Interval, higher_is_better: bool) -> &'static str {
    if !i.is_finite() {
        "–"
    } else if i.lo > 1.0 {
        if higher_is_better { "higher (better)" } else { "higher (worse)" }
    } else if i.hi < 1.0 {
        if higher_is_better { "lower (worse)" } else { "lower (better)" }
    } else {
        "no resolved difference"
    }
}

/// The comparison page: `other` was measured with the kproxy of `rev`, `current` with this
/// checkout's.
pub fn render(other: &Results, current: &Results, rev: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# kproxy {} against {rev}\n", current.machine.kproxy_commit);
    let _ = writeln!(
        md,
        "Two runs of `{}` on {}: first with the kproxy of {rev} (load average {} → {}), then with \
         this checkout's (load average {} → {}); the clients, servers and kube-proxy rulesets are \
         the same. Each figure below is the current build's median per-round ratio to no proxy \
         divided by {rev}'s, with a bootstrap 95 % interval from resampling both runs' rounds: \
         above 1 means a higher rate (or more CPU per request) now.\n",
        current.settings.command,
        current.machine.date,
        other.machine.load_start,
        other.machine.load_end,
        current.machine.load_start,
        current.machine.load_end
    );
    md.push_str("| N | access | workload | service | rate: kproxy / no proxy, now ÷ before | | CPU per request: kproxy / no proxy, now ÷ before | |\n");
    md.push_str("| ---: | --- | --- | --- | ---: | --- | ---: | --- |\n");
    for p in &current.points {
        let Some(q) = other.points.iter().find(|q| q.services == p.services) else { continue };
        for access in Access::ALL {
            for workload in Workload::ALL {
                for t in ["first", "last"] {
                    if p.services == 1 && t == "last" {
                        continue;
                    }
                    let rate = ratio_of_medians_interval(
                        &vs_none(p, access, workload, t, |s| s.wrk.rate),
                        &vs_none(q, access, workload, t, |s| s.wrk.rate),
                        SEED,
                    );
                    let cpu = ratio_of_medians_interval(
                        &vs_none(p, access, workload, t, |s| s.cpu_per_request()),
                        &vs_none(q, access, workload, t, |s| s.cpu_per_request()),
                        SEED,
                    );
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {t} | {} | {} | {} | {} |",
                        p.services,
                        access.name(),
                        workload.name(),
                        rate.show(3),
                        change(&rate, true),
                        cpu.show(3),
                        change(&cpu, false)
                    );
                }
            }
        }
    }
    md.push_str("\n## Control plane and memory (single measurements)\n\n");
    let _ = writeln!(md, "| N | programming from an apiserver, ms: {rev} / now | endpoint change, ms (median): {rev} / now | agent peak RSS, MiB: {rev} / now | BPF map memory, MiB: {rev} / now |");
    md.push_str("| ---: | ---: | ---: | ---: | ---: |\n");
    for p in &current.points {
        let Some(q) = other.points.iter().find(|q| q.services == p.services) else { continue };
        let api = |x: &Point| x.control.kproxy_api_start_ms.map_or("–".into(), |v| format!("{v:.0}"));
        let change_ms = |x: &Point| format!("{:.1}", stats::median(&x.control.change.kproxy_e2e_ms));
        let peak = |x: &Point| format!("{:.1}", x.footprint.agent_end.hwm_kib.max(x.footprint.agent.hwm_kib) as f64 / 1024.0);
        let maps = |x: &Point| format!("{:.1}", x.footprint.map_memlock_bytes as f64 / 1024.0 / 1024.0);
        let _ = writeln!(
            md,
            "| {} | {} / {} | {} / {} | {} / {} | {} / {} |",
            p.services,
            api(q),
            api(p),
            change_ms(q),
            change_ms(p),
            peak(q),
            peak(p),
            maps(q),
            maps(p)
        );
    }
    md.push('\n');
    md
}
