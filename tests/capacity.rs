//! `server.max_connections` and the open-files limit (`src/capacity.rs`), driven over real
//! sockets: an idle keep-alive makes room for a new client at the cap, a new client with no
//! idle one to replace gets a 503 that it can read, a flood of connections past the cap
//! leaves the count where it was, and cascade raises its soft open-files limit.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

fn connect(c: &Cascade) -> TcpStream {
    let s = TcpStream::connect_timeout(&c.addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Sends a keep-alive GET and reads its response: (status, head). `None` when the
/// connection was closed before a response came.
fn get(s: &mut TcpStream, path: &str) -> Option<(u16, String)> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    read_answer(s)
}

/// Reads one response with a `Content-Length`: (status, head); `None` when the connection
/// closes first.
fn read_answer(s: &mut TcpStream) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len = content_length(&head).unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, head))
}

/// `n` clients mid-request: each has sent a GET of `/held`, which `origin` answers after
/// 3 s, and the origin has it, so none is waiting for a request (never closed to make room).
fn mid_request(c: &Cascade, origin: &HttpOrigin, n: usize) -> Vec<TcpStream> {
    origin.route("/held", Reply::new(200, "ok").delay(Duration::from_secs(3)));
    let before = origin.stats.count("GET");
    let held: Vec<TcpStream> = (0..n)
        .map(|_| {
            let mut s = connect(c);
            s.write_all(b"GET /held HTTP/1.1\r\nHost: h\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while origin.stats.count("GET") < before + n as u64 {
        assert!(
            Instant::now() < deadline,
            "the held requests never reached the origin"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    held
}

/// Reads the answer of a [`mid_request`] client: a 200.
fn finish_request(s: &mut TcpStream) {
    let (status, head) = read_answer(s).expect("an answer");
    assert_eq!(status, 200, "{head}");
}

/// Whether the peer closed `s` within `wait` (EOF or reset) with no bytes sent.
fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(n) => panic!("{n} unexpected bytes"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
        Err(_) => false,
    }
}

async fn metric(c: &Cascade, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&c.metrics().await, name, labels).unwrap_or(0.0)
}

/// `cascade_client_connections_over_limit_total` for `action` (evicted, refused).
async fn over_limit(c: &Cascade, action: &str) -> f64 {
    metric(
        c,
        "cascade_client_connections_over_limit_total",
        &[("action", action)],
    )
    .await
}

/// Waits (bounded) until the open-connections gauge reads `n`.
async fn open_connections_become(c: &Cascade, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = metric(c, "cascade_client_connections", &[]).await;
        if now == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "cascade_client_connections stays {now}, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Cascade behind an origin that answers 200, with `server` settings, once the harness's
/// readiness probe (a connection to the proxy listener) is no longer counted: with a cap of
/// one or two, a probe still counted would take a place (a CI flake: 503 on the first request).
async fn capped(server: &[(&str, &str)]) -> (HttpOrigin, Cascade) {
    let (origin, c) = ok_behind_cascade(server);
    open_connections_become(&c, 0.0).await;
    (origin, c)
}

#[tokio::test]
async fn at_the_cap_the_longest_idle_keepalive_makes_room_for_a_new_client() {
    let (_origin, c) = capped(&[("max_connections", "3")]).await;
    assert_eq!(metric(&c, "cascade_client_connections_max", &[]).await, 3.0);
    let mut idle: Vec<TcpStream> = (0..3)
        .map(|i| {
            let mut s = connect(&c);
            assert_eq!(get(&mut s, &format!("/k{i}")).unwrap().0, 200);
            // The first one has waited longest.
            std::thread::sleep(Duration::from_millis(100));
            s
        })
        .collect();
    open_connections_become(&c, 3.0).await;

    let mut new = connect(&c);
    assert_eq!(get(&mut new, "/new").unwrap().0, 200, "admitted at the cap");
    assert!(
        closed_within(&mut idle[0], Duration::from_secs(5)),
        "the keep-alive idle longest was closed to make room"
    );
    for s in &mut idle[1..] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(get(s, "/again").unwrap().0, 200, "the others are kept");
    }
    assert_eq!(get(&mut new, "/again").unwrap().0, 200);
    assert_eq!(over_limit(&c, "evicted").await, 1.0);
    assert_eq!(over_limit(&c, "refused").await, 0.0);
    open_connections_become(&c, 3.0).await;
}

#[tokio::test]
async fn at_the_cap_with_no_idle_connection_a_new_client_gets_a_503_it_can_read() {
    let (origin, c) = capped(&[("max_connections", "2")]).await;
    let mut busy = mid_request(&c, &origin, 2);
    open_connections_become(&c, 2.0).await;

    // The refused client has sent its whole request. cascade reads it before closing: a
    // close with it unread is a reset, and a client may then lose the answer (Windows
    // drops it; Linux keeps it, so the check is that the close is a FIN, not a reset).
    let mut s = connect(&c);
    s.write_all(b"GET /new HTTP/1.1\r\nHost: h\r\nx-pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let end = loop {
        let mut b = [0u8; 4096];
        match s.read(&mut b) {
            Ok(0) => break Ok(()),
            Ok(n) => answer.extend_from_slice(&b[..n]),
            Err(e) => break Err(e),
        }
    };
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("Retry-After: 1\r\n"), "{answer}");
    assert!(answer.contains("Connection: close\r\n"), "{answer}");
    assert!(answer.ends_with("(server.max_connections)\n"), "{answer}");
    assert!(end.is_ok(), "closed with a reset: {end:?}");
    // And cascade still reads what the client sends after the answer, for a while, instead
    // of closing with it unread (a reset, which can overtake the answer on a real network).
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(100));
        s.write_all(b"more of the request body")
            .expect("no reset yet");
    }
    assert_eq!(over_limit(&c, "refused").await, 1.0);

    // The busy ones finish their requests.
    for s in &mut busy {
        finish_request(s);
    }
    // A connection that leaves frees its place.
    drop(busy.pop());
    open_connections_become(&c, 1.0).await;
    let mut next = connect(&c);
    assert_eq!(get(&mut next, "/next").unwrap().0, 200);
}

#[tokio::test]
async fn without_release_idle_an_idle_keepalive_is_not_closed_and_the_new_client_is_refused() {
    // The idle wait that can be cut short is cascade's own (`release_idle`); without it the
    // cap only refuses.
    let (_origin, c) = capped(&[("max_connections", "1"), ("release_idle", "false")]).await;
    let mut idle = connect(&c);
    assert_eq!(get(&mut idle, "/a").unwrap().0, 200);
    open_connections_become(&c, 1.0).await;
    let refused = raw_get(c.addr, "/b");
    assert_eq!(refused.status, 503);
    assert_eq!(get(&mut idle, "/a").unwrap().0, 200, "the idle one is kept");
}

#[tokio::test]
async fn a_flood_past_the_cap_is_refused_and_leaves_the_count_where_it_was() {
    let (origin, c) = capped(&[("max_connections", "4")]).await;
    let mut busy = mid_request(&c, &origin, 4);
    open_connections_become(&c, 4.0).await;
    // 200 connections at once (fewer than the 256 refusals that may linger at once, so each
    // gets its answer): some send a request, some send nothing, some a byte and close, some
    // close at once. None gets past the cap; none is counted for long.
    let flood: Vec<(usize, TcpStream)> = (0..200)
        .map(|i| {
            let mut s = connect(&c);
            match i % 4 {
                0 => s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").unwrap(),
                1 => {}
                2 => {
                    let _ = s.write_all(b"G");
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                _ => {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            }
            (i % 4, s)
        })
        .collect();
    let mut answered = 0;
    for (kind, mut s) in flood {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 503"),
            "past the cap: {text}"
        );
        if kind < 2 {
            assert!(
                text.starts_with("HTTP/1.1 503"),
                "a client still there is answered"
            );
            answered += 1;
        }
    }
    assert_eq!(answered, 100);
    // Every refusal is over; the count is the held four's.
    open_connections_become(&c, 4.0).await;
    for s in &mut busy {
        finish_request(s);
    }
    drop(busy);
    open_connections_become(&c, 0.0).await;
    let mut s = connect(&c);
    assert_eq!(get(&mut s, "/after").unwrap().0, 200);
}

#[tokio::test]
async fn the_soft_open_files_limit_is_raised_and_bounds_the_default_cap() {
    let origin = HttpOrigin::start();
    origin.set_default(Reply::new(200, "ok"));
    let yaml = ok_config(&origin);
    // Within the test's own hard limit (lowering it needs no privilege).
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    let hard = lim.rlim_max.min(4096);
    assert!(
        hard > 512,
        "the test needs a hard open-files limit over 512"
    );
    let c = Cascade::builder(&yaml).nofile(512, hard).start();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", c.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let hard_text = hard.to_string();
    assert_eq!(&fields[3..5], &[hard_text.as_str(); 2], "{line}");
    // (limit - reserve) / 2 descriptors per connection: 1,536 of 4,096.
    let expected = (hard - (hard / 4).min(1024)) / 2;
    assert_eq!(
        metric(&c, "cascade_client_connections_max", &[]).await,
        expected as f64
    );
    assert!(c
        .stderr()
        .contains(&format!("open files limit raised from 512 to {hard}")));

    // A cap set above what the limit allows is kept, with a warning naming the fix.
    let c = Cascade::builder(&yaml)
        .server("max_connections", "100000")
        .nofile(1024, 1024)
        .start();
    assert_eq!(
        metric(&c, "cascade_client_connections_max", &[]).await,
        100000.0
    );
    let err = c.stderr();
    assert!(
        err.contains("server.max_connections 100000 is more than the open files limit (1024)"),
        "{err}"
    );
}

#[test]
fn max_connections_must_not_be_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        "listen:\n  - addr: 127.0.0.1:1\nserver:\n  max_connections: 0\n\
         origins:\n  o: {url: \"http://127.0.0.1:2\"}\ngroups:\n  g: {main: o}\nroutes:\n  - {path: /, group: g}\n",
    )
    .unwrap();
    let out = std::process::Command::new(cascade_bin())
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("c.yaml:4:")
            && err.contains("server.max_connections")
            && err.contains("at least 1"),
        "{err}"
    );
}
