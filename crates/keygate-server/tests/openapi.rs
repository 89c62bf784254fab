//! The OpenAPI description: valid OpenAPI 3.1 (checked by openapi-spec-validator from PyPI),
//! and schemathesis, a property-based fuzzer driven by it, finds no 5xx, no undocumented
//! status or content type and no response that breaks the schema. `/docs` and `/llms.txt`.

mod support;

use reqwest::StatusCode;
use serde_json::Value;
use support::TestApp;

/// Whether a Python module is importable; on CI a missing one fails the test, elsewhere it is
/// skipped loudly.
fn python_has(module: &str, install: &str) -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 with {install} is required on CI (scripts/deps.sh installs it)"
        );
        eprintln!("!!! SKIPPED: python3 with {install} is not installed (pip install {install})");
    }
    ok
}

async fn run(cmd: &str, args: Vec<String>) -> (bool, String) {
    let cmd = cmd.to_owned();
    // On the blocking pool: the server under test runs on this test's runtime.
    let out =
        tokio::task::spawn_blocking(move || std::process::Command::new(cmd).args(args).output())
            .await
            .expect("join")
            .expect("spawn");
    (
        out.status.success(),
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn the_description_is_valid_openapi_and_the_pages_render() {
    let app = TestApp::spawn().await;
    let r = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/json");
    let doc: Value = r.json().await.expect("json");
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    for (path, method) in [
        ("/v1/keys", "post"),
        ("/v1/keys/verify", "post"),
        ("/v1/auth", "get"),
        ("/oauth/token", "post"),
        ("/.well-known/oauth-authorization-server", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing"
        );
    }
    assert!(
        doc["paths"]["/v1/keys"]["post"]["responses"]["403"]["content"]["application/json"]
            ["schema"]["$ref"]
            .as_str()
            .is_some_and(|r| r.ends_with("/ErrorBody"))
    );

    let docs = app.client.get(app.url("/docs")).send().await.expect("docs");
    assert!(docs.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/html"));
    let html = docs.text().await.expect("html");
    assert!(
        html.contains("<code>POST /v1/keys</code>") && html.contains("<code>GET /v1/auth</code>")
    );
    let llms = app
        .client
        .get(app.url("/llms.txt"))
        .send()
        .await
        .expect("llms");
    assert!(llms.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/plain"));
    let text = llms.text().await.expect("text");
    assert!(text.contains("Authorization: Bearer kg_pk_") && text.contains("ORIGIN_NOT_ALLOWED"));

    if !python_has("openapi_spec_validator", "openapi-spec-validator") {
        return;
    }
    let file = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(file.path(), doc.to_string()).expect("write");
    let (ok, out) = run(
        "python3",
        vec![
            "-c".into(),
            "import json,sys; from openapi_spec_validator import validate; \
             validate(json.load(open(sys.argv[1]))); print('valid')"
                .into(),
            file.path().display().to_string(),
        ],
    )
    .await;
    assert!(ok && out.contains("valid"), "{out}");
}

#[tokio::test]
async fn schemathesis_finds_no_5xx_and_no_response_outside_the_schema() {
    if !python_has("schemathesis", "schemathesis") {
        return;
    }
    let app = TestApp::spawn().await;
    // Through python3, so the fuzzer is found wherever pip put its console script.
    let (ok, out) = run(
        "python3",
        vec![
            "-c".into(),
            "import sys; from schemathesis.cli import schemathesis; sys.argv[0] = 'schemathesis'; \
             sys.exit(schemathesis())"
                .into(),
            "run".into(),
            app.url("/openapi.json"),
            "--header".into(),
            format!("Authorization: Bearer {}", app.root),
            "--checks".into(),
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance".into(),
            "--max-examples".into(),
            "25".into(),
            "--no-color".into(),
        ],
    )
    .await;
    assert!(ok, "schemathesis found problems:\n{out}");
    // "Test cases: N generated, N passed" (a failing case would add ", K failed").
    let summary = out
        .lines()
        .find(|l| l.contains(" generated, "))
        .unwrap_or_default();
    assert!(
        summary.contains("passed") && !summary.contains("failed"),
        "{out}"
    );
}

#[tokio::test]
async fn a_cost_too_large_to_add_up_is_refused() {
    // Found by schemathesis: two calls costing close to 2^63 made the usage roll-up overflow.
    let app = TestApp::spawn().await;
    let r = app
        .post(
            "/v1/keys/verify",
            serde_json::json!({"key": app.root, "cost": 9_223_372_036_854_775_807u64}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let r = app
        .auth(Some(&app.root), &[("X-Keygate-Cost", "1000000001")])
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = app
        .auth(Some(&app.root), &[("X-Keygate-Cost", "1000000000")])
        .await;
    assert_eq!(r.status(), StatusCode::OK);
}
