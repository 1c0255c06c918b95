//! The shared state: everything a request needs, built once per config load and swapped whole
//! on reload, so a request runs start to finish on the config it began with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::auth::{Exchanges, LoginLimiter, VerifiedTokens};
use crate::config::{Config, ConfigError, Problem, StoreConfig};
use crate::identity::IdentityRules;
use crate::metrics::Metrics;
use crate::routes::RouteTable;
use crate::store::{self, Revocations, Store};
use crate::token::TokenKeys;
use crate::upstream::UpstreamClient;
use crate::wechat::WechatClient;

/// What every request reaches through one atomic load.
pub type SharedState = Arc<ArcSwap<State>>;

pub struct State {
    pub config: Config,
    pub routes: RouteTable,
    pub keys: TokenKeys,
    pub identity: IdentityRules,
    pub verified_tokens: VerifiedTokens,
    pub services: Arc<Services>,
}

/// What outlives a reload: connections, caches, the store and the login rate limit's buckets.
pub struct Services {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub exchanges: Exchanges,
    /// `None` when the limit is off. Kept across reloads, so that a reload cannot be used to
    /// empty every bucket; replaced only when the limit itself changes.
    pub login_limiter: ArcSwapOption<LoginLimiter>,
    /// For the login hook: the business API, not WeChat.
    pub hook_client: reqwest::Client,
    pub revocations: Arc<Revocations>,
    pub wechat: WechatClient,
    pub upstream: UpstreamClient,
    /// What the listeners and the store were started with.
    pub restart_settings: RestartSettings,
}

impl Services {
    pub async fn open(config: &Config) -> Result<Services, ConfigError> {
        let store = store::open(&config.store).map_err(|err| ConfigError {
            problems: vec![Problem {
                key: config.store.location_key().into(),
                message: err.0,
            }],
        })?;
        let revocations = Arc::new(Revocations::default());
        revocations.start_sync(&store).await;
        let metrics = Arc::new(Metrics::default());
        let wechat = WechatClient::new(metrics.clone());
        // A redirect would turn the hook's POST into a GET somewhere else: it is answered as
        // the unexpected status it is.
        let hook_client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client with default settings always builds");
        Ok(Services {
            store,
            metrics,
            exchanges: Exchanges::default(),
            login_limiter: ArcSwapOption::from(
                LoginLimiter::new(config.rate_limit.login_per_ip_per_minute).map(Arc::new),
            ),
            hook_client,
            revocations,
            wechat,
            upstream: UpstreamClient::default(),
            restart_settings: RestartSettings::of(config),
        })
    }
}

impl State {
    /// Derives everything a request needs from a validated config. The login rate limit keeps
    /// its buckets unless the limit itself changed, in which case the services get a new one.
    pub fn new(config: Config, services: Arc<Services>) -> Result<State, ConfigError> {
        let keys = TokenKeys::from_config(&config.token).map_err(|problem| ConfigError {
            problems: vec![problem],
        })?;
        let per_minute = config.rate_limit.login_per_ip_per_minute;
        let limiter = services.login_limiter.load();
        if limiter.as_ref().map_or(0, |limiter| limiter.per_minute()) != per_minute {
            services
                .login_limiter
                .store(LoginLimiter::new(per_minute).map(Arc::new));
        }
        Ok(State {
            routes: RouteTable::new(&config.routes),
            identity: IdentityRules::new(&config.identity),
            verified_tokens: VerifiedTokens::new(config.token.leeway),
            keys,
            config,
            services,
        })
    }

    /// Opens the services and builds the first state.
    pub async fn shared(config: Config) -> Result<SharedState, ConfigError> {
        let services = Arc::new(Services::open(&config).await?);
        let state = State::new(config, services)?;
        Ok(Arc::new(ArcSwap::from_pointee(state)))
    }
}

/// What the listeners and the store were started with: a reload cannot change it.
pub struct RestartSettings {
    listen: SocketAddr,
    admin_listen: Option<SocketAddr>,
    max_connections: usize,
    header_timeout: Duration,
    store: StoreConfig,
}

impl RestartSettings {
    pub fn of(config: &Config) -> RestartSettings {
        let server = &config.server;
        RestartSettings {
            listen: server.listen,
            admin_listen: server.admin_listen,
            max_connections: server.max_connections,
            header_timeout: server.header_timeout,
            store: config.store.clone(),
        }
    }

    /// The keys whose value in `config` differs from what the process runs with.
    pub fn changed_in(&self, config: &Config) -> Vec<&'static str> {
        let server = &config.server;
        [
            ("server.listen", server.listen != self.listen),
            (
                "server.admin_listen",
                server.admin_listen != self.admin_listen,
            ),
            (
                "server.max_connections",
                server.max_connections != self.max_connections,
            ),
            (
                "server.header_timeout",
                server.header_timeout != self.header_timeout,
            ),
            ("store", config.store != self.store),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }
}
