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

/// Bodies of `/mock/encrypt` larger than this are refused.
const MAX_ENCRYPT_BODY: usize = 1 << 20;

#[derive(Default)]
pub struct MockWechat {
    code2session_calls: AtomicU64,
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

    async fn encrypt(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        #[derive(Deserialize)]
        struct EncryptRequest {
            appid: String,
            openid: String,
            data: serde_json::Map<String, Value>,
        }
        let body = match Limited::new(request.into_body(), MAX_ENCRYPT_BODY)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(_) => return text(StatusCode::BAD_REQUEST, &errcode(40001, "unreadable body")),
        };
        let Ok(request) = serde_json::from_slice::<EncryptRequest>(&body) else {
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
