//! A real headless Chromium driven through the Chrome DevTools Protocol (CDP) over its
//! WebSocket, for the web app's end-to-end tests. Each [`Browser`] is its own process
//! with its own profile (so its own localStorage: its own keys), one page.
//!
//! The binary is `$MESHD_TEST_CHROMIUM`, else the first of `chromium`, `chromium-browser`,
//! `google-chrome` on `PATH` (`.ci/run` installs Debian's `chromium`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::client::patience;

type Cdp = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One headless Chromium with one page.
pub struct Browser {
    child: tokio::process::Child,
    _profile: tempfile::TempDir,
    ws: Cdp,
    next_id: u64,
    session: String,
    /// Console and log entries seen so far (`level`, `text`).
    pub console: Vec<(String, String)>,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("pid", &self.child.id())
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

/// The Chromium binary to run.
///
/// # Errors
/// None found.
pub fn chromium() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MESHD_TEST_CHROMIUM") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!(
        "no Chromium found for the web app tests: install Debian's `chromium` \
         (apt-get install chromium) or set MESHD_TEST_CHROMIUM"
    )
}

impl Browser {
    /// Starts Chromium and opens a blank page.
    ///
    /// # Errors
    /// Chromium missing, failing to start, or its DevTools endpoint not answering.
    pub async fn launch() -> anyhow::Result<Self> {
        let bin = chromium()?;
        let profile = tempfile::tempdir()?;
        let child = tokio::process::Command::new(&bin)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-sync",
                "--disable-component-update",
                "--mute-audio",
                "--window-size=1280,800",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let endpoint = devtools_endpoint(profile.path()).await?;
        let (ws, _) = tokio_tungstenite::connect_async(endpoint.as_str())
            .await
            .context("connecting to Chromium's DevTools")?;
        let mut b = Self {
            child,
            _profile: profile,
            ws,
            next_id: 0,
            session: String::new(),
            console: Vec::new(),
        };
        let target = b
            .call_on(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await?;
        let target_id = target["targetId"].as_str().context("targetId")?.to_owned();
        let attached = b
            .call_on(
                None,
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .await?;
        b.session = attached["sessionId"]
            .as_str()
            .context("sessionId")?
            .to_owned();
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            b.call(domain, json!({})).await?;
        }
        Ok(b)
    }

    /// Sends a CDP command to the page and returns its result.
    ///
    /// # Errors
    /// The browser went away, answered with an error, or not within [`patience`].
    pub async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let session = self.session.clone();
        self.call_on(Some(&session), method, params).await
    }

    async fn call_on(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = s.into();
        }
        self.ws.send(Message::text(msg.to_string())).await?;
        let deadline = Instant::now() + patience();
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("Chromium did not answer {method} in time"))?
                .ok_or_else(|| anyhow!("Chromium closed the DevTools connection"))??;
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text)?;
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
            self.note_event(&v);
        }
    }

    fn note_event(&mut self, v: &Value) {
        match v["method"].as_str() {
            Some("Runtime.consoleAPICalled") => {
                let level = v["params"]["type"].as_str().unwrap_or("").to_owned();
                let text = v["params"]["args"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| {
                                x["value"]
                                    .as_str()
                                    .map_or_else(|| x["description"].to_string(), str::to_owned)
                            })
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                self.console.push((level, text));
            }
            Some("Log.entryAdded") => {
                let e = &v["params"]["entry"];
                self.console.push((
                    e["level"].as_str().unwrap_or("").to_owned(),
                    e["text"].as_str().unwrap_or("").to_owned(),
                ));
            }
            Some("Runtime.exceptionThrown") => {
                let d = &v["params"]["exceptionDetails"];
                self.console.push((
                    "exception".into(),
                    d["exception"]["description"].to_string(),
                ));
            }
            _ => {}
        }
    }

    /// Opens `url` and waits until the document has loaded.
    ///
    /// # Errors
    /// Navigation failed or the page never finished loading.
    pub async fn goto(&mut self, url: &str) -> anyhow::Result<()> {
        let r = self.call("Page.navigate", json!({"url": url})).await?;
        if let Some(e) = r.get("errorText") {
            bail!("navigating to {url}: {e}");
        }
        self.wait_for("the page to load", "document.readyState === 'complete'")
            .await?;
        Ok(())
    }

    /// Evaluates `expr` in the page (promises awaited) and returns its JSON value.
    ///
    /// # Errors
    /// The expression threw.
    pub async fn eval(&mut self, expr: &str) -> anyhow::Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(d) = r.get("exceptionDetails") {
            bail!("{expr}: {}", d["exception"]["description"]);
        }
        Ok(r["result"]["value"].clone())
    }

    /// Polls `expr` until it is truthy (backing off up to 100 ms); its value.
    ///
    /// # Errors
    /// [`patience`] passed; the error names `what` and the last value.
    pub async fn wait_for(&mut self, what: &str, expr: &str) -> anyhow::Result<Value> {
        let deadline = Instant::now() + patience();
        let mut pause = Duration::from_millis(5);
        loop {
            let v = self.eval(expr).await?;
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!(0) && v != json!("");
            if truthy {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!("timed out waiting for {what}; last value {v}");
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Types `text` into the element `selector` the way a user does: focus, value set,
    /// an `input` event.
    ///
    /// # Errors
    /// No such element.
    pub async fn fill(&mut self, selector: &str, text: &str) -> anyhow::Result<()> {
        let expr = format!(
            "(() => {{ const e = document.querySelector({s}); if (!e) throw new Error('no ' + {s}); \
             e.focus(); e.value = {t}; e.dispatchEvent(new Event('input', {{bubbles: true}})); return true; }})()",
            s = json!(selector),
            t = json!(text)
        );
        self.eval(&expr).await.map(drop)
    }

    /// Clicks the element `selector`.
    ///
    /// # Errors
    /// No such element.
    pub async fn click(&mut self, selector: &str) -> anyhow::Result<()> {
        let expr = format!(
            "(() => {{ const e = document.querySelector({s}); if (!e) throw new Error('no ' + {s}); e.click(); return true; }})()",
            s = json!(selector)
        );
        self.eval(&expr).await.map(drop)
    }

    /// The page's visible text.
    ///
    /// # Errors
    /// The browser went away.
    pub async fn text(&mut self) -> anyhow::Result<String> {
        Ok(self
            .eval("document.body.innerText")
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Saves a PNG of the page to `path`.
    ///
    /// # Errors
    /// Capture or write failed.
    pub async fn screenshot(&mut self, path: &Path) -> anyhow::Result<()> {
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().context("screenshot data")?)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }

    /// On a failed test step: a screenshot under the screenshot directory (printed),
    /// then the error, passed through.
    pub async fn on_failure<T>(&mut self, name: &str, r: anyhow::Result<T>) -> anyhow::Result<T> {
        if r.is_err() {
            let path = screenshot_dir().join(format!("{name}-failure.png"));
            match self.screenshot(&path).await {
                Ok(()) => eprintln!("screenshot of the failure: {}", path.display()),
                Err(e) => eprintln!("no screenshot of the failure: {e}"),
            }
            eprintln!("browser console: {:?}", self.console);
        }
        r
    }

    /// With `MESHD_TEST_README_SHOTS` set (a directory, `docs/` for the README's images), saves
    /// the page there as `name.png`; otherwise nothing.
    ///
    /// # Errors
    /// Capture or write failed.
    pub async fn readme_shot(&mut self, name: &str) -> anyhow::Result<()> {
        match std::env::var_os("MESHD_TEST_README_SHOTS") {
            Some(dir) => {
                self.screenshot(&PathBuf::from(dir).join(format!("{name}.png")))
                    .await
            }
            None => Ok(()),
        }
    }

    /// Console errors that name the Content-Security-Policy (a blocked script, style
    /// or connection).
    #[must_use]
    pub fn csp_violations(&self) -> Vec<String> {
        self.console
            .iter()
            .filter(|(_, t)| t.contains("Content Security Policy"))
            .map(|(_, t)| t.clone())
            .collect()
    }

    /// Stops Chromium.
    pub async fn close(mut self) {
        let _ = self.call_on(None, "Browser.close", json!({})).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// Where screenshots go: `$MESHD_TEST_SCREENSHOTS`, else `meshd-screenshots` in the temp dir.
#[must_use]
pub fn screenshot_dir() -> PathBuf {
    std::env::var_os("MESHD_TEST_SCREENSHOTS").map_or_else(
        || std::env::temp_dir().join("meshd-screenshots"),
        PathBuf::from,
    )
}

/// Waits for Chromium to write `DevToolsActivePort` (port, then the browser's path).
async fn devtools_endpoint(profile: &Path) -> anyhow::Result<String> {
    let file = profile.join("DevToolsActivePort");
    let deadline = Instant::now() + patience().max(Duration::from_secs(20));
    let mut pause = Duration::from_millis(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            let mut lines = text.lines();
            if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                return Ok(format!("ws://127.0.0.1:{}{}", port.trim(), path.trim()));
            }
        }
        if Instant::now() >= deadline {
            bail!("Chromium did not open its DevTools port");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}
