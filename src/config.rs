//! Configuration: the TOML file is read into raw serde structs, then `validate()` turns them into
//! the typed [`Config`] below, collecting every problem (each naming its key) before failing once.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Method, Uri};
use ipnet::IpNet;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// A secret value (app secret, HS256 key). Its `Debug` never shows the value, so a secret cannot
/// reach a log line through a derived `Debug` or a `{:?}`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from; SIGHUP re-reads it.
    pub path: PathBuf,
    pub server: ServerConfig,
    pub wechat: WechatConfig,
    pub token: TokenConfig,
    pub store: StoreConfig,
    pub identity: IdentityConfig,
    pub login_hook: Option<LoginHookConfig>,
    pub rate_limit: RateLimitConfig,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `None` when `admin_listen = ""`.
    pub admin_listen: Option<SocketAddr>,
    /// Starts with `/`, never ends with one (`"/auth"`).
    pub auth_path: String,
    pub max_body_bytes: u64,
    pub shutdown_grace: Duration,
    pub trusted_proxies: Vec<IpNet>,
    /// How long a client may take to send a request's headers, and how long a keep-alive
    /// connection may sit idle between requests: what cuts off a slowloris client.
    pub header_timeout: Duration,
    /// Client connections served at once; past it, new ones wait in the listen backlog.
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct WechatConfig {
    /// Tried in order.
    pub hosts: Vec<WechatHost>,
    pub timeout: Duration,
    pub apps: Vec<AppConfig>,
}

/// A WeChat API host, as `wechat.hosts` lists it.
#[derive(Debug, Clone)]
pub struct WechatHost {
    /// The base URL, without a trailing `/`.
    pub base: String,
    /// code2Session's URL on this host, without its query. Parsed here once: parsing the whole
    /// URL, query included, cost every login about 29,000 instructions; adding the query to
    /// this copy costs a few thousand (README, Performance).
    pub code2session: reqwest::Url,
}

impl WechatHost {
    /// `None` when `base` is not a URL a request can be sent to.
    pub fn new(base: &str) -> Option<WechatHost> {
        let base = base.trim_end_matches('/');
        let code2session = reqwest::Url::parse(&format!("{base}/sns/jscode2session")).ok()?;
        Some(WechatHost {
            base: base.to_string(),
            code2session,
        })
    }
}

impl fmt::Display for WechatHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

#[derive(Debug, Clone)]
pub struct AppConfig {
    pub appid: String,
    pub secret: Secret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Hs256,
    Es256,
    EdDsa,
    Rs256,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Hs256 => "HS256",
            Algorithm::Es256 => "ES256",
            Algorithm::EdDsa => "EdDSA",
            Algorithm::Rs256 => "RS256",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TokenConfig {
    pub issuer: String,
    pub audience: String,
    pub algorithm: Algorithm,
    /// HS256 only: at least 32 bytes.
    pub secret: Option<Secret>,
    /// ES256 / EdDSA / RS256: the private key's PEM text, read at load time.
    pub signing_key: Option<KeyFile>,
    pub verify_keys: Vec<KeyFile>,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    pub leeway: Duration,
}

/// A PEM key read from disk; the path is kept for messages, the text is secret.
#[derive(Debug, Clone)]
pub struct KeyFile {
    pub path: PathBuf,
    pub pem: Secret,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    Memory,
    Embedded { path: PathBuf },
    Redis { url: Secret, key_prefix: String },
}

impl StoreConfig {
    /// The key naming where the backend's data lives: what a failure to open it is about.
    pub fn location_key(&self) -> &'static str {
        match self {
            StoreConfig::Memory => "store.backend",
            StoreConfig::Embedded { .. } => "store.path",
            StoreConfig::Redis { .. } => "store.url",
        }
    }
}

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub openid_header: HeaderName,
    pub unionid_header: HeaderName,
    pub appid_header: HeaderName,
    /// Lower-case, with `_` already read as `-`.
    pub protected_prefixes: Vec<String>,
    pub forward_authorization: bool,
    /// (claim name, header) pairs, sorted by claim name.
    pub claim_headers: Vec<(String, HeaderName)>,
}

#[derive(Debug, Clone)]
pub struct LoginHookConfig {
    pub url: String,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// 0 = off.
    pub login_per_ip_per_minute: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Public,
    Optional,
    Required,
}

impl AuthMode {
    pub fn name(self) -> &'static str {
        match self {
            AuthMode::Public => "public",
            AuthMode::Optional => "optional",
            AuthMode::Required => "required",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// As written in the file, for messages, logs and metric labels.
    pub path: String,
    pub upstream: Uri,
    pub auth: AuthMode,
    /// `None`: every method.
    pub methods: Option<Vec<Method>>,
    /// `None`: tokens of every configured app.
    pub apps: Option<Vec<String>>,
    pub strip_prefix: bool,
    pub timeout: Duration,
}

/// Every problem found in a file, each naming its key. Its `Display` is one problem per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `token.secret` or `routes[2].upstream`; empty for the file itself.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if problem.key.is_empty() {
                write!(f, "{}", problem.message)?;
            } else {
                write!(f, "{}: {}", problem.key, problem.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates the file at `path`, with `${VAR}` taken from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path).map_err(|err| ConfigError {
            problems: vec![Problem {
                key: String::new(),
                message: format!("cannot read {}: {err}", path.display()),
            }],
        })?;
        Config::parse(&text, path, &|name| std::env::var(name).ok())
    }

    /// Validates `text` as if it were the file at `path` (relative key paths resolve against its
    /// folder), looking variables up with `env`.
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut table: Table = text.parse().map_err(|err| ConfigError {
            problems: vec![syntax_problem(text, &err)],
        })?;
        let mut problems = Problems::default();
        for (key, value) in table.iter_mut() {
            substitute_value(value, key, env, &mut problems);
        }
        let raw = RawConfig::from_table(table, &mut problems);
        let folder = path.parent().unwrap_or(Path::new(""));
        let config = raw.validate(path, folder, &mut problems);
        if problems.list.is_empty() {
            Ok(config)
        } else {
            // Problems are found in passes (substitution, types, values); show them in the
            // order of the file's sections instead, keeping each section's own order.
            let mut problems = problems.list;
            problems.sort_by_key(|problem| {
                let section = problem.key.split(['.', '[']).next().unwrap_or("");
                SECTIONS
                    .iter()
                    .position(|known| *known == section)
                    .unwrap_or(SECTIONS.len())
            });
            Err(ConfigError { problems })
        }
    }

    /// The route table as `wxgate check` prints it.
    pub fn route_table(&self) -> String {
        let header = [
            "PATH",
            "AUTH",
            "METHODS",
            "APPS",
            "UPSTREAM",
            "STRIP_PREFIX",
            "TIMEOUT",
        ]
        .map(String::from);
        let mut routes: Vec<&RouteConfig> = self.routes.iter().collect();
        routes.sort_by(|a, b| a.path.cmp(&b.path));
        let rows: Vec<[String; 7]> = std::iter::once(header)
            .chain(routes.into_iter().map(|route| {
                [
                    route.path.clone(),
                    route.auth.name().to_string(),
                    route.methods.as_ref().map_or_else(
                        || "*".to_string(),
                        |methods| {
                            methods
                                .iter()
                                .map(Method::as_str)
                                .collect::<Vec<_>>()
                                .join(",")
                        },
                    ),
                    route
                        .apps
                        .as_ref()
                        .map_or_else(|| "*".to_string(), |apps| apps.join(",")),
                    route.upstream.to_string(),
                    route.strip_prefix.to_string(),
                    humantime::format_duration(route.timeout).to_string(),
                ]
            }))
            .collect();
        let mut widths = [0; 7];
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut table = String::new();
        for row in &rows {
            let line = row
                .iter()
                .zip(widths)
                .map(|(cell, width)| format!("{cell:width$}"))
                .collect::<Vec<_>>()
                .join("  ");
            table.push_str(line.trim_end());
            table.push('\n');
        }
        table
    }
}

/// The problems found so far. A key whose value could not be read at all (wrong type, unset
/// variable) is "unusable": later problems about it or anything under it are dropped, since
/// they would only repeat the first one ("is required" after "must be a string").
#[derive(Default)]
struct Problems {
    list: Vec<Problem>,
    unusable: Vec<String>,
}

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let key = key.into();
        let covered = self.unusable.iter().any(|bad| {
            key.strip_prefix(bad.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        });
        if !covered {
            self.list.push(Problem {
                key,
                message: message.into(),
            });
        }
    }

    fn add_unusable(&mut self, key: String, message: impl Into<String>) {
        self.add(key.clone(), message);
        self.unusable.push(key);
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// toml's own `Display` of a syntax error quotes the offending line, which may hold a secret:
/// keep only its position and its description (which names the grammar, never the text).
fn syntax_problem(text: &str, err: &toml::de::Error) -> Problem {
    let position = err
        .span()
        .and_then(|span| text.get(..span.start))
        .map(|before| {
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!(" at line {line}, column {column}")
        });
    Problem {
        key: String::new(),
        message: format!(
            "not valid TOML{}: {}",
            position.unwrap_or_default(),
            err.message()
        ),
    }
}

// ----- `${VAR}` substitution -----

/// Substitutes variables in every string value under `value`, whose key is `key`.
fn substitute_value(
    value: &mut Value,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) {
    match value {
        Value::String(text) => match substitute(text, env) {
            Ok(substituted) => *text = substituted,
            Err(messages) => {
                for message in messages {
                    problems.add(key, message);
                }
                problems.unusable.push(key.to_string());
            }
        },
        Value::Array(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                substitute_value(item, &format!("{key}[{index}]"), env, problems);
            }
        }
        Value::Table(table) => {
            for (name, item) in table.iter_mut() {
                substitute_value(item, &join(key, name), env, problems);
            }
        }
        Value::Integer(_) | Value::Float(_) | Value::Boolean(_) | Value::Datetime(_) => {}
    }
}

/// Replaces each `${NAME}` with the variable's value; `$${` stands for a literal `${`. What a
/// variable brings in is not scanned again, so a secret that happens to contain `${` is kept
/// as it is. The messages name variables, never the text around them.
fn substitute(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, Vec<String>> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        if rest[..at].ends_with('$') {
            out.push_str(&rest[..at - 1]);
            out.push_str("${");
            rest = &rest[at + 2..];
            continue;
        }
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let Some(end) = after.find('}') else {
            errors
                .push("has a `${` without its closing `}` (write `$${` for a literal `${`)".into());
            break;
        };
        let name = &after[..end];
        let valid = name
            .chars()
            .next()
            .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            errors.push(
                "has a `${…}` that does not name an environment variable (letters, digits and \
                 `_`; write `$${` for a literal `${`)"
                    .into(),
            );
        } else if let Some(value) = env(name) {
            out.push_str(&value);
        } else {
            errors.push(format!("environment variable `{name}` is not set"));
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

// ----- raw structs: the file's shape, every field optional -----
//
// Every field is an `Option` so that a table holding a single key deserializes exactly when that
// key's value has the right type: `table_into` relies on it to find which key a serde error was
// about. Defaults and required keys are dealt with in `validate`. Durations are strings parsed
// there with `humantime` rather than through `humantime-serde`, because `${VAR}` substitution
// has to happen first.

#[derive(Deserialize, Default)]
struct RawServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    auth_path: Option<String>,
    max_body_bytes: Option<i64>,
    shutdown_grace: Option<String>,
    trusted_proxies: Option<Vec<String>>,
    header_timeout: Option<String>,
    max_connections: Option<i64>,
}

/// `[wechat]` without its `apps`, which are read one by one so each problem names its index.
#[derive(Deserialize, Default)]
struct RawWechat {
    hosts: Option<Vec<String>>,
    timeout: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawApp {
    appid: Option<String>,
    secret: Option<String>,
    secret_file: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawToken {
    issuer: Option<String>,
    audience: Option<String>,
    algorithm: Option<String>,
    secret: Option<String>,
    signing_key: Option<String>,
    verify_keys: Option<Vec<String>>,
    access_ttl: Option<String>,
    refresh_ttl: Option<String>,
    leeway: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawStore {
    backend: Option<String>,
    path: Option<String>,
    url: Option<String>,
    key_prefix: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawIdentity {
    openid_header: Option<String>,
    unionid_header: Option<String>,
    appid_header: Option<String>,
    protected_prefixes: Option<Vec<String>>,
    forward_authorization: Option<bool>,
    claim_headers: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
struct RawLoginHook {
    url: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawRateLimit {
    login_per_ip_per_minute: Option<i64>,
}

#[derive(Deserialize, Default)]
struct RawRoute {
    path: Option<String>,
    upstream: Option<String>,
    auth: Option<String>,
    methods: Option<Vec<String>>,
    apps: Option<Vec<String>>,
    strip_prefix: Option<bool>,
    timeout: Option<String>,
}

/// The top-level keys, in the order the example file has them. `""` is the file itself.
const SECTIONS: &[&str] = &[
    "",
    "server",
    "wechat",
    "token",
    "store",
    "identity",
    "login_hook",
    "rate_limit",
    "routes",
];

struct RawConfig {
    server: RawServer,
    wechat: RawWechat,
    apps: Vec<RawApp>,
    token: RawToken,
    store: RawStore,
    identity: RawIdentity,
    login_hook: Option<RawLoginHook>,
    rate_limit: RawRateLimit,
    routes: Vec<RawRoute>,
}

impl RawConfig {
    /// Each section is deserialized on its own, so a bad `[server]` does not hide what is wrong
    /// in `[token]`.
    fn from_table(mut table: Table, problems: &mut Problems) -> RawConfig {
        let server = section(table.remove("server"), "server", problems);
        let mut wechat = table.remove("wechat");
        let apps = match &mut wechat {
            Some(Value::Table(wechat)) => wechat.remove("apps"),
            _ => None,
        };
        let raw = RawConfig {
            server,
            wechat: section(wechat, "wechat", problems),
            apps: array_of_tables(apps, "wechat.apps", problems),
            token: section(table.remove("token"), "token", problems),
            store: section(table.remove("store"), "store", problems),
            identity: section(table.remove("identity"), "identity", problems),
            login_hook: table
                .remove("login_hook")
                .map(|hook| section(Some(hook), "login_hook", problems)),
            rate_limit: section(table.remove("rate_limit"), "rate_limit", problems),
            routes: array_of_tables(table.remove("routes"), "routes", problems),
        };
        for key in table.keys() {
            problems.add(key.as_str(), "unknown key");
        }
        raw
    }
}

fn section<T: DeserializeOwned + Default>(
    value: Option<Value>,
    key: &str,
    problems: &mut Problems,
) -> T {
    match value {
        None => T::default(),
        Some(Value::Table(table)) => table_into(table, key, problems),
        Some(other) => {
            problems.add_unusable(
                key.to_string(),
                format!("must be a table, not {}", kind(&other)),
            );
            T::default()
        }
    }
}

fn array_of_tables<T: DeserializeOwned + Default>(
    value: Option<Value>,
    key: &str,
    problems: &mut Problems,
) -> Vec<T> {
    match value {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(index, item)| section(Some(item), &format!("{key}[{index}]"), problems))
            .collect(),
        Some(other) => {
            problems.add_unusable(
                key.to_string(),
                format!(
                    "must be an array of tables (`[[{key}]]`), not {}",
                    kind(&other)
                ),
            );
            Vec::new()
        }
    }
}

/// Deserializes `table` (found at `key`), reporting every unknown key and every value of the
/// wrong type, and returns what could be read.
fn table_into<T: DeserializeOwned + Default>(
    table: Table,
    key: &str,
    problems: &mut Problems,
) -> T {
    let mut unknown = Vec::new();
    if let Ok(raw) = deserialize_noting_unknown(Value::Table(table.clone()), key, &mut unknown) {
        for unknown in unknown {
            problems.add(unknown, "unknown key");
        }
        return raw;
    }
    // serde stops at the first bad value and does not say which key held it: try each key on
    // its own (see the raw structs), and go on with the ones that are fine.
    let mut good = Table::new();
    for (name, value) in table {
        let mut unknown = Vec::new();
        let single = Table::from_iter([(name.clone(), value.clone())]);
        match deserialize_noting_unknown::<T>(Value::Table(single), key, &mut unknown) {
            Ok(_) => {
                for unknown in unknown {
                    problems.add(unknown, "unknown key");
                }
                good.insert(name, value);
            }
            Err(err) => problems.add_unusable(join(key, &name), type_message(&err, &value)),
        }
    }
    deserialize_noting_unknown(Value::Table(good), key, &mut Vec::new()).unwrap_or_default()
}

fn deserialize_noting_unknown<T: DeserializeOwned>(
    value: Value,
    key: &str,
    unknown: &mut Vec<String>,
) -> Result<T, toml::de::Error> {
    serde_ignored::deserialize(value, |path| unknown.push(dotted(key, &path)))
}

/// `routes[1].uptream` rather than serde_ignored's own `routes.1.uptream`.
fn dotted(prefix: &str, path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => prefix.to_string(),
        Path::Seq { parent, index } => format!("{}[{index}]", dotted(prefix, parent)),
        Path::Map { parent, key } => join(&dotted(prefix, parent), key),
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => dotted(prefix, parent),
    }
}

/// serde's message quotes the offending value (`invalid type: string "…", expected i64`), and
/// that value may be a secret: only a known "expected" part is kept, the rest is ours.
fn type_message(err: &toml::de::Error, value: &Value) -> String {
    let expected = match err.message().rsplit_once(", expected ").map(|(_, e)| e) {
        Some("a string") => "a string",
        Some("a boolean") => "a boolean",
        Some("i64") => "an integer",
        Some("a sequence") => "an array",
        Some("a map") => "a table",
        _ => return "has the wrong type".into(),
    };
    match value {
        Value::Array(_) if expected != "an array" => format!("every element must be {expected}"),
        Value::Table(_) if expected != "a table" => format!("every value must be {expected}"),
        _ => format!("must be {expected}, not {}", kind(value)),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

// ----- validation: raw → typed -----
//
// Each check records its problem and returns a placeholder so validation can go on and find the
// next one; a `Config` holding placeholders is never handed out, since `parse` fails as soon as
// one problem was recorded.

impl RawConfig {
    /// Sections in the order of the file, so the problems come out in that order too.
    fn validate(self, path: &Path, folder: &Path, problems: &mut Problems) -> Config {
        let server = validate_server(self.server, problems);
        let wechat = validate_wechat(self.wechat, self.apps, folder, problems);
        let token = validate_token(self.token, folder, problems);
        let store = validate_store(self.store, folder, problems);
        let identity = validate_identity(self.identity, problems);
        let login_hook = self
            .login_hook
            .map(|hook| validate_login_hook(hook, problems));
        let rate_limit = RateLimitConfig {
            login_per_ip_per_minute: integer(
                self.rate_limit.login_per_ip_per_minute,
                60,
                0,
                u32::MAX,
                "rate_limit.login_per_ip_per_minute",
                problems,
            ),
        };
        let appids: Vec<&str> = wechat.apps.iter().map(|app| app.appid.as_str()).collect();
        let routes = validate_routes(self.routes, &appids, &server.auth_path, problems);
        Config {
            path: path.to_path_buf(),
            server,
            wechat,
            token,
            store,
            identity,
            login_hook,
            rate_limit,
            routes,
        }
    }
}

fn validate_server(raw: RawServer, problems: &mut Problems) -> ServerConfig {
    let listen = socket_addr(
        raw.listen.as_deref().unwrap_or("0.0.0.0:8080"),
        "server.listen",
        problems,
    );
    let admin_listen = match raw.admin_listen.as_deref().unwrap_or("127.0.0.1:9090") {
        "" => None,
        addr => Some(socket_addr(addr, "server.admin_listen", problems)),
    };
    if let Some(admin) = admin_listen
        && admin.port() != 0
        && admin.port() == listen.port()
        && (admin.ip() == listen.ip()
            || admin.ip().is_unspecified()
            || listen.ip().is_unspecified())
    {
        problems.add(
            "server.admin_listen",
            format!(
                "shares port {} with server.listen: one of them could not listen",
                admin.port()
            ),
        );
    }
    let auth_path = raw.auth_path.as_deref().unwrap_or("/auth");
    if !auth_path.starts_with('/')
        || auth_path.contains(['?', '#'])
        || auth_path.parse::<http::uri::PathAndQuery>().is_err()
    {
        problems.add(
            "server.auth_path",
            "must be a path starting with `/`, like \"/auth\"",
        );
    } else if auth_path.trim_end_matches('/').is_empty() {
        problems.add(
            "server.auth_path",
            "must not be `/` alone: the gateway's endpoints need a prefix of their own",
        );
    }
    let trusted_proxies = raw
        .trusted_proxies
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(index, cidr)| {
            let net = cidr
                .parse::<IpNet>()
                .ok()
                .or_else(|| cidr.parse::<IpAddr>().ok().map(IpNet::from));
            if net.is_none() {
                problems.add(
                    format!("server.trusted_proxies[{index}]"),
                    "must be a CIDR like \"10.0.0.0/8\" or an IP address",
                );
            }
            net
        })
        .collect();
    ServerConfig {
        listen,
        admin_listen,
        auth_path: auth_path.trim_end_matches('/').to_string(),
        max_body_bytes: integer(
            raw.max_body_bytes,
            1_048_576,
            1,
            i64::MAX.unsigned_abs(),
            "server.max_body_bytes",
            problems,
        ),
        shutdown_grace: duration(
            raw.shutdown_grace.as_deref(),
            "20s",
            GRACE,
            "server.shutdown_grace",
            problems,
        ),
        trusted_proxies,
        header_timeout: duration(
            raw.header_timeout.as_deref(),
            "30s",
            WAIT,
            "server.header_timeout",
            problems,
        ),
        max_connections: integer(
            raw.max_connections,
            25_000_usize,
            1,
            1_000_000,
            "server.max_connections",
            problems,
        ),
    }
}

fn validate_wechat(
    raw: RawWechat,
    apps: Vec<RawApp>,
    folder: &Path,
    problems: &mut Problems,
) -> WechatConfig {
    let hosts = raw.hosts.unwrap_or_else(|| {
        vec![
            "https://api.weixin.qq.com".into(),
            "https://api2.weixin.qq.com".into(),
        ]
    });
    if hosts.is_empty() {
        problems.add("wechat.hosts", "must list at least one host");
    }
    let hosts = hosts
        .iter()
        .enumerate()
        .filter_map(|(index, host)| {
            let key = format!("wechat.hosts[{index}]");
            if !web_url(host, &key, problems) {
                return None;
            }
            let parsed = WechatHost::new(host);
            if parsed.is_none() {
                problems.add(key, "is not a URL a request can be sent to");
            }
            parsed
        })
        .collect();
    if apps.is_empty() {
        problems.add(
            "wechat.apps",
            "at least one `[[wechat.apps]]` (appid and secret) is required",
        );
    }
    let mut validated: Vec<AppConfig> = Vec::new();
    for (index, app) in apps.into_iter().enumerate() {
        let key = format!("wechat.apps[{index}]");
        let app = validate_app(app, &key, folder, problems);
        if let Some(first) = validated.iter().position(|seen| seen.appid == app.appid) {
            problems.add(
                format!("{key}.appid"),
                format!("is the same appid as wechat.apps[{first}]"),
            );
        }
        validated.push(app);
    }
    WechatConfig {
        hosts,
        timeout: duration(
            raw.timeout.as_deref(),
            "5s",
            WAIT,
            "wechat.timeout",
            problems,
        ),
        apps: validated,
    }
}

fn validate_app(raw: RawApp, key: &str, folder: &Path, problems: &mut Problems) -> AppConfig {
    let appid = raw.appid.unwrap_or_default();
    if appid.is_empty() {
        problems.add(format!("{key}.appid"), "is required");
    } else if !appid.bytes().all(|b| b.is_ascii_graphic()) {
        // It goes into URLs and into the appid header as it is.
        problems.add(
            format!("{key}.appid"),
            "must be printable ASCII without spaces",
        );
    }
    let secret = match (raw.secret, raw.secret_file) {
        (Some(_), Some(_)) => {
            problems.add(key, "has both secret and secret_file: keep one");
            String::new()
        }
        (None, None) => {
            problems.add(key, "needs secret or secret_file");
            String::new()
        }
        (Some(secret), None) => {
            if secret.is_empty() {
                problems.add(format!("{key}.secret"), "is empty");
            }
            secret
        }
        (None, Some(file)) => {
            let file_key = format!("{key}.secret_file");
            match read_file(&file, &file_key, folder, problems) {
                None => String::new(),
                Some((_, text)) => {
                    // Editors end files with a newline; the secret itself never has one.
                    let secret = text.strip_suffix('\n').map_or(text.as_str(), |line| {
                        line.strip_suffix('\r').unwrap_or(line)
                    });
                    if secret.is_empty() {
                        problems.add(file_key, "names an empty file");
                    }
                    secret.to_string()
                }
            }
        }
    };
    AppConfig {
        appid,
        secret: Secret(secret),
    }
}

fn validate_token(raw: RawToken, folder: &Path, problems: &mut Problems) -> TokenConfig {
    let algorithm = match raw.algorithm.as_deref().unwrap_or("HS256") {
        "HS256" => Some(Algorithm::Hs256),
        "ES256" => Some(Algorithm::Es256),
        "EdDSA" => Some(Algorithm::EdDsa),
        "RS256" => Some(Algorithm::Rs256),
        _ => {
            problems.add(
                "token.algorithm",
                "must be one of HS256, ES256, EdDSA, RS256 (spelled exactly so)",
            );
            None
        }
    };
    let asymmetric_only = "is only for ES256, EdDSA and RS256: HS256 takes token.secret";
    let mut secret = None;
    let mut signing_key = None;
    // With an unknown algorithm, which of secret and signing_key belongs is anyone's guess:
    // nothing is said about them.
    if algorithm == Some(Algorithm::Hs256) {
        match raw.secret {
            None => problems.add("token.secret", "is required with algorithm HS256"),
            Some(value) if value.len() < 32 => problems.add(
                "token.secret",
                "must be at least 32 bytes long (`wxgate keygen --alg HS256` makes one)",
            ),
            Some(value) => secret = Some(Secret(value)),
        }
        if raw.signing_key.is_some() {
            problems.add("token.signing_key", asymmetric_only);
        }
        // A PEM key accepted next to an HMAC secret is the classic algorithm-confusion hole.
        if raw
            .verify_keys
            .as_ref()
            .is_some_and(|keys| !keys.is_empty())
        {
            problems.add("token.verify_keys", asymmetric_only);
        }
    } else if let Some(algorithm) = algorithm {
        let name = algorithm.name();
        if raw.secret.is_some() {
            problems.add(
                "token.secret",
                format!("is only for HS256: {name} signs with token.signing_key"),
            );
        }
        match raw.signing_key {
            None => problems.add(
                "token.signing_key",
                format!("is required with algorithm {name} (a private key in PEM)"),
            ),
            Some(file) => {
                signing_key = key_file(&file, "token.signing_key", folder, problems, |file| {
                    crate::token::signing_key_problem(file, algorithm)
                })
            }
        }
    }
    // Under HS256 they are refused above, and reading them would only add noise.
    let verify_keys = match algorithm {
        Some(Algorithm::Hs256) | None => Vec::new(),
        Some(algorithm) => raw
            .verify_keys
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(index, file)| {
                let key = format!("token.verify_keys[{index}]");
                key_file(file, &key, folder, problems, |file| {
                    crate::token::verify_key_problem(file, &key, algorithm)
                })
            })
            .collect(),
    };
    let text = |value: Option<String>, default: &str, key: &str, problems: &mut Problems| {
        let value = value.unwrap_or_else(|| default.to_string());
        if value.is_empty() {
            problems.add(key, "must not be empty");
        }
        value
    };
    TokenConfig {
        issuer: text(raw.issuer, "wxgate", "token.issuer", problems),
        audience: text(raw.audience, "api", "token.audience", problems),
        algorithm: algorithm.unwrap_or(Algorithm::Hs256),
        secret,
        signing_key,
        verify_keys,
        access_ttl: duration(
            raw.access_ttl.as_deref(),
            "2h",
            LIFETIME,
            "token.access_ttl",
            problems,
        ),
        refresh_ttl: duration(
            raw.refresh_ttl.as_deref(),
            "30d",
            LIFETIME,
            "token.refresh_ttl",
            problems,
        ),
        leeway: duration(
            raw.leeway.as_deref(),
            "30s",
            LEEWAY,
            "token.leeway",
            problems,
        ),
    }
}

/// Reads the key file named by `key`, and has `problem` say what is wrong with what it holds.
fn key_file(
    file: &str,
    key: &str,
    folder: &Path,
    problems: &mut Problems,
    problem: impl FnOnce(&KeyFile) -> Option<Problem>,
) -> Option<KeyFile> {
    let (path, text) = read_file(file, key, folder, problems)?;
    let file = KeyFile {
        path,
        pem: Secret(text),
    };
    match problem(&file) {
        Some(problem) => {
            problems.add(problem.key, problem.message);
            None
        }
        None => Some(file),
    }
}

fn validate_store(raw: RawStore, folder: &Path, problems: &mut Problems) -> StoreConfig {
    let backend = raw.backend.as_deref().unwrap_or("embedded");
    // A key of another backend would be silently ignored: most often the backend line is the
    // mistake, and the operator believes the data lives where the ignored key says.
    for (key, present, owner) in [
        ("store.path", raw.path.is_some(), "embedded"),
        ("store.url", raw.url.is_some(), "redis"),
        ("store.key_prefix", raw.key_prefix.is_some(), "redis"),
    ] {
        if present && backend != owner && ["memory", "embedded", "redis"].contains(&backend) {
            problems.add(
                key,
                format!(
                    "applies only to backend \"{owner}\"; this store's backend is \"{backend}\""
                ),
            );
        }
    }
    match backend {
        "memory" => StoreConfig::Memory,
        "embedded" => {
            let path = raw.path.as_deref().unwrap_or("wxgate.redb");
            if path.is_empty() {
                problems.add("store.path", "must not be empty");
            }
            StoreConfig::Embedded {
                path: folder.join(path),
            }
        }
        "redis" => {
            let url = raw.url.unwrap_or_default();
            // The URL may carry a password: the messages never quote it.
            if url.is_empty() {
                problems.add("store.url", "is required with backend \"redis\"");
            } else if !["redis://", "rediss://", "redis+unix://", "unix://"]
                .iter()
                .any(|scheme| url.starts_with(scheme))
            {
                problems.add(
                    "store.url",
                    "must be a redis:// or rediss:// URL, like \"redis://127.0.0.1:6379/0\"",
                );
            }
            StoreConfig::Redis {
                url: Secret(url),
                key_prefix: raw.key_prefix.unwrap_or_else(|| "wxgate:".into()),
            }
        }
        _ => {
            problems.add("store.backend", "must be one of memory, embedded, redis");
            StoreConfig::Memory
        }
    }
}

/// Headers that HTTP itself or the gateway's forwarding owns. As an identity or claim header,
/// or under a protected prefix, one of these would be stripped from every request or would
/// break its framing.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "connection",
    "content-length",
    "content-type",
    "forwarded",
    "host",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-request-id",
];

/// Header names as the identity module compares them: lower-case, `_` read as `-`.
fn header_family(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

fn validate_identity(raw: RawIdentity, problems: &mut Problems) -> IdentityConfig {
    let openid_header = header_name(
        raw.openid_header.as_deref(),
        "x-wx-openid",
        "identity.openid_header",
        problems,
    );
    let unionid_header = header_name(
        raw.unionid_header.as_deref(),
        "x-wx-unionid",
        "identity.unionid_header",
        problems,
    );
    let appid_header = header_name(
        raw.appid_header.as_deref(),
        "x-wx-appid",
        "identity.appid_header",
        problems,
    );
    let identity = [
        ("identity.openid_header", &openid_header),
        ("identity.unionid_header", &unionid_header),
        ("identity.appid_header", &appid_header),
    ];
    for (index, (key, header)) in identity.iter().enumerate() {
        if let Some((other, _)) = identity[..index]
            .iter()
            .find(|(_, earlier)| header_family(earlier.as_str()) == header_family(header.as_str()))
        {
            problems.add(*key, format!("is the same header as {other}"));
        }
    }
    let protected_prefixes = raw
        .protected_prefixes
        .unwrap_or_else(|| vec!["X-WX-".into()])
        .iter()
        .enumerate()
        .map(|(index, prefix)| {
            let key = format!("identity.protected_prefixes[{index}]");
            let prefix = header_family(prefix);
            if prefix.is_empty() {
                problems.add(key, "must not be empty: it would strip every header");
            } else if HeaderName::from_bytes(prefix.as_bytes()).is_err() {
                problems.add(key, "must be the start of a header name, like \"X-WX-\"");
            } else if let Some(reserved) = RESERVED_HEADERS.iter().find(|h| h.starts_with(&prefix))
            {
                problems.add(
                    key,
                    format!("would strip the `{reserved}` header from every request"),
                );
            }
            prefix
        })
        .collect();
    let mut claim_headers: Vec<(String, HeaderName)> = Vec::new();
    for (claim, header) in raw.claim_headers.unwrap_or_default() {
        let key = join("identity.claim_headers", &claim);
        let header = header_name(Some(&header), "x-wx-invalid", &key, problems);
        let family = header_family(header.as_str());
        // Only claims a login hook adds become claim headers; the gateway's own (the openid,
        // appid and unionid among them) reach the upstream through the identity headers.
        if crate::token::RESERVED_CLAIMS.contains(&claim.as_str()) {
            problems.add(
                key.clone(),
                "names a claim the gateway sets itself, never a login hook's: only hook claims \
                 become claim headers (the openid, appid and unionid have identity.*_header)",
            );
        }
        if let Some((other, _)) = identity
            .iter()
            .find(|(_, name)| header_family(name.as_str()) == family)
        {
            problems.add(key, format!("is the same header as {other}"));
        } else if let Some((other, _)) = claim_headers
            .iter()
            .find(|(_, name)| header_family(name.as_str()) == family)
        {
            problems.add(
                key,
                format!("is the same header as identity.claim_headers.{other}"),
            );
        }
        claim_headers.push((claim, header));
    }
    IdentityConfig {
        openid_header,
        unionid_header,
        appid_header,
        protected_prefixes,
        forward_authorization: raw.forward_authorization.unwrap_or(false),
        claim_headers,
    }
}

fn header_name(
    value: Option<&str>,
    default: &'static str,
    key: &str,
    problems: &mut Problems,
) -> HeaderName {
    let Some(value) = value else {
        return HeaderName::from_static(default);
    };
    match HeaderName::from_bytes(value.as_bytes()) {
        Ok(name) if RESERVED_HEADERS.contains(&header_family(name.as_str()).as_str()) => {
            problems.add(key, "is a header HTTP or the gateway itself manages");
            name
        }
        Ok(name) => name,
        Err(_) => {
            problems.add(key, "must be a valid header name, like \"X-WX-OpenID\"");
            HeaderName::from_static(default)
        }
    }
}

fn validate_login_hook(raw: RawLoginHook, problems: &mut Problems) -> LoginHookConfig {
    let url = raw.url.unwrap_or_default();
    if url.is_empty() {
        problems.add("login_hook.url", "is required in [login_hook]");
    } else {
        web_url(&url, "login_hook.url", problems);
    }
    LoginHookConfig {
        url,
        timeout: duration(
            raw.timeout.as_deref(),
            "3s",
            WAIT,
            "login_hook.timeout",
            problems,
        ),
    }
}

fn validate_routes(
    raw: Vec<RawRoute>,
    appids: &[&str],
    auth_path: &str,
    problems: &mut Problems,
) -> Vec<RouteConfig> {
    if raw.is_empty() {
        problems.add(
            "routes",
            "at least one `[[routes]]` is required: without one every request gets 404",
        );
    }
    let mut routes: Vec<RouteConfig> = Vec::new();
    for (index, route) in raw.into_iter().enumerate() {
        let key = format!("routes[{index}]");
        let route = validate_route(route, &key, appids, problems);
        let prefix = route.path.trim_end_matches('/');
        // The gateway's own endpoints take precedence over routes (SPEC §4): such a route
        // would never see a request.
        let shadowed = (!auth_path.is_empty() && crate::routes::is_under(auth_path, prefix))
            || prefix == crate::auth::JWKS_PATH;
        if shadowed {
            problems.add(
                format!("{key}.path"),
                format!(
                    "lies under the gateway's own endpoints ({auth_path} or {}) and would never be reached; move it or change server.auth_path",
                    crate::auth::JWKS_PATH
                ),
            );
        }
        if let Some(first) = routes
            .iter()
            .position(|seen| seen.path.trim_end_matches('/') == prefix)
        {
            problems.add(
                format!("{key}.path"),
                format!("is the same path as routes[{first}] (a trailing `/` does not count)"),
            );
        }
        routes.push(route);
    }
    routes
}

fn validate_route(
    raw: RawRoute,
    key: &str,
    appids: &[&str],
    problems: &mut Problems,
) -> RouteConfig {
    let path = raw.path.unwrap_or_default();
    let path_key = format!("{key}.path");
    if path.is_empty() {
        problems.add(path_key, "is required");
    } else if !path.starts_with('/')
        || path.contains(['?', '#'])
        || path.parse::<http::uri::PathAndQuery>().is_err()
    {
        problems.add(path_key, "must be a path starting with `/`, like \"/api/\"");
    } else if path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        problems.add(
            path_key,
            "must not have `.` or `..` segments: requests with them are refused",
        );
    }

    let upstream_key = format!("{key}.upstream");
    let upstream = match raw.upstream.as_deref() {
        None | Some("") => {
            problems.add(upstream_key, "is required");
            Uri::default()
        }
        Some(text) => upstream_uri(text, &upstream_key, problems),
    };

    let auth = match raw.auth.as_deref() {
        Some("public") => AuthMode::Public,
        Some("optional") => AuthMode::Optional,
        Some("required") => AuthMode::Required,
        None => {
            // No default on purpose: a forgotten `auth` must not open a route, nor silently
            // close one.
            problems.add(
                format!("{key}.auth"),
                "is required: public, optional or required",
            );
            AuthMode::Required
        }
        Some(_) => {
            problems.add(
                format!("{key}.auth"),
                "must be one of public, optional, required",
            );
            AuthMode::Required
        }
    };

    let methods = raw.methods.map(|methods| {
        if methods.is_empty() {
            problems.add(
                format!("{key}.methods"),
                "must list at least one method (leave it out to allow all)",
            );
        }
        let mut valid: Vec<Method> = Vec::new();
        for (index, method) in methods.iter().enumerate() {
            match Method::from_bytes(method.to_ascii_uppercase().as_bytes()) {
                Ok(method) if !valid.contains(&method) => valid.push(method),
                Ok(_) => {}
                Err(_) => problems.add(
                    format!("{key}.methods[{index}]"),
                    "is not an HTTP method name",
                ),
            }
        }
        valid
    });

    if let Some(apps) = &raw.apps {
        if auth == AuthMode::Public {
            problems.add(
                format!("{key}.apps"),
                "has no effect on a public route, where no token is looked at",
            );
        } else if apps.is_empty() {
            problems.add(
                format!("{key}.apps"),
                "must list at least one appid (leave it out to allow every app)",
            );
        }
        for (index, app) in apps.iter().enumerate() {
            if !appids.contains(&app.as_str()) {
                problems.add(
                    format!("{key}.apps[{index}]"),
                    "is not the appid of any [[wechat.apps]]",
                );
            }
        }
    }

    RouteConfig {
        path,
        upstream,
        auth,
        methods,
        apps: raw.apps,
        strip_prefix: raw.strip_prefix.unwrap_or(false),
        timeout: duration(
            raw.timeout.as_deref(),
            "30s",
            WAIT,
            &format!("{key}.timeout"),
            problems,
        ),
    }
}

fn upstream_uri(text: &str, key: &str, problems: &mut Problems) -> Uri {
    let example = "must be an absolute http:// URL, like \"http://127.0.0.1:3000\"";
    let Ok(uri) = text.parse::<Uri>() else {
        problems.add(key, example);
        return Uri::default();
    };
    match (uri.scheme_str(), uri.authority()) {
        (Some("https"), _) => problems.add(
            key,
            "https upstreams are not supported yet: use http:// (the upstream is expected on \
             the same host or a private network)",
        ),
        (Some("http"), Some(authority)) if !authority.host().is_empty() => {
            if authority.as_str().contains('@') {
                problems.add(key, "must not carry credentials (`user:password@`)");
            } else if uri.query().is_some() {
                problems.add(key, "must not have a query: the request's own is passed on");
            }
        }
        _ => problems.add(key, example),
    }
    uri
}

/// An http(s) URL for the gateway's own calls (WeChat, the login hook).
/// Whether `text` is an absolute http(s) URL; when not, says so in `problems`.
fn web_url(text: &str, key: &str, problems: &mut Problems) -> bool {
    let valid = text.parse::<Uri>().is_ok_and(|uri| {
        matches!(uri.scheme_str(), Some("http" | "https"))
            && uri
                .authority()
                .is_some_and(|authority| !authority.host().is_empty())
    });
    if !valid {
        problems.add(
            key,
            "must be an absolute http:// or https:// URL, like \"https://api.weixin.qq.com\"",
        );
    }
    valid
}

fn socket_addr(text: &str, key: &str, problems: &mut Problems) -> SocketAddr {
    text.parse().unwrap_or_else(|_| {
        problems.add(key, "must be an IP address and port, like \"0.0.0.0:8080\"");
        SocketAddr::from(([0, 0, 0, 0], 0))
    })
}

/// An integer of at least `min` that fits the field's type; `max` is that type's largest value
/// (or TOML's, which is smaller than `u64`'s), for the message.
fn integer<T: TryFrom<i64> + Default + fmt::Display>(
    value: Option<i64>,
    default: T,
    min: i64,
    max: T,
    key: &str,
    problems: &mut Problems,
) -> T {
    let Some(value) = value else {
        return default;
    };
    match T::try_from(value) {
        Ok(number) if value >= min => number,
        _ => {
            problems.add(key, format!("must be a whole number from {min} to {max}"));
            T::default()
        }
    }
}

/// The range a duration setting may take. The upper bounds are far past any sensible value;
/// they keep a mistyped one (`"30000y"`) from overflowing the clock arithmetic that every
/// request does with it.
struct DurationBounds {
    min: Duration,
    max: Duration,
    /// Token times are whole seconds (JWT `exp` and `expires_in` are): a fraction would be
    /// dropped without a word.
    whole_seconds: bool,
}

const DAY: Duration = Duration::from_secs(86_400);

/// A timeout: longer than zero, at most a day.
const WAIT: DurationBounds = DurationBounds {
    min: Duration::from_nanos(1),
    max: DAY,
    whole_seconds: false,
};

/// A grace period: zero (none) to a day.
const GRACE: DurationBounds = DurationBounds {
    min: Duration::ZERO,
    max: DAY,
    whole_seconds: false,
};

/// The longest a token may live: ten years.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3650 * 86_400);

/// A token's lifetime: a second to ten years.
const LIFETIME: DurationBounds = DurationBounds {
    min: Duration::from_secs(1),
    max: MAX_TOKEN_LIFETIME,
    whole_seconds: true,
};

/// The most clock skew `token.leeway` may allow. A revocation is kept this long past the
/// revoked token's `exp`, whatever the leeway is, so that raising the leeway by a reload or a
/// restart cannot bring a logged-out token back into its window.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);

const LEEWAY: DurationBounds = DurationBounds {
    min: Duration::ZERO,
    max: MAX_LEEWAY,
    whole_seconds: true,
};

/// A whole number of seconds as a config file would write it: `"3650d"` rather than
/// humantime's `"9years 11months 27days 21h 50m 24s"` (its years and months are not whole
/// days).
pub(crate) fn as_setting(duration: Duration) -> String {
    let secs = duration.as_secs();
    match [(86_400, "d"), (3_600, "h"), (60, "m")]
        .into_iter()
        .find(|(unit, _)| secs >= *unit && secs.is_multiple_of(*unit))
    {
        Some((unit, suffix)) => format!("{}{suffix}", secs / unit),
        None => format!("{secs}s"),
    }
}

fn duration(
    value: Option<&str>,
    default: &str,
    bounds: DurationBounds,
    key: &str,
    problems: &mut Problems,
) -> Duration {
    let Ok(duration) = humantime::parse_duration(value.unwrap_or(default)) else {
        problems.add(key, "must be a duration like \"30s\", \"2h\" or \"30d\"");
        return Duration::ZERO;
    };
    if duration < bounds.min {
        let message = if bounds.min < Duration::from_secs(1) {
            "must be longer than zero".to_string()
        } else {
            format!("must be at least {}", as_setting(bounds.min))
        };
        problems.add(key, message);
    } else if duration > bounds.max {
        problems.add(key, format!("must be at most {}", as_setting(bounds.max)));
    } else if bounds.whole_seconds && duration.subsec_nanos() != 0 {
        problems.add(key, "must be whole seconds, like \"90s\" or \"2h\"");
    }
    duration
}

/// Reads a file named by `key`, relative to the config file's folder unless absolute. The
/// message does not quote the name: an operator who put the secret itself in `secret_file`
/// must not see it echoed.
fn read_file(
    file: &str,
    key: &str,
    folder: &Path,
    problems: &mut Problems,
) -> Option<(PathBuf, String)> {
    if file.is_empty() {
        problems.add(key, "must not be empty");
        return None;
    }
    let path = folder.join(file);
    match fs::read_to_string(&path) {
        Ok(text) => Some((path, text)),
        Err(err) => {
            let relative = if Path::new(file).is_absolute() {
                String::new()
            } else if folder.as_os_str().is_empty() {
                " (relative to the working directory, where the config file is)".into()
            } else {
                format!(" (relative to {})", folder.display())
            };
            problems.add(key, format!("cannot read the file{relative}: {err}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWT_SECRET: &str = "0123456789abcdef0123456789abcdef";

    /// The smallest valid file: everything else takes its default.
    const MINIMAL: &str = r#"
[[wechat.apps]]
appid = "wx0000000000000a01"
secret = "app-secret-a"

[token]
secret = "0123456789abcdef0123456789abcdef"

[[routes]]
path = "/api/"
upstream = "http://127.0.0.1:3000"
auth = "required"
"#;

    fn env(name: &str) -> Option<String> {
        match name {
            "WX_APP_SECRET" => Some("app-secret-from-env".into()),
            "WXGATE_JWT_SECRET" => Some(JWT_SECRET.into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/wxgate/config.toml"), &env)
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text) {
            Ok(_) => panic!("expected problems, the file was accepted:\n{text}"),
            Err(err) => err.problems,
        }
    }

    fn keys(problems: &[Problem]) -> Vec<&str> {
        problems.iter().map(|p| p.key.as_str()).collect()
    }

    /// The problem about `key`, which must exist and be the only one about it.
    fn about<'a>(problems: &'a [Problem], key: &str) -> &'a str {
        let found: Vec<&Problem> = problems.iter().filter(|p| p.key == key).collect();
        assert_eq!(found.len(), 1, "one problem about {key} in {problems:#?}");
        &found[0].message
    }

    /// MINIMAL with `pattern` replaced, for files that differ from it in one place.
    fn minimal_with(pattern: &str, replacement: &str) -> String {
        assert!(MINIMAL.contains(pattern), "{pattern}");
        MINIMAL.replacen(pattern, replacement, 1)
    }

    /// A fresh folder under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let path = std::env::temp_dir().join(format!(
                "wxgate-config-{name}-{}-{nanos}",
                std::process::id()
            ));
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        fn write(&self, relative: &str, contents: &str) -> PathBuf {
            let path = self.0.join(relative);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, contents).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn full_file_parses_into_typed_values() {
        let dir = TempDir::new("full");
        dir.write("secrets/app-b", "secret-of-app-b\n");
        let current = es256_key();
        let previous = es256_key();
        dir.write("keys/current.pem", &current);
        dir.write("keys/previous.pem", &previous);
        let text = r#"
[server]
listen = "127.0.0.1:8081"
admin_listen = ""
auth_path = "/gate/"
max_body_bytes = 4096
shutdown_grace = "5s"
trusted_proxies = ["10.0.0.0/8", "192.168.1.10", "::1"]

[wechat]
hosts = ["http://127.0.0.1:9999/", "https://api2.weixin.qq.com"]
timeout = "2s"

[[wechat.apps]]
appid = "wx0000000000000a01"
secret = "${WX_APP_SECRET}"

[[wechat.apps]]
appid = "wx0000000000000b02"
secret_file = "secrets/app-b"

[token]
issuer = "me"
audience = "them"
algorithm = "ES256"
signing_key = "keys/current.pem"
verify_keys = ["keys/previous.pem"]
access_ttl = "15m"
refresh_ttl = "7d"
leeway = "0s"

[store]
backend = "redis"
url = "redis://127.0.0.1:6379/1"
key_prefix = "gw:"

[identity]
openid_header = "X-OpenID"
unionid_header = "X-UnionID"
appid_header = "X-AppID"
protected_prefixes = ["X_Internal_", "X-WX-"]
forward_authorization = true
claim_headers = { uid = "X-User-Id", role = "X-User-Role" }

[login_hook]
url = "http://127.0.0.1:3000/hook"
timeout = "1s"

[rate_limit]
login_per_ip_per_minute = 0

[[routes]]
path = "/api/"
upstream = "http://127.0.0.1:3000/base"
auth = "optional"
methods = ["get", "POST"]
apps = ["wx0000000000000b02"]
strip_prefix = true
timeout = "500ms"
"#;
        let path = dir.0.join("config.toml");
        let config = Config::parse(text, &path, &env).unwrap();
        assert_eq!(config.path, path);

        let server = &config.server;
        assert_eq!(server.listen, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(server.admin_listen, None);
        assert_eq!(server.auth_path, "/gate");
        assert_eq!(server.max_body_bytes, 4096);
        assert_eq!(server.shutdown_grace, Duration::from_secs(5));
        let proxies: Vec<String> = server
            .trusted_proxies
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(proxies, ["10.0.0.0/8", "192.168.1.10/32", "::1/128"]);

        let wechat = &config.wechat;
        let bases: Vec<&str> = wechat.hosts.iter().map(|host| host.base.as_str()).collect();
        assert_eq!(
            bases,
            ["http://127.0.0.1:9999", "https://api2.weixin.qq.com"]
        );
        assert_eq!(
            wechat.hosts[0].code2session.as_str(),
            "http://127.0.0.1:9999/sns/jscode2session"
        );
        assert_eq!(wechat.timeout, Duration::from_secs(2));
        assert_eq!(wechat.apps.len(), 2);
        assert_eq!(wechat.apps[0].appid, "wx0000000000000a01");
        assert_eq!(wechat.apps[0].secret.expose(), "app-secret-from-env");
        assert_eq!(wechat.apps[1].appid, "wx0000000000000b02");
        assert_eq!(wechat.apps[1].secret.expose(), "secret-of-app-b");

        let token = &config.token;
        assert_eq!(token.issuer, "me");
        assert_eq!(token.audience, "them");
        assert_eq!(token.algorithm, Algorithm::Es256);
        assert!(token.secret.is_none());
        let signing = token.signing_key.as_ref().unwrap();
        assert_eq!(signing.path, dir.0.join("keys/current.pem"));
        assert_eq!(signing.pem.expose(), current);
        assert_eq!(token.verify_keys.len(), 1);
        assert_eq!(token.verify_keys[0].path, dir.0.join("keys/previous.pem"));
        assert_eq!(token.verify_keys[0].pem.expose(), previous);
        assert_eq!(token.access_ttl, Duration::from_secs(15 * 60));
        assert_eq!(token.refresh_ttl, Duration::from_secs(7 * 86400));
        assert_eq!(token.leeway, Duration::ZERO);

        assert_eq!(
            config.store,
            StoreConfig::Redis {
                url: Secret::new("redis://127.0.0.1:6379/1"),
                key_prefix: "gw:".into(),
            }
        );

        let identity = &config.identity;
        assert_eq!(identity.openid_header, "x-openid");
        assert_eq!(identity.unionid_header, "x-unionid");
        assert_eq!(identity.appid_header, "x-appid");
        assert_eq!(identity.protected_prefixes, ["x-internal-", "x-wx-"]);
        assert!(identity.forward_authorization);
        let claims: Vec<(&str, &str)> = identity
            .claim_headers
            .iter()
            .map(|(claim, header)| (claim.as_str(), header.as_str()))
            .collect();
        assert_eq!(claims, [("role", "x-user-role"), ("uid", "x-user-id")]);

        let hook = config.login_hook.as_ref().unwrap();
        assert_eq!(hook.url, "http://127.0.0.1:3000/hook");
        assert_eq!(hook.timeout, Duration::from_secs(1));
        assert_eq!(config.rate_limit.login_per_ip_per_minute, 0);

        assert_eq!(config.routes.len(), 1);
        let route = &config.routes[0];
        assert_eq!(route.path, "/api/");
        assert_eq!(route.upstream, "http://127.0.0.1:3000/base");
        assert_eq!(route.auth, AuthMode::Optional);
        assert_eq!(route.methods, Some(vec![Method::GET, Method::POST]));
        assert_eq!(route.apps, Some(vec!["wx0000000000000b02".to_string()]));
        assert!(route.strip_prefix);
        assert_eq!(route.timeout, Duration::from_millis(500));
    }

    #[test]
    fn omitted_keys_take_their_defaults() {
        let config = parse(MINIMAL).unwrap();
        let server = &config.server;
        assert_eq!(server.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(server.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(server.auth_path, "/auth");
        assert_eq!(server.max_body_bytes, 1_048_576);
        assert_eq!(server.shutdown_grace, Duration::from_secs(20));
        assert!(server.trusted_proxies.is_empty());
        let bases: Vec<&str> = config
            .wechat
            .hosts
            .iter()
            .map(|host| host.base.as_str())
            .collect();
        assert_eq!(
            bases,
            ["https://api.weixin.qq.com", "https://api2.weixin.qq.com"]
        );
        assert_eq!(config.wechat.timeout, Duration::from_secs(5));
        let token = &config.token;
        assert_eq!(token.issuer, "wxgate");
        assert_eq!(token.audience, "api");
        assert_eq!(token.algorithm, Algorithm::Hs256);
        assert_eq!(token.secret.as_ref().unwrap().expose(), JWT_SECRET);
        assert!(token.signing_key.is_none());
        assert!(token.verify_keys.is_empty());
        assert_eq!(token.access_ttl, Duration::from_secs(2 * 3600));
        assert_eq!(token.refresh_ttl, Duration::from_secs(30 * 86400));
        assert_eq!(token.leeway, Duration::from_secs(30));
        assert_eq!(
            config.store,
            StoreConfig::Embedded {
                path: PathBuf::from("/etc/wxgate/wxgate.redb")
            }
        );
        let identity = &config.identity;
        assert_eq!(identity.openid_header, "x-wx-openid");
        assert_eq!(identity.unionid_header, "x-wx-unionid");
        assert_eq!(identity.appid_header, "x-wx-appid");
        assert_eq!(identity.protected_prefixes, ["x-wx-"]);
        assert!(!identity.forward_authorization);
        assert!(identity.claim_headers.is_empty());
        assert!(config.login_hook.is_none());
        assert_eq!(config.rate_limit.login_per_ip_per_minute, 60);
        let route = &config.routes[0];
        assert_eq!(route.methods, None);
        assert_eq!(route.apps, None);
        assert!(!route.strip_prefix);
        assert_eq!(route.timeout, Duration::from_secs(30));
    }

    #[test]
    fn every_unknown_key_is_reported_with_its_dotted_path() {
        let text = r#"
[server]
listn = "0.0.0.0:8080"

[serverr]
listen = "0.0.0.0:8080"

[wechat]
timeot = "5s"

[[wechat.apps]]
appid = "wx0000000000000a01"
secret = "app-secret-a"
secrte = "typo"

[token]
secret = "0123456789abcdef0123456789abcdef"
secrte = "0123456789abcdef0123456789abcdef"

[token.extra]
nested = 1

[identity]
claim_headers = { uid = "X-User-Id" }
protected_prefix = ["X-WX-"]

[[routes]]
path = "/a/"
upstream = "http://127.0.0.1:3000"
auth = "public"

[[routes]]
path = "/b/"
uptream = "http://127.0.0.1:3000"
upstream = "http://127.0.0.1:3000"
auth = "public"
"#;
        let problems = problems(text);
        let mut unknown: Vec<&str> = problems
            .iter()
            .filter(|p| p.message == "unknown key")
            .map(|p| p.key.as_str())
            .collect();
        unknown.sort_unstable();
        assert_eq!(
            unknown,
            [
                "identity.protected_prefix",
                "routes[1].uptream",
                "server.listn",
                "serverr",
                "token.extra",
                "token.secrte",
                "wechat.apps[0].secrte",
                "wechat.timeot",
            ]
        );
        assert_eq!(problems.len(), unknown.len(), "{problems:#?}");
    }

    #[test]
    fn problems_in_different_sections_are_all_reported_at_once() {
        let text = r#"
[server]
listen = "not an address"
max_body_bytes = "big"
trusted_proxies = ["10.0.0.0/8", "nonsense"]

[wechat]
hosts = ["ftp://example.com"]

[[wechat.apps]]
appid = ""
secret = "app-secret-a"

[token]
algorithm = "hs256"

[store]
backend = "redis"

[identity]
openid_header = "not a header"

[login_hook]
timeout = "3s"

[rate_limit]
login_per_ip_per_minute = -1

[[routes]]
path = "api"
upstream = "http://127.0.0.1:3000"
auth = "public"
"#;
        let problems = problems(text);
        assert_eq!(
            keys(&problems),
            [
                "server.max_body_bytes",
                "server.listen",
                "server.trusted_proxies[1]",
                "wechat.hosts[0]",
                "wechat.apps[0].appid",
                "token.algorithm",
                "store.url",
                "identity.openid_header",
                "login_hook.url",
                "rate_limit.login_per_ip_per_minute",
                "routes[0].path",
            ],
            "{problems:#?}"
        );
        assert_eq!(
            about(&problems, "server.max_body_bytes"),
            "must be an integer, not a string"
        );
        assert_eq!(
            about(&problems, "rate_limit.login_per_ip_per_minute"),
            format!("must be a whole number from 0 to {}", u32::MAX)
        );
        let display = ConfigError { problems }.to_string();
        assert_eq!(display.lines().count(), 11);
        assert!(display.starts_with("server.max_body_bytes: must be an integer"));
    }

    #[test]
    fn a_wrong_type_names_its_key_and_hides_nothing_else() {
        let text = r#"
[server]
listen = 8080
shutdown_grace = "forever"
trusted_proxies = "10.0.0.0/8"

[wechat]
hosts = ["https://api.weixin.qq.com", 5]

[[wechat.apps]]
appid = "wx0000000000000a01"
secret = "app-secret-a"

[token]
secret = "0123456789abcdef0123456789abcdef"
access_ttl = 7200

[identity]
forward_authorization = "yes"
claim_headers = { uid = 1 }

[[routes]]
path = "/api/"
upstream = "http://127.0.0.1:3000"
auth = 3

[[routes]]
path = "/x/"
upstream = "http://127.0.0.1:3000"
auth = "public"
methods = "GET"

routes = 5
"#;
        let problems = problems(text);
        assert_eq!(
            about(&problems, "server.listen"),
            "must be a string, not an integer"
        );
        assert_eq!(
            about(&problems, "server.shutdown_grace"),
            "must be a duration like \"30s\", \"2h\" or \"30d\""
        );
        assert_eq!(
            about(&problems, "server.trusted_proxies"),
            "must be an array, not a string"
        );
        assert_eq!(
            about(&problems, "wechat.hosts"),
            "every element must be a string"
        );
        assert_eq!(
            about(&problems, "token.access_ttl"),
            "must be a string, not an integer"
        );
        assert_eq!(
            about(&problems, "identity.forward_authorization"),
            "must be a boolean, not a string"
        );
        assert_eq!(
            about(&problems, "identity.claim_headers"),
            "every value must be a string"
        );
        // Not followed by "is required": the key was there, with the wrong type.
        assert_eq!(
            about(&problems, "routes[0].auth"),
            "must be a string, not an integer"
        );
        assert_eq!(
            about(&problems, "routes[1].methods"),
            "must be an array, not a string"
        );
        // `routes = 5` after `[[routes]]` lands inside the last route: an unknown key there.
        assert_eq!(about(&problems, "routes[1].routes"), "unknown key");
        assert_eq!(problems.len(), 10, "{problems:#?}");
    }

    #[test]
    fn a_section_of_the_wrong_shape_is_reported_once() {
        let text = format!("server = \"0.0.0.0:80\"\nwechat = 1\n{MINIMAL}").replace(
            "[[wechat.apps]]\nappid = \"wx0000000000000a01\"\nsecret = \"app-secret-a\"\n",
            "",
        );
        let found = problems(&text);
        assert_eq!(keys(&found), ["server", "wechat"], "{found:#?}");
        assert_eq!(about(&found, "server"), "must be a table, not a string");
        let found = problems(
            "routes = { path = \"/\" }\n[[wechat.apps]]\nappid = \"a\"\nsecret = \"s\"\n[token]\nsecret = \"0123456789abcdef0123456789abcdef\"\n",
        );
        assert_eq!(
            about(&found, "routes"),
            "must be an array of tables (`[[routes]]`), not a table"
        );
        assert_eq!(found.len(), 1, "{found:#?}");
    }

    #[test]
    fn variables_are_substituted_in_string_values() {
        let text = minimal_with(
            "secret = \"app-secret-a\"",
            "secret = \"pre-${WX_APP_SECRET}-post\"",
        )
        .replace(
            "[[routes]]",
            "[identity]\nclaim_headers = { uid = \"X-${EMPTY}Uid\" }\n\n[[routes]]",
        );
        let config = parse(&text).unwrap();
        assert_eq!(
            config.wechat.apps[0].secret.expose(),
            "pre-app-secret-from-env-post"
        );
        assert_eq!(config.identity.claim_headers[0].1, "x-uid");
    }

    #[test]
    fn a_double_dollar_is_a_literal_and_values_are_not_rescanned() {
        let text = minimal_with(
            "secret = \"app-secret-a\"",
            "secret = \"a$${NOT_A_VAR}b$$${WX_APP_SECRET}\"",
        );
        let config = parse(&text).unwrap();
        assert_eq!(
            config.wechat.apps[0].secret.expose(),
            "a${NOT_A_VAR}b$${WX_APP_SECRET}"
        );
        let rescanned = |name: &str| (name == "OUTER").then(|| "${WX_APP_SECRET}".to_string());
        let text = minimal_with("secret = \"app-secret-a\"", "secret = \"${OUTER}\"");
        let config = Config::parse(&text, Path::new("c.toml"), &rescanned).unwrap();
        assert_eq!(config.wechat.apps[0].secret.expose(), "${WX_APP_SECRET}");
    }

    #[test]
    fn an_unset_variable_is_named_with_its_key() {
        let text = minimal_with(
            "secret = \"app-secret-a\"",
            "secret = \"${MISSING_ONE}:${WX_APP_SECRET}:${MISSING_TWO}\"",
        )
        .replace("auth = \"required\"", "auth = \"${MISSING_AUTH}\"");
        let problems = problems(&text);
        assert_eq!(
            problems,
            [
                Problem {
                    key: "wechat.apps[0].secret".into(),
                    message: "environment variable `MISSING_ONE` is not set".into(),
                },
                Problem {
                    key: "wechat.apps[0].secret".into(),
                    message: "environment variable `MISSING_TWO` is not set".into(),
                },
                Problem {
                    key: "routes[0].auth".into(),
                    message: "environment variable `MISSING_AUTH` is not set".into(),
                },
            ]
        );
    }

    #[test]
    fn a_malformed_reference_is_reported() {
        for value in ["${UNCLOSED", "${}", "${1ABC}", "${A-B}"] {
            let text = minimal_with(
                "secret = \"app-secret-a\"",
                &format!("secret = \"{value}\""),
            );
            let problems = problems(&text);
            assert_eq!(keys(&problems), ["wechat.apps[0].secret"], "{value}");
            assert!(problems[0].message.contains("$${"), "{value}: {problems:?}");
        }
    }

    #[test]
    fn secret_file_is_read_relative_to_the_config_folder() {
        let dir = TempDir::new("secret-file");
        dir.write("secrets/wx", "secret-from-file\r\n");
        let absolute = dir.write("abs", "absolute-secret\n\n");
        let text = format!(
            "{MINIMAL}\n[[wechat.apps]]\nappid = \"wx2\"\nsecret_file = \"{}\"\n",
            absolute.display()
        )
        .replace("secret = \"app-secret-a\"", "secret_file = \"secrets/wx\"");
        let config = Config::parse(&text, &dir.0.join("config.toml"), &env).unwrap();
        assert_eq!(config.wechat.apps[0].secret.expose(), "secret-from-file");
        // Only one trailing newline is the editor's; the rest is the file's content.
        assert_eq!(config.wechat.apps[1].secret.expose(), "absolute-secret\n");

        // The same file seen from another folder is not found, and the message says where
        // relative paths start.
        let elsewhere = Config::parse(&text, Path::new("/nonexistent/config.toml"), &env);
        let problems = elsewhere.unwrap_err().problems;
        let message = about(&problems, "wechat.apps[0].secret_file");
        assert!(message.contains("relative to /nonexistent"), "{message}");
        assert_eq!(problems.len(), 1, "{problems:#?}");
    }

    #[test]
    fn secret_and_secret_file_are_exclusive_and_one_is_needed() {
        let both = minimal_with(
            "secret = \"app-secret-a\"",
            "secret = \"app-secret-a\"\nsecret_file = \"wx\"",
        );
        assert_eq!(
            about(&problems(&both), "wechat.apps[0]"),
            "has both secret and secret_file: keep one"
        );
        let neither = minimal_with("secret = \"app-secret-a\"", "");
        assert_eq!(
            about(&problems(&neither), "wechat.apps[0]"),
            "needs secret or secret_file"
        );
        let dir = TempDir::new("empty-secret");
        dir.write("wx", "\n");
        let empty = minimal_with("secret = \"app-secret-a\"", "secret_file = \"wx\"");
        let problems = Config::parse(&empty, &dir.0.join("c.toml"), &env)
            .unwrap_err()
            .problems;
        assert_eq!(
            about(&problems, "wechat.apps[0].secret_file"),
            "names an empty file"
        );
    }

    #[test]
    fn apps_are_required_with_unique_appids() {
        let none = MINIMAL.replace(
            "[[wechat.apps]]\nappid = \"wx0000000000000a01\"\nsecret = \"app-secret-a\"\n",
            "",
        );
        assert_eq!(keys(&problems(&none)), ["wechat.apps"]);
        let twice = format!(
            "{MINIMAL}\n[[wechat.apps]]\nappid = \"wx0000000000000a01\"\nsecret = \"other\"\n"
        );
        assert_eq!(
            about(&problems(&twice), "wechat.apps[1].appid"),
            "is the same appid as wechat.apps[0]"
        );
    }

    #[test]
    fn a_short_hs256_secret_is_refused() {
        let short = problems(&minimal_with(JWT_SECRET, &JWT_SECRET[..31]));
        assert_eq!(keys(&short), ["token.secret"]);
        assert!(short[0].message.contains("at least 32 bytes"));
        let missing = minimal_with(&format!("secret = \"{JWT_SECRET}\""), "");
        assert_eq!(
            about(&problems(&missing), "token.secret"),
            "is required with algorithm HS256"
        );
        // 33 bytes in 11 characters: the key is the string's bytes, so bytes are what count.
        let multibyte = minimal_with(JWT_SECRET, "密钥密钥密钥密钥密钥密");
        assert!(parse(&multibyte).is_ok());
    }

    #[test]
    fn algorithm_decides_which_key_settings_are_allowed() {
        let dir = TempDir::new("algorithms");
        dir.write("k.pem", "PEM");
        for algorithm in [Algorithm::Es256, Algorithm::EdDsa, Algorithm::Rs256] {
            let pem = crate::token::keygen(algorithm).unwrap();
            dir.write(&format!("{}.pem", algorithm.name()), &pem);
        }
        let parse_in_dir = |text: &str| Config::parse(text, &dir.0.join("c.toml"), &env);

        let hs256_with_keys = minimal_with(
            "[token]",
            "[token]\nsigning_key = \"k.pem\"\nverify_keys = [\"k.pem\"]",
        );
        let problems = parse_in_dir(&hs256_with_keys).unwrap_err().problems;
        assert_eq!(keys(&problems), ["token.signing_key", "token.verify_keys"]);

        let es256_with_secret = minimal_with("[token]", "[token]\nalgorithm = \"ES256\"");
        let problems = parse_in_dir(&es256_with_secret).unwrap_err().problems;
        assert_eq!(keys(&problems), ["token.secret", "token.signing_key"]);
        assert!(problems[1].message.contains("ES256"));

        for algorithm in ["ES256", "EdDSA", "RS256"] {
            let text = minimal_with(
                &format!("secret = \"{JWT_SECRET}\""),
                &format!("algorithm = \"{algorithm}\"\nsigning_key = \"{algorithm}.pem\""),
            );
            let config = parse_in_dir(&text).unwrap();
            assert_eq!(config.token.algorithm.name(), algorithm);
            let pem = fs::read_to_string(dir.0.join(format!("{algorithm}.pem"))).unwrap();
            assert_eq!(config.token.signing_key.unwrap().pem.expose(), pem);
        }

        let lower = minimal_with("[token]", "[token]\nalgorithm = \"eddsa\"");
        assert_eq!(
            keys(&parse_in_dir(&lower).unwrap_err().problems),
            ["token.algorithm"]
        );
    }

    fn es256_key() -> String {
        crate::token::keygen(Algorithm::Es256).unwrap()
    }

    #[test]
    fn every_key_that_cannot_serve_is_listed_with_the_files_other_problems() {
        let dir = TempDir::new("bad-keys");
        dir.write("garbage.pem", "not a key");
        dir.write(
            "ed25519.pem",
            &crate::token::keygen(Algorithm::EdDsa).unwrap(),
        );
        dir.write("rsa.pem", &crate::token::keygen(Algorithm::Rs256).unwrap());
        let public_only = {
            use p256::pkcs8::{DecodePrivateKey, EncodePublicKey, LineEnding};
            p256::SecretKey::from_pkcs8_pem(&es256_key())
                .unwrap()
                .public_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap()
        };
        dir.write("public.pem", &public_only);
        let text = minimal_with(
            &format!("secret = \"{JWT_SECRET}\""),
            "algorithm = \"ES256\"\nsigning_key = \"public.pem\"\n\
             verify_keys = [\"ed25519.pem\", \"rsa.pem\", \"garbage.pem\", \"public.pem\"]\n\n\
             [store]\nbogus = 1",
        );
        let problems = Config::parse(&text, &dir.0.join("c.toml"), &env)
            .unwrap_err()
            .problems;
        assert_eq!(
            keys(&problems),
            [
                "token.signing_key",
                "token.verify_keys[0]",
                "token.verify_keys[1]",
                "token.verify_keys[2]",
                "store.bogus",
            ],
        );
        assert!(problems[0].message.starts_with("is a public key"));
        assert!(problems[1].message.contains("Ed25519"));
        assert!(problems[2].message.contains("RSA"));
        assert!(problems[3].message.starts_with("holds no PEM key"));
        // Messages say what is wrong with a file, never what it holds.
        assert!(!format!("{problems:?}").contains("not a key"));
    }

    #[test]
    fn an_unreadable_key_file_names_its_key() {
        let text = minimal_with(
            &format!("secret = \"{JWT_SECRET}\""),
            "algorithm = \"RS256\"\nsigning_key = \"keys/missing.pem\"\nverify_keys = [\"/nonexistent/old.pem\"]",
        );
        let problems = problems(&text);
        assert_eq!(
            keys(&problems),
            ["token.signing_key", "token.verify_keys[0]"]
        );
        assert!(
            problems[0]
                .message
                .starts_with("cannot read the file (relative to /etc/wxgate)")
        );
        assert!(problems[1].message.starts_with("cannot read the file: "));
    }

    #[test]
    fn secrets_never_appear_in_messages() {
        const SECRET: &str = "Sup3rS3cretValue";
        let texts = [
            // Too short for HS256.
            minimal_with(JWT_SECRET, SECRET),
            // A secret where the algorithm takes a key file.
            minimal_with("[token]", &format!("[token]\nalgorithm = \"ES256\"\nsecret = \"{SECRET}\"")),
            // Under a mistyped key.
            minimal_with("[token]", &format!("[token]\nsecrte = \"{SECRET}\"")),
            // Where a number, a boolean, an address, a CIDR, a duration, a URL are expected.
            format!(
                "[server]\nmax_body_bytes = \"{SECRET}\"\nlisten = \"{SECRET}\"\ntrusted_proxies = [\"{SECRET}\"]\nshutdown_grace = \"{SECRET}\"\n{MINIMAL}"
            )
            .replace("auth = \"required\"", &format!("auth = \"{SECRET}\"\nstrip_prefix = \"{SECRET}\"")),
            // Both secret and secret_file, and a secret pasted into secret_file.
            minimal_with("secret = \"app-secret-a\"", &format!("secret = \"{SECRET}\"\nsecret_file = \"{SECRET}\"")),
            minimal_with("secret = \"app-secret-a\"", &format!("secret_file = \"{SECRET}\"")),
            // In a redis URL, and as the algorithm's name.
            minimal_with("[token]", &format!("[store]\nbackend = \"redis\"\nurl = \"{SECRET}\"\n\n[token]\nalgorithm = \"{SECRET}\"")),
            // A value that is not valid TOML.
            minimal_with(JWT_SECRET, &format!("{SECRET}\\q")),
            minimal_with(&format!("\"{JWT_SECRET}\""), SECRET),
            // Inside a value that also references an unset variable, or is malformed.
            minimal_with(JWT_SECRET, &format!("{SECRET}${{UNSET}}")),
            minimal_with(JWT_SECRET, &format!("{SECRET}${{{SECRET}")),
        ];
        for text in &texts {
            let err = parse(text).unwrap_err();
            let shown = format!("{err}\n{err:?}");
            assert!(!err.problems.is_empty());
            assert!(!shown.contains(SECRET), "secret echoed:\n{shown}");
            assert!(
                !shown.contains("Sup3r"),
                "part of the secret echoed:\n{shown}"
            );
        }
    }

    #[test]
    fn a_syntax_error_gives_its_position() {
        let text = "[server]\nlisten = \"0.0.0.0:80\"\nmax_body_bytes = = 3\n";
        let problems = problems(text);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "");
        assert!(
            problems[0]
                .message
                .starts_with("not valid TOML at line 3, column "),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn durations_are_humantime_strings() {
        let text = minimal_with(
            "[token]",
            "[wechat]\ntimeout = \"1500ms\"\n\n[token]\naccess_ttl = \"1h 30m\"\nrefresh_ttl = \"2weeks\"\nleeway = \"0s\"",
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.wechat.timeout, Duration::from_millis(1500));
        assert_eq!(config.token.access_ttl, Duration::from_secs(5400));
        assert_eq!(config.token.refresh_ttl, Duration::from_secs(14 * 86400));
        assert_eq!(config.token.leeway, Duration::ZERO);

        let bad = minimal_with(
            "[token]",
            "[wechat]\ntimeout = \"0s\"\n\n[token]\naccess_ttl = \"2\"\nrefresh_ttl = \"30 days\"\nleeway = \"-1s\"",
        );
        let problems = problems(&bad);
        assert_eq!(
            about(&problems, "wechat.timeout"),
            "must be longer than zero"
        );
        assert!(about(&problems, "token.access_ttl").starts_with("must be a duration"));
        assert!(about(&problems, "token.leeway").starts_with("must be a duration"));
        // humantime reads "30 days" fine.
        assert_eq!(
            keys(&problems),
            ["wechat.timeout", "token.access_ttl", "token.leeway"]
        );
    }

    #[test]
    fn the_admin_listener_cannot_take_the_gateways_port() {
        let with = |listen: &str, admin: &str| {
            let text = MINIMAL.replace(
                "[token]",
                &format!("[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n\n[token]"),
            );
            parse(&text)
                .err()
                .map_or(String::new(), |err| keys(&err.problems).join(","))
        };
        assert_eq!(with("0.0.0.0:8080", "0.0.0.0:8080"), "server.admin_listen");
        assert_eq!(
            with("0.0.0.0:8080", "127.0.0.1:8080"),
            "server.admin_listen"
        );
        assert_eq!(
            with("127.0.0.1:8080", "0.0.0.0:8080"),
            "server.admin_listen"
        );
        assert_eq!(with("127.0.0.1:8080", "127.0.0.2:8080"), "");
        assert_eq!(with("0.0.0.0:8080", "127.0.0.1:9090"), "");
        // Port 0 is a fresh port for each.
        assert_eq!(with("127.0.0.1:0", "127.0.0.1:0"), "");
    }

    #[test]
    fn a_duration_past_its_bounds_is_refused_before_it_can_overflow_a_clock() {
        let text = MINIMAL
            .replace(
                "[token]",
                "[server]\nheader_timeout = \"30000y\"\nshutdown_grace = \"2d\"\n\n\
                 [login_hook]\nurl = \"http://127.0.0.1:1/hook\"\ntimeout = \"500000000000y\"\n\n\
                 [token]\naccess_ttl = \"500ms\"\nrefresh_ttl = \"90500ms\"\nleeway = \"60y\"",
            )
            .replace(
                "auth = \"required\"",
                "auth = \"required\"\ntimeout = \"25h\"",
            );
        let problems = problems(&text);
        let found: Vec<_> = problems
            .iter()
            .map(|problem| (problem.key.as_str(), problem.message.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                ("server.shutdown_grace", "must be at most 1d"),
                ("server.header_timeout", "must be at most 1d"),
                ("token.access_ttl", "must be at least 1s"),
                (
                    "token.refresh_ttl",
                    "must be whole seconds, like \"90s\" or \"2h\""
                ),
                ("token.leeway", "must be at most 5m"),
                ("login_hook.timeout", "must be at most 1d"),
                ("routes[0].timeout", "must be at most 1d"),
            ]
        );

        let longest = MINIMAL.replace(
            "[token]",
            "[server]\nheader_timeout = \"1d\"\nshutdown_grace = \"0s\"\n\n\
             [token]\naccess_ttl = \"1s\"\nrefresh_ttl = \"3650d\"\nleeway = \"5m\"",
        );
        let config = parse(&longest).unwrap();
        assert_eq!(config.token.leeway, MAX_LEEWAY);
        assert_eq!(config.token.refresh_ttl, MAX_TOKEN_LIFETIME);
    }

    #[test]
    fn server_values_are_checked() {
        let cases = [
            ("auth_path = \"auth\"", "server.auth_path"),
            ("auth_path = \"/\"", "server.auth_path"),
            ("auth_path = \"/auth?x\"", "server.auth_path"),
            ("admin_listen = \"localhost:9090\"", "server.admin_listen"),
            ("max_body_bytes = 0", "server.max_body_bytes"),
            (
                "trusted_proxies = [\"10.0.0.0/33\"]",
                "server.trusted_proxies[0]",
            ),
        ];
        for (line, key) in cases {
            let text = format!("[server]\n{line}\n{MINIMAL}");
            assert_eq!(keys(&problems(&text)), [key], "{line}");
        }
    }

    #[test]
    fn identity_headers_are_checked() {
        let cases = [
            ("appid_header = \"X-WX-OpenID\"", "identity.appid_header"),
            (
                "unionid_header = \"x_wx_openid\"",
                "identity.unionid_header",
            ),
            ("openid_header = \"Host\"", "identity.openid_header"),
            (
                "claim_headers = { uid = \"X-WX-AppID\" }",
                "identity.claim_headers.uid",
            ),
            (
                "claim_headers = { uid = \"bad header\" }",
                "identity.claim_headers.uid",
            ),
            (
                "claim_headers = { uid = \"Content-Length\" }",
                "identity.claim_headers.uid",
            ),
            (
                "claim_headers = { a = \"X-A\", b = \"x_a\" }",
                "identity.claim_headers.b",
            ),
            (
                "claim_headers = { sid = \"X-Session\" }",
                "identity.claim_headers.sid",
            ),
            (
                "claim_headers = { uid = \"X-Uid\", sub = \"X-Subject\" }",
                "identity.claim_headers.sub",
            ),
            (
                "protected_prefixes = [\"\"]",
                "identity.protected_prefixes[0]",
            ),
            (
                "protected_prefixes = [\"X-WX-\", \"Content-\"]",
                "identity.protected_prefixes[1]",
            ),
            (
                "protected_prefixes = [\"X WX\"]",
                "identity.protected_prefixes[0]",
            ),
        ];
        for (line, key) in cases {
            let text = format!("[identity]\n{line}\n{MINIMAL}");
            assert_eq!(keys(&problems(&text)), [key], "{line}");
        }
    }

    #[test]
    fn every_reserved_claim_is_refused_as_a_claim_header() {
        for claim in crate::token::RESERVED_CLAIMS {
            let text = format!("[identity]\nclaim_headers = {{ {claim} = \"X-C\" }}\n{MINIMAL}");
            let problems = problems(&text);
            let key = format!("identity.claim_headers.{claim}");
            assert!(
                about(&problems, &key).contains("a claim the gateway sets itself"),
                "{problems:#?}"
            );
        }
    }

    #[test]
    fn store_backends_are_checked() {
        let memory = parse(&format!("[store]\nbackend = \"memory\"\n{MINIMAL}"));
        assert_eq!(memory.unwrap().store, StoreConfig::Memory);
        let relative = parse(&format!("[store]\npath = \"data/gw.redb\"\n{MINIMAL}")).unwrap();
        assert_eq!(
            relative.store,
            StoreConfig::Embedded {
                path: "/etc/wxgate/data/gw.redb".into()
            }
        );
        let redis = parse(&format!(
            "[store]\nbackend = \"redis\"\nurl = \"rediss://h:1/0\"\n{MINIMAL}"
        ));
        assert_eq!(
            redis.unwrap().store,
            StoreConfig::Redis {
                url: Secret::new("rediss://h:1/0"),
                key_prefix: "wxgate:".into()
            }
        );
        let cases = [
            ("backend = \"Redis\"", "store.backend"),
            ("backend = \"redis\"", "store.url"),
            ("backend = \"redis\"\nurl = \"http://h\"", "store.url"),
            ("backend = \"memory\"\nurl = \"redis://x\"", "store.url"),
            (
                "path = \"gw.redb\"\nkey_prefix = \"gw:\"",
                "store.key_prefix",
            ),
            (
                "backend = \"redis\"\nurl = \"redis://x\"\npath = \"gw.redb\"",
                "store.path",
            ),
        ];
        for (lines, key) in cases {
            let text = format!("[store]\n{lines}\n{MINIMAL}");
            assert_eq!(keys(&problems(&text)), [key], "{lines}");
        }
    }

    #[test]
    fn login_hook_is_optional_but_complete_when_present() {
        let config = parse(&format!(
            "[login_hook]\nurl = \"https://api.example.com/hook\"\n{MINIMAL}"
        ))
        .unwrap();
        let hook = config.login_hook.unwrap();
        assert_eq!(hook.timeout, Duration::from_secs(3));
        let problems = problems(&format!("[login_hook]\nurl = \"/hook\"\n{MINIMAL}"));
        assert_eq!(keys(&problems), ["login_hook.url"]);
    }

    #[test]
    fn routes_are_validated() {
        let route = |lines: &str| format!("{MINIMAL}\n[[routes]]\n{lines}\n",);
        let cases = [
            (
                "path = \"/x/\"\nupstream = \"https://127.0.0.1\"\nauth = \"public\"",
                "routes[1].upstream",
                "https upstreams are not supported yet",
            ),
            (
                "path = \"/x/\"\nupstream = \"127.0.0.1:3000\"\nauth = \"public\"",
                "routes[1].upstream",
                "absolute http:// URL",
            ),
            (
                "path = \"/x/\"\nupstream = \"http://u:p@127.0.0.1\"\nauth = \"public\"",
                "routes[1].upstream",
                "credentials",
            ),
            (
                "path = \"/x/\"\nupstream = \"http://h/?a=b\"\nauth = \"public\"",
                "routes[1].upstream",
                "query",
            ),
            (
                "path = \"/x/\"\nauth = \"public\"",
                "routes[1].upstream",
                "is required",
            ),
            (
                "path = \"x/\"\nupstream = \"http://h\"\nauth = \"public\"",
                "routes[1].path",
                "starting with `/`",
            ),
            (
                "path = \"/a/../b\"\nupstream = \"http://h\"\nauth = \"public\"",
                "routes[1].path",
                "segments",
            ),
            (
                "upstream = \"http://h\"\nauth = \"public\"",
                "routes[1].path",
                "is required",
            ),
            (
                "path = \"/api\"\nupstream = \"http://h\"\nauth = \"public\"",
                "routes[1].path",
                "same path as routes[0]",
            ),
            (
                "path = \"/x/\"\nupstream = \"http://h\"",
                "routes[1].auth",
                "is required",
            ),
            (
                "path = \"/x/\"\nupstream = \"http://h\"\nauth = \"Public\"",
                "routes[1].auth",
                "must be one of",
            ),
            (
                "path = \"/x/\"\nupstream = \"http://h\"\nauth = \"public\"\napps = [\"wx0000000000000a01\"]",
                "routes[1].apps",
                "public route",
            ),
            (
                "path = \"/x/\"\nupstream = \"http://h\"\nauth = \"required\"\napps = []",
                "routes[1].apps",
                "at least one",
            ),
            (
                "path = \"/x/\"\nupstream = \"http://h\"\nauth = \"required\"\napps = [\"wx0000000000000a01\", \"wxnope\"]",
                "routes[1].apps[1]",
                "not the appid",
            ),
            (
                "path = \"/x/\"\nupstream = \"http://h\"\nauth = \"public\"\nmethods = [\"GET\", \"GE T\"]",
                "routes[1].methods[1]",
                "not an HTTP method",
            ),
            (
                "path = \"/x/\"\nupstream = \"http://h\"\nauth = \"public\"\nmethods = []",
                "routes[1].methods",
                "at least one",
            ),
            (
                "path = \"/x/\"\nupstream = \"http://h\"\nauth = \"public\"\ntimeout = \"0ms\"",
                "routes[1].timeout",
                "longer than zero",
            ),
            (
                "path = \"/auth/callback/\"\nupstream = \"http://h\"\nauth = \"public\"",
                "routes[1].path",
                "never be reached",
            ),
            (
                "path = \"/auth\"\nupstream = \"http://h\"\nauth = \"public\"",
                "routes[1].path",
                "never be reached",
            ),
            (
                "path = \"/.well-known/jwks.json\"\nupstream = \"http://h\"\nauth = \"public\"",
                "routes[1].path",
                "never be reached",
            ),
        ];
        for (lines, key, fragment) in cases {
            let problems = problems(&route(lines));
            assert_eq!(keys(&problems), [key], "{lines}");
            assert!(
                problems[0].message.contains(fragment),
                "{lines}: {problems:?}"
            );
        }
        let none = MINIMAL.split("[[routes]]").next().unwrap();
        assert_eq!(keys(&problems(none)), ["routes"]);

        // A route beside the gateway's endpoints, or one that merely contains them, is fine.
        for path in ["/authx/", "/.well-known/"] {
            let text = route(&format!(
                "path = \"{path}\"\nupstream = \"http://h\"\nauth = \"public\""
            ));
            assert!(parse(&text).is_ok(), "{path}");
        }

        let fine = route(
            "path = \"/\"\nupstream = \"http://h:81\"\nauth = \"optional\"\nmethods = [\"get\", \"GET\", \"PURGE\"]",
        );
        let config = parse(&fine).unwrap();
        assert_eq!(config.routes[1].path, "/");
        assert_eq!(
            config.routes[1].methods,
            Some(vec![Method::GET, Method::from_bytes(b"PURGE").unwrap()])
        );
    }

    #[test]
    fn route_table_lists_routes_sorted_by_path() {
        let text = format!(
            "{MINIMAL}
[[routes]]
path = \"/api/public/\"
upstream = \"http://127.0.0.1:3001\"
auth = \"public\"
methods = [\"GET\", \"HEAD\"]
strip_prefix = true
timeout = \"1m 30s\"
"
        )
        .replace(
            "auth = \"required\"",
            "auth = \"required\"\napps = [\"wx0000000000000a01\"]",
        );
        let table = parse(&text).unwrap().route_table();
        let rows: Vec<Vec<&str>> = table
            .lines()
            .map(|line| line.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                vec![
                    "PATH",
                    "AUTH",
                    "METHODS",
                    "APPS",
                    "UPSTREAM",
                    "STRIP_PREFIX",
                    "TIMEOUT"
                ],
                vec![
                    "/api/",
                    "required",
                    "*",
                    "wx0000000000000a01",
                    "http://127.0.0.1:3000/",
                    "false",
                    "30s"
                ],
                vec![
                    "/api/public/",
                    "public",
                    "GET,HEAD",
                    "*",
                    "http://127.0.0.1:3001/",
                    "true",
                    "1m",
                    "30s"
                ],
            ]
        );
        // Columns line up: every cell of a column starts at the same offset.
        let lines: Vec<&str> = table.lines().collect();
        let auth_column = lines[0].find("AUTH").unwrap();
        assert!(lines[1][auth_column..].starts_with("required"));
        assert!(lines[2][auth_column..].starts_with("public"));
        let timeout_column = lines[0].find("TIMEOUT").unwrap();
        assert!(lines[2][timeout_column..].starts_with("1m 30s"));
    }

    #[test]
    fn load_reads_the_file_and_names_a_missing_one() {
        let dir = TempDir::new("load");
        let path = dir.write("config.toml", MINIMAL);
        let config = Config::load(&path).unwrap();
        assert_eq!(config.path, path);
        assert_eq!(
            config.store,
            StoreConfig::Embedded {
                path: dir.0.join("wxgate.redb")
            }
        );
        let missing = dir.0.join("missing.toml");
        let problems = Config::load(&missing).unwrap_err().problems;
        assert_eq!(keys(&problems), [""]);
        assert!(problems[0].message.contains("missing.toml"));
    }

    #[test]
    fn the_example_config_toml_parses() {
        let text = include_str!("../config.toml");
        let config = Config::parse(text, Path::new("/etc/wxgate/config.toml"), &env)
            .unwrap_or_else(|err| panic!("config.toml:\n{err}"));
        assert_eq!(config.wechat.apps[0].secret.expose(), "app-secret-from-env");
        assert_eq!(config.token.secret.as_ref().unwrap().expose(), JWT_SECRET);
        assert_eq!(
            config.store,
            StoreConfig::Embedded {
                path: "/etc/wxgate/wxgate.redb".into()
            }
        );
        assert_eq!(config.routes.len(), 2);

        // With its commented-out keys switched on (and the secrets, keys and algorithm they
        // stand in for switched off), the example is still a valid file: no key in it is
        // unknown to the parser.
        let dir = TempDir::new("example");
        let app_secret = dir.write("wx_app_secret", "secret-from-file\n");
        let current = es256_key();
        let previous = es256_key();
        dir.write("keys/current.pem", &current);
        dir.write("keys/previous.pem", &previous);
        let uncommented = text
            .lines()
            .map(|line| {
                line.strip_prefix("# ")
                    .filter(|rest| {
                        rest.starts_with('[')
                            || rest.split_once(" = ").is_some_and(|(key, _)| {
                                key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                            })
                    })
                    .unwrap_or(line)
            })
            .collect::<Vec<_>>()
            .join("\n")
            .replace("secret = \"${WX_APP_SECRET}\"", "")
            .replace(
                "/run/secrets/wx_app_secret",
                &app_secret.display().to_string(),
            )
            .replace("secret = \"${WXGATE_JWT_SECRET}\"", "")
            .replace("algorithm = \"HS256\"", "algorithm = \"ES256\"")
            // The redis keys apply only with the redis backend, which is the one to try them on.
            .replace("backend = \"embedded\"", "backend = \"redis\"")
            .replace("path = \"wxgate.redb\"", "");
        let config = Config::parse(&uncommented, &dir.0.join("config.toml"), &env)
            .unwrap_or_else(|err| panic!("config.toml uncommented:\n{err}"));
        assert_eq!(config.wechat.apps[0].secret.expose(), "secret-from-file");
        assert_eq!(config.token.signing_key.unwrap().pem.expose(), current);
        assert_eq!(config.token.verify_keys[0].pem.expose(), previous);
        assert_eq!(config.identity.claim_headers[0].0, "uid");
        let hook = config.login_hook.unwrap();
        assert_eq!(hook.url, "http://127.0.0.1:3000/internal/wechat-login");
        assert_eq!(hook.timeout, Duration::from_secs(3));
        assert_eq!(
            config.routes[0].methods,
            Some(vec![Method::GET, Method::POST])
        );
    }
}
