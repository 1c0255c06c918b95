//! The `wxgate` command: parses the command line, sets up logging, then hands over to the
//! library.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use wxgate::Config;
use wxgate::config::Algorithm;
use wxgate::token::MintRequest;

#[derive(Parser)]
#[command(
    name = "wxgate",
    version,
    about = "A reverse-proxy authentication sidecar for WeChat mini-programs"
)]
struct Cli {
    /// Log line format; the default is pretty on a terminal, json otherwise.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, env = "WXGATE_CONFIG", default_value = "config.toml")]
        config: PathBuf,
    },
    /// Validate the config and print the route table; exit 1 listing every problem.
    Check {
        #[arg(long, env = "WXGATE_CONFIG", default_value = "config.toml")]
        config: PathBuf,
    },
    /// Zero-setup demo on loopback: mock WeChat, an echo upstream and the gateway on :8080.
    Dev,
    /// The built-in fake WeChat API alone, for local and CI testing of mini-program front ends.
    MockWechat {
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: SocketAddr,
    },
    /// Mint an access token with the configured keys (operators, debugging); prints the token.
    Token {
        #[arg(long)]
        openid: String,
        /// May be left out when exactly one app is configured.
        #[arg(long)]
        appid: Option<String>,
        /// Lifetime such as "1h" or "30m"; the default is token.access_ttl.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        #[arg(long, env = "WXGATE_CONFIG", default_value = "config.toml")]
        config: PathBuf,
    },
    /// Print a new HS256 secret (base64) or private key (PKCS#8 PEM) for the config.
    Keygen {
        #[arg(long, value_enum, ignore_case = true)]
        alg: KeyAlgorithm,
    },
}

/// `--alg` spelled as `token.algorithm` is.
#[derive(Clone, Copy, ValueEnum)]
enum KeyAlgorithm {
    #[value(name = "HS256")]
    Hs256,
    #[value(name = "ES256")]
    Es256,
    #[value(name = "EdDSA")]
    EdDsa,
    #[value(name = "RS256")]
    Rs256,
}

impl From<KeyAlgorithm> for Algorithm {
    fn from(algorithm: KeyAlgorithm) -> Algorithm {
        match algorithm {
            KeyAlgorithm::Hs256 => Algorithm::Hs256,
            KeyAlgorithm::Es256 => Algorithm::Es256,
            KeyAlgorithm::EdDsa => Algorithm::EdDsa,
            KeyAlgorithm::Rs256 => Algorithm::Rs256,
        }
    }
}

/// The scheduler, chosen by measurement: with a single worker (`TOKIO_WORKER_THREADS=1`, as
/// a sidecar pinned to one core runs), the current-thread scheduler does the same work without
/// the multi-thread one's cross-thread queues and wake-ups. Otherwise one worker per core.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let single_worker =
        std::env::var("TOKIO_WORKER_THREADS").is_ok_and(|workers| workers.trim() == "1");
    if single_worker {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("wxgate: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => wxgate::server::serve(&config).await,
            Command::Check { config } => check(&config),
            Command::Dev => wxgate::dev::run().await,
            Command::MockWechat { listen } => wxgate::mock::wechat::run_standalone(listen).await,
            Command::Token {
                openid,
                appid,
                ttl,
                config,
            } => token(&config, &openid, appid.as_deref(), ttl),
            Command::Keygen { alg } => {
                wxgate::token::keygen(alg.into()).map(|key| println!("{}", key.trim_end()))
            }
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("wxgate: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    // The key files are read and parsed, but the store is left alone: a running gateway holds
    // the embedded store's file, and checking a config must work beside it.
    wxgate::token::TokenKeys::from_config(&config.token).map_err(|problem| {
        wxgate::config::ConfigError {
            problems: vec![problem],
        }
    })?;
    println!("{}: ok\n\n{}", path.display(), config.route_table());
    Ok(())
}

fn token(
    path: &std::path::Path,
    openid: &str,
    appid: Option<&str>,
    ttl: Option<Duration>,
) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let request = MintRequest { openid, appid, ttl };
    println!("{}", wxgate::token::mint(&config, &request)?);
    Ok(())
}

fn init_logging(format: Option<LogFormat>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
