//! Who may act on what in the management API: the rules over the calling key's tenant, kind,
//! user and scopes. Plain data in, a verdict out; the server looks records up and maps a
//! refusal to its HTTP answer.

use crate::decision::Code;
use crate::key::Kind;
use crate::scope::ScopeSet;
use crate::{FamilyId, TenantId, UserId};

/// The operator's tenant: its `sk` key with `*` may act in every tenant.
pub const OPERATOR_TENANT: &str = "default";

/// A user's place in their account: the owner manages it (users, plan, webhooks), a member
/// their own keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Made the account (sign-up) or was made its owner.
    Owner,
    /// Invited, or made by an admin key.
    Member,
}

impl Role {
    /// `owner` or `member`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Member => "member",
        }
    }

    /// The role named `s`, if it is one.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "owner" => Some(Self::Owner),
            "member" => Some(Self::Member),
            _ => None,
        }
    }
}

/// The key a management call is made with, as the rules see it.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    /// The key's tenant.
    pub tenant_id: &'a TenantId,
    /// The key's kind.
    pub kind: Kind,
    /// The key's user (`ut` keys).
    pub user_id: Option<&'a UserId>,
    /// The key's rotation family (a key and its successors).
    pub family_id: &'a FamilyId,
    /// The key's scopes.
    pub scopes: &'a ScopeSet,
    /// A `ut` key of the account's owner: it sees every key and event of the account.
    pub owner: bool,
}

/// Why an actor may not do what it asked: the code and a message safe to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The refusal's code.
    pub code: Code,
    /// What the caller is told.
    pub message: &'static str,
}

/// Where a call acts, once the rules allowed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    /// The caller's own tenant.
    Own(&'a TenantId),
    /// Another tenant the operator named: it acts there if that tenant exists (else the
    /// answer is as for a tenant it may not see).
    IfExists(TenantId),
    /// Every tenant (the operator listing without naming one).
    Every,
    /// A tenant the caller may not see: answered as if it did not exist.
    Hidden,
}

impl<'a> Actor<'a> {
    /// The user a `ut` key acts for: on the key routes it sees and manages only that user's
    /// keys (a user has a plan, not a tenant's management rights).
    pub fn own_user(&self) -> Option<&'a UserId> {
        match self.kind {
            Kind::Ut => self.user_id,
            _ => None,
        }
    }

    /// The user whose records alone the actor sees: a member's `ut` key sees its own; the
    /// owner's sees the whole account, as an `sk` key does.
    pub fn sees_only(&self) -> Option<&'a UserId> {
        if self.owner {
            None
        } else {
            self.own_user()
        }
    }

    /// The operator: a `sk` key with `*` in [`OPERATOR_TENANT`]; may act in any tenant.
    pub fn is_operator(&self) -> bool {
        self.tenant_id == OPERATOR_TENANT && self.kind == Kind::Sk && self.scopes.has_all()
    }

    /// Whether the actor's own scopes cover `scopes`: a key may only grant, change, rotate or
    /// revoke what it could do itself (`*` only if it holds `*`).
    pub fn covers(&self, scopes: &ScopeSet) -> bool {
        scopes.is_subset_of(self.scopes)
    }

    /// [`Actor::covers`] as a refusal.
    pub fn may_manage(&self, scopes: &ScopeSet) -> Result<(), Refused> {
        if self.covers(scopes) {
            Ok(())
        } else {
            Err(Refused {
                code: Code::ForbiddenScope,
                message: "the calling key cannot grant or manage scopes it does not hold itself",
            })
        }
    }

    /// Whether records of `tenant_id` are visible to the actor.
    pub fn sees(&self, tenant_id: &TenantId) -> bool {
        self.is_operator() || tenant_id == self.tenant_id
    }

    /// Whether a key of `tenant_id` and `user_id` is visible: in a visible tenant and, for a
    /// member's `ut` key, one of its own user's ([`Actor::sees_only`]).
    pub fn sees_key(&self, tenant_id: &TenantId, user_id: Option<&UserId>) -> bool {
        self.sees(tenant_id) && self.sees_only().is_none_or(|u| user_id == Some(u))
    }

    /// Whether the actor may change, rotate or revoke a key of rotation family `family_id`:
    /// a user token cannot extend or re-issue itself (a session key must end with its
    /// session); another key of the user can.
    pub fn may_change(&self, family_id: &FamilyId) -> Result<(), Refused> {
        if self.own_user().is_some() && self.family_id == family_id {
            Err(Refused {
                code: Code::ForbiddenScope,
                message: "a user token cannot change or rotate itself",
            })
        } else {
            Ok(())
        }
    }

    /// The tenant to act in: `requested` (a tenant id as the caller wrote it) if the actor
    /// may, or its own.
    pub fn act_in(&self, requested: Option<&str>) -> Target<'a> {
        match requested {
            None => Target::Own(self.tenant_id),
            Some(t) if self.tenant_id == t => Target::Own(self.tenant_id),
            Some(t) if self.is_operator() => Target::IfExists(TenantId::from(t)),
            Some(_) => Target::Hidden,
        }
    }

    /// The tenant a listing is limited to: every tenant for the operator naming none, else
    /// [`Actor::act_in`].
    pub fn listing(&self, requested: Option<&str>) -> Target<'a> {
        if self.is_operator() && requested.is_none() {
            return Target::Every;
        }
        self.act_in(requested)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(s: &[&str]) -> ScopeSet {
        ScopeSet::parse(s).expect("scopes")
    }

    /// A calling key's fields, owned, for [`Actor`] to borrow.
    struct Key {
        tenant: TenantId,
        kind: Kind,
        user: Option<UserId>,
        family: FamilyId,
        scopes: ScopeSet,
        owner: bool,
    }

    impl Key {
        fn actor(&self) -> Actor<'_> {
            Actor {
                tenant_id: &self.tenant,
                kind: self.kind,
                user_id: self.user.as_ref(),
                family_id: &self.family,
                scopes: &self.scopes,
                owner: self.owner,
            }
        }
    }

    fn key(tenant: &str, kind: Kind, user: Option<&str>, s: &[&str]) -> Key {
        Key {
            tenant: tenant.into(),
            kind,
            user: user.map(UserId::from),
            family: "fam_self".into(),
            scopes: scopes(s),
            owner: false,
        }
    }

    fn t(id: &str) -> TenantId {
        id.into()
    }

    #[test]
    fn only_a_star_sk_key_of_the_default_tenant_is_the_operator() {
        assert!(key("default", Kind::Sk, None, &["*"]).actor().is_operator());
        assert!(!key("default", Kind::Sk, None, &["keys:read"])
            .actor()
            .is_operator());
        assert!(!key("default", Kind::Ut, Some("usr_1"), &["*"])
            .actor()
            .is_operator());
        assert!(!key("tnt_a", Kind::Sk, None, &["*"]).actor().is_operator());
    }

    #[test]
    fn a_tenant_key_sees_and_acts_only_in_its_own_tenant() {
        let k = key("tnt_a", Kind::Sk, None, &["*"]);
        let a = k.actor();
        let own = t("tnt_a");
        assert!(a.sees(&own) && !a.sees(&t("tnt_b")));
        assert_eq!(a.act_in(None), Target::Own(&own));
        assert_eq!(a.act_in(Some("tnt_a")), Target::Own(&own));
        assert_eq!(a.act_in(Some("tnt_b")), Target::Hidden);
        assert_eq!(a.listing(None), Target::Own(&own));
        let op = key("default", Kind::Sk, None, &["*"]);
        let op = op.actor();
        assert_eq!(op.act_in(Some("tnt_b")), Target::IfExists(t("tnt_b")));
        assert_eq!(op.listing(None), Target::Every);
        assert_eq!(op.listing(Some("tnt_b")), Target::IfExists(t("tnt_b")));
    }

    #[test]
    fn a_key_manages_only_scopes_it_holds() {
        let k = key("tnt_a", Kind::Sk, None, &["keys:read", "keys:write"]);
        let a = k.actor();
        assert!(a.may_manage(&scopes(&["keys:read"])).is_ok());
        let star = a.may_manage(&scopes(&["*"])).expect_err("refused");
        assert_eq!(star.code, Code::ForbiddenScope);
        assert!(a.may_manage(&scopes(&["audit:read"])).is_err());
    }

    #[test]
    fn a_user_token_sees_only_its_users_keys_and_cannot_change_itself() {
        let k = key("tnt_a", Kind::Ut, Some("usr_1"), &["*"]);
        let u = k.actor();
        let (a, b) = (t("tnt_a"), t("tnt_b"));
        let (u1, u2) = (UserId::from("usr_1"), UserId::from("usr_2"));
        assert!(u.sees_key(&a, Some(&u1)));
        assert!(!u.sees_key(&a, Some(&u2)));
        assert!(!u.sees_key(&a, None));
        assert!(!u.sees_key(&b, Some(&u1)));
        assert!(u.may_change(&"fam_other".into()).is_ok());
        assert_eq!(
            u.may_change(&"fam_self".into()).expect_err("refused").code,
            Code::ForbiddenScope
        );
        // An sk key may change its own family (rotating itself is how it is replaced).
        let k = key("tnt_a", Kind::Sk, None, &["*"]);
        let s = k.actor();
        assert!(s.may_change(&"fam_self".into()).is_ok());
        assert!(s.sees_key(&a, Some(&u2)));
        // The owner's token sees every key of the account, still none of another.
        let mut k = key("tnt_a", Kind::Ut, Some("usr_1"), &["*"]);
        k.owner = true;
        let o = k.actor();
        assert_eq!((o.sees_only(), o.own_user()), (None, Some(&u1)));
        assert!(o.sees_key(&a, Some(&u2)) && o.sees_key(&a, None));
        assert!(!o.sees_key(&b, Some(&u1)));
    }
}
