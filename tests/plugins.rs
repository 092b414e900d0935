//! Wasm plugins in a running cascade, driven over HTTP: the shipped plugins (auth,
//! tenant-router, headers), the test fixtures (chaos misbehaves on purpose, probe is a
//! third-party-style SDK plugin) and the host's failure policy, metrics and reload.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..chunk.len() + 1 {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn jwt(secret: &str, exp: u64) -> String {
    let head = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = b64url(format!(r#"{{"sub":"t","exp":{exp}}}"#).as_bytes());
    let sig = hmac_sha256(secret.as_bytes(), format!("{head}.{body}").as_bytes());
    format!("{head}.{body}.{}", b64url(&sig))
}

fn now() -> u64 {
    unix_now()
}

fn http_origin_yaml(o: &HttpOrigin) -> String {
    format!(
        "origins:\n  web: {{url: \"{}\"}}\ngroups:\n  main: {{main: web}}\n",
        o.url("")
    )
}

/// Scrapes `/metrics` until the plugin counter `name` of `plugin` reaches `want` (up to 5 s:
/// `on_log` runs after the client has its response); returns that scrape. `what` names the
/// count in the failure message.
async fn plugin_counter_reaches(
    c: &Cascade,
    plugin: &str,
    name: &str,
    want: f64,
    what: &str,
) -> String {
    let labels = [("plugin", plugin), ("name", name)];
    metric_reaches(c, "cascade_plugin_counter", &labels, want, what).await
}

/// Scrapes until the series `name` with `labels` reads `want` (5 s at most); the scrape.
async fn metric_reaches(
    c: &Cascade,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
    what: &str,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = c.metrics().await;
        let got = metric_sum(&m, name, labels);
        if got == Some(want) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {got:?}, want {want}\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn auth_answers_401_403_and_200_for_keys_signed_urls_and_jwts() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "secret bytes"));
    let yaml = format!(
        "{}plugins:\n  auth:\n    wasm: {}\n    config: {{keys: [k1, k2], hmac_secret: s3cr3t, jwt_hs256_secret: jwtkey, realm: media}}\n\
         routes:\n  - {{path: /, group: main, plugins: [auth]}}\n",
        http_origin_yaml(&origin),
        wasm("auth")
    );
    let c = Cascade::start(&yaml);
    let get = |path: &str| client().get(c.url(path));

    let r = get("/p/a.jpg").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(header(&r, "www-authenticate"), "Bearer realm=\"media\"");
    let r = get("/p/a.jpg")
        .header("x-api-key", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        origin.stats.total(),
        0,
        "refused requests never reach the origin"
    );

    let r = get("/p/a.jpg")
        .header("x-api-key", "k2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "secret bytes");
    let seen = origin.stats.last().unwrap();
    assert!(
        !seen.headers.contains_key("x-api-key"),
        "the key must not reach the origin"
    );

    // Signed URL: hex HMAC-SHA256(secret, "<path>\n<expires>").
    let exp = now() + 300;
    let sig = hex(&hmac_sha256(
        b"s3cr3t",
        format!("/p/a.jpg\n{exp}").as_bytes(),
    ));
    let r = get(&format!("/p/a.jpg?expires={exp}&signature={sig}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = get(&format!("/p/b.jpg?expires={exp}&signature={sig}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a signature is valid for its path only");
    let old = now() - 10;
    let sig = hex(&hmac_sha256(
        b"s3cr3t",
        format!("/p/a.jpg\n{old}").as_bytes(),
    ));
    let r = get(&format!("/p/a.jpg?expires={old}&signature={sig}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "expired");

    // JWT HS256.
    let r = get("/p/a.jpg")
        .header(
            "authorization",
            format!("Bearer {}", jwt("jwtkey", now() + 60)),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!origin
        .stats
        .last()
        .unwrap()
        .headers
        .contains_key("authorization"));
    let r = get("/p/a.jpg")
        .header(
            "authorization",
            format!("Bearer {}", jwt("wrong", now() + 60)),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = get("/p/a.jpg")
        .header(
            "authorization",
            format!("Bearer {}", jwt("jwtkey", now() - 60)),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "expired token");
}

#[tokio::test]
async fn auth_protects_cache_hits() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "cached body").header("cache-control", "max-age=300"));
    let yaml = format!(
        "{}cache: {{memory: 16MiB}}\nplugins:\n  auth: {{wasm: {}, config: {{keys: [k1]}}}}\n\
         routes:\n  - {{path: /, group: main, plugins: [auth]}}\n",
        http_origin_yaml(&origin),
        wasm("auth")
    );
    let c = Cascade::start(&yaml);
    for want in ["MISS", "HIT"] {
        let r = client()
            .get(c.url("/o.bin"))
            .header("x-api-key", "k1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-cache"), want);
    }
    let r = client().get(c.url("/o.bin")).send().await.unwrap();
    assert_eq!(r.status(), 401, "a cache hit still needs the key");
    assert!(r.text().await.unwrap().contains("unauthorized"));
    let r = client()
        .get(c.url("/o.bin"))
        .header("x-api-key", "bad")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(origin.stats.count("GET"), 1);
}

#[tokio::test]
async fn tenant_router_sends_tenants_to_their_own_buckets_and_cache_entries() {
    let a = S3Server::anonymous();
    let b = S3Server::anonymous();
    a.create_bucket("alpha");
    b.create_bucket("beta");
    a.put_file("alpha", "t1/x.txt", "tenant one");
    b.put_file("beta", "x.txt", "tenant two");
    let yaml = format!(
        "origins:\n  a: {{url: \"{}\"}}\n  b: {{url: \"{}\"}}\n\
         groups:\n  ga: {{main: a}}\n  gb: {{main: b}}\n\
         cache: {{memory: 16MiB}}\n\
         plugins:\n  tenant-router:\n    wasm: {}\n    config:\n      default: deny\n      tenant_header: x-tenant\n      tenants:\n\
         \x20       - {{name: one, host: one.example, group: ga, key_prefix: t1/}}\n\
         \x20       - {{name: two, host: two.example, group: gb}}\n\
         \x20       - {{name: lost, host: lost.example, group: nowhere}}\n\
         routes:\n  - {{path: /, group: ga, plugins: [tenant-router]}}\n",
        a.bucket_url("alpha"),
        b.bucket_url("beta"),
        wasm("tenant-router")
    );
    let c = Cascade::start(&yaml);
    let get = |host: &str| client().get(c.url("/x.txt")).header("host", host).send();
    for round in ["MISS", "HIT"] {
        let r = get("one.example").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-cache"), round);
        assert_eq!(r.text().await.unwrap(), "tenant one");
        let r = get("two.example:8080").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-cache"), round);
        assert_eq!(r.text().await.unwrap(), "tenant two");
    }
    assert_eq!(a.stats.count("GET"), 1, "one fill per tenant");
    assert_eq!(b.stats.count("GET"), 1, "one fill per tenant");
    assert_eq!(a.stats.last().unwrap().uri, "/alpha/t1/x.txt");
    let r = get("nobody.example").await.unwrap();
    assert_eq!(r.status(), 404, "default: deny");
    let r = get("lost.example").await.unwrap();
    assert_eq!(
        r.status(),
        500,
        "an unknown group set by a plugin fails the request"
    );
    assert!(
        c.stderr().contains("nowhere"),
        "the log names the bad group"
    );
}

#[tokio::test]
async fn headers_plugin_edits_requests_seen_by_the_origin_and_responses_seen_by_clients() {
    let origin = HttpOrigin::start();
    origin.set_default(
        Reply::new(200, "body")
            .header("x-internal", "do-not-leak")
            .header("content-type", "text/plain"),
    );
    let yaml = format!(
        "{}plugins:\n  headers:\n    wasm: {}\n    config:\n      request: {{set: {{x-edge: \"1\"}}, remove: [x-drop]}}\n      response: {{set: {{x-frame-options: DENY}}, remove: [x-internal]}}\n      cors: {{allow_origins: [\"https://app.example\"]}}\n\
         routes:\n  - {{path: /, group: main, plugins: [headers]}}\n",
        http_origin_yaml(&origin),
        wasm("headers")
    );
    let c = Cascade::start(&yaml);
    let r = client()
        .get(c.url("/f.txt"))
        .header("x-drop", "secret")
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-frame-options"), "DENY");
    assert_eq!(header(&r, "x-internal"), "");
    assert_eq!(
        header(&r, "access-control-allow-origin"),
        "https://app.example"
    );
    let seen = origin.stats.last().unwrap();
    assert_eq!(seen.header("x-edge"), "1");
    assert!(!seen.headers.contains_key("x-drop"));
}

/// `cascade run` with a config that must not start: exit status and stderr.
fn run_expecting_failure(yaml: &str) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("cascade.yaml");
    std::fs::write(
        &cfg,
        format!("listen: [{{addr: \"127.0.0.1:{port}\"}}]\n{yaml}"),
    )
    .unwrap();
    let mut child = Command::new(cascade_bin())
        .args(["run", "-c"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (st, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cascade kept running with a broken plugin config");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn plugin_errors_at_load_name_the_plugin_and_stop_cascade() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("www")).unwrap();
    let base = format!(
        "origins: {{www: {{dir: \"{}\"}}}}\ngroups: {{main: {{main: www}}}}\n",
        dir.path().join("www").display()
    );
    // on_configure returns false (the probe wants {greeting}).
    let (st, err) = run_expecting_failure(&format!(
        "{base}plugins:\n  my-probe: {{wasm: {}, config: {{nope: 1}}}}\nroutes: [{{path: /, group: main, plugins: [my-probe]}}]\n",
        wasm("probe")
    ));
    assert!(!st.success());
    assert!(
        err.contains("plugin `my-probe`") && err.contains("on_configure"),
        "{err}"
    );
    // `cascade check` loads plugins too.
    let cfg = dir.path().join("check.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: [{{addr: \"127.0.0.1:1\"}}]\n{base}plugins:\n  my-probe: {{wasm: {}, config: {{nope: 1}}}}\n\
             routes: [{{path: /, group: main, plugins: [my-probe]}}]\n",
            wasm("probe")
        ),
    )
    .unwrap();
    let out = Command::new(cascade_bin())
        .args(["check", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("plugin `my-probe`"), "{err}");
    // Not a Wasm module.
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, "not wasm").unwrap();
    let (st, err) = run_expecting_failure(&format!(
        "{base}plugins:\n  junk: {{wasm: {}}}\nroutes: [{{path: /, group: main, plugins: [junk]}}]\n",
        junk.display()
    ));
    assert!(!st.success());
    assert!(
        err.contains("plugin `junk`") && err.contains("cascade.yaml"),
        "{err}"
    );
    // Missing file and unknown plugin names: config errors with file:line and field.
    let (st, err) = run_expecting_failure(&format!(
        "{base}plugins:\n  gone: {{wasm: /no/such/file.wasm}}\nroutes: [{{path: /, group: main, plugins: [gone, nosuch]}}]\n"
    ));
    assert!(!st.success());
    assert!(err.contains("plugins.gone.wasm"), "{err}");
    assert!(
        err.contains("routes[0].plugins[1]") && err.contains("nosuch"),
        "{err}"
    );
    // A `calls:` entry that is not an origin.
    let (st, err) = run_expecting_failure(&format!(
        "{base}plugins:\n  ea:\n    wasm: {}\n    calls: [web, authsvc]\nroutes: [{{path: /, group: main, plugins: [ea]}}]\n",
        wasm("ext-auth")
    ));
    assert!(!st.success());
    assert!(
        err.contains("plugins.ea.calls[1]") && err.contains("unknown origin `authsvc`"),
        "{err}"
    );
}

#[tokio::test]
async fn misbehaving_plugins_cost_only_their_request() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "ok"));
    let chaos = wasm("chaos");
    let plugin = |name: &str, mode: &str, on_error: &str| {
        format!(
            "  {name}: {{wasm: {chaos}, on_error: {on_error}, limits: {{memory: 16MiB, time: 100ms}}, config: {{mode: {mode}, only_if_header: x-chaos}}}}\n"
        )
    };
    let late = format!(
        "  c-late: {{wasm: {chaos}, config: {{mode: trap, phase: response, only_if_header: x-chaos}}}}\n"
    );
    let yaml = format!(
        "{}plugins:\n{}{}{}{}{late}\
         routes:\n  - {{path: /trap, group: main, plugins: [c-trap]}}\n  - {{path: /loop, group: main, plugins: [c-loop]}}\n\
         \x20 - {{path: /late, group: main, plugins: [c-late]}}\n\
         \x20 - {{path: /grow, group: main, plugins: [c-grow]}}\n  - {{path: /open, group: main, plugins: [c-loop-open]}}\n\
         \x20 - {{path: /, group: main}}\n",
        http_origin_yaml(&origin),
        plugin("c-trap", "trap", "deny"),
        plugin("c-loop", "loop", "deny"),
        plugin("c-grow", "grow", "deny"),
        plugin("c-loop-open", "loop", "allow"),
    );
    let c = Cascade::start(&yaml);
    for round in 0..3 {
        for path in ["/trap/a", "/loop/a", "/grow/a", "/open/a"] {
            let t0 = Instant::now();
            let r = client()
                .get(c.url(path))
                .header("x-chaos", "1")
                .send()
                .await
                .unwrap();
            let took = t0.elapsed();
            let want = if path == "/open/a" { 200 } else { 503 };
            assert_eq!(r.status(), want, "{path} round {round}");
            assert!(took < Duration::from_secs(2), "{path} took {took:?}");
            // The same plugin, not triggered, and other routes keep working.
            let r = client().get(c.url(path)).send().await.unwrap();
            assert_eq!(r.status(), 200, "{path} untriggered, round {round}");
            assert_eq!(header(&r, "x-chaos"), "ok");
            let r = client().get(c.url("/plain")).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    // A response-phase failure: the response is already under way and continues.
    let r = client()
        .get(c.url("/late/a"))
        .header("x-chaos", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    let m = c.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "cascade_plugin_traps_total",
            &[("plugin", "c-late"), ("kind", "trap")]
        ),
        Some(1.0)
    );
    for (plugin, kind) in [
        ("c-trap", "trap"),
        ("c-loop", "timeout"),
        ("c-grow", "memory"),
        ("c-loop-open", "timeout"),
    ] {
        let n = metric_sum(
            &m,
            "cascade_plugin_traps_total",
            &[("plugin", plugin), ("kind", kind)],
        );
        assert_eq!(n, Some(3.0), "{plugin} {kind}\n{m}");
    }
    assert_eq!(
        metric_sum(
            &m,
            "cascade_plugin_failures_total",
            &[("plugin", "c-loop-open"), ("action", "allow")]
        ),
        Some(3.0)
    );
}

#[tokio::test]
async fn probe_sdk_plugin_sees_properties_metrics_and_shared_data() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "media").header("cache-control", "max-age=60"));
    let yaml = format!(
        "{}cache: {{memory: 16MiB}}\nplugins:\n  probe: {{wasm: {}, calls: [web], config: {{greeting: hello from yaml, late_call: web}}}}\n\
         routes:\n  - {{name: media, path: /media, strip_prefix: true, group: main, plugins: [probe]}}\n",
        http_origin_yaml(&origin),
        wasm("probe")
    );
    let c = Cascade::start(&yaml);
    let mut counts = Vec::new();
    for want in ["MISS", "HIT"] {
        let r = client()
            .get(c.url("/media/a.jpg?x=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-probe-greeting"), "hello from yaml");
        assert_eq!(header(&r, "x-probe-path"), "/media/a.jpg?x=1");
        assert_eq!(header(&r, "x-probe-method"), "GET");
        assert_eq!(header(&r, "x-probe-route"), "media");
        assert_eq!(header(&r, "x-probe-client"), "yes");
        assert_eq!(header(&r, "x-probe-served-from"), "web");
        assert_eq!(header(&r, "x-probe-cache"), want);
        // A call from the response-headers callback, which paused the response: the answer
        // arrives before the response goes out, on a miss and on a hit alike.
        assert_eq!(header(&r, "x-probe-late-call"), "dispatched");
        assert_eq!(header(&r, "x-probe-late-answer"), "200");
        counts.push(header(&r, "x-probe-count").parse::<u64>().unwrap());
    }
    assert_eq!(counts, vec![1, 2], "shared data with CAS across requests");
    let uris: Vec<String> = origin.stats.requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(
        uris,
        ["/a.jpg?x=1", "/late", "/late"],
        "one fill, one call per response"
    );
    // `on_log` (after the response) tries a call too: refused with an error the SDK hands
    // back, never a trap.
    let m =
        plugin_counter_reaches(&c, "probe", "probe_log_call_refused", 2.0, "refused calls").await;
    assert_eq!(
        metric_sum(
            &m,
            "cascade_plugin_counter",
            &[("plugin", "probe"), ("name", "probe_requests")]
        ),
        Some(2.0),
        "{m}"
    );
    assert!(m.contains("cascade_plugin_duration_seconds_bucket{phase=\"request\",plugin=\"probe\""));
    // One timing per request of each phase the two requests went through (the log phase's
    // is observed just after its callbacks return).
    let timings = "cascade_plugin_duration_seconds_count";
    let log = [("plugin", "probe"), ("phase", "log")];
    let m = metric_reaches(&c, timings, &log, 2.0, "log phase timings").await;
    for phase in ["request", "log"] {
        let labels = [("plugin", "probe"), ("phase", phase)];
        let count = metric_sum(&m, timings, &labels);
        assert_eq!(count, Some(2.0), "{phase}: {m}");
        let inf = [("plugin", "probe"), ("phase", phase), ("le", "+Inf")];
        let bucket = metric_sum(&m, "cascade_plugin_duration_seconds_bucket", &inf);
        assert_eq!(bucket, Some(2.0), "{phase}: {m}");
        let sum = metric_sum(&m, "cascade_plugin_duration_seconds_sum", &labels);
        assert!(sum.is_some_and(|s| s > 0.0 && s < 10.0), "{phase}: {m}");
    }
    assert_eq!(
        metric_sum(&m, "cascade_plugin_instances", &[("plugin", "probe")]),
        Some(1.0)
    );
    assert!(
        c.stderr().contains("[probe] probe: configured"),
        "plugin logs reach cascade's log"
    );
}

/// The response-phase walk also runs on cascade's own error answers (here a 502 for an origin
/// that refuses connections), and its HTTP calls are made before that answer goes out.
#[tokio::test]
async fn response_phase_http_calls_run_on_error_answers_too() {
    let web = HttpOrigin::start();
    web.set_default(Reply::new(200, "ok"));
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\n  dead: {{url: \"http://127.0.0.1:{}\"}}\n\
         groups:\n  main: {{main: web}}\n  down: {{main: dead}}\n\
         plugins:\n  probe: {{wasm: {}, calls: [web], config: {{greeting: hi, late_call: web}}}}\n\
         routes:\n  - {{path: /down, group: down, plugins: [probe]}}\n",
        web.url(""),
        free_port(),
        wasm("probe")
    );
    let c = Cascade::start(&yaml);
    let r = client().get(c.url("/down/x")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(header(&r, "x-probe-late-call"), "dispatched");
    assert_eq!(header(&r, "x-probe-late-answer"), "200");
    let uris: Vec<String> = web.stats.requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(uris, ["/late"]);
}

#[tokio::test]
async fn sighup_swaps_a_changed_plugin_without_dropping_requests() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "x"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("probe.wasm");
    std::fs::copy(wasm("probe"), &file).unwrap();
    let yaml = format!(
        "{}plugins:\n  probe: {{wasm: {}, config: {{greeting: v1}}}}\n\
         routes:\n  - {{path: /, group: main, plugins: [probe]}}\n",
        http_origin_yaml(&origin),
        file.display()
    );
    let c = Cascade::start(&yaml);
    let r = client().get(c.url("/a")).send().await.unwrap();
    assert_eq!(header(&r, "x-probe-count"), "1");
    // Same code, different bytes: append a custom section.
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend_from_slice(&[0, 4, 3, b'r', b'e', b'v']);
    std::fs::write(&file, bytes).unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &c.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        eventually(Duration::from_secs(20), || c
            .stderr()
            .contains("plugin `probe` reloaded"))
        .await,
        "{}",
        c.stderr_tail(20)
    );
    let r = client().get(c.url("/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-probe-count"),
        "2",
        "shared data survives a reload"
    );
}

#[tokio::test]
async fn non_utf8_header_values_never_crash_the_host() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "fine"));
    let yaml = format!(
        "{}plugins:\n  probe: {{wasm: {}, config: {{greeting: hi}}}}\n  headers: {{wasm: {}, on_error: allow, config: {{response: {{set: {{x-h: \"1\"}}}}}}}}\n\
         routes:\n  - {{path: /, group: main, plugins: [headers, probe]}}\n",
        http_origin_yaml(&origin),
        wasm("probe"),
        wasm("headers")
    );
    let c = Cascade::start(&yaml);
    let mut req = format!(
        "GET /bin HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nX-Bin: ",
        c.addr
    )
    .into_bytes();
    req.extend_from_slice(b"\xff\xfe\x80ok\r\n\r\n");
    let r = raw_request(c.addr, &req, Duration::from_secs(10));
    // The SDK traps on a non-UTF-8 header map (the probe reads them all): that costs the
    // request (deny → 503) or passes (if the SDK copes), never the process.
    assert!(r.status == 200 || r.status == 503, "{}", r.text());
    let r = client().get(c.url("/after")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-probe-greeting"), "hi");
}

#[tokio::test]
async fn plugins_get_only_the_environment_variables_they_are_given() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "ok"));
    let yaml = format!(
        "{}plugins:\n  auth: {{wasm: {}, env: [MEDIA_KEYS], config: {{keys_env: MEDIA_KEYS}}}}\n\
         routes:\n  - {{path: /, group: main, plugins: [auth]}}\n",
        http_origin_yaml(&origin),
        wasm("auth")
    );
    let c = Cascade::builder(&yaml)
        .env("MEDIA_KEYS", "k-a, k-b")
        .start();
    let r = client()
        .get(c.url("/x"))
        .header("x-api-key", "k-b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(c.url("/x"))
        .header("x-api-key", "k-c")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Named but unset: a config error naming the field.
    let dir = tempfile::tempdir().unwrap();
    let (st, err) = run_expecting_failure(&format!(
        "origins: {{www: {{dir: \"{}\"}}}}\ngroups: {{main: {{main: www}}}}\n\
         plugins:\n  auth: {{wasm: {}, env: [CASCADE_SURELY_UNSET_VAR]}}\nroutes: [{{path: /, group: main}}]\n",
        dir.path().display(),
        wasm("auth")
    ));
    assert!(!st.success());
    assert!(
        err.contains("plugins.auth.env[0]") && err.contains("CASCADE_SURELY_UNSET_VAR"),
        "{err}"
    );
}

#[tokio::test]
async fn body_callbacks_rewrite_responses_hit_or_miss_and_stream_request_bodies() {
    let s3 = S3Server::anonymous();
    s3.create_bucket("media");
    let body: Vec<u8> = (0..300_000).map(|i| b'a' + (i % 26) as u8).collect();
    s3.put_file("media", "up/big.txt", &body);
    s3.put_file("media", "plain/big.txt", &body);
    let yaml = format!(
        "origins:\n  s3: {{url: \"{}\"}}\ngroups:\n  main: {{main: s3}}\n\
         cache: {{memory: 16MiB}}\n\
         plugins:\n\
         \x20 upper: {{wasm: {w}, config: {{response: upper}}}}\n\
         \x20 upper-off: {{wasm: {w}, config: {{response: upper}}, bodies: false}}\n\
         \x20 redact: {{wasm: {w}, config: {{redact: secret}}}}\n\
         routes:\n\
         \x20 - {{path: /up/, group: main, plugins: [upper]}}\n\
         \x20 - {{path: /plain/, group: main, plugins: [upper-off]}}\n\
         \x20 - {{path: /put/, group: main, plugins: [redact]}}\n",
        s3.bucket_url("media"),
        w = wasm("rewrite")
    );
    let c = Cascade::start(&yaml);
    let upper = body.to_ascii_uppercase();
    for want in ["MISS", "HIT"] {
        let r = client().get(c.url("/up/big.txt")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-cache"), want);
        assert_eq!(header(&r, "x-rewrite"), "upper");
        let got = r.bytes().await.unwrap();
        assert!(got.len() > upper.len(), "{want}: {} bytes", got.len());
        assert_eq!(
            &got[..upper.len()],
            &upper[..],
            "{want}: the whole body, rewritten"
        );
        let trailer = String::from_utf8_lossy(&got[upper.len()..]).to_string();
        assert!(
            trailer.starts_with("\n-- 300000 bytes, "),
            "{want}: the plugin saw the whole body at the end: {trailer:?}"
        );
        if want == "MISS" {
            // Streamed from the origin in many chunks: the plugin paused and was called again.
            let calls: u32 = trailer
                .trim()
                .trim_start_matches("-- 300000 bytes, ")
                .trim_end_matches(" callbacks")
                .parse()
                .unwrap();
            assert!(calls >= 2, "{trailer:?}");
        }
    }
    assert_eq!(
        s3.stats.count("GET"),
        1,
        "the cache holds the origin's bytes"
    );

    // `bodies: false`: the same plugin's header edits run, its body callbacks do not.
    let r = client().get(c.url("/plain/big.txt")).send().await.unwrap();
    assert_eq!(header(&r, "x-rewrite"), "upper");
    assert_eq!(r.bytes().await.unwrap().to_vec(), body);

    // Request bodies stream through the plugin on their way to the bucket.
    let r = client()
        .put(c.url("/put/doc.txt"))
        .body("my secret is secret, ok")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        s3.read_file("media", "put/doc.txt").unwrap(),
        b"my XXXXXX is XXXXXX, ok"
    );
}

#[tokio::test]
async fn admin_reload_swaps_a_changed_plugin_and_reports_failures() {
    const TOKEN: &str = "admin-token-for-plugin-reload";
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "x"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("headers.wasm");
    std::fs::copy(wasm("headers"), &file).unwrap();
    let admin_port = free_port();
    let yaml = format!(
        "{}admin: {{addr: \"127.0.0.1:{admin_port}\", token_env: CASCADE_ADMIN_TOKEN}}\n\
         plugins:\n  hdr: {{wasm: {}, config: {{response: {{set: {{x-v: one}}}}}}}}\n\
         routes:\n  - {{path: /, group: main, plugins: [hdr]}}\n",
        http_origin_yaml(&origin),
        file.display()
    );
    let c = Cascade::builder(&yaml)
        .env("CASCADE_ADMIN_TOKEN", TOKEN)
        .start();
    let reload = |token: Option<&'static str>| {
        let mut r = client().post(format!("http://127.0.0.1:{admin_port}/plugins/reload"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(reload(None).await.unwrap().status(), 401);
    let r = reload(Some(TOKEN)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.text().await.unwrap(),
        "swapped: []\n",
        "nothing changed yet"
    );

    // Same code, different bytes (a custom section): swapped, and requests keep working.
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.extend_from_slice(&[0, 4, 3, b'r', b'e', b'v']);
    std::fs::write(&file, &bytes).unwrap();
    let r = reload(Some(TOKEN)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "swapped: [\"hdr\"]\n");
    let r = client().get(c.url("/a")).send().await.unwrap();
    assert_eq!(header(&r, "x-v"), "one");

    // A broken file is refused; the loaded version keeps serving.
    std::fs::write(&file, b"not wasm").unwrap();
    let r = reload(Some(TOKEN)).await.unwrap();
    assert_eq!(r.status(), 500);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("plugin `hdr`") && body.contains("keeping the loaded version"),
        "{body}"
    );
    let r = client().get(c.url("/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-v"), "one");
}

#[tokio::test]
async fn paused_bodies_are_complete_on_uploads_and_on_revalidated_hits() {
    // An upload in many chunks, held whole by the plugin (Pause until the end): the origin
    // gets every byte, redacted, never a truncated body.
    let s3 = S3Server::anonymous();
    s3.create_bucket("media");
    let origin = HttpOrigin::start();
    origin.set_default(
        Reply::new(200, "fresh body")
            .header("etag", "\"v1\"")
            .header("cache-control", "no-cache"),
    );
    let yaml = format!(
        "origins:\n  s3: {{url: \"{}\"}}\n  web: {{url: \"{}\"}}\n\
         groups:\n  main: {{main: s3}}\n  web: {{main: web}}\n\
         cache: {{memory: 16MiB}}\n\
         plugins:\n\
         \x20 redact: {{wasm: {w}, config: {{redact: secret, redact_whole: true}}}}\n\
         \x20 upper: {{wasm: {w}, config: {{response: upper}}}}\n\
         routes:\n\
         \x20 - {{path: /put/, group: main, plugins: [redact]}}\n\
         \x20 - {{path: /web/, group: web, plugins: [upper]}}\n",
        s3.bucket_url("media"),
        origin.url(""),
        w = wasm("rewrite")
    );
    let c = Cascade::start(&yaml);
    let mut body = Vec::new();
    while body.len() < 400_000 {
        body.extend_from_slice(b"top secret data; ");
    }
    let r = client()
        .put(c.url("/put/big.txt"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let want: Vec<u8> = String::from_utf8(body)
        .unwrap()
        .replace("secret", "XXXXXX")
        .into_bytes();
    let stored = s3.read_file("media", "put/big.txt").unwrap();
    assert_eq!(
        stored.len(),
        want.len(),
        "the whole upload reached the bucket"
    );
    assert!(stored == want, "every chunk redacted");

    // A hit revalidated with a 304: the body comes from the cache and Pingora never flags its
    // end; a plugin holding it until the end still gets it, and the client gets all of it.
    let expect = "FRESH BODY\n-- 10 bytes, ";
    let r = client().get(c.url("/web/doc")).send().await.unwrap();
    assert_eq!(header(&r, "x-cache"), "MISS");
    assert!(r.text().await.unwrap().starts_with(expect));
    origin.set_default(Reply::new(304, "").header("etag", "\"v1\""));
    let r = client().get(c.url("/web/doc")).send().await.unwrap();
    assert_eq!(header(&r, "x-cache"), "REVALIDATED");
    let text = r.text().await.unwrap();
    assert!(text.starts_with(expect), "{text:?}");
    assert_eq!(origin.stats.count("GET"), 2);
}

#[tokio::test]
async fn the_instance_pool_bounds_instances_and_idle_ones_give_up_their_slots() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "ok"));
    origin.route(
        "/a/slow",
        Reply::new(200, "slow").delay(Duration::from_secs(2)),
    );
    let headers = wasm("headers");
    let yaml = format!(
        "{}plugins:\n\
         \x20 pa: {{wasm: {headers}, on_error: deny, config: {{response: {{set: {{x-a: \"1\"}}}}}}}}\n\
         \x20 pb: {{wasm: {headers}, on_error: allow, config: {{response: {{set: {{x-b: \"1\"}}}}}}}}\n\
         routes:\n  - {{path: /a, group: main, plugins: [pa]}}\n  - {{path: /b, group: main, plugins: [pb]}}\n",
        http_origin_yaml(&origin),
    );
    // Three slots: one idle instance of each plugin after start, one free.
    let c = Cascade::builder(&yaml)
        .server("plugin_instances", "3")
        .start();
    let m = c.metrics().await;
    assert_eq!(metric_sum(&m, "cascade_plugin_pool_slots", &[]), Some(3.0));

    // Three slow requests on `pa` hold three instances: its idle one, the free slot, and the
    // slot of `pb`'s idle instance, which gives it up.
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let url = c.url("/a/slow");
            tokio::spawn(async move { client().get(url).send().await.unwrap() })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while origin.stats.count("GET") < 3 {
        assert!(
            Instant::now() < deadline,
            "the slow requests never reached the origin"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The pool is full now: `pa` (deny) fails its request, `pb` (allow) is skipped.
    let r = client().get(c.url("/a/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let r = client().get(c.url("/b/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-b"), "", "pb ran without a slot");
    for h in slow {
        let r = h.await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-a"), "1");
    }
    // The slow requests are over (their instances come back when cascade has logged them,
    // just after the client has its response): `pb` takes a slot from `pa`'s idle instances.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = client().get(c.url("/b/x")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        if header(&r, "x-b") == "1" {
            break;
        }
        assert!(Instant::now() < deadline, "pb never got a slot back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = c.metrics().await;
    assert_eq!(
        metric_sum(&m, "cascade_plugin_pool_full_total", &[("plugin", "pa")]),
        Some(1.0),
        "{m}"
    );
    let pb_full = metric_sum(&m, "cascade_plugin_pool_full_total", &[("plugin", "pb")]);
    assert!(pb_full.is_some_and(|n| n >= 1.0), "{m}");
    let live: f64 = ["pa", "pb"]
        .iter()
        .map(|p| metric_sum(&m, "cascade_plugin_instances", &[("plugin", p)]).unwrap_or(0.0))
        .sum();
    assert!(live <= 3.0, "{live} instances in a pool of 3\n{m}");
}

#[tokio::test]
async fn a_plugin_without_body_callbacks_holds_no_instance_while_a_body_streams() {
    let origin = HttpOrigin::start();
    let body = vec![b'x'; 64 * 1024];
    origin.route(
        "/s/big",
        Reply::new(200, body.clone()).trickle(Duration::from_millis(1500)),
    );
    let probe = wasm("probe");
    // One slot: while the first download streams, the second request needs that instance.
    // `bodies: false` parks the first request's context and hands the instance back after
    // its response headers; with body callbacks it stays leased and the second gets 503.
    for (bodies, second_status) in [("false", 200), ("true", 503)] {
        let yaml = format!(
            "{}plugins:\n\
             \x20 ph: {{wasm: {probe}, bodies: {bodies}, on_error: deny, config: {{greeting: hi}}}}\n\
             routes:\n  - {{path: /s, group: main, plugins: [ph]}}\n",
            http_origin_yaml(&origin),
        );
        let c = Cascade::builder(&yaml)
            .server("plugin_instances", "1")
            .start();
        let first = client().get(c.url("/s/big")).send().await.unwrap();
        assert_eq!(first.status(), 200, "bodies: {bodies}");
        assert_eq!(header(&first, "x-probe-greeting"), "hi");
        // The first body is still streaming (its second half comes 1.5 s later).
        let second = client().get(c.url("/s/big")).send().await.unwrap();
        assert_eq!(second.status(), second_status, "bodies: {bodies}");
        let mut served = 1;
        if second_status == 200 {
            assert_eq!(header(&second, "x-probe-greeting"), "hi");
            assert_eq!(second.bytes().await.unwrap().len(), body.len());
            served += 1;
        }
        assert_eq!(
            first.bytes().await.unwrap().len(),
            body.len(),
            "bodies: {bodies}"
        );
        // Every served request's context got its on_log (the probe counts them), the
        // parked one included, and nothing was lost or faulted.
        let what = format!("bodies: {bodies}: on_log calls");
        let m = plugin_counter_reaches(&c, "ph", "probe_logs", served as f64, &what).await;
        let traps = metric_sum(&m, "cascade_plugin_traps_total", &[("plugin", "ph")]);
        assert_eq!(traps.unwrap_or(0.0), 0.0, "{m}");
        let lost = metric_sum(
            &m,
            "cascade_plugin_lost_contexts_total",
            &[("plugin", "ph")],
        );
        assert_eq!(lost.unwrap_or(0.0), 0.0, "{m}");
        let third = client().get(c.url("/s/big")).send().await.unwrap();
        assert_eq!(
            third.status(),
            200,
            "bodies: {bodies}: the instance came back"
        );
    }
}

/// `ext-auth` (proxy_http_call): every request is checked with an authorization service (an
/// origin of the config) before the cache and the origin; the service's verdict, its failure
/// and its silence each give the right answer, and the calls are counted.
#[tokio::test]
async fn ext_auth_asks_an_authorization_service_over_proxy_http_call() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "object bytes").header("cache-control", "max-age=300"));
    let authsvc = HttpOrigin::start();
    authsvc.route("/allow", Reply::new(200, "").header("x-user", "alice"));
    authsvc.route(
        "/deny",
        Reply::new(401, "go away\n")
            .header("www-authenticate", "Basic realm=\"media\"")
            .header("x-internal", "not for clients"),
    );
    authsvc.route("/slow", Reply::new(200, "").delay(Duration::from_secs(3)));
    authsvc.route("/teapot", Reply::new(418, ""));
    let dead = format!("http://127.0.0.1:{}", free_port());
    let ext = wasm("ext-auth");
    let plugin = |name: &str, config: &str| {
        format!(
            "  {name}: {{wasm: {ext}, bodies: false, calls: [authsvc, dead], config: {{{config}}}}}\n"
        )
    };
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\n  authsvc: {{url: \"{}\"}}\n  dead: {{url: \"{dead}\"}}\n\
         groups:\n  main: {{main: web}}\n\
         cache: {{memory: 16MiB}}\n\
         plugins:\n{}{}{}{}{}{}{}{}\
         routes:\n\
         \x20 - {{path: /ok, group: main, plugins: [ok]}}\n\
         \x20 - {{path: /no, group: main, plugins: [no]}}\n\
         \x20 - {{path: /slow, group: main, plugins: [slow]}}\n\
         \x20 - {{path: /down, group: main, plugins: [down]}}\n\
         \x20 - {{path: /open, group: main, plugins: [open]}}\n\
         \x20 - {{path: /weird, group: main, plugins: [weird]}}\n\
         \x20 - {{path: /bad, group: main, plugins: [bad]}}\n\
         \x20 - {{path: /nolist, group: main, plugins: [nolist]}}\n",
        origin.url(""),
        authsvc.url(""),
        plugin(
            "ok",
            "upstream: authsvc, path: /allow, forward: [x-session], copy: [x-user]"
        ),
        plugin("no", "upstream: authsvc, path: /deny"),
        plugin("slow", "upstream: authsvc, path: /slow, timeout_ms: 200"),
        plugin("down", "upstream: dead"),
        plugin("open", "upstream: dead, on_failure: allow"),
        plugin("weird", "upstream: authsvc, path: /teapot"),
        plugin("bad", "upstream: no-such-origin"),
        plugin("nolist", "upstream: web"),
    );
    let c = Cascade::start(&yaml);
    let get = |path: &str| client().get(c.url(path));

    // Allowed: the service saw the request's facts and forwarded header; the origin sees the
    // identity the service gave, never the one the client claimed. A cache hit is checked too.
    for want in ["MISS", "HIT"] {
        let r = get("/ok/a.jpg?v=1")
            .header("x-session", "t0k")
            .header("x-user", "mallory")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-cache"), want);
        assert_eq!(r.text().await.unwrap(), "object bytes");
    }
    assert_eq!(authsvc.stats.count("GET"), 2, "every request is checked");
    let check = authsvc.stats.last().unwrap();
    assert_eq!(check.uri, "/allow");
    assert_eq!(check.header("x-original-uri"), "/ok/a.jpg?v=1");
    assert_eq!(check.header("x-original-method"), "GET");
    assert_eq!(check.header("x-session"), "t0k");
    assert_eq!(
        check.header("x-user"),
        "",
        "the client's claim never reaches the service"
    );
    assert!(check
        .header("x-original-remote-addr")
        .starts_with("127.0.0.1"));
    assert_eq!(
        check.header("host"),
        authsvc.authority(),
        "the origin's Host"
    );
    let seen = origin.stats.last().unwrap();
    assert_eq!(seen.header("x-user"), "alice");

    // Refused: the service's status, challenge and body reach the client, nothing else.
    let r = get("/no/a.jpg").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(header(&r, "www-authenticate"), "Basic realm=\"media\"");
    assert_eq!(header(&r, "x-internal"), "");
    assert_eq!(r.text().await.unwrap(), "go away\n");

    // A service slower than the timeout: 503 well before its answer comes.
    let t0 = Instant::now();
    let r = get("/slow/a.jpg").send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // Unreachable: 503 (deny) or let through (on_failure: allow).
    let r = get("/down/a.jpg").send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("unavailable"));
    let r = get("/open/a.jpg").send().await.unwrap();
    assert_eq!(r.status(), 200);
    // A status that is neither a yes nor a no: 502. An upstream that is not an origin: the
    // host refuses the call (BAD_ARGUMENT) and the plugin answers 500.
    assert_eq!(get("/weird/a.jpg").send().await.unwrap().status(), 502);
    assert_eq!(get("/bad/a.jpg").send().await.unwrap().status(), 500);
    assert!(c.stderr().contains("no origin named `no-such-origin`"));
    // A plugin reaches only the origins in its `calls:` list: `web` is not in it.
    assert_eq!(get("/nolist/a.jpg").send().await.unwrap().status(), 500);
    assert!(c
        .stderr()
        .contains("origin `web` is not in the plugin's `calls:` list"));
    // A header value that is not UTF-8 (HTTP allows such bytes) does not crash the plugin:
    // it is not forwarded, and the request is still checked and served.
    let raw = raw_request(
        c.addr,
        b"GET /ok/b.jpg HTTP/1.1\r\nHost: x\r\nX-Session: \xff\xfe\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_eq!(raw.status, 200, "{}", raw.text());
    let check = authsvc.stats.last().unwrap();
    assert_eq!(check.header("x-original-uri"), "/ok/b.jpg");
    assert!(!check.headers.contains_key("x-session"));

    assert_eq!(
        origin.stats.count("GET"),
        3,
        "only /ok's misses and /open reached the origin"
    );
    let m = c.metrics().await;
    let calls = |plugin: &str, outcome: &str| {
        metric_sum(
            &m,
            "cascade_plugin_http_calls_total",
            &[("plugin", plugin), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(calls("ok", "ok"), 3.0, "{m}");
    assert_eq!(calls("no", "ok"), 1.0, "{m}");
    assert_eq!(calls("slow", "timeout"), 1.0, "{m}");
    assert_eq!(calls("down", "error"), 1.0, "{m}");
    assert_eq!(calls("bad", "ok") + calls("bad", "error"), 0.0, "{m}");
    let traps = metric_sum(&m, "cascade_plugin_traps_total", &[]).unwrap_or(0.0);
    assert_eq!(traps, 0.0, "{m}");
}

/// A plugin that pauses the request for an HTTP call and never resumes it fails with its
/// on_error instead of hanging the request; one that traps in its call-response callback
/// costs only its request; a plugin after it in the chain still runs after a call.
#[tokio::test]
async fn a_plugin_that_never_resumes_after_its_call_fails_by_its_on_error() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "ok"));
    let authsvc = HttpOrigin::start();
    authsvc.set_default(Reply::new(204, ""));
    let chaos = wasm("chaos");
    let probe = wasm("probe");
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\n  svc: {{url: \"{}\"}}\ngroups:\n  main: {{main: web}}\n\
         plugins:\n\
         \x20 stall_deny: {{wasm: {chaos}, calls: [svc], on_error: deny, config: {{mode: stall, upstream: svc}}}}\n\
         \x20 stall_allow: {{wasm: {chaos}, calls: [svc], on_error: allow, config: {{mode: stall, upstream: svc}}}}\n\
         \x20 trap_in_answer: {{wasm: {chaos}, calls: [svc], on_error: deny, config: {{mode: trap, phase: callout, upstream: svc, only_if_header: x-chaos}}}}\n\
         \x20 flood: {{wasm: {chaos}, calls: [svc], config: {{mode: flood, upstream: svc}}}}\n\
         \x20 rstall: {{wasm: {chaos}, calls: [svc], on_error: deny, config: {{mode: stall, phase: response, upstream: svc}}}}\n\
         \x20 rflood: {{wasm: {chaos}, calls: [svc], on_error: allow, config: {{mode: flood, phase: response, upstream: svc}}}}\n\
         \x20 ph: {{wasm: {probe}, config: {{greeting: hi}}}}\n\
         routes:\n\
         \x20 - {{path: /deny, group: main, plugins: [stall_deny, ph]}}\n\
         \x20 - {{path: /allow, group: main, plugins: [stall_allow, ph]}}\n\
         \x20 - {{path: /trap, group: main, plugins: [trap_in_answer, ph]}}\n\
         \x20 - {{path: /flood, group: main, plugins: [flood]}}\n\
         \x20 - {{path: /rstall, group: main, plugins: [ph, rstall]}}\n\
         \x20 - {{path: /rflood, group: main, plugins: [rflood]}}\n",
        origin.url(""),
        authsvc.url(""),
    );
    let c = Cascade::start(&yaml);
    let client = client_with_timeout(Duration::from_secs(10));

    let r = client.get(c.url("/deny/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("did not resume"));
    let r = client.get(c.url("/allow/x")).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "on_error: allow goes on without the plugin"
    );
    assert_eq!(header(&r, "x-probe-greeting"), "hi", "the next plugin ran");

    let r = client
        .get(c.url("/trap/x"))
        .header("x-chaos", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let r = client.get(c.url("/trap/x")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the trap cost only its request");
    assert_eq!(header(&r, "x-probe-greeting"), "hi");
    // Unarmed, trap_in_answer makes no call: only the stalls' and the armed request's.
    assert_eq!(authsvc.stats.total(), 3);
    // A plugin calling from every answer for ever: the host refuses the 17th call of the
    // request, and the plugin, paused and never resuming, fails by its on_error.
    authsvc.stats.reset();
    let r = client.get(c.url("/flood/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(authsvc.stats.total(), 16);
    assert!(c.stderr().contains("more than 16 calls for one request"));

    // The same in the response phase (the response waits for the calls): a plugin that
    // never resumes the response cannot fail it any more (it is under way; on_error only
    // counts) but cannot hang it either, and the plugins after it still run (`ph` runs
    // after `rstall`: response headers go in reverse chain order).
    authsvc.stats.reset();
    let r = client.get(c.url("/rstall/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-chaos"), "calling");
    assert_eq!(header(&r, "x-probe-greeting"), "hi");
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(authsvc.stats.total(), 1);
    assert!(c
        .stderr()
        .contains("[rstall] paused the stream for its HTTP calls"));
    let r = client.get(c.url("/rflood/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(authsvc.stats.total(), 1 + 16, "the 17th call is refused");

    let m = c.metrics().await;
    let fails = |p: &str, a: &str| {
        metric_sum(
            &m,
            "cascade_plugin_failures_total",
            &[("plugin", p), ("action", a)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(fails("stall_deny", "deny"), 1.0, "{m}");
    assert_eq!(fails("stall_allow", "allow"), 1.0, "{m}");
    assert_eq!(fails("trap_in_answer", "deny"), 1.0, "{m}");
    assert_eq!(fails("rstall", "deny"), 1.0, "{m}");
    assert_eq!(fails("rflood", "allow"), 1.0, "{m}");
    let traps = metric_sum(
        &m,
        "cascade_plugin_traps_total",
        &[("plugin", "trap_in_answer"), ("kind", "trap")],
    );
    assert_eq!(traps, Some(1.0), "{m}");
}

/// A request waiting for a slow service holds no instance slot: with one slot for the whole
/// process, two requests wait for the same slow check at once and both get through.
#[tokio::test]
async fn requests_waiting_for_http_calls_hold_no_instance() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "ok"));
    let authsvc = HttpOrigin::start();
    authsvc.set_default(Reply::new(200, "").delay(Duration::from_millis(800)));
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\n  authsvc: {{url: \"{}\"}}\ngroups:\n  main: {{main: web}}\n\
         plugins:\n\
         \x20 ea: {{wasm: {}, bodies: false, calls: [authsvc], config: {{upstream: authsvc, timeout_ms: 5000}}}}\n\
         routes:\n  - {{path: /, group: main, plugins: [ea]}}\n",
        origin.url(""),
        authsvc.url(""),
        wasm("ext-auth"),
    );
    let c = Cascade::builder(&yaml)
        .server("plugin_instances", "1")
        .start();
    let t0 = Instant::now();
    let (a, b) = tokio::join!(
        client().get(c.url("/a")).send(),
        client().get(c.url("/b")).send()
    );
    assert_eq!(a.unwrap().status(), 200);
    assert_eq!(b.unwrap().status(), 200);
    assert_eq!(authsvc.stats.total(), 2);
    // Both checks were in flight together (one after the other would take 1.6 s).
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    let m = c.metrics().await;
    let full = metric_sum(&m, "cascade_plugin_pool_full_total", &[]).unwrap_or(0.0);
    assert_eq!(full, 0.0, "{m}");
}

/// An authorization service that sends an informational answer (103 Early Hints) before its
/// real one: the call reads past it (Pingora's client stops at each 1xx).
#[tokio::test]
async fn an_http_call_reads_past_informational_answers() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "ok"));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let svc = listener.local_addr().unwrap();
    // Answers at most 4 connections, each bounded by a read timeout.
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming().take(6) {
            let Ok(mut s) = stream else { continue };
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(
                b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n\
                  HTTP/1.1 200 OK\r\nx-user: bob\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    });
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\n  svc: {{url: \"http://{svc}\"}}\ngroups:\n  main: {{main: web}}\n\
         plugins:\n\
         \x20 ea: {{wasm: {}, calls: [svc], config: {{upstream: svc, copy: [x-user]}}}}\n\
         \x20 probe: {{wasm: {}, config: {{greeting: hi}}}}\n\
         routes:\n  - {{path: /hints, group: hinted, plugins: [probe]}}\n  - {{path: /, group: main, plugins: [ea]}}\n",
        origin.url(""),
        wasm("ext-auth"),
        wasm("probe"),
    );
    let yaml = yaml.replace("groups:\n", "groups:\n  hinted: {main: svc}\n");
    let c = Cascade::start(&yaml);
    let r = client().get(c.url("/a")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(origin.stats.last().unwrap().header("x-user"), "bob");
    // An origin's own 103 goes through the response filters too: the plugins run on the
    // final response only (on the 103 they would park and never see the 200).
    let r = client().get(c.url("/hints/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-probe-greeting"), "hi");
}

/// Ticks: a plugin that asks for a period gets `proxy_on_tick`, and its ticks' HTTP calls
/// refresh what it keeps in shared data (the probe fetches a value every 100 ms).
#[tokio::test]
async fn ticks_reach_plugins_and_their_calls_refresh_shared_data() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "media"));
    let cfgsvc = HttpOrigin::start();
    cfgsvc.route("/tenants.json", Reply::new(200, "v1"));
    let yaml = format!(
        "origins:\n  web: {{url: \"{}\"}}\n  cfg: {{url: \"{}\"}}\ngroups:\n  main: {{main: web}}\n\
         plugins:\n\
         \x20 probe: {{wasm: {}, calls: [cfg], config: {{greeting: hi, refresh: {{upstream: cfg, path: /tenants.json, every_ms: 100}}}}}}\n\
         routes:\n  - {{path: /, group: main, plugins: [probe]}}\n",
        origin.url(""),
        cfgsvc.url(""),
        wasm("probe"),
    );
    let c = Cascade::start(&yaml);
    let until = |want: &'static str| {
        let c = &c;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let r = client().get(c.url("/x")).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let got = header(&r, "x-probe-refreshed");
                if got == want {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "x-probe-refreshed is {got:?}, want {want:?}\n{}",
                    c.stderr_tail(30)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    until("v1").await;
    cfgsvc.route("/tenants.json", Reply::new(200, "v2"));
    until("v2").await;
    let calls = cfgsvc.stats.total();
    assert!(calls >= 2, "{calls} refresh calls");
    let m = c.metrics().await;
    let ok = metric_sum(
        &m,
        "cascade_plugin_http_calls_total",
        &[("plugin", "probe"), ("outcome", "ok")],
    );
    assert!(ok.unwrap_or(0.0) >= 2.0, "{m}");
}

/// Shared queues: every request enqueues its path (the probe resolves its own queue by name),
/// and the root context that registered the queue drains it on `proxy_on_queue_ready`.
#[tokio::test]
async fn shared_queues_carry_messages_to_the_registering_root_context() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "media"));
    let yaml = format!(
        "{}plugins:\n  pq: {{wasm: {}, config: {{greeting: hi}}}}\n\
         routes:\n  - {{path: /, group: main, plugins: [pq]}}\n",
        http_origin_yaml(&origin),
        wasm("probe"),
    );
    let c = Cascade::start(&yaml);
    for i in 0..5 {
        let r = client()
            .get(c.url(&format!("/q/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = c.metrics().await;
        let n = metric_sum(
            &m,
            "cascade_plugin_counter",
            &[("plugin", "pq"), ("name", "probe_dequeued")],
        );
        if n == Some(5.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dequeued {n:?}\n{}",
            c.stderr_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!c.stderr().contains("queue probe.paths not found"));
    assert!(!c.stderr().contains("enqueue failed"));
}

/// A plugin whose `proxy_on_tick` traps: the tick costs that instance once, ticks stop for
/// the plugin (instead of discarding every idle instance each period), requests keep being
/// served.
#[tokio::test]
async fn a_trapping_tick_stops_the_plugins_ticks_and_costs_no_request() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "ok"));
    let yaml = format!(
        "{}plugins:\n  tt: {{wasm: {}, config: {{mode: trap, phase: tick}}}}\n\
         routes:\n  - {{path: /, group: main, plugins: [tt]}}\n",
        http_origin_yaml(&origin),
        wasm("chaos"),
    );
    let c = Cascade::start(&yaml);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.stderr().contains("ticks are stopped") {
        let r = client().get(c.url("/a")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(Instant::now() < deadline, "{}", c.stderr_tail(20));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Ticks are 50 ms apart: 300 ms more would show further traps if they went on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        assert_eq!(
            client().get(c.url("/a")).send().await.unwrap().status(),
            200
        );
    }
    let m = c.metrics().await;
    let traps = metric_sum(&m, "cascade_plugin_traps_total", &[("plugin", "tt")]);
    assert_eq!(traps, Some(1.0), "{m}");
    assert_eq!(c.stderr().matches("chaos: tick").count(), 1);
}

/// One request to the `hog` fixture in `mode` (`x-hog-size` / `x-hog-count`).
async fn hog(c: &Cascade, mode: &str, size: usize, count: usize) -> reqwest::Response {
    client()
        .get(c.url("/h"))
        .header("x-hog", mode)
        .header("x-hog-size", size.to_string())
        .header("x-hog-count", count.to_string())
        .send()
        .await
        .unwrap()
}

/// The `x-hog-*` report `name` of a response.
fn hogged(r: &reqwest::Response, name: &str) -> String {
    header(r, &format!("x-hog-{name}"))
}

/// Item 7: every allocation a guest can drive is bounded. The `hog` fixture tries each bound
/// (huge fd_writes and log lines, shared data past its limits, thousands of properties,
/// queues and metrics, a body grown past limits.body, header floods, oversized local
/// responses and calls, hostile pointers, a lying allocator) and reports the status it got:
/// each is the exact ABI status, the request next to it works, cascade stays up, and its
/// memory does not grow with what the plugin asked for.
#[tokio::test]
async fn guest_driven_allocations_are_bounded() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "ok"));
    let yaml = format!(
        "{}plugins:\n  hog:\n    wasm: {}\n    calls: [web]\n    config: hog\n    \
         limits: {{body: 64KiB, headers: 16KiB, shared_data: 1MiB, shared_value: 256KiB}}\n\
         routes:\n  - {{path: /, group: main, plugins: [hog]}}\n",
        http_origin_yaml(&origin),
        wasm("hog")
    );
    let mut c = Cascade::start(&yaml);
    let t0 = Instant::now();
    let plain = |round: usize, after: &'static str| {
        let c = &c;
        async move {
            let r = client().get(c.url("/plain")).send().await.unwrap();
            assert_eq!(r.status(), 200, "the request after {after} (round {round})");
            assert_eq!(header(&r, "x-hog"), "none");
            assert_eq!(r.text().await.unwrap(), "ok");
        }
    };
    plain(0, "start").await;
    let (rss0, hwm0) = (c.vm_rss_kib(), c.vm_hwm_kib());

    for round in 0..3 {
        // Hostile pointers and lengths: INVALID_MEMORY_ACCESS (6), WASI FAULT (21).
        let r = hog(&c, "bogus", 0, 1).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            hogged(&r, "bogus"),
            "log=6,log_len=6,fd_iovs=21,fd_data=21,fd_ret=21,pairs_ret=6,value_key=6,add_key=6,\
             set_pairs=6,prop_path=6,prop_ret=6,set_prop=6,shared_key=6,shared_ret=6,buffer_ret=6,\
             buffer_status=6,metric=6,queue=6,call=6,local=6,random=21,clock=21,environ=21"
        );
        plain(round, "bogus pointers").await;
        // An allocator that answers out of bounds, too near the end, null, or calls back in.
        let r = hog(&c, "alloc", 0, 1).await;
        assert_eq!(hogged(&r, "alloc"), "bogus=6,edge=6,null=10,reenter=0/10");
        plain(round, "a lying allocator").await;

        // fd_write: 64 KiB and 1024 iovecs per call (INVAL, 28); 1024 iovecs naming the same
        // MiB would otherwise copy 1 GiB.
        let r = hog(&c, "fd_write", 100, 1).await;
        assert_eq!(
            (hogged(&r, "status"), hogged(&r, "written")),
            ("0".into(), "100".into())
        );
        let r = hog(&c, "fd_write", 1 << 20, 1024).await;
        assert_eq!(hogged(&r, "status"), "28");
        let r = hog(&c, "fd_write", 1, 2000).await;
        assert_eq!(hogged(&r, "status"), "28", "more than 1024 iovecs");
        plain(round, "fd_write").await;

        // proxy_log: a MiB message is cut to 16 KiB and answered OK (the SDK panics otherwise).
        let r = hog(&c, "log", 1 << 20, 3).await;
        assert_eq!(
            (hogged(&r, "ok"), hogged(&r, "status")),
            ("3".into(), "0".into())
        );
        plain(round, "proxy_log").await;

        // Shared data: values up to limits.shared_value, 1 MiB in all (BAD_ARGUMENT, 2).
        let r = hog(&c, "shared", 256 << 10, 200).await;
        assert_eq!(
            (hogged(&r, "ok"), hogged(&r, "status")),
            ("3".into(), "2".into()),
            "three 256 KiB values fit in 1 MiB, a fourth does not (every round: overwriting a value with one of the same size is fine)"
        );
        let r = hog(&c, "shared", (256 << 10) + 1, 1).await;
        assert_eq!(
            (hogged(&r, "ok"), hogged(&r, "status")),
            ("0".into(), "2".into())
        );
        let r = hog(&c, "shared_key", 5000, 1).await;
        assert_eq!(hogged(&r, "status"), "2", "a key over 4 KiB");
        plain(round, "shared data").await;

        // Custom properties: 64 per request, 16 KiB each, 64 KiB in all; paths up to 4 KiB.
        let r = hog(&c, "props", 10, 10_000).await;
        assert_eq!(
            (hogged(&r, "ok"), hogged(&r, "status")),
            ("64".into(), "2".into())
        );
        let r = hog(&c, "props", 20_000, 1).await;
        assert_eq!(
            (hogged(&r, "ok"), hogged(&r, "status")),
            ("0".into(), "2".into())
        );
        let r = hog(&c, "props", 16 << 10, 100).await;
        assert_eq!(
            (hogged(&r, "ok"), hogged(&r, "status")),
            ("3".into(), "2".into())
        );
        let r = hog(&c, "props_path", 100_000, 1).await;
        assert_eq!(
            (hogged(&r, "status"), hogged(&r, "get")),
            ("2".into(), "1".into())
        );
        plain(round, "custom properties").await;

        // Queues (16 per plugin, names up to 256 bytes) and metrics (256, names up to 256).
        let r = hog(&c, "queues", 0, 100).await;
        assert_eq!(
            (hogged(&r, "ok"), hogged(&r, "status")),
            ("16".into(), "2".into())
        );
        let r = hog(&c, "queue_name", 1000, 1).await;
        assert_eq!(hogged(&r, "status"), "2");
        let r = hog(&c, "metrics", 0, 1000).await;
        assert_eq!(
            (hogged(&r, "ok"), hogged(&r, "status")),
            ("256".into(), "2".into())
        );
        let r = hog(&c, "metric_name", 1000, 1).await;
        assert_eq!(hogged(&r, "status"), "2");
        plain(round, "queues and metrics").await;

        // A body grows up to limits.body (64 KiB) by proxy_set_buffer_bytes, no further.
        origin.stats.reset();
        let r = client()
            .post(c.url("/h"))
            .header("x-hog", "body")
            .header("x-hog-size", (16 << 10).to_string())
            .header("x-hog-count", "100")
            // Chunked: the body's length changes on the way.
            .body(reqwest::Body::wrap_stream(futures::stream::once(async {
                Ok::<_, std::io::Error>(b"hello".to_vec())
            })))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            (hogged(&r, "ok"), hogged(&r, "status"), hogged(&r, "body")),
            ("3".into(), "2".into(), (5 + 3 * (16 << 10)).to_string())
        );
        assert_eq!(origin.stats.request_bytes(), 5 + 3 * (16 << 10) as u64);
        plain(round, "a grown body").await;

        // Header floods: 10,000 add_header calls all answer OK (the SDK traps otherwise);
        // the map stops growing at limits.headers (16 KiB) / 256 headers.
        for (size, what) in [(100, "bytes"), (1, "count")] {
            origin.stats.reset();
            let r = hog(&c, "headers", size, 10_000).await;
            assert_eq!(r.status(), 200);
            assert_eq!(
                (hogged(&r, "ok"), hogged(&r, "status")),
                ("10000".into(), "0".into())
            );
            let seen = origin.stats.last().unwrap();
            let bytes: usize = seen
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len())
                .sum();
            assert!(
                seen.headers.len() <= 256 + 2,
                "{what}: {} headers",
                seen.headers.len()
            );
            assert!(
                bytes <= (16 << 10) + 512,
                "{what}: {bytes} bytes of headers"
            );
            assert!(
                seen.headers.len() > 100,
                "{what}: the flood got in up to the bound"
            );
        }
        // (Read raw: reqwest takes 100 headers at most.)
        let req = format!(
            "GET /h HTTP/1.1\r\nHost: {}\r\nx-hog: resp_headers\r\nx-hog-size: 100\r\n\
             x-hog-count: 10000\r\nConnection: close\r\n\r\n",
            c.addr
        );
        let addr = c.addr;
        let r = tokio::task::spawn_blocking(move || {
            raw_request(addr, req.as_bytes(), Duration::from_secs(10))
        })
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        let lines: Vec<&str> = r.head.lines().skip(1).filter(|l| !l.is_empty()).collect();
        let bytes: usize = lines.iter().map(|l| l.len() - 2).sum();
        assert!(lines.len() <= 256 + 8, "{} response headers", lines.len());
        assert!(lines.len() > 100, "the flood got in up to the bound");
        assert!(
            bytes <= (16 << 10) + 1024,
            "{bytes} bytes of response headers"
        );
        let head = r.head.to_ascii_lowercase();
        assert!(head.contains("x-hog-ok: 10000\r\n") && head.contains("x-hog-status: 0\r\n"));
        origin.stats.reset();
        let r = hog(&c, "method", 100_000, 1).await;
        assert_eq!(
            (r.status().as_u16(), hogged(&r, "status")),
            (200, "0".into())
        );
        assert_eq!(
            origin.stats.last().unwrap().method,
            "GET",
            "a 100 KB method is dropped"
        );
        let r = hog(&c, "header_pairs", 10, 10_000).await;
        assert_eq!(hogged(&r, "status"), "2", "more pairs than a header holds");
        let r = hog(&c, "header_pairs", 2 << 20, 1).await;
        assert_eq!(hogged(&r, "status"), "2", "a map larger than any header");
        let r = hog(&c, "header_pairs", 10, 10).await;
        assert_eq!(
            (r.status().as_u16(), hogged(&r, "status")),
            (200, "0".into())
        );
        plain(round, "header floods").await;

        // Local responses (body up to limits.body, headers up to limits.headers) and HTTP
        // calls (headers up to 264 pairs, 64 KiB): BAD_ARGUMENT, the request goes on.
        let r = hog(&c, "local", 100 << 10, 1).await;
        assert_eq!(
            (r.status().as_u16(), hogged(&r, "status")),
            (200, "2".into())
        );
        assert_eq!(
            r.text().await.unwrap(),
            "ok",
            "refused: the origin answered"
        );
        let r = hog(&c, "local", 10, 1).await;
        assert_eq!(header(&r, "x-hog-local"), "1");
        assert_eq!(r.text().await.unwrap(), "hhhhhhhhhh");
        let r = hog(&c, "local_headers", 100, 1000).await;
        assert_eq!(hogged(&r, "status"), "2");
        let r = hog(&c, "http_call", 10, 1000).await;
        assert_eq!(hogged(&r, "status"), "2");
        plain(round, "local responses and calls").await;
    }

    assert!(c.is_running(), "cascade is up");
    let (rss1, hwm1) = (c.vm_rss_kib(), c.vm_hwm_kib());
    eprintln!("RSS {rss0} -> {rss1} KiB, peak {hwm0} -> {hwm1} KiB");
    assert!(
        rss1.saturating_sub(rss0) < 64 << 10,
        "RSS grew from {rss0} KiB to {rss1} KiB"
    );
    assert!(
        hwm1.saturating_sub(hwm0) < 128 << 10,
        "peak RSS grew from {hwm0} KiB to {hwm1} KiB"
    );
    // Every kind of hit is counted; the log says so, at most every 10 s per limit.
    let m = c.metrics().await;
    for limit in [
        "fd_write",
        "log",
        "headers",
        "shared_data",
        "properties",
        "queues",
        "metrics",
        "body",
        "local_response",
        "http_call",
    ] {
        let n = metric_sum(
            &m,
            "cascade_plugin_limit_hits_total",
            &[("plugin", "hog"), ("limit", limit)],
        );
        assert!(n.is_some_and(|n| n >= 3.0), "{limit}: {n:?}\n{m}");
    }
    let defined = m
        .lines()
        .filter(|l| l.starts_with("cascade_plugin_counter{") && l.contains("plugin=\"hog\""))
        .count();
    assert_eq!(defined, 256, "metric series a plugin can mint");
    let err = c.stderr();
    assert!(err.contains("more bytes cut"), "a long log line is cut");
    assert!(
        err.lines().all(|l| l.len() < 20 << 10),
        "no log line longer than the cut"
    );
    let logged = err.matches("limit `queues`").count();
    let periods = t0.elapsed().as_secs() as usize / 10 + 1;
    assert!(
        (1..=periods).contains(&logged),
        "hits are logged, at most once per 10 s: {logged} lines in {periods} period(s)"
    );
}
