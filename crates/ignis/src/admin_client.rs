//! The CLI's side of the admin API (`ignis ls`, `logs`, `deploy`,
//! `rollback`, `delete`): authenticated requests, with errors that say what
//! to fix (the URL, the token, the node's reason for refusing a change),
//! never a raw hyper error alone.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, Limited};
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

    /// Sends a change (`PUT`, `POST`, `DELETE`) with a JSON body; returns
    /// the node's JSON answer, or its reason for refusing as the error.
    /// No time limit: the node compiles the version before it answers.
    pub async fn change(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.base);
        let body = body.map_or_else(Vec::new, |b| b.to_string().into_bytes());
        let req = http::Request::builder()
            .method(method)
            .uri(&url)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("x-ignis-user", user())
            .body(Full::new(Bytes::from(body)))
            .with_context(|| format!("{url} is not a valid URL"))?;
        let client = Client::builder(TokioExecutor::new()).build_http();
        let resp = client
            .request(req)
            .await
            .with_context(|| format!("cannot reach the admin API at {}", self.base))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer of {url}: {e}"))?
            .to_bytes();
        if status == 401 {
            bail!(
                "the admin API at {} refused the token (401): check IGNIS_ADMIN_TOKEN",
                self.base
            );
        }
        let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
        match (status, json) {
            (200, Some(j)) => Ok(j),
            (_, Some(j)) if j["error"].is_string() => {
                bail!(
                    "refused ({status}): {}",
                    j["error"].as_str().unwrap_or_default()
                )
            }
            _ => bail!(
                "{url} answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ),
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

/// Who runs this command, for the node's log (`x-ignis-user`).
fn user() -> String {
    let name = std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let name: String = format!("{name}@{}", host.trim())
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect();
    name.trim_end_matches('@').to_string()
}

/// `ignis deploy`: sends the table of function (or else actor class)
/// `name` from `manifest` and its component (at `component`) as its next
/// version.
pub async fn deploy(
    admin: &str,
    manifest: &std::path::Path,
    name: &str,
    component: &std::path::Path,
    expect_version: Option<u64>,
    json: bool,
) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("reading {}", manifest.display()))?;
    let doc: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not TOML", manifest.display()))?;
    let found = ["functions", "actors"].into_iter().find_map(|kind| {
        match doc.get(kind).and_then(|t| t.get(name)) {
            Some(toml::Value::Table(t)) => Some((kind, t)),
            _ => None,
        }
    });
    let Some((kind, table)) = found else {
        bail!(
            "{} has no [functions.{name}] or [actors.{name}]",
            manifest.display()
        );
    };
    let mut table = table.clone();
    table.remove("component");
    table.remove("build");
    let bytes = std::fs::read(component)
        .with_context(|| format!("reading the component {}", component.display()))?;
    use base64::Engine as _;
    let mut body = serde_json::json!({
        "config": toml::to_string(&table)?,
        "component": base64::engine::general_purpose::STANDARD.encode(&bytes),
    });
    if let Some(v) = expect_version {
        body["expect_version"] = v.into();
    }
    let answer = AdminClient::from_env(admin)?
        .change(
            http::Method::PUT,
            &format!("/v1/{kind}/{name}"),
            Some(&body),
        )
        .await?;
    Ok(describe(&answer, json))
}

/// `ignis rollback`: restores the version before the current one of a
/// function (or, with `actor`, an actor class).
pub async fn rollback(admin: &str, name: &str, actor: bool, json: bool) -> anyhow::Result<String> {
    let kind = if actor { "actors" } else { "functions" };
    let answer = AdminClient::from_env(admin)?
        .change(
            http::Method::POST,
            &format!("/v1/{kind}/{name}/rollback"),
            None,
        )
        .await?;
    Ok(describe(&answer, json))
}

/// `ignis delete`: removes a function (refused while a route or a cron
/// trigger names it).
pub async fn delete(admin: &str, name: &str, json: bool) -> anyhow::Result<String> {
    let answer = AdminClient::from_env(admin)?
        .change(http::Method::DELETE, &format!("/v1/functions/{name}"), None)
        .await?;
    Ok(describe(&answer, json))
}

/// A change's answer as one line (or its JSON).
fn describe(answer: &serde_json::Value, json: bool) -> String {
    if json {
        return format!("{answer}\n");
    }
    let function = format!(
        "{} {}",
        answer["kind"].as_str().unwrap_or("?"),
        answer["name"].as_str().unwrap_or("?")
    );
    let version = &answer["version"];
    let sha = answer["sha256"].as_str().unwrap_or("");
    let took = &answer["took_ms"];
    match (answer["action"].as_str(), answer["changed"].as_bool()) {
        (_, Some(false)) => {
            format!("{function}: version {version} already serves; nothing changed\n")
        }
        (Some("delete"), _) => format!("{function}: deleted in {took} ms\n"),
        (Some(action), _) => format!(
            "{function}: {action} done, version {version} serves (sha256 {}) after {took} ms\n",
            &sha[..sha.len().min(12)]
        ),
        _ => format!("{answer}\n"),
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
    out.push_str("FUNCTION\tVERSION\tTENANT\tREQUESTS\tACTIVE\tROUTES\n");
    for f in rows("functions") {
        let served: Vec<String> = routes
            .iter()
            .filter(|r| r["kind"] == "function" && r["target"] == f["name"])
            .map(|r| format!("{}{}", s(&r["host"]).replace('*', ""), s(&r["path"])))
            .collect();
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\n",
            s(&f["name"]),
            f["version"]["version"],
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
