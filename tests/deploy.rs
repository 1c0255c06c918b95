//! The files of `deploy/` as an operator uses them: each one parses, every wxgate config in them
//! loads with wxgate's own loader, and what they say about ports, probes, users, secrets and
//! hardening agrees with that config. nginx checks its file itself; systemd-analyze checks the
//! unit where it exists.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use wxgate::Config;
use wxgate::config::StoreConfig;

const KUBERNETES: &str = include_str!("../deploy/kubernetes.yaml");
const DOCKERFILE: &str = include_str!("../deploy/Dockerfile");
const DOCKERIGNORE: &str = include_str!("../.dockerignore");
const UNIT: &str = include_str!("../deploy/wxgate.service");
const TRAEFIK: &str = include_str!("../deploy/forward-auth/traefik-dynamic.yaml");
const ENVOY: &str = include_str!("../deploy/forward-auth/envoy.yaml");
const CADDYFILE: &str = include_str!("../deploy/forward-auth/Caddyfile");
/// The complete example: the files that show only some settings mean the rest as here.
const EXAMPLE_CONFIG: &str = include_str!("../config.toml");

/// Where the image and the unit read the config.
const CONFIG_PATH: &str = "/etc/wxgate/config.toml";

/// Values for the variables the configs take their secrets from.
fn test_env(name: &str) -> Option<String> {
    Some(match name {
        "WX_APP_SECRET" => "test-app-secret".into(),
        "WXGATE_JWT_SECRET" => "test-jwt-secret-0123456789abcdef0123456789".into(),
        "WXGATE_REDIS_URL" => "redis://:test-password@redis:6379/0".into(),
        _ => return None,
    })
}

/// Loads `text` as `wxgate check` does: the config, then its keys. Panics listing every
/// problem, naming `what`.
fn load(what: &str, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Config {
    let config = Config::parse(text, Path::new(CONFIG_PATH), env)
        .unwrap_or_else(|err| panic!("{what} should load:\n{err}\n\n{text}"));
    if let Err(problem) = wxgate::token::TokenKeys::from_config(&config.token) {
        panic!("{what}: {}: {}", problem.key, problem.message);
    }
    config
}

/// The repository's example with the settings of `fragment` put over it, as a file that shows
/// only some settings means: tables merged key by key, anything else (an array of tables such
/// as `[[wechat.apps]]` included) replaced whole.
fn over_example(fragment: &str) -> String {
    fn merge(base: &mut toml::Table, over: toml::Table) {
        for (key, value) in over {
            match (base.get_mut(&key), value) {
                (Some(toml::Value::Table(base)), toml::Value::Table(over)) => merge(base, over),
                (_, value) => {
                    base.insert(key, value);
                }
            }
        }
    }
    let mut config: toml::Table = EXAMPLE_CONFIG.parse().unwrap();
    let fragment: toml::Table = fragment
        .parse()
        .unwrap_or_else(|err| panic!("not TOML: {err}\n{fragment}"));
    merge(&mut config, fragment);
    toml::to_string(&config).unwrap()
}

/// The TOML a file shows in its comments: the one block of lines indented under `#`, starting
/// with a `[table]` line, up to the first comment that is not part of it.
fn toml_in_comments(file: &str, text: &str) -> String {
    const INDENT: &str = "#     ";
    let mut blocks = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if !line.starts_with(&format!("{INDENT}[")) {
            continue;
        }
        let mut block = vec![&line[INDENT.len()..]];
        while let Some(next) = lines.peek() {
            if next.trim_end() == "#" {
                block.push("");
            } else if let Some(rest) = next.strip_prefix(INDENT) {
                block.push(rest);
            } else {
                break;
            }
            lines.next();
        }
        blocks.push(block.join("\n"));
    }
    assert_eq!(
        blocks.len(),
        1,
        "{file} should show the config settings that go with it in one block: {blocks:#?}"
    );
    blocks.remove(0)
}

fn yaml_documents(file: &str, text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|document| {
            Value::deserialize(document).unwrap_or_else(|err| panic!("{file}: not YAML: {err}"))
        })
        .filter(|document| !document.is_null())
        .collect()
}

/// A directory of the test's own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("wxgate-deploy-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn deploy_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(name)
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

/// The four documents of `deploy/kubernetes.yaml`, and the config its ConfigMap holds.
struct Manifests {
    secret: Value,
    config_map: Value,
    deployment: Value,
    service: Value,
}

impl Manifests {
    fn parse() -> Manifests {
        let documents = yaml_documents("kubernetes.yaml", KUBERNETES);
        let kinds: Vec<_> = documents
            .iter()
            .map(|document| document["kind"].as_str().unwrap_or("?"))
            .collect();
        assert_eq!(kinds, ["Secret", "ConfigMap", "Deployment", "Service"]);
        let mut documents = documents.into_iter();
        let mut next = || documents.next().unwrap();
        Manifests {
            secret: next(),
            config_map: next(),
            deployment: next(),
            service: next(),
        }
    }

    fn pod(&self) -> &Value {
        &self.deployment["spec"]["template"]
    }

    fn containers(&self) -> &Vec<Value> {
        self.pod()["spec"]["containers"].as_array().unwrap()
    }

    fn container(&self, name: &str) -> &Value {
        self.containers()
            .iter()
            .find(|container| container["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    fn config_text(&self) -> &str {
        self.config_map["data"]["config.toml"]
            .as_str()
            .expect("the ConfigMap holds config.toml")
    }

    /// The ConfigMap's config, with the variables that the wxgate container's environment
    /// defines.
    fn config(&self) -> Config {
        let env = self.wxgate_env();
        load("the ConfigMap's config.toml", self.config_text(), &|name| {
            env.get(name).and_then(|_| test_env(name))
        })
    }

    /// The wxgate container's environment: name → the Secret key it comes from (`None` for a
    /// plain value).
    fn wxgate_env(&self) -> BTreeMap<String, Option<String>> {
        let secret_name = &self.secret["metadata"]["name"];
        self.container("wxgate")["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|var| {
                let name = var["name"].as_str().unwrap().to_string();
                let key = var["valueFrom"]["secretKeyRef"]
                    .as_object()
                    .map(|reference| {
                        assert_eq!(
                            &reference["name"], secret_name,
                            "{name} names another Secret"
                        );
                        reference["key"].as_str().unwrap().to_string()
                    });
                (name, key)
            })
            .collect()
    }
}

/// The number of the port `port` (a name or a number) of `container`.
fn container_port(container: &Value, port: &Value) -> u16 {
    let declared = container["ports"].as_array().cloned().unwrap_or_default();
    let found = declared.iter().find(|declared| match port {
        Value::String(name) => declared["name"] == *name,
        number => declared["containerPort"] == *number,
    });
    let found = found.unwrap_or_else(|| {
        panic!(
            "container {} declares no port {port}",
            container["name"].as_str().unwrap()
        )
    });
    found["containerPort"].as_u64().unwrap().try_into().unwrap()
}

fn assert_reachable_from_outside_the_pod(key: &str, addr: SocketAddr) {
    assert!(
        !addr.ip().is_loopback(),
        "{key} = {addr}: on loopback, neither the Service nor the kubelet reaches it"
    );
}

#[test]
fn configmap_config_loads_with_the_secrets_the_container_gets_from_the_secret() {
    let manifests = Manifests::parse();
    let env = manifests.wxgate_env();
    let secret_keys = manifests.secret["stringData"].as_object().unwrap();
    for (name, key) in &env {
        if let Some(key) = key {
            assert!(
                secret_keys.contains_key(key),
                "the Secret has no {key} for {name}"
            );
        }
    }
    // Every variable the config names is in the container's environment, from the Secret.
    let config = manifests.config();
    for (name, key) in &env {
        if manifests.config_text().contains(&format!("${{{name}}}")) {
            assert!(key.is_some(), "{name} should come from the Secret");
        }
    }
    assert_eq!(config.wechat.apps[0].secret.expose(), "test-app-secret");

    // The placeholders, applied as they are, are refused rather than used as a signing key.
    let placeholders = Config::parse(manifests.config_text(), Path::new(CONFIG_PATH), &|name| {
        let key = env.get(name)?.as_ref()?;
        Some(secret_keys[key].as_str()?.to_string())
    });
    let problems = placeholders.expect_err("the placeholder JWT secret must be refused");
    assert!(
        problems
            .problems
            .iter()
            .any(|problem| problem.key == "token.secret"),
        "{problems}"
    );
}

#[test]
fn configmap_is_mounted_where_the_image_reads_its_config() {
    let manifests = Manifests::parse();
    let volumes = manifests.pod()["spec"]["volumes"].as_array().unwrap();
    let volume = volumes
        .iter()
        .find(|volume| volume["configMap"]["name"] == manifests.config_map["metadata"]["name"])
        .expect("a volume of the ConfigMap");
    let mounts = manifests.container("wxgate")["volumeMounts"]
        .as_array()
        .unwrap();
    let mount = mounts
        .iter()
        .find(|mount| mount["name"] == volume["name"])
        .expect("the ConfigMap's volume is mounted in the wxgate container");
    let path = Path::new(mount["mountPath"].as_str().unwrap()).join("config.toml");
    assert_eq!(path, Path::new(CONFIG_PATH));
    assert!(
        mount.get("subPath").is_none(),
        "a subPath mount never sees ConfigMap updates, so SIGHUP would reload the old file"
    );
    assert_eq!(mount["readOnly"], true);
    // The image's entrypoint reads that path unless the pod says otherwise.
    let wxgate = manifests.container("wxgate");
    assert!(wxgate.get("command").is_none() && wxgate.get("args").is_none());
    assert!(dockerfile_entrypoint().contains(&CONFIG_PATH.to_string()));
}

#[test]
fn service_exposes_wxgate_alone_and_the_app_listens_on_loopback() {
    let manifests = Manifests::parse();
    let config = manifests.config();
    let wxgate = manifests.container("wxgate");

    let ports = manifests.service["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1, "the Service exposes one port: wxgate's");
    let target = container_port(wxgate, &ports[0]["targetPort"]);
    assert_eq!(target, config.server.listen.port(), "server.listen");
    assert_reachable_from_outside_the_pod("server.listen", config.server.listen);
    assert_eq!(
        manifests.service["spec"]["selector"],
        manifests.deployment["spec"]["selector"]["matchLabels"]
    );
    for (label, value) in manifests.service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&manifests.pod()["metadata"]["labels"][label], value);
    }

    // The app declares no port, and wxgate reaches it over loopback only.
    let app = manifests
        .containers()
        .iter()
        .find(|container| container["name"] != "wxgate")
        .expect("the business container");
    assert!(app.get("ports").is_none(), "the app must not be exposed");
    assert_eq!(manifests.containers().len(), 2);
    for route in &config.routes {
        let host = route.upstream.host().unwrap();
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        assert!(
            loopback,
            "route {} goes to {host}, not loopback",
            route.path
        );
    }
    let upstream = &config.routes[0].upstream;
    let listen = format!(
        "{}:{}",
        upstream.host().unwrap(),
        upstream.port_u16().unwrap()
    );
    assert!(
        app["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|var| var["value"] == listen.as_str()),
        "the app is told to listen on {listen}, where wxgate forwards"
    );
}

#[test]
fn probes_ask_the_admin_listener() {
    let manifests = Manifests::parse();
    let config = manifests.config();
    let admin = config
        .server
        .admin_listen
        .expect("the probes need server.admin_listen");
    assert_reachable_from_outside_the_pod("server.admin_listen", admin);
    let wxgate = manifests.container("wxgate");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &wxgate[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            container_port(wxgate, &get["port"]),
            admin.port(),
            "{probe}"
        );
    }
    let ports = manifests.service["spec"]["ports"].as_array().unwrap();
    assert_ne!(
        container_port(wxgate, &ports[0]["targetPort"]),
        admin.port(),
        "the admin listener stays off the Service"
    );
    let annotations = &manifests.pod()["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], admin.port().to_string());
}

#[test]
fn pod_has_time_to_drain_and_shares_one_store_across_replicas() {
    let manifests = Manifests::parse();
    let config = manifests.config();
    let grace = manifests.pod()["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let pause =
        match manifests.container("wxgate")["lifecycle"]["preStop"]["exec"]["command"].as_array() {
            Some(command) => {
                assert_eq!(command[0], "sleep");
                command[1].as_str().unwrap().parse().unwrap()
            }
            None => 0,
        };
    assert!(
        Duration::from_secs(grace) > Duration::from_secs(pause) + config.server.shutdown_grace,
        "terminationGracePeriodSeconds ({grace}) must outlast the preStop pause ({pause} s) \
         and server.shutdown_grace ({:?})",
        config.server.shutdown_grace
    );
    let replicas = manifests.deployment["spec"]["replicas"].as_u64().unwrap();
    if replicas > 1 {
        assert!(
            matches!(config.store, StoreConfig::Redis { .. }),
            "{replicas} replicas need the redis store, or a refresh token works on one pod only"
        );
    }
}

#[test]
fn every_container_runs_unprivileged_on_a_read_only_root() {
    let manifests = Manifests::parse();
    let pod = &manifests.pod()["spec"]["securityContext"];
    assert_eq!(pod["runAsNonRoot"], true);
    assert_eq!(pod["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(
        manifests.pod()["spec"]["automountServiceAccountToken"],
        false
    );
    for container in manifests.containers() {
        let name = container["name"].as_str().unwrap();
        let security = &container["securityContext"];
        assert_eq!(security["runAsNonRoot"], true, "{name}");
        assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(
            security["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{name}"
        );
        assert!(
            security.get("privileged").is_none_or(|p| p == false),
            "{name}"
        );
        for kind in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                assert!(
                    container["resources"][kind][resource].is_string(),
                    "{name}: resources.{kind}.{resource}"
                );
            }
        }
    }
    // The image's user, which runAsNonRoot can verify only because it is numeric.
    let wxgate = &manifests.container("wxgate")["securityContext"];
    assert_eq!(
        wxgate["runAsUser"].as_u64().unwrap().to_string(),
        dockerfile_user()
    );
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

/// `(INSTRUCTION, arguments)` of the Dockerfile, continuation lines joined, comments dropped.
fn dockerfile_instructions() -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in DOCKERFILE.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (instruction, arguments) = current.split_once(' ').unwrap_or((&current, ""));
                instructions.push((instruction.to_uppercase(), arguments.trim().to_string()));
                current.clear();
            }
        }
    }
    assert!(
        current.is_empty(),
        "the Dockerfile ends inside a continued line"
    );
    instructions
}

/// The instructions of the image's last stage: what it runs with.
fn runtime_stage() -> Vec<(String, String)> {
    let instructions = dockerfile_instructions();
    let last_from = instructions
        .iter()
        .rposition(|(instruction, _)| instruction == "FROM")
        .expect("a FROM");
    instructions[last_from..].to_vec()
}

fn dockerfile_entrypoint() -> Vec<String> {
    let (_, entrypoint) = runtime_stage()
        .into_iter()
        .rfind(|(instruction, _)| instruction == "ENTRYPOINT")
        .expect("an ENTRYPOINT");
    serde_json::from_str(&entrypoint)
        .unwrap_or_else(|err| panic!("ENTRYPOINT should be in exec (JSON) form: {err}"))
}

/// The user (not the group) the image runs as.
fn dockerfile_user() -> String {
    let (_, user) = runtime_stage()
        .into_iter()
        .rfind(|(instruction, _)| instruction == "USER")
        .expect("the runtime stage sets a USER");
    user.split(':').next().unwrap().to_string()
}

#[test]
fn image_runs_wxgate_serve_as_a_numeric_non_root_user() {
    let user = dockerfile_user();
    let uid: u32 = user
        .parse()
        .unwrap_or_else(|_| panic!("USER {user}: numeric, or runAsNonRoot cannot check it"));
    assert_ne!(uid, 0, "the image must not run as root");

    let entrypoint = dockerfile_entrypoint();
    assert!(entrypoint[0].ends_with("/wxgate"), "{entrypoint:?}");
    assert_eq!(entrypoint[1..], ["serve", "--config", CONFIG_PATH]);

    let builds = dockerfile_instructions()
        .into_iter()
        .filter(|(instruction, arguments)| {
            instruction == "RUN" && arguments.contains("cargo build --release --locked")
        })
        .count();
    assert!(
        builds >= 1,
        "the image builds with cargo build --release --locked"
    );
}

#[test]
fn image_config_loads_and_its_ports_and_volume_match() {
    let fragment = toml_in_comments("deploy/Dockerfile", DOCKERFILE);
    let config = load(
        "the Dockerfile's config",
        &over_example(&fragment),
        &test_env,
    );
    let runtime = runtime_stage();
    let arguments_of = |wanted: &str| -> Vec<String> {
        runtime
            .iter()
            .filter(|(instruction, _)| instruction == wanted)
            .flat_map(|(_, arguments)| {
                // Both forms: `EXPOSE 8080 9090` and `VOLUME ["/var/lib/wxgate"]`.
                serde_json::from_str::<Vec<String>>(arguments)
                    .unwrap_or_else(|_| arguments.split_whitespace().map(String::from).collect())
            })
            .collect()
    };

    let exposed = arguments_of("EXPOSE");
    let admin = config.server.admin_listen.expect("server.admin_listen");
    for (key, addr) in [
        ("server.listen", config.server.listen),
        ("server.admin_listen", admin),
    ] {
        assert!(
            exposed.contains(&addr.port().to_string()),
            "EXPOSE {exposed:?} lacks {key}'s port"
        );
        assert!(
            !addr.ip().is_loopback(),
            "{key} = {addr}: unreachable from outside"
        );
    }

    let StoreConfig::Embedded { path } = &config.store else {
        panic!("the image's config uses the embedded store");
    };
    let volumes = arguments_of("VOLUME");
    assert!(
        volumes
            .iter()
            .any(|volume| path.parent() == Some(Path::new(volume))),
        "store.path {} is not on a VOLUME {volumes:?}",
        path.display()
    );
    assert!(
        DOCKERFILE.contains(&format!(
            "install -d -o wxgate -g wxgate -m 0700 {}",
            path.parent().unwrap().display()
        )),
        "the store's directory belongs to the image's user"
    );
}

/// Whether `.dockerignore` lets `path` into the build context (the last matching line wins).
fn dockerignore_admits(path: &str) -> bool {
    let mut admitted = true;
    for line in DOCKERIGNORE.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (pattern, admits) = match line.strip_prefix('!') {
            Some(pattern) => (pattern, true),
            None => (line, false),
        };
        let pattern = pattern.trim_end_matches('/');
        if pattern == "*" || path == pattern || path.starts_with(&format!("{pattern}/")) {
            admitted = admits;
        }
    }
    admitted
}

#[test]
fn build_context_holds_what_the_image_copies_and_not_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (instruction, arguments) in dockerfile_instructions() {
        if instruction != "COPY" || arguments.starts_with("--from") {
            continue;
        }
        let words: Vec<_> = arguments.split_whitespace().collect();
        for source in &words[..words.len() - 1] {
            assert!(root.join(source).exists(), "COPY {source}: no such file");
            assert!(
                dockerignore_admits(source),
                ".dockerignore leaves out {source}"
            );
        }
    }
    assert!(dockerignore_admits("src/main.rs"));
    assert!(!dockerignore_admits("target"));
    assert!(!dockerignore_admits("target/release/wxgate"));
}

// ---------------------------------------------------------------------------------------------
// systemd

/// The unit's `[Service]` settings, each key with every value it is given, in order.
fn unit_service_settings() -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = "";
    for line in UNIT.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        let (key, value) = line.split_once('=').expect("key=value");
        if section == "[Service]" {
            settings
                .entry(key.to_string())
                .or_default()
                .push(value.to_string());
        }
    }
    settings
}

/// A systemd time span as the unit writes it: "30s", "1min 30s", or bare seconds.
fn systemd_seconds(value: &str) -> Duration {
    match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_duration(value)
            .unwrap_or_else(|err| panic!("time span {value:?}: {err}")),
    }
}

#[test]
fn unit_is_hardened() {
    let settings = unit_service_settings();
    let one = |key: &str| -> &str {
        match settings.get(key).map(Vec::as_slice) {
            Some([value]) => value,
            other => panic!("{key} should be set once, not {other:?}"),
        }
    };
    assert_eq!(
        one("ExecStart"),
        format!("/usr/local/bin/wxgate serve --config {CONFIG_PATH}")
    );
    assert!(
        settings["ExecReload"].contains(&"/bin/kill -HUP $MAINPID".to_string()),
        "reload is a SIGHUP"
    );
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert!(
        ["simple", "exec"].contains(&one("Type")),
        "wxgate does not notify"
    );
    assert_eq!(one("DynamicUser"), "yes");
    assert_eq!(one("StateDirectory"), "wxgate");
    for (key, value) in [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("MemoryDenyWriteExecute", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("SystemCallArchitectures", "native"),
    ] {
        assert_eq!(one(key), value, "{key}");
    }
    assert_eq!(settings["SystemCallFilter"][0], "@system-service");
    assert!(
        !settings.contains_key("User"),
        "DynamicUser makes the user; a fixed one would own files after it"
    );
}

#[test]
fn unit_config_loads_with_credentials_and_state_directory_and_stops_in_time() {
    let settings = unit_service_settings();
    let credentials = TempDir::new();
    let state = TempDir::new();
    // What systemd puts in $CREDENTIALS_DIRECTORY: one file per LoadCredential, by its id.
    for credential in &settings["LoadCredential"] {
        let (id, source) = credential.split_once(':').expect("LoadCredential=ID:PATH");
        assert!(source.starts_with('/'), "{credential}");
        std::fs::write(credentials.0.join(id), format!("credential-{id}\n")).unwrap();
    }
    let env = |name: &str| match name {
        "CREDENTIALS_DIRECTORY" => Some(credentials.0.display().to_string()),
        "STATE_DIRECTORY" => Some(state.0.display().to_string()),
        other => test_env(other),
    };
    let fragment = toml_in_comments("deploy/wxgate.service", UNIT);
    let config = load("the unit's config", &over_example(&fragment), &env);

    assert_eq!(
        config.wechat.apps[0].secret.expose(),
        "credential-wx_app_secret"
    );
    let StoreConfig::Embedded { path } = &config.store else {
        panic!("the unit's config uses the embedded store");
    };
    assert!(
        path.starts_with(&state.0),
        "store.path {} is outside StateDirectory, read-only under ProtectSystem=strict",
        path.display()
    );
    let stop = systemd_seconds(&settings["TimeoutStopSec"][0]);
    assert!(
        stop > config.server.shutdown_grace,
        "TimeoutStopSec ({stop:?}) must outlast server.shutdown_grace ({:?})",
        config.server.shutdown_grace
    );
}

/// `systemd-analyze` where it exists (not in most containers, and CI cannot start a systemd):
/// the unit, with its programs pointed at the binary cargo built, verifies without a warning
/// about it and rates at most 2.0 ("OK") in `systemd-analyze security`.
#[test]
fn unit_verifies_with_systemd_analyze() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "systemd-analyze is not installed: deploy/wxgate.service is checked as text only \
             (systemd is not something a container can install and run)"
        );
        return;
    }
    let dir = TempDir::new();
    let unit = dir.0.join("wxgate.service");
    let text = UNIT.replace("/usr/local/bin/wxgate", env!("CARGO_BIN_EXE_wxgate"));
    std::fs::write(&unit, text).unwrap();

    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&verify.stderr);
    let about_the_unit: Vec<_> = stderr
        .lines()
        .filter(|line| line.contains("wxgate.service"))
        .collect();
    assert!(
        verify.status.success() && about_the_unit.is_empty(),
        "systemd-analyze verify ({}):\n{stderr}",
        verify.status
    );

    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&security.stderr);
    if stderr.contains("unrecognized option") {
        eprintln!(
            "this systemd-analyze cannot rate a unit file offline (systemd 250 and later can)"
        );
        return;
    }
    assert!(
        security.status.success(),
        "systemd-analyze security rates the unit above 2.0:\n{}{stderr}",
        String::from_utf8_lossy(&security.stdout)
    );
}

// ---------------------------------------------------------------------------------------------
// Forward auth

/// The identity headers of wxgate's defaults, which the forward-auth examples copy.
fn identity_headers() -> [String; 3] {
    let config = load("config.toml", EXAMPLE_CONFIG, &test_env);
    [
        config.identity.openid_header,
        config.identity.appid_header,
        config.identity.unionid_header,
    ]
    .map(|header| header.as_str().to_string())
}

#[test]
fn nginx_accepts_the_forward_auth_example() {
    let prefix = TempDir::new();
    let output = Command::new("nginx")
        .arg("-t")
        .arg("-p")
        .arg(&prefix.0)
        .arg("-c")
        .arg(deploy_file("forward-auth/nginx.conf"))
        .output()
        .unwrap_or_else(|err| {
            panic!("cannot run nginx ({err}): this test needs it (.ci/run installs nginx-light)")
        });
    assert!(
        output.status.success(),
        "nginx -t ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn traefik_example_asks_auth_verify_and_copies_the_identity_headers() {
    let documents = yaml_documents("traefik-dynamic.yaml", TRAEFIK);
    assert_eq!(documents.len(), 1);
    let verify = &documents[0]["http"]["middlewares"]["wxgate-verify"]["forwardAuth"];
    assert!(
        verify["address"]
            .as_str()
            .unwrap()
            .ends_with("/auth/verify")
    );
    let copied: Vec<_> = verify["authResponseHeaders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|header| header.as_str().unwrap().to_ascii_lowercase())
        .collect();
    for header in identity_headers() {
        assert!(copied.contains(&header), "{header} is not copied");
    }
}

#[test]
fn envoy_example_asks_auth_verify_and_copies_the_identity_headers() {
    let documents = yaml_documents("envoy.yaml", ENVOY);
    assert_eq!(documents.len(), 1);
    assert!(documents[0]["static_resources"]["listeners"].is_array());
    assert!(ENVOY.contains("path_prefix: /auth/verify"));
    for header in identity_headers() {
        assert!(
            ENVOY.contains(&format!("- exact: {header}")),
            "{header} is not copied"
        );
    }
}

#[test]
fn caddy_example_asks_auth_verify_and_copies_the_identity_headers() {
    let code: String = CADDYFILE
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        code.matches('{').count(),
        code.matches('}').count(),
        "unbalanced braces"
    );
    assert!(code.contains("uri /auth/verify"));
    let copy = code
        .lines()
        .find_map(|line| line.trim().strip_prefix("copy_headers "))
        .expect("copy_headers");
    let copied: Vec<_> = copy
        .split_whitespace()
        .map(str::to_ascii_lowercase)
        .collect();
    for header in identity_headers() {
        assert!(copied.contains(&header), "{header} is not copied");
    }
}
