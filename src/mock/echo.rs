//! The dev-mode upstream: answers every request with the method, path and headers it received,
//! and prints them, so the operator sees what the gateway let through and what it injected.

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE};
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
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
        headers.insert(name.to_string(), value.into());
    }
    print!("{printed}");
    let body = serde_json::json!({
        "method": request.method().as_str(),
        "uri": uri,
        "headers": headers,
    });
    let mut response = Response::new(Full::new(Bytes::from(
        serde_json::to_vec_pretty(&body).unwrap_or_default(),
    )));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
