//! deploy/: the Kubernetes manifests pass the API's schemas (kubernetes-validate, strict: an
//! unknown field fails) and hold what deploy/README.md promises (hostNetwork, CAP_BPF and
//! CAP_NET_ADMIN and no CAP_SYS_ADMIN, bpffs, the units from the ConfigMap with a reloader,
//! probes on `holdfast status` and the metrics port, OnDelete); the Nomad job parses as HCL2
//! and is a `system` job with the same capabilities; the Containerfile copies binaries the
//! workspace builds. The validators come from PyPI, installed by `xtask bootstrap`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result};
use holdfast_testkit::{describe_output, require, run_bounded};
use serde_json::Value;

/// xtask bootstrap's TEST_VENV.
const VENV: &str = "/opt/holdfast-test-python";
const T: Duration = Duration::from_secs(120);

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn venv_tool(name: &str) -> Option<PathBuf> {
    let tool = Path::new(VENV).join("bin").join(name);
    let found = if tool.is_file() {
        Ok(tool)
    } else {
        Err(format!(
            "{} missing (cargo xtask bootstrap installs it)",
            tool.display()
        ))
    };
    require(&format!("{name} from PyPI"), found)
}

fn validate(tool: &Path, files: &[PathBuf]) -> Result<Output> {
    let mut cmd = Command::new(tool);
    cmd.arg("--strict").args(files);
    run_bounded(cmd, T)
}

/// `python -c SCRIPT ARGS` from the venv: its stdout as JSON.
fn python_json(script: &str, args: &[PathBuf]) -> Result<Value> {
    let mut cmd = Command::new(Path::new(VENV).join("bin/python"));
    cmd.arg("-c").arg(script).args(args);
    let out = run_bounded(cmd, T)?;
    assert!(out.status.success(), "{}", describe_output(&out));
    serde_json::from_slice(&out.stdout).context("the script's JSON")
}

#[test]
fn kubernetes_manifests_pass_the_schemas_and_say_what_the_readme_says() -> Result<()> {
    let Some(tool) = venv_tool("kubernetes-validate") else {
        return Ok(());
    };
    let dir = deploy().join("kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| p.extension().is_some_and(|x| x == "yaml"));
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    let out = validate(&tool, &files)?;
    assert!(out.status.success(), "{}", describe_output(&out));

    // The validator is strict: a misspelt field fails (so the pass above means something).
    let daemonset = dir.join("daemonset.yaml");
    let text = std::fs::read_to_string(&daemonset)?;
    assert!(text.contains("hostNetwork: true"));
    let bad = tempfile::tempdir()?;
    let bad_file = bad.path().join("daemonset.yaml");
    std::fs::write(
        &bad_file,
        text.replace("hostNetwork: true", "hostNetwrok: true"),
    )?;
    let out = validate(&tool, &[bad_file])?;
    assert!(
        !out.status.success(),
        "a misspelt field passed: {}",
        describe_output(&out)
    );

    let docs = python_json(
        "import json, sys, yaml\nprint(json.dumps([d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]))",
        &files,
    )?;
    let docs = docs.as_array().context("a list")?;
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .context("a DaemonSet")?;
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "OnDelete");
    let containers = pod["containers"].as_array().context("containers")?;
    let holdfast = &containers[0];
    let caps: Vec<&str> = holdfast["securityContext"]["capabilities"]["add"]
        .as_array()
        .context("capabilities")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        caps.contains(&"BPF") && caps.contains(&"NET_ADMIN"),
        "{caps:?}"
    );
    assert!(
        !caps.contains(&"SYS_ADMIN"),
        "not needed (deploy/README.md): {caps:?}"
    );
    assert_eq!(holdfast["securityContext"]["privileged"], false);
    let liveness = holdfast["livenessProbe"]["exec"]["command"].to_string();
    assert!(liveness.contains("\"status\""), "{liveness}");
    assert_eq!(holdfast["readinessProbe"]["httpGet"]["path"], "/metrics");
    let args = holdfast["args"].to_string();
    assert!(
        args.contains("--metrics-listen") && args.contains("9464"),
        "{args}"
    );
    let mounts = holdfast["volumeMounts"].to_string();
    assert!(
        mounts.contains("/sys/fs/bpf") && mounts.contains("/etc/holdfast/units"),
        "{mounts}"
    );
    let volumes = pod["volumes"].to_string();
    assert!(
        volumes.contains("holdfast-units"),
        "units from the ConfigMap: {volumes}"
    );
    let reloader = containers
        .iter()
        .find(|c| c["name"] == "reloader")
        .context("a reloader container")?;
    assert!(reloader["args"].to_string().contains("holdfast reload"));

    // The ConfigMap's units are valid holdfast units (hello-http found on PATH, as in the
    // image's /usr/local/bin and the workspace's target/debug).
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .context("a ConfigMap")?;
    let units = tempfile::tempdir()?;
    for (name, text) in cm["data"].as_object().context("data")? {
        std::fs::write(units.path().join(name), text.as_str().unwrap_or_default())?;
    }
    let debug = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug");
    let path = std::env::join_paths(std::iter::once(debug).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;
    let mut cmd = Command::new(holdfast_testkit::holdfast_bin());
    cmd.arg("check").arg(units.path()).env("PATH", path);
    let check = run_bounded(cmd, T)?;
    assert!(check.status.success(), "{}", describe_output(&check));
    Ok(())
}

#[test]
fn nomad_job_is_a_system_job_with_the_same_capabilities() -> Result<()> {
    if venv_tool("python").is_none() {
        return Ok(());
    }
    let job = deploy().join("nomad/holdfast.nomad.hcl");
    // python-hcl2 keeps the quotes of strings: strip them for the comparisons.
    let parsed = python_json(
        "import hcl2, json, sys\nprint(json.dumps(hcl2.load(open(sys.argv[1]))).replace('\\\\\"', ''))",
        &[job],
    )?;
    let job = &parsed["job"][0]["holdfast"];
    assert_eq!(job["type"], "system", "{parsed}");
    let task = &job["group"][0]["holdfast"]["task"][0]["holdfast"];
    let config = &task["config"][0];
    assert_eq!(config["network_mode"], "host");
    let caps = config["cap_add"].to_string();
    assert!(caps.contains("bpf") && caps.contains("net_admin"), "{caps}");
    assert!(!caps.contains("sys_admin"), "{caps}");
    assert!(config["mount"].to_string().contains("/sys/fs/bpf"));
    let template = task["template"][0].to_string();
    assert!(
        template.contains("reload"),
        "units reloaded on change: {template}"
    );
    Ok(())
}

#[test]
fn containerfile_copies_binaries_the_workspace_builds() -> Result<()> {
    let text = std::fs::read_to_string(deploy().join("Containerfile"))?;
    let copied: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        copied,
        ["target/release/holdfast", "target/release/hello-http"]
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (bin, manifest) in [
        ("holdfast", "supervisor/Cargo.toml"),
        ("hello-http", "examples/hello-http/Cargo.toml"),
    ] {
        let m = std::fs::read_to_string(root.join(manifest))?;
        assert!(
            m.contains(&format!("name = \"{bin}\"")),
            "{manifest} builds {bin}"
        );
    }
    Ok(())
}
