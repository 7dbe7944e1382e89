//! The CLI's side of the admin API (`ignis ls`): one authenticated GET,
//! with errors that say what to fix (the URL, the token), never a raw
//! hyper error alone.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Largest answer read from the admin API.
const MAX_ANSWER: usize = 16 << 20;

/// Where the admin API is and how to authenticate.
pub struct AdminClient {
    base: String,
    token: String,
}

impl AdminClient {
    /// `base` like `http://127.0.0.1:9901`; the token from
    /// `IGNIS_ADMIN_TOKEN`.
    pub fn from_env(base: &str) -> anyhow::Result<AdminClient> {
        let token = std::env::var("IGNIS_ADMIN_TOKEN").map_err(|_| {
            anyhow::anyhow!(
                "set IGNIS_ADMIN_TOKEN to the node's admin token ([admin] in ignis.toml)"
            )
        })?;
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            bail!("--admin must be an http:// URL like http://127.0.0.1:9901 (got {base})");
        }
        Ok(AdminClient { base, token })
    }

    /// GETs `path`: the response head must come within 10 s and be 200.
    async fn get(&self, path: &str) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
        let url = format!("{}{path}", self.base);
        let req = http::Request::get(&url)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .body(Empty::<Bytes>::new())
            .with_context(|| format!("{url} is not a valid URL"))?;
        let client = Client::builder(TokioExecutor::new()).build_http();
        let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .map_err(|_| anyhow::anyhow!("{url}: no answer within 10 s"))?
            .with_context(|| format!("cannot reach the admin API at {}", self.base))?;
        match resp.status().as_u16() {
            200 => Ok(resp),
            401 => bail!(
                "the admin API at {} refused the token (401): check IGNIS_ADMIN_TOKEN",
                self.base
            ),
            status => bail!("{url} answered {status}"),
        }
    }

    /// GETs `path` and returns the JSON body.
    pub async fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        let resp = self.get(path).await?;
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer of {url}: {e}"))?
            .to_bytes();
        serde_json::from_slice(&body).with_context(|| format!("{url} did not answer JSON"))
    }
}

/// `ignis logs`: writes the node's log lines to `out` as they come, until
/// the node closes the stream (it stopped) or `out` fails.
pub async fn logs(admin: &str, out: &mut (dyn std::io::Write + Send)) -> anyhow::Result<()> {
    let client = AdminClient::from_env(admin)?;
    let mut body = client.get("/v1/logs").await?.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.with_context(|| format!("the log stream of {admin} broke"))?;
        if let Some(data) = frame.data_ref() {
            out.write_all(data)?;
            out.flush()?;
        }
    }
    Ok(())
}

/// `ignis ls`: what the node runs, as a table (or the JSON itself).
pub async fn ls(admin: &str, json: bool) -> anyhow::Result<String> {
    let listing = AdminClient::from_env(admin)?
        .get_json("/v1/functions")
        .await?;
    if json {
        return Ok(serde_json::to_string_pretty(&listing)?);
    }
    let mut out = String::new();
    let rows = |key: &str| listing[key].as_array().cloned().unwrap_or_default();
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "*".into(),
        other => other.to_string(),
    };
    let routes = rows("routes");
    out.push_str("FUNCTION\tTENANT\tREQUESTS\tACTIVE\tROUTES\n");
    for f in rows("functions") {
        let served: Vec<String> = routes
            .iter()
            .filter(|r| r["kind"] == "function" && r["target"] == f["name"])
            .map(|r| format!("{}{}", s(&r["host"]).replace('*', ""), s(&r["path"])))
            .collect();
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\n",
            s(&f["name"]),
            s(&f["tenant"]),
            f["requests"],
            f["active"],
            served.join(" ")
        ));
    }
    let actors = rows("actors");
    if !actors.is_empty() {
        out.push_str("\nACTOR CLASS\tTENANT\tLIVE\tACTIVATIONS\n");
        for a in actors {
            out.push_str(&format!(
                "{}\t{}\t{}\t{}\n",
                s(&a["class"]),
                s(&a["tenant"]),
                a["live"],
                a["activations"]
            ));
        }
    }
    let upstreams = rows("upstreams");
    if !upstreams.is_empty() {
        out.push_str("\nUPSTREAM\tORIGINS (up)\n");
        for u in upstreams {
            let origins: Vec<String> = u["origins"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| {
                    format!(
                        "{} ({})",
                        s(&o[0]),
                        if o[1] == true { "up" } else { "down" }
                    )
                })
                .collect();
            out.push_str(&format!("{}\t{}\n", s(&u["name"]), origins.join(", ")));
        }
    }
    Ok(out)
}
