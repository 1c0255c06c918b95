//! The mock WeChat API (SPEC §8): code2Session, the stable access token and phone numbers on
//! loopback, answering like the real one (`text/plain` JSON, single-use codes, errcodes picked
//! by the code), plus `/mock/encrypt` so a front end can test open data without a phone, and
//! `/mock/expire_token` to play an access token reaching its end.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::config::Secret;
use crate::wechat::crypto::{encrypt_open_data, sign_raw_data};

/// How long the `slow` code makes the mock wait: longer than any sane client timeout.
const SLOW_ANSWER: Duration = Duration::from_secs(30);

/// Request bodies larger than this are refused.
const MAX_BODY: usize = 1 << 20;

/// Lifetime of the access tokens the mock hands out, like WeChat's.
const ACCESS_TOKEN_TTL_SECS: u64 = 7200;

#[derive(Default)]
pub struct MockWechat {
    code2session_calls: AtomicU64,
    stable_token_calls: AtomicU64,
    forced_refreshes: AtomicU64,
    phone_calls: AtomicU64,
    /// The `expires_in` of the access tokens handed out.
    access_token_ttl_secs: AtomicU64,
    /// True while stable-token answers are held back (see [`MockWechat::hold_stable_tokens`]).
    stable_tokens_held: tokio::sync::watch::Sender<bool>,
    state: Mutex<MockState>,
}

#[derive(Default)]
struct MockState {
    /// (appid, code) pairs already exchanged.
    used_codes: HashSet<(String, String)>,
    /// `flaky` codes that already answered -1 once.
    flaked: HashSet<(String, String)>,
    /// openid → (appid, user), for `/mock/encrypt`.
    users: HashMap<String, (String, String)>,
    /// (appid, user) → a session_key set by [`MockWechat::pin_session_key`].
    pinned: HashMap<(String, String), String>,
    /// appid → its live access token.
    access_tokens: HashMap<String, String>,
    /// Access tokens that reached their end: calls with them get 42001.
    expired_tokens: HashSet<String>,
    /// (appid, phone code) pairs already used.
    used_phone_codes: HashSet<(String, String)>,
}

impl MockWechat {
    pub fn new() -> Arc<MockWechat> {
        Arc::new(MockWechat {
            access_token_ttl_secs: AtomicU64::new(ACCESS_TOKEN_TTL_SECS),
            ..MockWechat::default()
        })
    }

    /// Serves the mock API on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        super::serve(listener, move |request| {
            let mock = self.clone();
            async move { mock.answer(request).await }
        })
        .await;
    }

    /// Requests to code2Session so far, answered or not.
    pub fn code2session_calls(&self) -> u64 {
        self.code2session_calls.load(Ordering::SeqCst)
    }

    /// Requests to the stable-token API so far.
    pub fn stable_token_calls(&self) -> u64 {
        self.stable_token_calls.load(Ordering::SeqCst)
    }

    /// Stable-token requests that asked for `force_refresh`.
    pub fn forced_refreshes(&self) -> u64 {
        self.forced_refreshes.load(Ordering::SeqCst)
    }

    /// Requests to `getuserphonenumber` so far.
    pub fn phone_calls(&self) -> u64 {
        self.phone_calls.load(Ordering::SeqCst)
    }

    /// Kills `appid`'s access token, as another server forcing a refresh would: calls with
    /// it get 40001, and the next stable-token request gets a new one.
    pub fn kill_access_token(&self, appid: &str) {
        self.lock().access_tokens.remove(appid);
    }

    /// Ends `appid`'s access token as time would: calls with it get 42001, and the next
    /// stable-token request gets a new one. What `POST /mock/expire_token {appid}` does.
    pub fn expire_access_token(&self, appid: &str) {
        let mut state = self.lock();
        if let Some(token) = state.access_tokens.remove(appid) {
            state.expired_tokens.insert(token);
        }
    }

    /// `appid`'s live access token, if one was handed out.
    pub fn access_token(&self, appid: &str) -> Option<String> {
        self.lock().access_tokens.get(appid).cloned()
    }

    /// The `expires_in` of access tokens handed out from now on (7200 unless set).
    pub fn set_access_token_ttl(&self, secs: u64) {
        self.access_token_ttl_secs.store(secs, Ordering::SeqCst);
    }

    /// Holds back every stable-token answer until [`MockWechat::release_stable_tokens`]:
    /// requests are counted as they arrive, then wait.
    pub fn hold_stable_tokens(&self) {
        self.stable_tokens_held.send_replace(true);
    }

    pub fn release_stable_tokens(&self) {
        self.stable_tokens_held.send_replace(false);
    }

    /// The phone number a `getPhoneNumber` code's user has: a mainland number derived from
    /// the user, so tests can predict it.
    pub fn phone_for(code: &str) -> String {
        let digest = Sha256::digest(format!("phone\0{}", user_of(code)));
        let digits: String = digest[..8]
            .iter()
            .map(|byte| char::from(b'0' + byte % 10))
            .collect();
        format!("138{digits}")
    }

    /// The openid a code's user has under `appid`.
    pub fn openid_for(appid: &str, code: &str) -> String {
        let user = user_of(code);
        let digest = Sha256::digest(format!("openid\0{appid}\0{user}"));
        format!("o{}", &URL_SAFE_NO_PAD.encode(digest)[..27])
    }

    /// The unionid of a code's user (the same in every app), or none for `nounion…` users.
    pub fn unionid_for(code: &str) -> Option<String> {
        let user = user_of(code);
        if user.starts_with("nounion") {
            return None;
        }
        let digest = Sha256::digest(format!("unionid\0{user}"));
        Some(format!("u{}", &URL_SAFE_NO_PAD.encode(digest)[..27]))
    }

    /// The session_key a code's user has under `appid`, unless pinned.
    pub fn session_key_for(appid: &str, code: &str) -> Secret {
        let digest = Sha256::digest(format!("session_key\0{appid}\0{}", user_of(code)));
        Secret::new(STANDARD.encode(&digest[..16]))
    }

    /// Gives `user` of `appid` this session_key from now on: to match data sealed elsewhere
    /// (WeChat's published samples), or to play WeChat rotating a user's key.
    pub fn pin_session_key(&self, appid: &str, user: &str, session_key: &str) {
        self.lock().pinned.insert(
            (appid.to_string(), user.to_string()),
            session_key.to_string(),
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MockState> {
        self.state.lock().expect("mock state lock poisoned")
    }

    fn current_session_key(&self, appid: &str, user: &str) -> Secret {
        match self
            .lock()
            .pinned
            .get(&(appid.to_string(), user.to_string()))
        {
            Some(pinned) => Secret::new(pinned.clone()),
            None => Self::session_key_for(appid, user),
        }
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/sns/jscode2session") => {
                self.code2session_calls.fetch_add(1, Ordering::SeqCst);
                let query = request.uri().query().unwrap_or("");
                self.code2session(query).await
            }
            (&Method::POST, "/cgi-bin/stable_token") => {
                self.stable_token_calls.fetch_add(1, Ordering::SeqCst);
                self.stable_token(request).await
            }
            (&Method::POST, "/wxa/business/getuserphonenumber") => {
                self.phone_calls.fetch_add(1, Ordering::SeqCst);
                let query = request.uri().query().unwrap_or("").to_string();
                self.phone_number(&query, request).await
            }
            (&Method::POST, "/mock/encrypt") => self.encrypt(request).await,
            (&Method::POST, "/mock/sign") => self.sign(request).await,
            (&Method::POST, "/mock/expire_token") => self.expire_token(request).await,
            (_, "/sns/jscode2session") => {
                self.code2session_calls.fetch_add(1, Ordering::SeqCst);
                text(StatusCode::OK, &errcode(43001, "require GET method"))
            }
            (
                _,
                "/cgi-bin/stable_token"
                | "/wxa/business/getuserphonenumber"
                | "/mock/encrypt"
                | "/mock/sign"
                | "/mock/expire_token",
            ) => text(StatusCode::OK, &errcode(43002, "require POST method")),
            // WeChat's answer to a path it does not serve: a misconfigured host shows up as
            // a WeChat errcode, not as a network failure.
            _ => text(StatusCode::OK, &errcode(40066, "invalid url")),
        }
    }

    async fn code2session(&self, query: &str) -> Response<Full<Bytes>> {
        let params: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let param = |name: &str| params.get(name).filter(|value| !value.is_empty());
        let (Some(appid), Some(_secret), Some(code)) =
            (param("appid"), param("secret"), param("js_code"))
        else {
            return text(
                StatusCode::OK,
                &errcode(41008, "missing appid, secret or js_code"),
            );
        };
        if param("grant_type").map(String::as_str) != Some("authorization_code") {
            return text(StatusCode::OK, &errcode(40002, "invalid grant_type"));
        }
        let key = (appid.clone(), code.clone());
        match code.as_str() {
            "invalid" => return text(StatusCode::OK, &errcode(40029, "invalid code")),
            "risky" => return text(StatusCode::OK, &errcode(40226, "high risk user")),
            "limited" => {
                return text(
                    StatusCode::OK,
                    &errcode(45011, "api minute-quota reach limit"),
                );
            }
            // -1 leaves the code unused, as WeChat's does.
            "busy" => return text(StatusCode::OK, &errcode(-1, "system error")),
            "flaky" if self.lock().flaked.insert(key.clone()) => {
                return text(StatusCode::OK, &errcode(-1, "system error"));
            }
            "garbage" => return text(StatusCode::OK, "<html>502 Bad Gateway</html>"),
            "slow" => tokio::time::sleep(SLOW_ANSWER).await,
            _ => {}
        }
        if !self.lock().used_codes.insert(key) {
            return text(StatusCode::OK, &errcode(40163, "code been used"));
        }
        let user = user_of(code).to_string();
        let openid = Self::openid_for(appid, &user);
        let session_key = self.current_session_key(appid, &user);
        self.lock()
            .users
            .insert(openid.clone(), (appid.clone(), user.clone()));
        let mut answer = json!({ "openid": openid, "session_key": session_key.expose() });
        if let Some(unionid) = Self::unionid_for(&user) {
            answer["unionid"] = unionid.into();
        }
        text(StatusCode::OK, &answer.to_string())
    }

    async fn stable_token(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        #[derive(Deserialize)]
        struct StableTokenRequest {
            grant_type: String,
            appid: String,
            secret: String,
            #[serde(default)]
            force_refresh: bool,
        }
        let Some(request) = read_json::<StableTokenRequest>(request).await else {
            return text(StatusCode::OK, &errcode(47001, "data format error"));
        };
        if request.grant_type != "client_credential" || request.secret.is_empty() {
            return text(
                StatusCode::OK,
                &errcode(40002, "invalid grant_type or secret"),
            );
        }
        if request.force_refresh {
            self.forced_refreshes.fetch_add(1, Ordering::SeqCst);
        }
        // Never fails: the sender lives as long as the mock.
        let _ = self
            .stable_tokens_held
            .subscribe()
            .wait_for(|held| !held)
            .await;
        let mut state = self.lock();
        if request.force_refresh {
            state.access_tokens.remove(&request.appid);
        }
        let token = state
            .access_tokens
            .entry(request.appid)
            .or_insert_with(|| {
                let mut raw = [0u8; 24];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
                URL_SAFE_NO_PAD.encode(raw)
            })
            .clone();
        text(
            StatusCode::OK,
            &json!({
                "access_token": token,
                "expires_in": self.access_token_ttl_secs.load(Ordering::SeqCst),
            })
            .to_string(),
        )
    }

    async fn phone_number(&self, query: &str, request: Request<Incoming>) -> Response<Full<Bytes>> {
        #[derive(Deserialize)]
        struct PhoneRequest {
            code: String,
        }
        let params: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        // The code is single-use and secret: in a URL it would reach access logs. A client
        // that puts it there fails against the mock rather than only in production.
        if params.contains_key("code") {
            return text(
                StatusCode::OK,
                &errcode(47001, "data format error: code belongs in the JSON body"),
            );
        }
        let token = params.get("access_token").cloned().unwrap_or_default();
        let (appid, expired) = {
            let state = self.lock();
            let appid = state
                .access_tokens
                .iter()
                .find(|(_, live)| **live == token)
                .map(|(appid, _)| appid.clone());
            (appid, state.expired_tokens.contains(&token))
        };
        if expired {
            return text(StatusCode::OK, &errcode(42001, "access_token expired"));
        }
        let Some(appid) = appid else {
            return text(
                StatusCode::OK,
                &errcode(
                    40001,
                    "invalid credential, access_token is invalid or not latest",
                ),
            );
        };
        let Some(PhoneRequest { code }) = read_json::<PhoneRequest>(request).await else {
            return text(StatusCode::OK, &errcode(47001, "data format error"));
        };
        match code.as_str() {
            "invalid" => return text(StatusCode::OK, &errcode(40029, "invalid code")),
            "busy" => return text(StatusCode::OK, &errcode(-1, "system error")),
            _ => {}
        }
        if !self
            .lock()
            .used_phone_codes
            .insert((appid.clone(), code.clone()))
        {
            return text(StatusCode::OK, &errcode(40029, "invalid code"));
        }
        let number = Self::phone_for(&code);
        let answer = json!({
            "errcode": 0,
            "errmsg": "ok",
            "phone_info": {
                "phoneNumber": number,
                "purePhoneNumber": number,
                "countryCode": "86",
                "watermark": { "appid": appid, "timestamp": crate::token::unix_now() },
            },
        });
        text(StatusCode::OK, &answer.to_string())
    }

    async fn encrypt(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        #[derive(Deserialize)]
        struct EncryptRequest {
            appid: String,
            openid: String,
            data: serde_json::Map<String, Value>,
        }
        let Some(request) = read_json::<EncryptRequest>(request).await else {
            return text(
                StatusCode::BAD_REQUEST,
                &errcode(47001, "body must be {appid, openid, data: {...}}"),
            );
        };
        let Some(session_key) = self.users_session_key(&request.appid, &request.openid) else {
            return unknown_user();
        };
        let mut data = request.data;
        data.insert(
            "watermark".into(),
            json!({ "appid": request.appid, "timestamp": crate::token::unix_now() }),
        );
        let plaintext = Value::Object(data).to_string();
        match encrypt_open_data(&session_key, plaintext.as_bytes()) {
            Ok((encrypted_data, iv)) => text(
                StatusCode::OK,
                &json!({ "encryptedData": encrypted_data, "iv": iv }).to_string(),
            ),
            Err(_) => text(
                StatusCode::BAD_REQUEST,
                &errcode(-1, "pinned session_key is not 16 bytes of base64"),
            ),
        }
    }

    /// `rawData`'s signature as WeChat gives it with user info: what a front end sends at login
    /// beside the data, for testing the check without a phone.
    async fn sign(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        #[derive(Deserialize)]
        struct SignRequest {
            appid: String,
            openid: String,
            #[serde(rename = "rawData")]
            raw_data: String,
        }
        let Some(request) = read_json::<SignRequest>(request).await else {
            return text(
                StatusCode::BAD_REQUEST,
                &errcode(47001, "body must be {appid, openid, rawData}"),
            );
        };
        let Some(session_key) = self.users_session_key(&request.appid, &request.openid) else {
            return unknown_user();
        };
        let signature = sign_raw_data(&request.raw_data, &session_key);
        text(
            StatusCode::OK,
            &json!({ "signature": signature }).to_string(),
        )
    }

    /// The session_key of a user the mock has seen log in to `appid`.
    fn users_session_key(&self, appid: &str, openid: &str) -> Option<Secret> {
        let user = match self.lock().users.get(openid) {
            Some((known_appid, user)) if known_appid == appid => user.clone(),
            _ => return None,
        };
        Some(self.current_session_key(appid, &user))
    }

    async fn expire_token(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        #[derive(Deserialize)]
        struct ExpireRequest {
            appid: String,
        }
        let Some(ExpireRequest { appid }) = read_json::<ExpireRequest>(request).await else {
            return text(
                StatusCode::BAD_REQUEST,
                &errcode(47001, "body must be {appid}"),
            );
        };
        self.expire_access_token(&appid);
        text(StatusCode::OK, &errcode(0, "ok"))
    }
}

/// `wxgate mock-wechat`: the mock alone on `listen`.
pub async fn run_standalone(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|err| anyhow::anyhow!("cannot listen on {listen}: {err}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "mock WeChat listening");
    println!("mock WeChat on http://{addr}: point wechat.hosts at it");
    tokio::select! {
        () = MockWechat::new().serve(listener) => {}
        () = crate::server::shutdown_signal() => {}
    }
    Ok(())
}

async fn read_json<T: serde::de::DeserializeOwned>(request: Request<Incoming>) -> Option<T> {
    let body = Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .ok()?;
    serde_json::from_slice(&body.to_bytes()).ok()
}

/// The answer to `/mock/encrypt` or `/mock/sign` for an openid that never logged in.
fn unknown_user() -> Response<Full<Bytes>> {
    text(
        StatusCode::BAD_REQUEST,
        &errcode(40003, "unknown openid for this appid: log it in first"),
    )
}

/// The user a code stands for: the code less a trailing `-<digits>`, so that `alice`,
/// `alice-2` and `alice-3` are one user logging in three times.
fn user_of(code: &str) -> &str {
    match code.rsplit_once('-') {
        Some((user, suffix))
            if !user.is_empty()
                && !suffix.is_empty()
                && suffix.bytes().all(|b| b.is_ascii_digit()) =>
        {
            user
        }
        _ => code,
    }
}

fn errcode(errcode: i64, errmsg: &str) -> String {
    json!({ "errcode": errcode, "errmsg": errmsg }).to_string()
}

/// WeChat answers JSON as `text/plain`; so does the mock, so clients are tested against that.
fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wechat::crypto::{decrypt_open_data, signature_matches};

    const APPID: &str = "wx00000000000000a1";
    const OTHER_APPID: &str = "wx00000000000000b2";

    struct Running {
        mock: Arc<MockWechat>,
        base: String,
        http: reqwest::Client,
    }

    struct Answer {
        status: StatusCode,
        content_type: String,
        body: String,
    }

    impl Answer {
        fn json(&self) -> Value {
            serde_json::from_str(&self.body).unwrap_or_else(|err| panic!("{err}: {}", self.body))
        }
    }

    async fn start() -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let mock = MockWechat::new();
        tokio::spawn(mock.clone().serve(listener));
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Running { mock, base, http }
    }

    impl Running {
        async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
            let response = request.send().await.unwrap();
            let status = response.status();
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let body = response.text().await.unwrap();
            Answer {
                status,
                content_type,
                body,
            }
        }

        async fn get(&self, path_and_query: &str) -> Answer {
            self.send(self.http.get(format!("{}{path_and_query}", self.base)))
                .await
        }

        async fn login(&self, appid: &str, code: &str) -> Value {
            let answer = self
                .get(&format!(
                    "/sns/jscode2session?appid={appid}&secret=s&js_code={code}&grant_type=authorization_code"
                ))
                .await;
            assert_eq!(answer.status, StatusCode::OK);
            answer.json()
        }

        async fn post(&self, path_and_query: &str, body: Value) -> Value {
            let answer = self
                .send(
                    self.http
                        .post(format!("{}{path_and_query}", self.base))
                        .body(body.to_string()),
                )
                .await;
            assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
            answer.json()
        }

        async fn stable_token(&self, appid: &str) -> Value {
            self.post(
                "/cgi-bin/stable_token",
                json!({"grant_type": "client_credential", "appid": appid, "secret": "s",
                       "force_refresh": false}),
            )
            .await
        }

        async fn phone(&self, token: &Value, code: &str) -> Value {
            let token = token["access_token"].as_str().unwrap();
            self.post(
                &format!("/wxa/business/getuserphonenumber?access_token={token}"),
                json!({ "code": code }),
            )
            .await
        }

        async fn encrypt(&self, body: Value) -> Answer {
            self.send(
                self.http
                    .post(format!("{}/mock/encrypt", self.base))
                    .body(body.to_string()),
            )
            .await
        }
    }

    #[tokio::test]
    async fn a_code_works_once_then_answers_40163() {
        let wechat = start().await;
        let first = wechat.login(APPID, "alice").await;
        assert_eq!(first["openid"], MockWechat::openid_for(APPID, "alice"));
        let again = wechat.login(APPID, "alice").await;
        assert_eq!(again["errcode"], 40163);
        assert_eq!(again["errmsg"], "code been used");
        // Codes are an app's own: the same code string for another app is another code.
        let other = wechat.login(OTHER_APPID, "alice").await;
        assert_eq!(
            other["openid"],
            MockWechat::openid_for(OTHER_APPID, "alice")
        );
        assert_eq!(wechat.mock.code2session_calls(), 3);
    }

    #[tokio::test]
    async fn codes_pick_users_deterministically() {
        let wechat = start().await;
        let first = wechat.login(APPID, "bob").await;
        let second = wechat.login(APPID, "bob-2").await;
        let third = wechat.login(APPID, "bob-17").await;
        assert_eq!(first, second);
        assert_eq!(first, third);
        assert_eq!(
            first["session_key"],
            MockWechat::session_key_for(APPID, "bob").expose()
        );
        assert_eq!(first["unionid"], MockWechat::unionid_for("bob").unwrap());

        let openid = first["openid"].as_str().unwrap();
        assert_eq!(openid.len(), 28);
        assert!(openid.starts_with('o'));
        assert!(
            openid[1..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{openid}"
        );
        let key = STANDARD
            .decode(first["session_key"].as_str().unwrap())
            .unwrap();
        assert_eq!(key.len(), 16);

        // Another app: another openid and session_key, the same unionid.
        let elsewhere = wechat.login(OTHER_APPID, "bob-3").await;
        assert_ne!(elsewhere["openid"], first["openid"]);
        assert_ne!(elsewhere["session_key"], first["session_key"]);
        assert_eq!(elsewhere["unionid"], first["unionid"]);

        // Another user; a suffix that is not `-<digits>` is part of the name.
        for code in ["carol", "bob-x", "bob-", "-2"] {
            let answer = wechat.login(APPID, code).await;
            assert_ne!(answer["openid"], first["openid"], "{code}");
        }
        let nounion = wechat.login(APPID, "nounion-dan").await;
        assert!(nounion.get("unionid").is_none(), "{nounion}");
        assert_eq!(MockWechat::unionid_for("nounion-dan"), None);
    }

    #[tokio::test]
    async fn special_codes_answer_their_errcodes() {
        let wechat = start().await;
        for (code, expected) in [
            ("invalid", 40029),
            ("risky", 40226),
            ("limited", 45011),
            ("busy", -1),
            ("busy", -1),
        ] {
            let answer = wechat.login(APPID, code).await;
            assert_eq!(answer["errcode"], expected, "{code}");
            assert!(answer["errmsg"].as_str().is_some_and(|m| !m.is_empty()));
        }
        let flaky = wechat.login(APPID, "flaky").await;
        assert_eq!(flaky["errcode"], -1);
        let flaky = wechat.login(APPID, "flaky").await;
        assert_eq!(flaky["openid"], MockWechat::openid_for(APPID, "flaky"));

        let garbage = wechat
            .get("/sns/jscode2session?appid=wx1&secret=s&js_code=garbage&grant_type=authorization_code")
            .await;
        assert_eq!(garbage.status, StatusCode::OK);
        assert!(serde_json::from_str::<Value>(&garbage.body).is_err());
        assert_eq!(wechat.mock.code2session_calls(), 8);
    }

    #[tokio::test]
    async fn bad_requests_get_errcodes_not_panics() {
        let wechat = start().await;
        let cases = [
            ("/sns/jscode2session", 41008),
            (
                "/sns/jscode2session?appid=wx1&js_code=c&grant_type=authorization_code",
                41008,
            ),
            ("/sns/jscode2session?appid=wx1&secret=s&js_code=", 41008),
            ("/sns/jscode2session?appid=wx1&secret=s&js_code=c", 40002),
            (
                "/sns/jscode2session?appid=%FF&secret=%&js_code=%E4&grant_type=authorization_code",
                0,
            ),
            ("/cgi-bin/stable_token", 43002),
            ("/nope", 40066),
        ];
        for (path, expected) in cases {
            let answer = wechat.get(path).await;
            assert_eq!(answer.status, StatusCode::OK, "{path}");
            let body = answer.json();
            assert_eq!(
                body["errcode"].as_i64().unwrap_or(0),
                expected,
                "{path}: {body}"
            );
        }
        let post = wechat
            .send(
                wechat
                    .http
                    .post(format!("{}/sns/jscode2session", wechat.base)),
            )
            .await;
        assert_eq!(post.json()["errcode"], 43001);
        let stable = wechat
            .send(
                wechat
                    .http
                    .post(format!("{}/cgi-bin/stable_token", wechat.base))
                    .body("{not json"),
            )
            .await;
        assert_eq!(stable.json()["errcode"], 47001);
        assert_eq!(wechat.mock.code2session_calls(), 6);
    }

    #[tokio::test]
    async fn every_answer_is_json_as_text_plain() {
        let wechat = start().await;
        let answers = [
            wechat.get("/sns/jscode2session?appid=wx1&secret=s&js_code=erin&grant_type=authorization_code").await,
            wechat.get("/sns/jscode2session?appid=wx1&secret=s&js_code=invalid&grant_type=authorization_code").await,
            wechat.get("/nope").await,
            wechat.encrypt(json!({"appid": APPID, "openid": "o-unknown", "data": {}})).await,
        ];
        for answer in answers {
            assert_eq!(answer.content_type, "text/plain", "{}", answer.body);
            assert!(answer.json().is_object());
        }
    }

    #[tokio::test]
    async fn encrypted_data_opens_with_the_users_session_key() {
        let wechat = start().await;
        let user = wechat.login(APPID, "fay-1").await;
        let openid = user["openid"].as_str().unwrap();
        let answer = wechat
            .encrypt(json!({
                "appid": APPID,
                "openid": openid,
                "data": {"nickName": "Fay", "gender": 2},
            }))
            .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        let sealed = answer.json();
        let opened = decrypt_open_data(
            &MockWechat::session_key_for(APPID, "fay"),
            sealed["encryptedData"].as_str().unwrap(),
            sealed["iv"].as_str().unwrap(),
            APPID,
        )
        .unwrap();
        assert_eq!(
            Value::Object(opened),
            json!({"nickName": "Fay", "gender": 2})
        );
        // The watermark names the app the openid belongs to.
        let foreign = decrypt_open_data(
            &MockWechat::session_key_for(APPID, "fay"),
            sealed["encryptedData"].as_str().unwrap(),
            sealed["iv"].as_str().unwrap(),
            OTHER_APPID,
        );
        assert_eq!(
            foreign,
            Err(crate::wechat::crypto::OpenDataError::ForeignWatermark)
        );
    }

    #[tokio::test]
    async fn a_phone_code_in_the_query_is_refused() {
        let wechat = start().await;
        let token = wechat.stable_token(APPID).await;
        let access_token = token["access_token"].as_str().unwrap();
        let in_query = wechat
            .post(
                &format!(
                    "/wxa/business/getuserphonenumber?access_token={access_token}&code=hank-1"
                ),
                json!({ "code": "hank-1" }),
            )
            .await;
        assert_eq!(in_query["errcode"], 47001, "{in_query}");
        // The code was not used: in the body, it works.
        let in_body = wechat.phone(&token, "hank-1").await;
        assert_eq!(
            in_body["phone_info"]["phoneNumber"],
            MockWechat::phone_for("hank")
        );
        assert_eq!(in_body["phone_info"]["watermark"]["appid"], APPID);
    }

    #[tokio::test]
    async fn access_tokens_last_their_ttl_and_can_be_killed_or_expired() {
        let wechat = start().await;
        let first = wechat.stable_token(APPID).await;
        assert_eq!(first["expires_in"], ACCESS_TOKEN_TTL_SECS);
        assert_eq!(wechat.stable_token(APPID).await, first, "one token per app");
        wechat.mock.set_access_token_ttl(300);
        let again = wechat.stable_token(APPID).await;
        assert_eq!(again["access_token"], first["access_token"]);
        assert_eq!(again["expires_in"], 300);

        wechat.mock.kill_access_token(APPID);
        assert_eq!(wechat.phone(&first, "ida-1").await["errcode"], 40001);
        let second = wechat.stable_token(APPID).await;
        assert_ne!(second["access_token"], first["access_token"]);
        assert_eq!(wechat.phone(&second, "ida-2").await["errcode"], 0);

        let expired = wechat
            .post("/mock/expire_token", json!({ "appid": APPID }))
            .await;
        assert_eq!(expired["errcode"], 0);
        assert_eq!(wechat.phone(&second, "ida-3").await["errcode"], 42001);
        let third = wechat.stable_token(APPID).await;
        assert_ne!(third["access_token"], second["access_token"]);
        assert_eq!(wechat.phone(&third, "ida-3").await["errcode"], 0);
        assert_eq!(wechat.mock.forced_refreshes(), 0);
        assert_eq!(wechat.mock.stable_token_calls(), 5);
    }

    #[tokio::test]
    async fn held_stable_tokens_answer_once_released() {
        let wechat = start().await;
        wechat.mock.hold_stable_tokens();
        let mut held = std::pin::pin!(wechat.stable_token(APPID));
        tokio::select! {
            _ = held.as_mut() => panic!("answered while held"),
            () = async {
                while wechat.mock.stable_token_calls() == 0 {
                    tokio::task::yield_now().await;
                }
            } => {}
        }
        wechat.mock.release_stable_tokens();
        assert!(held.await["access_token"].is_string());
    }

    #[tokio::test]
    async fn raw_data_is_signed_with_the_users_session_key() {
        let wechat = start().await;
        let user = wechat.login(APPID, "hal").await;
        let raw_data = r#"{"nickName":"Hal"}"#;
        let signed = wechat
            .post(
                "/mock/sign",
                json!({"appid": APPID, "openid": user["openid"], "rawData": raw_data}),
            )
            .await;
        let session_key = Secret::new(user["session_key"].as_str().unwrap());
        let signature = signed["signature"].as_str().unwrap();
        assert!(signature_matches(raw_data, &session_key, signature));
        assert!(!signature_matches(
            r#"{"nickName":"Mal"}"#,
            &session_key,
            signature
        ));

        let unknown = wechat
            .send(wechat.http.post(format!("{}/mock/sign", wechat.base)).body(
                json!({"appid": APPID, "openid": "o-nobody", "rawData": raw_data}).to_string(),
            ))
            .await;
        assert_eq!(unknown.status, StatusCode::BAD_REQUEST);
        assert_eq!(unknown.json()["errcode"], 40003);
    }

    #[tokio::test]
    async fn encrypt_refuses_unknown_users_and_bad_bodies_with_json() {
        let wechat = start().await;
        let user = wechat.login(APPID, "gus").await;
        let bodies = [
            json!({"appid": APPID, "openid": "o-nobody", "data": {}}),
            // The openid is the user's in another app only.
            json!({"appid": OTHER_APPID, "openid": user["openid"], "data": {}}),
            json!({"appid": APPID, "openid": user["openid"], "data": [1, 2]}),
            json!({"appid": APPID}),
            json!("not an object"),
        ];
        for body in bodies {
            let answer = wechat.encrypt(body.clone()).await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
            assert!(answer.json()["errmsg"].is_string(), "{body}");
        }
        let oversized = wechat
            .send(
                wechat
                    .http
                    .post(format!("{}/mock/encrypt", wechat.base))
                    .body(vec![b' '; MAX_BODY + 1]),
            )
            .await;
        assert_eq!(oversized.status, StatusCode::BAD_REQUEST);
    }
}
