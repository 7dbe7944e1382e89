//! The admin listener (token, health, readiness, Prometheus metrics) and the
//! logs (access lines, JSON format), on the real `ignis` binary.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

pub(crate) const TOKEN: &str = "test-admin-token-0123456789";

/// A manifest serving the `hello` and `limits` examples.
pub(crate) fn manifest(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    write(
        dir,
        "ignis.toml",
        &format!(
            "[server]\ncache_dir = \"{}\"\nshutdown_grace = \"30s\"\nheader_read_timeout = \"1s\"\n{extra}\n\
             [functions.hello]\ncomponent = \"{}\"\ntenant = \"acme\"\n\
             [functions.limits]\ncomponent = \"{}\"\n\
             [[routes]]\npath = \"/hello\"\nfunction = \"hello\"\n\
             [[routes]]\npath = \"/limits/...\"\nfunction = \"limits\"\n",
            shared_cache(),
            wasm("hello"),
            wasm("limits"),
        ),
    )
}

/// `ignis serve` with the admin token in the environment and the admin
/// listener on a free port; returns the process and the admin address.
pub(crate) fn serve_with_admin(
    manifest: &std::path::Path,
    extra_args: &[&str],
) -> (Proc, SocketAddr) {
    let mut args = vec!["serve", manifest.to_str().unwrap()];
    args.extend_from_slice(extra_args);
    args.extend_from_slice(&["--admin-listen", "127.0.0.1:0"]);
    let mut proc = spawn_with(&args, &[("IGNIS_ADMIN_TOKEN", TOKEN)]);
    let admin = proc.stdout_line("admin on http://").parse().unwrap();
    (proc, admin)
}

pub(crate) async fn admin_get(addr: SocketAddr, path: &str, auth: Option<&str>) -> Reply {
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    send(&client(), req.body(Full::default()).unwrap()).await
}

pub(crate) fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// Parses an OpenMetrics text exposition strictly enough to catch a
/// malformed one: every line is a comment (`# HELP`, `# TYPE`, `# UNIT`) or
/// `name{labels} value` with a number, and the last line is `# EOF`.
/// Returns the samples by `name{labels}` as printed.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    let mut lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.pop(), Some("# EOF"), "exposition must end with # EOF");
    for line in lines {
        if let Some(comment) = line.strip_prefix("# ") {
            let kind = comment.split(' ').next().unwrap();
            assert!(["HELP", "TYPE", "UNIT"].contains(&kind), "{line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "{line}");
        }
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "series twice: {series}"
        );
    }
    samples
}

/// The one sample whose series starts with `name{` and contains every one
/// of `labels` (`key="value"`).
fn sample(samples: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    let found: Vec<_> = samples
        .iter()
        .filter(|(s, _)| {
            s.starts_with(&format!("{name}{{")) && labels.iter().all(|l| s.contains(l))
        })
        .collect();
    assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
    *found[0].1
}

/// `n` GETs of `path` on one HTTP/1.1 connection to `addr`, then one more
/// request (`/nothing-here`, a 404): its answer means the edge has finished
/// recording the `n` before it (a connection's next response is only sent
/// once the previous response body was dropped).
async fn requests_on_one_connection(addr: SocketAddr, path: &str, n: usize) -> Vec<u16> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut statuses = Vec::new();
    for p in std::iter::repeat_n(path, n).chain(["/nothing-here"]) {
        let req = http::Request::get(p)
            .header("host", "localhost")
            .body(Full::<Bytes>::default())
            .unwrap();
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        statuses.push(resp.status().as_u16());
        resp.into_body().collect().await.unwrap();
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_endpoint_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let (proc, admin) = serve_with_admin(&manifest(dir.path(), ""), &[]);
    let wrong_same_length = format!("Bearer {}", "x".repeat(TOKEN.len()));
    let refused = [
        None,
        Some("Bearer"),
        Some("Bearer "),
        Some(wrong_same_length.as_str()),
        Some("Bearer test-admin-token-012345678"), // a prefix of the token
        Some("Basic dGVzdDp0ZXN0"),
        Some("test-admin-token-0123456789"), // no scheme
    ];
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/stats",
        "/no-such-thing",
    ] {
        for auth in refused {
            let r = admin_get(admin, path, auth).await;
            assert_eq!(r.status, 401, "{path} with {auth:?}: {}", r.text());
            assert_eq!(
                r.headers["www-authenticate"],
                "Bearer realm=\"ignis-admin\""
            );
            assert!(!r.text().contains(TOKEN));
        }
    }
    // Two Authorization headers, one of them right: refused.
    let req = http::Request::get(format!("http://{admin}/healthz"))
        .header("authorization", "Bearer nope-nope-nope-nope")
        .header("authorization", bearer())
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&client(), req).await.status, 401);

    let ok = bearer();
    assert_eq!(admin_get(admin, "/healthz", Some(&ok)).await.text(), "ok\n");
    let r = admin_get(admin, "/readyz", Some(&ok)).await;
    assert_eq!((r.status, r.text().as_str()), (200, "ready\n"));
    assert_eq!(admin_get(admin, "/nope", Some(&ok)).await.status, 404);
    let post = http::Request::post(format!("http://{admin}/metrics"))
        .header("authorization", &ok)
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    assert_eq!(send(&client(), post).await.status, 405);

    let logs = stop(proc);
    assert!(
        logs.contains("admin: request without a valid token refused (401)"),
        "{logs}"
    );
    assert!(!logs.contains(TOKEN), "the token must never be logged");
    // Refusals are logged at most once a second, not once per request.
    let logged = logs.matches("without a valid token refused").count();
    assert!(logged < 10, "{logged} refusal lines for 36 refusals");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_target_and_status_as_they_flow() {
    let dir = tempfile::tempdir().unwrap();
    let (proc, admin) = serve_with_admin(&manifest(dir.path(), ""), &[]);
    let auth = bearer();

    let before = admin_get(admin, "/metrics", Some(&auth)).await;
    assert_eq!(before.status, 200);
    assert_eq!(
        before.headers["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let before = parse_exposition(&before.text());
    assert_eq!(sample(&before, "ignis_ready", &[]), 1.0);
    assert_eq!(
        sample(
            &before,
            "ignis_function_instantiations_total",
            &["function=\"hello\""]
        ),
        0.0
    );
    // No request yet: no status series at all.
    assert!(
        !before
            .keys()
            .any(|k| k.starts_with("ignis_requests_total{"))
    );

    let statuses = requests_on_one_connection(proc.addr, "/hello", 7).await;
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 200, 404]);
    let r = get(&client(), &format!("http://{}/limits/trap", proc.addr)).await;
    assert_eq!(r.status, 500, "{}", r.text());
    // A second connection's barrier: the trap's response was dropped
    // before this answer.
    assert_eq!(
        requests_on_one_connection(proc.addr, "/hello", 0).await,
        [404]
    );

    let after = parse_exposition(&admin_get(admin, "/metrics", Some(&auth)).await.text());
    let hello = ["kind=\"function\"", "name=\"hello\"", "tenant=\"acme\""];
    let with_code = |code: &'static str| {
        let mut l = hello.to_vec();
        l.push(code);
        l
    };
    assert_eq!(
        sample(&after, "ignis_requests_total", &with_code("code=\"200\"")),
        7.0
    );
    assert_eq!(
        sample(&after, "ignis_request_duration_seconds_count", &hello),
        7.0
    );
    assert_eq!(
        sample(
            &after,
            "ignis_request_duration_seconds_bucket",
            &[hello.as_slice(), &["le=\"+Inf\""]].concat()
        ),
        7.0
    );
    assert!(sample(&after, "ignis_request_duration_seconds_sum", &hello) > 0.0);
    assert!(sample(&after, "ignis_response_body_bytes_total", &hello) > 0.0);
    // The 404s were the edge's own answers; at least the first one is in.
    assert!(
        sample(
            &after,
            "ignis_requests_total",
            &["kind=\"edge\"", "code=\"404\""]
        ) >= 1.0
    );
    // The trap: a 500 for `limits`, counted as a trap.
    assert_eq!(
        sample(
            &after,
            "ignis_requests_total",
            &["name=\"limits\"", "code=\"500\""]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            "ignis_function_traps_total",
            &["function=\"limits\""]
        ),
        1.0
    );
    // Runtime counters read at scrape time.
    let hello_fn = ["function=\"hello\"", "tenant=\"acme\""];
    assert_eq!(
        sample(&after, "ignis_function_instantiations_total", &hello_fn)
            + sample(&after, "ignis_function_instance_reuses_total", &hello_fn),
        7.0
    );
    assert!(
        sample(
            &after,
            "ignis_function_instantiation_duration_seconds_count",
            &hello_fn
        ) >= 1.0
    );
    assert!(sample(&after, "ignis_function_memory_high_water_bytes", &hello_fn) > 0.0);
    assert!(sample(&after, "ignis_function_cpu_seconds_total", &hello_fn) > 0.0);
    assert!(
        sample(
            &after,
            "ignis_tenant_cpu_seconds_total",
            &["tenant=\"acme\""]
        ) > 0.0
    );
    assert_eq!(
        sample(
            &after,
            "ignis_function_shed_total",
            &[&hello_fn[..], &["reason=\"mailbox_full\""]].concat()
        ),
        0.0
    );
    sigkill(proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_admin_api_is_off_and_the_log_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = manifest(dir.path(), "");
    let mut proc = spawn(&["serve", manifest.to_str().unwrap()]);
    assert_eq!(
        get(&client(), &format!("http://{}/hello", proc.addr))
            .await
            .status,
        200
    );
    let logs = stop_keeping_stdout(&mut proc);
    assert!(
        logs.contains("admin API off: no token configured"),
        "{logs}"
    );
}

/// Stops `proc` (SIGTERM) and returns its stderr; asserts it printed no
/// admin line.
fn stop_keeping_stdout(proc: &mut Proc) -> String {
    signal(&proc.child, "TERM");
    assert!(proc.child.wait().unwrap().success());
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut proc.stdout, &mut rest);
    assert!(!rest.contains("admin on"), "{rest}");
    let stderr = std::mem::replace(&mut proc.stderr, std::thread::spawn(String::new));
    stderr.join().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_bounds_connections_heads_and_slow_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (proc, admin) = serve_with_admin(&manifest(dir.path(), ""), &[]);
    let auth = bearer();

    // An oversized head: 431, whatever the token.
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\nx-pad: {}\r\n\r\n",
        "p".repeat(ignis_admin::MAX_HEAD_BYTES + 1)
    );
    let answer = raw(admin, huge.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // A client that sends half a head and stops is closed at
    // header_read_timeout (1 s here), without an answer.
    let mut slow = tokio::net::TcpStream::connect(admin).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "a stalled head must be closed by the server");

    // A flood of idle connections: past MAX_CONNECTIONS a new one is closed
    // at once, and the held ones do not outlive header_read_timeout.
    let mut held = Vec::new();
    for _ in 0..ignis_admin::MAX_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    // Wait until the listener has taken all of them: a request on one of
    // them would be answered, so send one and read its answer.
    let mut probe = held.pop().unwrap();
    probe
        .write_all(
            format!("GET /healthz HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    probe.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    held.push(probe);
    let extra = raw(
        admin,
        format!("GET /healthz HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(
        extra, "",
        "a connection past the cap must be closed unanswered"
    );
    // Every held connection is closed by the server (header_read_timeout).
    for mut c in held {
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "an idle admin connection was kept open");
    }
    // Slots are free again.
    let r = admin_get(admin, "/healthz", Some(&auth)).await;
    assert_eq!(r.status, 200);
    sigkill(proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_503_while_the_node_drains() {
    let dir = tempfile::tempdir().unwrap();
    let (mut proc, admin) = serve_with_admin(&manifest(dir.path(), ""), &[]);
    let auth = bearer();
    assert_eq!(admin_get(admin, "/readyz", Some(&auth)).await.status, 200);
    // A streaming request in flight keeps the node draining after SIGTERM.
    let mut conn = tokio::net::TcpStream::connect(proc.addr).await.unwrap();
    conn.write_all(b"GET /limits/drip?n=100 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    conn.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    signal(&proc.child, "TERM");
    // The drain has begun once the public listener refuses connections;
    // until then /readyz may still say 200.
    let mut refused = false;
    for _ in 0..1000 {
        if tokio::net::TcpStream::connect(proc.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(refused, "the public listener kept accepting after SIGTERM");
    let r = admin_get(admin, "/readyz", Some(&auth)).await;
    assert_eq!((r.status, r.text().as_str()), (503, "not ready\n"));
    assert_eq!(admin_get(admin, "/healthz", Some(&auth)).await.status, 200);
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).await.unwrap();
    assert!(String::from_utf8_lossy(&rest).contains("drip 99"));
    let status = proc.child.wait().unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_gets_one_access_line_without_its_query() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = manifest(dir.path(), "");
    let proc = spawn(&["serve", manifest.to_str().unwrap()]);
    let r = get(
        &client(),
        &format!("http://{}/hello?token=s3cr3t-in-query", proc.addr),
    )
    .await;
    assert_eq!(r.status, 200);
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(
        requests_on_one_connection(proc.addr, "/hello", 0).await,
        [404]
    );
    let logs = strip_ansi(&stop(proc));
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("ignis::access"))
        .collect();
    let hello = lines
        .iter()
        .find(|l| l.contains(&format!("request_id={id} ")))
        .unwrap_or_else(|| panic!("no access line for request {id}: {logs}"));
    for field in [
        "method=GET",
        "path=\"/hello\"",
        "kind=\"function\"",
        "name=\"hello\"",
        "tenant=\"acme\"",
        "status=200",
        "complete=true",
        "duration_ms=",
        "bytes=",
        "peer=127.0.0.1:",
    ] {
        assert!(hello.contains(field), "{field} missing from {hello}");
    }
    assert!(
        !logs.contains("s3cr3t-in-query"),
        "the query string was logged"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("status=404") && l.contains("kind=\"edge\""))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_and_access_logs_can_be_off() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = manifest(dir.path(), "");
    let proc = spawn(&["serve", manifest.to_str().unwrap(), "--log-format", "json"]);
    let r = get(&client(), &format!("http://{}/hello", proc.addr)).await;
    assert_eq!(r.status, 200);
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(
        requests_on_one_connection(proc.addr, "/hello", 0).await,
        [404]
    );
    let logs = stop(proc);
    let mut access = None;
    for line in logs.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["target"] == "ignis::access" && v["request_id"] == id.as_str() {
            access = Some(v);
        }
    }
    let access = access.unwrap_or_else(|| panic!("no JSON access line: {logs}"));
    assert_eq!(access["status"], 200);
    assert_eq!(access["name"], "hello");
    assert_eq!(access["path"], "/hello");
    assert_eq!(access["level"], "INFO");

    // server.access_log = false: no access lines at all.
    let dir = tempfile::tempdir().unwrap();
    let manifest = self::manifest(dir.path(), "access_log = false");
    let proc = spawn(&["serve", manifest.to_str().unwrap()]);
    assert_eq!(
        get(&client(), &format!("http://{}/hello", proc.addr))
            .await
            .status,
        200
    );
    assert_eq!(
        requests_on_one_connection(proc.addr, "/hello", 0).await,
        [404]
    );
    let logs = stop(proc);
    assert!(!logs.contains("ignis::access"), "{logs}");
}

/// Runs headless Chromium (Debian's, installed by scripts/chromium.sh) with
/// `args`, returning its stdout.
fn chromium(args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .output()
        .expect("running chromium (scripts/chromium.sh installs it)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of attribute `attr` in the first tag of `dom` that contains
/// `marker`.
fn attribute(dom: &str, marker: &str, attr: &str) -> Option<String> {
    let at = dom.find(marker)?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    let tag = &dom[start..end];
    let from = tag.find(&format!("{attr}=\""))? + attr.len() + 2;
    Some(tag[from..from + tag[from..].find('"')?].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_charts_in_a_headless_browser() {
    let dir = tempfile::tempdir().unwrap();
    let (proc, admin) = serve_with_admin(&manifest(dir.path(), ""), &[]);
    let auth = bearer();
    // The page's files need no token and carry no data; the data does.
    let page = admin_get(admin, "/dashboard", None).await;
    assert_eq!(page.status, 200);
    assert!(
        page.headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    assert!(
        !page.text().contains("acme"),
        "the page itself carries no data"
    );
    assert_eq!(admin_get(admin, "/v1/stats", None).await.status, 401);

    // Traffic to `hello` while the browser watches.
    let addr = proc.addr;
    let load = tokio::spawn(async move {
        let c = client();
        loop {
            let _ = get(&c, &format!("http://{addr}/hello")).await;
        }
    });
    let stats = admin_get(admin, "/v1/stats", Some(&auth)).await;
    assert_eq!(stats.status, 200);
    let stats: serde_json::Value = serde_json::from_slice(&stats.body).unwrap();
    let hello = stats["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "hello")
        .expect("hello in /v1/stats");
    assert_eq!(hello["tenant"], "acme");
    assert_eq!(stats["ready"], true);

    let url = format!("http://{admin}/dashboard#token={TOKEN}");
    // Virtual time runs the page's one-second polling several times.
    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        move || chromium(&["--virtual-time-budget=6000", "--dump-dom", &url])
    })
    .await
    .unwrap();
    let artifacts = repo().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    tokio::task::spawn_blocking({
        let shot = shot.clone();
        move || {
            chromium(&[
                "--virtual-time-budget=6000",
                "--window-size=1280,900",
                &format!("--screenshot={}", shot.display()),
                &url,
            ])
        }
    })
    .await
    .unwrap();
    load.abort();
    sigkill(proc);

    std::fs::write(artifacts.join("dashboard.html"), &dom).unwrap();
    assert_eq!(
        attribute(&dom, "id=\"state\"", "data-state").as_deref(),
        Some("live"),
        "{dom}"
    );
    let samples: usize = attribute(&dom, "data-target=\"function/hello\"", "data-samples")
        .unwrap_or_else(|| panic!("no card for hello: {dom}"))
        .parse()
        .unwrap();
    assert!(samples >= 2, "{samples} samples: {dom}");
    let requests: u64 = attribute(&dom, "data-target=\"function/hello\"", "data-requests")
        .unwrap()
        .parse()
        .unwrap();
    assert!(requests > 0);
    let points: usize = attribute(&dom, "class=\"rate\"", "data-points")
        .unwrap()
        .parse()
        .unwrap();
    assert!(points >= 2, "the chart has {points} points");
    assert!(
        dom.contains("data-tenant=\"acme\""),
        "tenants' CPU shares: {dom}"
    );
    assert!(
        dom.contains("data-deploy=\"*\"") && dom.contains("<td>start</td>"),
        "recent changes (the start): {dom}"
    );
    assert!(!dom.contains(TOKEN), "the token must not stay in the page");
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}

/// Runs `ignis ls` with `args` and `token` (none: IGNIS_ADMIN_TOKEN unset);
/// returns (success, stdout, stderr).
fn ls(args: &[&str], token: Option<&str>) -> (bool, String, String) {
    let mut all = vec!["ls"];
    all.extend_from_slice(args);
    admin_command(&all, token)
}

/// Runs an `ignis` admin-API command with `args` and `token` (none:
/// IGNIS_ADMIN_TOKEN unset); returns (success, stdout, stderr).
pub(crate) fn admin_command(args: &[&str], token: Option<&str>) -> (bool, String, String) {
    let mut cmd = ignis();
    cmd.args(args).env_remove("IGNIS_ADMIN_TOKEN");
    if let Some(t) = token {
        cmd.env("IGNIS_ADMIN_TOKEN", t);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_endpoints_and_ls_lists_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let (proc, admin) = serve_with_admin(&manifest(dir.path(), ""), &[]);
    let auth = bearer();
    let doc = admin_get(admin, "/v1/openapi.json", Some(&auth)).await;
    assert_eq!(doc.status, 200);
    let doc: serde_json::Value = serde_json::from_slice(&doc.body).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
    documented.sort();
    let mut served: Vec<&str> = ignis_admin::ENDPOINTS
        .iter()
        .copied()
        .chain(ignis_admin::DASHBOARD.iter().map(|(p, _, _)| *p))
        .chain(ignis_admin::CHANGE_ENDPOINTS.iter().map(|(p, _)| *p))
        .collect();
    served.sort();
    assert_eq!(documented, served, "the document and the server disagree");
    for (path, methods) in ignis_admin::CHANGE_ENDPOINTS {
        let item = paths[path].as_object().unwrap();
        let mut documented: Vec<&str> = item
            .keys()
            .map(String::as_str)
            .filter(|k| *k != "parameters")
            .collect();
        documented.sort();
        let mut methods = methods.to_vec();
        methods.sort();
        assert_eq!(documented, methods, "{path}");
        for method in methods {
            let responses = &item[method]["responses"];
            for status in ["200", "401", "409"] {
                assert!(
                    responses.get(status).is_some(),
                    "{method} {path} documents {status}"
                );
            }
        }
    }
    // Every endpoint answers as documented, with the token and without.
    for path in ignis_admin::ENDPOINTS {
        let responses = &paths[path]["get"]["responses"];
        let status = if path == "/v1/logs" {
            // A stream that never ends: its head is the answer.
            let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
            let request =
                format!("GET {path} HTTP/1.1\r\nhost: a\r\nauthorization: {auth}\r\n\r\n");
            s.write_all(request.as_bytes()).await.unwrap();
            let mut head = [0u8; 12];
            s.read_exact(&mut head).await.unwrap();
            String::from_utf8_lossy(&head[9..12]).parse().unwrap()
        } else {
            admin_get(admin, path, Some(&auth)).await.status
        };
        assert!(
            responses.get(status.to_string()).is_some(),
            "{path} answered {status} with the token"
        );
        assert_eq!(admin_get(admin, path, None).await.status, 401, "{path}");
        assert!(responses.get("401").is_some(), "{path} documents 401");
    }
    for (path, _, _) in ignis_admin::DASHBOARD {
        assert_eq!(paths[path]["get"]["security"], serde_json::json!([]));
        assert_eq!(admin_get(admin, path, None).await.status, 200, "{path}");
    }

    // The listing, through the API and through `ignis ls`.
    let listing = admin_get(admin, "/v1/functions", Some(&auth)).await;
    let listing: serde_json::Value = serde_json::from_slice(&listing.body).unwrap();
    let names: Vec<&str> = listing["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hello", "limits"]);
    assert_eq!(listing["functions"][0]["tenant"], "acme");
    assert_eq!(listing["routes"][0]["path"], "/hello");
    assert_eq!(listing["routes"][0]["kind"], "function");
    assert_eq!(listing["routes"][0]["target"], "hello");

    // `ignis ls` is a separate process: calling it here blocks this
    // thread only, the node serves on.
    let url = format!("http://{admin}");
    let url = url.as_str();
    let (ok, out, err) = ls(&["--admin", url, "--json"], Some(TOKEN));
    assert!(ok, "{err}");
    let from_cli: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(from_cli["functions"][1]["name"], "limits");
    let (ok, out, err) = ls(&["--admin", url], Some(TOKEN));
    assert!(ok, "{err}");
    assert!(out.contains("hello\t1\tacme\t"), "{out}");
    assert!(out.contains("/hello"), "{out}");
    // Bad input: no token, a wrong one, nothing listening, not a URL.
    let (ok, _, err) = ls(&["--admin", url], None);
    assert!(!ok && err.contains("set IGNIS_ADMIN_TOKEN"), "{err}");
    let (ok, _, err) = ls(&["--admin", url], Some("wrong-token-0123456789"));
    assert!(!ok && err.contains("refused the token (401)"), "{err}");
    assert!(
        !err.contains("wrong-token-0123456789"),
        "the token is not echoed"
    );
    let dead = format!("http://{}", dead_addr());
    let (ok, _, err) = ls(&["--admin", &dead], Some(TOKEN));
    assert!(!ok && err.contains("cannot reach the admin API"), "{err}");
    let (ok, _, err) = ls(&["--admin", "ftp://x"], Some(TOKEN));
    assert!(!ok && err.contains("must be an http:// URL"), "{err}");
    sigkill(proc);
}

/// An address nothing listens on.
fn dead_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignis_logs_follows_the_node_and_followers_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let (proc, admin) = serve_with_admin(&manifest(dir.path(), ""), &[]);
    // `ignis logs` in its own process, its output read line by line.
    let mut follower = ignis()
        .args(["logs", "--admin", &format!("http://{admin}")])
        .env("IGNIS_ADMIN_TOKEN", TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let Ok(line) = line else { return };
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    // Requests until the follower shows one's access line (it may connect
    // after the first few).
    let c = client();
    // The receiver is handed back and kept to the end: dropped, the
    // reader thread would stop and close the pipe, `ignis logs` would die
    // of it at its next line, and its follower slot would be free for the
    // ninth follower below (failed once in CI that way).
    let seen = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(200))
                && line.contains("ignis::access")
                && line.contains("path=\"/hello\"")
            {
                return (Some(line), lines_rx);
            }
        }
        (None, lines_rx)
    });
    let load = tokio::spawn({
        let url = format!("http://{}/hello", proc.addr);
        async move {
            loop {
                let _ = get(&c, &url).await;
            }
        }
    });
    let (line, _lines_rx) = seen.await.unwrap();
    let line = line.expect("an access line reached `ignis logs` within 30 s");
    load.abort();
    assert!(line.contains("status=200"), "{line}");
    assert!(
        !line.contains('\u{1b}'),
        "no colours for followers: {line:?}"
    );

    // Seven more followers fit (the first is `ignis logs`); the ninth gets 503.
    let mut held = Vec::new();
    let request =
        format!("GET /v1/logs HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {TOKEN}\r\n\r\n");
    for _ in 0..ignis_admin::logs::MAX_FOLLOWERS - 1 {
        let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        held.push(s);
    }
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 503");
    // Without the token: 401, and no follower slot is taken.
    let r = admin_get(admin, "/v1/logs", None).await;
    assert_eq!(r.status, 401);
    let _ = follower.kill();
    let _ = follower.wait();
    sigkill(proc);
}

/// A fake OTLP/HTTP collector: answers 200 to every POST and hands each
/// body to the channel.
async fn collector() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Bytes>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let tx = tx.clone();
                        async move {
                            assert_eq!(req.uri().path(), "/v1/traces");
                            assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let _ = tx.send(body);
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                Full::<Bytes>::default(),
                            ))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, rx)
}

fn spans_of(
    bodies: &[Bytes],
) -> Vec<(
    opentelemetry_proto::tonic::resource::v1::Resource,
    opentelemetry_proto::tonic::trace::v1::Span,
)> {
    use prost::Message as _;
    let mut out = Vec::new();
    for body in bodies {
        let req =
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
                body.as_ref(),
            )
            .expect("a valid OTLP protobuf body");
        for rs in req.resource_spans {
            for ss in rs.scope_spans {
                assert_eq!(ss.scope.as_ref().unwrap().name, "ignis");
                for s in ss.spans {
                    out.push((rs.resource.clone().unwrap(), s));
                }
            }
        }
    }
    out
}

fn string_attribute(
    span: &opentelemetry_proto::tonic::trace::v1::Span,
    key: &str,
) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(n) => Some(n.to_string()),
            _ => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_go_to_an_otlp_collector_in_the_trace_they_came_with() {
    let (collector_addr, mut bodies) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let path = hello_manifest(
        dir.path(),
        "",
        &format!(
            "[telemetry]\notlp_endpoint = \"http://{collector_addr}/v1/traces\"\nservice_name = \"edge-test\"\n"
        ),
    );
    let proc = spawn(&["serve", path.to_str().unwrap()]);
    let c = client();
    // A request in the caller's trace, and one that starts a trace here.
    let given_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let given = send(
        &c,
        http::Request::get(format!("http://{}/hello", proc.addr))
            .header(
                "traceparent",
                format!("00-{given_trace}-00f067aa0ba902b7-01"),
            )
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(given.status, 200);
    let fresh = get(&c, &format!("http://{}/hello", proc.addr)).await;
    assert_eq!(fresh.status, 200);
    let missing = get(&c, &format!("http://{}/nowhere", proc.addr)).await;
    assert_eq!(missing.status, 404);
    // A caller that did not sample its trace: nothing is exported for it.
    let unsampled = send(
        &c,
        http::Request::get(format!("http://{}/hello", proc.addr))
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
            )
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(unsampled.status, 200);
    // SIGTERM: the node sends what is queued before it exits.
    stop(proc);
    let mut received = Vec::new();
    while let Ok(b) = bodies.try_recv() {
        received.push(b);
    }
    let spans = spans_of(&received);
    assert_eq!(spans.len(), 3, "one span per sampled request");
    assert!(
        !spans
            .iter()
            .any(|(_, s)| hex(&s.trace_id) == "0af7651916cd43dd8448eb211c80319c"),
        "an unsampled trace is not exported"
    );
    let (resource, continued) = spans
        .iter()
        .find(|(_, s)| hex(&s.trace_id) == given_trace)
        .expect("the span of the traced request");
    assert!(
        resource
            .attributes
            .iter()
            .any(|kv| kv.key == "service.name" && format!("{:?}", kv.value).contains("edge-test"))
    );
    assert_eq!(hex(&continued.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(continued.name, "GET hello");
    assert_eq!(continued.kind, 2, "SERVER");
    assert_eq!(
        string_attribute(continued, "ignis.request_id").as_deref(),
        given.headers["x-request-id"].to_str().ok()
    );
    assert_eq!(
        string_attribute(continued, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert!(continued.end_time_unix_nano > continued.start_time_unix_nano);
    // The trace started here: its id is the request id, no parent.
    let request_id = fresh.headers["x-request-id"]
        .to_str()
        .unwrap()
        .replace('-', "");
    let started = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| hex(&s.trace_id) == request_id)
        .expect("the span of the untraced request");
    assert!(started.parent_span_id.is_empty());
    let not_found = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| string_attribute(s, "http.response.status_code").as_deref() == Some("404"))
        .expect("the edge's own answer is traced too");
    assert_eq!(
        string_attribute(not_found, "ignis.target.kind").as_deref(),
        Some("edge")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_requests_nothing_and_is_logged_once() {
    // Nothing listens on this port (bound, then closed).
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = hello_manifest(
        dir.path(),
        "",
        &format!("[telemetry]\notlp_endpoint = \"http://{dead}/v1/traces\"\nsample_ratio = 1.0\n"),
    );
    let proc = spawn(&["serve", path.to_str().unwrap()]);
    let c = client();
    for _ in 0..200 {
        assert_eq!(
            get(&c, &format!("http://{}/hello", proc.addr)).await.status,
            200
        );
    }
    let log = stop(proc);
    assert_eq!(
        log.matches("trace export failed").count(),
        1,
        "failures are logged at most once a minute:\n{log}"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
