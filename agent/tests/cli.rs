//! The `edgewise-agent` binary's `check` command: exit codes and messages a person can act on.

mod common;

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgewise-agent"))
}

fn check(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).unwrap();
    common::run_check(&path)
}

#[test]
fn the_example_config_passes_check() {
    let out = agent().arg("example-config").output().unwrap();
    assert!(out.status.success());
    let (code, text) = check(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(": ok"), "{text}");
}

#[test]
fn every_problem_is_listed_with_its_key_and_exit_code_is_1() {
    let (code, text) = check(
        "agent_id = \"\"\n[window]\nwindow_seconds = 0\n[sync]\nurl = \"ftp://x\"\nbatch_max_summaries = 0\n",
    );
    assert_eq!(code, 1, "{text}");
    for key in [
        "agent_id",
        "window.window_seconds",
        "sync.url",
        "sync.batch_max_summaries",
    ] {
        assert!(
            text.contains(&format!("- {key}:")),
            "{key} missing in:\n{text}"
        );
    }
    assert!(text.contains("4 problem(s)"), "{text}");
}

#[test]
fn syntax_errors_and_unknown_keys_name_the_place() {
    let (code, text) = check("agent_id = \"a\"\n[mqtt]\nurl = \"mqtt://x\"\nport = 1\n");
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("port"), "{text}");
    let (code, text) = check("agent_id = \n");
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("line 1"), "{text}");
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let out = agent()
        .args(["check", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cannot read /nonexistent/agent.toml"));
}

#[test]
fn run_refuses_an_invalid_config_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "agent_id = \"x\"\n[window]\nwindow_seconds = 0\n").unwrap();
    let out = agent()
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("window.window_seconds"));
}

#[test]
fn check_loads_the_configured_model_and_names_a_missing_one() {
    let (code, text) =
        check("agent_id = \"a\"\n[inference]\nmodel_path = \"/nonexistent/anomaly.onnx\"\n");
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("- inference.model_path:"), "{text}");
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/anomaly/anomaly.onnx"
    );
    let (code, text) = check(&format!(
        "agent_id = \"a\"\n[inference]\nmodel_path = \"{model}\"\n"
    ));
    assert_eq!(code, 0, "{text}");
}
