//! Host + path routing: the most specific route wins, whatever the file order.
//!
//! Specificity, compared in this order:
//! 1. host: an exact host beats `*.suffix` (longer suffix first), which beats no host;
//! 2. path: an exact path beats a prefix (`/api/...`); longer prefixes beat shorter ones.

use std::sync::Arc;

use ignis_config::RouteConfig;

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    Any,
    Exact(String),
    /// `.example.com` for `*.example.com`.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PathMatch {
    Exact(String),
    /// `/api` for `/api/...`; empty for `/...`.
    Prefix(String),
}

#[derive(Debug)]
struct Route<T> {
    host: HostMatch,
    path: PathMatch,
    target: Arc<T>,
}

impl<T> Route<T> {
    /// A sortable specificity score, or `None` when the route does not match.
    fn score(&self, host: &str, path: &str) -> Option<(u8, usize, u8, usize)> {
        let host_score = match &self.host {
            HostMatch::Any => (0, 0),
            HostMatch::Exact(h) if h.eq_ignore_ascii_case(host) => (2, h.len()),
            HostMatch::Suffix(s)
                if host.len() > s.len() && host.to_ascii_lowercase().ends_with(s.as_str()) =>
            {
                (1, s.len())
            }
            _ => return None,
        };
        let path_score = match &self.path {
            PathMatch::Exact(p) if p == path => (1, p.len()),
            PathMatch::Prefix(p)
                if path.starts_with(p.as_str())
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/') =>
            {
                (0, p.len())
            }
            _ => return None,
        };
        Some((host_score.0, host_score.1, path_score.0, path_score.1))
    }
}

/// The routing table.
#[derive(Debug)]
pub struct Router<T> {
    routes: Vec<Route<T>>,
}

impl<T> Router<T> {
    /// Builds the table; `resolve` maps a function name to its target.
    pub fn new(
        routes: &[RouteConfig],
        mut resolve: impl FnMut(&str) -> Option<Arc<T>>,
    ) -> Result<Self, String> {
        let mut table = Vec::with_capacity(routes.len());
        for r in routes {
            let target = resolve(&r.function).ok_or_else(|| {
                format!("route {} names unknown function `{}`", r.path, r.function)
            })?;
            let host = match r.host.as_deref() {
                None => HostMatch::Any,
                Some(h) => match h.strip_prefix('*') {
                    Some(suffix) => HostMatch::Suffix(suffix.to_string()),
                    None => HostMatch::Exact(h.to_string()),
                },
            };
            let path = match r.path.strip_suffix("/...") {
                Some(prefix) => PathMatch::Prefix(prefix.to_string()),
                None => PathMatch::Exact(r.path.clone()),
            };
            table.push(Route { host, path, target });
        }
        Ok(Router { routes: table })
    }

    /// The most specific route for `host` (port stripped) and `path`.
    pub fn route(&self, host: &str, path: &str) -> Option<&Arc<T>> {
        self.routes
            .iter()
            .filter_map(|r| r.score(host, path).map(|s| (s, &r.target)))
            .max_by_key(|(s, _)| *s)
            .map(|(_, t)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, path: &str, function: &str) -> RouteConfig {
        RouteConfig {
            host: host.map(str::to_string),
            path: path.to_string(),
            function: function.to_string(),
        }
    }

    fn router(routes: &[RouteConfig]) -> Router<String> {
        Router::new(routes, |name| Some(Arc::new(name.to_string()))).unwrap()
    }

    fn hit<'a>(r: &'a Router<String>, host: &str, path: &str) -> Option<&'a str> {
        r.route(host, path).map(|s| s.as_str())
    }

    #[test]
    fn most_specific_wins_regardless_of_order() {
        let r = router(&[
            route(None, "/...", "fallback"),
            route(None, "/api/...", "api"),
            route(None, "/api/users", "users"),
            route(Some("*.example.com"), "/api/...", "wild"),
            route(Some("shop.example.com"), "/api/...", "shop"),
        ]);
        assert_eq!(hit(&r, "localhost", "/"), Some("fallback"));
        assert_eq!(hit(&r, "localhost", "/api"), Some("api"));
        assert_eq!(hit(&r, "localhost", "/api/x"), Some("api"));
        assert_eq!(hit(&r, "localhost", "/apix"), Some("fallback"));
        assert_eq!(hit(&r, "localhost", "/api/users"), Some("users"));
        assert_eq!(hit(&r, "blog.example.com", "/api/users"), Some("wild"));
        assert_eq!(hit(&r, "SHOP.example.com", "/api/users"), Some("shop"));
        assert_eq!(hit(&r, "example.com", "/api/users"), Some("users"));
    }

    #[test]
    fn no_match_is_none() {
        let r = router(&[
            route(None, "/hello", "hello"),
            route(Some("a.com"), "/...", "a"),
        ]);
        assert_eq!(hit(&r, "b.com", "/hello/x"), None);
        assert_eq!(hit(&r, "b.com", "/hello"), Some("hello"));
        assert_eq!(hit(&r, "a.com", "/anything"), Some("a"));
    }
}
