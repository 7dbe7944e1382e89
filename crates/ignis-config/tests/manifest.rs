//! Manifest parsing: good manifests load, bad ones name file, line and key.

use std::path::Path;
use std::time::Duration;

use ignis_config::{ComponentSource, ConfigError, Manifest};

fn parse(text: &str) -> Result<Manifest, ConfigError> {
    Manifest::from_str_at(text, Path::new("/app/ignis.toml"))
}

/// Each `(manifest, line, key, part of the message)` is refused with
/// that line, key and message.
fn assert_all_invalid<S: AsRef<str>>(cases: &[(S, usize, &str, &str)]) {
    for (text, want_line, want_key, want_message) in cases {
        let text = text.as_ref();
        let (line, key, message) = invalid(text);
        assert_eq!(
            (line, key.as_str()),
            (*want_line, *want_key),
            "{text}: {message}"
        );
        assert!(message.contains(want_message), "{text}: {message}");
    }
}

fn invalid(text: &str) -> (usize, String, String) {
    match parse(text) {
        Err(ConfigError::Invalid {
            line,
            key,
            message,
            path,
            ..
        }) => {
            assert_eq!(path, Path::new("/app/ignis.toml"));
            (line, key, message)
        }
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

#[test]
fn full_manifest_loads() {
    let m = parse(
        r#"
[server]
listen = "127.0.0.1:9000"
epoch_tick = "2ms"
max_headers = 50

[functions.hello]
component = "hello.wasm"
memory = "16MiB"
cpu_time = "20ms"
wall_time = "2s"
max_concurrency = 8
max_body = "1KiB"
env = { GREETING = "hi" }
allowed_outbound_hosts = ["API.example.com", "localhost:8081"]

[functions.built]
build = "src/built"
tenant = "acme"

[[routes]]
path = "/hello"
function = "hello"

[[routes]]
host = "*.example.com"
path = "/..."
function = "built"
"#,
    )
    .unwrap();
    assert_eq!(m.server.listen.port(), 9000);
    assert_eq!(m.server.epoch_tick, Duration::from_millis(2));
    assert_eq!(m.server.max_headers, 50);
    assert_eq!(m.server.cache_dir, Path::new("/app/.ignis/cache"));
    let hello = &m.functions["hello"];
    assert_eq!(
        hello.source,
        ComponentSource::Wasm("/app/hello.wasm".into())
    );
    assert_eq!(hello.tenant, "hello");
    assert_eq!(hello.limits.memory_bytes, 16 << 20);
    assert_eq!(hello.limits.cpu_time, Duration::from_millis(20));
    assert_eq!(hello.limits.wall_time, Duration::from_secs(2));
    assert_eq!(hello.limits.max_concurrency, 8);
    assert_eq!(hello.limits.max_body_bytes, 1024);
    assert_eq!(hello.env["GREETING"], "hi");
    assert_eq!(
        hello.allowed_outbound_hosts,
        ["api.example.com", "localhost:8081"]
    );
    let built = &m.functions["built"];
    assert_eq!(
        built.source,
        ComponentSource::RustCrate("/app/src/built".into())
    );
    assert_eq!(built.tenant, "acme");
    assert_eq!(m.routes.len(), 2);
    assert_eq!(m.routes[1].host.as_deref(), Some("*.example.com"));
}

#[test]
fn unknown_key_names_line_and_key() {
    let (line, key, message) =
        invalid("[functions.hello]\ncomponent = \"a.wasm\"\nmemroy = \"1MiB\"\n");
    assert_eq!(line, 3, "{message}");
    assert_eq!(key, "functions.hello.memroy");
    assert!(message.contains("memroy"), "{message}");
}

#[test]
fn bad_size_names_line_and_key() {
    let (line, key, message) =
        invalid("\n[functions.hello]\ncomponent = \"a.wasm\"\nmemory = \"lots\"\n");
    assert_eq!(line, 4, "{message}");
    assert_eq!(key, "functions.hello.memory");
    assert!(message.contains("lots"), "{message}");
}

#[test]
fn wrong_type_names_line_and_key() {
    let (line, key, message) =
        invalid("[functions.a]\ncomponent = \"a.wasm\"\nmax_concurrency = \"many\"\n");
    assert_eq!(line, 3, "{message}");
    assert_eq!(key, "functions.a.max_concurrency");
}

#[test]
fn out_of_range_values_are_rejected() {
    let (line, key, _) = invalid("[functions.a]\ncomponent = \"a.wasm\"\nmax_concurrency = 0\n");
    assert_eq!((line, key.as_str()), (3, "functions.a.max_concurrency"));
    let (line, key, _) = invalid("[functions.a]\ncomponent = \"a.wasm\"\nmemory = \"1KiB\"\n");
    assert_eq!((line, key.as_str()), (3, "functions.a.memory"));
    let (line, key, _) = invalid("[server]\nlisten = \"nowhere\"\n");
    assert_eq!((line, key.as_str()), (2, "server.listen"));
    let (line, key, _) = invalid("[functions.a]\ncomponent = \"a.wasm\"\ncpu_time = 5\n");
    assert_eq!((line, key.as_str()), (3, "functions.a.cpu_time"));
}

#[test]
fn route_to_unknown_function_is_an_error() {
    let (line, key, message) = invalid(
        "[functions.a]\ncomponent = \"a.wasm\"\n\n[[routes]]\npath = \"/x\"\nfunction = \"b\"\n",
    );
    assert_eq!(line, 6);
    assert_eq!(key, "routes[0].function");
    assert!(message.contains("`b`"), "{message}");
}

#[test]
fn bad_route_patterns_are_errors() {
    let base = "[functions.a]\ncomponent = \"a.wasm\"\n[[routes]]\nfunction = \"a\"\n";
    let (line, key, _) = invalid(&format!("{base}path = \"x\"\n"));
    assert_eq!((line, key.as_str()), (5, "routes[0].path"));
    let (_, key, _) = invalid(&format!("{base}path = \"/a/.../b\"\n"));
    assert_eq!(key, "routes[0].path");
    let (_, key, _) = invalid(&format!("{base}path = \"/a\"\nhost = \"a.*.com\"\n"));
    assert_eq!(key, "routes[0].host");
    let dup = format!("{base}path = \"/a\"\n[[routes]]\nfunction = \"a\"\npath = \"/a\"\n");
    let (line, key, _) = invalid(&dup);
    assert_eq!((line, key.as_str()), (8, "routes[1].path"));
}

#[test]
fn function_needs_exactly_one_source() {
    let (line, key, message) = invalid("[functions.a]\nmemory = \"1MiB\"\n");
    assert_eq!((line, key.as_str()), (1, "functions.a"), "{message}");
    let (_, _, message) = invalid("[functions.a]\ncomponent = \"a.wasm\"\nbuild = \"a\"\n");
    assert!(message.contains("not both"));
}

#[test]
fn toml_syntax_errors_name_the_line() {
    let (line, key, _) = invalid("[server]\nlisten = \n");
    assert_eq!(line, 2);
    assert_eq!(key, "<document>");
}

#[test]
fn missing_file_names_the_path() {
    let err = Manifest::load(Path::new("/definitely/not/here/ignis.toml")).unwrap_err();
    assert!(
        err.to_string().contains("/definitely/not/here/ignis.toml"),
        "{err}"
    );
}

#[test]
fn admission_and_tenant_settings_parse_and_validate() {
    let m = ignis_config::Manifest::from_str_at(
        "[server]\nguest_threads = 3\n[functions.a]\ncomponent = \"a.wasm\"\ntenant = \"t\"\nmailbox = 7\nqueue_timeout = \"250ms\"\n[tenants.t]\nweight = 4\n",
        std::path::Path::new("/srv/ignis.toml"),
    )
    .unwrap();
    assert_eq!(m.server.guest_threads, 3);
    assert_eq!(m.functions["a"].limits.mailbox, 7);
    assert_eq!(
        m.functions["a"].limits.queue_timeout,
        std::time::Duration::from_millis(250)
    );
    assert_eq!(m.tenant("t").weight, 4);
    assert_eq!(m.tenant("other").weight, 1);

    let base = "[functions.a]\ncomponent = \"a.wasm\"\ntenant = \"t\"\n";
    let (line, key, _) = invalid(&format!("{base}[tenants.t]\nweight = 0\n"));
    assert_eq!((line, key.as_str()), (5, "tenants.t.weight"));
    let (line, key, message) = invalid(&format!("{base}[tenants.nobody]\nweight = 2\n"));
    assert_eq!((line, key.as_str()), (4, "tenants.nobody"), "{message}");
    let (line, key, _) = invalid(&format!("{base}[tenants.t]\nshare = 2\n"));
    assert_eq!((line, key.as_str()), (5, "tenants.t.share"));
    let (line, key, _) = invalid(&format!("{base}queue_timeout = \"0s\"\n"));
    assert_eq!((line, key.as_str()), (4, "functions.a.queue_timeout"));
    let (line, key, _) = invalid("[server]\nguest_threads = 0\n");
    assert_eq!((line, key.as_str()), (2, "server.guest_threads"));
}

#[test]
fn bindings_settings_parse() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("secrets.toml"),
        "api_key = \"s3cr3t-value\"\n",
    )
    .unwrap();
    let text = r#"
[server]
secrets_file = "secrets.toml"

[storage]
path = "state/kv.db"
max_key_bytes = "256B"
max_value_bytes = "64KiB"
max_batch_keys = 50

[backends.origin]
url = "https://Origin.Example:8443"
timeout = "2s"
tls_verify = false
pool_size = 4

[functions.a]
component = "a.wasm"
key_value_stores = ["default", "sessions"]
backends = ["origin"]
max_outbound_requests = 3
config = { greeting = "hi", home = { env = "PATH" }, key = { secret = "api_key" } }
"#;
    let m = Manifest::from_str_at(text, &dir.path().join("ignis.toml")).unwrap();
    assert_eq!(m.storage.path, dir.path().join("state/kv.db"));
    assert_eq!(
        (
            m.storage.max_key_bytes,
            m.storage.max_value_bytes,
            m.storage.max_batch_keys
        ),
        (256, 64 << 10, 50)
    );
    let b = &m.backends["origin"];
    assert_eq!(
        (b.scheme.as_str(), b.host.as_str(), b.port),
        ("https", "origin.example", 8443)
    );
    assert_eq!(b.timeout, Duration::from_secs(2));
    assert!(!b.tls_verify);
    assert_eq!(b.pool_size, 4);
    let f = &m.functions["a"];
    assert_eq!(f.key_value_stores, vec!["default", "sessions"]);
    assert_eq!(f.backends, vec!["origin"]);
    assert_eq!(f.max_outbound_requests, 3);
    assert_eq!(f.config["greeting"].value, "hi");
    assert_eq!(f.config["home"].value, std::env::var("PATH").unwrap());
    assert_eq!(f.config["key"].value, "s3cr3t-value");
    assert!(f.config["key"].secret);
    // Printing the whole manifest never shows a secret.
    let printed = format!("{m:?}");
    assert!(!printed.contains("s3cr3t-value"), "{printed}");
    assert!(printed.contains("<secret>"));

    // Defaults.
    let m = parse("[functions.a]\ncomponent = \"a.wasm\"\n").unwrap();
    assert_eq!(m.storage.path, Path::new("/app/.ignis/ignis.db"));
    assert_eq!(m.storage.max_key_bytes, 1024);
    assert_eq!(m.functions["a"].max_outbound_requests, 100);
    assert!(m.functions["a"].key_value_stores.is_empty());
}

#[test]
fn bindings_errors_name_line_and_key() {
    let base = "[functions.a]\ncomponent = \"a.wasm\"\n";
    let (line, key, msg) = invalid(&format!("{base}backends = [\"nope\"]\n"));
    assert_eq!((line, key.as_str()), (3, "functions.a.backends"), "{msg}");
    let (line, key, msg) = invalid(&format!("{base}key_value_stores = [\"a b\"]\n"));
    assert_eq!(
        (line, key.as_str()),
        (3, "functions.a.key_value_stores"),
        "{msg}"
    );
    let (line, key, msg) = invalid(&format!("{base}key_value_stores = [\"x\", \"x\"]\n"));
    assert_eq!(
        (line, key.as_str()),
        (3, "functions.a.key_value_stores"),
        "{msg}"
    );
    let (line, key, msg) = invalid(&format!(
        "{base}config = {{ k = {{ env = \"IGNIS_TEST_SURELY_UNSET_VAR\" }} }}\n"
    ));
    assert_eq!((line, key.as_str()), (3, "functions.a.config.k"), "{msg}");
    assert!(msg.contains("IGNIS_TEST_SURELY_UNSET_VAR"), "{msg}");
    let (line, key, msg) = invalid(&format!("{base}config = {{ k = {{ secret = \"s\" }} }}\n"));
    assert_eq!((line, key.as_str()), (3, "functions.a.config.k"), "{msg}");
    assert!(msg.contains("secrets_file"), "{msg}");
    let (line, key, msg) = invalid(&format!("{base}config = {{ k = {{ file = \"s\" }} }}\n"));
    assert_eq!((line, key.as_str()), (3, "functions.a.config.k"), "{msg}");
    let (line, key, msg) = invalid("[backends.o]\nurl = \"ftp://x\"\n");
    assert_eq!((line, key.as_str()), (2, "backends.o.url"), "{msg}");
    let (line, key, msg) = invalid("[backends.o]\nurl = \"https://x/path\"\n");
    assert_eq!((line, key.as_str()), (2, "backends.o.url"), "{msg}");
    let (line, key, _) = invalid("[backends.o]\nurl = \"https://x\"\npool_size = 0\n");
    assert_eq!((line, key.as_str()), (3, "backends.o.pool_size"));
    let (line, key, _) = invalid("[storage]\nmax_batch_keys = 0\n");
    assert_eq!((line, key.as_str()), (2, "storage.max_batch_keys"));
    let (line, key, _) = invalid("[storage]\nmax_value_bytes = \"1GiB\"\n");
    assert_eq!((line, key.as_str()), (2, "storage.max_value_bytes"));
}

#[test]
fn missing_secret_is_named_without_leaking_others() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("secrets.toml"),
        "present = \"do-not-print-me\"\n",
    )
    .unwrap();
    let text = "[server]\nsecrets_file = \"secrets.toml\"\n[functions.a]\ncomponent = \"a.wasm\"\nconfig = { k = { secret = \"absent\" } }\n";
    let err = Manifest::from_str_at(text, &dir.path().join("ignis.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("ignis.toml:5:"), "{err}");
    assert!(err.contains("functions.a.config.k"), "{err}");
    assert!(err.contains("absent"), "{err}");
    assert!(!err.contains("do-not-print-me"), "{err}");

    // A bad secrets file names that file and line, and no value.
    std::fs::write(
        dir.path().join("secrets.toml"),
        "ok = \"hidden-one\"\nnumber = 5\n",
    )
    .unwrap();
    let err = Manifest::from_str_at(text, &dir.path().join("ignis.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("secrets.toml:2:"), "{err}");
    assert!(err.contains("number"), "{err}");
    assert!(!err.contains("hidden-one"), "{err}");
}

#[test]
fn actor_classes_and_actor_routes() {
    let m = parse(
        "[actors.room]\ncomponent = \"room.wasm\"\nidle_timeout = \"2s\"\nmax_value_bytes = \"1KiB\"\nmailbox = 8\n[[routes]]\npath = \"/rooms/{id}/...\"\nactor = \"room\"\n",
    )
    .unwrap();
    let a = &m.actors["room"];
    assert_eq!(a.idle_timeout, Duration::from_secs(2));
    assert_eq!((a.max_key_bytes, a.max_value_bytes), (2048, 1024));
    assert_eq!(a.max_writes_per_message, 1000);
    assert_eq!(a.limits.mailbox, 8);
    assert_eq!(a.limits.max_concurrency, 1);
    assert_eq!(
        m.routes[0].target,
        ignis_config::RouteTarget::Actor("room".into())
    );

    let base = "[actors.room]\ncomponent = \"room.wasm\"\n[functions.f]\ncomponent = \"f.wasm\"\n";
    let (line, key, msg) = invalid(&format!(
        "{base}[[routes]]\npath = \"/rooms/{{id}}\"\nactor = \"nope\"\n"
    ));
    assert_eq!((line, key.as_str()), (7, "routes[0].actor"), "{msg}");
    let (line, key, msg) = invalid(&format!(
        "{base}[[routes]]\npath = \"/rooms/x\"\nactor = \"room\"\n"
    ));
    assert_eq!((line, key.as_str()), (6, "routes[0].path"), "{msg}");
    let (line, key, msg) = invalid(&format!(
        "{base}[[routes]]\npath = \"/rooms/{{id}}/{{id}}\"\nactor = \"room\"\n"
    ));
    assert_eq!((line, key.as_str()), (6, "routes[0].path"), "{msg}");
    let (line, key, msg) = invalid(&format!(
        "{base}[[routes]]\npath = \"/f/{{id}}\"\nfunction = \"f\"\n"
    ));
    assert_eq!((line, key.as_str()), (6, "routes[0].path"), "{msg}");
    let (line, key, msg) = invalid(&format!(
        "{base}[[routes]]\npath = \"/x\"\nfunction = \"f\"\nactor = \"room\"\n"
    ));
    assert_eq!((line, key.as_str()), (5, "routes[0]"), "{msg}");
    let (line, key, _) = invalid("[actors.room]\ncomponent = \"r.wasm\"\nidle_timeout = \"0s\"\n");
    assert_eq!((line, key.as_str()), (3, "actors.room.idle_timeout"));
    let (line, key, _) = invalid("[actors.room]\ncomponent = \"r.wasm\"\nmailbox = 0\n");
    assert_eq!((line, key.as_str()), (3, "actors.room.mailbox"));
    let (line, key, _) = invalid("[actors.room]\nmemory = \"1MiB\"\n");
    assert_eq!((line, key.as_str()), (1, "actors.room"));
}

#[test]
fn actor_classes_belong_to_tenants_and_list_their_callers() {
    let m = parse(
        "[actors.room]\ncomponent = \"room.wasm\"\ntenant = \"acme\"\ncallers = [\"partner\", \"f\"]\nmax_activations = 5\n[functions.f]\ncomponent = \"f.wasm\"\n[functions.p]\ncomponent = \"p.wasm\"\ntenant = \"partner\"\n[server]\nmax_activations = 3\n",
    )
    .unwrap();
    let a = &m.actors["room"];
    assert_eq!((a.tenant.as_str(), a.max_activations), ("acme", 5));
    assert_eq!(m.server.max_activations, 3);
    assert!(a.admits("acme", "anything"));
    assert!(a.admits("partner", "p"));
    assert!(a.admits("f", "f"));
    assert!(!a.admits("evil", "g"));
    // Defaults: the class is its own tenant; nobody else is listed.
    let m = parse("[actors.room]\ncomponent = \"room.wasm\"\n").unwrap();
    let a = &m.actors["room"];
    assert_eq!((a.tenant.as_str(), a.callers.len()), ("room", 0));
    assert_eq!(a.max_activations, ignis_config::DEFAULT_CLASS_ACTIVATIONS);
    assert_eq!(
        m.server.max_activations,
        ignis_config::DEFAULT_NODE_ACTIVATIONS
    );
    // A tenants table may name an actor class's tenant.
    parse("[actors.room]\ncomponent = \"r.wasm\"\ntenant = \"acme\"\n[tenants.acme]\nweight = 2\n")
        .unwrap();

    // Bad input names the line and key.
    let (line, key, msg) =
        invalid("[actors.room]\ncomponent = \"r.wasm\"\ncallers = [\"nobody\"]\n");
    assert_eq!((line, key.as_str()), (3, "actors.room.callers"), "{msg}");
    assert!(msg.contains("nobody"), "{msg}");
    let (line, key, _) = invalid("[actors.room]\ncomponent = \"r.wasm\"\ncallers = [\"a b\"]\n");
    assert_eq!((line, key.as_str()), (3, "actors.room.callers"));
    let (line, key, _) = invalid("[actors.room]\ncomponent = \"r.wasm\"\ntenant = \"a/b\"\n");
    assert_eq!((line, key.as_str()), (3, "actors.room.tenant"));
    let (line, key, _) = invalid("[actors.room]\ncomponent = \"r.wasm\"\nmax_activations = 0\n");
    assert_eq!((line, key.as_str()), (3, "actors.room.max_activations"));
    let (line, key, _) = invalid("[server]\nmax_activations = 1000000\n");
    assert_eq!((line, key.as_str()), (2, "server.max_activations"));
}

/// A duration past the clock's range used to load and then panic at the
/// first request (`Instant::now() + wall_time`); it is a config error now.
#[test]
fn huge_durations_are_config_errors() {
    for (key, line) in [("wall_time", 3), ("cpu_time", 3), ("queue_timeout", 3)] {
        let (l, k, msg) = invalid(&format!(
            "[functions.f]\ncomponent = \"f.wasm\"\n{key} = \"18446744073709551615s\"\n"
        ));
        assert_eq!(
            (l, k.as_str()),
            (line, format!("functions.f.{key}").as_str()),
            "{msg}"
        );
        assert!(msg.contains("24h"), "{msg}");
    }
    let (l, k, _) = invalid("[server]\nshutdown_grace = \"100000s\"\n");
    assert_eq!((l, k.as_str()), (2, "server.shutdown_grace"));
}

#[test]
fn connection_and_batch_bounds_have_defaults_and_ranges() {
    let m = parse("").unwrap();
    let s = &m.server;
    assert_eq!(
        (s.max_connections, s.max_connections_per_ip),
        (10_000, 1_000)
    );
    assert_eq!(
        (s.idle_timeout, s.write_idle_timeout, s.body_read_timeout),
        (
            Duration::from_secs(120),
            Duration::from_secs(30),
            Duration::from_secs(30)
        )
    );
    assert_eq!(m.storage.max_batch_bytes, 16 << 20);
    let m = parse(
        "[server]\nmax_connections = 5\nmax_connections_per_ip = 2\nidle_timeout = \"5s\"\nwrite_idle_timeout = \"2s\"\nbody_read_timeout = \"1s\"\n[storage]\nmax_batch_bytes = \"4KiB\"\n",
    )
    .unwrap();
    assert_eq!(
        (m.server.max_connections, m.server.max_connections_per_ip),
        (5, 2)
    );
    assert_eq!(m.server.write_idle_timeout, Duration::from_secs(2));
    assert_eq!(m.storage.max_batch_bytes, 4096);
    for (text, line, key) in [
        (
            "[server]\nmax_connections = 0\n",
            2,
            "server.max_connections",
        ),
        (
            "[server]\n\nmax_connections_per_ip = 0\n",
            3,
            "server.max_connections_per_ip",
        ),
        (
            "[server]\nidle_timeout = \"0s\"\n",
            2,
            "server.idle_timeout",
        ),
        (
            "[server]\nwrite_idle_timeout = \"2h\"\n",
            2,
            "server.write_idle_timeout",
        ),
        (
            "[server]\nbody_read_timeout = \"1us\"\n",
            2,
            "server.body_read_timeout",
        ),
        (
            "[server]\nheader_read_timeout = \"0s\"\n",
            2,
            "server.header_read_timeout",
        ),
        (
            "[storage]\nmax_batch_bytes = \"1B\"\n",
            2,
            "storage.max_batch_bytes",
        ),
    ] {
        let (l, k, msg) = invalid(text);
        assert_eq!((l, k.as_str()), (line, key), "{text}: {msg}");
    }
}

#[test]
fn tenant_outbound_budgets_have_defaults_and_ranges() {
    let m = parse("[functions.f]\ncomponent = \"f.wasm\"\ntenant = \"t\"\n").unwrap();
    let t = m.tenant("t");
    assert_eq!((t.max_outbound_connections, t.max_dns_lookups), (256, 16));
    let m = parse(
        "[functions.f]\ncomponent = \"f.wasm\"\ntenant = \"t\"\n[tenants.t]\nmax_outbound_connections = 3\nmax_dns_lookups = 2\n",
    )
    .unwrap();
    let t = m.tenant("t");
    assert_eq!((t.max_outbound_connections, t.max_dns_lookups), (3, 2));
    for (line, key) in [
        (
            "max_outbound_connections = 0",
            "tenants.t.max_outbound_connections",
        ),
        ("max_dns_lookups = 0", "tenants.t.max_dns_lookups"),
    ] {
        let (l, k, msg) = invalid(&format!(
            "[functions.f]\ncomponent = \"f.wasm\"\ntenant = \"t\"\n[tenants.t]\n{line}\n"
        ));
        assert_eq!((l, k.as_str()), (5, key), "{msg}");
    }
}

#[test]
fn reuse_is_a_flag_or_a_table_and_defaults_by_world() {
    use ignis_config::{Reuse, ReuseSetting};
    let m = parse(
        r#"
[functions.unset]
component = "a.wasm"
max_concurrency = 4

[functions.off]
component = "a.wasm"
reuse = false

[functions.on]
component = "a.wasm"
reuse = true

[functions.tuned]
component = "a.wasm"
reuse = { max_requests = 50, max_age = "5s", max_idle = 2 }

[functions.shared]
component = "a.wasm"
reuse = { max_concurrent = 16 }
"#,
    )
    .unwrap();
    let unset = &m.functions["unset"];
    assert_eq!(unset.reuse, ReuseSetting::ByWorld);
    // Not set: 0.3 components reuse (idle instances capped by concurrency),
    // 0.2 components do not.
    let by_world = unset.reuse.resolve(true, 4).expect("0.3 reuses");
    assert_eq!(by_world.max_idle, 4);
    assert_eq!(unset.reuse.resolve(false, 4), None);
    assert_eq!(m.functions["off"].reuse, ReuseSetting::Off);
    assert_eq!(m.functions["off"].reuse.resolve(true, 64), None);
    assert_eq!(
        m.functions["on"].reuse,
        ReuseSetting::On(Reuse::defaults(64))
    );
    assert_eq!(
        m.functions["on"].reuse.resolve(false, 64),
        Some(Reuse::defaults(64)),
        "an explicit reuse applies to 0.2 components too"
    );
    assert_eq!(Reuse::defaults(64).max_idle, 64);
    assert_eq!(Reuse::defaults(64).max_concurrent, 1);
    assert_eq!(
        m.functions["shared"].reuse,
        ReuseSetting::On(Reuse {
            max_concurrent: 16,
            ..Reuse::defaults(m.functions["shared"].limits.max_concurrency)
        })
    );
    assert_eq!(
        m.functions["tuned"].reuse,
        ReuseSetting::On(Reuse {
            max_requests: 50,
            max_age: Duration::from_secs(5),
            max_idle: 2,
            max_concurrent: 1,
        })
    );
}

#[test]
fn bad_reuse_values_name_line_and_key() {
    let f = "[functions.a]\ncomponent = \"a.wasm\"\n";
    let (line, key, message) = invalid(&format!("{f}reuse = \"yes\"\n"));
    assert_eq!((line, key.as_str()), (3, "functions.a.reuse"), "{message}");
    assert!(message.contains("true, false or a table"), "{message}");
    let (line, key, message) = invalid(&format!("{f}reuse = {{ max_request = 5 }}\n"));
    assert_eq!(
        (line, key.as_str()),
        (3, "functions.a.reuse.max_request"),
        "{message}"
    );
    assert!(message.contains("max_request"), "{message}");
    let (line, key, _) = invalid(&format!("{f}reuse = {{ max_requests = 0 }}\n"));
    assert_eq!((line, key.as_str()), (3, "functions.a.reuse.max_requests"));
    let (line, key, _) = invalid(&format!("{f}reuse = {{ max_age = \"10ms\" }}\n"));
    assert_eq!((line, key.as_str()), (3, "functions.a.reuse.max_age"));
    let (line, key, message) = invalid(&format!(
        "{f}max_concurrency = 2\nreuse = {{ max_idle = 3 }}\n"
    ));
    assert_eq!((line, key.as_str()), (4, "functions.a.reuse.max_idle"));
    assert!(message.contains("max_concurrency (2)"), "{message}");
    for bad in ["0", "1001"] {
        let (line, key, _) = invalid(&format!("{f}reuse = {{ max_concurrent = {bad} }}\n"));
        assert_eq!(
            (line, key.as_str()),
            (3, "functions.a.reuse.max_concurrent")
        );
    }
}

#[test]
fn build_is_a_crate_directory_or_a_command_table() {
    use ignis_config::BuildCommand;
    let m = parse(
        r#"
[functions.rust]
build = "guests/rust"

[functions.js]
build = { command = "npm run build", output = "dist/app.wasm", workdir = "guests/js", watch = ["src", "package.json"] }

[functions.py]
build = { command = "componentize-py componentize app -o app.wasm", output = "/abs/app.wasm" }
"#,
    )
    .unwrap();
    assert_eq!(
        m.functions["rust"].source,
        ComponentSource::RustCrate("/app/guests/rust".into())
    );
    assert_eq!(
        m.functions["js"].source,
        ComponentSource::Command(BuildCommand {
            command: "npm run build".into(),
            output: "/app/guests/js/dist/app.wasm".into(),
            workdir: "/app/guests/js".into(),
            watch: vec![
                "/app/guests/js/src".into(),
                "/app/guests/js/package.json".into()
            ],
        })
    );
    let ComponentSource::Command(py) = &m.functions["py"].source else {
        panic!("a command");
    };
    assert_eq!(py.workdir, Path::new("/app/."));
    assert_eq!(py.output, Path::new("/abs/app.wasm"));
}

#[test]
fn bad_build_tables_name_line_and_key() {
    let f = "[functions.a]\n";
    let (line, key, message) = invalid(&format!("{f}build = 3\n"));
    assert_eq!((line, key.as_str()), (2, "functions.a.build"), "{message}");
    assert!(
        message.contains("a Rust crate directory, or a table"),
        "{message}"
    );
    let (line, key, message) = invalid(&format!("{f}build = {{ output = \"a.wasm\" }}\n"));
    assert_eq!((line, key.as_str()), (2, "functions.a.build"), "{message}");
    assert!(message.contains("command"), "{message}");
    let (line, key, _) = invalid(&format!(
        "{f}build = {{ command = \" \", output = \"a.wasm\" }}\n"
    ));
    assert_eq!((line, key.as_str()), (2, "functions.a.build.command"));
    let (line, key, message) = invalid(&format!(
        "{f}build = {{ command = \"x\", output = \"a.wasm\", wtach = [] }}\n"
    ));
    assert_eq!(
        (line, key.as_str()),
        (2, "functions.a.build.wtach"),
        "{message}"
    );
}

#[test]
fn tls_parses_certificates_by_host_and_defaults() {
    use ignis_config::{CertFiles, HostCert, UnknownSni};
    let m = parse(
        r#"
[tls]
listen = "0.0.0.0:443"
cert = "certs/default.pem"
key = "/keys/default.key"
redirect_http = true
reload_interval = "1s"

[[tls.certificates]]
hosts = ["Example.com", "*.example.com"]
cert = "certs/example.pem"
key = "certs/example.key"
"#,
    )
    .unwrap();
    let tls = m.tls.unwrap();
    assert_eq!(tls.listen, "0.0.0.0:443".parse().unwrap());
    assert_eq!(
        tls.default,
        Some(CertFiles {
            cert: "/app/certs/default.pem".into(),
            key: "/keys/default.key".into(),
        })
    );
    assert_eq!(
        tls.certificates,
        vec![HostCert {
            hosts: vec!["example.com".into(), "*.example.com".into()],
            files: CertFiles {
                cert: "/app/certs/example.pem".into(),
                key: "/app/certs/example.key".into(),
            },
        }]
    );
    assert_eq!(tls.unknown_sni, UnknownSni::Default);
    assert!(tls.redirect_http);
    assert_eq!(tls.reload_interval, Duration::from_secs(1));
    assert_eq!(tls.handshake_timeout, Duration::from_secs(10));

    // Without a default certificate, unknown names are refused.
    let m =
        parse("[[tls.certificates]]\nhosts = [\"a.test\"]\ncert = \"a.pem\"\nkey = \"a.key\"\n")
            .unwrap();
    let tls = m.tls.unwrap();
    assert_eq!(tls.unknown_sni, UnknownSni::Reject);
    assert_eq!(tls.listen, "127.0.0.1:8443".parse().unwrap());
    assert!(!tls.redirect_http);
    assert!(parse("").unwrap().tls.is_none());
}

#[test]
fn bad_tls_settings_name_line_and_key() {
    let cases: &[(&str, usize, &str, &str)] = &[
        ("[tls]\ncert = \"c.pem\"\n", 1, "tls.key", "without `key`"),
        ("[tls]\nkey = \"k.pem\"\n", 1, "tls.cert", "without `cert`"),
        ("[tls]\nredirect_http = true\n", 1, "tls", "no certificate"),
        (
            "[tls]\ncert = \"c\"\nkey = \"k\"\nunknown_sni = \"maybe\"\n",
            4,
            "tls.unknown_sni",
            "`maybe`",
        ),
        (
            "[tls]\nunknown_sni = \"default\"\n[[tls.certificates]]\nhosts = [\"a.test\"]\ncert = \"c\"\nkey = \"k\"\n",
            2,
            "tls.unknown_sni",
            "needs a default certificate",
        ),
        (
            "[tls]\nlisten = \"nowhere\"\ncert = \"c\"\nkey = \"k\"\n",
            2,
            "tls.listen",
            "not an address",
        ),
        (
            "[server]\nlisten = \"127.0.0.1:9000\"\n[tls]\nlisten = \"127.0.0.1:9000\"\ncert = \"c\"\nkey = \"k\"\n",
            4,
            "tls.listen",
            "must differ",
        ),
        (
            "[tls]\ncert = \"c\"\nkey = \"k\"\nreload_interval = \"1ms\"\n",
            4,
            "tls.reload_interval",
            "between",
        ),
        (
            "[tls]\ncert = \"c\"\nkey = \"k\"\nciphers = \"weak\"\n",
            4,
            "tls.ciphers",
            "ciphers",
        ),
        (
            "[[tls.certificates]]\nhosts = []\ncert = \"c\"\nkey = \"k\"\n",
            1,
            "tls.certificates[0].hosts",
            "at least one",
        ),
        (
            "[[tls.certificates]]\nhosts = [\"a.test\", \"A.test\"]\ncert = \"c\"\nkey = \"k\"\n",
            2,
            "tls.certificates[0].hosts",
            "listed twice",
        ),
    ];
    for (text, line, key, needle) in cases {
        let (l, k, message) = invalid(text);
        assert_eq!((l, k.as_str()), (*line, *key), "{text}: {message}");
        assert!(message.contains(needle), "{text}: {message}");
    }
    for bad in [
        "*.com",
        "a..b",
        "-a.test",
        "a_b.test",
        "*.*.a.test",
        "a.*.test",
        "",
        "a.test.",
    ] {
        let text =
            format!("[[tls.certificates]]\nhosts = [\"{bad}\"]\ncert = \"c\"\nkey = \"k\"\n");
        let (l, k, message) = invalid(&text);
        assert_eq!(
            (l, k.as_str()),
            (2, "tls.certificates[0].hosts"),
            "{bad}: {message}"
        );
        assert!(message.contains("is not a host name"), "{bad}: {message}");
    }
}

#[test]
fn http2_limits_parse_default_and_name_bad_values() {
    use ignis_config::Http2Limits;
    assert_eq!(parse("").unwrap().server.http2, Http2Limits::default());
    let m = parse(
        "[server.http2]\nmax_concurrent_streams = 8\nstream_window = \"256KiB\"\nconnection_window = \"8MiB\"\nmax_pending_resets = 5\nmax_error_resets = 50\nkeepalive_interval = \"5s\"\nkeepalive_timeout = \"2s\"\n",
    )
    .unwrap();
    assert_eq!(
        m.server.http2,
        Http2Limits {
            max_concurrent_streams: 8,
            stream_window: 256 * 1024,
            connection_window: 8 << 20,
            max_pending_resets: 5,
            max_error_resets: 50,
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(2),
        }
    );
    for (line, key) in [
        (
            "max_concurrent_streams = 0",
            "server.http2.max_concurrent_streams",
        ),
        (
            "max_concurrent_streams = 10001",
            "server.http2.max_concurrent_streams",
        ),
        ("stream_window = \"1KiB\"", "server.http2.stream_window"),
        ("stream_window = \"17MiB\"", "server.http2.stream_window"),
        (
            "connection_window = \"65MiB\"",
            "server.http2.connection_window",
        ),
        ("max_pending_resets = 0", "server.http2.max_pending_resets"),
        ("max_error_resets = 0", "server.http2.max_error_resets"),
        (
            "keepalive_interval = \"10ms\"",
            "server.http2.keepalive_interval",
        ),
        (
            "keepalive_timeout = \"2h\"",
            "server.http2.keepalive_timeout",
        ),
        ("push = true", "server.http2.push"),
    ] {
        let (l, k, message) = invalid(&format!("[server.http2]\n{line}\n"));
        assert_eq!((l, k.as_str()), (2, key), "{line}: {message}");
    }
}

#[test]
fn upstreams_load_with_their_defaults_and_routes_name_them() {
    let m = parse(
        "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n\
         [upstreams.api]\norigins = [\"http://10.0.0.1:8080\", \"https://[::1]\"]\n\
         balance = \"hash\"\nhash_key = \"cookie:session\"\n\
         [upstreams.api.health]\npath = \"/healthz\"\n\
         [[routes]]\nhost = \"api.example\"\npath = \"/...\"\nupstream = \"api\"\n",
    )
    .unwrap();
    let api = &m.upstreams["api"];
    assert_eq!(api.origins[0].url(), "http://10.0.0.1:8080");
    assert_eq!(api.origins[1].url(), "https://[::1]:443");
    assert_eq!(
        api.balance,
        ignis_config::Balance::Hash {
            key: ignis_config::HashKey::Cookie("session".into()),
            load_factor: 1.25
        }
    );
    let health = api.health.as_ref().unwrap();
    assert_eq!((health.unhealthy_after, health.healthy_after), (3, 2));
    assert_eq!(api.retries, 1);
    assert_eq!(api.max_body_bytes, 100 << 20);
    assert_eq!(api.host, ignis_config::HostRewrite::Preserve);
    assert_eq!(
        m.routes[0].target,
        ignis_config::RouteTarget::Upstream("api".into())
    );
    let proxies = &m.server.trusted_proxies;
    assert!(proxies[0].contains("10.200.0.1".parse().unwrap()));
    assert!(!proxies[0].contains("11.0.0.1".parse().unwrap()));
    assert!(proxies[0].contains("::ffff:10.1.2.3".parse().unwrap()));
    assert!(proxies[1].contains("::1".parse().unwrap()));
    assert!(!proxies[1].contains("::2".parse().unwrap()));
}

/// Every upstream key refuses bad values with the file, line and key.
#[test]
fn bad_upstream_settings_name_line_and_key() {
    let up = |extra: &str| format!("[upstreams.api]\norigins = [\"http://a:1\"]\n{extra}\n");
    let cases: Vec<(String, usize, &str, &str)> = vec![
        (
            "[upstreams.api]\norigins = []\n".into(),
            1,
            "upstreams.api.origins",
            "at least one",
        ),
        (
            "[upstreams.api]\norigins = [\"ftp://a\"]\n".into(),
            2,
            "upstreams.api.origins",
            "http or https",
        ),
        (
            "[upstreams.api]\norigins = [\"http://a/path\"]\n".into(),
            2,
            "upstreams.api.origins",
            "only scheme",
        ),
        (
            "[upstreams.api]\norigins = [\"http://a:0\"]\n".into(),
            2,
            "upstreams.api.origins",
            "port 0",
        ),
        (
            "[upstreams.api]\norigins = [\"http://a:99999\"]\n".into(),
            2,
            "upstreams.api.origins",
            "bad port",
        ),
        (
            "[upstreams.api]\norigins = [\"http://a:1\", \"http://A:1\"]\n".into(),
            2,
            "upstreams.api.origins",
            "twice",
        ),
        (
            "[upstreams.\"a b\"]\norigins = [\"http://a:1\"]\n".into(),
            1,
            "upstreams.a b",
            "names",
        ),
        (
            up("balance = \"random\""),
            3,
            "upstreams.api.balance",
            "not a policy",
        ),
        (
            up("balance = \"hash\""),
            3,
            "upstreams.api.hash_key",
            "needs `hash_key`",
        ),
        (
            up("balance = \"hash\"\nhash_key = \"header:\""),
            4,
            "upstreams.api.hash_key",
            "not a hash key",
        ),
        (
            up("balance = \"hash\"\nhash_key = \"query:x\""),
            4,
            "upstreams.api.hash_key",
            "not a hash key",
        ),
        (
            up("hash_key = \"path\""),
            3,
            "upstreams.api.balance",
            "need `balance = \"hash\"`",
        ),
        (
            up("balance = \"hash\"\nhash_key = \"path\"\nhash_load_factor = 1.0"),
            5,
            "upstreams.api.hash_load_factor",
            "between",
        ),
        (
            up("host = \"a b\""),
            3,
            "upstreams.api.host",
            "not `preserve`",
        ),
        (
            up("tls_server_name = \"*.x.example\""),
            3,
            "upstreams.api.tls_server_name",
            "not a host name",
        ),
        (
            up("connect_timeout = \"0s\""),
            3,
            "upstreams.api.connect_timeout",
            "between",
        ),
        (
            up("response_timeout = \"61m\""),
            3,
            "upstreams.api.response_timeout",
            "between",
        ),
        (
            up("max_body = \"0B\""),
            3,
            "upstreams.api.max_body",
            "greater than zero",
        ),
        (up("retries = 11"), 3, "upstreams.api.retries", "between"),
        (
            up("retry_budget = 1.5"),
            3,
            "upstreams.api.retry_budget",
            "between",
        ),
        (
            up("eject_after = 0"),
            3,
            "upstreams.api.eject_after",
            "between",
        ),
        (
            up("pool_size = 100000"),
            3,
            "upstreams.api.pool_size",
            "between",
        ),
        (
            up("surprise = 1"),
            3,
            "upstreams.api.surprise",
            "unknown field",
        ),
        (
            up("max_websockets = 1000001"),
            3,
            "upstreams.api.max_websockets",
            "between",
        ),
        (
            up("body_timeout = \"0s\""),
            3,
            "upstreams.api.body_timeout",
            "between",
        ),
        (
            up("websocket_idle_timeout = \"0s\""),
            3,
            "upstreams.api.websocket_idle_timeout",
            "between",
        ),
        (
            up("[upstreams.api.health]\npath = \"healthz\""),
            4,
            "upstreams.api.health.path",
            "path like",
        ),
        (
            up("[upstreams.api.health]\ninterval = \"1s\"\ntimeout = \"2s\""),
            3,
            "upstreams.api.health.timeout",
            "exceed",
        ),
        (
            up("[upstreams.api.health]\nunhealthy_after = 0"),
            4,
            "upstreams.api.health.unhealthy_after",
            "between",
        ),
        (
            "[[routes]]\npath = \"/...\"\nupstream = \"nope\"\n".into(),
            3,
            "routes[0].upstream",
            "no upstream named",
        ),
        (
            format!(
                "{}[[routes]]\npath = \"/{{id}}\"\nupstream = \"api\"\n",
                up("")
            ),
            5,
            "routes[0].path",
            "actor routes",
        ),
        (
            format!(
                "{}[[routes]]\npath = \"/\"\nupstream = \"api\"\nactor = \"room\"\n",
                up("")
            ),
            4,
            "routes[0]",
            "one of",
        ),
        (
            "[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\n".into(),
            2,
            "server.trusted_proxies",
            "prefix length",
        ),
        (
            "[server]\ntrusted_proxies = [\"example.com\"]\n".into(),
            2,
            "server.trusted_proxies",
            "not an IP",
        ),
    ];
    assert_all_invalid(&cases);
}

#[test]
fn a_function_route_with_an_upstream_binds_the_upstream_to_the_function() {
    let base = "[upstreams.api]\norigins = [\"http://a:1\"]\n\
                [functions.gate]\ncomponent = \"g.wasm\"\n";
    let m = parse(&format!(
        "{base}[[routes]]\npath = \"/a/...\"\nfunction = \"gate\"\nupstream = \"api\"\n\
         [[routes]]\npath = \"/b/...\"\nfunction = \"gate\"\nupstream = \"api\"\n"
    ))
    .unwrap();
    assert_eq!(m.functions["gate"].upstreams, ["api"]);
    assert_eq!(m.routes[0].upstream.as_deref(), Some("api"));
    // A backend of the same name would make `http://api/` ambiguous.
    let (line, key, message) = invalid(
        "[backends.api]\nurl = \"http://b:1\"\n[upstreams.api]\norigins = [\"http://a:1\"]\n\
         [functions.gate]\ncomponent = \"g.wasm\"\nbackends = [\"api\"]\n\
         [[routes]]\npath = \"/\"\nfunction = \"gate\"\nupstream = \"api\"\n",
    );
    assert_eq!((line, key.as_str()), (8, "routes[0].upstream"), "{message}");
    assert!(message.contains("also lists a backend"), "{message}");
    let (_, key, _) = invalid(&format!(
        "{base}[[routes]]\npath = \"/\"\nfunction = \"gate\"\nupstream = \"nope\"\n"
    ));
    assert_eq!(key, "routes[0].upstream");
}

#[test]
fn the_admin_section_takes_a_token_or_a_token_file_and_never_shows_it() {
    // No section: the default address, no token (the admin API is off).
    let m = parse("").unwrap();
    assert_eq!(m.admin.listen.to_string(), "127.0.0.1:9901");
    assert!(m.admin.token.is_none());
    assert!(m.server.access_log);
    assert!(
        !parse("[server]\naccess_log = false\n")
            .unwrap()
            .server
            .access_log
    );
    assert_all_invalid(&[(
        "[server]\naccess_log = \"yes\"\n",
        2,
        "server.access_log",
        "bool",
    )]);

    let m =
        parse("[admin]\nlisten = \"127.0.0.1:7000\"\ntoken = \"  0123456789abcdef  \"\n").unwrap();
    assert_eq!(m.admin.listen.to_string(), "127.0.0.1:7000");
    let token = m.admin.token.unwrap();
    assert_eq!(token.expose(), b"0123456789abcdef");
    assert!(!format!("{token:?}").contains("0123456789abcdef"));

    // A token file, resolved against the manifest's directory; its final
    // newline is not part of the token.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("admin.token"), "file-token-0123456789\n").unwrap();
    let path = dir.path().join("ignis.toml");
    let m = Manifest::from_str_at("[admin]\ntoken_file = \"admin.token\"\n", &path).unwrap();
    assert_eq!(m.admin.token.unwrap().expose(), b"file-token-0123456789");
    std::fs::write(dir.path().join("short.token"), "short\n").unwrap();
    match Manifest::from_str_at("[admin]\ntoken_file = \"short.token\"\n", &path) {
        Err(ConfigError::Invalid {
            line, key, message, ..
        }) => {
            assert_eq!((line, key.as_str()), (2, "admin.token_file"));
            assert!(message.contains("at least 16"), "{message}");
            assert!(!message.contains("short\n"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    let cases: Vec<(&str, usize, &str, &str)> = vec![
        (
            "[admin]\ntoken = \"too-short\"\n",
            2,
            "admin.token",
            "at least 16",
        ),
        (
            "[admin]\ntoken = \"has a space in it ok\"\n",
            2,
            "admin.token",
            "without spaces",
        ),
        (
            "[admin]\ntoken = \"0123456789abcdef\"\ntoken_file = \"t\"\n",
            3,
            "admin.token_file",
            "not both",
        ),
        (
            "[admin]\ntoken_file = \"/nonexistent/t\"\n",
            2,
            "admin.token_file",
            "cannot read",
        ),
        (
            "[admin]\nlisten = \"localhost\"\n",
            2,
            "admin.listen",
            "not an address",
        ),
        (
            "[server]\nlisten = \"127.0.0.1:9000\"\n[admin]\nlisten = \"127.0.0.1:9000\"\n",
            4,
            "admin.listen",
            "must differ",
        ),
        ("[admin]\ntokn = \"x\"\n", 2, "admin.tokn", "unknown field"),
    ];
    assert_all_invalid(&cases);
    let long = format!("[admin]\ntoken = \"{}\"\n", "x".repeat(513));
    assert!(invalid(&long).2.contains("at most 512"));
}

#[test]
fn cron_triggers_name_a_schedule_and_a_function_or_an_actor() {
    let base = "[functions.job]\ncomponent = \"j.wasm\"\n[actors.room]\ncomponent = \"r.wasm\"\n";
    let m = parse(&format!(
        "{base}[[triggers.cron]]\nschedule = \"*/5 * * * *\"\nfunction = \"job\"\n\
         [[triggers.cron]]\nname = \"sweep\"\nschedule = \"30 * * * * *\"\nactor = \"room\"\nid = \"lobby\"\nmethod = \"PUT\"\npath = \"/sweep?all=1\"\n"
    ))
    .unwrap();
    assert_eq!(m.cron.len(), 2);
    let first = &m.cron[0];
    assert_eq!(first.name, "cron-0");
    assert_eq!(first.schedule, "*/5 * * * *");
    assert_eq!(
        first.target,
        ignis_config::CronTarget::Function("job".into())
    );
    assert_eq!((first.method.as_str(), first.path.as_str()), ("POST", "/"));
    let second = &m.cron[1];
    assert_eq!(second.name, "sweep");
    assert_eq!(
        second.target,
        ignis_config::CronTarget::Actor {
            class: "room".into(),
            id: "lobby".into()
        }
    );
    assert_eq!(
        (second.method.as_str(), second.path.as_str()),
        ("PUT", "/sweep?all=1")
    );

    let t = |body: &str| format!("{base}[[triggers.cron]]\n{body}");
    let cases = vec![
        (
            t("schedule = \"61 * * * *\"\nfunction = \"job\""),
            6,
            "triggers.cron[0].schedule",
            "not a cron schedule",
        ),
        (
            t("schedule = \"\"\nfunction = \"job\""),
            6,
            "triggers.cron[0].schedule",
            "not a cron schedule",
        ),
        (
            t("schedule = \"* * *\"\nfunction = \"job\""),
            6,
            "triggers.cron[0].schedule",
            "5 fields",
        ),
        (
            t("schedule = \"* * * * *\"\nfunction = \"nope\""),
            5,
            "triggers.cron[0].function",
            "no function named",
        ),
        (
            t("schedule = \"* * * * *\"\nactor = \"nope\"\nid = \"a\""),
            5,
            "triggers.cron[0].actor",
            "no actor class",
        ),
        (
            t("schedule = \"* * * * *\"\nactor = \"room\""),
            5,
            "triggers.cron[0].id",
            "needs the actor's `id`",
        ),
        (
            t("schedule = \"* * * * *\"\nactor = \"room\"\nid = \"a/b\""),
            8,
            "triggers.cron[0].id",
            "without '/'",
        ),
        (
            t("schedule = \"* * * * *\""),
            5,
            "triggers.cron[0]",
            "set `function`",
        ),
        (
            t("schedule = \"* * * * *\"\nfunction = \"job\"\nactor = \"room\"\nid = \"a\""),
            5,
            "triggers.cron[0]",
            "set `function`",
        ),
        (
            t("schedule = \"* * * * *\"\nfunction = \"job\"\npath = \"nope\""),
            8,
            "triggers.cron[0].path",
            "starting with '/'",
        ),
        (
            t("schedule = \"* * * * *\"\nfunction = \"job\"\nmethod = \"get it\""),
            8,
            "triggers.cron[0].method",
            "not an HTTP method",
        ),
        (
            t("schedule = \"* * * * *\"\nfunction = \"job\"\nname = \"a b\""),
            8,
            "triggers.cron[0].name",
            "not a name",
        ),
        (
            t(
                "name = \"x\"\nschedule = \"* * * * *\"\nfunction = \"job\"\n[[triggers.cron]]\nname = \"x\"\nschedule = \"* * * * *\"\nfunction = \"job\"",
            ),
            10,
            "triggers.cron[1].name",
            "names two triggers",
        ),
        (
            t("schedule = \"* * * * *\"\nfunction = \"job\"\nevery = 5"),
            8,
            "triggers.cron[0].every",
            "unknown field",
        ),
    ];
    assert_all_invalid(&cases);
    let many: String = (0..1001)
        .map(|_| "[[triggers.cron]]\nschedule = \"* * * * *\"\nfunction = \"job\"\n")
        .collect();
    assert!(invalid(&format!("{base}{many}")).2.contains("at most 1000"));
}

#[test]
fn function_slots_bound_what_deploys_may_add() {
    let f = "[functions.a]\ncomponent = \"a.wasm\"\nmax_concurrency = 300\n";
    let m = parse(&format!("[server]\nfunction_slots = 400\n{f}")).unwrap();
    assert_eq!(m.server.function_slots, Some(400));
    assert_eq!(parse(f).unwrap().server.function_slots, None);
    // The manifest's text is kept (deploys edit a copy).
    assert_eq!(&*parse(f).unwrap().text, f);
    assert_all_invalid(&[
        (
            format!("[server]\nfunction_slots = 299\n{f}"),
            2,
            "server.function_slots",
            "less than the functions' max_concurrency total (300)",
        ),
        (
            "[server]\nfunction_slots = 0\n".to_string(),
            2,
            "server.function_slots",
            "",
        ),
        (
            "[server]\nfunction_slots = 100000\n".to_string(),
            2,
            "server.function_slots",
            "",
        ),
        (
            "[server]\nfunction_slots = \"many\"\n".to_string(),
            2,
            "server.function_slots",
            "",
        ),
    ]);
}

#[test]
fn telemetry_is_off_by_default_and_checked_when_on() {
    assert_eq!(parse("").unwrap().telemetry, None);
    let m = parse("[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318/v1/traces\"\n").unwrap();
    let t = m.telemetry.unwrap();
    assert_eq!(t.otlp_endpoint, "http://127.0.0.1:4318/v1/traces");
    assert_eq!((t.service_name.as_str(), t.sample_ratio), ("ignis", 1.0));
    let m = parse(
        "[telemetry]\notlp_endpoint = \"http://otel.example/v1/traces\"\nservice_name = \"edge-1\"\nsample_ratio = 0.25\n",
    )
    .unwrap();
    assert_eq!(m.telemetry.unwrap().sample_ratio, 0.25);
    assert_all_invalid(&[
        (
            "[telemetry]\nservice_name = \"x\"\n".to_string(),
            1,
            "telemetry.otlp_endpoint",
            "missing",
        ),
        (
            "[telemetry]\notlp_endpoint = \"ftp://collector/v1/traces\"\n".to_string(),
            2,
            "telemetry.otlp_endpoint",
            "an http:// URL",
        ),
        (
            "[telemetry]\notlp_endpoint = \"https://collector/v1/traces\"\n".to_string(),
            2,
            "telemetry.otlp_endpoint",
            "an http:// URL",
        ),
        (
            "[telemetry]\notlp_endpoint = \"not a url\"\n".to_string(),
            2,
            "telemetry.otlp_endpoint",
            "an http:// URL",
        ),
        (
            format!(
                "[telemetry]\notlp_endpoint = \"http://c/{}\"\n",
                "a".repeat(3000)
            ),
            2,
            "telemetry.otlp_endpoint",
            "2048",
        ),
        (
            "[telemetry]\notlp_endpoint = \"http://c/v1/traces\"\nsample_ratio = 1.5\n".to_string(),
            3,
            "telemetry.sample_ratio",
            "between 0 and 1",
        ),
        (
            "[telemetry]\notlp_endpoint = \"http://c/v1/traces\"\nservice_name = \"has space\"\n"
                .to_string(),
            3,
            "telemetry.service_name",
            "visible ASCII",
        ),
        (
            "[telemetry]\notlp_endpoint = \"http://c/v1/traces\"\nexporter = \"grpc\"\n"
                .to_string(),
            3,
            "telemetry.exporter",
            "unknown field",
        ),
    ]);
}

#[test]
fn a_database_is_checked_and_never_shown() {
    assert_eq!(parse("").unwrap().storage.database, None);
    let m = parse("[storage]\ndatabase = \"postgres://ignis:hunter2@db:5432/ignis\"\n").unwrap();
    let url = m.storage.database.unwrap();
    assert_eq!(url.expose(), "postgres://ignis:hunter2@db:5432/ignis");
    assert!(
        !format!("{url:?}").contains("hunter2"),
        "Debug shows the password"
    );
    parse("[storage]\ndatabase = \"host=/run/postgresql dbname=ignis\"\n").unwrap();
    let actor = "[actors.room]\ncomponent = \"room.wasm\"\nmax_key_bytes = \"4KiB\"\n";
    assert_all_invalid(&[
        (
            "[storage]\ndatabase = \"\"\n".to_string(),
            2,
            "storage.database",
            "is empty",
        ),
        (
            "[storage]\ndatabase = \"mysql://db/ignis\"\n".to_string(),
            2,
            "storage.database",
            "postgres:// URL",
        ),
        (
            "[storage]\ndatabase = \"postgres://db/\\u0000\"\n".to_string(),
            2,
            "storage.database",
            "control characters",
        ),
        (
            format!(
                "[storage]\ndatabase = \"postgres://db/{}\"\n",
                "a".repeat(5000)
            ),
            2,
            "storage.database",
            "4096",
        ),
        // PostgreSQL's index entries hold 2,704 bytes: keys past 2 KiB
        // would be refused by the database at run time; refused here.
        (
            "[storage]\ndatabase = \"postgres://db/x\"\nmax_key_bytes = \"4KiB\"\n".to_string(),
            3,
            "storage.max_key_bytes",
            "at most 2KiB",
        ),
        (
            format!("{actor}[storage]\ndatabase = \"postgres://db/x\"\n"),
            5,
            "storage.database",
            "actors.room.max_key_bytes",
        ),
    ]);
    // Without a database the same sizes are fine.
    parse("[storage]\nmax_key_bytes = \"4KiB\"\n").unwrap();
    parse(actor).unwrap();
}

#[test]
fn cluster_settings_have_defaults_and_bad_ones_are_named() {
    assert_eq!(parse("").unwrap().cluster, None);
    let c = parse("[cluster]\n").unwrap().cluster.unwrap();
    assert_eq!(c, ignis_config::ClusterConfig::with_defaults());
    assert_eq!(c.lease, Duration::from_secs(4));
    assert_eq!(c.listen.to_string(), "127.0.0.1:9903");
    let c = parse(
        "[cluster]\nlisten = \"0.0.0.0:7000\"\nadvertise = \"node-3.internal:7000\"\nlease = \"2s\"\nforward_timeout = \"10s\"\n",
    )
    .unwrap()
    .cluster
    .unwrap();
    assert_eq!(
        (c.advertise.as_deref(), c.lease, c.forward_timeout),
        (
            Some("node-3.internal:7000"),
            Duration::from_secs(2),
            Duration::from_secs(10)
        )
    );
    assert_all_invalid(&[
        (
            "[cluster]\nlease = \"100ms\"\n".to_string(),
            2,
            "cluster.lease",
            "between",
        ),
        (
            "[cluster]\nlease = \"2m\"\n".to_string(),
            2,
            "cluster.lease",
            "between",
        ),
        (
            "[cluster]\nforward_timeout = \"0s\"\n".to_string(),
            2,
            "cluster.forward_timeout",
            "between",
        ),
        (
            "[cluster]\nlisten = \"everywhere\"\n".to_string(),
            2,
            "cluster.listen",
            "not an address",
        ),
        (
            "[cluster]\nadvertise = \"10.0.0.7\"\n".to_string(),
            2,
            "cluster.advertise",
            "host:port",
        ),
        (
            "[cluster]\nadvertise = \"user@10.0.0.7:9903\"\n".to_string(),
            2,
            "cluster.advertise",
            "host:port",
        ),
        (
            format!("[cluster]\nadvertise = \"{}.example:1\"\n", "a".repeat(300)),
            2,
            "cluster.advertise",
            "255",
        ),
        (
            "[cluster]\nadvertise = \"h:0\"\n".to_string(),
            2,
            "cluster.advertise",
            "host:port",
        ),
        (
            "[cluster]\ndatabase = \"mysql://db/x\"\n".to_string(),
            2,
            "cluster.database",
            "postgres:// URL",
        ),
        (
            "[storage]\ndatabase = \"postgres://db/x\"\n[cluster]\ndatabase = \"postgres://db/y\"\n"
                .to_string(),
            4,
            "cluster.database",
            "name the database once",
        ),
    ]);
    // The cluster's database is the node's storage.
    let m = parse("[cluster]\ndatabase = \"postgres://ignis:pw@db/ignis\"\n").unwrap();
    assert_eq!(
        m.storage.database.map(|d| d.expose().to_string()),
        Some("postgres://ignis:pw@db/ignis".to_string())
    );
}
