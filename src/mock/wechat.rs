//! The mock WeChat API (SPEC §8): code2Session on loopback, answering like the real one
//! (`text/plain` JSON, single-use codes, errcodes picked by the code), plus `/mock/encrypt` so a
//! front end can test open data without a phone.

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
use crate::wechat::crypto::encrypt_open_data;

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
    /// (appid, phone code) pairs already used.
    used_phone_codes: HashSet<(String, String)>,
}

impl MockWechat {
    pub fn new() -> Arc<MockWechat> {
        Arc::new(MockWechat::default())
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
            _ => text(StatusCode::NOT_FOUND, &errcode(-1, "not found")),
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
            &json!({ "access_token": token, "expires_in": ACCESS_TOKEN_TTL_SECS }).to_string(),
        )
    }

    async fn phone_number(&self, query: &str, request: Request<Incoming>) -> Response<Full<Bytes>> {
        #[derive(Deserialize)]
        struct PhoneRequest {
            code: String,
        }
        let token = form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| name == "access_token")
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default();
        let appid = self
            .lock()
            .access_tokens
            .iter()
            .find(|(_, live)| **live == token)
            .map(|(appid, _)| appid.clone());
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
        let user = match self.lock().users.get(&request.openid) {
            Some((appid, user)) if *appid == request.appid => user.clone(),
            _ => {
                return text(
                    StatusCode::BAD_REQUEST,
                    &errcode(40003, "unknown openid for this appid: log it in first"),
                );
            }
        };
        let mut data = request.data;
        data.insert(
            "watermark".into(),
            json!({ "appid": request.appid, "timestamp": crate::token::unix_now() }),
        );
        let session_key = self.current_session_key(&request.appid, &user);
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
