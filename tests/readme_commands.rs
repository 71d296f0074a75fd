//! Every shell command shown in README.md and docs/*.md, run as written.
//!
//! The commands are read from the fenced `sh`/`bash`/`console`/`shell` blocks, so a new
//! example is covered without touching this file: by default it runs under `sh -c`
//! (with the built `kalmar` first on PATH) next to a running Kalmar and must exit 0.
//! What has to differ from a reader's machine, and why, is listed below in one place:
//!
//! - Ports: the README's Kalmar listens on 127.0.0.1:3128 / :9090. Tests run in parallel
//!   on shared machines and never use fixed ports, so those two addresses are replaced
//!   by the free ports of the Kalmar started here.
//! - `example.com`: the examples fetch it through the proxy, which needs the internet.
//!   Here `example.com` is a loopback origin (plain HTTP and TLS with a certificate for
//!   `example.com` made at test time, trusted through `CURL_CA_BUNDLE`), reached through
//!   Kalmar's `dns.hosts`, with 127.0.0.1 opened in `destinations.allowed_cidrs` and the
//!   origins' ports added to the URLs. Every other name resolves through a dead loopback
//!   name server, so no command sends traffic or DNS off the machine.
//! - Placeholders: `[FILE]` runs once without and once with a valid fixture;
//!   `/etc/kalmar/kalmar.toml` is a file written here.
//! - Commands that serve until stopped (`kalmar` without a subcommand, `cargo run`) are
//!   started, must become ready (`/readyz` 200), and must exit 0 on SIGTERM.
//! - Blocks that only set `KALMAR_*` variables are exported, then `kalmar check-config`
//!   must accept them.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::kalmar_bin;
use support::origin::{Origin, TlsOrigin};

/// Commands that cannot run offline in a test, each with the reason and what covers it
/// instead. Matched on the start of the command.
const EXCLUDED: &[(&str, &str)] = &[
    (
        "cargo test",
        "this test is part of `cargo test`; running it from here would recurse",
    ),
    (
        "cargo build",
        "`cargo test` has just built the same debug binaries; a second cargo inside the test \
         run only waits for the build lock (or rebuilds after a touch) and proves nothing more",
    ),
    (
        "tests/cache-suite/run.sh",
        "runs the public cache test suite (over a minute) after installing its npm packages \
         from the registry; .ci/run runs it through the built Kalmar and fails on a \
         regression, and the script's path is checked to exist here",
    ),
    (
        "docker build",
        "needs a Docker daemon and the network for the base images; \
         .ci/deploy-checks lints docker/Dockerfile with hadolint, and the paths it names \
         are checked to exist here",
    ),
    (
        "kubectl apply",
        "needs a cluster; .ci/deploy-checks renders and validates the same kustomization \
         (kubectl kustomize + kubernetes-validate), and the path is checked to exist here",
    ),
];

/// One command from a fenced block: where it is, and its text (continuations joined).
struct Example {
    place: String,
    text: String,
}

/// The fixed addresses and names the examples use, and what they become here.
struct World {
    proxy: SocketAddr,
    admin: SocketAddr,
    origin: Origin,
    tls: TlsOrigin,
    dir: tempfile::TempDir,
    bin_dir: PathBuf,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_readme_command_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let examples: Vec<Example> = files.iter().flat_map(|f| examples(root, f)).collect();
    assert!(
        examples.len() >= 10,
        "the README's examples were not found: {}",
        examples.len()
    );

    let world = World::start().await;
    let mut server = world.serve();
    let (mut ran, mut excluded) = (0, 0);
    for example in &examples {
        let text = &example.text;
        if let Some((_, why)) = EXCLUDED.iter().find(|(start, _)| text.starts_with(start)) {
            for path in repo_paths(text) {
                assert!(
                    root.join(&path).exists(),
                    "{}: `{text}` names {path}, which does not exist",
                    example.place
                );
            }
            eprintln!("excluded  {}: {text}  ({why})", example.place);
            excluded += 1;
            continue;
        }
        eprintln!("running   {}: {text}", example.place);
        world.run(example);
        ran += 1;
    }
    // The curl examples reached the stand-ins for example.com through the proxy.
    assert!(
        world.origin.requests() >= 1,
        "no request reached the HTTP origin"
    );
    assert!(
        world
            .tls
            .counters
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1,
        "no tunnel reached the TLS origin"
    );
    world.stop(&mut server, "the Kalmar the examples ran against");
    eprintln!("{ran} run, {excluded} excluded");
}

/// Every command in the shell blocks of `file`.
fn examples(root: &Path, file: &Path) -> Vec<Example> {
    let name = file.strip_prefix(root).unwrap().display().to_string();
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = Vec::new();
    let mut block: Option<(usize, Vec<String>)> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start().strip_prefix("```");
        match (&mut block, fence) {
            (None, Some(lang)) => {
                if matches!(lang.trim(), "sh" | "bash" | "console" | "shell") {
                    block = Some((i + 2, Vec::new()));
                } else {
                    block = Some((0, Vec::new()));
                }
            }
            (Some((start, lines)), Some(_)) => {
                if *start > 0 {
                    out.extend(commands(&name, *start, lines));
                }
                block = None;
            }
            (Some((_, lines)), None) => lines.push(line.to_owned()),
            (None, None) => {}
        }
    }
    out
}

/// The commands of one block: a block of only `NAME=value` lines is one example
/// (environment to export); otherwise each line is one, `\` continuations joined.
fn commands(file: &str, start: usize, lines: &[String]) -> Vec<Example> {
    let significant: Vec<(usize, &str)> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| (start + i, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let is_assignment = |l: &str| {
        l.split_once('=').is_some_and(|(name, _)| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
    };
    if significant.iter().all(|(_, l)| is_assignment(l)) {
        return vec![Example {
            place: format!("{file}:{}", significant[0].0),
            text: significant
                .iter()
                .map(|(_, l)| *l)
                .collect::<Vec<_>>()
                .join("\n"),
        }];
    }
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (n, line) in significant {
        let line = line.trim_start_matches("$ ");
        let (n, mut text) = match pending.take() {
            Some((first, mut text)) => {
                text.push(' ');
                text.push_str(line);
                (first, text)
            }
            None => (n, line.to_owned()),
        };
        if let Some(stripped) = text.strip_suffix('\\') {
            text = stripped.trim_end().to_owned();
            pending = Some((n, text));
            continue;
        }
        out.push(Example {
            place: format!("{file}:{n}"),
            text: strip_comment(&text).to_owned(),
        });
    }
    out
}

/// The command without a trailing `# comment` (a `#` after whitespace, outside quotes).
fn strip_comment(line: &str) -> &str {
    let (mut single, mut double) = (false, false);
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && previous.is_whitespace() => {
                return line[..i].trim_end();
            }
            _ => {}
        }
        previous = c;
    }
    line.trim_end()
}

/// Arguments that look like paths in this repository (`docker/Dockerfile`, `deploy/...`).
fn repo_paths(command: &str) -> Vec<String> {
    command
        .split_whitespace()
        .filter(|w| w.contains('/') && !w.contains(':') && !w.starts_with('-'))
        .map(|w| w.trim_end_matches('/').to_owned())
        .collect()
}

// === impl World ===

impl World {
    async fn start() -> World {
        let origin = Origin::start().await;
        let tls = TlsOrigin::start_for(&["example.com"]).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("example-com.pem"), &tls.cert_pem).unwrap();
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (proxy, admin) = (free(), free());
        // What stands in for the internet (see the top of this file): nothing else.
        std::fs::write(
            dir.path().join("offline.toml"),
            format!(
                "[dns]\nnameservers = [\"127.0.0.1:1\"]\nuse_hosts_file = false\n\
                 hosts = {{ \"example.com\" = [\"127.0.0.1\"] }}\n\
                 [destinations]\nallowed_cidrs = [\"127.0.0.1/32\"]\nconnect_ports = [\"{}\"]\n\
                 [access_log]\npath = {:?}\n",
                tls.addr.port(),
                dir.path().join("access.log").display().to_string(),
            ),
        )
        .unwrap();
        // `/etc/kalmar/kalmar.toml` in the examples: "only changed keys needed".
        let (p, a) = (free(), free());
        std::fs::write(
            dir.path().join("kalmar.toml"),
            format!(
                "[server]\nlisten = \"{p}\"\nadmin_listen = \"{a}\"\n\
                 [dns]\nnameservers = [\"127.0.0.1:1\"]\nuse_hosts_file = false\n\
                 [access_log]\npath = {:?}\n",
                dir.path().join("access-2.log").display().to_string(),
            ),
        )
        .unwrap();
        let bin_dir = Path::new(kalmar_bin()).parent().unwrap().to_owned();
        World {
            proxy,
            admin,
            origin,
            tls,
            dir,
            bin_dir,
        }
    }

    /// The example with this machine's stand-ins (see the top of this file).
    fn substitute(&self, text: &str) -> String {
        text.replace("127.0.0.1:3128", &self.proxy.to_string())
            .replace("127.0.0.1:9090", &self.admin.to_string())
            .replace(
                "http://example.com/",
                &format!("http://example.com:{}/", self.origin.addr.port()),
            )
            .replace(
                "https://example.com/",
                &format!("https://example.com:{}/", self.tls.addr.port()),
            )
            .replace(
                "/etc/kalmar/kalmar.toml",
                &self.dir.path().join("kalmar.toml").display().to_string(),
            )
    }

    /// `sh -c text` in the repository, with `kalmar` on PATH and the offline stand-ins.
    fn command(&self, text: &str) -> Command {
        let path = format!(
            "{}:{}",
            self.bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(text)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("PATH", path)
            .env("CURL_CA_BUNDLE", self.dir.path().join("example-com.pem"))
            .env("KALMAR_CONFIG", self.dir.path().join("offline.toml"))
            .env_remove("KALMAR_LOG")
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("ALL_PROXY")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, example: &Example) {
        let text = &example.text;
        let first = text.split_whitespace().next().unwrap_or("");
        let is_env_block = text
            .lines()
            .all(|l| l.split_once('=').is_some_and(|(n, _)| !n.contains(' ')));
        if is_env_block {
            let script = format!("set -a\n{text}\nset +a\nkalmar check-config");
            let out = self.output(&example.place, &script);
            for line in text.lines() {
                let (name, _) = line.split_once('=').unwrap();
                assert!(name.starts_with("KALMAR_"), "{}: {line}", example.place);
            }
            assert!(out.contains("configuration is valid"), "{out}");
            return;
        }
        if first == "cargo" && text.starts_with("cargo run") {
            // The binary cargo already built for this test: the same code as
            // `cargo run --release`, without a release build on CI's two cores.
            let args: Vec<&str> = match text.split_once(" -- ") {
                Some((_, args)) => args.split_whitespace().collect(),
                None => Vec::new(),
            };
            self.serve_once(&example.place, &args.join(" "));
            return;
        }
        if first == "kalmar" && serves(text) {
            let rest = text.trim_start_matches("kalmar").trim();
            self.serve_once(&example.place, &self.substitute(rest));
            return;
        }
        let texts: Vec<String> = if text.contains("[FILE]") {
            let fixture = "tests/fixtures/valid/minimal.toml";
            vec![
                text.replace("[FILE]", "").trim_end().to_owned(),
                text.replace("[FILE]", fixture),
            ]
        } else {
            vec![text.clone()]
        };
        for text in texts {
            self.output(&example.place, &self.substitute(&text));
        }
    }

    /// Run `text` to completion (at most 60 s); it must exit 0. Returns its stdout.
    fn output(&self, place: &str, text: &str) -> String {
        let mut child = self
            .command(text)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{place}: `{text}` did not finish within 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{place}: `{text}` exited {:?}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Start `kalmar ARGS` on the ports given by `env` (or its config), wait for
    /// `/readyz`, then stop it with SIGTERM: exit 0.
    fn serve_once(&self, place: &str, args: &str) {
        let (env, admin) = if args.contains("--config") {
            let text = std::fs::read_to_string(self.dir.path().join("kalmar.toml")).unwrap();
            let admin = text
                .lines()
                .find_map(|l| l.strip_prefix("admin_listen = "))
                .map(|a| a.trim_matches('"').parse().unwrap())
                .unwrap();
            (Vec::new(), admin)
        } else {
            let admin = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let listen = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            (
                vec![
                    ("KALMAR_SERVER__LISTEN", listen.to_string()),
                    ("KALMAR_SERVER__ADMIN_LISTEN", admin.to_string()),
                ],
                admin,
            )
        };
        let mut child = self.spawn(args, &env);
        wait_ready(&mut child, admin, place);
        self.stop(&mut child, place);
    }

    /// The Kalmar the other examples talk to: `kalmar` with the embedded default, on
    /// this test's ports, with the offline stand-ins.
    fn serve(&self) -> std::process::Child {
        let env = [
            ("KALMAR_SERVER__LISTEN", self.proxy.to_string()),
            ("KALMAR_SERVER__ADMIN_LISTEN", self.admin.to_string()),
        ];
        let mut child = self.spawn("", &env);
        wait_ready(
            &mut child,
            self.admin,
            "the Kalmar the examples run against",
        );
        child
    }

    fn spawn(&self, args: &str, env: &[(&str, String)]) -> std::process::Child {
        self.command(&format!("exec kalmar {args}"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn stop(&self, child: &mut std::process::Child, place: &str) {
        let pid = child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "{place}: exit {status:?} on SIGTERM");
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{place}: did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `kalmar [--config FILE]` without a subcommand runs the proxy until it is stopped.
fn serves(text: &str) -> bool {
    let words: Vec<&str> = text.split_whitespace().skip(1).collect();
    let mut i = 0;
    while i < words.len() {
        match words[i] {
            "--config" | "-c" => i += 2,
            _ => return false,
        }
    }
    true
}

/// Poll `/readyz` on `admin` until 200 (at most 15 s); the process must stay up.
fn wait_ready(child: &mut std::process::Child, admin: SocketAddr, place: &str) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{place}: kalmar exited before serving: {status:?}");
        }
        if let Ok(mut s) = std::net::TcpStream::connect(admin) {
            let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{place}: kalmar did not become ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn comments_and_continuations_are_read_like_sh() {
    assert_eq!(strip_comment("curl -x a b   # plain"), "curl -x a b");
    assert_eq!(strip_comment("curl 'a # b' c"), "curl 'a # b' c");
    assert_eq!(strip_comment("curl a%23b"), "curl a%23b");
    let lines = ["kalmar \\".to_owned(), "  --version  # v".to_owned()];
    let got = commands("f", 1, &lines);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].text, "kalmar --version");
    let env = ["A_B=1".to_owned(), "C='x y'".to_owned()];
    assert_eq!(commands("f", 1, &env)[0].text, "A_B=1\nC='x y'");
    assert!(serves("kalmar --config /x"));
    assert!(serves("kalmar"));
    assert!(!serves("kalmar check-config"));
}
