//! TLS for the HTTPS listener (`[tls]`): certificates chosen by SNI,
//! reloaded when their files change.
//!
//! Invariants:
//! - A handshake gets the certificate of the exact host its SNI names, else
//!   that of the wildcard one label above it (`*.example.com` serves
//!   `a.example.com`, never `example.com` or `a.b.example.com`), else the
//!   default certificate if `unknown_sni = "default"`, else a handshake
//!   failure. A client sending no SNI (an IP address) is an unknown name.
//! - The certificate set is replaced whole, atomically (`ArcSwap`): a
//!   handshake sees the old set or the new one, never a mix, and
//!   connections already open are not touched by a reload.
//! - A reload that fails (a missing, unreadable or malformed file, a key
//!   that does not match its certificate) keeps the running set and logs
//!   which file and why; at startup the same failure is an error.
//! - TLS 1.2 and 1.3 only, with rustls's default suites for the ring
//!   provider (AEAD with forward secrecy only); ALPN offers `h2` then
//!   `http/1.1`; sessions resume by ticket and by a bounded session cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use ignis_config::{CertFiles, TlsConfig, UnknownSni};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;

/// Sessions the server remembers for resumption by id (tickets need none).
const SESSION_CACHE: usize = 4096;

/// A certificate file that could not be used, naming it.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct CertError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

fn cert_error(path: &Path, reason: impl ToString) -> CertError {
    CertError {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// One loaded certificate set.
struct Certs {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the name below the `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

/// Counters of the certificate store.
#[derive(Debug, Default)]
pub struct TlsStats {
    /// Successful reloads after startup.
    pub reloads: AtomicU64,
    /// Reloads refused (the old set kept).
    pub reload_failures: AtomicU64,
    /// Handshakes refused for want of a certificate for their SNI.
    pub unknown_sni_refused: AtomicU64,
}

/// The certificates of the HTTPS listener, by SNI.
pub struct CertStore {
    config: TlsConfig,
    current: ArcSwap<Certs>,
    /// (modified time, length) of every file, as last loaded.
    stamps: std::sync::Mutex<Vec<Option<(SystemTime, u64)>>>,
    stats: TlsStats,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// Loads every certificate `config` names; the first bad file is the error.
    pub fn load(config: &TlsConfig) -> Result<Arc<CertStore>, CertError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let stamps = stamps(config);
        let certs = load_certs(config, &provider)?;
        Ok(Arc::new(CertStore {
            config: config.clone(),
            current: ArcSwap::from_pointee(certs),
            stamps: std::sync::Mutex::new(stamps),
            stats: TlsStats::default(),
            provider,
        }))
    }

    /// Its counters.
    pub fn stats(&self) -> &TlsStats {
        &self.stats
    }

    /// Reloads the set if a file changed since the last load; a failure
    /// keeps the running set (logged, counted).
    pub fn reload_if_changed(&self) {
        let now = stamps(&self.config);
        {
            let mut last = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
            if *last == now {
                return;
            }
            // Tried once per change: a bad file is reported once, not at
            // every check, and a fixed file is tried again.
            *last = now;
        }
        match load_certs(&self.config, &self.provider) {
            Ok(certs) => {
                self.current.store(Arc::new(certs));
                self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!("TLS certificates reloaded");
            }
            Err(e) => {
                self.stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "TLS certificates not reloaded; the running ones stay");
            }
        }
    }

    /// The rustls server configuration resolving through this store.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(Arc::new(config))
    }

    /// Checks the files every `reload_interval` until `store` is dropped.
    pub fn watch(store: &Arc<CertStore>) {
        let every = store.config.reload_interval;
        let weak = Arc::downgrade(store);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(store) = weak.upgrade() else { return };
                // File reads and key parsing: off the async workers.
                let _ = tokio::task::spawn_blocking(move || store.reload_if_changed()).await;
            }
        });
    }

    /// The handshake timeout.
    pub fn handshake_timeout(&self) -> Duration {
        self.config.handshake_timeout
    }

    fn resolve(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let certs = self.current.load();
        let found = sni.and_then(|name| {
            let name = name.to_ascii_lowercase();
            certs.exact.get(&name).cloned().or_else(|| {
                let (_, parent) = name.split_once('.')?;
                certs.wildcard.get(parent).cloned()
            })
        });
        let found = found.or_else(|| match self.config.unknown_sni {
            UnknownSni::Default => certs.default.clone(),
            UnknownSni::Reject => None,
        });
        if found.is_none() {
            self.stats
                .unknown_sni_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(sni = ?sni, "TLS handshake refused: no certificate for this name");
        }
        found
    }
}

#[derive(Debug)]
struct Resolver(Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.resolve(hello.server_name())
    }
}

fn files(config: &TlsConfig) -> impl Iterator<Item = &CertFiles> {
    config
        .default
        .iter()
        .chain(config.certificates.iter().map(|c| &c.files))
}

fn stamps(config: &TlsConfig) -> Vec<Option<(SystemTime, u64)>> {
    files(config)
        .flat_map(|f| [&f.cert, &f.key])
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

fn load_certs(config: &TlsConfig, provider: &CryptoProvider) -> Result<Certs, CertError> {
    let mut certs = Certs {
        exact: HashMap::new(),
        wildcard: HashMap::new(),
        default: None,
    };
    if let Some(files) = &config.default {
        certs.default = Some(load_pair(files, provider)?);
    }
    for entry in &config.certificates {
        let key = load_pair(&entry.files, provider)?;
        for host in &entry.hosts {
            match host.strip_prefix("*.") {
                Some(parent) => certs.wildcard.insert(parent.to_string(), key.clone()),
                None => certs.exact.insert(host.clone(), key.clone()),
            };
        }
    }
    Ok(certs)
}

fn load_pair(files: &CertFiles, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| cert_error(&files.cert, pem_reason(e)))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_error(&files.cert, pem_reason(e)))?;
    if chain.is_empty() {
        return Err(cert_error(&files.cert, "no CERTIFICATE block in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| cert_error(&files.key, pem_reason(e)))?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| cert_error(&files.key, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, key);
    certified.keys_match().map_err(|e| {
        cert_error(
            &files.key,
            format!(
                "does not match the certificate in {}: {e}",
                files.cert.display()
            ),
        )
    })?;
    Ok(Arc::new(certified))
}

fn pem_reason(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM block of the expected kind".into(),
        other => format!("malformed PEM ({other:?})"),
    }
}
