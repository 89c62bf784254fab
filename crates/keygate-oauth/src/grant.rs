//! The issuance checks over plain data: the authorization request (RFC 6749 §4.1.1 with
//! PKCE, RFC 7636), the plan's narrowing of its scope, the code exchange (§4.1.3) and the
//! refresh (§6) with its scope narrowing. The server looks the client, code, grant and plan
//! up, calls these, and turns their refusals into pages, redirects or token errors.

use crate::{pkce, redirect, scope, ErrorCode};

/// The parameters of an authorization request, as received.
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthorizeParams<'a> {
    /// `redirect_uri`.
    pub redirect_uri: &'a str,
    /// `response_type`.
    pub response_type: Option<&'a str>,
    /// `state`.
    pub state: Option<&'a str>,
    /// `code_challenge`.
    pub code_challenge: Option<&'a str>,
    /// `code_challenge_method`.
    pub code_challenge_method: Option<&'a str>,
    /// `scope`.
    pub scope: Option<&'a str>,
}

/// What a registered client allows.
#[derive(Debug, Clone, Copy)]
pub struct Registered<'a> {
    /// Its redirect URIs.
    pub redirect_uris: &'a [String],
    /// The scopes it may ask for.
    pub scopes: &'a [String],
}

/// An authorization request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The redirect URI (one the client registered).
    pub redirect_uri: String,
    /// The client's `state`, returned with the answer.
    pub state: Option<String>,
    /// The PKCE S256 challenge.
    pub challenge: String,
    /// The scope asked for (the client's whole scope when none was named).
    pub scope: Vec<String>,
}

/// Why an authorization request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    /// The redirect URI cannot be trusted: the refusal is shown on keygate's own page.
    Page(&'static str),
    /// Told to the client at its (trusted) redirect URI, with its `state` when that was fit to
    /// send back.
    Redirect {
        /// The RFC 6749 error.
        error: ErrorCode,
        /// `error_description`.
        why: &'static str,
        /// Where to send it.
        redirect_uri: String,
        /// The client's `state`.
        state: Option<String>,
    },
}

/// The longest `state` sent back to a client.
pub const MAX_STATE: usize = 2048;

/// Checks an authorization request of a registered client: the redirect URI first (until it
/// is trusted nothing goes to it), then `state`, `response_type`, PKCE and the scope.
pub fn check_authorize(
    client: Registered<'_>,
    p: AuthorizeParams<'_>,
) -> Result<Accepted, Rejected> {
    if !client
        .redirect_uris
        .iter()
        .any(|r| redirect::matches(r, p.redirect_uri))
    {
        return Err(Rejected::Page(
            "The redirect URI is not registered for this client.",
        ));
    }
    let state = p.state.filter(|s| s.len() <= MAX_STATE).map(str::to_owned);
    let fail = |error, why| {
        Err(Rejected::Redirect {
            error,
            why,
            redirect_uri: p.redirect_uri.to_owned(),
            state: state.clone(),
        })
    };
    if p.state.is_some() && state.is_none() {
        return fail(
            ErrorCode::InvalidRequest,
            "state is longer than 2048 characters",
        );
    }
    match p.response_type {
        None => return fail(ErrorCode::InvalidRequest, "response_type is required"),
        Some("code") => {}
        Some(_) => {
            return fail(
                ErrorCode::UnsupportedResponseType,
                "only response_type=code is supported",
            )
        }
    }
    let challenge = match (p.code_challenge, p.code_challenge_method) {
        (None, _) => {
            return fail(
                ErrorCode::InvalidRequest,
                "code_challenge is required (PKCE with S256)",
            )
        }
        (Some(_), m) if m != Some("S256") => {
            return fail(
                ErrorCode::InvalidRequest,
                "code_challenge_method must be S256 (plain is not accepted)",
            )
        }
        (Some(c), _) if !pkce::valid_challenge(c) => {
            return fail(
                ErrorCode::InvalidRequest,
                "code_challenge must be a base64url SHA-256 (43 characters)",
            )
        }
        (Some(c), _) => c.to_owned(),
    };
    let Some(asked) = scope::parse(p.scope.unwrap_or("")) else {
        return fail(ErrorCode::InvalidScope, "scope is malformed");
    };
    if asked.iter().any(|s| !client.scopes.contains(s)) {
        return fail(
            ErrorCode::InvalidScope,
            "scope asks for more than this client may have",
        );
    }
    let scope = if asked.is_empty() {
        client.scopes.to_vec()
    } else {
        asked
    };
    Ok(Accepted {
        redirect_uri: p.redirect_uri.to_owned(),
        state,
        challenge,
        scope,
    })
}

/// The scope a user may grant: what was asked, limited to the user's plan (`None`: the plan
/// limits nothing). `None` when nothing is left.
pub fn narrow_to_plan(asked: &[String], plan: Option<&[String]>) -> Option<Vec<String>> {
    let left: Vec<String> = asked
        .iter()
        .filter(|s| plan.is_none_or(|p| p.contains(s)))
        .cloned()
        .collect();
    (!left.is_empty()).then_some(left)
}

/// An authorization code as issued.
#[derive(Debug, Clone, Copy)]
pub struct IssuedCode<'a> {
    /// The client it was issued to.
    pub client_id: &'a str,
    /// The redirect URI of its request.
    pub redirect_uri: &'a str,
    /// The PKCE challenge of its request.
    pub challenge: &'a str,
    /// Whether it was exchanged already.
    pub used: bool,
    /// When it expires, Unix ms.
    pub expires_at_ms: i64,
}

/// Why a code cannot be exchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeRefused {
    /// `invalid_grant` with this description; nothing else happens.
    Invalid(&'static str),
    /// Presented again with every binding right: what its first exchange issued is revoked.
    Replayed,
}

/// Checks a code exchange. Every binding (client, redirect URI, verifier) is checked before
/// the code counts as used, so a party that only intercepted the code cannot burn it, and a
/// used code alone (from a log or a browser history) revokes nothing.
pub fn check_exchange(
    code: IssuedCode<'_>,
    client_id: &str,
    redirect_uri: &str,
    verifier: &str,
    now_ms: i64,
) -> Result<(), CodeRefused> {
    if code.client_id != client_id {
        return Err(CodeRefused::Invalid(
            "the code was issued to another client",
        ));
    }
    if code.redirect_uri != redirect_uri {
        return Err(CodeRefused::Invalid(
            "redirect_uri differs from the authorization request",
        ));
    }
    if !pkce::verify_s256(verifier, code.challenge) {
        return Err(CodeRefused::Invalid(
            "code_verifier does not match the code_challenge",
        ));
    }
    if code.used {
        return Err(CodeRefused::Replayed);
    }
    if code.expires_at_ms <= now_ms {
        return Err(CodeRefused::Invalid("the code has expired"));
    }
    Ok(())
}

/// A grant as a refresh sees it.
#[derive(Debug, Clone, Copy)]
pub struct GrantFacts<'a> {
    /// Its client.
    pub client_id: &'a str,
    /// Its scope (space-separated).
    pub scope: &'a str,
    /// Whether it was revoked.
    pub revoked: bool,
    /// When its refresh tokens expire, Unix ms.
    pub expires_at_ms: i64,
}

/// Why a refresh is refused: the error and its description.
pub type RefreshRefused = (ErrorCode, &'static str);

/// The description of a refresh token that is unknown or another client's (the two look
/// alike).
pub const INVALID_REFRESH: &str = "the refresh token is not valid";

/// Checks a refresh of `grant` by `client_id` and returns the scope of the new access token:
/// the grant's, or the narrower one asked (`scope`, a subset of the grant's).
pub fn check_refresh(
    grant: GrantFacts<'_>,
    client_id: &str,
    asked: Option<&str>,
    now_ms: i64,
) -> Result<String, RefreshRefused> {
    if grant.client_id != client_id {
        return Err((ErrorCode::InvalidGrant, INVALID_REFRESH));
    }
    if grant.revoked {
        return Err((ErrorCode::InvalidGrant, "the grant was revoked"));
    }
    if grant.expires_at_ms <= now_ms {
        return Err((ErrorCode::InvalidGrant, "the refresh token has expired"));
    }
    let Some(asked) = asked else {
        return Ok(grant.scope.to_owned());
    };
    let held = scope::parse(grant.scope).unwrap_or_default();
    match scope::parse(asked) {
        Some(a) if !a.is_empty() && a.iter().all(|s| held.contains(s)) => Ok(scope::join(&a)),
        _ => Err((
            ErrorCode::InvalidScope,
            "scope must be a subset of the grant's scope",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn params<'a>() -> AuthorizeParams<'a> {
        AuthorizeParams {
            redirect_uri: "https://app.example/cb",
            response_type: Some("code"),
            state: Some("xyz"),
            code_challenge: Some(CHALLENGE),
            code_challenge_method: Some("S256"),
            scope: None,
        }
    }

    fn check(p: AuthorizeParams<'_>) -> Result<Accepted, Rejected> {
        let uris = strings(&["https://app.example/cb"]);
        let scopes = strings(&["docs:read", "llm:generate"]);
        check_authorize(
            Registered {
                redirect_uris: &uris,
                scopes: &scopes,
            },
            p,
        )
    }

    fn redirect_error(r: Result<Accepted, Rejected>) -> (ErrorCode, Option<String>) {
        match r {
            Err(Rejected::Redirect { error, state, .. }) => (error, state),
            other => panic!("expected a redirect, got {other:?}"),
        }
    }

    #[test]
    fn a_good_request_gets_the_clients_scope_when_it_names_none() {
        let ok = check(params()).expect("accepted");
        assert_eq!(ok.scope, strings(&["docs:read", "llm:generate"]));
        assert_eq!(ok.state.as_deref(), Some("xyz"));
        assert_eq!(ok.challenge, CHALLENGE);
        let narrow = check(AuthorizeParams {
            scope: Some("docs:read"),
            ..params()
        })
        .expect("accepted");
        assert_eq!(narrow.scope, strings(&["docs:read"]));
    }

    #[test]
    fn nothing_goes_to_an_unregistered_redirect_uri() {
        let r = check(AuthorizeParams {
            redirect_uri: "https://evil.example/cb",
            response_type: None,
            ..params()
        });
        assert!(matches!(r, Err(Rejected::Page(_))), "{r:?}");
    }

    #[test]
    fn each_bad_parameter_is_told_to_the_client() {
        let cases = [
            (
                AuthorizeParams {
                    response_type: Some("token"),
                    ..params()
                },
                ErrorCode::UnsupportedResponseType,
            ),
            (
                AuthorizeParams {
                    response_type: None,
                    ..params()
                },
                ErrorCode::InvalidRequest,
            ),
            (
                AuthorizeParams {
                    code_challenge: None,
                    ..params()
                },
                ErrorCode::InvalidRequest,
            ),
            (
                AuthorizeParams {
                    code_challenge_method: Some("plain"),
                    ..params()
                },
                ErrorCode::InvalidRequest,
            ),
            (
                AuthorizeParams {
                    code_challenge: Some("short"),
                    ..params()
                },
                ErrorCode::InvalidRequest,
            ),
            (
                AuthorizeParams {
                    scope: Some("keys:write"),
                    ..params()
                },
                ErrorCode::InvalidScope,
            ),
        ];
        for (p, want) in cases {
            let (got, state) = redirect_error(check(p));
            assert_eq!(got, want, "{p:?}");
            assert_eq!(state.as_deref(), Some("xyz"));
        }
        // A state too long to send back is not sent back.
        let long = "s".repeat(MAX_STATE + 1);
        let (got, state) = redirect_error(check(AuthorizeParams {
            state: Some(&long),
            ..params()
        }));
        assert_eq!((got, state), (ErrorCode::InvalidRequest, None));
    }

    #[test]
    fn the_plan_narrows_the_scope_and_may_leave_nothing() {
        let asked = strings(&["docs:read", "llm:generate"]);
        assert_eq!(narrow_to_plan(&asked, None), Some(asked.clone()));
        let plan = strings(&["docs:read"]);
        assert_eq!(
            narrow_to_plan(&asked, Some(&plan)),
            Some(strings(&["docs:read"]))
        );
        assert_eq!(narrow_to_plan(&asked, Some(&[])), None);
    }

    #[test]
    fn a_code_is_exchanged_only_with_every_binding_and_once() {
        let code = IssuedCode {
            client_id: "cli_a",
            redirect_uri: "https://app.example/cb",
            challenge: CHALLENGE,
            used: false,
            expires_at_ms: 2_000,
        };
        let ok = |c: IssuedCode<'_>, client, uri, v, now| check_exchange(c, client, uri, v, now);
        assert_eq!(
            ok(code, "cli_a", "https://app.example/cb", VERIFIER, 1_000),
            Ok(())
        );
        assert!(matches!(
            ok(code, "cli_b", "https://app.example/cb", VERIFIER, 1_000),
            Err(CodeRefused::Invalid(_))
        ));
        assert!(matches!(
            ok(code, "cli_a", "https://app.example/other", VERIFIER, 1_000),
            Err(CodeRefused::Invalid(_))
        ));
        assert!(matches!(
            ok(
                code,
                "cli_a",
                "https://app.example/cb",
                "wrong-verifier",
                1_000
            ),
            Err(CodeRefused::Invalid(_))
        ));
        assert_eq!(
            ok(code, "cli_a", "https://app.example/cb", VERIFIER, 2_000),
            Err(CodeRefused::Invalid("the code has expired"))
        );
        let used = IssuedCode { used: true, ..code };
        assert_eq!(
            ok(used, "cli_a", "https://app.example/cb", VERIFIER, 1_000),
            Err(CodeRefused::Replayed)
        );
        // A used code without its verifier revokes nothing.
        assert!(matches!(
            ok(
                used,
                "cli_a",
                "https://app.example/cb",
                "wrong-verifier",
                1_000
            ),
            Err(CodeRefused::Invalid(_))
        ));
    }

    #[test]
    fn a_refresh_keeps_or_narrows_the_grants_scope_never_widens_it() {
        let grant = GrantFacts {
            client_id: "cli_a",
            scope: "docs:read llm:generate",
            revoked: false,
            expires_at_ms: 2_000,
        };
        assert_eq!(
            check_refresh(grant, "cli_a", None, 1_000).as_deref(),
            Ok("docs:read llm:generate")
        );
        assert_eq!(
            check_refresh(grant, "cli_a", Some("docs:read"), 1_000).as_deref(),
            Ok("docs:read")
        );
        for bad in ["keys:write", "", "docs:read keys:write"] {
            assert_eq!(
                check_refresh(grant, "cli_a", Some(bad), 1_000).map_err(|e| e.0),
                Err(ErrorCode::InvalidScope),
                "{bad:?}"
            );
        }
        assert_eq!(
            check_refresh(grant, "cli_b", None, 1_000),
            Err((ErrorCode::InvalidGrant, INVALID_REFRESH))
        );
        let revoked = GrantFacts {
            revoked: true,
            ..grant
        };
        assert!(check_refresh(revoked, "cli_a", None, 1_000).is_err());
        assert!(check_refresh(grant, "cli_a", None, 2_000).is_err());
    }
}
