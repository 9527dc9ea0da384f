//! Shared test harness: a real `tsa` process with a fresh development PKI, on loopback ports
//! chosen by the kernel, and helpers to drive the real `openssl` and `curl` against it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub mod announce;

pub const TSA: &str = env!("CARGO_BIN_EXE_tsa");

/// A running TSA; killed when dropped.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub admin_url: String,
    /// The HTTPS listener's URL, when `server.https_listen` is set.
    pub https_url: Option<String>,
    child: Child,
}

impl Server {
    /// `tsa init` with `init_args`, optional extra TOML appended to the config, then `tsa serve`.
    pub fn start(init_args: &[&str], extra_config: &str) -> Server {
        Self::serve(Self::init(init_args, extra_config))
    }

    /// `tsa init` with `init_args` in a new directory, with extra TOML merged into its
    /// configuration.
    pub fn init(init_args: &[&str], extra_config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new(TSA)
            .arg("init")
            .arg("--dir")
            .arg(dir.path())
            .args(init_args)
            .output()
            .expect("run tsa init");
        assert!(
            out.status.success(),
            "tsa init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if !extra_config.is_empty() {
            let path = dir.path().join("tsa.toml");
            let config = std::fs::read_to_string(&path).unwrap();
            std::fs::write(&path, merge_toml(&config, extra_config)).unwrap();
        }
        dir
    }

    /// Serves the configuration already in `dir`.
    pub fn serve(dir: tempfile::TempDir) -> Server {
        Self::serve_with_env(dir, &[])
    }

    /// Serves the configuration in `dir` with extra environment variables.
    pub fn serve_with_env(dir: tempfile::TempDir, env: &[(&str, &str)]) -> Server {
        Self::spawn(dir, env, Stdio::inherit())
    }

    /// Serves the configuration in `dir`, logging at `info` (no colours) to
    /// [`Server::LOG`] in it.
    pub fn serve_logged(dir: tempfile::TempDir) -> Server {
        let log = std::fs::File::create(dir.path().join(Self::LOG)).expect("the log file");
        Self::spawn(dir, &[("RUST_LOG", "info"), ("NO_COLOR", "1")], log.into())
    }

    /// The log file of [`Server::serve_logged`], in the state directory.
    pub const LOG: &'static str = "serve.log";

    /// Serves the configuration in `dir` through `wrapper` (a command that runs the rest of
    /// its arguments, such as `prlimit --nofile=300:300`).
    pub fn serve_under(dir: tempfile::TempDir, wrapper: &[&str]) -> Server {
        Self::spawn_under(dir, &[], Stdio::inherit(), wrapper)
    }

    fn spawn(dir: tempfile::TempDir, env: &[(&str, &str)], stderr: Stdio) -> Server {
        Self::spawn_under(dir, env, stderr, &[])
    }

    fn spawn_under(
        dir: tempfile::TempDir,
        env: &[(&str, &str)],
        stderr: Stdio,
        wrapper: &[&str],
    ) -> Server {
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(TSA);
                command
            }
            None => Command::new(TSA),
        };
        let mut child = command
            .arg("serve")
            .arg("--config")
            .arg(dir.path().join("tsa.toml"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "error")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn tsa serve");
        let first = announce::first_line(&mut child);
        // "tsa: serving RFC 3161 on http://127.0.0.1:PORT/ (admin http://127.0.0.1:PORT)", with
        // " and https://127.0.0.1:PORT/" before "(admin" when HTTPS is on.
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in {first:?}"))
            .to_string();
        let admin_url = first
            .split("(admin ")
            .nth(1)
            .and_then(|s| s.strip_suffix(")\n"))
            .unwrap_or_else(|| panic!("no admin URL in {first:?}"))
            .to_string();
        let https_url = first
            .split_whitespace()
            .find(|w| w.starts_with("https://"))
            .map(str::to_string);
        Server {
            dir,
            url,
            admin_url,
            https_url,
            child,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn ca(&self) -> PathBuf {
        self.path("ca-cert.pem")
    }

    /// Sends `signal` (e.g. "HUP") to the server process.
    pub fn signal(&self, signal: &str) {
        ok(Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string()));
    }

    /// Stops the server and keeps its directory (to change the configuration and serve again).
    pub fn into_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Appends `extra` to `base`, merging `[section]` headers that already exist by inserting the
/// extra keys right under the existing header.
pub fn merge_toml(base: &str, extra: &str) -> String {
    let mut out = base.to_string();
    let mut section: Option<String> = None;
    let mut pending: Vec<(Option<String>, String)> = Vec::new();
    for line in extra.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            section = Some(t.to_string());
        } else if !t.is_empty() {
            pending.push((section.clone(), line.to_string()));
        }
    }
    for (section, line) in pending {
        match section {
            Some(header) if out.contains(&header) => {
                let at = out.find(&header).unwrap() + header.len();
                out.insert_str(at, &format!("\n{line}"));
            }
            Some(header) => out.push_str(&format!("\n{header}\n{line}\n")),
            None => out.insert_str(0, &format!("{line}\n")),
        }
    }
    out
}

/// `tsa client new-key`: the key (from standard error) and the `[[auth.client]]` lines.
pub fn new_key(name: &str, extra: &[&str]) -> (String, String) {
    let out = ok(Command::new(TSA)
        .args(["client", "new-key", "--name", name])
        .args(extra));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let key = stderr
        .lines()
        .find(|l| l.starts_with("tsa_"))
        .unwrap_or_else(|| panic!("no key in {stderr:?}"))
        .to_string();
    let toml = String::from_utf8(out.stdout).unwrap();
    assert!(
        !toml.contains(&key),
        "the key itself never goes into the configuration"
    );
    (key, toml)
}

/// `GET {admin_url}/health/ready` with curl: (HTTP status, text).
pub fn readiness(admin_url: &str) -> (u16, String) {
    let out = ok(Command::new("curl").args([
        "-sS",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
        &format!("{admin_url}/health/ready"),
    ]));
    let out = String::from_utf8(out.stdout).unwrap();
    let (text, code) = out.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), text.to_string())
}

/// A C source of the tests (`source`, from the crate's root) compiled with the system's C
/// compiler into a shared library in `dir`, for `LD_PRELOAD`.
pub fn preload_library(source: &str, dir: &Path) -> PathBuf {
    let name = Path::new(source).with_extension("so");
    let library = dir.join(name.file_name().expect("a file name"));
    let out = Command::new("cc")
        .args([
            "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o",
        ])
        .arg(&library)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(source))
        .args(["-ldl", "-lpthread"])
        .output()
        .expect("cc, the C compiler, runs");
    assert!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    library
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

pub fn ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The token alone, as openssl writes it out of `reply.tsr` in `dir` (into `token.der`).
pub fn openssl_token_out(dir: &Path) -> Output {
    openssl(
        &[
            "ts",
            "-reply",
            "-in",
            "reply.tsr",
            "-token_out",
            "-out",
            "token.der",
        ],
        dir,
    )
}

pub fn openssl(args: &[&str], dir: &Path) -> Output {
    ok(Command::new("openssl").args(args).current_dir(dir))
}

/// POSTs a file with curl; returns (HTTP status, content type, body).
pub fn curl_post(url: &str, body_file: &Path, content_type: &str) -> (u16, String, Vec<u8>) {
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let out = ok(Command::new("curl").args([
        "-sS",
        "--max-time",
        "30",
        "-H",
        &format!("Content-Type: {content_type}"),
        "--data-binary",
        &format!("@{}", body_file.display()),
        "-o",
        out_file.path().to_str().unwrap(),
        "-w",
        "%{http_code} %{content_type}",
        url,
    ]));
    let meta = String::from_utf8(out.stdout).unwrap();
    let (code, ctype) = meta.split_once(' ').unwrap_or((&meta, ""));
    (
        code.parse().unwrap(),
        ctype.to_string(),
        std::fs::read(out_file.path()).unwrap(),
    )
}

/// Waits for `f` to hold, for up to 30 s (a loaded machine's slowest step).
pub fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
