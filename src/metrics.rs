//! Prometheus metrics (SPEC §9), served as text on the admin listener. Long-lived: counters
//! survive config reloads.

use std::borrow::Cow;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A route label: the route's `path`, `auth` for the gateway's own endpoints, `none` when
/// nothing matched. Shared, so labelling a request clones a pointer, not a string.
pub type RouteLabel = Arc<String>;

/// A route's label with its series, each looked up in its family on first use and then kept:
/// a lookup hashes the label set and takes the family's lock, four times per request
/// otherwise. A series is made on first use, not with the route, so that `/metrics` lists only
/// what was counted. The families keep the series, so counts carry over a reload that rebuilds
/// the route.
pub struct RouteSeries {
    pub label: RouteLabel,
    request_duration: OnceLock<Histogram>,
    upstream_duration: OnceLock<Histogram>,
    /// Requests answered 200, by far the most common status; others are looked up each time.
    answered_ok: OnceLock<Counter>,
}

impl RouteSeries {
    pub fn new(label: &str) -> Arc<RouteSeries> {
        Arc::new(RouteSeries {
            label: Arc::new(label.to_owned()),
            request_duration: OnceLock::new(),
            upstream_duration: OnceLock::new(),
            answered_ok: OnceLock::new(),
        })
    }

    /// The route's series in a histogram family, looked up once into `kept`.
    fn histogram<'a>(
        &self,
        kept: &'a OnceLock<Histogram>,
        family: &Histograms<Route>,
    ) -> &'a Histogram {
        kept.get_or_init(|| {
            let route = Route {
                route: self.label.clone(),
            };
            family.get_or_create(&route).clone()
        })
    }

    /// A request answered with `status`, `took` after it arrived.
    pub fn observe_request(&self, metrics: &Metrics, status: u16, took: Duration) {
        self.histogram(&self.request_duration, &metrics.request_duration)
            .observe(took.as_secs_f64());
        let count = |status| {
            metrics
                .requests
                .get_or_create(&RouteStatus {
                    route: self.label.clone(),
                    status,
                })
                .clone()
        };
        if status == 200 {
            self.answered_ok.get_or_init(|| count(200)).inc();
        } else {
            count(status).inc();
        }
    }

    /// The upstream sent its response headers `took` after the request went out.
    pub fn observe_upstream(&self, metrics: &Metrics, took: Duration) {
        self.histogram(&self.upstream_duration, &metrics.upstream_duration)
            .observe(took.as_secs_f64());
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: RouteLabel,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: RouteLabel,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppResult {
    pub appid: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiResult {
    pub api: &'static str,
    pub result: Cow<'static, str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Api {
    pub api: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub result: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// From half a millisecond to about 16 seconds, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteStatus, Counter>,
    pub request_duration: Histograms<Route>,
    pub upstream_duration: Histograms<Route>,
    pub logins: Family<AppResult, Counter>,
    pub wechat_requests: Family<ApiResult, Counter>,
    pub wechat_duration: Histograms<Api>,
    pub token_verifications: Family<Outcome, Counter>,
    pub config_reloads: Family<Outcome, Counter>,
    pub in_flight: Gauge,
    /// The labels that are not route paths.
    pub auth_route: Arc<RouteSeries>,
    pub no_route: Arc<RouteSeries>,
    /// `token_verifications{result="ok"}`, the outcome of nearly every check, kept like a
    /// route's series.
    token_verified: OnceLock<Counter>,
    /// Set once the shutdown's grace period has run out: a request dropped unanswered from
    /// then on was cut off by the gateway, and is counted 503 rather than its client's 499.
    pub grace_over: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("wxgate");
        let requests = Family::<RouteStatus, Counter>::default();
        registry.register("requests", "Requests answered", requests.clone());
        let request_duration: Histograms<Route> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from request to response headers",
            request_duration.clone(),
        );
        let upstream_duration: Histograms<Route> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "upstream_duration_seconds",
            "Time the upstream took to send response headers",
            upstream_duration.clone(),
        );
        let logins = Family::<AppResult, Counter>::default();
        registry.register("logins", "Login attempts by outcome", logins.clone());
        let wechat_requests = Family::<ApiResult, Counter>::default();
        registry.register(
            "wechat_requests",
            "Requests to WeChat by outcome",
            wechat_requests.clone(),
        );
        let wechat_duration: Histograms<Api> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "wechat_duration_seconds",
            "Time WeChat took to answer",
            wechat_duration.clone(),
        );
        let token_verifications = Family::<Outcome, Counter>::default();
        registry.register(
            "token_verifications",
            "Bearer tokens checked, by outcome",
            token_verifications.clone(),
        );
        let config_reloads = Family::<Outcome, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads by outcome",
            config_reloads.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Requests being answered now",
            in_flight.clone(),
        );
        Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            logins,
            wechat_requests,
            wechat_duration,
            token_verifications,
            config_reloads,
            in_flight,
            auth_route: RouteSeries::new("auth"),
            no_route: RouteSeries::new("none"),
            token_verified: OnceLock::new(),
            grace_over: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// The text exposition format, for `GET /metrics`.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing metrics into a String cannot fail");
        text
    }

    /// A bearer token checked: `result` is `ok` or the error code.
    pub fn count_token_check(&self, result: &'static str) {
        let count = || {
            self.token_verifications
                .get_or_create(&Outcome { result })
                .clone()
        };
        if result == "ok" {
            self.token_verified.get_or_init(count).inc();
        } else {
            count().inc();
        }
    }

    pub fn observe_wechat(&self, api: &'static str, result: Cow<'static, str>, took: Duration) {
        self.wechat_requests
            .get_or_create(&ApiResult { api, result })
            .inc();
        self.wechat_duration
            .get_or_create(&Api { api })
            .observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_rebuilt_by_a_reload_counts_into_the_same_series() {
        let metrics = Metrics::default();
        let before = RouteSeries::new("/api/");
        before.observe_request(&metrics, 200, Duration::from_millis(1));
        before.observe_request(&metrics, 404, Duration::from_millis(1));
        let after = RouteSeries::new("/api/");
        after.observe_request(&metrics, 200, Duration::from_millis(1));
        after.observe_request(&metrics, 404, Duration::from_millis(1));
        after.observe_upstream(&metrics, Duration::from_millis(1));
        let text = metrics.encode();
        for line in [
            "wxgate_requests_total{route=\"/api/\",status=\"200\"} 2",
            "wxgate_requests_total{route=\"/api/\",status=\"404\"} 2",
            "wxgate_request_duration_seconds_count{route=\"/api/\"} 4",
            "wxgate_upstream_duration_seconds_count{route=\"/api/\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn spec_names_appear_once_counted() {
        let metrics = Metrics::default();
        let route = Arc::new("/api/".to_string());
        metrics
            .requests
            .get_or_create(&RouteStatus {
                route: route.clone(),
                status: 200,
            })
            .inc();
        metrics
            .request_duration
            .get_or_create(&Route { route })
            .observe(0.01);
        metrics.observe_wechat("code2session", "ok".into(), Duration::from_millis(3));
        let text = metrics.encode();
        for name in [
            "wxgate_requests_total{route=\"/api/\",status=\"200\"} 1",
            "wxgate_request_duration_seconds_bucket",
            "wxgate_wechat_requests_total{api=\"code2session\",result=\"ok\"} 1",
            "wxgate_wechat_duration_seconds_count{api=\"code2session\"} 1",
            "wxgate_in_flight_requests",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
