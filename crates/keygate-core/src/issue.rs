//! Key issuance rules over plain data: the presets of API.md's table, the default origins of a
//! `pk` key, and the checks of a name, scope list, IP and origin allow-list, and a user's
//! plan. The engine adds what needs the store, the configuration or a clock.

use crate::{InvalidInput, IpAllowList, Kind, OriginList, ScopeSet};

fn invalid(msg: impl Into<String>) -> InvalidInput {
    InvalidInput::new(msg)
}

/// Origins a new `pk` gets when none are given: the AI canvases.
pub const DEFAULT_PK_ORIGINS: [&str; 4] = [
    "https://claude.ai",
    "https://chatgpt.com",
    "https://gemini.google.com",
    "https://grok.com",
];

/// A preset of API.md's table.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    /// Scopes.
    pub scopes: &'static [&'static str],
    /// Budget.
    pub budget: u64,
    /// Requests per minute.
    pub per_minute: u32,
    /// Lifetime, days.
    pub ttl_days: u64,
    /// Whether the default origin list applies (`widget`: the caller must give its own).
    pub default_origins: bool,
}

const SAFE_READ: &[&str] = &["ocr:read", "llm:generate", "translate:run", "docs:read"];

/// Looks a preset up by name.
pub fn preset(name: &str) -> Option<Preset> {
    match name {
        "default" => Some(Preset {
            scopes: SAFE_READ,
            budget: 1_000,
            per_minute: 30,
            ttl_days: 30,
            default_origins: true,
        }),
        "aidemo" => Some(Preset {
            scopes: SAFE_READ,
            budget: 2_000,
            per_minute: 60,
            ttl_days: 30,
            default_origins: true,
        }),
        "widget" => Some(Preset {
            scopes: &[
                "chat:run",
                "booking:create",
                "form:submit",
                "contact:create",
            ],
            budget: 5_000,
            per_minute: 120,
            ttl_days: 365,
            default_origins: false,
        }),
        _ => None,
    }
}

/// Checks a display name (of a key, OAuth client, tenant or user; on create and on update):
/// 1 to 200 characters, not blank, and none that [`crate::name_problem`] refuses
/// (control characters, bidirectional controls) anywhere in what was sent.
pub fn check_name(name: &str) -> Result<String, InvalidInput> {
    if let Some(why) = crate::name_problem(name) {
        return Err(invalid(why));
    }
    let n = name.trim();
    if n.is_empty() || n.chars().count() > 200 {
        return Err(invalid("name must be 1 to 200 characters"));
    }
    Ok(n.to_owned())
}

/// Parses scopes for a key of `kind`: `*` only on `sk`.
pub fn check_scopes(kind: Kind, scopes: &[String]) -> Result<ScopeSet, InvalidInput> {
    let set = ScopeSet::parse(scopes)?;
    if set.has_all() && kind != Kind::Sk {
        return Err(invalid("scope \"*\" is only for secret (sk) keys"));
    }
    if set.len() > 100 {
        return Err(invalid("at most 100 scopes"));
    }
    Ok(set)
}

/// Parses an IP allow-list.
pub fn check_ips(ips: &[String]) -> Result<IpAllowList, InvalidInput> {
    if ips.len() > 100 {
        return Err(invalid("at most 100 allowed_ips"));
    }
    IpAllowList::parse(ips)
}

/// Parses an origin allow-list.
pub fn check_origins(origins: &[String]) -> Result<OriginList, InvalidInput> {
    if origins.len() > 100 {
        return Err(invalid("at most 100 allowed_origins"));
    }
    OriginList::parse(origins)
}

/// Checks that `scopes` lie within a plan's `allowed` scopes (keygate's own management scopes
/// aside: a plan bounds the API behind keygate).
pub fn within_plan(allowed: &[String], scopes: &ScopeSet) -> Result<(), InvalidInput> {
    let allowed = ScopeSet::parse(allowed)?;
    if scopes
        .iter()
        .all(|s| crate::scope::is_keygate_scope(s.as_str()) || allowed.allows(s.as_str()))
    {
        Ok(())
    } else {
        Err(invalid("scopes exceed what the user's plan allows"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn every_preset_of_the_table_exists_and_its_scopes_parse() {
        for name in ["default", "aidemo", "widget"] {
            let p = preset(name).expect("preset");
            let scopes: Vec<String> = p.scopes.iter().map(|s| (*s).to_owned()).collect();
            check_scopes(Kind::Pk, &scopes).expect("a pk key may hold a preset's scopes");
        }
        assert!(preset("admin").is_none());
        assert!(!preset("widget").expect("widget").default_origins);
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(check_name("  ok  ").expect("ok"), "ok");
        assert!(check_name("   ").is_err());
        assert!(check_name(&"n".repeat(201)).is_err());
        assert!(check_name("bad\u{202e}name").is_err());
    }

    #[test]
    fn star_is_only_for_secret_keys_and_lists_are_bounded() {
        assert!(check_scopes(Kind::Sk, &strings(&["*"])).is_ok());
        assert!(check_scopes(Kind::Pk, &strings(&["*"])).is_err());
        assert!(check_scopes(Kind::Ut, &strings(&["*"])).is_err());
        let many: Vec<String> = (0..101).map(|i| format!("s{i}:read")).collect();
        assert!(check_scopes(Kind::Sk, &many).is_err());
        let ips: Vec<String> = (0..101).map(|i| format!("10.0.0.{i}")).collect();
        assert!(check_ips(&ips).is_err());
        assert!(check_origins(&strings(&["https://a.example"])).is_ok());
    }

    #[test]
    fn a_plan_bounds_the_scopes() {
        let plan = strings(&["docs:read", "llm:generate"]);
        let ok = ScopeSet::parse(&strings(&["docs:read"])).expect("scopes");
        let over = ScopeSet::parse(&strings(&["docs:read", "ocr:read"])).expect("scopes");
        assert!(within_plan(&plan, &ok).is_ok());
        assert!(within_plan(&plan, &over).is_err());
        // keygate's own scopes are not the API's: a plan's list does not bound them.
        let own = ScopeSet::parse(&strings(&["docs:read", "keys:write", "audit:read"])).expect("s");
        assert!(within_plan(&plan, &own).is_ok());
        assert!(crate::scope::is_keygate_scope("webhooks:read"));
        assert!(!crate::scope::is_keygate_scope("keysmith:read"));
        assert!(!crate::scope::is_keygate_scope("docs:read"));
    }
}
