//! The operations files: `conf/prometheus/alerts.yml` (checked and unit-tested with promtool,
//! see `alerts_test.yml`) and the Grafana dashboard `conf/grafana/cascade.json`.
//!
//! Both may refer only to metric families cascade exports
//! (`cascade::metrics::METRICS.family_names()`): a renamed or dropped series breaks this test,
//! not a dashboard in production. promtool comes with the Debian `prometheus` package, which
//! `scripts/deps.sh` installs; without it these tests fail (they do not skip).

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

use cascade::metrics::METRICS;
use prometheus::core::Collector;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

const ALERTS: &str = "conf/prometheus/alerts.yml";
const ALERTS_TEST: &str = "conf/prometheus/alerts_test.yml";
const DASHBOARD: &str = "conf/grafana/cascade.json";

/// Every alert alerts.yml must define.
const REQUIRED_ALERTS: &[&str] = &[
    "CascadeBucketNearlyFull",
    "CascadeBucketSetFull",
    "CascadeBucketCooldown",
    "CascadeUploadSuccessRateLow",
    "CascadeRedisDown",
    "CascadeHighErrorRatio",
    "CascadeFallbackRatioSpike",
    "CascadePeerDown",
    "CascadeOriginDown",
    "CascadeCacheHitRatioDrop",
    "CascadePluginTraps",
    "CascadeConnectionsRefused",
    "CascadeConnectionsNearLimit",
];

/// Families the dashboard must query (in a panel's `expr`), so dropping a panel fails.
const DASHBOARD_FAMILIES: &[&str] = &[
    "cascade_requests_total",
    "cascade_request_duration_seconds",
    "cascade_upstream_duration_seconds",
    "cascade_cache_requests_total",
    "cascade_fallback_replays_total",
    "cascade_retries_total",
    "cascade_failovers_total",
    "cascade_upstream_connections_total",
    "cascade_client_send_timeouts_total",
    "cascade_client_connections",
    "cascade_client_connections_max",
    "cascade_client_connections_over_limit_total",
    "cascade_peer_up",
    "cascade_peer_in_flight",
    "cascade_peer_ejections_total",
    "cascade_bucket_used_bytes",
    "cascade_bucket_capacity_bytes",
    "cascade_bucket_objects",
    "cascade_bucket_reserved_bytes",
    "cascade_uploads_total",
    "cascade_upload_bytes_total",
    "cascade_redis_up",
    "cascade_redis_errors_total",
    "cascade_plugin_duration_seconds",
    "cascade_plugin_traps_total",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs promtool in the crate root and returns its output; fails the test (with promtool's
/// output) on a non-zero exit, and with set-up instructions when promtool is not installed.
fn promtool(args: &[&str]) -> String {
    let out = match Command::new("promtool")
        .args(args)
        .current_dir(root())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "promtool is not installed: run scripts/deps.sh (it installs the Debian `prometheus` \
             package, which ships promtool) to run these tests"
        ),
        Err(e) => panic!("promtool {}: {e}", args.join(" ")),
    };
    let text = format!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n{text}",
        args.join(" "),
        out.status
    );
    text
}

/// Families cascade exports.
fn families() -> BTreeSet<String> {
    METRICS.family_names().into_iter().collect()
}

/// The histogram families: their series carry the `_bucket`, `_sum` and `_count` suffixes.
/// Listed by field so that the type system vouches for each; a new histogram missing here
/// makes the name checks fail (its `_bucket` series is not a family), never pass silently.
fn histogram_families() -> BTreeSet<String> {
    let families: [&dyn Collector; 5] = [
        &METRICS.request_duration,
        &METRICS.upstream_duration,
        &METRICS.plugin_histogram,
        &METRICS.plugin_duration,
        &METRICS.plugin_http_call_duration,
    ];
    families
        .into_iter()
        .flat_map(|h| h.desc().into_iter().map(|d| d.fq_name.clone()))
        .collect()
}

/// Every `cascade_*` identifier in `text` (PromQL, or any prose), as the family it belongs to:
/// `x_bucket`, `x_sum` and `x_count` become `x` only when `x` is a histogram family.
/// Quoted strings are scanned too (`{__name__="cascade_..."}` is a reference).
fn metric_names(text: &str, histograms: &BTreeSet<String>) -> BTreeSet<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find(|c: char| is_ident(c)) {
        let tail = &rest[start..];
        let end = tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len());
        // A trailing colon is prose ("cascade_x: ..."), not part of a name.
        let word = tail[..end].trim_end_matches(':');
        rest = &tail[end..];
        if !word.starts_with("cascade_") {
            continue;
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                word.strip_suffix(suffix)
                    .filter(|base| histograms.contains(*base))
            })
            .unwrap_or(word);
        names.insert(family.to_string());
    }
    names
}

/// The names in `text` that are not families cascade exports.
fn unknown_names(text: &str) -> BTreeSet<String> {
    let known = families();
    metric_names(text, &histogram_families())
        .into_iter()
        .filter(|n| !known.contains(n))
        .collect()
}

fn yaml(rel: &str) -> Yaml {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The alerting rules of alerts.yml.
fn alert_rules() -> Vec<Yaml> {
    let doc = yaml(ALERTS);
    let groups = doc["groups"].as_sequence().expect("groups");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").clone())
        .filter(|r| r.get("alert").is_some())
        .collect()
}

fn dashboard() -> Json {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every panel of the dashboard, rows' nested panels included.
fn panels(dash: &Json) -> Vec<&Json> {
    fn walk<'a>(list: &'a Json, out: &mut Vec<&'a Json>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// Every target `expr` of the dashboard, with the panel's title.
fn dashboard_exprs(dash: &Json) -> Vec<(String, String)> {
    panels(dash)
        .into_iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |t| Some((title.clone(), t["expr"].as_str()?.to_string())))
        })
        .collect()
}

/// Every string in a JSON document (titles, descriptions, queries, variables).
fn json_strings(v: &Json, out: &mut Vec<String>) {
    match v {
        Json::String(s) => out.push(s.clone()),
        Json::Array(a) => a.iter().for_each(|v| json_strings(v, out)),
        Json::Object(o) => o.values().for_each(|v| json_strings(v, out)),
        _ => {}
    }
}

#[test]
fn promtool_checks_the_alert_rules() {
    let out = promtool(&["check", "rules", ALERTS]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn promtool_unit_tests_of_the_alert_rules_pass() {
    let out = promtool(&["test", "rules", ALERTS_TEST]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn every_alert_is_complete_and_unit_tested_both_ways() {
    let rules = alert_rules();
    let names: Vec<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    for required in REQUIRED_ALERTS {
        assert!(names.contains(required), "alerts.yml lacks {required}");
    }
    let unique: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(
        unique.len(),
        names.len(),
        "duplicate alert names: {names:?}"
    );
    for r in &rules {
        let name = r["alert"].as_str().unwrap();
        let severity = r["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{name}: severity label {severity:?}"
        );
        for key in ["summary", "description"] {
            let text = r["annotations"][key].as_str().unwrap_or_default();
            assert!(!text.trim().is_empty(), "{name}: no {key} annotation");
        }
    }
    // alerts_test.yml: per alert, a case where it fires and a case where it stays silent.
    let tests = yaml(ALERTS_TEST);
    let cases: Vec<&Yaml> = tests["tests"]
        .as_sequence()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_sequence().into_iter().flatten())
        .collect();
    for name in &names {
        let of_alert = || {
            cases
                .iter()
                .filter(|c| c["alertname"].as_str() == Some(name))
        };
        let fires = of_alert().any(|c| {
            c["exp_alerts"].as_sequence().is_some_and(|a| {
                !a.is_empty()
                    && a.iter().all(|e| {
                        e["exp_labels"].as_mapping().is_some()
                            && e["exp_annotations"]["summary"].as_str().is_some()
                            && e["exp_annotations"]["description"].as_str().is_some()
                    })
            })
        });
        let silent =
            of_alert().any(|c| c["exp_alerts"].as_sequence().is_some_and(|a| a.is_empty()));
        assert!(
            fires,
            "{ALERTS_TEST}: no case where {name} fires (with labels and annotations)"
        );
        assert!(silent, "{ALERTS_TEST}: no case where {name} stays silent");
    }
}

#[test]
fn alert_rules_refer_only_to_exported_families() {
    let rules = alert_rules();
    assert!(!rules.is_empty());
    let mut seen = BTreeSet::new();
    for r in &rules {
        let name = r["alert"].as_str().unwrap();
        let expr = r["expr"].as_str().expect("expr");
        let found = metric_names(expr, &histogram_families());
        assert!(!found.is_empty(), "{name}: no cascade_ series in {expr}");
        let unknown = unknown_names(expr);
        assert!(
            unknown.is_empty(),
            "{name}: unknown metrics {unknown:?} in {expr}"
        );
        // The annotations name series for the reader to look at: those must exist too.
        let prose = serde_yaml::to_string(&r["annotations"]).unwrap();
        let unknown = unknown_names(&prose);
        assert!(
            unknown.is_empty(),
            "{name}: annotations name unknown metrics {unknown:?}"
        );
        seen.extend(found);
    }
    for family in [
        "cascade_bucket_used_bytes",
        "cascade_bucket_capacity_bytes",
        "cascade_bucket_cooldowns_total",
        "cascade_uploads_total",
        "cascade_redis_up",
        "cascade_requests_total",
        "cascade_fallback_replays_total",
        "cascade_peer_up",
        "cascade_cache_requests_total",
        "cascade_plugin_traps_total",
    ] {
        assert!(seen.contains(family), "no alert uses {family}");
    }
}

#[test]
fn dashboard_refers_only_to_exported_families() {
    let dash = dashboard();
    let exprs = dashboard_exprs(&dash);
    assert!(exprs.len() >= 20, "only {} queries", exprs.len());
    let mut queried = BTreeSet::new();
    for (title, expr) in &exprs {
        let unknown = unknown_names(expr);
        assert!(
            unknown.is_empty(),
            "panel {title:?}: unknown metrics {unknown:?} in {expr}"
        );
        queried.extend(metric_names(expr, &histogram_families()));
    }
    // Anything else that names a series (descriptions, variables' queries) must be right too.
    let mut strings = Vec::new();
    json_strings(&dash, &mut strings);
    for s in &strings {
        let unknown = unknown_names(s);
        assert!(unknown.is_empty(), "unknown metrics {unknown:?} in {s:?}");
    }
    let missing: Vec<_> = DASHBOARD_FAMILIES
        .iter()
        .filter(|f| !queried.contains(**f))
        .collect();
    assert!(missing.is_empty(), "no dashboard panel queries {missing:?}");
}

#[test]
fn dashboard_is_well_formed() {
    let dash = dashboard();
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    let schema = dash["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    // The data source is a variable, so the file imports or provisions anywhere.
    let vars = dash["templating"]["list"].as_array().expect("templating");
    assert!(
        vars.iter().any(|v| v["type"] == "datasource"
            && v["query"] == "prometheus"
            && v["name"] == "datasource"),
        "no `datasource` variable of type prometheus"
    );
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    for p in panels(&dash) {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id: {title}"
        );
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| g[k].as_u64().expect("gridPos"));
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: gridPos {g}");
        for (other, [ox, oy, ow, oh]) in &boxes {
            let overlap = x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h;
            assert!(!overlap, "panels {title:?} and {other:?} overlap");
        }
        boxes.push((title.clone(), [x, y, w, h]));
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{title}: datasource"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "{title}: empty expr"
            );
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{title}: target datasource"
            );
        }
    }
}

/// The dashboard's queries are valid PromQL: promtool checks them as recording rules, with
/// Grafana's variables replaced by values.
#[test]
fn dashboard_queries_parse() {
    let dash = dashboard();
    let rules: Vec<Yaml> = dashboard_exprs(&dash)
        .into_iter()
        .enumerate()
        .map(|(i, (_, expr))| {
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$job", ".*")
                .replace("$instance", ".*");
            assert!(!expr.contains('$'), "unknown variable in {expr}");
            let mut rule = serde_yaml::Mapping::new();
            rule.insert("record".into(), format!("dashboard:query_{i}").into());
            rule.insert("expr".into(), expr.into());
            Yaml::Mapping(rule)
        })
        .collect();
    let mut group = serde_yaml::Mapping::new();
    group.insert("name".into(), "dashboard".into());
    group.insert("rules".into(), Yaml::Sequence(rules));
    let mut doc = serde_yaml::Mapping::new();
    doc.insert("groups".into(), Yaml::Sequence(vec![Yaml::Mapping(group)]));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard_rules.yml");
    std::fs::write(&file, serde_yaml::to_string(&doc).unwrap()).unwrap();
    let out = promtool(&["check", "rules", file.to_str().unwrap()]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn extraction_reports_made_up_names() {
    // A name cascade does not export is reported, wherever it hides.
    let expr =
        r#"sum(rate(cascade_nonexistent_total[5m])) / sum(rate(cascade_requests_total[5m]))"#;
    assert_eq!(
        unknown_names(expr),
        BTreeSet::from(["cascade_nonexistent_total".to_string()])
    );
    assert_eq!(
        unknown_names(r#"count({__name__="cascade_made_up"})"#),
        BTreeSet::from(["cascade_made_up".to_string()])
    );
    // Suffixes are stripped for histograms only.
    assert!(unknown_names(
        "histogram_quantile(0.99, sum by (le) (rate(cascade_upstream_duration_seconds_bucket[5m])))"
    )
    .is_empty());
    assert!(unknown_names("rate(cascade_plugin_duration_seconds_sum[5m]) / rate(cascade_plugin_duration_seconds_count[5m])").is_empty());
    assert_eq!(
        unknown_names("rate(cascade_requests_total_count[5m])"),
        BTreeSet::from(["cascade_requests_total_count".to_string()]),
        "a counter has no _count series"
    );
    assert_eq!(
        unknown_names("cascade_bucket_used_bytes_bucket"),
        BTreeSet::from(["cascade_bucket_used_bytes_bucket".to_string()]),
        "a gauge has no _bucket series"
    );
    assert_eq!(
        unknown_names("rate(cascade_request_duration_seconds_total[5m])"),
        BTreeSet::from(["cascade_request_duration_seconds_total".to_string()])
    );
    assert_eq!(
        unknown_names("see cascade_requests_total: or cascade_nope: here"),
        BTreeSet::from(["cascade_nope".to_string()])
    );
    // Names only count whole: a longer identifier or a label value without the prefix is not one.
    assert!(metric_names(
        r#"other_cascade_requests_total{served_from="cascade"} + x:cascade_y"#,
        &histogram_families()
    )
    .is_empty());
    // And the real families are all known, histograms included.
    let h = histogram_families();
    assert_eq!(h.len(), 5, "{h:?}");
    assert!(h.iter().all(|f| families().contains(f)), "{h:?}");
}

#[test]
fn the_files_exist_where_the_readme_says() {
    let readme = read("README.md");
    for f in [ALERTS, DASHBOARD] {
        assert!(Path::new(&root().join(f)).is_file(), "{f}");
        assert!(readme.contains(f), "README.md does not mention {f}");
    }
}
