//! Host + path routing: the most specific route wins, whatever the file order.
//!
//! Specificity, compared in this order:
//! 1. host: an exact host beats `*.suffix` (longer suffix first), which beats no host;
//! 2. path: an exact path beats a prefix (`/api/...`); longer prefixes beat shorter ones.

use std::sync::Arc;

use ignis_config::{RouteConfig, RouteTarget};

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
    /// `/rooms/{id}` (`rest: false`) or `/rooms/{id}/...` (`rest: true`):
    /// `base` is `/rooms`; the id is the next segment.
    Id {
        base: String,
        rest: bool,
    },
}

/// Host kind, host length, path kind, path length: larger is more specific.
type Score = (u8, usize, u8, usize);

#[derive(Debug)]
struct Route<T> {
    host: HostMatch,
    path: PathMatch,
    target: Arc<T>,
}

impl<T> Route<T> {
    /// A sortable specificity score and the `{id}` segment, or `None` when
    /// the route does not match.
    fn score<'p>(&self, host: &str, path: &'p str) -> Option<(Score, Option<&'p str>)> {
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
        let mut id = None;
        let path_score = match &self.path {
            PathMatch::Exact(p) if p == path => (1, p.len()),
            PathMatch::Prefix(p)
                if path.starts_with(p.as_str())
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/') =>
            {
                (0, p.len())
            }
            PathMatch::Id { base, rest } => {
                let after = path.strip_prefix(base.as_str())?.strip_prefix('/')?;
                let (segment, tail) = after.split_at(after.find('/').unwrap_or(after.len()));
                if segment.is_empty() || (!tail.is_empty() && !rest) {
                    return None;
                }
                id = Some(segment);
                // Longer than the bare prefix `base/...` would be.
                (0, base.len() + 1)
            }
            _ => return None,
        };
        Some(((host_score.0, host_score.1, path_score.0, path_score.1), id))
    }
}

/// The routing table.
#[derive(Debug)]
pub struct Router<T> {
    routes: Vec<Route<T>>,
}

impl<T> Router<T> {
    /// Builds the table; `resolve` maps a route's target to what serves it.
    pub fn new(
        routes: &[RouteConfig],
        mut resolve: impl FnMut(&RouteTarget) -> Option<Arc<T>>,
    ) -> Result<Self, String> {
        let mut table = Vec::with_capacity(routes.len());
        for r in routes {
            let target = resolve(&r.target)
                .ok_or_else(|| format!("route {} names unknown target {:?}", r.path, r.target))?;
            let host = match r.host.as_deref() {
                None => HostMatch::Any,
                Some(h) => match h.strip_prefix('*') {
                    Some(suffix) => HostMatch::Suffix(suffix.to_string()),
                    None => HostMatch::Exact(h.to_string()),
                },
            };
            let (base, rest) = match r.path.strip_suffix("/...") {
                Some(prefix) => (prefix, true),
                None => (r.path.as_str(), false),
            };
            let path = match (base.strip_suffix("/{id}"), rest) {
                (Some(base), rest) => PathMatch::Id {
                    base: base.to_string(),
                    rest,
                },
                (None, true) => PathMatch::Prefix(base.to_string()),
                (None, false) => PathMatch::Exact(r.path.clone()),
            };
            table.push(Route { host, path, target });
        }
        Ok(Router { routes: table })
    }

    /// The most specific route for `host` (port stripped) and `path`, with
    /// the `{id}` segment of an actor route.
    pub fn route<'p>(&self, host: &str, path: &'p str) -> Option<(&Arc<T>, Option<&'p str>)> {
        self.routes
            .iter()
            .filter_map(|r| r.score(host, path).map(|(s, id)| (s, &r.target, id)))
            .max_by_key(|(s, _, _)| *s)
            .map(|(_, t, id)| (t, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, path: &str, function: &str) -> RouteConfig {
        RouteConfig {
            host: host.map(str::to_string),
            path: path.to_string(),
            target: RouteTarget::Function(function.to_string()),
            upstream: None,
        }
    }

    fn router(routes: &[RouteConfig]) -> Router<String> {
        Router::new(routes, |t| match t {
            RouteTarget::Function(name)
            | RouteTarget::Actor(name)
            | RouteTarget::Upstream(name) => Some(Arc::new(name.clone())),
        })
        .unwrap()
    }

    fn hit<'a>(r: &'a Router<String>, host: &str, path: &str) -> Option<&'a str> {
        r.route(host, path).map(|(s, _)| s.as_str())
    }

    #[test]
    fn actor_routes_capture_the_id() {
        let mut rooms = route(None, "/rooms/{id}/...", "room");
        rooms.target = RouteTarget::Actor("room".into());
        let mut counter = route(None, "/counter/{id}", "counter");
        counter.target = RouteTarget::Actor("counter".into());
        let r = router(&[route(None, "/...", "fallback"), rooms, counter]);
        let id = |path| r.route("h", path).and_then(|(_, id)| id);
        assert_eq!(hit(&r, "h", "/rooms/lobby/messages"), Some("room"));
        assert_eq!(id("/rooms/lobby/messages"), Some("lobby"));
        assert_eq!(id("/rooms/lobby"), Some("lobby"));
        assert_eq!(hit(&r, "h", "/rooms/"), Some("fallback"));
        assert_eq!(hit(&r, "h", "/rooms"), Some("fallback"));
        assert_eq!(id("/counter/c1"), Some("c1"));
        assert_eq!(hit(&r, "h", "/counter/c1/x"), Some("fallback"));
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
