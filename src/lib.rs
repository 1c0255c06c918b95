//! wxgate: a reverse-proxy authentication sidecar for WeChat mini-programs.
//!
//! # Layout
//!
//! - [`config`]: the TOML file → raw structs → validated, typed [`config::Config`].
//! - [`error`]: every error, and the one mapping to a status and a JSON body.
//! - [`state`]: the shared state, one `Arc` swapped whole on reload.
//! - [`server`]: listeners, the accept loop, connection limits and idle connections shedding
//!   their buffers, graceful shutdown; `run` is the seam tests use.
//! - [`routes`]: the route table, matching, and the path checks.
//! - [`auth`]: the gateway's own `/auth/*` endpoints and the bearer-token decision for routes.
//! - [`identity`]: protected header families: strip what the client sent, inject the identity.
//! - [`proxy`]: forwarding: hop-by-hop and forwarded headers, body limits, timeouts, upgrades.
//! - [`upstream`]: keep-alive connections to the upstreams, one per active HTTP/1 client, then
//!   pooled.
//! - [`metrics`]: the Prometheus metrics of SPEC §9.
//! - [`token`]: JWT claims, keys, signing and verification. No I/O.
//! - [`wechat`]: the WeChat client and open-data crypto.
//! - [`store`]: the `Store` trait and its backends.
//! - [`mock`]: the mock WeChat and the dev-mode echo upstream.
//! - [`dev`]: `wxgate dev`, the zero-setup demo wired from the pieces above.

pub mod auth;
pub mod config;
pub mod dev;
pub mod error;
pub mod identity;
pub mod metrics;
pub mod mock;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod state;
pub mod store;
pub mod token;
pub mod upstream;
pub mod wechat;

pub use config::Config;
pub use error::Error;
pub use server::run;
pub use state::{SharedState, State};
