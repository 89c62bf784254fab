//! Typed ids: a tenant's id cannot be passed where a key family's is expected.
//!
//! Every id is text (`tnt_…`, `key_…`, `usr_…`), so without types `withdraw_budget(tenant)`
//! compiles as well as `withdraw_budget(family)`, and one costs money. [`Id`] wraps the text
//! with a marker of what it names. It reads as `&str` (`Deref`, `Borrow`, `AsRef`) wherever
//! text is wanted (SQL, JSON, logs, map lookups); it is built from text only at the edges
//! (the store's rows, the router's paths, the id generator), with `From<String>`.

use serde::{Deserialize, Serialize};
use std::borrow::Borrow;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;

/// What an [`Id`] names. Uninhabited: markers exist only as type parameters.
pub mod of {
    /// A tenant (an account).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum Tenant {}
    /// One key.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum Key {}
    /// A key and its rotation successors, which share one budget and one rate window.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum Family {}
    /// A user of a tenant.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum User {}
}

/// The id of a tenant.
pub type TenantId = Id<of::Tenant>;
/// The id of a key.
pub type KeyId = Id<of::Key>;
/// The id of a key family (the id of its first key).
pub type FamilyId = Id<of::Family>;
/// The id of a user.
pub type UserId = Id<of::User>;

/// An id of a `K`: text that the type system keeps apart from other ids.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent, bound = "")]
pub struct Id<K>(String, #[serde(skip)] PhantomData<K>);

impl<K> Id<K> {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The text, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl FamilyId {
    /// The family a key starts: a new key's family has the key's own id.
    pub fn started_by(key: &KeyId) -> Self {
        Self::from(key.as_str())
    }

    /// The family of an OAuth grant's tokens (one rate window, revoked together): named by
    /// the grant.
    pub fn of_grant(grant_id: &str) -> Self {
        Self::from(grant_id)
    }
}

impl KeyId {
    /// The id an OAuth grant's access tokens go by where keys are named (the audit log, the
    /// key cache): the grant's.
    pub fn of_grant(grant_id: &str) -> Self {
        Self::from(grant_id)
    }
}

impl<K> From<String> for Id<K> {
    fn from(s: String) -> Self {
        Self(s, PhantomData)
    }
}

impl<K> From<&str> for Id<K> {
    fn from(s: &str) -> Self {
        Self(s.to_owned(), PhantomData)
    }
}

impl<K> From<Id<K>> for String {
    fn from(id: Id<K>) -> Self {
        id.0
    }
}

impl<K> Deref for Id<K> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<K> AsRef<str> for Id<K> {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Hashes and compares as its text, so maps keyed by ids are looked up with `&str`.
impl<K> Borrow<str> for Id<K> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl<K> fmt::Display for Id<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<K> fmt::Debug for Id<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl<K> PartialEq<str> for Id<K> {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl<K> PartialEq<&str> for Id<K> {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl<K> PartialEq<String> for Id<K> {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl<K> PartialEq<Id<K>> for str {
    fn eq(&self, other: &Id<K>) -> bool {
        self == other.0
    }
}

impl<K> PartialEq<Id<K>> for &str {
    fn eq(&self, other: &Id<K>) -> bool {
        *self == other.0
    }
}

impl<K> PartialEq<Id<K>> for String {
    fn eq(&self, other: &Id<K>) -> bool {
        *self == other.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn an_id_reads_as_its_text_in_json_maps_and_comparisons() {
        let t = TenantId::from("tnt_1");
        assert_eq!(serde_json::to_string(&t).expect("json"), r#""tnt_1""#);
        let back: TenantId = serde_json::from_str(r#""tnt_1""#).expect("json");
        assert_eq!(back, t);
        assert_eq!(t, "tnt_1");
        assert_eq!(format!("{t} {t:?}"), r#"tnt_1 "tnt_1""#);
        let mut m = HashMap::new();
        m.insert(t.clone(), 1);
        assert_eq!(m.get("tnt_1"), Some(&1));
        assert_eq!(FamilyId::started_by(&KeyId::from("key_9")), "key_9");
    }
}
