//! What can be checked of the shipped deployment files without a Docker engine:
//! the ferry configs in deploy/ pass `ferry check`, deploy/prometheus.yml passes
//! `promtool check config`, the compose and stack files parse as YAML and hold
//! together (services, replicas, rolling-update settings, mounted files that
//! exist), the Dockerfile has the shape the README promises, and `ferry health`
//! — the image's HEALTHCHECK — tells a serving ferry from a stopped one.
//!
//! Needs `promtool` (Debian `prometheus`) and Python's yaml module (Debian
//! `python3-yaml`); a test that cannot find one fails rather than skipping.
mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A YAML file as JSON, through Python's yaml module.
fn yaml(rel: &str) -> Value {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(repo(rel))
        .output()
        .expect("python3 installed (apt-get install -y python3 python3-yaml)");
    assert!(
        out.status.success(),
        "{rel} is not valid YAML (or python3-yaml is missing): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from python")
}

#[test]
fn deploy_configs_pass_ferry_check() {
    for rel in ["deploy/ferry.toml", "deploy/swarm-ferry.toml"] {
        let out = Command::new(bin())
            .args(["check", "--config"])
            .arg(repo(rel))
            .output()
            .expect("run ferry check");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{rel}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("resolver  127.0.0.11:53"), "{stdout}");
        assert!(stdout.contains("resolve"), "{stdout}");
    }
}

#[test]
fn deploy_prometheus_config_passes_promtool() {
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(repo("deploy/prometheus.yml"))
        .output()
        .expect("promtool installed (apt-get install -y prometheus)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let prom = yaml("deploy/prometheus.yml");
    assert_eq!(
        prom["scrape_configs"][0]["static_configs"][0]["targets"][0],
        "ferry:9180"
    );
}

#[test]
fn compose_file_holds_together() {
    let c = yaml("deploy/docker-compose.yml");
    let s = &c["services"];
    for name in ["ferry", "app", "prometheus", "grafana"] {
        assert!(s[name].is_object(), "no service {name}: {c}");
    }
    assert_eq!(s["app"]["deploy"]["replicas"], 3);
    assert_eq!(s["ferry"]["build"]["context"], "..");
    // Every bind-mounted file or folder exists, relative to deploy/.
    let mut mounts = 0;
    for svc in s.as_object().expect("services").values() {
        for v in svc["volumes"].as_array().into_iter().flatten() {
            let v = v.as_str().expect("short volume syntax");
            let (src, rest) = v.split_once(':').expect("src:target");
            assert!(src.starts_with('.'), "{v}");
            assert!(
                repo("deploy").join(src).exists(),
                "{v}: {src} does not exist"
            );
            assert!(rest.ends_with(":ro"), "{v} should be read-only");
            mounts += 1;
        }
    }
    assert_eq!(mounts, 4);
    // ferry's config in the container is deploy/ferry.toml; Prometheus scrapes
    // the admin port ferry listens on; Grafana's provider reads the folder the
    // dashboard is mounted into.
    let ferry_vols = s["ferry"]["volumes"].to_string();
    assert!(
        ferry_vols.contains("./ferry.toml:/etc/ferry/ferry.toml:ro"),
        "{ferry_vols}"
    );
    let toml = std::fs::read_to_string(repo("deploy/ferry.toml")).expect("read");
    assert!(toml.contains("listen = \"0.0.0.0:9180\""));
    assert!(toml.contains("addr = \"app:80\"") && toml.contains("resolve = true"));
    let provider = yaml("deploy/grafana/provisioning/dashboards/ferry.yml");
    let folder = provider["providers"][0]["options"]["path"]
        .as_str()
        .expect("provider path")
        .to_owned();
    assert!(
        s["grafana"]["volumes"]
            .to_string()
            .contains(&format!("{folder}/ferry-dashboard.json")),
        "the dashboard is not mounted where the provider looks ({folder})"
    );
    let ds = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(ds["datasources"][0]["type"], "prometheus");
    assert_eq!(ds["datasources"][0]["url"], "http://prometheus:9090");
    assert_eq!(ds["datasources"][0]["isDefault"], true);
}

#[test]
fn swarm_stack_holds_together() {
    let c = yaml("deploy/swarm-stack.yml");
    let s = &c["services"];
    for name in ["ferry", "app"] {
        let u = &s[name]["deploy"]["update_config"];
        assert_eq!(u["parallelism"], 1, "{name}: {u}");
        assert_eq!(u["order"], "start-first", "{name}: {u}");
    }
    assert_eq!(s["app"]["deploy"]["replicas"], 3);
    assert_eq!(s["ferry"]["ports"][0]["mode"], "ingress");
    assert_eq!(s["ferry"]["configs"][0]["target"], "/etc/ferry/ferry.toml");
    let file = c["configs"]["ferry_toml"]["file"]
        .as_str()
        .expect("config file");
    assert!(repo("deploy").join(file).is_file(), "{file}");
    let toml = std::fs::read_to_string(repo("deploy").join(file)).expect("read");
    assert!(toml.contains("addr = \"tasks.app:80\"") && toml.contains("resolve = true"));
    // The grace period outlasts ferry's shutdown_timeout.
    assert!(toml.contains("shutdown_timeout = \"20s\""));
    assert_eq!(s["ferry"]["stop_grace_period"], "30s");
}

#[test]
fn dockerfile_has_the_promised_shape() {
    let d = std::fs::read_to_string(repo("Dockerfile")).expect("Dockerfile");
    let lines: Vec<&str> = d
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let froms: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "multi-stage: {froms:?}");
    assert!(froms[0].contains(" AS build"), "{froms:?}");
    assert!(froms[1].contains("debian:bookworm-slim"), "{froms:?}");
    assert!(lines.contains(&"USER ferry:ferry"), "non-root");
    assert!(
        lines.contains(&"ENTRYPOINT [\"ferry\"]"),
        "exec form: ferry is PID 1"
    );
    assert!(lines.contains(&"CMD [\"--config\", \"/etc/ferry/ferry.toml\"]"));
    assert!(lines.contains(&"STOPSIGNAL SIGTERM"));
    assert!(
        d.contains("CMD [\"ferry\", \"health\", \"--config\", \"/etc/ferry/ferry.toml\"]"),
        "HEALTHCHECK runs `ferry health`"
    );
    // Everything COPY takes from the build context exists.
    for l in &lines {
        if let Some(rest) = l.strip_prefix("COPY ")
            && !rest.starts_with("--from")
        {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            for src in &parts[..parts.len() - 1] {
                assert!(repo(src).exists(), "COPY {src}: not in the repository");
            }
        }
    }
}

#[test]
fn ferry_health_tells_a_serving_ferry_from_a_stopped_one() {
    let b = Backends::start(1);
    let admin = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let cfg = config("", &b.servers("")).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"{admin}\""),
    );
    let mut f = Ferry::start(&cfg);
    let health = |path: &Path| {
        Command::new(bin())
            .args(["health", "--config"])
            .arg(path)
            .output()
            .expect("run ferry health")
    };
    let out = health(&f.config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("http://{admin}/healthz answered 200")),
        "{stdout}"
    );

    f.signal("TERM");
    assert_eq!(f.wait_exit(DEADLINE), Some(0));
    let out = health(&f.config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("unhealthy") && stderr.contains(&admin.to_string()),
        "{stderr}"
    );

    // A config without an admin listener cannot be asked.
    let off = f.dir.path().join("off.toml");
    std::fs::write(
        &off,
        cfg.replace(&format!("listen = \"{admin}\""), "listen = \"off\""),
    )
    .expect("write");
    let out = health(&off);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin listener"));
}
