//! `cascade check -c FILE`: exit status and `FILE:LINE:COL: FIELD.PATH: message` diagnostics.
//!
//! Offending lines are marked in the YAML with a trailing `# <-` comment (any marked line is
//! accepted) or `# <N` (error N of a multi-error file); the helper turns markers into line
//! numbers so the fixtures stay readable.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cascade_bin;

/// Environment variable that is never set for `check`.
const MISSING_ENV: &str = "CASCADE_TEST_MISSING_AK";

/// The outcome of one `cascade check`.
struct Checked {
    code: i32,
    stderr: String,
    path: String,
    yaml: String,
    _dir: tempfile::TempDir,
}

/// A valid config; `{DIR}` is replaced by an existing directory.
const BASE: &str = "\
listen:
  - addr: 127.0.0.1:18080
origins:
  main:
    dir: {DIR}
  prod:
    url: http://127.0.0.1:9/bucket
    read_only: true
groups:
  media:
    main: main
    fallbacks: [prod]
routes:
  - path: /
    group: media
";

/// Run `cascade check -c FILE` on `yaml` (with `{DIR}` replaced), bounded to 20 s.
fn check(yaml: &str) -> Checked {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let yaml = yaml.replace("{DIR}", &data.display().to_string());
    let path: PathBuf = dir.path().join("cascade.yaml");
    std::fs::write(&path, &yaml).unwrap();
    run_check(&path.display().to_string(), yaml, dir)
}

fn run_check(path: &str, yaml: String, dir: tempfile::TempDir) -> Checked {
    let err_path = dir.path().join("check.stderr");
    let mut child = Command::new(cascade_bin())
        .arg("check")
        .arg("-c")
        .arg(path)
        .env_remove(MISSING_ENV)
        .env("CASCADE_TEST_AK", "ak")
        .env("CASCADE_TEST_SK", "sk")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn cascade check");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`cascade check` did not exit within 20s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Checked {
        code: status.code().unwrap_or(-1),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        path: path.to_string(),
        yaml,
        _dir: dir,
    }
}

/// 1-based numbers of the lines carrying `marker`.
fn marked_lines(yaml: &str, marker: &str) -> Vec<usize> {
    yaml.lines()
        .enumerate()
        .filter(|(_, l)| l.trim_end().ends_with(marker))
        .map(|(i, _)| i + 1)
        .collect()
}

/// `routes[1].group` -> `routes.1.group`
fn normalize_field(f: &str) -> String {
    f.replace('[', ".").replace(']', "")
}

/// One parsed diagnostic.
#[derive(Debug)]
struct Diag {
    line: usize,
    field: String,
    full: String,
}

impl Checked {
    /// Every stderr line of the form `PATH:LINE:COL: rest`, with `FIELD` taken from `rest`.
    fn diags(&self) -> Vec<Diag> {
        let prefix = format!("{}:", self.path);
        self.stderr
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(&prefix)?;
                let (line, rest) = rest.split_once(':')?;
                let (col, rest) = rest.split_once(':')?;
                col.trim().parse::<usize>().ok()?;
                let rest = rest.trim_start();
                let field = rest.split_once(": ").map(|(f, _)| f).unwrap_or("");
                Some(Diag {
                    line: line.parse().ok()?,
                    field: normalize_field(field),
                    full: l.to_string(),
                })
            })
            .collect()
    }

    fn context(&self) -> String {
        let numbered: Vec<String> = self
            .yaml
            .lines()
            .enumerate()
            .map(|(i, l)| format!("{:3} | {l}", i + 1))
            .collect();
        format!(
            "exit code {}\n--- config ---\n{}\n--- stderr ---\n{}",
            self.code,
            numbered.join("\n"),
            self.stderr
        )
    }

    /// Assert exit 1 and a diagnostic on one of the lines marked `marker`, whose field is
    /// `field` (or below it; `None` = no field required) and whose text contains each of
    /// `words`.
    fn assert_reports(&self, marker: &str, field: Option<&str>, words: &[&str]) {
        assert_eq!(self.code, 1, "check must fail\n{}", self.context());
        let lines = marked_lines(&self.yaml, marker);
        assert!(!lines.is_empty(), "fixture has no `{marker}` marker");
        let diags = self.diags();
        let field = field.map(normalize_field);
        let hit = diags.iter().any(|d| {
            lines.contains(&d.line)
                && field
                    .as_ref()
                    .is_none_or(|f| d.field == *f || d.field.starts_with(&format!("{f}.")))
                && words.iter().all(|w| d.full.contains(w))
        });
        assert!(
            hit,
            "expected `{}:LINE:COL: {}: ...` with LINE in {lines:?} mentioning {words:?}; \
             parsed diagnostics: {diags:#?}\n{}",
            self.path,
            field.as_deref().unwrap_or("<any>"),
            self.context()
        );
    }
}

#[test]
fn demo_config_is_valid() {
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/demo.yaml");
    let yaml = std::fs::read_to_string(demo).unwrap();
    let c = run_check(demo, yaml, tempfile::tempdir().unwrap());
    assert_eq!(c.code, 0, "{}", c.context());
}

#[test]
fn base_fixture_is_valid() {
    let c = check(BASE);
    assert_eq!(c.code, 0, "{}", c.context());
    assert!(c.diags().is_empty(), "{}", c.context());
}

#[test]
fn missing_file_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.yaml").display().to_string();
    let c = run_check(&path, String::new(), dir);
    assert_eq!(c.code, 1, "{}", c.context());
    assert!(c.stderr.contains(&path), "{}", c.context());
}

#[test]
fn yaml_syntax_error() {
    let c = check(&BASE.replace(
        "    read_only: true\n",
        "    read_only: true\n    tls_verify: a: b  # <-\n",
    ));
    c.assert_reports("# <-", None, &[]);
}

#[test]
fn unknown_top_level_field() {
    let c = check(&format!("{BASE}colour: blue  # <-\n"));
    c.assert_reports("# <-", None, &["colour"]);
}

#[test]
fn unknown_field_in_origin() {
    let c = check(&BASE.replace(
        "    read_only: true\n",
        "    read_only: true\n    colour: blue  # <-\n",
    ));
    c.assert_reports("# <-", Some("origins.prod.colour"), &[]);
}

#[test]
fn unknown_field_in_server_section() {
    let c = check(&format!(
        "server:\n  threads: 2\n  colour: blue  # <-\n{BASE}"
    ));
    c.assert_reports("# <-", Some("server.colour"), &[]);
}

#[test]
fn unknown_field_in_group_and_route() {
    let c = check(
        &BASE
            .replace(
                "    main: main\n",
                "    main: main\n    fallback_when: [404]  # <g\n",
            )
            .replace(
                "    group: media\n",
                "    group: media\n    hots: x  # <r\n",
            ),
    );
    c.assert_reports("# <g", Some("groups.media.fallback_when"), &[]);
    c.assert_reports("# <r", Some("routes.0.hots"), &[]);
}

#[test]
fn wrong_type_in_server_section() {
    let c = check(&format!("server:\n  threads: many  # <-\n{BASE}"));
    c.assert_reports("# <-", Some("server.threads"), &[]);
}

#[test]
fn plugin_pool_size_out_of_range() {
    let c = check(&format!("server:\n  plugin_instances: 0  # <-\n{BASE}"));
    c.assert_reports("# <-", Some("server.plugin_instances"), &["between 1 and"]);
    let c = check(&format!(
        "server:\n  plugin_instances: 100000  # <-\n{BASE}"
    ));
    c.assert_reports("# <-", Some("server.plugin_instances"), &["10000"]);
}

#[test]
fn write_buffer_too_large_or_not_a_size() {
    let c = check(&format!("server:\n  write_buffer: 2MiB  # <-\n{BASE}"));
    c.assert_reports("# <-", Some("server.write_buffer"), &["at most", "1 MiB"]);
    let c = check(&format!("server:\n  write_buffer: lots  # <-\n{BASE}"));
    c.assert_reports("# <-", Some("server.write_buffer"), &[]);
}

#[test]
fn upstream_pool_is_cascade_or_pingora() {
    let c = check(&format!("server:\n  upstream_pool: nginx  # <-\n{BASE}"));
    c.assert_reports(
        "# <-",
        Some("server.upstream_pool"),
        &["`cascade`", "`pingora`"],
    );
    for ok in ["cascade", "pingora"] {
        let c = check(&format!("server:\n  upstream_pool: {ok}\n{BASE}"));
        assert_eq!(c.code, 0, "{}", c.context());
    }
}

#[test]
fn upstream_read_size_is_between_1_kib_and_64_kib_and_needs_cascades_pool() {
    for bad in ["512", "100KiB", "0"] {
        let c = check(&format!(
            "server:\n  upstream_read_size: {bad}  # <-\n{BASE}"
        ));
        c.assert_reports(
            "# <-",
            Some("server.upstream_read_size"),
            &["between 1 KiB and 64 KiB"],
        );
    }
    let c = check(&format!(
        "server:\n  upstream_read_size: lots  # <-\n{BASE}"
    ));
    c.assert_reports("# <-", Some("server.upstream_read_size"), &[]);
    let c = check(&format!(
        "server:\n  upstream_pool: pingora\n  upstream_read_size: 8KiB  # <-\n{BASE}"
    ));
    c.assert_reports(
        "# <-",
        Some("server.upstream_read_size"),
        &["upstream_pool: cascade"],
    );
    for ok in ["1KiB", "8KiB", "64KiB"] {
        let c = check(&format!("server:\n  upstream_read_size: {ok}\n{BASE}"));
        assert_eq!(c.code, 0, "{}", c.context());
    }
}

#[test]
fn wrong_type_in_origin() {
    let c = check(&BASE.replace("    read_only: true\n", "    read_only: maybe  # <-\n"));
    c.assert_reports("# <-", Some("origins.prod.read_only"), &[]);
}

#[test]
fn bad_duration_top_level() {
    let c = check(&format!("timeouts:\n  read: ten  # <-\n{BASE}"));
    c.assert_reports("# <-", Some("timeouts.read"), &[]);
}

#[test]
fn bad_duration_in_origin() {
    let c = check(&BASE.replace(
        "    read_only: true\n",
        "    read_only: true\n    timeouts:\n      connect: soon  # <-\n",
    ));
    c.assert_reports("# <-", Some("origins.prod.timeouts.connect"), &[]);
}

#[test]
fn bad_size() {
    let c = check(&BASE.replace(
        "    group: media\n",
        "    group: media\n    max_upload_size: 12 parsecs  # <-\n",
    ));
    c.assert_reports("# <-", Some("routes.0.max_upload_size"), &[]);
}

#[test]
fn bad_url() {
    let c = check(&BASE.replace(
        "    url: http://127.0.0.1:9/bucket\n",
        "    url: \"not a url\"  # <-\n",
    ));
    c.assert_reports("# <-", Some("origins.prod.url"), &[]);
}

#[test]
fn origin_with_both_url_and_dir() {
    let c = check(&BASE.replace(
        "  prod:\n    url: http://127.0.0.1:9/bucket\n",
        "  prod:  # <-\n    url: http://127.0.0.1:9/bucket  # <-\n    dir: {DIR}  # <-\n",
    ));
    c.assert_reports("# <-", Some("origins.prod"), &[]);
}

#[test]
fn origin_with_neither_url_nor_dir() {
    let c = check(&BASE.replace(
        "  prod:\n    url: http://127.0.0.1:9/bucket\n    read_only: true\n",
        "  prod:  # <-\n    read_only: true  # <-\n",
    ));
    c.assert_reports("# <-", Some("origins.prod"), &[]);
}

#[test]
fn group_naming_unknown_main_origin() {
    let c = check(&BASE.replace("    main: main\n", "    main: nosuch  # <-\n"));
    c.assert_reports("# <-", Some("groups.media.main"), &["nosuch"]);
}

#[test]
fn group_naming_unknown_fallback_origin() {
    let c = check(&BASE.replace(
        "    fallbacks: [prod]\n",
        "    fallbacks: [prod, nosuch]  # <-\n",
    ));
    c.assert_reports("# <-", Some("groups.media.fallbacks"), &["nosuch"]);
}

#[test]
fn route_naming_unknown_group() {
    let c = check(&BASE.replace("    group: media\n", "    group: nosuch  # <-\n"));
    c.assert_reports("# <-", Some("routes.0.group"), &["nosuch"]);
}

#[test]
fn missing_env_var_for_s3_credentials() {
    let c = check(&BASE.replace(
        "    read_only: true\n",
        &format!(
            "    read_only: true\n    s3:\n      region: us-east-1\n      \
             access_key_env: {MISSING_ENV}  # <-\n      secret_key_env: CASCADE_TEST_SK\n"
        ),
    ));
    c.assert_reports(
        "# <-",
        Some("origins.prod.s3.access_key_env"),
        &[MISSING_ENV],
    );
}

#[test]
fn s3_credentials_from_present_env_vars_are_valid() {
    let c = check(&BASE.replace(
        "    read_only: true\n",
        "    read_only: true\n    s3:\n      region: us-east-1\n      \
         access_key_env: CASCADE_TEST_AK\n      secret_key_env: CASCADE_TEST_SK\n",
    ));
    assert_eq!(c.code, 0, "{}", c.context());
}

#[test]
fn duplicate_route() {
    let c = check(&format!(
        "{BASE}  - path: /  # <-\n    group: media  # <-\n"
    ));
    c.assert_reports("# <-", Some("routes.1"), &[]);
}

#[test]
fn fallback_on_above_599() {
    let c = check(&BASE.replace(
        "    fallbacks: [prod]\n",
        "    fallbacks: [prod]\n    fallback_on: [404, 700]  # <-\n",
    ));
    c.assert_reports("# <-", Some("groups.media.fallback_on"), &[]);
}

#[test]
fn fallback_on_below_100() {
    let c = check(&BASE.replace(
        "    fallbacks: [prod]\n",
        "    fallbacks: [prod]\n    fallback_on:\n      - 404\n      - 99  # <-\n",
    ));
    c.assert_reports("# <-", Some("groups.media.fallback_on"), &[]);
}

#[test]
fn every_error_is_printed() {
    let yaml = "\
listen:
  - addr: 127.0.0.1:18080
origins:
  main:
    dir: {DIR}
  prod:
    url: \"not a url\"  # <1
groups:
  media:
    main: nosuch  # <2
    fallbacks: [prod]
routes:
  - path: /
    group: ghost  # <3
  - path: /up
    group: media
    max_upload_size: lots  # <4
";
    let c = check(yaml);
    c.assert_reports("# <1", Some("origins.prod.url"), &[]);
    c.assert_reports("# <2", Some("groups.media.main"), &["nosuch"]);
    c.assert_reports("# <3", Some("routes.0.group"), &["ghost"]);
    c.assert_reports("# <4", Some("routes.1.max_upload_size"), &[]);
}
