//! Prometheus metrics (text exposition format) on a separate listener, off by default.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The app's host pattern, or "portal".
    pub app: String,
    /// HTTP status code.
    pub status: u16,
}

/// Labels of the upstream latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabels {
    /// The app's host pattern.
    pub app: String,
}

/// Labels of outcome counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// e.g. "success", "failure", "locked".
    pub outcome: &'static str,
}

/// Labels of the second-factor counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FactorLabels {
    /// "totp" or "recovery_code".
    pub method: &'static str,
    /// "success", "failure", "replay", "locked".
    pub outcome: &'static str,
}

/// Labels of the lockout counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// "password" or "second_factor".
    pub step: &'static str,
}

/// Labels of the build info gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Every metric the gateway keeps.
pub struct Metrics {
    registry: Registry,
    /// Requests by app and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Time to the upstream's response head.
    pub upstream_latency: Family<AppLabels, Histogram>,
    /// Password logins by outcome.
    pub logins: Family<OutcomeLabels, Counter>,
    /// Second-factor checks by method and outcome.
    pub second_factor: Family<FactorLabels, Counter>,
    /// Lockouts started, by step.
    pub lockouts: Family<StepLabels, Counter>,
    /// Sessions in the store (refreshed periodically).
    pub active_sessions: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// Requests the HTTP/1.1 relay forwarded itself (the rest went through hyper).
    pub relayed: Counter,
    /// Connections the relay handed to hyper.
    pub handovers: Counter,
    /// Requests the relay answered through the gateway's own handlers (portal pages, sign-in redirects,
    /// refusals), keeping the connection.
    pub relay_local: Counter,
    /// Sessions read from the store into the session cache.
    pub cache_fills: Counter,
    /// Times a revocation the journal couldn't name emptied the whole session cache.
    pub cache_flushes: Counter,
    /// Session refreshes made by the traffic of a WebSocket tunnel (use of the app without a plain request).
    pub tunnel_refreshes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Which path served a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// The HTTP/1.1 relay forwarded it to the app.
    Relay,
    /// hyper and the gateway's handlers: the portal, the admin pages, refusals, HTTP/2, and whatever the relay
    /// hands them.
    Handlers,
}

/// How one request ended, on either lane: what the one recorder (`proxy::State::finished`) takes. The metrics
/// read it today; an access log reads the same.
#[derive(Debug, Clone, Copy)]
pub struct Outcome<'a> {
    /// Which lane served it.
    pub lane: Lane,
    /// The app's index in the configuration, then "portal", then "unknown" (as the apps' metric handles).
    pub slot: usize,
    /// The status answered (499: the client left first).
    pub status: u16,
    /// The session's user, when an app request read one (none for the portal's own pages and bypass paths).
    pub user: Option<&'a str>,
    /// From the request's head to the answer: its head handed to hyper on the handlers' lane, its end on the
    /// relay.
    pub elapsed: Duration,
    /// The app's share: from sending the request to the answer's head (`None`: no app was asked).
    pub upstream: Option<Duration>,
}

/// What a lane learns while serving a request, for its [`Outcome`].
#[derive(Debug, Default)]
pub struct Served {
    /// The app's response time, once asked.
    pub upstream: Option<Duration>,
    /// The session's user, once read.
    pub user: Option<std::sync::Arc<crate::store::User>>,
}

impl Served {
    /// The outcome of a request that ended with `status`.
    pub fn outcome(&self, lane: Lane, slot: usize, status: u16, elapsed: Duration) -> Outcome<'_> {
        Outcome {
            lane,
            slot,
            status,
            user: self.user.as_deref().map(|u| u.username.as_str()),
            elapsed,
            upstream: self.upstream,
        }
    }
}

/// Metric handles for one request label (an app, "portal" or "unknown"), resolved once so a request costs an
/// array index and an atomic add, not a label allocation and a map lookup.
pub struct LabelHandles {
    label: String,
    requests: Family<RequestLabels, Counter>,
    by_status: Box<[std::sync::OnceLock<Counter>]>,
    latency: Histogram,
}

impl LabelHandles {
    /// Counts one answered request.
    pub fn request(&self, status: u16) {
        let make = || self.requests.get_or_create(&RequestLabels { app: self.label.clone(), status }).clone();
        match self.by_status.get(usize::from(status)) {
            Some(slot) => slot.get_or_init(make).inc(),
            None => make().inc(),
        };
    }

    /// Records an upstream's response time.
    pub fn upstream(&self, elapsed: Duration) {
        self.latency.observe(elapsed.as_secs_f64());
    }
}

impl Metrics {
    /// Handles for `label`.
    pub fn handles(&self, label: &str) -> std::sync::Arc<LabelHandles> {
        std::sync::Arc::new(LabelHandles {
            label: label.to_string(),
            requests: self.requests.clone(),
            by_status: (0..600).map(|_| std::sync::OnceLock::new()).collect(),
            latency: self.upstream_latency.get_or_create(&AppLabels { app: label.to_string() }).clone(),
        })
    }

    /// A fresh registry with every metric registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("portcullis");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "HTTP requests answered, by app and status", requests.clone());
        let upstream_latency = Family::<AppLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "upstream_response_seconds",
            "Time until the upstream's response head arrived",
            upstream_latency.clone(),
        );
        let logins = Family::<OutcomeLabels, Counter>::default();
        registry.register("logins", "Password logins by outcome", logins.clone());
        let second_factor = Family::<FactorLabels, Counter>::default();
        registry.register("second_factor_checks", "Second-factor checks by method and outcome", second_factor.clone());
        let lockouts = Family::<StepLabels, Counter>::default();
        registry.register("lockouts", "Lockouts started, by step", lockouts.clone());
        let active_sessions = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register("active_sessions", "Sessions in the store", active_sessions.clone());
        let build = Family::<BuildLabels, Gauge<i64, std::sync::atomic::AtomicI64>>::default();
        registry.register("build_info", "Build information", build.clone());
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION") }).set(1);
        let relayed = Counter::default();
        registry.register(
            "relayed_requests",
            "Requests forwarded by the HTTP/1.1 relay (a subset of portcullis_requests; the rest went through hyper)",
            relayed.clone(),
        );
        let handovers = Counter::default();
        registry.register("relay_handovers", "Connections the HTTP/1.1 relay handed to hyper", handovers.clone());
        let relay_local = Counter::default();
        registry.register(
            "relay_local_answers",
            "Requests the HTTP/1.1 relay answered with the gateway's own pages, keeping the connection",
            relay_local.clone(),
        );
        let cache_fills = Counter::default();
        registry.register("session_cache_fills", "Sessions read from the store into the cache", cache_fills.clone());
        let cache_flushes = Counter::default();
        registry.register(
            "session_cache_flushes",
            "Times the whole session cache was emptied (a revocation the journal could not name)",
            cache_flushes.clone(),
        );
        let tunnel_refreshes = Counter::default();
        registry.register(
            "tunnel_session_refreshes",
            "Sessions kept alive by what their users sent through WebSocket tunnels",
            tunnel_refreshes.clone(),
        );
        Metrics {
            registry,
            requests,
            upstream_latency,
            logins,
            second_factor,
            lockouts,
            active_sessions,
            relayed,
            handovers,
            relay_local,
            cache_fills,
            cache_flushes,
            tunnel_refreshes,
        }
    }

    /// Counts a password login outcome.
    pub fn login(&self, outcome: &'static str) {
        self.logins.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Counts a second-factor check.
    pub fn factor(&self, method: &'static str, outcome: &'static str) {
        self.second_factor.get_or_create(&FactorLabels { method, outcome }).inc();
    }

    /// Counts a lockout.
    pub fn lockout(&self, step: &'static str) {
        self.lockouts.get_or_create(&StepLabels { step }).inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String can't fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What one scrape reads: the token in force, the registry, and the store (to count sessions).
pub struct Scrape {
    /// `[metrics] token`, if set.
    pub token: Option<String>,
    /// The registry.
    pub metrics: std::sync::Arc<Metrics>,
    /// The store.
    pub store: crate::store::Store,
}
