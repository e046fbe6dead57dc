//! The agent's log output as kube-proxy operators read it (`kubectl logs`, a file, a log
//! shipper): plain text without ANSI escapes when stderr is not a terminal, JSON lines with
//! `--logging-format=json` or `logging.format: json` in `--config`. Runs the real binary with
//! stderr to a pipe; it stops at a device check before touching any kernel object, so no root
//! is needed.

use std::process::Command;

/// kubeadm's file with one field set that kproxy warns about (a tracing line before the exit).
fn config(dir: &std::path::Path, logging: &str) -> std::path::PathBuf {
    let kubeadm = include_str!("../../deploy/examples/kubeadm-kube-proxy-config.conf");
    let path = dir.join(format!("config-{}.conf", logging.len()));
    // `logging` may set the verbosity kubeadm spells out as 0.
    let kubeadm = if logging.contains("verbosity") { kubeadm.replace("  verbosity: 0\n", "") } else { kubeadm.to_string() };
    let text = kubeadm.replace("logging:\n  flushFrequency: 0\n", &format!("logging:\n  flushFrequency: 0\n{logging}"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `kproxy run` to its device check; returns what it logged to stderr before the error
/// that ends it (`Error: …`, printed by `main`, not a log record).
fn run(config: &std::path::Path, extra: &[&str]) -> String {
    let manifests = config.with_extension("d");
    std::fs::create_dir_all(&manifests).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kproxy"))
        .arg("run")
        .arg("--config")
        .arg(config)
        .arg("--manifests")
        .arg(&manifests)
        .args(["--cgroup", "/", "--devices", "kproxy-no-such-dev0", "--healthz-bind-address", "", "--metrics-bind-address", ""])
        .args(extra)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run kproxy");
    assert!(!out.status.success(), "kproxy run must stop at the missing device");
    let stderr = String::from_utf8(out.stderr).expect("UTF-8 logs");
    assert!(stderr.contains("Error: --devices: no network device"), "{stderr}");
    stderr[..stderr.find("Error:").unwrap()].to_string()
}

/// A directory of the test's own (tests run in parallel).
fn tempdir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kproxy-logging-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn logs_to_a_pipe_carry_no_ansi_escapes() {
    let dir = tempdir("ansi");
    let stderr = run(&config(&dir, ""), &[]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(stderr.contains("fields without a kproxy meaning"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "ANSI escape in logs to a pipe: {stderr:?}");
}

#[test]
fn json_logs_from_the_flag_or_the_config_file_are_one_object_per_line() {
    let dir = tempdir("json");
    let from_flag = run(&config(&dir, ""), &["--logging-format", "json"]);
    let from_file = run(&config(&dir, "  format: json\n"), &[]);
    let from_both = run(&config(&dir, "  format: json\n"), &["--logging-format", "text"]);
    let _ = std::fs::remove_dir_all(&dir);
    for stderr in [&from_flag, &from_file] {
        let records: Vec<serde_json::Value> = stderr
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}\n{stderr}")))
            .collect();
        let warning = records
            .iter()
            .find(|r| r["fields"]["message"].as_str().is_some_and(|m| m.contains("fields without a kproxy meaning")))
            .unwrap_or_else(|| panic!("no warning record in {stderr}"));
        assert_eq!(warning["level"], "WARN", "{warning}");
        assert!(warning["fields"]["config"].as_str().is_some_and(|c| c.ends_with(".conf")), "{warning}");
    }
    assert!(!from_both.trim_start().starts_with('{'), "the flag wins over the file: {from_both}");
    assert!(from_both.contains("fields without a kproxy meaning"), "{from_both}");
}

#[test]
fn verbosity_from_the_config_file_turns_debug_logs_on() {
    let dir = tempdir("verbosity");
    let quiet = run(&config(&dir, ""), &[]);
    let verbose = run(&config(&dir, "  format: json\n  verbosity: 5\n"), &[]);
    let flag = run(&config(&dir, "  verbosity: 5\n"), &["-v", "0"]);
    let _ = std::fs::remove_dir_all(&dir);
    let levels = |stderr: &str| -> Vec<String> {
        stderr.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).map(|r| r["level"].as_str().unwrap_or("").to_string()).collect()
    };
    assert!(!quiet.contains("DEBUG") && !quiet.contains("TRACE"), "{quiet}");
    assert!(levels(&verbose).iter().any(|l| l == "DEBUG" || l == "TRACE"), "verbosity 5 logs debug or trace records:\n{verbose}");
    assert!(!flag.contains("DEBUG") && !flag.contains("TRACE"), "-v 0 wins over the file:\n{flag}");
}
