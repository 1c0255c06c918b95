//! The route table: longest prefix on segment boundaries wins (SPEC §5), and the path checks
//! that run before any route is chosen.

use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery};
use http::{Method, Uri};

use crate::config::{AuthMode, RouteConfig};
use crate::error::Error;
use crate::metrics::RouteSeries;

/// Refuses every path that an upstream could read as another path than the one the routes
/// were matched on. Deny by default, as Spring Security's `StrictHttpFirewall` does, rather
/// than normalizing the way one upstream stack would and missing the way another does:
///
/// - dot-segments (`/./`, `/../`) and a literal `\`, which many servers read as `/`;
/// - empty segments (`//`), which many servers merge into one `/`;
/// - `;`, whose path parameters Tomcat and Jetty strip before routing;
/// - a percent-encoded unreserved character (`%61` for `a`, `%2e` for `.`): RFC 3986 §6.2.2.2
///   says they are never to be encoded, and the servers that decode them would route
///   `/%61pi` as `/api`;
/// - an encoded `/` or `\`, which would split a segment in two once decoded;
/// - `%25` followed by two hex digits: a double encoding, decoded twice by some stacks;
/// - a `%` not followed by two hex digits, which stacks repair each in their own way.
///
/// Reserved and other characters stay encodable: `%20`, `%3A`, `%E4%BD%A0` pass.
pub fn check_path(path: &str) -> Result<(), Error> {
    // One pass over the bytes, since it runs on every request.
    let bytes = path.as_bytes();
    let mut segment_start = 0;
    let mut at = 0;
    while at <= bytes.len() {
        match bytes.get(at) {
            None | Some(b'/') => {
                let segment = &bytes[segment_start..at];
                if segment == b"." || segment == b".." {
                    return Err(Error::BadPath);
                }
                if at > 0 && at < bytes.len() && bytes[at - 1] == b'/' {
                    return Err(Error::BadPath);
                }
                segment_start = at + 1;
            }
            Some(b'\\' | b';') => return Err(Error::BadPath),
            Some(b'%') => {
                let decoded = escaped_byte(&bytes[at + 1..]).ok_or(Error::BadPath)?;
                let refused = decoded.is_ascii_alphanumeric()
                    || matches!(decoded, b'-' | b'.' | b'_' | b'~' | b'/' | b'\\')
                    || (decoded == b'%' && escaped_byte(&bytes[at + 3..]).is_some());
                if refused {
                    return Err(Error::BadPath);
                }
                // Past the two hex digits, which can be neither a separator nor refused.
                at += 2;
            }
            Some(_) => {}
        }
        at += 1;
    }
    Ok(())
}

/// The byte that two hex digits at the start of `rest` stand for.
fn escaped_byte(rest: &[u8]) -> Option<u8> {
    let digit = |b: &u8| (*b as char).to_digit(16);
    match rest {
        [high, low, ..] => Some((digit(high)? * 16 + digit(low)?) as u8),
        _ => None,
    }
}

/// True when `path` is `prefix` itself or lies below it. `prefix` has no trailing `/`, and the
/// empty prefix (the route `/`) matches everything.
pub fn is_under(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.is_empty(),
        None => false,
    }
}

pub struct Route {
    pub config: RouteConfig,
    /// The route's metric label and series.
    pub series: Arc<RouteSeries>,
    /// `config.path` without its trailing `/`.
    prefix: String,
    authority: Authority,
    /// The upstream URL's own path, without a trailing `/`, put before every forwarded path.
    base_path: String,
}

impl Route {
    fn new(config: RouteConfig) -> Route {
        let prefix = config.path.trim_end_matches('/').to_string();
        let parts = config.upstream.clone().into_parts();
        let base_path = parts
            .path_and_query
            .as_ref()
            .map(|p| p.path().trim_end_matches('/').to_string())
            .unwrap_or_default();
        Route {
            series: RouteSeries::new(&config.path),
            prefix,
            authority: parts
                .authority
                .expect("validated upstream URLs have an authority"),
            base_path,
            config,
        }
    }

    pub fn auth(&self) -> AuthMode {
        self.config.auth
    }

    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    pub fn allows_method(&self, method: &Method) -> bool {
        match &self.config.methods {
            None => true,
            Some(methods) => methods.contains(method),
        }
    }

    /// The refusal of a method [`Route::allows_method`] does not allow, naming those it does.
    pub fn method_refused(&self) -> Error {
        let allowed = self.config.methods.iter().flatten().map(Method::as_str);
        Error::MethodNotAllowed {
            allow: allowed.collect::<Vec<_>>().join(", "),
        }
    }

    pub fn allows_app(&self, appid: &str) -> bool {
        match &self.config.apps {
            None => true,
            Some(apps) => apps.iter().any(|allowed| allowed == appid),
        }
    }

    /// Where the upstream listens (validated `http`: the scheme says nothing more).
    pub fn upstream_authority(&self) -> &Authority {
        &self.authority
    }

    /// The request target the upstream is asked for, in origin form: its base path, then the
    /// request path (less the route prefix with `strip_prefix`), then the query unchanged.
    pub fn upstream_uri(&self, uri: &Uri) -> Result<Uri, Error> {
        let mut target = Vec::with_capacity(self.base_path.len() + uri.path().len() + 64);
        self.write_upstream_target(uri.path(), uri.query(), &mut target);
        PathAndQuery::from_maybe_shared(bytes::Bytes::from(target))
            .map(Uri::from)
            .map_err(|_| Error::BadPath)
    }

    /// Appends the target of [`Route::upstream_uri`] for a request's `path` and `query` to `out`
    /// without checking it again: it is made of a request target `http::Uri` accepts and the
    /// path of a validated upstream URL, and each keeps its characters.
    pub fn write_upstream_target(&self, path: &str, query: Option<&str>, out: &mut Vec<u8>) {
        let path = if self.config.strip_prefix {
            match &path[self.prefix.len()..] {
                "" => "/",
                rest => rest,
            }
        } else {
            path
        };
        out.extend_from_slice(self.base_path.as_bytes());
        out.extend_from_slice(path.as_bytes());
        if let Some(query) = query {
            out.push(b'?');
            out.extend_from_slice(query.as_bytes());
        }
    }
}

pub struct RouteTable {
    /// Longest prefix first, so the first match is the longest.
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(configs: &[RouteConfig]) -> RouteTable {
        let mut routes: Vec<Route> = configs.iter().cloned().map(Route::new).collect();
        routes.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
        RouteTable { routes }
    }

    pub fn find(&self, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|route| is_under(&route.prefix, path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str, strip_prefix: bool) -> RouteConfig {
        RouteConfig {
            path: path.into(),
            upstream: "http://127.0.0.1:3000".parse().unwrap(),
            auth: AuthMode::Public,
            methods: None,
            apps: None,
            strip_prefix,
            timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn dot_segments_and_encoded_separators_are_bad_paths() {
        for path in [
            "//api/orders",
            "/api//orders",
            "/%61pi/orders",
            "/%41PI/orders",
            "/api/%7euser",
            "/api/%2D",
            "/%2561pi/orders",
            "/api/100%2525",
            "/api;x/orders",
            "/api/orders;jsessionid=1",
            "/api/%zz",
            "/api/%4",
            "/api/%",
            "/api/../admin",
            "/api/./x",
            "/api/..",
            "/api/%2e%2e/admin",
            "/api/%2E./admin",
            "/api/.%2e/admin",
            "/api/%252e%252e/admin",
            "/api/%25252e%25252e/admin",
            "/api/a%2fb",
            "/api/a%2Fb",
            "/api/a%252fb",
            "/api/a%5cb",
            "/api/a%255cb",
            "/api\\..\\admin",
        ] {
            assert_eq!(check_path(path), Err(Error::BadPath), "{path}");
        }
    }

    /// The rules as first written, segment by segment: the one-pass check must agree with it.
    fn split_check_path(path: &str) -> Result<(), Error> {
        if path.contains(['\\', ';']) || path.contains("//") {
            return Err(Error::BadPath);
        }
        if path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
        {
            return Err(Error::BadPath);
        }
        let bytes = path.as_bytes();
        let mut from = 0;
        while let Some(offset) = bytes[from..].iter().position(|&b| b == b'%') {
            let at = from + offset;
            let decoded = escaped_byte(&bytes[at + 1..]).ok_or(Error::BadPath)?;
            let refused = decoded.is_ascii_alphanumeric()
                || matches!(decoded, b'-' | b'.' | b'_' | b'~' | b'/' | b'\\')
                || (decoded == b'%' && escaped_byte(&bytes[at + 3..]).is_some());
            if refused {
                return Err(Error::BadPath);
            }
            from = at + 3;
        }
        Ok(())
    }

    #[test]
    fn the_one_pass_check_agrees_with_the_rules_segment_by_segment() {
        let pieces = [
            "/", "//", ".", "..", "a", "%", "%2", "%2e", "%2E", "%25", "%2f", "%41", "%3A", ";",
            "\\", "%zz", "%252e",
        ];
        let mut paths = vec![String::new()];
        for _ in 0..4 {
            paths = paths
                .iter()
                .flat_map(|path| pieces.iter().map(move |piece| format!("{path}{piece}")))
                .collect();
            for path in &paths {
                assert_eq!(check_path(path), split_check_path(path), "{path:?}");
            }
        }
    }

    #[test]
    fn ordinary_paths_pass() {
        for path in [
            "/",
            "/api/orders",
            "/api/a.b/c..d",
            "/api/%E4%BD%A0",
            "/api/x%20y",
            "/api/a%3Ab",
            "/api/a%3bb",
            "/api/100%25",
            "/api/100%25off",
            "/api/",
        ] {
            assert_eq!(check_path(path), Ok(()), "{path}");
        }
    }

    #[test]
    fn longest_prefix_on_segment_boundaries_wins() {
        let table = RouteTable::new(&[
            route("/", false),
            route("/api/", false),
            route("/api/public", false),
        ]);
        let found = |path: &str| table.find(path).map(|r| r.config.path.clone());
        assert_eq!(found("/api").as_deref(), Some("/api/"));
        assert_eq!(found("/api/").as_deref(), Some("/api/"));
        assert_eq!(found("/api/x").as_deref(), Some("/api/"));
        assert_eq!(found("/apix").as_deref(), Some("/"));
        assert_eq!(found("/api/public/x").as_deref(), Some("/api/public"));
        assert_eq!(found("/api/publicx").as_deref(), Some("/api/"));
    }

    #[test]
    fn no_route_without_a_match() {
        let table = RouteTable::new(&[route("/api/", false)]);
        assert!(table.find("/apix").is_none());
        assert!(table.find("/").is_none());
    }

    #[test]
    fn strip_prefix_keeps_the_rest_and_the_query() {
        let table = RouteTable::new(&[route("/api/public/", true)]);
        let route = table.find("/api/public/x").unwrap();
        let uri: Uri = "/api/public/x/y?a=1&b=%20".parse().unwrap();
        assert_eq!(
            route.upstream_uri(&uri).unwrap().to_string(),
            "/x/y?a=1&b=%20"
        );
        let uri: Uri = "/api/public".parse().unwrap();
        assert_eq!(route.upstream_uri(&uri).unwrap().to_string(), "/");
    }
}
