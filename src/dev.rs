//! `wxgate dev`: the zero-setup demo. The mock WeChat, the echo upstream and the gateway on
//! loopback, with a walkthrough a newcomer can paste into another terminal.

use std::future::Future;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::mock::{echo, wechat::MockWechat};
use crate::state::{SharedState, State};

const GATEWAY_ADDR: &str = "127.0.0.1:8080";
const DEV_APPID: &str = "wxd0000000000000de";

/// `wxgate dev`: the demo on 127.0.0.1:8080 until Ctrl-C.
pub async fn run() -> anyhow::Result<()> {
    let listener = TcpListener::bind(GATEWAY_ADDR).await.map_err(|err| {
        anyhow::anyhow!("cannot listen on {GATEWAY_ADDR} ({err}): is another wxgate dev running?")
    })?;
    let demo = Demo::start(listener).await?;
    println!("{}", demo.walkthrough);
    demo.serve(crate::server::shutdown_signal()).await
}

/// The demo wired up on the gateway listener it was given, the mock WeChat and the echo
/// upstream already serving; the gateway serves once [`Demo::serve`] is awaited.
pub struct Demo {
    /// What to try from another terminal: commands that work when pasted as they are.
    pub walkthrough: String,
    listener: TcpListener,
    state: SharedState,
}

impl Demo {
    pub async fn start(listener: TcpListener) -> anyhow::Result<Demo> {
        let gateway_addr = listener.local_addr()?;
        let mock_listener = TcpListener::bind("127.0.0.1:0").await?;
        let mock_addr = mock_listener.local_addr()?;
        tokio::spawn(MockWechat::new().serve(mock_listener));

        let echo_listener = TcpListener::bind("127.0.0.1:0").await?;
        let echo_addr = echo_listener.local_addr()?;
        tokio::spawn(echo::serve(echo_listener));

        // A fresh random key each run: dev tokens are worthless outside this process.
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        let text = format!(
            r#"
[server]
listen = "{gateway_addr}"
admin_listen = ""

[wechat]
hosts = ["http://{mock_addr}"]

[[wechat.apps]]
appid = "{DEV_APPID}"
secret = "dev-secret-of-the-mock-app"

[token]
secret = "{secret}"

[store]
backend = "memory"

[[routes]]
path = "/api/public/"
upstream = "http://{echo_addr}"
auth = "public"

[[routes]]
path = "/api/"
upstream = "http://{echo_addr}"
auth = "required"
"#,
            secret = URL_SAFE_NO_PAD.encode(key),
        );
        let config = Config::parse(&text, Path::new("wxgate-dev.toml"), &|_| None)?;
        let state = State::shared(config).await?;
        Ok(Demo {
            walkthrough: walkthrough(
                &gateway_addr.to_string(),
                &mock_addr.to_string(),
                &echo_addr.to_string(),
            ),
            listener,
            state,
        })
    }

    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        crate::server::run(self.listener, self.state, shutdown).await?;
        Ok(())
    }
}

fn walkthrough(gateway: &str, mock: &str, echo: &str) -> String {
    let gw = format!("http://{gateway}");
    format!(
        r#"wxgate dev is running:
  gateway        {gw}
  mock WeChat    http://{mock}   (app {DEV_APPID}; any code logs in, the code names the user)
  echo upstream  http://{echo}   (answers with the headers it received)
  routes         /api/public/ → public, /api/ → required

Try it from another terminal. A code stands for one wx.login: alice-1, alice-2, alice-3 …
are all the user alice, bob-1 is another user.

1. Log in with a wx.login code and keep the access token:

   TOKEN=$(curl -s -X POST {gw}/auth/login -H 'Content-Type: application/json' -d '{{"code":"alice-1"}}' | sed -E 's/.*"access_token":"([^"]+)".*/\1/')
   echo $TOKEN

2. Call a protected route: the upstream's answer shows the identity wxgate injected
   (x-wx-openid, x-wx-appid, x-wx-unionid) and no Authorization header:

   curl -s "{gw}/api/orders?page=1" -H "Authorization: Bearer $TOKEN"

3. Without a token the gateway answers 401 and the upstream never sees the request:

   curl -si {gw}/api/orders

4. Try to spoof the identity: every spelling is removed, then the real one injected:

   curl -s {gw}/api/orders -H "Authorization: Bearer $TOKEN" -H 'X-WX-OpenID: admin' -H 'X_WX_OPENID: admin' -H 'Connection: X-WX-OpenID'

5. On a public route no identity reaches the upstream, spoofed or not:

   curl -s {gw}/api/public/hello -H 'X-WX-OpenID: admin'

6. Who am I?

   curl -s {gw}/auth/me -H "Authorization: Bearer $TOKEN"

Stop with Ctrl-C.
"#
    )
}
