//! The shared state: everything a request needs, built once per config load and swapped whole
//! on reload, so a request runs start to finish on the config it began with.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::{Exchanges, LoginLimiter, VerifiedTokens};
use crate::config::{Config, ConfigError, Problem};
use crate::identity::IdentityRules;
use crate::metrics::Metrics;
use crate::proxy::UpstreamClient;
use crate::routes::RouteTable;
use crate::store::{self, Revocations, Store};
use crate::token::TokenKeys;
use crate::wechat::WechatClient;

/// What every request reaches through one atomic load.
pub type SharedState = Arc<ArcSwap<State>>;

pub struct State {
    pub config: Config,
    pub routes: RouteTable,
    pub keys: TokenKeys,
    pub identity: IdentityRules,
    pub login_limiter: Option<LoginLimiter>,
    pub verified_tokens: VerifiedTokens,
    pub services: Arc<Services>,
}

/// What outlives a reload: connections, caches and the store.
pub struct Services {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub exchanges: Exchanges,
    /// For the login hook: the business API, not WeChat.
    pub hook_client: reqwest::Client,
    pub revocations: Arc<Revocations>,
    pub wechat: WechatClient,
    pub upstream: UpstreamClient,
}

impl Services {
    pub async fn open(config: &Config) -> Result<Services, ConfigError> {
        let store = store::open(&config.store).map_err(|err| ConfigError {
            problems: vec![Problem {
                key: config.store.location_key().into(),
                message: err.0,
            }],
        })?;
        // Tokens of a revoked session stay refused for as long as any of them could be valid.
        let revocations = Arc::new(Revocations::new(
            config.token.access_ttl + config.token.leeway,
        ));
        revocations.start_sync(&store).await;
        let metrics = Arc::new(Metrics::default());
        let wechat = WechatClient::new(metrics.clone());
        let hook_client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("an HTTP client with default settings always builds");
        Ok(Services {
            store,
            metrics,
            exchanges: Exchanges::default(),
            hook_client,
            revocations,
            wechat,
            upstream: UpstreamClient::default(),
        })
    }
}

impl State {
    /// Derives everything a request needs from a validated config.
    pub fn new(config: Config, services: Arc<Services>) -> Result<State, ConfigError> {
        let keys = TokenKeys::from_config(&config.token).map_err(|problem| ConfigError {
            problems: vec![problem],
        })?;
        Ok(State {
            routes: RouteTable::new(&config.routes),
            identity: IdentityRules::new(&config.identity),
            login_limiter: LoginLimiter::new(config.rate_limit.login_per_ip_per_minute),
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
