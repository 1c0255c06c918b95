//! Asymmetric token keys end to end: ES256 / EdDSA / RS256 gateways started from PEM files,
//! `/.well-known/jwks.json` checked by a verifier that knows nothing of wxgate, and the
//! `wxgate keygen` and `wxgate token` commands.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use rand::RngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use common::{APP_SECRET, APPID, Harness, Upstream, echoed_header, http_client};
use wxgate::mock::wechat::MockWechat;
use wxgate::{Config, SharedState, State};

/// A fresh folder for key and config files under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let path =
            std::env::temp_dir().join(format!("wxgate-keys-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// Writes `text` to `name` in the folder and returns its absolute path.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A gateway in front of the mock WeChat and the test upstream, with its own `[token]` section.
struct Gateway {
    addr: SocketAddr,
    client: reqwest::Client,
    /// The config file the gateway was started from, for `wxgate token --config`.
    config_path: PathBuf,
    state: SharedState,
    mock_addr: SocketAddr,
    upstream: Upstream,
    _stop: oneshot::Sender<()>,
}

/// The config file, with `token` as the body of `[token]`.
fn config_text(mock_addr: SocketAddr, upstream: SocketAddr, token: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = ""

[wechat]
hosts = ["http://{mock_addr}"]
timeout = "2s"

[[wechat.apps]]
appid = "{APPID}"
secret = "{APP_SECRET}"

[token]
{token}

[store]
backend = "memory"

[[routes]]
path = "/api/"
upstream = "http://{upstream}"
auth = "required"
"#
    )
}

impl Gateway {
    /// `token` is the body of `[token]`; the config file is written into `dir`.
    async fn start(dir: &TempDir, token: &str) -> Gateway {
        let mock = MockWechat::new();
        let mock_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mock_addr = mock_listener.local_addr().unwrap();
        tokio::spawn(mock.serve(mock_listener));
        let upstream = Upstream::start().await;

        let text = config_text(mock_addr, upstream.addr, token);
        let config_path = dir.write("config.toml", &text);
        let config = Config::parse(&text, &config_path, &|_| None)
            .unwrap_or_else(|err| panic!("test config invalid:\n{err}"));
        let state = State::shared(config).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(wxgate::run(listener, state.clone(), async move {
            let _ = stopped.await;
        }));
        Gateway {
            addr,
            client: http_client(),
            config_path,
            state,
            mock_addr,
            upstream,
            _stop: stop,
        }
    }

    /// Rewrites the config file with `token` as the body of `[token]` and reloads it, as
    /// SIGHUP does.
    fn reload(&self, token: &str) {
        let text = config_text(self.mock_addr, self.upstream.addr, token);
        std::fs::write(&self.config_path, text).unwrap();
        wxgate::server::reload(&self.config_path, &self.state).unwrap();
    }

    /// A gateway signing with `algorithm` and the private key `pem`.
    async fn with_key(dir: &TempDir, algorithm: &str, pem: &str) -> Gateway {
        let key = dir.write("signing.pem", pem);
        let token = format!(
            "algorithm = \"{algorithm}\"\nsigning_key = \"{}\"",
            key.display()
        );
        Gateway::start(dir, &token).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Logs in with `code` through the mock WeChat: (access token, openid).
    async fn login(&self, code: &str) -> (String, String) {
        let response = self
            .client
            .post(self.url("/auth/login"))
            .header("content-type", "application/json")
            .body(serde_json::json!({ "code": code }).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: serde_json::Value =
            serde_json::from_str(&response.text().await.unwrap()).unwrap();
        (
            body["access_token"].as_str().unwrap().to_string(),
            body["openid"].as_str().unwrap().to_string(),
        )
    }

    /// GET a required route with `token`: (status, the upstream's echo or the error body).
    async fn call(&self, token: &str) -> (u16, serde_json::Value) {
        let response = self
            .client
            .get(self.url("/api/orders"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_default())
    }

    async fn jwks(&self) -> serde_json::Value {
        let response = self
            .client
            .get(self.url("/.well-known/jwks.json"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let header = |name: &str| response.headers()[name].to_str().unwrap().to_string();
        assert_eq!(header("content-type"), "application/json");
        assert_eq!(header("cache-control"), "public, max-age=300");
        serde_json::from_str(&response.text().await.unwrap()).unwrap()
    }
}

fn es256_private_pem() -> String {
    p256::SecretKey::random(&mut OsRng)
        .to_pkcs8_pem(LineEnding::LF)
        .unwrap()
        .to_string()
}

fn ed25519_private_pem() -> String {
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    ed25519_dalek::SigningKey::from_bytes(&seed)
        .to_pkcs8_pem(LineEnding::LF)
        .unwrap()
        .to_string()
}

/// A JWT's parts, read by hand: (header JSON, the signed text, the signature bytes).
fn split_jwt(token: &str) -> (serde_json::Value, &str, Vec<u8>) {
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let header = URL_SAFE_NO_PAD
        .decode(signed.split('.').next().unwrap())
        .unwrap();
    (
        serde_json::from_slice(&header).unwrap(),
        signed,
        URL_SAFE_NO_PAD.decode(signature).unwrap(),
    )
}

/// The published key whose `kid` the token names; it must carry nothing private.
fn published_key<'a>(
    jwks: &'a serde_json::Value,
    header: &serde_json::Value,
) -> &'a serde_json::Value {
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|jwk| jwk["kid"] == header["kid"])
        .unwrap_or_else(|| panic!("no published key for {header} in {jwks}"));
    assert!(jwk.get("d").is_none(), "{jwk}");
    assert_eq!(jwk["use"], "sig");
    assert_eq!(jwk["alg"], header["alg"]);
    jwk
}

/// RFC 7638: SHA-256 of the required members in lexicographic order, base64url.
fn thumbprint(canonical: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

fn member(jwk: &serde_json::Value, name: &str) -> String {
    jwk[name].as_str().unwrap().to_string()
}

fn run_wxgate(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wxgate"));
    command.args(args).env_remove("WXGATE_CONFIG");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "wxgate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[tokio::test]
async fn es256_login_token_passes_a_required_route() {
    let dir = TempDir::new();
    let gw = Gateway::with_key(&dir, "ES256", &es256_private_pem()).await;
    let (token, openid) = gw.login("alice").await;
    assert_eq!(split_jwt(&token).0["alg"], "ES256");

    let (status, echo) = gw.call(&token).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echoed_header(&echo, "x-wx-openid"), [openid.as_str()]);

    // One flipped bit of the signature and the token is refused.
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let mut bytes = URL_SAFE_NO_PAD.decode(signature).unwrap();
    bytes[10] ^= 1;
    let tampered = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(bytes));
    let (status, body) = gw.call(&tampered).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );
}

#[tokio::test]
async fn es256_token_verifies_with_only_the_published_jwk() {
    use p256::ecdsa::signature::Verifier;

    let dir = TempDir::new();
    let gw = Gateway::with_key(&dir, "ES256", &es256_private_pem()).await;
    let (token, _) = gw.login("alice").await;
    let jwks = gw.jwks().await;
    let (header, signed, signature) = split_jwt(&token);
    let jwk = published_key(&jwks, &header);
    assert_eq!(
        (jwk["kty"].as_str(), jwk["crv"].as_str()),
        (Some("EC"), Some("P-256"))
    );

    let (x, y) = (member(jwk, "x"), member(jwk, "y"));
    assert_eq!(
        thumbprint(&format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#
        )),
        header["kid"]
    );
    let x = URL_SAFE_NO_PAD.decode(x).unwrap();
    let y = URL_SAFE_NO_PAD.decode(y).unwrap();
    let point = p256::EncodedPoint::from_affine_coordinates(
        x.as_slice().into(),
        y.as_slice().into(),
        false,
    );
    let key = p256::ecdsa::VerifyingKey::from_encoded_point(&point).unwrap();
    let signature = p256::ecdsa::Signature::from_slice(&signature).unwrap();
    key.verify(signed.as_bytes(), &signature)
        .expect("the published key verifies the gateway's token");
    assert!(
        key.verify(format!("{signed}x").as_bytes(), &signature)
            .is_err()
    );
}

#[tokio::test]
async fn eddsa_token_verifies_with_only_the_published_jwk() {
    let dir = TempDir::new();
    let gw = Gateway::with_key(&dir, "EdDSA", &ed25519_private_pem()).await;
    let (token, openid) = gw.login("alice").await;
    assert_eq!(gw.call(&token).await.0, 200);
    let jwks = gw.jwks().await;
    let (header, signed, signature) = split_jwt(&token);
    assert_eq!(header["alg"], "EdDSA");
    let jwk = published_key(&jwks, &header);
    assert_eq!(
        (jwk["kty"].as_str(), jwk["crv"].as_str()),
        (Some("OKP"), Some("Ed25519"))
    );

    let x = member(jwk, "x");
    assert_eq!(
        thumbprint(&format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#)),
        header["kid"]
    );
    let x: [u8; 32] = URL_SAFE_NO_PAD.decode(x).unwrap().try_into().unwrap();
    let key = ed25519_dalek::VerifyingKey::from_bytes(&x).unwrap();
    let signature = ed25519_dalek::Signature::from_slice(&signature).unwrap();
    key.verify_strict(signed.as_bytes(), &signature)
        .expect("the published key verifies the gateway's token");
    let payload = signed.split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert_eq!(claims["sub"], openid);
}

#[tokio::test]
async fn hs256_token_forged_with_the_public_key_is_refused() {
    let dir = TempDir::new();
    let private = p256::SecretKey::random(&mut OsRng);
    let pem = private.to_pkcs8_pem(LineEnding::LF).unwrap();
    let gw = Gateway::with_key(&dir, "ES256", &pem).await;
    let (token, _) = gw.login("alice").await;
    let (header, signed, _) = split_jwt(&token);
    let payload = signed.split('.').nth(1).unwrap();

    // What an attacker can get: the public key, as PEM or DER, made an HMAC secret.
    let public_pem = private
        .public_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let public_der = private.public_key().to_public_key_der().unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    let mut forged_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    forged_header.kid = header["kid"].as_str().map(str::to_string);
    for secret in [public_pem.as_bytes(), public_der.as_bytes()] {
        let key = jsonwebtoken::EncodingKey::from_secret(secret);
        let forged = jsonwebtoken::encode(&forged_header, &claims, &key).unwrap();
        let (status, body) = gw.call(&forged).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_token"))
        );
    }
}

#[tokio::test]
async fn jwks_is_404_under_hs256_and_get_only() {
    let hs256 = Harness::start().await;
    let (status, body) = hs256.get("/.well-known/jwks.json", &[]).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("no_route")));

    let dir = TempDir::new();
    let gw = Gateway::with_key(&dir, "ES256", &es256_private_pem()).await;
    let response = gw
        .client
        .post(gw.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET, HEAD");
}

#[tokio::test]
async fn keygen_output_is_accepted_as_a_signing_key() {
    for algorithm in ["HS256", "ES256", "EdDSA", "RS256"] {
        let key = stdout(&run_wxgate(&["keygen", "--alg", algorithm], &[]));
        let dir = TempDir::new();
        let gw = if algorithm == "HS256" {
            let secret = key.trim_end();
            assert!(secret.len() > 32, "{algorithm}");
            assert!(!secret.contains(char::is_whitespace));
            Gateway::start(&dir, &format!("secret = \"{secret}\"")).await
        } else {
            assert!(
                key.starts_with("-----BEGIN PRIVATE KEY-----\n"),
                "{algorithm}"
            );
            Gateway::with_key(&dir, algorithm, &key).await
        };
        let (token, openid) = gw.login("alice").await;
        assert_eq!(split_jwt(&token).0["alg"], algorithm);
        let (status, echo) = gw.call(&token).await;
        assert_eq!(status, 200, "{algorithm}: {echo}");
        assert_eq!(echoed_header(&echo, "x-wx-openid"), [openid.as_str()]);
    }
}

#[tokio::test]
async fn token_command_output_passes_a_running_gateway() {
    let dir = TempDir::new();
    let gw = Gateway::with_key(&dir, "ES256", &es256_private_pem()).await;
    let config = gw.config_path.to_str().unwrap();

    let token = stdout(&run_wxgate(
        &[
            "token", "--openid", "o-cli", "--ttl", "90s", "--config", config,
        ],
        &[],
    ));
    let token = token.strip_suffix('\n').unwrap();
    assert!(
        !token.contains(char::is_whitespace),
        "only the token on stdout"
    );
    let (status, echo) = gw.call(token).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echoed_header(&echo, "x-wx-openid"), ["o-cli"]);
    assert_eq!(echoed_header(&echo, "x-wx-appid"), [APPID]);
    let payload = token.split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        90
    );

    // Without --config, like `serve`: $WXGATE_CONFIG; the ttl defaults to token.access_ttl.
    let token = stdout(&run_wxgate(
        &["token", "--openid", "o-env", "--appid", APPID],
        &[("WXGATE_CONFIG", &gw.config_path)],
    ));
    let (status, echo) = gw.call(token.trim_end()).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echoed_header(&echo, "x-wx-openid"), ["o-env"]);

    let refused = run_wxgate(
        &[
            "token",
            "--openid",
            "o-cli",
            "--appid",
            "wxnotconfigured",
            "--config",
            config,
        ],
        &[],
    );
    assert!(!refused.status.success());
    assert!(refused.stdout.is_empty());

    // A lifetime past any a config may give is refused, not left to overflow the clock.
    let refused = run_wxgate(
        &[
            "token",
            "--openid",
            "o-cli",
            "--ttl",
            "18446744073709551000s",
            "--config",
            config,
        ],
        &[],
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--ttl must be at most 3650d"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[tokio::test]
async fn a_running_gateway_rotates_its_signing_key_on_reload() {
    let dir = TempDir::new();
    let old = dir.write("old.pem", &es256_private_pem());
    let new = dir.write("new.pem", &es256_private_pem());
    let signing =
        |key: &Path| format!("algorithm = \"ES256\"\nsigning_key = \"{}\"", key.display());
    let gw = Gateway::start(&dir, &signing(&old)).await;
    let (old_token, _) = gw.login("alice").await;
    let old_kid = split_jwt(&old_token).0["kid"].clone();

    // The new key signs; the old one, kept in verify_keys, still verifies.
    gw.reload(&format!(
        "{}\nverify_keys = [\"{}\"]",
        signing(&new),
        old.display()
    ));
    assert_eq!(gw.call(&old_token).await.0, 200);
    let (new_token, _) = gw.login("alice-2").await;
    let new_kid = split_jwt(&new_token).0["kid"].clone();
    assert_ne!(new_kid, old_kid);
    assert_eq!(gw.call(&new_token).await.0, 200);
    let jwks = gw.jwks().await;
    let kids: Vec<_> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|jwk| jwk["kid"].clone())
        .collect();
    assert_eq!(kids, [new_kid, old_kid]);

    // Once the old key is dropped, its tokens are refused.
    gw.reload(&signing(&new));
    let (status, body) = gw.call(&old_token).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );
    assert_eq!(gw.call(&new_token).await.0, 200);
}
