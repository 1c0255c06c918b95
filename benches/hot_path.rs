//! Micro-benchmarks of what every proxied request pays for, and of open-data decryption:
//! `cargo bench --bench hot_path`. The end-to-end figures against nginx come from `bench/`.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};

use wxgate::auth::VerifiedTokens;
use wxgate::config::{Algorithm, Config, KeyFile, Secret, TokenConfig};
use wxgate::identity::IdentityRules;
use wxgate::proxy::remove_hop_by_hop;
use wxgate::routes::{RouteTable, check_path};
use wxgate::token::{Subject, TokenKeys};
use wxgate::wechat::crypto::decrypt_open_data;

const CONFIG: &str = r#"
[server]
admin_listen = ""
[wechat]
hosts = ["http://127.0.0.1:9"]
[[wechat.apps]]
appid = "wx0000000000000a01"
secret = "bench-app-secret"
[token]
secret = "bench-jwt-secret-0123456789abcdef0123456789"
[store]
backend = "memory"
[identity]
claim_headers = { uid = "X-User-Id" }
[[routes]]
path = "/"
upstream = "http://127.0.0.1:3000"
auth = "public"
[[routes]]
path = "/api/public/"
upstream = "http://127.0.0.1:3000"
auth = "public"
[[routes]]
path = "/api/"
upstream = "http://127.0.0.1:3000"
auth = "required"
[[routes]]
path = "/api/orders/"
upstream = "http://127.0.0.1:3001"
auth = "required"
methods = ["GET", "POST"]
[[routes]]
path = "/api/users/"
upstream = "http://127.0.0.1:3002"
auth = "optional"
[[routes]]
path = "/static/"
upstream = "http://127.0.0.1:3003"
auth = "public"
strip_prefix = true
"#;

fn config() -> Config {
    Config::parse(CONFIG, Path::new("/etc/wxgate/config.toml"), &|_| None).unwrap()
}

fn keys(algorithm: Algorithm) -> TokenKeys {
    let mut token: TokenConfig = config().token;
    token.algorithm = algorithm;
    if algorithm != Algorithm::Hs256 {
        token.secret = None;
        token.signing_key = Some(KeyFile {
            path: "bench.pem".into(),
            pem: Secret::new(wxgate::token::keygen(algorithm).unwrap()),
        });
    }
    TokenKeys::from_config(&token).unwrap()
}

fn token_verification(c: &mut Criterion) {
    let rules = IdentityRules::new(&config().identity);
    let subject = Subject {
        appid: "wx0000000000000a01",
        openid: "oBench0000000000000000000000",
        unionid: Some("uBench0000000000000000000000"),
        sid: "0123456789abcdef0123456789abcdef",
    };
    for (name, algorithm) in [
        ("HS256", Algorithm::Hs256),
        ("ES256", Algorithm::Es256),
        ("EdDSA", Algorithm::EdDsa),
    ] {
        let keys = keys(algorithm);
        let (token, claims) = keys.issue(&subject, Default::default()).unwrap();
        c.bench_function(&format!("verify {name} uncached"), |b| {
            b.iter(|| keys.verify(black_box(&token)).unwrap())
        });
        let cache = VerifiedTokens::new(Duration::from_secs(30));
        cache.insert(token.as_bytes(), rules.identity(claims).into());
        c.bench_function(&format!("verify {name} cached"), |b| {
            b.iter(|| cache.get(black_box(token.as_bytes())).unwrap())
        });
    }
}

/// The headers a mini-program's `wx.request` sends, plus a spoofing attempt.
fn request_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("host", "api.example.com"),
        ("connection", "keep-alive, X-WX-OpenID"),
        ("content-type", "application/json"),
        (
            "user-agent",
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) MicroMessenger/8.0.40",
        ),
        (
            "referer",
            "https://servicewechat.com/wx0000000000000a01/12/page-frame.html",
        ),
        ("accept-encoding", "gzip, deflate, br"),
        (
            "authorization",
            "Bearer eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl",
        ),
        ("x-wx-openid", "spoofed"),
        ("x_wx_unionid", "spoofed"),
    ] {
        headers.append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_static(value),
        );
    }
    headers
}

fn header_rewrite(c: &mut Criterion) {
    let config = config();
    let rules = IdentityRules::new(&config.identity);
    let keys = keys(Algorithm::Hs256);
    let subject = Subject {
        appid: "wx0000000000000a01",
        openid: "oBench0000000000000000000000",
        unionid: Some("uBench0000000000000000000000"),
        sid: "0123456789abcdef0123456789abcdef",
    };
    let (_, claims) = keys.issue(&subject, Default::default()).unwrap();
    // As the verified-token cache holds it: the header values are made once per token.
    let identity = rules.identity(claims);
    let headers = request_headers();
    c.bench_function("strip and inject identity", |b| {
        b.iter_batched_ref(
            || headers.clone(),
            |headers| {
                remove_hop_by_hop(headers);
                rules.strip(headers);
                identity.inject(headers);
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

fn route_matching(c: &mut Criterion) {
    let table = RouteTable::new(&config().routes);
    for path in [
        "/api/orders/12345/items",
        "/api/public/banner",
        "/favicon.ico",
    ] {
        c.bench_function(&format!("check and match {path}"), |b| {
            b.iter(|| {
                check_path(black_box(path)).unwrap();
                table.find(black_box(path)).unwrap()
            })
        });
    }
}

/// WeChat's published sample (appid wx4f4bc4dec97d474b), which decrypts to the user `Band`.
const SAMPLE_SESSION_KEY: &str = "tiihtNczf5v6AKRyjwEUhQ==";
const SAMPLE_IV: &str = "r7BXXKkLb8qrSNn05n0qiA==";
const SAMPLE_ENCRYPTED_DATA: &str = "CiyLU1Aw2KjvrjMdj8YKliAjtP4gsMZMQmRzooG2xrDcvSnxIMXFufNstNGTyaGS9uT5geRa0W4oTOb1WT7fJlAC+oNPdbB+3hVbJSRgv+4lGOETKUQz6OYStslQ142dNCuabNPGBzlooOmB231qMM85d2/fV6ChevvXvQP8Hkue1poOFtnEtpyxVLW1zAo6/1Xx1COxFvrc2d7UL/lmHInNlxuacJXwu0fjpXfz/YqYzBIBzD6WUfTIF9GRHpOn/Hz7saL8xz+W//FRAUid1OksQaQx4CMs8LOddcQhULW4ucetDf96JcR3g0gfRK4PC7E/r7Z6xNrXd2UIeorGj5Ef7b1pJAYB6Y5anaHqZ9J6nKEBvB4DnNLIVWSgARns/8wR2SiRS7MNACwTyrGvt9ts8p12PKFdlqYTopNHR1Vf7XjfhQlVsAJdNiKdYmYVoKlaRv85IfVunYzO0IKXsyl7JCUjCpoG20f0a04COwfneQAGGwd5oa+T8yO5hzuyDb/XcxxmK01EpqOyuxINew==";

fn open_data(c: &mut Criterion) {
    let session_key = Secret::new(SAMPLE_SESSION_KEY);
    c.bench_function("decrypt open data (official sample)", |b| {
        b.iter(|| {
            decrypt_open_data(
                &session_key,
                black_box(SAMPLE_ENCRYPTED_DATA),
                SAMPLE_IV,
                "wx4f4bc4dec97d474b",
            )
            .unwrap()
        })
    });
}

criterion_group!(
    benches,
    token_verification,
    header_rewrite,
    route_matching,
    open_data
);
criterion_main!(benches);
