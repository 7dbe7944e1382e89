//! HTTPS: certificates chosen by SNI (checked by a rustls client that
//! verifies against a test CA), HTTP/2 and HTTP/1.1 by ALPN, reload when
//! the files change (a bad file keeps the old certificate, open
//! connections are untouched), bounded handshakes, the HTTP-to-HTTPS
//! redirect, and `ignis cert`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use ignis::app::{self, Sources};
use ignis_config::Manifest;
use ignis_edge::tls::CertStore;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::harness::*;

/// A test certificate authority.
pub struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    pub fn pem(&self) -> String {
        self.0.pem()
    }

    pub fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Ignis test CA");
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    /// A leaf for `names`, written to `dir/stem.pem` and `dir/stem.key`;
    /// returns its DER.
    pub fn leaf(&self, names: &[&str], dir: &Path, stem: &str) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.0).unwrap();
        std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.0.der().clone()).unwrap();
        roots
    }
}

/// The hello function served over HTTPS (and the plain listener, which
/// redirects when `redirect_http` is set).
struct TlsServer {
    https: SocketAddr,
    http: SocketAddr,
    certs: Arc<CertStore>,
    stops: Vec<oneshot::Sender<()>>,
    /// The functions outlive the listeners.
    _app: app::App,
}

impl TlsServer {
    async fn start(dir: &Path, tls: &str) -> TlsServer {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ncache_dir = \"{}\"\n[tls]\nlisten = \"127.0.0.1:0\"\n{tls}\n[functions.hello]\ncomponent = \"{}\"\n[[routes]]\npath = \"/hello\"\nfunction = \"hello\"\n",
            shared_cache(),
            wasm("hello")
        );
        let manifest = Manifest::from_str_at(&text, &dir.join("ignis.toml")).unwrap();
        let app = app::load(&manifest, Sources::PrebuiltOnly).unwrap();
        // The listeners as `ignis serve` binds them.
        let app::Listeners { http, https, .. } = app::bind(&manifest, &app).await.unwrap();
        let (https, certs) = https.expect("[tls] is set");
        let addrs = (https.local_addr(), http.local_addr());
        let mut stops = Vec::new();
        for server in [https, http] {
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            tokio::spawn(async move {
                server
                    .run(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        }
        TlsServer {
            _app: app,
            https: addrs.0,
            http: addrs.1,
            certs,
            stops,
        }
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Accepts any certificate and keeps the one it was shown (to see which
/// one the server picked for a name no certificate covers).
#[derive(Debug)]
struct Recorder(std::sync::Mutex<Option<CertificateDer<'static>>>);

impl rustls::client::danger::ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(end_entity.clone().into_owned());
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client verifying against `roots`, offering `alpn`.
fn verifying(roots: rustls::RootCertStore, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    sni: &str,
) -> std::io::Result<TlsStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
}

/// The certificate the server shows for `sni` (or the handshake error).
async fn shown(addr: SocketAddr, sni: &str) -> Result<CertificateDer<'static>, std::io::Error> {
    let recorder = Arc::new(Recorder(std::sync::Mutex::new(None)));
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(recorder.clone())
        .with_no_client_auth();
    connect(addr, Arc::new(config), sni).await?;
    let cert = recorder.0.lock().unwrap().take();
    Ok(cert.expect("a certificate was shown"))
}

/// GET /hello over HTTP/1.1 on `tls`; the body.
async fn hello_h1(tls: &mut TlsStream, host: &str) -> String {
    tls.write_all(format!("GET /hello HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    // The whole response, up to its last chunk (hello's body is chunked):
    // stopping at the text left "\r\n0\r\n\r\n" behind when it came in a
    // later record, to be read as the start of the next response on a kept
    // connection (a CI failure of the reload test).
    while !(String::from_utf8_lossy(&seen).contains("Hello from Ignis!\n")
        && seen.ends_with(&b"0\r\n\r\n"[..]))
    {
        let n = tls.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(seen).unwrap()
}

/// A verifying client gets 200 for /hello on a new connection to `name`.
async fn serves(addr: SocketAddr, ca: &Ca, name: &str) {
    let mut tls = connect(addr, verifying(ca.roots(), &[]), name)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let reply = hello_h1(&mut tls, name).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{name}: {reply}");
}

/// Polls `done` until it holds (at most 20 s): for the file watcher.
async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_exact_then_wildcard_then_default_and_clients_verify_them() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let a = ca.leaf(&["a.test"], dir.path(), "a");
    let b = ca.leaf(&["b.test"], dir.path(), "b");
    let w = ca.leaf(&["*.w.test"], dir.path(), "w");
    let d = ca.leaf(&["default.test"], dir.path(), "d");
    let server = TlsServer::start(
        dir.path(),
        "cert = \"d.pem\"\nkey = \"d.key\"\n[[tls.certificates]]\nhosts = [\"a.test\"]\ncert = \"a.pem\"\nkey = \"a.key\"\n[[tls.certificates]]\nhosts = [\"b.test\"]\ncert = \"b.pem\"\nkey = \"b.key\"\n[[tls.certificates]]\nhosts = [\"*.w.test\"]\ncert = \"w.pem\"\nkey = \"w.key\"\n",
    )
    .await;
    // Verified end to end: each name gets a chain the client accepts for it.
    for name in ["a.test", "b.test", "x.w.test", "default.test"] {
        serves(server.https, &ca, name).await;
    }
    // Which certificate each name gets.
    for (name, want) in [
        ("a.test", &a),
        ("A.TEST", &a),
        ("b.test", &b),
        ("x.w.test", &w),
        // A wildcard covers one label: not its base, not two labels.
        ("w.test", &d),
        ("y.x.w.test", &d),
        ("unknown.test", &d),
    ] {
        assert_eq!(&shown(server.https, name).await.unwrap(), want, "{name}");
    }
    // b's certificate is not accepted for a.test by a verifying client.
    let err = connect(server.https, verifying(ca.roots(), &[]), "w.test")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sni_is_a_handshake_failure_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    ca.leaf(&["a.test"], dir.path(), "a");
    let server = TlsServer::start(
        dir.path(),
        "unknown_sni = \"reject\"\n[[tls.certificates]]\nhosts = [\"a.test\"]\ncert = \"a.pem\"\nkey = \"a.key\"\n",
    )
    .await;
    assert!(shown(server.https, "other.test").await.is_err());
    assert_eq!(
        server
            .certs
            .stats()
            .unknown_sni_refused
            .load(Ordering::Relaxed),
        1
    );
    serves(server.https, &ca, "a.test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_selects_http2_or_http11_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    ca.leaf(&["a.test"], dir.path(), "a");
    let server = TlsServer::start(dir.path(), "cert = \"a.pem\"\nkey = \"a.key\"\n").await;

    let tls = connect(
        server.https,
        verifying(ca.roots(), &[b"h2", b"http/1.1"]),
        "a.test",
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = http::Request::get("https://a.test/hello")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"Hello from Ignis!\n");
    }

    let mut tls = connect(
        server.https,
        verifying(ca.roots(), &[b"http/1.1"]),
        "a.test",
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert!(
        hello_h1(&mut tls, "a.test")
            .await
            .starts_with("HTTP/1.1 200")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_on_change_a_bad_file_keeps_the_old_and_open_connections_stay() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let first = ca.leaf(&["a.test"], dir.path(), "a");
    let server = TlsServer::start(
        dir.path(),
        "reload_interval = \"100ms\"\n[[tls.certificates]]\nhosts = [\"a.test\"]\ncert = \"a.pem\"\nkey = \"a.key\"\n",
    )
    .await;
    assert_eq!(shown(server.https, "a.test").await.unwrap(), first);
    // Load through both changes: new connections (each a new handshake)
    // and requests, none may fail.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn({
        let (stop, roots, addr) = (stop.clone(), ca.roots(), server.https);
        async move {
            let (mut served, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match connect(addr, verifying(roots.clone(), &[]), "a.test").await {
                    Ok(mut tls) => {
                        let reply = hello_h1(&mut tls, "a.test").await;
                        if reply.starts_with("HTTP/1.1 200") {
                            served += 1;
                        } else {
                            failed.push(reply);
                        }
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (served, failed)
        }
    });
    let mut open = connect(server.https, verifying(ca.roots(), &[]), "a.test")
        .await
        .unwrap();
    assert!(
        hello_h1(&mut open, "a.test")
            .await
            .starts_with("HTTP/1.1 200")
    );

    // New files: new handshakes get the new certificate.
    let staged = tempfile::tempdir().unwrap();
    let second = ca.leaf(&["a.test"], staged.path(), "a");
    std::fs::rename(staged.path().join("a.key"), dir.path().join("a.key")).unwrap();
    std::fs::rename(staged.path().join("a.pem"), dir.path().join("a.pem")).unwrap();
    eventually("the new certificate is shown", async || {
        shown(server.https, "a.test").await.unwrap() == second
    })
    .await;
    assert!(server.certs.stats().reloads.load(Ordering::Relaxed) >= 1);

    // A broken certificate file: refused, counted, the second one stays.
    let failures = server.certs.stats().reload_failures.load(Ordering::Relaxed);
    std::fs::write(
        dir.path().join("a.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    )
    .unwrap();
    eventually("the bad file is refused", async || {
        server.certs.stats().reload_failures.load(Ordering::Relaxed) > failures
    })
    .await;
    assert_eq!(shown(server.https, "a.test").await.unwrap(), second);
    serves(server.https, &ca, "a.test").await;

    stop.store(true, Ordering::Relaxed);
    let (served, failed) = load.await.unwrap();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert!(served > 0);

    // The connection opened before both changes still serves.
    assert!(
        hello_h1(&mut open, "a.test")
            .await
            .starts_with("HTTP/1.1 200")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_garbage_handshakes_are_closed_without_holding_the_listener() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    ca.leaf(&["a.test"], dir.path(), "a");
    let server = TlsServer::start(
        dir.path(),
        "cert = \"a.pem\"\nkey = \"a.key\"\nhandshake_timeout = \"300ms\"\n",
    )
    .await;
    // A client that connects and says nothing is closed at the handshake
    // timeout; others are served meanwhile.
    let mut silent = tokio::net::TcpStream::connect(server.https).await.unwrap();
    serves(server.https, &ca, "a.test").await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buf))
        .await
        .expect("the silent connection is closed by the server");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // Plain HTTP on the TLS port: closed (an alert at most), nothing served.
    let mut plain = tokio::net::TcpStream::connect(server.https).await.unwrap();
    plain
        .write_all(b"GET /hello HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), plain.read_to_end(&mut got))
        .await
        .expect("closed");
    assert!(!String::from_utf8_lossy(&got).contains("Hello"), "{got:?}");

    serves(server.https, &ca, "a.test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_listener_redirects_to_https_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    ca.leaf(&["a.test"], dir.path(), "a");
    let server = TlsServer::start(
        dir.path(),
        "cert = \"a.pem\"\nkey = \"a.key\"\nredirect_http = true\n",
    )
    .await;
    let port = server.https.port();
    let reply = raw(
        server.http,
        b"POST /hello?x=1&y=2 HTTP/1.1\r\nHost: a.test:8080\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 308"), "{reply}");
    assert!(
        reply.contains(&format!(
            "location: https://a.test:{port}/hello?x=1&y=2\r\n"
        )),
        "{reply}"
    );
    assert!(!reply.contains("Hello from Ignis"), "{reply}");
    // No host to redirect to, or one that is not a host: 400.
    let reply = raw(server.http, b"GET /hello HTTP/1.0\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.0 400"), "{reply}");
    let reply = raw(
        server.http,
        b"GET /hello HTTP/1.1\r\nHost: a.test/evil\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    // HTTPS itself serves.
    serves(server.https, &ca, "a.test").await;
}

#[test]
fn cert_writes_a_usable_self_signed_pair_and_bad_files_are_startup_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = ignis()
        .args(["cert", "--host", "localhost", "--out"])
        .arg(dir.path().join("tls"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = dir.path().join("tls/key.pem");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let manifest = |cert: &str, key: &str| {
        write(
            dir.path(),
            "ignis.toml",
            &format!(
                "[server]\ncache_dir = \"{}\"\n[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n[functions.hello]\ncomponent = \"{}\"\n",
                shared_cache(),
                wasm("hello")
            ),
        )
    };
    let check = |path: &Path| {
        let out = ignis().arg("check").arg(path).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = check(&manifest("tls/cert.pem", "tls/key.pem"));
    assert!(ok, "{text}");
    assert!(text.contains("ok: TLS certificates"), "{text}");
    // A missing file, a file that is not PEM, a key of another certificate:
    // each names the file.
    let (ok, text) = check(&manifest("tls/missing.pem", "tls/key.pem"));
    assert!(!ok && text.contains("missing.pem"), "{text}");
    std::fs::write(dir.path().join("junk.pem"), "hello").unwrap();
    let (ok, text) = check(&manifest("junk.pem", "tls/key.pem"));
    assert!(
        !ok && text.contains("junk.pem") && text.contains("no "),
        "{text}"
    );
    let other = ignis()
        .args(["cert", "--out"])
        .arg(dir.path().join("other"))
        .output()
        .unwrap();
    assert!(other.status.success());
    let (ok, text) = check(&manifest("tls/cert.pem", "other/key.pem"));
    assert!(!ok && text.contains("does not match"), "{text}");
    // Names a certificate cannot carry: refused, nothing written.
    for bad in ["", "bad name!", "a..b", "*.com"] {
        let out = ignis()
            .args(["cert", "--host", bad, "--out"])
            .arg(dir.path().join("bad"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(
            err.contains("neither an IP address nor a host name"),
            "{bad:?}: {err}"
        );
        assert!(!dir.path().join("bad").exists(), "{bad:?}: files written");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    ca.leaf(&["a.test"], dir.path(), "a");
    let server = TlsServer::start(dir.path(), "cert = \"a.pem\"\nkey = \"a.key\"\n").await;
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        // One client configuration (its session store) for both connections.
        let config = Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(ca.roots())
                .with_no_client_auth(),
        );
        let mut first = connect(server.https, config.clone(), "a.test")
            .await
            .unwrap();
        // A request and its response: TLS 1.3 tickets arrive after the handshake.
        assert!(
            hello_h1(&mut first, "a.test")
                .await
                .starts_with("HTTP/1.1 200")
        );
        assert_eq!(
            first.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
        let mut second = connect(server.https, config, "a.test").await.unwrap();
        assert_eq!(
            second.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "{:?}",
            versions
        );
        assert!(
            hello_h1(&mut second, "a.test")
                .await
                .starts_with("HTTP/1.1 200")
        );
    }
}
