//! `tsa clock`: a running server's clock, like `chronyc tracking` and `chronyc sources`.

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Empty};

#[derive(Debug, clap::Args)]
pub struct ClockArgs {
    /// The server's admin listener.
    #[arg(long, default_value = "http://127.0.0.1:3181")]
    pub admin: String,
}

pub fn run(args: &ClockArgs) -> anyhow::Result<()> {
    let url = format!("{}/clock", args.admin.trim_end_matches('/'));
    let uri: hyper::Uri = url.parse().with_context(|| format!("invalid URL {url}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let text = runtime.block_on(async {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Empty<bytes::Bytes>>();
        let response = client
            .get(uri)
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("{url} answered {status}");
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    })?;
    print!("{text}");
    Ok(())
}
