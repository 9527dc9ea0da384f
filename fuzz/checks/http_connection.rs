//! Arbitrary bytes as one client connection to the public listener's HTTP handler (hyper and
//! the routes, limits, admission and issuing behind it), in process over an in-memory
//! stream: the server must never panic, must finish the connection once the client has
//! sent everything and closed its side, and whatever it writes back must be HTTP responses
//! (HTTP/1.1, or HTTP/1.0 to an HTTP/1.0 request).
//!
//! The TSA is built once, from a development PKI and the development clock in a temporary
//! directory, exactly as `tsa serve` builds it.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tsa::config::Config;
use tsa::server::Tsa;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    tsa: Arc<Tsa>,
    config: Config,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let pki = tsa::pki::DevPki::generate(tsa::pki::KeyAlgorithm::P256).expect("a dev PKI");
        tsa::files::replace(
            &dir.path().join("key.pem"),
            pki.tsu_key_pem.as_bytes(),
            tsa::files::SECRET,
        )
        .unwrap();
        std::fs::write(dir.path().join("cert.pem"), &pki.tsu_cert_pem).unwrap();
        // Small limits, so that the fuzzer reaches them.
        let toml = "[server]\nmax_request_bytes = 2048\nread_timeout_ms = 200\nmax_queue = 4\n\
                    max_header_bytes = 8192\nmax_requests_per_connection = 8\n\
                    [signer]\nkind = \"software\"\nkey = \"key.pem\"\ncertificate = \"cert.pem\"\n\
                    [clock]\nsource = \"development\"\n";
        let path = dir.path().join("tsa.toml");
        std::fs::write(&path, toml).unwrap();
        let config = Config::load(&path).expect("the configuration loads");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let tsa = runtime.block_on(async { tsa::server::build(&config) });
        Fixture {
            runtime,
            tsa: Arc::new(tsa.expect("the TSA builds")),
            config,
            _dir: dir,
        }
    })
}

/// One input; panics when a property fails.
pub fn check(data: &[u8]) {
    let f = fixture();
    let reply = f.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(tsa::server::serve_stream(
            f.tsa.clone(),
            f.config.server.clone(),
            server,
        ));
        let exchange = async {
            // The server may stop reading (and close) before all is written: not an error.
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut reply = Vec::new();
            let _ = client.read_to_end(&mut reply).await;
            reply
        };
        // The read timeout bounds every wait of the server; this only catches a hang.
        let reply = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("the server finishes the connection");
        served.await.expect("the connection task does not panic");
        reply
    });
    if !reply.is_empty() {
        assert!(
            reply.starts_with(b"HTTP/1.1 ") || reply.starts_with(b"HTTP/1.0 "),
            "not an HTTP response: {:?}",
            String::from_utf8_lossy(&reply[..reply.len().min(64)])
        );
    }
}
