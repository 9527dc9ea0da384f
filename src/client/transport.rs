//! Where requests go and how: an [`Endpoint`] is a TSA's URL with the credentials and TLS
//! settings to reach it, checked and loaded once (files read, the TLS configuration built, the
//! key refused over plain HTTP to another host) before anything touches the network. Requests
//! go as HTTP/1.1 over one connection kept open between exchanges (the chunks of a batch share
//! it); `https://` goes through rustls (its aws-lc-rs provider) trusting only the CA
//! certificates given, with an optional client certificate for mutual TLS. An API key goes as
//! `Authorization: Bearer`, marked sensitive.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use crate::pem;
use zeroize::Zeroizing;

/// The environment variable read for the API key when no key file is given.
pub const API_KEY_ENV: &str = "TSA_API_KEY";

/// The longest API key accepted (`tsa client new-key` makes 47 characters).
const MAX_KEY: usize = 4096;

/// How to reach a TSA, besides its URL.
#[derive(Default)]
pub struct Options {
    /// Sent as `Authorization: Bearer <key>`.
    pub api_key: Option<Zeroizing<String>>,
    /// Send the key over plain HTTP to a host that is not loopback.
    pub allow_insecure_key: bool,
    /// `https://`: the CA certificates (PEM) to trust for the server's certificate.
    pub ca_certs: Option<PathBuf>,
    /// `https://`: a client certificate chain and its key (PEM), for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// How long one exchange (connect, TLS, request, whole reply) may take; `None`:
    /// [`DEFAULT_TIMEOUT`].
    pub timeout: Option<std::time::Duration>,
}

/// How long one exchange may take when [`Options::timeout`] says nothing.
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A TSA's URL with what it takes to reach it; see the module documentation.
pub struct Endpoint {
    url: String,
    uri: hyper::Uri,
    /// The host (without IPv6 brackets) and port to connect to.
    host: String,
    port: u16,
    authorization: Option<HeaderValue>,
    /// A key goes over plain http:// to a host name only because the name is `localhost`:
    /// each connection checks that it resolves to loopback addresses alone.
    key_needs_loopback: bool,
    tls: Option<Tls>,
    timeout: std::time::Duration,
    /// The connection kept open between exchanges (keep-alive), once there is one.
    connection: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
}

struct Tls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    client_cert: bool,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.url)
            .field("api_key", &self.authorization.as_ref().map(|_| "…"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Endpoint {
    /// Checks `url` against `options` and loads the TLS files; touches no network.
    pub fn new(url: &str, options: &Options) -> anyhow::Result<Self> {
        let uri: hyper::Uri = url.parse().with_context(|| format!("invalid URL {url}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("{url}: only http:// and https:// URLs are supported"),
        };
        let authority = uri
            .authority()
            .with_context(|| format!("{url} names no host"))?;
        if authority.as_str().contains('@') {
            bail!(
                "{url}: put no credentials in the URL (they would show in the process list); \
                 give the API key with --api-key-file or {API_KEY_ENV}"
            );
        }
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_string();
        if host.is_empty() {
            bail!("{url} names no host");
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });

        let authorization = options
            .api_key
            .as_ref()
            .map(|key| {
                check_key(key)?;
                let mut value = HeaderValue::try_from(format!("Bearer {}", key.as_str()))
                    .context("the API key is not a valid header value")?;
                value.set_sensitive(true);
                anyhow::Ok(value)
            })
            .transpose()?;
        let key_in_clear = authorization.is_some() && !https && !options.allow_insecure_key;
        if key_in_clear && !is_loopback(&host) {
            bail!(
                "refusing to send the API key over plain http:// to {host}, where anyone on the \
                 way could read it: use an https:// URL (or --allow-insecure-key)"
            );
        }
        let key_needs_loopback = key_in_clear && host.parse::<IpAddr>().is_err();

        let tls = match https {
            true => Some(Tls {
                connector: tls_connector(options)?,
                server_name: ServerName::try_from(host.clone())
                    .with_context(|| format!("{url}: '{host}' is not a host name for TLS"))?,
                client_cert: options.client_cert.is_some(),
            }),
            false => {
                if options.ca_certs.is_some() || options.client_cert.is_some() {
                    bail!("--cacert, --cert and --key are for https:// URLs, not {url}");
                }
                None
            }
        };
        Ok(Self {
            url: url.to_string(),
            uri,
            host,
            port,
            authorization,
            key_needs_loopback,
            tls,
            timeout: options.timeout.unwrap_or(DEFAULT_TIMEOUT),
            connection: tokio::sync::Mutex::new(None),
        })
    }

    /// A plain endpoint: no credentials, no TLS settings (an `https://` URL is refused).
    pub fn plain(url: &str) -> anyhow::Result<Self> {
        Self::new(url, &Options::default())
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether an API key goes with the requests.
    pub fn has_api_key(&self) -> bool {
        self.authorization.is_some()
    }

    /// Whether a client certificate is offered.
    fn has_client_cert(&self) -> bool {
        self.tls.as_ref().is_some_and(|tls| tls.client_cert)
    }

    /// POSTs `body` as `media_type`: the reply's status, media type (without parameters) and
    /// body, within the endpoint's timeout. A 401 is an error that says what the TSA refused;
    /// so is a reply body over `max_reply` octets, read no further.
    pub(super) async fn exchange(
        &self,
        media_type: &'static str,
        body: Vec<u8>,
        max_reply: usize,
    ) -> anyhow::Result<(hyper::StatusCode, String, Bytes)> {
        tokio::time::timeout(
            self.timeout,
            self.exchange_untimed(media_type, body, max_reply),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no answer from {} within {} s (--timeout-s)",
                self.url,
                self.timeout.as_secs_f64()
            )
        })?
    }

    async fn exchange_untimed(
        &self,
        media_type: &'static str,
        body: Vec<u8>,
        max_reply: usize,
    ) -> anyhow::Result<(hyper::StatusCode, String, Bytes)> {
        let response = self
            .send(self.request(media_type, body)?)
            .await
            .with_context(|| format!("cannot reach {}", self.url))?;
        let status = response.status();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let body = http_body_util::Limited::new(response.into_body(), max_reply)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    anyhow::anyhow!(
                        "the reply from {} is longer than {max_reply} octets",
                        self.url
                    )
                } else {
                    anyhow::anyhow!("the reply from {} broke off: {e}", self.url)
                }
            })?
            .to_bytes();
        if status == hyper::StatusCode::UNAUTHORIZED {
            bail!(self.unauthorized(&content_type, &body));
        }
        Ok((status, content_type, body))
    }

    /// The POST of `body`: HTTP/1.1 on a connection of our own, so the path in the request
    /// line and the host in `Host`.
    fn request(
        &self,
        media_type: &'static str,
        body: Vec<u8>,
    ) -> anyhow::Result<hyper::Request<Full<Bytes>>> {
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        let host = match (self.uri.port_u16(), self.host.contains(':')) {
            (Some(port), false) => format!("{}:{port}", self.host),
            (Some(port), true) => format!("[{}]:{port}", self.host),
            (None, false) => self.host.clone(),
            (None, true) => format!("[{}]", self.host),
        };
        let mut req = hyper::Request::post(path)
            .header(HOST, host)
            .header(CONTENT_TYPE, media_type)
            .body(Full::new(Bytes::from(body)))?;
        if let Some(value) = &self.authorization {
            req.headers_mut().insert(AUTHORIZATION, value.clone());
        }
        Ok(req)
    }

    /// Sends `req` on the connection kept from the last exchange when the server left it
    /// open, else on a new one (which is then kept). A request that the kept connection
    /// closed under before it went out goes on a new connection; one that went out is never
    /// sent twice.
    async fn send(
        &self,
        mut req: hyper::Request<Full<Bytes>>,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let mut kept = self.connection.lock().await;
        if let Some(mut sender) = kept.take() {
            if sender.ready().await.is_ok() {
                match sender.try_send_request(req).await {
                    Ok(response) => {
                        *kept = Some(sender);
                        return Ok(response);
                    }
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => req = unsent,
                        None => return Err(e.into_error().into()),
                    },
                }
            }
        }
        let mut sender = self.connect().await?;
        let response = sender.send_request(req).await?;
        *kept = Some(sender);
        Ok(response)
    }

    /// A new HTTP/1.1 connection to the endpoint, over TLS for `https://`; its I/O runs on a
    /// task of its own until either side closes it.
    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let tcp = if self.key_needs_loopback {
            let addresses: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((self.host.as_str(), self.port))
                    .await?
                    .collect();
            if addresses.is_empty() || !addresses.iter().all(|a| a.ip().is_loopback()) {
                bail!(
                    "refusing to send the API key over plain http://: {} resolves to {addresses:?} \
                     here, not to loopback addresses alone (use an https:// URL, or \
                     --allow-insecure-key)",
                    self.host
                );
            }
            tokio::net::TcpStream::connect(&addresses[..]).await?
        } else {
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?
        };
        tcp.set_nodelay(true)?;
        let Some(tls) = &self.tls else {
            return handshake(tcp).await;
        };
        let stream = tls
            .connector
            .connect(tls.server_name.clone(), tcp)
            .await
            .context("the TLS handshake failed")?;
        handshake(stream).await
    }

    /// The error for a 401: the TSA's reason (the status text of its DER rejection) and what
    /// was sent.
    fn unauthorized(&self, content_type: &str, body: &[u8]) -> String {
        let reason = (content_type == super::REPLY_TYPE)
            .then(|| super::read::Response::from_der(body).ok())
            .flatten()
            .map(|r| super::printable(&r.status_text.join("; ")))
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "no reason given".to_string());
        let hint = match (self.has_api_key(), self.has_client_cert()) {
            (true, _) => "check the API key (--api-key-file or TSA_API_KEY)".to_string(),
            (false, true) => {
                "the client certificate names no client of the TSA's [auth]".to_string()
            }
            (false, false) => format!(
                "it wants credentials: an API key (--api-key-file or {API_KEY_ENV}) or a \
                 client certificate over https:// (--cert and --key)"
            ),
        };
        format!(
            "{} refused the request: HTTP 401 Unauthorized ({reason}); {hint}",
            self.url
        )
    }
}

/// HTTP/1.1 over `stream`, its connection task spawned.
async fn handshake<S>(stream: S) -> anyhow::Result<SendRequest<Full<Bytes>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// The rustls client configuration: the roots of `options.ca_certs` only, and the client
/// certificate when there is one.
fn tls_connector(options: &Options) -> anyhow::Result<TlsConnector> {
    let Some(ca_path) = &options.ca_certs else {
        bail!(
            "https:// needs --cacert FILE: the CA certificates (PEM) that the TSA's server \
             certificate must chain to (no system roots are used)"
        );
    };
    let mut roots = RootCertStore::empty();
    for cert in pem::certificates(ca_path).context("--cacert")? {
        roots
            .add(cert)
            .with_context(|| format!("--cacert: {} is not a usable CA", ca_path.display()))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let mut config = match &options.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert_path, key_path)) => {
            let chain = pem::certificates(cert_path).context("--cert")?;
            let key = pem::private_key(key_path).context("--key")?;
            builder.with_client_auth_cert(chain, key).with_context(|| {
                format!(
                    "--cert {} and --key {} do not make a usable client certificate",
                    cert_path.display(),
                    key_path.display()
                )
            })?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A loopback address, or `localhost`.
fn is_loopback(host: &str) -> bool {
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost") || host.eq_ignore_ascii_case("localhost."),
    }
}

/// A key is visible ASCII without spaces (what a Bearer credential may hold).
fn check_key(key: &str) -> anyhow::Result<()> {
    if key.is_empty() {
        bail!("the API key is empty");
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("the API key holds spaces, control or non-ASCII characters; give the key alone");
    }
    Ok(())
}

/// The API key: from `file` (trimmed) when given, else from the `TSA_API_KEY` environment
/// variable when set; `None` when neither is.
pub fn api_key(file: Option<&Path>) -> anyhow::Result<Option<Zeroizing<String>>> {
    api_key_from(file, std::env::var_os(API_KEY_ENV))
}

fn api_key_from(
    file: Option<&Path>,
    env: Option<std::ffi::OsString>,
) -> anyhow::Result<Option<Zeroizing<String>>> {
    let (text, source) = match (file, env) {
        (Some(path), _) => {
            let bytes = Zeroizing::new(
                std::fs::read(path)
                    .with_context(|| format!("cannot read the API key file {}", path.display()))?,
            );
            if bytes.len() > MAX_KEY {
                bail!(
                    "the API key file {} is longer than {MAX_KEY} octets; it should hold the key \
                     only",
                    path.display()
                );
            }
            let text = Zeroizing::new(
                std::str::from_utf8(&bytes)
                    .with_context(|| format!("the API key file {} is not UTF-8", path.display()))?
                    .trim()
                    .to_string(),
            );
            (text, format!("the API key file {}", path.display()))
        }
        (None, Some(value)) => {
            let value = Zeroizing::new(
                value
                    .into_string()
                    .map_err(|_| anyhow::anyhow!("{API_KEY_ENV} is not UTF-8"))?,
            );
            (
                Zeroizing::new(value.trim().to_string()),
                API_KEY_ENV.to_string(),
            )
        }
        (None, None) => return Ok(None),
    };
    if text.is_empty() {
        bail!("{source} is empty");
    }
    check_key(&text).with_context(|| source.clone())?;
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_key(key: &str) -> Options {
        Options {
            api_key: Some(Zeroizing::new(key.to_string())),
            ..Default::default()
        }
    }

    #[test]
    fn a_key_goes_over_plain_http_to_loopback_only() {
        for url in [
            "http://127.0.0.1:3180/",
            "http://127.1.2.3/",
            "http://[::1]:3180/",
            "http://localhost:3180/",
            "http://LOCALHOST/",
        ] {
            let endpoint = Endpoint::new(url, &with_key("tsa_k")).unwrap();
            assert!(endpoint.has_api_key(), "{url}");
        }
        for url in [
            "http://192.0.2.1:1/",
            "http://tsa.example/",
            "http://[2001:db8::1]/",
            "http://localhost.example/",
        ] {
            let e = Endpoint::new(url, &with_key("tsa_k")).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("refusing to send the API key over plain http://"),
                "{url}: {e:#}"
            );
            let options = Options {
                allow_insecure_key: true,
                ..with_key("tsa_k")
            };
            assert!(Endpoint::new(url, &options).unwrap().has_api_key());
            // Without a key, any host.
            assert!(!Endpoint::plain(url).unwrap().has_api_key());
        }
    }

    #[test]
    fn bad_urls_and_misplaced_options_are_refused_clearly() {
        let cases: [(&str, Options, &str); 6] = [
            (
                "ftp://127.0.0.1/",
                Options::default(),
                "only http:// and https://",
            ),
            (
                "127.0.0.1:3180",
                Options::default(),
                "only http:// and https://",
            ),
            ("http://a b/", Options::default(), "invalid URL"),
            (
                "http://me:tsa_k@127.0.0.1/",
                Options::default(),
                "no credentials in the URL",
            ),
            (
                "https://127.0.0.1/",
                Options::default(),
                "https:// needs --cacert FILE",
            ),
            (
                "http://127.0.0.1/",
                Options {
                    ca_certs: Some("ca.pem".into()),
                    ..Default::default()
                },
                "are for https:// URLs",
            ),
        ];
        for (url, options, expected) in cases {
            let e = format!("{:#}", Endpoint::new(url, &options).unwrap_err());
            assert!(e.contains(expected), "{url}: {e}");
        }
        let options = Options {
            ca_certs: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let e = format!(
            "{:#}",
            Endpoint::new("https://127.0.0.1/", &options).unwrap_err()
        );
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn the_debug_form_hides_the_key() {
        let endpoint = Endpoint::new("http://127.0.0.1/", &with_key("tsa_secret")).unwrap();
        assert!(!format!("{endpoint:?}").contains("tsa_secret"));
    }

    #[test]
    fn keys_come_trimmed_from_a_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "  tsa_abc\r\n").unwrap();
        let key = api_key_from(Some(&file), Some("tsa_env".into())).unwrap();
        assert_eq!(
            key.as_deref().map(String::as_str),
            Some("tsa_abc"),
            "the file first"
        );
        let key = api_key_from(None, Some(" tsa_env\n".into())).unwrap();
        assert_eq!(key.as_deref().map(String::as_str), Some("tsa_env"));
        assert!(api_key_from(None, None).unwrap().is_none());

        for (content, expected) in [
            ("\n", "is empty"),
            ("tsa_a tsa_b\n", "holds spaces"),
            ("name = \"alice\"\nkey_sha256 = \"…\"\n", "holds spaces"),
        ] {
            std::fs::write(&file, content).unwrap();
            let e = format!("{:#}", api_key_from(Some(&file), None).unwrap_err());
            assert!(e.contains(expected) && e.contains("API key file"), "{e}");
        }
        std::fs::write(&file, [b't', 0xff]).unwrap();
        let e = format!("{:#}", api_key_from(Some(&file), None).unwrap_err());
        assert!(e.contains("not UTF-8"), "{e}");
        let e = format!("{:#}", api_key_from(None, Some("".into())).unwrap_err());
        assert!(e.contains("TSA_API_KEY is empty"), "{e}");
        let e = format!(
            "{:#}",
            api_key_from(Some(&dir.path().join("none")), None).unwrap_err()
        );
        assert!(e.contains("cannot read the API key file"), "{e}");
    }

    /// How a test server treats a connection after answering on it.
    #[derive(Clone, Copy)]
    enum After {
        /// Keep it open for more requests.
        KeepOpen,
        /// Answer with `Connection: close` and close it.
        Close,
        /// Keep it open, then close it without a word once idle for 50 ms.
        DropWhenIdle,
    }

    /// A loopback HTTP/1.1 server answering each POST with its body as a time-stamp reply;
    /// its URL and how many connections it accepted.
    async fn echo_server(after: After) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/tsa", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        assert_eq!(req.uri().path(), "/tsa");
                        let body = req.into_body().collect().await?.to_bytes();
                        anyhow::Ok(
                            hyper::Response::builder()
                                .header(CONTENT_TYPE, "application/timestamp-reply")
                                .body(Full::new(body))?,
                        )
                    },
                );
                let connection = hyper::server::conn::http1::Builder::new()
                    .keep_alive(!matches!(after, After::Close))
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                tokio::spawn(async move {
                    match after {
                        After::DropWhenIdle => {
                            let idle = std::time::Duration::from_millis(50);
                            let _ = tokio::time::timeout(idle, connection).await;
                        }
                        _ => {
                            let _ = connection.await;
                        }
                    }
                });
            }
        });
        (url, accepted)
    }

    /// Three exchanges with 100 ms between them: each reply carries its own request back.
    async fn three_exchanges(url: &str) {
        let endpoint = Endpoint::plain(url).unwrap();
        for i in 0..3u8 {
            let body = vec![i; 1000 + usize::from(i)];
            let (status, content_type, reply) = endpoint
                .exchange("application/timestamp-query", body.clone(), 1 << 20)
                .await
                .unwrap();
            assert_eq!(status, hyper::StatusCode::OK);
            assert_eq!(content_type, "application/timestamp-reply");
            assert_eq!(reply, body, "exchange {i}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn exchanges_share_one_connection_while_the_server_keeps_it() {
        let (url, accepted) = echo_server(After::KeepOpen).await;
        three_exchanges(&url).await;
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_reply_longer_than_its_limit_is_refused() {
        let (url, _) = echo_server(After::KeepOpen).await;
        let endpoint = Endpoint::plain(&url).unwrap();
        let body = vec![7; 10_000];
        let error = endpoint
            .exchange("application/timestamp-query", body.clone(), 9_999)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("longer than 9999 octets"),
            "{error}"
        );
        let (_, _, reply) = endpoint
            .exchange("application/timestamp-query", body.clone(), 10_000)
            .await
            .unwrap();
        assert_eq!(reply, body);
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_replaced() {
        for after in [After::Close, After::DropWhenIdle] {
            let (url, accepted) = echo_server(after).await;
            three_exchanges(&url).await;
            assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
        }
    }
}
