//! Guests in JavaScript (componentize-js) and Python (componentize-py),
//! built from examples/ by the pinned toolchains, served with default
//! limits: hello, key-value and config, fresh and reused instances, and a
//! failing request that stays its own.

use std::sync::atomic::Ordering;

use crate::harness::*;

fn manifest(dir: &std::path::Path, extra: &str) -> String {
    let mut text = format!("[storage]\npath = \"{}\"\n", dir.join("kv.db").display());
    for lang in ["js", "py"] {
        text.push_str(&format!(
            r#"
[functions.hello-{lang}]
component = "{hello}"
{extra}

[functions.kv-{lang}]
component = "{kv}"
key_value_stores = ["default"]
config = {{ greeting = "Welcome!" }}
{extra}

[[routes]]
path = "/hello-{lang}"
function = "hello-{lang}"

[[routes]]
path = "/kv-{lang}/..."
function = "kv-{lang}"
"#,
            hello = language_wasm(&format!("hello-{lang}")),
            kv = language_wasm(&format!("kv-{lang}")),
        ));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_and_python_guests_serve_hello_key_value_and_config() {
    let _builds = BUILDS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&manifest(dir.path(), "")).await;
    let c = client();
    for (lang, name) in [("js", "JavaScript"), ("py", "Python")] {
        let r = get(&c, &server.url(&format!("/hello-{lang}"))).await;
        assert_eq!(
            (r.status, r.text()),
            (200, format!("Hello from Ignis, in {name}!\n"))
        );
        for n in 1..=2 {
            let r = get(&c, &server.url(&format!("/kv-{lang}/visit"))).await;
            assert_eq!(
                (r.status, r.text()),
                (200, format!("Welcome! You are visitor #{n} ({name}).\n"))
            );
        }
        let r = get(
            &c,
            &server.url(&format!("/kv-{lang}/set?key=k&value=from%20{lang}")),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = get(&c, &server.url(&format!("/kv-{lang}/get?key=k"))).await;
        assert_eq!((r.status, r.text()), (200, format!("from {lang}")));
        let r = get(&c, &server.url(&format!("/kv-{lang}/get?key=missing"))).await;
        assert_eq!(r.status, 404, "{}", r.text());
        // 0.2 components: a fresh instance per request by default.
        let kv = server.function(&format!("kv-{lang}"));
        wait_idle(kv).await;
        assert_eq!(kv.stats().reused.load(Ordering::SeqCst), 0);
    }
    // kv-js and kv-py are separate tenants: the same key, separate stores.
    let r = get(&c, &server.url("/kv-py/get?key=k")).await;
    assert_eq!(r.text(), "from py");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_javascript_and_python_instances_keep_answering_correctly() {
    let _builds = BUILDS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&manifest(dir.path(), "reuse = true")).await;
    let c = client();
    for (lang, name) in [("js", "JavaScript"), ("py", "Python")] {
        for n in 1..=5 {
            let r = get(&c, &server.url(&format!("/kv-{lang}/visit"))).await;
            assert_eq!(
                (r.status, r.text()),
                (200, format!("Welcome! You are visitor #{n} ({name}).\n"))
            );
            wait_idle(server.function(&format!("kv-{lang}"))).await;
        }
        let stats = server.function(&format!("kv-{lang}")).stats();
        // One instance served all five, one after the other.
        assert_eq!(stats.fresh_instances.load(Ordering::SeqCst), 1);
        assert_eq!(stats.reused.load(Ordering::SeqCst), 4);
        // Concurrent requests on reused instances all answer.
        let requests: Vec<_> = (0..40)
            .map(|_| {
                let (c, url) = (c.clone(), server.url(&format!("/hello-{lang}")));
                tokio::spawn(async move { get(&c, &url).await })
            })
            .collect();
        for r in requests {
            let r = r.await.unwrap();
            assert_eq!(
                (r.status, r.text()),
                (200, format!("Hello from Ignis, in {name}!\n"))
            );
        }
    }
    server.shutdown().await;
}
