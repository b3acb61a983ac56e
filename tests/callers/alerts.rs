//! The alert rules shipped in deploy/ name only series the broker exports.

use crate::harness::*;

const COLLECTOR: &str = "spiffe://example.org/ns/logs/sa/collector";

/// The metric names the expressions of a Bicep file of Prometheus rule groups use.
fn metrics_in_rules(bicep: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in bicep.lines() {
        let Some(expr) = line.trim().strip_prefix("expression: ") else {
            continue;
        };
        let mut rest = expr;
        while let Some(at) = rest.find("tokenbroker_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_shipped_alert_rules_use_is_exported() {
    let bicep = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/azure/prometheus-rules.bicep"),
    )
    .unwrap();
    let used = metrics_in_rules(&bicep);
    assert!(used.len() >= 10, "{used:?}");
    // A broker with mutual TLS that has served a token: every series it has then exists.
    let h = Harness::start(Options {
        policy: grants(&[(COLLECTOR, "contoso", GRAPH)]),
        ..Default::default()
    })
    .await;
    let leaf = h.ca.client(&[COLLECTOR]);
    h.get(Some(&leaf), None, "contoso", &[GRAPH]).await.unwrap();
    let text = h.metrics().await;
    let exported: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = used
        .iter()
        .filter(|m| !exported.contains(&m.as_str()))
        .collect();
    assert!(missing.is_empty(), "not exported: {missing:?} in\n{text}");
    h.stop().await;
}
