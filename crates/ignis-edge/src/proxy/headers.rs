//! What a proxied request and response carry across the proxy (RFC 9110
//! section 7.6): hop-by-hop fields stay on their hop, `Via` is added, and
//! the client's address, scheme and host are passed on in
//! `X-Forwarded-For/Proto/Host` and `Forwarded` (RFC 7239).
//!
//! Forwarding headers from a client are believed only when the peer is one
//! of `server.trusted_proxies`; from anyone else they are replaced, so a
//! client cannot make an origin think it comes from another address.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ignis_config::IpRange;

/// Fields that describe one hop's connection, never forwarded (plus any
/// field the `Connection` header names).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes the hop-by-hop fields from `headers`; `Upgrade` (and the
/// `Connection: upgrade` that goes with it) are kept when `upgrade` is set
/// (a WebSocket handshake, passed through end to end). `te: trailers`
/// survives (it is how a gRPC client says it accepts trailers).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for name in named {
        if !(upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether `ip` is a trusted proxy.
pub(crate) fn trusted(ip: IpAddr, proxies: &[IpRange]) -> bool {
    proxies.iter().any(|r| r.contains(ip))
}

/// The client's address: the peer, or (when the peer is a trusted proxy)
/// the last address in `X-Forwarded-For` that is not a trusted proxy.
pub(crate) fn client_ip(headers: &HeaderMap, peer: IpAddr, proxies: &[IpRange]) -> IpAddr {
    if !trusted(peer, proxies) {
        return peer;
    }
    let listed: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    listed
        .iter()
        .rev()
        .find(|ip| !trusted(**ip, proxies))
        .or(listed.first())
        .copied()
        .unwrap_or(peer)
}

/// How the request reached us.
pub(crate) struct Hop<'a> {
    pub(crate) peer: SocketAddr,
    pub(crate) https: bool,
    /// The host the client asked for (with its port, if any).
    pub(crate) host: &'a str,
    pub(crate) proxies: &'a [IpRange],
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Sets `X-Forwarded-For/Proto/Host`, `Forwarded` and `Via` on a request
/// about to go to an origin.
///
/// Every proxied request passes here, so each value is built in one
/// buffer that becomes the header value without another copy, and fixed
/// values are static (docs/perf/2026-12-01-proxy-path.md).
pub(crate) fn add_forwarding(headers: &mut HeaderMap, hop: &Hop<'_>, version: http::Version) {
    use std::fmt::Write as _;
    let believed = trusted(hop.peer.ip(), hop.proxies);
    let ip = hop.peer.ip().to_canonical();
    let proto = if hop.https { "https" } else { "http" };

    let mut xff = chain(headers, &X_FORWARDED_FOR, believed, 16);
    let _ = write!(xff, "{ip}");
    set(headers, X_FORWARDED_FOR, xff);
    if !(believed && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !(believed && headers.contains_key(&X_FORWARDED_HOST)) {
        set(headers, X_FORWARDED_HOST, hop.host.to_string());
    }

    let mut forwarded = chain(headers, &header::FORWARDED, believed, 32 + hop.host.len());
    let _ = match ip {
        IpAddr::V4(v4) => write!(forwarded, "for={v4}"),
        IpAddr::V6(v6) => write!(forwarded, "for=\"[{v6}]\""),
    };
    forwarded.push_str(";proto=");
    forwarded.push_str(proto);
    forwarded.push_str(";host=");
    if hop
        .host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-".contains(&b))
    {
        forwarded.push_str(hop.host);
    } else {
        forwarded.push('"');
        forwarded.extend(hop.host.chars().filter(|c| !matches!(c, '"' | '\\')));
        forwarded.push('"');
    }
    set(headers, header::FORWARDED, forwarded);
    add_via(headers, version);
}

/// Appends this proxy to `Via`.
pub(crate) fn add_via(headers: &mut HeaderMap, version: http::Version) {
    let ours = match version {
        http::Version::HTTP_10 => "1.0 ignis",
        http::Version::HTTP_2 => "2 ignis",
        http::Version::HTTP_3 => "3 ignis",
        _ => "1.1 ignis",
    };
    match joined(headers, &header::VIA) {
        Some(mut prior) => {
            prior.push_str(", ");
            prior.push_str(ours);
            set(headers, header::VIA, prior);
        }
        None => {
            headers.insert(header::VIA, HeaderValue::from_static(ours));
        }
    }
}

/// The start of this hop's value of `name`: what it already says and `, `
/// when the peer is believed (the chain goes on), else an empty buffer of
/// `capacity` (the peer's word is replaced).
fn chain(headers: &HeaderMap, name: &HeaderName, believed: bool, capacity: usize) -> String {
    match believed.then(|| joined(headers, name)).flatten() {
        Some(mut prior) => {
            prior.push_str(", ");
            prior
        }
        None => String::with_capacity(capacity),
    }
}

/// All values of `name`, joined with `, ` (`None` when absent or not text).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter();
    let mut out = values.next()?.to_str().ok()?.to_string();
    for v in values {
        out.push_str(", ");
        out.push_str(v.to_str().ok()?);
    }
    Some(out)
}

/// Sets `name` to `value` (the buffer becomes the value), or removes it
/// when `value` is not a valid field value.
fn set(headers: &mut HeaderMap, name: HeaderName, value: String) {
    match HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        Ok(v) => {
            headers.insert(name, v);
        }
        Err(_) => {
            headers.remove(name);
        }
    }
}

/// Whether the request asks to become a WebSocket (HTTP/1.1 Upgrade).
pub(crate) fn is_websocket<B>(req: &http::Request<B>) -> bool {
    req.version() == http::Version::HTTP_11
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        && req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn hop_by_hop_fields_and_the_ones_connection_names_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "trailers, deflate"),
            ("proxy-authorization", "Basic x"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-kept"]);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn a_websocket_upgrade_keeps_its_upgrade() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    fn hop<'a>(peer: &str, proxies: &'a [IpRange]) -> Hop<'a> {
        Hop {
            peer: peer.parse().unwrap(),
            https: true,
            host: "shop.example",
            proxies,
        }
    }

    #[test]
    fn an_untrusted_peer_cannot_forge_its_address() {
        // Before trusted_proxies existed nothing here was checked: this
        // asserts the forged values are replaced.
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "for=1.2.3.4"),
        ]);
        add_forwarding(
            &mut h,
            &hop("203.0.113.9:5000", &[]),
            http::Version::HTTP_11,
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "shop.example");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.9;proto=https;host=shop.example"
        );
        assert_eq!(h["via"], "1.1 ignis");
        assert_eq!(
            client_ip(
                &map(&[("x-forwarded-for", "1.2.3.4")]),
                "203.0.113.9".parse().unwrap(),
                &[]
            ),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_trusted_proxy_chain_is_extended() {
        let proxies = ["10.0.0.0/8".parse().unwrap()];
        let mut h = map(&[
            ("x-forwarded-for", "198.51.100.7, 10.1.1.1"),
            ("x-forwarded-proto", "http"),
            ("forwarded", "for=198.51.100.7"),
            ("via", "1.1 lb"),
        ]);
        let client = client_ip(&h, "10.2.2.2".parse().unwrap(), &proxies);
        assert_eq!(client, "198.51.100.7".parse::<IpAddr>().unwrap());
        add_forwarding(&mut h, &hop("10.2.2.2:1", &proxies), http::Version::HTTP_2);
        assert_eq!(h["x-forwarded-for"], "198.51.100.7, 10.1.1.1, 10.2.2.2");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(
            h["forwarded"],
            "for=198.51.100.7, for=10.2.2.2;proto=https;host=shop.example"
        );
        assert_eq!(h["via"], "1.1 lb, 2 ignis");
    }

    #[test]
    fn ipv6_clients_are_quoted_in_forwarded() {
        let mut h = HeaderMap::new();
        add_forwarding(
            &mut h,
            &hop("[2001:db8::1]:443", &[]),
            http::Version::HTTP_11,
        );
        assert_eq!(
            h["forwarded"],
            "for=\"[2001:db8::1]\";proto=https;host=shop.example"
        );
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
    }
}
