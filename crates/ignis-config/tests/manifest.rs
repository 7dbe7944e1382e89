//! Manifest parsing: good manifests load, bad ones name file, line and key.

use std::path::Path;
use std::time::Duration;

use ignis_config::{ComponentSource, ConfigError, Manifest};

fn parse(text: &str) -> Result<Manifest, ConfigError> {
    Manifest::from_str_at(text, Path::new("/app/ignis.toml"))
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
