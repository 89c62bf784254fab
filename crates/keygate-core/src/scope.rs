//! Scopes: exact strings like `ocr:read`, and `*` (every scope) for secret keys.

use crate::InvalidInput;

/// The scope that grants every other scope. Only `sk` keys may hold it.
pub const ALL: &str = "*";

/// One scope: 1 to 64 characters of `A-Z a-z 0-9 : _ . - /`, or exactly `*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope(String);

/// The resources of keygate's own management API: a scope `resource:action` on one of these
/// is keygate's (`keys:write`, `audit:read`, …), not the API's behind it. A plan's `scopes`
/// bound the latter only.
pub const KEYGATE_RESOURCES: [&str; 6] = ["keys", "users", "tenants", "audit", "webhooks", "oauth"];

/// Whether `scope` is one of keygate's own ([`KEYGATE_RESOURCES`]).
pub fn is_keygate_scope(scope: &str) -> bool {
    scope
        .split_once(':')
        .is_some_and(|(resource, _)| KEYGATE_RESOURCES.contains(&resource))
}

impl Scope {
    /// Parses a scope, refusing anything outside the allowed alphabet.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        let ok = s == ALL
            || (!s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b":_.-/".contains(&b)));
        if ok {
            Ok(Scope(s.to_owned()))
        } else {
            Err(InvalidInput::new(format!(
                "invalid scope {:?}: use 1-64 characters of A-Z a-z 0-9 : _ . - / or \"*\"",
                s.chars().take(70).collect::<String>()
            )))
        }
    }

    /// The scope text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is `*`.
    pub fn is_all(&self) -> bool {
        self.0 == ALL
    }
}

/// A key's scopes: a small sorted, de-duplicated list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScopeSet {
    scopes: Vec<Scope>,
    all: bool,
}

impl ScopeSet {
    /// Builds a set from already-parsed scopes.
    pub fn new(mut scopes: Vec<Scope>) -> Self {
        scopes.sort();
        scopes.dedup();
        let all = scopes.iter().any(Scope::is_all);
        Self { scopes, all }
    }

    /// The set of `*` alone: every scope.
    pub fn all() -> Self {
        Self::new(vec![Scope(ALL.to_owned())])
    }

    /// Parses every string; the first bad one is the error.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, InvalidInput> {
        let scopes = items
            .iter()
            .map(|s| Scope::parse(s.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(scopes))
    }

    /// Whether the set grants `required` (exact match, or the set holds `*`).
    #[inline]
    pub fn allows(&self, required: &str) -> bool {
        self.all || self.scopes.iter().any(|s| s.0 == required)
    }

    /// Whether the set holds `*`.
    pub fn has_all(&self) -> bool {
        self.all
    }

    /// Whether every scope of `self` is granted by `other`.
    pub fn is_subset_of(&self, other: &ScopeSet) -> bool {
        other.all || self.scopes.iter().all(|s| other.allows(s.as_str()))
    }

    /// The scopes, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.scopes.iter()
    }

    /// The scopes as strings, sorted.
    pub fn to_strings(&self) -> Vec<String> {
        self.scopes.iter().map(|s| s.0.clone()).collect()
    }

    /// Number of scopes.
    pub fn len(&self) -> usize {
        self.scopes.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_star() {
        let s = ScopeSet::parse(&["ocr:read", "llm:generate"]).expect("valid");
        assert!(s.allows("ocr:read"));
        assert!(!s.allows("ocr:write"));
        assert!(!s.allows("ocr"));
        let all = ScopeSet::parse(&["*"]).expect("valid");
        assert!(all.allows("anything:at-all"));
        assert!(s.is_subset_of(&all));
        assert!(!all.is_subset_of(&s));
    }

    #[test]
    fn rejects_bad_scopes() {
        for bad in ["", "a b", "ocr:*", "x\n", &"a".repeat(65)] {
            assert!(Scope::parse(bad).is_err(), "{bad:?}");
        }
    }
}
