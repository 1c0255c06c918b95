//! `wxgate dev`: the walkthrough it prints is run as a newcomer would run it, pasted into a
//! shell, and every step shows what it promises.

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::process::Command;

use wxgate::dev::Demo;

/// The commands of the walkthrough, in order, exactly as printed.
fn commands(walkthrough: &str) -> Vec<&str> {
    walkthrough
        .lines()
        .filter_map(|line| line.strip_prefix("   "))
        .filter(|line| {
            ["TOKEN=", "echo ", "curl "]
                .iter()
                .any(|start| line.starts_with(start))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_walkthrough_works_when_pasted_into_a_shell() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let demo = Demo::start(listener).await.unwrap();
    let walkthrough = demo.walkthrough.clone();
    let commands = commands(&walkthrough);
    assert_eq!(commands.len(), 7, "{walkthrough}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(demo.serve(async {
        let _ = stopped.await;
    }));

    // One shell, as in a terminal: step 1 sets $TOKEN for the steps after it.
    const MARK: &str = "=== step";
    let script: String = commands
        .iter()
        .map(|command| format!("echo '{MARK}'\n{command}\n"))
        .collect();
    let output = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let steps: Vec<&str> = stdout.split(MARK).skip(1).map(str::trim).collect();
    assert_eq!(steps.len(), commands.len(), "{stdout}");

    let token = steps[1];
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token}");

    let protected: Value = serde_json::from_str(steps[2]).unwrap();
    let openid = protected["headers"]["x-wx-openid"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(openid.starts_with('o'), "{protected}");
    assert!(
        protected["headers"]["x-wx-appid"].is_string(),
        "{protected}"
    );
    assert!(
        protected["headers"].get("authorization").is_none(),
        "{protected}"
    );
    assert_eq!(protected["uri"], "/api/orders?page=1");

    assert!(steps[3].starts_with("HTTP/1.1 401"), "{}", steps[3]);
    assert!(
        steps[3].contains("\"error\":\"missing_token\""),
        "{}",
        steps[3]
    );

    let spoofed: Value = serde_json::from_str(steps[4]).unwrap();
    assert_eq!(
        spoofed["headers"]["x-wx-openid"],
        openid.as_str(),
        "{spoofed}"
    );

    let public: Value = serde_json::from_str(steps[5]).unwrap();
    let names: Vec<&String> = public["headers"].as_object().unwrap().keys().collect();
    assert!(
        names.iter().all(|name| !name.starts_with("x-wx-")),
        "{public}"
    );

    let me: Value = serde_json::from_str(steps[6]).unwrap();
    assert_eq!(me["openid"], openid.as_str(), "{me}");

    let _ = stop.send(());
    serving.await.unwrap().unwrap();
}
