//! The dev-mode upstream: answers every request with the method, path and headers it received,
//! and prints them, so the operator sees what the gateway let through and what it injected.

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE};
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::Value;
use serde_json::map::Entry;
use tokio::net::TcpListener;

pub async fn serve(listener: TcpListener) {
    super::serve(listener, |request: Request<Incoming>| async move {
        answer(&request)
    })
    .await;
}

fn answer(request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let uri = request
        .uri()
        .path_and_query()
        .map_or("/", |path| path.as_str());
    let mut printed = format!("echo upstream: {} {uri}\n", request.method());
    let mut headers = serde_json::Map::new();
    for (name, value) in request.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        // Credentials a public route passed through are answered, but not put on a terminal.
        let shown = if name == AUTHORIZATION || name == COOKIE {
            "[redacted]"
        } else {
            &value
        };
        printed.push_str(&format!("    {name}: {shown}\n"));
        // A repeated header becomes a list, so a value the client smuggled in beside the
        // gateway's own shows up instead of being overwritten.
        match headers.entry(name.as_str()) {
            Entry::Vacant(entry) => {
                entry.insert(value.into());
            }
            Entry::Occupied(mut entry) => match entry.get_mut() {
                Value::Array(values) => values.push(value.into()),
                first => *first = Value::Array(vec![first.take(), value.into()]),
            },
        }
    }
    print!("{printed}");
    let body = serde_json::json!({
        "method": request.method().as_str(),
        "uri": uri,
        "headers": headers,
    });
    // The closing newline keeps a shell prompt off the answer's last line.
    let mut json = serde_json::to_vec_pretty(&body).unwrap_or_default();
    json.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(json)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_with_the_method_uri_and_headers_it_received() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener));
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let response = http
            .patch(format!("http://{addr}/api/orders?page=2"))
            .header("X-WX-OpenID", "o-gateway")
            .header("X-WX-OpenID", "o-smuggled")
            .header("X-Request-Id", "r-1")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let echo: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert_eq!(echo["method"], "PATCH");
        assert_eq!(echo["uri"], "/api/orders?page=2");
        assert_eq!(echo["headers"]["x-request-id"], "r-1");
        assert_eq!(
            echo["headers"]["x-wx-openid"],
            serde_json::json!(["o-gateway", "o-smuggled"])
        );
        assert_eq!(echo["headers"]["host"], addr.to_string());
    }
}
