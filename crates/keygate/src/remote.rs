//! The CLI's HTTP mode: management commands sent to a running node with a key
//! (`--url` / `KEYGATE_URL`, `--key` / `KEYGATE_KEY`), printed as tables or, with `--json`,
//! as the node's own JSON.

use serde_json::Value;

/// A running node and the key to call it with.
pub struct Remote {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Remote {
    /// `url` is the node's base URL; `key` an `sk` (or `ut`) key with the scopes needed.
    pub fn new(url: &str, key: Option<String>) -> Result<Self, String> {
        let key = key.ok_or("--key (or KEYGATE_KEY) is needed with --url")?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err("--url must start with http:// or https://".into());
        }
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            base: url.trim_end_matches('/').to_owned(),
            key,
            http,
        })
    }

    /// Sends a request; a refusal becomes an error with the node's code and message.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req
            .send()
            .await
            .map_err(|e| format!("cannot reach {}: {e}", self.base))?;
        let status = res.status();
        let text = res.text().await.map_err(|e| e.to_string())?;
        let v: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .map_err(|_| format!("{status}: {}", text.chars().take(200).collect::<String>()))?
        };
        if status.is_success() {
            return Ok(v);
        }
        Err(match serde_json::from_value::<keygate_api::ErrorBody>(v) {
            Ok(e) => format!("{} {}: {}", status.as_u16(), e.error.code, e.error.message),
            Err(_) => format!("{} ERROR", status.as_u16()),
        })
    }
}

/// An answer read as the API type it is.
pub fn read<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, String> {
    serde_json::from_value(v).map_err(|e| format!("unexpected answer from the node: {e}"))
}

/// A request body from an API type.
pub fn body_of<T: serde::Serialize>(b: &T) -> Result<Option<Value>, String> {
    serde_json::to_value(b).map(Some).map_err(|e| e.to_string())
}

/// An optional value as a table shows it (`-` when absent).
pub fn opt(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".into())
}

/// A list as a table shows it.
pub fn words(v: &[String]) -> String {
    v.join(" ")
}

/// Query-string encoding of optional filters.
pub fn query(pairs: &[(&str, Option<String>)]) -> String {
    let set: Vec<(&str, &str)> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (*k, v)))
        .collect();
    if set.is_empty() {
        return String::new();
    }
    let q: Vec<String> = set
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect();
    format!("?{}", q.join("&"))
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A plain-text table: a header row and left-aligned columns. Why by hand: a few columns of
/// short values, no wrapping, no colours.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut out = line(headers.iter().map(|h| (*h).to_owned()).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.clone()));
        out.push('\n');
    }
    out
}

/// A JSON value as a table cell.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_queries_encode() {
        let t = table(
            &["ID", "NAME"],
            &[
                vec!["key_1".into(), "a b".into()],
                vec!["k".into(), "-".into()],
            ],
        );
        assert_eq!(t, "ID     NAME\nkey_1  a b\nk      -\n");
        assert_eq!(
            query(&[("name", Some("a b&c".into())), ("kind", None)]),
            "?name=a%20b%26c"
        );
        assert_eq!(query(&[("kind", None)]), "");
        assert_eq!(cell(&serde_json::json!(["a", "b"])), "a b");
    }
}
