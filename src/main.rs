//! The `kalmar` binary: CLI, diagnostics, signals. Everything else lives in the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kalmar::config::Config;
use kalmar::state::ConfigSource;

#[derive(Parser)]
#[command(
    name = "kalmar",
    version,
    about = "Egress forward proxy for Kubernetes"
)]
struct Cli {
    /// Configuration file; keys it leaves out keep the embedded default.
    #[arg(long, short, global = true, env = "KALMAR_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration and print the effective result (exit 0), or the error (exit 1).
    CheckConfig {
        /// The file to check (defaults to --config, else the embedded default).
        file: Option<PathBuf>,
    },
    /// Show how the loaded policy decides for a client and a destination, without sending traffic.
    Explain {
        /// The client's source address.
        #[arg(long)]
        from: std::net::IpAddr,
        /// A URL (http://host/path), or host:port for a CONNECT.
        target: String,
        /// The method of the request (plain HTTP only).
        #[arg(long, default_value = "GET")]
        method: String,
        /// For a CONNECT: also show what the tunnel's ClientHello check would decide for a
        /// hello with this server name ("" = a hello without one).
        #[arg(long)]
        sni: Option<String>,
    },
}

fn main() -> ExitCode {
    if let Err(e) = init_diagnostics() {
        eprintln!("{e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => check_config(file.or(cli.config)),
        Some(Command::Explain {
            from,
            target,
            method,
            sni,
        }) => explain(cli.config, from, &target, &method, sni.as_deref()),
        None => run(cli.config),
    }
}

/// Diagnostics on stderr: `KALMAR_LOG` filters (default `info`); `KALMAR_LOG_FORMAT`
/// is `text` (the default: colours only when stderr is a terminal, so that a pod's log
/// shows no escape sequences) or `json` (one object per line, for Loki and the like).
fn init_diagnostics() -> Result<(), String> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("KALMAR_LOG").unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match std::env::var("KALMAR_LOG_FORMAT").as_deref() {
        Err(_) | Ok("" | "text") => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        Ok("json") => builder.json().flatten_event(true).with_ansi(false).init(),
        Ok(other) => {
            return Err(format!(
                "KALMAR_LOG_FORMAT: unknown value {other:?}, expected one of: text, json"
            ));
        }
    }
    Ok(())
}

fn check_config(file: Option<PathBuf>) -> ExitCode {
    let loaded = Config::load(file.as_deref()).and_then(|c| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| kalmar::config::ConfigError::invalid("runtime", e))?;
        rt.block_on(async { kalmar::state::Snapshot::build(c.clone()) })?;
        Ok(c)
    });
    match loaded {
        Ok(config) => {
            println!(
                "# configuration is valid; effective values:\n{}",
                config.to_toml()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("invalid configuration: {e}");
            ExitCode::FAILURE
        }
    }
}

fn explain(
    config: Option<PathBuf>,
    from: std::net::IpAddr,
    target: &str,
    method: &str,
    sni: Option<&str>,
) -> ExitCode {
    let result = (|| -> Result<String, String> {
        let config = Config::load(config.as_deref()).map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(kalmar::explain(config, from, target, method, sni))
    })();
    match result {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("explain: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(config_path: Option<PathBuf>) -> ExitCode {
    let config = match Config::load(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listeners = match kalmar::bind(&config) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let handle = match kalmar::start(config, ConfigSource { path: config_path }, listeners) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let Ok(signals) = signals else {
        tracing::error!("cannot start the signal runtime");
        return ExitCode::FAILURE;
    };
    signals.block_on(wait_for_stop(&handle));
    tracing::info!("shutting down");
    handle.shutdown();
    ExitCode::SUCCESS
}

/// Serve SIGHUP (reload) and SIGUSR1 (reopen the log) until SIGTERM or SIGINT.
async fn wait_for_stop(handle: &kalmar::ServerHandle) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup), Ok(mut usr1)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined1()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => { let _ = handle.reload(); }
            _ = usr1.recv() => {
                tracing::info!("reopening the access log");
                handle.reopen_logs();
            }
        }
    }
}
